"""grastate.dat: the node's saved position, in Galera's exact format, and the data directory lock.

Galera writes (``galera/src/saved_state.cpp``)::

    # GALERA saved state
    version: 2.1
    uuid:    0ba80362-e6b2-11f1-a838-fff90686b220
    seqno:   328773
    safe_to_bootstrap: 0

``uuid:`` is followed by four spaces, ``seqno:`` by three. Galera rewrites the file in place and pads
with spaces when it gets shorter, so a real file may end in trailing blanks; the reader tolerates that,
a missing ``safe_to_bootstrap`` (which means 1) and unknown keys, as Galera's reader does.

Where istd differs on purpose: Galera rewrites in place, so a crash in the middle of a write can leave a
torn file. istd writes a temporary file, fsyncs it, renames it over ``grastate.dat`` and fsyncs the
directory: a kill -9 at any instant leaves either the old or the new content. The bytes are the same
as Galera's for the same values. Because the rename replaces the inode, the exclusive lock that stops
two daemons from sharing a data directory is taken on a separate file, ``istd.lock``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from istd.errors import DatadirLocked, StateError, StateFileCorrupt

GRASTATE_NAME = "grastate.dat"
LOCK_NAME = "istd.lock"
ZERO_UUID = uuid.UUID(int=0)
SEQNO_UNDEFINED = -1
GRASTATE_VERSION = "2.1"


@dataclass(frozen=True)
class SavedState:
    """The content of grastate.dat. Defaults are Galera's for a node with no state."""

    uuid: uuid.UUID = ZERO_UUID
    seqno: int = SEQNO_UNDEFINED
    safe_to_bootstrap: bool = True
    version: str = GRASTATE_VERSION

    @property
    def gtid(self) -> str:
        return f"{self.uuid}:{self.seqno}"

    @property
    def is_undefined(self) -> bool:
        """True when the position is unknown: zero uuid or seqno -1 (only SST can help such a node)."""
        return self.uuid == ZERO_UUID or self.seqno == SEQNO_UNDEFINED

    def with_(self, **changes: object) -> SavedState:
        return replace(self, **changes)  # type: ignore[arg-type]

    def render(self) -> bytes:
        """The exact bytes Galera writes for these values (it always writes version 2.1)."""
        return (
            "# GALERA saved state\n"
            f"version: {GRASTATE_VERSION}\n"
            f"uuid:    {self.uuid}\n"
            f"seqno:   {self.seqno}\n"
            f"safe_to_bootstrap: {int(self.safe_to_bootstrap)}\n"
        ).encode("ascii")


def parse(data: bytes, *, source: str = GRASTATE_NAME) -> SavedState:
    """Parse grastate.dat content.

    Accepts everything Galera's reader accepts: ``#`` comment lines, blank or space-only lines (padding
    left by an in-place rewrite), unknown keys, and a missing ``safe_to_bootstrap`` (= 1) or ``version``.
    Raises StateFileCorrupt, naming the file and the line, for anything else.
    """
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise StateFileCorrupt(f"{source}: not a text file ({exc.reason} at byte {exc.start})") from exc
    state = SavedState(version="0.8")
    seen_uuid = False
    for lineno, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens or tokens[0].startswith("#"):
            continue
        key, rest = tokens[0], tokens[1:]
        value = rest[0] if rest else ""
        try:
            if key == "version:":
                state = replace(state, version=value)
            elif key == "uuid:":
                state = replace(state, uuid=uuid.UUID(value))
                seen_uuid = True
            elif key == "seqno:":
                state = replace(state, seqno=int(value))
            elif key == "safe_to_bootstrap:":
                if value not in ("0", "1"):
                    raise ValueError(f"expected 0 or 1, got {value!r}")
                state = replace(state, safe_to_bootstrap=value == "1")
        except ValueError as exc:
            raise StateFileCorrupt(
                f"{source}:{lineno}: bad value for {key.rstrip(':')}: {line.strip()!r} ({exc}); "
                f"fix the line or move the file away to start with an unknown position (SST)"
            ) from exc
    if not seen_uuid and state.seqno != SEQNO_UNDEFINED:
        raise StateFileCorrupt(f"{source}: has a seqno but no uuid line")
    if state.seqno < SEQNO_UNDEFINED:
        raise StateFileCorrupt(f"{source}: seqno {state.seqno} is below -1")
    return state


def path_in(datadir: Path | str) -> Path:
    return Path(datadir) / GRASTATE_NAME


def read(datadir: Path | str) -> SavedState | None:
    """Read DATADIR/grastate.dat; None when there is none (Galera then starts from an unknown position)."""
    path = path_in(datadir)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror}") from exc
    return parse(data, source=str(path))


def write(datadir: Path | str, state: SavedState) -> None:
    """Atomically replace DATADIR/grastate.dat with ``state`` (tmp + fsync + rename + fsync dir)."""
    path = path_in(datadir)
    tmp = path.with_name(f".{GRASTATE_NAME}.tmp")
    data = state.render()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o660)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        raise StateError(f"cannot write {path}: {exc.strerror}") from exc


def fsync_dir(directory: Path | str) -> None:
    """Make a rename in ``directory`` durable."""
    dirfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


class DatadirLock:
    """An exclusive, process-lifetime lock on a data directory (``DATADIR/istd.lock``).

    Released by the kernel when the process dies, so a kill -9 never leaves a stale lock.
    """

    def __init__(self, datadir: Path | str) -> None:
        self.datadir = Path(datadir)
        self.path = self.datadir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.datadir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o660)
        except OSError as exc:
            raise StateError(f"cannot use data directory {self.datadir}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise DatadirLocked(
                f"data directory {self.datadir} is in use by another istd process (pid {holder}); "
                f"stop that process or use another --datadir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    @property
    def fd(self) -> int | None:
        """The locked descriptor: a child process that inherits it keeps the directory locked."""
        return self._fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DatadirLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
