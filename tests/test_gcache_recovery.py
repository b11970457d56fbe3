"""gcache recovery: reopen after simulated crashes, damaged files, and the real Galera file.

A crash is simulated by unmapping without close(): the preamble keeps ``synced: 0`` and the kernel has
every byte written (that is what a killed process leaves). Damage is then done to the file directly.
"""

from __future__ import annotations

import logging
import shutil
import uuid
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gcache import CCHANGE, GCache, scan
from gcache import format as fmt
from istd.errors import GcacheCorrupt

GID = uuid.UUID("0ba80362-e6b2-11f1-a838-fff90686b220")
OTHER = uuid.UUID("73532c34-e6b2-11f1-8e78-379a68782da0")
REAL = Path(__file__).resolve().parents[2] / "shared" / "reference" / "real-galera" / "galera.cache"
if not REAL.exists():
    REAL = Path("/work/shared/reference/real-galera/galera.cache")
RING = 1024


def payload(seqno: int, n: int | None = None) -> bytes:
    n = 40 + (seqno * 29) % 90 if n is None else n
    return bytes((seqno * 7 + k) % 256 for k in range(n))



def build(path: Path, last: int, size: int = RING, **kw: object) -> dict[int, bytes]:
    """Append 1..last into a fresh cache, crash it, and return what it held."""
    gc = GCache.open(path, size=size, **kw)  # type: ignore[arg-type]
    gc.reset(GID, 0)
    for s in range(1, last + 1):
        gc.append(payload(s), CCHANGE if s % 5 == 0 else 0)
    held = contents(gc)
    gc.abandon()
    return held


def contents(gc: GCache) -> dict[int, bytes]:
    if gc.seqno_min < 0:
        return {}
    return {r.seqno: bytes(r.payload) for r in gc.get_range(gc.seqno_min, gc.seqno_max)}


def reopen(path: Path, size: int = RING, **kw: object) -> dict[int, bytes]:
    with GCache.open(path, size=size, **kw) as gc:  # type: ignore[arg-type]
        got = contents(gc)
        if got:
            assert list(got) == list(range(gc.seqno_min, gc.seqno_max + 1))  # gapless
        else:
            assert (gc.seqno_min, gc.seqno_max, len(gc)) == (-1, -1, 0)
        return got


def offsets(path: Path) -> dict[int, int]:
    """Header offset of each cached seqno, as the read-only scanner sees them."""
    return {r.seqno: r.offset for r in scan(path).records if r.seqno > 0 and r.checksum == "ok"}


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "istd.gcache"]


def put_raw(path: Path, offset: int, seqno: int, data: bytes, gid: uuid.UUID = GID) -> int:
    """Write a valid istd buffer (and the zero header after it) at ``offset``; returns its end."""
    total = fmt.buffer_size(len(data))
    crc = fmt.record_crc(zlib.crc32(gid.bytes), seqno, total, fmt.RELEASED, fmt.STORE_RB, 0, data)
    pad = total - 24 - len(data)
    raw = fmt.BH.pack(seqno, fmt.MAGIC_CTX | crc, total, fmt.RELEASED, fmt.STORE_RB, 0) + data
    patch(path, offset, raw + bytes(pad - 1) + bytes([pad]) + bytes(24))
    return offset + total


# ------------------------------------------------------------------------------ plain crashes


@pytest.mark.parametrize("last", [1, 5, 9, 30, 61])  # unwrapped, full, wrapped a few times
def test_crash_loses_nothing(tmp_path: Path, last: int, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "galera.cache"
    held = build(path, last)
    assert b"synced: 0" in path.read_bytes()[:1024]
    caplog.set_level(logging.INFO, "istd.gcache")
    assert reopen(path) == held
    lo, hi = min(held), max(held)
    assert f"Recovering GCache ring buffer: version: 2, UUID: {GID}, offset: -1" in messages(caplog)
    assert f"Recovering GCache ring buffer: found gapless sequence {lo}-{hi}" in messages(caplog)
    report = scan(path)  # after the clean close: the preamble way
    assert (report.method, report.seqno_min, report.seqno_max, report.holes) == ("preamble", lo, hi, ())


def test_crash_then_keep_writing(tmp_path: Path) -> None:
    path = tmp_path / "galera.cache"
    build(path, 20)
    gc = GCache.open(path, size=RING)
    for s in range(21, 50):
        gc.append(payload(s))
    held = contents(gc)
    gc.abandon()
    assert reopen(path) == held
    assert max(held) == 49


def test_recover_off_discards_an_unsynced_history(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "galera.cache"
    build(path, 7)
    caplog.set_level(logging.INFO, "istd.gcache")
    with GCache.open(path, size=RING, recover=False) as gc:
        assert (gc.gid, gc.seqno_min, gc.seqno_max) == (GID, -1, -1)
    assert any("not closed cleanly" in m and "history reset" in m for m in messages(caplog))
    assert reopen(path) == {}  # nothing comes back later either
    assert not [r for r in scan(path).records if r.seqno > 0]


def test_recover_off_still_loads_a_clean_file(tmp_path: Path) -> None:
    path = tmp_path / "galera.cache"
    build(path, 7)
    held = reopen(path)  # recovers and closes cleanly
    assert reopen(path, recover=False) == held


def test_nil_gid_skips_recovery(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "galera.cache"
    gc = GCache.open(path, size=RING)
    gc.append(b"written before any reset()")
    gc.abandon()
    caplog.set_level(logging.INFO, "istd.gcache")
    assert reopen(path) == {}
    assert "Skipped GCache ring buffer recovery: could not determine history UUID." in messages(caplog)


# ------------------------------------------------------------------------------ damage


def test_torn_last_record(tmp_path: Path) -> None:
    path = tmp_path / "galera.cache"
    held = build(path, 12)
    rec = next(r for r in scan(path).records if r.seqno == 12)
    patch(path, rec.offset + 34, bytes(rec.size - 34))  # the write stopped 10 bytes into the payload
    got = reopen(path)
    assert got == {k: v for k, v in held.items() if k <= 11}
    with GCache.open(path, size=RING) as gc:  # the torn bytes are free space now
        gc.append(b"12 again", seqno=12)
    assert reopen(path)[12] == b"12 again"


def test_truncated_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "galera.cache"
    build(path, 6)
    off = offsets(path)[5]
    with open(path, "r+b") as f:
        f.truncate(off + 40)
    report = scan(path)  # read-only: the ring is what is left of the file
    assert (report.seqno_min, report.seqno_max) == (1, 4)
    with GCache.open(path, size=RING, readonly=True) as gc:
        assert contents(gc) == {k: payload(k) for k in range(1, 5)}
    caplog.set_level(logging.INFO, "istd.gcache")
    assert reopen(path) == {}  # a read-write open re-creates it at its configured size
    assert any("GCache size changed" in m for m in messages(caplog))
    assert path.stat().st_size == RING + 1304


def test_zeroed_header(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "galera.cache"
    held = build(path, 9)
    patch(path, offsets(path)[4], bytes(24))
    caplog.set_level(logging.INFO, "istd.gcache")
    got = reopen(path)
    assert got == {k: v for k, v in held.items() if k >= 5}
    assert f"Recovering GCache ring buffer: discarding seqnos {min(held)}-3" in messages(caplog)
    assert reopen(path) == got  # the discarded ones stay discarded


@pytest.mark.parametrize("which", ["oldest", "middle", "newest"])
def test_flipped_bit_in_payload(tmp_path: Path, which: str) -> None:
    path = tmp_path / "galera.cache"
    held = build(path, 9)
    victim = {"oldest": min(held), "middle": 7, "newest": 9}[which]
    off = offsets(path)[victim] + 24 + 3
    patch(path, off, bytes([path.read_bytes()[off] ^ 0x10]))
    report = scan(path)
    assert report.garbage == 1 and [r.checksum for r in report.records if r.offset + 27 == off] == ["bad"]
    got = reopen(path)
    want = {k: v for k, v in held.items() if k > victim} if victim < 9 else {k: held[k] for k in held if k < 9}
    assert got == want


@pytest.mark.parametrize("field_offset", range(24))
def test_flipped_bit_in_header(tmp_path: Path, field_offset: int) -> None:
    path = tmp_path / "galera.cache"
    held = build(path, 9)
    off = offsets(path)[7] + field_offset
    patch(path, off, bytes([path.read_bytes()[off] ^ 0x04]))
    got = reopen(path)
    assert 7 not in got and all(held[k] == v for k, v in got.items())


def test_flipped_bit_after_clean_close(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "galera.cache"
    build(path, 9)
    held = reopen(path)  # now closed cleanly
    off = offsets(path)[6] + 30
    patch(path, off, bytes([path.read_bytes()[off] ^ 1]))
    caplog.set_level(logging.INFO, "istd.gcache")
    got = reopen(path)
    assert got == {k: v for k, v in held.items() if k > 6}
    assert "Recovering GCache ring buffer: found gapless sequence 7-9" in messages(caplog)
    assert scan(path).method == "preamble"


def test_clean_preamble_that_disagrees_means_a_scan(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "galera.cache"
    build(path, 9)
    held = reopen(path)
    raw = path.read_bytes()[:1024]
    patch(path, 0, raw.replace(b"seqno_max: 9", b"seqno_max: 8"))  # the file says 8, the ring holds 9
    caplog.set_level(logging.INFO, "istd.gcache")
    assert reopen(path) == held
    assert any("scanning the whole ring" in m for m in messages(caplog))


def test_flipped_bit_in_padding_byte(tmp_path: Path) -> None:
    path = tmp_path / "galera.cache"
    held = build(path, 5)
    rec = next(r for r in scan(path).records if r.seqno == 3)
    patch(path, rec.offset + rec.size - 1, bytes([(rec.size - 24 - rec.length) ^ 3]))
    assert reopen(path) == {k: v for k, v in held.items() if k > 3}


def test_seqno_hole(tmp_path: Path) -> None:
    path = tmp_path / "galera.cache"
    held = build(path, 9)
    patch(path, offsets(path)[6], fmt.BH_MARK.pack(-1, fmt.MAGIC_CTX))  # 6 discarded in place
    report = scan(path)
    assert report.holes == ((6, 6),) and (report.seqno_min, report.seqno_max) == (7, 9)
    assert reopen(path) == {k: held[k] for k in (7, 8, 9)}


def test_hole_at_the_top_is_a_torn_write(tmp_path: Path) -> None:
    path = tmp_path / "galera.cache"
    held = build(path, 6)
    off = offsets(path)[6]
    patch(path, off + 24, b"\xff" * 8)  # 6's payload half-written
    assert reopen(path) == {k: held[k] for k in range(1, 6)}


def test_record_of_another_history_never_validates(tmp_path: Path) -> None:
    path = tmp_path / "galera.cache"
    build(path, 3)
    nxt = scan(path).next
    put_raw(path, nxt, 4, b"from another history", gid=OTHER)
    got = reopen(path)
    assert got == {k: payload(k) for k in range(1, 4)}


def test_duplicate_identical_keeps_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "galera.cache"
    held = build(path, 5)
    put_raw(path, scan(path).next, 3, payload(3))
    report = scan(path)
    assert report.duplicates == (3,)
    caplog.set_level(logging.INFO, "istd.gcache")
    assert reopen(path) == held
    assert any("Contents are the same" in m for m in messages(caplog))


def test_duplicate_differing_discards_both(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "galera.cache"
    held = build(path, 5)
    put_raw(path, scan(path).next, 3, b"not what 3 was")
    caplog.set_level(logging.INFO, "istd.gcache")
    assert reopen(path) == {4: held[4], 5: held[5]}
    assert "Contents differ. Discarding both." in messages(caplog)


def test_dropped_tail_never_comes_back(tmp_path: Path) -> None:
    path = tmp_path / "galera.cache"
    gc = GCache.open(path, size=4096)
    gc.reset(GID, 0)
    gc.append_many([payload(k) for k in range(1, 11)])
    gc.reset(GID, 4)  # e.g. grastate says 4: 5..10 are not part of the history
    gc.append(b"new 5")
    gc.abandon()
    got = reopen(path, size=4096)
    assert got == {**{k: payload(k) for k in range(1, 5)}, 5: b"new 5"}


def test_history_reset_to_older_gid_and_back(tmp_path: Path) -> None:
    path = tmp_path / "galera.cache"
    gc = GCache.open(path, size=4096)
    gc.reset(GID, 0)
    gc.append_many([payload(k) for k in range(1, 11)])
    gc.reset(OTHER, 0)
    gc.append(b"other 1")
    gc.reset(GID, 2)  # back to the first history, at an older position
    gc.abandon()
    assert reopen(path, size=4096) == {}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(last=st.integers(1, 40),
       damage=st.lists(st.tuples(st.integers(0, RING + 23), st.integers(1, 255)), min_size=1, max_size=6))
def test_damage_never_yields_wrong_bytes(tmp_path_factory: pytest.TempPathFactory, last: int,
                                         damage: list[tuple[int, int]]) -> None:
    path = tmp_path_factory.mktemp("dmg") / "galera.cache"
    build(path, last)
    raw = bytearray(path.read_bytes())
    for off, xor in damage:
        raw[1280 + off] ^= xor
    path.write_bytes(bytes(raw))
    report = scan(path)
    got = reopen(path)
    assert (report.seqno_min, report.seqno_max) == ((min(got), max(got)) if got else (-1, -1))
    assert all(v == payload(k) for k, v in got.items())
    assert all(k <= last for k in got)
    assert reopen(path) == got  # and a second recovery agrees


# ------------------------------------------------------------------------ the real Galera file


@pytest.fixture
def real(tmp_path: Path) -> Path:
    dst = tmp_path / "galera.cache"
    shutil.copyfile(REAL, dst)
    dst.chmod(0o644)
    return dst


REAL_GID = uuid.UUID("0ba80362-e6b2-11f1-a838-fff90686b220")


def test_real_galera_file_opens(real: Path) -> None:
    with GCache.open(real, size="1M") as gc:
        assert (gc.gid, gc.seqno_min, gc.seqno_max, len(gc)) == (REAL_GID, 328567, 328773, 207)
        recs = gc.get_range(328567, 328773)
        assert [r.seqno for r in recs] == list(range(328567, 328774))
        assert {r.type for r in recs} == {0, CCHANGE} and recs[328684 - 328567].type == CCHANGE
        assert all(bytes(r.payload[:2]) == b"Gc" for r in recs if r.type == 0)  # Galera write-sets
        del recs
        gc.append_many([payload(s) for s in range(328774, 338774)])  # and it keeps working as a cache
        assert gc.seqno_max == 338773 and gc.seqno_min > 328773  # Galera's write-sets evicted
        held = contents(gc)
    with GCache.open(real, size="1M") as gc:
        assert contents(gc) == held


def test_real_galera_file_scan(real: Path) -> None:
    report = scan(real)
    assert report.gid == REAL_GID and report.version == 2 and report.synced
    assert (report.preamble_seqno_min, report.preamble_seqno_max, report.preamble_offset) == (
        328567, 328773, 12840)
    assert (report.method, report.seqno_min, report.seqno_max, report.count) == ("preamble", 328567, 328773, 207)
    assert report.holes == () and report.duplicates == () and report.garbage == 0
    galera = [r for r in report.records if r.seqno > 0]
    assert len(galera) == 207 and {r.checksum for r in galera} == {"none"} and {r.store for r in galera} == {1}
    assert real.read_bytes() == REAL.read_bytes()  # scan() never writes


def test_real_galera_file_unclean(real: Path) -> None:
    patch(real, 0, fmt.format_preamble(REAL_GID, synced=False))
    report = scan(real)
    assert (report.method, report.seqno_min, report.seqno_max, report.holes) == ("scan", 328567, 328773, ())
    with GCache.open(real, size="1M") as gc:
        assert (gc.seqno_min, gc.seqno_max, len(gc)) == (328567, 328773, 207)


def test_real_galera_file_with_damage(real: Path) -> None:
    report = scan(real)
    r = next(r for r in report.records if r.seqno == 328700)
    patch(real, r.offset, bytes(24))  # zero a header: the chain breaks there
    patch(real, 0, fmt.format_preamble(REAL_GID, synced=False))
    with GCache.open(real, size="1M") as gc:
        assert gc.seqno_max == 328773 and gc.seqno_min > 328700


def test_real_galera_file_bogus_offset(real: Path, caplog: pytest.LogCaptureFixture) -> None:
    patch(real, 0, fmt.format_preamble(REAL_GID, True, 328567, 328773, 157194072))
    caplog.set_level(logging.INFO, "istd.gcache")
    with GCache.open(real, size="1M") as gc:
        assert (gc.seqno_min, gc.seqno_max) == (328567, 328773)
    assert "Bogus offset in GCache ring buffer preamble: 157194072. Assuming unknown." in messages(caplog)


def test_scan_of_non_gcache(tmp_path: Path) -> None:
    p = tmp_path / "x"
    p.write_bytes(b"hello")
    with pytest.raises(GcacheCorrupt, match="truncated"):
        scan(p)


# ------------------------------------------------------------------------ a real kill -9

CHILD = r"""
import sys, uuid
from gcache import GCache
path, seed = sys.argv[1], int(sys.argv[2])
def payload(s):
    return bytes((s * 7 + k) % 256 for k in range(40 + (s * 29) % 900))
gc = GCache.open(path, size=64 * 1024)
gc.reset(uuid.UUID("0ba80362-e6b2-11f1-a838-fff90686b220"), 0)
s, k = 1, seed
while True:
    n = 1 + k % 37
    k = k * 1103515245 + 12345 & 0x7FFFFFFF
    if n % 5 == 0:
        gc.append(payload(s))
        s += 1
    else:
        gc.append_many([payload(x) for x in range(s, s + n)])
        s += n
    print(s - 1, flush=True)
"""


@pytest.mark.parametrize(("seed", "batches"), [(1, 3), (2, 40), (3, 400)])
def test_kill_9_while_appending(tmp_path: Path, seed: int, batches: int) -> None:
    import os
    import signal
    import subprocess
    import sys

    path = tmp_path / "galera.cache"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(seed)], stdout=subprocess.PIPE,
                             env=env, text=True)
    assert child.stdout is not None
    done = 0
    try:
        for _ in range(batches):
            line = child.stdout.readline()
            assert line, "the child died on its own"
            done = int(line)
        os.kill(child.pid, signal.SIGKILL)  # somewhere in the next batch, at no particular instruction
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL

    def expected(s: int) -> bytes:
        return bytes((s * 7 + k) % 256 for k in range(40 + (s * 29) % 900))

    with GCache.open(path, size=64 * 1024) as gc:
        assert gc.seqno_max >= done  # every completed append survived the process
        recs = gc.get_range(gc.seqno_min, gc.seqno_max)
        assert all(bytes(r.payload) == expected(r.seqno) for r in recs)
        del recs
