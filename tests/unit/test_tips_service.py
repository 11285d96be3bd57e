"""Tip jars and payment links (``gateway.service.tips``) over the fake node and the memory
store: what wallets and the link page get, every refusal an ``LnurlError`` with its status,
and a single-use link that can never be paid twice, races included."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
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
from gateway.pricing import Pricing
from gateway.service import L402Service, TipJar, Tips
from gateway.service.tips import LINK_MIN_SECONDS, REUSE_MIN_SECONDS, new_link
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

    async def settle_recorded(self, payment_hash: bytes) -> None:
        """The watcher records a settlement the node made earlier."""
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


async def test_tips_take_their_turn_in_the_challenges_invoice_slots() -> None:
    """Anonymous tips queue no more calls on the node's invoice database than challenges
    may: with every slot of the service taken, a tip waits for one."""
    clock = FakeClock()
    backend = FakeInvoiceBackend(clock)
    store = MemoryStore()
    service = L402Service(
        pricing=Pricing(()), backend=backend, store=store, clock=clock, max_pending_invoices=2
    )
    tips = Tips(
        backend=backend,
        canceler=backend,
        store=store,
        clock=clock,
        jars={"coffee": COFFEE},
        base_url=BASE + "/",
        invoice_slots=service.invoice_slots,
    )
    for _ in range(2):
        await service.invoice_slots.acquire()
    tip = asyncio.create_task(tips.jar_invoice("coffee", {"amount": "21000"}))
    for _ in range(20):
        await asyncio.sleep(0)
    assert (tip.done(), backend.invoices) == (False, {})
    service.invoice_slots.release()
    answer = await asyncio.wait_for(tip, 5)
    assert bolt11.decode(str(answer["pr"])).amount_msat == 21_000
    assert len(backend.invoices) == 1
    service.invoice_slots.release()


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


async def test_a_jar_without_comments_drops_one() -> None:
    env = Env(tea=TipJar("tea", "Tea", Msat(1), Msat(10)))
    assert "commentAllowed" not in await env.tips.jar_pay_request("tea")
    answer = await env.tips.jar_invoice("tea", {"amount": "5", "comment": "x"})
    record = await env.store.get_invoice(PaymentHash(bolt11.decode(str(answer["pr"])).payment_hash))
    assert record is not None
    assert record.comment == ""


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
    with pytest.raises(ValueError, match="0 to 600 characters"):
        TipJar("coffee", "c", Msat(1), Msat(2), comment_allowed=601)


# Payment links


async def test_a_link_is_created_with_its_urls() -> None:
    env = Env()
    link = await env.link(5_000, memo="Table 4", expires_in=3600)
    assert lnurl.LINK_ID.fullmatch(link.link_id)
    assert (link.min_msat, link.max_msat, link.fixed, link.single_use) == (5000, 5000, True, True)
    assert link.expires_at == env.clock.now() + 3600
    assert await env.store.get_link(link.link_id) == link
    page = f"{BASE}/.well-known/l402/links/{link.link_id}"
    assert env.tips.link_page_url(link.link_id) == page
    assert env.tips.link_lnurl(link.link_id) == lnurl.encode_lnurl(page + "/lnurl")
    for bad, reason in (
        ({"low": 0}, "whole satoshis with 1 sat <= min <= max"),
        ({"low": 5_000, "high": 4_000}, "1 sat <= min <= max"),
        ({"low": 1_500}, "whole satoshis"),
        ({"low": 1_000, "high": 2_001}, "whole satoshis"),
        ({"low": 1_000, "memo": "x" * 121}, "121 characters; at most 120"),
        ({"low": 1_000, "memo": "\u202eevil"}, "memo has control characters"),
        ({"low": 1_000, "expires_in": 0}, "at least 120 s from now"),
        ({"low": 1_000, "expires_in": LINK_MIN_SECONDS - 1}, "at least 120 s from now"),
    ):
        await _refused(env.link(**bad), 400, reason)


def test_a_new_link_id_never_starts_with_a_dash_and_memos_are_text() -> None:
    def make(**options: Any) -> PaymentLink:
        fields: dict[str, Any] = {
            "min_msat": 1_000,
            "max_msat": 1_000,
            "memo": "",
            "expires_in": None,
            "single_use": True,
            "now": 1_000.0,
        }
        return new_link(**(fields | options))

    ids = {make().link_id for _ in range(2_000)}
    assert len(ids) == 2_000
    assert all(lnurl.LINK_ID.fullmatch(link_id) for link_id in ids)
    assert not any(link_id.startswith("-") for link_id in ids)
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"
    persian = "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"
    assert make(memo=f"{family} {persian}").memo == f"{family} {persian}"
    assert make(memo="Table 4\r\nwindow\tseat").memo == "Table 4\nwindow seat"
    # The shortest life: a minute to take payments, then a minute with no new invoice.
    assert LINK_MIN_SECONDS == 2 * REUSE_MIN_SECONDS
    assert make(expires_in=LINK_MIN_SECONDS).expires_at == 1_000.0 + LINK_MIN_SECONDS
    for bad in ("\x1b[2J", "\u2066x\u2069", "nel\x85"):
        with pytest.raises(ValueError, match="control characters"):
            make(memo=bad)
    for bad_life in (LINK_MIN_SECONDS - 1, REUSE_MIN_SECONDS, float("inf")):
        with pytest.raises(ValueError, match="at least 120 s"):
            make(expires_in=bad_life)


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
    # Its last minute: too little left to hand it out, yet a payer may be paying it now, so
    # it is not replaced either: 409 until it expires.
    env.clock.advance(1)
    for call in (
        env.tips.link_invoice(link.link_id, None),
        env.tips.link_callback(link.link_id, {"amount": "5000"}),
    ):
        held = await _refused(call, 409, "open invoice for 5 sat; ask again in 59 s")
        assert held.retry_after == REUSE_MIN_SECONDS - 1
    assert env.open_on_node() == [first.payment_hash]
    assert env.backend.cancelled == {}
    env.clock.advance(REUSE_MIN_SECONDS - 1)  # expired: a fresh one, the old one cancelled
    fresh = await env.tips.link_invoice(link.link_id, None)
    assert fresh.payment_hash != first.payment_hash
    assert env.backend.invoices[first.payment_hash].state is InvoiceState.CANCELED
    assert env.open_on_node() == [fresh.payment_hash]
    stored = await env.store.get_link(link.link_id)
    assert stored is not None
    assert stored.open_hash == fresh.payment_hash


async def test_a_single_use_links_page_and_wallet_get_the_same_invoice() -> None:
    env = Env()
    link = await env.link(1_000, 9_000)
    body = await env.tips.link_pay_request(link.link_id)
    assert "commentAllowed" not in body  # its one invoice serves every payer: no comments
    page = await env.tips.link_invoice(link.link_id, 3_000)
    invoice = bolt11.decode(page.payment_request)
    assert invoice.description_hash == lnurl.description_hash(str(body["metadata"]))
    assert invoice.description is None
    answer = await env.tips.link_callback(link.link_id, {"amount": "3000"})
    assert answer["pr"] == page.payment_request
    # A comment is dropped, not refused (wallets send one whatever the link says).
    commented = await env.tips.link_callback(link.link_id, {"amount": "3000", "comment": "hi"})
    assert commented["pr"] == page.payment_request
    assert env.open_on_node() == [page.payment_hash]


async def test_nobody_can_take_away_the_invoice_a_payer_holds() -> None:
    env = Env()
    link = await env.link(1_000, 9_000)
    await _refused(env.tips.link_invoice(link.link_id, None), 400, "choose an amount")
    await _refused(env.tips.link_invoice(link.link_id, 9_001), 400, "from 1000 to 9000 msat")
    held = await env.tips.link_invoice(link.link_id, 3_000)
    for call in (
        env.tips.link_invoice(link.link_id, 4_000),
        env.tips.link_callback(link.link_id, {"amount": "4000"}),
    ):
        refused = await _refused(call, 409, "open invoice for 3 sat; ask again in 600 s")
        assert refused.retry_after == 600  # until it expires
    assert env.open_on_node() == [held.payment_hash]  # the payer's invoice stays payable
    assert env.backend.cancelled == {}
    env.clock.advance(600 - REUSE_MIN_SECONDS)  # REUSE_MIN_SECONDS left: still the payer's
    refused = await _refused(env.tips.link_invoice(link.link_id, 4_000), 409, "in 60 s")
    assert refused.retry_after == REUSE_MIN_SECONDS
    assert await env.tips.link_invoice(link.link_id, 3_000) == held
    env.clock.advance(0.5)  # its last minute: handed out to nobody, replaced for nobody
    for amount in (3_000, 4_000):
        refused = await _refused(env.tips.link_invoice(link.link_id, amount), 409, "in 60 s")
        assert refused.retry_after == REUSE_MIN_SECONDS  # whole seconds, rounded up
    env.clock.advance(REUSE_MIN_SECONDS - 1)
    refused = await _refused(env.tips.link_invoice(link.link_id, 4_000), 409, "in 1 s")
    assert refused.retry_after == 1
    assert env.open_on_node() == [held.payment_hash]
    assert env.backend.cancelled == {}
    env.clock.advance(0.5)  # expired: now it may be replaced
    other = await env.tips.link_invoice(link.link_id, 4_000)
    assert env.open_on_node() == [other.payment_hash]
    # The node's stream reports no cancellation: the store is told at once.
    record = await env.store.get_invoice(held.payment_hash)
    assert record is not None
    assert record.state is InvoiceState.CANCELED
    again = await env.tips.link_callback(link.link_id, {"amount": "4000"})
    assert again["pr"] == other.payment_request


async def test_an_open_invoice_is_handed_out_again_only_if_the_node_says_it_is_open() -> None:
    env = Env()
    link = await env.link(1_000, 9_000)
    first = await env.tips.link_invoice(link.link_id, 3_000)
    lookups = env.backend.lookups
    assert await env.tips.link_invoice(link.link_id, 3_000) == first
    assert env.backend.lookups == lookups + 1
    # Cancelled on the node, but the store never heard (its write failed).
    await env.backend.cancel_invoice(first.payment_hash)
    fresh = await env.tips.link_invoice(link.link_id, 3_000)
    assert fresh.payment_hash != first.payment_hash
    assert env.open_on_node() == [fresh.payment_hash]
    record = await env.store.get_invoice(first.payment_hash)
    assert record is not None
    assert record.state is InvoiceState.CANCELED
    # A node that cannot tell: nothing is handed out.
    env.backend.unavailable = True
    await _refused(env.tips.link_invoice(link.link_id, 3_000), 503, "try again later")
    await _refused(env.tips.link_callback(link.link_id, {"amount": "3000"}), 503, "later")


async def test_an_open_invoice_the_node_forgot_is_replaced() -> None:
    env = Env()
    link = await env.link(1_000)
    first = await env.tips.link_invoice(link.link_id, None)
    del env.backend.invoices[first.payment_hash]
    fresh = await env.tips.link_invoice(link.link_id, None)
    assert fresh.payment_hash != first.payment_hash
    record = await env.store.get_invoice(first.payment_hash)
    assert record is not None
    assert record.state is InvoiceState.CANCELED


async def test_a_node_that_says_already_cancelled_has_cancelled_it() -> None:
    env = Env()
    link = await env.link(1_000)
    first = await env.tips.link_invoice(link.link_id, None)
    env.clock.advance(600)  # expired: to be replaced, once cancelled

    async def refuse(payment_hash: PaymentHash) -> None:
        raise errors.InvoiceAlreadyCanceled("invoice already canceled")

    env.backend.cancel_invoice = refuse  # type: ignore[method-assign]
    fresh = await env.tips.link_invoice(link.link_id, None)
    assert fresh.payment_hash != first.payment_hash
    record = await env.store.get_invoice(first.payment_hash)
    assert record is not None
    assert record.state is InvoiceState.CANCELED


async def test_a_single_use_link_is_paid_once() -> None:
    env = Env()
    link = await env.link(1_000, 9_000)
    first = await env.tips.link_invoice(link.link_id, 3_000)
    env.backend.pay(first.payment_hash)  # paid, the watcher has not recorded it yet
    await _refused(env.tips.link_invoice(link.link_id, 3_000), 410, "paid already")
    assert len(env.backend.invoices) == 1  # nothing else issued
    # The node's word is recorded: the link is paid without waiting for the watcher.
    status = await env.tips.link_status(link.link_id)
    assert status.state is LinkState.PAID
    assert status.invoice is not None
    assert status.invoice.state is InvoiceState.SETTLED
    assert status.link.paid_msat == 3_000
    await env.store.apply_update(InvoiceUpdate.of(env.backend.invoices[first.payment_hash]))
    assert (await env.tips.link_status(link.link_id)).link.paid_count == 1  # counted once
    for call in (
        env.tips.link_invoice(link.link_id, 3_000),
        env.tips.link_pay_request(link.link_id),
        env.tips.link_callback(link.link_id, {"amount": "3000"}),
    ):
        await _refused(call, 410, "paid already")


@pytest.mark.parametrize("left", [REUSE_MIN_SECONDS - 1, 0])
async def test_a_link_paid_while_its_invoice_is_replaced_is_paid(left: int) -> None:
    env = Env()
    link = await env.link(1_000, 9_000)
    first = await env.tips.link_invoice(link.link_id, 3_000)
    env.clock.advance(600 - left)  # its last minute (the node is asked), or expired (cancelled)
    env.backend.pay(first.payment_hash)  # the node took it just in time
    await _refused(env.tips.link_invoice(link.link_id, 4_000), 410, "paid already")
    assert len(env.backend.invoices) == 1
    assert env.backend.cancelled == {}


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
        env.clock.advance(600)  # expired: replaceable
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
    assert loser.retry_after == 600  # the winner's holds the link until it expires
    assert f"open invoice for {winner.amount_msat // 1000} sat" in loser.reason
    assert env.open_on_node() == [winner.payment_hash]


async def test_a_node_that_cannot_cancel_blocks_a_new_invoice() -> None:
    env = Env()
    link = await env.link(1_000, 9_000)
    first = await env.tips.link_invoice(link.link_id, 3_000)
    env.clock.advance(600)  # expired: replaced only once the node has cancelled it
    env.backend.unavailable = True
    refused = await _refused(env.tips.link_invoice(link.link_id, 4_000), 503, "try again later")
    assert refused.retry_after is None  # the web layer sends its own for a 503
    env.backend.unavailable = False
    assert env.open_on_node() == [first.payment_hash]
    assert len(env.backend.invoices) == 1
    second = await env.tips.link_invoice(link.link_id, 4_000)
    assert env.open_on_node() == [second.payment_hash]


async def test_without_a_canceler_the_open_invoice_must_expire_first() -> None:
    env = Env(canceler=False)
    link = await env.link(1_000, 9_000)
    first = await env.tips.link_invoice(link.link_id, 3_000)
    await _refused(env.tips.link_invoice(link.link_id, 4_000), 409, "open invoice for 3 sat")
    assert await env.tips.link_invoice(link.link_id, 3_000) == first
    env.clock.advance(600 - REUSE_MIN_SECONDS + 1)
    await _refused(env.tips.link_invoice(link.link_id, 3_000), 409, "ask again in 59 s")
    env.clock.advance(REUSE_MIN_SECONDS)  # past its expiry, the store not told yet
    await _refused(env.tips.link_invoice(link.link_id, 4_000), 409, "once it expires")
    update = InvoiceUpdate(first.payment_hash, InvoiceState.EXPIRED, 0, Msat(0), None)
    await env.store.apply_update(update)  # the watcher's expiry sweep
    second = await env.tips.link_invoice(link.link_id, 4_000)
    assert second.payment_hash != first.payment_hash


@pytest.mark.parametrize("told", ["node", "store"])
async def test_a_payment_arriving_holds_the_link_whatever_is_asked(told: str) -> None:
    env = Env()
    link = await env.link(1_000, 9_000)
    first = await env.tips.link_invoice(link.link_id, 3_000)
    accepted = dataclasses.replace(
        env.backend.invoices[first.payment_hash],
        state=InvoiceState.ACCEPTED,
        amount_paid_msat=Msat(3_000),
    )
    env.backend.invoices[first.payment_hash] = accepted  # a payer's HTLC is held
    if told == "store":
        await env.store.apply_update(InvoiceUpdate.of(accepted))
    for _ in range(2):  # the node's word is recorded: the second asks the store only
        for call in (
            env.tips.link_invoice(link.link_id, 3_000),
            env.tips.link_invoice(link.link_id, 4_000),
            env.tips.link_callback(link.link_id, {"amount": "3000"}),
        ):
            refused = await _refused(call, 409, "someone else is paying this payment link now")
            assert refused.retry_after == 5
    record = await env.store.get_invoice(first.payment_hash)
    assert record is not None
    assert record.state is InvoiceState.ACCEPTED
    env.clock.advance(600)  # even past its expiry: never cancelled while it is being paid
    await _refused(env.tips.link_invoice(link.link_id, 4_000), 409, "try again shortly")
    assert env.backend.cancelled == {}
    assert len(env.backend.invoices) == 1


async def test_an_invoice_capped_by_the_links_life_holds_it_to_the_end() -> None:
    env = Env()
    link = await env.link(1_000, 9_000, expires_in=300)
    first = await env.tips.link_invoice(link.link_id, 3_000)
    assert first.expires_at == link.expires_at  # not the 600 s invoice_expiry
    refused = await _refused(
        env.tips.link_invoice(link.link_id, 4_000),
        409,
        "open invoice for 3 sat until the link expires",
    )
    assert refused.retry_after is None
    env.clock.advance(300 - REUSE_MIN_SECONDS)
    assert await env.tips.link_invoice(link.link_id, 3_000) == first
    env.clock.advance(1)  # the link's last minute: it takes no payment at all
    await _refused(env.tips.link_invoice(link.link_id, 4_000), 410, "under a minute")
    assert env.open_on_node() == [first.payment_hash]


async def test_an_expired_or_cancelled_link_is_410_and_unknown_is_404() -> None:
    env = Env()
    link = await env.link(1_000, expires_in=120)
    invoice = await env.tips.link_invoice(link.link_id, None)
    assert invoice.expires_at == env.clock.now() + 120  # no longer than the link lives
    env.clock.advance(120 - REUSE_MIN_SECONDS)
    assert await env.tips.link_invoice(link.link_id, None) == invoice
    env.clock.advance(1)  # too little life left to pay an invoice
    for call in (
        env.tips.link_pay_request(link.link_id),
        env.tips.link_invoice(link.link_id, None),
        env.tips.link_callback(link.link_id, {"amount": "1000"}),
    ):
        await _refused(call, 410, "expires in under a minute")
    assert (await env.tips.link_status(link.link_id)).state is LinkState.OPEN
    env.clock.advance(REUSE_MIN_SECONDS)
    await _refused(env.tips.link_pay_request(link.link_id), 410, "expired")
    assert (await env.tips.link_status(link.link_id)).state is LinkState.EXPIRED

    other = await env.link(1_000)
    open_one = await env.tips.link_invoice(other.link_id, None)
    cancelled = await env.tips.cancel_link(other.link_id)
    assert cancelled.state is LinkState.CANCELED
    assert cancelled.link.canceled_at == env.clock.now()
    assert cancelled.invoice == open_one
    assert env.backend.invoices[open_one.payment_hash].state is InvoiceState.CANCELED
    again = await env.tips.cancel_link(other.link_id)
    assert again.link.canceled_at == cancelled.link.canceled_at
    await _refused(env.tips.link_invoice(other.link_id, None), 410, "was canceled")
    await _refused(env.tips.link_callback(other.link_id, {"amount": "1000"}), 410, "canceled")

    for unknown in ("nope", "../../etc", "x" * 100, "-" + other.link_id[1:]):
        await _refused(env.tips.link_pay_request(unknown), 404, "no payment link")
        await _refused(env.tips.link_status(unknown), 404, "no payment link")
        await _refused(env.tips.cancel_link(unknown), 404, "no payment link")


async def test_cancelling_a_link_being_paid_or_on_a_down_node() -> None:
    env = Env()
    link = await env.link(1_000)
    paid = await env.tips.link_invoice(link.link_id, None)
    env.backend.pay(paid.payment_hash)
    status = await env.tips.cancel_link(link.link_id)
    assert status.state is LinkState.PAID  # not cancelled: the payer paid first
    assert status.link.canceled_at is not None
    await env.settle_recorded(paid.payment_hash)
    stored = await env.store.get_link(link.link_id)
    assert stored is not None
    assert stored.state(env.clock.now()) is LinkState.PAID  # paid wins over cancelled
    assert (await env.tips.cancel_link(link.link_id)).state is LinkState.PAID

    other = await env.link(1_000)
    await env.tips.link_invoice(other.link_id, None)
    env.backend.unavailable = True
    await _refused(env.tips.cancel_link(other.link_id), 503, "cancel it again later")
    env.backend.unavailable = False
    await env.tips.cancel_link(other.link_id)
    assert env.open_on_node() == []


async def test_a_failing_store_is_503(caplog: pytest.LogCaptureFixture) -> None:
    env = Env()
    link = await env.link(1_000)

    async def broken(*_args: object) -> None:
        raise errors.StoreError("locked")

    env.store.get_link = broken  # type: ignore[method-assign,assignment]
    with caplog.at_level(logging.WARNING, "gateway.service.tips"):
        for _ in range(3):
            await _refused(env.tips.link_invoice(link.link_id, None), 503, "store is unavailable")
    assert [(r.levelno, r.getMessage(), r.exc_info) for r in caplog.records] == [
        (logging.WARNING, "the store failed: locked", None)
    ] * 3  # one line each, no traceback


async def test_cancelling_a_reusable_link_cancels_every_open_invoice() -> None:
    env = Env()
    link = await env.link(1_000, 5_000, single_use=False)
    other = await env.link(1_000, single_use=False)
    page = await env.tips.link_invoice(link.link_id, 2_000)
    answer = await env.tips.link_callback(link.link_id, {"amount": "3000", "comment": "hi"})
    by_wallet = bolt11.decode(str(answer["pr"])).payment_hash
    settled = await env.tips.link_invoice(link.link_id, 1_000)
    await env.settle(settled.payment_hash)
    untouched = await env.tips.link_invoice(other.link_id, None)
    status = await env.tips.cancel_link(link.link_id)
    assert (status.state, status.invoice, status.link.paid_count) == (LinkState.CANCELED, None, 1)
    assert env.open_on_node() == [untouched.payment_hash]
    for cancelled in (page.payment_hash, by_wallet):
        record = await env.store.get_invoice(PaymentHash(cancelled))
        assert record is not None
        assert record.state is InvoiceState.CANCELED
    await _refused(env.tips.link_invoice(link.link_id, 2_000), 410, "was canceled")


async def test_cancelling_on_a_down_node_cancels_what_it_can_and_says_so() -> None:
    env = Env()
    link = await env.link(1_000, 5_000, single_use=False)
    first = await env.tips.link_invoice(link.link_id, 2_000)
    second = await env.tips.link_invoice(link.link_id, 3_000)
    calls: list[bytes] = []
    cancel = env.backend.cancel_invoice

    async def flaky(payment_hash: PaymentHash) -> None:
        calls.append(payment_hash)
        if len(calls) == 1:
            raise errors.BackendUnavailable("timed out")
        await cancel(payment_hash)

    env.backend.cancel_invoice = flaky  # type: ignore[method-assign]
    await _refused(env.tips.cancel_link(link.link_id), 503, "cancel it again later")
    assert len(calls) == 2  # it went on after the failure
    assert len(env.open_on_node()) == 1
    await env.tips.cancel_link(link.link_id)
    assert env.open_on_node() == []
    assert {first.payment_hash, second.payment_hash} == set(calls)
