"""Synchronous clients of the istd HTTP API (``istd status``, ``istd write``, ``istd load``).

Plain ``http.client``: the CLI is synchronous, and one keep-alive connection is all a load
generator needs. Every failure reaches the caller as a :class:`ClientError` with one line that
names the node and says what to check:

    ClientError
    ├── NodeUnreachable   no TCP connection, no answer in time, or not an istd API on that port
    └── NodeRefused       the node answered with an error (``status``: 400, 409, 413, 503, 500, ...)

Load generation (:func:`run_load`) in the manner of pt-heartbeat: ``count`` mode sends N
synthetic write-sets as fast as the node takes them, in batches; ``rate`` mode paces R
write-sets/s for D seconds with :func:`pace` (one small batch per tick, catching up after a slow
tick but never more than one second's worth at once). A 503 (flow control, node not ready) is
retried with a short backoff: the node promises a 503 wrote nothing, so a retry cannot duplicate.
A lost connection during a write is not retried (the write may or may not have happened).
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import math
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from istd.errors import ConfigError, IstError
from istd.http import DEFAULT_API_PORT, KEEP_ALIVE_TIMEOUT_S, MAX_BODY_BYTES, join_writesets
from istd.writeset import Op, RowChange, WriteSetError, synthetic

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_SIZE_BYTES",
    "REQUEST_TIMEOUT_S",
    "ClientError",
    "InvalidNodeAddress",
    "LoadReport",
    "NodeAddress",
    "NodeRefused",
    "NodeUnreachable",
    "fetch_status",
    "format_cluster",
    "format_node",
    "format_status",
    "pace",
    "parse_node",
    "run_load",
    "send_write",
    "send_writesets",
]

NodeAddress = tuple[str, int]

# Long enough for a 64 MiB batch to be decoded and applied on a slow disk; short enough that a
# hung node is reported rather than waited on forever.
REQUEST_TIMEOUT_S = 60.0
# A connection idle longer than this is replaced before use: the server drops idle connections
# after KEEP_ALIVE_TIMEOUT_S, and a POST on a connection the server just closed would leave us
# unable to tell whether the write happened.
IDLE_REUSE_S = KEEP_ALIVE_TIMEOUT_S / 2
# 1000 write-sets of 500 bytes = 0.5 MB per request: few enough requests for full speed, small
# enough to leave room under MAX_BODY_BYTES and to keep a 503 retry cheap.
DEFAULT_BATCH = 1000
DEFAULT_SIZE_BYTES = 500
# Rate mode wakes up this often; each tick sends what is due (R/10 write-sets at a steady rate).
TICK_S = 0.1
# 503 backoff: starts short (flow control usually lifts in milliseconds), doubles to a ceiling.
RETRY_FIRST_S = 0.02
RETRY_MAX_S = 1.0
# Count mode has no duration to bound retries; give up after this long without progress.
RETRY_BUDGET_S = 60.0

# Rows shown first by format_cluster, in this order; any other key follows, sorted.
CLUSTER_ROWS = (
    "wsrep_local_state_comment",
    "wsrep_local_state",
    "wsrep_last_committed",
    "wsrep_local_recv_queue",
    "wsrep_local_cached_downto",
    "wsrep_ist_receive_status",
    "wsrep_local_state_uuid",
    "istd_state_digest",
)
# A digest is shown by its first characters side by side: enough to see two nodes differ.
SHORT_DIGEST_CHARS = 12

_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?")


class ClientError(IstError):
    """A request to a node's API failed; the message is one line for the user."""


class NodeUnreachable(ClientError):
    """No istd API answered at that address."""


class NodeRefused(ClientError):
    """The node answered with an error. ``status`` is the HTTP status, ``body`` the JSON answer."""

    def __init__(self, msg: str, status: int, body: Mapping[str, Any] | None = None) -> None:
        super().__init__(msg)
        self.status = status
        self.body = dict(body or {})


class InvalidNodeAddress(ConfigError, ValueError):
    """A --node value that is not HOST[:PORT]."""


# ---------------------------------------------------------------------------------------- addresses


def parse_node(text: str) -> NodeAddress:
    """Parse "HOST:PORT", "HOST" (port 4580), "[IPv6]:PORT", "[IPv6]", a bare IPv6 address, or
    any of these after "http://". Raises InvalidNodeAddress with a one-line message.
    """
    raw = text.strip()
    rest = raw[len("http://"):] if raw.lower().startswith("http://") else raw
    rest = rest.rstrip("/")

    def bad(why: str) -> InvalidNodeAddress:
        return InvalidNodeAddress(f"invalid node address {text!r}: {why}; expected HOST:PORT, "
                                  f"e.g. 127.0.0.1:{DEFAULT_API_PORT} or [::1]:{DEFAULT_API_PORT}")

    if not rest:
        raise bad("empty")
    port_text: str | None
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise bad("missing ']'")
        host, after = rest[1:end], rest[end + 1:]
        if after and not after.startswith(":"):
            raise bad(f"unexpected {after!r} after ']'")
        port_text = after[1:] if after else None
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad(f"{host!r} is not an IPv6 address") from None
    elif rest.count(":") > 1:
        try:
            ipaddress.IPv6Address(rest)
        except ValueError:
            raise bad("an IPv6 address with a port must be in brackets") from None
        host, port_text = rest, None
    else:
        host, _, port_text = rest.partition(":")
        if ":" not in rest:
            port_text = None
        if not _HOSTNAME_RE.fullmatch(host):
            raise bad(f"{host!r} is not a host name or address")
    if port_text is None:
        return host, DEFAULT_API_PORT
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise bad(f"port {port_text!r} is not a number from 1 to 65535")
    return host, int(port_text)


def format_node(node: NodeAddress) -> str:
    """ "HOST:PORT", with IPv6 addresses in brackets."""
    host, port = node
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _address(node: str | NodeAddress) -> NodeAddress:
    return parse_node(node) if isinstance(node, str) else node


# ---------------------------------------------------------------------------------------- transport


class _Session:
    """One keep-alive HTTP connection to one node, with errors translated to ClientError."""

    def __init__(self, node: str | NodeAddress, timeout: float = REQUEST_TIMEOUT_S) -> None:
        self.node = _address(node)
        self.name = format_node(self.node)
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None
        self._last_used = 0.0

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> _Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _hint(self) -> str:
        return (f"is an istd daemon (`istd donor`/`istd joiner`) running there with "
                f"--api-listen {self.name}?")

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json") -> Any:
        """Send one request; return the decoded JSON answer of a 2xx, else raise a ClientError."""
        now = time.monotonic()
        if self._conn is not None and now - self._last_used > IDLE_REUSE_S:
            self.close()
        if self._conn is None:
            self._conn = http.client.HTTPConnection(self.node[0], self.node[1], timeout=self.timeout)
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        try:
            self._conn.request(method, path, body=body, headers=headers)
            response = self._conn.getresponse()
            data = response.read()
        except ConnectionRefusedError:
            self.close()
            raise NodeUnreachable(f"cannot connect to {self.name}: connection refused; "
                                  f"{self._hint()}") from None
        except TimeoutError:
            self.close()
            raise NodeUnreachable(f"no answer from {self.name} within {self.timeout:g} s; "
                                  f"is the node overloaded or the address wrong? {self._hint()}") from None
        except socket.gaierror as exc:
            self.close()
            raise NodeUnreachable(f"cannot resolve {self.node[0]!r}: {exc.strerror}") from None
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            what = (exc.strerror if isinstance(exc, OSError) and exc.strerror
                    else str(exc) or type(exc).__name__)
            raise NodeUnreachable(f"connection to {self.name} failed: {what}; {self._hint()} "
                                  f"(--node takes the API port, default {DEFAULT_API_PORT}, not the IST port)"
                                  ) from None
        self._last_used = time.monotonic()
        if response.will_close:
            self.close()
        try:
            answer = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise NodeUnreachable(f"{self.name} answered HTTP {response.status} but not with JSON: it is "
                                  f"not an istd API (--node takes the API port, default "
                                  f"{DEFAULT_API_PORT})") from None
        if 200 <= response.status < 300:
            return answer
        error = answer.get("error") if isinstance(answer, dict) else None
        detail = str(error) if error else data[:200].decode("utf-8", "replace").strip()
        raise NodeRefused(f"{self.name} refused the request (HTTP {response.status}): {detail}",
                          response.status, answer if isinstance(answer, dict) else None)


# ---------------------------------------------------------------------------------------- requests


def fetch_status(node: str | NodeAddress, *, timeout: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
    """GET /status: the node's Galera-named status variables."""
    with _Session(node, timeout) as session:
        answer = session.request("GET", "/status")
    if not isinstance(answer, dict):
        raise NodeUnreachable(f"{format_node(_address(node))} answered /status with a JSON "
                              f"{type(answer).__name__}, not an object: not an istd API")
    return answer


def _change_json(change: RowChange) -> dict[str, str]:
    item = {"op": "delete" if change.op == Op.DELETE else "upsert", "table": change.table}
    for name, raw in (("key", change.key), ("value", change.value)):
        if name == "value" and not raw:
            continue
        try:
            item[name] = raw.decode("utf-8")
        except UnicodeDecodeError:
            item[name + "_hex"] = raw.hex()
    return item


def send_write(node: str | NodeAddress, changes: Sequence[RowChange], *,
               timeout: float = REQUEST_TIMEOUT_S) -> int:
    """POST /write: the changes as one write-set; returns its seqno."""
    body = json.dumps({"changes": [_change_json(ch) for ch in changes]}).encode()
    with _Session(node, timeout) as session:
        answer = session.request("POST", "/write", body)
    return int(answer["seqno"])


def _send_batch(session: _Session, payloads: Sequence[bytes]) -> tuple[int, int]:
    body = join_writesets(list(payloads))
    if len(body) > MAX_BODY_BYTES:
        raise ValueError(f"{len(payloads)} write-sets make a {len(body)}-byte body, over the API's "
                         f"{MAX_BODY_BYTES}; send smaller batches")
    answer = session.request("POST", "/writesets", body, "application/octet-stream")
    return int(answer["first"]), int(answer["last"])


def send_writesets(node: str | NodeAddress, payloads: Sequence[bytes], *,
                   timeout: float = REQUEST_TIMEOUT_S) -> tuple[int, int]:
    """POST /writesets: encoded write-sets in one request; returns (first, last) seqno."""
    with _Session(node, timeout) as session:
        return _send_batch(session, payloads)


# ---------------------------------------------------------------------------------------- display


def _value_text(key: str, value: object, *, short: bool = False) -> str:
    text = "" if value is None else str(value)
    if short and key.endswith("_digest") and len(text) > SHORT_DIGEST_CHARS:
        text = text[:SHORT_DIGEST_CHARS]
    return text


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A `mysql` client style box table."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(cells: Sequence[str]) -> str:
        return "|" + "|".join(f" {c:<{w}} " for c, w in zip(cells, widths, strict=True)) + "|"

    return "\n".join([rule, line(header), rule, *(line(r) for r in rows), rule])


def format_status(status: Mapping[str, object]) -> str:
    """One node's status as `SHOW STATUS` prints it: Variable_name / Value, sorted by name."""
    rows = [(k, _value_text(k, status[k])) for k in sorted(status)]
    return _table(("Variable_name", "Value"), rows)


def format_cluster(statuses: Mapping[str, Mapping[str, object] | BaseException]) -> str:
    """Several nodes side by side: a column per node, a row per variable any node reports.

    The rows operators compare first (state, last committed, queue, cached_downto, digest) come
    first; digests are shortened. A node given as an exception (unreachable, refused) shows an
    ``error`` row with the reason and "-" elsewhere; a variable a node lacks is "-".
    """
    names = list(statuses)
    keys: set[str] = set()
    for st in statuses.values():
        if not isinstance(st, BaseException):
            keys.update(st)
    ordered = [k for k in CLUSTER_ROWS if k in keys] + sorted(keys - set(CLUSTER_ROWS))
    rows: list[list[str]] = []
    errors = {n: st for n, st in statuses.items() if isinstance(st, BaseException)}
    if errors:
        rows.append(["error", *(_error_cell(errors[n]) if n in errors else "" for n in names)])
    for key in ordered:
        row = [key]
        for n in names:
            st = statuses[n]
            row.append("-" if isinstance(st, BaseException) or key not in st
                       else _value_text(key, st[key], short=True))
        rows.append(row)
    return _table(("Variable_name", *names), rows)


def _error_cell(exc: BaseException) -> str:
    if isinstance(exc, NodeRefused):
        return f"HTTP {exc.status}"
    if isinstance(exc, NodeUnreachable):
        return "unreachable"
    return type(exc).__name__


# ---------------------------------------------------------------------------------------- load


@dataclass(frozen=True)
class LoadReport:
    """What a load run achieved. MB is 10**6 bytes (of write-set payload)."""

    count: int
    bytes: int
    elapsed_s: float
    first: int | None
    last: int | None
    retries: int = 0

    @property
    def rate(self) -> float:
        """Write-sets per second."""
        return self.count / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def format(self) -> str:
        seqnos = f"seqnos {self.first}-{self.last}" if self.first is not None else "no seqnos"
        retries = f", {self.retries} retries after 503 (flow control)" if self.retries else ""
        return (f"sent {self.count} write-sets ({self.bytes / 1e6:.2f} MB) in {self.elapsed_s:.2f} s: "
                f"{self.rate:.0f} write-sets/s, {self.mb_per_s:.2f} MB/s, {seqnos}{retries}")


def pace(rate: float, duration: float, *, clock: Callable[[], float] = time.monotonic,
         sleep: Callable[[float], None] = time.sleep, tick: float = TICK_S) -> Iterator[int]:
    """Yield how many write-sets to send now, tick by tick, for ``rate``/s over ``duration`` s.

    The total is round(rate * duration) unless the consumer falls more than one second behind:
    what is due is then capped at one second's worth (ceil(rate)) and the excess is dropped, so a
    stall never turns into a burst. The last yield comes at or after the deadline.
    """
    if rate <= 0 or duration <= 0:
        raise ValueError("rate and duration must be positive")
    total = round(rate * duration)
    max_burst = max(1, math.ceil(rate))
    start = clock()
    sent = 0
    while True:
        elapsed = clock() - start
        done = elapsed >= duration
        due = total if done else min(total, math.floor(rate * elapsed))
        backlog = due - sent
        if backlog > max_burst:
            # Forget what could not be sent in time: the schedule moves on, it does not burst.
            total -= backlog - max_burst
            backlog = max_burst
        if backlog > 0:
            sent += backlog
            yield backlog
        if done or sent >= total:
            return
        sleep(max(0.0, min(tick, start + duration - clock())))


def run_load(
    node: str | NodeAddress,
    *,
    count: int | None = None,
    rate: float | None = None,
    duration: float | None = None,
    size: int = DEFAULT_SIZE_BYTES,
    batch: int = DEFAULT_BATCH,
    table: str = "t",
    keyspace: int | None = None,
    timeout: float = REQUEST_TIMEOUT_S,
) -> LoadReport:
    """Send synthetic write-sets: ``count`` as fast as possible, or ``rate``/s for ``duration`` s.

    Raises ValueError for a bad combination of arguments, NodeUnreachable / NodeRefused as the
    node answers (a 503 is retried until the duration ends, or for RETRY_BUDGET_S in count mode).
    """
    if (count is None) == (rate is None and duration is None):
        raise ValueError("give either count, or rate and duration")
    if count is None and (rate is None or duration is None):
        raise ValueError("rate mode needs both rate and duration")
    if count is not None and count <= 0:
        raise ValueError("count must be positive")
    if batch <= 0 or size <= 0:
        raise ValueError("batch and size must be positive")
    if keyspace is not None and keyspace <= 0:
        raise ValueError("keyspace must be positive")
    if batch * (size + 4) > MAX_BODY_BYTES:
        raise ValueError(f"a batch of {batch} write-sets of {size} bytes exceeds the API's "
                         f"{MAX_BODY_BYTES}-byte request limit; lower --batch")
    try:
        synthetic(1, size, table=table, keyspace=keyspace)
    except WriteSetError as exc:
        raise ValueError(str(exc)) from None

    start = time.monotonic()
    deadline = start + duration if duration is not None else None
    state = _LoadState()
    with _Session(node, timeout) as session:
        if count is not None:
            while state.count < count:
                if not _send_with_retry(session, state, min(batch, count - state.count), size, table,
                                        keyspace, deadline):
                    break
        else:
            assert rate is not None and duration is not None
            for due in pace(rate, duration):
                while due > 0:
                    n = min(batch, due)
                    if not _send_with_retry(session, state, n, size, table, keyspace, deadline):
                        due = 0
                        break
                    due -= n
    return LoadReport(count=state.count, bytes=state.bytes, elapsed_s=time.monotonic() - start,
                      first=state.first, last=state.last, retries=state.retries)


class _LoadState:
    def __init__(self) -> None:
        # Each run writes rows of its own (unless --keyspace says otherwise), so two loads never rewrite the
        # same rows with the same values: a lost or repeated write-set always shows in the state digest.
        self.key_base = secrets.randbits(40)
        self.count = 0
        self.bytes = 0
        self.first: int | None = None
        self.last: int | None = None
        self.retries = 0


def _send_with_retry(session: _Session, state: _LoadState, n: int, size: int, table: str,
                     keyspace: int | None, deadline: float | None) -> bool:
    """Send n synthetic write-sets; False if a 503 outlasted the deadline (in rate mode)."""
    base = state.key_base + state.count + 1
    payloads = [synthetic(base + i, size, table=table, keyspace=keyspace) for i in range(n)]
    backoff = RETRY_FIRST_S
    give_up = deadline if deadline is not None else time.monotonic() + RETRY_BUDGET_S
    while True:
        try:
            first, last = _send_batch(session, payloads)
        except NodeRefused as exc:
            if exc.status != 503:
                raise
            if time.monotonic() + backoff > give_up:
                if deadline is not None:
                    return False
                raise
            state.retries += 1
            time.sleep(backoff)
            backoff = min(backoff * 2, RETRY_MAX_S)
            continue
        state.count += n
        state.bytes += sum(len(p) for p in payloads)
        state.first = first if state.first is None else state.first
        state.last = last
        return True
