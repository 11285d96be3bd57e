"""A wallet's side of LNURL-pay (LUD-06, -09, -12, -16) done by lnbits' ``lnurl`` library from
PyPI, an implementation none of the gateway's authors wrote. Run by the regtest tests with the
interpreter of the venv that tests/interop/lnurl_venv.py builds (the library cannot live in
the dev environment)::

    python lnurl_wallet.py pay TARGET AMOUNT_MSAT [COMMENT]
    python lnurl_wallet.py error URL

``pay`` resolves TARGET (an LNURL, ``lightning:LNURL`` or a Lightning Address), fetches the
payRequest and validates it with the library's model, calls the callback with the amount and
the comment through the library, which validates the answer with its model and checks the
invoice's amount, and decodes the invoice with the bolt11 package the library uses: its
description hash must be the sha256 of the metadata text. Prints what it saw as JSON. It pays
nothing: the test pays the ``pr`` with bob's node.

``error`` GETs URL and reads the answer, which must be a 4xx, as an LNURL error with the
library's model; prints its status, reason and headers.

Exit 1 with the library's message on stderr when anything is refused.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import bolt11
import httpx
from lnurl import (  # type: ignore[import-not-found]
    LnurlErrorResponse,
    LnurlException,
    LnurlPayResponse,
    LnurlResponse,
    decode,
    encode,
    execute_pay_request,
    handle,
)
from lnurl.types import LnAddress  # type: ignore[import-not-found]

LOOPBACK = ("127.0.0.1", "localhost")


class Refused(Exception):
    """Something the wallet would not accept."""


def address_url(address: str) -> tuple[str, bool]:
    """The LUD-16 URL of a Lightning Address, and whether the library made it."""
    name, _, domain = address.partition("@")
    if domain.rsplit(":", 1)[0] in LOOPBACK:
        # The library's LnAddress takes a DNS name with a TLD and always means https (as
        # LUD-16 does for a real domain): a test gateway on a loopback port is neither.
        return f"http://{domain}/.well-known/lnurlp/{name}", False
    return str(LnAddress(address).url), True


async def pay(target: str, amount_msat: int, comment: str) -> dict[str, Any]:
    seen: dict[str, Any] = {"target": target}
    if "@" in target:
        url, seen["library_address"] = address_url(target)
        request = await handle(url)
    else:
        url = str(decode(target).url)
        # The library's own encoding of the URL it decoded, to compare with the gateway's.
        seen["bech32"] = str(encode(url).bech32)
        request = await handle(target)
    seen["url"] = url
    if not isinstance(request, LnurlPayResponse):
        raise Refused(f"not a payRequest: {type(request).__name__}")
    metadata = request.metadata
    entries = [list(entry) for entry in metadata.list()]
    identifiers = [value for mime, value in entries if mime == "text/identifier"]
    if "@" in target and identifiers != [target]:
        # LUD-16: the wallet checks that the metadata names the address it paid.
        raise Refused(f"text/identifier {identifiers} is not {target}")
    seen.update(
        callback=str(request.callback),
        min_sendable=int(request.minSendable),
        max_sendable=int(request.maxSendable),
        comment_allowed=request.commentAllowed,
        metadata=str(metadata),
        metadata_entries=entries,
        metadata_hash=metadata.h,
        text=metadata.text,
        images=[mime for mime, _ in metadata.images],
    )
    action = await execute_pay_request(request, amount_msat, comment or None)
    invoice = bolt11.decode(str(action.pr))
    if invoice.description_hash != metadata.h:
        raise Refused(f"description hash {invoice.description_hash} is not {metadata.h}")
    if invoice.description:
        raise Refused(f"the invoice has a description too: {invoice.description!r}")
    seen.update(
        action=action.dict(),  # pr, routes, successAction (LUD-09)
        payment_hash=invoice.payment_hash,
        amount_msat=invoice.amount_msat,
        description_hash=invoice.description_hash,
        regtest=invoice.is_regtest(),
        expiry=invoice.expiry,
    )
    return seen


async def error(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as http:
        response = await http.get(url, timeout=10)
    if not 400 <= response.status_code < 500:
        raise Refused(f"{response.status_code}, not a 4xx: {response.text[:200]}")
    try:
        body = LnurlResponse.from_dict(response.json())
    except (ValueError, LnurlException) as problem:
        raise Refused(f"not an LNURL error: {problem}: {response.text[:200]}") from None
    if not isinstance(body, LnurlErrorResponse):
        raise Refused(f"not an LNURL error: {type(body).__name__}")
    return {
        "status": response.status_code,
        "reason": body.reason,
        "content_type": response.headers.get("content-type", ""),
        "cache_control": response.headers.get("cache-control", ""),
        "allow_origin": response.headers.get("access-control-allow-origin", ""),
    }


def main(argv: list[str]) -> int:
    command, *args = argv
    try:
        if command == "pay":
            target, amount, *comment = args
            result = asyncio.run(pay(target, int(amount), "".join(comment)))
        elif command == "error":
            (url,) = args
            result = asyncio.run(error(url))
        else:
            raise SystemExit(f"unknown command {command!r}")
    except (Refused, LnurlException, httpx.HTTPError, ValueError) as problem:
        print(f"{type(problem).__name__}: {problem}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
