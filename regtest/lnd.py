"""An LND node as the regtest harness drives it: its command line, and the admin RPCs the
harness calls to wait for it, fund it, connect it and open its channels."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from gateway.lnd.connection import LndConnection, LndSettings
from gateway.lnd.protos import (
    lightning_pb2,
    lightning_pb2_grpc,
    stateservice_pb2,
    stateservice_pb2_grpc,
)
from regtest.build import Binaries
from regtest.chain import RPC_PASSWORD, RPC_USER

__all__ = ["LndAdmin", "lnd_args"]


def lnd_args(
    binaries: Binaries,
    name: str,
    lnddir: Path,
    ports: tuple[int, int, int],
    btcd_host: str,
    cert: Path,
) -> list[str]:
    rpc, p2p, rest = ports
    return [
        str(binaries.lnd),
        f"--lnddir={lnddir}",
        f"--alias={name}",
        "--bitcoin.regtest",
        "--bitcoin.node=btcd",
        f"--btcd.rpchost={btcd_host}",
        f"--btcd.rpcuser={RPC_USER}",
        f"--btcd.rpcpass={RPC_PASSWORD}",
        f"--btcd.rpccert={cert}",
        "--noseedbackup",
        "--nobootstrap",
        f"--rpclisten=127.0.0.1:{rpc}",
        f"--restlisten=127.0.0.1:{rest}",
        f"--listen=127.0.0.1:{p2p}",
        "--bitcoin.defaultchanconfs=1",
        "--bitcoin.defaultremotedelay=4",
        "--trickledelay=50",
        "--accept-keysend",
        "--maxpendingchannels=10",
        "--debuglevel=info",
    ]


class LndAdmin:
    """The wallet and channel RPCs the harness needs, over the node's admin macaroon."""

    def __init__(self, node_name: str, settings: LndSettings) -> None:
        self.name = node_name
        self.connection = LndConnection(settings)
        self.lightning = lightning_pb2_grpc.LightningStub(self.connection.channel)
        self.state = stateservice_pb2_grpc.StateStub(self.connection.channel)

    async def call(self, method: Callable[..., Any], request: object) -> Any:
        return await method(request, metadata=self.connection.metadata, timeout=30)

    async def server_active(self) -> bool | None:
        try:
            reply = await self.state.GetState(stateservice_pb2.GetStateRequest(), timeout=5)
        except grpc.aio.AioRpcError:
            return None
        return True if reply.state == stateservice_pb2.SERVER_ACTIVE else None

    async def synced_info(self) -> lightning_pb2.GetInfoResponse | None:
        try:
            info = await self.call(self.lightning.GetInfo, lightning_pb2.GetInfoRequest())
        except grpc.aio.AioRpcError:
            return None
        return info if info.synced_to_chain else None

    async def connect(self, pubkey: str, host: str) -> None:
        """Connect to the peer ``pubkey`` at ``host`` (already connected: fine)."""
        address = lightning_pb2.LightningAddress(pubkey=pubkey, host=host)
        try:
            await self.call(
                self.lightning.ConnectPeer,
                lightning_pb2.ConnectPeerRequest(addr=address, timeout=20),
            )
        except grpc.aio.AioRpcError as error:
            if "already connected" not in (error.details() or ""):
                raise

    async def channels_active(self, count: int) -> bool | None:
        request = lightning_pb2.ListChannelsRequest(active_only=True)
        try:
            reply = await self.call(self.lightning.ListChannels, request)
        except grpc.aio.AioRpcError:
            return None
        return True if len(reply.channels) >= count else None
