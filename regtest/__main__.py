"""``python -m regtest build|up|down|status|mine N``: a local Lightning network for developers.

``up`` starts btcd and the LND nodes in the background and returns; they keep running until
``down``. The network lives in ``--dir`` (default ``$L402_REGTEST_DIR`` or ``./.regtest``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
from pathlib import Path

from gateway import errors
from gateway.lnd.client import LndClient
from regtest.build import LND_VERSION, BuildError, ensure_binaries
from regtest.network import STATE_FILE, Network, start_network
from regtest.processes import NodeStartError


def _default_dir() -> Path:
    return Path(os.environ.get("L402_REGTEST_DIR", ".regtest")).resolve()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _running(workdir: Path) -> Network | None:
    if not (workdir / STATE_FILE).is_file():
        return None
    network = Network.load(workdir)
    return network if _pid_alive(network.btcd_pid) else None


async def _up(workdir: Path) -> int:
    running = _running(workdir)
    if running is not None:
        print(f"already running\n{running.describe()}")
        return 0
    network = await start_network(workdir, detached=True)
    await network.rpc.close()
    print(network.describe())
    print(f"\nstop it with: {stop_hint(workdir)}")
    return 0


async def _down(workdir: Path) -> int:
    if not (workdir / STATE_FILE).is_file():
        print(f"no network recorded in {workdir}")
        return 0
    network = Network.load(workdir)
    await network.stop()
    print(f"stopped the network in {workdir} (logs kept there)")
    return 0


async def _status(workdir: Path) -> int:
    network = _running(workdir)
    if network is None:
        print(f"no network running in {workdir}")
        return 1
    try:
        print(f"btcd   pid {network.btcd_pid}, chain height {await network.block_height()}")
        for node in network.nodes.values():
            if not _pid_alive(node.pid):
                print(f"{node.name:<6} pid {node.pid} NOT RUNNING (log {node.log})")
                continue
            try:
                async with LndClient(node.settings(timeout=5)) as client:
                    info = await client.get_info()
            except errors.BackendError as error:
                print(f"{node.name:<6} pid {node.pid} not answering: {error}")
                continue
            print(
                f"{node.name:<6} pid {node.pid}, height {info.block_height}, "
                f"synced {info.synced_to_chain}, active channels {info.num_active_channels}"
            )
        print()
        print(network.describe())
    finally:
        await network.rpc.close()
    return 0


async def _mine(workdir: Path, blocks: int) -> int:
    network = _running(workdir)
    if network is None:
        print(f"no network running in {workdir}")
        return 1
    try:
        await network.mine(blocks)
        print(f"mined {blocks} blocks; height {await network.block_height()}")
    finally:
        await network.rpc.close()
    return 0


def stop_hint(workdir: Path) -> str:
    """The command that stops the network in ``workdir`` (``up`` prints it)."""
    return f"python -m regtest down --dir {shlex.quote(str(workdir))}"


def parser() -> argparse.ArgumentParser:
    """``--dir`` is accepted before or after the command (after it wins)."""
    top = argparse.ArgumentParser(prog="python -m regtest", description=__doc__)
    top.add_argument("--dir", type=Path, default=None, help="network directory")
    commands = top.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build (or find cached) LND and btcd binaries")
    up = commands.add_parser("up", help="start btcd and alice, bob, carol with channels")
    down = commands.add_parser("down", help="stop every process of the network")
    status = commands.add_parser("status", help="show processes, heights and channels")
    mine = commands.add_parser("mine", help="mine blocks")
    mine.add_argument("blocks", type=int)
    for command in (build, up, down, status, mine):
        # SUPPRESS: not given here, the value from before the command stays.
        command.add_argument(
            "--dir", type=Path, default=argparse.SUPPRESS, help="network directory"
        )
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    workdir = (args.dir or _default_dir()).resolve()
    try:
        if args.command == "build":
            binaries = ensure_binaries()
            print(f"LND {LND_VERSION}, lncli, btcd and btcctl in {binaries.lnd.parent}")
            return 0
        if args.command == "up":
            return asyncio.run(_up(workdir))
        if args.command == "down":
            return asyncio.run(_down(workdir))
        if args.command == "status":
            return asyncio.run(_status(workdir))
        return asyncio.run(_mine(workdir, args.blocks))
    except (BuildError, NodeStartError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
