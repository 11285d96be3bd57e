"""The limits ``load_config`` puts on prices and invoice expiries are LND's own."""

from __future__ import annotations

import pytest

from gateway import errors
from gateway.config import MAX_INVOICE_EXPIRY
from gateway.lnd.client import LndClient
from gateway.ports import Msat
from gateway.pricing import MAX_PRICE_MSAT

pytestmark = pytest.mark.regtest


async def test_lnd_takes_the_largest_price_and_expiry_a_config_may_set(alice: LndClient) -> None:
    invoice = await alice.add_invoice(Msat(MAX_PRICE_MSAT), "largest", MAX_INVOICE_EXPIRY)
    assert invoice.payment_request.startswith("lnbcrt")


async def test_lnd_refuses_an_expiry_past_the_limit(alice: LndClient) -> None:
    with pytest.raises(errors.BackendError, match="expiry"):
        await alice.add_invoice(Msat(1_000), "too long", MAX_INVOICE_EXPIRY + 1)


async def test_lnd_refuses_a_price_past_the_limit(alice: LndClient) -> None:
    # LND compares whole satoshis: one more satoshi is the first amount it refuses.
    with pytest.raises(errors.BackendError, match="too large"):
        await alice.add_invoice(Msat(MAX_PRICE_MSAT + 1_000), "too dear", 600)
