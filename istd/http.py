"""The HTTP API every istd daemon serves: status for operators, writes for tests and load generators.

Theory of operation
-------------------
hypercorn's trio worker owns the sockets and parses HTTP (h11); this module is only a small ASGI
application in front of a :class:`Node` (the donor, joiner or node daemon). Each request is
answered from one of three routes::

    GET  /status[?format=json|text]   node.status(), Galera's variable names, sorted
    POST /write                       JSON row changes -> one write-set  -> {"seqno": N}
    POST /writesets                   u32-LE-length-prefixed write-sets  -> {"first", "last", "count"}

Every outcome is a JSON answer (or the text status table); a client never sees a traceback:

    ====  =====================================================================
    200   done
    400   bad JSON, bad field, bad or truncated write-set (nothing was written)
    404   unknown path
    405   wrong method for a known path (``Allow`` says which)
    408   the request body did not arrive within BODY_READ_TIMEOUT_S
    409   :class:`NotWriter`: this node does not take writes; the message names the writer
    413   body larger than MAX_BODY_BYTES (stopped reading at the limit)
    503   :class:`NotReady` / :class:`FlowControlPaused`: nothing written, retry later
    500   any other error; an IstError's message is passed on, anything else is logged
    ====  =====================================================================

A /writesets body is validated completely (every write-set decoded) before ``node.write`` sees
any of it, so a bad batch leaves the node untouched. A 503 must also mean "nothing written":
that is the contract :class:`Node` implementations keep, and the load generator relies on it to
retry safely.

Shutdown is cancellation: the daemon cancels the nursery that runs :func:`serve_api` and
hypercorn's tasks (listener, connections, lifespan) go with it.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import struct
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol
from urllib.parse import parse_qs

import structlog
import trio

from istd.errors import IstError
from istd.writeset import Op, RowChange, WriteSetError, decode, encode

__all__ = [
    "BODY_READ_TIMEOUT_S",
    "DEFAULT_API_PORT",
    "KEEP_ALIVE_TIMEOUT_S",
    "MAX_BODY_BYTES",
    "FlowControlPaused",
    "Node",
    "NotReady",
    "NotWriter",
    "serve_api",
]

# Galera uses 4567 (group communication), 4568 (IST) and SST scripts 4444; 4580 sits next to them,
# is free of all three, and is not a registered port of anything a database host usually runs.
DEFAULT_API_PORT = 4580

# 64 MiB: a load generator batch of ~100k write-sets of 500 bytes fits, and a runaway client
# cannot make the daemon buffer more than this per request.
MAX_BODY_BYTES = 64 * 1024 * 1024

# A client that opened a request body and stopped sending is dropped after this long, so it
# holds neither memory nor a task forever.
BODY_READ_TIMEOUT_S = 60.0

# Idle keep-alive connections are closed after this long. Longer than hypercorn's 5 s default so
# that a paced load generator (one request per tick) and `istd status --watch` keep their
# connection; client.py reconnects before reusing a connection idle for half of this.
KEEP_ALIVE_TIMEOUT_S = 30.0

# A /writesets body is a sequence of (u32 little-endian length, write-set bytes).
_LEN = struct.Struct("<I")

log = structlog.get_logger()

# hypercorn logs through the stdlib; an operator does not want a line per request at INFO.
_std_log = logging.getLogger("istd.http")


class NotWriter(IstError):
    """This node does not take client writes (answered 409); the message names the writer.

    ``writer`` is the writer's API address ("HOST:PORT") when the node knows it.
    """

    def __init__(self, msg: str, writer: str | None = None) -> None:
        super().__init__(msg)
        self.writer = writer


class NotReady(IstError):
    """The node cannot take the request now (answered 503). Raised before anything was written."""


class FlowControlPaused(NotReady):
    """Replication is paused by flow control (answered 503). Raised before anything was written."""


class Node(Protocol):
    """What a daemon gives the API. Implemented by the donor/joiner/node daemons."""

    def status(self) -> Mapping[str, str | int | float]:
        """Galera-named status variables (wsrep_local_state, wsrep_last_committed, ...)."""
        ...

    async def write(self, payloads: list[bytes]) -> tuple[int, int]:
        """Append each encoded write-set under the next seqno and apply it; return (first, last).

        Raises NotWriter, NotReady/FlowControlPaused (before writing anything) or another IstError.
        """
        ...


class _HttpError(Exception):
    """An answer other than 200, raised inside a handler."""

    def __init__(self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


class _ClientGone(Exception):
    """The client disconnected before its request was complete; there is nobody to answer."""


class _Response:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: bytes, content_type: bytes,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = [(b"content-type", content_type), *(headers or [])]


def _json_response(status: int, obj: object, headers: list[tuple[bytes, bytes]] | None = None) -> _Response:
    body = (json.dumps(obj, sort_keys=True) + "\n").encode()
    return _Response(status, body, b"application/json", headers)


def _json_safe(value: object) -> object:
    # json.dumps would emit NaN/Infinity, which is not JSON; show them as strings instead.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _text_value(value: object) -> str:
    # Escaped like `mysql -B` so that one variable is always one line with one tab.
    return str(value).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def _unwrap_group(exc: BaseException) -> BaseException:
    """A Node that uses a nursery may raise NotWriter inside a one-exception group."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _parse_change(i: int, item: object) -> RowChange:
    if not isinstance(item, dict):
        raise _HttpError(400, f"changes[{i}] must be an object")
    unknown = set(item) - {"op", "table", "key", "key_hex", "value", "value_hex"}
    if unknown:
        raise _HttpError(400, f"changes[{i}]: unknown field(s) {', '.join(sorted(unknown))}")
    op_name = item.get("op", "upsert")
    ops = {"upsert": Op.UPSERT, "delete": Op.DELETE}
    if op_name not in ops:
        raise _HttpError(400, f"changes[{i}].op must be \"upsert\" or \"delete\", not {op_name!r}")
    table = item.get("table")
    if not isinstance(table, str) or not table:
        raise _HttpError(400, f"changes[{i}].table must be a non-empty string")
    key = _bytes_field(i, item, "key", required=True)
    value = _bytes_field(i, item, "value", required=False)
    try:
        return RowChange(ops[op_name], table, key, value)
    except (WriteSetError, ValueError, TypeError) as exc:
        raise _HttpError(400, f"changes[{i}]: {exc}") from exc


def _bytes_field(i: int, item: dict[str, Any], name: str, *, required: bool) -> bytes:
    text, hex_text = item.get(name), item.get(name + "_hex")
    if text is not None and hex_text is not None:
        raise _HttpError(400, f"changes[{i}]: give {name} or {name}_hex, not both")
    if hex_text is not None:
        if not isinstance(hex_text, str):
            raise _HttpError(400, f"changes[{i}].{name}_hex must be a string of hex digits")
        try:
            return bytes.fromhex(hex_text)
        except ValueError as exc:
            raise _HttpError(400, f"changes[{i}].{name}_hex is not hex: {exc}") from exc
    if text is None:
        if required:
            raise _HttpError(400, f"changes[{i}]: {name} (or {name}_hex) is required")
        return b""
    if not isinstance(text, str):
        raise _HttpError(400, f"changes[{i}].{name} must be a string (use {name}_hex for binary)")
    return text.encode("utf-8")


def _split_writesets(body: bytes) -> list[bytes]:
    """Split a /writesets body into write-sets and decode each one to prove it is valid.

    Outcomes: the list of payloads (at least one); or ``_HttpError(400)`` for an empty body, a
    truncated length prefix or payload, or a write-set that ``decode`` rejects.
    """
    payloads: list[bytes] = []
    pos, end = 0, len(body)
    if end == 0:
        raise _HttpError(400, "empty body: expected write-sets, each prefixed by its u32 LE length")
    while pos < end:
        if end - pos < _LEN.size:
            raise _HttpError(400, f"truncated length prefix at byte {pos} (write-set #{len(payloads)})")
        (n,) = _LEN.unpack_from(body, pos)
        pos += _LEN.size
        if n > end - pos:
            raise _HttpError(400, f"write-set #{len(payloads)} at byte {pos} claims {n} bytes, "
                                  f"only {end - pos} left in the body")
        payload = body[pos:pos + n]
        try:
            decode(payload)
        except WriteSetError as exc:
            raise _HttpError(400, f"write-set #{len(payloads)} is invalid: {exc}") from exc
        payloads.append(payload)
        pos += n
    return payloads


def join_writesets(payloads: list[bytes]) -> bytes:
    """The /writesets body for ``payloads`` (the inverse of :func:`_split_writesets`)."""
    parts: list[bytes] = []
    for p in payloads:
        parts.append(_LEN.pack(len(p)))
        parts.append(p)
    return b"".join(parts)


_Receive = Callable[[], Awaitable[dict[str, Any]]]
_Send = Callable[[dict[str, Any]], Awaitable[None]]
_Handler = Callable[[dict[str, Any], _Receive], Awaitable[_Response]]


class _ApiApp:
    """The ASGI application. One instance per :func:`serve_api`."""

    def __init__(self, node: Node, max_body_bytes: int) -> None:
        self.node = node
        self.max_body_bytes = max_body_bytes
        self.routes: dict[str, dict[str, _Handler]] = {
            "/status": {"GET": self._status, "HEAD": self._status},
            "/write": {"POST": self._write},
            "/writesets": {"POST": self._writesets},
        }

    async def __call__(self, scope: dict[str, Any], receive: _Receive, send: _Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})

    async def _lifespan(self, receive: _Receive, send: _Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: dict[str, Any], receive: _Receive, send: _Send) -> None:
        method, path = scope["method"], scope["path"]
        try:
            response = await self._dispatch(scope, receive)
        except _ClientGone:
            return
        except _HttpError as exc:
            response = _json_response(exc.status, {"error": exc.message}, exc.headers)
        except Exception as exc:
            response = self._error_response(_unwrap_group(exc), method, path)
        headers = [*response.headers, (b"content-length", str(len(response.body)).encode())]
        if response.status in (408, 413):
            # The rest of the body was not read: the connection cannot carry another request.
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else response.body})

    def _error_response(self, exc: BaseException, method: str, path: str) -> _Response:
        if isinstance(exc, NotWriter):
            answer: dict[str, object] = {"error": str(exc)}
            if exc.writer is not None:
                answer["writer"] = exc.writer
            return _json_response(409, answer)
        if isinstance(exc, NotReady):
            return _json_response(503, {"error": str(exc)}, [(b"retry-after", b"1")])
        if isinstance(exc, IstError):
            log.warning("HTTP API request failed", method=method, path=path, error=str(exc))
            return _json_response(500, {"error": str(exc)})
        log.error("HTTP API request failed unexpectedly", method=method, path=path, exc_info=exc)
        return _json_response(500, {"error": f"internal error in the node ({type(exc).__name__}); "
                                             "see the node's log"})

    async def _dispatch(self, scope: dict[str, Any], receive: _Receive) -> _Response:
        methods = self.routes.get(scope["path"])
        if methods is None:
            raise _HttpError(404, f"no such path {scope['path']!r}; try /status, /write or /writesets")
        handler = methods.get(scope["method"])
        if handler is None:
            allow = ", ".join(methods)
            raise _HttpError(405, f"{scope['method']} is not allowed on {scope['path']}; use {allow}",
                             [(b"allow", allow.encode())])
        return await handler(scope, receive)

    async def _read_body(self, scope: dict[str, Any], receive: _Receive) -> bytes:
        limit = self.max_body_bytes
        too_big = _HttpError(413, f"request body larger than {limit} bytes; send smaller batches")
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                raise too_big
        body = bytearray()
        try:
            with trio.fail_after(BODY_READ_TIMEOUT_S):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _ClientGone
                    body += message.get("body", b"")
                    if len(body) > limit:
                        raise too_big
                    if not message.get("more_body", False):
                        return bytes(body)
        except trio.TooSlowError:
            raise _HttpError(408, f"request body not received within {BODY_READ_TIMEOUT_S:g} s") from None

    async def _status(self, scope: dict[str, Any], receive: _Receive) -> _Response:
        query = parse_qs(scope["query_string"].decode("latin-1"))
        fmt = query.get("format", ["json"])[-1]
        if fmt not in ("json", "text"):
            raise _HttpError(400, f"format must be json or text, not {fmt!r}")
        status = self.node.status()
        if fmt == "json":
            return _json_response(200, {k: _json_safe(v) for k, v in status.items()})
        lines = ["Variable_name\tValue"]
        lines += [f"{k}\t{_text_value(status[k])}" for k in sorted(status)]
        return _Response(200, ("\n".join(lines) + "\n").encode(), b"text/plain; charset=utf-8")

    async def _write(self, scope: dict[str, Any], receive: _Receive) -> _Response:
        body = await self._read_body(scope, receive)
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _HttpError(400, f"body is not JSON: {exc}") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("changes"), list) or not doc["changes"]:
            raise _HttpError(400, 'expected {"changes": [{"op": "upsert", "table": "t", "key": "k", '
                                  '"value": "v"}, ...]} with at least one change')
        if set(doc) != {"changes"}:
            raise _HttpError(400, f"unknown field(s) {', '.join(sorted(set(doc) - {'changes'}))}")
        changes = [_parse_change(i, item) for i, item in enumerate(doc["changes"])]
        try:
            payload = encode(changes)
            decode(payload)
        except WriteSetError as exc:
            raise _HttpError(400, f"cannot encode the write-set: {exc}") from exc
        first, _last = await self.node.write([payload])
        return _json_response(200, {"seqno": first})

    async def _writesets(self, scope: dict[str, Any], receive: _Receive) -> _Response:
        body = await self._read_body(scope, receive)
        # Decoding thousands of write-sets is CPU work; keep the event loop (and IST) moving.
        payloads = await trio.to_thread.run_sync(_split_writesets, body)
        first, last = await self.node.write(payloads)
        return _json_response(200, {"first": first, "last": last, "count": len(payloads)})


@functools.cache
def _quiet_log_class() -> type:
    """hypercorn is imported only when an API is served: the CLI starts faster without it."""
    from hypercorn.config import Config
    from hypercorn.logging import Logger as _HypercornLogger

    class _QuietLog(_HypercornLogger):
        """hypercorn's logger, sent to the stdlib logger "istd.http": access and info lines at DEBUG.

        Warnings and errors keep their level. The base __init__ is not called on purpose: it would
        attach a stderr handler to "hypercorn.error".
        """

        def __init__(self, config: Config) -> None:
            self.access_log_format = config.access_log_format
            self.access_logger = _std_log
            self.error_logger = _std_log

        async def access(self, request: Any, response: Any, request_time: float) -> None:
            if _std_log.isEnabledFor(logging.DEBUG):
                _std_log.debug(self.access_log_format, self.atoms(request, response, request_time))

        async def info(self, message: str, *args: Any, **kwargs: Any) -> None:
            _std_log.debug(message, *args, **kwargs)

    return _QuietLog


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _find_oserror(exc: BaseException) -> OSError | None:
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = _find_oserror(sub)
            if found is not None:
                return found
    return None


async def serve_api(
    node: Node,
    host: str,
    port: int,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the HTTP API for ``node`` on host:port until cancelled.

    ``port`` 0 picks a free port; the port actually bound is passed to ``task_status.started``.
    Raises OSError (bare, not in a group) if the address cannot be bound: in use, not local,
    unknown host name.
    """
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [_bind_address(host, port)]
    config.logger_class = _quiet_log_class()  # type: ignore[assignment]
    config.accesslog = _std_log
    config.errorlog = _std_log
    config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT_S
    config.include_server_header = False
    app = _ApiApp(node, max_body_bytes)

    started = False
    try:
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(serve, app, config)
            actual_port = int(binds[0].rsplit(":", 1)[1])
            log.info("HTTP API listening", address=binds[0], port=actual_port)
            started = True
            task_status.started(actual_port)
    except BaseException as exc:
        # hypercorn raises a bind failure inside exception groups; give the caller the bare
        # OSError, as trio.serve_tcp would, so it can name its own --api-listen flag.
        oserror = None if started else _find_oserror(exc)
        if oserror is None:
            raise
        raise oserror from None
