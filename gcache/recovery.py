"""Finding the write-sets in a ring buffer after a restart, and ``scan()`` for ``istd gcache inspect``.

Theory of operation
-------------------
Buffers in the ring form a *chain*: each one ends where the next begins; a zero header ends the chain
(``next``) or marks the rollover point, after which the chain continues at byte 1280. Seqnos along the
chain need not be increasing (Galera assigns seqnos after allocation, and its files show it), so the
chain gives the layout and the seqnos give the history:

1. Collect candidate buffers. After a clean close the preamble's ``offset`` points at the oldest buffer:
   walk the chain from there, through the rollover to 1280 and on to the zero header (Galera's
   ``RingBuffer::scan``). Otherwise (``synced: 0``, a bogus offset, or a clean walk that does not end
   its run at the preamble's ``seqno_max``) scan the whole ring: follow chains while they hold, and
   between them let a regex find the next plausible header tail (C speed over zero runs and garbage).
2. Duplicated seqnos: identical contents keep one copy, differing contents discard both (and the seqno
   becomes a hole).
3. The newest seqno M picks the chain; if that chain starts at 1280 the chain before the wrap is the one,
   lying after it, that ends in a zero header and lengthens the run most.
4. Keep the highest gapless run of seqnos M, M-1, ... found on that chain. ``first`` is the run's
   earliest buffer along the chain, ``next`` the end of its latest one. Everything else found with a
   seqno is discarded (marked ``seqno_g = -1`` in place, as Galera's ``empty_buffer`` does, when the
   file is writable), so that it can never come back in a later recovery.

A buffer is trusted when its header is structurally valid (Galera's ``BH_test``: size >= 24, a multiple
of 8, inside the ring, flags <= 3, store = RB, seqno >= -1) and, for istd's buffers, the crc32 in ``ctx``
matches (the GID is part of it, so buffers of an older history never match). Torn writes, zeroed
headers, flipped bits and seqno holes therefore shorten the run; they never yield wrong bytes.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import mmap
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from istd.errors import GcacheCorrupt

from . import format as fmt
from .format import BH_SIZE, RING_START, ZERO_BH, Preamble, Probe, probe

log = logging.getLogger("istd.gcache")
PREFIX = "Recovering GCache ring buffer: "


@dataclass
class Recovered:
    """The outcome of recovery: the kept run (by seqno) and the ring pointers."""

    run: list[Probe] = field(default_factory=list)  # seqno order, gapless
    first: int = RING_START
    next: int = RING_START
    rollover: int | None = None  # zero header where the chain wraps, if first > next
    discard: list[Probe] = field(default_factory=list)  # found with a seqno, not kept: mark them
    found: list[Probe] = field(default_factory=list)  # every buffer examined
    duplicates: list[int] = field(default_factory=list)
    method: str = "empty"  # 'preamble' | 'scan' | 'empty' | 'skipped'
    foreign: bool = False  # some buffer was written by Galera (no istd checksum)


def _is_zero(buf: Any, pos: int) -> bool:
    return bytes(buf[pos:pos + BH_SIZE]) == ZERO_BH


def walk_from(buf: Any, offset: int, ring_end: int, gcrc: int) -> tuple[list[Probe], int | None]:
    """Follow the chain from ``offset``, through one rollover to 1280 (Galera's two segments). Returns
    the buffers in ring order and the index where the second segment starts (None if no wrap)."""
    chain: list[Probe] = []
    pos = offset
    wrap_at: int | None = None
    add = chain.append
    while pos <= ring_end:
        if wrap_at is not None and pos >= offset:
            break
        p = probe(buf, pos, ring_end, gcrc)
        if p is not None:
            add(p)
            pos = p.end
            continue
        if not _is_zero(buf, pos) or wrap_at is not None or offset == RING_START:
            break
        wrap_at = len(chain)
        pos = RING_START
    return chain, wrap_at


def find_all(buf: Any, ring_end: int, gcrc: int) -> dict[int, Probe]:
    """Every plausible buffer header in the ring, by offset. Follows chains where they hold (skipping
    the bodies of trusted buffers) and searches for the next header tail with a regex elsewhere."""
    found: dict[int, Probe] = {}
    search = fmt.HEADER_TAIL.search
    pos = RING_START
    tail_end = ring_end  # the tail of a header at h occupies [h+20, h+24)
    while pos + BH_SIZE <= ring_end:
        p = probe(buf, pos, ring_end, gcrc)
        if p is not None:
            found[pos] = p
            pos = p.end if p.checksum != "bad" else pos + fmt.ALIGNMENT
            continue
        start = pos + fmt.ALIGNMENT + 20
        while True:
            m = search(buf, start, tail_end)
            if m is None:
                return found
            h = m.start() - 20
            if (h - RING_START) % fmt.ALIGNMENT == 0:
                break
            start = m.start() + 1
        pos = h
    return found


def _resolve_duplicates(buf: Any, usable: Iterable[Probe]) -> tuple[dict[int, Probe], set[int], list[int]]:
    """Map seqno -> one trusted buffer. Identical copies keep one; differing copies discard all."""
    by_seqno: dict[int, Probe] = {}
    conflicted: set[int] = set()
    dups: list[int] = []
    seen_twice: dict[int, int] = {}
    for p in usable:
        old = by_seqno.get(p.seqno)
        if old is None:
            by_seqno[p.seqno] = p
            continue
        n = seen_twice.get(p.seqno, 1) + 1
        seen_twice[p.seqno] = n
        if n == 2:
            dups.append(p.seqno)
        a, b = old.offset + BH_SIZE, p.offset + BH_SIZE
        same = (old.length == p.length and old.flags == p.flags and old.type == p.type
                and bytes(buf[a:a + old.length]) == bytes(buf[b:b + p.length]))
        log.info("Attempt (%d) to reuse the same seqno: %d. New buffer at offset %d, previous at offset %d",
                 n - 1, p.seqno, p.offset, old.offset)
        if same:
            log.info("Contents are the same, discarding buffer at offset %d", p.offset)
        else:
            log.info("Contents differ. Discarding both.")
            conflicted.add(p.seqno)
    for s in conflicted:
        del by_seqno[s]
    return by_seqno, conflicted, dups


def _trusted(candidates: Iterable[Probe]) -> list[Probe]:
    """Ordered buffers whose bytes can be trusted. Galera's buffers (no checksum) always come before
    istd's in a history (istd appends after what it found), so one claiming a seqno above istd's lowest
    is a damaged istd header, not Galera's."""
    usable = [p for p in candidates if p.usable]
    ours = [p.seqno for p in usable if p.checksum == "ok"]
    if not ours:
        return usable
    floor = min(ours)
    return [p for p in usable if p.checksum == "ok" or p.seqno < floor]


def _run_on_chain(chain: list[Probe], top: int, keep: dict[int, Probe]) -> list[Probe]:
    """The gapless run top, top-1, ... of trusted buffers that lie on ``chain``."""
    on_chain = {p.offset for p in chain}
    run: list[Probe] = []
    s = top
    while (p := keep.get(s)) is not None and p.offset in on_chain:
        run.append(p)
        s -= 1
    run.reverse()
    return run


def _finish(rec: Recovered, chain: list[Probe], wrap_at: int | None, run: list[Probe],
            candidates: Iterable[Probe]) -> Recovered:
    rec.run = run
    if not run:
        rec.discard = [p for p in candidates if p.seqno > 0]
        return rec
    index = {p.offset: i for i, p in enumerate(chain)}
    idx = sorted(index[p.offset] for p in run)
    lo, hi = idx[0], idx[-1]
    rec.first = chain[lo].offset
    rec.next = chain[hi].end
    if wrap_at is not None and lo < wrap_at <= hi:
        rec.rollover = chain[wrap_at - 1].end
    kept = sorted((p.offset, p.end) for p in run)
    starts = [a for a, _ in kept]

    def overlaps_run(p: Probe) -> bool:
        i = bisect.bisect_right(starts, p.offset + 16) - 1
        return i >= 0 and kept[i][1] > p.offset

    in_run = {p.offset for p in run}
    rec.discard = [p for p in candidates if p.seqno > 0 and p.offset not in in_run and not overlaps_run(p)]
    return rec


def recover_ring(buf: Any, ring_end: int, pre: Preamble, *, verbose: bool = True) -> Recovered:
    """Work out which write-sets a ring holds (see the module docstring). Never raises; never writes."""
    gcrc = fmt.gid_crc(pre.gid)
    info = log.info if verbose else log.debug
    offset = pre.offset
    if offset != -1 and (offset < RING_START or offset + BH_SIZE > ring_end
                         or (offset - RING_START) % fmt.ALIGNMENT):
        log.warning("Bogus offset in GCache ring buffer preamble: %d. Assuming unknown.", offset)
        offset = -1
    info("%sversion: %d, UUID: %s, offset: %d", PREFIX, pre.version, pre.gid, offset)

    rec = Recovered()
    if pre.synced and pre.seqno_min == -1 and pre.seqno_max == -1 and offset == -1:
        info("%sdidn't recover any events.", PREFIX)
        rec.method = "empty"
        return rec

    if pre.synced and offset != -1:
        chain, wrap_seg = walk_from(buf, offset, ring_end, gcrc)
        keep, _conf, dups = _resolve_duplicates(buf, _trusted(chain))
        if keep:
            top = max(keep)
            run = _run_on_chain(chain, top, keep)
            # the newest must be where the preamble says; the run may start higher (damage, holes)
            if run and run[-1].seqno == pre.seqno_max and run[0].seqno >= pre.seqno_min:
                rec.method = "preamble"
                rec.found = chain
                rec.duplicates = dups
                rec.foreign = any(p.checksum == "none" and p.seqno > 0 for p in chain)
                _finish(rec, chain, wrap_seg, run, chain)
                _log_result(rec, info)
                return rec
        log.warning("%sthe buffer chain from offset %d does not hold seqnos %d-%d as the preamble says; "
                    "scanning the whole ring", PREFIX, offset, pre.seqno_min, pre.seqno_max)

    found = find_all(buf, ring_end, gcrc)
    rec.method = "scan"
    rec.found = sorted(found.values(), key=lambda p: p.offset)
    rec.foreign = any(p.checksum == "none" and p.seqno > 0 for p in rec.found)
    keep, _conf, rec.duplicates = _resolve_duplicates(buf, _trusted(rec.found))
    if not keep:
        _finish(rec, [], None, [], rec.found)
        _log_result(rec, info)
        return rec
    top = max(keep)
    mrec = keep[top]
    by_end = {p.end: p for p in rec.found}
    # the chain through the newest buffer: backwards, then forwards
    back: list[Probe] = []
    p = mrec
    while (q := by_end.get(p.offset)) is not None and q.offset < p.offset:
        back.append(q)
        p = q
    back.reverse()
    chain = [*back, mrec]
    end = mrec.end
    while (q := found.get(end)) is not None:
        chain.append(q)
        end = q.end
    wrap_at: int | None = None
    chosen: list[Probe] = []
    best = _run_on_chain(chain, top, keep)
    if chain[0].offset == RING_START:
        # the segment before the rollover lies after this chain and ends in a zero header
        for c in rec.found:
            if c.offset < end + BH_SIZE or not _is_zero(buf, c.end):
                continue
            seg = [c]
            p = c
            while (q := by_end.get(p.offset)) is not None and end + BH_SIZE <= q.offset < p.offset:
                seg.append(q)
                p = q
            seg.reverse()
            run = _run_on_chain(seg + chain, top, keep)
            if len(run) > len(best):
                best, wrap_at, chosen = run, len(seg), seg
        if wrap_at is not None:
            chain = chosen + chain
    _finish(rec, chain, wrap_at, best, rec.found)
    _log_result(rec, info)
    return rec


def _log_result(rec: Recovered, info: Any) -> None:
    if rec.run:
        info("%sfound gapless sequence %d-%d", PREFIX, rec.run[0].seqno, rec.run[-1].seqno)
        lower = [p.seqno for p in rec.discard if p.seqno < rec.run[0].seqno]
        if lower:
            info("%sdiscarding seqnos %d-%d", PREFIX, min(lower), max(lower))
    else:
        info("%sdidn't recover any events.", PREFIX)


# ---------------------------------------------------------------------------------------------------
# scan(): read-only analysis for `istd gcache inspect`


@dataclass(frozen=True)
class ScanRecord:
    """One buffer header found in the ring."""

    seqno: int
    offset: int  # of the header, from the start of the file
    size: int  # total, incl. header and padding
    type: int
    flags: int
    store: int
    checksum: str  # 'ok' | 'bad' | 'none'
    length: int  # payload bytes


@dataclass(frozen=True)
class ScanReport:
    """What ``open()`` would recover from a gcache file, and everything found on the way."""

    path: str
    file_size: int
    ring_size: int
    version: int
    gid: uuid.UUID
    synced: bool
    preamble_seqno_min: int
    preamble_seqno_max: int
    preamble_offset: int
    method: str  # 'preamble' (clean close), 'scan' (unclean), 'empty', 'skipped' (nil GID)
    records: tuple[ScanRecord, ...]  # every buffer header found in the ring, by offset
    seqno_min: int  # the kept gapless run, -1 if none
    seqno_max: int
    first: int  # ring offsets after recovery (of the oldest buffer / the zero header), -1 if empty
    next: int
    wrapped: bool
    holes: tuple[tuple[int, int], ...]  # seqno ranges missing between the lowest and highest seen
    duplicates: tuple[int, ...]  # seqnos found more than once
    discarded: int  # trusted buffers with a seqno that are not kept
    garbage: int  # istd buffers whose checksum does not match

    @property
    def count(self) -> int:
        return 0 if self.seqno_min < 0 else self.seqno_max - self.seqno_min + 1


def read_preamble(path: str, raw: bytes, file_size: int) -> Preamble:
    """Parse and check a preamble, raising GcacheCorrupt with advice if the file is not a gcache."""
    advice = "move it away (istd then starts with an empty cache) or point gcache.name elsewhere"
    if file_size < fmt.FILE_OVERHEAD:
        raise GcacheCorrupt(f"{path}: truncated, {file_size} bytes is too small for a gcache file; {advice}")
    try:
        pre = fmt.parse_preamble(raw)
    except ValueError as exc:
        raise GcacheCorrupt(f"{path}: not a gcache file ({exc}); {advice}") from exc
    if pre.version != fmt.VERSION:
        raise GcacheCorrupt(f"{path}: unsupported gcache version {pre.version} (istd reads version "
                            f"{fmt.VERSION}, as written by Galera 4); {advice}")
    return pre


def scan(path: str | os.PathLike[str]) -> ScanReport:
    """Analyse a gcache file without writing to it. Raises GcacheCorrupt if it is not a gcache file
    (bad preamble, unknown version, truncated below the fixed header); OSError if it cannot be read."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        raw = f.read(fmt.PREAMBLE_LEN)
        pre = read_preamble(path, raw, file_size)
        ring_end = file_size - BH_SIZE
        with mmap.mmap(f.fileno(), file_size, access=mmap.ACCESS_READ) as mm:
            mv = memoryview(mm)
            try:
                if pre.gid == fmt.NIL_UUID:
                    rec = Recovered(method="skipped")
                else:
                    rec = recover_ring(mv, ring_end, pre, verbose=False)
                known = {p.offset: p for p in rec.found}
                if rec.method != "scan":
                    known.update(find_all(mv, ring_end, fmt.gid_crc(pre.gid)))
                records = tuple(ScanRecord(p.seqno, p.offset, p.size, p.type, p.flags, p.store, p.checksum,
                                           p.length) for p in sorted(known.values(), key=lambda p: p.offset))
            finally:
                mv.release()
    seqnos = sorted({r.seqno for r in records if r.seqno > 0 and r.checksum != "bad"})
    holes = tuple((a + 1, b - 1) for a, b in itertools.pairwise(seqnos) if b > a + 1)
    seen: dict[int, int] = {}
    for r in records:
        if r.seqno > 0:
            seen[r.seqno] = seen.get(r.seqno, 0) + 1
    run = rec.run
    kept = {p.offset for p in run}
    return ScanReport(
        path=path, file_size=file_size, ring_size=file_size - fmt.FILE_OVERHEAD, version=pre.version,
        gid=pre.gid, synced=pre.synced, preamble_seqno_min=pre.seqno_min,
        preamble_seqno_max=pre.seqno_max, preamble_offset=pre.offset, method=rec.method, records=records,
        seqno_min=run[0].seqno if run else -1, seqno_max=run[-1].seqno if run else -1,
        first=rec.first if run else -1, next=rec.next if run else -1, wrapped=rec.rollover is not None,
        holes=holes, duplicates=tuple(sorted(s for s, n in seen.items() if n > 1)),
        discarded=sum(1 for r in records if r.seqno > 0 and r.checksum != "bad" and r.offset not in kept),
        garbage=sum(1 for r in records if r.checksum == "bad"),
    )
