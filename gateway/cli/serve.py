"""``l402-gateway serve``: the reverse proxy in front of ``[server] upstream``.

With ``[server] workers`` above one it supervises that many processes on the one port
(``SO_REUSEPORT``); the first also runs the settlement watcher and the invoice sweeper (on
PostgreSQL, while its instance leads: ``gateway.leader``), any worker's exit stops them all,
and a worker dies with its supervisor. The watching process
also serves the admin dashboard on ``[admin] listen`` (``gateway.web.admin``); its password
file is checked before anything starts. With ``[lnurl] base_url`` every worker answers the tip
jars' and payment links' paths (``gateway.web.lnurl``) before any pricing; the jars' images
are read before anything starts.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import errno
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

from gateway import errors
from gateway.cli.check import startup_checks
from gateway.cli.formats import configure_logging, current_log_format
from gateway.config import Config, listen_address, store_location
from gateway.health import HealthSlot
from gateway.ports import AdminSlot, MetricsSlot
from gateway.runtime import (
    build_pricing,
    lnd_settings,
    payer_settings,
    payout_settings,
    running_gateway,
    tip_jars,
)
from gateway.web.admin import build_admin, read_password_file
from gateway.web.connections import REPORT_INTERVAL, ServerLimits, Throttled
from gateway.web.lnurl import TipsSlot
from gateway.web.metrics import metrics_app
from gateway.web.proxy import build_proxy
from gateway.web.server import Listener, ListenError, connection_limit, serve

log = logging.getLogger(__name__)
WORKER_LOG_FORMAT = "%(asctime)s %(processName)s %(levelname)s %(name)s: %(message)s"
_BIND_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


class MalformedRequestLog(logging.Filter):
    """aiohttp logs each request its parser rejects at ERROR, with a traceback quoting the
    offending bytes: anyone could fill the log that way, and the bytes may be part of a
    credential. Such a record becomes one INFO line naming only the client and the error, at
    most one per ``interval`` seconds (with the count of those left out)."""

    def __init__(self, interval: float = REPORT_INTERVAL) -> None:
        super().__init__()
        self._events = Throttled(interval)

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError) and error.code == 400:
            if not self._events.due():
                return False
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
            record.msg = "rejected a malformed request from %s: %s; %d more since the last report"
            client = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.args = (client, type(error).__name__, self._events.unreported)
            record.exc_info, record.exc_text = None, None
            self._events.reported()
        return True


def add_parser(commands: Any) -> None:
    """``serve`` on the ``commands`` subparsers (it takes no options: ``[server]`` has them)."""
    commands.add_parser("serve", help="run the reverse proxy in front of [server] upstream")


def run(config: Config) -> int:
    """The ``serve`` command: one proxy process, or a supervisor of ``[server] workers``."""
    if not config.server.upstream:
        raise errors.ConfigError("[server] upstream is required for serve (the backend URL)")
    build_pricing(config)
    lnd_settings(config)  # fail on a bad config before binding the port
    payer_settings(config)  # and on an unreadable payment macaroon: withdrawals', payouts'
    payout_settings(config)
    tip_jars(config)  # and on an unreadable tip jar image
    startup_checks(config)  # the node, its certificate, the macaroon, the upstream
    if config.admin.listen:
        _admin_password(config)  # refused before anything starts: missing, empty, readable
    try:
        host, port = listen_address(config.server.listen)  # load_config checked it
    except ValueError as error:
        raise errors.ConfigError(f"[server] {error}") from None
    workers = config.server.workers
    if workers > 1 and store_location(config.store.url)[0] == "memory":
        raise errors.ConfigError("[server] workers > 1 needs a store they share, not memory:")
    loop = "uvloop" if event_loop_factory(config.server.event_loop) else "asyncio"
    log.info(
        "l402-gateway proxying %s on %s (%d worker%s, %s event loop)",
        config.server.upstream,
        config.server.listen,
        workers,
        "" if workers == 1 else "s",
        loop,
    )
    if workers == 1:
        _serve_worker(config, host, port, watch=True, log_level=None)
        return 0
    _check_listen(config.server.listen, host, port)  # one line here, not one per worker
    return _serve_workers(config, host, port)


def event_loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None for asyncio's own loop (``[server] event_loop``:
    auto takes uvloop when it is installed). ConfigError when uvloop is asked for and
    missing."""
    if choice == "asyncio":
        return None
    try:
        import uvloop  # the `speed` extra
    except ImportError:
        if choice == "uvloop":
            raise errors.ConfigError(
                "[server] event_loop = \"uvloop\" needs uvloop: pip install 'l402-gateway[speed]'"
            ) from None
        return None
    return uvloop.new_event_loop


def _check_listen(listen: str, host: str, port: int) -> None:
    """ConfigError when ``host:port`` cannot be bound as the workers will bind it."""
    try:
        for family, kind, proto, _name, address in socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
    except OSError as error:
        if not isinstance(error, socket.gaierror) and error.errno not in _BIND_ERRNOS:
            raise
        raise errors.ConfigError(f"[server] listen {listen}: {error.strerror or error}") from None


def _serve_worker(
    config: Config,
    host: str,
    port: int,
    *,
    watch: bool,
    log_level: int | None,
    supervisor: int = 0,
    log_format: str = "text",
) -> None:
    """One proxy process; ``log_level`` is set, and ``supervisor`` is the supervisor's pid,
    when it is a spawned worker (which logs as ``log_format``: text or json)."""
    if log_level is not None:
        die_with_parent(supervisor)
        configure_logging(log_level, log_format, WORKER_LOG_FORMAT)
    server = config.server
    ipv6_prefix = config.rate_limit.ipv6_prefix
    health = HealthSlot()  # readiness of /.well-known/l402/ready, filled in at startup
    metrics = MetricsSlot()  # the meter and /metrics, filled in at startup with [metrics]
    # The admin dashboard: served by the watching process only (one per store).
    admin = AdminSlot() if watch and config.admin.listen else None
    # The tip jars and payment links: filled in at startup with [lnurl] base_url.
    tips = TipsSlot() if config.lnurl.enabled else None
    app = build_proxy(
        server.upstream or "",
        lambda: running_gateway(
            config, watch=watch, health=health, metrics=metrics, admin=admin, tips=tips
        ),
        token_header=server.token_header,
        trust_forwarded_for=server.trust_forwarded_for,
        max_body_bytes=server.max_body_bytes,
        body_timeout=server.body_timeout,
        min_body_rate=server.min_body_rate,
        unpaid_requests_per_client=server.unpaid_requests_per_client,
        requests_per_token=server.requests_per_token,
        upstream_connections=server.upstream_connections,
        paid_upstream_connections=server.paid_upstream_connections,
        ipv6_prefix=ipv6_prefix,
        max_held_body_bytes=config.hold.max_request_bytes,
        health=health,
        # Off: not even the responses' count runs (the slot is still filled, and unused).
        metrics=metrics if config.metrics.enabled else None,
        metrics_path=config.metrics.path,
        tips=tips,
    )
    # Each pool twice: kept-alive connections for GETs without a body, one-shot for the rest.
    upstream = 2 * (server.upstream_connections + server.paid_upstream_connections)
    try:
        max_connections = connection_limit(server.max_connections, upstream)
    except ValueError as error:
        raise errors.ConfigError(str(error)) from None
    # Behind a trusted proxy every connection comes from it: no per-address cap.
    per_client = 0 if server.trust_forwarded_for else server.max_connections_per_client
    log.info(
        "accepting up to %d connections, %s per client address",
        max_connections,
        per_client or "any number",
    )
    limits = ServerLimits(
        header_timeout=server.header_timeout,
        idle_timeout=server.idle_timeout,
        send_timeout=server.send_timeout,
        min_send_rate=server.min_send_rate,
        max_connections=max_connections,
        max_connections_per_client=per_client,
        ipv6_prefix=ipv6_prefix,
    )
    others = [] if admin is None else [_admin_listener(config, admin, limits)]
    if watch and config.metrics.listen:
        # The watching process serves it: one scrape there sees every worker.
        others.append(_metrics_listener(config, metrics, limits))
    serving = serve(
        app,
        host,
        port,
        limits,
        reuse_port=log_level is not None,
        others=others,
        access_log=server.access_log,
    )
    server_log = logging.getLogger("aiohttp.server")
    malformed = MalformedRequestLog()  # while this serves; not left behind for whatever runs next
    server_log.addFilter(malformed)
    try:
        with asyncio.Runner(loop_factory=event_loop_factory(server.event_loop)) as runner:
            runner.run(serving)
    except ListenError as error:  # another address of this process: named in the message
        if log_level is None:
            raise errors.ConfigError(str(error.strerror)) from None
        log.error("%s", error.strerror)
        raise SystemExit(2) from None
    except OSError as error:
        # Only the listening socket's errors (taken, not this host's, privileged): a bad
        # [server] listen, said in one line; any other OSError keeps its traceback.
        if not isinstance(error, socket.gaierror) and error.errno not in _BIND_ERRNOS:
            raise
        message = f"[server] listen {server.listen}: {error.strerror or error}"
        if log_level is None:
            raise errors.ConfigError(message) from None
        log.error("%s", message)  # a worker: its supervisor stops the others
        raise SystemExit(2) from None
    finally:
        server_log.removeFilter(malformed)


def _admin_password(config: Config) -> str:
    password_file = config.admin.password_file
    assert password_file is not None  # AdminConfig requires it with listen
    return read_password_file(password_file)


def _admin_listener(config: Config, admin: AdminSlot, limits: ServerLimits) -> Listener:
    """The admin dashboard on ``[admin] listen``, with the proxy's timeouts and a small
    connection cap of its own (an operator's browser needs a few)."""
    host, port = listen_address(config.admin.listen)  # load_config checked it
    log.info("admin dashboard on http://%s/", config.admin.listen)
    return Listener(
        "[admin] listen " + config.admin.listen,
        build_admin(admin, _admin_password(config)),
        host,
        port,
        dataclasses.replace(limits, max_connections=64, max_connections_per_client=16),
    )


def _metrics_listener(config: Config, metrics: MetricsSlot, limits: ServerLimits) -> Listener:
    """``/metrics`` on ``[metrics] listen``, with the proxy's timeouts and a small connection
    cap of its own (a Prometheus server or two)."""
    host, port = listen_address(config.metrics.listen)  # load_config checked it
    log.info("metrics on http://%s/metrics", config.metrics.listen)
    return Listener(
        "[metrics] listen " + config.metrics.listen,
        metrics_app(metrics),
        host,
        port,
        dataclasses.replace(limits, max_connections=64, max_connections_per_client=16),
    )


def _metrics_process_dead(pid: int) -> None:
    """Drop an exited worker's live gauges (prometheus_client's ``mark_process_dead``)."""
    from prometheus_client.multiprocess import mark_process_dead  # only with [metrics]

    mark_process_dead(pid)  # type: ignore[no-untyped-call]


def die_with_parent(supervisor: int) -> None:
    """A worker whose supervisor is killed must not go on holding the port.

    The supervisor may already be gone by now (killed while this worker was importing):
    then this process has another parent, and nothing would ever send it the signal.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:
        raise SystemExit(0)


def _serve_workers(config: Config, host: str, port: int) -> int:
    """Run ``workers`` proxy processes on one port (SO_REUSEPORT); the first one also runs
    the settlement watcher. Any worker's exit stops them all.

    With ``[metrics]`` on, the workers keep their metrics in files of a private directory
    (prometheus_client's multiprocess mode), made here before they start and removed at exit.
    """
    if not config.metrics.enabled:
        return _run_workers(config, host, port)
    directory = tempfile.mkdtemp(prefix="l402-metrics-", dir=_memory_directory())
    # Inherited by the spawned workers, which import prometheus_client only after it is set.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    try:
        return _run_workers(config, host, port)
    finally:
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
        shutil.rmtree(directory, ignore_errors=True)


def _memory_directory() -> str | None:
    """Where the metrics files go: ``$TMPDIR`` if set, else a RAM file system if there is
    one (every request writes to them, through mmap: on a disk the kernel keeps writing the
    pages back), else the default temporary directory."""
    shm = "/dev/shm"  # noqa: S108 - a private mkdtemp directory is made inside it
    if "TMPDIR" in os.environ or not os.access(shm, os.W_OK | os.X_OK):
        return None
    return shm


def _run_workers(config: Config, host: str, port: int) -> int:
    context = multiprocessing.get_context("spawn")  # no gRPC state crosses a fork
    level = logging.getLogger().getEffectiveLevel()
    log_format = current_log_format()
    workers = [
        context.Process(
            target=_serve_worker,
            args=(config, host, port),
            kwargs={
                "watch": index == 0,
                "log_level": level,
                "supervisor": os.getpid(),
                "log_format": log_format,
            },
            name=f"l402-gateway-worker-{index}",
        )
        for index in range(config.server.workers)
    ]
    stopping = False
    signalled: set[int] = set()

    def stop(_signal: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for index, worker in enumerate(workers):
            # Once each: a second SIGTERM can land while the worker's event loop is closing,
            # after its wakeup pipe is gone, and Python then prints a stray error line.
            if worker.is_alive() and index not in signalled:
                signalled.add(index)
                worker.terminate()  # SIGTERM: a graceful stop

    for worker in workers:
        worker.start()
    # Only now: a signal during the start-up above ends this process the default way, and
    # the workers started so far follow it (they die with their parent).
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    multiprocessing.connection.wait([worker.sentinel for worker in workers])
    failed = [] if stopping else [w for w in workers if w.exitcode not in (None, 0)]
    stop(signal.SIGTERM, None)
    for worker in workers:
        worker.join()
        if config.metrics.enabled and worker.pid is not None:
            _metrics_process_dead(worker.pid)
    for worker in failed:
        log.error("%s exited with %s; stopped the others", worker.name, worker.exitcode)
    if any(worker.exitcode == 2 for worker in failed):
        return 2  # a worker could not listen: [server] listen is wrong for this host
    return 1 if failed else 0
