"""btcd's JSON-RPC, and funding LND wallets from the miner's coinbase outputs.

btcd has no wallet: blocks are mined to a P2PKH address of a fixed key, and its mature
coinbase outputs are spent with python-bitcoinlib to the addresses the LND nodes hand out.
"""

from __future__ import annotations

import hashlib
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

bitcoin.SelectParams("regtest")

# Deterministic miner key: every network funds its nodes the same way.
MINER_KEY = CBitcoinSecret.from_secret_bytes(hashlib.sha256(b"l402-gateway regtest miner").digest())
MINER_ADDRESS = str(P2PKHBitcoinAddress.from_pubkey(MINER_KEY.pub))
# Segwit activates on btcd's regtest at height 432; coinbase outputs mature after 100 blocks.
SEGWIT_HEIGHT = 432
COINBASE_MATURITY = 100
FEE_SAT = 10_000


class RpcError(RuntimeError):
    """btcd answered a JSON-RPC call with an error."""


class BtcdRpc:
    """A minimal async JSON-RPC client for btcd over TLS with basic auth."""

    def __init__(self, url: str, user: str, password: str, cert: Path) -> None:
        self._url = url
        self._headers = {"Authorization": aiohttp.encode_basic_auth(user, password)}
        self._cert = cert
        self._session: aiohttp.ClientSession | None = None
        self._next_id = 0

    async def call(self, method: str, *params: Any) -> Any:
        if self._session is None:
            # btcd writes its certificate at start-up: read it on first use, not before.
            context = ssl.create_default_context(cafile=str(self._cert))
            self._session = aiohttp.ClientSession(
                headers=self._headers, connector=aiohttp.TCPConnector(ssl=context)
            )
        self._next_id += 1
        body = {"jsonrpc": "1.0", "id": self._next_id, "method": method, "params": list(params)}
        async with self._session.post(
            self._url, json=body, timeout=aiohttp.ClientTimeout(total=120)
        ) as response:
            reply = await response.json(content_type=None)
        if reply.get("error"):
            raise RpcError(f"btcd {method}: {reply['error']}")
        return reply["result"]

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


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
