"""Tip jars and payment links (``gateway.service.tips``) over the fake node and the memory
store: what wallets and the link page get, every refusal an ``LnurlError`` with its status,
and a single-use link that can never be paid twice, races included."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from gateway import errors, lnurl
from gateway.client import bolt11
from gateway.lnurl import Image, LnurlError, SuccessAction
from gateway.ports import (
    InvoiceState,
    InvoiceUpdate,
    LinkState,
    Msat,
    NewInvoice,
    PaymentHash,
    PaymentLink,
)
from gateway.service import TipJar, Tips
from gateway.service.tips import REUSE_MIN_SECONDS
from gateway.store import MemoryStore
from tests.fakes import FakeClock, FakeInvoiceBackend

BASE = "https://pay.example.com"
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 20
COFFEE = TipJar(
    name="coffee",
    description="Buy me a coffee",
    min_msat=Msat(1_000),
    max_msat=Msat(1_000_000),
    comment_allowed=20,
    image=Image.of(PNG),
    success=SuccessAction(message="Thank you!"),
)


class Env:
    def __init__(self, *, canceler: bool = True, **jars: TipJar) -> None:
        self.clock = FakeClock()
        self.backend = FakeInvoiceBackend(self.clock)
        self.store = MemoryStore()
        self.tips = Tips(
            backend=self.backend,
            canceler=self.backend if canceler else None,
            store=self.store,
            clock=self.clock,
            jars=jars or {"coffee": COFFEE},
            base_url=BASE + "/",
        )

    async def link(self, low: int, high: int | None = None, **options: Any) -> PaymentLink:
        options.setdefault("memo", "Table 4")
        options.setdefault("expires_in", None)
        options.setdefault("single_use", True)
        return await self.tips.create_link(min_msat=low, max_msat=high or low, **options)

    async def settle(self, payment_hash: bytes) -> None:
        """The payer pays, and the watcher records it."""
        self.backend.pay(payment_hash)
        await self.store.apply_update(InvoiceUpdate.of(self.backend.invoices[payment_hash]))

    def open_on_node(self) -> list[bytes]:
        return [h for h, i in self.backend.invoices.items() if i.state is InvoiceState.OPEN]


async def _refused(call: Any, status: int, reason: str) -> LnurlError:
    with pytest.raises(LnurlError, match=reason) as refused:
        await call
    assert refused.value.status == status
    return refused.value


# Tip jars


async def test_a_jar_answers_its_lightning_address() -> None:
    env = Env()
    tips = env.tips
    assert tips.domain == "pay.example.com"
    assert tips.address("coffee") == "coffee@pay.example.com"
    assert tips.jar_url("coffee") == "https://pay.example.com/.well-known/lnurlp/coffee"
    body = await tips.jar_pay_request("coffee")
    assert body["tag"] == "payRequest"
    assert body["callback"] == "https://pay.example.com/.well-known/lnurlp/coffee/callback"
    assert (body["minSendable"], body["maxSendable"], body["commentAllowed"]) == (
        1_000,
        1_000_000,
        20,
    )
    assert body["metadata"] == lnurl.metadata(
        "Buy me a coffee", "coffee@pay.example.com", Image.of(PNG)
    )
    assert lnurl.encode_lnurl(tips.jar_url("coffee")) == tips.jar_lnurl("coffee")


async def test_a_tip_invoice_commits_to_the_metadata_and_keeps_the_comment() -> None:
    env = Env()
    metadata = str((await env.tips.jar_pay_request("coffee"))["metadata"])
    answer = await env.tips.jar_invoice("coffee", {"amount": "21000", "comment": "great post"})
    assert answer["routes"] == []
    assert answer["successAction"] == {"tag": "message", "message": "Thank you!"}
    invoice = bolt11.decode(str(answer["pr"]))
    assert invoice.amount_msat == 21_000
    assert invoice.description_hash == lnurl.description_hash(metadata)
    assert invoice.description is None
    record = await env.store.get_invoice(PaymentHash(invoice.payment_hash))
    assert record is not None
    assert (record.service, record.tip_jar, record.comment) == (
        "tip:coffee",
        "coffee",
        "great post",
    )
    assert (record.token_id, record.method, record.path) == (b"", "", "")
    assert record.expires_at == env.clock.now() + 600
    assert env.backend.invoices[invoice.payment_hash].memo == ""


async def test_a_tagged_address_pays_its_jar() -> None:
    env = Env()
    body = await env.tips.jar_pay_request("coffee+friday")
    assert ["text/identifier", "coffee+friday@pay.example.com"] in json.loads(str(body["metadata"]))
    answer = await env.tips.jar_invoice("coffee+friday", {"amount": "5000"})
    invoice = bolt11.decode(str(answer["pr"]))
    assert invoice.description_hash == lnurl.description_hash(str(body["metadata"]))
    record = await env.store.get_invoice(PaymentHash(invoice.payment_hash))
    assert record is not None
    assert record.tip_jar == "coffee"


@pytest.mark.parametrize("name", ["tea", "Coffee", "coffee/../x", "tea+coffee", "x" * 100])
async def test_an_unknown_jar_is_404(name: str) -> None:
    env = Env()
    await _refused(env.tips.jar_pay_request(name), 404, "no tip jar named")
    await _refused(env.tips.jar_invoice(name, {"amount": "5000"}), 404, "no tip jar named")


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ({"amount": "999"}, "below the minimum, 1000 msat"),
        ({"amount": "1000001"}, "above the maximum, 1000000 msat"),
        ({"amount": "5000", "comment": "x" * 21}, "21 characters; at most 20"),
        ({"comment": "hi"}, "no amount"),
    ],
)
async def test_a_bad_tip_is_400_and_makes_no_invoice(query: dict[str, str], reason: str) -> None:
    env = Env()
    await _refused(env.tips.jar_invoice("coffee", query), 400, reason)
    assert env.backend.invoices == {}


async def test_a_jar_without_comments_refuses_one() -> None:
    env = Env(tea=TipJar("tea", "Tea", Msat(1), Msat(10)))
    assert "commentAllowed" not in await env.tips.jar_pay_request("tea")
    await _refused(env.tips.jar_invoice("tea", {"amount": "5", "comment": "x"}), 400, "no comment")


async def test_a_node_or_store_failure_is_503_and_leaves_no_payable_invoice() -> None:
    env = Env()
    env.backend.unavailable = True
    await _refused(env.tips.jar_invoice("coffee", {"amount": "5000"}), 503, "try again later")
    env.backend.unavailable = False

    async def broken(*_args: object) -> None:
        raise errors.StoreError("disk full")

    env.store.add_invoice = broken  # type: ignore[method-assign,assignment]
    await _refused(env.tips.jar_invoice("coffee", {"amount": "5000"}), 503, "store is unavailable")
    [made] = env.backend.invoices.values()
    assert made.state is InvoiceState.CANCELED


def test_jars_and_base_url_are_checked() -> None:
    def build(base: str = BASE, expiry: int = 600, **jars: TipJar) -> Tips:
        backend = FakeInvoiceBackend()
        return Tips(
            backend=backend,
            canceler=backend,
            store=MemoryStore(),
            clock=FakeClock(),
            jars=jars,
            base_url=base,
            invoice_expiry=expiry,
        )

    for base in ("https://pay.example.com/tips", "ftp://pay.example.com", "https://", "x"):
        with pytest.raises(ValueError, match="must be an origin"):
            build(base)
    with pytest.raises(ValueError, match="at least 1 s"):
        build(expiry=0)
    with pytest.raises(ValueError, match="filed as 'tea'"):
        build(tea=COFFEE)
    elsewhere = SuccessAction(url="https://other.example.com/thanks")
    with pytest.raises(ValueError, match=r"success URL must be on pay\.example\.com"):
        build(coffee=TipJar("coffee", "c", Msat(1), Msat(2), success=elsewhere))
    assert build("http://127.0.0.1:8080").domain == "127.0.0.1:8080"

    with pytest.raises(ValueError, match="1 to 64 of a-z"):
        TipJar("Coffee", "c", Msat(1), Msat(2))
    with pytest.raises(ValueError, match="description is empty"):
        TipJar("coffee", "", Msat(1), Msat(2))
    with pytest.raises(ValueError, match="1 msat <= min <= max"):
        TipJar("coffee", "c", Msat(3), Msat(2))
    with pytest.raises(ValueError, match="0 to 1000 characters"):
        TipJar("coffee", "c", Msat(1), Msat(2), comment_allowed=1001)


# Payment links


async def test_a_link_is_created_with_its_urls() -> None:
    env = Env()
    link = await env.link(5_000, memo="Table 4", expires_in=3600)
    assert len(link.link_id) == 16
    assert (link.min_msat, link.max_msat, link.fixed, link.single_use) == (5000, 5000, True, True)
    assert link.expires_at == env.clock.now() + 3600
    assert await env.store.get_link(link.link_id) == link
    page = f"{BASE}/.well-known/l402/links/{link.link_id}"
    assert env.tips.link_page_url(link.link_id) == page
    assert env.tips.link_lnurl(link.link_id) == lnurl.encode_lnurl(page + "/lnurl")
    for bad, reason in (
        ({"low": 0}, "1 msat <= min <= max"),
        ({"low": 5, "high": 4}, "1 msat <= min <= max"),
        ({"low": 5, "memo": "x" * 121}, "at most 120 printable"),
        ({"low": 5, "memo": "a\nb"}, "at most 120 printable"),
        ({"low": 5, "expires_in": 0}, "positive number of seconds"),
    ):
        await _refused(env.link(**bad), 400, reason)


async def test_a_links_lnurl_pay_commits_to_its_memo_and_keeps_the_comment() -> None:
    env = Env()
    link = await env.link(1_000, 9_000, single_use=False)
    body = await env.tips.link_pay_request(link.link_id)
    assert body["callback"] == env.tips.link_page_url(link.link_id) + "/callback"
    assert (body["minSendable"], body["maxSendable"]) == (1_000, 9_000)
    assert body["metadata"] == '[["text/plain","Table 4"]]'
    answer = await env.tips.link_callback(link.link_id, {"amount": "2500", "comment": "thx"})
    assert "successAction" not in answer
    invoice = bolt11.decode(str(answer["pr"]))
    assert invoice.description_hash == lnurl.description_hash(str(body["metadata"]))
    record = await env.store.get_invoice(PaymentHash(invoice.payment_hash))
    assert record is not None
    assert (record.link_id, record.amount_msat, record.comment) == (link.link_id, 2500, "thx")
    unnamed = await env.link(1_000, memo="")
    assert json.loads(str((await env.tips.link_pay_request(unnamed.link_id))["metadata"])) == [
        ["text/plain", f"Payment link {unnamed.link_id}"]
    ]
    await _refused(env.tips.link_callback(link.link_id, {"amount": "999"}), 400, "below")


async def test_a_reusable_link_issues_an_invoice_per_payer_and_counts_payments() -> None:
    env = Env()
    link = await env.link(2_000, single_use=False)
    first = await env.tips.link_invoice(link.link_id, None)
    second = await env.tips.link_invoice(link.link_id, 2_000)
    assert first.payment_hash != second.payment_hash
    assert bolt11.decode(first.payment_request).description == "Table 4"
    await env.settle(first.payment_hash)
    await env.settle(second.payment_hash)
    status = await env.tips.link_status(link.link_id)
    assert (status.state, status.link.paid_count, status.link.paid_msat) == (
        LinkState.OPEN,
        2,
        4_000,
    )
    assert status.invoice is None


async def test_a_single_use_link_reuses_its_open_invoice() -> None:
    env = Env()
    link = await env.link(5_000)
    first = await env.tips.link_invoice(link.link_id, None)
    assert first.expires_at == env.clock.now() + 600
    env.clock.advance(600 - REUSE_MIN_SECONDS)
    assert await env.tips.link_invoice(link.link_id, 5_000) == first
    status = await env.tips.link_status(link.link_id)
    assert (status.state, status.invoice) == (LinkState.OPEN, first)
    env.clock.advance(1)  # too little left to pay it: a fresh one, the old one cancelled
    fresh = await env.tips.link_invoice(link.link_id, None)
    assert fresh.payment_hash != first.payment_hash
    assert env.backend.invoices[first.payment_hash].state is InvoiceState.CANCELED
    assert env.open_on_node() == [fresh.payment_hash]
    stored = await env.store.get_link(link.link_id)
    assert stored is not None
    assert stored.open_hash == fresh.payment_hash


async def test_another_amount_or_kind_replaces_the_open_invoice_after_cancelling_it() -> None:
    env = Env()
    link = await env.link(1_000, 9_000)
    await _refused(env.tips.link_invoice(link.link_id, None), 400, "choose an amount")
    await _refused(env.tips.link_invoice(link.link_id, 9_001), 400, "from 1000 to 9000 msat")
    page = await env.tips.link_invoice(link.link_id, 3_000)
    other = await env.tips.link_invoice(link.link_id, 4_000)
    answer = await env.tips.link_callback(link.link_id, {"amount": "4000"})  # a wallet's
    by_wallet = bolt11.decode(str(answer["pr"])).payment_hash
    assert len({page.payment_hash, other.payment_hash, by_wallet}) == 3
    assert env.open_on_node() == [by_wallet]  # one payable invoice at any time
    # The node's stream reports no cancellation: the store is told at once.
    for replaced in (page.payment_hash, other.payment_hash):
        record = await env.store.get_invoice(replaced)
        assert record is not None
        assert record.state is InvoiceState.CANCELED
    again = await env.tips.link_callback(link.link_id, {"amount": "4000"})
    assert again["pr"] == answer["pr"]


async def test_a_single_use_link_is_paid_once() -> None:
    env = Env()
    link = await env.link(1_000, 9_000)
    first = await env.tips.link_invoice(link.link_id, 3_000)
    env.backend.pay(first.payment_hash)  # paid, the watcher has not recorded it yet
    await _refused(env.tips.link_invoice(link.link_id, 4_000), 410, "paid already")
    assert len(env.backend.invoices) == 1  # nothing else issued
    await env.store.apply_update(InvoiceUpdate.of(env.backend.invoices[first.payment_hash]))
    status = await env.tips.link_status(link.link_id)
    assert status.state is LinkState.PAID
    assert status.invoice is not None
    assert status.invoice.state is InvoiceState.SETTLED
    for call in (
        env.tips.link_invoice(link.link_id, 3_000),
        env.tips.link_pay_request(link.link_id),
        env.tips.link_callback(link.link_id, {"amount": "3000"}),
    ):
        await _refused(call, 410, "paid already")


class _GatedBackend(FakeInvoiceBackend):
    """Makes each invoice only once ``waiting`` calls are in ``add_invoice`` together."""

    def __init__(self, clock: FakeClock, waiting: int) -> None:
        super().__init__(clock)
        self.waiting = waiting
        self.arrived = 0
        self.gate = asyncio.Event()

    async def add_invoice(
        self, amount_msat: Msat, memo: str, expiry: int, description_hash: bytes = b""
    ) -> NewInvoice:
        self.arrived += 1
        if self.arrived == self.waiting:
            self.gate.set()
        await self.gate.wait()
        return await super().add_invoice(amount_msat, memo, expiry, description_hash)


def _gated(env: Env, waiting: int) -> _GatedBackend:
    backend = _GatedBackend(env.clock, waiting)
    env.backend = backend
    env.tips = Tips(
        backend=backend,
        canceler=backend,
        store=env.store,
        clock=env.clock,
        jars={"coffee": COFFEE},
        base_url=BASE,
    )
    return backend


@pytest.mark.parametrize("first_amount", [None, 2_000])
async def test_concurrent_requests_for_a_new_amount_leave_one_open_invoice(
    first_amount: int | None,
) -> None:
    env = Env()
    backend = _gated(env, 2)
    link = await env.link(1_000, 9_000)
    if first_amount is not None:
        backend.gate.set()
        old = await env.tips.link_invoice(link.link_id, first_amount)
        backend.gate.clear()
        backend.arrived = 0
    both = await asyncio.gather(*(env.tips.link_invoice(link.link_id, 5_000) for _ in "ab"))
    assert both[0] == both[1]  # the loser answers with the winner's invoice
    assert env.open_on_node() == [both[0].payment_hash]
    losers = [h for h, i in backend.invoices.items() if i.state is InvoiceState.CANCELED]
    assert len(losers) == (1 if first_amount is None else 2)  # the loser's (and the old one)
    if first_amount is not None:
        assert old.payment_hash in losers
    stored = await env.store.get_link(link.link_id)
    assert stored is not None
    assert stored.open_hash == both[0].payment_hash


async def test_concurrent_requests_for_different_amounts_leave_one_open_invoice() -> None:
    env = Env()
    _gated(env, 2)
    link = await env.link(1_000, 9_000)
    results = await asyncio.gather(
        env.tips.link_invoice(link.link_id, 5_000),
        env.tips.link_invoice(link.link_id, 6_000),
        return_exceptions=True,
    )
    [winner] = [result for result in results if not isinstance(result, BaseException)]
    [loser] = [result for result in results if isinstance(result, BaseException)]
    assert isinstance(loser, LnurlError)
    assert loser.status == 409
    assert env.open_on_node() == [winner.payment_hash]


async def test_a_node_that_cannot_cancel_blocks_a_new_invoice() -> None:
    env = Env()
    link = await env.link(1_000, 9_000)
    first = await env.tips.link_invoice(link.link_id, 3_000)
    env.backend.unavailable = True
    await _refused(env.tips.link_invoice(link.link_id, 4_000), 503, "try again later")
    env.backend.unavailable = False
    assert env.open_on_node() == [first.payment_hash]


async def test_without_a_canceler_the_open_invoice_must_expire_first() -> None:
    env = Env(canceler=False)
    link = await env.link(1_000, 9_000)
    first = await env.tips.link_invoice(link.link_id, 3_000)
    await _refused(env.tips.link_invoice(link.link_id, 4_000), 409, "once it expires")
    assert await env.tips.link_invoice(link.link_id, 3_000) == first
    env.clock.advance(601)
    update = InvoiceUpdate(first.payment_hash, InvoiceState.EXPIRED, 0, Msat(0), None)
    await env.store.apply_update(update)  # the watcher's expiry sweep
    second = await env.tips.link_invoice(link.link_id, 4_000)
    assert second.payment_hash != first.payment_hash


async def test_an_expired_or_cancelled_link_is_410_and_unknown_is_404() -> None:
    env = Env()
    link = await env.link(1_000, expires_in=120)
    invoice = await env.tips.link_invoice(link.link_id, None)
    assert invoice.expires_at == env.clock.now() + 120  # no longer than the link lives
    env.clock.advance(120)
    await _refused(env.tips.link_pay_request(link.link_id), 410, "expired")
    assert (await env.tips.link_status(link.link_id)).state is LinkState.EXPIRED

    other = await env.link(1_000)
    open_one = await env.tips.link_invoice(other.link_id, None)
    cancelled = await env.tips.cancel_link(other.link_id)
    assert cancelled.canceled_at == env.clock.now()
    assert env.backend.invoices[open_one.payment_hash].state is InvoiceState.CANCELED
    assert (await env.tips.cancel_link(other.link_id)).canceled_at == cancelled.canceled_at
    await _refused(env.tips.link_invoice(other.link_id, None), 410, "was cancelled")
    await _refused(env.tips.link_callback(other.link_id, {"amount": "1000"}), 410, "cancelled")

    for unknown in ("nope", "../../etc", "x" * 100):
        await _refused(env.tips.link_pay_request(unknown), 404, "no payment link")
        await _refused(env.tips.link_status(unknown), 404, "no payment link")
        await _refused(env.tips.cancel_link(unknown), 404, "no payment link")


async def test_cancelling_a_link_being_paid_or_on_a_down_node() -> None:
    env = Env()
    link = await env.link(1_000)
    paid = await env.tips.link_invoice(link.link_id, None)
    env.backend.pay(paid.payment_hash)
    assert (await env.tips.cancel_link(link.link_id)).canceled_at is not None

    other = await env.link(1_000)
    await env.tips.link_invoice(other.link_id, None)
    env.backend.unavailable = True
    await _refused(env.tips.cancel_link(other.link_id), 503, "cancel it again later")
    env.backend.unavailable = False
    await env.tips.cancel_link(other.link_id)
    assert env.open_on_node() == []


async def test_a_failing_store_is_503() -> None:
    env = Env()
    link = await env.link(1_000)

    async def broken(*_args: object) -> None:
        raise errors.StoreError("locked")

    env.store.get_link = broken  # type: ignore[method-assign,assignment]
    await _refused(env.tips.link_invoice(link.link_id, None), 503, "store is unavailable")
