"""btcd: its command line, its JSON-RPC, and funding LND wallets from the miner's coinbases.

btcd has no wallet: blocks are mined to a P2PKH address of a fixed key, and its mature
coinbase outputs are spent with python-bitcoinlib to the addresses the LND nodes hand out.

btcd serves at most ``--rpcmaxclients`` (default 10) HTTP requests at a time and answers any
more with ``503 Too busy.  Try again later.`` (LND's connections are websockets, counted
apart). :class:`BtcdRpc` therefore keeps at most ``max_concurrent`` calls in flight, retries a
busy answer a few times with a growing pause, and reports an answer that is not JSON with its
HTTP status and the start of its body.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import bitcoin
from bitcoin.core import (
    COIN,
    CMutableTransaction,
    CMutableTxIn,
    CMutableTxOut,
    COutPoint,
    b2x,
    lx,
)
from bitcoin.core.script import SIGHASH_ALL, CScript, SignatureHash
from bitcoin.wallet import CBitcoinAddress, CBitcoinSecret, P2PKHBitcoinAddress

from regtest.build import Binaries
from regtest.processes import ManagedProcess

bitcoin.SelectParams("regtest")

# Deterministic miner key: every network funds its nodes the same way.
MINER_KEY = CBitcoinSecret.from_secret_bytes(hashlib.sha256(b"l402-gateway regtest miner").digest())
MINER_ADDRESS = str(P2PKHBitcoinAddress.from_pubkey(MINER_KEY.pub))
# Segwit activates on btcd's regtest at height 432; coinbase outputs mature after 100 blocks.
SEGWIT_HEIGHT = 432
COINBASE_MATURITY = 100
FEE_SAT = 10_000


RPC_USER = "regtest"
RPC_PASSWORD = "regtest"  # noqa: S105 - loopback-only regtest node
# Below btcd's default --rpcmaxclients (10), leaving room for an lncli or btcctl alongside.
MAX_CONCURRENT_CALLS = 4
BUSY_RETRIES = 8
BUSY_PAUSE = 0.05  # seconds before the first retry; doubled for each next one, up to 1 s
_BODY_SHOWN = 120  # bytes of a non-JSON answer quoted in the error


class RpcError(RuntimeError):
    """btcd answered a JSON-RPC call with an error, or with something else than JSON-RPC."""


class BtcdRpc:
    """A minimal async JSON-RPC client for btcd with basic auth, over TLS trusting ``cert``
    (None: plain HTTP, for a ``http://`` URL)."""

    def __init__(
        self,
        url: str,
        user: str,
        password: str,
        cert: Path | None,
        *,
        max_concurrent: int = MAX_CONCURRENT_CALLS,
        busy_retries: int = BUSY_RETRIES,
        busy_pause: float = BUSY_PAUSE,
    ) -> None:
        self._url = url
        self._headers = {"Authorization": aiohttp.encode_basic_auth(user, password)}
        self._cert = cert
        self._max_concurrent = max_concurrent
        self._slots = asyncio.Semaphore(max_concurrent)
        self._busy_retries = busy_retries
        self._busy_pause = busy_pause
        self._session: aiohttp.ClientSession | None = None
        self._next_id = 0

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            # btcd writes its certificate at start-up: read it on first use, not before.
            context = ssl.create_default_context(cafile=str(self._cert)) if self._cert else None
            connector = aiohttp.TCPConnector(ssl=context or True, limit=self._max_concurrent)
            self._session = aiohttp.ClientSession(headers=self._headers, connector=connector)
        return self._session

    async def call(self, method: str, *params: Any) -> Any:
        async with self._slots:
            for retry in range(self._busy_retries + 1):
                if retry:
                    await asyncio.sleep(min(self._busy_pause * 2 ** (retry - 1), 1.0))
                status, data = await self._post(method, params)
                if status != 503:  # "503 Too busy.  Try again later."
                    break
            else:
                raise RpcError(
                    f"btcd {method}: still busy (HTTP 503) after {self._busy_retries + 1} tries: "
                    f"{data[:_BODY_SHOWN]!r}"
                )
        try:
            reply = json.loads(data)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise RpcError(
                f"btcd {method}: HTTP {status} with a body that is not a JSON-RPC reply: "
                f"{data[:_BODY_SHOWN]!r}"
            )
        if reply.get("error"):
            raise RpcError(f"btcd {method}: {reply['error']}")
        return reply["result"]

    async def _post(self, method: str, params: tuple[Any, ...]) -> tuple[int, bytes]:
        self._next_id += 1
        body = {"jsonrpc": "1.0", "id": self._next_id, "method": method, "params": list(params)}
        async with self._open().post(
            self._url, json=body, timeout=aiohttp.ClientTimeout(total=120)
        ) as response:
            return response.status, await response.read()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def start_btcd(binaries: Binaries, workdir: Path, port: int, *, detached: bool) -> ManagedProcess:
    """Start btcd on regtest in ``workdir/btcd``, its RPC on loopback ``port``."""
    home = workdir / "btcd"
    home.mkdir(parents=True, exist_ok=True)
    config = home / "btcd.conf"
    config.touch()
    args = [
        str(binaries.btcd),
        f"--configfile={config}",
        "--regtest",
        f"--datadir={home / 'data'}",
        f"--logdir={home / 'logs'}",
        f"--rpclisten=127.0.0.1:{port}",
        f"--rpcuser={RPC_USER}",
        f"--rpcpass={RPC_PASSWORD}",
        f"--rpccert={home / 'rpc.cert'}",
        f"--rpckey={home / 'rpc.key'}",
        f"--miningaddr={MINER_ADDRESS}",
        "--txindex",
        "--nolisten",
    ]
    return ManagedProcess("btcd", args, workdir / "btcd.log", detached=detached)


@dataclass(frozen=True, slots=True)
class Coin:
    """A spendable output paying the miner."""

    txid: str
    vout: int
    value_sat: int


async def mature_coinbases(rpc: BtcdRpc, heights: range) -> list[Coin]:
    """The coinbase outputs of the given block heights (all paying the miner)."""
    coins = []
    for height in heights:
        block_hash = await rpc.call("getblockhash", height)
        block = await rpc.call("getblock", block_hash, 2)
        coinbase = block["rawtx"][0]
        output = coinbase["vout"][0]
        coins.append(Coin(coinbase["txid"], 0, round(output["value"] * COIN)))
    return coins


def spend_to(coin: Coin, payouts: list[tuple[str, int]]) -> str:
    """Sign a transaction spending ``coin`` to (address, sat) pairs, change to the miner.

    Returns the raw transaction as hex, ready for ``sendrawtransaction``.
    """
    total_out = sum(amount for _, amount in payouts)
    change = coin.value_sat - total_out - FEE_SAT
    if change < 0:
        raise ValueError(f"coin of {coin.value_sat} sat cannot pay {total_out} sat plus fee")
    outputs = [
        CMutableTxOut(amount, CBitcoinAddress(address).to_scriptPubKey())
        for address, amount in payouts
    ]
    miner_script = P2PKHBitcoinAddress.from_pubkey(MINER_KEY.pub).to_scriptPubKey()
    if change > 0:
        outputs.append(CMutableTxOut(change, miner_script))
    tx_in = CMutableTxIn(COutPoint(lx(coin.txid), coin.vout))
    tx = CMutableTransaction([tx_in], outputs)
    sighash = SignatureHash(miner_script, tx, 0, SIGHASH_ALL)
    signature = MINER_KEY.sign(sighash) + bytes([SIGHASH_ALL])
    tx_in.scriptSig = CScript([signature, MINER_KEY.pub])
    raw: str = b2x(tx.serialize())
    return raw
