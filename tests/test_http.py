"""The HTTP API (istd/http.py) over real HTTP on loopback, against a fake Node."""

from __future__ import annotations

import http.client
import json
import logging
import struct
from collections.abc import Mapping
from functools import partial

import pytest
import trio
from structlog.testing import capture_logs

from istd.errors import IstError
from istd.http import FlowControlPaused, NotReady, NotWriter, join_writesets, serve_api
from istd.writeset import Op, RowChange, decode, encode, synthetic

BUDGET_S = 10


class FakeNode:
    """In-memory writer: seqno N is writesets[N-1]."""

    def __init__(self) -> None:
        self.writesets: list[bytes] = []
        self.refuse: BaseException | None = None
        self.status_error: BaseException | None = None
        self.extra: dict[str, str | int | float] = {}
        self.calls = 0

    def status(self) -> Mapping[str, str | int | float]:
        if self.status_error is not None:
            raise self.status_error
        return {
            "wsrep_local_state": 4,
            "wsrep_local_state_comment": "Synced",
            "wsrep_last_committed": len(self.writesets),
            "wsrep_local_cached_downto": 1 if self.writesets else 0,
            **self.extra,
        }

    async def write(self, payloads: list[bytes]) -> tuple[int, int]:
        self.calls += 1
        if self.refuse is not None:
            raise self.refuse
        first = len(self.writesets) + 1
        self.writesets.extend(payloads)
        return first, len(self.writesets)


Response = tuple[int, dict[str, str], bytes]


def _request_sync(port: int, method: str, path: str, body: bytes | None = None,
                  headers: dict[str, str] | None = None) -> Response:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


async def request(port: int, method: str, path: str, body: bytes | None = None,
                  headers: dict[str, str] | None = None) -> Response:
    return await trio.to_thread.run_sync(partial(_request_sync, port, method, path, body, headers))


async def post_json(port: int, path: str, doc: object) -> tuple[int, dict[str, object]]:
    status, _, body = await request(port, "POST", path, json.dumps(doc).encode(),
                                    {"Content-Type": "application/json"})
    return status, json.loads(body)


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes, read until the server closes; return everything it sent."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        received = bytearray()
        while chunk := await stream.receive_some(65536):
            received += chunk
    return bytes(received)


@pytest.fixture
async def api(nursery: trio.Nursery) -> tuple[FakeNode, int]:
    node = FakeNode()
    port = await nursery.start(serve_api, node, "127.0.0.1", 0)
    return node, port


# ---------------------------------------------------------------------------------------- status


async def test_status_json_sorted(api: tuple[FakeNode, int]) -> None:
    node, port = api
    node.extra = {"istd_state_digest": "ab" * 32, "wsrep_ist_receive_status": ""}
    with trio.fail_after(BUDGET_S):
        status, headers, body = await request(port, "GET", "/status")
    assert status == 200
    assert headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert doc == node.status()
    assert list(doc) == sorted(doc)


async def test_status_text_like_show_status(api: tuple[FakeNode, int]) -> None:
    node, port = api
    node.extra = {"wsrep_ist_receive_status": "50% complete,\treceived"}
    with trio.fail_after(BUDGET_S):
        status, headers, body = await request(port, "GET", "/status?format=text")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    lines = body.decode().splitlines()
    assert lines[0] == "Variable_name\tValue"
    assert lines[1:] == [
        "wsrep_ist_receive_status\t50% complete,\\treceived",
        "wsrep_last_committed\t0",
        "wsrep_local_cached_downto\t0",
        "wsrep_local_state\t4",
        "wsrep_local_state_comment\tSynced",
    ]


async def test_status_bad_format_and_head(api: tuple[FakeNode, int]) -> None:
    _, port = api
    with trio.fail_after(BUDGET_S):
        status, _, body = await request(port, "GET", "/status?format=xml")
        assert status == 400
        assert "format" in json.loads(body)["error"]
        status, _, body = await request(port, "HEAD", "/status")
    assert status == 200 and body == b""


async def test_status_of_node_not_ready_is_503(api: tuple[FakeNode, int]) -> None:
    node, port = api
    node.status_error = NotReady("the node is opening its gcache")
    with trio.fail_after(BUDGET_S):
        status, _, body = await request(port, "GET", "/status")
    assert status == 503
    assert json.loads(body) == {"error": "the node is opening its gcache"}


# ---------------------------------------------------------------------------------------- /write


async def test_write_upsert_delete_and_binary(api: tuple[FakeNode, int]) -> None:
    node, port = api
    with trio.fail_after(BUDGET_S):
        status, answer = await post_json(port, "/write", {"changes": [
            {"op": "upsert", "table": "t", "key": "k1", "value": "v1"},
            {"op": "upsert", "table": "t2", "key_hex": "00ff", "value_hex": "de ad"},
        ]})
        assert (status, answer) == (200, {"seqno": 1})
        delete = {"op": "delete", "table": "t", "key": "k1"}
        status, answer = await post_json(port, "/write", {"changes": [delete]})
        assert (status, answer) == (200, {"seqno": 2})
    assert decode(node.writesets[0]) == [
        RowChange(Op.UPSERT, "t", b"k1", b"v1"),
        RowChange(Op.UPSERT, "t2", b"\x00\xff", b"\xde\xad"),
    ]
    assert decode(node.writesets[1]) == [RowChange(Op.DELETE, "t", b"k1")]


@pytest.mark.parametrize("doc", [
    [1, 2],
    {"changes": []},
    {"changes": "x"},
    {"changes": [{"op": "upsert", "table": "t", "key": "k"}], "extra": 1},
    {"changes": [{"op": "merge", "table": "t", "key": "k"}]},
    {"changes": [{"op": "upsert", "table": "t"}]},
    {"changes": [{"op": "upsert", "key": "k"}]},
    {"changes": [{"op": "upsert", "table": "t", "key": "k", "key_hex": "00"}]},
    {"changes": [{"op": "upsert", "table": "t", "key_hex": "zz"}]},
    {"changes": [{"op": "upsert", "table": "t", "key": 5}]},
    {"changes": [{"op": "upsert", "table": "t", "key": "k", "colour": "red"}]},
    {"changes": [{"op": "upsert", "table": "no spaces", "key": "k"}]},
    {"changes": [{"op": "delete", "table": "t", "key": "k", "value": "v"}]},
    {"changes": ["not an object"]},
])
async def test_write_bad_request_writes_nothing(api: tuple[FakeNode, int], doc: object) -> None:
    node, port = api
    with trio.fail_after(BUDGET_S):
        status, answer = await post_json(port, "/write", doc)
    assert status == 400
    assert isinstance(answer["error"], str) and answer["error"]
    assert "Traceback" not in answer["error"]
    assert node.calls == 0


async def test_write_not_json(api: tuple[FakeNode, int]) -> None:
    node, port = api
    with trio.fail_after(BUDGET_S):
        status, _, body = await request(port, "POST", "/write", b"{not json")
    assert status == 400
    assert json.loads(body)["error"].startswith("body is not JSON")
    assert node.calls == 0


# ---------------------------------------------------------------------------------------- /writesets


async def test_writesets_batch(api: tuple[FakeNode, int]) -> None:
    node, port = api
    node.writesets = [synthetic(0, 100)] * 10  # seqnos 1-10 exist already
    payloads = [synthetic(i, 200 + i % 50, keyspace=17) for i in range(3000)]
    with trio.fail_after(BUDGET_S):
        status, _, body = await request(port, "POST", "/writesets", join_writesets(payloads),
                                        {"Content-Type": "application/octet-stream"})
    assert status == 200
    assert json.loads(body) == {"first": 11, "last": 3010, "count": 3000}
    assert node.writesets[10:] == payloads
    assert node.calls == 1


@pytest.mark.parametrize("body", [
    b"",
    b"\x05\x00",                                            # truncated length prefix
    struct.pack("<I", 100) + b"short",                      # length beyond the body
    join_writesets([synthetic(1, 100), b"garbage!"]),       # invalid write-set after a valid one
    join_writesets([synthetic(1, 100)]) + b"\x00",          # trailing partial prefix
])
async def test_writesets_bad_body_writes_nothing(api: tuple[FakeNode, int], body: bytes) -> None:
    node, port = api
    with trio.fail_after(BUDGET_S):
        status, _, answer = await request(port, "POST", "/writesets", body)
    assert status == 400
    assert json.loads(answer)["error"]
    assert node.calls == 0 and node.writesets == []


# ---------------------------------------------------------------------------------- routing and refusals


async def test_wrong_method_and_unknown_path(api: tuple[FakeNode, int]) -> None:
    _, port = api
    with trio.fail_after(BUDGET_S):
        status, headers, body = await request(port, "GET", "/write")
        assert status == 405
        assert headers["allow"] == "POST"
        assert "GET is not allowed on /write" in json.loads(body)["error"]
        status, headers, _ = await request(port, "DELETE", "/status")
        assert status == 405 and headers["allow"] == "GET, HEAD"
        status, _, body = await request(port, "GET", "/nope")
    assert status == 404
    assert "/status" in json.loads(body)["error"]


async def test_not_writer_is_409_naming_the_writer(api: tuple[FakeNode, int]) -> None:
    node, port = api
    node.refuse = NotWriter("this node (node2) is a joiner; send writes to 127.0.0.2:4580",
                            writer="127.0.0.2:4580")
    with trio.fail_after(BUDGET_S):
        status, answer = await post_json(port, "/write", {"changes": [{"table": "t", "key": "k"}]})
    assert status == 409
    assert "127.0.0.2:4580" in str(answer["error"])
    assert answer["writer"] == "127.0.0.2:4580"


async def test_not_writer_inside_exception_group_is_409(api: tuple[FakeNode, int]) -> None:
    node, port = api
    node.refuse = ExceptionGroup("from a nursery", [NotWriter("not the writer")])
    with trio.fail_after(BUDGET_S):
        status, _, _ = await request(port, "POST", "/writesets", join_writesets([synthetic(1, 100)]))
    assert status == 409


async def test_flow_control_is_503(api: tuple[FakeNode, int]) -> None:
    node, port = api
    node.refuse = FlowControlPaused("replication paused by flow control (recv queue 120 > 100)")
    with trio.fail_after(BUDGET_S):
        status, headers, body = await request(port, "POST", "/writesets", join_writesets([synthetic(1, 100)]))
    assert status == 503
    assert headers["retry-after"] == "1"
    assert "flow control" in json.loads(body)["error"]


async def test_other_errors_are_500_without_traceback(api: tuple[FakeNode, int]) -> None:
    node, port = api
    node.refuse = IstError("gcache full: all buffers locked")
    with trio.fail_after(BUDGET_S):
        status, _, body = await request(port, "POST", "/writesets", join_writesets([synthetic(1, 100)]))
        assert (status, json.loads(body)) == (500, {"error": "gcache full: all buffers locked"})
        node.refuse = ZeroDivisionError("secret internals")
        with capture_logs() as logs:
            status, _, body = await request(port, "POST", "/writesets", join_writesets([synthetic(1, 100)]))
    assert status == 500
    error = json.loads(body)["error"]
    assert "secret internals" not in error and "Traceback" not in error
    assert any(e["log_level"] == "error" and isinstance(e.get("exc_info"), ZeroDivisionError) for e in logs)


# ---------------------------------------------------------------------------------------- hostile clients


async def test_oversize_body_is_413(nursery: trio.Nursery) -> None:
    node = FakeNode()
    port = await nursery.start(partial(serve_api, node, "127.0.0.1", 0, max_body_bytes=1000))
    with trio.fail_after(BUDGET_S):
        # Announced too large: answered before the body is sent.
        head = b"POST /writesets HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n"
        answer = await raw_exchange(port, head)
        assert answer.startswith(b"HTTP/1.1 413 ")
        # Chunked, no length announced: the server stops reading at the limit.
        chunk = b"x" * 600
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(3)) + b"0\r\n\r\n"
        answer = await raw_exchange(port, b"POST /writesets HTTP/1.1\r\nHost: x\r\n"
                                          b"Transfer-Encoding: chunked\r\n\r\n" + chunked)
        assert answer.startswith(b"HTTP/1.1 413 ")
        assert b"larger than 1000 bytes" in answer
        # Just under the limit is fine.
        status, _, _ = await request(port, "POST", "/writesets", join_writesets([synthetic(1, 900)]))
    assert status == 200
    assert node.calls == 1


async def test_half_request_and_disconnect_does_not_disturb(api: tuple[FakeNode, int]) -> None:
    node, port = api
    with trio.fail_after(BUDGET_S):
        # Half a request line, then gone.
        s1 = await trio.open_tcp_stream("127.0.0.1", port)
        await s1.send_all(b"POST /wri")
        await s1.aclose()
        # Headers and part of the body, then gone.
        s2 = await trio.open_tcp_stream("127.0.0.1", port)
        await s2.send_all(b"POST /writesets HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n\x10\x00")
        await s2.aclose()
        # One that stays half-sent while others are served.
        s3 = await trio.open_tcp_stream("127.0.0.1", port)
        await s3.send_all(b"POST /write HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"chan")
        status, _, body = await request(port, "POST", "/writesets", join_writesets([synthetic(1, 100)]))
        assert (status, json.loads(body)) == (200, {"first": 1, "last": 1, "count": 1})
        status, _, _ = await request(port, "GET", "/status")
        assert status == 200
        # Garbage instead of HTTP gets a 400 from hypercorn, not a crash.
        answer = await raw_exchange(port, b"\x16\x03\x01 not http at all\r\n\r\n")
        assert answer == b"" or answer.startswith(b"HTTP/1.1 400")
        await s3.aclose()
    assert node.writesets == [synthetic(1, 100)]


async def test_keep_alive_serves_many_requests() -> None:
    node = FakeNode()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_api, node, "127.0.0.1", 0)

        def many() -> list[int]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            seqnos = []
            for i in range(20):
                conn.request("POST", "/write", json.dumps({"changes": [{"table": "t", "key": str(i)}]}))
                seqnos.append(json.loads(conn.getresponse().read())["seqno"])
            conn.close()
            return seqnos

        with trio.fail_after(BUDGET_S):
            assert await trio.to_thread.run_sync(many) == list(range(1, 21))
        nursery.cancel_scope.cancel()
    assert decode(node.writesets[19]) == [RowChange(Op.UPSERT, "t", b"19")]
    assert encode([RowChange(Op.UPSERT, "t", b"0")]) == node.writesets[0]


# ---------------------------------------------------------------------------------------- lifecycle


async def test_cancellation_stops_server_with_open_connections() -> None:
    with trio.fail_after(BUDGET_S):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_api, FakeNode(), "127.0.0.1", 0)
            idle = await trio.open_tcp_stream("127.0.0.1", port)
            busy = await trio.open_tcp_stream("127.0.0.1", port)
            await busy.send_all(b"POST /write HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{")
            status, _, _ = await request(port, "GET", "/status")
            assert status == 200
            nursery.cancel_scope.cancel()
        # The listener is gone: a new connection is refused.
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)
        await idle.aclose()
        await busy.aclose()


async def test_port_in_use_raises_bare_oserror(api: tuple[FakeNode, int], nursery: trio.Nursery) -> None:
    _, port = api
    with trio.fail_after(BUDGET_S), pytest.raises(OSError) as info:
        await nursery.start(serve_api, FakeNode(), "127.0.0.1", port)
    assert "in use" in str(info.value)


class GatedNode(FakeNode):
    """A writer that holds each write until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = trio.Event()
        self.gate = trio.Event()
        self.written = trio.Event()

    async def write(self, payloads: list[bytes]) -> tuple[int, int]:
        self.entered.set()
        await self.gate.wait()
        try:
            return await super().write(payloads)
        finally:
            self.written.set()


async def test_client_gone_during_write_does_not_disturb(
        nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    node = GatedNode()
    port = await nursery.start(serve_api, node, "127.0.0.1", 0)
    body = join_writesets([synthetic(1, 100)])
    with trio.fail_after(BUDGET_S), capture_logs() as logs:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"POST /writesets HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                              % (len(body), body))
        await node.entered.wait()
        await stream.aclose()
        node.gate.set()
        await node.written.wait()
        status, _, answer = await request(port, "POST", "/writesets", body)
    assert (status, json.loads(answer)) == (200, {"first": 2, "last": 2, "count": 1})
    assert node.writesets == [synthetic(1, 100)] * 2
    assert not [e for e in logs if e["log_level"] in ("error", "warning")]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
