"""State Snapshot Transfer (SST): a full copy of a donor's applied state, for a joiner IST cannot help.

The donor serves snapshots on its SST port (4444 by default, separate from IST as in Galera)::

    joiner                                   donor (SST port)
      SST_REQUEST (name, auth) ---------->   SQLite online backup of the applied state: a consistent copy
                                             at one position S while writes go on; S+1 is pinned in the
                                             gcache for a while, so the IST that follows finds it
                <-----------------------     SST_BEGIN  uuid:S, total bytes
                <-----------------------     SST_CHUNK ... (1 MiB each)
                <-----------------------     SST_END    sha256 of the whole file
      close()

The joiner writes the snapshot next to its state (``istd-state.sqlite.sst``), never over it, and checks
the sha256, SQLite's ``quick_check`` and the position inside the file against SST_BEGIN. Only then does
``LocalNode.install_state`` switch the state, the position, grastate.dat and the gcache's history to the
donor's; until then the old state, and the position that goes with it, are untouched. Then IST from S+1
on the same donor, as after any restart.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import trio

from istd.applier import STATE_DB_NAME, ApplyError, connect_read_only, read_position
from istd.errors import IstError, ProtocolError, RemoteProtocolError, SeqnoNotInCache
from istd.node import LocalNode
from istd.states import NodeState
from istd.trioutil import PEER_ERRORS, describe, next_event, peer_url, send_error, unwrap
from protocol import Connection as IstConnection
from protocol import (
    ConnectionClosed,
    Ctrl,
    Keepalive,
    Role,
    SstBegin,
    SstChunk,
    SstEnd,
    SstRefused,
    SstRequest,
)

log = structlog.get_logger("istd.sst")

DEFAULT_SST_PORT = 4444  # Galera's SST port (wsrep_sst_receive_address)
SST_FORMAT = "sqlite"
CHUNK_BYTES = 1 << 20
# Progress is logged at most this often (and at the start and the end), like Galera's IST progress.
PROGRESS_INTERVAL_SECONDS = 10.0
# After a snapshot at S the donor keeps S+1 pinned in its gcache this long: the joiner's IST from S+1
# starts within a second of the end of the SST, but a slow install must not turn into a second SST.
IST_HOLD_SECONDS = 120.0
SNAPSHOT_SUFFIX = ".sst"

_conn_ids = itertools.count(1)


class SnapshotRefused(IstError):
    """The donor answered SST_REFUSED."""

    def __init__(self, donor: str, message: str) -> None:
        super().__init__(f"donor {donor} refused SST: {message}")
        self.message = message


class SnapshotInvalid(ProtocolError):
    """The snapshot arrived whole but is not what SST_BEGIN promised (checksum, database, position)."""


# ---------------------------------------------------------------------------------------- progress


@dataclass
class Progress:
    """Bytes done of a snapshot going one way; rate and ETA from the start."""

    peer: str
    total: int = 0
    done: int = 0
    started: float = 0.0
    position: str = ""

    @property
    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.started, 1e-9)

    @property
    def eta(self) -> float:
        rate = self.rate
        return (self.total - self.done) / rate if rate > 0 else 0.0

    @property
    def pct(self) -> float:
        return 100.0 if self.total <= 0 else 100.0 * self.done / self.total

    def line(self, verb: str) -> str:
        return (f"{verb} SST... {self.pct:.1f}% ({_mib(self.done)}/{_mib(self.total)} MiB) complete, "
                f"{self.rate / 1e6:.1f} MB/s, ETA {self.eta:.0f} s")

    def status(self, prefix: str) -> dict[str, Any]:
        return {
            f"{prefix}_status": f"{self.pct:.0f}% complete, {self.done} of {self.total} bytes, "
                                f"{self.rate / 1e6:.1f} MB/s, ETA {self.eta:.0f} s",
            f"{prefix}_bytes_done": self.done,
            f"{prefix}_bytes_total": self.total,
            f"{prefix}_rate_bytes_per_s": round(self.rate),
            f"{prefix}_eta_seconds": round(self.eta, 1),
        }


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}"


class _ProgressLog:
    def __init__(self, progress: Progress, verb: str) -> None:
        self.progress, self.verb = progress, verb
        self.next_at = time.monotonic() + PROGRESS_INTERVAL_SECONDS

    def tick(self) -> None:
        if time.monotonic() >= self.next_at:
            self.log()

    def log(self) -> None:
        p = self.progress
        log.info(p.line(self.verb), done=p.done, total=p.total, rate=round(p.rate), eta=round(p.eta, 1))
        self.next_at = time.monotonic() + PROGRESS_INTERVAL_SECONDS


# ---------------------------------------------------------------------------------------- files


def make_snapshot(db: Path, dest: Path) -> tuple[uuid.UUID, int]:
    """A consistent copy of the state database at one position, while writes go on; returns the position.

    SQLite's online backup in one step runs under one read transaction: with the WAL journal the writer is
    never blocked, and the copy is the database as of one commit, position included."""
    remove_snapshot(dest)
    try:
        src = connect_read_only(db)
        try:
            dst = sqlite3.connect(dest)
            try:
                src.backup(dst)
                # one self-contained file (no -wal beside it); the joiner's applier turns WAL on again
                dst.execute("PRAGMA journal_mode = DELETE")
            finally:
                dst.close()
        finally:
            src.close()
        position = read_position(dest)
    except (sqlite3.Error, ApplyError) as exc:
        remove_snapshot(dest)
        raise IstError(f"cannot take a snapshot of {db}: {exc}") from exc
    if position is None:
        remove_snapshot(dest)
        raise IstError(f"the state {db} has no position: nothing to send")
    return position


def remove_snapshot(path: Path) -> None:
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}-journal")):
        p.unlink(missing_ok=True)


def verify_snapshot(path: Path, begin: SstBegin) -> None:
    """The received file is a sound SQLite database at the position SST_BEGIN announced."""
    try:
        conn = connect_read_only(path)
        try:
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            conn.close()
        position = read_position(path)
    except (sqlite3.Error, ApplyError) as exc:
        raise SnapshotInvalid(f"the snapshot is not a usable state database: {exc}") from exc
    if check != "ok":
        raise SnapshotInvalid(f"the snapshot fails SQLite's quick_check: {check}")
    if position != (begin.cluster_uuid, begin.seqno):
        raise SnapshotInvalid(f"the snapshot is at {position}, the donor announced {begin.cluster_uuid}:{begin.seqno}")


# ---------------------------------------------------------------------------------------- donor


class SstServer:
    """Serves snapshots of a LocalNode's applied state to any number of joiners at once."""

    def __init__(self, node: LocalNode) -> None:
        self.node = node
        self.limits = node.options.limits
        self.port: int | None = None
        self.active: dict[int, Progress] = {}
        self.counters = {"istd_sst_served": 0, "istd_sst_failed": 0, "istd_sst_refused": 0,
                         "istd_sst_sent_bytes": 0}
        self._desyncs = 0
        self._nursery: trio.Nursery | None = None
        self._holds: dict[str, trio.CancelScope] = {}  # joiner name -> the task keeping its next seqno pinned

    def refusal(self) -> str | None:
        """Why this node cannot serve SST now, or None."""
        node = self.node
        if node.applier_name != "sqlite":
            return f"this node keeps no state of its own (--applier {node.applier_name}): it cannot serve SST"
        if not node.position_known:
            return f"this node has no position ({node.gtid}): it cannot serve SST"
        if node.state not in (NodeState.SYNCED, NodeState.DONOR):
            return f"this node is {node.state.comment}, not Synced: its state is not the cluster's"
        return None

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = {**self.counters, "istd_sst_active_transfers": len(self.active)}
        progress = next(iter(self.active.values()), None)  # the oldest transfer, if several run
        if progress is not None:
            status.update(progress.status("istd_sst_send"))
        return status

    async def serve(self, host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host or None)
        self.port = listeners[0].socket.getsockname()[1]
        log.info(f"SST listener open at tcp://{host or '0.0.0.0'}:{self.port}", host=host, port=self.port)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started(self.port)
            await trio.serve_listeners(self.handle, listeners, handler_nursery=nursery)

    async def handle(self, stream: trio.SocketStream) -> None:
        conn_id = next(_conn_ids)
        peer = peer_url(stream)
        tmp = self.node.datadir / f"istd-sst-{conn_id}.sqlite{SNAPSHOT_SUFFIX}"
        with structlog.contextvars.bound_contextvars(role="sst-donor", peer=peer, conn_id=conn_id):
            conn = IstConnection(Role.DONOR, max_frame_bytes=self.limits.max_frame_bytes)
            try:
                await self._serve_one(stream, conn, conn_id, peer, tmp)
            except Exception as exc:  # one bad connection never takes down the listener
                err = unwrap(exc)
                self.counters["istd_sst_failed"] += 1
                if isinstance(err, PEER_ERRORS):
                    log.warning(f"SST to {peer} failed: {describe(err)}", error=describe(err))
                    await send_error(stream, conn, err)
                else:
                    log.exception(f"SST to {peer} failed: internal error", error=repr(err))
            finally:
                self.active.pop(conn_id, None)
                remove_snapshot(tmp)
                await trio.aclose_forcefully(stream)

    async def _serve_one(self, stream: trio.SocketStream, conn: IstConnection, conn_id: int, peer: str,
                         tmp: Path) -> None:
        with trio.fail_after(self.limits.handshake_timeout):
            request = await next_event(stream, conn)
        if not isinstance(request, SstRequest):
            raise RemoteProtocolError(f"expected SST_REQUEST, got {type(request).__name__}")
        who = request.node_name or peer
        reason = self.refusal()
        if reason is not None:
            self.counters["istd_sst_refused"] += 1
            log.warning(f"SST refused to {who}: {reason}", joiner=who)
            await stream.send_all(conn.send(SstRefused(reason)))
            return
        node = self.node
        db = node.datadir / STATE_DB_NAME
        log.info(f"Running: SST donor for {who}: online backup of {db}", joiner=who)
        self._desync()
        try:
            async with trio.open_nursery() as nursery:  # keepalives while the backup runs
                nursery.start_soon(self._keepalives, stream, conn)
                cluster_uuid, seqno = await trio.to_thread.run_sync(make_snapshot, db, tmp)
                nursery.cancel_scope.cancel()
            self._hold(request.node_name, seqno + 1)
            progress = Progress(peer, total=tmp.stat().st_size, started=time.monotonic(),
                                position=f"{cluster_uuid}:{seqno}")
            self.active[conn_id] = progress
            await self._send(stream, conn, SstBegin(cluster_uuid, seqno, progress.total, SST_FORMAT))
            log.info(f"SST snapshot {cluster_uuid}:{seqno} taken: sending {progress.total} bytes to {who}",
                     uuid=str(cluster_uuid), seqno=seqno, bytes=progress.total)
            digest = await self._send_file(stream, conn, tmp, progress)
            await self._send(stream, conn, SstEnd(digest))
            with trio.move_on_after(self.limits.idle_timeout):  # the joiner closes once it has it all
                while not isinstance(await next_event(stream, conn), ConnectionClosed):
                    pass
        finally:
            self._resync()
        elapsed = max(time.monotonic() - progress.started, 1e-9)
        self.counters["istd_sst_served"] += 1
        log.info(f"SST sent: {cluster_uuid}:{seqno}", uuid=str(cluster_uuid), seqno=seqno, joiner=who,
                 bytes=progress.total, seconds=round(elapsed, 3), mb_per_s=round(progress.total / elapsed / 1e6, 1))

    async def _send_file(self, stream: trio.SocketStream, conn: IstConnection, path: Path,
                         progress: Progress) -> bytes:
        sha = hashlib.sha256()
        ticker = _ProgressLog(progress, "Sending")
        async with await trio.open_file(path, "rb") as f:
            while chunk := await f.read(CHUNK_BYTES):
                sha.update(chunk)
                await self._send(stream, conn, SstChunk(chunk))
                progress.done += len(chunk)
                self.counters["istd_sst_sent_bytes"] += len(chunk)
                ticker.tick()
        ticker.log()
        return sha.digest()

    async def _send(self, stream: trio.SocketStream, conn: IstConnection, event: Any) -> None:
        data = conn.send(event)
        with trio.fail_after(self.limits.idle_timeout):
            await stream.send_all(data)

    async def _keepalives(self, stream: trio.SocketStream, conn: IstConnection) -> None:
        while True:
            await trio.sleep(self.limits.keepalive_period)
            await self._send(stream, conn, Keepalive())

    def _desync(self) -> None:
        """Galera's donor: SYNCED -> DONOR/DESYNCED while it serves (a donor is not chosen for another)."""
        self._desyncs += 1
        if self.node.state is NodeState.SYNCED:
            self.node.shift(NodeState.DONOR)

    def _resync(self) -> None:
        self._desyncs -= 1
        if self._desyncs == 0 and self.node.state is NodeState.DONOR:
            self.node.shift(NodeState.JOINED)
            self.node.shift(NodeState.SYNCED)

    def _hold(self, joiner: str, seqno: int) -> None:
        """Pin ``seqno`` (the first the joiner will ask by IST) in the gcache until that joiner's IST request
        (``release``), at most IST_HOLD_SECONDS."""
        gcache = self.node.gcache
        target = min(seqno, gcache.seqno_max)
        if self._nursery is None or target < 0 or target < gcache.seqno_min:
            return
        try:
            gcache.lock(target)
        except SeqnoNotInCache:
            return
        self.release(joiner)
        scope = trio.CancelScope()
        self._holds[joiner] = scope

        async def hold() -> None:
            try:
                with scope:
                    await trio.sleep(IST_HOLD_SECONDS)
            finally:
                if self._holds.get(joiner) is scope:
                    del self._holds[joiner]
                if not gcache.closed:
                    gcache.unlock(target)

        self._nursery.start_soon(hold)

    def release(self, joiner: str) -> None:
        """The joiner's IST has locked what it needs (or it asks for a new snapshot): end its hold."""
        scope = self._holds.pop(joiner, None)
        if scope is not None:
            scope.cancel()


# ---------------------------------------------------------------------------------------- joiner


@dataclass
class Snapshot:
    path: Path
    cluster_uuid: uuid.UUID
    seqno: int
    nbytes: int


class SstClient:
    """Receives one snapshot from a donor's SST port into a file beside the state, and verifies it."""

    def __init__(self, node: LocalNode) -> None:
        self.node = node
        self.limits = node.options.limits
        self.progress: Progress | None = None
        self.counters = {"istd_sst_received": 0, "istd_sst_received_bytes": 0}

    @property
    def path(self) -> Path:
        return self.node.datadir / f"{STATE_DB_NAME}{SNAPSHOT_SUFFIX}"

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = {**self.counters, "istd_sst_receive_status": ""}
        if self.progress is not None and self.node.state is NodeState.JOINING_RECEIVING:
            status.update(self.progress.status("istd_sst_receive"))
        return status

    async def receive(self, host: str, port: int) -> Snapshot:
        """The snapshot, whole and verified; on any failure the partial file is removed and nothing else
        in the data directory has changed."""
        donor = f"{host}:{port}"
        path = self.path
        try:
            with trio.fail_after(self.limits.connect_timeout):
                stream = await trio.open_tcp_stream(host, port)
            with structlog.contextvars.bound_contextvars(role="sst-joiner", peer=f"tcp://{donor}"):
                try:
                    return await self._receive(stream, donor, path)
                finally:
                    await trio.aclose_forcefully(stream)
        except BaseException:
            remove_snapshot(path)
            raise

    async def _receive(self, stream: trio.SocketStream, donor: str, path: Path) -> Snapshot:
        conn = IstConnection(Role.JOINER, max_frame_bytes=self.limits.max_frame_bytes)
        await stream.send_all(conn.send(SstRequest(self.node.name)))
        begin = await self._event(stream, conn, donor)  # keepalives come while the donor backs up
        if isinstance(begin, SstRefused):
            raise SnapshotRefused(donor, begin.message)
        if not isinstance(begin, SstBegin):
            raise RemoteProtocolError(f"expected SST_BEGIN from {donor}, got {type(begin).__name__}")
        if begin.format != SST_FORMAT:
            raise SnapshotInvalid(f"donor {donor} sends a snapshot in format {begin.format!r}; "
                                  f"this node takes {SST_FORMAT!r}")
        progress = Progress(donor, total=begin.total_bytes, started=time.monotonic(),
                            position=f"{begin.cluster_uuid}:{begin.seqno}")
        self.progress = progress
        log.info(f"Receiving SST: {begin.total_bytes} bytes, state {begin.cluster_uuid}:{begin.seqno} from {donor}",
                 bytes=begin.total_bytes, uuid=str(begin.cluster_uuid), seqno=begin.seqno, donor=donor)
        ticker = _ProgressLog(progress, "Receiving")
        sha = hashlib.sha256()
        async with await trio.open_file(path, "wb") as f:
            while True:
                event = await self._event(stream, conn, donor)
                if isinstance(event, SstChunk):
                    sha.update(event.data)
                    await f.write(event.data)
                    progress.done += len(event.data)
                    self.counters["istd_sst_received_bytes"] += len(event.data)
                    ticker.tick()
                elif isinstance(event, SstEnd):
                    await f.flush()
                    await trio.to_thread.run_sync(_fsync, path)
                    break
                else:
                    raise RemoteProtocolError(f"unexpected {type(event).__name__} during the SST from {donor}")
        ticker.log()
        if sha.digest() != event.sha256:
            raise SnapshotInvalid(f"the snapshot from {donor} fails its sha256 check: it was damaged on the way")
        await trio.to_thread.run_sync(verify_snapshot, path, begin)
        self.counters["istd_sst_received"] += 1
        return Snapshot(path, begin.cluster_uuid, begin.seqno, begin.total_bytes)

    async def _event(self, stream: trio.SocketStream, conn: IstConnection, donor: str) -> Any:
        while True:
            try:
                event = await next_event(stream, conn, self.limits.idle_timeout)
            except RemoteProtocolError as exc:
                if conn.peer_closed:  # cut mid-frame: the link failed, the donor did nothing wrong
                    raise trio.BrokenResourceError(f"donor {donor} closed the SST connection: {exc}") from exc
                raise
            if isinstance(event, Keepalive):
                continue
            if isinstance(event, ConnectionClosed):
                raise trio.BrokenResourceError(f"donor {donor} closed the SST connection before the end")
            if isinstance(event, Ctrl):
                raise ProtocolError(f"donor {donor} aborted the SST with code {event.code}", event.code)
            return event


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["DEFAULT_SST_PORT", "SnapshotInvalid", "SnapshotRefused", "SstClient", "SstServer", "make_snapshot"]
