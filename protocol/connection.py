"""A sans-IO IST connection: bytes in, events out; events in, bytes out. No sockets, no trio.

Theory of operation
-------------------

Both ends hold a ``Connection``; the joiner connects to the donor (port 4568)::

    Joiner (client)                          Donor (server)
    connect()  ----------------------------> accept()
    HANDSHAKE  ---------------------------->         uuid, last applied, range, IST/SST, versions
               <---------------------------- HANDSHAKE_RESPONSE  granted IST/SST, or refused + reason
    CTRL(OK)   ---------------------------->         (only if granted)
               <---------------------------- TRX / CCHANGE / SKIP / BATCH (/ SEGMENT), seqnos first..last
               <---------------------------- CTRL(EOF)     (follow mode: seqnos go on past last)
    close()
    KEEPALIVE may flow either way at any time after the HANDSHAKE.
    A negative CTRL (-errno) from either side aborts.
    SEGMENT frames only if the joiner's HANDSHAKE asked for them (``Handshake.segments``).

Cluster mode (the writer's group port 4567) uses the same frames and table::

    SUBSCRIBE (a HANDSHAKE request flag): "start at your position and follow". The grant may start
        anywhere >= 1 (first = donor_last + 1, last = donor_last: empty), then new write-sets flow.
    CTRL(FC_STOP) / CTRL(FC_CONT): joiner -> donor during a follow or subscribe stream (flow control).
    STATUS_REQUEST ---------------------------->  (instead of HANDSHAKE; payload opaque, e.g. JSON)
                   <----------------------------  STATUS     then DONE: both sides close

State snapshot transfer (the donor's SST port, 4444) uses the same frames and table::

    SST_REQUEST    ---------------------------->  (instead of HANDSHAKE: name, auth)
                   <----------------------------  SST_BEGIN  uuid:seqno of the snapshot, total bytes, format
                   <----------------------------  SST_CHUNK  ... (raw bytes, total_bytes in all)
                   <----------------------------  SST_END    sha256 of all the bytes; then DONE
                   (or SST_REFUSED with a message instead of SST_BEGIN)

The conversation has ONE state, seen identically by both ends, because the messages strictly
alternate until the stream starts. ``TRANSITIONS`` is the whole state machine, keyed by
(state, sender role, event kind)::

    HANDSHAKE  --joiner HANDSHAKE-->           RESPONSE
    RESPONSE   --donor HANDSHAKE_RESPONSE-->   OK         (granted IST or SST)
    RESPONSE   --donor HANDSHAKE_RESPONSE-->   REFUSED    (refused)
    OK         --joiner CTRL(OK)-->            STREAMING
    STREAMING  --donor TRX/CCHANGE/SKIP/BATCH--> STREAMING
    STREAMING  --donor SEGMENT-->              STREAMING  (if negotiated)
    STREAMING  --donor CTRL(EOF)-->            DONE
    STREAMING  --joiner CTRL(FC_STOP/FC_CONT)--> STREAMING  (follow/subscribe streams only)
    DONE       --joiner CTRL(FC_STOP/FC_CONT)--> DONE       (may cross the EOF; same condition)
    HANDSHAKE  --joiner STATUS_REQUEST-->      STATUS
    STATUS     --donor STATUS-->               DONE
    HANDSHAKE  --joiner SST_REQUEST-->         SST_WAIT
    SST_WAIT   --donor SST_BEGIN-->            SST_STREAMING
    SST_WAIT   --donor SST_REFUSED-->          REFUSED
    SST_STREAMING --donor SST_CHUNK-->         SST_STREAMING  (total_bytes in all, not more)
    SST_STREAMING --donor SST_END-->           DONE           (only after exactly total_bytes)
    any state  --either CTRL(-errno)-->        FAILED
    RESPONSE, OK, STREAMING, DONE, REFUSED, STATUS, SST_WAIT, SST_STREAMING --either KEEPALIVE--> unchanged

``send()`` checks the table for our role and raises LocalProtocolError; ``next_event()`` checks it
for the peer's role and raises RemoteProtocolError. Checks that need more than the table
(consecutive seqnos, the granted range, the EOF position, a grant consistent with the request)
run in ``_check()`` for both directions with the exception class of that direction. Two of them
are negotiation: a SEGMENT is allowed only if the joiner's HANDSHAKE set ``segments`` (checked from
the header, with the table, before the payload is buffered), and CTRL(FC_STOP/FC_CONT) only if it
set ``follow`` or ``subscribe``.

Framing: wait for the 24-byte header, check its CRC, version, type and length (against the frame
limit, and against the state table and the next expected seqno) BEFORE buffering the payload; then
wait for the payload, check its CRC and parse it. Once we have sent a negative CTRL, frames the peer
had already sent are checked for framing and dropped.
"""

from __future__ import annotations

import enum
import zlib
from typing import Literal

from istd.errors import EINVAL, LocalProtocolError, ProtocolError, RemoteProtocolError
from protocol._buffer import ReceiveBuffer
from protocol.events import (
    C_EOF,
    C_FC_CONT,
    C_FC_STOP,
    C_OK,
    Accept,
    ConnectionClosed,
    Ctrl,
    Event,
    Handshake,
    HandshakeResponse,
    Keepalive,
    RecordType,
    Segment,
    SstBegin,
    SstChunk,
    SstEnd,
    SstRefused,
    SstRequest,
    Status,
    StatusRequest,
    TransferKind,
    WriteSet,
    WriteSetBatch,
)
from protocol.wire import (
    EMSGSIZE,
    F_PRELOAD,
    HANDSHAKE_VERSION,
    HEADER_BYTES,
    I64_MAX,
    MAX_FRAME_BYTES,
    MAX_HANDSHAKE_BYTES,
    MAX_STATUS_BYTES,
    SEQNO_NONE,
    SHA256_BYTES,
    SUPPORTED_VERSIONS,
    U32_MAX,
    FrameHeader,
    FrameType,
    decode_batch,
    decode_handshake,
    decode_response,
    decode_segment,
    decode_sst,
    encode_batch,
    encode_handshake,
    encode_response,
    encode_segment,
    encode_sst,
    pack_header,
    unpack_header,
)

__all__ = [
    "NEED_DATA",
    "TRANSITIONS",
    "Connection",
    "Kind",
    "Role",
    "State",
    "negotiate_version",
]


class Role(enum.Enum):
    JOINER = "JOINER"
    DONOR = "DONOR"


class State(enum.Enum):
    HANDSHAKE = "HANDSHAKE"  # waiting for the joiner's HANDSHAKE (or STATUS_REQUEST)
    RESPONSE = "RESPONSE"  # waiting for the donor's HANDSHAKE_RESPONSE
    OK = "OK"  # granted; waiting for the joiner's CTRL(OK)
    STREAMING = "STREAMING"  # the donor sends write-sets, then CTRL(EOF)
    DONE = "DONE"  # EOF (or STATUS) sent/received: the conversation is complete
    REFUSED = "REFUSED"  # the donor refused
    FAILED = "FAILED"  # a negative CTRL went one way or the other
    STATUS = "STATUS"  # STATUS_REQUEST seen; waiting for the donor's STATUS
    SST_WAIT = "SST_WAIT"  # SST_REQUEST seen; waiting for SST_BEGIN or SST_REFUSED
    SST_STREAMING = "SST_STREAMING"  # the donor sends SST_CHUNKs, then SST_END


class Kind(enum.Enum):
    """What an event means to the state machine (a HandshakeResponse or a Ctrl can mean several things)."""

    HANDSHAKE = "HANDSHAKE"
    GRANTED = "HANDSHAKE_RESPONSE(granted)"
    REFUSED = "HANDSHAKE_RESPONSE(refused)"
    CTRL_OK = "CTRL(OK)"
    CTRL_EOF = "CTRL(EOF)"
    CTRL_ERROR = "CTRL(error)"
    WRITE_SETS = "write-set"
    SEGMENT = "SEGMENT"
    KEEPALIVE = "KEEPALIVE"
    CTRL_FC_STOP = "CTRL(FC_STOP)"
    CTRL_FC_CONT = "CTRL(FC_CONT)"
    STATUS_REQUEST = "STATUS_REQUEST"
    STATUS = "STATUS"
    SST_REQUEST = "SST_REQUEST"
    SST_BEGIN = "SST_BEGIN"
    SST_CHUNK = "SST_CHUNK"
    SST_END = "SST_END"
    SST_REFUSED = "SST_REFUSED"


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return self.value


# next_event() returns this when it needs more bytes: compare with ``is``.
NEED_DATA: Literal[_Sentinel.NEED_DATA] = _Sentinel.NEED_DATA

_J, _D = Role.JOINER, Role.DONOR

TRANSITIONS: dict[tuple[State, Role, Kind], State] = {
    (State.HANDSHAKE, _J, Kind.HANDSHAKE): State.RESPONSE,
    (State.RESPONSE, _D, Kind.GRANTED): State.OK,
    (State.RESPONSE, _D, Kind.REFUSED): State.REFUSED,
    (State.OK, _J, Kind.CTRL_OK): State.STREAMING,
    (State.STREAMING, _D, Kind.WRITE_SETS): State.STREAMING,
    (State.STREAMING, _D, Kind.SEGMENT): State.STREAMING,  # only if negotiated: _check_segments()
    (State.STREAMING, _D, Kind.CTRL_EOF): State.DONE,
    # Flow control: from the joiner of a follow/subscribe stream only (_check_flow_control()), in DONE
    # too because one may cross the EOF. The state does not change: pausing is the layer above's.
    **{
        (state, _J, kind): state
        for state in (State.STREAMING, State.DONE)
        for kind in (Kind.CTRL_FC_STOP, Kind.CTRL_FC_CONT)
    },
    # Status exchange (cluster mode): one request instead of the HANDSHAKE, one answer, done.
    (State.HANDSHAKE, _J, Kind.STATUS_REQUEST): State.STATUS,
    (State.STATUS, _D, Kind.STATUS): State.DONE,
    # SST (the donor's SST port): one request, then a snapshot (begin, chunks, end) or a refusal.
    (State.HANDSHAKE, _J, Kind.SST_REQUEST): State.SST_WAIT,
    (State.SST_WAIT, _D, Kind.SST_BEGIN): State.SST_STREAMING,
    (State.SST_WAIT, _D, Kind.SST_REFUSED): State.REFUSED,
    (State.SST_STREAMING, _D, Kind.SST_CHUNK): State.SST_STREAMING,  # at most total_bytes in all
    (State.SST_STREAMING, _D, Kind.SST_END): State.DONE,  # only after exactly total_bytes
    # Keepalives: after the first message, either way, even in DONE/REFUSED (one may cross the EOF).
    **{
        (state, role, Kind.KEEPALIVE): state
        for state in (State.RESPONSE, State.OK, State.STREAMING, State.DONE, State.REFUSED, State.STATUS,
                      State.SST_WAIT, State.SST_STREAMING)
        for role in Role
    },
    # Errors: from anywhere, either way (two errors may cross; an error may cross the EOF).
    **{(state, role, Kind.CTRL_ERROR): State.FAILED for state in State for role in Role},
}

_KIND_OF_FRAME = {
    FrameType.HANDSHAKE: Kind.HANDSHAKE,
    FrameType.TRX: Kind.WRITE_SETS,
    FrameType.CCHANGE: Kind.WRITE_SETS,
    FrameType.SKIP: Kind.WRITE_SETS,
    FrameType.BATCH: Kind.WRITE_SETS,
    FrameType.SEGMENT: Kind.SEGMENT,
    FrameType.KEEPALIVE: Kind.KEEPALIVE,
    FrameType.STATUS_REQUEST: Kind.STATUS_REQUEST,
    FrameType.STATUS: Kind.STATUS,
    FrameType.SST_REQUEST: Kind.SST_REQUEST,
    FrameType.SST_BEGIN: Kind.SST_BEGIN,
    FrameType.SST_CHUNK: Kind.SST_CHUNK,
    FrameType.SST_END: Kind.SST_END,
    FrameType.SST_REFUSED: Kind.SST_REFUSED,
}
_SST_KINDS = {SstRequest: Kind.SST_REQUEST, SstBegin: Kind.SST_BEGIN, SstChunk: Kind.SST_CHUNK, SstEnd: Kind.SST_END,
              SstRefused: Kind.SST_REFUSED}
_SST_FRAMES = {kind: ftype for ftype, kind in _KIND_OF_FRAME.items() if kind in _SST_KINDS.values()}
_SST_FRAME_TYPES = frozenset(_SST_FRAMES.values()) - {FrameType.SST_CHUNK}
_CTRL_KINDS = {C_OK: Kind.CTRL_OK, C_EOF: Kind.CTRL_EOF, C_FC_STOP: Kind.CTRL_FC_STOP, C_FC_CONT: Kind.CTRL_FC_CONT}
_FC_KINDS = frozenset({Kind.CTRL_FC_STOP, Kind.CTRL_FC_CONT})
# Frames read before anything is negotiated: they always carry HANDSHAKE_VERSION and have a small
# size limit of their own, checked from the header (an unauthenticated peer cannot make us hold more).
_PRE_NEGOTIATION_LIMITS = {
    FrameType.HANDSHAKE: MAX_HANDSHAKE_BYTES,
    FrameType.HANDSHAKE_RESPONSE: MAX_HANDSHAKE_BYTES,
    FrameType.STATUS_REQUEST: MAX_STATUS_BYTES,
    FrameType.STATUS: MAX_STATUS_BYTES,
    FrameType.SST_REQUEST: MAX_HANDSHAKE_BYTES,
    FrameType.SST_BEGIN: MAX_HANDSHAKE_BYTES,
    FrameType.SST_END: MAX_HANDSHAKE_BYTES,
    FrameType.SST_REFUSED: MAX_HANDSHAKE_BYTES,
}
_EMPTY_FRAMES = frozenset({FrameType.CTRL, FrameType.KEEPALIVE, FrameType.SKIP})
_RECORD_FRAMES = frozenset(
    {FrameType.TRX, FrameType.CCHANGE, FrameType.SKIP, FrameType.BATCH, FrameType.SEGMENT}
)
_CTRL_MIN = -128  # the ctrl byte is an i8


def negotiate_version(theirs: tuple[int, int], ours: tuple[int, int]) -> int | None:
    """The highest version in both (min, max) ranges, or None if they do not overlap."""
    low, high = max(theirs[0], ours[0]), min(theirs[1], ours[1])
    return high if low <= high else None


def _ctrl_kind(code: int) -> Kind | None:
    if _CTRL_MIN <= code < 0:
        return Kind.CTRL_ERROR
    return _CTRL_KINDS.get(code)


class Connection:
    """One end of an IST conversation. See the module docstring for the sequence and the states."""

    def __init__(self, role: Role, *, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        if not 0 <= max_frame_bytes <= U32_MAX:
            raise LocalProtocolError(f"max_frame_bytes must be in 0..{U32_MAX}, not {max_frame_bytes}")
        self.role = role
        self.max_frame_bytes = max_frame_bytes
        self._state = State.HANDSHAKE
        self._buffer = ReceiveBuffer()
        self._header: FrameHeader | None = None  # parsed header whose payload is still awaited
        self._peer_closed = False
        self._error: RemoteProtocolError | None = None  # sticky: the peer is not to be trusted again
        self._discarding = False  # we sent a negative CTRL: drop what the peer had in flight
        self.handshake: Handshake | None = None
        self.granted: HandshakeResponse | None = None
        self.status_request: StatusRequest | None = None  # status conversations (cluster mode)
        self.status: Status | None = None
        self.sst_request: SstRequest | None = None  # SST conversations (the donor's SST port)
        self.sst_begin: SstBegin | None = None
        self.sst_bytes = 0  # snapshot bytes sent (donor) or received (joiner) so far
        self.version: int | None = None  # negotiated protocol version, once granted
        # Last write-set seqno sent (donor) or received (joiner); granted.first - 1 until the first.
        self.last_seqno: int | None = None

    # --- public state ----------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def peer_role(self) -> Role:
        return _D if self.role is _J else _J

    @property
    def follow(self) -> bool:
        """True if the stream goes on past ``granted.last``: the HANDSHAKE set FOLLOW or SUBSCRIBE."""
        hs = self.handshake
        return hs is not None and (hs.follow or hs.subscribe)

    @property
    def subscribe(self) -> bool:
        """True if the joiner's HANDSHAKE set SUBSCRIBE (start at the donor's position, then follow)."""
        return self.handshake is not None and self.handshake.subscribe

    @property
    def segments(self) -> bool:
        """True if the joiner's HANDSHAKE allows SEGMENT frames."""
        return self.handshake is not None and self.handshake.segments

    @property
    def peer_closed(self) -> bool:
        """True once ``receive_data(b"")`` was called."""
        return self._peer_closed

    def __repr__(self) -> str:
        return (
            f"<Connection {self.role.name} state={self._state.name} version={self.version} "
            f"last_seqno={self.last_seqno} buffered={len(self._buffer)}>"
        )

    # --- sending ---------------------------------------------------------------------------------

    def send(self, event: Event) -> bytes:
        """The bytes to write for ``event``. Raises LocalProtocolError if the event is not allowed now
        (wrong state, wrong role, non-consecutive seqno, early EOF, a field that does not fit)."""
        kind, new_state = self._check(self.role, event, LocalProtocolError)
        frame = self._encode(event)
        self._commit(self.role, kind, event, new_state)
        return frame

    def _encode(self, event: Event) -> bytes:
        version = self.version if self.version is not None else HANDSHAKE_VERSION
        if isinstance(event, WriteSetBatch):
            prefix, data = encode_batch(event)
            length = len(prefix) + memoryview(data).nbytes
            self._check_send_length(length, self.max_frame_bytes)
            crc = zlib.crc32(data, zlib.crc32(prefix))
            header = pack_header(version, FrameType.BATCH, 0, 0, length, event.first, crc)
            return b"".join((header, prefix, data))
        if isinstance(event, Segment):
            count, blob = encode_segment(event)
            length = len(count) + blob.nbytes
            self._check_send_length(length, self.max_frame_bytes)
            crc = zlib.crc32(blob, zlib.crc32(count))
            header = pack_header(version, FrameType.SEGMENT, 0, 0, length, event.first, crc)
            return b"".join((header, count, blob))
        ctrl, seqno, payload = 0, SEQNO_NONE, b""
        if isinstance(event, SstChunk):
            ftype, payload = FrameType.SST_CHUNK, event.data  # type: ignore[assignment]
            self._check_send_length(memoryview(payload).nbytes, self.max_frame_bytes)
        elif isinstance(event, SstRequest | SstBegin | SstEnd | SstRefused):
            ftype, payload = _SST_FRAMES[_SST_KINDS[type(event)]], encode_sst(event)
            self._check_send_length(len(payload), min(self.max_frame_bytes, MAX_HANDSHAKE_BYTES))
        elif isinstance(event, Handshake | HandshakeResponse):
            if isinstance(event, Handshake):
                ftype, payload = FrameType.HANDSHAKE, encode_handshake(event)
            else:
                ftype, payload = FrameType.HANDSHAKE_RESPONSE, encode_response(event)
            version = HANDSHAKE_VERSION
            self._check_send_length(len(payload), min(self.max_frame_bytes, MAX_HANDSHAKE_BYTES))
        elif isinstance(event, StatusRequest | Status):
            ftype = FrameType.STATUS_REQUEST if isinstance(event, StatusRequest) else FrameType.STATUS
            payload = event.payload
            version = HANDSHAKE_VERSION
            self._check_send_length(memoryview(payload).nbytes, min(self.max_frame_bytes, MAX_STATUS_BYTES))
        elif isinstance(event, Ctrl):
            ftype, ctrl = FrameType.CTRL, event.code
        elif isinstance(event, Keepalive):
            ftype = FrameType.KEEPALIVE
        else:
            assert isinstance(event, WriteSet)  # _check() let nothing else through
            ftype, seqno, payload = FrameType(event.type), event.seqno, event.payload  # type: ignore[assignment]
            self._check_send_length(memoryview(payload).nbytes, self.max_frame_bytes)
        length = memoryview(payload).nbytes
        return b"".join((pack_header(version, ftype, 0, ctrl, length, seqno, zlib.crc32(payload)), payload))

    @staticmethod
    def _check_send_length(length: int, limit: int) -> None:
        if length > limit:
            raise LocalProtocolError(f"frame payload of {length} bytes exceeds the limit of {limit} bytes")

    # --- receiving -------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from the peer; ``b""`` means the peer closed its end."""
        if memoryview(data).nbytes == 0:
            self._peer_closed = True
            return
        if self._peer_closed:
            raise LocalProtocolError("received data after the peer closed the connection")
        self._buffer.append(data)

    def next_event(self) -> Event | Literal[_Sentinel.NEED_DATA]:
        """Parse the next event from the buffered bytes.

        Returns an event, ``NEED_DATA`` if the next frame is not complete yet, or
        ``ConnectionClosed()`` (again and again) once the peer closed at a frame boundary.
        Raises RemoteProtocolError, and nothing else, if the peer's bytes are not a valid frame, or
        not allowed in this state, or the peer closed in the middle of a frame; its ``error_code`` is
        the Ctrl code to send before closing. After that, every call raises it again.
        """
        if self._error is not None:
            raise RemoteProtocolError(f"connection already failed: {self._error}", self._error.error_code)
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    def _next_event(self) -> Event | Literal[_Sentinel.NEED_DATA]:
        buffer = self._buffer
        while True:
            header = self._header
            if header is None:
                if len(buffer) < HEADER_BYTES:
                    if not self._peer_closed:
                        return NEED_DATA
                    if not len(buffer):
                        return ConnectionClosed()
                    raise RemoteProtocolError(
                        "connection closed in the middle of a frame: "
                        f"got {len(buffer)} of {HEADER_BYTES} bytes"
                    )
                header = unpack_header(buffer.peek(HEADER_BYTES))
                ftype = self._check_framing(header)
                if not self._discarding:
                    self._check_early(header, ftype)
                self._header = header
            frame_bytes = HEADER_BYTES + header.len
            if len(buffer) < frame_bytes:
                if not self._peer_closed:
                    return NEED_DATA
                raise RemoteProtocolError(
                    f"connection closed in the middle of a frame: got {len(buffer)} of {frame_bytes} bytes"
                )
            buffer.discard(HEADER_BYTES)
            payload = buffer.take(header.len) if header.len else b""
            self._header = None
            if zlib.crc32(payload) != header.payload_crc:
                raise RemoteProtocolError(
                    f"IST message payload checksum mismatch: type: {header.type}, len: {header.len}, "
                    f"seqno: {header.seqno}",
                    error_code=-EINVAL,
                )
            if self._discarding:
                continue
            event = self._decode(FrameType(header.type), header, payload)
            kind, new_state = self._check(self.peer_role, event, RemoteProtocolError)
            self._commit(self.peer_role, kind, event, new_state)
            return event

    def _check_framing(self, h: FrameHeader) -> FrameType:
        """Header checks that hold in every state. Returns the frame type."""
        if h.type not in FrameType._value2member_map_:
            raise RemoteProtocolError(f"unknown IST message type {h.type}")
        ftype = FrameType(h.type)
        if ftype in _PRE_NEGOTIATION_LIMITS:
            expected, limit = HANDSHAKE_VERSION, min(self.max_frame_bytes, _PRE_NEGOTIATION_LIMITS[ftype])
        else:
            expected = self.version if self.version is not None else HANDSHAKE_VERSION
            limit = self.max_frame_bytes
        if h.version != expected:
            raise RemoteProtocolError(f"invalid protocol version {h.version}, expected {expected}")
        if h.len > limit:
            raise RemoteProtocolError(
                f"{ftype.name} frame of {h.len} bytes exceeds the limit of {limit} bytes",
                error_code=-EMSGSIZE,
            )
        if h.flags & ~F_PRELOAD:
            raise RemoteProtocolError(f"{ftype.name} frame has unknown flags {h.flags:#x}")
        if ftype is FrameType.CTRL:
            if _ctrl_kind(h.ctrl) is None:
                raise RemoteProtocolError(f"unknown ctrl code {h.ctrl}")
        elif h.ctrl != 0:
            raise RemoteProtocolError(f"{ftype.name} frame has ctrl {h.ctrl}, expected 0")
        if ftype not in _RECORD_FRAMES and h.seqno != SEQNO_NONE:
            raise RemoteProtocolError(f"{ftype.name} frame has seqno {h.seqno}, expected -1")
        if ftype in _EMPTY_FRAMES and h.len != 0:
            raise RemoteProtocolError(f"{ftype.name} frame has a payload of {h.len} bytes, expected none")
        return ftype

    def _check_early(self, h: FrameHeader, ftype: FrameType) -> None:
        """Reject from the header alone what the state machine will reject: no payload is buffered."""
        peer = self.peer_role
        if ftype is FrameType.HANDSHAKE_RESPONSE:
            kinds = [Kind.GRANTED, Kind.REFUSED]
        elif ftype is FrameType.CTRL:
            kinds = [_ctrl_kind(h.ctrl)]  # type: ignore[list-item]
        else:
            kinds = [_KIND_OF_FRAME[ftype]]
        if not any((self._state, peer, kind) in TRANSITIONS for kind in kinds):
            what = kinds[0].value if ftype is FrameType.CTRL else ftype.name
            raise RemoteProtocolError(f"{peer.name} may not send {what} in state {self._state.name}")
        if ftype is FrameType.SEGMENT:
            self._check_segments(RemoteProtocolError)
        if ftype in _RECORD_FRAMES:
            self._check_records(h.seqno, 1, RemoteProtocolError)
        if ftype is FrameType.SST_CHUNK:
            self._check_sst_bytes(h.len, RemoteProtocolError)

    @staticmethod
    def _decode(ftype: FrameType, h: FrameHeader, payload: bytes) -> Event:
        if ftype is FrameType.BATCH:
            return decode_batch(h.seqno, payload)
        if ftype is FrameType.SEGMENT:
            return decode_segment(h.seqno, payload)
        if ftype in (FrameType.TRX, FrameType.CCHANGE, FrameType.SKIP):
            return WriteSet(h.seqno, RecordType(ftype), payload)
        if ftype is FrameType.CTRL:
            return Ctrl(h.ctrl)
        if ftype is FrameType.KEEPALIVE:
            return Keepalive()
        if ftype is FrameType.STATUS_REQUEST:
            return StatusRequest(payload)
        if ftype is FrameType.STATUS:
            return Status(payload)
        if ftype is FrameType.SST_CHUNK:
            return SstChunk(payload)
        if ftype in _SST_FRAME_TYPES:
            return decode_sst(ftype, payload)
        if ftype is FrameType.HANDSHAKE:
            return decode_handshake(payload)
        return decode_response(payload)

    # --- the state machine, for both directions --------------------------------------------------

    def _check(self, sender: Role, event: Event, exc: type[ProtocolError]) -> tuple[Kind, State]:
        """Everything ``event`` from ``sender`` must satisfy now. Pure: changes nothing.

        Returns (kind, new state); raises ``exc`` (Local- or RemoteProtocolError)."""
        kind = self._kind(event, exc)
        new_state = TRANSITIONS.get((self._state, sender, kind))
        if new_state is None:
            raise exc(f"{sender.name} may not send {kind.value} in state {self._state.name}")
        if isinstance(event, HandshakeResponse):
            self._check_response(event, exc)
        elif isinstance(event, WriteSet):
            if not isinstance(event.type, RecordType):
                raise exc(f"WriteSet.type must be a RecordType, not {event.type!r}")
            if event.type is RecordType.SKIP and memoryview(event.payload).nbytes:
                raise exc(f"SKIP write-set {event.seqno} has a payload")
            self._check_records(event.seqno, 1, exc)
        elif isinstance(event, WriteSetBatch):
            self._check_records(event.first, len(event), exc)
        elif isinstance(event, Segment):
            self._check_segments(exc)
            if not isinstance(event.count, int) or event.count < 1:
                raise exc(f"SEGMENT count must be >= 1, not {event.count!r}")
            self._check_records(event.first, event.count, exc)
        elif isinstance(event, StatusRequest | Status):
            try:
                contiguous = memoryview(event.payload).c_contiguous
            except TypeError as err:
                raise exc(f"{kind.value} payload must be bytes-like: {err}") from err
            if not contiguous:
                raise exc(f"{kind.value} payload must be contiguous")
        elif kind in _FC_KINDS:
            self._check_flow_control(kind, exc)
        elif isinstance(event, SstChunk):
            try:
                nbytes = memoryview(event.data).nbytes
            except TypeError as err:
                raise exc(f"SST_CHUNK data must be bytes-like: {err}") from err
            self._check_sst_bytes(nbytes, exc)
        elif isinstance(event, SstEnd):
            assert self.sst_begin is not None  # SST_STREAMING implies it
            if self.sst_bytes != self.sst_begin.total_bytes:
                raise exc(f"SST ended after {self.sst_bytes} of {self.sst_begin.total_bytes} bytes")
            if not isinstance(event.sha256, bytes | bytearray) or len(event.sha256) != SHA256_BYTES:
                raise exc(f"SST_END must carry a {SHA256_BYTES}-byte sha256")
        elif kind is Kind.CTRL_EOF:
            assert self.granted is not None and self.last_seqno is not None  # STREAMING implies both
            if self.last_seqno < self.granted.last:
                verb = "sent" if exc is LocalProtocolError else "received"
                raise exc(
                    f"IST didn't contain all write sets, expected last: {self.granted.last} "
                    f"last {verb}: {self.last_seqno}"
                )
        return kind, new_state

    def _commit(self, sender: Role, kind: Kind, event: Event, new_state: State) -> None:
        if isinstance(event, Handshake):
            self.handshake = event
        elif isinstance(event, HandshakeResponse):
            self.granted = event
            if kind is Kind.GRANTED:
                self.version = event.version
                self.last_seqno = event.first - 1
        elif isinstance(event, WriteSet):
            self.last_seqno = event.seqno
        elif isinstance(event, WriteSetBatch | Segment):
            self.last_seqno = event.last
        elif isinstance(event, StatusRequest):
            self.status_request = event
        elif isinstance(event, Status):
            self.status = event
        elif isinstance(event, SstRequest):
            self.sst_request = event
        elif isinstance(event, SstBegin):
            self.sst_begin = event
        elif isinstance(event, SstChunk):
            self.sst_bytes += memoryview(event.data).nbytes
        elif kind is Kind.CTRL_ERROR and sender is self.role:
            self._discarding = True
        self._state = new_state

    @staticmethod
    def _kind(event: Event, exc: type[ProtocolError]) -> Kind:
        if isinstance(event, Handshake):
            return Kind.HANDSHAKE
        if isinstance(event, HandshakeResponse):
            return Kind.REFUSED if event.granted == TransferKind.NONE else Kind.GRANTED
        if isinstance(event, Ctrl):
            kind = _ctrl_kind(event.code) if isinstance(event.code, int) else None
            if kind is None:
                raise exc(f"unknown ctrl code {event.code!r} (0 OK, 1 EOF, 2 FC_STOP, 3 FC_CONT, -128..-1 -errno)")
            return kind
        if isinstance(event, WriteSet | WriteSetBatch):
            return Kind.WRITE_SETS
        if isinstance(event, Segment):
            return Kind.SEGMENT
        if isinstance(event, Keepalive):
            return Kind.KEEPALIVE
        if isinstance(event, StatusRequest):
            return Kind.STATUS_REQUEST
        if isinstance(event, Status):
            return Kind.STATUS
        sst_kind = _SST_KINDS.get(type(event))
        if sst_kind is not None:
            return sst_kind
        raise exc(f"{type(event).__name__} is not an event that can be sent")

    def _check_response(self, resp: HandshakeResponse, exc: type[ProtocolError]) -> None:
        """A grant must match what the joiner asked for (the donor cannot grant what was not asked)."""
        hs = self.handshake
        assert hs is not None  # state RESPONSE implies a Handshake was seen
        if resp.granted == TransferKind.NONE:
            return
        low, high = hs.versions
        ours_low, ours_high = SUPPORTED_VERSIONS
        if not (low <= resp.version <= high and ours_low <= resp.version <= ours_high):
            raise exc(
                f"granted protocol version {resp.version} is not in the joiner's range {low}..{high} "
                f"and ours {ours_low}..{ours_high}"
            )
        if resp.granted == TransferKind.SST:
            if not hs.accept & Accept.SST:
                raise exc("donor granted SST, but the joiner does not accept SST")
            return
        if not hs.accept & Accept.IST:
            raise exc("donor granted IST, but the joiner does not accept IST")
        if resp.donor_uuid != hs.cluster_uuid:
            raise exc(f"donor granted IST of history {resp.donor_uuid}, joiner asked for {hs.cluster_uuid}")
        if hs.subscribe:
            # "from your current position": the joiner's own first is irrelevant; seqnos start at 1.
            if resp.first < 1:
                raise exc(f"donor granted a subscription from seqno {resp.first}, seqnos start at 1")
        elif resp.first != hs.first:
            raise exc(f"donor granted IST from seqno {resp.first}, joiner asked from {hs.first}")
        if hs.last != SEQNO_NONE and resp.last > hs.last:
            raise exc(f"donor granted IST up to seqno {resp.last}, joiner asked up to {hs.last}")

    def _check_sst_bytes(self, nbytes: int, exc: type[ProtocolError]) -> None:
        """Snapshot bytes may not run past the size SST_BEGIN announced."""
        begin = self.sst_begin
        assert begin is not None  # SST_STREAMING implies it
        if self.sst_bytes + nbytes > begin.total_bytes:
            raise exc(f"SST_CHUNK runs past the snapshot's {begin.total_bytes} bytes "
                      f"({self.sst_bytes} + {nbytes})")

    def _check_segments(self, exc: type[ProtocolError]) -> None:
        """SEGMENT frames are negotiated: the joiner's HANDSHAKE must have asked for them."""
        if not self.segments:
            raise exc("SEGMENT frames were not negotiated: the joiner's HANDSHAKE did not set SEGMENTS")

    def _check_flow_control(self, kind: Kind, exc: type[ProtocolError]) -> None:
        """FC_STOP/FC_CONT pace a stream that has no end of its own: follow and subscribe streams only."""
        if not self.follow:
            raise exc(
                f"{kind.value} is only for follow and subscribe streams: "
                "the joiner's HANDSHAKE set neither FOLLOW nor SUBSCRIBE"
            )

    def _check_records(self, first: int, count: int, exc: type[ProtocolError]) -> None:
        """Records first .. first+count-1 must continue the stream and stay in the granted range."""
        granted, last_seqno = self.granted, self.last_seqno
        assert granted is not None and last_seqno is not None  # STREAMING implies both
        expected = last_seqno + 1
        if first != expected:
            if last_seqno == granted.first - 1:
                raise exc(f"IST started with wrong seqno: {first}, expected: {expected}")
            raise exc(f"Unexpected action seqno: {first} expected: {expected}")
        last = first + count - 1
        if last > granted.last and not self.follow:
            raise exc(f"write-set seqno {last} is past the granted last seqno {granted.last} (not following)")
        if last > I64_MAX:
            raise exc(f"write-set seqno {last} overflows int64")
