"""``l402-gateway pay`` as a subprocess against an in-process gateway, without any LND node
(``--no-pay``, free routes, usage errors); paying is covered by tests/regtest/test_pay_command.py.
Also the progress reporter, with a fake terminal, and a Lightning Address's terms
(LNURL-pay, ``--no-pay``; paying: tests/unit/test_pay_lnurl.py and
tests/regtest/test_pay_lnurl_regtest.py)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway import errors
from gateway.cli.formats import sat_to_msat
from gateway.cli.pay import ProgressPayer
from gateway.examples import demo_api
from gateway.ports import Msat, PaymentHash
from gateway.pricing import Rule
from gateway.web.aiohttp import setup_l402
from tests.demo_rules import HEALTH
from tests.fakes import FakeGateway
from tests.unit.client.client_helpers import FakePayer, make_challenge

REPO = Path(__file__).resolve().parents[2]
# 21 sat: a price the printed offer shows in sat and msat
RULES = (HEALTH, Rule("/api/premium/*", price_msat=Msat(21_000), service="premium"))


@dataclass
class Result:
    code: int
    stdout: bytes
    stderr: str


@dataclass
class Server:
    url: str
    tmp: Path

    async def pay(self, *args: str, stdin: bytes | None = None) -> Result:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env["XDG_CACHE_HOME"] = str(self.tmp / "cache")
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli",
            "pay",
            *args,
            cwd=REPO,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(stdin), 60)
        assert process.returncode is not None
        return Result(process.returncode, stdout, stderr.decode())


@pytest_asyncio.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    gateway = FakeGateway(RULES)
    app = demo_api()
    setup_l402(app, gateway)
    test_server = TestServer(app)
    await test_server.start_server()
    try:
        yield Server(str(test_server.make_url("")).rstrip("/"), tmp_path)
    finally:
        await test_server.close()


async def test_free_route_prints_the_body(server: Server) -> None:
    result = await server.pay("--no-pay", server.url + "/health")
    assert (result.code, json.loads(result.stdout)) == (0, {"status": "ok"}), result.stderr


async def test_no_pay_prints_the_price_and_exits_6(server: Server) -> None:
    result = await server.pay("--no-pay", "--max-cost", "20", server.url + "/api/premium/fortune")
    assert result.code == 6, result.stderr
    text = result.stdout.decode()
    assert "payment required: 21 sat (21000 msat)" in text
    assert "for:      premium: GET /api/premium/fortune" in text
    assert "network:  regtest" in text
    assert "invoice:  lnbcrt210n1" in text
    assert "(over --max-cost 20 sat)" in text
    assert not (server.tmp / "cache" / "l402-gateway" / "tokens.json").exists()

    as_json = await server.pay("--no-pay", "--json", server.url + "/api/premium/fortune")
    assert as_json.code == 6
    summary = json.loads(as_json.stdout)
    assert summary["status"] == 402
    assert summary["paid"] is False
    assert summary["offer"]["amount_msat"] == 21_000
    assert summary["offer"]["over_max_cost"] is False
    assert summary["offer"]["services"] == ["premium"]


async def test_invoice_for_another_network_exits_5(server: Server) -> None:
    result = await server.pay(
        "--no-pay", "--network", "mainnet", server.url + "/api/premium/fortune"
    )
    assert result.code == 5
    assert "invoice is for regtest" in result.stderr
    assert "nothing was paid" in result.stderr


async def test_http_errors_and_output_file(server: Server) -> None:
    missing = await server.pay("--no-pay", server.url + "/nothing")
    assert missing.code == 1
    assert "HTTP 404" in missing.stderr
    out = server.tmp / "body.json"
    result = await server.pay("-o", str(out), "--no-pay", server.url + "/health")
    assert (result.code, result.stdout) == (0, b"")
    assert json.loads(out.read_text()) == {"status": "ok"}
    summary = await server.pay("--json", "--no-pay", server.url + "/health")
    assert json.loads(json.loads(summary.stdout)["body"]) == {"status": "ok"}


async def test_method_headers_and_data(server: Server) -> None:
    (server.tmp / "body.bin").write_bytes(b"12345")
    # /api/echo is free in these rules: the request goes through as given.
    for data, size in (("abc", 3), (f"@{server.tmp / 'body.bin'}", 5)):
        result = await server.pay(
            "--no-pay", "-H", "X-Test: yes", "-d", data, server.url + "/api/echo"
        )
        assert result.code == 0, result.stderr
        echoed = json.loads(result.stdout)
        assert (echoed["method"], echoed["bytes"], echoed["headers"]["X-Test"]) == (
            "POST",
            size,
            "yes",
        )
    stdin = await server.pay(
        "--no-pay", "-X", "put", "-d", "@-", server.url + "/api/echo", stdin=b"xy"
    )
    assert json.loads(stdin.stdout)["method"] == "PUT"
    assert json.loads(stdin.stdout)["bytes"] == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-H", "no colon"], "-H wants 'Name: value'"),
        (["-d", "@/nonexistent/file"], "-d: cannot read"),
        (["-X", "GE T"], "not an HTTP method"),
        (["--lnd-tls-cert", "/nonexistent/tls.cert", "--lnd-macaroon", "/x"], "cannot read"),
        ([], "pay needs the paying LND node"),
    ],
)
async def test_usage_errors_exit_2(server: Server, args: list[str], message: str) -> None:
    result = await server.pay(*args, server.url + "/api/premium/fortune")
    assert result.code == 2
    assert message in result.stderr


async def test_bad_url_and_amounts(server: Server) -> None:
    assert (await server.pay("--no-pay", "ftp://x/")).code == 2
    bad_amount = await server.pay("--max-cost", "0.0001", server.url)
    assert bad_amount.code == 2
    assert "msat precision" in bad_amount.stderr
    assert sat_to_msat("21") == 21_000
    assert sat_to_msat("0.5") == 500
    unreachable = await server.pay("--no-pay", "--timeout", "2", "http://127.0.0.1:9/")
    assert unreachable.code == 3
    assert "request failed" in unreachable.stderr
    for option in ("--timeout", "--payment-timeout"):
        for seconds in ("nan", "inf", "-1", "0", "x"):
            refused = await server.pay("--no-pay", option, seconds, server.url)
            assert refused.code == 2, (option, seconds)  # a usage error, no traceback
            assert "Traceback" not in refused.stderr


async def pay_no_pay(
    server: Server, path: str, handler: Callable[[web.Request], Awaitable[web.Response]]
) -> Result:
    """``pay --no-pay`` of ``path`` on a server of that one route."""
    app = web.Application()
    app.router.add_get(path, handler)
    test_server = TestServer(app, host="127.0.0.1")
    await test_server.start_server()
    try:
        return await server.pay("--no-pay", f"http://127.0.0.1:{test_server.port}{path}")
    finally:
        await test_server.close()


async def test_a_body_nested_too_deep_for_json_is_printed(server: Server) -> None:
    """The LNURL-pay hint reads a 200's JSON: one nested deeper than the interpreter's stack
    is printed as it came, not a traceback."""
    nested = b'{"a":' + b"[" * 5_000

    async def deep(_request: web.Request) -> web.Response:
        return web.Response(body=nested, content_type="application/json")

    result = await pay_no_pay(server, "/deep", deep)
    assert (result.code, result.stdout, result.stderr) == (0, nested, "")


async def test_a_redirect_loop_is_said_plainly(server: Server) -> None:
    async def loop(_request: web.Request) -> web.Response:
        raise web.HTTPFound("/loop")

    looped = await pay_no_pay(server, "/loop", loop)
    assert looped.code == 3
    assert looped.stderr.strip() == "l402-gateway: too many redirects (10)"


class FakeTerminal(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.written = asyncio.Event()  # set on every write

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.written.set()
        return super().write(text)


async def test_progress_ticks_on_a_terminal() -> None:
    payer = FakePayer(fee_msat=1_000)
    challenge = payer.learn(make_challenge(21_000))
    terminal = FakeTerminal()
    start_line = "\rpaying 21 sat (routing fee up to 5 sat)... "

    async def until_three_ticks() -> None:
        # The payment lasts until the terminal has ticked thrice, however slow the machine.
        async with asyncio.timeout(30):
            while terminal.getvalue().count(start_line) < 3:
                terminal.written.clear()
                await terminal.written.wait()

    payer.before_send = until_three_ticks
    progress = ProgressPayer(payer, terminal, tick=0.05)
    await progress.send_payment(challenge.invoice, max_fee_msat=Msat(5_000), payment_timeout=9)
    output = terminal.getvalue()
    ticks = [float(s) for s in re.findall(re.escape(start_line) + r"(\d+\.\d)s\x1b\[K", output)]
    assert len(ticks) >= 3
    assert ticks == sorted(ticks)  # the elapsed seconds count up...
    assert ticks[2] >= 0.1  # ... at least one tick (0.05 s) apart
    assert re.search(r"\rpaid 21 sat \+ 1 sat fee in \d+\.\d\ds\x1b\[K\n$", output)
    assert await progress.lookup_payment(PaymentHash(challenge.payment_hash)) is not None


async def test_progress_without_a_terminal_is_two_lines() -> None:
    """A start and an end line: paid, failed, or (the call broke) outcome unknown."""
    payer = FakePayer(fee_msat=0)
    challenge = payer.learn(make_challenge(1_000))
    stream = io.StringIO()
    await ProgressPayer(payer, stream).send_payment(
        challenge.invoice, max_fee_msat=Msat(5_000), payment_timeout=9
    )
    first, second, end = stream.getvalue().split("\n")
    assert first == "paying 1 sat (routing fee up to 5 sat)..."
    assert second.startswith("paid 1 sat + 0 sat fee in ")
    assert end == ""
    payer.fail = True
    failing = payer.learn(make_challenge(1_000))
    with pytest.raises(Exception, match="NO_ROUTE"):
        await ProgressPayer(payer, stream).send_payment(
            failing.invoice, max_fee_msat=Msat(5_000), payment_timeout=9
        )
    assert stream.getvalue().splitlines()[-1].startswith("payment failed after ")
    payer.fail, payer.crash = False, True  # the node pays, the call breaks
    broken = payer.learn(make_challenge(1_000))
    with pytest.raises(errors.BackendUnavailable):
        await ProgressPayer(payer, stream).send_payment(
            broken.invoice, max_fee_msat=Msat(5_000), payment_timeout=9
        )
    assert stream.getvalue().splitlines()[-1].startswith("payment outcome unknown after ")


METADATA = json.dumps([["text/plain", "Tips for carol"]])


@pytest_asyncio.fixture
async def lnurl_service() -> AsyncIterator[str]:
    """A Lightning Address (``carol@127.0.0.1:PORT``) that answers its payRequest only."""

    async def pay_request(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "tag": "payRequest",
                "callback": f"http://{request.host}/cb",
                "minSendable": 21_000,
                "maxSendable": 21_000,
                "metadata": METADATA,
            }
        )

    app = web.Application()
    app.router.add_get("/.well-known/lnurlp/carol", pay_request)
    test_server = TestServer(app, host="127.0.0.1")
    await test_server.start_server()
    try:
        yield f"carol@127.0.0.1:{test_server.port}"
    finally:
        await test_server.close()


async def test_lnurl_pay_without_a_node(server: Server, lnurl_service: str) -> None:
    """A Lightning Address's terms with --no-pay; the usage errors of LNURL-pay (exit 2)."""
    terms = await server.pay("--no-pay", f"lightning:{lnurl_service}")
    assert terms.code == 6, terms.stderr
    assert terms.stdout.decode().splitlines()[1:3] == [
        "  for:      Tips for carol",
        "  amount:   21 sat (fixed)",
    ]
    needs_node = await server.pay("--comment", "hi", lnurl_service)
    assert needs_node.code == 2
    assert "pay needs the paying LND node" in needs_node.stderr
    fetch_option = await server.pay("--no-pay", "-o", "x", lnurl_service)
    assert fetch_option.code == 2
    assert "-o: for fetching a URL, not for paying by LNURL-pay" in fetch_option.stderr
    url = f"http://{lnurl_service.partition('@')[2]}/.well-known/lnurlp/carol"
    fetched = await server.pay("--no-pay", url)  # a URL without --amount: fetched
    assert (fetched.code, json.loads(fetched.stdout)["tag"]) == (0, "payRequest")
    assert "this URL is an LNURL-pay service: pay it with --amount" in fetched.stderr
    as_lnurl = await server.pay("--no-pay", "--amount", "21", url)
    assert as_lnurl.code == 6
    assert as_lnurl.stdout.decode().startswith(f"LNURL-pay: {url}")
    help_text = (await server.pay("--help")).stdout.decode()
    assert "Lightning Address (name@domain)" in help_text
    assert "LNURL-pay: the amount) is over --max-cost" in help_text
