"""``[server] access_log`` and ``event_loop``: a line per request on ``gateway.access`` only
when asked for (the path without its query), and ``serve`` on uvloop or asyncio's loop."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from gateway.web.connections import ServerLimits
from gateway.web.server import listening
from tests.serve_logs import serve_logs


async def _hello(_request: web.Request) -> web.Response:
    return web.Response(text="hello")


async def _served(caplog: pytest.LogCaptureFixture, *, access_log: bool) -> list[str]:
    """The access log lines of two requests to a server listening with ``access_log``."""
    app = web.Application()
    app.router.add_get("/hello", _hello)
    caplog.set_level(logging.DEBUG)
    async with (
        listening(app, "127.0.0.1", 0, ServerLimits(), access_log=access_log) as sockets,
        aiohttp.ClientSession() as session,
    ):
        url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}"
        for path in ("/hello?comment=private", "/missing"):
            async with session.get(url + path) as response:
                await response.read()
    assert not [r for r in caplog.records if r.name == "aiohttp.access"]  # never aiohttp's own
    return [r.getMessage() for r in caplog.records if r.name == "gateway.access"]


async def test_each_request_is_logged_without_its_query_when_asked_for(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lines = await _served(caplog, access_log=True)
    assert len(lines) == 2, lines
    # The bytes sent (headers and body), the time to answer.
    assert re.fullmatch(r'127\.0\.0\.1 "GET /hello HTTP/1\.1" 200 1\d\d \d+\.\dms', lines[0])
    assert re.fullmatch(r'127\.0\.0\.1 "GET /missing HTTP/1\.1" 404 \d+ \d+\.\dms', lines[1])
    assert "private" not in "".join(lines)


async def test_nothing_is_logged_per_request_by_default(caplog: pytest.LogCaptureFixture) -> None:
    assert await _served(caplog, access_log=False) == []


@pytest.mark.parametrize(
    ("server", "loop", "logged"),
    [("access_log = true", "uvloop", True), ('event_loop = "asyncio"', "asyncio", False)],
)
def test_serve_runs_on_the_configured_loop_with_its_access_log(
    tmp_path: Path, server: str, loop: str, logged: bool
) -> None:
    lines = serve_logs(tmp_path, workers=1, server=server, paths=["/api/thing?key=private"])
    assert any(f"(1 worker, {loop} event loop)" in line for line in lines), lines
    # LND is down: the gateway answers 502 itself, logged as any other answer.
    access = [line for line in lines if "gateway.access" in line]
    assert len(access) == logged, lines
    if logged:
        assert re.search(r'"GET /api/thing HTTP/1\.1" 5\d\d \d+ \d+\.\dms$', access[0])
    assert "private" not in "\n".join(lines)
