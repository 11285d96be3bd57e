"""The gRPC channel to LND keeps trying to reach a node that is down, at least every few
seconds, so the gateway is back soon after the node is."""

from __future__ import annotations

import asyncio
import itertools

import grpc
import pytest

from gateway.lnd.connection import LndConnection, LndSettings
from gateway.lnd.protos import lightning_pb2, lightning_pb2_grpc

# gRPC's own reconnect backoff grows by 1.6x (+-20% jitter) towards 120 s: within this long,
# an uncapped channel waits over 3 s between two attempts.
OUTAGE = 12.0
# The cap, 2 s, plus its jitter and the pace of the callers that ask for a connection.
MAX_GAP = 3.0


async def test_a_node_that_is_down_is_retried_every_few_seconds() -> None:
    attempts: list[float] = []
    loop = asyncio.get_running_loop()

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        attempts.append(loop.time())  # a node that accepts and hangs up: no TLS, no gRPC
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    connection = LndConnection(LndSettings(f"127.0.0.1:{port}", b"", b"macaroon", timeout=2))
    stub = lightning_pb2_grpc.LightningStub(connection.channel)
    try:
        started = loop.time()
        while loop.time() - started < OUTAGE:  # callers keep trying, as the gateway's do
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await stub.GetInfo(lightning_pb2.GetInfoRequest(), timeout=2)
            assert failure.value.code() is grpc.StatusCode.UNAVAILABLE
            await asyncio.sleep(0.2)
    finally:
        await connection.close()
        server.close()
        await server.wait_closed()
    gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    assert len(attempts) >= OUTAGE / MAX_GAP, attempts
    assert max(gaps) <= MAX_GAP, gaps
