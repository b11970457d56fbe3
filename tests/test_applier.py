"""istd.applier: data and position in one transaction, idempotence, gaps, digests."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from istd.applier import (
    APPLIERS,
    EMPTY_DIGEST,
    RECORD_CCHANGE,
    RECORD_SKIP,
    RECORD_TRX,
    STATE_DB_NAME,
    ApplyError,
    NoneApplier,
    SqliteApplier,
    open_applier,
)
from istd.errors import ConfigError, IstError
from istd.writeset import Op, RowChange, encode, synthetic

U1 = uuid.UUID("6c2d7f0a-1b2c-11ef-8000-000000000001")
U2 = uuid.UUID("6c2d7f0a-1b2c-11ef-8000-000000000002")


def up(table: str, key: bytes, value: bytes) -> RowChange:
    return RowChange(Op.UPSERT, table, key, value)


def rm(table: str, key: bytes) -> RowChange:
    return RowChange(Op.DELETE, table, key)


def trx(seqno: int, *changes: RowChange) -> tuple[int, int, bytes]:
    return (seqno, RECORD_TRX, encode(changes))


@pytest.fixture
def applier(tmp_path: Path) -> Iterator[SqliteApplier]:
    a = SqliteApplier(tmp_path)
    yield a
    a.close()


def rows(a: SqliteApplier) -> dict[tuple[str, bytes], bytes]:
    assert a._conn is not None
    return {(t, k): v for t, k, v in a._conn.execute("SELECT tbl, key, value FROM rows")}


def history(n: int) -> list[tuple[int, int, bytes]]:
    """Seqnos 1..n: upserts over a small keyspace, deletes, a CC and a SKIP."""
    out: list[tuple[int, int, bytes]] = []
    for s in range(1, n + 1):
        if s % 7 == 0:
            out.append((s, RECORD_CCHANGE, b"cc"))
        elif s % 11 == 0:
            out.append((s, RECORD_SKIP, b""))
        elif s % 5 == 0:
            out.append(trx(s, rm("t", b"k%d" % (s % 13)), up("u", b"x", b"%d" % s)))
        else:
            out.append(trx(s, up("t", b"k%d" % (s % 13), b"v%d" % s), up("t", b"k%d" % (s % 3), b"w")))
    return out


def test_fresh_store_has_no_position(applier: SqliteApplier, tmp_path: Path) -> None:
    assert applier.position() is None
    assert applier.digest() == EMPTY_DIGEST
    assert applier.row_count() == 0
    assert (tmp_path / STATE_DB_NAME).exists()
    assert issubclass(ApplyError, IstError)


def test_empty_digest_is_fixed(applier: SqliteApplier) -> None:
    # Changing the digest changes what every node reports: do it on purpose only.
    assert EMPTY_DIGEST == "07bddd61850d600b6a28254768942c241cbfbc6539961ac4351784f273ca27c6"
    assert hashlib.sha256(b"istd-rows-v1\n").hexdigest() == EMPTY_DIGEST
    assert applier.digest() == EMPTY_DIGEST


def test_apply_upserts_deletes_and_position(applier: SqliteApplier) -> None:
    applier.reset(U1, 0)
    applier.apply(
        U1,
        [
            trx(1, up("t", b"a", b"1"), up("t", b"b", b"2")),
            trx(2, rm("t", b"a"), up("t", b"a", b"3"), rm("t", b"b")),
            (3, RECORD_CCHANGE, b"view"),
            trx(4, up("t", b"c", b"4"), rm("t", b"c"), up("u", b"c", b"5")),
            (5, RECORD_SKIP, b""),
        ],
    )
    assert rows(applier) == {("t", b"a"): b"3", ("u", b"c"): b"5"}
    assert applier.position() == (U1, 5)
    assert applier.row_count() == 2


def test_memoryview_payloads(applier: SqliteApplier) -> None:
    payload = encode([up("t", b"k", b"v")])
    applier.apply(U1, [(1, RECORD_TRX, memoryview(payload))])
    assert rows(applier) == {("t", b"k"): b"v"}


def test_only_cc_and_skip_advance_the_position(applier: SqliteApplier) -> None:
    applier.reset(U1, 10)
    applier.apply(U1, [(11, RECORD_CCHANGE, b""), (12, RECORD_SKIP, b"")])
    assert applier.position() == (U1, 12)
    assert applier.row_count() == 0


def test_bad_payload_commits_nothing(applier: SqliteApplier) -> None:
    applier.apply(U1, [trx(1, up("t", b"a", b"0"))])
    before = applier.digest()
    batch = [trx(2, up("t", b"a", b"1")), trx(3, up("t", b"b", b"2")), (4, RECORD_TRX, b"IW\x01junk")]
    with pytest.raises(ApplyError, match="seqno 4"):
        applier.apply(U1, batch)
    assert applier.position() == (U1, 1)
    assert applier.digest() == before
    assert rows(applier) == {("t", b"a"): b"0"}


def test_failure_inside_the_transaction_rolls_back(applier: SqliteApplier, tmp_path: Path) -> None:
    """The 3rd record fails in SQLite, after the first two were written: nothing stays."""
    applier.reset(U1, 0)
    other = sqlite3.connect(tmp_path / STATE_DB_NAME)
    other.execute(
        "CREATE TRIGGER boom BEFORE INSERT ON rows WHEN NEW.key = x'626f6f6d' "
        "BEGIN SELECT RAISE(ABORT, 'boom'); END"
    )
    other.commit()
    other.close()
    batch = [trx(1, up("t", b"a", b"1")), trx(2, rm("t", b"zz")), trx(3, up("t", b"boom", b"x"))]
    with pytest.raises(ApplyError, match="boom"):
        applier.apply(U1, batch)
    assert applier.position() == (U1, 0)
    assert rows(applier) == {}
    assert applier.digest() == EMPTY_DIGEST
    # The same applier goes on working, and the reopened store agrees.
    applier.apply(U1, batch[:2])
    assert applier.position() == (U1, 2)
    applier.close()
    again = SqliteApplier(tmp_path)
    assert again.position() == (U1, 2)
    assert rows(again) == {("t", b"a"): b"1"}
    again.close()


def test_overlapping_redelivery_is_idempotent(applier: SqliteApplier, tmp_path: Path) -> None:
    h = history(30)
    applier.apply(U1, h[:20])
    applier.apply(U1, h[10:25])  # 11..20 again, then 21..25
    applier.apply(U1, h[:25])  # all old: a no-op
    applier.apply(U1, h[24:])
    assert applier.position() == (U1, 30)
    with SqliteApplierCtx(tmp_path / "ref") as ref:
        ref.apply(U1, h)
        assert applier.digest() == ref.digest()


def test_redelivered_bad_payload_below_position_is_skipped(applier: SqliteApplier) -> None:
    applier.apply(U1, [trx(1, up("t", b"a", b"1")), trx(2, up("t", b"a", b"2"))])
    # seqno 1 was applied already: its payload is not looked at again.
    applier.apply(U1, [(1, RECORD_TRX, b"garbage"), trx(2, up("t", b"a", b"x")), trx(3, rm("t", b"a"))])
    assert applier.position() == (U1, 3)
    assert rows(applier) == {}


def test_gap_is_refused(applier: SqliteApplier) -> None:
    applier.apply(U1, [trx(1, up("t", b"a", b"1"))])
    with pytest.raises(ApplyError, match="gap"):
        applier.apply(U1, [trx(3, up("t", b"b", b"2"))])
    assert applier.position() == (U1, 1)
    assert applier.row_count() == 1


def test_gap_after_reset(applier: SqliteApplier) -> None:
    applier.reset(U1, 100)
    with pytest.raises(ApplyError, match="gap"):
        applier.apply(U1, [trx(102, up("t", b"b", b"2"))])
    applier.apply(U1, [trx(101, up("t", b"b", b"2"))])
    assert applier.position() == (U1, 101)


def test_no_position_accepts_any_start(applier: SqliteApplier) -> None:
    applier.apply(U1, [trx(500, up("t", b"a", b"1"))])
    assert applier.position() == (U1, 500)


def test_other_cluster_uuid_is_refused_until_reset(applier: SqliteApplier) -> None:
    applier.apply(U1, [trx(1, up("t", b"a", b"1"))])
    with pytest.raises(ApplyError, match=str(U2)):
        applier.apply(U2, [trx(2, up("t", b"b", b"2"))])
    assert applier.position() == (U1, 1)
    applier.reset(U2, 0)
    assert applier.position() == (U2, 0)
    applier.apply(U2, [trx(1, up("t", b"b", b"2"))])
    assert rows(applier) == {("t", b"a"): b"1", ("t", b"b"): b"2"}  # reset keeps the data


@pytest.mark.parametrize(
    "records",
    [
        [trx(1, up("t", b"a", b"1")), trx(3, up("t", b"a", b"1"))],  # not consecutive
        [trx(2, up("t", b"a", b"1")), trx(1, up("t", b"a", b"1"))],  # not in order
        [(1, 9, b"")],  # unknown record type
    ],
)
def test_malformed_batches_are_refused(applier: SqliteApplier, records) -> None:
    with pytest.raises(ApplyError):
        applier.apply(U1, records)
    assert applier.position() is None
    assert applier.row_count() == 0


def test_non_consecutive_inside_the_skipped_part_is_refused(applier: SqliteApplier) -> None:
    applier.reset(U1, 5)
    with pytest.raises(ApplyError, match="consecutive"):
        applier.apply(U1, [(3, RECORD_SKIP, b""), (7, RECORD_SKIP, b"")])
    assert applier.position() == (U1, 5)


def test_empty_batch_is_a_no_op(applier: SqliteApplier) -> None:
    applier.apply(U1, [])
    assert applier.position() is None


class SqliteApplierCtx:
    def __init__(self, datadir: Path) -> None:
        datadir.mkdir(parents=True, exist_ok=True)
        self.a = SqliteApplier(datadir)

    def __enter__(self) -> SqliteApplier:
        return self.a

    def __exit__(self, *exc: object) -> None:
        self.a.close()


@pytest.mark.parametrize("split", [1, 3, 10, 64])
def test_digest_independent_of_batching_and_node(tmp_path: Path, split: int) -> None:
    h = history(64)
    with SqliteApplierCtx(tmp_path / "one") as one, SqliteApplierCtx(tmp_path / "two") as two:
        one.apply(U1, h)
        for i in range(0, len(h), split):
            two.apply(U1, h[i : i + split])
        assert one.digest() == two.digest() != EMPTY_DIGEST
        assert one.position() == two.position() == (U1, 64)


def test_digest_differs_for_different_histories(tmp_path: Path) -> None:
    with SqliteApplierCtx(tmp_path / "a") as a, SqliteApplierCtx(tmp_path / "b") as b:
        a.apply(U1, history(20))
        b.apply(U1, history(20))
        assert a.digest() == b.digest()
        b.apply(U1, [trx(21, up("t", b"k8", b"other"))])
        assert a.digest() != b.digest()


def test_digest_frames_rows_unambiguously(tmp_path: Path) -> None:
    with SqliteApplierCtx(tmp_path / "a") as a, SqliteApplierCtx(tmp_path / "b") as b:
        a.apply(U1, [trx(1, up("t", b"ab", b"c"))])
        b.apply(U1, [trx(1, up("t", b"a", b"bc"))])
        assert a.digest() != b.digest()


def test_digest_ignores_position(applier: SqliteApplier) -> None:
    applier.apply(U1, [trx(1, up("t", b"a", b"1"))])
    d = applier.digest()
    applier.reset(U2, 99)
    assert applier.digest() == d


def test_position_and_data_survive_reopen(tmp_path: Path) -> None:
    a = SqliteApplier(tmp_path)
    a.apply(U1, history(40))
    digest = a.digest()
    a.close()
    a.close()  # idempotent
    with pytest.raises(ApplyError, match="closed"):
        a.position()
    b = SqliteApplier(tmp_path)
    assert b.position() == (U1, 40)
    assert b.digest() == digest
    b.apply(U1, history(41)[40:])
    assert b.position() == (U1, 41)
    b.close()


def test_background_checkpoints_keep_the_wal_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoint thread copies the WAL while batches are applied, and the WAL starts over: it stays
    near two checkpoint intervals (the applying connection's own autocheckpoint would allow 128 MiB)."""
    monkeypatch.setattr("istd.applier._CHECKPOINT_EVERY_BYTES", 256 << 10)
    a = SqliteApplier(tmp_path)
    wal = tmp_path / f"{STATE_DB_NAME}-wal"
    largest = 0
    for first in range(1, 8001, 400):  # ~8 MiB of rows, 20 commits of ~400 KiB
        a.apply(U1, [(s, RECORD_TRX, synthetic(s, 1000)) for s in range(first, first + 400)])
        largest = max(largest, wal.stat().st_size)
        # not a race with the thread: a loaded machine may delay a checkpoint, and the WAL then grows
        assert a._checkpointer._idle.wait(30)
    digest = a.digest()
    a.close()
    assert largest < 4 << 20
    b = SqliteApplier(tmp_path)
    assert b.position() == (U1, 8000)
    assert b.digest() == digest
    b.close()


def _laid_out(payloads: list[bytes]) -> tuple[bytes, list[int], list[int]]:
    """Payloads in one buffer, as in a gcache segment (a 24-byte header before each, padding after)."""
    buf, starts, ends = b"", [], []
    for p in payloads:
        buf += b"H" * 24
        starts.append(len(buf))
        buf += p
        ends.append(len(buf))
        buf += b"\x07" * (8 - len(buf) % 8)
    return buf, starts, ends


def trx_history(n: int) -> list[tuple[int, int, bytes]]:
    """Seqnos 1..n, all write-sets: upserts over a small keyspace, deletes, several changes per write-set."""
    out = []
    for s in range(1, n + 1):
        if s % 5 == 0:
            out.append(trx(s, rm("t", b"k%d" % (s % 13)), up("u", b"x", b"%d" % s)))
        elif s % 3 == 0:
            out.append(trx(s, up("t", b"k%d" % (s % 13), b"v%d" % s), up("t", b"k%d" % (s % 3), b"w")))
        else:
            out.append(trx(s, up("t", b"k%d" % (s % 17), b"v%d" % s)))
    return out


@pytest.mark.parametrize("split", [7, 250, 1000])
def test_apply_trx_run_is_apply(tmp_path: Path, split: int) -> None:
    """The worker's fast path gives the rows, digest and position of apply(), batch by batch, and skips
    what was applied before in the same way."""
    history = trx_history(1000)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = SqliteApplier(tmp_path / "a"), SqliteApplier(tmp_path / "b")
    for i in range(0, len(history), split):
        part = history[i:i + split]
        a.apply(U1, part)
        b.apply_trx_run(U1, part[0][0], *_laid_out([p for _, _, p in part]))
    assert rows(a) == rows(b) and a.digest() == b.digest()
    assert a.position() == b.position() == (U1, 1000)
    buf, starts, ends = _laid_out([p for _, _, p in history[990:]])
    b.apply_trx_run(U1, 991, buf, starts, ends)  # all applied before: nothing changes
    history.append(trx(1001, up("t", b"new", b"1")))
    b.apply_trx_run(U1, 996, *_laid_out([p for _, _, p in history[995:]]))  # 996-1000 skipped, 1001 applied
    a.apply(U1, history[995:])
    assert rows(a) == rows(b) and b.position() == (U1, 1001)
    a.close()
    b.close()


def test_apply_trx_run_refuses_as_apply(applier: SqliteApplier) -> None:
    history = trx_history(10)
    applier.apply_trx_run(U1, 1, *_laid_out([p for _, _, p in history[:5]]))
    before = rows(applier)
    payloads = [p for _, _, p in history[5:]]
    payloads[2] = payloads[2][:-1]
    with pytest.raises(ApplyError, match="seqno 8: malformed write-set"):
        applier.apply_trx_run(U1, 6, *_laid_out(payloads))
    with pytest.raises(ApplyError, match="gap: state is at seqno 5"):
        applier.apply_trx_run(U1, 7, *_laid_out(payloads[1:]))
    with pytest.raises(ApplyError, match="do not apply to a state at"):
        applier.apply_trx_run(U2, 6, *_laid_out(payloads))
    assert applier.position() == (U1, 5)
    assert rows(applier) == before


@pytest.mark.parametrize("count", [19, 20, 21, 199, 200, 201, 219, 220, 241, 450, 1000])
def test_many_rows_per_statement_keep_the_order_of_changes(applier: SqliteApplier, count: int) -> None:
    """Upserts go to SQLite many rows per statement: the same key written again in the same statement, in
    the next one and after a delete ends with its last value, as one change at a time would."""
    model: dict[tuple[str, bytes], bytes] = {}
    changes = []
    for i in range(count):
        key = b"k%d" % (i % 37)
        if i % 97 == 96:
            changes.append(rm("t", key))
            model.pop(("t", key), None)
        else:
            changes.append(up("t", key, b"v%d" % i))
            model[("t", key)] = b"v%d" % i
    applier.apply(U1, [trx(1, *changes)])
    assert rows(applier) == model


def test_unusable_store_is_an_apply_error(tmp_path: Path) -> None:
    (tmp_path / STATE_DB_NAME).write_bytes(b"this is not an sqlite database" * 100)
    with pytest.raises(ApplyError, match="unusable"):
        SqliteApplier(tmp_path)
    with pytest.raises(ApplyError):
        SqliteApplier(tmp_path / "missing" / "dir")


def test_apply_from_another_thread(applier: SqliteApplier) -> None:
    errors: list[BaseException] = []

    def work() -> None:
        try:
            applier.apply(U1, [(s, RECORD_TRX, synthetic(s, 100, keyspace=7)) for s in range(1, 501)])
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert errors == []
    assert applier.position() == (U1, 500)
    assert applier.row_count() == 7


def test_open_applier(tmp_path: Path) -> None:
    assert set(APPLIERS) == {"sqlite", "none"}
    a = open_applier("sqlite", tmp_path)
    assert isinstance(a, SqliteApplier) and a.name == "sqlite"
    a.close()
    n = open_applier("none", tmp_path / "nowhere")
    assert isinstance(n, NoneApplier) and n.name == "none"
    with pytest.raises(ConfigError, match="rocksdb"):
        open_applier("rocksdb", tmp_path)


def test_none_applier(tmp_path: Path) -> None:
    n = NoneApplier(tmp_path)
    n.reset(U1, 5)
    n.apply(U1, [trx(9, up("t", b"a", b"1")), (10, RECORD_TRX, b"anything")])
    assert n.position() is None
    assert n.digest() == ""
    n.close()
    assert list(tmp_path.iterdir()) == []
