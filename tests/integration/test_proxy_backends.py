"""The reverse proxy in front of backends of other stacks that read requests differently.

A lenient Node backend (tests/backends/lenient.js) serves its premium content to any request
that Node's WHATWG URL parser, Express-style case-insensitive and trailing-slash-blind
routing, Tomcat-style ';' parameters, double decoding or a method override would route to
/api/premium/; a WSGI backend (wsgiref) reads X_L402_Token as the token header. Every
spelling that could reach priced content unpaid must get 400 or 402. So must every method
override real backends read from a POST body where the gateway's parsers read none: Express
(its JSON and qs form parsers, with method-override) and Go (net/http's form parsing, as
gorilla/handlers' method override reads it).

Requests with bodies (of stated and unknown length, under several methods) reach the Node
backend and one built on h11 (another parser than the llhttp both ends of the proxy use)
whole, one request per connection.

Backends that leave a request's body unread (Python's ``http.server``, a handler that does not
read it) or answer what was not asked: nothing a client hides in a body runs on them, and no
answer reaches a request it was not made for.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import threading
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIEnvironment

import h11
import pytest
import pytest_asyncio

from gateway.ports import Msat
from gateway.pricing import BodyMethod, Pricing, Rule
from tests.demo_rules import ECHO, PREMIUM_READ
from tests.fakes import FakeGateway
from tests.integration.test_proxy import Client, proxy_for

LENIENT_JS = Path(__file__).parents[1] / "backends" / "lenient.js"
EXPRESS_JS = Path(__file__).parents[1] / "backends" / "express_override.js"
GO_BACKEND = Path(__file__).parents[1] / "backends" / "go_override"
# Express and method-override, installed by `make interop` from the committed lockfile.
NODE_MODULES = Path(__file__).parents[1] / "interop" / "js" / "node_modules"
RULES = (PREMIUM_READ,)


async def send(
    client: Client,
    method: str,
    target: str,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
) -> tuple[int, dict[str, Any]]:
    """The request line exactly as given (an HTTP client would normalize the target)."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    lines = [f"{method} {target} HTTP/1.1", "Host: x", "Connection: close"]
    lines += [f"Content-Length: {len(body)}", *(f"{name}: {value}" for name, value in headers)]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body)
    response = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return status, json.loads(body) if body.strip() else {}


def _dechunk(body: bytes) -> bytes:
    data = b""
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return data
        data, body = data + body[:size], body[size + 2 :]


@contextlib.asynccontextmanager
async def running_node_backend(script: Path = LENIENT_JS) -> AsyncIterator[str]:
    node = shutil.which("node")
    assert node is not None, "node is required to run the tests (README: Requirements)"
    assert NODE_MODULES.is_dir(), "run `make interop` (the README's test command does)"
    process = await asyncio.create_subprocess_exec(
        node,
        str(script),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "NODE_PATH": str(NODE_MODULES)},
    )
    try:
        assert process.stdout is not None
        port = int(await asyncio.wait_for(process.stdout.readline(), 10))
        yield f"http://127.0.0.1:{port}"
    finally:
        process.kill()
        await process.wait()


@pytest_asyncio.fixture
async def node_backend() -> AsyncIterator[str]:
    async with running_node_backend() as url:
        yield url


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def _wsgi_echo(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
    seen = {key: value for key, value in environ.items() if key.startswith("HTTP_")}
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(seen).encode()]


@pytest.fixture
def wsgi_backend() -> Iterator[str]:
    server: WSGIServer = make_server("127.0.0.1", 0, _wsgi_echo, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


class _Upstream:
    def __init__(self, url: str) -> None:
        self.url = url

    def make_url(self, path: str) -> str:
        return self.url + path


@pytest_asyncio.fixture
async def lenient(node_backend: str) -> AsyncIterator[tuple[Client, FakeGateway]]:
    gateway = FakeGateway(RULES)
    async with await proxy_for(_Upstream(node_backend), gateway) as client:  # type: ignore[arg-type]
        yield client, gateway


async def test_the_lenient_backend_serves_premium_content_once_paid(
    lenient: tuple[Client, FakeGateway],
) -> None:
    client, gateway = lenient
    status, body = await send(client, "GET", "/public/page")
    assert (status, body["premium"]) == (200, False)
    status, challenge = await send(client, "GET", "/api/premium/x")
    assert status == 402
    authorization = gateway.pay(challenge)
    status, body = await send(client, "GET", "/api/premium/x", [("Authorization", authorization)])
    assert (status, body["premium"]) == (200, True)


BYPASSES = [
    ("GET", "/api\\premium\\x", ()),
    ("GET", "/x/..\\api\\premium\\x", ()),
    ("GET", "/api%5Cpremium%5Cx", ()),
    ("GET", "/api%5cpremium/x", ()),
    ("GET", "/API/premium/x", ()),
    ("GET", "/Api/Premium/X/", ()),
    ("GET", "/api/premium", ()),
    ("GET", "/api/premium.json", ()),  # Rails' format, Spring's suffix
    ("GET", "/api/premium.v1.json", ()),
    ("GET", "/api;x=1/premium/x", ()),
    ("GET", "/api/premium;jsessionid=1/x", ()),
    ("GET", "/api%252fpremium/x", ()),
    ("GET", "/api%2Fpremium/x", ()),
    ("GET", "/api%2fpremium%2fx", ()),
    ("GET", "/api/premium%2e/x", ()),
    ("GET", "/api/premium%3F/x", ()),  # decoded and parsed again: the path ends at '?'
    ("GET", "/api/premium%3fx", ()),
    ("GET", "/api/premium%23/x", ()),  # ... or at '#'
    ("GET", "/api/premium./x", ()),
    ("GET", "/api/%EF%BD%90remium/x", ()),  # fullwidth p: NFKC makes it "premium"
    ("POST", "/api/premium/x", (("X-HTTP-Method-Override", "GET"),)),
    ("POST", "/api/premium/x", (("x-http-method", "get"),)),
    ("POST", "/api/premium/x", (("X-Method-Override", "GET"),)),
    ("POST", "/api/premium/x?_method=GET", ()),
    ("POST", "/api/premium/x?a=1&_METHOD=get", ()),
    ("POST", "/API/Premium/x?_method=GET", ()),
    ("POST", "/api/premium/x?.method=GET", ()),  # PHP reads it as _method
    ("POST", "/api/premium/x?%5Bmethod=GET", ()),
    ("POST", "/api/premium/x?_method%00=GET", ()),  # PHP cuts the name at the NUL
    ("POST", "/api/premium/x?_m%65thod=GET", ()),
    ("GET", "/index.php/api/premium/x", ()),  # a PHP front controller's PATH_INFO
    ("GET", "/ind%65x.php/api/premium/x", ()),
    ("GET", "/app/Index.PHP/api/premium/x", ()),
]


@pytest.mark.parametrize(("method", "target", "headers"), BYPASSES)
async def test_no_spelling_reaches_priced_content_unpaid(
    lenient: tuple[Client, FakeGateway],
    method: str,
    target: str,
    headers: tuple[tuple[str, str], ...],
) -> None:
    client, _gateway = lenient
    status, body = await send(client, method, target, headers)
    assert status in (400, 402), (status, body)
    assert body.get("premium") is None
    assert body["detail"]


async def test_a_method_override_that_changes_no_price_passes(
    lenient: tuple[Client, FakeGateway],
) -> None:
    client, _gateway = lenient
    status, body = await send(
        client, "POST", "/public/form", [("X-HTTP-Method-Override", "DELETE")]
    )
    assert (status, body["premium"]) == (200, False)
    assert body["headers"]["x-http-method-override"] == "DELETE"


MULTIPART = (
    b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\nhi\r\n'
    b'--b\r\nContent-Disposition: form-data; name="_method"\r\n\r\nGET\r\n--b--\r\n'
)
FORM = "application/x-www-form-urlencoded"
BODY_BYPASSES = [
    ("", b"_method=GET"),  # Rack reads a POST without a Content-Type as a form
    (FORM, b"a=1&_method=get"),
    (f"{FORM}; charset=utf-8", b"%5Fmethod=GET"),
    (FORM, b"_m%65thod=GET"),
    (FORM, b"_method[]=GET"),  # qs's array (Express), method-override takes the first
    ("application/json", b'{"_method": ["GET"]}'),
    (FORM, b".method=GET"),
    (FORM, b"_method%00=GET"),
    ("application/json", b'{"_method": "GET"}'),
    ("application/json", b'{"_m\\u0065thod": "GET"}'),
    ("multipart/form-data; boundary=b", MULTIPART),
]


def _typed(content_type: str) -> list[tuple[str, str]]:
    return [("Content-Type", content_type)] if content_type else []


@pytest.mark.parametrize(("content_type", "body"), BODY_BYPASSES)
async def test_no_method_named_in_a_post_body_reaches_priced_content_unpaid(
    lenient: tuple[Client, FakeGateway], content_type: str, body: bytes
) -> None:
    client, _gateway = lenient
    status, answer = await send(client, "POST", "/api/premium/x", _typed(content_type), body)
    assert status == 402, (status, answer)
    assert answer.get("premium") is None


@pytest.mark.parametrize(("content_type", "body"), BODY_BYPASSES)
async def test_the_backend_honours_each_body_override_when_told_it_does_not(
    node_backend: str, content_type: str, body: bytes
) -> None:
    # What the gateway guards against is real: with body_method = "ignored", each of these
    # POSTs is served the premium content unpaid by this backend.
    gateway = FakeGateway(RULES)
    gateway.pricing = Pricing(RULES, body_method=BodyMethod.IGNORED)
    async with await proxy_for(_Upstream(node_backend), gateway) as client:  # type: ignore[arg-type]
        status, answer = await send(client, "POST", "/api/premium/x", _typed(content_type), body)
    assert (status, answer["premium"]) == (200, True)


# Bodies Express's parsers read as naming GET and the gateway's cannot parse (invalid UTF-8,
# which Express replaces; nesting deeper than Python's parser takes), each with the key
# spelled with an escape; and qs's bracket after an empty parent key.
EXPRESS_BYPASSES = [
    ("application/json", b'{"_m\\u0065thod": "GET", "x": "\xff"}'),
    ("application/json", b'{"_m\\u0065thod": "GET", "x": ' + b"[" * 2000 + b"]" * 2000 + b"}"),
    (FORM, b"[_method]=GET"),
    (FORM, b"a=1&%5B_method%5Dx=GET"),
    (FORM, b"[_method][]=GET"),
]


@pytest_asyncio.fixture
async def express_backend() -> AsyncIterator[str]:
    async with running_node_backend(EXPRESS_JS) as url:
        yield url


@pytest.mark.parametrize(("content_type", "body"), EXPRESS_BYPASSES)
@pytest.mark.parametrize("ignored", [False, True])
async def test_express_gets_no_method_its_parsers_read_from_a_post_body_unpaid(
    express_backend: str, content_type: str, body: bytes, ignored: bool
) -> None:
    # With bodies ignored, Express routes each POST as the GET it names: premium.
    gateway = FakeGateway(RULES)
    if ignored:
        gateway.pricing = Pricing(RULES, body_method=BodyMethod.IGNORED)
    async with await proxy_for(_Upstream(express_backend), gateway) as client:  # type: ignore[arg-type]
        status, answer = await send(client, "POST", "/api/premium/x", _typed(content_type), body)
    if ignored:
        assert (status, answer) == (200, {"premium": True, "method": "GET"})
    else:
        assert status == 402, (status, answer)
        assert answer.get("premium") is None


GO_MULTIPART = "multipart/form-data; boundary=b"
# Multipart forms Go's form parsing reads `_method` from: field names it joins from RFC 2231
# continuations (its mime package), in which the bytes "method" never appear; a media type
# it lower-cases to "multipart" (a dotted capital I: Python's lower() makes it two letters).
GO_BYPASSES = [
    (
        GO_MULTIPART,
        b'--b\r\nContent-Disposition: form-data; name*0="_me"; name*1="thod"\r\n\r\n'
        b"DELETE\r\n--b--\r\n",
    ),
    (
        GO_MULTIPART,
        b"--b\r\nContent-Disposition: form-data; name*0*=utf-8''_me; name*1*=thod\r\n\r\n"
        b"DELETE\r\n--b--\r\n",
    ),
    (
        "mult\u0130part/form-data; boundary=b",
        b'--b\r\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n--b--\r\n',
    ),
]
ITEMS_WRITE = Rule(
    "/api/items/*", methods=frozenset({"PUT", "PATCH", "DELETE"}), price_msat=Msat(10_000)
)


@pytest.fixture(scope="session")
def go_backend_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    go = shutil.which("go")
    assert go is not None, "Go is required to run the tests (README: Requirements)"
    binary = tmp_path_factory.mktemp("go-backend") / "go_override"
    subprocess.run(  # noqa: S603 - go from PATH, fixed arguments
        [go, "build", "-o", str(binary), "."], cwd=GO_BACKEND, check=True
    )
    return binary


@pytest_asyncio.fixture
async def go_backend(go_backend_binary: Path) -> AsyncIterator[str]:
    process = await asyncio.create_subprocess_exec(
        str(go_backend_binary), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        port = int(await asyncio.wait_for(process.stdout.readline(), 10))
        yield f"http://127.0.0.1:{port}"
    finally:
        process.kill()
        await process.wait()


@pytest.mark.parametrize(("content_type", "body"), GO_BYPASSES)
@pytest.mark.parametrize("ignored", [False, True])
async def test_go_gets_no_method_named_by_a_form_it_reads_otherwise_unpaid(
    go_backend: str, content_type: str, body: bytes, ignored: bool
) -> None:
    # With the body ignored, the backend routes the POST as the DELETE it names: premium.
    gateway = FakeGateway((ITEMS_WRITE,))
    if ignored:
        gateway.pricing = Pricing((ITEMS_WRITE,), body_method=BodyMethod.IGNORED)
    headers = [("Content-Type", content_type)]
    async with await proxy_for(_Upstream(go_backend), gateway) as client:  # type: ignore[arg-type]
        status, answer = await send(client, "POST", "/api/items/1", headers, body)
    if ignored:
        assert (status, answer) == (200, {"premium": True, "method": "DELETE"})
    else:
        assert status == 402, (status, answer)


async def test_the_upstream_gets_no_expectation_the_gateway_met_itself(
    lenient: tuple[Client, FakeGateway],
) -> None:
    # The gateway answers 100 Continue and forwards the body whole: an upstream told to
    # expect it could wait to answer the expectation first (waitress never does).
    client, _gateway = lenient
    reader, writer = await asyncio.open_connection(client.host, client.port)
    head = "POST /free/upload HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    writer.write(f"{head}Content-Length: 5\r\nExpect: 100-continue\r\n\r\n".encode())
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) == (
        b"HTTP/1.1 100 Continue\r\n\r\n"
    )
    writer.write(b"hello")
    response = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head_block, _, body = response.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head_block.lower():
        body = _dechunk(body)
    answer = json.loads(body)
    assert answer["bodyLength"] == 5
    assert "expect" not in answer["headers"]


async def test_a_connection_header_naming_a_header_the_request_carries_is_refused(
    lenient: tuple[Client, FakeGateway],
) -> None:
    client, _gateway = lenient
    # Dropped on the way, the Content-Type would leave a form to the backend (as Rack reads
    # a POST without one), and its _method a GET.
    headers = [("Content-Type", "text/plain"), ("Connection", "Content-Type")]
    status, answer = await send(client, "POST", "/api/premium/x", headers, b"_method=GET")
    assert status == 400, answer
    assert "content-type" in answer["detail"]
    headers = [("Content-Encoding", "identity"), ("Connection", "Content-Encoding")]
    status, answer = await send(client, "POST", "/api/premium/x", headers, b"_method=GET")
    assert status == 400, answer
    # Other headers may be named (and are dropped), or ones the request does not carry.
    headers = [("Connection", "X-Foo, Content-Type"), ("X-Foo", "hop")]
    status, answer = await send(client, "GET", "/public/page", headers)
    assert (status, answer["premium"]) == (200, False)


async def test_a_post_body_read_for_an_override_reaches_the_backend_whole(
    lenient: tuple[Client, FakeGateway],
) -> None:
    client, _gateway = lenient
    body = b"a=1&note=" + b"x" * 20_000
    for _ in range(2):  # the first answer is not remembered as free for the line
        status, answer = await send(client, "POST", "/api/premium/x", _typed(FORM), body)
        assert (status, answer["premium"]) == (200, False)
        assert answer["bodyLength"] == len(body)
        assert answer["bodySha256"] == hashlib.sha256(body).hexdigest()
        status, answer = await send(client, "POST", "/api/premium/x", [], b"_method=GET")
        assert status == 402, answer
    # Sent in chunks: forwarded in chunks, whole.
    reader, writer = await asyncio.open_connection(client.host, client.port)
    head = "POST /api/premium/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    head += f"Content-Type: {FORM}\r\nTransfer-Encoding: chunked\r\n\r\n"
    writer.write(head.encode() + b"4\r\na=1&\r\n3\r\nb=2\r\n0\r\n\r\n")
    response = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head_bytes, _, answer_body = response.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head_bytes.lower():
        answer_body = _dechunk(answer_body)
    answer = json.loads(answer_body)
    assert (answer["premium"], answer["bodyLength"]) == (False, 7)
    assert answer["bodySha256"] == hashlib.sha256(b"a=1&b=2").hexdigest()


@pytest.mark.parametrize(("body", "status"), [(b"_method=GET", 402), (b"a=1", 200)])
async def test_a_post_body_awaiting_100_continue_is_asked_for_and_read(
    lenient: tuple[Client, FakeGateway], body: bytes, status: int
) -> None:
    client, _gateway = lenient
    reader, writer = await asyncio.open_connection(client.host, client.port)
    head = "POST /api/premium/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    head += f"Content-Type: {FORM}\r\nContent-Length: {len(body)}\r\n"
    writer.write(head.encode() + b"Expect: 100-continue\r\n\r\n")
    async with asyncio.timeout(10):
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        response = await reader.read()
    writer.close()
    assert response.startswith(f"HTTP/1.1 {status} ".encode()), response[:100]


async def test_a_post_body_too_large_to_read_for_an_override_gets_413(node_backend: str) -> None:
    gateway = FakeGateway(RULES)
    options = {"max_held_body_bytes": 100}
    async with await proxy_for(_Upstream(node_backend), gateway, **options) as client:  # type: ignore[arg-type]
        status, answer = await send(client, "POST", "/api/premium/x", _typed(FORM), b"a" * 101)
        assert status == 413
        assert "a POST's may name another method" in answer["detail"]
        # Where no method a body names changes the price, it is not read: no such limit.
        status, answer = await send(client, "POST", "/public/form", _typed(FORM), b"a" * 5000)
        assert (status, answer["bodyLength"]) == (200, 5000)
        # Nor is a body no framework reads parameters from.
        status, answer = await send(
            client, "POST", "/api/premium/x", _typed("application/octet-stream"), b"a" * 5000
        )
        assert (status, answer["premium"], answer["bodyLength"]) == (200, False, 5000)


async def test_a_paid_post_whose_body_may_name_a_method_streams_through_unread(
    node_backend: str,
) -> None:
    """A token good for whatever method the body names: the body is not read for an
    override, so the read's bound does not apply; the backend gets it whole."""
    gateway = FakeGateway(RULES)
    options = {"max_held_body_bytes": 100, "unpaid_requests_per_client": 1}
    async with await proxy_for(_Upstream(node_backend), gateway, **options) as client:  # type: ignore[arg-type]
        status, challenge = await send(client, "GET", "/api/premium/x")
        assert status == 402
        paid = gateway.pay(challenge)
        body = b"a=" + b"x" * 5000 + b"&_method=GET"
        headers = [*_typed(FORM), ("Authorization", paid)]
        status, answer = await send(client, "POST", "/api/premium/x", headers, body)
        assert (status, answer["premium"], answer["bodyLength"]) == (200, True, len(body))
        assert answer["bodySha256"] == hashlib.sha256(body).hexdigest()
        assert "x-l402-token" in answer["headers"]
        # Asked for with Expect: 100-continue, after the decision.
        reader, writer = await asyncio.open_connection(client.host, client.port)
        head = "POST /api/premium/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        head += f"Content-Type: {FORM}\r\nAuthorization: {paid}\r\n"
        head += f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
        writer.write(head.encode())
        async with asyncio.timeout(10):
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(body)
            response = await reader.read()
        writer.close()
        assert response.startswith(b"HTTP/1.1 200 "), response[:100]
        assert b'"premium":true' in response
        # Without a token, or with one that does not verify, the body is read: too large.
        for refused in ([], [("Authorization", paid[:-1] + ("0" if paid[-1] != "0" else "1"))]):
            status, answer = await send(
                client, "POST", "/api/premium/x", [*_typed(FORM), *refused], body
            )
            assert status == 413, answer


@pytest.mark.parametrize("header", ["X-Original-URL", "X-Rewrite-URL"])
async def test_a_header_some_backends_route_by_is_not_forwarded(
    lenient: tuple[Client, FakeGateway], header: str
) -> None:
    client, _gateway = lenient
    status, answer = await send(client, "GET", "/public/x", [(header, "/api/premium/x")])
    assert (status, answer["premium"]) == (200, False)
    assert header.lower() not in answer["headers"]


@pytest.mark.parametrize("spelling", ["X_L402_Token", "X-L402_Token", "x_l402_token"])
async def test_no_spelling_of_the_token_header_reaches_a_wsgi_backend(
    wsgi_backend: str, spelling: str
) -> None:
    gateway = FakeGateway(RULES)
    forged = '{"service":"premium","forged":true}'
    async with await proxy_for(_Upstream(wsgi_backend), gateway) as client:  # type: ignore[arg-type]
        status, seen = await send(client, "GET", "/public/x", [(spelling, forged)])
        assert status == 200
        assert "HTTP_X_L402_TOKEN" not in seen, seen
        # A paid request: the backend sees exactly the gateway's facts, nothing merged in.
        _status, challenge = await send(client, "GET", "/api/premium/x")
        authorization = gateway.pay(challenge)
        status, seen = await send(
            client,
            "GET",
            "/api/premium/x",
            [("Authorization", authorization), (spelling, forged)],
        )
        assert status == 200
        assert json.loads(seen["HTTP_X_L402_TOKEN"])["service"] == "premium"
        assert "forged" not in seen["HTTP_X_L402_TOKEN"]


async def _h11_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One request read by h11, answered with what it saw as the Node backend does."""
    connection = h11.Connection(h11.SERVER)
    request: h11.Request | None = None
    body = b""
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await reader.read(65536))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
    assert request is not None
    seen = {
        "method": request.method.decode(),
        "headers": {name.decode(): value.decode() for name, value in request.headers},
        "bodyLength": len(body),
        "bodySha256": hashlib.sha256(body).hexdigest(),
    }
    answer = json.dumps(seen).encode()
    headers = [(b"Content-Type", b"application/json"), (b"Content-Length", b"%d" % len(answer))]
    writer.write(connection.send(h11.Response(status_code=200, headers=headers)) or b"")
    writer.write(connection.send(h11.Data(data=answer)) or b"")
    writer.write(connection.send(h11.EndOfMessage()) or b"")
    await writer.drain()
    writer.close()


@pytest_asyncio.fixture(params=["node", "h11"])
async def body_backend(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    if request.param == "node":
        async with running_node_backend() as url:
            yield url
        return
    listening = await asyncio.start_server(_h11_echo, "127.0.0.1", 0)
    async with listening:
        yield f"http://127.0.0.1:{listening.sockets[0].getsockname()[1]}"


async def test_bodies_reach_backends_of_other_parsers_whole(body_backend: str) -> None:
    async with await proxy_for(_Upstream(body_backend), FakeGateway(RULES)) as client:  # type: ignore[arg-type]
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            for size in (0, 5, 300_000):
                body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
                for stated in (True, False):

                    async def chunks(body: bytes = body) -> AsyncIterator[bytes]:
                        for start in range(0, len(body), 70_000):
                            yield body[start : start + 70_000]

                    response = await client.request(
                        method, "/public/upload", data=body if stated else chunks()
                    )
                    assert response.status == 200, (method, size, stated)
                    seen = await response.json()
                    headers = {name.lower(): value for name, value in seen["headers"].items()}
                    assert seen["method"] == method
                    assert seen["bodyLength"] == size
                    assert seen["bodySha256"] == hashlib.sha256(body).hexdigest()
                    assert headers["connection"] == "close"
                    if stated:
                        assert headers["content-length"] == str(size)
                        assert "transfer-encoding" not in headers
                    else:
                        assert headers["transfer-encoding"] == "chunked"
                        assert "content-length" not in headers


@pytest.mark.parametrize("connection", ["Content-Length", "close, content-length"])
async def test_a_body_keeps_its_length_whatever_connection_names(
    body_backend: str, connection: str
) -> None:
    # Connection names headers of this hop only; taken out, Content-Length would leave the
    # body unframed on the upstream connection, where it reads as the next request.
    async with await proxy_for(_Upstream(body_backend), FakeGateway(RULES)) as client:  # type: ignore[arg-type]
        status, seen = await send(
            client, "POST", "/public/hook", [("Connection", connection)], SMUGGLED
        )
    assert status == 200
    assert seen["headers"]["content-length"] == str(len(SMUGGLED))
    assert (seen["method"], seen["bodyLength"]) == ("POST", len(SMUGGLED))


class _LeavesBodiesUnread(BaseHTTPRequestHandler):
    """HTTP/1.1 kept alive, and a body is never read: what follows the head on the
    connection is read as the next request."""

    protocol_version = "HTTP/1.1"
    lines: list[str]
    connection_ended: threading.Event

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def handle(self) -> None:
        super().handle()  # every request on the connection, until it is to close
        self.connection_ended.set()

    def _answer(self) -> None:
        self.lines.append(self.requestline)
        premium = self.path.startswith("/api/premium/")
        body = json.dumps({"premium": premium, "line": self.requestline}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer


@dataclass
class UnreadBodies:
    url: str
    lines: list[str]  # the request lines the backend read, in order
    connection_ended: threading.Event  # a connection's requests are all read


@pytest.fixture
def unread_bodies() -> Iterator[UnreadBodies]:
    backend = UnreadBodies("", [], threading.Event())
    handler = type(
        "Handler",
        (_LeavesBodiesUnread,),
        {"lines": backend.lines, "connection_ended": backend.connection_ended},
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    backend.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield backend
    finally:
        server.shutdown()
        server.server_close()


SMUGGLED = b"GET /api/premium/report HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("paid", [False, True])
async def test_a_request_hidden_in_a_body_the_backend_leaves_unread_never_runs(
    unread_bodies: UnreadBodies, paid: bool
) -> None:
    backend = unread_bodies
    gateway = FakeGateway((*RULES, ECHO))
    async with await proxy_for(_Upstream(backend.url), gateway) as client:  # type: ignore[arg-type]
        target, headers = "/public/hook", []
        if paid:  # a token bought for a cheap route with a body
            _status, challenge = await send(client, "POST", ECHO.pattern)
            target, headers = ECHO.pattern, [("Authorization", gateway.pay(challenge))]
        status, answer = await send(client, "POST", target, headers, SMUGGLED)
        assert (status, answer["line"]) == (200, f"POST {target} HTTP/1.1")
        # The backend ends the connection after the POST (Connection: close): kept, it would
        # read the body as a request at once, then wait for more on the connection.
        assert await asyncio.to_thread(backend.connection_ended.wait, 5)
        assert backend.lines == [f"POST {target} HTTP/1.1"]
        status, answer = await send(client, "GET", "/public/page")
        assert (status, answer) == (200, {"premium": False, "line": "GET /public/page HTTP/1.1"})


class _AnswersTwice:
    """A backend that answers each request with its request line, then, 0.1 s later (on a
    connection idle by then), answers again unasked (a response for no request)."""

    def __init__(self) -> None:
        self.unasked = asyncio.Queue[None]()  # one item for each unasked answer written

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await self._answer(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the proxy closed the connection
        finally:
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        line = head.split(b"\r\n", 1)[0].decode()
        length = next(
            (
                int(h.split(b":")[1])
                for h in head.lower().split(b"\r\n")
                if h.startswith(b"content-length:")
            ),
            0,
        )
        await reader.readexactly(length)
        _respond(writer, line)
        await asyncio.sleep(0.1)  # the answer is relayed by then: the connection is idle
        _respond(writer, "unasked")
        self.unasked.put_nowait(None)


def _respond(writer: asyncio.StreamWriter, line: str) -> None:
    body = json.dumps({"premium": False, "line": line}).encode()
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
async def test_an_answer_the_backend_sends_unasked_reaches_no_later_request(method: str) -> None:
    backend = _AnswersTwice()
    server = await asyncio.start_server(backend.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    gateway = FakeGateway(RULES)
    try:
        async with await proxy_for(_Upstream(f"http://127.0.0.1:{port}"), gateway) as client:  # type: ignore[arg-type]
            for n in range(3):
                target = f"/public/{n}"
                status, answer = await send(client, method, target)
                assert (status, answer["line"]) == (200, f"{method} {target} HTTP/1.1")
                await asyncio.wait_for(backend.unasked.get(), 5)  # in before the next request
    finally:
        server.close()
        await server.wait_closed()
