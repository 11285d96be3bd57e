"""A small API to put behind the gateway, used by the demo and the tests.

``demo_api()`` is an ordinary aiohttp application; it only reads the paid token's facts;
``quote_price`` is an example of a dynamic price function (see ``gateway.sample.toml``).
"""

from __future__ import annotations

import json
from urllib.parse import parse_qs

from aiohttp import web

from gateway.pricing import PriceRequest
from gateway.text import whole_number
from gateway.web.aiohttp import TOKEN
from gateway.web.responses import token_header_value

FORTUNES = (
    "A satoshi saved is a satoshi earned.",
    "Your next request will be settled in milliseconds.",
    "Low fees are in your future.",
)
QUOTE_PRICE_PER_ITEM_MSAT = 2_000
MAX_QUOTE_ITEMS = 100


def _items(value: str | None) -> int:
    """``?n=``: default 1, clamped to 1..100; anything not a number counts as 1."""
    items = None if value is None else whole_number(value)
    return 1 if items is None else min(max(items, 1), MAX_QUOTE_ITEMS)


async def quote_price(request: PriceRequest) -> int:
    """2 sat per requested item."""
    return _items(parse_qs(request.query).get("n", [None])[0]) * QUOTE_PRICE_PER_ITEM_MSAT


async def _health(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _fortune(request: web.Request) -> web.Response:
    # Mounted with the middleware the token is on the request; behind the proxy, in a header.
    token = request.get(TOKEN)
    facts = token_header_value(token) if token else request.headers.get("X-L402-Token")
    paid = json.loads(facts) if facts else None
    index = int(paid["amount_msat"]) % len(FORTUNES) if paid else 0
    return web.json_response({"fortune": FORTUNES[index], "paid": paid})


async def _quote(request: web.Request) -> web.Response:
    items = _items(request.query.get("n"))
    return web.json_response({"quotes": [f"quote #{i + 1}" for i in range(items)]})


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {"method": request.method, "bytes": len(body), "headers": dict(request.headers)}
    )


def demo_api(client_max_size: int = 1024**2) -> web.Application:
    app = web.Application(client_max_size=client_max_size)
    app.router.add_get("/health", _health)
    app.router.add_get("/api/premium/fortune", _fortune)
    app.router.add_get("/api/quote", _quote)
    app.router.add_route("*", "/api/echo", _echo)
    return app
