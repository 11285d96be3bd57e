"""The demo: an invoice on alice, paid by bob through carol, settled on a live subscription.

Run with ``make demo`` (or ``python -m regtest.demo``); the whole network is started for the
demo and stopped at its end, logs kept in the directory it prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import time
from pathlib import Path

from gateway.lnd.client import LndClient
from gateway.ports import InvoiceState, Msat
from regtest.network import running_network

PRICE = Msat(21_000)
MAX_FEE = Msat(5_000)


def say(message: str) -> None:
    print(message, flush=True)


async def demo(workdir: Path) -> None:
    started = time.monotonic()
    say(f"starting a regtest Lightning network in {workdir} (btcd + alice, bob, carol)")
    async with running_network(workdir) as network:
        say(f"network ready in {time.monotonic() - started:.1f}s\n")
        merchant = LndClient(network.alice.settings(macaroon="invoice"))
        payer = LndClient(network.bob.settings())
        async with merchant, payer:
            invoice = await merchant.add_invoice(PRICE, "L402 gateway demo", expiry=600)
            say(f"alice created an invoice for {PRICE} msat:\n  {invoice.payment_request}\n")
            # The single-invoice stream starts with the current state: live before paying.
            subscription = merchant.subscribe_single_invoice(invoice.payment_hash)
            async with contextlib.aclosing(subscription):
                opened = await anext(subscription)
                say(f"alice's invoice subscription is live: invoice {opened.state.value}")

                say("bob pays it, routed through carol ...")
                payment = await payer.send_payment(
                    invoice.payment_request,
                    max_fee_msat=MAX_FEE,
                    payment_timeout=30,
                    last_hop_pubkey=network.carol.pubkey,
                )
                names = {node.pubkey: name for name, node in network.nodes.items()}
                hops = " -> ".join(names.get(pubkey, pubkey[:12]) for pubkey in payment.route)
                say(f"  payment {payment.status.value}: bob -> {hops}, fee {payment.fee_msat} msat")

                async with asyncio.timeout(30):
                    async for update in subscription:
                        if update.state is InvoiceState.SETTLED:
                            break
                say(
                    f"alice's subscription saw the invoice {update.state.value}: "
                    f"{update.amount_paid_msat} msat paid, settle index {update.settle_index}"
                )
    say(f"\ndone in {time.monotonic() - started:.1f}s; node logs are in {workdir}")


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="l402-demo-"))
    asyncio.run(demo(workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
