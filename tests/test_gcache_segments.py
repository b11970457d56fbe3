"""gcache raw segments: export_segments() / import_segment() / segment_payloads(), the fast IST path.

Two caches of the same history (A the donor, B the joiner), each in its own directory (pages live next to
the cache file). Rings are a few buffers long so that wrap-around, eviction and locks happen at once: a
103-byte payload makes a 128-byte buffer.
"""

from __future__ import annotations

import itertools
import shutil
import struct
import tempfile
import uuid
import zlib
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gcache import CCHANGE, WRITESET, GCache, Segment, segment_payloads
from gcache import format as fmt
from gcache.cache import _parse_run, _parse_run_checked
from istd.errors import BadSegment, GcacheError, SeqnoNotInCache

GID = uuid.UUID("0ba80362-e6b2-11f1-a838-fff90686b220")
GID2 = uuid.UUID("73532c34-e6b2-11f1-8e78-379a68782da0")
REC = 128  # buffer size of a 103-byte payload
REAL = Path(__file__).resolve().parents[2] / "shared" / "reference" / "real-galera" / "galera.cache"
if not REAL.exists():
    REAL = Path("/work/shared/reference/real-galera/galera.cache")

Model = dict[int, tuple[int, bool, bytes]]


def payload(seqno: int, n: int = 103, salt: int = 0) -> bytes:
    return bytes((seqno * 31 + salt + k) % 256 for k in range(n))


def open_cache(d: Path, size: int, **kw: object) -> GCache:
    d.mkdir(exist_ok=True)
    return GCache.open(d / "galera.cache", size=size, **kw)  # type: ignore[arg-type]


def new_cache(d: Path, size: int, gid: uuid.UUID = GID, **kw: object) -> GCache:
    gc = open_cache(d, size, **kw)
    gc.reset(gid, 0)
    return gc



def contents(gc: GCache) -> Model:
    if gc.seqno_min < 0:
        assert gc.seqno_max == -1 and len(gc) == 0
        return {}
    recs = gc.get_range(gc.seqno_min, gc.seqno_max)
    assert [r.seqno for r in recs] == list(range(gc.seqno_min, gc.seqno_max + 1))  # gapless
    assert len(gc) == len(recs) == gc.statistics()["count"]
    return {r.seqno: (r.type, r.skipped, bytes(r.payload)) for r in recs}


def kinds(segs: list[Segment]) -> list[tuple[str, int, int]]:
    return [("raw" if s.raw is not None else "records", s.first, s.last) for s in segs]


def check_segments(gc: GCache, segs: list[Segment], first: int, last: int) -> None:
    """segs cover first..last in order, hold what get_range holds, and are as few as possible."""
    assert [s.first for s in segs] == [first] + [s.last + 1 for s in segs[:-1]]
    assert (segs[-1].last if segs else first - 1) == last
    for s in segs:
        assert s.first <= s.last and (s.raw is None) != (s.records is None)
        want = [(r.type, r.skipped, bytes(r.payload)) for r in gc.get_range(s.first, s.last)]
        if s.raw is not None:
            got = [bytes(p) for p in segment_payloads(s.raw)]
            assert got == [w[2] for w in want]
            assert not any(w[1] for w in want)  # skipped records never go raw
            _sizes, _lens, metas = _parse_run_checked(s.raw, s.first)  # every header valid
            assert [m & 0xFF for m in metas] == [w[0] & 0xFF for w in want]
        else:
            assert s.records is not None
            assert [r.seqno for r in s.records] == list(range(s.first, s.last + 1))
            assert [(r.type, r.skipped, bytes(r.payload)) for r in s.records] == want
    # minimal: two raw segments in a row are not adjacent in the ring (they would have been one)
    for s1, s2 in itertools.pairwise(segs):
        if s1.raw is not None and s2.raw is not None:
            end1 = gc._pos[s1.last - gc._base] - 24 + fmt.buffer_size(len(segment_payloads(s1.raw)[-1]))
            assert end1 != gc._pos[s2.first - gc._base] - 24


def transfer(src: GCache, dst: GCache, first: int | None = None, last: int | None = None) -> list[Segment]:
    """What an IST does with segments: raw ones imported, the others appended one by one."""
    first = dst.next_seqno if first is None else first
    last = src.seqno_max if last is None else last
    segs = src.export_segments(first, last)
    check_segments(src, segs, first, last)
    for seg in segs:
        if seg.raw is not None:
            got_last, lens = dst.import_segment(seg.first, seg.raw)
            assert got_last == seg.last
            assert lens == [len(p) for p in segment_payloads(seg.raw)]
        else:
            assert seg.records is not None
            for r in seg.records:
                dst.append(r.payload, r.type, seqno=r.seqno, skipped=r.skipped)
    return segs


def record(seqno: int, data: bytes, *, flags: int = fmt.RELEASED, type_: int = 0, gid: uuid.UUID = GID,
           store: int = fmt.STORE_RB) -> bytes:
    """An istd buffer as on disk."""
    total = fmt.buffer_size(len(data))
    pad = total - 24 - len(data)
    crc = fmt.record_crc(zlib.crc32(gid.bytes), seqno, total, flags, store, type_, data)
    return fmt.BH.pack(seqno, fmt.MAGIC_CTX | crc, total, flags, store, type_) + data + bytes(pad - 1) + bytes([pad])


# ----------------------------------------------------------------------------------------- export


def test_export_one_raw_segment_is_the_bytes_on_disk(tmp_path: Path) -> None:
    a = new_cache(tmp_path / "a", 64 * REC)
    a.append_many([payload(s, 90 + s) for s in range(1, 11)], bytes([WRITESET] * 9 + [CCHANGE]))
    (seg,) = a.export_segments(1, 10)
    assert (seg.first, seg.last, seg.records) == (1, 10, None)
    assert seg.raw is not None
    start = a._pos[0] - 24
    end = a._pos[9] - 24 + fmt.buffer_size(100)
    assert bytes(seg.raw) == (tmp_path / "a" / "galera.cache").read_bytes()[start:end]
    assert kinds(a.export_segments(3, 7)) == [("raw", 3, 7)]
    assert kinds(a.export_segments(10, 10)) == [("raw", 10, 10)]
    assert a.export_segments(5, 4) == []
    for lo, hi in ((0, 3), (1, 11), (11, 11)):
        with pytest.raises(SeqnoNotInCache):
            a.export_segments(lo, hi)
    check_segments(a, a.export_segments(1, 10), 1, 10)
    del seg
    a.close()
    with pytest.raises(SeqnoNotInCache):
        a.export_segments(1, 1)


def test_export_splits_at_the_rollover(tmp_path: Path) -> None:
    a = new_cache(tmp_path / "a", 4 * REC)
    for s in range(1, 6):  # 1..4 fill the ring exactly; 5 wraps and must end 24 bytes before 3
        a.append(payload(s))
    assert a.statistics()["wrapped"] and a.seqno_min == 3
    segs = a.export_segments(3, 5)
    assert kinds(segs) == [("raw", 3, 4), ("raw", 5, 5)]
    assert segs[0].raw is not None and len(segs[0].raw) == 2 * REC and a._pos[3 - a._base] - 24 == 1280 + 2 * REC
    assert a._pos[5 - a._base] - 24 == 1280  # the second part starts at the ring start
    check_segments(a, segs, 3, 5)


def test_export_splits_where_discarded_buffers_lie(tmp_path: Path) -> None:
    a = new_cache(tmp_path / "a", 16 * REC)
    a.append_many([payload(s) for s in range(1, 6)])
    a.reset(GID, 3)  # 4 and 5 are marked discarded in place; new ones go after them
    a.append_many([payload(s, 50, salt=1) for s in (4, 5)])
    segs = a.export_segments(1, 5)
    assert kinds(segs) == [("raw", 1, 3), ("raw", 4, 5)]
    check_segments(a, segs, 1, 5)
    b = new_cache(tmp_path / "b", 16 * REC)
    transfer(a, b)
    assert contents(b) == contents(a)
    assert kinds(b.export_segments(1, 5)) == [("raw", 1, 5)]  # one stretch in B


def test_mixed_segments_pages_and_skipped(tmp_path: Path) -> None:
    a = new_cache(tmp_path / "a", 8 * REC, page_size=4096)
    a.append(payload(1))
    a.append(payload(2), CCHANGE)
    a.append(payload(3), skipped=True)
    a.append(payload(4, 600))  # more than half the ring: a page
    a.append(payload(5))
    a.append(payload(6), CCHANGE)
    a.append(payload(7, 0), skipped=True)
    segs = a.export_segments(1, 7)
    assert kinds(segs) == [("raw", 1, 2), ("records", 3, 4), ("raw", 5, 6), ("records", 7, 7)]
    check_segments(a, segs, 1, 7)
    assert kinds(a.export_segments(4, 6)) == [("records", 4, 4), ("raw", 5, 6)]
    assert kinds(a.export_segments(5, 6)) == [("raw", 5, 6)]
    b = new_cache(tmp_path / "b", 8 * REC, page_size=4096)
    transfer(a, b)
    assert contents(b) == contents(a)
    assert b.get(3).skipped and b.get(7).skipped and b.get(2).type == CCHANGE
    assert b.statistics()["pages"] == 1  # 4 went to a page in B too
    check_segments(b, b.export_segments(1, 7), 1, 7)


def test_export_of_locked_records_in_pages(tmp_path: Path) -> None:
    a = new_cache(tmp_path / "a", 4 * REC, page_size=4096)
    a.append_many([payload(s) for s in range(1, 5)])  # the ring is full
    a.lock(1)
    a.append_many([payload(s) for s in range(5, 8)])  # nothing can be evicted: pages
    segs = a.export_segments(1, 7)
    assert kinds(segs) == [("raw", 1, 4), ("records", 5, 7)]
    b = new_cache(tmp_path / "b", 4 * REC)
    transfer(a, b)
    got = contents(b)  # B evicted as it went
    assert b.seqno_max == 7 and got == {s: (0, False, payload(s)) for s in got}
    del segs
    a.unlock(1)


def foreign_header(seqno: int, body: bytes) -> bytes:
    """A buffer as Galera writes it: a pointer in ctx, no padding byte convention."""
    total = (24 + len(body) + 7) & -8
    return fmt.BH.pack(seqno, 0x5555_0000_1000, total, fmt.RELEASED, fmt.STORE_RB, 0) + body + bytes(
        total - 24 - len(body))


def test_records_written_by_galera_go_as_records(tmp_path: Path) -> None:
    a = new_cache(tmp_path / "a", 16 * REC)
    a.abandon()
    path = tmp_path / "a" / "galera.cache"
    raw = b"".join(foreign_header(s, payload(s, 64)) for s in (1, 2, 3))
    with open(path, "r+b") as f:
        f.seek(1280)
        f.write(raw + bytes(24))
    a = open_cache(tmp_path / "a", 16 * REC)
    assert (a.seqno_min, a.seqno_max) == (1, 3)
    a.append_many([payload(s) for s in (4, 5, 6)])
    segs = a.export_segments(1, 6)
    assert kinds(segs) == [("records", 1, 3), ("raw", 4, 6)]
    check_segments(a, segs, 1, 6)
    b = new_cache(tmp_path / "b", 16 * REC)
    transfer(a, b)
    assert contents(b) == contents(a)
    assert kinds(b.export_segments(1, 6)) == [("raw", 1, 6)]  # B wrote them all itself


@pytest.mark.skipif(not REAL.exists(), reason="no real Galera cache file")
def test_real_galera_file_exports_records(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    shutil.copyfile(REAL, tmp_path / "a" / "galera.cache")
    a = open_cache(tmp_path / "a", 1 << 20)
    assert a.gid == GID
    segs = a.export_segments(a.seqno_min, a.seqno_max)
    assert kinds(segs) == [("records", 328567, 328773)]
    del segs
    a.append_many([payload(s) for s in range(328774, 328784)])
    lo = max(a.seqno_min, 328770)
    assert kinds(a.export_segments(lo, 328783)) == [("records", lo, 328773), ("raw", 328774, 328783)]
    b = new_cache(tmp_path / "b", 1 << 20)
    b.reset(GID, a.seqno_min - 1)
    transfer(a, b)
    assert contents(b) == contents(a)


# ----------------------------------------------------------------------------------------- import


@pytest.mark.parametrize("b_ring", [4 * REC, 5 * REC, 8 * REC, 32 * REC])
def test_round_trip(tmp_path: Path, b_ring: int) -> None:
    a = new_cache(tmp_path / "a", 8 * REC)
    b = new_cache(tmp_path / "b", b_ring)
    model: Model = {}
    seen: set[str] = set()
    s = 1
    for rnd in range(40):
        batch = [payload(s + k, (rnd * 37 + k * 53) % 200, salt=rnd) for k in range(1 + rnd % 3)]
        types = bytes(CCHANGE if (s + k) % 7 == 0 else WRITESET for k in range(len(batch)))
        a.append_many(batch, types)
        for k, d in enumerate(batch):
            model[s + k] = (types[k], False, d)
        s += len(batch)
        segs = transfer(a, b)
        seen.add("split" if sum(x.raw is not None for x in segs) > 1 else "one")
        assert b.seqno_max == a.seqno_max == s - 1 and b.next_seqno == s
        got = contents(b)
        assert got == {k: model[k] for k in range(b.seqno_min, s)}
        assert b.statistics()["ring_used"] <= b_ring
        check_segments(b, b.export_segments(b.seqno_min, b.seqno_max), b.seqno_min, b.seqno_max)
    assert seen == {"split", "one"}  # some runs crossed A's rollover
    held = contents(b)
    b.close()
    b = open_cache(tmp_path / "b", b_ring)
    assert contents(b) == held  # clean reopen: the imported records walk and validate
    check_segments(b, b.export_segments(b.seqno_min, b.seqno_max), b.seqno_min, b.seqno_max)
    b.abandon()
    b = open_cache(tmp_path / "b", b_ring)
    assert contents(b) == held  # unclean reopen: the scan validates their crcs (same GID)
    a.append_many([payload(s) for s in range(s, s + 3)])
    transfer(a, b)  # and it goes on after the reopen
    ga, gb = contents(a), contents(b)
    assert b.seqno_max == a.seqno_max and all(ga[k] == gb[k] for k in ga.keys() & gb.keys())


def test_import_an_empty_run(tmp_path: Path) -> None:
    b = new_cache(tmp_path / "b", 4 * REC)
    assert b.import_segment(1, b"") == (0, [])
    assert b.next_seqno == 1 and b.seqno_max == -1


def test_import_into_pages_when_locked(tmp_path: Path) -> None:
    a = new_cache(tmp_path / "a", 32 * REC)
    a.append_many([payload(s) for s in range(1, 11)])
    b = new_cache(tmp_path / "b", 8 * REC, page_size=1024)
    (seg,) = a.export_segments(1, 4)
    assert seg.raw is not None
    b.import_segment(1, seg.raw)
    b.lock(1)
    (seg,) = a.export_segments(5, 10)
    assert seg.raw is not None
    assert b.import_segment(5, seg.raw) == (10, [103] * 6)
    # 5..8 filled the ring (one copy), 9 and 10 found it locked: pages
    assert kinds(b.export_segments(1, 10)) == [("raw", 1, 8), ("records", 9, 10)]
    assert b.statistics()["pages"] == 1
    assert contents(b) == {s: (0, False, payload(s)) for s in range(1, 11)}
    b.unlock(1)  # trimming the pages evicts everything up to their last seqno
    assert b.statistics()["pages"] == 0 and b.seqno_max == -1 and b.next_seqno == 11


def test_import_large_records_go_to_pages(tmp_path: Path) -> None:
    a = new_cache(tmp_path / "a", 64 * REC)
    sizes = [100, 700, 100, 100, 900, 100]
    a.append_many([payload(s, n) for s, n in enumerate(sizes, 1)])
    (seg,) = a.export_segments(1, 6)
    b = new_cache(tmp_path / "b", 8 * REC, page_size=4096)  # half the ring: 512 bytes
    assert seg.raw is not None
    assert b.import_segment(1, seg.raw) == (6, sizes)
    assert kinds(b.export_segments(1, 6)) == [("raw", 1, 1), ("records", 2, 2), ("raw", 3, 4), ("records", 5, 5),
                                              ("raw", 6, 6)]
    assert contents(b) == contents(a)


def test_import_sync_msyncs_once(tmp_path: Path) -> None:
    a = new_cache(tmp_path / "a", 32 * REC)
    a.append_many([payload(s) for s in range(1, 9)])
    b = new_cache(tmp_path / "b", 4 * REC, sync=True)
    calls = []
    b._flush_all = lambda: calls.append(1)  # type: ignore[method-assign]
    (seg,) = a.export_segments(1, 8)
    assert seg.raw is not None
    b.import_segment(1, seg.raw)  # wraps and evicts inside the run
    assert calls == [1]
    got = contents(b)
    assert b.seqno_max == 8 and got == {s: (0, False, payload(s)) for s in got}


def test_import_of_a_skipped_record(tmp_path: Path) -> None:
    """A raw run may carry SKIPPED (export never makes one, but the flag is valid)."""
    raw = record(1, payload(1)) + record(2, payload(2), flags=fmt.RELEASED | fmt.SKIPPED, type_=CCHANGE)
    b = new_cache(tmp_path / "b", 8 * REC)
    assert b.import_segment(1, raw) == (2, [103, 103])
    assert contents(b) == {1: (0, False, payload(1)), 2: (CCHANGE, True, payload(2))}
    assert kinds(b.export_segments(1, 2)) == [("raw", 1, 1), ("records", 2, 2)]
    b.abandon()
    b = open_cache(tmp_path / "b", 8 * REC)
    assert contents(b) == {1: (0, False, payload(1)), 2: (CCHANGE, True, payload(2))}


def test_negative_types_survive(tmp_path: Path) -> None:
    raw = record(1, payload(1), type_=-3) + record(2, payload(2, 5), type_=127)
    b = new_cache(tmp_path / "b", 8 * REC)
    b.import_segment(1, memoryview(bytearray(raw)))
    assert [(r.type, bytes(r.payload)) for r in b.get_range(1, 2)] == [(-3, payload(1)), (127, payload(2, 5))]


# ------------------------------------------------------------------------------- other histories


def test_import_of_another_history_is_refused(tmp_path: Path) -> None:
    a = new_cache(tmp_path / "a", 16 * REC)
    a.append_many([payload(s) for s in range(1, 4)])
    (seg,) = a.export_segments(1, 3)
    assert seg.raw is not None
    c = new_cache(tmp_path / "c", 16 * REC, gid=GID2)
    with pytest.raises(GcacheError, match="another history"):
        c.import_segment(1, seg.raw)
    assert c.next_seqno == 1 and len(c) == 0
    nil = open_cache(tmp_path / "n", 16 * REC)  # never reset: no GID
    with pytest.raises(GcacheError, match="no history GID"):
        nil.import_segment(1, seg.raw)


@pytest.mark.parametrize("synced", [False, True])
def test_recovery_under_another_gid_discards_imported_records(tmp_path: Path, synced: bool) -> None:
    a = new_cache(tmp_path / "a", 16 * REC)
    a.append_many([payload(s) for s in range(1, 6)])
    b = new_cache(tmp_path / "b", 16 * REC)
    transfer(a, b)
    offset = b._pos[0] - 24
    b.abandon()
    with open(tmp_path / "b" / "galera.cache", "r+b") as f:
        f.write(fmt.format_preamble(GID2, synced, 1, 5, offset))
    b = open_cache(tmp_path / "b", 16 * REC)
    assert b.gid == GID2 and (b.seqno_min, b.seqno_max) == (-1, -1)


def test_import_does_not_check_payload_crcs_but_recovery_does(tmp_path: Path) -> None:
    a = new_cache(tmp_path / "a", 16 * REC)
    a.append_many([payload(s) for s in range(1, 6)])
    (seg,) = a.export_segments(1, 5)
    assert seg.raw is not None
    raw = bytearray(seg.raw)
    raw[3 * REC + 50] ^= 1  # a payload byte of seqno 4: the transport's checksum would have caught it
    b = new_cache(tmp_path / "b", 16 * REC)
    b.import_segment(1, raw)
    assert b.seqno_max == 5
    b.abandon()
    b = open_cache(tmp_path / "b", 16 * REC)
    assert b.seqno_max == 5 and b.seqno_min == 5  # recovery keeps the highest gapless run of valid ones


# ----------------------------------------------------------------------------- import validation


def good_run(first: int = 4, count: int = 5) -> tuple[bytes, list[int]]:
    recs = [record(s, payload(s, 60 + 17 * k), type_=CCHANGE if k == 1 else 0) for k, s in
            enumerate(range(first, first + count))]
    offs = [sum(len(r) for r in recs[:k]) for k in range(count)]
    return b"".join(recs), offs


def set_field(raw: bytes, off: int, fmt_: str, at: int, value: int) -> bytes:
    buf = bytearray(raw)
    struct.pack_into(fmt_, buf, off + at, value)
    return bytes(buf)


def corruptions() -> list[tuple[str, int, object]]:
    """(name, record index, function(raw, offs, k) -> (first, raw))."""
    out: list[tuple[str, int, object]] = []
    for k in (0, 2, 4):
        out += [
            ("non-consecutive seqno", k, lambda r, o, k: (4, set_field(r, o[k], "<q", 0, 4 + k + 1))),
            ("seqno discarded", k, lambda r, o, k: (4, set_field(r, o[k], "<q", 0, -1))),
            ("size not a multiple of 8", k, lambda r, o, k: (4, set_field(r, o[k], "<I", 16, 100))),
            ("size 24", k, lambda r, o, k: (4, set_field(r, o[k], "<I", 16, 24))),
            ("size 16", k, lambda r, o, k: (4, set_field(r, o[k], "<I", 16, 16))),
            ("size 0", k, lambda r, o, k: (4, set_field(r, o[k], "<I", 16, 0))),
            ("size too big", k, lambda r, o, k: (4, set_field(r, o[k], "<I", 16, 8 * 1024))),
            ("size one record short", k, lambda r, o, k: (4, set_field(r, o[k], "<I", 16, 32))),
            ("store PAGE", k, lambda r, o, k: (4, set_field(r, o[k], "<b", 22, fmt.STORE_PAGE))),
            ("store MEM", k, lambda r, o, k: (4, set_field(r, o[k], "<b", 22, fmt.STORE_MEM))),
            ("no magic", k, lambda r, o, k: (4, set_field(r, o[k], "<Q", 8, 0x5555_0000_1000))),
            ("flags 4", k, lambda r, o, k: (4, set_field(r, o[k], "<H", 20, 4))),
            ("flags 0x101", k, lambda r, o, k: (4, set_field(r, o[k], "<H", 20, 0x101))),
            ("padding byte 0", k, lambda r, o, k: (4, set_field(r, [*o, len(r)][k + 1] - 1, "<B", 0, 0))),
            ("padding byte 9", k, lambda r, o, k: (4, set_field(r, [*o, len(r)][k + 1] - 1, "<B", 0, 9))),
        ]
    out += [
        ("wrong first", 0, lambda r, o, k: (5, r)),
        ("first before", 0, lambda r, o, k: (3, r)),
        ("truncated by 8", 0, lambda r, o, k: (4, r[:-8])),
        ("truncated by 1", 0, lambda r, o, k: (4, r[:-1])),
        ("truncated header", 0, lambda r, o, k: (4, r[:o[3] + 16])),
        ("truncated to a header", 0, lambda r, o, k: (4, r[:o[3] + 24])),
        ("only part of a header", 0, lambda r, o, k: (4, r[:20])),
        ("trailing zeros", 0, lambda r, o, k: (4, r + bytes(8))),
        ("trailing zero header", 0, lambda r, o, k: (4, r + bytes(24))),
        ("trailing byte", 0, lambda r, o, k: (4, r + b"x")),
        ("trailing record", 0, lambda r, o, k: (4, r + record(10, b"abc"))),
        ("another history", 0, lambda r, o, k: (4, b"".join(record(s, payload(s), gid=GID2) for s in range(4, 7)))),
    ]
    return out


@pytest.mark.parametrize(("name", "k", "corrupt"), corruptions(), ids=[f"{c[0]}-{c[1]}" for c in corruptions()])
def test_import_validation(tmp_path: Path, name: str, k: int, corrupt: object) -> None:
    b = new_cache(tmp_path / "b", 8 * REC)
    b.append_many([payload(s) for s in range(1, 4)])
    raw, offs = good_run()
    first, bad = corrupt(raw, offs, k)  # type: ignore[operator]
    before = (bytes(b._mm), b.statistics(), contents(b), b.next_seqno)
    with pytest.raises(GcacheError) as info:
        b.import_segment(first, bad)
    # the run's own bytes are at fault (BadSegment: a donor's), or the caller's order is (not BadSegment)
    assert isinstance(info.value, BadSegment) == (first == 4)
    assert (bytes(b._mm), b.statistics(), contents(b), b.next_seqno) == before  # nothing appended
    if first == 4 and name != "another history":  # the header checks themselves refuse it, both ways
        with pytest.raises(GcacheError):
            _parse_run_checked(memoryview(bad), 4)
        with pytest.raises(GcacheError):
            _parse_run(memoryview(bad), 4)
    assert b.import_segment(4, raw)[0] == 8  # the good run is fine


@pytest.mark.parametrize("count", [0, 4, 6, 100])
def test_import_refuses_a_run_of_another_count_than_announced(tmp_path: Path, count: int) -> None:
    b = new_cache(tmp_path / "b", 8 * REC)
    b.append_many([payload(s) for s in range(1, 4)])
    raw, _offs = good_run()  # seqnos 4..8
    before = (bytes(b._mm), contents(b), b.next_seqno)
    with pytest.raises(BadSegment, match=f"the run holds 5 records, {count} were announced"):
        b.import_segment(4, raw, count)
    with pytest.raises(BadSegment, match="an empty run"):
        b.import_segment(4, b"", 3)
    assert (bytes(b._mm), contents(b), b.next_seqno) == before
    assert b.import_segment(4, raw, 5)[0] == 8


def test_import_refuses_when_closed_or_readonly(tmp_path: Path) -> None:
    raw, _ = good_run(1, 2)
    b = new_cache(tmp_path / "b", 8 * REC)
    b.import_segment(1, raw)
    b.close()
    with pytest.raises(GcacheError, match="closed"):
        b.import_segment(3, record(3, b"x"))
    r = GCache.open(tmp_path / "b" / "galera.cache", readonly=True)
    with pytest.raises(GcacheError, match="read-only"):
        r.import_segment(3, record(3, b"x"))
    assert kinds(r.export_segments(1, 2)) == [("raw", 1, 2)]  # exporting from a read-only cache works
    r.close()


# ------------------------------------------------------------------------------ segment_payloads


def test_segment_payloads_exact() -> None:
    datas = [payload(s, n) for s, n in enumerate([0, 1, 7, 8, 9, 15, 16, 17, 103, 104, 1000], 1)]
    raw = b"".join(record(s, d) for s, d in enumerate(datas, 1))
    assert [bytes(p) for p in segment_payloads(raw)] == datas
    assert [bytes(p) for p in segment_payloads(memoryview(raw))] == datas
    assert segment_payloads(b"") == []
    assert [len(p) for p in segment_payloads(raw)] == _parse_run(memoryview(raw), 1)[1]
    bad_pad = bytearray(record(1, b"abc"))
    bad_pad[-1] = 9
    for bad in (raw[:-1], raw[:20], raw + bytes(8), bytes(bad_pad), set_field(raw, 0, "<I", 16, 12),
                set_field(raw, 0, "<I", 16, 0), set_field(raw, 0, "<I", 16, 8)):
        with pytest.raises(GcacheError):
            segment_payloads(bad)


# ---------------------------------------------------- the fast header checks against the reference


@st.composite
def runs(draw: st.DrawFn) -> tuple[int, bytes]:
    first = draw(st.integers(1, 2**40))
    n = draw(st.integers(1, 12))
    recs = []
    for k in range(n):
        data = draw(st.binary(max_size=40))
        flags = draw(st.sampled_from([fmt.RELEASED, fmt.RELEASED | fmt.SKIPPED, 0, fmt.SKIPPED]))
        recs.append(record(first + k, data, flags=flags, type_=draw(st.integers(-128, 127))))
    return first, b"".join(recs)


@given(run=runs(), edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=3),
       cut=st.integers(-9, 9))
@settings(max_examples=400, deadline=None)
def test_fast_parse_matches_reference(run: tuple[int, bytes], edits: list[tuple[int, int]], cut: int) -> None:
    first, raw = run
    buf = bytearray(raw)
    for pos, value in edits:
        buf[pos % len(buf)] = value
    if cut < 0:
        del buf[cut:]
    else:
        buf += bytes(cut)
    mv = memoryview(bytes(buf))
    try:
        want = _parse_run_checked(mv, first)
    except GcacheError:
        event("refused")
        with pytest.raises(GcacheError):
            _parse_run(mv, first)
        return
    event("accepted")
    sizes, lens, metas = _parse_run(mv, first)
    assert (list(sizes), lens, list(metas)) == want


@given(run=runs())
@settings(max_examples=100, deadline=None)
def test_fast_parse_needs_no_reference_for_a_good_run(run: tuple[int, bytes]) -> None:
    first, raw = run
    want = _parse_run_checked(memoryview(raw), first)
    with mock.patch("gcache.cache._parse_run_checked", side_effect=AssertionError("fell back")):
        sizes, lens, metas = _parse_run(memoryview(raw), first)
    assert (list(sizes), lens, list(metas)) == want


# ------------------------------------------------------------------- A and B against a model


def data_for(seqno: int, n: int, salt: int) -> bytes:
    return bytes((seqno * 31 + salt + k) % 256 for k in range(n))


RING_A = 2048
RING_B = 1536
SIZES = st.integers(0, 300) | st.sampled_from([0, 7, 8, 900, 1100])  # 900+ are > half of a ring


class SegmentsMachine(RuleBasedStateMachine):
    """A takes appends (pages, skipped records, locks, crashes); B follows A only through
    export_segments/import_segment (and append for record segments); both must equal the model."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="gcache-seg-"))
        self.a = new_cache(self.dir / "a", RING_A, page_size=1024)
        self.b = new_cache(self.dir / "b", RING_B, page_size=1024)
        self.model: Model = {}
        self.locks_a: list[int] = []
        self.locks_b: list[int] = []
        self.salt = 0

    def teardown(self) -> None:
        for gc in (self.a, self.b):
            if not gc.closed:
                gc.abandon()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _data(self, seqno: int, n: int) -> bytes:
        self.salt += 1
        return data_for(seqno, n, self.salt)

    @rule(n=SIZES, type_=st.sampled_from([WRITESET, CCHANGE, -5]), skipped=st.booleans())
    def append(self, n: int, type_: int, skipped: bool) -> None:
        s = self.a.next_seqno
        d = self._data(s, n)
        self.a.append(d, type_, skipped=skipped)
        self.model[s] = (type_, skipped, d)

    @rule(ns=st.lists(SIZES, max_size=10))
    def append_many(self, ns: list[int]) -> None:
        s0 = self.a.next_seqno
        datas = [self._data(s0 + k, n) for k, n in enumerate(ns)]
        self.a.append_many(datas)
        for k, d in enumerate(datas):
            self.model[s0 + k] = (WRITESET, False, d)

    @precondition(lambda self: self.a.seqno_min > 0 and len(self.locks_a) < 3)
    @rule(data=st.data())
    def lock_a(self, data: st.DataObject) -> None:
        s = data.draw(st.integers(self.a.seqno_min, self.a.seqno_max))
        self.a.lock(s)
        self.locks_a.append(s)

    @precondition(lambda self: self.locks_a)
    @rule(data=st.data())
    def unlock_a(self, data: st.DataObject) -> None:
        s = data.draw(st.sampled_from(self.locks_a))
        self.locks_a.remove(s)
        self.a.unlock(s)

    @precondition(lambda self: self.b.seqno_min > 0 and len(self.locks_b) < 3)
    @rule(data=st.data())
    def lock_b(self, data: st.DataObject) -> None:
        s = data.draw(st.integers(self.b.seqno_min, self.b.seqno_max))
        self.b.lock(s)
        self.locks_b.append(s)

    @precondition(lambda self: self.locks_b)
    @rule(data=st.data())
    def unlock_b(self, data: st.DataObject) -> None:
        s = data.draw(st.sampled_from(self.locks_b))
        self.locks_b.remove(s)
        self.b.unlock(s)

    @precondition(lambda self: self.a.seqno_max > 0)
    @rule(data=st.data())
    def transfer(self, data: st.DataObject) -> None:
        a, b = self.a, self.b
        if b.next_seqno < a.seqno_min:  # B fell behind A's cache: a new start (as after an SST)
            if self.locks_b:
                return
            b.reset(GID, a.seqno_min - 1)
        if b.next_seqno > a.seqno_max:
            return
        last = data.draw(st.integers(b.next_seqno, a.seqno_max))
        pages = b.statistics()["pages_created"]
        segs = transfer(a, b, b.next_seqno, last)
        assert b.seqno_max == last
        event(f"transfer: {'+'.join(sorted({k for k, _, _ in kinds(segs)}))} segments")
        if sum(s.raw is not None for s in segs) > 1:
            event("transfer: several raw segments")
        if b.statistics()["pages_created"] > pages:
            event("transfer: B used pages")

    def _reopen(self, which: str, clean: bool) -> GCache:
        gc = getattr(self, which)
        d = self.dir / which
        if clean:
            gc.close()
        else:
            gc.abandon()
        gc = open_cache(d, RING_A if which == "a" else RING_B, page_size=1024)
        setattr(self, f"locks_{which}", [])
        return gc

    @rule(clean=st.booleans())
    def reopen_a(self, clean: bool) -> None:
        last = self.a.next_seqno - 1
        self.a = self._reopen("a", clean)
        if self.a.seqno_max != last:  # lost what was in pages: go on at the same position
            self.a.reset(GID, last)
            self.model = {k: v for k, v in self.model.items() if k <= last}
        assert self.a.next_seqno == last + 1

    @rule(clean=st.booleans())
    def reopen_b(self, clean: bool) -> None:
        self.b = self._reopen("b", clean)
        if self.b.seqno_max < 0:
            self.b.reset(GID, 0)

    @invariant()
    def caches_hold_the_model(self) -> None:
        for gc in (self.a, self.b):
            got = contents(gc)
            assert got == {k: self.model[k] for k in got}
            if got:
                check_segments(gc, gc.export_segments(gc.seqno_min, gc.seqno_max), gc.seqno_min, gc.seqno_max)
            st_ = gc.statistics()
            ring = RING_A if gc is self.a else RING_B
            assert 0 <= st_["ring_used"] <= ring and st_["ring_used"] + st_["ring_free"] == ring


SegmentsMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_segments_model = SegmentsMachine.TestCase


@pytest.mark.parametrize("run", [1, 2, 3, 5, 7, 11, 20])
@pytest.mark.parametrize("step", [53, 97, 8])
def test_import_defers_marks_with_the_same_bytes_as_marking_at_once(tmp_path: Path, run: int, step: int) -> None:
    """import_segment marks discarded only the reclaimed headers its copy does not overwrite: the file ends
    byte for byte as if every reclaimed header had been marked before the copy."""
    sizes = [(k * step) % 300 for k in range(1, 400)]
    src = new_cache(tmp_path / "src", size=1 << 20)
    src.append_many([payload(k, n) for k, n in enumerate(sizes, 1)])
    deferred, eager = new_cache(tmp_path / "a", size=4096), new_cache(tmp_path / "b", size=4096)
    real_alloc = GCache._ring_alloc

    def eager_alloc(self: GCache, total: int, want: int, *, defer_marks: bool = False) -> int | None:
        return real_alloc(self, total, want)

    real_mark = GCache._mark_reclaimed
    deferred_runs = []

    def counting_mark(self: GCache, end: int | None) -> None:
        deferred_runs.extend(len(r) for r in self._unmarked)
        real_mark(self, end)

    for first in range(1, len(sizes) + 1, run):
        last = min(first + run - 1, len(sizes))
        (seg,) = src.export_segments(first, last)
        assert seg.raw is not None
        with mock.patch.object(GCache, "_mark_reclaimed", counting_mark):
            deferred.import_segment(first, seg.raw)
        with mock.patch.object(GCache, "_ring_alloc", eager_alloc):
            eager.import_segment(first, seg.raw)
        seg.raw.release()
        assert not deferred._unmarked
        assert deferred._mm[:] == eager._mm[:]  # after every import, not only at the end
    assert deferred_runs  # reclaimed runs whose marks were deferred
    assert contents(deferred) == contents(eager)
    deferred.close()
    eager.close()
    src.close()
    assert (tmp_path / "a" / "galera.cache").read_bytes() == (tmp_path / "b" / "galera.cache").read_bytes()
