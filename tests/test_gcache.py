"""gcache: layout, append/get, wrap-around, eviction, locks, pages, history resets, clean reopen.

Rings are a few buffers long so that wrap-around and eviction happen at once. A 103-byte payload makes
a 128-byte buffer (24 header + 103 + 1 padding byte); 104 bytes is one byte over (136).
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import pytest

import gcache
from gcache import CCHANGE, WRITESET, GCache, parse_size, scan
from gcache import format as fmt
from istd.errors import GcacheCorrupt, GcacheError, GcacheFull, SeqnoNotInCache

GID = uuid.UUID("0ba80362-e6b2-11f1-a838-fff90686b220")
GID2 = uuid.UUID("73532c34-e6b2-11f1-8e78-379a68782da0")
REC = 128  # buffer size of a 103-byte payload
RING = 4 * REC


def payload(seqno: int, n: int = 103) -> bytes:
    return (seqno.to_bytes(4, "little") + bytes([seqno % 251]) * 4) * (n // 8) + b"z" * (n % 8)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "galera.cache"


def new_cache(path: Path, size: int = RING, **kw: object) -> GCache:
    gc = GCache.open(path, size=size, **kw)  # type: ignore[arg-type]
    gc.reset(GID, 0)
    return gc


def contents(gc: GCache) -> dict[int, bytes]:
    if gc.seqno_min < 0:
        return {}
    return {r.seqno: bytes(r.payload) for r in gc.get_range(gc.seqno_min, gc.seqno_max)}


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "istd.gcache"]


# ---------------------------------------------------------------------------------------- basics


@pytest.mark.parametrize(("text", "value"), [("4096", 4096), ("512K", 512 << 10), ("128M", 128 << 20),
                                             ("1G", 1 << 30), ("2g", 2 << 30), (" 64k ", 64 << 10), (7, 7)])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "1.5G", "-1", "12MB", "0x10", "ten", "1 G B"])
def test_parse_size_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_buffer_size_and_padding() -> None:
    assert fmt.buffer_size(103) == REC
    assert fmt.buffer_size(104) == REC + 8
    assert fmt.buffer_size(0) == 32  # header + 8 bytes of padding
    assert all(fmt.buffer_size(n) % 8 == 0 and 1 <= fmt.buffer_size(n) - 24 - n <= 8 for n in range(100))


def test_new_file_layout(path: Path) -> None:
    gc = GCache.open(path, size=RING)
    assert path.stat().st_size == RING + 1024 + 256 + 24
    raw = path.read_bytes()
    text = f"Version: 2\nGID: {uuid.UUID(int=0)}\nsynced: 0\n\n".encode()
    assert raw[:1024] == text + bytes(1024 - len(text))
    assert raw[1024:1280 + 24] == bytes(256 + 24)
    assert (gc.seqno_min, gc.seqno_max, gc.next_seqno, gc.gid) == (-1, -1, 1, uuid.UUID(int=0))
    gc.close()


def test_append_get_roundtrip(path: Path) -> None:
    with new_cache(path, size=4096) as gc:
        assert gc.append(b"hello") == 1
        assert gc.append(b"", CCHANGE) == 2
        assert gc.append(payload(3), seqno=3, skipped=True) == 3
        r = gc.get(1)
        assert (r.seqno, r.type, r.skipped, bytes(r.payload)) == (1, WRITESET, False, b"hello")
        assert isinstance(r.payload, memoryview)
        r2 = gc.get(2)
        assert (r2.type, bytes(r2.payload)) == (CCHANGE, b"")
        assert gc.get(3).skipped and bytes(gc.get(3).payload) == payload(3)
        assert (gc.seqno_min, gc.seqno_max, gc.next_seqno, len(gc)) == (1, 3, 4, 3)
        with pytest.raises(SeqnoNotInCache):
            gc.get(4)
        with pytest.raises(SeqnoNotInCache):
            gc.get(0)
        with pytest.raises(GcacheError, match="out of order"):
            gc.append(b"x", seqno=7)
        del r, r2


def test_header_on_disk_is_galera_compatible(path: Path) -> None:
    with new_cache(path, size=4096) as gc:
        gc.append(b"abc", CCHANGE)
    raw = path.read_bytes()
    seqno, ctx, size, flags, store, type_ = fmt.BH.unpack_from(raw, 1280)
    assert (seqno, size, flags, store, type_) == (1, 32, fmt.RELEASED, fmt.STORE_RB, CCHANGE)
    assert ctx >> 32 == fmt.MAGIC32
    assert ctx & 0xFFFFFFFF == fmt.record_crc(fmt.gid_crc(GID), 1, 32, 1, 1, CCHANGE, b"abc")
    assert raw[1280 + 24:1280 + 27] == b"abc" and raw[1280 + 31] == 5  # 5 bytes of padding
    assert raw[1280 + 32:1280 + 56] == bytes(24)  # zero header after the newest buffer


def test_append_needs_a_position(path: Path) -> None:
    with GCache.open(path, size=RING) as gc:
        gc.reset(GID, -1)
        with pytest.raises(GcacheError, match="reset"):
            gc.append(b"x")


def test_append_many_types_and_first(path: Path) -> None:
    with new_cache(path, size=8192) as gc:
        assert gc.append_many([b"a", b"bb", b""], bytes([0, 3, 0])) == (1, 3)
        assert gc.append_many([], first=4) == (4, 3)
        with pytest.raises(GcacheError):
            gc.append_many([b"x"], first=9)
        with pytest.raises(ValueError):
            gc.append_many([b"x"], b"\x00\x00")
        assert [(r.seqno, r.type, bytes(r.payload)) for r in gc.get_range(1, 3)] == [
            (1, 0, b"a"), (2, 3, b"bb"), (3, 0, b"")]
        assert gc.get_range(3, 2) == []
        with pytest.raises(SeqnoNotInCache):
            gc.get_range(2, 4)


# --------------------------------------------------------------------------- fit, wrap, eviction


def test_exact_fit_then_one_byte_over(path: Path, tmp_path: Path) -> None:
    with new_cache(path) as gc:
        for s in range(1, 5):
            gc.append(payload(s))
        st = gc.statistics()
        assert (gc.seqno_min, gc.seqno_max, st["ring_used"], st["ring_free"], st["evicted"]) == (1, 4, RING, 0, 0)
    other = tmp_path / "other.cache"
    with new_cache(other) as gc:
        for s in range(1, 4):
            gc.append(payload(s))
        gc.append(payload(4, 104))  # 136 bytes: does not fit before the end, wraps to 1280
        # room at 1280 must leave 24 bytes for the zero header before the oldest buffer: evict 1 and 2
        assert (gc.seqno_min, gc.seqno_max) == (3, 4)
        assert gc.statistics()["wrapped"] and gc.statistics()["evicted"] == 2
        assert contents(gc) == {3: payload(3), 4: payload(4, 104)}


def test_half_the_ring_goes_to_a_page(path: Path) -> None:
    with new_cache(path, page_size=4096) as gc:
        n = RING // 2 - 25  # a buffer of exactly half the ring: stays in the ring
        assert fmt.buffer_size(n) == RING // 2 and fmt.buffer_size(n + 1) > RING // 2
        gc.append(payload(1, n))
        assert gc.statistics()["pages"] == 0
        gc.append(payload(2, n + 1))  # one byte more: a page
        st = gc.statistics()
        assert st["pages"] == 1 and (path.parent / "gcache.page.000000").exists()
        assert contents(gc) == {1: payload(1, n), 2: payload(2, n + 1)}


def test_wrap_around_and_eviction_order(path: Path) -> None:
    seen_wrapped = False
    with new_cache(path) as gc:
        lowest = 1
        for s in range(1, 60):
            n = (s * 37) % 150
            gc.append(payload(s, n))
            assert gc.seqno_max == s
            assert gc.seqno_min >= lowest  # eviction only moves up, from the oldest end
            lowest = gc.seqno_min
            assert contents(gc) == {k: payload(k, (k * 37) % 150) for k in range(gc.seqno_min, s + 1)}
            seen_wrapped |= gc.statistics()["wrapped"]
            assert gc.statistics()["ring_used"] <= RING
    assert seen_wrapped


def test_eviction_only_when_needed(path: Path) -> None:
    with new_cache(path, size=RING * 4) as gc:
        for s in range(1, 17):
            gc.append(payload(s))
        assert gc.seqno_min == 1  # 16 buffers fill the ring exactly; nothing evicted
        gc.append(payload(17))
        assert gc.seqno_min == 3  # room for 128 + 24 bytes at 1280
        gc.append(payload(18))
        assert gc.seqno_min == 4


def test_append_many_same_as_appends(tmp_path: Path) -> None:
    sizes = [(k * 53) % 200 for k in range(1, 200)]
    a = new_cache(tmp_path / "a.cache", size=2048)
    for k, n in enumerate(sizes, 1):
        a.append(payload(k, n))
    b = new_cache(tmp_path / "b.cache", size=2048)
    b.append_many([payload(k, n) for k, n in enumerate(sizes[:50], 1)])
    b.append_many([payload(k, n) for k, n in enumerate(sizes[50:], 51)])
    assert contents(a) == contents(b)
    assert a.statistics()["ring_first"] == b.statistics()["ring_first"]
    assert a.statistics()["ring_next"] == b.statistics()["ring_next"]
    a.close()
    b.close()
    assert (tmp_path / "a.cache").read_bytes() == (tmp_path / "b.cache").read_bytes()


def test_append_many_larger_than_the_ring(path: Path) -> None:
    with new_cache(path, size=1024) as gc:
        first, last = gc.append_many([payload(k, 90) for k in range(1, 101)])
        assert (first, last) == (1, 100)
        assert gc.seqno_max == 100 and gc.seqno_min > 90
        assert contents(gc) == {k: payload(k, 90) for k in range(gc.seqno_min, 101)}


# ------------------------------------------------------------------------------- locks, pages


def test_lock_stops_eviction_and_overflows_to_pages(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "istd.gcache")
    with new_cache(path, page_size=1024) as gc:
        for s in range(1, 5):
            gc.append(payload(s))
        gc.lock(2)
        assert gc.seqno_locked == 2
        for s in range(5, 20):
            gc.append(payload(s))
        assert gc.seqno_min == 2  # 1 was evictable, 2 and later are pinned
        st = gc.statistics()
        assert st["pages"] >= 2 and st["page_bytes"] >= 2048
        assert contents(gc) == {k: payload(k) for k in range(2, 20)}
        page0 = path.parent / "gcache.page.000000"
        assert page0.exists()
        assert f"Created page {page0} of size 1024 bytes" in messages(caplog)
        gc.unlock(2)  # keep_pages_size=0: every page goes, and with it every seqno up to the last page's
        st = gc.statistics()
        assert st["pages"] == 0 and not page0.exists()
        assert f"Deleted page {page0}" in messages(caplog)
        assert (gc.seqno_min, gc.seqno_max, gc.next_seqno) == (-1, -1, 20)
        for s in range(20, 30):  # the ring is usable again
            gc.append(payload(s))
        assert gc.statistics()["pages"] == 0
        assert contents(gc) == {k: payload(k) for k in range(gc.seqno_min, 30)}


def test_keep_pages_size_keeps_pages_after_unlock(path: Path) -> None:
    with new_cache(path, page_size=1024, keep_pages_size=1 << 20) as gc:
        for s in range(1, 5):
            gc.append(payload(s))
        gc.lock(1)
        for s in range(5, 15):
            gc.append(payload(s))
        gc.unlock(1)
        assert gc.statistics()["pages"] >= 1
        assert contents(gc) == {k: payload(k) for k in range(1, 15)}
        for s in range(15, 40):  # ring eviction passes the page seqnos: the pages go
            gc.append(payload(s))
        assert gc.statistics()["pages"] == 0
        assert contents(gc) == {k: payload(k) for k in range(gc.seqno_min, 40)}


def test_locks_are_a_multiset(path: Path) -> None:
    with new_cache(path, page_size=1024) as gc:
        for s in range(1, 5):
            gc.append(payload(s))
        gc.lock(3)
        gc.lock(3)
        gc.lock(4)
        gc.unlock(3)
        assert gc.seqno_locked == 3
        for s in range(5, 12):
            gc.append(payload(s))
        assert gc.seqno_min == 3
        gc.unlock(3)
        assert gc.seqno_locked == 4
        gc.unlock(4)
        assert gc.seqno_locked is None
        with pytest.raises(GcacheError, match="without a matching lock"):
            gc.unlock(4)
        with pytest.raises(SeqnoNotInCache):
            gc.lock(1)
        with pytest.raises(SeqnoNotInCache):
            gc.lock(gc.seqno_max + 1)


def test_page_creation_failure_is_gcache_full(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with new_cache(path, page_size=1024) as gc:
        for s in range(1, 5):
            gc.append(payload(s))
        gc.lock(1)

        def no_space(fd: int, size: int, name: str) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(gcache.cache, "_allocate", no_space)
        with pytest.raises(GcacheFull, match=r"Cannot create new cache page.*No space left"):
            gc.append(payload(5))
        assert (gc.seqno_min, gc.seqno_max) == (1, 4)
        with pytest.raises(GcacheFull):
            gc.append_many([payload(5), payload(6)])
        assert not list(path.parent.glob("gcache.page.*"))
        monkeypatch.undo()
        gc.unlock(1)
        assert gc.append(payload(5)) == 5


def test_leftover_pages_are_deleted_on_open(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    new_cache(path).close()
    leftover = path.parent / "gcache.page.000003"
    leftover.write_bytes(b"x" * 100)
    unrelated = path.parent / "gcache.page.notmine"
    unrelated.write_bytes(b"x")
    caplog.set_level(logging.INFO, "istd.gcache")
    GCache.open(path, size=RING).close()
    assert not leftover.exists() and unrelated.exists()
    assert f"Deleted page {leftover}" in messages(caplog)


# ------------------------------------------------------------------------------------ resets


def test_reset_to_another_gid_discards_history(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "istd.gcache")
    with new_cache(path) as gc:
        for s in range(1, 4):
            gc.append(payload(s))
        gc.reset(GID2, 100)
        assert (gc.gid, gc.seqno_min, gc.seqno_max, gc.next_seqno) == (GID2, -1, -1, 101)
        assert f"GCache history reset: {GID}:3 -> {GID2}:100" in messages(caplog)
        assert f"GID: {GID2}\n".encode() in path.read_bytes()[:1024]  # rewritten at once
        assert gc.append(b"new") == 101
    with GCache.open(path, size=RING) as gc:
        assert (gc.gid, gc.seqno_min, gc.seqno_max) == (GID2, 101, 101)


def test_reset_same_gid(path: Path) -> None:
    with new_cache(path, size=4096) as gc:
        for s in range(1, 8):
            gc.append(payload(s))
        gc.reset(GID, 7)  # same position: nothing
        assert (gc.seqno_min, gc.seqno_max) == (1, 7)
        gc.reset(GID, 5)  # drop the tail beyond the saved position
        assert (gc.seqno_min, gc.seqno_max, gc.next_seqno) == (1, 5, 6)
        gc.append(b"other 6")
        assert contents(gc)[6] == b"other 6"
        gc.reset(GID, 10)  # a gap: history reset
        assert (gc.seqno_min, gc.seqno_max, gc.next_seqno) == (-1, -1, 11)
    with GCache.open(path, size=4096) as gc:
        assert (gc.seqno_min, gc.seqno_max) == (-1, -1)


def test_reset_refuses_to_drop_locked_seqnos(path: Path) -> None:
    with new_cache(path, size=4096) as gc:
        for s in range(1, 5):
            gc.append(payload(s))
        gc.lock(3)
        with pytest.raises(GcacheError, match="locked"):
            gc.reset(GID, 2)
        with pytest.raises(GcacheError, match="locked"):
            gc.reset(GID2, 0)
        gc.reset(GID, 3)
        assert gc.seqno_max == 3


# ------------------------------------------------------------------------- close and reopen


def test_clean_close_preamble_byte_exact(path: Path) -> None:
    with new_cache(path, size=4096) as gc:
        for s in range(1, 11):
            gc.append(payload(s))
    text = f"Version: 2\nGID: {GID}\nseqno_min: 1\nseqno_max: 10\noffset: 1280\nsynced: 1\n\n".encode()
    assert path.read_bytes()[:1024] == text + bytes(1024 - len(text))
    with GCache.open(path, size=4096) as gc:
        running = f"Version: 2\nGID: {GID}\nsynced: 0\n\n".encode()
        assert path.read_bytes()[:1024] == running + bytes(1024 - len(running))
        assert contents(gc) == {k: payload(k) for k in range(1, 11)}
        assert gc.next_seqno == 11


def test_clean_close_of_empty_cache(path: Path) -> None:
    new_cache(path).close()
    text = f"Version: 2\nGID: {GID}\nseqno_min: -1\nseqno_max: -1\nsynced: 1\n\n".encode()
    assert path.read_bytes()[:1024] == text + bytes(1024 - len(text))
    with GCache.open(path, size=RING) as gc:
        assert (gc.gid, gc.seqno_min, gc.seqno_max) == (GID, -1, -1)


def test_clean_reopen_of_wrapped_ring(path: Path) -> None:
    with new_cache(path) as gc:
        for s in range(1, 12):
            gc.append(payload(s, 60 + s))
        assert gc.statistics()["wrapped"]
        before, first = contents(gc), gc.statistics()["ring_first"]
    assert f"offset: {first}\n".encode() in path.read_bytes()[:1024]
    with GCache.open(path, size=RING) as gc:
        assert contents(gc) == before
        for s in range(12, 30):
            gc.append(payload(s, 60 + s))
        assert contents(gc) == {k: payload(k, 60 + k) for k in range(gc.seqno_min, 30)}


def test_close_with_pages_keeps_the_ring_run(path: Path) -> None:
    with new_cache(path, page_size=1024) as gc:
        for s in range(1, 5):
            gc.append(payload(s))
        gc.lock(1)
        for s in range(5, 9):
            gc.append(payload(s))  # pages
        gc.unlock(1)  # keep_pages_size=0 trims the pages and everything below them
    with GCache.open(path, size=RING) as gc:
        assert gc.statistics()["pages"] == 0
        assert contents(gc) == {}
    with new_cache(path, page_size=1024, keep_pages_size=1 << 20) as gc:
        for s in range(1, 5):
            gc.append(payload(s))
        gc.lock(2)
        for s in range(5, 7):
            gc.append(payload(s))  # 5, 6 in a page
        gc.unlock(2)
        gc.append(payload(7))  # back in the ring (evicts 2)
        assert gc.statistics()["pages"] == 1
    assert not list(path.parent.glob("gcache.page.*"))  # pages do not outlive close()
    with GCache.open(path, size=RING) as gc:
        assert (gc.seqno_min, gc.seqno_max) == (7, 7)  # the page seqnos are gone, so is what lies below


def test_close_is_idempotent_and_refuses_with_live_views(path: Path) -> None:
    gc = new_cache(path)
    gc.append(b"abc")
    view = gc.get(1).payload
    with pytest.raises(GcacheError, match="payload views"):
        gc.close()
    assert bytes(view) == b"abc"  # still readable
    assert b"synced: 1" in path.read_bytes()[:1024]
    with pytest.raises(GcacheError, match="closed"):
        gc.append(b"x")
    del view
    gc.close()
    gc.close()
    assert gc.closed


def test_size_change_recreates_empty(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with new_cache(path) as gc:
        gc.append(b"abc")
    caplog.set_level(logging.INFO, "istd.gcache")
    with GCache.open(path, size=2 * RING) as gc:
        assert (gc.gid, gc.seqno_min, gc.seqno_max) == (GID, -1, -1)
        assert path.stat().st_size == 2 * RING + 1304
    assert any("GCache size changed" in m and "history reset" in m for m in messages(caplog))


def test_readonly_never_writes(path: Path) -> None:
    gc = new_cache(path)
    gc.append(b"abc")  # no close: unsynced file
    raw = path.read_bytes()
    with GCache.open(path, size=123456, readonly=True) as ro:
        assert (ro.seqno_min, ro.seqno_max, bytes(ro.get(1).payload)) == (1, 1, b"abc")
        assert ro.statistics()["ring_size"] == RING
        with pytest.raises(GcacheError, match="read-only"):
            ro.append(b"x")
        with pytest.raises(GcacheError, match="read-only"):
            ro.reset(GID2, 1)
    assert path.read_bytes() == raw
    gc.close()


@pytest.mark.parametrize("content", [
    b"\x00" * 2000,
    os.urandom(4096),
    b"Version: 3\nGID: 0ba80362-e6b2-11f1-a838-fff90686b220\nsynced: 1\n\n".ljust(2000, b"\0"),
    b"Version: 2\nGID: not-a-uuid\n".ljust(2000, b"\0"),
    b"Version: 2\nGID: 0ba80362-e6b2-11f1-a838-fff90686b220\n".ljust(1000, b"\0"),  # truncated
])
def test_not_a_gcache_is_corrupt(path: Path, content: bytes) -> None:
    path.write_bytes(content)
    with pytest.raises(GcacheCorrupt, match=str(path)) as exc:
        GCache.open(path, size=RING)
    assert "move it away" in str(exc.value)
    with pytest.raises(GcacheCorrupt):
        scan(path)
    assert path.read_bytes() == content


def test_bad_arguments(path: Path) -> None:
    with pytest.raises(ValueError):
        GCache.open(path, size=16)
    with pytest.raises(ValueError):
        GCache.open(path, size="lots")
    with pytest.raises(GcacheError):
        GCache.open(path.parent / "missing-dir" / "galera.cache", size=RING)


def test_statistics_counts(path: Path) -> None:
    with new_cache(path) as gc:
        gc.append_many([payload(k) for k in range(1, 11)])
        st = gc.statistics()
        assert st["appended"] == 10 and st["count"] == len(gc) == 10 - st["evicted"]
        assert st["seqno_min"] == gc.seqno_min and st["gid"] == str(GID)
        assert 0 < st["ring_used"] <= RING and st["ring_used"] + st["ring_free"] == RING


@pytest.mark.parametrize("sync", [False, True])
def test_sync_msyncs_every_append(path: Path, monkeypatch: pytest.MonkeyPatch, sync: bool) -> None:
    with new_cache(path, sync=sync) as gc:
        calls: list[int] = []
        monkeypatch.setattr(gc, "_flush_all", lambda: calls.append(gc.seqno_max))
        gc.append(b"one")
        gc.append_many([b"two", b"three"])
        assert calls == ([1, 3] if sync else [])
        assert gc.statistics()["sync"] is sync


def test_gcache_imports_neither_trio_nor_protocol() -> None:
    import subprocess
    import sys

    code = ("import sys, gcache; bad = [m for m in ('trio', 'protocol', 'structlog') if m in sys.modules]; "
            "sys.exit(str(bad) if bad else 0)")
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
