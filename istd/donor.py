"""The donor side of IST: decide, then stream write-sets from the gcache to a joiner.

Direction: the donor listens (port 4568 by default) and the joiner connects; after that the message
sequence is Galera 4's (protocol/README.md)::

    joiner                         donor
      HANDSHAKE ----------------->   decide_ist(): IST granted, or refused with reason + numbers
                <-----------------   HANDSHAKE_RESPONSE
      CTRL(OK) ------------------>   gcache.lock(first): the range cannot be evicted while it is sent
                <-----------------   BATCH frames first..last (thousands of write-sets per frame)
                <-----------------   CTRL(EOF)          (follow mode: keeps streaming new write-sets)
      close()

Every connection runs in its own task with deadlines (handshake, idle peer) and a forced close in
``finally``; a bad or hostile client is logged and dropped and never disturbs another transfer.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
import trio

from gcache import Record
from istd.errors import ProtocolError, SeqnoNotInCache
from istd.grastate import ZERO_UUID
from istd.node import TO_RECORD_TYPES, LocalNode
from istd.sst import SstServer
from istd.trioutil import PEER_ERRORS, describe, next_event, peer_url, send_error, unwrap
from protocol import (
    C_EOF,
    C_OK,
    SUPPORTED_VERSIONS,
    Accept,
    ConnectionClosed,
    Ctrl,
    Handshake,
    HandshakeResponse,
    Keepalive,
    RecordType,
    RefusalReason,
    Role,
    Segment,
    Status,
    StatusRequest,
    TransferKind,
    WriteSetBatch,
    negotiate_version,
)
from protocol import Connection as IstConnection

log = structlog.get_logger("istd.donor")

# Galera's donor-selection safety gap (gcs_group.cpp): 1/128 of the cached range, at most 2^20 seqnos.
SAFETY_GAP_SHIFT = 7
SAFETY_GAP_MAX_SEQNOS = 1 << 20
# The first batch of a transfer asks for this many records; later batches adapt to the record size.
FIRST_BATCH_RECORDS = 256
MAX_BATCH_RECORDS = 1 << 16

_conn_ids = itertools.count(1)


def safe_ist_seqno(cached_downto: int, last: int) -> int:
    """Galera's ``safe_ist_seqno = lowest_cached + min((last - lowest_cached) >> 7, 2^20)``."""
    if cached_downto < 0:
        return -1
    gap = min(max(last - cached_downto, 0) >> SAFETY_GAP_SHIFT, SAFETY_GAP_MAX_SEQNOS)
    return cached_downto + gap


def decide_ist(hs: Handshake, *, donor_uuid: Any, donor_last: int, cached_downto: int,
               versions: tuple[int, int] = SUPPORTED_VERSIONS, sst_address: str | None = None,
               sst_refusal: str = "this donor serves no SST") -> HandshakeResponse:
    """The donor's decision (Galera's process_state_req rules), with the numbers behind it.

    IST when the joiner's history is this donor's, its position is known, and its next seqno is still in
    the gcache. Otherwise SST, if the joiner accepts it and this donor can serve one (``sst_address`` is
    where; else ``sst_refusal`` says why not), or a refusal that gives every reason."""
    safe = safe_ist_seqno(cached_downto, donor_last)
    numbers = dict(donor_uuid=donor_uuid, cached_downto=cached_downto, safe_ist_seqno=safe, donor_last=donor_last)
    first = hs.last_applied + 1
    last = donor_last if hs.last < 0 else min(hs.last, donor_last)

    def refuse(reason: RefusalReason, message: str) -> HandshakeResponse:
        return HandshakeResponse(granted=TransferKind.NONE, version=0, reason=reason,
                                 first=first, last=last, message=message, **numbers)

    def impossible(reason: RefusalReason, message: str) -> HandshakeResponse:
        """IST is impossible: SST if the joiner takes it and this donor can serve it, else a refusal."""
        if not hs.accept & Accept.SST:
            return refuse(reason, message)
        if sst_address is None or version is None:
            return refuse(reason, f"{message}; and SST is impossible too: {sst_refusal}")
        return HandshakeResponse(granted=TransferKind.SST, version=version, reason=RefusalReason.NONE,
                                 first=first, last=last, message=message, sst_address=sst_address, **numbers)

    version = negotiate_version(hs.versions, versions)
    if version is None:
        return refuse(RefusalReason.VERSION_UNSUPPORTED,
                      f"joiner speaks protocol versions {hs.versions[0]}-{hs.versions[1]}, "
                      f"donor speaks {versions[0]}-{versions[1]}; upgrade one of them")
    if not hs.accept & Accept.IST:
        return impossible(RefusalReason.IST_NOT_ACCEPTED, "joiner asks for SST only (its position is unknown)")
    if hs.cluster_uuid != donor_uuid:
        what = "has no history" if hs.cluster_uuid == ZERO_UUID else f"has history {hs.cluster_uuid}"
        return impossible(RefusalReason.UUID_MISMATCH,
                          f"Local state UUID ({hs.cluster_uuid}) does not match group state UUID ({donor_uuid}): "
                          f"the joiner {what}, so IST is impossible and only a full state transfer (SST) can help")
    if hs.last_applied < 0:
        return impossible(RefusalReason.SEQNO_UNDEFINED,
                          "Local state seqno is undefined (-1): IST impossible, only SST can help")
    if hs.last_applied > donor_last:
        return refuse(RefusalReason.AHEAD_OF_DONOR,
                      f"joiner is at seqno {hs.last_applied}, ahead of this donor's last seqno {donor_last}; "
                      "use a donor that is further ahead")
    if first <= last and (cached_downto < 0 or first < cached_downto):
        return impossible(RefusalReason.NOT_IN_CACHE,
                          f"IST first seqno {first} not found from cache (cached_downto {cached_downto}): "
                          "the gap has left this donor's gcache; a larger gcache.size keeps more")
    return HandshakeResponse(granted=TransferKind.IST, version=version, reason=RefusalReason.NONE,
                             first=first, last=last, message="IST granted", **numbers)


@dataclass
class TransferStats:
    conn_id: int
    peer: str
    first: int = 0
    last: int = 0
    sent_writesets: int = 0
    sent_bytes: int = 0
    started: float = 0.0


class IstServer:
    """Serves IST from a LocalNode's gcache to any number of joiners at once."""

    def __init__(self, node: LocalNode, label: str = "IST") -> None:
        self.node = node
        self.label = label
        opts = node.options
        self.limits = opts.limits
        self.batch_bytes: int = opts["ist.batch_size"]
        self.active: dict[int, TransferStats] = {}
        # hooks for the cluster mode (istd/cluster.py): another first message than HANDSHAKE (STATUS_REQUEST),
        # another decision for a replication subscription, and the subscriber's flow-control Ctrl codes
        self.on_first_event: Callable[[Any, Any], Awaitable[bool]] | None = None
        self.decide_hook: Callable[[Handshake], HandshakeResponse | None] | None = None
        self.on_ctrl: Callable[[int, int], None] | None = None
        self.on_close: Callable[[int], None] | None = None
        self.sst: SstServer | None = None  # where this node serves SST, if it does
        self.sst_host = ""
        self.sst_advertise: tuple[str, int] | None = None  # told to joiners for SST instead of the listener's
        self.counters = {"istd_ist_served": 0, "istd_ist_failed": 0, "istd_ist_refused": 0,
                         "istd_ist_sent_writesets": 0, "istd_ist_sent_bytes": 0}

    def status(self) -> dict[str, Any]:
        return {**self.counters, "istd_ist_active_transfers": len(self.active)}

    def numbers(self) -> dict[str, Any]:
        """What a donor tells `istd explain`: the numbers its IST decision uses."""
        node = self.node
        return {"name": node.name, "uuid": str(node.uuid), "last_committed": node.last_committed,
                "cached_downto": node.gcache.seqno_min, "state": node.state.comment}

    def decide(self, hs: Handshake) -> HandshakeResponse:
        if self.decide_hook is not None:
            response = self.decide_hook(hs)
            if response is not None:
                return response
        node = self.node
        sst_address, sst_refusal = None, "this donor serves no SST (its SST port is off)"
        if self.sst is not None and self.sst.port is not None:
            refusal = self.sst.refusal()
            if refusal is None:
                # a wildcard listener: the joiner uses the host it reached this donor at
                host, port = self.sst_advertise or (self.sst_host, self.sst.port)
                host = "" if host in ("", "0.0.0.0", "::") else host
                sst_address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            else:
                sst_refusal = refusal
        return decide_ist(hs, donor_uuid=node.uuid, donor_last=node.last_committed,
                          cached_downto=node.gcache.seqno_min, sst_address=sst_address, sst_refusal=sst_refusal)

    async def serve(self, host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host or None)
        actual = listeners[0].socket.getsockname()[1]
        log.info(f"{self.label} listener open at tcp://{host or '0.0.0.0'}:{actual}", host=host, port=actual)
        task_status.started(actual)
        await trio.serve_listeners(self.handle, listeners)

    async def handle(self, stream: trio.SocketStream) -> None:
        conn_id = next(_conn_ids)
        peer = peer_url(stream)
        with structlog.contextvars.bound_contextvars(role="donor", peer=peer, conn_id=conn_id):
            sender = _Sender(self, stream, conn_id, peer)
            try:
                await sender.run()
            except Exception as exc:  # one bad connection never takes down the listener
                err = unwrap(exc)
                self.counters["istd_ist_failed"] += 1
                if isinstance(err, PEER_ERRORS):
                    log.warning(f"async IST sender failed to serve {peer}: {describe(err)}", error=describe(err))
                    await sender.send_error(err)
                else:
                    log.exception(f"async IST sender failed to serve {peer}: internal error", error=repr(err))
            finally:
                self.active.pop(conn_id, None)
                sender.release()
                if self.on_close is not None:
                    self.on_close(conn_id)
                await trio.aclose_forcefully(stream)


class _Sender:
    """One IST connection, donor side."""

    def __init__(self, server: IstServer, stream: trio.SocketStream, conn_id: int, peer: str) -> None:
        self.server = server
        self.node = server.node
        self.stream = stream
        self.conn_id = conn_id
        self.peer = peer
        self.conn = IstConnection(Role.DONOR, max_frame_bytes=server.limits.max_frame_bytes)
        self.locked: int | None = None
        self.eof_sent = False
        self.joiner_closed = trio.Event()
        self.watch_error: BaseException | None = None
        self.segments = False

    # --------------------------------------------------------------- io helpers

    async def _next_event(self) -> Any:
        return await next_event(self.stream, self.conn)

    async def _send(self, event: Any) -> None:
        data = self.conn.send(event)
        with trio.fail_after(self.server.limits.idle_timeout):
            await self.stream.send_all(data)

    async def send_error(self, exc: BaseException) -> None:
        await send_error(self.stream, self.conn, exc)

    def release(self) -> None:
        if self.locked is not None:
            self.node.gcache.unlock(self.locked)
            self.locked = None

    def _relock(self, seqno: int) -> None:
        """Keep the lowest unsent seqno pinned, moving the pin forward as batches go out."""
        gcache = self.node.gcache
        target = min(seqno, gcache.seqno_max)
        if target < 0 or target == self.locked or target < gcache.seqno_min:
            return
        gcache.lock(target)
        self.release()
        self.locked = target

    # --------------------------------------------------------------- the conversation

    async def run(self) -> None:
        with trio.fail_after(self.server.limits.handshake_timeout):
            hs = await self._next_event()
            hook = self.server.on_first_event
            if hook is not None and not isinstance(hs, Handshake) and await hook(self, hs):
                return
            if isinstance(hs, StatusRequest):  # `istd explain` asks a donor for its numbers
                await self._send(Status(json.dumps({"member": self.server.numbers()}).encode()))
                return
            if not isinstance(hs, Handshake):
                raise ProtocolError(f"expected HANDSHAKE, got {type(hs).__name__}")
            node = self.node
            if hs.cluster_uuid == node.uuid and hs.last > node.last_committed:
                # a cluster donor slightly behind the range waits for its own replication (the range is fixed)
                log.info(f"IST request up to {hs.last}: waiting for this node to reach it "
                         f"(at {node.last_committed})", last=hs.last, at=node.last_committed)
                await node.committed.wait_above(hs.last - 1)
            response = self.server.decide(hs)
            log.info(f"IST request: {hs.cluster_uuid}:{hs.last_applied}-{response.donor_last}|{self.peer}",
                     joiner=hs.node_name, uuid=str(hs.cluster_uuid), last_applied=hs.last_applied,
                     first=response.first, last=response.last, follow=hs.follow)
            if response.granted is TransferKind.SST:
                self.server.counters["istd_ist_refused"] += 1
                in_history = hs.accept & Accept.IST and hs.cluster_uuid == node.uuid and hs.last_applied >= 0
                verdict = (f"IST first seqno {response.first} not found from cache, falling back to SST"
                           if in_history else f"{response.message}; falling back to SST")
                log.info(f"{verdict}: {hs.node_name or self.peer} is sent to the SST port {response.sst_address}",
                         cached_downto=response.cached_downto, donor_last=response.donor_last)
                await self._send(response)
                return
            if response.granted is TransferKind.NONE:
                self.server.counters["istd_ist_refused"] += 1
                log.warning(f"IST refused to {hs.node_name or self.peer}: {response.message}",
                            reason=response.reason.name, cached_downto=response.cached_downto,
                            safe_ist_seqno=response.safe_ist_seqno, donor_last=response.donor_last)
                await self._send(response)
                return
            if response.first <= response.last:
                try:
                    self._relock(response.first)
                except SeqnoNotInCache:  # evicted between the decision and the lock
                    response = self.server.decide(hs)
                    await self._send(response)
                    return
            if self.server.sst is not None:  # this joiner's IST holds its own lock now: end the SST's
                self.server.sst.release(hs.node_name)
            await self._send(response)
            ok = await self._next_event()
            if not isinstance(ok, Ctrl) or ok.code != C_OK:
                raise ProtocolError(f"joiner did not confirm the handshake ({ok!r})")
        await self._stream(hs, response)

    async def _stream(self, hs: Handshake, response: HandshakeResponse) -> None:
        self.segments = hs.segments
        first, last = response.first, response.last
        stats = TransferStats(self.conn_id, self.peer, first, last, started=time.monotonic())
        self.server.active[self.conn_id] = stats
        if first > last:
            log.info("IST sender notifying joiner, not sending anything", first=first, last=last)
        else:
            log.info(f"async IST sender starting to serve {self.peer} sending {first}-{last}",
                     first=first, last=last, count=last - first + 1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_joiner, nursery.cancel_scope)
            nxt = await self._send_range(first, last, stats)
            if hs.follow:
                await self._follow(nxt, stats)
            else:
                await self._send(Ctrl(C_EOF))
                self.eof_sent = True
                self.release()
                # Galera: the sender waits for the joiner to close after EOF.
                with trio.move_on_after(self.server.limits.idle_timeout):
                    await self.joiner_closed.wait()
            nursery.cancel_scope.cancel()
        if self.watch_error is not None:
            raise self.watch_error
        elapsed = max(time.monotonic() - stats.started, 1e-9)
        self.server.counters["istd_ist_served"] += 1
        log.info("async IST sender served", first=first, last=stats.first + stats.sent_writesets - 1,
                 count=stats.sent_writesets, bytes=stats.sent_bytes, seconds=round(elapsed, 3),
                 rate=round(stats.sent_writesets / elapsed), mb_per_s=round(stats.sent_bytes / elapsed / 1e6, 1))

    async def _send_range(self, first: int, last: int, stats: TransferStats) -> int:
        """Send first..last in BATCH frames; returns the next seqno to send."""
        gcache = self.node.gcache
        nxt = first
        want = FIRST_BATCH_RECORDS
        while nxt <= last:
            end = min(last, nxt + want - 1)
            if self.segments:
                payload_bytes = await self._send_segments(nxt, end, stats)
            else:
                records = gcache.get_range(nxt, end)
                payload_bytes = await self._send_records(nxt, records, stats)
                del records
            count = end - nxt + 1
            avg = max(payload_bytes // count, 1)
            want = max(1, min(MAX_BATCH_RECORDS, self.server.batch_bytes // avg))
            nxt = end + 1
            if nxt <= last:
                self._relock(nxt)
        return nxt

    async def _send_segments(self, first: int, last: int, stats: TransferStats) -> int:
        """The fast path: runs of ring records go out as they lie on disk (zero copy until the socket);
        the joiner, whose gcache has the same history, stores each run with one copy. Records that are not
        plain ring records (overflow pages, Galera's own) go out as an ordinary BATCH."""
        sent = 0
        for seg in self.node.gcache.export_segments(first, last):
            if seg.raw is None:
                assert seg.records is not None
                sent += await self._send_records(seg.first, seg.records, stats)
                continue
            count = seg.last - seg.first + 1
            data = self.conn.send(Segment(seg.first, count, seg.raw))
            with trio.fail_after(self.server.limits.idle_timeout):
                await self.stream.send_all(data)
            self._count_sent(stats, count, len(data))
            sent += len(data)
        return sent

    def _count_sent(self, stats: TransferStats, count: int, nbytes: int) -> None:
        stats.sent_writesets += count
        stats.sent_bytes += nbytes
        self.server.counters["istd_ist_sent_writesets"] += count
        self.server.counters["istd_ist_sent_bytes"] += nbytes

    async def _send_records(self, first: int, records: list[Record], stats: TransferStats) -> int:
        types = bytes([r.type for r in records]).translate(TO_RECORD_TYPES)
        if any(r.skipped for r in records):
            types = bytes(RecordType.SKIP if r.skipped else t for r, t in zip(records, types, strict=True))
        batch = WriteSetBatch.from_payloads(first, types, [r.payload for r in records])
        data = self.conn.send(batch)
        del batch
        with trio.fail_after(self.server.limits.idle_timeout):
            await self.stream.send_all(data)
        self._count_sent(stats, len(records), len(data))
        return len(data)

    async def _follow(self, nxt: int, stats: TransferStats) -> None:
        """Follow mode: keep streaming new write-sets as the node commits them; keepalive when idle."""
        committed = self.node.committed
        while True:
            with trio.move_on_after(self.server.limits.keepalive_period):
                await committed.wait_above(nxt - 1)
            upto = committed.value
            if upto < nxt:
                await self._send(Keepalive())
                continue
            await self._send_range(nxt, upto, stats)
            nxt = upto + 1
            self._relock(nxt)

    async def _watch_joiner(self, cancel_scope: trio.CancelScope) -> None:
        """The only reader during the stream: keepalives, an abort, a close, or a silent death.

        Errors are kept in ``watch_error`` and stop the sender by cancelling its scope, so the nursery
        never has to raise an exception group.
        """
        try:
            while True:
                with trio.move_on_after(self.server.limits.idle_timeout) as idle:
                    event = await self._next_event()
                if idle.cancelled_caught:
                    if self.eof_sent:
                        return
                    raise trio.TooSlowError
                if isinstance(event, Ctrl) and event.code < 0:
                    raise ProtocolError(f"joiner aborted the transfer with code {event.code}", event.code)
                if isinstance(event, Ctrl) and event.code > C_EOF and self.server.on_ctrl is not None:
                    self.server.on_ctrl(self.conn_id, event.code)  # flow control from a subscriber
                if isinstance(event, ConnectionClosed):
                    if self.eof_sent:
                        self.joiner_closed.set()
                        return
                    raise trio.BrokenResourceError("joiner closed the connection")
        except PEER_ERRORS as exc:
            self.watch_error = exc
            cancel_scope.cancel()
