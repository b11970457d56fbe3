"""Small trio helpers shared by the daemons."""

from __future__ import annotations

import trio

from istd.errors import IstError

# What a network peer can do to a connection task: translated into one log line, never a crash.
PEER_ERRORS: tuple[type[BaseException], ...] = (
    IstError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    OSError,
)


def unwrap(exc: BaseException) -> BaseException:
    """The one real error inside nested single-member exception groups (trio's strict nurseries)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def describe(exc: BaseException) -> str:
    """One human line for a peer/connection error."""
    exc = unwrap(exc)
    if isinstance(exc, trio.TooSlowError):
        return "peer timed out (stalled or too slow)"
    if isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError):
        cause = exc.__cause__ or exc.__context__
        return f"connection lost ({cause})" if cause else "connection lost"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
