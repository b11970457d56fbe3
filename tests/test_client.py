"""The synchronous clients (istd/client.py) and the CLI commands (istd/cli_client.py)."""

from __future__ import annotations

import json
import queue
import socket
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import click
import pytest
import trio
from click.testing import CliRunner

from istd import cli_client
from istd.cli_client import EXIT_REFUSED, EXIT_UNREACHABLE, load_cmd, status_cmd, write_cmd
from istd.client import (
    InvalidNodeAddress,
    LoadReport,
    NodeRefused,
    NodeUnreachable,
    fetch_status,
    format_cluster,
    format_status,
    pace,
    parse_node,
    run_load,
    send_write,
    send_writesets,
)
from istd.errors import ConfigError
from istd.http import FlowControlPaused, NotWriter, serve_api
from istd.writeset import Op, RowChange, decode, synthetic

JOIN_TIMEOUT_S = 10


class FakeNode:
    """In-memory writer: seqno N is writesets[N-1]. ``refuse_next`` errors are raised first, in order."""

    def __init__(self, name: str = "node1") -> None:
        self.name = name
        self.writesets: list[bytes] = []
        self.refuse_next: list[BaseException] = []
        self.calls = 0

    def status(self) -> Mapping[str, str | int | float]:
        return {
            "wsrep_local_state": 4,
            "wsrep_local_state_comment": "Synced",
            "wsrep_last_committed": len(self.writesets),
            "wsrep_local_cached_downto": 1 if self.writesets else 0,
            "istd_state_digest": f"{self.name}-0123456789abcdef",
        }

    async def write(self, payloads: list[bytes]) -> tuple[int, int]:
        self.calls += 1
        if self.refuse_next:
            raise self.refuse_next.pop(0)
        first = len(self.writesets) + 1
        self.writesets.extend(payloads)
        return first, len(self.writesets)


class ThreadServer:
    """serve_api in a background thread with its own trio loop."""

    def __init__(self, node: FakeNode) -> None:
        self.node = node
        self._ready: queue.Queue[tuple[int, trio.lowlevel.TrioToken, trio.CancelScope] | BaseException] = (
            queue.Queue())
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    async def _main(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(serve_api, self.node, "127.0.0.1", 0)
                self._ready.put((port, trio.lowlevel.current_trio_token(), nursery.cancel_scope))
        except BaseException as exc:
            self._ready.put(exc)
            raise

    def __enter__(self) -> str:
        self._thread.start()
        got = self._ready.get(timeout=JOIN_TIMEOUT_S)
        if isinstance(got, BaseException):
            raise got
        port, self._token, self._scope = got
        return f"127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(JOIN_TIMEOUT_S)
        assert not self._thread.is_alive()


@pytest.fixture
def server() -> Iterator[tuple[FakeNode, str]]:
    node = FakeNode()
    with ThreadServer(node) as address:
        yield node, address


@pytest.fixture
def dead_address() -> str:
    """An address where nothing listens (a port the kernel just gave out and we released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"


# ---------------------------------------------------------------------------------------- parse_node


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:4581", ("127.0.0.1", 4581)),
    ("db1.example.com", ("db1.example.com", 4580)),
    ("localhost:1", ("localhost", 1)),
    ("[::1]:4590", ("::1", 4590)),
    ("[::1]", ("::1", 4580)),
    ("fe80::1", ("fe80::1", 4580)),
    (" http://10.0.0.2:4580/ ", ("10.0.0.2", 4580)),
])
def test_parse_node(text: str, expected: tuple[str, int]) -> None:
    assert parse_node(text) == expected


@pytest.mark.parametrize("text", [
    "", "host:", "host:0", "host:65536", "host:http", "a b:1", "[::1", "[::1]x", "[nope]:1",
    "1:2:3:zz", "host:1:2", "-host:1",
])
def test_parse_node_rejects_garbage(text: str) -> None:
    with pytest.raises(InvalidNodeAddress) as info:
        parse_node(text)
    assert isinstance(info.value, ValueError) and isinstance(info.value, ConfigError)
    message = str(info.value)
    assert "\n" not in message and "HOST:PORT" in message and repr(text) in message


# ---------------------------------------------------------------------------------------- formatting


def test_format_status_is_show_status_table() -> None:
    text = format_status({"wsrep_local_state_comment": "Synced", "wsrep_last_committed": 1363})
    assert text == "\n".join([
        "+---------------------------+--------+",
        "| Variable_name             | Value  |",
        "+---------------------------+--------+",
        "| wsrep_last_committed      | 1363   |",
        "| wsrep_local_state_comment | Synced |",
        "+---------------------------+--------+",
    ])


def test_format_cluster_side_by_side() -> None:
    text = format_cluster({
        "node1:4580": {"wsrep_last_committed": 10, "wsrep_local_state_comment": "Synced",
                       "istd_state_digest": "0123456789abcdef0123", "zz_extra": 1},
        "node2:4580": {"wsrep_last_committed": 7,
                       "wsrep_local_state_comment": "Joining: receiving State Transfer",
                       "istd_state_digest": "fedcba9876543210fedc"},
        "node3:4580": NodeUnreachable("cannot connect"),
    })
    assert text == "\n".join([
        "+---------------------------+--------------+-----------------------------------+-------------+",
        "| Variable_name             | node1:4580   | node2:4580                        | node3:4580  |",
        "+---------------------------+--------------+-----------------------------------+-------------+",
        "| error                     |              |                                   | unreachable |",
        "| wsrep_local_state_comment | Synced       | Joining: receiving State Transfer | -           |",
        "| wsrep_last_committed      | 10           | 7                                 | -           |",
        "| istd_state_digest         | 0123456789ab | fedcba987654                      | -           |",
        "| zz_extra                  | 1            | -                                 | -           |",
        "+---------------------------+--------------+-----------------------------------+-------------+",
    ])


def test_load_report_format() -> None:
    report = LoadReport(count=1000, bytes=500_000, elapsed_s=2.0, first=11, last=1010, retries=3)
    assert report.rate == 500
    assert report.mb_per_s == 0.25
    assert report.format() == ("sent 1000 write-sets (0.50 MB) in 2.00 s: 500 write-sets/s, 0.25 MB/s, "
                               "seqnos 11-1010, 3 retries after 503 (flow control)")


# ---------------------------------------------------------------------------------------- pace (fake clock)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.stalls: dict[int, float] = {}  # sleep call number -> extra seconds lost
        self.calls = 0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.calls += 1
        self.now += seconds + self.stalls.get(self.calls, 0.0)


def test_pace_steady_ticks_send_the_exact_total() -> None:
    clock = FakeClock()
    sends = list(pace(100, 2.0, clock=clock, sleep=clock.sleep, tick=0.1))
    assert sum(sends) == 200
    assert max(sends) <= 11
    assert clock.now == pytest.approx(2.0)


def test_pace_catches_up_after_slow_tick_but_never_bursts_over_one_second() -> None:
    clock = FakeClock()
    clock.stalls = {5: 0.35}  # one tick 350 ms late: caught up in one send
    sends = list(pace(100, 2.0, clock=clock, sleep=clock.sleep, tick=0.1))
    assert sum(sends) == 200
    assert max(sends) >= 35

    clock = FakeClock()
    clock.stalls = {3: 5.0}  # a 5 s stall in a 10 s run: at most 1 s worth at once, the rest dropped
    sends = list(pace(100, 10.0, clock=clock, sleep=clock.sleep, tick=0.1))
    assert max(sends) == 100
    assert sum(sends) < 1000


def test_pace_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        next(pace(0, 1))


# ---------------------------------------------------------------------------------------- requests


def test_fetch_status_send_write_send_writesets(server: tuple[FakeNode, str]) -> None:
    node, address = server
    assert fetch_status(address)["wsrep_last_committed"] == 0
    assert send_write(address, [RowChange(Op.UPSERT, "t", b"k", "värde".encode()),
                                RowChange(Op.UPSERT, "t", b"\xff\x00", b"\x80")]) == 1
    assert decode(node.writesets[0]) == [RowChange(Op.UPSERT, "t", b"k", "värde".encode()),
                                         RowChange(Op.UPSERT, "t", b"\xff\x00", b"\x80")]
    assert send_write(address, [RowChange(Op.DELETE, "t", b"k")]) == 2
    payloads = [synthetic(i, 300) for i in range(50)]
    assert send_writesets(address, payloads) == (3, 52)
    assert node.writesets[2:] == payloads
    assert fetch_status(("127.0.0.1", int(address.rsplit(":", 1)[1])))["wsrep_last_committed"] == 52


def test_refusals_carry_status_and_message(server: tuple[FakeNode, str]) -> None:
    node, address = server
    node.refuse_next = [NotWriter("node1 is a joiner; the writer is 127.0.0.2:4580")]
    with pytest.raises(NodeRefused) as info:
        send_write(address, [RowChange(Op.UPSERT, "t", b"k")])
    assert info.value.status == 409
    assert str(info.value) == (f"{address} refused the request (HTTP 409): "
                               "node1 is a joiner; the writer is 127.0.0.2:4580")


def test_unreachable_names_address_and_what_to_check(dead_address: str) -> None:
    with pytest.raises(NodeUnreachable) as info:
        fetch_status(dead_address)
    message = str(info.value)
    assert dead_address in message and "connection refused" in message and "--api-listen" in message
    assert "\n" not in message


def test_not_an_istd_api() -> None:
    """Something else on the port (here: a server that answers plain text) is reported as such."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def answer_once() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")

    thread = threading.Thread(target=answer_once, daemon=True)
    thread.start()
    try:
        with pytest.raises(NodeUnreachable, match="not an istd API"):
            fetch_status(f"127.0.0.1:{port}")
    finally:
        thread.join(JOIN_TIMEOUT_S)
        listener.close()


# ---------------------------------------------------------------------------------------- run_load


def test_run_load_count_mode_batches(server: tuple[FakeNode, str]) -> None:
    node, address = server
    report = run_load(address, count=2500, batch=1000, size=200, keyspace=100)
    assert (report.count, report.first, report.last, report.retries) == (2500, 1, 2500, 0)
    assert report.bytes == sum(len(p) for p in node.writesets)
    assert node.calls == 3
    assert len(node.writesets) == 2500
    assert all(len(p) == 200 for p in node.writesets)
    assert {decode(p)[0].key for p in node.writesets} == {b"k%d" % i for i in range(100)}


def test_run_load_rate_mode_sends_rate_times_duration(server: tuple[FakeNode, str]) -> None:
    node, address = server
    report = run_load(address, rate=200, duration=0.25, size=100, batch=7)
    assert report.count == 50 == len(node.writesets)
    assert (report.first, report.last) == (1, 50)


def test_run_load_retries_503_then_succeeds(server: tuple[FakeNode, str]) -> None:
    node, address = server
    node.refuse_next = [FlowControlPaused("paused"), FlowControlPaused("paused")]
    report = run_load(address, count=10, batch=4)
    assert (report.count, report.retries, report.first, report.last) == (10, 2, 1, 10)
    assert node.calls == 5


def test_run_load_does_not_retry_409(server: tuple[FakeNode, str]) -> None:
    node, address = server
    node.refuse_next = [NotWriter("not the writer")]
    with pytest.raises(NodeRefused) as info:
        run_load(address, count=10)
    assert info.value.status == 409
    assert node.calls == 1


@pytest.mark.parametrize("kwargs", [
    {}, {"count": 1, "rate": 1, "duration": 1}, {"rate": 5}, {"count": 0}, {"count": 1, "batch": 0},
    {"count": 1, "table": "bad table"}, {"count": 1, "batch": 1_000_000, "size": 1000},
])
def test_run_load_rejects_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        run_load("127.0.0.1:1", **kwargs)


# ---------------------------------------------------------------------------------------- CLI


def _cli() -> click.Group:
    group = click.Group("istd")
    for cmd in (status_cmd, write_cmd, load_cmd):
        group.add_command(cmd)
    return group


def test_cli_status_one_node_and_json(server: tuple[FakeNode, str]) -> None:
    _, address = server
    result = CliRunner().invoke(_cli(), ["status", "--node", address])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[1].split() == ["|", "Variable_name", "|", "Value", "|"]
    assert "| wsrep_local_state_comment | Synced" in result.output
    result = CliRunner().invoke(_cli(), ["status", "--node", address, "--json"])
    assert result.exit_code == 0
    assert json.loads(result.output)["wsrep_local_state"] == 4


def test_cli_status_side_by_side(dead_address: str) -> None:
    with ThreadServer(FakeNode("a")) as a, ThreadServer(FakeNode("b")) as b:
        result = CliRunner().invoke(_cli(), ["status", "--node", a, "--node", b])
        assert result.exit_code == 0, result.output
        header = result.output.splitlines()[1]
        assert a in header and b in header
        assert "a-0123456789" in result.output and "b-0123456789" in result.output
        result = CliRunner().invoke(_cli(), ["status", "--node", a, "--node", dead_address, "--json"])
    assert result.exit_code == EXIT_UNREACHABLE
    doc = json.loads(result.stdout)
    assert doc[a]["wsrep_local_state"] == 4 and "connection refused" in doc[dead_address]["error"]


def test_cli_unreachable_exit_3_one_line(dead_address: str) -> None:
    for args in (["status"], ["write", "--key", "k"], ["load", "--count", "1"]):
        result = CliRunner().invoke(_cli(), [*args, "--node", dead_address])
        assert result.exit_code == EXIT_UNREACHABLE == 3, result.output
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: cannot connect to " + dead_address)
        assert "Traceback" not in result.output
        assert not isinstance(result.exception, NodeUnreachable)


def test_cli_write_and_refusal(server: tuple[FakeNode, str]) -> None:
    node, address = server
    args = ["write", "--node", address, "--table", "t", "--key", "k", "--value", "v"]
    result = CliRunner().invoke(_cli(), args)
    assert (result.exit_code, result.output) == (0, "seqno 1\n")
    result = CliRunner().invoke(_cli(), ["write", "--node", address, "--key", "k", "--delete"])
    assert (result.exit_code, result.output) == (0, "seqno 2\n")
    assert decode(node.writesets[1]) == [RowChange(Op.DELETE, "t", b"k")]
    node.refuse_next = [NotWriter("node1 is a joiner; write to 127.0.0.2:4580")]
    result = CliRunner().invoke(_cli(), ["write", "--node", address, "--key", "k"])
    assert result.exit_code == EXIT_REFUSED == 4
    assert "HTTP 409" in result.stderr and "127.0.0.2:4580" in result.stderr


@pytest.mark.parametrize("args", [
    ["write", "--key", "k", "--value", "v", "--delete"],
    ["write", "--key", "k", "--table", "no spaces"],
    ["write"],
    ["status", "--node", "host:notaport"],
    ["load"],
    ["load", "--count", "5", "--rate", "10", "--duration", "1"],
    ["load", "--rate", "10"],
])
def test_cli_usage_errors_exit_2(args: list[str]) -> None:
    result = CliRunner().invoke(_cli(), args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def test_cli_load(server: tuple[FakeNode, str]) -> None:
    node, address = server
    result = CliRunner().invoke(_cli(), ["load", "--node", address, "--count", "300", "--batch", "100",
                                         "--size", "250"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("sent 300 write-sets (0.07 MB) in ")
    assert "seqnos 1-300" in result.output
    assert node.calls == 3


def test_cli_status_watch_until_ctrl_c(server: tuple[FakeNode, str], monkeypatch: pytest.MonkeyPatch) -> None:
    node, address = server
    sleeps: list[float] = []

    def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 2:
            raise KeyboardInterrupt
        node.writesets.append(synthetic(len(node.writesets) + 1, 100))

    monkeypatch.setattr(cli_client, "_sleep", fake_sleep)
    result = CliRunner().invoke(_cli(), ["status", "--node", address, "--watch", "2"])
    assert result.exit_code == 0, result.output
    assert sleeps == [2.0, 2.0]
    blocks = result.output.split("--- ")[1:]
    assert len(blocks) == 2
    assert "| wsrep_last_committed      | 0 " in blocks[0]
    assert "| wsrep_last_committed      | 1 " in blocks[1]
