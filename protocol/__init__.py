"""istd's IST wire protocol, sans-IO (h11-style): no networking, no trio, no files.

Imports only the standard library, ``construct`` and ``istd.errors``. See ``connection.py`` for the
theory of operation and ``README.md`` for every byte layout.
"""

from istd.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from protocol.connection import NEED_DATA, TRANSITIONS, Connection, Kind, Role, State, negotiate_version
from protocol.events import (
    C_EOF,
    C_OK,
    Accept,
    ConnectionClosed,
    Ctrl,
    Event,
    Handshake,
    HandshakeResponse,
    Keepalive,
    RecordType,
    RefusalReason,
    Segment,
    TransferKind,
    WriteSet,
    WriteSetBatch,
)
from protocol.wire import (
    EMSGSIZE,
    HANDSHAKE_VERSION,
    HEADER_BYTES,
    MAX_FRAME_BYTES,
    MAX_HANDSHAKE_BYTES,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    FrameType,
)

__all__ = [
    "C_EOF",
    "C_OK",
    "EMSGSIZE",
    "HANDSHAKE_VERSION",
    "HEADER_BYTES",
    "MAX_FRAME_BYTES",
    "MAX_HANDSHAKE_BYTES",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "TRANSITIONS",
    "Accept",
    "Connection",
    "ConnectionClosed",
    "Ctrl",
    "Event",
    "FrameType",
    "Handshake",
    "HandshakeResponse",
    "Keepalive",
    "Kind",
    "LocalProtocolError",
    "ProtocolError",
    "RecordType",
    "RefusalReason",
    "RemoteProtocolError",
    "Role",
    "Segment",
    "State",
    "TransferKind",
    "WriteSet",
    "WriteSetBatch",
    "negotiate_version",
]
