"""The JSON of the records the operator reads: one function each, used by the command line
and by the admin dashboard, so both say the same thing under the same keys."""

from __future__ import annotations

import gateway.cli.admin
import gateway.cli.webhooks
import gateway.web.admin
from gateway import reports
from gateway.ports import Account, CreditTotals, DeliveryState, Msat, WebhookDelivery


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
    for module in (gateway.cli.admin, gateway.cli.webhooks, gateway.web.admin):
        names = set(vars(module))
        assert not names & {"_account_json", "_totals_json", "_delivery_json", "_unaccounted"}
