"""Revenue splits on real LND: ``l402-gateway serve`` in front of a paid route whose split
gives carol 30% of every payment; alice (the gateway's node) pays carol's shares out.

- keysend: 20 paid requests of 10 sat with a 15 sat threshold make exactly 4 payouts of 15
  sat, each a settled keysend invoice on carol's node, 60 sat in all, and the ledger (store
  and ``l402-gateway payees``/``payouts``) reconciles to the msat;
- ``fees_paid_by = "payee"``: the fee comes out of carol's share, the unused limit accrues;
- a credit route: each request drawn from a prepaid balance credits the shares;
- Lightning Address: carol's LNURL-pay service (tests/regtest/lnurl_server.py) makes the
  invoices, each committing to the sha256 of its metadata; ``payouts pay`` pays the rest now;
- SIGKILL while a payout is in flight (carol holds its invoice): the restarted gateway's
  resolver records it SUCCEEDED once carol settles; carol was paid once, nothing twice;
- carol's node down: the payouts fail, the shares stay accrued (and keep accruing), the
  worker retries with backoff and pays all of it once carol is back.

The last test stops carol, so it runs on a network of its own, not the session's.
Figures are printed (see them with -s).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from gateway import l402
from gateway.lnd.client import LndClient
from gateway.lnd.connection import LndConnection
from gateway.lnd.protos import lightning_pb2, lightning_pb2_grpc
from gateway.ports import (
    InvoiceState,
    PayeeBalance,
    PaymentHash,
    PaymentStatus,
    Payout,
    PayoutState,
    SplitTotals,
    Store,
)
from gateway.store import SqliteStore
from regtest.network import Network, Node, running_network
from regtest.processes import free_ports, log_tail, wait_for_http
from tests.regtest.gateway_helpers import (
    LIQUIDITY,
    MAX_FEE,
    bake_gateway_macaroon,
    bake_payment_macaroon,
    gateway_command,
    give_alice_liquidity,
    l402_challenge,
    pay,
    serving,
    start_serve,
)
from tests.regtest.lnurl_server import LnurlPayServer

pytestmark = pytest.mark.regtest

PRICE = 10_000  # msat per request
SPLIT_PERCENT = 30
SHARE = PRICE * SPLIT_PERCENT // 100  # carol's 3 sat of each request
THRESHOLD = 5 * SHARE  # 15 sat: a payout every 5 requests
FEE_LIMIT_MIN = 5_000  # generous: a payout may route alice -> bob -> carol
PAID = "/api/split/data"
CREDIT_PATH = "/api/credit/data"  # the same price and split, billed from a prepaid balance
CREDIT_REQUESTS = 5  # what one credit purchase pays for
WORKER_INTERVAL = 1.0
RETRY_INITIAL = 1.0
RETRY_MAX = 4.0

Payer = Callable[[l402.Challenge], Awaitable[str]]
PAYEE_FIELDS = (
    "earned_msat",
    "accrued_msat",
    "pending_msat",
    "paid_msat",
    "fees_msat",
    "merchant_fees_msat",
)
TOTALS_FIELDS = (
    "received_msat",
    "kept_msat",
    "earned_msat",
    "paid_msat",
    "pending_msat",
    "accrued_msat",
    "payee_fees_msat",
    "merchant_fees_msat",
)


# ---- helpers ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def opened(database: Path) -> AsyncIterator[Store]:
    store = await SqliteStore.open(database)
    try:
        yield store
    finally:
        await store.close()


async def until(what: str, check: Callable[[], Awaitable[bool]], limit: float = 30.0) -> float:
    """Poll ``check`` until it holds; returns the seconds it took."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > limit:
            raise AssertionError(f"not {what} after {limit:.0f}s")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def _ok_backend() -> web.Application:
    app = web.Application()

    async def answer(request: web.Request) -> web.Response:
        return web.Response(text="data")

    app.router.add_route("*", "/{tail:.*}", answer)
    return app


def via_carol(bob: LndClient, network: Network) -> Payer:
    """bob pays through carol (``gateway_helpers.pay`` checks the route)."""

    async def payer(challenge: l402.Challenge) -> str:
        return await pay(bob, network, challenge)

    return payer


def any_route(bob: LndClient) -> Payer:
    """bob pays by whatever route his node finds (carol may be down)."""

    async def payer(challenge: l402.Challenge) -> str:
        payment = await bob.send_payment(
            challenge.invoice, max_fee_msat=MAX_FEE, payment_timeout=30
        )
        assert payment.preimage is not None
        return f"L402 {challenge.macaroon_b64}:{payment.preimage.hex()}"

    return payer


async def node_invoices(node: Node, after_add_index: int = 0) -> list[lightning_pb2.Invoice]:
    """The node's invoices added after ``after_add_index`` (ListInvoices), oldest first."""
    connection = LndConnection(node.settings())
    try:
        stub = lightning_pb2_grpc.LightningStub(connection.channel)
        request = lightning_pb2.ListInvoiceRequest(
            index_offset=after_add_index, num_max_invoices=10_000
        )
        reply = await stub.ListInvoices(request, metadata=connection.metadata, timeout=30)
        return list(reply.invoices)
    finally:
        await connection.close()


async def last_add_index(node: Node) -> int:
    invoices = await node_invoices(node)
    return max((invoice.add_index for invoice in invoices), default=0)


async def paid_to(node: Node, after_add_index: int) -> dict[bytes, int]:
    """What the node received on invoices added after ``after_add_index``: msat by hash."""
    invoices = await node_invoices(node, after_add_index)
    paid = {i.r_hash: i.amt_paid_msat for i in invoices if i.amt_paid_msat}
    assert all(i.state == lightning_pb2.Invoice.SETTLED for i in invoices if i.r_hash in paid)
    return paid


async def accepted(node: LndClient, payout: Payout) -> bool:
    """Whether the payout's payment reached the node and is held there (a hold invoice)."""
    invoice = await node.lookup_invoice(payout.payment_hash)
    return invoice.state is InvoiceState.ACCEPTED


@dataclass
class Gateway:
    """``l402-gateway serve`` with one payee on the paid route, started and killed by the test."""

    network: Network
    url: str
    database: Path
    config_file: Path
    log: Path
    payee: str
    process: subprocess.Popen[bytes] | None = None
    session: aiohttp.ClientSession = field(default_factory=aiohttp.ClientSession)

    async def start(self) -> None:
        self.process = start_serve(self.config_file, self.log)
        await wait_for_http(f"{self.url}/health", self.process, self.log)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=30)
        self.process = None
        assert code == 0, log_tail(self.log, 60)

    async def get(
        self, authorization: str | None = None, path: str = PAID
    ) -> aiohttp.ClientResponse:
        headers = {"Authorization": authorization} if authorization else {}
        async with self.session.get(self.url + path, headers=headers) as response:
            await response.read()
            return response

    async def buy(self, payer: Payer, path: str = PAID) -> str:
        """One paid request: the 402's invoice paid by ``payer``, the token redeemed (200);
        waits until the store has recorded the settlement (and so credited the shares).
        Returns the Authorization value."""
        response = await self.get(path=path)
        assert response.status == 402, response.status
        challenge = l402_challenge(response.headers)
        authorization = await payer(challenge)
        assert (await self.get(authorization, path)).status == 200
        identifier = l402.decode_b64(challenge.macaroon_b64).identifier
        payment_hash = PaymentHash(l402.Identifier.decode(identifier).payment_hash)

        async def settled() -> bool:
            async with opened(self.database) as store:
                record = await store.get_invoice(payment_hash)
            return record is not None and record.state is InvoiceState.SETTLED

        await until("the settlement recorded", settled, 15)
        return authorization

    async def payouts(self) -> list[Payout]:
        """The payee's payouts, oldest first."""
        async with opened(self.database) as store:
            return list(reversed(await store.list_payouts(payee=self.payee)))

    async def wait_until(
        self, what: str, check: Callable[[list[Payout]], bool], limit: float = 30.0
    ) -> list[Payout]:
        """Wait until ``check`` holds for the payee's payouts (oldest first); returns them."""
        found: list[Payout] = []

        async def reached() -> bool:
            found[:] = await self.payouts()
            return check(found)

        try:
            await until(what, reached, limit)
        except AssertionError:
            raise AssertionError(f"{what}: {found}\n{log_tail(self.log, 40)}") from None
        return found

    async def wait_payouts(
        self, count: int, state: PayoutState, limit: float = 30.0
    ) -> list[Payout]:
        """Wait until the payee has ``count`` payouts, the last one in ``state``; returns
        those ``count``."""

        def reached(payouts: list[Payout]) -> bool:
            return len(payouts) >= count and payouts[count - 1].state is state

        found = await self.wait_until(f"{count} payouts, the last {state.value}", reached, limit)
        return found[:count]

    async def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``l402-gateway --config F args``, in a thread: the test's loop keeps serving (the
        LNURL service the command may call runs on it)."""
        return await asyncio.to_thread(gateway_command, self.config_file, *args)

    async def cli_json(self, *args: str) -> Any:
        result = await self.cli(*args, "--json")
        assert result.returncode == 0, result.stderr + result.stdout
        return json.loads(result.stdout)

    def assert_log_clean(self) -> None:
        assert "Traceback" not in self.log.read_text(), log_tail(self.log, 80)


@contextlib.asynccontextmanager
async def split_gateway(
    network: Network, workdir: Path, payee: str, destination: str, **terms: object
) -> AsyncIterator[Gateway]:
    """A gateway (not started) whose routes ``PAID`` (an invoice per request) and
    ``CREDIT_PATH`` (prepaid credit) give ``payee`` 30%, paid to ``destination`` with a 15 sat
    threshold (``terms`` override the payee's settings)."""
    workdir.mkdir(parents=True, exist_ok=True)
    macaroon = bake_gateway_macaroon(network, workdir / "gateway.macaroon")
    payment_macaroon = bake_payment_macaroon(network, workdir / "payment.macaroon")
    database = workdir / "gateway.db"
    (port,) = free_ports(1)
    settings = {
        "threshold_msat": THRESHOLD,
        "fee_limit_min_msat": FEE_LIMIT_MIN,
        "fees_paid_by": "merchant",
        **terms,
    }
    payee_lines = "\n".join(f"{key} = {json.dumps(value)}" for key, value in settings.items())
    async with serving(await _ok_backend()) as upstream:
        config_file = workdir / "gateway.toml"
        config_file.write_text(
            f"""
[server]
listen = "127.0.0.1:{port}"
upstream = "{upstream}"
[lnd]
host = "{network.alice.rpc_host}"
tls_cert = "{network.alice.tls_cert}"
macaroon = "{macaroon}"
[store]
url = "sqlite://{database}"
[l402]
root_key_cache_seconds = 0
[rate_limit]
challenges_per_second = 1000
burst = 1000
[payouts]
payment_macaroon = "{payment_macaroon}"
interval = {WORKER_INTERVAL}
retry_initial = {RETRY_INITIAL}
retry_max = {RETRY_MAX}
[[payee]]
name = "{payee}"
destination = "{destination}"
{payee_lines}
[[routes]]
pattern = "/health"
free = true
[[routes]]
pattern = "/api/split/*"
service = "split"
price_msat = {PRICE}
split = ["{payee}:{SPLIT_PERCENT}%"]
[[routes]]
pattern = "/api/credit/*"
service = "credit"
price_msat = {PRICE}
billing = "credit"
credit_msat = {CREDIT_REQUESTS * PRICE}
split = ["{payee}:{SPLIT_PERCENT}%"]
"""
        )
        gateway = Gateway(
            network, f"http://127.0.0.1:{port}", database, config_file, workdir / "serve.log", payee
        )
        try:
            yield gateway
        finally:
            if gateway.process is not None:
                gateway.stop()
            await gateway.session.close()


async def assert_balance(gateway: Gateway, *, accrued: int) -> None:
    """Nothing paid and nothing under way: all the payee earned is accrued."""
    async with opened(gateway.database) as store:
        balance = await store.get_payee(gateway.payee)
    assert balance is not None
    got = (balance.earned_msat, balance.accrued_msat, balance.pending_msat, balance.paid_msat)
    assert got == (accrued, accrued, 0, 0)


async def assert_ledger(
    gateway: Gateway, *, received: int, paid: int, accrued: int = 0, pending: int = 0
) -> int:
    """The store's and the CLI's ledger: ``received = kept + paid + accrued + pending + fees``
    to the msat, the merchant bearing the fees (the sum of the payouts' fees, as alice's node
    reports each). Returns those fees."""
    payouts = await gateway.payouts()
    succeeded = [p for p in payouts if p.state is PayoutState.SUCCEEDED]
    fees = sum(p.fee_msat for p in succeeded)
    async with LndClient(gateway.network.alice.settings()) as alice:
        for payout in succeeded:
            payment = await alice.lookup_payment(payout.payment_hash)
            assert payment is not None
            assert payment.status is PaymentStatus.SUCCEEDED
            assert (payment.amount_msat, payment.fee_msat) == (payout.amount_msat, payout.fee_msat)
            assert payout.fee_msat <= payout.fee_reserve_msat
    earned = paid + accrued + pending
    kept = received - earned
    async with opened(gateway.database) as store:
        totals = await store.split_totals()
        balance = await store.get_payee(gateway.payee)
    assert balance is not None
    assert (balance.earned_msat, balance.paid_msat, balance.pending_msat) == (earned, paid, pending)
    assert (balance.accrued_msat, balance.fees_msat, balance.merchant_fees_msat) == (
        accrued,
        0,
        fees,
    )
    assert (totals.received_msat, totals.kept_msat, totals.earned_msat) == (received, kept, earned)
    assert (totals.paid_msat, totals.pending_msat, totals.accrued_msat) == (paid, pending, accrued)
    assert (totals.payee_fees_msat, totals.merchant_fees_msat) == (0, fees)
    assert totals.received_msat == (
        totals.kept_msat
        + totals.paid_msat
        + totals.accrued_msat
        + totals.pending_msat
        + totals.payee_fees_msat
    )
    assert_cli_ledger(await gateway.cli_json("payees"), gateway.payee, totals, balance)
    print(
        f"ledger: received {received} = kept {kept} + paid {paid} + accrued {accrued} +"
        f" pending {pending} msat; routing fees {fees} msat borne by the merchant"
    )
    return fees


def assert_cli_ledger(report: Any, payee: str, totals: SplitTotals, balance: PayeeBalance) -> None:
    """``l402-gateway payees --json`` says what the store says, and that it reconciles."""
    (row,) = [row for row in report["payees"] if row["payee"] == payee]
    assert {key: row[key] for key in PAYEE_FIELDS} == {
        key: getattr(balance, key) for key in PAYEE_FIELDS
    }
    assert {key: report["totals"][key] for key in TOTALS_FIELDS} == {
        key: getattr(totals, key) for key in TOTALS_FIELDS
    }
    assert (report["totals"]["reconciles"], report["totals"]["unaccounted_msat"]) == (True, 0)
    fees = totals.payee_fees_msat + totals.merchant_fees_msat
    assert report["totals"]["fees_msat"] == fees
    assert report["totals"]["kept_after_fees_msat"] == totals.kept_msat - totals.merchant_fees_msat


# ---- fixtures ---------------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", autouse=True)
async def alice_can_pay(network: Network) -> None:
    """alice, who only ever receives here, gets outbound liquidity: bob pays her past her
    channel reserve, on the bob -> alice channel (so payouts route alice -> bob -> carol)."""
    await give_alice_liquidity(network)


@pytest_asyncio.fixture
async def carol(network: Network) -> AsyncIterator[LndClient]:
    async with LndClient(network.carol.settings()) as client:
        yield client


# ---- keysend ----------------------------------------------------------------------------------


async def test_carol_gets_30_percent_by_keysend_in_threshold_batches(
    network: Network, bob: LndClient, carol: LndClient, tmp_path: Path
) -> None:
    """bob pays 20 requests through carol; after every 5th the test waits for the payout to
    SUCCEED before the next, so each batch is exactly the threshold (the worker is woken by
    the 5th settlement; without the pause a 6th share could join the payout)."""
    before = await last_add_index(network.carol)
    async with split_gateway(network, tmp_path, "carol", network.carol.pubkey) as gateway:
        await gateway.start()
        payer = via_carol(bob, network)
        started = time.monotonic()
        for n in range(1, 21):
            await gateway.buy(payer)
            if n % 5:
                # Below the threshold: no new payout; carol's share waits in accrued.
                assert len(await gateway.payouts()) == n // 5
                async with opened(gateway.database) as store:
                    balance = await store.get_payee("carol")
                assert balance is not None
                assert balance.accrued_msat == (n % 5) * SHARE
            else:
                # Paced: the next request is paid once this batch is paid out.
                await gateway.wait_payouts(n // 5, PayoutState.SUCCEEDED)
        elapsed = time.monotonic() - started
        payouts = await gateway.payouts()
        assert [(p.amount_msat, p.state) for p in payouts] == [
            (THRESHOLD, PayoutState.SUCCEEDED)
        ] * 4
        for payout in payouts:
            assert payout.destination == network.carol.pubkey
            assert payout.payment_request == ""
            assert not payout.payee_pays_fee
            invoice = await carol.lookup_invoice(payout.payment_hash)
            assert (invoice.state, invoice.amount_paid_msat) == (InvoiceState.SETTLED, THRESHOLD)
        # Everything carol's node received since the test began: the 4 keysend payouts only.
        received = [i for i in await node_invoices(network.carol, before) if i.amt_paid_msat]
        assert all(i.is_keysend and i.state == lightning_pb2.Invoice.SETTLED for i in received)
        assert sorted(i.r_hash for i in received) == sorted(p.payment_hash for p in payouts)
        assert sum(i.amt_paid_msat for i in received) == 60_000
        fees = await assert_ledger(gateway, received=20 * PRICE, paid=60_000)
        history = await gateway.cli_json("payouts", "--payee", "carol")
        assert [
            (h["payment_hash"], h["amount_msat"], h["state"], h["fee_msat"]) for h in history
        ] == [(p.payment_hash.hex(), THRESHOLD, "SUCCEEDED", p.fee_msat) for p in reversed(payouts)]
        table = await gateway.cli("payees")  # exit 4 if the ledger did not reconcile
        assert table.returncode == 0, table.stdout + table.stderr
        print(table.stdout.strip().splitlines()[-1])
        print(
            f"keysend: 20 requests in {elapsed:.1f}s, payouts {[p.amount_msat for p in payouts]}"
            f" msat, fees {[p.fee_msat for p in payouts]} msat (total {fees}), carol's node got"
            f" {sum(i.amt_paid_msat for i in received)} msat in {len(received)} keysends"
        )
        gateway.assert_log_clean()


async def test_the_payee_bears_the_routing_fee(
    network: Network, bob: LndClient, carol: LndClient, tmp_path: Path
) -> None:
    """``fees_paid_by = "payee"``: the payout is the accrued less the fee limit; the fee paid
    comes out of carol's share and the unused part of the limit is accrued again."""
    async with split_gateway(
        network, tmp_path, "carol", network.carol.pubkey, fees_paid_by="payee"
    ) as gateway:
        await gateway.start()
        payer = via_carol(bob, network)
        for _ in range(5):
            await gateway.buy(payer)
        (payout,) = await gateway.wait_payouts(1, PayoutState.SUCCEEDED)
        assert payout.payee_pays_fee
        assert (payout.amount_msat, payout.fee_reserve_msat) == (
            THRESHOLD - FEE_LIMIT_MIN,
            FEE_LIMIT_MIN,
        )
        invoice = await carol.lookup_invoice(payout.payment_hash)
        assert (invoice.state, invoice.amount_paid_msat) == (
            InvoiceState.SETTLED,
            payout.amount_msat,
        )
        async with LndClient(network.alice.settings()) as alice:
            payment = await alice.lookup_payment(payout.payment_hash)
        assert payment is not None
        assert payment.fee_msat == payout.fee_msat
        fee = payout.fee_msat
        async with opened(gateway.database) as store:
            balance = await store.get_payee("carol")
            totals = await store.split_totals()
        assert balance is not None
        accrued = THRESHOLD - payout.amount_msat - fee  # the unused fee limit, back
        assert (balance.earned_msat, balance.paid_msat, balance.fees_msat) == (
            THRESHOLD,
            payout.amount_msat,
            fee,
        )
        assert (balance.accrued_msat, balance.pending_msat, balance.merchant_fees_msat) == (
            accrued,
            0,
            0,
        )
        assert (totals.received_msat, totals.kept_msat) == (5 * PRICE, 5 * PRICE - THRESHOLD)
        assert (totals.payee_fees_msat, totals.merchant_fees_msat) == (fee, 0)
        assert_cli_ledger(await gateway.cli_json("payees"), "carol", totals, balance)
        print(
            f"payee pays the fee: payout {payout.amount_msat} msat (limit"
            f" {payout.fee_reserve_msat}), fee {fee} msat from carol's share, {accrued} msat"
            " accrued again"
        )
        gateway.assert_log_clean()


async def test_credit_consumption_credits_the_shares(
    network: Network, bob: LndClient, carol: LndClient, tmp_path: Path
) -> None:
    """On a credit route the purchase credits no share; each request drawn from the balance
    does (its charge), and the worker pays them out at the threshold."""
    async with split_gateway(network, tmp_path, "carol", network.carol.pubkey) as gateway:
        await gateway.start()
        # The purchase, and the first request drawn from it.
        authorization = await gateway.buy(via_carol(bob, network), CREDIT_PATH)
        for _ in range(CREDIT_REQUESTS - 1):
            assert (await gateway.get(authorization, CREDIT_PATH)).status == 200
        assert (await gateway.get(authorization, CREDIT_PATH)).status == 402  # spent
        (payout,) = await gateway.wait_payouts(1, PayoutState.SUCCEEDED)
        assert payout.amount_msat == CREDIT_REQUESTS * SHARE
        invoice = await carol.lookup_invoice(payout.payment_hash)
        assert (invoice.state, invoice.amount_paid_msat) == (InvoiceState.SETTLED, THRESHOLD)
        await assert_ledger(gateway, received=CREDIT_REQUESTS * PRICE, paid=THRESHOLD)
        print(f"credit: {CREDIT_REQUESTS} requests drawn from one purchase, paid {THRESHOLD} msat")
        gateway.assert_log_clean()


# ---- Lightning Address ------------------------------------------------------------------------


async def test_lightning_address_payee_and_pay_now(
    network: Network, bob: LndClient, carol: LndClient, tmp_path: Path
) -> None:
    lnurl = LnurlPayServer(network.carol.settings(), username="carol")
    before = await last_add_index(network.carol)
    async with (
        lnurl.running(),
        split_gateway(network, tmp_path, "carol-ln", lnurl.address) as gateway,
    ):
        await gateway.start()
        payer = via_carol(bob, network)
        for _ in range(5):
            await gateway.buy(payer)
        (first,) = await gateway.wait_payouts(1, PayoutState.SUCCEEDED)
        for _ in range(2):  # 6 sat more: below the threshold, paid by "payouts pay"
            await gateway.buy(payer)
        (made,) = await gateway.cli_json("payouts", "pay", "--payee", "carol-ln")
        assert (made["amount_msat"], made["state"]) == (2 * SHARE, "SUCCEEDED")
        first, second = await gateway.wait_payouts(2, PayoutState.SUCCEEDED)
        assert [(p.amount_msat, p.state) for p in (first, second)] == [
            (THRESHOLD, PayoutState.SUCCEEDED),
            (2 * SHARE, PayoutState.SUCCEEDED),
        ]
        assert [i.amount_msat for i in lnurl.issued] == [THRESHOLD, 2 * SHARE]
        for payout, issued in zip((first, second), lnurl.issued, strict=True):
            assert payout.destination == lnurl.address
            assert payout.payment_request == issued.payment_request
            assert payout.payment_hash == issued.payment_hash
            (invoice,) = [
                i for i in await node_invoices(network.carol) if i.r_hash == issued.payment_hash
            ]
            assert invoice.state == lightning_pb2.Invoice.SETTLED
            assert invoice.amt_paid_msat == payout.amount_msat
            assert not invoice.is_keysend
            assert invoice.description_hash == hashlib.sha256(issued.metadata.encode()).digest()
        assert await paid_to(network.carol, before) == {
            first.payment_hash: THRESHOLD,
            second.payment_hash: 2 * SHARE,
        }
        await assert_ledger(gateway, received=7 * PRICE, paid=7 * SHARE)
        print(
            f"lightning address {lnurl.address}: payouts {first.amount_msat} + "
            f"{second.amount_msat} msat (fees {first.fee_msat} + {second.fee_msat}), "
            f"the second by `payouts pay`"
        )
        gateway.assert_log_clean()


# ---- SIGKILL while a payout is in flight ------------------------------------------------------


async def test_sigkill_while_a_payout_is_in_flight(
    network: Network, bob: LndClient, carol: LndClient, tmp_path: Path
) -> None:
    """The payee's LNURL service makes hold invoices: the payout's payment reaches carol and
    waits there (the invoice ACCEPTED) until the test settles it, so the gateway is killed
    while the payment is in flight for certain, not merely recorded PENDING."""
    lnurl = LnurlPayServer(network.carol.settings(), username="carol", hold=True)
    before = await last_add_index(network.carol)
    async with (
        lnurl.running(),
        split_gateway(network, tmp_path, "carol-hold", lnurl.address) as gateway,
    ):
        await gateway.start()
        payer = via_carol(bob, network)
        for _ in range(5):
            await gateway.buy(payer)
        (pending,) = await gateway.wait_payouts(1, PayoutState.PENDING)
        assert pending.amount_msat == THRESHOLD

        await until("carol holding the payout's payment", lambda: accepted(carol, pending), 30)
        gateway.kill()
        async with LndClient(network.alice.settings()) as alice:
            in_flight = await alice.lookup_payment(pending.payment_hash)
            assert in_flight is not None
            assert in_flight.status is PaymentStatus.IN_FLIGHT
        restarted_at = time.time()
        await gateway.start()
        # The resolver finds it in flight: it stays PENDING, and nothing is sent again.
        await asyncio.sleep(3 * WORKER_INTERVAL)
        (still,) = await gateway.payouts()
        assert still.state is PayoutState.PENDING
        assert len(lnurl.issued) == 1
        await lnurl.settle(pending.payment_hash)
        (done,) = await gateway.wait_payouts(1, PayoutState.SUCCEEDED)
        assert done.resolved_at is not None
        assert done.resolved_at >= restarted_at  # recorded by the restarted gateway
        invoice = await carol.lookup_invoice(pending.payment_hash)
        assert (invoice.state, invoice.amount_paid_msat) == (InvoiceState.SETTLED, THRESHOLD)
        # A few more passes of the worker: no second payout of the same share.
        await asyncio.sleep(3 * WORKER_INTERVAL)
        assert len(await gateway.payouts()) == 1
        assert len(lnurl.issued) == 1
        assert await paid_to(network.carol, before) == {done.payment_hash: THRESHOLD}
        # The restarted worker pays the next shares, and only those.
        for _ in range(5):
            await gateway.buy(payer)
        _, after = await gateway.wait_payouts(2, PayoutState.PENDING)
        await until("carol holding the next payout", lambda: accepted(carol, after), 30)
        await lnurl.settle(after.payment_hash)
        _, after = await gateway.wait_payouts(2, PayoutState.SUCCEEDED)
        assert after.amount_msat == THRESHOLD
        assert [i.payment_hash for i in lnurl.issued] == [done.payment_hash, after.payment_hash]
        assert await paid_to(network.carol, before) == {
            done.payment_hash: THRESHOLD,
            after.payment_hash: THRESHOLD,
        }
        await assert_ledger(gateway, received=10 * PRICE, paid=2 * THRESHOLD)
        gateway.assert_log_clean()
        print(
            f"SIGKILL with {THRESHOLD} msat in flight (held by carol): restarted, PENDING while"
            f" held, SUCCEEDED {done.resolved_at - restarted_at:.1f}s after the restart, fee"
            f" {done.fee_msat} msat; carol paid it once; the next {after.amount_msat} msat"
            f" paid by the restarted worker"
        )


# ---- payee unreachable ------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module")
async def own_network(
    lnd_source_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Network]:
    async with running_network(tmp_path_factory.mktemp("splits")) as network:
        yield network


async def test_payee_node_down_accrues_retries_and_pays_everything(
    own_network: Network, tmp_path: Path
) -> None:
    """alice gets liquidity on both her channels. While carol is down, alice's channel to her
    is inactive: the first payout goes out through bob and fails there (UnknownNextPeer in
    alice's log), the next ones find no route (alice's mission control remembers bob -> carol
    failing), each FAILED with LND's reason. Once carol is back alice pays her over their
    own channel, which mission control does not judge."""
    network = own_network
    async with (
        LndClient(network.alice.settings()) as alice,
        LndClient(network.bob.settings()) as bob,
    ):
        await give_alice_liquidity(network)  # bob -> alice
        invoice = await alice.add_invoice(LIQUIDITY, "liquidity for payouts", 600)
        await bob.send_payment(
            invoice.payment_request,
            max_fee_msat=MAX_FEE,
            payment_timeout=30,
            last_hop_pubkey=network.carol.pubkey,
        )
        async with split_gateway(network, tmp_path, "carol", network.carol.pubkey) as gateway:
            await gateway.start()
            await network.stop_process("carol")
            down_at = time.monotonic()
            payer = any_route(bob)
            for _ in range(5):
                await gateway.buy(payer)

            def failed_with(amount: int, count: int) -> Callable[[list[Payout]], bool]:
                def check(payouts: list[Payout]) -> bool:
                    failed = [p for p in payouts if p.state is PayoutState.FAILED]
                    return sum(p.amount_msat == amount for p in failed) >= count

                return check

            await gateway.wait_until("3 payouts FAILED", failed_with(THRESHOLD, 3))
            await assert_balance(gateway, accrued=THRESHOLD)
            # Shares keep accruing while carol is away; the next attempts try all of it.
            for _ in range(3):
                await gateway.buy(payer)
            await gateway.wait_until("2 FAILED of 24 sat", failed_with(8 * SHARE, 2))
            await assert_balance(gateway, accrued=8 * SHARE)
            failed = await gateway.payouts()
            assert all(p.state is PayoutState.FAILED and p.failure for p in failed), failed
            # Backoff: RETRY_INITIAL doubling up to RETRY_MAX (a pass runs every second).
            gaps = [b.created_at - a.created_at for a, b in itertools.pairwise(failed)]
            for n, gap in enumerate(gaps):
                backoff = min(RETRY_MAX, RETRY_INITIAL * 2**n)
                assert backoff * 0.9 <= gap <= backoff + 2 * WORKER_INTERVAL + 0.5, gaps
            await network.start_process("carol")
            back_at = time.monotonic()

            def paid(payouts: list[Payout]) -> bool:
                return any(p.state is PayoutState.SUCCEEDED for p in payouts)

            payouts = await gateway.wait_until("paid once carol is back", paid, 60)
            paid_after = time.monotonic() - back_at
            assert payouts[: len(failed)] == failed
            # A retry may still fail while carol's node is starting; then exactly one pays.
            *retried, succeeded = payouts[len(failed) :]
            assert all(p.state is PayoutState.FAILED for p in retried), retried
            assert (succeeded.state, succeeded.amount_msat) == (PayoutState.SUCCEEDED, 8 * SHARE)
            async with LndClient(network.carol.settings()) as carol:
                received = await carol.lookup_invoice(succeeded.payment_hash)
            assert (received.state, received.amount_paid_msat) == (
                InvoiceState.SETTLED,
                8 * SHARE,
            )
            # Nothing lost: carol earned 24 sat and was paid 24 sat.
            await assert_ledger(gateway, received=8 * PRICE, paid=8 * SHARE)
            gateway.assert_log_clean()
            reasons = sorted({p.failure for p in failed})
            print(
                f"carol down {back_at - down_at:.1f}s: {len(failed)} payouts FAILED ({reasons};"
                f" amounts {[p.amount_msat for p in failed]}), gaps"
                f" {[round(g, 1) for g in gaps]} s; paid {succeeded.amount_msat} msat (fee"
                f" {succeeded.fee_msat}) {paid_after:.1f}s after carol was back"
            )
