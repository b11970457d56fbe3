"""GCache: Galera 4's write-set cache file, synchronous and mmap-based.

Theory of operation
-------------------
The ring buffer lives in [1280, 1280+size) of the file (see ``format.py``). Buffers are written at
``next`` and reclaimed at ``first``; a zero header always sits at ``next`` (the file has 24 spare bytes
after the ring so that it fits even at the very end).

Unwrapped (first <= next)::

    1280        first                        next                 ring end
     |  free    |#### buffers, oldest first ####|0|   free            |   (+24)

Wrapped (next < first)::

    1280                 next           first               rollover  ring end
     |#### newest ####|0|     free     |#### oldest #########|0|  unused |

A buffer of ``n`` bytes goes at ``next`` if it fits before the ring end (unwrapped), or before
``first - 24`` (wrapped: the trailing zero header must never overwrite the oldest buffer's header). If it
does not fit at the end, the zero header at ``next`` stays as the rollover mark and writing resumes at
1280. To make room, the buffer at ``first`` is reclaimed: if it still holds a cached seqno ``s``, every
seqno <= ``s`` is evicted (the cached range stays gapless), which is refused when ``s`` is at or above
the lowest locked seqno. A reclaimed buffer is marked ``seqno_g = -1`` in place, as Galera does, so that a
later recovery never resurrects a half-overwritten buffer. Eviction happens only when an append needs
room. A buffer larger than half the ring, or one the ring cannot make room for (locks), goes to an
overflow page file instead (``gcache.page.000000``, ...), with the same header (store = PAGE).

The seqno index is four parallel arrays indexed by ``seqno - base`` (live from ``lo``): payload offset,
payload length, meta (type byte | skipped | foreign | break | in a page, see ``SKIP_BIT`` ...), and where
(0 = ring, else the page id). Evicting only moves ``lo``. The meta bits let ``export_segments`` find runs
of buffers that can be copied as they are, with byte searches instead of a loop over records.

New buffers are written zero-header-first, then body, then header; whatever instant a process dies at,
the file holds whole buffers, one buffer whose checksum fails, and reclaimed (-1) buffers. The kernel
keeps the written pages, so a crash of the process loses nothing; ``sync=True`` also msyncs every append
so that an OS crash loses nothing either.

Not thread-safe: use one GCache from one thread at a time.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import logging
import mmap
import os
import re
import struct
import sys
import uuid
import zlib
from array import array
from collections.abc import Sequence
from itertools import accumulate, repeat
from operator import sub
from types import TracebackType
from typing import Any, NamedTuple

from istd.errors import BadSegment, GcacheCorrupt, GcacheError, GcacheFull, SeqnoNotInCache

from . import format as fmt
from .format import (
    ALIGNMENT,
    BH,
    BH_MARK,
    BH_SIZE,
    CRC_PREFIX,
    FILE_OVERHEAD,
    FLAGS_MAX,
    MAGIC32,
    MAGIC_CTX,
    NIL_UUID,
    PREAMBLE_LEN,
    RELEASED,
    RING_START,
    SEQNO_ILL,
    SKIPPED,
    STORE_PAGE,
    STORE_RB,
    WRITESET,
    ZERO_BH,
    Preamble,
)
from .recovery import read_preamble, recover_ring

log = logging.getLogger("istd.gcache")

MiB = 1 << 20
PAGE_NAME_RE = re.compile(r"gcache\.page\.\d{6}")
ZERO_CHUNK_BYTES = 1 << 20  # free space is zeroed in chunks that are left alone when already zero
_NONZERO = re.compile(rb"[^\x00]")
COMPACT_MIN_ENTRIES = 4096  # evicted index entries are dropped from the arrays in batches of at least this
_SEQ_SIZE_S = struct.Struct("<q8xI")  # seqno_g and size of a header
_new = tuple.__new__


class Record(NamedTuple):
    """A cached write-set. ``payload`` points into the cache file's mapping: it stays valid until the
    next append, unless its seqno is locked (or above a locked seqno)."""

    seqno: int
    type: int
    skipped: bool
    payload: memoryview


# The index's meta entry: type byte | 0x100 skipped | 0x200 foreign (written by Galera: no istd checksum)
# | 0x400 break (its buffer does not start where the previous seqno's ring buffer ends) | 0x800 in a page.
# export_segments reads bits 8..15 of a range as bytes: raw runs are where they are 0 or 4, split at 4.
SKIP_BIT = 0x100
FOREIGN_BIT = 0x200
BREAK_BIT = 0x400
PAGE_BIT = 0x800
_TYPE_OF = tuple((m & 0xFF) - 256 if m & 0x80 else m & 0xFF for m in range(4096))
_SKIP_OF = tuple(bool(m & SKIP_BIT) for m in range(4096))
_META_HI = 1 if sys.byteorder == "little" else 0  # the byte of an array("H") item that holds bits 8..15
_META_LO = 1 - _META_HI
_HI_BREAK = bytes([BREAK_BIT >> 8])
_HI_RAW = bytes([0, BREAK_BIT >> 8])  # high meta bytes of records that can go raw
_HI_RAW_OK = bytes(1 if b in _HI_RAW else 0 for b in range(256))
_HI_NOT_PLAIN = bytes(0 if b in (0, SKIP_BIT >> 8) else 1 for b in range(256))  # break, page or foreign
_U32 = struct.Struct("<I")
# for the C-speed header checks of import_segment (on a little-endian host)
_LITTLE = sys.byteorder == "little"
_ZERO8 = bytes(8)
_MAGIC_LE = MAGIC32.to_bytes(4, "little")
_STORE_RB_BYTE = bytes([STORE_RB])
_FLAG_BYTES = bytes(range(FLAGS_MAX + 1))
_SKIP_FLAG_BYTES = bytes([SKIPPED, SKIPPED | RELEASED])
_MULT8_BYTES = bytes(range(0, 256, ALIGNMENT))
_PAD_BYTES = bytes(range(1, ALIGNMENT + 1))
_PLUS24 = bytes((b + BH_SIZE) & 0xFF for b in range(256))  # padding byte -> header + padding length


class Segment(NamedTuple):
    """Part of :meth:`GCache.export_segments`: seqnos ``first..last``, either as ``raw`` (a zero-copy view
    of the records exactly as on disk, for :meth:`GCache.import_segment` on a node of the same history)
    or as ``records`` (to be sent the ordinary way). Exactly one of the two is set."""

    first: int
    last: int
    raw: memoryview | None
    records: list[Record] | None


def segment_spans(raw: bytes | memoryview) -> tuple[list[int], list[int]]:
    """Where the payloads of a raw segment's records lie: ``(starts, ends)``, byte offsets into ``raw``
    (exact lengths, from the padding byte). Checks the structure only (sizes, padding bytes;
    :meth:`GCache.import_segment` checks every header field). Raises GcacheError if ``raw`` is not a
    sequence of whole records."""
    mv = _byte_view(raw)
    n = len(mv)
    starts: list[int] = []
    ends: list[int] = []
    add_start, add_end = starts.append, ends.append
    size_of = _U32.unpack_from
    off = 0
    while off < n:
        if off + BH_SIZE > n:
            raise GcacheError(f"raw segment truncated: a header at byte {off} of {n}")
        size = size_of(mv, off + 16)[0]
        end = off + size
        if size <= BH_SIZE or size & 7 or end > n:
            raise GcacheError(f"raw segment: bad record size {size} at byte {off} of {n}")
        pad = mv[end - 1]
        if not 1 <= pad <= ALIGNMENT:
            raise GcacheError(f"raw segment: bad padding byte {pad} in the record at byte {off}")
        add_start(off + BH_SIZE)
        add_end(end - pad)
        off = end
    return starts, ends


def segment_types(raw: bytes | memoryview, starts: Sequence[int]) -> bytes:
    """The type byte (WRITESET, CCHANGE, ...) of each record of a raw segment, given its payload ``starts``
    from :func:`segment_spans`."""
    mv = _byte_view(raw)
    return bytes(map(mv.__getitem__, map(sub, starts, repeat(1))))  # the header's last byte


def segment_payloads(raw: bytes | memoryview) -> list[memoryview]:
    """The payload views of the records of a raw segment (see :func:`segment_spans`, which checks it)."""
    mv = _byte_view(raw)
    starts, ends = segment_spans(mv)
    return list(map(mv.__getitem__, map(slice, starts, ends)))


def _byte_view(raw: bytes | memoryview) -> memoryview:
    mv = memoryview(raw)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


class _Page:
    __slots__ = ("count", "id", "max_seqno", "min_seqno", "mm", "mv", "path", "size", "used")

    def __init__(self, page_id: int, path: str, size: int, mm: mmap.mmap) -> None:
        self.id = page_id
        self.path = path
        self.size = size
        self.mm = mm
        self.mv = memoryview(mm)
        self.used = 0
        self.count = 0
        self.min_seqno = -1
        self.max_seqno = -1


def _allocate(fd: int, size: int, path: str) -> None:
    os.ftruncate(fd, size)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:  # not supported here: the sparse file still works, with SIGBUS on ENOSPC
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise GcacheError(f"cannot allocate {size} bytes for {path}: {exc.strerror}") from exc


def _write_buffer(mm: Any, pos: int, gcrc: int, seqno: int, total: int, flags: int, store: int,
                  type_: int, payload: Any, n: int) -> None:
    """Payload, then the padding length byte, then the header: a torn write fails the checksum."""
    crc = zlib.crc32(payload, zlib.crc32(CRC_PREFIX.pack(seqno, total, flags, store, type_), gcrc))
    body = pos + BH_SIZE
    mm[body:body + n] = payload
    mm[pos + total - 1] = total - BH_SIZE - n
    BH.pack_into(mm, pos, seqno, MAGIC_CTX | crc, total, flags, store, type_)


class GCache:
    """The write-set cache (``galera.cache`` plus overflow pages). Create with :meth:`open`."""

    def __init__(self, path: str, mm: mmap.mmap, pre: Preamble, *, readonly: bool, page_size: int,
                 keep_pages_size: int, sync: bool) -> None:
        self._path = path
        self._dir = os.path.dirname(os.path.abspath(path))
        self._mm = mm
        self._mv = memoryview(mm)
        self._file_size = len(mm)
        self._ring_size = self._file_size - FILE_OVERHEAD
        self._ring_end = RING_START + self._ring_size
        self._readonly = readonly
        self._page_size = page_size
        self._keep_pages_size = keep_pages_size
        self._sync = sync
        self._gid = pre.gid
        self._gid_crc = fmt.gid_crc(pre.gid)
        self._first = RING_START
        self._next = RING_START
        self._rollover: int | None = None
        # Payload offsets of buffers reclaimed in runs whose headers are not yet marked discarded: the write
        # that follows the allocation overwrites most of them, _mark_reclaimed() marks the rest.
        self._unmarked: list[array[int]] = []
        self._base = 1
        self._lo = 0
        self._pos = array("q")
        self._len = array("q")
        self._meta = array("H")
        self._where = array("i")
        self._next_seqno = 1
        self._locks: dict[int, int] = {}
        self._locked: int | None = None
        self._pages: list[_Page] = []
        self._views: dict[int, memoryview] = {0: self._mv}
        self._page_counter = 0
        self._pages_created = 0
        self._pages_deleted = 0
        self._appended = 0
        self._evicted = 0
        self._closed = False
        self._mapped = True

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, size: int | str = 128 * MiB, recover: bool = True,
             page_size: int | str = 128 * MiB, keep_pages_size: int | str = 0, sync: bool = False,
             readonly: bool = False) -> GCache:
        """Open (or create) a gcache file.

        A missing or empty file is created (GID = nil until :meth:`reset`). An existing file is recovered:
        after a clean close from the preamble, otherwise by scanning the ring (``recover=True``, Galera 4's
        default) or by discarding its history (``recover=False``). A file of another size is re-created
        empty ("GCache size changed ... history reset"), keeping its GID. Leftover page files are deleted.
        ``readonly=True`` never writes (``istd gcache inspect``); the size then comes from the file.

        Raises GcacheCorrupt if the file is not a gcache at all (bad preamble, unsupported version,
        shorter than the fixed header), GcacheError for I/O errors, ValueError for bad arguments.
        """
        path = os.fspath(path)
        size_b, page_b, keep_b = (fmt.parse_size(v) for v in (size, page_size, keep_pages_size))
        if size_b < fmt.MIN_SIZE_BYTES:
            raise ValueError(f"gcache.size must be at least {fmt.MIN_SIZE_BYTES} bytes, got {size_b}")
        if page_b < 1:
            raise ValueError(f"gcache.page_size must be positive, got {page_b}")
        if readonly:
            return cls._open_readonly(path, recover)
        expected = size_b + FILE_OVERHEAD
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o660)
        except OSError as exc:
            raise GcacheError(f"cannot open gcache file {path}: {exc.strerror}") from exc
        try:
            file_size = os.fstat(fd).st_size
            wipe = True
            if file_size == 0:
                pre = Preamble(fmt.VERSION, NIL_UUID)
                log.info("Creating GCache ring buffer %s of %d bytes", path, size_b)
            else:
                pre = read_preamble(path, os.pread(fd, PREAMBLE_LEN, 0), file_size)
                if file_size != expected:
                    log.warning("GCache size changed from %d to %d bytes (%s): history reset",
                                file_size - FILE_OVERHEAD, size_b, path)
                elif pre.gid == NIL_UUID:
                    log.info("Skipped GCache ring buffer recovery: could not determine history UUID.")
                elif not pre.synced and not recover:
                    log.warning("GCache ring buffer %s was not closed cleanly and gcache.recover is off: "
                                "history reset", path)
                else:
                    wipe = False
            if wipe:
                os.ftruncate(fd, RING_START)  # zero the whole ring cheaply: nothing old can resurface
                _allocate(fd, expected, path)
            mm = mmap.mmap(fd, expected)
        except OSError as exc:
            raise GcacheError(f"cannot open gcache file {path}: {exc.strerror}") from exc
        finally:
            os.close(fd)
        gc = cls(path, mm, pre, readonly=False, page_size=page_b, keep_pages_size=keep_b, sync=sync)
        try:
            gc._write_preamble(synced=False)  # from now on a crash leaves an unsynced file
            if not wipe:
                gc._recover(pre)
            else:
                mm[RING_START:RING_START + BH_SIZE] = ZERO_BH
            gc._delete_leftover_pages()
        except BaseException:
            gc._release()
            raise
        return gc

    @classmethod
    def _open_readonly(cls, path: str, recover: bool) -> GCache:
        try:
            with open(path, "rb") as f:
                file_size = os.fstat(f.fileno()).st_size
                pre = read_preamble(path, f.read(PREAMBLE_LEN), file_size)
                mm = mmap.mmap(f.fileno(), file_size, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise GcacheError(f"cannot open gcache file {path}: {exc.strerror}") from exc
        gc = cls(path, mm, pre, readonly=True, page_size=1, keep_pages_size=0, sync=False)
        if pre.gid == NIL_UUID:
            log.info("Skipped GCache ring buffer recovery: could not determine history UUID.")
        elif pre.synced or recover:
            gc._recover(pre)
        return gc

    def _recover(self, pre: Preamble) -> None:
        rec = recover_ring(self._mv, self._ring_end, pre)
        run = rec.run
        if not run:
            self._next_seqno = 1
            self._base = 1
            if not self._readonly:
                for p in rec.discard:
                    BH_MARK.pack_into(self._mm, p.offset, SEQNO_ILL, MAGIC_CTX)
                self._ring_reset_positions()
            return
        self._base = run[0].seqno
        self._pos = array("q", [p.offset + BH_SIZE for p in run])
        self._len = array("q", [p.length for p in run])
        self._meta = array("H", [(p.type & 0xFF) | (SKIP_BIT if p.flags & SKIPPED else 0)
                                 | (FOREIGN_BIT if p.checksum == "none" else 0)
                                 | (0 if p.offset == prev_end else BREAK_BIT)
                                 for p, prev_end in zip(run, [-1] + [q.end for q in run[:-1]], strict=True)])
        self._where = array("i", bytes(4 * len(run)))
        self._next_seqno = run[-1].seqno + 1
        self._first, self._next, self._rollover = rec.first, rec.next, rec.rollover
        if self._readonly:
            return
        mm = self._mm
        for p in rec.discard:
            BH_MARK.pack_into(mm, p.offset, SEQNO_ILL, MAGIC_CTX)
        while self._rollover is not None and self._next + BH_SIZE > self._first:
            self._reclaim_one()  # no locks yet: always succeeds
            if self._first == self._next:
                self._ring_reset_positions()
        mm[self._next:self._next + BH_SIZE] = ZERO_BH
        if rec.foreign:
            # Galera leaves old buffers in free space; zero it so that a torn write of ours can never
            # complete one of them into a plausible-looking buffer.
            if self._rollover is None:
                self._zero(self._next, self._ring_end + BH_SIZE)
                self._zero(RING_START, self._first)
            else:
                self._zero(self._next, self._first)

    def _zero(self, start: int, end: int) -> None:
        """Zero [start, end) of the file, leaving pages that are zero already untouched (not dirtied)."""
        mm = self._mm
        for a in range(start, end, ZERO_CHUNK_BYTES):
            b = min(a + ZERO_CHUNK_BYTES, end)
            if _NONZERO.search(mm, a, b) is not None:
                mm[a:b] = bytes(b - a)

    def _delete_leftover_pages(self) -> None:
        try:
            names = sorted(os.listdir(self._dir))
        except OSError:
            return
        for name in names:
            if PAGE_NAME_RE.fullmatch(name):
                full = os.path.join(self._dir, name)
                try:
                    os.unlink(full)
                    log.info("Deleted page %s", full)
                except OSError as exc:
                    log.warning("Could not delete leftover page %s: %s", full, exc.strerror)

    # ------------------------------------------------------------------ properties

    @property
    def path(self) -> str:
        return self._path

    @property
    def gid(self) -> uuid.UUID:
        return self._gid

    @property
    def seqno_min(self) -> int:
        """Lowest cached seqno, -1 when empty (this is wsrep_local_cached_downto)."""
        return self._base + self._lo if self._lo < len(self._pos) else -1

    @property
    def seqno_max(self) -> int:
        """Highest cached seqno, -1 when empty."""
        return self._base + len(self._pos) - 1 if self._lo < len(self._pos) else -1

    @property
    def next_seqno(self) -> int:
        """The seqno the next append gets: seqno_max + 1, or the reset position + 1 when empty."""
        return self._next_seqno

    @property
    def seqno_locked(self) -> int | None:
        """Lowest locked seqno, None if nothing is locked."""
        return self._locked

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._pos) - self._lo

    def __contains__(self, seqno: object) -> bool:
        return isinstance(seqno, int) and self._lo <= seqno - self._base < len(self._pos)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._gid}:{self.seqno_min}-{self.seqno_max}"
        return f"<GCache {self._path} {state}>"

    def __enter__(self) -> GCache:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------ history

    def reset(self, gid: uuid.UUID, seqno: int) -> None:
        """Galera's ``seqno_reset(gid, seqno)``: make the cache consistent with the node's position.

        Same gid and ``seqno_max >= seqno``: drop only the seqnos above ``seqno`` (none if equal). Otherwise
        discard every cached write-set, adopt ``gid``; the next append is ``seqno + 1``. The preamble
        gets the new GID at once. Raises GcacheError if a locked seqno would be dropped.
        """
        self._check_writable()
        if not isinstance(gid, uuid.UUID):
            raise TypeError(f"gid must be a uuid.UUID, got {type(gid).__name__}")
        if seqno < -1:
            raise ValueError(f"seqno must be >= -1, got {seqno}")
        smax = self.seqno_max
        if gid == self._gid and smax >= seqno and smax >= 0:
            if seqno < smax:
                self._drop_tail(seqno)
            return
        if gid == self._gid and smax < 0 and seqno == self._next_seqno - 1:
            return
        if self._locks:
            raise GcacheError(f"cannot reset the gcache history to {gid}:{seqno} while seqnos are locked "
                              f"(lowest {self._locked}): unlock them first")
        old_pos = smax if smax >= 0 else self._next_seqno - 1
        log.info("GCache history reset: %s:%d -> %s:%d", self._gid, old_pos, gid, seqno)
        self._mark_ring_discarded()
        for page in list(self._pages):
            self._delete_page(page)
        self._base = self._next_seqno = seqno + 1
        self._lo = 0
        del self._pos[:], self._len[:], self._meta[:], self._where[:]
        self._ring_reset_positions()
        self._gid = gid
        self._gid_crc = fmt.gid_crc(gid)
        self._write_preamble(synced=False)
        if self._sync:
            self._mm.flush()

    def _drop_tail(self, seqno: int) -> None:
        i0 = seqno + 1 - self._base
        for s, n in self._locks.items():
            if s > seqno and n:
                raise GcacheError(f"cannot drop seqnos above {seqno}: seqno {s} is locked")
        log.info("GCache: discarding seqnos %d-%d beyond %s:%d", max(seqno + 1, self.seqno_min),
                 self.seqno_max, self._gid, seqno)
        mm = self._mm
        if i0 <= self._lo:
            self._mark_ring_discarded()  # also buffers evicted but not reclaimed yet
        else:
            for i in range(i0, len(self._pos)):
                if self._where[i] == 0:
                    BH_MARK.pack_into(mm, self._pos[i] - BH_SIZE, SEQNO_ILL, MAGIC_CTX)
        if i0 <= self._lo:
            del self._pos[:], self._len[:], self._meta[:], self._where[:]
            self._base, self._lo = seqno + 1, 0
        else:
            del self._pos[i0:], self._len[i0:], self._meta[i0:], self._where[i0:]
        self._next_seqno = seqno + 1
        for page in list(self._pages):
            if page.min_seqno > seqno:
                self._delete_page(page)
            elif page.max_seqno > seqno:
                page.max_seqno = seqno
        self._advance_first_over_dead()
        if self._sync:
            self._mm.flush()

    def _mark_ring_discarded(self) -> None:
        """Mark every buffer between first and next discarded (-1), so none can come back."""
        mm = self._mm
        pos, end = self._first, self._next
        steps = 0
        while pos != end and steps <= self._ring_size // BH_SIZE:
            steps += 1
            seqno, size = _SEQ_SIZE_S.unpack_from(mm, pos)
            if size == 0:
                pos = RING_START
                continue
            if size < BH_SIZE or size & 7:
                break
            if seqno != SEQNO_ILL:
                BH_MARK.pack_into(mm, pos, SEQNO_ILL, MAGIC_CTX)
            pos += size

    # ------------------------------------------------------------------ ring allocation

    def _ring_reset_positions(self) -> None:
        self._first = self._next = RING_START
        self._rollover = None
        self._mm[RING_START:RING_START + BH_SIZE] = ZERO_BH

    def _reclaim_one(self) -> bool:
        """Reclaim the buffer at ``first``. False if it holds a seqno that may not be evicted (locked)."""
        mm = self._mm
        f = self._first
        seqno, size = _SEQ_SIZE_S.unpack_from(mm, f)
        if size == 0:  # rollover mark
            self._first = RING_START
            self._rollover = None
            return True
        if size < BH_SIZE or size & 7 or f + size > self._ring_end:
            raise GcacheCorrupt(f"{self._path}: ring buffer chain broken at offset {f} (size {size}); "
                                "was the file modified by another process? Move it away to start empty")
        i = seqno - self._base
        if self._lo <= i < len(self._pos) and self._pos[i] == f + BH_SIZE and self._where[i] == 0:
            if self._locked is not None and seqno >= self._locked:
                return False
            self._evict_upto(seqno)
        if seqno != SEQNO_ILL:
            BH_MARK.pack_into(mm, f, SEQNO_ILL, MAGIC_CTX)
        self._first = f + size
        return True

    def _ring_alloc(self, total: int, want: int, *, defer_marks: bool = False) -> int | None:
        """Find room for a ``total``-byte buffer at ``next``, reclaiming buffers at ``first`` as needed
        (preferably room for ``want`` bytes, so that a batch is written contiguously). Returns the header
        offset, or None if locked seqnos leave no room. ``defer_marks``: the caller copies whole records
        (headers, payloads and padding) to the returned offset and then calls :meth:`_mark_reclaimed`, so
        only reclaimed headers beyond its copy need marking (writers of single buffers leave their padding
        unwritten, where a mark's bytes must stay as they would have been)."""
        mm = self._mm
        unpack = _SEQ_SIZE_S.unpack_from
        mark = BH_MARK.pack_into
        self._mark_reclaimed(None)  # left by a write that failed half way (none normally)
        while True:
            f, n = self._first, self._next
            if f == n:
                if n != RING_START or self._rollover is not None:
                    self._ring_reset_positions()
                return RING_START
            if f < n:
                if n + total <= self._ring_end:
                    return n
                start = RING_START
            else:
                start = n
            if f - start - BH_SIZE >= want:
                break
            # Reclaim at first until there is room for `want`, the rollover mark or next is reached,
            # or a locked seqno blocks. The same steps as _reclaim_one(), inlined: this is the hot loop
            # of a full ring.
            target = start + BH_SIZE + want
            base, lo, index, where = self._base, self._lo, self._pos, self._where
            npos = len(index)
            locked = self._locked
            blocked = False
            size = -1
            while f < target and f != n:
                if lo < npos and index[lo] == f + BH_SIZE and where[lo] == 0:
                    # the oldest cached seqno is here: reclaim the run of buffers that follow it at once
                    x = self._reclaimable_run(lo, f, target)
                    if x > lo + 1:
                        if defer_marks:
                            self._unmarked.append(index[lo:x])
                        else:
                            for p in index[lo:x]:
                                mark(mm, p - BH_SIZE, SEQNO_ILL, MAGIC_CTX)
                        f = index[x - 1] - BH_SIZE + ((self._len[x - 1] + 32) & -8)
                        lo = x
                        size = -1
                        continue
                seqno, size = unpack(mm, f)
                if size == 0:
                    break
                if size < BH_SIZE or size & 7 or f + size > self._ring_end:
                    self._first = f
                    self._evict_to(lo)
                    self._reclaim_one()  # raises GcacheCorrupt
                i = seqno - base
                if lo <= i < npos and index[i] == f + BH_SIZE and where[i] == 0:
                    if locked is not None and seqno >= locked:
                        blocked = True
                        break
                    lo = i + 1
                if seqno != SEQNO_ILL:
                    mark(mm, f, SEQNO_ILL, MAGIC_CTX)
                f += size
            self._first = f
            self._evict_to(lo)
            if size == 0 and f != n:  # reached the rollover mark: the end of the ring is free now
                self._first = RING_START
                self._rollover = None
                continue
            if blocked:
                if f - start - BH_SIZE >= total:
                    break
                self._mark_reclaimed(None)  # nothing is written to the ring: mark them all
                return None
        if start != n:  # wrap: the zero header at next stays as the rollover mark
            self._rollover = n
            self._next = RING_START
        return start

    def _mark_reclaimed(self, end: int | None) -> None:
        """Mark discarded (seqno_g = -1, as Galera's discard does) the headers of reclaimed buffers that the
        write which just ended at ``end`` (followed by its zero header) did not overwrite. Called after
        every write to the ring. Until then, a reclaimed buffer is intact and valid: recovery after a
        crash in between may find it again, a true record of this history, which is harmless. ``end`` None:
        nothing was written, mark them all."""
        if not self._unmarked:
            return
        mm = self._mm
        mark = BH_MARK.pack_into
        # The mark (seqno_g, ctx: 16 bytes) of a header at h >= end + 16 outlives the write and the zero header
        # at end, exactly as if it had been marked before both; one at end + 16 overlaps that zero header,
        # which is then written again.
        keep = -1 if end is None else end + BH_SIZE + 16
        overlap = False
        for run in self._unmarked:
            survivors = run[bisect.bisect_left(run, keep):]
            for p in survivors:
                mark(mm, p - BH_SIZE, SEQNO_ILL, MAGIC_CTX)
            overlap = overlap or (end is not None and len(survivors) > 0 and survivors[0] < end + 2 * BH_SIZE)
        self._unmarked.clear()
        if overlap:
            assert end is not None
            mm[end:end + BH_SIZE] = ZERO_BH

    def _reclaimable_run(self, lo: int, f: int, target: int) -> int:
        """Index entry ``lo`` (the oldest cached) has its buffer at ``f``: the end x of the entries lo..x-1
        that follow it contiguously in the ring (no break, page or foreign bit), start before ``target``
        and are not locked. Found with a byte search and a bisect, not a loop over buffers."""
        index = self._pos
        m = min(len(index), lo + (target - f) // 32 + 1)  # a buffer is at least 32 bytes
        k = self._meta[lo + 1:m].tobytes()[_META_HI::2].translate(_HI_NOT_PLAIN).find(1)
        stop = m if k < 0 else lo + 1 + k
        x = bisect.bisect_left(index, target + BH_SIZE, lo, stop)
        if self._locked is not None:
            x = min(x, self._locked - self._base)
        return x

    def _advance_first_over_dead(self) -> None:
        """Reclaim buffers at ``first`` that no longer hold a cached seqno (after page trimming)."""
        mm = self._mm
        while self._first != self._next:
            f = self._first
            seqno, size = _SEQ_SIZE_S.unpack_from(mm, f)
            if size:
                i = seqno - self._base
                if self._lo <= i < len(self._pos) and self._pos[i] == f + BH_SIZE and self._where[i] == 0:
                    return
            self._reclaim_one()
        self._ring_reset_positions()

    def _evict_upto(self, seqno: int) -> None:
        self._evict_to(seqno - self._base + 1)

    def _evict_to(self, k: int) -> None:
        """Evict index entries below ``k`` (seqnos below base + k)."""
        k = min(k, len(self._pos))
        if k <= self._lo:
            return
        self._evicted += k - self._lo
        self._lo = k
        if self._pages:
            smin = self._base + k
            for page in list(self._pages):
                if page.max_seqno < smin:
                    self._delete_page(page)
        if k >= COMPACT_MIN_ENTRIES and 2 * k > len(self._pos):
            del self._pos[:k], self._len[:k], self._meta[:k], self._where[:k]
            self._base += k
            self._lo = 0

    # ------------------------------------------------------------------ pages

    def _new_page(self, need: int) -> _Page:
        size = max(self._page_size, need)
        name = os.path.join(self._dir, f"gcache.page.{self._page_counter:06d}")
        self._page_counter += 1
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o660)
            try:
                _allocate(fd, size, name)
                mm = mmap.mmap(fd, size)
            finally:
                os.close(fd)
        except (OSError, GcacheError) as exc:
            with contextlib.suppress(OSError):
                os.unlink(name)
            what = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise GcacheFull(f"Cannot create new cache page: {name}: {what}. The ring buffer is full of "
                             f"locked write-sets (lowest locked seqno {self._locked}); free disk space in "
                             f"{self._dir} or raise gcache.size") from exc
        page = _Page(self._page_counter, name, size, mm)
        self._pages.append(page)
        self._views[page.id] = page.mv
        self._pages_created += 1
        log.info("Created page %s of size %d bytes", name, size)
        return page

    def _delete_page(self, page: _Page) -> None:
        self._pages.remove(page)
        del self._views[page.id]
        page.mv.release()
        with contextlib.suppress(BufferError):  # a caller still holds views: the mapping dies with them
            page.mm.close()
        try:
            os.unlink(page.path)
        except OSError as exc:
            log.warning("Could not delete page %s: %s", page.path, exc.strerror)
        self._pages_deleted += 1
        log.info("Deleted page %s", page.path)

    def _page_put(self, seqno: int, total: int, flags: int, type_: int, payload: Any,
                  n: int) -> tuple[int, int]:
        page = self._pages[-1] if self._pages else None
        if page is None or page.size - page.used < total:
            page = self._new_page(total)
        pos = page.used
        _write_buffer(page.mm, pos, self._gid_crc, seqno, total, flags, STORE_PAGE, type_, payload, n)
        page.used += total
        page.count += 1
        if page.min_seqno < 0:
            page.min_seqno = seqno
        page.max_seqno = seqno
        return page.id, pos + BH_SIZE

    def _trim_pages(self) -> None:
        while self._pages and sum(p.size for p in self._pages) > self._keep_pages_size:
            page = self._pages[0]
            if self._locked is not None and page.max_seqno >= self._locked:
                return
            if page.max_seqno < self._base + self._lo:
                self._delete_page(page)
            else:
                self._evict_upto(page.max_seqno)
        self._advance_first_over_dead()

    # ------------------------------------------------------------------ appending

    def _check_writable(self) -> None:
        if self._closed:
            raise GcacheError(f"{self._path}: gcache is closed")
        if self._readonly:
            raise GcacheError(f"{self._path}: gcache was opened read-only")

    def append(self, payload: Any, type: int = WRITESET, *, seqno: int | None = None,
               skipped: bool = False) -> int:
        """Cache one write-set (bytes-like) and return its seqno (``next_seqno`` unless given; a given
        seqno must equal ``next_seqno``). Raises GcacheError (out of order, closed, read-only) or
        GcacheFull (no room in the ring and no page could be created)."""
        self._check_writable()
        s = self._next_seqno
        if seqno is not None and seqno != s:
            raise GcacheError(f"append: seqno {seqno} out of order, the next seqno is {s}")
        if s < 1:
            raise GcacheError(f"append: no valid position (next seqno {s}); call reset(gid, seqno) first")
        if not -128 <= type <= 127:
            raise ValueError(f"type must fit in a signed byte, got {type}")
        n = len(payload)
        total = (n + BH_SIZE + 8) & -8
        flags = RELEASED | (SKIPPED if skipped else 0)
        pos = self._ring_alloc(total, total) if total <= self._ring_size // 2 else None
        if pos is None:
            where, p = self._page_put(s, total, flags, type, payload, n)
            brk = PAGE_BIT | BREAK_BIT
        else:
            mm = self._mm
            end = pos + total
            mm[end:end + BH_SIZE] = ZERO_BH
            _write_buffer(mm, pos, self._gid_crc, s, total, flags, STORE_RB, type, payload, n)
            self._next = end
            brk = self._break_bit(pos)
            where, p = 0, pos + BH_SIZE
        self._pos.append(p)
        self._len.append(n)
        self._meta.append((type & 0xFF) | (SKIP_BIT if skipped else 0) | brk)
        self._where.append(where)
        self._next_seqno = s + 1
        self._appended += 1
        if self._sync:
            self._flush_all()
        return s

    def append_many(self, payloads: Sequence[Any], types: bytes | None = None, *,
                    first: int | None = None) -> tuple[int, int]:
        """Cache consecutive write-sets (bytes-likes) at ``next_seqno`` (``first``, if given, must equal
        it); ``types`` holds one type byte (0..127) per write-set, default all WRITESET. Returns
        ``(first, last)`` (``last = first - 1`` for an empty batch). Errors as :meth:`append`; on
        GcacheFull the write-sets before the failing one stay cached."""
        self._check_writable()
        count = len(payloads)
        s0 = self._next_seqno
        if first is not None and first != s0:
            raise GcacheError(f"append_many: first seqno {first} out of order, the next seqno is {s0}")
        if s0 < 1:
            raise GcacheError(f"append_many: no valid position (next seqno {s0}); call reset() first")
        if types is not None:
            if len(types) != count:
                raise ValueError(f"append_many: {len(types)} types for {count} payloads")
            if count and max(types) > 127:
                raise ValueError("append_many: types must be 0..127")
            tys = bytes(types)
        else:
            tys = bytes(count)
        if count == 0:
            return s0, s0 - 1
        lens = [len(p) for p in payloads]
        totals = [(n + 32) & -8 for n in lens]
        cum = list(accumulate(totals, initial=0))  # cum[k]: bytes of write-sets [0, k)
        half = self._ring_size // 2
        big = [k for k, t in enumerate(totals) if t > half]  # these go to pages (as in Galera)
        i = 0
        try:
            while i < count:
                t = totals[i]
                pos = self._ring_alloc(t, min(cum[-1] - cum[i], self._ring_size)) if t <= half else None
                if pos is None:
                    ty = tys[i]
                    where, p_off = self._page_put(s0 + i, t, RELEASED, ty, payloads[i], lens[i])
                    self._pos.append(p_off)
                    self._len.append(lens[i])
                    self._meta.append(ty | PAGE_BIT | BREAK_BIT)
                    self._where.append(where)
                    self._next_seqno = s0 + i + 1
                    i += 1
                    continue
                limit = self._first - BH_SIZE if self._rollover is not None else self._ring_end
                # the longest run i..j-1 that fits contiguously at pos, stopping before a page-bound one
                j = bisect.bisect_right(cum, cum[i] + limit - pos, i + 1) - 1
                if big:
                    k = bisect.bisect_right(big, i)
                    if k < len(big):
                        j = min(j, big[k])
                self._put_run(pos, payloads, lens, totals, tys, cum, s0, i, j)
                i = j
        finally:
            self._appended += self._next_seqno - s0
            if self._sync:
                self._flush_all()
        return s0, s0 + count - 1

    def _break_bit(self, h: int) -> int:
        """BREAK_BIT unless a ring buffer at ``h`` directly follows the previous seqno's ring buffer (one of
        istd's: a foreign buffer's size is not computed from its length so)."""
        if not self._pos or self._meta[-1] & (FOREIGN_BIT | PAGE_BIT):
            return BREAK_BIT
        return 0 if self._pos[-1] + ((self._len[-1] + 32) & -8) == h + BH_SIZE else BREAK_BIT

    def _put_run(self, pos: int, payloads: Sequence[Any], lens: list[int], totals: list[int], tys: bytes,
                 cum: list[int], s0: int, i: int, j: int) -> None:
        """Write write-sets i..j-1 contiguously at ``pos`` (room already made), zero header first."""
        mm = self._mm
        end = pos + cum[j] - cum[i]
        brk = self._break_bit(pos)
        mm[end:end + BH_SIZE] = ZERO_BH
        crc32 = zlib.crc32
        pfx = CRC_PREFIX.pack
        put_bh = BH.pack_into
        gcrc = self._gid_crc
        cur = pos
        s = s0 + i
        for p, n, t, ty in zip(payloads[i:j], lens[i:j], totals[i:j], tys[i:j], strict=True):
            c = crc32(p, crc32(pfx(s, t, RELEASED, STORE_RB, ty), gcrc))
            b = cur + BH_SIZE
            mm[b:b + n] = p
            mm[cur + t - 1] = t - BH_SIZE - n
            put_bh(mm, cur, s, MAGIC_CTX | c, t, RELEASED, STORE_RB, ty)
            cur += t
            s += 1
        off = pos + BH_SIZE - cum[i]
        k = len(self._meta)
        self._pos.extend([off + c for c in cum[i:j]])
        self._len.extend(lens[i:j])
        self._meta.extend(tys[i:j])
        self._meta[k] |= brk
        self._where.frombytes(bytes(4 * (j - i)))
        self._next = end
        self._next_seqno = s0 + j

    # ------------------------------------------------------------------ raw segments (fast IST)

    def import_segment(self, first: int, raw: bytes | memoryview,
                       count: int | None = None) -> tuple[int, list[int]]:
        """Append the records of ``raw``, a raw segment from :meth:`export_segments` on a node of the same
        history (GID), at ``next_seqno``, which ``first`` must equal. Returns ``(last seqno, payload
        lengths)`` (``first - 1, []`` for an empty ``raw``).

        Every header is checked (seqnos consecutive from ``first``, size, store RB, the istd magic, flags,
        the padding byte, ``raw`` ending at the end of the last record, as many records as ``count`` if it
        is given) but payload crcs are not recomputed (the transport has its own checksum), except the
        first record's: a run of another history is refused rather than cached where no recovery would
        find it. On any of these BadSegment (a GcacheError), and nothing is appended. The records are
        copied into the ring a contiguous stretch at a time, split only where the ring wraps or eviction
        stops; where locks block the ring, or a record is larger than half the ring, records go to pages
        one by one (as :meth:`append`). GcacheFull as :meth:`append_many`: the records before the failing
        one stay cached."""
        self._check_writable()
        s0 = self._next_seqno
        if first != s0:
            raise GcacheError(f"import_segment: first seqno {first} out of order, the next seqno is {s0}")
        if s0 < 1:
            raise GcacheError(f"import_segment: no valid position (next seqno {s0}); call reset() first")
        if self._gid == NIL_UUID:
            raise GcacheError("import_segment: the cache has no history GID; call reset(gid, seqno) first")
        mv = _byte_view(raw)
        n = len(mv)
        if n == 0:
            if count:
                raise BadSegment(f"import_segment: an empty run, {count} records were announced")
            return s0 - 1, []
        sizes, lens, metas = _parse_run(mv, s0)
        if count is not None and len(lens) != count:
            raise BadSegment(f"import_segment: the run holds {len(lens)} records, {count} were announced")
        count = len(lens)
        seqno, ctx, size, flags, store, ty = BH.unpack_from(mv, 0)
        if fmt.record_crc(self._gid_crc, seqno, size, flags, store, ty, mv[BH_SIZE:BH_SIZE + lens[0]]) \
                != ctx & 0xFFFFFFFF:
            raise BadSegment(f"import_segment: the checksum of seqno {s0} does not match this cache's "
                              f"history {self._gid}: the run belongs to another history or is damaged")
        half = self._ring_size // 2
        big: list[int] = []
        if n > half and max(sizes) > half:  # these go to pages (as in append)
            big = [k for k, t in enumerate(sizes) if t > half]
        cum: list[int] = []  # record offsets in raw, and n: only needed when the run is written in parts
        i = 0
        try:
            while i < count:
                t = sizes[i]
                if i and not cum:
                    cum = list(accumulate(sizes, initial=0))
                pos = (self._ring_alloc(t, min(n - cum[i] if i else n, self._ring_size), defer_marks=True)
                       if t <= half else None)
                if pos is None:
                    if not cum:
                        cum = list(accumulate(sizes, initial=0))
                    h = cum[i]
                    _s, _c, _t, fl, _st, ty = BH.unpack_from(mv, h)
                    where, p_off = self._page_put(s0 + i, t, fl, ty, mv[h + BH_SIZE:h + BH_SIZE + lens[i]],
                                                  lens[i])
                    self._pos.append(p_off)
                    self._len.append(lens[i])
                    self._meta.append(metas[i] | PAGE_BIT | BREAK_BIT)
                    self._where.append(where)
                    self._next_seqno = s0 + i + 1
                    i += 1
                    continue
                limit = self._first - BH_SIZE if self._rollover is not None else self._ring_end
                if i == 0 and not big and n <= limit - pos:  # the whole run at once (the common case)
                    j, a, b = count, 0, n
                    positions = list(accumulate(sizes[:-1], initial=pos + BH_SIZE))
                else:
                    if not cum:
                        cum = list(accumulate(sizes, initial=0))
                    # the longest run i..j-1 that fits contiguously at pos, stopping before a page-bound one
                    j = bisect.bisect_right(cum, cum[i] + limit - pos, i + 1) - 1
                    if big:
                        k = bisect.bisect_right(big, i)
                        if k < len(big):
                            j = min(j, big[k])
                    a, b = cum[i], cum[j]
                    off = pos + BH_SIZE - a
                    positions = [off + c for c in cum[i:j]]
                end = pos + b - a
                brk = self._break_bit(pos)
                mm = self._mm
                mm[end:end + BH_SIZE] = ZERO_BH
                mm[pos:end] = mv[a:b]  # headers included: a torn copy fails the torn record's crc
                self._mark_reclaimed(end)
                k = len(self._meta)
                self._pos.fromlist(positions)
                self._len.fromlist(lens[i:j])
                if isinstance(metas, bytes):  # type bytes: widen to the array's 16 bits at C speed
                    wide = bytearray(2 * (j - i))
                    wide[_META_LO::2] = metas[i:j]
                    self._meta.frombytes(wide)
                else:
                    self._meta.fromlist(metas[i:j])
                self._meta[k] |= brk
                self._where.frombytes(bytes(4 * (j - i)))
                self._next = end
                self._next_seqno = s0 + j
                i = j
        finally:
            self._appended += self._next_seqno - s0
            if self._sync:
                self._flush_all()
        return s0 + count - 1, lens

    # ------------------------------------------------------------------ reading

    def get(self, seqno: int) -> Record:
        """The cached write-set ``seqno``; SeqnoNotInCache if it is not cached. See :class:`Record` for
        how long the payload view stays valid."""
        i = seqno - self._base
        if not self._lo <= i < len(self._pos) or self._closed:
            raise SeqnoNotInCache(f"seqno {seqno} not in cache ({self._range_text()})")
        p = self._pos[i]
        m = self._meta[i]
        view = self._views[self._where[i]]
        return _new(Record, (seqno, _TYPE_OF[m], _SKIP_OF[m], view[p:p + self._len[i]]))

    def _index_span(self, first: int, last: int) -> tuple[int, int]:
        """Index positions [i0, i1) of seqnos first..last; SeqnoNotInCache unless all are cached."""
        i0 = first - self._base
        i1 = last - self._base + 1
        if i0 < self._lo or i1 > len(self._pos) or self._closed:
            raise SeqnoNotInCache(f"seqnos {first}-{last} not in cache ({self._range_text()})")
        return i0, i1

    def get_range(self, first: int, last: int) -> list[Record]:
        """Write-sets ``first..last`` inclusive (empty list if ``last < first``), as zero-copy views into
        the mapping. SeqnoNotInCache if any of them is not cached."""
        if last < first:
            return []
        i0, i1 = self._index_span(first, last)
        pos = self._pos[i0:i1]
        lens = self._len[i0:i1]
        meta = self._meta[i0:i1]
        T, K = _TYPE_OF, _SKIP_OF
        seqnos = range(first, last + 1)
        if self._pages:
            wh = self._where[i0:i1]
            if any(wh):
                views = self._views
                return [_new(Record, (s, T[m], K[m], views[w][p:p + n]))
                        for s, p, n, m, w in zip(seqnos, pos, lens, meta, wh, strict=True)]
        mv = self._mv
        return [_new(Record, (s, T[m], K[m], mv[p:p + n]))
                for s, p, n, m in zip(seqnos, pos, lens, meta, strict=True)]

    def export_segments(self, first: int, last: int) -> list[Segment]:
        """Write-sets ``first..last`` as few :class:`Segment` s as possible, in order. Runs of istd records
        in the ring come as ``raw``: a zero-copy view of the bytes on disk (headers, payloads, padding),
        which :meth:`import_segment` on a node of the same history appends as they are; a run is split at
        the ring's rollover (and wherever discarded buffers lie between two cached ones). Records in pages,
        written by Galera, or skipped come as ``records`` (from :meth:`get_range`). SeqnoNotInCache if any
        seqno is not cached. The views live as :meth:`get_range`'s do. No Python work per record for a
        raw run: its bounds come from the index, its breaks from a byte search over the index's flags."""
        if last < first:
            return []
        i0, i1 = self._index_span(first, last)
        hi = self._meta[i0:i1].tobytes()[_META_HI::2]
        if not hi.translate(None, _HI_RAW):  # nothing in a page, skipped or foreign
            return self._raw_segments(i0, i1, hi, i0)
        raw_ok = hi.translate(_HI_RAW_OK)
        segs: list[Segment] = []
        k = i1 - i0
        i = 0
        while i < k:
            good = raw_ok[i]
            j = raw_ok.find(b"\0" if good else b"\1", i)
            if j < 0:
                j = k
            if good:
                segs += self._raw_segments(i0 + i, i0 + j, hi, i0)
            else:
                a, b = self._base + i0 + i, self._base + i0 + j - 1
                segs.append(_new(Segment, (a, b, None, self.get_range(a, b))))
            i = j
        return segs

    def _raw_segments(self, i: int, j: int, hi: bytes, h0: int) -> list[Segment]:
        """Raw segments for index entries i..j-1, all istd records in the ring (``hi``: the high bytes of
        the meta entries from entry ``h0``): one per stretch between break bits (the first one's is moot)."""
        pos, lens, mv = self._pos, self._len, self._mv
        base = self._base
        segs: list[Segment] = []
        a = i
        while True:
            x = hi.find(_HI_BREAK, a + 1 - h0, j - h0)
            b = j if x < 0 else x + h0
            end = pos[b - 1] - BH_SIZE + ((lens[b - 1] + 32) & -8)
            segs.append(_new(Segment, (base + a, base + b - 1, mv[pos[a] - BH_SIZE:end], None)))
            if x < 0:
                return segs
            a = b

    def _range_text(self) -> str:
        if self._closed:
            return "gcache closed"
        if self.seqno_min < 0:
            return "cache empty"
        return f"cached: {self.seqno_min}-{self.seqno_max}"

    # ------------------------------------------------------------------ locking

    def lock(self, seqno: int) -> None:
        """Pin ``seqno`` and everything after it against eviction (a donor does this before IST).
        Locks are counted: each lock() needs its unlock(). SeqnoNotInCache if not cached."""
        if self._closed:
            raise GcacheError(f"{self._path}: gcache is closed")
        if seqno not in self:
            raise SeqnoNotInCache(f"seqno {seqno} not in cache ({self._range_text()})")
        self._locks[seqno] = self._locks.get(seqno, 0) + 1
        if self._locked is None or seqno < self._locked:
            self._locked = seqno

    def unlock(self, seqno: int) -> None:
        """Undo one lock(seqno); then trim overflow pages beyond keep_pages_size. GcacheError if
        ``seqno`` is not locked."""
        n = self._locks.get(seqno, 0)
        if n == 0:
            raise GcacheError(f"unlock({seqno}) without a matching lock()")
        if n == 1:
            del self._locks[seqno]
            self._locked = min(self._locks) if self._locks else None
        else:
            self._locks[seqno] = n - 1
        if self._pages and not self._closed and not self._readonly:
            self._trim_pages()

    # ------------------------------------------------------------------ durability, closing

    def _write_preamble(self, synced: bool) -> None:
        if synced:
            lo, hi = self._ring_run()
            text = fmt.format_preamble(self._gid, True, lo, hi, self._first if lo >= 0 else -1)
        else:
            text = fmt.format_preamble(self._gid, False)
        self._mm[:PREAMBLE_LEN] = text
        self._mm.flush(0, min(mmap.PAGESIZE, len(self._mm)))

    def _ring_run(self) -> tuple[int, int]:
        """The seqno range a recovery would find in the ring: its highest gapless run (pages are lost)."""
        n = len(self._pos)
        if self._lo >= n:
            return -1, -1
        if not self._pages:
            return self._base + self._lo, self._base + n - 1
        w = self._where
        hi = n - 1
        while hi >= self._lo and w[hi] != 0:
            hi -= 1
        if hi < self._lo:
            return -1, -1
        lo = hi
        while lo > self._lo and w[lo - 1] == 0:
            lo -= 1
        return self._base + lo, self._base + hi

    def _flush_all(self) -> None:
        self._mm.flush()
        for page in self._pages:
            page.mm.flush()

    def flush(self) -> None:
        """msync the ring and the pages to disk."""
        if not self._closed and not self._readonly:
            self._flush_all()

    def abandon(self) -> None:
        """Let go of the file the way a killed process does: unmap without writing the clean-close preamble
        and without deleting the pages, so the next open() sees an unclean close. For crash tests and drills;
        daemons call close()."""
        for page in list(self._pages):
            page.mv.release()
            page.mm.close()
        self._mv.release()
        self._mm.close()
        self._closed = True
        self._mapped = False

    def close(self) -> None:
        """Write the clean-close preamble (seqno_min/max, offset, synced: 1), delete the pages (their
        contents do not survive a restart, as in Galera) and unmap. Idempotent. Raises GcacheError if the
        caller still holds payload views (release them and call close() again)."""
        if not self._closed:
            self._closed = True
            if not self._readonly:
                self._mark_reclaimed(None)
                self._ring_state_for_close()
                for page in list(self._pages):
                    self._delete_page(page)
                self._write_preamble(synced=True)
                self._mm.flush()
            self._locks.clear()
            self._locked = None
        if self._mapped:
            self._mv.release()
            try:
                self._mm.close()
            except BufferError:
                self._mv = memoryview(self._mm)
                raise GcacheError(f"{self._path}: cannot unmap the gcache while payload views from get() or "
                                  "get_range() are alive; drop them (or call .release()) and close() again"
                                  ) from None
            self._mapped = False

    def _ring_state_for_close(self) -> None:
        # seqnos that only lived in pages are gone now: forget them
        lo, hi = self._ring_run()
        if lo < 0:
            del self._pos[:], self._len[:], self._meta[:], self._where[:]
            self._base, self._lo = self._next_seqno, 0
            return
        self._lo = lo - self._base
        del self._pos[hi - self._base + 1:], self._len[hi - self._base + 1:]
        del self._meta[hi - self._base + 1:], self._where[hi - self._base + 1:]

    def _release(self) -> None:
        """Unmap without writing anything (failed open)."""
        self._closed = True
        for page in list(self._pages):
            self._delete_page(page)
        self._mv.release()
        with contextlib.suppress(BufferError):
            self._mm.close()
        self._mapped = False

    def statistics(self) -> dict[str, Any]:
        """Counters and sizes, for logs and the HTTP status endpoint."""
        f, n = self._first, self._next
        if f == n:
            used = 0
        elif self._rollover is None:
            used = n - f
        else:
            used = (self._rollover - f) + (n - RING_START)
        return {
            "path": self._path,
            "gid": str(self._gid),
            "seqno_min": self.seqno_min,
            "seqno_max": self.seqno_max,
            "count": len(self),
            "next_seqno": self._next_seqno,
            "seqno_locked": self._locked,
            "locks": sum(self._locks.values()),
            "ring_size": self._ring_size,
            "ring_used": used,
            "ring_free": self._ring_size - used,
            "ring_first": f,
            "ring_next": n,
            "wrapped": self._rollover is not None,
            "pages": len(self._pages),
            "page_bytes": sum(p.size for p in self._pages),
            "pages_created": self._pages_created,
            "pages_deleted": self._pages_deleted,
            "appended": self._appended,
            "evicted": self._evicted,
            "readonly": self._readonly,
            "sync": self._sync,
            "closed": self._closed,
        }


def _parse_run(mv: memoryview, first: int) -> tuple[Sequence[int], list[int], bytes | list[int]]:
    """Check the headers of a raw run (see :meth:`GCache.import_segment`) and return the record sizes,
    the payload lengths and the index meta entries. GcacheError if bad.

    Fast path: the only Python loop steps from size to size, copying each header with the 8 bytes before
    it (the previous record's padding byte is the last of them); then every field of every header is
    checked at C speed at fixed strides of that copy. Any doubt goes to :func:`_parse_run_checked`, the
    per-record reference, which finds the bad record and says what is wrong with it."""
    n = len(mv)
    if n & 7 or n < 32 or not _LITTLE:
        return _parse_run_checked(mv, first)
    src = b"".join((_ZERO8, mv))  # record k's header is src[o + 8:o + 32], its size field src[o + 24:o + 28]
    size_at = memoryview(src)[24:].cast("I")
    heads: list[bytes] = []
    add = heads.append
    off = 0
    try:
        while off < n:
            add(src[off:off + 32])
            off += size_at[off >> 2] or n  # a zero size must not loop (it fails the checks below)
    except IndexError:  # a header cut short at the end
        return _parse_run_checked(mv, first)
    k = len(heads)
    heads.append(src[n:n + 8])  # ends with the last record's padding byte
    blob = b"".join(heads)
    hv = memoryview(blob)
    h32 = hv.cast("I") if len(blob) == 32 * k + 8 else None
    if h32 is None:
        return _parse_run_checked(mv, first)
    sizes = array("I")
    sizes.frombytes(h32[6::8].tobytes())
    pads = blob[39::32]
    lens = list(map(sub, sizes, pads.translate(_PLUS24)))
    flags_lo = blob[28::32]
    if (off != n  # the sizes add up to n (a zero size, which added n, fails min(lens) below)
            or blob[24::32].translate(None, _MULT8_BYTES)  # sizes are multiples of 8 (so offsets are)
            or pads.translate(None, _PAD_BYTES)
            or min(lens) < 0  # with the two checks above: every size >= 32
            or hv.cast("q")[1::4].tobytes() != struct.pack(f"<{k}q", *range(first, first + k))
            or h32[5::8].tobytes() != _MAGIC_LE * k
            or blob[30::32] != _STORE_RB_BYTE * k
            or blob[29::32] != bytes(k)
            or flags_lo.translate(None, _FLAG_BYTES)):
        return _parse_run_checked(mv, first)
    types = blob[31::32]
    if _SKIP_FLAG_BYTES[0] in flags_lo or _SKIP_FLAG_BYTES[1] in flags_lo:
        return sizes, lens, [t | (f & SKIPPED) << 7 for t, f in zip(types, flags_lo, strict=True)]
    return sizes, lens, types


def _parse_run_checked(mv: memoryview, first: int) -> tuple[list[int], list[int], list[int]]:
    """The reference for :func:`_parse_run`: one header at a time, with a precise error."""
    n = len(mv)
    unpack = BH.unpack_from
    sizes: list[int] = []
    lens: list[int] = []
    metas: list[int] = []
    off = 0
    s = first
    while off < n:
        if off + BH_SIZE > n:
            raise BadSegment(f"import_segment: raw run truncated: a header at byte {off} of {n}")
        seqno, ctx, size, flags, store, ty = unpack(mv, off)
        if seqno != s or size <= BH_SIZE or size & 7 or store != STORE_RB or ctx >> 32 != MAGIC32 \
                or flags > FLAGS_MAX:
            raise BadSegment(_bad_header(off, s, seqno, ctx, size, flags, store))
        end = off + size
        if end > n:
            raise BadSegment(f"import_segment: raw run truncated: seqno {s} at byte {off} ends at byte "
                              f"{end}, the run at {n}")
        pad = mv[end - 1]
        if not 1 <= pad <= ALIGNMENT:
            raise BadSegment(f"import_segment: bad padding byte {pad} in seqno {s} at byte {off}")
        sizes.append(size)
        lens.append(size - BH_SIZE - pad)
        metas.append((ty & 0xFF) | (flags & SKIPPED) << 7)
        off = end
        s += 1
    return sizes, lens, metas


def _bad_header(off: int, s: int, seqno: int, ctx: int, size: int, flags: int, store: int) -> str:
    if seqno != s:
        why = f"seqno {seqno}, expected {s}"
    elif size <= BH_SIZE or size & 7:
        why = f"bad size {size}"
    elif store != STORE_RB:
        why = f"store {store}, not RB ({STORE_RB})"
    elif ctx >> 32 != MAGIC32:
        why = f"no istd checksum (ctx {ctx:#x})"
    else:
        why = f"bad flags {flags:#x}"
    return f"import_segment: bad record header at byte {off}: {why}"
