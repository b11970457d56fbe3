"""The events of an IST conversation, named after Galera's messages (``ist_proto.hpp``).

Events are plain frozen dataclasses: they carry no wire knowledge and do no validation. The
:class:`~protocol.connection.Connection` validates what it sends (``LocalProtocolError``) and
what it receives (``RemoteProtocolError``).
"""

from __future__ import annotations

import enum
import itertools
import uuid
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

from istd.errors import LocalProtocolError

__all__ = [
    "C_EOF",
    "C_FC_CONT",
    "C_FC_STOP",
    "C_OK",
    "Accept",
    "ConnectionClosed",
    "Ctrl",
    "Event",
    "Handshake",
    "HandshakeResponse",
    "Keepalive",
    "RecordType",
    "RefusalReason",
    "Segment",
    "SstBegin",
    "SstChunk",
    "SstEnd",
    "SstRefused",
    "SstRequest",
    "Status",
    "StatusRequest",
    "TransferKind",
    "WriteSet",
    "WriteSetBatch",
]

# Ctrl codes, as in Galera's ist_proto.hpp; a negative code is -errno (an error report).
C_OK = 0
C_EOF = 1
# Flow control, ours (cluster mode): the joiner of a follow/subscribe stream asks the donor to pause
# sending new write-sets (it fell behind) and to go on again. Positive, so never taken for -errno.
C_FC_STOP = 2
C_FC_CONT = 3


class Accept(enum.IntFlag):
    """What the joiner will take (Handshake.accept)."""

    IST = 1
    SST = 2


class TransferKind(enum.IntEnum):
    """What the donor grants (HandshakeResponse.granted)."""

    NONE = 0
    IST = 1
    SST = 2


class RefusalReason(enum.IntEnum):
    """Why the donor refused (HandshakeResponse.reason); NONE when it granted."""

    NONE = 0
    UUID_MISMATCH = 1
    SEQNO_UNDEFINED = 2
    NOT_IN_CACHE = 3
    SAFETY_GAP = 4
    VERSION_UNSUPPORTED = 5
    AUTH_FAILED = 6
    BUSY = 7
    AHEAD_OF_DONOR = 8
    IST_NOT_ACCEPTED = 9


class RecordType(enum.IntEnum):
    """A write-set record's type: Galera's frame type numbers T_TRX, T_CCHANGE, T_SKIP."""

    TRX = 4
    CCHANGE = 5
    SKIP = 6


@dataclass(frozen=True, slots=True)
class Handshake:
    """Joiner -> donor: who I am, where I am, what I want."""

    cluster_uuid: uuid.UUID
    last_applied: int
    first: int
    last: int  # -1: up to the donor's last seqno at request time
    accept: Accept
    versions: tuple[int, int]  # (min, max) protocol versions the joiner speaks
    node_name: str
    follow: bool = False  # keep streaming new write-sets after `last`
    auth: bytes = b""
    segments: bool = False  # the donor may send SEGMENT frames (Segment events)
    # Cluster mode: "start at your current position and follow". The donor grants an IST that may
    # start anywhere >= 1 (by convention first = donor_last + 1, last = donor_last: empty), then
    # streams every new write-set. Implies follow for stream validation, whatever `follow` says.
    subscribe: bool = False


@dataclass(frozen=True, slots=True)
class HandshakeResponse:
    """Donor -> joiner: granted (IST or SST, with the range) or refused (with the reason)."""

    granted: TransferKind
    version: int  # negotiated protocol version; 0 when refused
    reason: RefusalReason
    donor_uuid: uuid.UUID
    first: int
    last: int  # first > last: nothing to send
    cached_downto: int
    safe_ist_seqno: int
    donor_last: int
    message: str = ""
    sst_address: str = ""  # host:port, may be empty


@dataclass(frozen=True, slots=True)
class Ctrl:
    """A control message: C_OK, C_EOF, C_FC_STOP, C_FC_CONT, or a negative -errno error report."""

    code: int


@dataclass(frozen=True, slots=True)
class WriteSet:
    """One ordered record (T_TRX / T_CCHANGE / T_SKIP). The payload is opaque to the protocol."""

    seqno: int
    type: RecordType
    payload: bytes | memoryview = b""


@dataclass(frozen=True, slots=True)
class Segment:
    """Consecutive records ``first .. first+count-1`` as ONE opaque blob (the fast path).

    Only the layer above knows how ``blob`` splits into records; the protocol checks just that the
    seqnos continue the stream and that ``count >= 1`` and ``len(blob) >= count`` (a record is at
    least one byte). Sent only if the joiner's Handshake set ``segments``.
    """

    first: int
    count: int
    blob: bytes | memoryview

    @property
    def last(self) -> int:
        return self.first + self.count - 1

    def __repr__(self) -> str:
        try:
            size = f"blob_bytes={memoryview(self.blob).nbytes}"
        except TypeError:  # not bytes-like: send() will say so
            size = f"blob={type(self.blob).__name__}"
        return f"Segment(first={self.first}, count={self.count}, {size})"


@dataclass(frozen=True, slots=True)
class StatusRequest:
    """Client -> server, instead of a Handshake: "here is my status, send me yours".

    ``payload`` is opaque to the protocol (istd puts JSON there: the requester's own status and,
    optionally, an announcement); at most MAX_STATUS_BYTES."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Status:
    """Server -> client, the answer to a StatusRequest; then the conversation is DONE.

    ``payload`` is opaque to the protocol (istd: JSON); at most MAX_STATUS_BYTES."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class SstRequest:
    """Joiner -> donor, on the SST port instead of a Handshake: "send me a full snapshot of your state"."""

    node_name: str
    auth: bytes = b""


@dataclass(frozen=True, slots=True)
class SstBegin:
    """Donor -> joiner: a snapshot of the state at ``cluster_uuid:seqno`` follows, ``total_bytes`` long.

    ``format`` names what the bytes are (istd: ``sqlite``, a database file); opaque to the protocol."""

    cluster_uuid: uuid.UUID
    seqno: int
    total_bytes: int
    format: str = "sqlite"


@dataclass(frozen=True, slots=True)
class SstChunk:
    """Donor -> joiner: the next bytes of the snapshot (the frame's CRC covers them)."""

    data: bytes | memoryview

    def __repr__(self) -> str:
        try:
            return f"SstChunk(bytes={memoryview(self.data).nbytes})"
        except TypeError:
            return f"SstChunk(data={type(self.data).__name__})"


@dataclass(frozen=True, slots=True)
class SstEnd:
    """Donor -> joiner: the snapshot is complete; ``sha256`` is the digest of all its bytes."""

    sha256: bytes


@dataclass(frozen=True, slots=True)
class SstRefused:
    """Donor -> joiner: no snapshot, and why (one line for the operator)."""

    message: str


@dataclass(frozen=True, slots=True)
class Keepalive:
    """Sent by either side at any time after the HANDSHAKE to keep the link (and timers) alive."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed the connection at a frame boundary."""


_RECORD_TYPES: tuple[RecordType | None, ...] = tuple(
    RecordType(t) if t in RecordType._value2member_map_ else None for t in range(256)
)


@dataclass(frozen=True, eq=False)
class WriteSetBatch:
    """Consecutive write-sets ``first .. first+len-1`` in one frame (the throughput path).

    ``types`` holds one RecordType byte per record, ``sizes`` one u32 per record (0 for SKIP), and
    ``data`` the concatenated payloads. Nothing is done per record until asked: ``payload(i)`` is a
    zero-copy slice of ``data``; the offsets are computed once, on first use.
    """

    first: int
    types: bytes
    sizes: array[int] | memoryview  # u32 items (array('I') or memoryview cast to "I")
    data: bytes | memoryview

    __hash__: ClassVar[None] = None  # type: ignore[assignment]

    @classmethod
    def from_payloads(
        cls, first: int, types: bytes, payloads: Sequence[bytes | bytearray | memoryview]
    ) -> WriteSetBatch:
        """Build a batch from per-record payloads (e.g. gcache memoryviews): one join, no other copy.

        Memoryviews must be byte-formatted (format "B"), as ``len()`` is taken as the size.
        Raises LocalProtocolError if ``len(types) != len(payloads)``.
        """
        if len(types) != len(payloads):
            raise LocalProtocolError(f"batch has {len(types)} types but {len(payloads)} payloads")
        return cls(first, bytes(types), array("I", map(len, payloads)), b"".join(payloads))

    def __len__(self) -> int:
        return len(self.types)

    @property
    def last(self) -> int:
        return self.first + len(self.types) - 1

    @cached_property
    def _offsets(self) -> list[int]:
        return list(itertools.accumulate(self.sizes, initial=0))

    @cached_property
    def _view(self) -> memoryview:
        return memoryview(self.data).cast("B")

    def payload(self, i: int) -> memoryview:
        """Record ``i``'s payload (0-based, negative counts from the end) as a slice of ``data``."""
        n = len(self.types)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"record {i} out of range for a batch of {n}")
        offsets = self._offsets
        return self._view[offsets[i] : offsets[i + 1]]

    def payloads(self) -> list[memoryview]:
        """Every record's payload as a zero-copy slice of ``data``, built at C speed."""
        offsets = self._offsets
        return list(map(self._view.__getitem__, map(slice, offsets, itertools.islice(offsets, 1, None))))

    def records(self) -> Iterator[tuple[int, int, memoryview]]:
        """(seqno, type byte, payload view) per record: ``__iter__`` without an event object each."""
        view = self._view
        offsets = self._offsets
        return zip(
            itertools.count(self.first),
            self.types,
            map(view.__getitem__, map(slice, offsets, itertools.islice(offsets, 1, None))),
        )

    def __iter__(self) -> Iterator[WriteSet]:
        view = self._view
        offsets = self._offsets
        kinds = _RECORD_TYPES
        for seqno, t, start, end in zip(
            itertools.count(self.first), self.types, offsets, itertools.islice(offsets, 1, None)
        ):
            yield WriteSet(seqno, kinds[t], view[start:end])  # type: ignore[arg-type]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WriteSetBatch):
            return NotImplemented
        return (
            self.first == other.first
            and bytes(self.types) == bytes(other.types)
            and list(self.sizes) == list(other.sizes)
            and memoryview(self.data).cast("B") == memoryview(other.data).cast("B")
        )

    def __repr__(self) -> str:
        return f"WriteSetBatch(first={self.first}, count={len(self)}, data_bytes={len(self._view)})"


Event = (
    Handshake
    | HandshakeResponse
    | Ctrl
    | WriteSet
    | WriteSetBatch
    | Segment
    | Keepalive
    | ConnectionClosed
    | StatusRequest
    | Status
    | SstRequest
    | SstBegin
    | SstChunk
    | SstEnd
    | SstRefused
)
