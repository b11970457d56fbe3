"""In-process daemon tests: a real IstServer on loopback TCP, real and hostile clients."""

from __future__ import annotations

import functools
import struct
import uuid
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog
import trio

from istd import exitcodes
from istd import joiner as joiner_mod
from istd.config import resolve
from istd.donor import IstServer, decide_ist, safe_ist_seqno
from istd.joiner import Joiner, JoinFailed
from istd.node import LocalNode
from istd.states import NodeState
from istd.trioutil import next_event
from istd.writeset import synthetic
from protocol import (
    C_OK,
    NEED_DATA,
    SUPPORTED_VERSIONS,
    Accept,
    Connection,
    ConnectionClosed,
    Ctrl,
    Handshake,
    HandshakeResponse,
    RefusalReason,
    Role,
    Segment,
    TransferKind,
)

OPTIONS = "gcache.size=8M; ist.handshake_timeout=PT0.5S; ist.idle_timeout=PT1S; ist.keepalive_period=PT0.2S"
GAP = 3000


def make_node(path: Path, role: str, extra: str = "") -> LocalNode:
    opts = resolve(("test", OPTIONS + ("; " + extra if extra else "")))
    return LocalNode(datadir=path, name=path.name, options=opts, applier="sqlite", role=role)


@pytest.fixture
async def donor(tmp_path: Path) -> AsyncIterator[tuple[LocalNode, IstServer, int]]:
    node = make_node(tmp_path / "donor", "donor")
    node.open(bootstrap=True)
    node.shift(NodeState.SYNCED)
    for start in range(1, GAP + 1, 500):
        await node.write([synthetic(s, 200) for s in range(start, start + 500)])
    server = IstServer(node)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        yield node, server, port
        nursery.cancel_scope.cancel()
    node.close()


def joiner_node(tmp_path: Path, donor: LocalNode, name: str = "joiner") -> LocalNode:
    from istd import grastate

    d = tmp_path / name
    d.mkdir()
    grastate.write(d, grastate.SavedState(uuid=donor.uuid, seqno=0, safe_to_bootstrap=False))
    node = make_node(d, "joiner")
    node.open()
    return node


async def catch_up(tmp_path: Path, donor: LocalNode, port: int, name: str = "joiner") -> LocalNode:
    node = joiner_node(tmp_path, donor, name)
    try:
        assert await Joiner(node, [("127.0.0.1", port)]).run() == 0
    finally:
        node.close()
    return node


async def test_joiner_catches_up_in_process(tmp_path: Path, donor: tuple[LocalNode, IstServer, int]) -> None:
    node, server, port = donor
    with trio.fail_after(30):
        joined = await catch_up(tmp_path, node, port)
    assert joined.last_committed == GAP
    assert joined.state is NodeState.SYNCED
    reopened = make_node(joined.datadir, "joiner")
    reopened.open()
    try:
        assert reopened.applier.digest() == node.applier.digest()
        assert reopened.gcache.seqno_min == 1 and reopened.gcache.seqno_max == GAP
    finally:
        reopened.close()
    assert server.counters["istd_ist_served"] == 1


async def _raw(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port)


async def _read_until_closed(stream: trio.SocketStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


def _handshake(cluster_uuid: uuid.UUID, last_applied: int = 0) -> Handshake:
    return Handshake(cluster_uuid=cluster_uuid, last_applied=last_applied, first=last_applied + 1, last=-1,
                     accept=Accept.IST, versions=SUPPORTED_VERSIONS, node_name="hostile")


def _events(conn: Connection, data: bytes) -> list[object]:
    conn.receive_data(data)
    conn.receive_data(b"")
    events = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
        if type(event).__name__ == "ConnectionClosed":
            break
    return events


async def test_hostile_clients_are_dropped_and_never_disturb_a_transfer(
        tmp_path: Path, donor: tuple[LocalNode, IstServer, int]) -> None:
    node, server, port = donor
    results: dict[str, object] = {}

    async def garbage() -> None:
        s = await _raw(port)
        await s.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 4)
        results["garbage"] = await _read_until_closed(s)

    async def wrong_uuid() -> None:
        s = await _raw(port)
        conn = Connection(Role.JOINER)
        await s.send_all(conn.send(_handshake(uuid.uuid4())))
        results["wrong_uuid"] = _events(conn, await _read_until_closed(s))

    async def oversize() -> None:
        s = await _raw(port)
        head = struct.pack("<BBBbIq", 1, 1, 0, 0, 1 << 31, -1)
        await s.send_all(head + struct.pack("<II", zlib.crc32(head), 0))
        results["oversize"] = await _read_until_closed(s)

    async def stall() -> None:
        s = await _raw(port)
        results["stall"] = await _read_until_closed(s)

    async def trickle() -> None:
        s = await _raw(port)
        data = Connection(Role.JOINER).send(_handshake(node.uuid))
        try:
            for byte in data:
                await s.send_all(bytes([byte]))
                await trio.sleep(0.05)
        except trio.BrokenResourceError:
            results["trickle"] = b"dropped while trickling"
            return
        results["trickle"] = await _read_until_closed(s)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for attack in (garbage, wrong_uuid, oversize, stall, trickle):
                nursery.start_soon(attack)
            joined = await catch_up(tmp_path, node, port)
    assert joined.last_committed == GAP
    assert results["stall"] == b""
    refused = results["wrong_uuid"]
    assert isinstance(refused, list) and isinstance(refused[0], HandshakeResponse)
    assert refused[0].granted is TransferKind.NONE and refused[0].reason is RefusalReason.UUID_MISMATCH
    assert refused[0].donor_uuid == node.uuid and refused[0].donor_last == GAP
    assert server.counters["istd_ist_failed"] >= 4
    assert server.counters["istd_ist_refused"] == 1
    assert server.counters["istd_ist_served"] == 1
    assert node.gcache.seqno_locked is None


async def test_refusal_when_first_seqno_left_the_cache(tmp_path: Path) -> None:
    node = make_node(tmp_path / "small", "donor", "gcache.size=64K")
    node.open(bootstrap=True)
    try:
        for start in range(1, 2001, 100):
            await node.write([synthetic(s, 200) for s in range(start, start + 100)])
        assert node.gcache.seqno_min > 1
        joiner = joiner_node(tmp_path, node)
        server = IstServer(node)
        try:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(server.serve, "127.0.0.1", 0)
                with pytest.raises(JoinFailed) as info:
                    await Joiner(joiner, [("127.0.0.1", port)]).run()
                nursery.cancel_scope.cancel()
        finally:
            joiner.close()
        assert info.value.exit_code == 4
        assert "IST first seqno 1 not found from cache" in str(info.value)
        assert joiner.state is NodeState.REQUEST_FAILED
    finally:
        node.close()


def test_decide_ist_rules() -> None:
    u = uuid.uuid4()
    hs = _handshake(u, 99)
    granted = decide_ist(hs, donor_uuid=u, donor_last=200, cached_downto=50)
    assert granted.granted is TransferKind.IST and (granted.first, granted.last) == (100, 200)
    assert decide_ist(hs, donor_uuid=u, donor_last=200, cached_downto=101).reason is RefusalReason.NOT_IN_CACHE
    assert decide_ist(hs, donor_uuid=u, donor_last=200, cached_downto=100).granted is TransferKind.IST
    assert decide_ist(hs, donor_uuid=uuid.uuid4(), donor_last=200, cached_downto=1).reason is \
        RefusalReason.UUID_MISMATCH
    assert decide_ist(_handshake(u, -1), donor_uuid=u, donor_last=200, cached_downto=1).reason is \
        RefusalReason.SEQNO_UNDEFINED
    assert decide_ist(_handshake(u, 300), donor_uuid=u, donor_last=200, cached_downto=1).reason is \
        RefusalReason.AHEAD_OF_DONOR
    nothing = decide_ist(_handshake(u, 200), donor_uuid=u, donor_last=200, cached_downto=1)
    assert nothing.granted is TransferKind.IST and nothing.first > nothing.last
    # Galera's measured example (galera-measured.md §6.4): (305215 - 1) >> 7 = 2384
    assert safe_ist_seqno(1, 305215) == 2385
    assert safe_ist_seqno(308598, 328683) == 308754
    assert safe_ist_seqno(1, 1 + (300 << 20)) == 1 + (1 << 20)


async def test_negative_ctrl_from_joiner_releases_the_lock(
        tmp_path: Path, donor: tuple[LocalNode, IstServer, int]) -> None:
    node, server, port = donor
    with trio.fail_after(10):
        s = await _raw(port)
        conn = Connection(Role.JOINER)
        await s.send_all(conn.send(_handshake(node.uuid, 0)))
        conn.receive_data(await s.receive_some(65536))
        response = conn.next_event()
        assert isinstance(response, HandshakeResponse) and response.granted is TransferKind.IST
        await s.send_all(conn.send(Ctrl(0)))
        await s.receive_some(65536)
        await s.send_all(conn.send(Ctrl(-71)))
        await _read_until_closed(s)
        while server.active:
            await trio.sleep(0.01)
    assert node.gcache.seqno_locked is None
    assert server.counters["istd_ist_failed"] == 1


async def test_donor_behind_the_requested_range_waits_for_its_own_replication(
        tmp_path: Path, donor: tuple[LocalNode, IstServer, int]) -> None:
    node, server, port = donor
    joiner = joiner_node(tmp_path, node)
    target = GAP + 500
    try:
        with trio.fail_after(30), structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                done = trio.Event()

                async def join() -> None:
                    assert await Joiner(joiner, [("127.0.0.1", port)], target_last=target).run() == 0
                    done.set()

                nursery.start_soon(join)
                # the donor is at GAP: it holds the request until it has the whole range
                while not any("waiting for this node to reach it" in e["event"] for e in logs):
                    await trio.sleep(0.01)
                assert not done.is_set() and joiner.last_committed == 0
                await node.write([synthetic(s, 200) for s in range(GAP + 1, target + 1)])
                await done.wait()
    finally:
        joiner.close()
    assert joiner.last_committed == target
    assert server.counters["istd_ist_served"] == 1


@pytest.mark.parametrize("fault", ["bad record size", "fewer records than announced"])
async def test_a_segment_of_bad_records_is_a_protocol_error_and_stores_nothing(
        tmp_path: Path, donor: tuple[LocalNode, IstServer, int], fault: str) -> None:
    """A donor whose SEGMENT is not the records it announces: the joiner says so in one line, exits with the
    protocol error code, and its gcache and position are as they were."""
    node, _server, _port = donor
    (seg,) = node.gcache.export_segments(1, 100)
    assert seg.raw is not None
    raw = bytearray(seg.raw)
    seg.raw.release()
    count = 100
    if fault == "bad record size":
        raw[16:20] = struct.pack("<I", 12345)  # the first record's size: not a multiple of 8
    else:
        count = 101

    async def broken_donor(stream: trio.SocketStream) -> None:
        conn = Connection(Role.DONOR)
        hs = await next_event(stream, conn)
        assert isinstance(hs, Handshake) and hs.segments
        await stream.send_all(conn.send(HandshakeResponse(
            granted=TransferKind.IST, version=hs.versions[1], reason=RefusalReason.NONE, donor_uuid=node.uuid,
            first=1, last=count, cached_downto=1, safe_ist_seqno=1, donor_last=count)))
        assert await next_event(stream, conn) == Ctrl(C_OK)
        await stream.send_all(conn.send(Segment(1, count, bytes(raw))))
        with trio.move_on_after(5):
            while not isinstance(await next_event(stream, conn), ConnectionClosed):
                pass

    joining = joiner_node(tmp_path, node)
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                (listener,) = await nursery.start(functools.partial(trio.serve_tcp, broken_donor, 0, host="127.0.0.1"))
                port = listener.socket.getsockname()[1]
                with pytest.raises(JoinFailed) as info:
                    await Joiner(joining, [("127.0.0.1", port)], retries=0).run()
                nursery.cancel_scope.cancel()
        assert info.value.exit_code == exitcodes.PROTOCOL
        assert str(info.value).startswith(f"protocol error from donor 127.0.0.1:{port}: SEGMENT at seqno 1: ")
        assert "the position" in str(info.value) and ":0 is kept" in str(info.value)
        assert joining.last_committed == 0
        assert joining.gcache.next_seqno == 1 and len(joining.gcache) == 0
    finally:
        joining.close()


@pytest.mark.parametrize("in_process_max", [GAP, GAP - 1])
async def test_a_small_catch_up_is_applied_without_the_worker_process(
        tmp_path: Path, donor: tuple[LocalNode, IstServer, int], monkeypatch: pytest.MonkeyPatch,
        in_process_max: int) -> None:
    """Up to IN_PROCESS_APPLY_MAX_WRITESETS the joiner applies in its own process (starting the worker would
    take longer); above it, through the worker. The same state either way."""
    node, _server, port = donor
    monkeypatch.setattr("istd.joiner.IN_PROCESS_APPLY_MAX_WRITESETS", in_process_max)
    started = []
    real_start = joiner_mod.ApplyWorker.start

    async def spy(cls: type[joiner_mod.ApplyWorker], n: LocalNode) -> joiner_mod.ApplyWorker:
        started.append(n.name)
        return await real_start(n)

    monkeypatch.setattr(joiner_mod.ApplyWorker, "start", classmethod(spy))
    with trio.fail_after(30):
        joined = await catch_up(tmp_path, node, port)
    assert started == ([] if in_process_max >= GAP else ["joiner"])
    assert joined.last_committed == GAP
    reopened = make_node(joined.datadir, "joiner")
    reopened.open()
    try:
        assert reopened.applier.digest() == node.applier.digest()
        assert reopened.applier.position() == (node.uuid, GAP)
    finally:
        reopened.close()
