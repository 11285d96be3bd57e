"""The ASGI gateway's lifespan: opened and closed around the application's own, by
``l402_lifespan`` (an app's ``lifespan=``) or by the middleware itself, under a real uvicorn
with FastAPI and Starlette apps, and the relay's edge cases driven directly over ASGI."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import pytest
from fastapi import FastAPI
from fastapi import Request as FastAPIRequest
from starlette.applications import Starlette
from starlette.middleware import Middleware

from gateway import errors
from gateway.service import L402Service, PaidToken
from gateway.web.asgi import (
    NOT_STARTED,
    SERVICE_STATE_KEY,
    ASGIApp,
    L402Middleware,
    Message,
    Receive,
    Scope,
    Send,
    l402_lifespan,
)
from tests.integration.asgi_helpers import (
    PRICE,
    PROBLEM_JSON,
    ROUTES,
    SERVER_TIMEOUT,
    Harness,
    own_lifespan,
    starlette_app,
    startup_fails,
    uvicorn_serving,
)

ALL_EVENTS = ["gateway enter", "app startup", "app shutdown", "gateway exit"]
OPENED_BY = pytest.mark.parametrize("opened_by", ["middleware", "l402_lifespan"])


def priced_app(harness: Harness, opened_by: str, *, fail_startup: bool = False) -> L402Middleware:
    """``starlette_app`` behind the middleware, the gateway opened by ``opened_by``."""
    if opened_by == "middleware":
        app = starlette_app(harness.events, fail_startup=fail_startup)
        return L402Middleware(app, harness.gateway)
    own = own_lifespan(harness.events, fail_startup=fail_startup)
    return L402Middleware(Starlette(routes=ROUTES, lifespan=l402_lifespan(harness.gateway, own)))


def failure_reports(verb: str, error: Exception) -> list[tuple[str, str]]:
    """The gateway failing to ``verb`` with ``error``, as each way reports it to the server (a
    regular expression): the middleware names the error, Starlette sends the traceback."""
    kind = f"{type(error).__module__}.{type(error).__qualname__}"
    return [
        ("middleware", re.escape(f"L402 gateway failed to {verb}: {error!r}")),
        ("l402_lifespan", rf"Traceback .*\n{re.escape(kind)}: {re.escape(str(error))}\n"),
    ]


def assert_uvicorn_logged(caplog: pytest.LogCaptureFixture, reported: str, verdict: str) -> None:
    """uvicorn logged the failure (``reported``, a regular expression), then ``verdict``."""
    errors = [record.getMessage() for record in caplog.records if record.name == "uvicorn.error"]
    assert any(re.fullmatch(reported, message, re.DOTALL) for message in errors), errors
    assert verdict in errors


# --- either way: around the app's own lifespan, failures reported ---------------------------


@OPENED_BY
async def test_gateway_opens_before_and_closes_after_the_apps_own_lifespan_once(
    opened_by: str,
) -> None:
    harness = Harness()
    app = priced_app(harness, opened_by)
    async with uvicorn_serving(app) as url:
        assert harness.events == ["gateway enter", "app startup"]
        async with aiohttp.ClientSession() as http:
            for _ in range(3):
                async with http.get(f"{url}/paid/x") as response:
                    assert response.status == 402
    assert harness.events == ALL_EVENTS


@pytest.mark.parametrize(
    ("opened_by", "reported"), failure_reports("start", errors.ConfigError("no such node"))
)
async def test_gateway_startup_failure_is_reported_and_the_app_never_starts(
    caplog: pytest.LogCaptureFixture, opened_by: str, reported: str
) -> None:
    harness = Harness(fail_on_enter=True)
    with caplog.at_level(logging.INFO):
        assert await startup_fails(priced_app(harness, opened_by))
    assert harness.events == []
    assert_uvicorn_logged(caplog, reported, "Application startup failed. Exiting.")


@OPENED_BY
async def test_app_startup_failure_closes_the_gateway_again(opened_by: str) -> None:
    harness = Harness()
    app = priced_app(harness, opened_by, fail_startup=True)
    assert await startup_fails(app)
    assert harness.events == ["gateway enter", "gateway exit"]
    assert app.service is None


@pytest.mark.parametrize(
    ("opened_by", "reported"), failure_reports("stop", errors.StoreError("could not flush"))
)
async def test_gateway_failing_to_close_is_reported_as_shutdown_failed(
    caplog: pytest.LogCaptureFixture, opened_by: str, reported: str
) -> None:
    harness = Harness(fail_on_exit=True)
    with caplog.at_level(logging.INFO):
        async with uvicorn_serving(priced_app(harness, opened_by)):
            pass
    assert harness.events == ALL_EVENTS
    assert_uvicorn_logged(caplog, reported, "Application shutdown failed. Exiting.")


@OPENED_BY
async def test_lifespan_off_answers_503_gateway_not_started(
    caplog: pytest.LogCaptureFixture, opened_by: str
) -> None:
    harness = Harness()
    app = priced_app(harness, opened_by)
    with caplog.at_level(logging.WARNING, logger="gateway.web.asgi"):
        async with uvicorn_serving(app, lifespan="off") as url, aiohttp.ClientSession() as http:
            for path in ("/paid/x", "/free", "/free"):
                async with http.get(f"{url}{path}") as response:
                    assert response.status == 503
                    assert "Retry-After" not in response.headers
                    problem = await response.json(content_type=PROBLEM_JSON)
                    assert problem["detail"] == NOT_STARTED
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(f"{url}/ws/free")
            assert refused.value.status == 503
    assert harness.events == []  # neither the gateway nor the app's own lifespan ran
    warnings = [r for r in caplog.records if r.name == "gateway.web.asgi"]
    assert len(warnings) == 1
    assert "not started" in warnings[0].getMessage()


# --- l402_lifespan: FastAPI and Starlette apps' lifespan= ------------------------------------


async def test_fastapi_lifespan_keeps_the_apps_own_state_and_adds_the_service() -> None:
    harness = Harness()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[Mapping[str, Any]]:
        harness.events.append("app startup")
        yield {"greeting": "hello"}
        harness.events.append("app shutdown")

    app = FastAPI(lifespan=l402_lifespan(harness.gateway, lifespan))
    app.add_middleware(L402Middleware)
    services: list[L402Service] = []

    @app.get("/paid/{name}")
    async def paid(name: str, request: FastAPIRequest) -> dict[str, Any]:
        token: PaidToken = request.state.l402_token
        services.append(request.state.l402_service)
        return {"name": name, "amount_msat": token.amount_msat, "greeting": request.state.greeting}

    async with uvicorn_serving(app) as url, aiohttp.ClientSession() as http:
        body = await harness.paid_get(http, f"{url}/paid/rain")
    assert body == {"name": "rain", "amount_msat": PRICE, "greeting": "hello"}
    (service,) = services
    assert isinstance(service, L402Service)
    assert harness.events == ALL_EVENTS


async def test_starlette_without_a_lifespan_of_its_own() -> None:
    harness = Harness()
    app = Starlette(
        routes=ROUTES,
        lifespan=l402_lifespan(harness.gateway),
        middleware=[Middleware(L402Middleware)],
    )
    async with uvicorn_serving(app) as url, aiohttp.ClientSession() as http:
        for path, status in (("/paid/x", 402), ("/free", 200)):
            async with http.get(f"{url}{path}") as response:
                assert response.status == status
        async with http.ws_connect(f"{url}/ws/free") as ws:
            assert await ws.receive_json() == {"token": None}
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{url}/ws/paid")
        assert refused.value.status == 402
    assert harness.events == ["gateway enter", "gateway exit"]


# --- the middleware opens the gateway itself -----------------------------------------------


async def test_middleware_service_is_the_open_gateway() -> None:
    harness = Harness()
    app = priced_app(harness, "middleware")
    async with uvicorn_serving(app):
        assert isinstance(app.service, L402Service)
    assert app.service is None


async def test_fastapi_add_middleware_with_the_factory_and_request_state() -> None:
    harness = Harness()
    app = FastAPI(lifespan=own_lifespan(harness.events))
    app.add_middleware(L402Middleware, gateway=harness.gateway)

    @app.get("/paid/{name}")
    async def paid(name: str, request: FastAPIRequest) -> dict[str, Any]:
        token: PaidToken = request.state.l402_token
        return {"name": name, "token_id": token.token_id, "amount_msat": token.amount_msat}

    async with uvicorn_serving(app) as url, aiohttp.ClientSession() as http:
        body = await harness.paid_get(http, f"{url}/paid/rain")
    assert body["name"] == "rain"
    assert body["amount_msat"] == PRICE
    assert len(body["token_id"]) == 64
    assert harness.events == ALL_EVENTS


async def test_app_without_lifespan_support_still_gets_the_gateway() -> None:
    harness = Harness()

    async def bare(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            raise RuntimeError(f"unsupported scope {scope['type']}")
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async with uvicorn_serving(L402Middleware(bare, harness.gateway)) as url:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/paid/x") as response:
                assert response.status == 402
            async with http.get(f"{url}/free") as response:
                assert response.status == 204
        assert harness.events == ["gateway enter"]
    assert harness.events == ["gateway enter", "gateway exit"]


# --- lifespan edge cases, driven directly over ASGI -------------------------------------


class LifespanDriver:
    """Plays the server's side of one lifespan scope."""

    def __init__(self, app: ASGIApp) -> None:
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.outbox: asyncio.Queue[Message] = asyncio.Queue()
        self.state: dict[str, Any] = {}  # the lifespan state, as the server keeps it
        self.task = asyncio.ensure_future(
            app({"type": "lifespan", "state": self.state}, self.inbox.get, self.outbox.put)
        )

    async def exchange(self, kind: str) -> Message:
        await self.inbox.put({"type": f"lifespan.{kind}"})
        async with asyncio.timeout(SERVER_TIMEOUT):
            return await self.outbox.get()


async def test_app_returning_early_leaves_the_lifespan_to_the_middleware() -> None:
    harness = Harness()

    async def returns(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return  # takes no part in lifespan
        raise AssertionError("no requests here")

    driver = LifespanDriver(L402Middleware(returns, harness.gateway))
    assert (await driver.exchange("startup"))["type"] == "lifespan.startup.complete"
    assert harness.events == ["gateway enter"]
    assert (await driver.exchange("shutdown"))["type"] == "lifespan.shutdown.complete"
    await driver.task
    assert harness.events == ["gateway enter", "gateway exit"]


async def test_one_lifespan_at_a_time() -> None:
    harness = Harness()
    app = L402Middleware(starlette_app(harness.events), harness.gateway)
    first = LifespanDriver(app)
    assert (await first.exchange("startup"))["type"] == "lifespan.startup.complete"
    second = LifespanDriver(app)
    failed = await second.exchange("startup")
    assert failed == {
        "type": "lifespan.startup.failed",
        "message": "L402 gateway is already started by another lifespan",
    }
    await second.task
    assert app.service is not None  # the first lifespan's gateway is untouched
    assert (await first.exchange("shutdown"))["type"] == "lifespan.shutdown.complete"
    await first.task
    assert harness.events == ALL_EVENTS
    # ... and after it ended, a new lifespan may open the gateway again.
    third = LifespanDriver(app)
    assert (await third.exchange("startup"))["type"] == "lifespan.startup.complete"
    assert (await third.exchange("shutdown"))["type"] == "lifespan.shutdown.complete"
    await third.task
    assert harness.events.count("gateway enter") == 2
    assert harness.events.count("gateway exit") == 2


async def test_l402_lifespan_puts_the_service_in_the_lifespan_state_only() -> None:
    harness = Harness()
    app = priced_app(harness, "l402_lifespan")
    driver = LifespanDriver(app)
    assert (await driver.exchange("startup"))["type"] == "lifespan.startup.complete"
    assert isinstance(driver.state[SERVICE_STATE_KEY], L402Service)
    assert app.service is None  # the middleware opened none of its own
    assert (await driver.exchange("shutdown"))["type"] == "lifespan.shutdown.complete"
    await driver.task
    assert harness.events == ALL_EVENTS
