"""The JSON of the records the operator reads: one function each, used by the command line
and by the admin dashboard, so both say the same thing under the same keys."""

from __future__ import annotations

import gateway.cli.admin
import gateway.cli.payouts
import gateway.cli.webhooks
import gateway.web.admin
from gateway import reports
from gateway.ports import (
    Account,
    CreditTotals,
    DeliveryState,
    Msat,
    PayeeBalance,
    PaymentHash,
    Payout,
    PayoutState,
    SplitTotals,
    WebhookDelivery,
)


def test_an_account_and_the_totals_as_json() -> None:
    account = Account(b"\x01" * 32, "weather", Msat(10_000), Msat(3_000), Msat(1_000), Msat(0), 5.0)
    assert reports.account_json(account) == {
        "token_id": "01" * 32,
        "service": "weather",
        "credited_msat": 10_000,
        "spent_msat": 3_000,
        "reserved_msat": 1_000,
        "withdrawn_msat": 0,
        "balance_msat": 6_000,
        "created_at": 5.0,
        "last_used_at": None,
    }
    totals = CreditTotals(1, Msat(10_000), Msat(3_000), Msat(0), Msat(0), Msat(1_000), Msat(6_000))
    document = reports.credit_totals_json(totals)
    assert document["reconciles"] is True
    assert document["outstanding_msat"] == 6_000
    off = CreditTotals(1, Msat(10_001), Msat(3_000), Msat(0), Msat(0), Msat(1_000), Msat(6_000))
    assert reports.unaccounted_msat(off) == 1
    assert reports.credit_totals_json(off)["reconciles"] is False
    assert reports.credit_totals_json(off)["unaccounted_msat"] == 1


def _split_totals(received: int) -> SplitTotals:
    # kept 60_010 (10 of it the merchant's routing fees), earned 40_000 = paid 12_000 +
    # pending 9_000 + accrued 18_000 + the payees' fees 1_000.
    return SplitTotals(
        received_msat=Msat(received),
        kept_msat=Msat(60_010),
        earned_msat=Msat(40_000),
        paid_msat=Msat(12_000),
        pending_msat=Msat(9_000),
        accrued_msat=Msat(18_000),
        payee_fees_msat=Msat(1_000),
        merchant_fees_msat=Msat(10),
    )


def test_the_split_ledger_reconciles_under_the_same_keys_as_the_credit_one() -> None:
    assert reports.split_reconciliation(_split_totals(100_010)) == (60_000, 1_010, 0)
    assert reports.split_totals_json(_split_totals(100_010)) == {
        "received_msat": 100_010,
        "kept_msat": 60_010,
        "earned_msat": 40_000,
        "paid_msat": 12_000,
        "pending_msat": 9_000,
        "accrued_msat": 18_000,
        "payee_fees_msat": 1_000,
        "merchant_fees_msat": 10,
        "kept_after_fees_msat": 60_000,
        "fees_msat": 1_010,
        "reconciles": True,
        "unaccounted_msat": 0,
    }
    off = reports.split_totals_json(_split_totals(100_007))
    assert (off["reconciles"], off["unaccounted_msat"]) == (False, -3)
    credit = CreditTotals(0, *(Msat(0) for _ in range(6)))
    assert set(reports.credit_totals_json(credit)) & set(off) >= {
        "received_msat",
        "reconciles",
        "unaccounted_msat",
    }


def test_a_payee_and_a_payout_as_json() -> None:
    balance = PayeeBalance(
        "carol", Msat(30_000), Msat(12_000), Msat(1_000), Msat(9_000), Msat(10), 7.0
    )
    row = reports.payee_balance_json(balance, "carol@example.com")
    assert row == {
        "payee": "carol",
        "destination": "carol@example.com",
        "earned_msat": 30_000,
        "accrued_msat": 8_000,
        "pending_msat": 9_000,
        "paid_msat": 12_000,
        "fees_msat": 1_000,
        "merchant_fees_msat": 10,
        "last_payout_at": 7.0,
    }
    # The payee's row adds up; the merchant's fees are not the payee's.
    parts = ("accrued_msat", "pending_msat", "paid_msat", "fees_msat")
    assert row["earned_msat"] == sum(row[key] for key in parts)
    assert reports.payee_balance_json(balance, None)["destination"] is None
    payout = Payout(
        payment_hash=PaymentHash(b"\x02" * 32),
        payee="carol",
        destination="carol@example.com",
        payment_request="lnbcrt1fake",
        amount_msat=Msat(9_000),
        fee_reserve_msat=Msat(2_000),
        payee_pays_fee=True,
        state=PayoutState.FAILED,
        created_at=5.0,
        resolved_at=6.0,
        failure="NO_ROUTE",
    )
    assert reports.payout_json(payout) == {
        "payment_hash": "02" * 32,
        "payee": "carol",
        "destination": "carol@example.com",
        "payment_request": "lnbcrt1fake",
        "amount_msat": 9_000,
        "fee_reserve_msat": 2_000,
        "payee_pays_fee": True,
        "state": "FAILED",
        "created_at": 5.0,
        "fee_msat": 0,
        "resolved_at": 6.0,
        "failure": "NO_ROUTE",
    }


def test_a_delivery_as_json_names_its_event_type_type() -> None:
    delivery = WebhookDelivery(7, "crm", "invoice.settled", DeliveryState.DEAD, 3, 100.0, 500)
    assert reports.delivery_json(delivery) == {
        "event_id": 7,
        "endpoint": "crm",
        "type": "invoice.settled",
        "state": "DEAD",
        "attempts": 3,
        "next_attempt_at": 100.0,
        "last_status": 500,
        "last_error": "",
        "delivered_at": None,
    }


def test_the_command_line_and_the_dashboard_have_no_copies_of_their_own() -> None:
    copies = {"_account_json", "_totals_json", "_delivery_json", "_unaccounted"}
    copies |= {"_balance_json", "reconciled"}
    modules = (gateway.cli.admin, gateway.cli.payouts, gateway.cli.webhooks, gateway.web.admin)
    for module in modules:
        assert not set(vars(module)) & copies
    assert vars(gateway.cli.payouts)["payout_json"] is reports.payout_json
