"""Tip jars and payment links over LNURL-pay on real LND, checked by a wallet we did not write:
lnbits' ``lnurl`` library from PyPI (tests/interop/lnurl_wallet.py, in a venv of its own).

- the library decodes the jar's LNURL and resolves its Lightning Address, validates the
  payRequest and the callback's answer with its models (LUD-06, -09, -12, -16), and the
  invoice commits to the sha256 of the metadata; bob's node pays it; alice's node has it
  SETTLED with that description hash; ``invoices --json`` lists it as ``tip:coffee`` with the
  comment, and the store has its ``tip.received`` event;
- bad input against the running gateway (amounts out of bounds, a comment too long, an
  unknown name, an expired link, one about to expire, a used single-use link): each a 4xx
  LNURL error ``{"status": "ERROR", "reason": ...}``, which the library reads as one; never
  a 500. ``HEAD`` makes no invoice: the link page is rendered without one, the callbacks and
  ``/invoice`` answer 405 (``Allow: GET``).

Figures are printed (see them with -s).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.lnd.client import LndClient
from gateway.lnd.protos import lightning_pb2
from gateway.lnurl import encode_lnurl
from gateway.ports import InvoiceState, LinkState
from gateway.service.tips import LINK_MIN_SECONDS, new_link
from gateway.store import SqliteStore
from regtest.network import Network
from tests.interop.lnurl_venv import LnurlWallet, WalletError, require_lnurl_wallet
from tests.regtest.tips_helpers import (
    COMMENT_MAX,
    JAR,
    JAR_DESCRIPTION,
    JAR_MAX_MSAT,
    JAR_MIN_MSAT,
    THANKS,
    TipsGateway,
    bob_pays,
    node_invoice,
    tips_gateway,
)

pytestmark = pytest.mark.regtest

LINK_MSAT = 2_000_000


@pytest.fixture(scope="module")
def wallet() -> LnurlWallet:
    return require_lnurl_wallet()


def _check_pay_request(seen: dict[str, Any], gateway: TipsGateway, amount_msat: int) -> None:
    """What the library saw of the jar: its terms, its metadata, an invoice committing to it."""
    assert seen["url"] == f"{gateway.url}/.well-known/lnurlp/{JAR}"
    assert seen["callback"].startswith(gateway.url + "/")
    assert (seen["min_sendable"], seen["max_sendable"]) == (JAR_MIN_MSAT, JAR_MAX_MSAT)
    assert seen["comment_allowed"] == COMMENT_MAX
    assert seen["metadata_entries"] == [
        ["text/plain", JAR_DESCRIPTION],
        ["text/identifier", gateway.address],
    ]
    assert seen["text"] == JAR_DESCRIPTION
    assert seen["metadata_hash"] == hashlib.sha256(seen["metadata"].encode()).hexdigest()
    assert seen["description_hash"] == seen["metadata_hash"]
    assert seen["amount_msat"] == amount_msat
    assert seen["regtest"] is True
    action = seen["action"]
    assert action["routes"] == []
    assert action["successAction"] == {"tag": "message", "message": THANKS}


async def test_a_wallet_library_tips_the_jar_and_bob_pays(
    network: Network,
    alice: LndClient,
    bob: LndClient,
    wallet: LnurlWallet,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with tips_gateway(network, tmp_path) as gateway:
        # The jar's LNURL, as the gateway encodes it, decoded by the library.
        lnurl = encode_lnurl(f"{gateway.url}/.well-known/lnurlp/{JAR}")
        started = time.monotonic()
        by_lnurl = await wallet.pay_request(lnurl, 21_000)
        assert by_lnurl["bech32"] == lnurl  # the library encodes the URL as we do
        _check_pay_request(by_lnurl, gateway, 21_000)
        # So does the lightning: URI a QR code holds.
        by_uri = await wallet.pay_request(f"lightning:{lnurl.lower()}", JAR_MIN_MSAT)
        _check_pay_request(by_uri, gateway, JAR_MIN_MSAT)

        # The Lightning Address, with a LUD-12 comment (not ASCII: counted in characters).
        comment = "Great article, merci \u2615 " + "x" * (COMMENT_MAX - 23)
        assert len(comment) == COMMENT_MAX
        seen = await wallet.pay_request(gateway.address, 42_000, comment)
        resolved_in = time.monotonic() - started
        assert seen["library_address"] is False  # a loopback host: see lnurl_wallet.py
        _check_pay_request(seen, gateway, 42_000)
        assert seen["payment_hash"] not in (by_lnurl["payment_hash"], by_uri["payment_hash"])

        payment_hash = bytes.fromhex(seen["payment_hash"])
        record = await gateway.invoice(payment_hash)
        assert record is not None
        assert (record.state, record.service, record.comment) == (
            InvoiceState.OPEN,
            f"tip:{JAR}",
            comment,
        )
        assert record.tip_jar == JAR
        assert record.token_id == b""

        paid_at = time.monotonic()
        payment = await bob_pays(bob, seen["action"]["pr"])
        assert payment.amount_msat == 42_000
        record = await gateway.settled(payment_hash)
        recorded_in = time.monotonic() - paid_at
        assert record.amount_paid_msat == 42_000

        # Alice's node: settled, described by the metadata's hash only.
        invoice = await node_invoice(network.alice, payment_hash)
        assert invoice.state == lightning_pb2.Invoice.SETTLED
        assert invoice.description_hash == hashlib.sha256(seen["metadata"].encode()).digest()
        assert invoice.memo == ""
        assert (invoice.value_msat, invoice.amt_paid_msat) == (42_000, 42_000)
        assert (await alice.lookup_invoice(payment.payment_hash)).state is InvoiceState.SETTLED

        # ``invoices --json``: the tip with its jar and comment, the unpaid ones still open.
        listed = {row["payment_hash"]: row for row in await gateway.cli_json("invoices")}
        row = listed[seen["payment_hash"]]
        assert (row["service"], row["state"], row["comment"]) == (f"tip:{JAR}", "SETTLED", comment)
        assert row["amount_paid_msat"] == 42_000
        for other in (by_lnurl, by_uri):
            assert listed[other["payment_hash"]]["state"] == "OPEN"
            assert listed[other["payment_hash"]]["comment"] == ""
        table = await gateway.cli("invoices")
        assert table.returncode == 0, table.stderr
        assert f"tip:{JAR}" in table.stdout

        # The webhook outbox has the tip (written whatever the configuration).
        store = await SqliteStore.open(gateway.database)
        try:
            events = await store.list_webhook_events(limit=1000)
        finally:
            await store.close()
        tips = [e for e in events if e.type == "tip.received"]
        assert [e.resource for e in tips] == [f"tip:{JAR}"]  # ordered per jar
        payload = json.loads(tips[0].payload)["data"]
        assert (payload["jar"], payload["payment_hash"]) == (JAR, seen["payment_hash"])
        assert (payload["amount_paid_msat"], payload["comment"]) == (42_000, comment)
        gateway.assert_log_clean()
    with capsys.disabled():
        print(
            f"\nlnurl library: 3 payRequests + callbacks in {resolved_in:.2f}s; tip settled and "
            f"recorded {recorded_in:.2f}s after bob's payment started\n"
            f"tip.received payload: {tips[0].payload}"
        )


async def _lnurl_error(
    gateway: TipsGateway, wallet: LnurlWallet, path: str, status: int, says: str
) -> str:
    """GET ``path``: an LNURL error with ``status`` whose reason contains ``says`` (case
    aside), as we read it and as the library does. Returns the reason."""
    got, body, headers = await gateway.get(path)
    assert got == status, (path, got, body)
    assert isinstance(body, dict), (path, body)
    assert set(body) == {"status", "reason"}, body
    assert body["status"] == "ERROR"
    assert says.lower() in body["reason"].lower(), (path, body)
    assert headers["Content-Type"].startswith("application/json")
    assert headers.get("Cache-Control") == "no-store", headers
    seen = await wallet.error(gateway.url + path)
    assert (seen["status"], seen["reason"]) == (status, body["reason"])
    reason: str = body["reason"]
    return reason


async def test_bad_input_is_an_lnurl_error_never_a_500(
    network: Network,
    bob: LndClient,
    wallet: LnurlWallet,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    jar = f"/.well-known/lnurlp/{JAR}"
    callback = f"{jar}/callback"
    async with tips_gateway(network, tmp_path) as gateway:
        reasons = {
            "below min": await _lnurl_error(
                gateway, wallet, f"{callback}?amount={JAR_MIN_MSAT - 1}", 400, "amount"
            ),
            "above max": await _lnurl_error(
                gateway, wallet, f"{callback}?amount={JAR_MAX_MSAT + 1}", 400, "amount"
            ),
            "no amount": await _lnurl_error(gateway, wallet, callback, 400, "amount"),
            "not a number": await _lnurl_error(
                gateway, wallet, f"{callback}?amount=12abc", 400, "amount"
            ),
            "negative": await _lnurl_error(
                gateway, wallet, f"{callback}?amount=-1000", 400, "amount"
            ),
            "comment too long": await _lnurl_error(
                gateway,
                wallet,
                f"{callback}?amount=1000&comment={'c' * (COMMENT_MAX + 1)}",
                400,
                "comment",
            ),
            "unknown name": await _lnurl_error(
                gateway, wallet, "/.well-known/lnurlp/nobody", 404, "nobody"
            ),
            "unknown name's callback": await _lnurl_error(
                gateway, wallet, "/.well-known/lnurlp/nobody/callback?amount=1000", 404, "nobody"
            ),
        }
        # The library refuses what its own checks catch before asking (so never sees ours).
        with pytest.raises(WalletError, match="not in range"):
            await wallet.pay_request(gateway.address, JAR_MAX_MSAT + 1000)
        # A comment of exactly the allowed length is taken.
        status, body, _ = await gateway.get(f"{callback}?amount=1000&comment={'c' * COMMENT_MAX}")
        assert status == 200, body
        assert body["pr"].startswith("lnbcrt")

        # A link that expired (made three minutes ago with two minutes to live, the least
        # ``links create`` takes): every endpoint of it says so.
        expired = new_link(
            min_msat=LINK_MSAT,
            max_msat=LINK_MSAT,
            memo="Too late",
            expires_in=LINK_MIN_SECONDS,
            single_use=True,
            now=time.time() - LINK_MIN_SECONDS - 60,
        )
        await gateway.add_link(expired)
        base = f"/.well-known/l402/links/{expired.link_id}"
        assert (await gateway.get(f"{base}/status"))[1]["state"] == "expired"
        reasons["expired link"] = await _lnurl_error(
            gateway, wallet, f"{base}/lnurl", 410, "expired"
        )
        await _lnurl_error(gateway, wallet, f"{base}/callback?amount={LINK_MSAT}", 410, "expired")
        await _lnurl_error(gateway, wallet, f"{base}/invoice", 410, "expired")
        # One with less than a minute left (made 70 s ago with two minutes to live): too
        # little to pay an invoice.
        soon = new_link(
            min_msat=LINK_MSAT,
            max_msat=LINK_MSAT,
            memo="Soon",
            expires_in=LINK_MIN_SECONDS,
            single_use=True,
            now=time.time() - 70,
        )
        await gateway.add_link(soon)
        soon_base = f"/.well-known/l402/links/{soon.link_id}"
        reasons["expiring link"] = await _lnurl_error(
            gateway, wallet, f"{soon_base}/lnurl", 410, "minute"
        )
        await _lnurl_error(gateway, wallet, f"{soon_base}/invoice", 410, "minute")
        # ``links create`` refuses a shorter life than two minutes, and makes nothing.
        short = await gateway.cli("links", "create", "--amount", "2000sat", "--expires", "60s")
        assert short.returncode == 2, short.stdout + short.stderr
        assert "a link expires at least 120 s from now" in short.stderr

        # A single-use link paid once through its LNURL (the library's flow), then used up.
        link = await gateway.cli_json("links", "create", "--amount", "2000sat", "--memo", "Once")
        link_id = link["link_id"]
        assert link["lnurl"].upper().startswith("LNURL1")
        # HEAD (a link preview, a monitor) makes no invoice: the page is rendered without one,
        # the callback and /invoice refuse it.
        base = f"/.well-known/l402/links/{link_id}"
        async with gateway.session.head(f"{gateway.url}{base}") as response:
            assert response.status == 200
        for path in (f"{base}/callback?amount={LINK_MSAT}", f"{base}/invoice", callback):
            async with gateway.session.head(f"{gateway.url}{path}") as response:
                assert (response.status, response.headers["Allow"]) == (405, "GET, OPTIONS"), path
        assert (await gateway.link(link_id)).open_hash is None
        seen = await wallet.pay_request(link["lnurl"], LINK_MSAT)
        assert seen["url"] == f"{gateway.url}/.well-known/l402/links/{link_id}/lnurl"
        assert (seen["min_sendable"], seen["max_sendable"]) == (LINK_MSAT, LINK_MSAT)
        assert ["text/plain", "Once"] in seen["metadata_entries"]
        # The library refuses another amount for a fixed link by itself; the server does too.
        await _lnurl_error(gateway, wallet, f"{base}/callback?amount={LINK_MSAT + 1000}", 400, "")
        await bob_pays(bob, seen["action"]["pr"])
        record = await gateway.settled(bytes.fromhex(seen["payment_hash"]))
        assert record.service == f"link:{link_id}"
        paid = await gateway.wait_link(link_id, 1)
        assert (paid.paid_msat, paid.state(time.time())) == (LINK_MSAT, LinkState.PAID)
        reasons["used link"] = await _lnurl_error(gateway, wallet, f"{base}/lnurl", 410, "paid")
        await _lnurl_error(gateway, wallet, f"{base}/callback?amount={LINK_MSAT}", 410, "paid")
        await _lnurl_error(gateway, wallet, f"{base}/invoice", 410, "paid")
        with pytest.raises(WalletError):
            await wallet.pay_request(link["lnurl"], LINK_MSAT)
        status, body, _ = await gateway.get(f"{base}/status")
        assert (status, body["state"], body["paid_count"]) == (200, "paid", 1)

        # An unknown link, and a method these endpoints do not take.
        reasons["unknown link"] = await _lnurl_error(
            gateway, wallet, "/.well-known/l402/links/nolinkhere/lnurl", 404, ""
        )
        async with gateway.session.post(f"{gateway.url}{jar}") as response:
            assert response.status == 405
        gateway.assert_log_clean()
    with capsys.disabled():
        print()
        for case, reason in reasons.items():
            print(f"{case:>24}: {reason}")
