"""Running the daemons: compose a LocalNode with the IST server or client, the HTTP API and signals.

Shutdown is cancellation: SIGINT/SIGTERM cancel the daemon's nursery; every ``finally`` runs, the applier
finishes the transaction it is in (worker threads are not abandoned), then the gcache is closed with a
synced preamble and grastate.dat gets the real seqno. A kill -9 instead leaves grastate.dat at -1, and
the next start recovers the position from the state database.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import trio

from istd import exitcodes
from istd.cluster import Cluster
from istd.config import ProviderOptions
from istd.donor import IstServer
from istd.errors import IstError, StateError
from istd.http import DEFAULT_API_PORT, NotWriter, serve_api
from istd.joiner import Joiner
from istd.node import LocalNode
from istd.sst import SstServer
from istd.states import NodeState

log = structlog.get_logger("istd.daemon")

DEFAULT_IST_PORT = 4568  # Galera: base_port (4567) + 1
__all__ = ["DEFAULT_API_PORT", "DEFAULT_IST_PORT", "DaemonConfig", "run"]


class BindError(IstError):
    """A listening address could not be opened."""

    exit_code = exitcodes.USAGE


@dataclass(frozen=True)
class DaemonConfig:
    datadir: Path
    name: str
    options: ProviderOptions
    applier: str = "sqlite"
    listen: tuple[str, int] | None = None
    api: tuple[str, int] | None = None
    bootstrap: bool = False
    donors: tuple[tuple[str, int], ...] = field(default_factory=tuple)
    follow: bool = False
    retries: int = 5
    sst: tuple[str, int] | None = None  # where the donor serves SST; None: it does not
    sst_advertise: tuple[str, int] | None = None  # the SST address joiners are told, if not `sst`
    ist_only: bool = False
    # istd node (cluster mode)
    address: str = "127.0.0.1"
    group_port: int = 4567
    peers: tuple[tuple[str, int], ...] = field(default_factory=tuple)
    donor_names: tuple[str, ...] = field(default_factory=tuple)
    writer: str | None = None


class _Shutdown:
    def __init__(self) -> None:
        self.signum: int | None = None


async def _watch_signals(scope: trio.CancelScope, shutdown: _Shutdown) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            shutdown.signum = signum
            log.info(f"Received shutdown signal {signal.Signals(signum).name}; closing", signal=signum)
            scope.cancel()
            return


class _ApiNode:
    """What the HTTP API sees of a daemon."""

    def __init__(self, node: LocalNode, parts: list[Any], writer: bool, donors: tuple[tuple[str, int], ...],
                 write: Callable[[list[bytes]], Awaitable[tuple[int, int]]] | None = None):
        self.node = node
        self.parts = parts
        self.writer = writer
        self.donors = donors
        self._write = write

    def status(self) -> dict[str, Any]:
        status = self.node.status()
        for part in self.parts:
            status.update(part.status())
        return status

    async def write(self, payloads: list[bytes]) -> tuple[int, int]:
        if self._write is not None:
            return await self._write(payloads)
        if not self.writer:
            where = ", ".join(f"{h}:{p}" for h, p in self.donors) or "the donor"
            raise NotWriter(f"this node ({self.node.name}) is a joiner and takes no writes; "
                            f"send writes to the donor's API ({where} is its IST address)")
        return await self.node.write(payloads)


async def _listen(what: str, start: Callable[..., Awaitable[Any]], nursery: trio.Nursery, *args: Any) -> Any:
    try:
        return await nursery.start(start, *args)
    except OSError as exc:
        host, port = args[-2], args[-1]
        raise BindError(f"cannot listen for {what} on {host or '0.0.0.0'}:{port}: {exc.strerror}; "
                        f"choose another address with --{_FLAGS.get(what, 'api-listen')}") from exc


_FLAGS = {"IST": "listen", "SST": "sst-listen"}


async def run(cfg: DaemonConfig, role: str, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> int:
    """Run a donor or a joiner until it finishes or is stopped; returns the exit code."""
    node = LocalNode(datadir=cfg.datadir, name=cfg.name, options=cfg.options, applier=cfg.applier, role=role)
    node.open(bootstrap=cfg.bootstrap)
    if role == "donor" and not node.position_known:
        node.close()
        raise StateError(
            f"{cfg.datadir} has no usable state ({node.gtid}): start the donor with --bootstrap to begin a new "
            "history (like --wsrep-new-cluster), or give it the data directory of a node of the cluster"
        )
    shutdown = _Shutdown()
    code = exitcodes.OK
    cluster: Cluster | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, nursery.cancel_scope, shutdown)
            nursery.start_soon(node.digest_loop)
            ports: dict[str, int] = {}
            if role == "donor":
                server = IstServer(node)
                api_node = _ApiNode(node, [server], writer=True, donors=())
                node.shift(NodeState.JOINED)
                node.shift(NodeState.SYNCED)
                assert cfg.listen is not None
                ports["ist"] = await _listen("IST", server.serve, nursery, cfg.listen[0], cfg.listen[1])
                if cfg.sst is not None:
                    ports["sst"] = await _serve_sst(node, server, api_node, nursery, cfg.sst)
                    server.sst_advertise = cfg.sst_advertise
                if cfg.api:
                    ports["api"] = await _listen("the API", serve_api, nursery, api_node, *cfg.api)
                task_status.started(ports)
                await trio.sleep_forever()
            if role == "node":
                cluster = await _start_cluster_node(cfg, node, nursery, ports)
                task_status.started(ports)
                await trio.sleep_forever()
            joiner = Joiner(node, list(cfg.donors), follow=cfg.follow, retries=cfg.retries, ist_only=cfg.ist_only)
            api_node = _ApiNode(node, [joiner], writer=False, donors=cfg.donors)
            if cfg.api:
                ports["api"] = await _listen("the API", serve_api, nursery, api_node, *cfg.api)
            task_status.started(ports)
            code = await joiner.run()
            nursery.cancel_scope.cancel()
    finally:
        if cluster is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(3):
                node.safe_to_bootstrap = await cluster.safe_to_bootstrap()
        node.close()
    if shutdown.signum is not None and role == "joiner" and not cfg.follow and node.state is not NodeState.SYNCED:
        return exitcodes.INTERRUPTED if shutdown.signum == signal.SIGINT else exitcodes.TERMINATED
    return code


async def _serve_sst(node: LocalNode, ist: IstServer, api_node: _ApiNode | None, nursery: trio.Nursery,
                     address: tuple[str, int]) -> int:
    sst = SstServer(node)
    port: int = await _listen("SST", sst.serve, nursery, address[0], address[1])
    ist.sst, ist.sst_host = sst, address[0]
    if api_node is not None:
        api_node.parts.append(sst)
    return port


async def _start_cluster_node(cfg: DaemonConfig, node: LocalNode, nursery: trio.Nursery,
                              ports: dict[str, int]) -> Cluster:
    """`istd node`: group port, IST and API on the node's address; the writer serves, the others follow."""
    writer = cfg.bootstrap if cfg.writer is None else cfg.writer == cfg.name
    assert cfg.listen is not None
    ist = IstServer(node)
    api_port = cfg.api[1] if cfg.api else None
    cluster = Cluster(node, ist, address=cfg.address, group_port=cfg.group_port, ist_port=cfg.listen[1],
                      api_port=api_port, peers=list(cfg.peers), donor_names=list(cfg.donor_names), writer=writer,
                      ist_only=cfg.ist_only)
    ports["group"] = await _listen("the group port", cluster.serve, nursery, cfg.address, cfg.group_port)
    ports["ist"] = await _listen("IST", ist.serve, nursery, cfg.listen[0], cfg.listen[1])
    api_node = _ApiNode(node, [ist, cluster], writer=writer, donors=(), write=cluster.write)
    if cfg.sst is not None:
        ports["sst"] = cluster.sst_port = await _serve_sst(node, ist, api_node, nursery, cfg.sst)
    if cfg.api:
        ports["api"] = await _listen("the API", serve_api, nursery, api_node, *cfg.api)
    nursery.start_soon(cluster.gossip)
    if writer:
        if not node.position_known:
            raise StateError(f"{cfg.datadir} has no usable state: the writer needs --bootstrap the first time")
        node.shift(NodeState.JOINED)
        node.shift(NodeState.SYNCED)
        log.info("Synchronized with group, ready for connections", seqno=node.last_committed, writer=True)
    else:
        nursery.start_soon(cluster.follow)
    return cluster
