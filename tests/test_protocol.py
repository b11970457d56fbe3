"""protocol/: golden bytes, framing in every chunking, the state machine, and every error path.

Synchronous and fast: two Connection objects talk to each other through plain bytes.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import timeit
import uuid
import zlib
from array import array
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import pytest

from istd.errors import EINVAL, EPROTO, LocalProtocolError, RemoteProtocolError
from protocol import (
    C_EOF,
    C_FC_CONT,
    C_FC_STOP,
    C_OK,
    MAX_HANDSHAKE_BYTES,
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
    State,
    Status,
    StatusRequest,
    TransferKind,
    WriteSet,
    WriteSetBatch,
    negotiate_version,
)
from protocol.wire import (
    EMSGSIZE,
    BatchSchema,
    FrameType,
    HandshakeResponseSchema,
    HandshakeSchema,
    SegmentSchema,
    StatusSchema,
    decode_batch,
    decode_segment,
    encode_batch,
    encode_segment,
    pack_header,
)

U1 = uuid.UUID("0123456789abcdef0123456789abcdef")
U2 = uuid.UUID("fedcba9876543210fedcba9876543210")

HANDSHAKE = Handshake(
    cluster_uuid=U1,
    last_applied=10,
    first=11,
    last=20,
    accept=Accept.IST | Accept.SST,
    versions=(1, 1),
    node_name="node1",
    follow=True,
    auth=b"tok",
)
GRANTED = HandshakeResponse(
    granted=TransferKind.IST,
    version=1,
    reason=RefusalReason.NONE,
    donor_uuid=U1,
    first=11,
    last=16,
    cached_downto=5,
    safe_ist_seqno=6,
    donor_last=25,
    message="hi",
)
REFUSED = HandshakeResponse(
    granted=TransferKind.NONE,
    version=0,
    reason=RefusalReason.NOT_IN_CACHE,
    donor_uuid=U2,
    first=-1,
    last=-1,
    cached_downto=100,
    safe_ist_seqno=120,
    donor_last=200,
    sst_address="10.0.0.1:4444",
)
TRX = WriteSet(11, RecordType.TRX, b"abc")
CCHANGE = WriteSet(12, RecordType.CCHANGE, b"cc")
SKIP = WriteSet(13, RecordType.SKIP, b"")
BATCH = WriteSetBatch.from_payloads(14, bytes([4, 6, 5]), [b"hi", b"", b"c"])
HANDSHAKE_SEG = dataclasses.replace(HANDSHAKE, segments=True)
SEGMENT = Segment(12, 2, b"\x01x\x01y")  # seqnos 12, 13: fits between TRX (11) and BATCH (14-16)
# Cluster mode: SUBSCRIBE without FOLLOW (it implies it); the writer grants from its position 25 on.
HANDSHAKE_SUB = dataclasses.replace(HANDSHAKE, last=-1, follow=False, subscribe=True)
SUB_GRANT = dataclasses.replace(GRANTED, first=26, last=25, donor_last=25)
STATUS_REQUEST = StatusRequest(b'{"node":"n1"}')
STATUS = Status(b'{"last":25}')

# Written by hand from the README's layouts; only the two CRC32s were computed (zlib.crc32).
GOLDEN: dict[str, str] = {
    "handshake": (
        "01 01 00 00 3b000000 ffffffffffffffff 5393f5da e9abaee0"
        " 49535444 01 01 0123456789abcdef 0123456789abcdef 0a00000000000000 0b00000000000000"
        " 1400000000000000 03 01 05 6e6f646531 0300 746f6b"
    ),
    "granted": (
        "01 02 00 00 44000000 ffffffffffffffff afe7569d 6f726eaf"
        " 49535444 01 01 00 0123456789abcdef 0123456789abcdef 0b00000000000000 1000000000000000"
        " 0500000000000000 0600000000000000 1900000000000000 0200 6869 00"
    ),
    "refused": (
        "01 02 00 00 4f000000 ffffffffffffffff a143c4ec 3b41a391"
        " 49535444 00 00 03 fedcba9876543210 fedcba9876543210 ffffffffffffffff ffffffffffffffff"
        " 6400000000000000 7800000000000000 c800000000000000 0000 0d 31302e302e302e313a34343434"
    ),
    "ctrl_ok": "01 03 00 00 00000000 ffffffffffffffff c8b0c817 00000000",
    "keepalive": "01 08 00 00 00000000 ffffffffffffffff 36163cc9 00000000",
    "trx": "01 04 00 00 03000000 0b00000000000000 01715be2 c2412435 616263",
    "cchange": "01 05 00 00 02000000 0c00000000000000 9fefc0ca 791ab2db 6363",
    "skip": "01 06 00 00 00000000 0d00000000000000 e71b2cfb 00000000",
    "batch": (
        "01 07 00 00 17000000 0e00000000000000 9fc3d8b4 23804e3f"
        " 03000000 040605 00 02000000 00000000 01000000 686963"
    ),
    "ctrl_eof": "01 03 00 01 00000000 ffffffffffffffff 4d695eca 00000000",
    "ctrl_eproto": "01 03 00 b9 00000000 ffffffffffffffff 18724e37 00000000",
    "handshake_segments": (  # as "handshake", but request flags 3 = FOLLOW | SEGMENTS
        "01 01 00 00 3b000000 ffffffffffffffff 5393f5da 7635950c"
        " 49535444 01 01 0123456789abcdef 0123456789abcdef 0a00000000000000 0b00000000000000"
        " 1400000000000000 03 03 05 6e6f646531 0300 746f6b"
    ),
    "segment": "01 09 00 00 08000000 0c00000000000000 1aae0265 407e9bf5 02000000 01780179",
    "handshake_subscribe": (  # as "handshake", but last -1 and request flags 4 = SUBSCRIBE
        "01 01 00 00 3b000000 ffffffffffffffff 5393f5da 98fefba9"
        " 49535444 01 01 0123456789abcdef 0123456789abcdef 0a00000000000000 0b00000000000000"
        " ffffffffffffffff 03 04 05 6e6f646531 0300 746f6b"
    ),
    "handshake_subscribe_follow": (  # request flags 5 = FOLLOW | SUBSCRIBE
        "01 01 00 00 3b000000 ffffffffffffffff 5393f5da 9690a8e3"
        " 49535444 01 01 0123456789abcdef 0123456789abcdef 0a00000000000000 0b00000000000000"
        " 1400000000000000 03 05 05 6e6f646531 0300 746f6b"
    ),
    "ctrl_fc_stop": "01 03 00 02 00000000 ffffffffffffffff 83059477 00000000",
    "ctrl_fc_cont": "01 03 00 03 00000000 ffffffffffffffff 06dc02aa 00000000",
    "status_request": (
        "01 0a 00 00 0d000000 ffffffffffffffff 49a615ff 5a681d2c 7b226e6f6465223a226e31227d"  # {"node":"n1"}
    ),
    "status_request_empty": "01 0a 00 00 00000000 ffffffffffffffff a7a7ba61 00000000",
    "status": "01 0b 00 00 0b000000 ffffffffffffffff 41d8d3a9 2a7af499 7b226c617374223a32357d",  # {"last":25}
}


T = TypeVar("T")


def _replace(event: T, **changes: Any) -> T:
    return dataclasses.replace(event, **changes)  # type: ignore[type-var]


def golden(name: str) -> bytes:
    return bytes.fromhex(GOLDEN[name].replace(" ", ""))


# --- helpers -------------------------------------------------------------------------------------


def feed(conn: Connection, data: bytes, chunk: int | None = None) -> list[Event]:
    """Feed ``data`` in chunks of ``chunk`` bytes (all at once if None); collect every event."""
    events: list[Event] = []
    step = chunk or max(len(data), 1)
    for start in range(0, len(data), step):
        conn.receive_data(data[start : start + step])
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
    return events


def pair(
    handshake: Handshake = HANDSHAKE, response: HandshakeResponse = GRANTED, *, ok: bool = True
) -> tuple[Connection, Connection]:
    """A joiner and a donor that went through handshake (and CTRL(OK) if ``ok``)."""
    joiner, donor = Connection(Role.JOINER), Connection(Role.DONOR)
    assert feed(donor, joiner.send(handshake)) == [handshake]
    assert feed(joiner, donor.send(response)) == [response]
    if ok and response.granted != TransferKind.NONE:
        assert feed(donor, joiner.send(Ctrl(C_OK))) == [Ctrl(C_OK)]
    return joiner, donor


def raw_frame(
    ftype: int,
    payload: bytes = b"",
    *,
    version: int = 1,
    flags: int = 0,
    ctrl: int = 0,
    seqno: int = -1,
    length: int | None = None,
    payload_crc: int | None = None,
) -> bytes:
    """A frame the Connection would never send: for the error paths."""
    length = len(payload) if length is None else length
    crc = zlib.crc32(payload) if payload_crc is None else payload_crc
    return pack_header(version, ftype, flags, ctrl, length, seqno, crc) + payload


def response_payload(**changes: object) -> bytes:
    fields: dict[str, object] = dict(
        version=1,
        granted=1,
        reason=0,
        donor_uuid=U1.bytes,
        first=11,
        last=16,
        cached_downto=5,
        safe_ist_seqno=6,
        donor_last=25,
        message="",
        sst_address="",
    )
    fields.update(changes)
    return bytes(HandshakeResponseSchema.build(fields))


def handshake_payload(**changes: object) -> bytes:
    fields: dict[str, object] = dict(
        min_version=1,
        max_version=1,
        cluster_uuid=U1.bytes,
        last_applied=10,
        first=11,
        last=20,
        accept=1,
        request=0,
        node_name="n",
        auth=b"",
    )
    fields.update(changes)
    return bytes(HandshakeSchema.build(fields))


def expect_remote(conn: Connection, data: bytes, match: str, code: int = -EPROTO) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError, match=match) as info:
        feed(conn, data)
    assert info.value.error_code == code
    return info.value


# --- golden bytes --------------------------------------------------------------------------------


def _golden_cases() -> Iterator[tuple[str, Event, Callable[[], tuple[Connection, Connection]]]]:
    fresh = lambda: (Connection(Role.JOINER), Connection(Role.DONOR))  # noqa: E731

    def after_handshake() -> tuple[Connection, Connection]:
        joiner, donor = fresh()
        feed(donor, joiner.send(HANDSHAKE))
        return joiner, donor

    yield "handshake", HANDSHAKE, fresh
    yield "granted", GRANTED, after_handshake
    yield "refused", REFUSED, after_handshake
    yield "ctrl_ok", Ctrl(C_OK), lambda: pair(ok=False)
    yield "keepalive", Keepalive(), pair
    yield "trx", TRX, pair

    def after(*events: Event) -> Callable[[], tuple[Connection, Connection]]:
        def make() -> tuple[Connection, Connection]:
            joiner, donor = pair()
            for event in events:
                feed(joiner, donor.send(event))
            return joiner, donor

        return make

    yield "cchange", CCHANGE, after(TRX)
    yield "skip", SKIP, after(TRX, CCHANGE)
    yield "batch", BATCH, after(TRX, CCHANGE, SKIP)
    yield "ctrl_eof", Ctrl(C_EOF), after(TRX, CCHANGE, SKIP, BATCH)
    yield "ctrl_eproto", Ctrl(-EPROTO), pair
    yield "handshake_segments", HANDSHAKE_SEG, fresh

    def segment_after_trx() -> tuple[Connection, Connection]:
        joiner, donor = pair(HANDSHAKE_SEG)
        feed(joiner, donor.send(TRX))
        return joiner, donor

    yield "segment", SEGMENT, segment_after_trx
    yield "handshake_subscribe", HANDSHAKE_SUB, fresh
    yield "handshake_subscribe_follow", _replace(HANDSHAKE, subscribe=True), fresh
    yield "ctrl_fc_stop", Ctrl(C_FC_STOP), pair  # HANDSHAKE asks to follow
    yield "ctrl_fc_cont", Ctrl(C_FC_CONT), pair
    yield "status_request", STATUS_REQUEST, fresh
    yield "status_request_empty", StatusRequest(b""), fresh

    def after_status_request() -> tuple[Connection, Connection]:
        joiner, donor = fresh()
        feed(donor, joiner.send(STATUS_REQUEST))
        return joiner, donor

    yield "status", STATUS, after_status_request


@pytest.mark.parametrize(("name", "event", "make"), list(_golden_cases()), ids=lambda v: str(v)[:20])
def test_golden_bytes(name: str, event: Event, make: Callable[[], tuple[Connection, Connection]]) -> None:
    joiner, donor = make()
    # The event's sender: the donor sends responses, write-sets and EOF; the joiner the rest.
    donor_sends = name in {"granted", "refused", "trx", "cchange", "skip", "batch", "segment", "ctrl_eof", "status"}
    sender, receiver = (donor, joiner) if donor_sends else (joiner, donor)
    data = sender.send(event)
    assert data.hex() == golden(name).hex()
    assert feed(receiver, data) == [event]


# --- a whole conversation, in every chunking -----------------------------------------------------

CONVERSATION: list[tuple[Role, Event]] = [
    (Role.JOINER, HANDSHAKE),
    (Role.DONOR, Keepalive()),
    (Role.DONOR, GRANTED),
    (Role.JOINER, Keepalive()),
    (Role.JOINER, Ctrl(C_OK)),
    (Role.DONOR, TRX),
    (Role.DONOR, CCHANGE),
    (Role.DONOR, Keepalive()),
    (Role.DONOR, SKIP),
    (Role.JOINER, Keepalive()),
    (Role.DONOR, BATCH),
    (Role.DONOR, Ctrl(C_EOF)),
    (Role.JOINER, Keepalive()),
]


def converse(conversation: list[tuple[Role, Event]], chunk: int | None) -> dict[Role, Connection]:
    """Play ``conversation`` between a joiner and a donor Connection, each frame delivered in pieces of
    ``chunk`` bytes (None: whole): each arrives as exactly its event. Returns both connections."""
    conns = {Role.JOINER: Connection(Role.JOINER), Role.DONOR: Connection(Role.DONOR)}
    for sender, event in conversation:
        receiver = conns[Role.DONOR if sender is Role.JOINER else Role.JOINER]
        data = conns[sender].send(event)
        if chunk == 1:  # NEED_DATA on every byte but the last
            for i in range(len(data) - 1):
                receiver.receive_data(data[i : i + 1])
                assert receiver.next_event() is NEED_DATA
            receiver.receive_data(data[-1:])
            assert receiver.next_event() == event
            assert receiver.next_event() is NEED_DATA
        else:
            assert feed(receiver, data, chunk) == [event]
    return conns


@pytest.mark.parametrize("chunk", [None, 1, 2, 7, 23, 24, 25])
def test_conversation_frame_by_frame(chunk: int | None) -> None:
    for conn in converse(CONVERSATION, chunk).values():
        assert conn.state is State.DONE
        assert conn.last_seqno == 16
        conn.receive_data(b"")
        assert conn.next_event() == ConnectionClosed()
        assert conn.next_event() == ConnectionClosed()  # and again


@pytest.mark.parametrize("chunk", [None, 1, 5, 24, 1000])
def test_all_donor_frames_in_one_stream(chunk: int | None) -> None:
    """Trailing bytes of one frame are the start of the next, in any split."""
    joiner, donor = Connection(Role.JOINER), Connection(Role.DONOR)
    feed(donor, joiner.send(HANDSHAKE))
    blob = donor.send(Keepalive()) + donor.send(GRANTED)
    assert feed(joiner, blob, chunk) == [Keepalive(), GRANTED]
    feed(donor, joiner.send(Ctrl(C_OK)))
    events: list[Event] = [TRX, CCHANGE, SKIP, BATCH, Ctrl(C_EOF)]
    blob = b"".join(donor.send(e) for e in events)
    assert feed(joiner, blob, chunk) == events
    assert joiner.state is State.DONE


def test_trailing_partial_frame_waits() -> None:
    joiner, donor = pair()
    trx, cc = donor.send(TRX), donor.send(CCHANGE)
    joiner.receive_data(trx + cc[:25])
    assert joiner.next_event() == TRX
    assert joiner.next_event() is NEED_DATA
    joiner.receive_data(cc[25:])
    assert joiner.next_event() == CCHANGE


# --- paths through the state machine -------------------------------------------------------------


def test_transition_table_shape() -> None:
    assert TRANSITIONS[(State.HANDSHAKE, Role.JOINER, Kind.HANDSHAKE)] is State.RESPONSE
    assert (State.HANDSHAKE, Role.DONOR, Kind.KEEPALIVE) not in TRANSITIONS
    assert (State.STREAMING, Role.JOINER, Kind.WRITE_SETS) not in TRANSITIONS
    assert all(TRANSITIONS[(s, r, Kind.CTRL_ERROR)] is State.FAILED for s in State for r in Role)


def test_refusal_path() -> None:
    joiner, donor = pair(response=REFUSED)
    assert joiner.state is donor.state is State.REFUSED
    assert joiner.granted == REFUSED and joiner.version is None
    with pytest.raises(LocalProtocolError, match="JOINER may not send CTRL\\(OK\\) in state REFUSED"):
        joiner.send(Ctrl(C_OK))
    with pytest.raises(LocalProtocolError, match="DONOR may not send write-set in state REFUSED"):
        donor.send(TRX)
    assert feed(donor, joiner.send(Keepalive())) == [Keepalive()]
    donor.receive_data(b"")
    assert donor.next_event() == ConnectionClosed()


def test_refusal_must_have_reason_and_version_0() -> None:
    joiner2, donor2 = Connection(Role.JOINER), Connection(Role.DONOR)
    feed(donor2, joiner2.send(HANDSHAKE))
    with pytest.raises(LocalProtocolError, match="version 0"):
        donor2.send(_replace(REFUSED, version=1))
    with pytest.raises(LocalProtocolError, match="reason"):
        donor2.send(_replace(REFUSED, reason=RefusalReason.NONE))
    with pytest.raises(LocalProtocolError, match="reason NONE"):
        donor2.send(_replace(GRANTED, reason=RefusalReason.BUSY))
    joiner3 = Connection(Role.JOINER)
    joiner3.send(HANDSHAKE)
    expect_remote(joiner3, raw_frame(FrameType.HANDSHAKE_RESPONSE, response_payload(version=0)), "version")


def test_eof_with_nothing_to_send() -> None:
    joiner, donor = pair(response=_replace(GRANTED, first=11, last=10))
    assert feed(joiner, donor.send(Ctrl(C_EOF))) == [Ctrl(C_EOF)]
    assert joiner.state is donor.state is State.DONE
    assert joiner.last_seqno == 10


def test_sst_grant_streams_like_ist() -> None:
    sst = _replace(
        GRANTED, granted=TransferKind.SST, donor_uuid=U2, first=101, last=100, sst_address="h:4444"
    )
    joiner, donor = pair(response=sst)
    assert feed(joiner, donor.send(Ctrl(C_EOF))) == [Ctrl(C_EOF)]
    ist_only = _replace(HANDSHAKE, accept=Accept.IST)
    j, d = Connection(Role.JOINER), Connection(Role.DONOR)
    feed(d, j.send(ist_only))
    with pytest.raises(LocalProtocolError, match="does not accept SST"):
        d.send(sst)


def test_follow_mode_streams_past_last() -> None:
    joiner, donor = pair()  # HANDSHAKE asks to follow
    assert joiner.follow
    for event in (TRX, CCHANGE, SKIP, BATCH):
        feed(joiner, donor.send(event))
    more = WriteSetBatch.from_payloads(17, bytes([4, 4]), [b"x", b"y"])
    assert feed(joiner, donor.send(more)) == [more]
    assert feed(joiner, donor.send(WriteSet(19, RecordType.TRX, b"z"))) == [
        WriteSet(19, RecordType.TRX, b"z")
    ]
    assert joiner.last_seqno == donor.last_seqno == 19
    assert feed(joiner, donor.send(Ctrl(C_EOF))) == [Ctrl(C_EOF)]


def test_not_following_stops_at_last() -> None:
    joiner, donor = pair(_replace(HANDSHAKE, follow=False))
    for event in (TRX, CCHANGE, SKIP, BATCH):
        feed(joiner, donor.send(event))
    past = WriteSet(17, RecordType.TRX, b"x")
    with pytest.raises(LocalProtocolError, match="past the granted last seqno 16"):
        donor.send(past)
    expect_remote(joiner, raw_frame(FrameType.TRX, b"x", seqno=17), "past the granted last seqno 16")
    # a batch that straddles `last` is caught after its payload is read
    joiner2, donor2 = pair(_replace(HANDSHAKE, follow=False))
    feed(joiner2, donor2.send(TRX))
    payload = bytes(BatchSchema.build(dict(count=6, types=bytes(6 * [6]), sizes=[0] * 6, data=b"")))
    expect_remote(joiner2, raw_frame(FrameType.BATCH, payload, seqno=12), "past the granted last seqno 16")


def test_keepalives_any_time_after_handshake_only() -> None:
    donor = Connection(Role.DONOR)
    expect_remote(donor, raw_frame(FrameType.KEEPALIVE), "JOINER may not send KEEPALIVE in state HANDSHAKE")
    with pytest.raises(LocalProtocolError, match="KEEPALIVE in state HANDSHAKE"):
        Connection(Role.JOINER).send(Keepalive())
    joiner, donor = pair()
    feed(joiner, donor.send(TRX))
    assert feed(donor, joiner.send(Keepalive())) == [Keepalive()]
    assert feed(joiner, donor.send(Keepalive())) == [Keepalive()]
    assert joiner.state is State.STREAMING


def test_keepalive_may_cross_eof() -> None:
    joiner, donor = pair(response=_replace(GRANTED, last=10))
    eof = donor.send(Ctrl(C_EOF))
    keepalive = joiner.send(Keepalive())  # sent before the EOF arrived
    assert feed(donor, keepalive) == [Keepalive()]
    assert feed(joiner, eof) == [Ctrl(C_EOF)]


def test_joiner_aborts_and_drops_what_was_in_flight() -> None:
    joiner, donor = pair()
    in_flight = donor.send(TRX) + donor.send(CCHANGE)
    error = joiner.send(Ctrl(-EPROTO))
    assert joiner.state is State.FAILED
    assert feed(joiner, in_flight) == []  # checked for framing, dropped
    assert feed(donor, error) == [Ctrl(-EPROTO)]
    assert donor.state is State.FAILED
    with pytest.raises(LocalProtocolError, match="FAILED"):
        donor.send(SKIP)
    joiner.receive_data(b"")
    assert joiner.next_event() == ConnectionClosed()


def test_abort_in_the_middle_of_a_received_frame() -> None:
    joiner, donor = pair()
    in_flight = donor.send(TRX) + donor.send(CCHANGE)
    joiner.receive_data(in_flight[:30])  # one frame and a half
    assert joiner.next_event() == TRX
    assert joiner.next_event() is NEED_DATA
    joiner.send(Ctrl(-EPROTO))
    assert feed(joiner, in_flight[30:] + donor.send(SKIP)) == []  # the rest of the half frame, then one more
    assert joiner.state is State.FAILED


def test_donor_aborts() -> None:
    joiner, donor = pair()
    assert feed(joiner, donor.send(TRX) + donor.send(Ctrl(-110))) == [TRX, Ctrl(-110)]
    assert joiner.state is State.FAILED
    # the peer said it failed: anything more from it is a protocol error
    expect_remote(
        joiner, raw_frame(FrameType.CCHANGE, b"cc", seqno=12), "may not send CCHANGE in state FAILED"
    )


def test_donor_rejects_a_bad_handshake_with_ctrl() -> None:
    joiner, donor = Connection(Role.JOINER), Connection(Role.DONOR)
    joiner.send(HANDSHAKE)
    exc = expect_remote(donor, raw_frame(FrameType.HANDSHAKE, b"junk"), "malformed HANDSHAKE")
    assert feed(joiner, donor.send(Ctrl(exc.error_code))) == [Ctrl(-EPROTO)]
    assert joiner.state is State.FAILED


def test_wrong_sender_and_state() -> None:
    joiner, donor = Connection(Role.JOINER), Connection(Role.DONOR)
    with pytest.raises(LocalProtocolError, match="DONOR may not send HANDSHAKE"):
        donor.send(HANDSHAKE)
    with pytest.raises(LocalProtocolError, match="not an event that can be sent"):
        joiner.send(ConnectionClosed())
    with pytest.raises(LocalProtocolError, match="unknown ctrl code 4"):  # 2, 3: flow control
        joiner.send(Ctrl(4))
    with pytest.raises(LocalProtocolError, match="unknown ctrl code -129"):
        joiner.send(Ctrl(-129))
    joiner, donor = pair(ok=False)
    with pytest.raises(LocalProtocolError, match="DONOR may not send write-set in state OK"):
        donor.send(TRX)  # the donor waits for CTRL(OK)
    expect_remote(joiner, raw_frame(FrameType.TRX, b"abc", seqno=11), "DONOR may not send TRX in state OK")
    _j2, d2 = pair()
    expect_remote(
        d2, raw_frame(FrameType.TRX, b"abc", seqno=11), "JOINER may not send TRX in state STREAMING"
    )
    expect_remote(
        Connection(Role.DONOR), raw_frame(FrameType.CTRL, ctrl=1), "JOINER may not send CTRL\\(EOF\\)"
    )


# --- versions ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("theirs", "ours", "expected"),
    [
        ((1, 1), (1, 1), 1),
        ((1, 3), (2, 5), 3),
        ((2, 3), (1, 1), None),
        ((1, 1), (2, 2), None),
        ((0, 9), (4, 6), 6),
    ],
)
def test_negotiate_version(theirs: tuple[int, int], ours: tuple[int, int], expected: int | None) -> None:
    assert negotiate_version(theirs, ours) == expected


def test_version_negotiation_failure_is_a_refusal() -> None:
    future = _replace(HANDSHAKE, versions=(2, 3))
    joiner, donor = Connection(Role.JOINER), Connection(Role.DONOR)
    [hs] = feed(donor, joiner.send(future))
    assert isinstance(hs, Handshake)
    assert negotiate_version(hs.versions, SUPPORTED_VERSIONS) is None
    with pytest.raises(LocalProtocolError, match=r"not in the joiner.s range 2\.\.3"):
        donor.send(GRANTED)
    refusal = _replace(REFUSED, reason=RefusalReason.VERSION_UNSUPPORTED)
    assert feed(joiner, donor.send(refusal)) == [refusal]
    assert joiner.state is State.REFUSED


def test_joiner_rejects_a_version_it_did_not_offer() -> None:
    joiner = Connection(Role.JOINER)
    joiner.send(HANDSHAKE)
    expect_remote(joiner, raw_frame(FrameType.HANDSHAKE_RESPONSE, response_payload(version=2)), "version 2")


def test_wrong_version_byte() -> None:
    joiner, _donor = pair()
    expect_remote(
        joiner,
        raw_frame(FrameType.TRX, b"abc", seqno=11, version=2),
        "invalid protocol version 2, expected 1",
    )
    expect_remote(
        Connection(Role.DONOR),
        raw_frame(FrameType.HANDSHAKE, handshake_payload(), version=0),
        "version 0, expected 1",
    )


# --- corruption and limits -----------------------------------------------------------------------


def test_corrupt_header_crc_caught_from_header_alone() -> None:
    joiner, donor = pair()
    frame = bytearray(donor.send(TRX))
    frame[5] ^= 0x01  # len
    joiner.receive_data(bytes(frame[:24]))
    with pytest.raises(RemoteProtocolError, match="Corrupted IST message header") as info:
        joiner.next_event()
    assert info.value.error_code == -EINVAL


def test_corrupt_payload_crc() -> None:
    joiner, donor = pair()
    frame = bytearray(donor.send(TRX))
    frame[-1] ^= 0x80
    expect_remote(joiner, bytes(frame), "payload checksum mismatch", code=-EINVAL)


def test_oversize_frame_rejected_before_payload() -> None:
    joiner, donor = pair()
    joiner.max_frame_bytes = 1000
    joiner.receive_data(raw_frame(FrameType.TRX, seqno=11, length=1001))  # the header only
    with pytest.raises(
        RemoteProtocolError, match="TRX frame of 1001 bytes exceeds the limit of 1000"
    ) as info:
        joiner.next_event()
    assert info.value.error_code == -EMSGSIZE
    donor.max_frame_bytes = 10
    with pytest.raises(LocalProtocolError, match="payload of 11 bytes exceeds the limit of 10"):
        donor.send(WriteSet(11, RecordType.TRX, bytes(11)))


def test_oversize_handshake_rejected_before_payload() -> None:
    donor = Connection(Role.DONOR)
    donor.receive_data(raw_frame(FrameType.HANDSHAKE, length=MAX_HANDSHAKE_BYTES + 1))
    with pytest.raises(RemoteProtocolError, match=f"HANDSHAKE frame of {MAX_HANDSHAKE_BYTES + 1} bytes"):
        donor.next_event()
    with pytest.raises(LocalProtocolError, match="exceeds the limit"):
        Connection(Role.JOINER).send(_replace(HANDSHAKE, auth=bytes(MAX_HANDSHAKE_BYTES - 40)))


def test_close_in_the_middle_of_a_frame() -> None:
    joiner, donor = pair()
    frame = donor.send(TRX)
    joiner.receive_data(frame[:-1])
    assert joiner.next_event() is NEED_DATA
    joiner.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a frame: got 26 of 27 bytes"):
        joiner.next_event()
    joiner2, donor2 = pair()
    joiner2.receive_data(donor2.send(TRX)[:10])
    joiner2.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="got 10 of 24 bytes"):
        joiner2.next_event()


def test_errors_are_sticky() -> None:
    joiner, donor = pair()
    expect_remote(joiner, raw_frame(99), "unknown IST message type 99")
    joiner.receive_data(donor.send(TRX))
    with pytest.raises(RemoteProtocolError, match="already failed: unknown IST message type 99"):
        joiner.next_event()


def test_close_before_eof_is_visible_in_the_state() -> None:
    joiner, donor = pair()
    feed(joiner, donor.send(TRX))
    joiner.receive_data(b"")
    assert joiner.next_event() == ConnectionClosed()
    assert joiner.state is State.STREAMING  # not DONE: the daemon treats it as a failed IST
    with pytest.raises(LocalProtocolError, match="after the peer closed"):
        joiner.receive_data(b"x")


# --- seqno discipline ----------------------------------------------------------------------------


def test_first_seqno_must_be_granted_first() -> None:
    joiner, donor = pair()
    with pytest.raises(LocalProtocolError, match="IST started with wrong seqno: 12, expected: 11"):
        donor.send(CCHANGE)
    expect_remote(
        joiner,
        raw_frame(FrameType.CCHANGE, b"cc", seqno=12),
        "IST started with wrong seqno: 12, expected: 11",
    )


def test_non_consecutive_seqnos() -> None:
    joiner, donor = pair()
    feed(joiner, donor.send(TRX))
    with pytest.raises(LocalProtocolError, match="Unexpected action seqno: 13 expected: 12"):
        donor.send(SKIP)
    expect_remote(joiner, raw_frame(FrameType.SKIP, seqno=13), "Unexpected action seqno: 13 expected: 12")
    j2, d2 = pair()
    feed(j2, d2.send(TRX))
    batch = WriteSetBatch.from_payloads(11, b"\x04", [b"again"])
    with pytest.raises(LocalProtocolError, match="Unexpected action seqno: 11 expected: 12"):
        d2.send(batch)


def test_eof_too_early() -> None:
    joiner, donor = pair()
    feed(joiner, donor.send(TRX) + donor.send(CCHANGE))
    with pytest.raises(LocalProtocolError, match="expected last: 16 last sent: 12"):
        donor.send(Ctrl(C_EOF))
    expect_remote(
        joiner,
        raw_frame(FrameType.CTRL, ctrl=1),
        "IST didn't contain all write sets, expected last: 16 last received: 12",
    )


def donor_may_not_send(handshake: Handshake, grant: HandshakeResponse, match: str) -> Connection:
    """After ``handshake``, the donor may not send ``grant`` (LocalProtocolError saying ``match``). Returns the
    joiner, waiting for a response."""
    joiner, donor = Connection(Role.JOINER), Connection(Role.DONOR)
    feed(donor, joiner.send(handshake))
    with pytest.raises(LocalProtocolError, match=match):
        donor.send(grant)
    return joiner


def both_sides_refuse_the_grant(handshake: Handshake, grant: HandshakeResponse, raw: Mapping[str, object],
                                match: str) -> None:
    """After ``handshake``, the donor may not send ``grant`` and the joiner refuses the same grant sent as raw
    bytes (its payload fields ``raw``); both say ``match``."""
    joiner = donor_may_not_send(handshake, grant, match)
    expect_remote(joiner, raw_frame(FrameType.HANDSHAKE_RESPONSE, response_payload(**raw)), match)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"donor_uuid": U2}, "history"),
        ({"first": 12}, "from seqno 12, joiner asked from 11"),
        ({"last": 21}, "up to seqno 21, joiner asked up to 20"),
    ],
)
def test_grant_must_match_the_request(changes: dict[str, object], match: str) -> None:
    raw = {"donor_uuid": U2.bytes} if "donor_uuid" in changes else changes
    both_sides_refuse_the_grant(HANDSHAKE, _replace(GRANTED, **changes), raw, match)


def test_ist_grant_needs_ist_accepted() -> None:
    donor_may_not_send(_replace(HANDSHAKE, accept=Accept.SST), GRANTED, "does not accept IST")


# --- malformed payloads and headers --------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "match"),
    [({"granted": 3}, "unknown granted value 3"), ({"reason": 42}, "unknown refusal reason 42")],
)
def test_unknown_enum_values_in_response(changes: dict[str, object], match: str) -> None:
    joiner = Connection(Role.JOINER)
    joiner.send(HANDSHAKE)
    expect_remote(joiner, raw_frame(FrameType.HANDSHAKE_RESPONSE, response_payload(**changes)), match)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (handshake_payload(accept=4), "unknown accept flags"),
        (handshake_payload(request=8), "unknown request flags"),
        (handshake_payload(min_version=2, max_version=1), "versions"),
        (handshake_payload(min_version=0), "versions"),
        (handshake_payload(last_applied=-2), "last_applied"),
        (handshake_payload() + b"\x00", "malformed HANDSHAKE"),  # Terminated
        (b"ISTX" + handshake_payload()[4:], "malformed HANDSHAKE"),
        (handshake_payload()[:-1], "malformed HANDSHAKE"),
        (handshake_payload(node_name="n").replace(b"\x01n", b"\x01\xff"), "malformed HANDSHAKE"),  # bad utf-8
    ],
)
def test_malformed_handshake(payload: bytes, match: str) -> None:
    expect_remote(Connection(Role.DONOR), raw_frame(FrameType.HANDSHAKE, payload), match)


def test_handshake_fields_that_do_not_fit() -> None:
    with pytest.raises(LocalProtocolError, match="cannot encode"):
        Connection(Role.JOINER).send(_replace(HANDSHAKE, node_name="x" * 256))
    with pytest.raises(LocalProtocolError, match="versions"):
        Connection(Role.JOINER).send(_replace(HANDSHAKE, versions=(0, 1)))
    with pytest.raises(LocalProtocolError, match="not a seqno"):
        Connection(Role.JOINER).send(_replace(HANDSHAKE, first=-5))


def _batch(count: int, types: bytes, pad: bytes, sizes: list[int], data: bytes) -> bytes:
    return count.to_bytes(4, "little") + types + pad + b"".join(s.to_bytes(4, "little") for s in sizes) + data


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (_batch(2, b"\x04\x04", b"\0\0", [1, 1], b"abc"), "sum to 2 bytes but 3"),
        (_batch(2, b"\x04\x04", b"\0\0", [1, 2], b"ab"), "sum to 3 bytes but 2"),
        (_batch(0, b"", b"", [], b""), "0 records"),
        (_batch(1, b"\x07", b"\0\0\0", [0], b""), "record type 7"),
        (_batch(1, b"\x04", b"\0\x01\0", [1], b"a"), "padding"),
        (_batch(1, b"\x06", b"\0\0\0", [1], b"a"), "SKIP record with a non-empty payload"),
        (_batch(1000, b"\x04", b"", [], b""), "needs"),
        (b"\x01\x00", "shorter than its count"),
    ],
)
def test_malformed_batch(payload: bytes, match: str) -> None:
    joiner, _donor = pair()
    expect_remote(joiner, raw_frame(FrameType.BATCH, payload, seqno=11), match)


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (raw_frame(0), "unknown IST message type 0"),
        (raw_frame(17), "unknown IST message type 17"),
        (raw_frame(FrameType.TRX, b"a", seqno=11, flags=0x02), "unknown flags 0x2"),
        (raw_frame(FrameType.TRX, b"a", seqno=11, ctrl=1), "TRX frame has ctrl 1"),
        (raw_frame(FrameType.CTRL, ctrl=5), "unknown ctrl code 5"),
        (raw_frame(FrameType.CTRL, ctrl=-1, seqno=3), "seqno 3, expected -1"),
        (raw_frame(FrameType.KEEPALIVE, b"x"), "KEEPALIVE frame has a payload of 1 bytes"),
        (raw_frame(FrameType.SKIP, b"x", seqno=11), "SKIP frame has a payload"),
    ],
)
def test_malformed_header(frame: bytes, match: str) -> None:
    joiner, _ = pair()
    joiner.receive_data(frame[:24])  # every header check happens before the payload arrives
    with pytest.raises(RemoteProtocolError, match=match) as info:
        joiner.next_event()
    assert info.value.error_code == -EPROTO


def test_preload_flag_is_tolerated() -> None:
    joiner, _ = pair()
    assert feed(joiner, raw_frame(FrameType.TRX, b"abc", seqno=11, flags=0x01)) == [TRX]


def test_skip_write_set_with_payload_cannot_be_sent() -> None:
    _, donor = pair()
    with pytest.raises(LocalProtocolError, match="SKIP write-set 11 has a payload"):
        donor.send(WriteSet(11, RecordType.SKIP, b"x"))


def test_batch_inconsistent_cannot_be_sent() -> None:
    _, donor = pair()
    with pytest.raises(LocalProtocolError, match="sum to"):
        donor.send(WriteSetBatch(11, b"\x04", array("I", [3]), b"ab"))
    with pytest.raises(LocalProtocolError, match="empty BATCH"):
        donor.send(WriteSetBatch(11, b"", array("I"), b""))
    with pytest.raises(LocalProtocolError, match="1 types but 2 sizes"):
        donor.send(WriteSetBatch(11, b"\x04", array("I", [1, 1]), b"ab"))
    with pytest.raises(LocalProtocolError, match="2 types but 1 payloads"):
        WriteSetBatch.from_payloads(11, b"\x04\x04", [b"a"])


# --- WriteSetBatch -------------------------------------------------------------------------------


def test_write_set_batch_api() -> None:
    backing = bytearray(b"..hello..world")
    views = [memoryview(backing)[2:7], memoryview(backing)[9:14], memoryview(b"")]
    batch = WriteSetBatch.from_payloads(100, bytes([4, 5, 6]), views)
    assert len(batch) == 3 and batch.last == 102
    assert list(batch.sizes) == [5, 5, 0]
    assert bytes(batch.payload(1)) == b"world" and bytes(batch.payload(-3)) == b"hello"
    with pytest.raises(IndexError):
        batch.payload(3)
    assert list(batch) == [
        WriteSet(100, RecordType.TRX, b"hello"),
        WriteSet(101, RecordType.CCHANGE, b"world"),
        WriteSet(102, RecordType.SKIP, b""),
    ]
    assert [(s, t, bytes(p)) for s, t, p in batch.records()] == [
        (100, 4, b"hello"),
        (101, 5, b"world"),
        (102, 6, b""),
    ]
    assert batch != WriteSetBatch.from_payloads(100, bytes([4, 5, 6]), [b"hello", b"worle", b""])
    assert batch == WriteSetBatch.from_payloads(100, bytes([4, 5, 6]), [b"hello", b"world", b""])


def test_received_batch_is_zero_copy() -> None:
    joiner, donor = pair()
    feed(joiner, donor.send(TRX) + donor.send(CCHANGE) + donor.send(SKIP))
    [batch] = feed(joiner, donor.send(BATCH))
    assert isinstance(batch, WriteSetBatch)
    assert isinstance(batch.data, memoryview) and isinstance(batch.sizes, memoryview)
    assert batch.payload(0).obj is batch.data.obj  # a slice of the one payload buffer


def test_batch_decode_is_fast() -> None:
    """~2000 records of 500 bytes (1 MiB) decode in well under a millisecond: no per-record work."""
    batch = WriteSetBatch.from_payloads(11, bytes([4]) * 2000, [bytes(500)] * 2000)
    prefix, data = encode_batch(batch)
    payload = prefix + data
    best = min(timeit.repeat(lambda: decode_batch(11, payload), number=5, repeat=5)) / 5
    assert best < 0.005, f"decode_batch took {best * 1000:.2f} ms for 1 MiB"


# --- layering ------------------------------------------------------------------------------------


def test_import_protocol_does_not_load_trio() -> None:
    code = "import sys, protocol; assert 'protocol.connection' in sys.modules; print('trio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- SEGMENT frames (negotiated) -----------------------------------------------------------------


def _segment_payload(count: int, blob: bytes) -> bytes:
    return count.to_bytes(4, "little") + blob


SEGMENT_CONVERSATION: list[tuple[Role, Event]] = [
    (Role.JOINER, HANDSHAKE_SEG),
    (Role.DONOR, GRANTED),
    (Role.JOINER, Ctrl(C_OK)),
    (Role.DONOR, TRX),  # 11
    (Role.DONOR, SEGMENT),  # 12-13
    (Role.DONOR, Keepalive()),
    (Role.DONOR, BATCH),  # 14-16
    (Role.DONOR, Ctrl(C_EOF)),
]


@pytest.mark.parametrize("chunk", [None, 1, 3, 24, 27, 28, 33])
def test_segment_conversation_frame_by_frame(chunk: int | None) -> None:
    for conn in converse(SEGMENT_CONVERSATION, chunk).values():
        assert conn.segments
        assert conn.state is State.DONE and conn.last_seqno == 16


@pytest.mark.parametrize("chunk", [None, 1, 5, 24, 1000])
def test_segments_and_batches_in_one_stream(chunk: int | None) -> None:
    """SEGMENT, BATCH and single frames alternate with consecutive seqnos, in any split (follow)."""
    joiner, donor = pair(HANDSHAKE_SEG)
    events: list[Event] = [
        Segment(11, 1, b"a"),
        WriteSetBatch.from_payloads(12, b"\x04\x06", [b"b", b""]),
        Segment(14, 3, b"cdefgh"),
        Keepalive(),
        WriteSet(17, RecordType.TRX, b"i"),  # past last = 16: following
        Segment(18, 2, memoryview(bytearray(b"jk"))),
        Ctrl(C_EOF),
    ]
    blob = b"".join(donor.send(e) for e in events)
    assert feed(joiner, blob, chunk) == events
    assert joiner.state is State.DONE and joiner.last_seqno == donor.last_seqno == 19


def test_segment_with_trailing_bytes() -> None:
    joiner, donor = pair(HANDSHAKE_SEG)
    feed(joiner, donor.send(TRX))
    seg, batch = donor.send(SEGMENT), donor.send(BATCH)
    joiner.receive_data(seg + batch[:30])
    assert joiner.next_event() == SEGMENT
    assert joiner.last_seqno == 13
    assert joiner.next_event() is NEED_DATA
    joiner.receive_data(batch[30:])
    assert joiner.next_event() == BATCH


def test_received_segment_is_zero_copy() -> None:
    joiner, donor = pair(HANDSHAKE_SEG)
    [seg] = feed(joiner, donor.send(Segment(11, 3, memoryview(b"..xyz")[2:])))
    assert isinstance(seg, Segment) and isinstance(seg.blob, memoryview)
    assert (seg.first, seg.count, seg.last, bytes(seg.blob)) == (11, 3, 13, b"xyz")
    assert repr(seg) == "Segment(first=11, count=3, blob_bytes=3)"


def test_segment_in_the_transition_table() -> None:
    assert TRANSITIONS[(State.STREAMING, Role.DONOR, Kind.SEGMENT)] is State.STREAMING
    assert {(s, r) for s, r, k in TRANSITIONS if k is Kind.SEGMENT} == {(State.STREAMING, Role.DONOR)}
    joiner, donor = pair(HANDSHAKE_SEG, ok=False)
    with pytest.raises(LocalProtocolError, match="DONOR may not send SEGMENT in state OK"):
        donor.send(Segment(11, 1, b"a"))
    expect_remote(
        joiner, raw_frame(FrameType.SEGMENT, _segment_payload(1, b"a"), seqno=11), "SEGMENT in state OK"
    )
    _, donor2 = pair(HANDSHAKE_SEG)
    expect_remote(
        donor2,
        raw_frame(FrameType.SEGMENT, _segment_payload(1, b"a"), seqno=11),
        "JOINER may not send SEGMENT in state STREAMING",
    )


def test_segment_not_negotiated() -> None:
    joiner, donor = pair()  # HANDSHAKE did not set segments
    assert not joiner.segments and not donor.segments
    with pytest.raises(LocalProtocolError, match="SEGMENT frames were not negotiated"):
        donor.send(Segment(11, 1, b"a"))
    assert donor.state is State.STREAMING and donor.last_seqno == 10  # nothing changed
    # the joiner rejects it from the header alone, before the payload is buffered
    joiner.receive_data(raw_frame(FrameType.SEGMENT, _segment_payload(1, b"a"), seqno=11)[:24])
    with pytest.raises(RemoteProtocolError, match="SEGMENT frames were not negotiated") as info:
        joiner.next_event()
    assert info.value.error_code == -EPROTO
    # an SST grant's stream is no exception
    sst = _replace(GRANTED, granted=TransferKind.SST, donor_uuid=U2, first=101, last=105)
    _, d2 = pair(response=sst)
    with pytest.raises(LocalProtocolError, match="not negotiated"):
        d2.send(Segment(101, 1, b"a"))


def test_segments_with_sst_grant_when_negotiated() -> None:
    sst = _replace(GRANTED, granted=TransferKind.SST, donor_uuid=U2, first=101, last=102)
    joiner, donor = pair(HANDSHAKE_SEG, sst)
    assert feed(joiner, donor.send(Segment(101, 2, b"ab")) + donor.send(Ctrl(C_EOF))) == [
        Segment(101, 2, b"ab"),
        Ctrl(C_EOF),
    ]


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (_segment_payload(0, b"abc"), "SEGMENT with 0 records"),
        (_segment_payload(0, b""), "SEGMENT with 0 records"),
        (_segment_payload(3, b"ab"), "SEGMENT of 3 records has a blob of only 2 bytes"),
        (_segment_payload(1, b""), "blob of only 0 bytes"),
        (_segment_payload(2**32 - 1, b"a"), "blob of only 1 bytes"),
        (b"\x01\x00\x00", "shorter than its count"),
        (b"", "shorter than its count"),
    ],
)
def test_malformed_segment(payload: bytes, match: str) -> None:
    joiner, _donor = pair(HANDSHAKE_SEG)
    expect_remote(joiner, raw_frame(FrameType.SEGMENT, payload, seqno=11), match)


@pytest.mark.parametrize(
    ("segment", "match"),
    [
        (Segment(11, 0, b"abc"), "count must be >= 1, not 0"),
        (Segment(11, -1, b"abc"), "count must be >= 1"),
        (Segment(11, 3, b"ab"), "SEGMENT of 3 records has a blob of only 2 bytes"),
        (Segment(11, 1, b""), "blob of only 0 bytes"),
        (Segment(11, 1, "a"), "blob must be bytes-like"),  # type: ignore[arg-type]
        (Segment(11, 1, memoryview(b"abcd")[::2]), "contiguous"),
    ],
)
def test_bad_segment_cannot_be_sent(segment: Segment, match: str) -> None:
    _, donor = pair(HANDSHAKE_SEG)
    with pytest.raises(LocalProtocolError, match=match):
        donor.send(segment)
    assert donor.last_seqno == 10


def test_segment_count_must_fit_u32() -> None:
    with pytest.raises(LocalProtocolError, match=r"count must be in 1\.\.4294967295"):
        encode_segment(Segment(0, 2**32, bytes(8)))


def test_segment_seqno_gaps_across_frame_kinds() -> None:
    # first frame is a SEGMENT at the wrong seqno
    joiner, donor = pair(HANDSHAKE_SEG)
    with pytest.raises(LocalProtocolError, match="IST started with wrong seqno: 12, expected: 11"):
        donor.send(Segment(12, 1, b"a"))
    expect_remote(
        joiner,
        raw_frame(FrameType.SEGMENT, _segment_payload(1, b"a"), seqno=12),
        "IST started with wrong seqno: 12, expected: 11",
    )
    # BATCH then a SEGMENT that skips one seqno
    joiner, donor = pair(HANDSHAKE_SEG)
    feed(joiner, donor.send(WriteSetBatch.from_payloads(11, b"\x04\x04", [b"a", b"b"])))
    with pytest.raises(LocalProtocolError, match="Unexpected action seqno: 14 expected: 13"):
        donor.send(Segment(14, 1, b"a"))
    expect_remote(
        joiner,
        raw_frame(FrameType.SEGMENT, _segment_payload(1, b"a"), seqno=14),
        "Unexpected action seqno: 14 expected: 13",
    )
    # SEGMENT of 2 then a BATCH / TRX that skips, or repeats, a seqno
    for bad in (14, 12, 11):
        joiner, donor = pair(HANDSHAKE_SEG)
        assert feed(joiner, donor.send(Segment(11, 2, b"ab"))) == [Segment(11, 2, b"ab")]
        assert joiner.last_seqno == donor.last_seqno == 12
        with pytest.raises(LocalProtocolError, match=f"Unexpected action seqno: {bad} expected: 13"):
            donor.send(WriteSetBatch.from_payloads(bad, b"\x04", [b"x"]))
        with pytest.raises(LocalProtocolError, match=f"Unexpected action seqno: {bad} expected: 13"):
            donor.send(WriteSet(bad, RecordType.TRX, b"x"))
        expect_remote(
            joiner,
            raw_frame(FrameType.TRX, b"x", seqno=bad),
            f"Unexpected action seqno: {bad} expected: 13",
        )
    # SEGMENT after SEGMENT
    joiner, donor = pair(HANDSHAKE_SEG)
    feed(joiner, donor.send(Segment(11, 2, b"ab")))
    expect_remote(
        joiner,
        raw_frame(FrameType.SEGMENT, _segment_payload(1, b"c"), seqno=12),
        "Unexpected action seqno: 12 expected: 13",
    )


def test_eof_after_segment_that_ends_at_last() -> None:
    joiner, donor = pair(HANDSHAKE_SEG)
    seg = Segment(11, 6, b"abcdef")  # 11..16 = the whole grant
    assert seg.last == 16
    assert feed(joiner, donor.send(seg) + donor.send(Ctrl(C_EOF))) == [seg, Ctrl(C_EOF)]
    assert joiner.state is donor.state is State.DONE
    assert joiner.last_seqno == donor.last_seqno == 16


def test_eof_after_segment_that_ends_before_last() -> None:
    joiner, donor = pair(HANDSHAKE_SEG)
    feed(joiner, donor.send(Segment(11, 5, b"abcde")))
    with pytest.raises(LocalProtocolError, match="expected last: 16 last sent: 15"):
        donor.send(Ctrl(C_EOF))
    expect_remote(
        joiner,
        raw_frame(FrameType.CTRL, ctrl=1),
        "IST didn't contain all write sets, expected last: 16 last received: 15",
    )


def test_segment_follow_mode_beyond_last() -> None:
    joiner, donor = pair(HANDSHAKE_SEG)  # follow=True
    assert joiner.follow
    events: list[Event] = [Segment(11, 8, bytes(8)), Segment(19, 1, b"z"), WriteSet(20, RecordType.SKIP)]
    assert feed(joiner, b"".join(donor.send(e) for e in events)) == events
    assert joiner.last_seqno == donor.last_seqno == 20
    assert feed(joiner, donor.send(Ctrl(C_EOF))) == [Ctrl(C_EOF)]


def test_segment_not_following_stops_at_last() -> None:
    joiner, donor = pair(_replace(HANDSHAKE_SEG, follow=False))
    with pytest.raises(LocalProtocolError, match="past the granted last seqno 16"):
        donor.send(Segment(11, 7, bytes(7)))  # straddles last
    feed(joiner, donor.send(Segment(11, 6, bytes(6))))
    with pytest.raises(LocalProtocolError, match="past the granted last seqno 16"):
        donor.send(Segment(17, 1, b"x"))
    # caught from the header when its first seqno is past last...
    j2, _ = pair(_replace(HANDSHAKE_SEG, follow=False))
    feed(j2, raw_frame(FrameType.SEGMENT, _segment_payload(6, bytes(6)), seqno=11))
    j2.receive_data(raw_frame(FrameType.SEGMENT, _segment_payload(1, b"x"), seqno=17)[:24])
    with pytest.raises(RemoteProtocolError, match="past the granted last seqno 16"):
        j2.next_event()
    # ... and after its payload when only its count takes it past
    j3, _ = pair(_replace(HANDSHAKE_SEG, follow=False))
    expect_remote(
        j3,
        raw_frame(FrameType.SEGMENT, _segment_payload(7, bytes(7)), seqno=11),
        "write-set seqno 17 is past the granted last seqno 16",
    )


def test_segment_seqno_overflow() -> None:
    top = 2**63 - 1
    hs = _replace(HANDSHAKE_SEG, last_applied=top - 2, first=top - 1, last=-1)
    grant = _replace(GRANTED, first=top - 1, last=top - 1)
    joiner, donor = pair(hs, grant)
    with pytest.raises(LocalProtocolError, match="overflows int64"):
        donor.send(Segment(top - 1, 3, b"abc"))
    expect_remote(
        joiner, raw_frame(FrameType.SEGMENT, _segment_payload(3, b"abc"), seqno=top - 1), "overflows int64"
    )


def test_segment_frame_size_limit() -> None:
    joiner, donor = pair(HANDSHAKE_SEG)
    donor.max_frame_bytes = 10
    with pytest.raises(LocalProtocolError, match="payload of 11 bytes exceeds the limit of 10"):
        donor.send(Segment(11, 1, bytes(7)))
    assert feed(joiner, donor.send(Segment(11, 1, bytes(6)))) == [Segment(11, 1, bytes(6))]
    joiner.max_frame_bytes = 10
    joiner.receive_data(raw_frame(FrameType.SEGMENT, seqno=12, length=11))  # the header only
    with pytest.raises(RemoteProtocolError, match="SEGMENT frame of 11 bytes exceeds the limit of 10") as info:
        joiner.next_event()
    assert info.value.error_code == -EMSGSIZE


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (raw_frame(FrameType.SEGMENT, b"\x01\0\0\0a", seqno=11, ctrl=1), "SEGMENT frame has ctrl 1"),
        (raw_frame(FrameType.SEGMENT, b"\x01\0\0\0a", seqno=11, flags=0x04), "unknown flags 0x4"),
        (raw_frame(FrameType.SEGMENT, b"\x01\0\0\0a", seqno=-1), "wrong seqno: -1, expected: 11"),
    ],
)
def test_malformed_segment_header(frame: bytes, match: str) -> None:
    joiner, _ = pair(HANDSHAKE_SEG)
    joiner.receive_data(frame[:24])
    with pytest.raises(RemoteProtocolError, match=match):
        joiner.next_event()


def test_segment_codec_matches_schema() -> None:
    payload = _segment_payload(2, b"\x01x\x01y")
    parsed = SegmentSchema.parse(payload)
    assert (parsed.count, parsed.blob) == (2, b"\x01x\x01y")
    assert SegmentSchema.build(dict(count=2, blob=b"\x01x\x01y")) == payload
    count, blob = encode_segment(SEGMENT)
    assert count + bytes(blob) == payload
    assert decode_segment(12, payload) == SEGMENT


def test_handshake_request_flags() -> None:
    for request in range(8):
        follow, segments, subscribe = bool(request & 1), bool(request & 2), bool(request & 4)
        donor = Connection(Role.DONOR)
        [hs] = feed(donor, raw_frame(FrameType.HANDSHAKE, handshake_payload(request=request)))
        assert isinstance(hs, Handshake) and (hs.follow, hs.segments, hs.subscribe) == (follow, segments, subscribe)
        # SUBSCRIBE implies follow for the stream, whatever the FOLLOW bit says
        assert (donor.follow, donor.segments, donor.subscribe) == (follow or subscribe, segments, subscribe)
    for request in (8, 9, 15, 0x80):
        expect_remote(
            Connection(Role.DONOR),
            raw_frame(FrameType.HANDSHAKE, handshake_payload(request=request)),
            f"unknown request flags: {request:#x}",
        )


# --- cluster mode: new frames fed byte by byte and with trailing bytes ---------------------------

CLUSTER_GOLDEN = [
    "handshake_subscribe",
    "handshake_subscribe_follow",
    "ctrl_fc_stop",
    "ctrl_fc_cont",
    "status_request",
    "status_request_empty",
    "status",
]


@pytest.mark.parametrize("name", CLUSTER_GOLDEN)
def test_cluster_frames_byte_by_byte_and_with_trailing_bytes(name: str) -> None:
    [(event, make)] = [(e, m) for n, e, m in _golden_cases() if n == name]
    for mode in ("byte", "trailing"):
        joiner, donor = make()
        sender, receiver = (donor, joiner) if name == "status" else (joiner, donor)
        data = sender.send(event)
        assert data == golden(name)
        more = sender.send(Keepalive())  # allowed after each of these, from the same sender
        if mode == "byte":  # NEED_DATA on every byte but the last
            for i in range(len(data) - 1):
                receiver.receive_data(data[i : i + 1])
                assert receiver.next_event() is NEED_DATA
            receiver.receive_data(data[-1:])
            assert receiver.next_event() == event
            assert receiver.next_event() is NEED_DATA
        else:  # the frame and the start of the next one in one chunk
            receiver.receive_data(data + more[:10])
            assert receiver.next_event() == event
            assert receiver.next_event() is NEED_DATA
        receiver.receive_data(more[10:] if mode == "trailing" else more)
        assert receiver.next_event() == Keepalive()
        assert receiver.state is sender.state


# --- cluster mode: SUBSCRIBE ---------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [None, 1, 5, 24, 1000])
def test_subscribe_grant_at_donor_last_then_records_continue(chunk: int | None) -> None:
    """The writer grants the empty range donor_last+1..donor_last, then streams new write-sets."""
    joiner, donor = pair(HANDSHAKE_SUB, SUB_GRANT)
    for conn in (joiner, donor):
        assert conn.subscribe and conn.follow  # SUBSCRIBE implies follow
        assert not conn.handshake.follow  # type: ignore[union-attr]
        assert conn.state is State.STREAMING and conn.last_seqno == 25
    events: list[Event] = [
        WriteSet(26, RecordType.TRX, b"a"),  # granted.first, past granted.last = 25
        Keepalive(),
        WriteSetBatch.from_payloads(27, b"\x04\x05\x06", [b"b", b"c", b""]),
        WriteSet(30, RecordType.CCHANGE, b"d"),
    ]
    assert feed(joiner, b"".join(donor.send(e) for e in events), chunk) == events
    assert joiner.last_seqno == donor.last_seqno == 30
    assert feed(donor, joiner.send(Ctrl(C_FC_STOP)) + joiner.send(Ctrl(C_FC_CONT)), chunk) == [
        Ctrl(C_FC_STOP),
        Ctrl(C_FC_CONT),
    ]
    assert feed(joiner, donor.send(WriteSet(31, RecordType.TRX, b"e")) + donor.send(Ctrl(C_EOF)), chunk) == [
        WriteSet(31, RecordType.TRX, b"e"),
        Ctrl(C_EOF),
    ]
    assert joiner.state is donor.state is State.DONE


def test_subscribe_stream_validation_is_unchanged() -> None:
    # the first record must be granted.first
    joiner, donor = pair(HANDSHAKE_SUB, SUB_GRANT)
    with pytest.raises(LocalProtocolError, match="IST started with wrong seqno: 27, expected: 26"):
        donor.send(WriteSet(27, RecordType.TRX, b"x"))
    expect_remote(
        joiner, raw_frame(FrameType.TRX, b"x", seqno=25), "IST started with wrong seqno: 25, expected: 26"
    )
    # then consecutive
    joiner, donor = pair(HANDSHAKE_SUB, SUB_GRANT)
    feed(joiner, donor.send(WriteSet(26, RecordType.TRX, b"x")))
    with pytest.raises(LocalProtocolError, match="Unexpected action seqno: 28 expected: 27"):
        donor.send(WriteSet(28, RecordType.TRX, b"x"))
    expect_remote(joiner, raw_frame(FrameType.SKIP, seqno=28), "Unexpected action seqno: 28 expected: 27")
    # EOF at once is fine: the granted range is empty
    joiner, donor = pair(HANDSHAKE_SUB, SUB_GRANT)
    assert feed(joiner, donor.send(Ctrl(C_EOF))) == [Ctrl(C_EOF)]
    # SEGMENT frames still need the SEGMENTS flag
    joiner, donor = pair(HANDSHAKE_SUB, SUB_GRANT)
    with pytest.raises(LocalProtocolError, match="not negotiated"):
        donor.send(Segment(26, 1, b"a"))
    joiner, donor = pair(_replace(HANDSHAKE_SUB, segments=True), SUB_GRANT)
    assert feed(joiner, donor.send(Segment(26, 2, b"ab"))) == [Segment(26, 2, b"ab")]


@pytest.mark.parametrize("first", [1, 2, 11, 26, 2**62])
def test_subscribe_grant_may_start_anywhere_from_1(first: int) -> None:
    """The joiner's own `first` (11) is irrelevant to a subscription."""
    grant = _replace(SUB_GRANT, first=first, last=first - 1, donor_last=first - 1)
    hs = _replace(HANDSHAKE_SUB, last=-1)
    joiner, donor = pair(hs, grant)
    assert joiner.granted == grant and joiner.last_seqno == donor.last_seqno == first - 1
    # received from raw bytes too
    j2 = Connection(Role.JOINER)
    j2.send(hs)
    raw = response_payload(first=first, last=first - 1, donor_last=first - 1)
    assert feed(j2, raw_frame(FrameType.HANDSHAKE_RESPONSE, raw)) == [
        _replace(grant, message="", cached_downto=5, safe_ist_seqno=6)
    ]


@pytest.mark.parametrize(
    ("handshake", "changes", "match"),
    [
        (HANDSHAKE_SUB, {"first": 0, "last": -1}, "subscription from seqno 0, seqnos start at 1"),
        (HANDSHAKE_SUB, {"first": -1, "last": -1}, "subscription from seqno -1"),
        (HANDSHAKE_SUB, {"donor_uuid": U2}, "history"),  # the other checks still hold
        (_replace(HANDSHAKE_SUB, last=20), {"first": 19, "last": 21}, "up to seqno 21, joiner asked up to 20"),
        (HANDSHAKE, {"first": 26, "last": 25}, "from seqno 26, joiner asked from 11"),  # not subscribing
    ],
)
def test_subscribe_grant_checks(handshake: Handshake, changes: dict[str, object], match: str) -> None:
    raw = {"donor_uuid": U2.bytes, "first": 26, "last": 25} if "donor_uuid" in changes else changes
    both_sides_refuse_the_grant(handshake, _replace(SUB_GRANT, **changes), raw, match)


def test_subscribe_needs_ist_accepted_and_a_common_version() -> None:
    donor_may_not_send(_replace(HANDSHAKE_SUB, accept=Accept.SST), SUB_GRANT, "does not accept IST")
    donor_may_not_send(_replace(HANDSHAKE_SUB, versions=(2, 3)), SUB_GRANT, r"not in the joiner.s range")


# --- cluster mode: flow control ------------------------------------------------------------------

FC = [Ctrl(C_FC_STOP), Ctrl(C_FC_CONT)]


def test_flow_control_in_the_transition_table() -> None:
    for kind in (Kind.CTRL_FC_STOP, Kind.CTRL_FC_CONT):
        assert {(s, r) for s, r, k in TRANSITIONS if k is kind} == {
            (State.STREAMING, Role.JOINER),
            (State.DONE, Role.JOINER),
        }
        assert TRANSITIONS[(State.STREAMING, Role.JOINER, kind)] is State.STREAMING
        assert TRANSITIONS[(State.DONE, Role.JOINER, kind)] is State.DONE


@pytest.mark.parametrize("handshake", [HANDSHAKE, HANDSHAKE_SUB], ids=["follow", "subscribe"])
def test_flow_control_from_the_joiner_of_a_follow_stream(handshake: Handshake) -> None:
    response = GRANTED if handshake is HANDSHAKE else SUB_GRANT
    joiner, donor = pair(handshake, response)
    first = response.first
    feed(joiner, donor.send(WriteSet(first, RecordType.TRX, b"a")))
    for event in (*FC, *FC, Ctrl(C_FC_STOP)):  # repeated, in any order: pacing is the layer above's
        assert feed(donor, joiner.send(event)) == [event]
        assert joiner.state is donor.state is State.STREAMING
        assert joiner.last_seqno == donor.last_seqno == first
    # the donor's stream goes on (the protocol does not enforce the pause)
    assert feed(joiner, donor.send(WriteSet(first + 1, RecordType.TRX, b"b"))) == [
        WriteSet(first + 1, RecordType.TRX, b"b")
    ]
    assert feed(donor, joiner.send(Keepalive()) + joiner.send(Ctrl(C_FC_CONT))) == [Keepalive(), Ctrl(C_FC_CONT)]


def test_flow_control_may_cross_the_eof() -> None:
    joiner, donor = pair(response=_replace(GRANTED, last=10))  # following, nothing to catch up
    eof = donor.send(Ctrl(C_EOF))  # DONE at the donor
    stop = joiner.send(Ctrl(C_FC_STOP))  # sent before the EOF arrived
    assert feed(donor, stop) == [Ctrl(C_FC_STOP)]
    assert donor.state is State.DONE
    assert feed(joiner, eof) == [Ctrl(C_EOF)]
    assert feed(donor, joiner.send(Ctrl(C_FC_CONT))) == [Ctrl(C_FC_CONT)]


def test_flow_control_from_the_donor_is_an_error() -> None:
    for handshake, response in ((HANDSHAKE, GRANTED), (HANDSHAKE_SUB, SUB_GRANT)):
        joiner, donor = pair(handshake, response)
        for code, name in ((C_FC_STOP, "FC_STOP"), (C_FC_CONT, "FC_CONT")):
            with pytest.raises(LocalProtocolError, match=f"DONOR may not send CTRL\\({name}\\) in state STREAMING"):
                donor.send(Ctrl(code))
        expect_remote(
            joiner, raw_frame(FrameType.CTRL, ctrl=C_FC_STOP), "DONOR may not send CTRL\\(FC_STOP\\) in state STREAMING"
        )
    joiner, donor = pair(response=_replace(GRANTED, last=10))
    feed(joiner, donor.send(Ctrl(C_EOF)))
    with pytest.raises(LocalProtocolError, match="DONOR may not send CTRL\\(FC_CONT\\) in state DONE"):
        donor.send(Ctrl(C_FC_CONT))
    expect_remote(
        joiner, raw_frame(FrameType.CTRL, ctrl=C_FC_CONT), "DONOR may not send CTRL\\(FC_CONT\\) in state DONE"
    )


@pytest.mark.parametrize("code", [C_FC_STOP, C_FC_CONT])
def test_flow_control_outside_a_follow_stream_is_an_error(code: int) -> None:
    not_following = _replace(HANDSHAKE, follow=False)
    match = "only for follow and subscribe streams"
    joiner, donor = pair(not_following)
    with pytest.raises(LocalProtocolError, match=match):
        joiner.send(Ctrl(code))
    expect_remote(donor, raw_frame(FrameType.CTRL, ctrl=code), match)
    # nor after its EOF
    joiner, donor = pair(not_following, _replace(GRANTED, last=10))
    feed(joiner, donor.send(Ctrl(C_EOF)))
    with pytest.raises(LocalProtocolError, match=match):
        joiner.send(Ctrl(code))
    expect_remote(donor, raw_frame(FrameType.CTRL, ctrl=code), match)
    # nor in an SST grant's stream
    sst = _replace(GRANTED, granted=TransferKind.SST, donor_uuid=U2, first=101, last=105)
    joiner, donor = pair(not_following, sst)
    with pytest.raises(LocalProtocolError, match=match):
        joiner.send(Ctrl(code))
    # nor before the stream: wrong state, whatever the flags
    name = "FC_STOP" if code == C_FC_STOP else "FC_CONT"
    j, d = pair(ok=False)  # state OK
    with pytest.raises(LocalProtocolError, match=f"JOINER may not send CTRL\\({name}\\) in state OK"):
        j.send(Ctrl(code))
    expect_remote(d, raw_frame(FrameType.CTRL, ctrl=code), f"JOINER may not send CTRL\\({name}\\) in state OK")
    with pytest.raises(LocalProtocolError, match="in state HANDSHAKE"):
        Connection(Role.JOINER).send(Ctrl(code))
    expect_remote(Connection(Role.DONOR), raw_frame(FrameType.CTRL, ctrl=code), "in state HANDSHAKE")
    j, d = Connection(Role.JOINER), Connection(Role.DONOR)
    feed(d, j.send(HANDSHAKE))
    with pytest.raises(LocalProtocolError, match="in state RESPONSE"):
        j.send(Ctrl(code))
    expect_remote(d, raw_frame(FrameType.CTRL, ctrl=code), "in state RESPONSE")
    j, d = pair(response=REFUSED)
    with pytest.raises(LocalProtocolError, match="in state REFUSED"):
        j.send(Ctrl(code))
    # and never in a status conversation
    j, d = Connection(Role.JOINER), Connection(Role.DONOR)
    feed(d, j.send(STATUS_REQUEST))
    with pytest.raises(LocalProtocolError, match="in state STATUS"):
        j.send(Ctrl(code))
    feed(j, d.send(STATUS))
    with pytest.raises(LocalProtocolError, match=match):  # DONE allows it in the table, not here
        j.send(Ctrl(code))
    expect_remote(d, raw_frame(FrameType.CTRL, ctrl=code), match)


# --- cluster mode: STATUS ------------------------------------------------------------------------

STATUS_CONVERSATION: list[tuple[Role, Event]] = [
    (Role.JOINER, STATUS_REQUEST),
    (Role.DONOR, Keepalive()),
    (Role.JOINER, Keepalive()),
    (Role.DONOR, STATUS),
    (Role.JOINER, Keepalive()),  # may cross the STATUS
]


def test_status_in_the_transition_table() -> None:
    assert TRANSITIONS[(State.HANDSHAKE, Role.JOINER, Kind.STATUS_REQUEST)] is State.STATUS
    assert TRANSITIONS[(State.STATUS, Role.DONOR, Kind.STATUS)] is State.DONE
    assert {k[:2] for k in TRANSITIONS if k[2] is Kind.STATUS_REQUEST} == {(State.HANDSHAKE, Role.JOINER)}
    assert {k[:2] for k in TRANSITIONS if k[2] is Kind.STATUS} == {(State.STATUS, Role.DONOR)}
    assert {k[0] for k in TRANSITIONS if k[1:] == (Role.DONOR, Kind.KEEPALIVE)} == set(State) - {
        State.HANDSHAKE,
        State.FAILED,
    }


@pytest.mark.parametrize("chunk", [None, 1, 2, 7, 23, 24, 25])
def test_status_conversation(chunk: int | None) -> None:
    conns = {Role.JOINER: Connection(Role.JOINER), Role.DONOR: Connection(Role.DONOR)}
    for sender, event in STATUS_CONVERSATION:
        receiver = conns[Role.DONOR if sender is Role.JOINER else Role.JOINER]
        assert feed(receiver, conns[sender].send(event), chunk) == [event]
        assert receiver.state is conns[sender].state
    for conn in conns.values():
        assert conn.state is State.DONE
        assert conn.status_request == STATUS_REQUEST and conn.status == STATUS
        assert conn.handshake is None and conn.granted is None and conn.version is None
        assert not conn.follow and not conn.subscribe
        conn.receive_data(b"")
        assert conn.next_event() == ConnectionClosed()


def test_status_payloads_are_opaque_and_bounded_exactly() -> None:
    for payload in (b"", b"\x00\xff" * 7, bytes(MAX_STATUS_BYTES)):
        joiner, donor = Connection(Role.JOINER), Connection(Role.DONOR)
        [request] = feed(donor, joiner.send(StatusRequest(payload)))
        assert request == StatusRequest(payload) and isinstance(request, StatusRequest)
        assert isinstance(request.payload, bytes)
        [answer] = feed(joiner, donor.send(Status(memoryview(bytearray(payload)))))  # type: ignore[arg-type]
        assert answer == Status(payload)
    assert StatusSchema.build(dict(payload=b"{}")) == b"{}"
    assert StatusSchema.parse(b"{}").payload == b"{}"


def test_oversize_status_rejected_from_the_header_alone() -> None:
    too_big = MAX_STATUS_BYTES + 1
    donor = Connection(Role.DONOR)
    donor.receive_data(raw_frame(FrameType.STATUS_REQUEST, length=too_big))  # the header only
    with pytest.raises(
        RemoteProtocolError, match=f"STATUS_REQUEST frame of {too_big} bytes exceeds the limit of {MAX_STATUS_BYTES}"
    ) as info:
        donor.next_event()
    assert info.value.error_code == -EMSGSIZE
    joiner = Connection(Role.JOINER)
    joiner.send(STATUS_REQUEST)
    joiner.receive_data(raw_frame(FrameType.STATUS, length=2**32 - 1))
    with pytest.raises(RemoteProtocolError, match="STATUS frame of 4294967295 bytes exceeds") as info:
        joiner.next_event()
    assert info.value.error_code == -EMSGSIZE
    # a smaller frame limit applies too
    small = Connection(Role.DONOR, max_frame_bytes=100)
    small.receive_data(raw_frame(FrameType.STATUS_REQUEST, length=101))
    with pytest.raises(RemoteProtocolError, match="exceeds the limit of 100 bytes"):
        small.next_event()
    # and on send
    with pytest.raises(LocalProtocolError, match=f"payload of {too_big} bytes exceeds the limit"):
        Connection(Role.JOINER).send(StatusRequest(bytes(too_big)))
    j, d = Connection(Role.JOINER), Connection(Role.DONOR)
    feed(d, j.send(StatusRequest(b"")))
    with pytest.raises(LocalProtocolError, match=f"payload of {too_big} bytes exceeds the limit"):
        d.send(Status(bytes(too_big)))
    assert d.state is State.STATUS  # nothing changed
    with pytest.raises(LocalProtocolError, match="STATUS payload must be bytes-like"):
        d.send(Status("{}"))  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="STATUS payload must be contiguous"):
        d.send(Status(memoryview(b"{}}}")[::2]))  # type: ignore[arg-type]
    assert d.state is State.STATUS


def _in_state(state: str) -> tuple[Connection, Connection]:
    """A joiner and a donor in a state of either conversation."""
    joiner, donor = Connection(Role.JOINER), Connection(Role.DONOR)
    if state == "HANDSHAKE":
        return joiner, donor
    if state == "STATUS":
        feed(donor, joiner.send(STATUS_REQUEST))
        return joiner, donor
    if state == "DONE(status)":
        feed(donor, joiner.send(STATUS_REQUEST))
        feed(joiner, donor.send(STATUS))
        return joiner, donor
    if state == "RESPONSE":
        feed(donor, joiner.send(HANDSHAKE))
        return joiner, donor
    if state == "OK":
        return pair(ok=False)
    if state == "STREAMING":
        return pair()
    if state == "DONE":
        joiner, donor = pair(response=_replace(GRANTED, last=10))
        feed(joiner, donor.send(Ctrl(C_EOF)))
        return joiner, donor
    assert state == "REFUSED"
    return pair(response=REFUSED)


@pytest.mark.parametrize(
    ("state", "sender", "event", "match"),
    [
        # a second STATUS_REQUEST, or one after a HANDSHAKE, anywhere past the start
        *[
            (s, Role.JOINER, STATUS_REQUEST, f"JOINER may not send STATUS_REQUEST in state {s.split('(')[0]}")
            for s in ("STATUS", "DONE(status)", "RESPONSE", "OK", "STREAMING", "DONE", "REFUSED")
        ],
        # a STATUS_REQUEST from the server
        ("HANDSHAKE", Role.DONOR, STATUS_REQUEST, "DONOR may not send STATUS_REQUEST in state HANDSHAKE"),
        ("STATUS", Role.DONOR, STATUS_REQUEST, "DONOR may not send STATUS_REQUEST in state STATUS"),
        # a STATUS from the client
        ("HANDSHAKE", Role.JOINER, STATUS, "JOINER may not send STATUS in state HANDSHAKE"),
        ("STATUS", Role.JOINER, STATUS, "JOINER may not send STATUS in state STATUS"),
        # a STATUS nobody asked for, or a second one
        ("HANDSHAKE", Role.DONOR, STATUS, "DONOR may not send STATUS in state HANDSHAKE"),
        ("RESPONSE", Role.DONOR, STATUS, "DONOR may not send STATUS in state RESPONSE"),
        ("STREAMING", Role.DONOR, STATUS, "DONOR may not send STATUS in state STREAMING"),
        ("DONE(status)", Role.DONOR, STATUS, "DONOR may not send STATUS in state DONE"),
        # the IST conversation's messages inside a status conversation
        ("STATUS", Role.JOINER, HANDSHAKE, "JOINER may not send HANDSHAKE in state STATUS"),
        ("DONE(status)", Role.JOINER, HANDSHAKE, "JOINER may not send HANDSHAKE in state DONE"),
        ("STATUS", Role.DONOR, GRANTED, "DONOR may not send HANDSHAKE_RESPONSE"),
        ("STATUS", Role.DONOR, REFUSED, "DONOR may not send HANDSHAKE_RESPONSE"),
        ("STATUS", Role.JOINER, Ctrl(C_OK), "JOINER may not send CTRL\\(OK\\) in state STATUS"),
        ("STATUS", Role.DONOR, Ctrl(C_EOF), "DONOR may not send CTRL\\(EOF\\) in state STATUS"),
        ("DONE(status)", Role.DONOR, Ctrl(C_EOF), "DONOR may not send CTRL\\(EOF\\) in state DONE"),
        ("STATUS", Role.DONOR, TRX, "DONOR may not send (write-set|TRX) in state STATUS"),
        ("HANDSHAKE", Role.JOINER, Keepalive(), "JOINER may not send KEEPALIVE in state HANDSHAKE"),
    ],
    ids=lambda v: str(v)[:30],
)
def test_status_misuse(state: str, sender: Role, event: Event, match: str) -> None:
    """Rejected by send() and, from the frame header alone, by the receiver."""
    joiner, donor = _in_state(state)
    me, peer = (joiner, donor) if sender is Role.JOINER else (donor, joiner)
    before = me.state
    with pytest.raises(LocalProtocolError, match=match):
        me.send(event)
    assert me.state is before
    # the same frame, as the peer would receive it (built by a connection that allows it)
    if isinstance(event, StatusRequest | Status):
        ftype = FrameType.STATUS_REQUEST if isinstance(event, StatusRequest) else FrameType.STATUS
        frame = raw_frame(ftype, event.payload)
    elif isinstance(event, Handshake):
        frame = Connection(Role.JOINER).send(event)
    elif isinstance(event, HandshakeResponse):
        frame = raw_frame(FrameType.HANDSHAKE_RESPONSE, response_payload())
    elif isinstance(event, Ctrl):
        frame = raw_frame(FrameType.CTRL, ctrl=event.code)
    elif isinstance(event, WriteSet):
        frame = raw_frame(FrameType.TRX, event.payload, seqno=event.seqno)  # type: ignore[arg-type]
    else:
        frame = raw_frame(FrameType.KEEPALIVE)
    peer.receive_data(frame[:24])
    with pytest.raises(RemoteProtocolError, match=match) as info:
        peer.next_event()
    assert info.value.error_code == -EPROTO


def test_two_status_requests_in_one_chunk() -> None:
    joiner, donor = Connection(Role.JOINER), Connection(Role.DONOR)
    first = joiner.send(STATUS_REQUEST)
    donor.receive_data(first + first)
    assert donor.next_event() == STATUS_REQUEST
    with pytest.raises(RemoteProtocolError, match="JOINER may not send STATUS_REQUEST in state STATUS"):
        donor.next_event()


def test_status_refused_or_abandoned() -> None:
    # the server may answer with an error instead
    joiner, donor = _in_state("STATUS")
    assert feed(joiner, donor.send(Ctrl(-EPROTO))) == [Ctrl(-EPROTO)]
    assert joiner.state is donor.state is State.FAILED and joiner.status is None
    # a close before the STATUS is visible in the state
    joiner, donor = _in_state("STATUS")
    joiner.receive_data(b"")
    assert joiner.next_event() == ConnectionClosed()
    assert joiner.state is State.STATUS
    # and one in the middle of it is an error
    joiner, donor = _in_state("STATUS")
    joiner.receive_data(donor.send(STATUS)[:-1])
    joiner.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        joiner.next_event()


@pytest.mark.parametrize(
    ("frame", "match", "code"),
    [
        (raw_frame(FrameType.STATUS_REQUEST, b"{}", version=2), "invalid protocol version 2, expected 1", -EPROTO),
        (raw_frame(FrameType.STATUS_REQUEST, b"{}", seqno=0), "STATUS_REQUEST frame has seqno 0", -EPROTO),
        (raw_frame(FrameType.STATUS_REQUEST, b"{}", ctrl=1), "STATUS_REQUEST frame has ctrl 1", -EPROTO),
        (raw_frame(FrameType.STATUS_REQUEST, b"{}", flags=0x02), "unknown flags 0x2", -EPROTO),
        (raw_frame(FrameType.STATUS_REQUEST, b"{}", payload_crc=1), "payload checksum mismatch", -EINVAL),
    ],
)
def test_malformed_status_frames(frame: bytes, match: str, code: int) -> None:
    expect_remote(Connection(Role.DONOR), frame, match, code)
