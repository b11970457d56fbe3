"""protocol/ under Hypothesis: the fast codecs equal the construct schemas, and no input escapes as
anything but RemoteProtocolError (or makes the decoder loop or buffer without bound)."""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Callable

import construct
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from istd.errors import RemoteProtocolError
from protocol import (
    C_EOF,
    C_OK,
    NEED_DATA,
    SUPPORTED_VERSIONS,
    Accept,
    Connection,
    ConnectionClosed,
    Ctrl,
    Event,
    Handshake,
    HandshakeResponse,
    Keepalive,
    RecordType,
    RefusalReason,
    Role,
    Segment,
    State,
    TransferKind,
    WriteSet,
    WriteSetBatch,
    negotiate_version,
)
from protocol.wire import (
    HEADER_BYTES,
    BatchSchema,
    HeaderSchema,
    SegmentSchema,
    decode_batch,
    decode_segment,
    encode_batch,
    encode_segment,
    pack_header,
    unpack_header,
)

FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SEQNO = st.integers(-1, 2**63 - 1)
U = uuid.UUID(int=7)

# --- fast codecs == construct schemas ------------------------------------------------------------


@FUZZ
@given(st.binary(min_size=HEADER_BYTES, max_size=HEADER_BYTES))
def test_fast_header_decoder_equals_schema(raw: bytes) -> None:
    expected = HeaderSchema.parse(raw)
    crc_ok = zlib.crc32(raw[:16]) == expected.header_crc
    try:
        header = unpack_header(raw)
    except RemoteProtocolError:
        assert not crc_ok
        return
    assert crc_ok
    assert header._asdict() == {k: v for k, v in expected.items() if not k.startswith("_")}


@FUZZ
@given(
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(-128, 127),
    st.integers(0, 2**32 - 1),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(0, 2**32 - 1),
)
def test_fast_header_builder_equals_schema(
    version: int, ftype: int, flags: int, ctrl: int, length: int, seqno: int, payload_crc: int
) -> None:
    fast = pack_header(version, ftype, flags, ctrl, length, seqno, payload_crc)
    fields = dict(version=version, type=ftype, flags=flags, ctrl=ctrl, len=length, seqno=seqno)
    head = HeaderSchema.build({**fields, "header_crc": 0, "payload_crc": 0})[:16]
    assert fast == HeaderSchema.build({**fields, "header_crc": zlib.crc32(head), "payload_crc": payload_crc})
    assert unpack_header(fast)._asdict() == {
        **fields,
        "header_crc": zlib.crc32(head),
        "payload_crc": payload_crc,
    }


RECORD = st.one_of(
    st.tuples(st.sampled_from([RecordType.TRX, RecordType.CCHANGE]), st.binary(max_size=40)),
    st.just((RecordType.SKIP, b"")),
)
RECORDS = st.lists(RECORD, min_size=1, max_size=12)


def _schema_payload(records: list[tuple[RecordType, bytes]]) -> bytes:
    return bytes(
        BatchSchema.build(
            dict(
                count=len(records),
                types=bytes(t for t, _ in records),
                sizes=[len(p) for _, p in records],
                data=b"".join(p for _, p in records),
            )
        )
    )


@FUZZ
@given(RECORDS, SEQNO)
def test_fast_batch_builder_equals_schema(records: list[tuple[RecordType, bytes]], first: int) -> None:
    batch = WriteSetBatch.from_payloads(first, bytes(t for t, _ in records), [p for _, p in records])
    prefix, data = encode_batch(batch)
    assert prefix + bytes(data) == _schema_payload(records)


def _schema_decode(payload: bytes) -> tuple[bytes, list[int], bytes] | None:
    try:
        c = BatchSchema.parse(payload)
    except construct.ConstructError:
        return None
    return bytes(c.types), list(c.sizes), bytes(c.data)


def _fast_decode(payload: bytes) -> tuple[bytes, list[int], bytes] | None:
    try:
        batch = decode_batch(5, payload)
    except RemoteProtocolError:
        return None
    assert batch.first == 5
    return bytes(batch.types), list(batch.sizes), bytes(batch.data)


@st.composite
def batch_payloads(draw: st.DrawFn) -> bytes:
    """Valid BATCH payloads, and mutations of them that may or may not still be valid."""
    payload = bytearray(_schema_payload(draw(RECORDS)))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["set", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(len(payload) - 1, 0)))
        if op == "set" and payload:
            payload[at] = draw(st.sampled_from([0, 1, 4, 5, 6, 7, 255, draw(st.integers(0, 255))]))
        elif op == "insert":
            payload[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del payload[at : at + draw(st.integers(1, 4))]
        else:
            del payload[at:]
    return bytes(payload)


@FUZZ
@given(st.one_of(batch_payloads(), st.binary(max_size=64)))
def test_fast_batch_decoder_equals_schema(payload: bytes) -> None:
    assert _fast_decode(payload) == _schema_decode(payload)


@FUZZ
@given(RECORDS)
def test_valid_batches_decode_both_ways(records: list[tuple[RecordType, bytes]]) -> None:
    payload = _schema_payload(records)
    expected = (bytes(t for t, _ in records), [len(p) for _, p in records], b"".join(p for _, p in records))
    assert _fast_decode(payload) == _schema_decode(payload) == expected
    batch = decode_batch(100, payload)
    assert [(w.seqno, w.type, bytes(w.payload)) for w in batch] == [
        (100 + i, t, p) for i, (t, p) in enumerate(records)
    ]


# --- fast SEGMENT codec == SegmentSchema ---------------------------------------------------------


@st.composite
def segments(draw: st.DrawFn) -> tuple[int, bytes]:
    """(count, blob) of a valid SEGMENT payload: a blob of at least ``count`` bytes."""
    count = draw(st.integers(1, 40))
    return count, draw(st.binary(min_size=count, max_size=count + draw(st.integers(0, 40))))


def _schema_segment(payload: bytes) -> tuple[int, bytes] | None:
    try:
        c = SegmentSchema.parse(payload)
    except construct.ConstructError:
        return None
    return c.count, bytes(c.blob)


def _fast_segment(payload: bytes) -> tuple[int, bytes] | None:
    try:
        segment = decode_segment(5, payload)
    except RemoteProtocolError:
        return None
    assert segment.first == 5 and segment.last == 4 + segment.count
    return segment.count, bytes(segment.blob)


@st.composite
def segment_payloads(draw: st.DrawFn) -> bytes:
    """Valid SEGMENT payloads, and mutations of them (count field and length) that may not be."""
    count, blob = draw(segments())
    payload = bytearray(SegmentSchema.build(dict(count=count, blob=blob)))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["count", "set", "truncate", "insert"]))
        if op == "count":
            new = draw(st.sampled_from([0, 1, len(payload) - 4, len(payload) - 3, 2**32 - 1]))
            payload[:4] = max(new, 0).to_bytes(4, "little")
        elif op == "set" and payload:
            payload[draw(st.integers(0, len(payload) - 1))] = draw(st.integers(0, 255))
        elif op == "truncate":
            del payload[draw(st.integers(0, len(payload))) :]
        else:
            at = draw(st.integers(0, len(payload)))
            payload[at:at] = draw(st.binary(min_size=1, max_size=4))
    return bytes(payload)


@FUZZ
@given(segments(), SEQNO)
def test_fast_segment_builder_equals_schema(segment: tuple[int, bytes], first: int) -> None:
    count, blob = segment
    prefix, view = encode_segment(Segment(first, count, blob))
    assert prefix + bytes(view) == SegmentSchema.build(dict(count=count, blob=blob))


@FUZZ
@given(st.one_of(segment_payloads(), st.binary(max_size=16)))
def test_fast_segment_decoder_equals_schema(payload: bytes) -> None:
    assert _fast_segment(payload) == _schema_segment(payload)


@FUZZ
@given(segments())
def test_valid_segments_decode_both_ways(segment: tuple[int, bytes]) -> None:
    payload = bytes(SegmentSchema.build(dict(count=segment[0], blob=segment[1])))
    assert _fast_segment(payload) == _schema_segment(payload) == segment


# --- handshakes round-trip -----------------------------------------------------------------------

HANDSHAKES = st.builds(
    Handshake,
    cluster_uuid=st.uuids(),
    last_applied=SEQNO,
    first=st.integers(0, 2**62),
    last=SEQNO,
    accept=st.sampled_from([Accept(0), Accept.IST, Accept.SST, Accept.IST | Accept.SST]),
    versions=st.tuples(st.integers(1, 255), st.integers(1, 255)).map(lambda v: (min(v), max(v))),
    node_name=st.text(max_size=60),
    follow=st.booleans(),
    auth=st.binary(max_size=300),
    segments=st.booleans(),
)


@FUZZ
@given(HANDSHAKES, st.text(max_size=100), st.text(max_size=60), SEQNO, SEQNO, SEQNO)
def test_handshake_and_response_round_trip(
    hs: Handshake, message: str, address: str, cached: int, safe: int, donor_last: int
) -> None:
    joiner, donor = Connection(Role.JOINER), Connection(Role.DONOR)
    assert _feed_all(donor, joiner.send(hs)) == [hs]
    version = negotiate_version(hs.versions, SUPPORTED_VERSIONS)
    last = hs.first - 1 if hs.last == -1 else min(hs.last, hs.first + 5)
    if version is not None and hs.accept & Accept.IST and last >= -1:
        response = HandshakeResponse(
            TransferKind.IST,
            version,
            RefusalReason.NONE,
            hs.cluster_uuid,
            hs.first,
            last,
            cached,
            safe,
            donor_last,
        )
    else:
        response = HandshakeResponse(
            TransferKind.NONE, 0, RefusalReason.BUSY, U, -1, -1, cached, safe, donor_last, message, address
        )
    assert _feed_all(joiner, donor.send(response)) == [response]
    assert joiner.granted == donor.granted == response


def _feed_all(conn: Connection, data: bytes) -> list[Event]:
    conn.receive_data(data)
    events: list[Event] = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
    return events


# --- hostile input: only RemoteProtocolError, and the loop ends ----------------------------------

MAX_STEPS = 10_000  # far above any input here: more means the decoder stopped consuming bytes


def drive(conn: Connection, data: bytes, chunks: list[int], react: Callable[[Event], None]) -> None:
    """Feed ``data`` in ``chunks`` (then the rest), then close; call ``react`` on every event."""
    steps = 0

    def drain() -> bool:
        nonlocal steps
        while True:
            steps += 1
            assert steps < MAX_STEPS, "the decoder does not make progress"
            event = conn.next_event()
            if event is NEED_DATA:
                return False
            if isinstance(event, ConnectionClosed):
                return True
            react(event)

    pos = 0
    for size in [*chunks, len(data)]:
        piece = data[pos : pos + size]
        pos += len(piece)
        if piece:
            conn.receive_data(piece)
        drain()
        if pos >= len(data):
            break
    conn.receive_data(b"")
    assert drain(), "a closed connection must end in ConnectionClosed or an error"


def survive(conn: Connection, data: bytes, chunks: list[int], react: Callable[[Event], None]) -> None:
    """Only RemoteProtocolError may escape, and it must carry a negative Ctrl code."""
    try:
        drive(conn, data, chunks, react)
    except RemoteProtocolError as exc:
        assert -128 <= exc.error_code < 0


def joiner_reacts(joiner: Connection) -> Callable[[Event], None]:
    def react(event: Event) -> None:
        if isinstance(event, HandshakeResponse) and joiner.state is State.OK:
            joiner.send(Ctrl(C_OK))  # must always be allowed right after a grant

    return react


def donor_reacts(donor: Connection) -> Callable[[Event], None]:
    def react(event: Event) -> None:
        if isinstance(event, Handshake):
            version = negotiate_version(event.versions, SUPPORTED_VERSIONS)
            last = event.first - 1  # nothing to send: always inside what was asked...
            if version and event.accept & Accept.IST and (event.last == -1 or last <= event.last):
                donor.send(
                    HandshakeResponse(
                        TransferKind.IST,
                        version,
                        RefusalReason.NONE,
                        event.cluster_uuid,
                        event.first,
                        last,
                        0,
                        0,
                        0,
                    )
                )
            else:
                donor.send(HandshakeResponse(TransferKind.NONE, 0, RefusalReason.BUSY, U, -1, -1, 0, 0, 0))
        elif event == Ctrl(C_OK):
            donor.send(Ctrl(C_EOF))

    return react


CHUNKS = st.lists(st.integers(1, 64), max_size=8)


@FUZZ
@given(st.binary(max_size=300), CHUNKS, st.sampled_from(["joiner", "donor", "streaming joiner"]))
def test_random_bytes_raise_only_remote_protocol_error(data: bytes, chunks: list[int], who: str) -> None:
    if who == "donor":
        conn = Connection(Role.DONOR)
        survive(conn, data, chunks, donor_reacts(conn))
        return
    conn, _ = _streaming_pair(follow=True) if who == "streaming joiner" else (Connection(Role.JOINER), None)
    if conn.state is State.HANDSHAKE:
        conn.send(Handshake(U, 0, 1, -1, Accept.IST, (1, 1), "j"))
    survive(conn, data, chunks, joiner_reacts(conn))


def _streaming_pair(follow: bool) -> tuple[Connection, Connection]:
    joiner, donor = Connection(Role.JOINER), Connection(Role.DONOR)
    _feed_all(donor, joiner.send(_joiner_handshake(follow, segments=True)))
    _feed_all(
        joiner, donor.send(HandshakeResponse(TransferKind.IST, 1, RefusalReason.NONE, U, 1, 6, 0, 0, 6))
    )
    _feed_all(donor, joiner.send(Ctrl(C_OK)))
    return joiner, donor


def _joiner_handshake(follow: bool, segments: bool) -> Handshake:
    return Handshake(U, 0, 1, 6, Accept.IST, (1, 1), "j", follow=follow, segments=segments)


@st.composite
def donor_frames(draw: st.DrawFn) -> tuple[Handshake, list[bytes], list[Event]]:
    """A valid donor byte stream, frame by frame, after the joiner's HANDSHAKE (first=1, last=6).

    If the HANDSHAKE asked for segments, SEGMENT, BATCH and single frames are mixed."""
    handshake = _joiner_handshake(draw(st.booleans()), draw(st.booleans()))
    follow = handshake.follow
    joiner, donor = Connection(Role.JOINER), Connection(Role.DONOR)
    _feed_all(donor, joiner.send(handshake))
    events: list[Event] = [HandshakeResponse(TransferKind.IST, 1, RefusalReason.NONE, U, 1, 6, 0, 0, 6)]
    frames = [donor.send(events[0])]
    _feed_all(joiner, frames[0])
    _feed_all(donor, joiner.send(Ctrl(C_OK)))
    seqno, last = 1, draw(st.integers(6, 9)) if follow else 6
    while seqno <= last:
        if draw(st.booleans()):
            frames.append(donor.send(Keepalive()))
            events.append(Keepalive())
        count = draw(st.integers(1, last - seqno + 1))
        if handshake.segments and draw(st.booleans()):
            blob = draw(st.binary(min_size=count, max_size=count + 20))
            frames.append(donor.send(Segment(seqno, count, blob)))
            events.append(Segment(seqno, count, blob))
            seqno += count
            continue
        records = draw(st.lists(RECORD, min_size=count, max_size=count))
        if count == 1 and draw(st.booleans()):
            event: Event = WriteSet(seqno, *records[0])
        else:
            event = WriteSetBatch.from_payloads(seqno, bytes(t for t, _ in records), [p for _, p in records])
        frames.append(donor.send(event))
        events.append(event)
        seqno += count
    frames.append(donor.send(Ctrl(C_EOF)))
    events.append(Ctrl(C_EOF))
    return handshake, frames, events


JOINER_FRAMES = [
    Connection(Role.JOINER).send(
        Handshake(U, 0, 1, -1, Accept.IST, (1, 1), "joiner", auth=b"secret", segments=True)
    ),
    pack_header(1, 8, 0, 0, 0, -1, 0),  # KEEPALIVE
    pack_header(1, 3, 0, 0, 0, -1, 0),  # CTRL(OK)
    pack_header(1, 8, 0, 0, 0, -1, 0),
    pack_header(1, 3, 0, -71, 0, -1, 0),  # CTRL(-EPROTO)
]


@st.composite
def mutate(draw: st.DrawFn, frames: list[bytes]) -> bytes:
    """Damage a few frames: bytes, header fields, whole frames; re-seal the CRCs or not."""
    frames = list(frames)
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(frames) - 1))
        frame = bytearray(frames[i])
        op = draw(st.sampled_from(["field", "field", "payload", "flip", "drop", "dup", "truncate"]))
        if op == "drop":
            del frames[i]
            if not frames:
                return b""
            continue
        if op == "dup":
            frames.insert(i, bytes(frame))
            continue
        if op == "truncate":
            del frame[draw(st.integers(0, len(frame))) :]
        elif op == "flip" or len(frame) < HEADER_BYTES:
            if not frame:
                continue
            at = draw(st.integers(0, len(frame) - 1))
            frame[at] ^= 1 << draw(st.integers(0, 7))
        else:
            version, ftype, flags, ctrl, length, seqno = struct.unpack_from("<BBBbIq", frame)
            payload = bytes(frame[HEADER_BYTES:])
            if op == "field":
                field = draw(st.sampled_from(["version", "type", "flags", "ctrl", "length", "seqno"]))
                value = draw(
                    {
                        "version": st.integers(0, 3),
                        "type": st.integers(0, 10),
                        "flags": st.sampled_from([0, 1, 2, 128]),
                        "ctrl": st.integers(-128, 127),
                        "length": st.sampled_from([0, 1, length - 1, length + 1, 2**32 - 1]),
                        "seqno": st.integers(-2, 12),
                    }[field]
                )
                if field == "length":
                    length = max(0, min(value, 2**32 - 1))
                else:
                    version, ftype, flags, ctrl, seqno = (
                        value if field == name else old
                        for name, old in zip(
                            ["version", "type", "flags", "ctrl", "seqno"],
                            [version, ftype, flags, ctrl, seqno],
                            strict=True,
                        )
                    )
            else:
                at = draw(st.integers(0, len(payload)))
                payload = payload[:at] + draw(st.binary(max_size=4)) + payload[at + draw(st.integers(0, 4)) :]
                length = len(payload)
            if draw(st.booleans()):  # re-seal, so that the damage reaches the parsers
                frame = bytearray(
                    pack_header(version, ftype, flags, ctrl, length, seqno, zlib.crc32(payload))
                )
                frame += payload
        frames[i] = bytes(frame)
    return b"".join(frames)


@FUZZ
@given(st.data(), CHUNKS)
def test_mutated_donor_stream_raises_only_remote_protocol_error(
    data: st.DataObject, chunks: list[int]
) -> None:
    handshake, frames, _ = data.draw(donor_frames())
    joiner = Connection(Role.JOINER)
    # Sometimes the joiner did not ask for the segments the donor sends: still only RemoteProtocolError.
    joiner.send(handshake if data.draw(st.booleans()) else _joiner_handshake(handshake.follow, False))
    survive(joiner, data.draw(mutate(frames)), chunks, joiner_reacts(joiner))


@FUZZ
@given(donor_frames(), CHUNKS)
def test_unnegotiated_segments_are_rejected(
    stream: tuple[Handshake, list[bytes], list[Event]], chunks: list[int]
) -> None:
    """A valid stream with SEGMENT frames, to a joiner that did not ask for them, fails at the first."""
    handshake, frames, expected = stream
    joiner = Connection(Role.JOINER)
    joiner.send(_joiner_handshake(handshake.follow, segments=False))
    seen: list[Event] = []

    def react(event: Event) -> None:
        seen.append(event)
        joiner_reacts(joiner)(event)

    first_segment = next((i for i, e in enumerate(expected) if isinstance(e, Segment)), None)
    try:
        drive(joiner, b"".join(frames), chunks, react)
    except RemoteProtocolError as exc:
        assert first_segment is not None and "not negotiated" in str(exc)
        assert seen == expected[:first_segment]
    else:
        assert first_segment is None and seen == expected


@FUZZ
@given(st.data(), CHUNKS)
def test_mutated_joiner_stream_raises_only_remote_protocol_error(
    data: st.DataObject, chunks: list[int]
) -> None:
    donor = Connection(Role.DONOR)
    survive(donor, data.draw(mutate(JOINER_FRAMES)), chunks, donor_reacts(donor))


@FUZZ
@given(donor_frames(), CHUNKS)
def test_valid_donor_stream_parses_back(
    stream: tuple[Handshake, list[bytes], list[Event]], chunks: list[int]
) -> None:
    """The generator of the mutation tests makes valid streams: unmutated, they parse back exactly."""
    handshake, frames, expected = stream
    joiner = Connection(Role.JOINER)
    joiner.send(handshake)
    seen: list[Event] = []

    def react(event: Event) -> None:
        seen.append(event)
        joiner_reacts(joiner)(event)

    drive(joiner, b"".join(frames), chunks, react)
    assert seen == expected
    assert joiner.state is State.DONE and joiner.last_seqno is not None and joiner.last_seqno >= 6
