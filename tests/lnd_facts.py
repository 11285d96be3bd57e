"""What LND's all-invoices stream (SubscribeInvoices) shows, as one scenario run against the
fast tests' ``FakeInvoiceBackend`` (tests/unit/test_fake_lnd.py) and against a real LND node
(tests/regtest/test_fake_lnd_regtest.py), so the fake cannot drift from the node.

The facts: the add replay (indices strictly above ``add_index``) comes first, each invoice in
its current state, then, separately, the settle replay (above ``settle_index``), so an invoice
settled since can come twice; neither replay nor the live stream ever carries a CANCELED
invoice; live adds and settlements follow the replay.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable

from gateway.ports import Invoice, InvoiceBackend, InvoiceState, Msat, NewInvoice, PaymentHash

Pay = Callable[[NewInvoice], Awaitable[None]]
Cancel = Callable[[PaymentHash], Awaitable[None]]
EVENT_TIMEOUT = 30.0


async def _next_of(
    stream: AsyncGenerator[Invoice, None], hashes: set[PaymentHash]
) -> tuple[PaymentHash, InvoiceState]:
    """The next event about one of ``hashes`` (a real node may stream others' invoices)."""
    async with asyncio.timeout(EVENT_TIMEOUT):
        async for invoice in stream:
            if invoice.payment_hash in hashes:
                return invoice.payment_hash, invoice.state
    raise AssertionError("the stream ended")


async def check_invoice_stream(node: InvoiceBackend, pay: Pay, cancel: Cancel) -> None:
    """Assert the module docstring's facts on ``node``; ``pay`` and ``cancel`` act on it."""
    marker = await node.add_invoice(Msat(1_000), "marker", 600)
    first, second, third = [await node.add_invoice(Msat(1_000), "fact", 600) for _ in range(3)]
    await pay(third)
    await pay(first)
    await cancel(second.payment_hash)
    third_settled = await node.lookup_invoice(third.payment_hash)
    assert (await node.lookup_invoice(second.payment_hash)).state is InvoiceState.CANCELED

    ours = {first.payment_hash, second.payment_hash, third.payment_hash}
    stream = node.subscribe_invoices(marker.add_index, third_settled.settle_index)
    async with contextlib.aclosing(stream):
        replayed = [await _next_of(stream, ours) for _ in range(3)]
        # Live: an add, its cancellation (not streamed), then another add.
        doomed = await node.add_invoice(Msat(1_000), "doomed", 600)
        ours.add(doomed.payment_hash)
        assert await _next_of(stream, ours) == (doomed.payment_hash, InvoiceState.OPEN)
        await cancel(doomed.payment_hash)
        after = await node.add_invoice(Msat(1_000), "after", 600)
        ours.add(after.payment_hash)
        assert await _next_of(stream, ours) == (after.payment_hash, InvoiceState.OPEN)

    assert replayed == [
        (first.payment_hash, InvoiceState.SETTLED),  # add replay, current state
        (third.payment_hash, InvoiceState.SETTLED),  # add replay; the canceled second is left out
        (first.payment_hash, InvoiceState.SETTLED),  # settle replay: settled after third
    ]
