"""The one exception tree of istd. This module imports nothing, so every layer may use it.

    IstError
    ├── ProtocolError            (protocol/: the IST wire format)
    │   ├── LocalProtocolError   we misused the protocol (a bug on our side)
    │   └── RemoteProtocolError  the peer sent something invalid; carries the Ctrl code to send
    ├── GcacheError              (gcache/: the write-set cache file)
    │   ├── GcacheCorrupt        the file cannot be trusted and recovery could not save it
    │   ├── SeqnoNotInCache      a seqno outside [seqno_min, seqno_max]
    │   ├── GcacheFull           no room: the ring is full of locked buffers and pages are off
    │   └── BadSegment           a raw segment to import is not valid records of this history
    ├── StateError               (grastate.dat, the data directory lock)
    │   ├── StateFileCorrupt
    │   └── DatadirLocked
    └── ConfigError              a bad option, provider option or environment variable

Foreign errors (construct, OSError from mmap, trio's BrokenResourceError) are translated into
these at the boundary with ``raise ... from exc``.
"""

# Ctrl codes are negative errno values on the wire, as in Galera (ist_proto.hpp).
EPROTO = 71
EINVAL = 22


class IstError(Exception):
    """Root of every error istd raises on purpose."""


class ProtocolError(IstError):
    """The IST conversation went wrong."""

    def __init__(self, msg: str, error_code: int = -EPROTO) -> None:
        super().__init__(msg)
        self.error_code = error_code


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol state does not allow (our bug)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that are not a valid IST message in this state.

    ``error_code`` is the (negative) Ctrl code to send the peer before closing.
    """


class GcacheError(IstError):
    """Something about the gcache file."""


class GcacheCorrupt(GcacheError):
    """The gcache file is damaged beyond what recovery may repair without losing correctness."""


class SeqnoNotInCache(GcacheError, KeyError):
    """The seqno asked for is not (or no longer) in the cache."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "seqno not in cache"


class GcacheFull(GcacheError):
    """No space for a new write-set: the ring is full of locked buffers and page overflow failed."""


class BadSegment(GcacheError):
    """A raw segment given to ``import_segment`` is not a run of valid records of this cache's history (what a
    broken or hostile donor would send); nothing of it was appended."""


class StateError(IstError):
    """The node's saved state (grastate.dat, data directory) is unusable."""


class StateFileCorrupt(StateError):
    """grastate.dat exists but cannot be parsed."""


class DatadirLocked(StateError):
    """Another process holds the data directory."""


class ConfigError(IstError):
    """A configuration value is unknown or invalid."""
