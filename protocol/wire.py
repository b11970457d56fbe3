"""IST byte layouts: construct schemas (the source of truth) and the fast codecs checked against them.

Every layout is a construct schema below. Handshakes are rare and small, so they are parsed by the
interpreted schemas themselves (never ``compile()``d: see CONVENTIONS.md). The frame header and the
BATCH and SEGMENT payloads are on the hot path and are handled by ``struct`` / ``memoryview`` code
written against the schemas; ``tests/test_protocol_fuzz.py`` proves with Hypothesis that the fast
codecs and the schemas agree in both directions, on valid and on corrupt input.

Decoders raise only RemoteProtocolError (the peer sent it); encoders raise only LocalProtocolError.
"""

from __future__ import annotations

import enum
import struct
import sys
import uuid
import zlib
from array import array
from itertools import compress
from typing import Any, NamedTuple

import construct
from construct import (
    Array,
    Bytes,
    Check,
    Const,
    Default,
    GreedyBytes,
    Int8sl,
    Int8ul,
    Int16ul,
    Int32ul,
    Int64sl,
    PascalString,
    Prefixed,
    Struct,
    Terminated,
    this,
)

from istd.errors import EINVAL, LocalProtocolError, ProtocolError, RemoteProtocolError
from protocol.events import (
    Accept,
    Handshake,
    HandshakeResponse,
    RecordType,
    RefusalReason,
    Segment,
    SstBegin,
    SstEnd,
    SstRefused,
    SstRequest,
    TransferKind,
    WriteSetBatch,
)

# --- limits and numbers -------------------------------------------------------------------------

# Same size (and the same first 16 bytes) as Galera 4's header; the last 8 hold our two CRC32s
# where Galera has one 64-bit hash of the first 16 bytes.
HEADER_BYTES = 24
# The data protocol version this code speaks. Bumped when a frame layout or rule changes.
PROTOCOL_VERSION = 1
# (min, max) versions we can negotiate; a range so that a future release can speak to this one.
SUPPORTED_VERSIONS = (1, 1)
# HANDSHAKE and HANDSHAKE_RESPONSE frames always carry this version byte: the handshake layout must
# be readable before anything is negotiated, so it is versioned on its own.
HANDSHAKE_VERSION = 1
# Largest frame payload accepted by default. A write-set cannot be split across frames, so this must
# exceed the largest write-set: 64 MiB is 4x the 16 MiB default max_allowed_packet of MariaDB and
# MySQL 8, yet small enough that a hostile length cannot make us hold much. Raise it on both sides
# if wsrep_max_ws_size lets larger write-sets through.
MAX_FRAME_BYTES = 64 * 1024 * 1024
# A handshake is a few dozen bytes plus a name and an auth token; anything larger is rejected from
# its header alone, before a byte of it is buffered, so an unauthenticated peer cannot make us hold
# more than this.
MAX_HANDSHAKE_BYTES = 64 * 1024
# A STATUS_REQUEST or STATUS payload is one node's status as JSON (a few hundred bytes to a few KiB);
# like a handshake it comes before any authentication, so it is bounded the same way and rejected
# from its header alone.
MAX_STATUS_BYTES = 64 * 1024
# Ctrl code for "frame too large". Ctrl codes are Linux errno values on the wire, as in Galera;
# istd.errors does not define this one.
EMSGSIZE = 90
# Header flags: Galera's F_PRELOAD (bit 0) is reserved and ignored; every other bit must be 0.
F_PRELOAD = 0x01
SEQNO_NONE = -1  # the header seqno of frames that carry no write-set
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
U32_MAX = 2**32 - 1


class FrameType(enum.IntEnum):
    """Header byte 1. 1-6 are Galera's T_* numbers; 7-11 are ours."""

    HANDSHAKE = 1
    HANDSHAKE_RESPONSE = 2
    CTRL = 3
    TRX = 4
    CCHANGE = 5
    SKIP = 6
    BATCH = 7
    KEEPALIVE = 8
    SEGMENT = 9  # only if the joiner's HANDSHAKE set REQUEST_SEGMENTS
    STATUS_REQUEST = 10  # client -> server instead of a HANDSHAKE (cluster mode)
    STATUS = 11  # server -> client, the answer; then the conversation is done
    SST_REQUEST = 12  # joiner -> donor on the SST port, instead of a HANDSHAKE
    SST_BEGIN = 13  # donor -> joiner: position and size of the snapshot that follows
    SST_CHUNK = 14  # donor -> joiner: snapshot bytes
    SST_END = 15  # donor -> joiner: sha256 of the whole snapshot; then the conversation is done
    SST_REFUSED = 16  # donor -> joiner: no snapshot, and why


MAGIC = b"ISTD"

# --- schemas: the single source of truth for every byte ------------------------------------------

HeaderSchema = Struct(
    "version" / Int8ul,  # negotiated version; HANDSHAKE_VERSION on handshake frames
    "type" / Int8ul,  # FrameType
    "flags" / Int8ul,  # bit 0 F_PRELOAD (reserved), others 0
    "ctrl" / Int8sl,  # CTRL frames: C_OK, C_EOF or -errno; 0 otherwise
    "len" / Int32ul,  # payload bytes after the header
    "seqno" / Int64sl,  # TRX/CCHANGE/SKIP: the record's; BATCH/SEGMENT: the first record's; else -1
    "header_crc" / Int32ul,  # zlib.crc32 of bytes [0, 16)
    "payload_crc" / Int32ul,  # zlib.crc32 of the payload (0 for an empty payload)
)

HandshakeSchema = Struct(
    "magic" / Const(MAGIC),
    "min_version" / Int8ul,
    "max_version" / Int8ul,
    "cluster_uuid" / Bytes(16),
    "last_applied" / Int64sl,
    "first" / Int64sl,
    "last" / Int64sl,
    "accept" / Int8ul,  # Accept flags: 1 IST, 2 SST
    "request" / Int8ul,  # request flags: REQUEST_FOLLOW | REQUEST_SEGMENTS | REQUEST_SUBSCRIBE; others rejected
    "node_name" / PascalString(Int8ul, "utf8"),
    "auth" / Prefixed(Int16ul, GreedyBytes),
    Terminated,
)
# Request flags: FOLLOW streams on past `last`; SEGMENTS lets the donor send SEGMENT frames;
# SUBSCRIBE (cluster mode) asks for an IST from the donor's current position on, then follow.
REQUEST_FOLLOW = 0x01
REQUEST_SEGMENTS = 0x02
REQUEST_SUBSCRIBE = 0x04
REQUEST_MASK = REQUEST_FOLLOW | REQUEST_SEGMENTS | REQUEST_SUBSCRIBE
# A plain int: ~ on an IntFlag stays inside the flag's known bits, and would hide unknown ones.
ACCEPT_MASK = int(Accept.IST | Accept.SST)

HandshakeResponseSchema = Struct(
    "magic" / Const(MAGIC),
    "version" / Int8ul,  # chosen version, 0 when refused
    "granted" / Int8ul,  # TransferKind
    "reason" / Int8ul,  # RefusalReason
    "donor_uuid" / Bytes(16),
    "first" / Int64sl,
    "last" / Int64sl,
    "cached_downto" / Int64sl,
    "safe_ist_seqno" / Int64sl,
    "donor_last" / Int64sl,
    "message" / PascalString(Int16ul, "utf8"),
    "sst_address" / PascalString(Int8ul, "utf8"),
    Terminated,
)


def _batch_pad_bytes(ctx: Any) -> int:
    """Zero bytes after the type array so that the u32 sizes start 4-aligned in the payload."""
    return -(4 + ctx.count) % 4


BatchSchema = Struct(
    "count" / Int32ul,
    Check(this.count >= 1),
    "types" / Bytes(this.count),
    Check(lambda ctx: all(t in RecordType._value2member_map_ for t in ctx.types)),
    "padding" / Default(Bytes(_batch_pad_bytes), lambda ctx: bytes(_batch_pad_bytes(ctx))),
    Check(lambda ctx: ctx.padding == bytes(len(ctx.padding))),
    "sizes" / Array(this.count, Int32ul),
    Check(lambda ctx: all(s == 0 for t, s in zip(ctx.types, ctx.sizes, strict=True) if t == RecordType.SKIP)),
    "data" / Bytes(lambda ctx: sum(ctx.sizes)),
    Terminated,
)

# A run of records as one opaque blob that only the layer above can split: the protocol checks that a
# record is at least one byte, so `count` cannot claim more seqnos than the frame could hold.
SegmentSchema = Struct(
    "count" / Int32ul,
    Check(this.count >= 1),
    "blob" / GreedyBytes,
    Check(lambda ctx: len(ctx.blob) >= ctx.count),
    Terminated,
)

# STATUS_REQUEST and STATUS payloads: opaque bytes (istd puts JSON there), taken verbatim. The frame
# length bounds them (MAX_STATUS_BYTES); there is nothing else to check, so no fast codec either.
StatusSchema = Struct(
    "payload" / GreedyBytes,
    Terminated,
)

# SST conversation (the donor's SST port, 4444). SST_CHUNK payloads are the snapshot's raw bytes.
SST_FORMAT_BYTES = 255
SHA256_BYTES = 32
SstRequestSchema = Struct(
    "magic" / Const(MAGIC),
    "node_name" / PascalString(Int8ul, "utf8"),
    "auth" / Prefixed(Int16ul, GreedyBytes),
    Terminated,
)
SstBeginSchema = Struct(
    "magic" / Const(MAGIC),
    "cluster_uuid" / Bytes(16),
    "seqno" / Int64sl,  # the snapshot's position: it contains write-sets up to and including this one
    "total_bytes" / Int64sl,  # >= 0
    "format" / PascalString(Int8ul, "utf8"),  # istd: "sqlite"
    Terminated,
)
SstEndSchema = Struct(
    "sha256" / Bytes(SHA256_BYTES),
    Terminated,
)
SstRefusedSchema = Struct(
    "message" / PascalString(Int16ul, "utf8"),
    Terminated,
)

# --- fast header codec ---------------------------------------------------------------------------

_HEAD16 = struct.Struct("<BBBbIq")  # HeaderSchema's first six fields
_HEADER = struct.Struct("<BBBbIqII")  # all of HeaderSchema
_CRCS = struct.Struct("<II")
assert _HEADER.size == HeaderSchema.sizeof() == HEADER_BYTES
assert _HEAD16.size == 16


class FrameHeader(NamedTuple):
    """A decoded header, field for field as HeaderSchema."""

    version: int
    type: int
    flags: int
    ctrl: int
    len: int
    seqno: int
    header_crc: int
    payload_crc: int


def pack_header(
    version: int, type: int, flags: int, ctrl: int, length: int, seqno: int, payload_crc: int
) -> bytes:
    """The 24 header bytes (header_crc computed here). Raises LocalProtocolError on out-of-range fields."""
    try:
        head = _HEAD16.pack(version, type, flags, ctrl, length, seqno)
    except struct.error as exc:
        raise LocalProtocolError(f"cannot encode frame header: {exc}") from exc
    return head + _CRCS.pack(zlib.crc32(head), payload_crc)


def unpack_header(data: bytes | bytearray | memoryview) -> FrameHeader:
    """Decode the first 24 bytes of ``data`` and check header_crc.

    Returns the header; raises RemoteProtocolError (-EINVAL) if the header CRC does not match.
    ``data`` must hold at least HEADER_BYTES bytes (the caller's framing guarantees it).
    """
    header = FrameHeader._make(_HEADER.unpack_from(data))
    if zlib.crc32(bytes(data[:16])) != header.header_crc:
        raise RemoteProtocolError(
            f"Corrupted IST message header: ver: {header.version}, type: {header.type}, "
            f"flags: {header.flags}, ctrl: {header.ctrl}, len: {header.len}, seqno: {header.seqno}",
            error_code=-EINVAL,
        )
    return header


# --- fast BATCH codec ----------------------------------------------------------------------------

_U32 = struct.Struct("<I")
_LITTLE = sys.byteorder == "little"
_RECORD_TYPE_BYTES = bytes(RecordType)
assert array("I").itemsize == 4


def _sizes_from_le(raw: memoryview) -> array[int] | memoryview:
    if _LITTLE:
        return raw.cast("I")  # zero-copy
    sizes = array("I", raw.tobytes())
    sizes.byteswap()
    return sizes


def _sizes_to_le(sizes: array[int] | memoryview) -> bytes:
    raw = sizes.tobytes()
    if _LITTLE:
        return raw
    swapped = array("I", raw)
    swapped.byteswap()
    return swapped.tobytes()


def decode_batch(first: int, payload: bytes) -> WriteSetBatch:
    """Decode a BATCH payload (BatchSchema) whose first record has seqno ``first``.

    Returns a WriteSetBatch whose ``sizes`` and ``data`` are zero-copy views of ``payload``.
    Raises RemoteProtocolError (-EPROTO) if the count is 0, the payload is too short, a type byte
    is not TRX/CCHANGE/SKIP, the padding is not zero, a SKIP has a size, or the sizes do not sum
    to exactly the bytes left after the sizes.
    """
    total = len(payload)
    if total < 4:
        raise RemoteProtocolError(f"BATCH payload of {total} bytes is shorter than its count")
    (count,) = _U32.unpack_from(payload)
    if count < 1:
        raise RemoteProtocolError("BATCH with 0 records")
    types_end = 4 + count
    sizes_start = (types_end + 3) & ~3
    sizes_end = sizes_start + 4 * count
    if sizes_end > total:
        raise RemoteProtocolError(
            f"BATCH of {count} records needs {sizes_end} bytes of types and sizes, payload has {total}"
        )
    types = payload[4:types_end]
    if types.translate(None, _RECORD_TYPE_BYTES):
        bad = next(t for t in types if t not in RecordType._value2member_map_)
        raise RemoteProtocolError(f"BATCH record type {bad} is not TRX, CCHANGE or SKIP")
    if payload[types_end:sizes_start].count(0) != sizes_start - types_end:
        raise RemoteProtocolError("BATCH padding is not zero")
    view = memoryview(payload)
    sizes = _sizes_from_le(view[sizes_start:sizes_end])
    data_bytes = total - sizes_end
    if sum(sizes) != data_bytes:
        raise RemoteProtocolError(
            f"BATCH sizes sum to {sum(sizes)} bytes but {data_bytes} bytes of data follow"
        )
    if RecordType.SKIP in types and any(compress(sizes, (t == RecordType.SKIP for t in types))):
        raise RemoteProtocolError("BATCH SKIP record with a non-empty payload")
    return WriteSetBatch(first, types, sizes, view[sizes_end:])


def encode_batch(batch: WriteSetBatch) -> tuple[bytes, bytes | memoryview]:
    """The BATCH payload as (count + types + padding + sizes, data); their concatenation is the payload.

    Kept in two parts so that the caller can join them with the header in one copy.
    Raises LocalProtocolError if the batch is empty or inconsistent (see decode_batch).
    """
    types = bytes(batch.types)
    count = len(types)
    if count < 1:
        raise LocalProtocolError("cannot send an empty BATCH")
    if len(batch.sizes) != count:
        raise LocalProtocolError(f"BATCH has {count} types but {len(batch.sizes)} sizes")
    if types.translate(None, _RECORD_TYPE_BYTES):
        raise LocalProtocolError(f"BATCH record types must be TRX, CCHANGE or SKIP, got {types!r}")
    data = batch.data
    data_bytes = memoryview(data).nbytes
    if sum(batch.sizes) != data_bytes:
        raise LocalProtocolError(f"BATCH sizes sum to {sum(batch.sizes)} bytes but data has {data_bytes}")
    if RecordType.SKIP in types and any(compress(batch.sizes, (t == RecordType.SKIP for t in types))):
        raise LocalProtocolError("BATCH SKIP record with a non-empty payload")
    sizes = batch.sizes
    if not (isinstance(sizes, array) and sizes.typecode == "I"):
        try:
            sizes = array("I", sizes)
        except OverflowError as exc:
            raise LocalProtocolError(f"BATCH size out of u32 range: {exc}") from exc
    prefix = b"".join((_U32.pack(count), types, bytes(-(4 + count) % 4), _sizes_to_le(sizes)))
    return prefix, data


# --- fast SEGMENT codec --------------------------------------------------------------------------


def decode_segment(first: int, payload: bytes) -> Segment:
    """Decode a SEGMENT payload (SegmentSchema) whose first record has seqno ``first``.

    Returns a Segment whose ``blob`` is a zero-copy view of ``payload``. Raises RemoteProtocolError
    (-EPROTO) if the payload is shorter than its count field, the count is 0, or the blob has fewer
    bytes than the count.
    """
    total = len(payload)
    if total < 4:
        raise RemoteProtocolError(f"SEGMENT payload of {total} bytes is shorter than its count")
    (count,) = _U32.unpack_from(payload)
    if count < 1:
        raise RemoteProtocolError("SEGMENT with 0 records")
    if total - 4 < count:
        raise RemoteProtocolError(f"SEGMENT of {count} records has a blob of only {total - 4} bytes")
    return Segment(first, count, memoryview(payload)[4:])


def encode_segment(segment: Segment) -> tuple[bytes, memoryview]:
    """The SEGMENT payload as (count, blob); their concatenation is the payload.

    Raises LocalProtocolError if the count is not in 1..2**32-1 or the blob is not a contiguous
    bytes-like object of at least ``count`` bytes.
    """
    count = segment.count
    if not isinstance(count, int) or not 1 <= count <= U32_MAX:
        raise LocalProtocolError(f"SEGMENT count must be in 1..{U32_MAX}, not {count!r}")
    try:
        blob = memoryview(segment.blob)
    except TypeError as exc:
        raise LocalProtocolError(f"SEGMENT blob must be bytes-like: {exc}") from exc
    if not blob.c_contiguous:
        raise LocalProtocolError("SEGMENT blob must be contiguous")
    if blob.nbytes < count:
        raise LocalProtocolError(f"SEGMENT of {count} records has a blob of only {blob.nbytes} bytes")
    return _U32.pack(count), blob


# --- handshake payloads (construct, interpreted) ------------------------------------------------

_PARSE_ERRORS = (construct.ConstructError, UnicodeError, ValueError, OverflowError)


def _check(ok: bool, exc: type[ProtocolError], msg: str) -> None:
    if not ok:
        raise exc(msg)


def _check_seqnos(obj: Any, names: tuple[str, ...], exc: type[ProtocolError]) -> None:
    for name in names:
        value = getattr(obj, name)
        _check(
            isinstance(value, int) and -1 <= value <= I64_MAX,
            exc,
            f"{type(obj).__name__}.{name} = {value!r} is not a seqno (-1 .. 2**63-1)",
        )


def validate_handshake(hs: Handshake, exc: type[ProtocolError]) -> None:
    """Field checks shared by send (LocalProtocolError) and receive (RemoteProtocolError)."""
    _check(isinstance(hs.cluster_uuid, uuid.UUID), exc, "Handshake.cluster_uuid must be a uuid.UUID")
    _check_seqnos(hs, ("last_applied", "first", "last"), exc)
    lo, hi = hs.versions
    _check(1 <= lo <= hi <= 255, exc, f"Handshake.versions {hs.versions} is not a range within 1..255")
    _check(
        isinstance(hs.accept, int) and hs.accept >= 0 and not int(hs.accept) & ~ACCEPT_MASK,
        exc,
        f"Handshake.accept has unknown flags: {hs.accept!r}",
    )


def encode_handshake(hs: Handshake) -> bytes:
    """Raises LocalProtocolError if a field does not fit (name > 255 or auth > 65535 bytes, ...)."""
    validate_handshake(hs, LocalProtocolError)
    return _build(
        HandshakeSchema,
        dict(
            min_version=hs.versions[0],
            max_version=hs.versions[1],
            cluster_uuid=hs.cluster_uuid.bytes,
            last_applied=hs.last_applied,
            first=hs.first,
            last=hs.last,
            accept=int(hs.accept),
            request=(REQUEST_FOLLOW if hs.follow else 0)
            | (REQUEST_SEGMENTS if hs.segments else 0)
            | (REQUEST_SUBSCRIBE if hs.subscribe else 0),
            node_name=hs.node_name,
            auth=bytes(hs.auth),
        ),
    )


def decode_handshake(payload: bytes) -> Handshake:
    """Parse a HANDSHAKE payload. Returns the event; raises RemoteProtocolError (-EPROTO) otherwise."""
    c = _parse(HandshakeSchema, payload, "HANDSHAKE")
    if c.request & ~REQUEST_MASK:
        raise RemoteProtocolError(f"HANDSHAKE has unknown request flags: {c.request:#x}")
    if c.accept & ~ACCEPT_MASK:
        raise RemoteProtocolError(f"HANDSHAKE has unknown accept flags: {c.accept:#x}")
    hs = Handshake(
        cluster_uuid=uuid.UUID(bytes=c.cluster_uuid),
        last_applied=c.last_applied,
        first=c.first,
        last=c.last,
        accept=Accept(c.accept),
        versions=(c.min_version, c.max_version),
        node_name=c.node_name,
        follow=bool(c.request & REQUEST_FOLLOW),
        auth=c.auth,
        segments=bool(c.request & REQUEST_SEGMENTS),
        subscribe=bool(c.request & REQUEST_SUBSCRIBE),
    )
    validate_handshake(hs, RemoteProtocolError)
    return hs


def validate_response(resp: HandshakeResponse, exc: type[ProtocolError]) -> None:
    """Field checks shared by send and receive (cross-checks against the Handshake are elsewhere)."""
    _check(resp.granted in TransferKind._value2member_map_, exc, f"unknown granted value {resp.granted!r}")
    _check(resp.reason in RefusalReason._value2member_map_, exc, f"unknown refusal reason {resp.reason!r}")
    _check(isinstance(resp.donor_uuid, uuid.UUID), exc, "HandshakeResponse.donor_uuid must be a uuid.UUID")
    _check_seqnos(resp, ("first", "last", "cached_downto", "safe_ist_seqno", "donor_last"), exc)
    if resp.granted == TransferKind.NONE:
        _check(resp.version == 0, exc, f"a refusal must carry version 0, not {resp.version}")
        _check(resp.reason != RefusalReason.NONE, exc, "a refusal must give a reason")
    else:
        _check(1 <= resp.version <= 255, exc, f"a grant must carry a version in 1..255, not {resp.version}")
        _check(
            resp.reason == RefusalReason.NONE,
            exc,
            f"a grant must carry reason NONE, not {RefusalReason(resp.reason).name}",
        )


def encode_response(resp: HandshakeResponse) -> bytes:
    """Raises LocalProtocolError if a field does not fit or is inconsistent."""
    validate_response(resp, LocalProtocolError)
    return _build(
        HandshakeResponseSchema,
        dict(
            version=resp.version,
            granted=int(resp.granted),
            reason=int(resp.reason),
            donor_uuid=resp.donor_uuid.bytes,
            first=resp.first,
            last=resp.last,
            cached_downto=resp.cached_downto,
            safe_ist_seqno=resp.safe_ist_seqno,
            donor_last=resp.donor_last,
            message=resp.message,
            sst_address=resp.sst_address,
        ),
    )


def decode_response(payload: bytes) -> HandshakeResponse:
    """Parse a HANDSHAKE_RESPONSE payload. Returns the event; raises RemoteProtocolError (-EPROTO)."""
    c = _parse(HandshakeResponseSchema, payload, "HANDSHAKE_RESPONSE")
    # construct does not reject unknown enum values: check before converting.
    if c.granted not in TransferKind._value2member_map_:
        raise RemoteProtocolError(f"HANDSHAKE_RESPONSE has unknown granted value {c.granted}")
    if c.reason not in RefusalReason._value2member_map_:
        raise RemoteProtocolError(f"HANDSHAKE_RESPONSE has unknown refusal reason {c.reason}")
    resp = HandshakeResponse(
        granted=TransferKind(c.granted),
        version=c.version,
        reason=RefusalReason(c.reason),
        donor_uuid=uuid.UUID(bytes=c.donor_uuid),
        first=c.first,
        last=c.last,
        cached_downto=c.cached_downto,
        safe_ist_seqno=c.safe_ist_seqno,
        donor_last=c.donor_last,
        message=c.message,
        sst_address=c.sst_address,
    )
    validate_response(resp, RemoteProtocolError)
    return resp


# --- SST payloads (construct, interpreted: one frame each per transfer, except SST_CHUNK) ---------


def encode_sst(event: SstRequest | SstBegin | SstEnd | SstRefused) -> bytes:
    """Raises LocalProtocolError if a field does not fit."""
    if isinstance(event, SstRequest):
        return _build(SstRequestSchema, dict(node_name=event.node_name, auth=bytes(event.auth)))
    if isinstance(event, SstBegin):
        validate_sst_begin(event, LocalProtocolError)
        return _build(SstBeginSchema, dict(cluster_uuid=event.cluster_uuid.bytes, seqno=event.seqno,
                                           total_bytes=event.total_bytes, format=event.format))
    if isinstance(event, SstEnd):
        return _build(SstEndSchema, dict(sha256=bytes(event.sha256)))
    return _build(SstRefusedSchema, dict(message=event.message))


def validate_sst_begin(begin: SstBegin, exc: type[ProtocolError]) -> None:
    _check(isinstance(begin.cluster_uuid, uuid.UUID), exc, "SstBegin.cluster_uuid must be a uuid.UUID")
    _check_seqnos(begin, ("seqno",), exc)
    _check(begin.seqno >= 0, exc, f"SstBegin.seqno must be a position (>= 0), not {begin.seqno}")
    _check(isinstance(begin.total_bytes, int) and 0 <= begin.total_bytes <= I64_MAX, exc,
           f"SstBegin.total_bytes = {begin.total_bytes!r} is not a size")


def decode_sst(ftype: FrameType, payload: bytes) -> SstRequest | SstBegin | SstEnd | SstRefused:
    """Parse an SST_REQUEST, SST_BEGIN, SST_END or SST_REFUSED payload; RemoteProtocolError otherwise."""
    if ftype is FrameType.SST_REQUEST:
        c = _parse(SstRequestSchema, payload, "SST_REQUEST")
        return SstRequest(node_name=c.node_name, auth=c.auth)
    if ftype is FrameType.SST_BEGIN:
        c = _parse(SstBeginSchema, payload, "SST_BEGIN")
        begin = SstBegin(uuid.UUID(bytes=c.cluster_uuid), c.seqno, c.total_bytes, c.format)
        validate_sst_begin(begin, RemoteProtocolError)
        return begin
    if ftype is FrameType.SST_END:
        return SstEnd(_parse(SstEndSchema, payload, "SST_END").sha256)
    assert ftype is FrameType.SST_REFUSED
    return SstRefused(_parse(SstRefusedSchema, payload, "SST_REFUSED").message)


def _build(schema: construct.Construct, fields: dict[str, Any]) -> bytes:
    try:
        return schema.build(fields)
    except (*_PARSE_ERRORS, TypeError, AttributeError) as exc:
        raise LocalProtocolError(f"cannot encode: {exc}") from exc


def _parse(schema: construct.Construct, payload: bytes, what: str) -> Any:
    try:
        return schema.parse(payload)
    except _PARSE_ERRORS as exc:
        raise RemoteProtocolError(f"malformed {what} payload: {exc}") from exc


__all__ = [
    "EMSGSIZE",
    "F_PRELOAD",
    "HANDSHAKE_VERSION",
    "HEADER_BYTES",
    "MAGIC",
    "MAX_FRAME_BYTES",
    "MAX_HANDSHAKE_BYTES",
    "MAX_STATUS_BYTES",
    "PROTOCOL_VERSION",
    "REQUEST_FOLLOW",
    "REQUEST_MASK",
    "REQUEST_SEGMENTS",
    "REQUEST_SUBSCRIBE",
    "SHA256_BYTES",
    "SUPPORTED_VERSIONS",
    "BatchSchema",
    "FrameHeader",
    "FrameType",
    "HandshakeResponseSchema",
    "HandshakeSchema",
    "HeaderSchema",
    "SegmentSchema",
    "SstBeginSchema",
    "SstEndSchema",
    "SstRefusedSchema",
    "SstRequestSchema",
    "StatusSchema",
    "decode_batch",
    "decode_handshake",
    "decode_response",
    "decode_segment",
    "decode_sst",
    "encode_batch",
    "encode_handshake",
    "encode_response",
    "encode_segment",
    "encode_sst",
    "pack_header",
    "unpack_header",
]
