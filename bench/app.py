"""The server a benchmark loads: a trivial aiohttp handler, bare or behind the gateway.

``python -m bench.app --port P bare`` or ``python -m bench.app --port P gateway CONFIG``.
Run as its own process so the load generator and the server do not share an interpreter.
``--bare-port Q`` with ``gateway`` serves the bare application on Q from the same process as
well (one heap, one loop, the gateway's background tasks running for both): what an
instruction count compares (``bench.verify_overhead``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from aiohttp import web

from gateway.config import load_config
from gateway.runtime import running_gateway
from gateway.web.aiohttp import setup_l402


async def hello(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


def build(mode: str, config_file: str | None) -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/api/premium/hello", hello)  # POST too (bench.before_after)
    app.router.add_get("/api/credit/hello", hello)  # a credit-billed route (bench.credit_route)
    app.router.add_get("/health", hello)
    if mode == "gateway":
        config = load_config(config_file)
        setup_l402(app, lambda: running_gateway(config))
    return app


async def _serve(apps: list[tuple[web.Application, int]]) -> None:
    runners = []
    try:
        for app, port in apps:
            runner = web.AppRunner(app, access_log=None)
            runners.append(runner)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()  # until the process is stopped
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.app")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bare-port", type=int, help="serve the bare application here too")
    parser.add_argument("mode", choices=["bare", "gateway"])
    parser.add_argument("config", nargs="?")
    args = parser.parse_args()
    if args.bare_port is None:
        web.run_app(
            build(args.mode, args.config),
            host="127.0.0.1",
            port=args.port,
            print=None,
            access_log=None,
        )
        return
    apps = [(build(args.mode, args.config), args.port), (build("bare", None), args.bare_port)]
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(apps))


if __name__ == "__main__":
    main()
