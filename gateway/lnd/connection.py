"""A gRPC channel to LND: TLS with the node's certificate, the macaroon as call metadata."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import grpc

# LND answers with large messages (graph, channel lists): lift gRPC's 4 MiB default.
_MAX_MESSAGE = 200 * 1024 * 1024
_CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    # LND closes connections that ping more often than every 5 s.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # gRPC's reconnect backoff grows to 120 s: after a long outage the gateway would go on
    # answering 503 for up to two minutes after the node is back. Connecting is cheap.
    ("grpc.max_reconnect_backoff_ms", 2_000),
)


@dataclass(frozen=True, slots=True)
class LndSettings:
    """Where an LND node is and how to authenticate to it."""

    host: str
    tls_cert: bytes = field(repr=False)
    macaroon: bytes = field(repr=False)
    timeout: float = 30.0

    @classmethod
    def from_files(
        cls,
        host: str,
        tls_cert_path: str | os.PathLike[str],
        *,
        macaroon_path: str | os.PathLike[str] | None = None,
        macaroon_hex: str | None = None,
        timeout: float = 30.0,
    ) -> LndSettings:
        """Read the TLS certificate and the macaroon (a file, or its hex) for ``host``."""
        if (macaroon_path is None) == (macaroon_hex is None):
            raise ValueError("give exactly one of macaroon_path and macaroon_hex")
        tls_cert = Path(tls_cert_path).read_bytes()
        if macaroon_path is not None:
            macaroon = Path(macaroon_path).read_bytes()
        else:
            assert macaroon_hex is not None
            try:
                macaroon = bytes.fromhex(macaroon_hex.strip())
            except ValueError:
                raise ValueError("macaroon_hex is not valid hex") from None
        # gRPC takes any bytes here and fails later, per call, with C-core log lines.
        if b"-----BEGIN CERTIFICATE-----" not in tls_cert:
            raise ValueError(f"tls_cert {tls_cert_path} is not a PEM certificate (LND's tls.cert)")
        if macaroon.lstrip().startswith(b"-----BEGIN"):
            raise ValueError("macaroon is a PEM file, not a macaroon (swapped with tls_cert?)")
        if not macaroon:
            raise ValueError("macaroon is empty")
        return cls(host=host, tls_cert=tls_cert, macaroon=macaroon, timeout=timeout)


class LndConnection:
    """One grpc.aio channel plus the metadata every call carries.

    Create it inside a running event loop; grpc.aio binds the channel to that loop.
    """

    def __init__(self, settings: LndSettings) -> None:
        credentials = grpc.ssl_channel_credentials(root_certificates=settings.tls_cert)
        self.channel = grpc.aio.secure_channel(settings.host, credentials, _CHANNEL_OPTIONS)
        # Built once: grpc.aio converts a tuple into this on every call (about 3 µs each).
        self.metadata = grpc.aio.Metadata(("macaroon", settings.macaroon.hex()))
        self.timeout = settings.timeout
        self.host = settings.host

    async def close(self) -> None:
        await self.channel.close(None)
