"""The joiner side of IST: connect to a donor, ask for the missing range, receive, queue, apply.

Receive and apply are pipelined through a bounded queue (``wsrep_local_recv_queue``)::

    donor --TCP--> receiver task --store in own gcache--> RecvQueue (<= ist.recv_queue_size bytes)
                                                               |
                                             applier task <----+  (SQLite in the apply worker process,
                                                                   or a thread for a small catch-up)

so memory depends on the configured bound, never on the size of the gap, and applying starts with the
first batch instead of after the whole stream (Galera's users asked why it waits; here it does not).

Better than Galera: a failed transfer never zeroes the position. If the connection drops, what was
received stays (gcache + queue), the joiner reconnects with backoff to the same or the next donor and
asks for the range after the last seqno it *received*; if the process dies, the next start resumes
from the last seqno *applied* (the position committed with the data).
"""

from __future__ import annotations

import array
import collections
import collections.abc
import contextlib
import fcntl
import math
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from istd import exitcodes
from istd.applier import ApplyError
from istd.apply_worker import ERROR_LEN, REPLY, apply_batch, apply_segment, encode_request, encode_segment_request
from istd.errors import BadSegment, IstError, ProtocolError, RemoteProtocolError
from istd.node import LocalNode
from istd.sst import SnapshotRefused, SstClient
from istd.states import NodeState
from istd.trioutil import PEER_ERRORS, describe, next_event, unwrap
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
    Role,
    Segment,
    TransferKind,
    WriteSet,
    WriteSetBatch,
)
from protocol import Connection as IstConnection

log = structlog.get_logger("istd.joiner")

# Galera logs IST progress at most every 10 s (gu_progress.hpp), and at the start and the end.
PROGRESS_INTERVAL_SECONDS = 10.0
FIRST_BACKOFF_SECONDS = 0.2
# A worker that has not exited this long after its input closed is stuck; it is killed (its open
# transaction is rolled back by SQLite, so nothing inconsistent is left).
WORKER_EXIT_TIMEOUT_SECONDS = 30.0
# A catch-up of at most this many write-sets (and no --follow) is applied in this process, in a thread:
# starting the apply worker process takes about 0.13 s, longer than applying them here (at ~100k/s, with the
# receiver beside it). Measured on 2 vCPUs: 20 000 write-sets took 0.19-0.24 s here against 0.33 s through
# the worker; at 50 000 the two were even, and above it the worker's own core wins.
IN_PROCESS_APPLY_MAX_WRITESETS = 20_000
# The default 64 KiB pipe would make every 1 MiB batch a dozen context switches between the processes;
# 1 MiB (Linux's default pipe-max-size) lets the receiver hand over a whole batch at once.
WORKER_PIPE_BYTES = 1 << 20
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class JoinFailed(IstError):
    """The join ended without catching up; ``exit_code`` says why (istd/exitcodes.py)."""

    def __init__(self, message: str, exit_code: int, *, final: bool = False) -> None:
        """``final``: retrying cannot help (a cluster node stops instead of rejoining)."""
        super().__init__(message)
        self.exit_code = exit_code
        self.final = final or exit_code == exitcodes.LOCAL_STATE


class SstGranted(IstError):
    """The donor cannot serve IST and sends this joiner to its SST port instead."""

    def __init__(self, donor: tuple[str, int], response: HandshakeResponse) -> None:
        super().__init__(f"{donor[0]}:{donor[1]}: {response.message}; SST at {response.sst_address}")
        self.donor = donor
        self.response = response
        host, _, port = response.sst_address.rpartition(":")
        host = host.strip("[]") or donor[0]  # empty: the host this joiner reached the donor at
        self.sst = (host, int(port))


class Refused(IstError):
    def __init__(self, donor: str, response: HandshakeResponse) -> None:
        super().__init__(f"donor {donor} refused IST: {response.message} "
                         f"(reason {response.reason.name}, donor uuid {response.donor_uuid}, "
                         f"cached_downto {response.cached_downto}, safe_ist_seqno {response.safe_ist_seqno}, "
                         f"donor last seqno {response.donor_last})")
        self.response = response


@dataclass
class Received:
    """Write-sets stored in the gcache and waiting to be applied: a BATCH, or a raw gcache SEGMENT."""

    first: int
    count: int
    nbytes: int
    batch: WriteSetBatch | None = None
    blob: memoryview | None = None

    @property
    def last(self) -> int:
        return self.first + self.count - 1


class RecvQueue:
    """FIFO of received batches bounded in bytes; ``length`` is ``wsrep_local_recv_queue``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.length = 0
        self.length_max = 0
        self._send, self._recv = trio.open_memory_channel[Any](math.inf)
        self._changed = trio.Event()
        self._front: collections.deque[Received] = collections.deque()  # handed out, not applied: first again

    async def put(self, item: Received) -> None:
        nbytes = item.nbytes
        # one oversize batch is let through an empty queue, so a single huge write-set cannot deadlock
        while self.bytes and self.bytes + nbytes > self.max_bytes:
            await self._changed.wait()
        self.bytes += nbytes
        self.length += item.count
        self.length_max = max(self.length_max, self.length)
        self._send.send_nowait(item)

    async def get(self) -> Received:
        if self._front:
            return self._front.popleft()
        item: Received = await self._recv.receive()
        return item

    def requeue(self, items: collections.abc.Iterable[Received]) -> None:
        """Items taken with get() but not applied go back to the front, in order (still counted)."""
        self._front.extendleft(reversed(list(items)))

    def done(self, count: int, nbytes: int) -> None:
        self.bytes -= nbytes
        self.length -= count
        self._changed.set()
        self._changed = trio.Event()


@dataclass
class Progress:
    """One IST, as the joiner sees it: range, received and applied counts, timing."""

    donor: str
    first: int
    last: int
    started: float = field(default_factory=time.monotonic)
    received: int = 0
    received_bytes: int = 0

    @property
    def total(self) -> int:
        return max(self.last - self.first + 1, 0)

    def line(self) -> str:
        pct = 100.0 * self.received / self.total if self.total else 100.0
        return f"Receiving IST... {pct:.1f}% ({self.received}/{self.total} events) complete."


class Joiner:
    """Catch a LocalNode up from a list of donors; optionally keep following."""

    def __init__(self, node: LocalNode, donors: list[tuple[str, int]], *, follow: bool = False,
                 retries: int = 5, target_last: int | None = None, ist_only: bool = False,
                 on_caught_up: Callable[[], None] | None = None,
                 on_applied: Callable[[], None] | None = None) -> None:
        """``target_last`` fixes the end of the range (a cluster node asks for its gap up to the group position it
        saw when it subscribed to replication); ``on_caught_up`` replaces the shift to Synced (a cluster node
        becomes Synced only when its replication queue is short); ``on_applied`` runs after every applied
        batch (flow control). ``ist_only``: never take an SST (Galera's ist_only); when IST is impossible the
        join fails with exit code 4 and the local state is left as it was."""
        self.node = node
        self.ist_only = ist_only
        self.sst = SstClient(node)
        self.donors = donors
        self.follow = follow
        self.retries = retries
        self.target_last = target_last
        self.on_caught_up = on_caught_up
        self.on_applied = on_applied
        opts = node.options
        self.limits = opts.limits
        self.retry_max: float = opts["ist.retry_max"]
        self.queue = RecvQueue(opts["ist.recv_queue_size"])
        self.received_upto = node.last_committed  # last seqno stored in gcache and queued
        self.progress: Progress | None = None
        self.caught_up = trio.Event()
        self.target: int | None = None  # the donor's last seqno at request time
        self.counters = {"istd_ist_received_writesets": 0, "istd_ist_received_bytes": 0,
                         "istd_ist_attempts": 0, "istd_ist_resumed": 0}
        self._apply_error: BaseException | None = None

    # ------------------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "wsrep_local_recv_queue": self.queue.length,
            "wsrep_local_recv_queue_max": self.queue.length_max,
            "wsrep_ist_receive_status": "",
            "wsrep_ist_receive_seqno_start": 0,
            "wsrep_ist_receive_seqno_current": 0,
            "wsrep_ist_receive_seqno_end": 0,
            **self.counters,
            **self.sst.status(),
        }
        p = self.progress
        if p is not None and self.node.state is NodeState.JOINING_RECEIVING and p.total:
            current = max(self.node.last_committed, p.first)
            span = p.last - p.first
            pct = 100 if span <= 0 else max(0, min(100, int(100 * (current - p.first) / span)))
            status["wsrep_ist_receive_status"] = f"{pct}% complete, received seqno {current} of {p.first}-{p.last}"
            status.update(wsrep_ist_receive_seqno_start=p.first, wsrep_ist_receive_seqno_current=current,
                          wsrep_ist_receive_seqno_end=p.last)
        return status

    # ------------------------------------------------------------------------------ main loop

    async def run(self) -> int:
        """Returns an exit code (0: caught up). Raises JoinFailed for the other outcomes.

        IST when a donor can serve it; otherwise an SST (unless ``ist_only``), installed while no apply
        worker runs, then IST from the snapshot's seqno + 1 on the same donor."""
        node = self.node
        if not node.position_known:
            if self.ist_only:
                raise JoinFailed(f"the local state is unknown ({node.gtid}): only a full state transfer (SST) can "
                                 "help, and --ist-only forbids it; nothing was changed", exitcodes.REFUSED)
            log.info(f"Local state {node.gtid} is unknown: IST will be unavailable, requesting SST",
                     uuid=str(node.uuid), seqno=node.last_committed)
        while True:
            failure: JoinFailed | None = None
            sst: SstGranted | None = None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.apply_loop, nursery.cancel_scope)
                nursery.start_soon(self.progress_loop)
                try:
                    await self.catch_up()
                except JoinFailed as exc:  # kept out of the nursery's exception group
                    failure = exc
                except SstGranted as exc:
                    sst = exc
                finally:
                    nursery.cancel_scope.cancel()
            if failure is not None:
                raise failure
            self.check_applied()
            if sst is None:
                return exitcodes.OK
            response = sst.response
            await self.state_transfer(sst.sst, ist_donor=sst.donor, reason=response.message,
                                      group=f"{response.donor_uuid}:{response.donor_last}")

    def check_applied(self) -> None:
        """JoinFailed (exit 6, final) if applying failed: the node must not go on."""
        if self._apply_error is not None:
            raise JoinFailed(f"applying write-sets failed, the node must not continue: {self._apply_error}",
                             exitcodes.LOCAL_STATE)

    async def state_transfer(self, sst: tuple[str, int], *, ist_donor: tuple[str, int], reason: str,
                             group: str) -> None:
        """Receive a snapshot from the SST address ``sst`` and install it; retried with backoff. On failure the
        local state and its position are as they were (the partial snapshot is removed). Afterwards the IST
        goes to ``ist_donor`` first (the snapshot's donor keeps its next seqno in its gcache). ``reason``
        (why IST is impossible) and ``group`` (the group's uuid:seqno) are for the log."""
        node = self.node
        host, port = sst
        donor = f"{host}:{port}"
        node.shift(NodeState.JOINING_RECEIVING)
        log.info(f"State transfer required: \n\tGroup state: {group}\n\tLocal state: {node.gtid}",
                 group=group, local_seqno=node.last_committed)
        log.info(f"Requesting SST from {donor}: {reason}", donor=donor)
        backoff = FIRST_BACKOFF_SECONDS
        for attempt in range(self.retries + 1):
            try:
                snapshot = await self.sst.receive(host, port)
                break
            except SnapshotRefused as exc:
                node.shift(NodeState.REQUEST_FAILED)
                raise JoinFailed(f"{exc}; the position {node.gtid} is kept", exitcodes.REFUSED) from None
            except Exception as exc:
                err = unwrap(exc)
                if not isinstance(err, PEER_ERRORS):
                    raise
                log.warning(f"SST from {donor} failed: {_connect_hint(donor, err, sst=True)}; the local state is "
                            "untouched",
                            donor=donor, error=describe(err), attempt=attempt + 1)
                if attempt == self.retries:
                    node.shift(NodeState.TRANSFER_FAILED)
                    code = exitcodes.PROTOCOL if isinstance(err, ProtocolError) else exitcodes.UNREACHABLE
                    raise JoinFailed(f"SST from {donor} failed: {describe(err)}; the position {node.gtid} is kept",
                                     code) from None
                await trio.sleep(backoff)
                backoff = min(backoff * 2, self.retry_max)
        log.info(f"SST received: {snapshot.cluster_uuid}:{snapshot.seqno}", uuid=str(snapshot.cluster_uuid),
                 seqno=snapshot.seqno, bytes=snapshot.nbytes, donor=donor)
        node.install_state(snapshot.path, snapshot.cluster_uuid, snapshot.seqno)
        self.sst.progress = None
        self.received_upto = snapshot.seqno
        self.target = None
        self.progress = None
        self.caught_up = trio.Event()
        self.donors = [ist_donor] + [d for d in self.donors if d != ist_donor]

    async def catch_up(self) -> None:
        failed_rounds = 0
        backoff = FIRST_BACKOFF_SECONDS
        while True:
            refusals: list[Refused] = []
            grants: list[SstGranted] = []
            errors: list[tuple[str, BaseException]] = []
            progressed = False
            for host, port in self.donors:
                donor = f"{host}:{port}"
                before = self.received_upto
                try:
                    await self._transfer(host, port)
                    if not self.follow:
                        return
                    log.info(f"donor {donor} ended the stream; following again", donor=donor)
                    progressed = True
                    continue
                except Refused as exc:
                    log.warning(str(exc), donor=donor, reason=exc.response.reason.name)
                    refusals.append(exc)
                except SstGranted as exc:
                    log.info(f"IST impossible from {donor}: {exc.response.message}", donor=donor)
                    grants.append(exc)
                except ApplyError:
                    raise
                except Exception as exc:
                    err = unwrap(exc)
                    if not isinstance(err, PEER_ERRORS):
                        raise
                    errors.append((donor, err))
                    self._log_failure(donor, err)
                if self._apply_error is not None:
                    return
                progressed = progressed or self.received_upto > before
            if grants and len(refusals) + len(grants) == len(self.donors):
                # no donor can serve IST: SST from the first that offered it, once what arrived is applied
                await self.node.committed.wait_above(self.received_upto - 1)
                raise grants[0]
            if refusals and len(refusals) == len(self.donors):
                self.node.shift(NodeState.REQUEST_FAILED)
                raise JoinFailed(self._refusal_message(refusals[-1]), exitcodes.REFUSED)
            failed_rounds = 0 if progressed else failed_rounds + 1
            if failed_rounds > self.retries:
                self.node.shift(NodeState.TRANSFER_FAILED)
                raise self._give_up(errors, refusals)
            if progressed:
                backoff = FIRST_BACKOFF_SECONDS
            log.info(f"Retrying state transfer in {backoff:.1f} s from {self.node.uuid}:{self.received_upto}",
                     backoff=backoff, position=self.received_upto, round=failed_rounds)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, self.retry_max)

    def _refusal_message(self, refused: Refused) -> str:
        if self.ist_only:
            return (f"{refused}; IST is impossible and --ist-only forbids SST: nothing was changed, the position "
                    f"{self.node.gtid} is kept")
        return str(refused)

    def _log_failure(self, donor: str, err: BaseException) -> None:
        if self.progress is not None and self.received_upto >= self.progress.first:
            log.warning(f"IST from {donor} interrupted after seqno {self.received_upto}: {describe(err)}; "
                        "the position is kept and the transfer will resume", donor=donor,
                        received_upto=self.received_upto, error=describe(err))
        else:
            log.warning(f"State transfer from {donor} failed: {_connect_hint(donor, err)}", donor=donor,
                        error=describe(err))

    def _give_up(self, errors: list[tuple[str, BaseException]], refusals: list[Refused]) -> JoinFailed:
        position = f"the position {self.node.uuid}:{self.node.last_committed} is kept for the next start"
        if not errors:
            return JoinFailed(f"{self._refusal_message(refusals[-1])}; {position}", exitcodes.REFUSED)
        donor, err = errors[-1]
        if all(isinstance(e, OSError) and not isinstance(e, trio.BrokenResourceError) for _, e in errors) \
                or all(isinstance(e, trio.TooSlowError) for _, e in errors):
            return JoinFailed(f"no donor reachable: {_connect_hint(donor, err)}; {position}", exitcodes.UNREACHABLE)
        if isinstance(err, ProtocolError):
            return JoinFailed(f"protocol error from donor {donor}: {describe(err)}; {position}", exitcodes.PROTOCOL)
        return JoinFailed(f"state transfer from {donor} failed: {describe(err)}; {position}",
                          exitcodes.UNREACHABLE)

    # ------------------------------------------------------------------------------ one connection

    async def _transfer(self, host: str, port: int) -> None:
        donor = f"{host}:{port}"
        self.counters["istd_ist_attempts"] += 1
        with trio.fail_after(self.limits.connect_timeout):
            stream = await trio.open_tcp_stream(host, port)
        with structlog.contextvars.bound_contextvars(role="joiner", peer=f"tcp://{donor}"):
            try:
                await self._converse(stream, donor)
            finally:
                await trio.aclose_forcefully(stream)

    async def _converse(self, stream: trio.SocketStream, donor: str) -> None:
        node = self.node
        conn = IstConnection(Role.JOINER, max_frame_bytes=self.limits.max_frame_bytes)
        receive = EventReader(stream, conn, self.limits.idle_timeout)
        last_applied = self.received_upto
        with trio.fail_after(self.limits.handshake_timeout):
            await stream.send_all(conn.send(Handshake(
                cluster_uuid=node.uuid, last_applied=last_applied, first=last_applied + 1,
                last=-1 if self.target_last is None else self.target_last,
                accept=self._accept(), versions=SUPPORTED_VERSIONS, node_name=node.name, follow=self.follow,
                segments=True)))
            response = await receive.event()
        if not isinstance(response, HandshakeResponse):
            raise RemoteProtocolError(f"expected HANDSHAKE_RESPONSE, got {type(response).__name__}")
        if response.granted is TransferKind.SST:
            host, _, port = donor.rpartition(":")
            raise SstGranted((host.strip("[]"), int(port)), response)
        if response.granted is not TransferKind.IST:
            raise Refused(donor, response)
        first, last = response.first, response.last
        if self.target is None or self.progress is None:
            self.target = last
            if first <= last:
                log.info(f"State transfer required: \n\tGroup state: {response.donor_uuid}:{last}\n"
                         f"\tLocal state: {node.uuid}:{last_applied}",
                         group_uuid=str(response.donor_uuid), group_seqno=last, local_seqno=last_applied)
            self.progress = Progress(donor, first, last)
            log.info(f"Receiving IST: {max(last - first + 1, 0)} writesets, seqnos {first}-{last}",
                     count=max(last - first + 1, 0), first=first, last=last, donor=donor)
            if first <= last:
                log.info(self.progress.line(), done=0, total=self.progress.total)
        else:
            self.counters["istd_ist_resumed"] += 1
            self.target = max(self.target, last)
            self.progress.last = max(self.progress.last, last)
            log.info(f"Resuming IST from {donor}: seqnos {first}-{last}", first=first, last=last, donor=donor)
        node.shift(NodeState.JOINING_RECEIVING if first <= last else NodeState.JOINED)
        await stream.send_all(conn.send(Ctrl(C_OK)))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keepalive_loop, stream, conn)
            try:
                await self._receive_stream(receive, donor)
            finally:
                nursery.cancel_scope.cancel()
        if not self.follow:
            await self._wait_applied(self.target)

    def _accept(self) -> Accept:
        """Galera's joiner rules: an unknown position takes SST only; otherwise IST, with SST as the fallback
        (unless ist_only)."""
        if not self.node.position_known:
            return Accept.SST
        return Accept.IST if self.ist_only else Accept.IST | Accept.SST

    async def _receive_stream(self, receive: EventReader, donor: str) -> None:
        while True:
            event = await receive.event()
            if isinstance(event, Segment):
                await self.take_segment(event)
            elif isinstance(event, WriteSetBatch):
                await self.take(event)
            elif isinstance(event, WriteSet):
                await self.take(WriteSetBatch.from_payloads(event.seqno, bytes([event.type]), [event.payload]))
            elif isinstance(event, Keepalive):
                continue
            elif isinstance(event, Ctrl) and event.code == C_EOF:
                log.debug("IST stream ended (EOF)", last=self.received_upto)
                return
            elif isinstance(event, Ctrl):
                raise ProtocolError(f"donor {donor} aborted the transfer with code {event.code}", event.code)
            elif isinstance(event, ConnectionClosed):
                raise trio.BrokenResourceError(f"donor {donor} closed the connection before EOF")
            else:
                raise RemoteProtocolError(f"unexpected {type(event).__name__} during the stream")

    async def take(self, batch: WriteSetBatch) -> None:
        self.node.store(batch.first, batch.types, batch.payloads(), len(batch.data))
        await self._received(Received(batch.first, len(batch), len(batch.data), batch=batch))

    async def take_segment(self, segment: Segment) -> None:
        blob = memoryview(segment.blob)
        try:
            self.node.store_segment(segment.first, segment.count, blob)
        except BadSegment as exc:  # the donor's bytes, not our cache: nothing was stored
            raise RemoteProtocolError(f"SEGMENT at seqno {segment.first}: {exc}") from exc
        await self._received(Received(segment.first, segment.count, len(blob), blob=blob))

    async def _received(self, item: Received) -> None:
        self.received_upto = item.last
        self.counters["istd_ist_received_writesets"] += item.count
        self.counters["istd_ist_received_bytes"] += item.nbytes
        if self.progress is not None:
            self.progress.received += item.count
            self.progress.received_bytes += item.nbytes
        await self.queue.put(item)

    async def _keepalive_loop(self, stream: trio.SocketStream, conn: IstConnection) -> None:
        while True:
            await trio.sleep(self.limits.keepalive_period)
            with trio.fail_after(self.limits.idle_timeout):
                await stream.send_all(conn.send(Keepalive()))

    # ------------------------------------------------------------------------------ apply side

    async def apply_loop(self, cancel_scope: trio.CancelScope) -> None:
        node = self.node
        try:
            if node.applier_name == "none":  # the gcache is the whole state: nothing to apply
                while True:
                    self._applied(await self.queue.get())
            else:
                item = await self.queue.get()
                # a catch-up that ends at its target (no --follow, no cluster replication after it) and is small
                target = self.target
                if not self.follow and self.on_caught_up is None and target is not None and \
                        target - node.last_committed <= IN_PROCESS_APPLY_MAX_WRITESETS:
                    await self._apply_in_process(item)
                else:
                    await self._apply_through_worker(item)
        except ApplyError as exc:
            node.shift(NodeState.INCONSISTENT)
            log.error(f"Receiving IST failed, node restart required: {exc}", error=str(exc))
            self._apply_error = exc
            cancel_scope.cancel()

    def _applied(self, item: Received) -> None:
        self.node.committed.set(item.last)
        self.queue.done(item.count, item.nbytes)
        self._check_caught_up()
        if self.on_applied is not None:
            self.on_applied()

    async def _apply_in_process(self, item: Received) -> None:
        """Apply ``item`` and every later queued one here, in a thread, as the worker would."""
        node = self.node
        applier, cluster_uuid = node.applier, node.uuid
        applier.position()  # read afresh: an earlier worker may have applied since this process last looked

        def apply(item: Received) -> None:
            batch = item.batch
            if batch is not None:
                apply_batch(applier, cluster_uuid, batch.first, bytes(batch.types), batch.sizes, batch.data)
            else:
                assert item.blob is not None
                apply_segment(applier, cluster_uuid, item.first, item.count, bytes(item.blob))

        while True:
            with trio.CancelScope(shield=True):  # a thread runs to its end: what it commits is accounted for
                try:
                    await trio.to_thread.run_sync(apply, item)
                except ApplyError:
                    self.queue.requeue([item])
                    raise
                except IstError as exc:  # a malformed segment: what the worker would have answered
                    self.queue.requeue([item])
                    raise ApplyError(str(exc)) from exc
                self._applied(item)
            item = await self.queue.get()

    async def _apply_through_worker(self, item: Received) -> None:
        """Send ``item`` and every later queued one to the apply worker process; its acks advance the
        position."""
        try:
            worker = await ApplyWorker.start(self.node)
        except BaseException:
            self.queue.requeue([item])  # not applied: the next apply loop takes it first
            raise
        in_flight: collections.deque[Received] = collections.deque()
        try:
            async with trio.open_nursery() as nursery:
                async def acks() -> None:
                    while True:
                        last = await worker.receive_ack()
                        done = in_flight.popleft()
                        assert done.last == last, (done.last, last)
                        self._applied(done)

                nursery.start_soon(acks)
                while True:
                    in_flight.append(item)
                    await worker.send(item)
                    item = await self.queue.get()
        except Exception as exc:  # the worker's ApplyError, out of the nursery's exception group
            err = unwrap(exc)
            if isinstance(err, ApplyError):
                raise err from None
            raise
        finally:
            with trio.CancelScope(shield=True):
                await worker.close()  # it applies what it was sent, then exits
                with trio.move_on_after(WORKER_EXIT_TIMEOUT_SECONDS):
                    while in_flight:  # acks nobody read: the loop was cancelled (a rejoin, a state transfer)
                        try:
                            last = await worker.receive_ack()
                        except ApplyError:
                            break
                        if last != in_flight[0].last:
                            break
                        self._applied(in_flight.popleft())
                self.queue.requeue(in_flight)  # not applied: the next apply loop takes them first

    def _check_caught_up(self) -> None:
        node, target = self.node, self.target
        if target is None or node.last_committed < target or self.caught_up.is_set():
            return
        p = self.progress
        if p is not None and p.total:
            log.info(p.line(), done=p.received, total=p.total)
            log.info(f"IST received: {node.uuid}:{node.last_committed}", uuid=str(node.uuid),
                     seqno=node.last_committed)
            elapsed = max(time.monotonic() - p.started, 1e-9)
            log.info(f"IST complete: {p.total} writesets, seqnos {p.first}-{p.last} from {p.donor}",
                     first=p.first, last=p.last, count=p.total, bytes=p.received_bytes,
                     seconds=round(elapsed, 3), rate=round(p.total / elapsed),
                     mb_per_s=round(p.received_bytes / elapsed / 1e6, 1))
        node.shift(NodeState.JOINED)
        self.caught_up.set()
        if self.on_caught_up is not None:
            self.on_caught_up()
            return
        node.shift(NodeState.SYNCED)
        log.info("Synchronized with group, ready for connections", seqno=node.last_committed)

    async def _wait_applied(self, target: int | None) -> None:
        if target is None:
            return
        self._check_caught_up()
        await self.caught_up.wait()

    async def progress_loop(self) -> None:
        while True:
            await trio.sleep(PROGRESS_INTERVAL_SECONDS)
            p = self.progress
            if p is not None and p.total and self.node.state is NodeState.JOINING_RECEIVING:
                log.info(p.line(), done=p.received, total=p.total)


class ApplyWorker:
    """The parent's side of istd/apply_worker.py: a child process with pipes."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self._buffer = bytearray()

    @classmethod
    async def start(cls, node: LocalNode) -> ApplyWorker:
        lock_fd = node.lock_fd
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "istd.apply_worker", str(node.datadir), node.applier_name, str(node.uuid)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=(lock_fd,) if lock_fd is not None else ())
        for stream in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError, AttributeError):  # Linux only; a smaller pipe still works
                fcntl.fcntl(stream.fileno(), F_SETPIPE_SZ, WORKER_PIPE_BYTES)  # type: ignore[union-attr]
        return cls(proc)

    async def send(self, item: Received) -> None:
        batch = item.batch
        if batch is not None:
            sizes = batch.sizes.tobytes() if isinstance(batch.sizes, array.array) else bytes(batch.sizes)
            parts = encode_request(batch.first, bytes(batch.types), sizes, batch.data)
        else:
            assert item.blob is not None
            parts = encode_segment_request(item.first, item.count, item.blob)
        assert self.proc.stdin is not None
        try:
            await self.proc.stdin.send_all(b"".join(parts))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ApplyError(await self._exit_reason()) from exc

    async def _exit_reason(self) -> str:
        """The worker's one-line error (it writes nothing else to stderr) and its exit code."""
        said = b""
        with trio.move_on_after(WORKER_EXIT_TIMEOUT_SECONDS):
            assert self.proc.stderr is not None
            while chunk := await self.proc.stderr.receive_some(65536):
                said += chunk
            code = await self.proc.wait()
            return f"the apply worker process exited ({code}): {said.decode(errors='replace').strip()}"
        return "the apply worker process stopped answering"

    async def _read(self, n: int) -> bytes:
        assert self.proc.stdout is not None
        while len(self._buffer) < n:
            chunk = await self.proc.stdout.receive_some(65536)
            if not chunk:
                raise ApplyError(await self._exit_reason())
            self._buffer += chunk
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    async def receive_ack(self) -> int:
        (last,) = REPLY.unpack(await self._read(REPLY.size))
        if last >= 0:
            return int(last)
        (length,) = ERROR_LEN.unpack(await self._read(ERROR_LEN.size))
        raise ApplyError((await self._read(length)).decode("utf-8", "replace"))

    async def close(self) -> None:
        """Close its stdin; it finishes the transaction it is in and exits."""
        if self.proc.stdin is not None:
            await trio.aclose_forcefully(self.proc.stdin)
        with trio.move_on_after(WORKER_EXIT_TIMEOUT_SECONDS):
            await self.proc.wait()
            return
        self.proc.kill()
        await self.proc.wait()


class EventReader:
    """Reads events from one connection with an idle deadline (PXC's IST watchdog, on both sides here)."""

    def __init__(self, stream: trio.SocketStream, conn: IstConnection, idle_timeout: float) -> None:
        self.stream = stream
        self.conn = conn
        self.idle_timeout = idle_timeout

    async def event(self) -> Any:
        return await next_event(self.stream, self.conn, self.idle_timeout)


def _root_cause(err: BaseException) -> BaseException:
    """trio's open_tcp_stream raises OSError("all attempts ... failed") from a group of the real errors."""
    cause = err.__cause__
    while cause is not None:
        if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
            cause = cause.exceptions[0]
            continue
        if isinstance(cause, OSError):
            return cause
        cause = cause.__cause__
    return err


_IST_FIX = ("Is `istd donor` running on that host with --listen on that port (default 4568)? "
            "Check the --donor address and port")
_SST_FIX = ("The donor gave this SST address: check its --sst-listen (default port 4444) and --sst-address, "
            "and that a firewall lets the port through")


def _connect_hint(donor: str, err: BaseException, *, sst: bool = False) -> str:
    err = _root_cause(unwrap(err))
    fix = _SST_FIX if sst else _IST_FIX
    if isinstance(err, ConnectionRefusedError):
        return f"{donor}: connection refused: nothing listens there. {fix}"
    if isinstance(err, trio.TooSlowError):
        return (f"{donor}: no answer in time: the host may be down, the address wrong, or a firewall may drop "
                f"port traffic. {fix}")
    if isinstance(err, OSError):
        return f"{donor}: {describe(err)}. {fix}"
    return f"{donor}: {describe(err)}"


__all__ = ["C_OK", "JoinFailed", "Joiner", "Refused", "SstGranted"]
