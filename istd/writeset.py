"""istd's own write-set format: a batch of row changes.

To gcache and protocol a write-set is opaque bytes; only istd (this module and the applier)
knows what it means. A write-set is what ``istd write``, ``istd load`` and ``istd gcache fill``
produce: an ordered list of UPSERT or DELETE changes of ``(table, key, value)``.

Byte layout (little endian; ``WRITESET`` below is the single source of truth)::

    +------+---------+-----------+----------------------------------------------+
    | "IW" | version | count     | count x change                               |
    | 2 B  | u8 = 1  | u16       |                                              |
    +------+---------+-----------+----------------------------------------------+
    change:  u8 op (1 UPSERT, 2 DELETE)
             u8 len  + table  ([A-Za-z0-9_]{1,64}, ASCII)
             u16 len + key    (0..65535 bytes)
             u32 len + value  (empty for DELETE)
    and nothing after the last change.

Two codecs implement it: the construct schema (``encode_with_construct`` /
``decode_with_construct``), which is the specification, and a hand-written ``struct`` codec
(``encode`` / ``decode``) for the hot apply path, where interpreted construct costs tens of
microseconds per write-set. Property tests prove that both give the same bytes and the same
changes, and the same verdict on arbitrary input. Both raise only ``WriteSetError``.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import construct as c

from istd.errors import IstError

__all__ = [
    "MAGIC",
    "MAX_CHANGES",
    "MAX_KEY_BYTES",
    "MAX_TABLE_BYTES",
    "MAX_VALUE_BYTES",
    "MIN_SYNTHETIC_BYTES",
    "VERSION",
    "WRITESET",
    "Op",
    "RowChange",
    "WriteSetDecodeError",
    "WriteSetError",
    "decode",
    "decode_many",
    "decode_rows",
    "decode_with_construct",
    "encode",
    "encode_with_construct",
    "synthetic",
]

MAGIC = b"IW"
VERSION = 1
# Limits come from the width of the length fields; the table limit keeps names usable as SQL
# identifiers should an applier want one table per name.
MAX_CHANGES = 0xFFFF
MAX_TABLE_BYTES = 64
MAX_KEY_BYTES = 0xFFFF
MAX_VALUE_BYTES = 0xFFFF_FFFF

_TABLE_RE = re.compile(rb"[A-Za-z0-9_]{1,64}")


class WriteSetError(IstError):
    """A write-set cannot be encoded (invalid change) or decoded (malformed bytes)."""


class Op(IntEnum):
    UPSERT = 1
    DELETE = 2


_OPS: dict[int, Op] = {int(op): op for op in Op}


@dataclass(frozen=True, slots=True)
class RowChange:
    """One row change. A DELETE carries an empty value."""

    op: Op
    table: str
    key: bytes
    value: bytes = b""


# -- validation shared by both codecs -------------------------------------------------------------


def _table_bytes(table: object) -> bytes:
    if not isinstance(table, str) or not table.isascii():
        raise WriteSetError(f"table name must be an ASCII str, got {table!r}")
    raw = table.encode("ascii")
    if not _TABLE_RE.fullmatch(raw):
        raise WriteSetError(f"table name must match [A-Za-z0-9_]{{1,64}}, got {table!r}")
    return raw


def _table_str(raw: bytes) -> str:
    if not _TABLE_RE.fullmatch(raw):
        raise WriteSetError(f"bad table name {raw[:80]!r}")
    return raw.decode("ascii")


def _op(value: object) -> Op:
    op = _OPS.get(value) if isinstance(value, int) and not isinstance(value, bool) else None
    if op is None:
        raise WriteSetError(f"unknown row operation {value!r}")
    return op


def _check_change(ch: RowChange) -> tuple[Op, bytes, bytes, bytes]:
    """Validate one change for encoding; return (op, table, key, value) as wire values."""
    op = _op(ch.op)
    table = _table_bytes(ch.table)
    key, value = ch.key, ch.value
    if type(key) is not bytes or type(value) is not bytes:
        raise WriteSetError("key and value must be bytes")
    if len(key) > MAX_KEY_BYTES:
        raise WriteSetError(f"key of {len(key)} bytes exceeds {MAX_KEY_BYTES}")
    if len(value) > MAX_VALUE_BYTES:
        raise WriteSetError(f"value of {len(value)} bytes exceeds {MAX_VALUE_BYTES}")
    if op is Op.DELETE and value:
        raise WriteSetError("a DELETE carries no value")
    return op, table, key, value


# -- the construct schema: the specification ------------------------------------------------------


class _OpAdapter(c.Adapter):
    # construct's Enum parses unknown values without complaint; this one refuses them.
    def _decode(self, obj: int, context: Any, path: str) -> Op:
        op = _OPS.get(obj)
        if op is None:
            raise c.ValidationError(f"unknown row operation {obj}", path=path)
        return op

    def _encode(self, obj: Any, context: Any, path: str) -> int:
        try:
            return int(_op(obj))
        except WriteSetError as exc:
            raise c.ValidationError(str(exc), path=path) from exc


class _TableAdapter(c.Adapter):
    def _decode(self, obj: bytes, context: Any, path: str) -> str:
        try:
            return _table_str(obj)
        except WriteSetError as exc:
            raise c.ValidationError(str(exc), path=path) from exc

    def _encode(self, obj: Any, context: Any, path: str) -> bytes:
        try:
            return _table_bytes(obj)
        except WriteSetError as exc:
            raise c.ValidationError(str(exc), path=path) from exc


ROW_CHANGE = c.Struct(
    "op" / _OpAdapter(c.Int8ul),
    "table" / _TableAdapter(c.Prefixed(c.Int8ul, c.GreedyBytes)),
    "key" / c.Prefixed(c.Int16ul, c.GreedyBytes),
    "value" / c.Prefixed(c.Int32ul, c.GreedyBytes),
    c.Check(lambda this: this.op != Op.DELETE or len(this.value) == 0),
)

WRITESET = c.Struct(
    "magic" / c.Const(MAGIC),
    "version" / c.Const(VERSION, c.Int8ul),
    "changes" / c.PrefixedArray(c.Int16ul, ROW_CHANGE),
    c.Terminated,
)


def encode_with_construct(changes: Sequence[RowChange]) -> bytes:
    """Encode with the schema (slow; the reference for ``encode``). Raises only WriteSetError."""
    try:
        items = [{"op": ch.op, "table": ch.table, "key": ch.key, "value": ch.value} for ch in changes]
        # The schema would also take bytearray; the fast codec takes bytes only, and so do we.
        if not all(type(i["key"]) is bytes and type(i["value"]) is bytes for i in items):
            raise WriteSetError("key and value must be bytes")
        return bytes(WRITESET.build({"changes": items}))
    except c.ConstructError as exc:
        raise WriteSetError(f"cannot encode write-set: {exc}") from exc
    except AttributeError as exc:  # not a RowChange
        raise WriteSetError(f"cannot encode write-set: {exc}") from exc


def decode_with_construct(payload: bytes | memoryview) -> list[RowChange]:
    """Decode with the schema (slow; the reference for ``decode``). Raises only WriteSetError."""
    try:
        parsed = WRITESET.parse(bytes(payload))
    except c.ConstructError as exc:
        raise WriteSetError(f"malformed write-set: {exc}") from exc
    return [RowChange(ch.op, ch.table, ch.key, ch.value) for ch in parsed.changes]


# -- the fast codec: hand-written against the schema ----------------------------------------------

_HEADER = struct.Struct("<2sBH")
_HEADER_BYTES = _HEADER.size
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_CHANGE_HEAD = struct.Struct("<BB")
_FIRST = struct.Struct("<2sBHBB")  # header + the first change's op and table length
_FIRST_BYTES = _FIRST.size

# Validated table names, so the hot path pays one dict lookup instead of a regex per change.
# Bounded: a hostile stream of distinct names must not grow memory.
_TABLE_CACHE: dict[bytes, str] = {}
_TABLE_CACHE_MAX_ENTRIES = 4096


def encode(changes: Sequence[RowChange]) -> bytes:
    """Encode ``changes`` into one write-set. Raises WriteSetError for an invalid change."""
    if len(changes) > MAX_CHANGES:
        raise WriteSetError(f"{len(changes)} changes exceed {MAX_CHANGES} per write-set")
    parts = [_HEADER.pack(MAGIC, VERSION, len(changes))]
    append = parts.append
    for ch in changes:
        try:
            op, table, key, value = _check_change(ch)
        except AttributeError as exc:  # not a RowChange
            raise WriteSetError(f"cannot encode write-set: {exc}") from exc
        append(_CHANGE_HEAD.pack(op, len(table)))
        append(table)
        append(_U16.pack(len(key)))
        append(key)
        append(_U32.pack(len(value)))
        append(value)
    return b"".join(parts)


def decode_rows(payload: bytes | memoryview) -> list[tuple[Op, str, bytes, bytes]]:
    """Decode a write-set into ``(op, table, key, value)`` tuples (the applier's hot path).

    Outcomes: a list of changes in write-set order (possibly empty), or WriteSetError for bad
    magic, unknown version, unknown op, bad table name, a DELETE with a value, a length running
    past the end, or bytes after the last change. No other exception escapes.
    """
    if type(payload) is not bytes:
        payload = bytes(payload)
    # Fast path for the common one-change write-set: one unpack for header + change head.
    try:
        magic, version, count, opb, tlen = _FIRST.unpack_from(payload)
    except struct.error:
        return _decode_rows(payload)  # shorter than header + change head
    if count != 1 or magic != MAGIC or version != VERSION:
        return _decode_rows(payload)
    op = _OPS.get(opb)
    tend = _FIRST_BYTES + tlen
    raw = payload[_FIRST_BYTES:tend]
    table = _TABLE_CACHE.get(raw)
    if op is None or table is None or len(payload) < tend + 6:
        return _decode_rows(payload)  # rare cases: let the general decoder judge
    kend = tend + 2 + _U16.unpack_from(payload, tend)[0]
    try:
        (vlen,) = _U32.unpack_from(payload, kend)
    except struct.error as exc:
        raise WriteSetError("malformed write-set: truncated") from exc
    vstart = kend + 4
    if vstart + vlen != len(payload):
        return _decode_rows(payload)  # raises: truncated or trailing bytes
    if vlen and op is Op.DELETE:
        raise WriteSetError("malformed write-set: a DELETE carries a value")
    return [(op, table, payload[tend + 2 : kend], payload[vstart:])]


def _decode_rows(payload: bytes) -> list[tuple[Op, str, bytes, bytes]]:
    """The general decoder (any count); same outcomes as ``decode_rows``."""
    end = len(payload)
    if end < _HEADER_BYTES:
        raise WriteSetError(f"malformed write-set: {end} bytes is shorter than the header")
    magic, version, count = _HEADER.unpack_from(payload, 0)
    if magic != MAGIC:
        raise WriteSetError(f"malformed write-set: bad magic {magic!r}")
    if version != VERSION:
        raise WriteSetError(f"malformed write-set: unsupported version {version}")
    pos = _HEADER_BYTES
    out: list[tuple[Op, str, bytes, bytes]] = []
    append = out.append
    u16 = _U16.unpack_from
    u32 = _U32.unpack_from
    cache = _TABLE_CACHE
    ops = _OPS
    try:
        for _ in range(count):
            op = ops.get(payload[pos])
            if op is None:
                raise WriteSetError(f"malformed write-set: unknown row operation {payload[pos]}")
            pos += 2
            tend = pos + payload[pos - 1]
            raw = payload[pos:tend]
            table = cache.get(raw)
            if table is None:
                table = _table_str(raw)  # raises on a bad name; a truncated one fails below
                if len(cache) < _TABLE_CACHE_MAX_ENTRIES:
                    cache[raw] = table
            (klen,) = u16(payload, tend)
            pos = tend + 2
            kend = pos + klen
            key = payload[pos:kend]
            (vlen,) = u32(payload, kend)
            pos = kend + 4 + vlen
            # A truncated value slice is caught by the final position check (pos > end).
            if vlen:
                if op is Op.DELETE:
                    raise WriteSetError("malformed write-set: a DELETE carries a value")
                append((op, table, key, payload[kend + 4 : pos]))
            else:
                append((op, table, key, b""))
    except (IndexError, struct.error) as exc:
        raise WriteSetError("malformed write-set: truncated") from exc
    if pos != end:
        if pos > end:
            raise WriteSetError("malformed write-set: truncated")
        raise WriteSetError(f"malformed write-set: {end - pos} bytes after the last change")
    return out


class WriteSetDecodeError(WriteSetError):
    """A write-set of a ``decode_many`` run is malformed; ``index`` says which (0 = the first)."""

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


def decode_many(buf: bytes, starts: Sequence[int], ends: Sequence[int]) -> list[tuple[Op, str, bytes, bytes]]:
    """Decode the write-sets ``buf[starts[i]:ends[i]]``, in order, into one list of changes (the apply
    worker's hot path: a gcache segment's payloads, decoded without a copy or a view per write-set).

    Same outcomes as ``decode_rows`` on each write-set in turn; a malformed one raises
    WriteSetDecodeError with its index. The common one-change write-set is decoded in place here; any
    other goes through ``decode_rows``.
    """
    out: list[tuple[Op, str, bytes, bytes]] = []
    append, extend = out.append, out.extend
    head, u16, u32 = _FIRST.unpack_from, _U16.unpack_from, _U32.unpack_from
    tables, ops = _TABLE_CACHE, _OPS
    i = 0
    try:
        for i, (s, e) in enumerate(zip(starts, ends, strict=True)):  # noqa: B007 (the excepts below say i)
            # Fields are read from buf, which goes on past e: every offset is checked against e before
            # anything read is trusted, and any doubt goes to decode_rows on the exact bytes.
            try:
                magic, version, count, opb, tlen = head(buf, s)
                tend = s + _FIRST_BYTES + tlen
                if count != 1 or magic != MAGIC or version != VERSION:
                    raise LookupError
                table = tables[buf[s + _FIRST_BYTES:tend]]
                op = ops[opb]
                kend = tend + 2 + u16(buf, tend)[0]
                vstart = kend + 4
                if vstart > e or vstart + u32(buf, kend)[0] != e:  # each field ends before vstart
                    raise LookupError
            except (LookupError, struct.error):  # not the simple case, or not valid: the exact decoder judges
                extend(decode_rows(buf[s:e]))
                continue
            if vstart == e:
                append((op, table, buf[tend + 2:kend], b""))
            elif op is Op.DELETE:
                raise WriteSetError("malformed write-set: a DELETE carries a value")
            else:
                append((op, table, buf[tend + 2:kend], buf[vstart:e]))
    except WriteSetError as exc:
        raise WriteSetDecodeError(str(exc), i) from exc
    except ValueError as exc:  # zip: starts and ends of different lengths
        raise WriteSetDecodeError(f"bad write-set offsets: {exc}", i) from exc
    return out


def decode(payload: bytes | memoryview) -> list[RowChange]:
    """Decode a write-set. Same outcomes as ``decode_rows``; raises only WriteSetError."""
    return [RowChange(op, table, key, value) for op, table, key, value in decode_rows(payload)]


# -- synthetic write-sets for fill, load and benchmarks -------------------------------------------

_SYNTHETIC_OVERHEAD = _HEADER_BYTES + _CHANGE_HEAD.size + _U16.size + _U32.size
# The longest key synthetic() makes is b"k" + str(-2**63); with the default one-letter table,
# any size >= this gives exactly `size` bytes for any int64 seqno.
MIN_SYNTHETIC_BYTES = _SYNTHETIC_OVERHEAD + 1 + len(b"k%d" % -(2**63))


def synthetic(seqno: int, size: int, *, table: str = "t", keyspace: int | None = None) -> bytes:
    """A valid one-row UPSERT write-set of exactly ``size`` bytes, deterministic in ``seqno``.

    The key is ``b"k<seqno>"``, or ``b"k<seqno % keyspace>"`` when ``keyspace`` is given (so a
    load overwrites a bounded set of rows). The value is padding derived from the seqno. If
    ``size`` is below the minimum for this key and table, the result has an empty value and is
    that minimum (never more than MIN_SYNTHETIC_BYTES with the default table).
    """
    if keyspace is not None:
        if keyspace <= 0:
            raise ValueError(f"keyspace must be positive, got {keyspace}")
        key = b"k%d" % (seqno % keyspace)
    else:
        key = b"k%d" % seqno
    table_raw = _table_bytes(table)
    vlen = max(0, size - _SYNTHETIC_OVERHEAD - len(table_raw) - len(key))
    if vlen:
        unit = b"v%d." % seqno
        value = (unit * (vlen // len(unit) + 1))[:vlen]
    else:
        value = b""
    return encode([RowChange(Op.UPSERT, table, key, value)])
