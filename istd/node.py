"""The local node: data directory, saved position, gcache, applied state and status.

Both daemons are built on one LocalNode. It owns, for one data directory::

    istd.lock            exclusive lock: one daemon per data directory
    grastate.dat         Galera's saved state: uuid, seqno (-1 while running), safe_to_bootstrap
    galera.cache         the write-set ring buffer (gcache/), Galera 4's layout
    istd-state.sqlite    the applied state and its position, committed together (istd/applier.py)

Ordering rule that keeps the three consistent across any crash: a write-set is appended to the gcache
*before* it is applied, and the applied position is committed with the data. So after a crash the gcache
holds at least what was applied; on open the gcache tail beyond the applied position is dropped
(Galera's ``seqno_reset``), and the position comes from the database when grastate.dat says -1
(Galera's wsrep-recover).
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog
import trio

from gcache import CCHANGE, WRITESET, GCache
from istd import __version__
from istd import grastate as gs
from istd.applier import STATE_DB_NAME, Applier, open_applier, read_position
from istd.config import ProviderOptions
from istd.errors import IstError, StateError
from istd.states import NodeState
from protocol import RecordType

log = structlog.get_logger("istd.node")

# How often the state digest shown in the status is refreshed (when the position moved).
DIGEST_PERIOD_SECONDS = 2.0

# protocol record type -> gcache buffer type (SKIP is a flag in gcache, its type byte is unused)
_GCACHE_TYPE = {RecordType.TRX: WRITESET, RecordType.CCHANGE: CCHANGE, RecordType.SKIP: WRITESET}
TO_GCACHE_TYPES = bytes(_GCACHE_TYPE.get(RecordType(i), WRITESET) if i in (4, 5, 6) else 0 for i in range(256))
TO_RECORD_TYPES = bytes(
    {WRITESET: RecordType.TRX, CCHANGE: RecordType.CCHANGE}.get(i, RecordType.TRX) for i in range(256)
)


class SeqnoWatch:
    """A seqno that only grows, and tasks that wait for it to pass a value."""

    def __init__(self, value: int) -> None:
        self.value = value
        self._changed = trio.Event()

    def set(self, value: int) -> None:
        self.value = value
        self._changed.set()
        self._changed = trio.Event()

    async def wait_above(self, seqno: int) -> int:
        while self.value <= seqno:
            await self._changed.wait()
        return self.value


class LocalNode:
    """Storage and state of one istd node. Synchronous open/close; async apply and write."""

    def __init__(self, *, datadir: Path, name: str, options: ProviderOptions, applier: str, role: str) -> None:
        self.datadir = Path(datadir)
        self.name = name
        self.options = options
        self.applier_name = applier
        self.role = role
        self.uuid = gs.ZERO_UUID
        self.state = NodeState.INITIALIZED
        self.safe_to_bootstrap = False
        self.committed = SeqnoWatch(-1)
        self.started_at = time.time()
        self.counters: dict[str, int] = {
            "wsrep_received": 0,
            "wsrep_received_bytes": 0,
            "wsrep_replicated": 0,
            "wsrep_replicated_bytes": 0,
        }
        self._lock = gs.DatadirLock(self.datadir)
        self._write_lock = trio.Lock()
        self._gcache: GCache | None = None
        self._applier: Applier | None = None
        self._digest = ""
        self._digest_seqno = -1

    # ------------------------------------------------------------------------------- properties

    @property
    def gcache(self) -> GCache:
        assert self._gcache is not None, "node is not open"
        return self._gcache

    @property
    def applier(self) -> Applier:
        assert self._applier is not None, "node is not open"
        return self._applier

    @property
    def last_committed(self) -> int:
        return self.committed.value

    @property
    def lock_fd(self) -> int | None:
        return self._lock.fd

    @property
    def position_known(self) -> bool:
        return self.uuid != gs.ZERO_UUID and self.last_committed >= 0

    @property
    def gtid(self) -> str:
        return f"{self.uuid}:{self.last_committed}"

    # ------------------------------------------------------------------------------- lifecycle

    def open(self, *, bootstrap: bool = False) -> None:
        """Lock the data directory, find the position, open the gcache and the applied state."""
        self._lock.acquire()
        try:
            self._open(bootstrap)
        except BaseException:
            self._close_files()
            self._lock.release()
            raise

    def _open(self, bootstrap: bool) -> None:
        saved = gs.read(self.datadir)
        if saved is None:
            log.info(f"Could not open state file for reading: '{gs.path_in(self.datadir)}'",
                     path=str(gs.path_in(self.datadir)))
        else:
            log.info(f"Found saved state: {saved.gtid}, safe_to_bootstrap: {int(saved.safe_to_bootstrap)}",
                     uuid=str(saved.uuid), seqno=saved.seqno, safe_to_bootstrap=int(saved.safe_to_bootstrap))
        self._applier = open_applier(self.applier_name, self.datadir)
        gcache_dir = Path(self.options["gcache.dir"] or self.datadir)
        self._gcache = GCache.open(
            gcache_dir / self.options["gcache.name"],
            size=self.options["gcache.size"],
            recover=self.options["gcache.recover"],
            page_size=self.options["gcache.page_size"],
            keep_pages_size=self.options["gcache.keep_pages_size"],
            sync=self.options["gcache.sync"],
        )
        node_uuid, seqno = self._find_position(saved)
        if bootstrap:
            node_uuid, seqno = self._bootstrap(saved, node_uuid, seqno)
        self.uuid = node_uuid
        self.committed.set(seqno)
        self.safe_to_bootstrap = bootstrap or (saved.safe_to_bootstrap if saved else False)
        if self.position_known:
            self.gcache.reset(node_uuid, seqno)
        self.save_state(running=True)

    def _find_position(self, saved: gs.SavedState | None) -> tuple[uuid.UUID, int]:
        node_uuid = saved.uuid if saved else gs.ZERO_UUID
        seqno = saved.seqno if saved else gs.SEQNO_UNDEFINED
        recorded = self.applier.position()
        if recorded is None and self.applier_name == "none" and self.gcache.seqno_max >= 0:
            # the `none` applier keeps nothing but the gcache: its position is the cache's last seqno
            recorded = (self.gcache.gid, self.gcache.seqno_max)
        if recorded is None:
            return node_uuid, seqno
        rec_uuid, rec_seqno = recorded
        if node_uuid in (gs.ZERO_UUID, rec_uuid) and seqno == gs.SEQNO_UNDEFINED:
            log.info(f"Recovered position: {rec_uuid}:{rec_seqno}", uuid=str(rec_uuid), seqno=rec_seqno,
                     source=self.applier_name)
            return rec_uuid, rec_seqno
        if rec_uuid == node_uuid and rec_seqno != seqno:
            log.warning(
                f"grastate.dat says {node_uuid}:{seqno} but the applied state is at {rec_uuid}:{rec_seqno}; "
                "using the applied state's position (data and position are committed together)",
                grastate_seqno=seqno, state_seqno=rec_seqno,
            )
            return rec_uuid, rec_seqno
        return node_uuid, seqno

    def _bootstrap(self, saved: gs.SavedState | None, node_uuid: uuid.UUID, seqno: int) -> tuple[uuid.UUID, int]:
        if saved is not None and saved.uuid != gs.ZERO_UUID and not saved.safe_to_bootstrap:
            raise StateError(
                "It may not be safe to bootstrap the cluster from this node. It was not the last one to leave "
                "the cluster and may not contain all the updates. To force cluster bootstrap with this node, "
                "edit the grastate.dat file manually and set safe_to_bootstrap to 1 "
                f"(istd grastate set {self.datadir} --safe-to-bootstrap 1)."
            )
        if node_uuid == gs.ZERO_UUID or seqno < 0:
            if node_uuid != gs.ZERO_UUID and seqno < 0:
                raise StateError(
                    f"cannot bootstrap {self.datadir}: its history {node_uuid} has no known position "
                    "(grastate.dat says -1 and the state database has none); move the data directory away "
                    "to start a new history"
                )
            node_uuid, seqno = uuid.uuid1(), 0
            self.applier.reset(node_uuid, 0)
            log.info(f"Starting new cluster history: {node_uuid}:0", uuid=str(node_uuid))
        return node_uuid, seqno

    def install_state(self, snapshot: Path, cluster_uuid: uuid.UUID, seqno: int) -> None:
        """Switch to a verified SST snapshot: applied state, position, grastate.dat and gcache history.

        Crash-safe by order. grastate.dat first says "unknown" (zero uuid, -1, Galera's mark_unsafe), so a
        restart takes the position from the state database, whichever it is; then the old database's WAL
        goes and the snapshot is renamed over it (the one atomic step); then the gcache adopts the new
        history and grastate.dat the new uuid. Before the rename a crash leaves the old state with its own
        position; after it, the snapshot with its own.
        """
        if read_position(snapshot) != (cluster_uuid, seqno):
            raise StateError(f"snapshot {snapshot} is not at {cluster_uuid}:{seqno}: not installed")
        db = self.datadir / STATE_DB_NAME
        gs.write(self.datadir, gs.SavedState(uuid=gs.ZERO_UUID, seqno=gs.SEQNO_UNDEFINED,
                                             safe_to_bootstrap=False))
        if self._applier is not None:
            self._applier.close()
            self._applier = None
        for leftover in (Path(f"{db}-wal"), Path(f"{db}-shm")):
            leftover.unlink(missing_ok=True)
        snapshot.replace(db)
        gs.fsync_dir(self.datadir)
        if self.uuid != cluster_uuid:
            log.info("Resetting GCache seqno map due to different histories.", old=str(self.uuid),
                     new=str(cluster_uuid))
        self._applier = open_applier(self.applier_name, self.datadir)
        self.gcache.reset(cluster_uuid, seqno)
        self.uuid = cluster_uuid
        self.committed.set(seqno)
        self._digest_seqno = -1
        self.save_state(running=True)
        log.info(f"Installed new state from SST: {cluster_uuid}:{seqno}", uuid=str(cluster_uuid), seqno=seqno)

    def save_state(self, *, running: bool) -> None:
        """grastate.dat as Galera writes it: seqno -1 while running, the real seqno at a clean stop."""
        seqno = gs.SEQNO_UNDEFINED if running or not self.position_known else self.last_committed
        gs.write(self.datadir, gs.SavedState(uuid=self.uuid, seqno=seqno,
                                             safe_to_bootstrap=self.safe_to_bootstrap))

    def close(self) -> None:
        """Clean stop: synced gcache preamble, grastate.dat with the real seqno, unlock."""
        try:
            if self._applier is not None and self._gcache is not None:
                # the apply worker may have committed batches after the last ack we read: the applied
                # state's own position is the truth
                recorded = self._applier.position()
                if recorded is not None and recorded[0] == self.uuid and recorded[1] > self.last_committed:
                    self.committed.set(recorded[1])
                self.save_state(running=False)
                log.info(f"Provider closed at {self.gtid}", uuid=str(self.uuid), seqno=self.last_committed)
        finally:
            self._close_files()
            self._lock.release()

    def _close_files(self) -> None:
        if self._gcache is not None:
            self._gcache.close()
            self._gcache = None
        if self._applier is not None:
            self._applier.close()
            self._applier = None

    # ------------------------------------------------------------------------------- state

    def shift(self, new: NodeState) -> None:
        old = self.state
        if old is new:
            return
        self.state = new
        if old.gcs_name != new.gcs_name:
            log.info(f"Shifting {old.gcs_name} -> {new.gcs_name} (TO: {self.last_committed})",
                     old=old.gcs_name, new=new.gcs_name, seqno=self.last_committed)

    # ------------------------------------------------------------------------------- data paths

    def store(self, first: int, types: bytes, payloads: Sequence[bytes | memoryview], nbytes: int) -> None:
        """Append received write-sets to this node's own gcache (so it can serve IST later)."""
        gtypes = types.translate(TO_GCACHE_TYPES)
        if RecordType.SKIP in types:
            for i, (t, p) in enumerate(zip(types, payloads, strict=True)):
                self.gcache.append(p, gtypes[i], seqno=first + i, skipped=t == RecordType.SKIP)
        else:
            self.gcache.append_many(payloads, gtypes, first=first)
        self.counters["wsrep_received"] += len(payloads)
        self.counters["wsrep_received_bytes"] += nbytes

    def store_segment(self, first: int, count: int, blob: memoryview) -> None:
        """Store a run of ``count`` records received in gcache's on-disk form (same history: one copy, no
        re-encoding). BadSegment if ``blob`` is not that (nothing is stored then)."""
        last, lengths = self.gcache.import_segment(first, blob, count)
        self.counters["wsrep_received"] += last - first + 1
        self.counters["wsrep_received_bytes"] += sum(lengths)

    async def apply(self, first: int, types: bytes, payloads: Sequence[bytes | memoryview]) -> None:
        """Apply consecutive write-sets (already in the gcache) in a worker thread; advance the position."""
        if self.applier_name != "none":  # `none` keeps write-sets in the gcache only: no thread hop
            records = list(zip(itertools.count(first), types, payloads))
            await trio.to_thread.run_sync(self.applier.apply, self.uuid, records)
        self.committed.set(first + len(payloads) - 1)

    async def write(self, payloads: list[bytes]) -> tuple[int, int]:
        """The writer's path: next seqnos, gcache, then apply; returns (first, last)."""
        async with self._write_lock:
            first = self.last_committed + 1
            types = bytes([RecordType.TRX]) * len(payloads)
            self.gcache.append_many(payloads, types.translate(TO_GCACHE_TYPES), first=first)
            await self.apply(first, types, payloads)
            self.counters["wsrep_replicated"] += len(payloads)
            self.counters["wsrep_replicated_bytes"] += sum(len(p) for p in payloads)
            return first, first + len(payloads) - 1

    # ------------------------------------------------------------------------------- status

    async def digest_loop(self) -> None:
        """Keep `istd_state_digest` current for `istd status`, computed in a worker thread (it reads every
        row) and only when the position moved; a digest is shown only with the seqno it belongs to."""
        while True:
            await trio.sleep(DIGEST_PERIOD_SECONDS)
            if self.applier_name == "none" or self.last_committed == self._digest_seqno:
                continue
            snapshot = getattr(self.applier, "snapshot_digest", None)
            if snapshot is None:
                continue
            try:
                position, digest = await trio.to_thread.run_sync(snapshot)
            except IstError as exc:  # the status just goes without a digest; the node keeps running
                log.warning(f"cannot compute the state digest: {exc}", error=str(exc))
                continue
            if position is not None and position[0] == self.uuid:
                self._digest, self._digest_seqno = digest, position[1]

    def status(self) -> dict[str, Any]:
        gcache = self._gcache
        status: dict[str, Any] = {
            "wsrep_provider_name": "istd",
            "wsrep_provider_version": __version__,
            "wsrep_node_name": self.name,
            "wsrep_local_state": self.state.number,
            "wsrep_local_state_comment": self.state.comment,
            "wsrep_local_state_uuid": str(self.uuid),
            "wsrep_last_committed": self.last_committed,
            "wsrep_local_cached_downto": gcache.seqno_min if gcache else -1,
            "wsrep_local_recv_queue": 0,
            "wsrep_ist_receive_status": "",
            "wsrep_ready": "ON" if self.state is NodeState.SYNCED else "OFF",
            **self.counters,
            "istd_role": self.role,
            "istd_applier": self.applier_name,
            "istd_uptime_seconds": round(time.time() - self.started_at, 1),
        }
        if gcache is not None:
            stats = gcache.statistics()
            status["istd_gcache_seqno_max"] = gcache.seqno_max
            status["istd_gcache_size"] = self.options["gcache.size"]
            for key in ("ring_used", "pages", "evicted"):
                if key in stats:
                    status[f"istd_gcache_{key}"] = stats[key]
        if self._digest_seqno >= 0:
            status["istd_state_digest"] = self._digest
            status["istd_state_digest_seqno"] = self._digest_seqno
        return status
