"""protocol/ under Hypothesis: the fast codecs equal the construct schemas, and no input escapes as
anything but RemoteProtocolError (or makes the decoder loop or buffer without bound)."""

from __future__ import annotations

import dataclasses
import struct
import uuid
import zlib
from collections.abc import Callable

import construct
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from istd.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from protocol import (
    C_EOF,
    C_FC_CONT,
    C_FC_STOP,
    C_OK,
    MAX_STATUS_BYTES,
    NEED_DATA,
    SUPPORTED_VERSIONS,
    TRANSITIONS,
    Accept,
    Connection,
    ConnectionClosed,
    Ctrl,
    Event,
    Handshake,
    HandshakeResponse,
    Keepalive,
    Kind,
    RecordType,
    RefusalReason,
    Role,
    Segment,
    SstBegin,
    SstChunk,
    SstEnd,
    SstRefused,
    SstRequest,
    State,
    Status,
    StatusRequest,
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
    StatusSchema,
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
    subscribe=st.booleans(),
)


@FUZZ
@given(HANDSHAKES, st.text(max_size=100), st.text(max_size=60), SEQNO, SEQNO, SEQNO)
def test_handshake_and_response_round_trip(
    hs: Handshake, message: str, address: str, cached: int, safe: int, donor_last: int
) -> None:
    joiner, donor = Connection(Role.JOINER), Connection(Role.DONOR)
    assert _feed_all(donor, joiner.send(hs)) == [hs]
    version = negotiate_version(hs.versions, SUPPORTED_VERSIONS)
    # a subscription is granted from the donor's position (any seqno >= 1), an IST from hs.first
    first = max(donor_last, 0) + 1 if hs.subscribe else hs.first
    last = first - 1 if hs.last == -1 else min(hs.last, first + 5)
    if version is not None and hs.accept & Accept.IST and last >= -1 and first <= 2**63 - 1:
        response = HandshakeResponse(
            TransferKind.IST,
            version,
            RefusalReason.NONE,
            hs.cluster_uuid,
            first,
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
    assert joiner.follow == donor.follow == (hs.follow or hs.subscribe)


@FUZZ
@given(st.binary(max_size=MAX_STATUS_BYTES // 64), st.binary(max_size=300), st.sampled_from([1, 7, None]))
def test_status_conversation_round_trip(request: bytes, answer: bytes, chunk: int | None) -> None:
    joiner, donor = Connection(Role.JOINER), Connection(Role.DONOR)
    data = joiner.send(StatusRequest(request))
    assert data[HEADER_BYTES:] == StatusSchema.build(dict(payload=request))
    assert _feed_chunks(donor, data, chunk) == [StatusRequest(request)]
    assert _feed_chunks(joiner, donor.send(Status(answer)), chunk) == [Status(answer)]
    assert joiner.state is donor.state is State.DONE


def _feed_chunks(conn: Connection, data: bytes, chunk: int | None) -> list[Event]:
    step = chunk or len(data)
    events: list[Event] = []
    for at in range(0, len(data), step):
        events += _feed_all(conn, data[at : at + step])
    return events


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
            # a subscription from our position (0), an IST from where the joiner asked
            first = 1 if event.subscribe else event.first
            last = first - 1  # nothing to send: always inside what was asked...
            if version and event.accept & Accept.IST and (event.last == -1 or last <= event.last):
                donor.send(
                    HandshakeResponse(
                        TransferKind.IST,
                        version,
                        RefusalReason.NONE,
                        event.cluster_uuid,
                        first,
                        last,
                        0,
                        0,
                        0,
                    )
                )
            else:
                donor.send(HandshakeResponse(TransferKind.NONE, 0, RefusalReason.BUSY, U, -1, -1, 0, 0, 0))
        elif event == Ctrl(C_OK):
            # a follow stream stays open (so that flow control arrives in STREAMING); an IST ends
            donor.send(Keepalive() if donor.follow else Ctrl(C_EOF))
        elif isinstance(event, StatusRequest):
            donor.send(Status(b'{"last":0}'))

    return react


CHUNKS = st.lists(st.integers(1, 64), max_size=8)


@FUZZ
@given(
    st.binary(max_size=300),
    CHUNKS,
    st.sampled_from(
        ["joiner", "donor", "streaming joiner", "status client", "subscribed joiner", "subscribed donor"]
    ),
)
def test_random_bytes_raise_only_remote_protocol_error(data: bytes, chunks: list[int], who: str) -> None:
    if who == "donor":
        conn = Connection(Role.DONOR)
        survive(conn, data, chunks, donor_reacts(conn))
        return
    if who == "subscribed donor":  # receives flow control, keepalives, errors
        _, conn = _streaming_pair(follow=False, subscribe=True)
        survive(conn, data, chunks, donor_reacts(conn))
        return
    if who == "streaming joiner":
        conn, _ = _streaming_pair(follow=True)
    elif who == "subscribed joiner":
        conn, _ = _streaming_pair(follow=False, subscribe=True)
    else:
        conn = Connection(Role.JOINER)
        if who == "status client":
            conn.send(StatusRequest(b"{}"))
        else:
            conn.send(Handshake(U, 0, 1, -1, Accept.IST, (1, 1), "j"))
    survive(conn, data, chunks, joiner_reacts(conn))


def _streaming_pair(follow: bool, subscribe: bool = False) -> tuple[Connection, Connection]:
    joiner, donor = Connection(Role.JOINER), Connection(Role.DONOR)
    _feed_all(donor, joiner.send(_joiner_handshake(follow, segments=True, subscribe=subscribe)))
    _feed_all(joiner, donor.send(_grant(subscribe)))
    _feed_all(donor, joiner.send(Ctrl(C_OK)))
    return joiner, donor


def _joiner_handshake(follow: bool, segments: bool, subscribe: bool = False) -> Handshake:
    if subscribe:  # "from your position": the joiner's own range does not matter
        return Handshake(U, 3, 4, -1, Accept.IST, (1, 1), "j", follow=follow, segments=segments, subscribe=True)
    return Handshake(U, 0, 1, 6, Accept.IST, (1, 1), "j", follow=follow, segments=segments)


def _grant(subscribe: bool) -> HandshakeResponse:
    """IST of 1..6, or a subscription at the donor's position 6: the empty range 7..6."""
    first = 7 if subscribe else 1
    return HandshakeResponse(TransferKind.IST, 1, RefusalReason.NONE, U, first, 6, 0, 0, 6)


@st.composite
def donor_frames(draw: st.DrawFn) -> tuple[Handshake, list[bytes], list[Event]]:
    """A valid donor byte stream, frame by frame, after the joiner's HANDSHAKE (first=1, last=6; or
    a subscription granted at the donor's position 6, records from 7 on).

    If the HANDSHAKE asked for segments, SEGMENT, BATCH and single frames are mixed."""
    subscribe = draw(st.booleans())
    handshake = _joiner_handshake(draw(st.booleans()), draw(st.booleans()), subscribe)
    follow = handshake.follow or subscribe
    joiner, donor = Connection(Role.JOINER), Connection(Role.DONOR)
    _feed_all(donor, joiner.send(handshake))
    events: list[Event] = [_grant(subscribe)]
    frames = [donor.send(events[0])]
    _feed_all(joiner, frames[0])
    _feed_all(donor, joiner.send(Ctrl(C_OK)))
    seqno, last = (7, draw(st.integers(6, 10))) if subscribe else (1, draw(st.integers(6, 9)) if follow else 6)
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
# Cluster mode: a subscription paced by flow control, and a status request.
SUBSCRIBER_FRAMES = [
    Connection(Role.JOINER).send(Handshake(U, 3, 4, -1, Accept.IST, (1, 1), "n2", subscribe=True)),
    pack_header(1, 3, 0, C_OK, 0, -1, 0),
    pack_header(1, 3, 0, C_FC_STOP, 0, -1, 0),
    pack_header(1, 8, 0, 0, 0, -1, 0),  # KEEPALIVE
    pack_header(1, 3, 0, C_FC_CONT, 0, -1, 0),
    pack_header(1, 3, 0, C_FC_STOP, 0, -1, 0),
]
STATUS_CLIENT_FRAMES = [
    Connection(Role.JOINER).send(StatusRequest(b'{"node":"n2","announce":"joining"}')),
    pack_header(1, 8, 0, 0, 0, -1, 0),  # KEEPALIVE
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
                        "type": st.integers(0, 12),
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
    joiner.send(handshake if data.draw(st.booleans()) else dataclasses.replace(handshake, segments=False))
    survive(joiner, data.draw(mutate(frames)), chunks, joiner_reacts(joiner))


@FUZZ
@given(donor_frames(), CHUNKS)
def test_unnegotiated_segments_are_rejected(
    stream: tuple[Handshake, list[bytes], list[Event]], chunks: list[int]
) -> None:
    """A valid stream with SEGMENT frames, to a joiner that did not ask for them, fails at the first."""
    handshake, frames, expected = stream
    joiner = Connection(Role.JOINER)
    joiner.send(dataclasses.replace(handshake, segments=False))
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
    frames = data.draw(st.sampled_from([JOINER_FRAMES, SUBSCRIBER_FRAMES, STATUS_CLIENT_FRAMES]))
    survive(donor, data.draw(mutate(frames)), chunks, donor_reacts(donor))


@FUZZ
@given(st.sampled_from([SUBSCRIBER_FRAMES, STATUS_CLIENT_FRAMES]), CHUNKS)
def test_valid_cluster_joiner_streams_parse_back(frames: list[bytes], chunks: list[int]) -> None:
    """Unmutated, the cluster-mode joiner streams of the mutation test are accepted whole."""
    donor = Connection(Role.DONOR)
    seen: list[Event] = []

    def react(event: Event) -> None:
        seen.append(event)
        donor_reacts(donor)(event)

    drive(donor, b"".join(frames), chunks, react)
    assert len(seen) == len(frames)
    assert donor.state is (State.STREAMING if frames is SUBSCRIBER_FRAMES else State.DONE)


@FUZZ
@given(st.data(), CHUNKS)
def test_mutated_status_answer_raises_only_remote_protocol_error(data: st.DataObject, chunks: list[int]) -> None:
    """The server's side of a status conversation (a keepalive, the STATUS), damaged."""
    client, server = Connection(Role.JOINER), Connection(Role.DONOR)
    _feed_all(server, client.send(StatusRequest(b"{}")))
    frames = [server.send(Keepalive()), server.send(Status(data.draw(st.binary(max_size=40))))]
    survive(client, data.draw(mutate(frames)), chunks, joiner_reacts(client))


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


# --- send() and next_event() apply the same table, new frames included ---------------------------


# What a kind of the table is made of, for drawing the events a state expects.
_CHOICES_OF_KIND = {
    Kind.HANDSHAKE: ["handshake"],
    Kind.STATUS_REQUEST: ["status_request"],
    Kind.STATUS: ["status"],
    Kind.GRANTED: ["grant", "subscribe_grant"],
    Kind.REFUSED: ["refusal"],
    Kind.CTRL_OK: ["ctrl_ok"],
    Kind.CTRL_EOF: ["ctrl_eof"],
    Kind.CTRL_FC_STOP: ["ctrl_fc"],
    Kind.CTRL_FC_CONT: ["ctrl_fc"],
    Kind.WRITE_SETS: ["write_set", "batch"],
    Kind.SEGMENT: ["segment"],
    Kind.KEEPALIVE: ["keepalive"],
    Kind.SST_REQUEST: ["sst_request"],
    Kind.SST_BEGIN: ["sst_begin"],
    Kind.SST_CHUNK: ["sst_chunk"],
    Kind.SST_END: ["sst_end"],
    Kind.SST_REFUSED: ["sst_refused"],
}
_ALL_CHOICES = sorted({c for cs in _CHOICES_OF_KIND.values() for c in cs} | {"ctrl_error"})


def _expected_choices(conn: Connection) -> list[str]:
    """The events the table lets ``conn`` send now (errors aside, as they end everything)."""
    return sorted(
        {
            c
            for state, role, kind in TRANSITIONS
            if state is conn.state and role is conn.role and kind is not Kind.CTRL_ERROR
            for c in _CHOICES_OF_KIND[kind]
        }
    )


@st.composite
def some_event(draw: st.DrawFn, sender: Connection) -> Event:
    """An event for ``sender``: half the time one of a kind the state expects (it may still break a
    side rule: seqno, range, negotiation), otherwise anything at all."""
    expected = _expected_choices(sender)
    likely = bool(expected) and draw(st.booleans())
    choice = draw(st.sampled_from(expected if likely else _ALL_CHOICES))
    base = (sender.last_seqno if sender.last_seqno is not None else 10) + 1
    seqno = base + draw(st.sampled_from([0, 0, 0, 1, -1]))
    hs = sender.handshake
    if choice == "handshake":
        return Handshake(
            U,
            10,
            11,
            draw(st.sampled_from([-1, 13])),
            Accept.IST | Accept.SST,
            (1, 1),
            "n",
            follow=draw(st.booleans()),
            segments=draw(st.booleans()),
            subscribe=draw(st.booleans()),
        )
    if choice == "status_request":
        return StatusRequest(draw(st.binary(max_size=20)))
    if choice == "status":
        return Status(draw(st.binary(max_size=20)))
    if choice in ("grant", "subscribe_grant"):
        first = draw(st.sampled_from([1, 12])) if choice == "subscribe_grant" else (hs.first if hs else 11)
        kind = draw(st.sampled_from([TransferKind.IST, TransferKind.IST, TransferKind.SST]))
        return HandshakeResponse(kind, 1, RefusalReason.NONE, U, first, first + draw(st.integers(-1, 2)), 0, 0, 0)
    if choice == "refusal":
        return HandshakeResponse(TransferKind.NONE, 0, RefusalReason.BUSY, U, -1, -1, 0, 0, 0)
    if choice == "ctrl_ok":
        return Ctrl(C_OK)
    if choice == "ctrl_eof":
        return Ctrl(C_EOF)
    if choice == "ctrl_fc":
        return Ctrl(draw(st.sampled_from([C_FC_STOP, C_FC_CONT])))
    if choice == "ctrl_error":
        return Ctrl(-71)
    if choice == "keepalive":
        return Keepalive()
    if choice == "sst_request":
        return SstRequest("n", draw(st.binary(max_size=4)))
    if choice == "sst_begin":
        return SstBegin(U, draw(st.integers(0, 20)), draw(st.integers(0, 6)))
    if choice == "sst_chunk":
        return SstChunk(draw(st.binary(min_size=1, max_size=4)))
    if choice == "sst_end":
        return SstEnd(bytes(32))
    if choice == "sst_refused":
        return SstRefused(draw(st.text(max_size=10)))
    if choice == "write_set":
        return WriteSet(seqno, RecordType.TRX, b"x")
    if choice == "batch":
        return WriteSetBatch.from_payloads(seqno, b"\x04\x06", [b"y", b""])
    return Segment(seqno, 2, b"zz")


@FUZZ
@given(st.data())
def test_send_and_receive_agree_on_random_conversations(data: st.DataObject) -> None:
    """Whatever one side may send, the other receives as the same event into the same state; what
    send() refuses changes nothing. Both ends' views stay identical, in every conversation."""
    conns = {Role.JOINER: Connection(Role.JOINER), Role.DONOR: Connection(Role.DONOR)}
    for _ in range(data.draw(st.integers(1, 40))):
        # mostly the side that has something to say, sometimes the other
        talkers = [r for r in Role if set(_expected_choices(conns[r])) - {"keepalive"}]
        likely = bool(talkers) and data.draw(st.integers(0, 3)) > 0
        role = data.draw(st.sampled_from(talkers if likely else list(Role)))
        sender, receiver = conns[role], conns[Role.DONOR if role is Role.JOINER else Role.JOINER]
        event = data.draw(some_event(sender))
        before = (sender.state, sender.last_seqno)
        try:
            frame = sender.send(event)
        except ProtocolError as exc:
            assert isinstance(exc, LocalProtocolError)
            assert (sender.state, sender.last_seqno) == before
            continue
        assert _feed_all(receiver, frame) == [event]
        assert receiver.state is sender.state and receiver.last_seqno == sender.last_seqno
        assert receiver.follow == sender.follow and receiver.subscribe == sender.subscribe
        assert receiver.sst_bytes == sender.sst_bytes
        if isinstance(event, Ctrl) and event.code < 0:
            break  # the sender now drops whatever the peer had in flight
