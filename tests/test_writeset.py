"""istd.writeset: golden bytes, both codecs agree, only WriteSetError escapes, synthetic()."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from istd.errors import IstError
from istd.writeset import (
    MAX_CHANGES,
    MAX_KEY_BYTES,
    MIN_SYNTHETIC_BYTES,
    Op,
    RowChange,
    WriteSetDecodeError,
    WriteSetError,
    decode,
    decode_many,
    decode_rows,
    decode_with_construct,
    encode,
    encode_with_construct,
    synthetic,
)

GOLDEN_CHANGES = [
    RowChange(Op.UPSERT, "t", b"k1", b"v"),
    RowChange(Op.DELETE, "t", b"k2"),
]
GOLDEN_BYTES = (
    b"IW"  # magic
    b"\x01"  # version
    b"\x02\x00"  # count = 2
    b"\x01"  # op UPSERT
    b"\x01t"  # table
    b"\x02\x00k1"  # key
    b"\x01\x00\x00\x00v"  # value
    b"\x02"  # op DELETE
    b"\x01t"
    b"\x02\x00k2"
    b"\x00\x00\x00\x00"  # empty value
)


def test_writeset_error_is_an_ist_error() -> None:
    assert issubclass(WriteSetError, IstError)


@pytest.mark.parametrize("enc", [encode, encode_with_construct])
def test_golden_encode(enc) -> None:
    assert enc(GOLDEN_CHANGES) == GOLDEN_BYTES


@pytest.mark.parametrize("dec", [decode, decode_with_construct])
def test_golden_decode(dec) -> None:
    assert dec(GOLDEN_BYTES) == GOLDEN_CHANGES
    assert dec(memoryview(GOLDEN_BYTES)) == GOLDEN_CHANGES
    assert dec(bytearray(GOLDEN_BYTES)) == GOLDEN_CHANGES
    assert all(type(ch.op) is Op for ch in dec(GOLDEN_BYTES))


def test_empty_writeset() -> None:
    assert encode([]) == b"IW\x01\x00\x00" == encode_with_construct([])
    assert decode(b"IW\x01\x00\x00") == [] == decode_with_construct(b"IW\x01\x00\x00")


def test_decode_rows_gives_tuples() -> None:
    assert decode_rows(GOLDEN_BYTES) == [(Op.UPSERT, "t", b"k1", b"v"), (Op.DELETE, "t", b"k2", b"")]


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"IW\x01\x00",  # short header
        b"XW\x01\x00\x00",  # magic
        b"IW\x02\x00\x00",  # version
        b"IW\x01\x00\x00\x00",  # trailing byte
        b"IW\x01\x01\x00",  # count 1, no change
        GOLDEN_BYTES[:-1],  # truncated
        GOLDEN_BYTES + b"\x00",  # trailing byte
        GOLDEN_BYTES.replace(b"\x02\x01t", b"\x03\x01t"),  # unknown op
        GOLDEN_BYTES.replace(b"\x01\x01t", b"\x01\x00t", 1),  # empty table name
        GOLDEN_BYTES.replace(b"\x01t", b"\x01-", 1),  # table name outside [A-Za-z0-9_]
        GOLDEN_BYTES.replace(b"\x01t", b"\x01\xe9", 1),  # non-ASCII table name
        b"IW\x01\x01\x00\x02\x01t\x01\x00k\x01\x00\x00\x00v",  # DELETE with a value
        b"IW\x01\x01\x00\x01\x01t\x01\x00k\xff\xff\xff\xff",  # value length past the end
        b"IW\x01\x01\x00\x01\x05tt",  # table length past the end
        b"IW\x01\x01\x00\x01\x01t\xff\xffk",  # key length past the end
    ],
)
def test_malformed_rejected_by_both(bad: bytes) -> None:
    with pytest.raises(WriteSetError):
        decode(bad)
    with pytest.raises(WriteSetError):
        decode_with_construct(bad)


@pytest.mark.parametrize(
    "change",
    [
        RowChange(Op.UPSERT, "", b"k", b"v"),
        RowChange(Op.UPSERT, "x" * 65, b"k", b"v"),
        RowChange(Op.UPSERT, "bad name", b"k", b"v"),
        RowChange(Op.UPSERT, "tablé", b"k", b"v"),
        RowChange(Op.UPSERT, "t", b"k" * (MAX_KEY_BYTES + 1), b"v"),
        RowChange(Op.DELETE, "t", b"k", b"v"),
        RowChange(3, "t", b"k", b"v"),  # type: ignore[arg-type]
        RowChange(True, "t", b"k", b"v"),  # type: ignore[arg-type]
        RowChange(Op.UPSERT, "t", "k", b"v"),  # type: ignore[arg-type]
        RowChange(Op.UPSERT, "t", b"k", bytearray(b"v")),  # type: ignore[arg-type]
        RowChange(Op.UPSERT, 7, b"k", b"v"),  # type: ignore[arg-type]
    ],
)
def test_encode_rejects_invalid_change(change: RowChange) -> None:
    with pytest.raises(WriteSetError):
        encode([change])
    with pytest.raises(WriteSetError):
        encode_with_construct([change])


def test_encode_rejects_too_many_changes_and_non_changes() -> None:
    too_many = [RowChange(Op.DELETE, "t", b"")] * (MAX_CHANGES + 1)
    with pytest.raises(WriteSetError):
        encode(too_many)
    with pytest.raises(WriteSetError):
        encode_with_construct(too_many)
    for enc in (encode, encode_with_construct):
        with pytest.raises(WriteSetError):
            enc([("t", b"k")])  # type: ignore[list-item]


def test_max_changes_is_allowed() -> None:
    changes = [RowChange(Op.DELETE, "t", b"")] * MAX_CHANGES
    assert decode(encode(changes)) == changes


# -- properties -----------------------------------------------------------------------------------

tables = st.text(alphabet="abcxyzABZ0189_", min_size=1, max_size=64) | st.sampled_from(
    ["t", "accounts", "T_1"]
)
keys = st.binary(max_size=300)
values = st.binary(max_size=600)


@st.composite
def row_changes(draw) -> RowChange:
    op = draw(st.sampled_from(list(Op)))
    value = draw(values) if op is Op.UPSERT else b""
    return RowChange(op, draw(tables), draw(keys), value)


changesets = st.lists(row_changes(), max_size=8)


@settings(deadline=None)  # construct is slow on a loaded machine
@given(changesets)
def test_round_trip_and_codecs_agree(changes: list[RowChange]) -> None:
    fast = encode(changes)
    assert encode_with_construct(changes) == fast
    assert decode(fast) == changes
    assert decode_with_construct(fast) == changes
    assert decode(memoryview(fast)) == changes


# Arbitrary, mostly invalid, changes: both encoders reach the same verdict.
loose_changes = st.builds(
    RowChange,
    st.sampled_from([Op.UPSERT, Op.DELETE, 0, 3, 255]),
    st.text(max_size=70) | tables,
    keys,
    values,
)


@settings(deadline=None)  # construct is slow on a loaded machine
@given(st.lists(loose_changes, max_size=4))
def test_encoders_agree_on_arbitrary_changes(changes: list[RowChange]) -> None:
    try:
        fast = encode(changes)
    except WriteSetError:
        with pytest.raises(WriteSetError):
            encode_with_construct(changes)
    else:
        assert encode_with_construct(changes) == fast


def _same_verdict(data: bytes) -> None:
    """decode and decode_with_construct agree, and only WriteSetError escapes either."""
    try:
        fast = decode(data)
    except WriteSetError:
        fast = None
    try:
        slow = decode_with_construct(data)
    except WriteSetError:
        slow = None
    assert fast == slow


@settings(deadline=None)  # construct is slow on a loaded machine
@given(st.binary(max_size=64))
def test_random_bytes(data: bytes) -> None:
    _same_verdict(data)


@settings(deadline=None)  # construct is slow on a loaded machine
@given(st.binary(max_size=64))
def test_random_bytes_after_a_valid_header(data: bytes) -> None:
    _same_verdict(b"IW\x01" + data)
    _same_verdict(b"IW\x01\x01\x00" + data)
    _same_verdict(b"IW\x01\x01\x00\x01\x01t" + data)


@settings(max_examples=300, deadline=None)  # construct is slow on a loaded machine
@given(changesets, st.data())
def test_mutated_writesets(changes: list[RowChange], data: st.DataObject) -> None:
    good = encode(changes)
    i = data.draw(st.integers(0, len(good)))
    b = data.draw(st.integers(0, 255))
    _same_verdict(good[:i])  # truncated
    _same_verdict(good[:i] + bytes([b]) + good[i:])  # inserted byte
    _same_verdict(good + bytes([b]))  # trailing byte
    if i < len(good):
        _same_verdict(good[:i] + bytes([b]) + good[i + 1 :])  # replaced byte
        _same_verdict(good[:i] + good[i + 1 :])  # dropped byte


# -- decode_many: many write-sets in one buffer ----------------------------------------------------


def _expected_many(payloads: list[bytes]) -> tuple[list[tuple[Op, str, bytes, bytes]], int | None]:
    """decode_rows on each in turn: the changes, and the index of the first malformed one (or None)."""
    out: list[tuple[Op, str, bytes, bytes]] = []
    for i, p in enumerate(payloads):
        try:
            out.extend(decode_rows(p))
        except WriteSetError:
            return out, i
    return out, None


one_change_sets = st.lists(row_changes(), min_size=1, max_size=1)


@settings(max_examples=300, deadline=None)
@given(st.lists(one_change_sets | changesets, max_size=6), st.data())
def test_decode_many_is_decode_rows_on_each(sets: list[list[RowChange]], data: st.DataObject) -> None:
    """Write-sets, some mutated, lie in one buffer with arbitrary bytes between them (what lies past a
    write-set's end must never be read as part of it): decode_many gives what decode_rows gives on each."""
    payloads = []
    for changes in sets:
        p = encode(changes)
        if data.draw(st.booleans()):
            i = data.draw(st.integers(0, len(p)))
            b = data.draw(st.integers(0, 255))
            p = data.draw(st.sampled_from([p[:i], p[:i] + bytes([b]) + p[i + 1:], p + bytes([b])]))
        payloads.append(p)
    buf, starts, ends = b"", [], []
    for p in payloads:
        buf += data.draw(st.binary(max_size=8))
        starts.append(len(buf))
        buf += p
        ends.append(len(buf))
    buf += data.draw(st.binary(max_size=8))
    changes, bad = _expected_many(payloads)
    if bad is None:
        assert decode_many(buf, starts, ends) == changes
    else:
        with pytest.raises(WriteSetDecodeError) as info:
            decode_many(buf, starts, ends)
        assert info.value.index == bad


@pytest.mark.parametrize("cut", [1, 2, 5, 6, 7, 10])
def test_decode_many_does_not_read_past_the_end(cut: int) -> None:
    """A write-set cut short, followed by exactly the bytes it lacks: malformed, as decode_rows says."""
    whole = encode([RowChange(Op.UPSERT, "t", b"key", b"value")])
    assert decode_many(whole, [0], [len(whole)]) == decode_rows(whole)
    with pytest.raises(WriteSetDecodeError) as info:
        decode_many(whole, [0], [len(whole) - cut])
    assert info.value.index == 0
    with pytest.raises(WriteSetError):
        decode_rows(whole[:-cut])


def test_decode_many_offsets_must_pair() -> None:
    whole = encode([RowChange(Op.UPSERT, "t", b"key", b"value")])
    with pytest.raises(WriteSetDecodeError):
        decode_many(whole, [0, 0], [len(whole)])
    assert decode_many(b"", [], []) == []


# -- synthetic ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seqno", [0, 1, 7, 123456, 2**63 - 1, -(2**63)])
@pytest.mark.parametrize("size", [MIN_SYNTHETIC_BYTES, MIN_SYNTHETIC_BYTES + 1, 500, 4096, 65536])
def test_synthetic_exact_size(seqno: int, size: int) -> None:
    ws = synthetic(seqno, size)
    assert len(ws) == size
    [change] = decode(ws)
    assert change.op is Op.UPSERT
    assert change.table == "t"
    assert change.key == b"k%d" % seqno


@settings(deadline=None)  # construct is slow on a loaded machine
@given(st.integers(-(2**63), 2**63 - 1), st.integers(MIN_SYNTHETIC_BYTES, 3000))
def test_synthetic_exact_size_property(seqno: int, size: int) -> None:
    assert len(synthetic(seqno, size)) == size


def test_synthetic_below_minimum_gives_minimum() -> None:
    small = synthetic(5, 0)
    assert len(small) < MIN_SYNTHETIC_BYTES
    assert synthetic(5, 1) == small
    assert decode(small) == [RowChange(Op.UPSERT, "t", b"k5", b"")]
    assert len(synthetic(-(2**63), 0)) == MIN_SYNTHETIC_BYTES


def test_synthetic_is_deterministic_and_distinct() -> None:
    assert synthetic(42, 500) == synthetic(42, 500)
    assert synthetic(42, 500) != synthetic(43, 500)
    assert decode(synthetic(42, 500))[0].value != decode(synthetic(43, 500))[0].value


def test_synthetic_keyspace_and_table() -> None:
    a = decode(synthetic(3, 200, keyspace=10, table="accounts"))[0]
    b = decode(synthetic(13, 200, keyspace=10, table="accounts"))[0]
    assert (a.table, a.key) == (b.table, b.key) == ("accounts", b"k3")
    assert a.value != b.value
    assert len(synthetic(3, 200, keyspace=10, table="accounts")) == 200
    with pytest.raises(ValueError):
        synthetic(3, 200, keyspace=0)
    with pytest.raises(WriteSetError):
        synthetic(3, 200, table="no such")
