"""istd/apply_worker.py's serve(): requests in, one reply per request out, the state database in between.

serve() is driven here in-process through byte streams, exactly as the joiner drives the child process
through its pipes; the end-to-end tests run it as that child.
"""

from __future__ import annotations

import io
import uuid
from pathlib import Path

from gcache import CCHANGE, WRITESET, GCache
from istd.applier import SqliteApplier
from istd.apply_worker import ERROR_LEN, REPLY, encode_segment_request, serve
from istd.writeset import Op, RowChange, encode, synthetic

U1 = uuid.UUID("6c2d7f0a-1b2c-11ef-8000-000000000001")


def segment(path: Path, payloads: list[bytes], types: bytes) -> bytes:
    """Records 1..n as they lie in a gcache ring (what a joiner receives in a SEGMENT); ``path``: a cache
    file to build them in."""
    with GCache.open(path, size=4 << 20) as gc:
        gc.reset(U1, 0)
        gc.append_many(payloads, types)
        (seg,) = gc.export_segments(1, len(payloads))
        assert seg.raw is not None
        raw = bytes(seg.raw)
        seg.raw.release()
    return raw


def run(datadir: Path, *requests: list[bytes | memoryview]) -> list[int | str]:
    """Feed requests to serve() and parse its replies: the last seqno applied, or an error message."""
    out = io.BytesIO()
    stdin = io.BytesIO(b"".join(b"".join(r) for r in requests))
    assert serve(datadir, "sqlite", U1, stdin, out) == 0
    replies: list[int | str] = []
    data = memoryview(out.getvalue())
    while data:
        (last,) = REPLY.unpack(data[:REPLY.size])
        data = data[REPLY.size:]
        if last >= 0:
            replies.append(last)
            continue
        (n,) = ERROR_LEN.unpack(data[:ERROR_LEN.size])
        replies.append(bytes(data[ERROR_LEN.size:ERROR_LEN.size + n]).decode())
        data = data[ERROR_LEN.size + n:]
    return replies


def state(datadir: Path) -> tuple[tuple[uuid.UUID, int] | None, int]:
    a = SqliteApplier(datadir)
    try:
        return a.position(), a.row_count()
    finally:
        a.close()


def test_segments_are_applied_and_acknowledged(tmp_path: Path) -> None:
    payloads = [synthetic(s, 120) for s in range(1, 501)]
    raw = segment(tmp_path / "src.cache", payloads, bytes(len(payloads)))
    data = tmp_path / "data"
    data.mkdir()
    assert run(data, encode_segment_request(1, 500, raw)) == [500]
    assert state(data) == ((U1, 500), 500)
    # redelivered after a resume: nothing applied twice, acknowledged again
    assert run(data, encode_segment_request(1, 500, raw)) == [500]
    assert state(data) == ((U1, 500), 500)


def test_a_cchange_in_a_segment_advances_the_position_only(tmp_path: Path) -> None:
    """A configuration change cached among the write-sets (a Galera donor's, stored by this node) is not a
    write-set to decode: it takes the applier's general path and only moves the position."""
    payloads = [synthetic(1, 100), b"\x01\x02 a configuration change, not a write-set", synthetic(3, 100)]
    raw = segment(tmp_path / "src.cache", payloads, bytes([WRITESET, CCHANGE, WRITESET]))
    data = tmp_path / "data"
    data.mkdir()
    assert run(data, encode_segment_request(1, 3, raw)) == [3]
    assert state(data) == ((U1, 3), 2)


def test_a_bad_write_set_is_refused_by_seqno_and_nothing_of_it_is_committed(tmp_path: Path) -> None:
    good = [encode([RowChange(Op.UPSERT, "t", b"k%d" % s, b"v")]) for s in range(1, 6)]
    data = tmp_path / "data"
    data.mkdir()
    first = segment(tmp_path / "a.cache", good, bytes(5))
    bad = [*good, b"IW\x01\x01\x00\x09"]  # seqno 6: an unknown row operation
    second = segment(tmp_path / "b.cache", bad, bytes(6))
    replies = run(data, encode_segment_request(1, 5, first), encode_segment_request(1, 6, second))
    assert replies[0] == 5
    assert isinstance(replies[1], str) and "seqno 6" in replies[1]
    assert state(data) == ((U1, 5), 5)


def test_a_segment_that_does_not_match_its_count_is_refused(tmp_path: Path) -> None:
    raw = segment(tmp_path / "src.cache", [synthetic(s, 100) for s in range(1, 4)], bytes(3))
    data = tmp_path / "data"
    data.mkdir()
    (reply,) = run(data, encode_segment_request(1, 4, raw))
    assert isinstance(reply, str) and "3 write-sets" in reply
    assert state(data) == (None, 0)
