"""LND integration: gRPC connection and client wrappers.

``from gateway.lnd import LndClient, LndSettings`` works; the names load on first use, so
importing ``gateway.lnd.connection`` alone does not pull in the client and its ports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.lnd.client import LndClient
    from gateway.lnd.connection import LndSettings

__all__ = ["LndClient", "LndSettings"]


def __getattr__(name: str) -> Any:
    if name == "LndClient":
        from gateway.lnd.client import LndClient

        return LndClient
    if name == "LndSettings":
        from gateway.lnd.connection import LndSettings

        return LndSettings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
