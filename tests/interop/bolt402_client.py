"""bolt402's L402Client (PyPI, Rust) fetching a URL twice, paying over LND's REST API.

Run as a separate process by tests/regtest/test_interop_clients.py: bolt402 0.1.0 keeps the
GIL while it blocks on HTTP, so in the test's own process it would stall the event loop that
serves the gateway's upstream. Usage::

    LND_REST_URL=https://127.0.0.1:port LND_MACAROON_HEX=... python bolt402_client.py URL

Prints one JSON object per request.
"""

from __future__ import annotations

import json
import os
import sys

from bolt402 import L402Client


def main() -> None:
    url = sys.argv[1]
    client = L402Client.with_lnd_rest(os.environ["LND_REST_URL"], os.environ["LND_MACAROON_HEX"])
    for step in ("pay", "reuse"):
        response = client.get(url)
        receipt = response.receipt
        line = {
            "step": step,
            "status": response.status,
            "paid": response.paid,
            "cached_token": response.cached_token,
            "amount_sats": receipt.amount_sats if receipt is not None else None,
            "total_spent": client.total_spent(),
            "body": response.text(),
        }
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
