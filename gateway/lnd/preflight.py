"""Start-up checks of the LND connection: the node answers, its TLS certificate is the
configured one, and the macaroon is accepted and grants what the gateway calls.

LND's ``CheckMacaroonPermissions`` itself needs ``macaroon:read``, which the gateway's
least-privilege macaroon (``invoices:read invoices:write``) lacks. Each permission is probed
instead with a call LND authorizes before it looks at the request, and then refuses without
changing anything: ``LookupInvoice`` of a random hash (``invoices:read``) and ``AddInvoice``
of a negative amount (``invoices:write``; LND rejects it before creating an invoice).

``check_payer`` probes the payment macaroon of withdrawals (``[credit] payment_macaroon``)
the same way: ``GetInfo`` (``info:read``: the node's network and key), ``TrackPaymentV2`` of
a random hash (``offchain:read``) and ``SendPaymentV2`` of an empty request
(``offchain:write``; LND refuses it for want of a destination: nothing is paid).
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from gateway.lnd.connection import LndConnection, LndSettings
from gateway.lnd.protos import lightning_pb2, lightning_pb2_grpc, router_pb2, router_pb2_grpc

# How long a probe waits for the node: a start-up check, not a request's deadline.
PROBE_TIMEOUT = 5.0
# What gRPC's transport says when the TLS handshake fails (wrong or swapped certificate,
# a host the certificate does not name, a port that does not speak TLS).
_TLS_FRAGMENTS = ("ssl", "handshake", "certificate", "tsi_", "tls")
_DETAIL_LIMIT = 200
PAYER_PERMISSIONS = "offchain:read offchain:write info:read"


@dataclass(frozen=True, slots=True)
class LndCheck:
    """What the probes found: ``problems`` (one line each) make every priced request fail,
    ``unreachable`` says why the node did not answer (it may come up later)."""

    problems: tuple[str, ...] = ()
    unreachable: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems and self.unreachable is None


def _detail(error: grpc.aio.AioRpcError) -> str:
    detail = " ".join((error.details() or error.code().name).split())
    return detail if len(detail) <= _DETAIL_LIMIT else detail[:_DETAIL_LIMIT] + "..."


def _transport(error: grpc.aio.AioRpcError, host: str) -> LndCheck | None:
    """The check result when ``error`` is the connection's, not an answer of the node."""
    if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return None
    detail = _detail(error)
    if any(fragment in detail.lower() for fragment in _TLS_FRAGMENTS):
        return LndCheck(
            problems=(
                f"[lnd] TLS with {host} failed: tls_cert is not this node's certificate, or "
                f"the certificate does not name {host} ({detail})",
            )
        )
    return LndCheck(unreachable=f"LND at {host} does not answer ({detail})")


def _lacks(error: grpc.aio.AioRpcError, permission: str) -> str | None:
    """The problem when the macaroon is the node's but lacks ``permission``."""
    if "permission denied" not in (error.details() or "").lower():
        return None
    return f"[lnd] the macaroon lacks {permission} (bake one with invoices:read invoices:write)"


def _not_accepted(error: grpc.aio.AioRpcError, host: str) -> str | None:
    """The problem when the node refuses the macaroon as a whole (not its own, garbled)."""
    detail = _detail(error)
    lowered = detail.lower()
    if (
        error.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
        or "macaroon" in lowered
        or "verification failed" in lowered
    ):
        return f"[lnd] LND at {host} does not accept the macaroon ({detail}): is it this node's?"
    return None


async def check_lnd(settings: LndSettings, wait: float = PROBE_TIMEOUT) -> LndCheck:
    """Probe the node ``settings`` names (module docstring), waiting ``wait`` seconds for
    each answer."""
    connection = LndConnection(settings)
    host = settings.host
    try:
        lightning = lightning_pb2_grpc.LightningStub(connection.channel)
        metadata = connection.metadata
        try:
            await lightning.LookupInvoice(
                lightning_pb2.PaymentHash(r_hash=secrets.token_bytes(32)),
                metadata=metadata,
                timeout=wait,
            )
        except grpc.aio.AioRpcError as error:
            transport = _transport(error, host)
            if transport is not None:
                return transport
            lacks = _lacks(error, "invoices:read")
            if lacks is None:
                # A macaroon refused as a whole would fail the next probe the same way.
                refused = _not_accepted(error, host)
                if refused is not None:
                    return LndCheck(problems=(refused,))
            problems = [] if lacks is None else [lacks]
        else:
            problems = []  # no invoice has a random hash; an answer is as good as "not found"
        try:
            await lightning.AddInvoice(
                lightning_pb2.Invoice(value_msat=-1000, memo="l402-gateway permission check"),
                metadata=metadata,
                timeout=wait,
            )
        except grpc.aio.AioRpcError as error:
            transport = _transport(error, host)
            if transport is not None:
                return transport
            problem = _lacks(error, "invoices:write") or _not_accepted(error, host)
            if problem is not None:
                problems.append(problem)
        else:
            problems.append(f"LND at {host} accepted an invoice of a negative amount")
        return LndCheck(problems=tuple(problems))
    finally:
        await connection.close()


async def _first_message(call: Any) -> None:
    """Read a server stream's first message (or its error), then end the call."""
    try:
        async for _ in call:
            return
    finally:
        call.cancel()


async def check_payer(settings: LndSettings, wait: float = PROBE_TIMEOUT) -> LndCheck:
    """Probe the payment macaroon ``settings`` carries (module docstring), waiting ``wait``
    seconds for each answer."""
    connection = LndConnection(settings)
    host = settings.host
    try:
        lightning = lightning_pb2_grpc.LightningStub(connection.channel)
        router = router_pb2_grpc.RouterStub(connection.channel)
        metadata = connection.metadata
        probes: tuple[tuple[str, Callable[[], Awaitable[object]]], ...] = (
            (
                "info:read",
                lambda: lightning.GetInfo(
                    lightning_pb2.GetInfoRequest(), metadata=metadata, timeout=wait
                ),
            ),
            (
                "offchain:read",
                lambda: _first_message(
                    router.TrackPaymentV2(
                        router_pb2.TrackPaymentRequest(payment_hash=secrets.token_bytes(32)),
                        metadata=metadata,
                        timeout=wait,
                    )
                ),
            ),
            (
                "offchain:write",
                lambda: _first_message(
                    router.SendPaymentV2(
                        router_pb2.SendPaymentRequest(), metadata=metadata, timeout=wait
                    )
                ),
            ),
        )
        problems = []
        for permission, probe in probes:
            try:
                await probe()
            except grpc.aio.AioRpcError as error:
                transport = _transport(error, host)
                if transport is not None:
                    return transport
                if "permission denied" in (error.details() or "").lower():
                    problems.append(
                        f"[credit] the payment macaroon lacks {permission} (bake one with "
                        f"{PAYER_PERMISSIONS})"
                    )
                    continue
                if _not_accepted(error, host) is not None:
                    problem = (
                        f"[credit] LND at {host} does not accept the payment macaroon "
                        f"({_detail(error)}): is it this node's?"
                    )
                    return LndCheck(problems=(problem,))
        return LndCheck(problems=tuple(problems))
    finally:
        await connection.close()
