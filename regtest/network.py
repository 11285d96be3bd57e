"""A local Lightning network: btcd on regtest and three LND nodes, funded and connected.

``alice`` is the merchant's node (behind the gateway), ``bob`` a payer's wallet, ``carol`` a
routing node, with public channels bob -> carol -> alice and bob -> alice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import aiohttp
import grpc

from gateway.lnd.connection import LndSettings
from gateway.lnd.protos import lightning_pb2
from regtest.build import bin_dir, ensure_binaries, log
from regtest.chain import (
    COINBASE_MATURITY,
    RPC_PASSWORD,
    RPC_USER,
    SEGWIT_HEIGHT,
    BtcdRpc,
    mature_coinbases,
    spend_to,
    start_btcd,
)
from regtest.lnd import LndAdmin, lnd_args
from regtest.processes import ManagedProcess, free_ports, stop_pid, until

NODE_NAMES = ("alice", "bob", "carol")
# (opener, peer): the opener funds the channel, so it can pay through it.
CHANNELS = (("bob", "carol"), ("carol", "alice"), ("bob", "alice"))
CHANNEL_SAT = 10_000_000
# Each node gets one confirmed output per channel it opens, plus one spare.
FUNDING_OUTPUT_SAT = 100_000_000
FUNDING_OUTPUTS = 3
STATE_FILE = "network.json"
START_TIMEOUT = 90.0
# How long the nodes get to report a block before another is mined (see _until_nodes_follow).
BLOCK_RENOTIFY_INTERVAL = 5.0


@dataclass(frozen=True, slots=True)
class Node:
    """How to reach one LND node of the network."""

    name: str
    rpc_host: str
    p2p_host: str
    lnddir: Path
    pubkey: str
    log: Path
    pid: int
    # LND's REST address (same TLS cert, macaroon hex in Grpc-Metadata-macaroon), for
    # clients that speak only REST; "" in a state file saved before nodes served REST.
    rest_host: str = ""

    @property
    def tls_cert(self) -> Path:
        return self.lnddir / "tls.cert"

    def macaroon(self, kind: str = "admin") -> Path:
        """Path of ``admin``, ``invoice``, ``readonly`` (...) macaroon."""
        return self.lnddir / "data" / "chain" / "bitcoin" / "regtest" / f"{kind}.macaroon"

    def settings(self, macaroon: str = "admin", timeout: float = 30.0) -> LndSettings:
        return LndSettings.from_files(
            self.rpc_host, self.tls_cert, macaroon_path=self.macaroon(macaroon), timeout=timeout
        )

    def lncli(self) -> str:
        lncli = bin_dir() / "lncli"
        return f"{lncli} --network=regtest --lnddir={self.lnddir} --rpcserver={self.rpc_host}"


class Network:
    """A running network. Use :func:`running_network` to get one."""

    def __init__(
        self,
        workdir: Path,
        btcd_rpc_host: str,
        nodes: dict[str, Node],
        btcd_pid: int,
        processes: list[ManagedProcess] | None = None,
    ) -> None:
        self.workdir = workdir
        # Our own children when started here; None when loaded from another process's state.
        self._processes = processes
        self.btcd_rpc_host = btcd_rpc_host
        self.btcd_pid = btcd_pid
        self.nodes = nodes
        self._blocks: list[str] = []  # btcd's chain while it is stopped
        self.rpc = BtcdRpc(
            f"https://{btcd_rpc_host}", RPC_USER, RPC_PASSWORD, workdir / "btcd" / "rpc.cert"
        )

    @property
    def alice(self) -> Node:
        return self.nodes["alice"]

    @property
    def bob(self) -> Node:
        return self.nodes["bob"]

    @property
    def carol(self) -> Node:
        return self.nodes["carol"]

    async def mine(self, blocks: int) -> list[str]:
        """Mine ``blocks`` blocks to the miner's address; returns their hashes."""
        hashes: list[str] = await self.rpc.call("generate", blocks)
        return hashes

    async def block_height(self) -> int:
        height: int = await self.rpc.call("getblockcount")
        return height

    async def btcd_answers(self) -> int | None:
        """The block height, or None while btcd's RPC does not answer."""
        try:
            return await self.block_height()
        except (OSError, ValueError, RuntimeError, aiohttp.ClientError):
            return None

    def _managed(self, name: str) -> tuple[list[ManagedProcess], int]:
        if self._processes is None:
            raise RuntimeError("only the process that started the network can restart it")
        names = [process.name for process in self._processes]
        return self._processes, names.index(name)

    async def stop_process(self, name: str, *, crash: bool = False) -> None:
        """Stop ``btcd`` or an LND node: cleanly (SIGTERM), or as a crash (SIGKILL)."""
        processes, index = self._managed(name)
        if name == "btcd":
            # btcd deletes its regtest chain at every start: keep the blocks to submit again.
            # The RPC client keeps only a few of these calls in flight: btcd refuses more.
            heights = range(1, await self.block_height() + 1)
            hashes = await asyncio.gather(*(self.rpc.call("getblockhash", h) for h in heights))
            self._blocks = await asyncio.gather(*(self.rpc.call("getblock", h, 0) for h in hashes))
        if crash:
            await processes[index].kill()
        else:
            await processes[index].stop()

    async def start_process(self, name: str) -> None:
        """Start a stopped ``btcd`` or LND node again with the same arguments and wait for it:
        btcd until it has its chain back and every node follows it again (one new block
        shows that), a node until it is active, synced and its channels are up. Updates the
        pids and the state file."""
        processes, index = self._managed(name)
        if processes[index].exited() is None:
            raise RuntimeError(f"{name} is still running")
        process = processes[index] = processes[index].respawn()
        if name == "btcd":
            self.btcd_pid = process.pid
            await until("btcd's RPC", self.btcd_answers, 30, [process])
            for block in self._blocks:
                await self.rpc.call("submitblock", block)
            await self._until_nodes_follow(process)
        else:
            self.nodes[name] = replace(self.nodes[name], pid=process.pid)
            admin = LndAdmin(name, self.nodes[name].settings())
            try:
                peers = [
                    self.nodes[n] for pair in CHANNELS if name in pair for n in pair if n != name
                ]
                await _until_active(admin, process, peers)
            finally:
                await admin.connection.close()
        self.save()

    async def _until_nodes_follow(self, btcd: ManagedProcess) -> None:
        # A node reconnects to btcd on its own schedule (5 s after losing it, then 10 s later,
        # ...) and meanwhile sees the chain rebuilt from genesis: a payment routed then gets a
        # CLTV from a height far below the tip and the payee refuses it. Only a node following
        # btcd again reports a block mined after the rebuild, and LND's chain notifier learns
        # of blocks it missed only when the next one arrives: a node that reconnects after a
        # block waits for another, so one is mined while any node lags behind.
        admins = [LndAdmin(node.name, node.settings()) for node in self.nodes.values()]
        loop = asyncio.get_running_loop()
        mined_at = -BLOCK_RENOTIFY_INTERVAL

        async def all_at_tip() -> bool | None:
            nonlocal mined_at
            if loop.time() - mined_at >= BLOCK_RENOTIFY_INTERVAL:
                await self.mine(1)
                mined_at = loop.time()
            tip = await self.block_height()
            for admin in admins:
                info = await admin.synced_info()
                if info is None or info.block_height != tip:
                    return None
            return True

        try:
            await until("the nodes to follow btcd", all_at_tip, START_TIMEOUT, [btcd])
        finally:
            for admin in admins:
                await admin.connection.close()

    def describe(self) -> str:
        lines = [
            f"regtest network in {self.workdir}",
            f"  btcd  rpc {self.btcd_rpc_host} (user {RPC_USER}, password {RPC_PASSWORD}, "
            f"cert {self.workdir / 'btcd' / 'rpc.cert'})",
        ]
        for node in self.nodes.values():
            lines += [
                f"  {node.name:<5} {node.pubkey}@{node.p2p_host}",
                f"        grpc {node.rpc_host}  rest {node.rest_host or '-'}  log {node.log}",
                f"        {node.lncli()} getinfo",
            ]
        return "\n".join(lines)

    def save(self) -> Path:
        path = self.workdir / STATE_FILE
        state = {
            "btcd_rpc_host": self.btcd_rpc_host,
            "btcd_pid": self.btcd_pid,
            "nodes": {
                name: {**asdict(node), "lnddir": str(node.lnddir), "log": str(node.log)}
                for name, node in self.nodes.items()
            },
        }
        path.write_text(json.dumps(state, indent=2))
        return path

    @classmethod
    def load(cls, workdir: Path) -> Network:
        state = json.loads((workdir / STATE_FILE).read_text())
        nodes = {
            name: Node(**{**fields, "lnddir": Path(fields["lnddir"]), "log": Path(fields["log"])})
            for name, fields in state["nodes"].items()
        }
        return cls(workdir, state["btcd_rpc_host"], nodes, state["btcd_pid"])

    async def stop(self) -> None:
        """Stop every process (LND first, then btcd) and forget the state file."""
        if self._processes is not None:
            lnds, btcd = self._processes[1:], self._processes[0]
            await asyncio.gather(*(process.stop() for process in lnds))
            await btcd.stop()
        else:
            await asyncio.gather(*(stop_pid(node.pid, 30.0) for node in self.nodes.values()))
            await stop_pid(self.btcd_pid, 15.0)
        await self.rpc.close()
        (self.workdir / STATE_FILE).unlink(missing_ok=True)


async def _until_active(
    admin: LndAdmin, process: ManagedProcess, channel_peers: Sequence[Node] = ()
) -> lightning_pb2.GetInfoResponse:
    """Wait until the node is SERVER_ACTIVE, synced to the chain and, reconnected to its
    ``channel_peers``, has its channel with each of them active again."""
    name = admin.name
    await until(f"{name} to become SERVER_ACTIVE", admin.server_active, START_TIMEOUT, [process])
    info = await until(f"{name} to sync to the chain", admin.synced_info, START_TIMEOUT, [process])
    if channel_peers:
        # Nodes announce no address here, and a peer's reconnection backoff grows with
        # every restart: reconnect from this side.
        for peer in channel_peers:
            await admin.connect(peer.pubkey, peer.p2p_host)

        async def active() -> bool | None:
            return await admin.channels_active(len(channel_peers))

        await until(f"{name}'s channels to become active", active, START_TIMEOUT, [process])
    return info


async def _fund(network: Network, admins: dict[str, LndAdmin]) -> None:
    # Spendable coinbases: one per node, from heights that are mature by now.
    coins = await mature_coinbases(network.rpc, range(1, 1 + len(admins)))
    request = lightning_pb2.NewAddressRequest(type=lightning_pb2.WITNESS_PUBKEY_HASH)
    for coin, admin in zip(coins, admins.values(), strict=True):
        payouts = []
        for _ in range(FUNDING_OUTPUTS):
            reply = await admin.call(admin.lightning.NewAddress, request)
            payouts.append((reply.address, FUNDING_OUTPUT_SAT))
        await network.rpc.call("sendrawtransaction", spend_to(coin, payouts))
    await network.mine(1)
    expected = FUNDING_OUTPUT_SAT * FUNDING_OUTPUTS

    for admin in admins.values():

        async def funded(admin: LndAdmin = admin) -> bool | None:
            reply = await admin.call(
                admin.lightning.WalletBalance, lightning_pb2.WalletBalanceRequest()
            )
            return True if reply.confirmed_balance >= expected else None

        await until(f"{admin.name}'s wallet to see its funds", funded, 60, [])


async def _open_channels(network: Network, admins: dict[str, LndAdmin]) -> None:
    for opener, peer in CHANNELS:
        target = network.nodes[peer]
        await admins[opener].connect(target.pubkey, target.p2p_host)
        await admins[opener].call(
            admins[opener].lightning.OpenChannelSync,
            lightning_pb2.OpenChannelRequest(
                node_pubkey=bytes.fromhex(target.pubkey),
                local_funding_amount=CHANNEL_SAT,
                sat_per_vbyte=2,
            ),
        )
    # Six confirmations make the channels announceable, so payers can route through them.
    await network.mine(6)
    expected = {name: sum(name in pair for pair in CHANNELS) for name in admins}
    for name, admin in admins.items():

        async def active(admin: LndAdmin = admin, count: int = expected[name]) -> bool | None:
            return await admin.channels_active(count)

        await until(f"{name}'s channels to become active", active, 60, [])


async def _wait_routable(network: Network, admins: dict[str, LndAdmin]) -> None:
    """Wait until every node knows both directions' policies of every channel."""
    carol = admins["carol"]
    reply = await carol.call(carol.lightning.ListChannels, lightning_pb2.ListChannelsRequest())
    alice_pubkey = network.alice.pubkey
    hop_channel = next(c.chan_id for c in reply.channels if c.remote_pubkey == alice_pubkey)

    for admin in admins.values():

        async def known(admin: LndAdmin = admin) -> bool | None:
            try:
                edge = await admin.call(
                    admin.lightning.GetChanInfo, lightning_pb2.ChanInfoRequest(chan_id=hop_channel)
                )
            except grpc.aio.AioRpcError:
                return None
            both = edge.HasField("node1_policy") and edge.HasField("node2_policy")
            return True if both else None

        await until(f"{admin.name} to learn the carol -> alice channel", known, 90, [], 0.5)


async def start_network(workdir: Path, *, detached: bool = False) -> Network:
    """Build (if needed) and start the network in ``workdir``; returns when it is routable."""
    binaries = await asyncio.to_thread(ensure_binaries)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    ports = free_ports(1 + 3 * len(NODE_NAMES))
    btcd_host = f"127.0.0.1:{ports[0]}"
    btcd = start_btcd(binaries, workdir, ports[0], detached=detached)
    processes = [btcd]
    admins: dict[str, LndAdmin] = {}
    network = Network(workdir, btcd_host, {}, btcd.pid, processes)
    try:
        await until("btcd's RPC", network.btcd_answers, 30, [btcd])
        # Past segwit activation, with enough mature coinbases to fund every node.
        height = await network.block_height()
        await network.mine(max(0, SEGWIT_HEIGHT + COINBASE_MATURITY - height))
        log(f"btcd up, chain at {await network.block_height()} ({time.monotonic() - started:.1f}s)")

        triples = zip(ports[1::3], ports[2::3], ports[3::3], strict=True)
        nodes_ports = dict(zip(NODE_NAMES, triples, strict=True))
        lnds: dict[str, ManagedProcess] = {}
        for name, node_ports in nodes_ports.items():
            lnddir = workdir / name
            lnddir.mkdir(exist_ok=True)
            args = lnd_args(
                binaries, name, lnddir, node_ports, btcd_host, workdir / "btcd" / "rpc.cert"
            )
            lnds[name] = ManagedProcess(name, args, workdir / f"{name}.log", detached=detached)
            processes.append(lnds[name])

        async def lnd_ready(name: str) -> Node:
            process = lnds[name]
            rpc, p2p, rest = nodes_ports[name]
            node = Node(
                name,
                f"127.0.0.1:{rpc}",
                f"127.0.0.1:{p2p}",
                workdir / name,
                "",
                process.log,
                process.pid,
                f"127.0.0.1:{rest}",
            )

            async def files_written() -> LndSettings | None:
                """The TLS cert and admin macaroon once LND has written both whole: it
                creates each file before it writes it, so one can be seen empty."""
                try:
                    if b"-----END CERTIFICATE-----" not in node.tls_cert.read_bytes():
                        return None
                    return node.settings()
                except (OSError, ValueError):
                    return None

            settings = await until(
                f"{name}'s TLS cert and macaroon", files_written, START_TIMEOUT, [process]
            )
            admin = LndAdmin(name, settings)
            admins[name] = admin
            info = await _until_active(admin, process)
            return replace(node, pubkey=info.identity_pubkey)

        ready = await asyncio.gather(*(lnd_ready(name) for name in NODE_NAMES))
        network.nodes.update({node.name: node for node in ready})
        log(f"LND nodes active ({time.monotonic() - started:.1f}s)")
        await _fund(network, admins)
        log(f"wallets funded ({time.monotonic() - started:.1f}s)")
        await _open_channels(network, admins)
        log(f"channels active ({time.monotonic() - started:.1f}s)")
        await _wait_routable(network, admins)
        log(f"network routable ({time.monotonic() - started:.1f}s)")
        network.save()
        return network
    except BaseException:
        await network.stop()
        raise
    finally:
        await asyncio.gather(*(admin.connection.close() for admin in admins.values()))


@contextlib.asynccontextmanager
async def running_network(workdir: Path) -> AsyncIterator[Network]:
    """Start the network, yield it, and stop every process on the way out (even on error)."""
    network = await start_network(workdir)
    try:
        yield network
    finally:
        await network.stop()
