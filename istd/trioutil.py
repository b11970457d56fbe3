"""Small trio helpers shared by the daemons."""

from __future__ import annotations

import math
from typing import Any

import trio

from istd.errors import IstError
from protocol import NEED_DATA, Ctrl
from protocol import Connection as IstConnection

# Bytes read from a socket per receive_some: big enough that a 1 MiB frame takes a handful of calls.
RECV_CHUNK_BYTES = 1 << 20

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


def peer_url(stream: trio.SocketStream) -> str:
    """``tcp://host:port`` of the other end, for logs (``tcp://?`` once it is gone)."""
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "tcp://?"
    return f"tcp://{host}:{port}"


async def next_event(stream: trio.SocketStream, conn: IstConnection, idle_timeout: float = math.inf) -> Any:
    """The next protocol event, reading as needed; TooSlowError when the peer sends nothing for
    ``idle_timeout`` seconds (PXC's IST watchdog)."""
    while True:
        event = conn.next_event()
        if event is not NEED_DATA:
            return event
        with trio.fail_after(idle_timeout):
            data = await stream.receive_some(RECV_CHUNK_BYTES)
        conn.receive_data(data)


async def send_error(stream: trio.SocketStream, conn: IstConnection, exc: BaseException) -> None:
    """Tell the peer why we drop it (a negative CTRL, Galera's -errno) when ``exc`` carries a code; best effort."""
    code = getattr(exc, "error_code", None)
    if code is None or code >= 0:
        return
    with trio.move_on_after(1):
        try:
            await stream.send_all(conn.send(Ctrl(code)))
        except (IstError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


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
