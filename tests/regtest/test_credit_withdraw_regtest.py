"""Withdrawals on real LND: alice (the gateway's node) pays bob's invoices from a credit
balance, with a baked payment macaroon; bad invoices are refused; a gateway that dies before
its payment reaches LND has the withdrawal failed by a later resolver (never sent, all back
to the balance); one that dies while paying leaves the invoice paid exactly once and the
account debited once.

The in-process tests give an account its credit through the store (an invoice of alice's,
recorded as buying credit, paid by bob and settled through ``apply_update``, as the watcher
does): buying credit over HTTP is covered in test_credit_regtest.py. The last test runs
``l402-gateway serve`` and SIGKILLs it while a withdrawal is in flight.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from gateway import errors
from gateway.client import bolt11
from gateway.lnd.client import LndClient
from gateway.lnd.connection import LndSettings
from gateway.lnd.preflight import check_payer
from gateway.ports import (
    InvoiceRecord,
    InvoiceState,
    InvoiceUpdate,
    Msat,
    Payment,
    PaymentHash,
    PaymentStatus,
    Preimage,
    Store,
    SystemClock,
    Withdrawal,
    WithdrawalState,
)
from gateway.service.decisions import Deny
from gateway.service.withdraw import (
    PayingNode,
    WithdrawalOutcome,
    WithdrawalRefusal,
    Withdrawer,
    fee_reserve,
)
from gateway.store import SqliteStore
from regtest.network import Network
from regtest.processes import free_ports, wait_for_http
from tests.fakes import make_invoice
from tests.regtest.gateway_helpers import (
    MAX_FEE,
    bake_gateway_macaroon,
    gateway_command,
    give_alice_liquidity,
    l402_challenge,
    pay,
    serving,
    start_serve,
)

pytestmark = pytest.mark.regtest

CREDIT = 2_000_000  # msat bought for the account
WITHDRAW = 500_000  # msat withdrawn to bob
FEE_MIN = 1_000
FEE_PPM = 5_000
RESERVE = fee_reserve(WITHDRAW, FEE_MIN, FEE_PPM)
HOLDER_KEY = "22" * 32  # signs the invoices of other networks
PAYER_PERMISSIONS = ("offchain:read", "offchain:write", "info:read")


def bake_payment_macaroon(network: Network, path: Path) -> Path:
    """A macaroon of alice's that may send payments, as the README tells operators to bake."""
    if not path.exists():
        subprocess.run(  # noqa: S603 - the cached lncli binary and fixed arguments
            [
                *network.alice.lncli().split(),
                "bakemacaroon",
                *PAYER_PERMISSIONS,
                f"--save_to={path}",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        path.chmod(0o600)
    return path


def payer_settings(network: Network, tmp_path: Path) -> LndSettings:
    macaroon = bake_payment_macaroon(network, tmp_path / "payment.macaroon")
    return LndSettings.from_files(
        network.alice.rpc_host, network.alice.tls_cert, macaroon_path=macaroon
    )


@pytest_asyncio.fixture(scope="module", autouse=True)
async def alice_can_pay(network: Network) -> None:
    """alice can pay withdrawals: bob pays her past her channel reserve, once."""
    await give_alice_liquidity(network)


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await SqliteStore.open(tmp_path / "gateway.db")
    try:
        yield opened
    finally:
        await opened.close()


@pytest_asyncio.fixture
async def payer(network: Network, tmp_path: Path) -> AsyncIterator[LndClient]:
    async with LndClient(payer_settings(network, tmp_path)) as client:
        yield client


def withdrawer(store: Store, payer: PayingNode, **options: float) -> Withdrawer:
    return Withdrawer(
        store=store,
        payer=payer,
        decode=bolt11.decode,
        clock=SystemClock(),
        fee_min_msat=FEE_MIN,
        fee_ppm=FEE_PPM,
        **options,
    )


async def funded_account(store: Store, alice: LndClient, bob: LndClient) -> bytes:
    """A new account holding ``CREDIT``: alice's invoice, recorded as buying credit, paid by
    bob and settled in the store as the watcher does."""
    token_id = secrets.token_bytes(32)
    await store.open_account(token_id, "credit")
    new = await alice.add_invoice(Msat(CREDIT), "credit for withdrawal tests", 600)
    now = time.time()
    await store.add_invoice(
        InvoiceRecord(
            payment_hash=new.payment_hash,
            payment_request=new.payment_request,
            amount_msat=Msat(CREDIT),
            token_id=token_id,
            service="credit",
            method="GET",
            path="/api/credit/data",
            state=InvoiceState.OPEN,
            created_at=now,
            expires_at=now + 600,
            add_index=new.add_index,
            buys_credit=True,
        )
    )
    await bob.send_payment(new.payment_request, max_fee_msat=MAX_FEE, payment_timeout=30)
    await store.apply_update(InvoiceUpdate.of(await alice.lookup_invoice(new.payment_hash)))
    assert await balance(store, token_id) == CREDIT
    return token_id


async def balance(store: Store, token_id: bytes) -> int:
    account = await store.get_account(token_id)
    assert account is not None
    return account.balance_msat


async def the_withdrawal(store: Store, payment_hash: bytes) -> Withdrawal:
    (withdrawal,) = [w for w in await store.list_withdrawals() if w.payment_hash == payment_hash]
    return withdrawal


async def assert_paid_once(
    store: Store, payer: LndClient, bob: LndClient, token_id: bytes, payment_hash: bytes
) -> None:
    """bob got ``WITHDRAW`` once; the account and the totals were debited once, with the fee
    alice's node reports."""
    withdrawal = await the_withdrawal(store, payment_hash)
    assert withdrawal.state is WithdrawalState.SUCCEEDED
    received = await bob.lookup_invoice(PaymentHash(payment_hash))
    assert (received.state, received.amount_paid_msat) == (InvoiceState.SETTLED, WITHDRAW)
    payment = await payer.lookup_payment(PaymentHash(payment_hash))
    assert payment is not None
    assert payment.status is PaymentStatus.SUCCEEDED
    assert (payment.amount_msat, payment.fee_msat) == (WITHDRAW, withdrawal.fee_msat)
    assert withdrawal.fee_msat <= RESERVE
    debited = WITHDRAW + withdrawal.fee_msat
    assert await balance(store, withdrawal.token_id) == CREDIT - debited
    totals = await store.credit_totals()
    assert (totals.received_msat, totals.withdrawn_msat) == (CREDIT, debited)
    assert (totals.pending_withdrawals_msat, totals.outstanding_msat) == (0, CREDIT - debited)
    assert totals.received_msat == (
        totals.consumed_msat
        + totals.withdrawn_msat
        + totals.pending_withdrawals_msat
        + totals.reserved_msat
        + totals.outstanding_msat
    )
    # And LND itself refuses to pay it again.
    with pytest.raises(errors.InvoiceAlreadyExists):
        await payer.send_payment(
            withdrawal.payment_request, max_fee_msat=Msat(RESERVE), payment_timeout=10
        )


async def test_the_payment_macaroon_is_checked_for_what_withdrawals_call(
    network: Network, tmp_path: Path
) -> None:
    assert (await check_payer(payer_settings(network, tmp_path))).ok
    lacking = await check_payer(network.alice.settings("invoice"))
    assert [problem.split(" (")[0] for problem in lacking.problems] == [
        f"[credit] the payment macaroon lacks {permission}"
        for permission in ("info:read", "offchain:read", "offchain:write")
    ]
    # ``l402-gateway check`` runs the same probes when withdrawals are on.
    (port,) = free_ports(1)
    config_file = _serve_config(network, tmp_path, port, "http://127.0.0.1:9")
    config_file.write_text(
        config_file.read_text().replace(
            str(tmp_path / "payment.macaroon"), str(network.alice.macaroon("invoice"))
        )
    )
    checked = gateway_command(config_file, "check")
    assert checked.returncode == 2, checked.stdout + checked.stderr
    assert "problem: [credit] the payment macaroon lacks offchain:write" in checked.stdout


async def test_a_withdrawal_pays_bobs_invoice_and_the_books_add_up(
    store: Store, payer: LndClient, alice: LndClient, bob: LndClient
) -> None:
    token_id = await funded_account(store, alice, bob)
    invoice = await bob.add_invoice(Msat(WITHDRAW), "withdrawal", 600)

    outcome = await withdrawer(store, payer).withdraw(token_id, invoice.payment_request)

    assert isinstance(outcome, WithdrawalOutcome), outcome
    assert (outcome.state, outcome.payment_hash, outcome.amount_msat) == (
        WithdrawalState.SUCCEEDED,
        invoice.payment_hash.hex(),
        WITHDRAW,
    )
    assert outcome.balance_msat == CREDIT - WITHDRAW - outcome.fee_msat
    await assert_paid_once(store, payer, bob, token_id, invoice.payment_hash)


async def test_bad_invoices_are_refused_with_400_and_nothing_moves(
    store: Store, payer: LndClient, alice: LndClient, bob: LndClient
) -> None:
    token_id = await funded_account(store, alice, bob)
    now = time.time()
    other_hash = hashlib.sha256(secrets.token_bytes(32)).digest()
    expired = await bob.add_invoice(Msat(WITHDRAW), "expires at once", 1)
    expiring = await bob.add_invoice(Msat(WITHDRAW), "expires within the margin", 30)
    amountless = await bob.add_invoice(Msat(0), "no amount", 600)
    above = await bob.add_invoice(Msat(CREDIT), "the balance, and the reserve on top", 600)
    own = await alice.add_invoice(Msat(WITHDRAW), "the gateway's own", 600)
    await asyncio.sleep(1.5)  # the first one has expired
    cases = {
        "lnbcrt1notaninvoice": WithdrawalRefusal.NOT_BOLT11,
        make_invoice(other_hash, WITHDRAW, network="mainnet", created_at=now, key=HOLDER_KEY): (
            WithdrawalRefusal.OTHER_NETWORK
        ),
        make_invoice(other_hash, WITHDRAW, network="testnet", created_at=now, key=HOLDER_KEY): (
            WithdrawalRefusal.OTHER_NETWORK
        ),
        expired.payment_request: WithdrawalRefusal.EXPIRED,
        expiring.payment_request: WithdrawalRefusal.EXPIRED,
        amountless.payment_request: WithdrawalRefusal.AMOUNTLESS,
        above.payment_request: WithdrawalRefusal.ABOVE_BALANCE,
        own.payment_request: WithdrawalRefusal.OWN_NODE,
    }
    refusing = withdrawer(store, payer)
    for invoice, reason in cases.items():
        outcome = await refusing.withdraw(token_id, invoice)
        assert isinstance(outcome, Deny), (reason, outcome)
        assert outcome.status == 400
        assert outcome.reason.startswith(reason), outcome.reason
    assert await balance(store, token_id) == CREDIT
    assert await store.list_withdrawals() == []
    for new in (expiring, amountless, above):
        assert (await bob.lookup_invoice(new.payment_hash)).state is InvoiceState.OPEN
        assert await payer.lookup_payment(new.payment_hash) is None


class DiesBeforeSending:
    """alice as the payer of a gateway process that dies after the debit and the PENDING
    record are committed, before its payment reaches LND."""

    def __init__(self, lnd: LndClient) -> None:
        self.get_info = lnd.get_info
        self.lookup_payment = lnd.lookup_payment

    async def send_payment(
        self, payment_request: str, *, max_fee_msat: Msat, payment_timeout: float
    ) -> Payment:
        await asyncio.Event().wait()  # frozen until the process is gone
        raise AssertionError("unreachable")


async def test_a_gateway_dying_before_it_pays_has_it_failed_by_the_resolver_never_paid(
    store: Store, payer: LndClient, alice: LndClient, bob: LndClient
) -> None:
    orphan_after = 1.0  # the processes' send window: half of it
    token_id = await funded_account(store, alice, bob)
    invoice = await bob.add_invoice(Msat(WITHDRAW), "withdrawal", 600)
    dying = withdrawer(store, DiesBeforeSending(payer), wait_seconds=0.1, orphan_after=orphan_after)
    outcome = await dying.withdraw(token_id, invoice.payment_request)
    assert isinstance(outcome, WithdrawalOutcome)
    assert outcome.state is WithdrawalState.PENDING
    assert outcome.balance_msat == CREDIT - WITHDRAW - RESERVE
    await dying.close()
    assert await payer.lookup_payment(invoice.payment_hash) is None  # never sent

    # The restarted gateway's resolver: too young, its process might still send it...
    await withdrawer(store, payer, orphan_after=orphan_after).resolve_pending()
    assert (await the_withdrawal(store, invoice.payment_hash)).state is WithdrawalState.PENDING
    # ...and once past orphan_after it never will: failed, never sent.
    await asyncio.sleep(orphan_after)
    await withdrawer(store, payer, orphan_after=orphan_after).resolve_pending()
    await withdrawer(store, payer, orphan_after=orphan_after).resolve_pending()

    failed = await the_withdrawal(store, invoice.payment_hash)
    assert (failed.state, failed.fee_msat) == (WithdrawalState.FAILED, 0)
    assert await payer.lookup_payment(invoice.payment_hash) is None
    assert (await bob.lookup_invoice(invoice.payment_hash)).state is InvoiceState.OPEN
    assert await balance(store, token_id) == CREDIT
    totals = await store.credit_totals()
    assert (totals.withdrawn_msat, totals.pending_withdrawals_msat) == (0, 0)
    assert totals.outstanding_msat == CREDIT
    # Its invoice is refused from now on, and nothing moves.
    again = await withdrawer(store, payer).withdraw(token_id, invoice.payment_request)
    assert again == Deny(400, WithdrawalRefusal.ALREADY_PAID)
    assert await balance(store, token_id) == CREDIT
    assert await payer.lookup_payment(invoice.payment_hash) is None


async def _accepted(bob: LndClient, payment_hash: bytes) -> None:
    """Wait until bob holds the HTLC of his hold invoice: the payment is in flight."""
    for _ in range(300):
        invoice = await bob.lookup_invoice(PaymentHash(payment_hash))
        if invoice.state is InvoiceState.ACCEPTED:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"hold invoice {payment_hash.hex()} not ACCEPTED")


async def _resolved(store: Store, resolver: Withdrawer, payment_hash: bytes) -> Withdrawal:
    for _ in range(100):
        await resolver.resolve_pending()
        withdrawal = await the_withdrawal(store, payment_hash)
        if withdrawal.state is not WithdrawalState.PENDING:
            return withdrawal
        await asyncio.sleep(0.2)
    raise AssertionError(f"withdrawal {payment_hash.hex()} still PENDING")


async def test_a_gateway_dying_while_it_pays_is_resolved_from_the_node(
    store: Store, payer: LndClient, alice: LndClient, bob: LndClient
) -> None:
    """bob holds the payment (a hold invoice) while the gateway dies; the restarted
    resolver tracks it, never sends it again, and finishes it as it ends: paid, or failed
    with everything back to the balance."""
    token_id = await funded_account(store, alice, bob)
    preimages = [Preimage(secrets.token_bytes(32)) for _ in range(2)]
    hashes = [PaymentHash(hashlib.sha256(preimage).digest()) for preimage in preimages]
    invoices = [
        await bob.add_hold_invoice(payment_hash, Msat(WITHDRAW), "held withdrawal", 600)
        for payment_hash in hashes
    ]
    for invoice in invoices:
        dying = withdrawer(store, payer, wait_seconds=0.5)
        outcome = await dying.withdraw(token_id, invoice.payment_request)
        assert isinstance(outcome, WithdrawalOutcome)
        assert outcome.state is WithdrawalState.PENDING
        await _accepted(bob, invoice.payment_hash)
        await dying.close()  # gone, its payment in flight
    assert await balance(store, token_id) == CREDIT - 2 * (WITHDRAW + RESERVE)

    resolver = withdrawer(store, payer, orphan_after=0)
    await resolver.resolve_pending()
    for payment_hash in hashes:  # in flight: tracked, not sent again
        assert (await the_withdrawal(store, payment_hash)).state is WithdrawalState.PENDING
    await bob.settle_invoice(preimages[0])
    await bob.cancel_invoice(hashes[1])

    assert (await _resolved(store, resolver, hashes[0])).state is WithdrawalState.SUCCEEDED
    failed = await _resolved(store, resolver, hashes[1])
    assert (failed.state, failed.fee_msat) == (WithdrawalState.FAILED, 0)
    assert (await bob.lookup_invoice(hashes[1])).state is InvoiceState.CANCELED
    await assert_paid_once(store, payer, bob, token_id, hashes[0])


def _upstream() -> web.Application:
    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"path": request.path})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


def _serve_config(network: Network, tmp_path: Path, port: int, upstream: str) -> Path:
    node = network.alice
    text = f"""
[server]
listen = "127.0.0.1:{port}"
upstream = "{upstream}"
[lnd]
host = "{node.rpc_host}"
tls_cert = "{node.tls_cert}"
macaroon = "{bake_gateway_macaroon(network, tmp_path / "gateway.macaroon")}"
[store]
url = "sqlite://{tmp_path / "gateway.db"}"
[l402]
root_key_cache_seconds = 0
[credit]
withdrawals = true
payment_macaroon = "{bake_payment_macaroon(network, tmp_path / "payment.macaroon")}"
withdrawal_fee_min_msat = {FEE_MIN}
withdrawal_fee_ppm = {FEE_PPM}
withdrawal_wait_seconds = 60
[[routes]]
pattern = "/health"
free = true
[[routes]]
pattern = "/api/credit/*"
service = "credit"
price_msat = 1000
billing = "credit"
credit_msat = {CREDIT}
lifetime = 86400
"""
    config_file = tmp_path / "gateway.toml"
    config_file.write_text(text)
    return config_file


async def _post_withdraw(
    url: str, authorization: str, invoice: str
) -> tuple[int, dict[str, object]]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            url + "/.well-known/l402/withdraw",
            headers={"Authorization": authorization},
            json={"invoice": invoice},
        ) as response,
    ):
        return response.status, json.loads(await response.text())


async def test_serve_killed_while_a_withdrawal_is_in_flight_pays_it_once(
    network: Network, alice: LndClient, bob: LndClient, tmp_path: Path
) -> None:
    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    database = tmp_path / "gateway.db"
    log = tmp_path / "serve.log"
    preimage = Preimage(secrets.token_bytes(32))
    payment_hash = PaymentHash(hashlib.sha256(preimage).digest())
    held = await bob.add_hold_invoice(payment_hash, Msat(WITHDRAW), "withdrawal", 600)
    async with serving(_upstream()) as upstream:
        config_file = _serve_config(network, tmp_path, port, upstream)
        process = start_serve(config_file, log)
        try:
            await wait_for_http(f"{url}/health", process, log)
            async with aiohttp.ClientSession() as http:
                async with http.get(url + "/api/credit/data") as response:
                    assert response.status == 402, await response.text()
                    challenge = l402_challenge(response.headers)
                authorization = await pay(bob, network, challenge)
                async with http.get(
                    url + "/api/credit/data", headers={"Authorization": authorization}
                ) as response:
                    assert response.status == 200, await response.text()
            withdrawing = asyncio.create_task(
                _post_withdraw(url, authorization, held.payment_request)
            )
            await _accepted(bob, payment_hash)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)
        with pytest.raises(aiohttp.ClientError):
            await withdrawing  # the connection died with the process
        await bob.settle_invoice(preimage)  # the payment completes while the gateway is down

        process = start_serve(config_file, log)
        try:
            await wait_for_http(f"{url}/health", process, log)
            store = await SqliteStore.open(database)
            try:
                for _ in range(150):  # the resolver's first pass finds it paid
                    withdrawal = await the_withdrawal(store, payment_hash)
                    if withdrawal.state is not WithdrawalState.PENDING:
                        break
                    await asyncio.sleep(0.1)
                assert withdrawal.state is WithdrawalState.SUCCEEDED
                spent = 1000 + WITHDRAW + withdrawal.fee_msat  # a request, the withdrawal
                assert await balance(store, withdrawal.token_id) == CREDIT - spent
                assert (
                    await store.credit_totals()
                ).withdrawn_msat == WITHDRAW + withdrawal.fee_msat
            finally:
                await store.close()
            received = await bob.lookup_invoice(payment_hash)
            assert (received.state, received.amount_paid_msat) == (InvoiceState.SETTLED, WITHDRAW)
            # The same invoice again: refused, nothing debited.
            status, body = await _post_withdraw(url, authorization, held.payment_request)
            assert (status, body["detail"]) == (400, WithdrawalRefusal.ALREADY_PAID), body
            # A withdrawal that finishes in time: 200 with the balance after it.
            again = await bob.add_invoice(Msat(WITHDRAW), "second withdrawal", 600)
            status, body = await _post_withdraw(url, authorization, again.payment_request)
            assert status == 200, body
            assert isinstance(body["fee_msat"], int)
            withdrawn = 2 * WITHDRAW + withdrawal.fee_msat + body["fee_msat"]
            assert body == {
                "state": "SUCCEEDED",
                "payment_hash": again.payment_hash.hex(),
                "amount_msat": WITHDRAW,
                "fee_msat": body["fee_msat"],
                "balance_msat": CREDIT - 1000 - withdrawn,
            }
            async with (
                aiohttp.ClientSession() as http,
                http.get(
                    url + "/.well-known/l402/token", headers={"Authorization": authorization}
                ) as response,
            ):
                info = await response.json()
            assert (info["balance_msat"], info["withdrawn_msat"]) == (
                CREDIT - 1000 - withdrawn,
                withdrawn,
            )
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0, log.read_text()
