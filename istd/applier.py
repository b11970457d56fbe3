"""Appliers: what a node does with the write-sets it receives (the joiner's applied state).

Theory of operation
-------------------
gcache and protocol move write-sets as opaque bytes; an applier gives them meaning. It keeps
the node's data and, in the same store, the position ``(cluster uuid, seqno)`` of the last
write-set applied, like InnoDB's wsrep XID checkpoint that ``mysqld --wsrep-recover`` reads
(galera-ist.md §5). Data and position are written in one transaction, so after any crash the
recovered position says exactly which write-sets the data contains.

Writing a new applier
---------------------
Implement the ``Applier`` protocol and register a factory ``(datadir: Path) -> Applier`` in
``APPLIERS``:

``name``
    the name ``open_applier`` knows it by.
``position() -> (uuid, seqno) | None``
    the position recovered from the store; None when the store has none (fresh node).
``apply(cluster_uuid, records)``
    ``records`` are consecutive ``(seqno, record_type, payload)`` tuples in seqno order.
    ``record_type`` 4 (``RECORD_TRX``) is a write-set to apply; 5 (``RECORD_CCHANGE``) and 6
    (``RECORD_SKIP``) carry nothing to apply but still advance the position. Apply all of them
    and store ``(cluster_uuid, last seqno)`` in the same transaction. Records at or below the
    stored position are skipped (re-delivery after a resume is idempotent). ``ApplyError`` when
    the first new seqno is beyond position + 1 (a gap), when the stored position belongs to
    another cluster uuid (call ``reset`` first), when the records are not consecutive or have an
    unknown type, and when a payload is malformed (the message names the seqno); in every case
    nothing of the call is committed.
``reset(cluster_uuid, seqno)``
    set the position without touching the data (bootstrap, a new history).
``digest() -> str``
    hex digest of the applied data only (not the position): the same history gives the same
    digest on every node, however it was batched.
``close()``
    release the store; idempotent.

Optional, for speed: ``apply_trx_run(cluster_uuid, first, buf, starts, ends)`` applies write-sets (all
``RECORD_TRX``) ``first, first + 1, ...`` lying at ``buf[starts[i]:ends[i]]``, with ``apply``'s checks and
outcomes; the apply worker calls it for a gcache segment instead of building a record per write-set.

Methods may be called from different threads (the daemon applies in a worker thread with
``trio.to_thread.run_sync`` while status requests read ``digest``/``position`` from the trio
thread); each applier serialises its own calls.

``sqlite`` (the default) keeps rows in ``DATADIR/istd-state.sqlite``. ``none`` applies nothing:
write-sets only live in the node's gcache (benchmarks of the transfer itself, and real Galera
write-sets, which istd does not interpret).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import operator
import sqlite3
import struct
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from istd.errors import ConfigError, IstError
from istd.writeset import Op, WriteSetDecodeError, WriteSetError, decode_many, decode_rows

__all__ = [
    "APPLIERS",
    "DEFAULT_APPLIER",
    "EMPTY_DIGEST",
    "RECORD_CCHANGE",
    "RECORD_SKIP",
    "RECORD_TRX",
    "STATE_DB_NAME",
    "Applier",
    "ApplyError",
    "NoneApplier",
    "Record",
    "SqliteApplier",
    "open_applier",
]

# Record types as carried by gcache and IST.
RECORD_TRX = 4
RECORD_CCHANGE = 5
RECORD_SKIP = 6

STATE_DB_NAME = "istd-state.sqlite"
DEFAULT_APPLIER = "sqlite"

Record = tuple[int, int, bytes | memoryview]  # (seqno, record_type, payload)


class ApplyError(IstError):
    """Write-sets could not be applied; nothing of the failed call was committed."""


class Applier(Protocol):
    name: str

    def position(self) -> tuple[uuid.UUID, int] | None: ...

    def apply(self, cluster_uuid: uuid.UUID, records: Sequence[Record]) -> None: ...

    def reset(self, cluster_uuid: uuid.UUID, seqno: int) -> None: ...

    def digest(self) -> str: ...

    def close(self) -> None: ...


# -- digest --------------------------------------------------------------------------------------

_DIGEST_DOMAIN = b"istd-rows-v1\n"
# Each row is framed by its three lengths, so (tbl, key, value) boundaries are unambiguous.
_ROW_FRAME = struct.Struct("<QQQ")
EMPTY_DIGEST = hashlib.sha256(_DIGEST_DOMAIN).hexdigest()


# -- sqlite ---------------------------------------------------------------------------------------

_SCHEMA_VERSION = 1  # PRAGMA user_version of a store this code created
# Rows of ~500 bytes are large for a WITHOUT ROWID b-tree on 4 KiB pages; 64 KiB pages (SQLite's largest)
# keep more rows per leaf: measured ~50% faster on inserts than 4 KiB, ~15% than 16 KiB. Only takes effect
# on a new file (an existing store keeps its page size).
_PAGE_SIZE_BYTES = 65536
_CACHE_SIZE_KIB = 32768  # page cache per connection; negative PRAGMA value means KiB
# Checkpoints (WAL -> database file, then fsync) run in a thread of their own, on a connection of their
# own, while the next batches are applied: done by the applying connection (SQLite's autocheckpoint)
# they measured ~20% of the apply rate. One is started per this many payload bytes applied, about what
# SQLite's default autocheckpoint (1000 pages) amounts to with these pages.
_CHECKPOINT_EVERY_BYTES = 64 << 20
# The applying connection's own autocheckpoint stays on as a backstop: it bounds the WAL (~128 MiB of
# 64 KiB pages) should the checkpoint thread fall behind.
_WAL_BACKSTOP_PAGES = 2048

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rows (
    tbl TEXT, key BLOB, value BLOB, PRIMARY KEY (tbl, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS wsrep_position (
    id INTEGER PRIMARY KEY CHECK (id = 0), uuid TEXT NOT NULL, seqno INTEGER NOT NULL
);
"""
# Upserts, many rows per statement: SQLite then steps once per statement, and the per-statement costs (a
# Python call, a reset) are shared by its rows. Parameters ?4i+2..?4i+4 take row i from the decoder's
# changes flattened as they are, (op, table, key, value) after (op, table, key, value). Widths from the
# largest down: a batch's rows go through as few statements as these widths allow.
_STATEMENT_WIDTHS = (200, 20, 1)
_NEW_VALUE = "value = excluded.value"


def _upsert_sql(rows: int) -> str:
    values = ", ".join(f"(?{4 * i + 2}, ?{4 * i + 3}, ?{4 * i + 4})" for i in range(rows))
    return f"INSERT INTO rows (tbl, key, value) VALUES {values} ON CONFLICT (tbl, key) DO UPDATE SET {_NEW_VALUE}"


_UPSERT_SQLS = {width: _upsert_sql(width) for width in _STATEMENT_WIDTHS}
_DELETE_SQL = "DELETE FROM rows WHERE tbl = ? AND key = ?"
_SET_POSITION_SQL = (
    "INSERT INTO wsrep_position (id, uuid, seqno) VALUES (0, ?, ?) "
    "ON CONFLICT (id) DO UPDATE SET uuid = excluded.uuid, seqno = excluded.seqno"
)
_NO_POSITION = -(2**63) - 1  # below every seqno: nothing is skipped
_op_of = operator.itemgetter(0)
_value_of = operator.itemgetter(3)


def _upsert(conn: sqlite3.Connection, changes: list[tuple[Op, str, bytes, bytes]]) -> None:
    """Upsert every change (all UPSERTs), in order: rows to the same key keep their order, one after the
    other within a statement as between statements."""
    flat = list(itertools.chain.from_iterable(changes))
    done = 0
    for width in _STATEMENT_WIDTHS:
        end = done + (len(changes) - done) // width * width
        if end > done:
            n = 4 * width
            conn.executemany(_UPSERT_SQLS[width], [flat[i:i + n] for i in range(4 * done, 4 * end, n)])
            done = end


def _digest(conn: sqlite3.Connection, path: Path) -> str:
    h = hashlib.sha256(_DIGEST_DOMAIN)
    update, frame = h.update, _ROW_FRAME.pack
    try:
        for tbl, key, value in conn.execute("SELECT tbl, key, value FROM rows ORDER BY tbl, key"):
            t = tbl.encode()
            update(frame(len(t), len(key), len(value)))
            update(t)
            update(key)
            update(value)
    except sqlite3.Error as exc:
        raise ApplyError(f"cannot read {path}: {exc}") from exc
    return h.hexdigest()


def connect_read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection to a state database (never creates one, never writes)."""
    return sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)


def _position_in(conn: sqlite3.Connection, path: Path) -> tuple[uuid.UUID, int] | None:
    row = conn.execute("SELECT uuid, seqno FROM wsrep_position WHERE id = 0").fetchone()
    if row is None:
        return None
    try:
        return uuid.UUID(row[0]), int(row[1])
    except (ValueError, TypeError) as exc:
        raise ApplyError(f"state store {path}: bad position {row!r}") from exc


def read_position(path: Path) -> tuple[uuid.UUID, int] | None:
    """The position stored in a state database file, read-only: an SST snapshot, or a store another process
    applies to. ApplyError when the file is not a state database or its position is malformed."""
    try:
        conn = connect_read_only(path)
        try:
            return _position_in(conn, path)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise ApplyError(f"cannot read the position in {path}: {exc}") from exc


class SqliteApplier:
    """Rows and position in one SQLite file, ``DATADIR/istd-state.sqlite``.

    Tables: ``rows(tbl, key, value)`` and ``wsrep_position(id = 0, uuid, seqno)``. WAL journal
    with ``synchronous=NORMAL``: a crash of the process loses nothing committed; a crash of the
    OS may lose the last transactions, and then the recovered position is correspondingly
    earlier, never ahead of the data (both are in the same transactions).

    One connection guarded by a lock: every method may be called from any thread.
    """

    name = "sqlite"

    def __init__(self, datadir: Path) -> None:
        self.path = Path(datadir) / STATE_DB_NAME
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._position: tuple[uuid.UUID, int] | None = None
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise ApplyError(f"cannot open state store {self.path}: {exc}") from exc
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _SCHEMA_VERSION):
                raise ApplyError(
                    f"state store {self.path} has schema version {version}, this istd knows"
                    f" {_SCHEMA_VERSION}: use a matching istd or move the file aside"
                )
            conn.execute(f"PRAGMA page_size = {_PAGE_SIZE_BYTES}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise ApplyError(f"state store {self.path}: cannot enable WAL (got {mode!r})")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(f"PRAGMA cache_size = -{_CACHE_SIZE_KIB}")
            conn.execute(f"PRAGMA wal_autocheckpoint = {_WAL_BACKSTOP_PAGES}")
            conn.executescript(f"BEGIN; {_SCHEMA} PRAGMA user_version = {_SCHEMA_VERSION}; COMMIT;")
            self._position = self._read_position(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise ApplyError(
                f"state store {self.path} is unusable: {exc}; move it aside to start from an empty state"
            ) from exc
        except ApplyError:
            conn.close()
            raise
        self._conn = conn
        self._checkpointer = _Checkpointer(self.path)

    def _read_position(self, conn: sqlite3.Connection) -> tuple[uuid.UUID, int] | None:
        return _position_in(conn, self.path)

    def _require_open(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ApplyError(f"state store {self.path} is closed")
        return self._conn

    def position(self) -> tuple[uuid.UUID, int] | None:
        """Read from the store every time: another process (the joiner's apply worker) may have applied."""
        with self._lock:
            conn = self._require_open()
            try:
                self._position = self._read_position(conn)
            except sqlite3.Error as exc:
                raise ApplyError(f"state store {self.path}: cannot read the position: {exc}") from exc
            return self._position

    def _skip_upto(self, cluster_uuid: uuid.UUID, first: int) -> int:
        """The stored seqno (records up to it are skipped): ApplyError for another history or a gap."""
        if self._position is None:
            return _NO_POSITION
        stored_uuid, skip_upto = self._position
        if stored_uuid != cluster_uuid:
            raise ApplyError(
                f"write-sets of cluster {cluster_uuid} do not apply to a state at"
                f" {stored_uuid}:{skip_upto} (reset the position for a new history)"
            )
        if first > skip_upto + 1:
            raise ApplyError(f"gap: state is at seqno {skip_upto}, first write-set is seqno {first}")
        return skip_upto

    def apply(self, cluster_uuid: uuid.UUID, records: Sequence[Record]) -> None:
        if not records:
            return
        with self._lock:
            conn = self._require_open()
            first = records[0][0]
            skip_upto = self._skip_upto(cluster_uuid, first)
            changes: list[tuple[Op, str, bytes, bytes]] = []
            extend = changes.extend
            expected = first
            # The hot loop: keep it to checks, one decode call and one extend per record.
            for seqno, rtype, payload in records:
                if seqno != expected:
                    raise ApplyError(f"records not consecutive: seqno {seqno} after {expected - 1}")
                expected = seqno + 1
                if seqno <= skip_upto:
                    continue
                if rtype == RECORD_TRX:
                    try:
                        extend(decode_rows(payload))
                    except WriteSetError as exc:
                        raise ApplyError(f"cannot apply write-set seqno {seqno}: {exc}") from exc
                elif rtype != RECORD_CCHANGE and rtype != RECORD_SKIP:
                    raise ApplyError(f"seqno {seqno}: unknown record type {rtype}")
            last = expected - 1
            if last <= skip_upto:
                return  # everything was applied before
            self._commit(conn, cluster_uuid, max(first, skip_upto + 1), last, changes)

    def apply_trx_run(self, cluster_uuid: uuid.UUID, first: int, buf: bytes, starts: Sequence[int],
                      ends: Sequence[int]) -> None:
        """``apply`` for the common case, without a tuple or a view per write-set: write-sets (all
        RECORD_TRX) ``first, first + 1, ...`` lying at ``buf[starts[i]:ends[i]]`` (a gcache segment's
        payloads). Same checks, skipping and outcomes as ``apply``."""
        count = len(starts)
        if not count:
            return
        with self._lock:
            conn = self._require_open()
            skip_upto = self._skip_upto(cluster_uuid, first)
            last = first + count - 1
            if last <= skip_upto:
                return
            k = max(0, skip_upto + 1 - first)
            try:
                changes = decode_many(buf, starts[k:], ends[k:])
            except WriteSetDecodeError as exc:
                raise ApplyError(f"cannot apply write-set seqno {first + k + exc.index}: {exc}") from exc
            self._commit(conn, cluster_uuid, first + k, last, changes)

    def _commit(self, conn: sqlite3.Connection, cluster_uuid: uuid.UUID, first: int, last: int,
                changes: list[tuple[Op, str, bytes, bytes]]) -> None:
        """Apply ``changes`` (of write-sets first..last) and store the position, in one transaction."""
        try:
            conn.execute("BEGIN")
            try:
                if Op.DELETE not in set(map(_op_of, changes)):
                    _upsert(conn, changes)
                else:
                    # Runs of the same op keep the order of changes to the same row.
                    for op, run in itertools.groupby(changes, key=_op_of):
                        if op is Op.UPSERT:
                            _upsert(conn, list(run))
                        else:
                            conn.executemany(_DELETE_SQL, ((t, k) for _, t, k, _ in run))
                conn.execute(_SET_POSITION_SQL, (str(cluster_uuid), last))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # a failed COMMIT may already have rolled back
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise ApplyError(f"cannot apply seqnos {first}-{last} to {self.path}: {exc}") from exc
        self._position = (cluster_uuid, last)
        self._checkpointer.committed(conn, sum(map(len, map(_value_of, changes))))

    def reset(self, cluster_uuid: uuid.UUID, seqno: int) -> None:
        if seqno < -1:
            raise ApplyError(f"invalid seqno {seqno} (must be >= -1)")
        with self._lock:
            conn = self._require_open()
            try:
                conn.execute(_SET_POSITION_SQL, (str(cluster_uuid), seqno))
            except sqlite3.Error as exc:
                raise ApplyError(f"cannot set the position in {self.path}: {exc}") from exc
            self._position = (cluster_uuid, seqno)

    def digest(self) -> str:
        """sha256 of all rows in (tbl, key) order, each framed by its lengths."""
        with self._lock:
            return _digest(self._require_open(), self.path)

    def snapshot_digest(self) -> tuple[tuple[uuid.UUID, int] | None, str]:
        """(position, digest) read in one transaction on a connection of its own: callable from any thread
        without waiting for (or holding up) the applying connection."""
        try:
            conn = connect_read_only(self.path)
        except sqlite3.Error as exc:
            raise ApplyError(f"cannot open {self.path} to read: {exc}") from exc
        try:
            conn.execute("BEGIN")
            position = self._read_position(conn)
            digest = _digest(conn, self.path)
            conn.execute("COMMIT")
            return position, digest
        except sqlite3.Error as exc:
            raise ApplyError(f"cannot read {self.path}: {exc}") from exc
        finally:
            conn.close()

    def row_count(self) -> int:
        with self._lock:
            conn = self._require_open()
            try:
                return int(conn.execute("SELECT count(*) FROM rows").fetchone()[0])
            except sqlite3.Error as exc:
                raise ApplyError(f"cannot read {self.path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._checkpointer.close()
                self._conn.close()
                self._conn = None


class _Checkpointer:
    """Checkpoints the WAL of one store in a thread of its own, while the applying connection goes on.

    The sqlite3 module releases the GIL while SQLite works, so the copy and the fsync use another core.
    A checkpoint in another thread leaves the WAL file growing, though: SQLite restarts the WAL from its
    start only when a write transaction begins with every frame already copied, and by the time the
    thread is done the applier has committed more. So after each background checkpoint the applying
    connection checkpoints once itself, right after a commit (only the frames since: small), and the WAL
    starts over at its next transaction: its size stays about two intervals. Data and position are
    committed together whatever the checkpoints do; they only move committed pages.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._since = 0  # payload bytes committed since the last checkpoint was started
        self._wake = threading.Event()
        self._idle = threading.Event()  # no background checkpoint is running
        self._idle.set()
        self._finish = False  # a background checkpoint completed: the applier finishes it after a commit
        self._stopping = False
        self._thread: threading.Thread | None = None

    def committed(self, conn: sqlite3.Connection, nbytes: int) -> None:
        """Called by the applying thread after each commit, with the payload bytes it committed."""
        if self._finish:
            self._finish = False
            with contextlib.suppress(sqlite3.Error):  # a failed checkpoint loses nothing: the WAL keeps it
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        self._since += nbytes
        if self._since < _CHECKPOINT_EVERY_BYTES or not self._idle.is_set():
            return
        self._since = 0
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="istd-checkpoint", daemon=True)
            self._thread.start()
        self._idle.clear()
        self._wake.set()

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error:
            return  # the applying connection's autocheckpoint still bounds the WAL
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._stopping:
                    return
                try:  # fetchall: a statement left unfinished would hold a read lock and pin the WAL
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self._finish = True
                except sqlite3.Error:
                    pass  # the next one, or the backstop, copies these pages
                finally:
                    self._idle.set()
        finally:
            conn.close()

    def close(self) -> None:
        if self._thread is not None:
            self._stopping = True
            self._wake.set()
            self._thread.join()
            self._thread = None


class NoneApplier:
    """Applies nothing and has no store.

    Write-sets only live in the node's gcache: for benchmarking the transfer itself and for
    real Galera write-sets, which istd does not interpret. It cannot detect gaps: it has no
    position (``position()`` is None) and ``digest()`` is ``""`` (meaningless).
    """

    name = "none"

    def __init__(self, datadir: Path | None = None) -> None:
        self.datadir = datadir

    def position(self) -> tuple[uuid.UUID, int] | None:
        return None

    def apply(self, cluster_uuid: uuid.UUID, records: Sequence[Record]) -> None:
        return None

    def reset(self, cluster_uuid: uuid.UUID, seqno: int) -> None:
        return None

    def digest(self) -> str:
        return ""

    def row_count(self) -> int:
        return 0

    def close(self) -> None:
        return None


APPLIERS: dict[str, Callable[[Path], Applier]] = {
    "sqlite": SqliteApplier,
    "none": NoneApplier,
}


def open_applier(name: str, datadir: Path) -> Applier:
    """Open the applier called ``name`` on ``datadir``; ConfigError for an unknown name."""
    factory = APPLIERS.get(name)
    if factory is None:
        raise ConfigError(f"unknown applier {name!r}; choose one of: {', '.join(sorted(APPLIERS))}")
    return factory(Path(datadir))
