"""`istd node`: a cluster of one writer and any number of followers, caught up by IST.

Every node serves three ports: the group port (4567, Galera's), IST (4568) and the HTTP API (4580). The
group port carries the cluster's messages in the IST protocol (protocol/README.md, "cluster messages"):

* STATUS_REQUEST / STATUS: members exchange their state (name, addresses, state, last committed,
  cached_downto, writer or not). A joining node probes its peers with it; every node refreshes its view
  every ``GOSSIP_PERIOD_SECONDS``, and announcements ride along (so a donor selection is logged on every node,
  as in Galera).
* a SUBSCRIBE handshake to the writer: replication. The writer grants from its current position and streams
  every new write-set, in seqno order, for as long as the connection lives.
* CTRL(FC_STOP) / CTRL(FC_CONT) from a follower on its subscription: flow control. The writer takes no
  writes while any follower asked it to pause.

A node that starts behind, or restarts, joins as seeds 002 and 004 describe::

    probe peers (STATUS) -> subscribe to the writer: group position C; what follows C is queued
    -> local position M < C: select a donor (synced, holds M+1: cached_downto <= M+1; --donor names
       first, then not the writer) and request IST for M+1..C    Joining: receiving State Transfer
    -> IST applied                                                Joined
    -> queued write-sets applied, queue below the flow-control limit   Synced

The range of the IST is fixed when it is requested; everything after it comes through replication. A donor
slightly behind C waits for its own replication before serving (istd/donor.py).
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import structlog
import trio

from istd import exitcodes
from istd.donor import IstServer, safe_ist_seqno
from istd.errors import IstError
from istd.grastate import ZERO_UUID
from istd.http import FlowControlPaused, NotWriter
from istd.joiner import EventReader, Joiner, JoinFailed, Refused
from istd.node import LocalNode
from istd.states import NodeState
from istd.trioutil import PEER_ERRORS, describe, next_event, unwrap
from protocol import (
    C_EOF,
    C_FC_CONT,
    C_FC_STOP,
    SUPPORTED_VERSIONS,
    Accept,
    ConnectionClosed,
    Ctrl,
    Handshake,
    HandshakeResponse,
    Keepalive,
    RefusalReason,
    Role,
    Segment,
    Status,
    StatusRequest,
    TransferKind,
    WriteSet,
    WriteSetBatch,
    negotiate_version,
)
from protocol import Connection as IstConnection

log = structlog.get_logger("istd.cluster")

GROUP_PORT = 4567  # Galera's gmcast port
# Members refresh their view of each other this often; a member not heard from in STALE_AFTER is gone.
GOSSIP_PERIOD_SECONDS = 1.0
STALE_AFTER_SECONDS = 5.0
PROBE_TIMEOUT_SECONDS = 2.0
PROBE_ERRORS: tuple[type[BaseException], ...] = (*PEER_ERRORS, ValueError, KeyError, TypeError)
FIRST_BACKOFF_SECONDS = 0.2
SERVING_STATES = ("Synced", "Donor/Desynced")


@dataclass
class Member:
    name: str
    group: str
    ist: str
    api: str
    state: str
    last_committed: int
    cached_downto: int
    uuid: str
    writer: bool
    seen: float = 0.0
    sst: str = ""  # SST address ("" when the member serves none)


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


class Cluster:
    """One node's membership, group port, replication and flow control."""

    def __init__(self, node: LocalNode, ist_server: IstServer, *, address: str, group_port: int, ist_port: int,
                 api_port: int | None, peers: list[tuple[str, int]], donor_names: list[str], writer: bool,
                 ist_only: bool = False) -> None:
        self.node = node
        self.ist_only = ist_only
        self.sst_port: int | None = None  # set once the SST listener is open
        self._sst_donor: str | None = None  # the member the last SST came from: first choice for the IST after
        self.ist_server = ist_server
        self.address = address
        self.group_addr = f"{address}:{group_port}"
        self.ist_addr = f"{address}:{ist_port}"
        self.api_addr = f"{address}:{api_port}" if api_port else ""
        self.peers = [p for p in peers if f"{p[0]}:{p[1]}" != self.group_addr]
        self.donor_names = donor_names
        self.writer = writer
        self.members: dict[str, Member] = {}
        opts = node.options
        self.fc_limit: int = opts["gcs.fc_limit"]
        self.fc_factor: float = opts["gcs.fc_factor"]
        # writer side: subscriptions that asked to pause; time paused, for wsrep_flow_control_paused
        self.fc_stopped: set[int] = set()
        self._paused_since: float | None = None
        self._paused_total = 0.0
        self.counters = {"wsrep_flow_control_sent": 0, "wsrep_flow_control_recv": 0,
                         "istd_flow_control_lag_pauses": 0}
        # follower side
        self.joiner: Joiner | None = None
        self.group_seqno = -1
        self._pending: deque[Any] = deque()
        self._pending_count = 0
        self._pending_bytes = 0
        self._pending_flushed = trio.Event()
        self._ist_running = False
        self._take_lock = trio.Lock()
        self._fc_sent = False
        self._synced_since_failure = False
        self._ctrl_send, self._ctrl_recv = trio.open_memory_channel[int](16)
        self.group_server = IstServer(node, label="Group")
        self.group_server.on_first_event = self._on_first_event
        self.group_server.decide_hook = self._decide_subscription
        self.group_server.on_ctrl = self._on_ctrl
        self.group_server.on_close = self._on_close
        self._started = time.monotonic()

    # ------------------------------------------------------------------------- view of the cluster

    def me(self) -> Member:
        node = self.node
        sst = f"{self.address}:{self.sst_port}" if self.sst_port else ""
        return Member(node.name, self.group_addr, self.ist_addr, self.api_addr, node.state.comment,
                      node.last_committed, node.gcache.seqno_min, str(node.uuid), self.writer, time.time(), sst)

    def live_members(self) -> list[Member]:
        now = time.time()
        members = {m.name: m for m in self.members.values() if now - m.seen < STALE_AFTER_SECONDS}
        members[self.node.name] = self.me()
        return sorted(members.values(), key=lambda m: m.name)

    def index(self, name: str) -> int:
        names = [m.name for m in self.live_members()]
        return names.index(name) if name in names else len(names)

    def writer_member(self) -> Member | None:
        if self.writer:
            return self.me()
        # a writer serving an SST is Donor/Desynced and still the writer (it takes writes all along)
        return next((m for m in self.live_members() if m.writer and m.state in SERVING_STATES), None)

    @property
    def paused(self) -> bool:
        return bool(self.fc_stopped)

    def lagging(self) -> str | None:
        """A subscription whose writer-side backlog (committed but not yet sent, e.g. over a slow link) is past
        the upper flow-control limit: it counts like a long receive queue, as Galera's send window makes a slow
        member slow the group instead of falling behind until IST or SST is its only way back."""
        last = self.node.last_committed
        limit = self.upper_limit()
        for stats in self.group_server.active.values():
            sent_upto = stats.first + stats.sent_writesets - 1
            if last - sent_upto > limit:
                return f"{stats.peer} is {last - sent_upto} write-sets behind"
        return None

    def upper_limit(self) -> int:
        """Galera: fc_limit * sqrt(members); the lower limit is that times fc_factor."""
        return max(1, round(self.fc_limit * math.sqrt(max(len(self.live_members()), 1))))

    def status(self) -> dict[str, Any]:
        paused = self._paused_total + (time.monotonic() - self._paused_since if self._paused_since else 0.0)
        uptime = max(time.monotonic() - self._started, 1e-9)
        members = self.live_members()
        writer = self.writer_member()
        queue = (self.joiner.queue.length if self.joiner else 0) + self._pending_count
        return {
            **self.counters,
            "wsrep_flow_control_paused": round(paused / uptime, 6),
            "wsrep_flow_control_active": "true" if self.paused else "false",
            "wsrep_cluster_size": len(members),
            "wsrep_cluster_status": "Primary" if writer is not None else "non-Primary",
            "wsrep_incoming_addresses": ",".join(m.api for m in members if m.api),
            "wsrep_local_recv_queue": queue,
            "istd_writer": writer.name if writer else "",
            "istd_group_seqno": self.group_seqno,
        }

    # ------------------------------------------------------------------------- the group port (server side)

    async def _on_first_event(self, sender: Any, event: Any) -> bool:
        if not isinstance(event, StatusRequest):
            return False
        try:
            request = json.loads(event.payload)
            member = Member(**{**request["member"], "seen": time.time()})
        except (ValueError, KeyError, TypeError) as exc:
            raise IstError(f"bad STATUS_REQUEST from {sender.peer}: {exc}") from exc
        self.members[member.name] = member
        if request.get("announce"):
            log.info(str(request["announce"]), member=member.name)
        await sender._send(Status(json.dumps({"member": asdict(self.me())}).encode()))
        return True

    def _decide_subscription(self, hs: Handshake) -> HandshakeResponse | None:
        if not hs.subscribe:
            return None
        node = self.node
        last = node.last_committed
        version = negotiate_version(hs.versions, SUPPORTED_VERSIONS) or 0

        def answer(reason: RefusalReason, message: str) -> HandshakeResponse:
            granted = TransferKind.IST if reason is RefusalReason.NONE else TransferKind.NONE
            return HandshakeResponse(granted=granted, version=version if granted else 0, reason=reason,
                                     donor_uuid=node.uuid, first=last + 1, last=last,
                                     cached_downto=node.gcache.seqno_min, safe_ist_seqno=-1, donor_last=last,
                                     message=message)

        if not self.writer:
            writer = self.writer_member()
            where = f"{writer.name} at {writer.group}" if writer else "not known here"
            return answer(RefusalReason.BUSY, f"{node.name} is not the writer; the writer is {where}")
        if version == 0:
            return answer(RefusalReason.VERSION_UNSUPPORTED, "no common protocol version")
        if hs.cluster_uuid != node.uuid:
            return answer(RefusalReason.UUID_MISMATCH,
                          f"subscriber's history {hs.cluster_uuid} is not the cluster's {node.uuid}")
        log.info(f"Member {hs.node_name} subscribed to replication from seqno {last + 1}", member=hs.node_name,
                 first=last + 1)
        return answer(RefusalReason.NONE, "subscribed")

    def _on_ctrl(self, conn_id: int, code: int) -> None:
        self.counters["wsrep_flow_control_recv"] += 1
        if code == C_FC_STOP:
            self.fc_stopped.add(conn_id)
        elif code == C_FC_CONT:
            self.fc_stopped.discard(conn_id)
        self._account_pause()

    def _on_close(self, conn_id: int) -> None:
        self.fc_stopped.discard(conn_id)
        self._account_pause()

    def _account_pause(self) -> None:
        now = time.monotonic()
        if self.paused and self._paused_since is None:
            self._paused_since = now
            log.info("Flow control: replication paused by a member that fell behind",
                     members=len(self.fc_stopped))
        elif not self.paused and self._paused_since is not None:
            self._paused_total += now - self._paused_since
            self._paused_since = None
            log.info("Flow control: replication resumed")

    async def serve(self, host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await self.group_server.serve(host, port, task_status=task_status)

    # ------------------------------------------------------------------------- writes

    async def write(self, payloads: list[bytes]) -> tuple[int, int]:
        if not self.writer:
            writer = self.writer_member()
            where = f"{writer.name}'s API at {writer.api}" if writer and writer.api else "the writer"
            raise NotWriter(f"{self.node.name} is not the writer of this cluster; send writes to {where}",
                            writer=writer.api if writer else None)
        if self.paused:
            raise FlowControlPaused("replication is paused by flow control (a member fell behind); retry shortly")
        behind = self.lagging()
        if behind is not None:
            self.counters["istd_flow_control_lag_pauses"] += 1
            raise FlowControlPaused(f"replication is paused by flow control: {behind}; retry shortly")
        return await self.node.write(payloads)

    # ------------------------------------------------------------------------- talking to peers

    async def probe(self, host: str, port: int, announce: str | None = None) -> Member | None:
        payload: dict[str, Any] = {"member": asdict(self.me())}
        if announce:
            payload["announce"] = announce
        try:
            with trio.fail_after(PROBE_TIMEOUT_SECONDS):
                stream = await trio.open_tcp_stream(host, port)
                try:
                    conn = IstConnection(Role.JOINER)
                    await stream.send_all(conn.send(StatusRequest(json.dumps(payload).encode())))
                    event = await next_event(stream, conn)
                finally:
                    await trio.aclose_forcefully(stream)
            if not isinstance(event, Status):
                return None
            member = Member(**{**json.loads(event.payload)["member"], "seen": time.time()})
        except PROBE_ERRORS:
            return None
        self.members[member.name] = member
        return member

    async def probe_all(self, announce: str | None = None) -> list[Member]:
        found: list[Member] = []

        async def one(host: str, port: int) -> None:
            member = await self.probe(host, port, announce)
            if member is not None:
                found.append(member)

        async with trio.open_nursery() as nursery:
            for host, port in self.peers:
                nursery.start_soon(one, host, port)
        return found

    async def gossip(self) -> None:
        while True:
            await self.probe_all()
            await trio.sleep(GOSSIP_PERIOD_SECONDS)

    async def announce(self, text: str) -> None:
        log.info(text)
        await self.probe_all(announce=text)

    # ------------------------------------------------------------------------- follower

    def select_donor(self, local: int) -> Member:
        """Galera's IST donor rule: synced, same history, holds local+1 (cached_downto <= local + 1);
        names given with --donor first, then the others, preferring not to load the writer."""
        me = self.node.name
        candidates = [m for m in self.live_members() if m.name != me and m.state == "Synced"
                      and m.uuid == str(self.node.uuid) and 0 <= m.cached_downto <= local + 1]
        for name in [self._sst_donor, *self.donor_names]:
            for m in candidates:
                if m.name == name:
                    return m
        if not candidates:
            seen = ", ".join(f"{m.name}:{m.state}:{m.cached_downto}" for m in self.live_members())
            raise JoinFailed(f"no synced member holds seqno {local + 1} in its gcache (members: {seen})", 4)
        return max(candidates, key=lambda m: (not m.writer, m.cached_downto))

    def ist_impossible(self, local: int) -> str | None:
        """Galera's rules, joiner side then group side: why this node cannot catch up by IST, or None.

        Unknown position or another history: SST only. Otherwise an IST donor must be synced, of the same
        history and hold local + 1; and (unless IST-only, as PXC) local must not be below Galera's
        safe_ist_seqno = lowest cached seqno of all members + min((group seqno - that) >> 7, 2^20)."""
        node = self.node
        writer = self.writer_member()
        if writer is None:
            return None
        if node.uuid == ZERO_UUID or local < 0:
            return f"Local state {node.uuid}:{local} is unknown"
        if str(node.uuid) != writer.uuid:
            return f"Local state UUID ({node.uuid}) does not match group state UUID ({writer.uuid})"
        group = writer.last_committed
        if local >= group:
            return None
        try:
            self.select_donor(local)
        except JoinFailed as exc:
            return f"IST first seqno {local + 1} not found from cache: {exc}"
        cached = [m.cached_downto for m in self.live_members() if m.cached_downto >= 0]
        if not self.ist_only and cached:
            safe = safe_ist_seqno(min(cached), group)
            if local < safe:
                log.info(f"may fallback to sst. ist_seqno [{local}] < safe_ist_seqno [{safe}]", ist_seqno=local,
                         safe_ist_seqno=safe, lowest_cached=min(cached), group_seqno=group)
                return (f"ist_seqno {local} < safe_ist_seqno {safe} (lowest cached {min(cached)} + safety gap "
                        f"min(({group} - {min(cached)}) >> 7, 2^20)): the donors' caches may evict it meanwhile")
        return None

    def select_sst_donor(self) -> Member:
        """Galera's SST donor: a synced member serving SST, names given with --donor first, then not the writer."""
        me = self.node.name
        candidates = [m for m in self.live_members() if m.name != me and m.state == "Synced" and m.sst]
        for name in self.donor_names:
            for m in candidates:
                if m.name == name:
                    return m
        if not candidates:
            seen = ", ".join(f"{m.name}:{m.state}" for m in self.live_members())
            raise JoinFailed(f"no synced member serves SST (members: {seen})", exitcodes.REFUSED)
        return min(candidates, key=lambda m: m.writer)

    async def _state_transfer(self, joiner: Joiner, why: str) -> None:
        """A full state transfer from a synced member's SST port; the IST that follows comes from the same
        member (it keeps the snapshot's next seqno in its gcache). No apply worker runs meanwhile."""
        node = self.node
        if self.ist_only:
            raise JoinFailed(f"IST is impossible: {why}; --ist-only forbids SST: nothing was changed, the position "
                             f"{node.gtid} is kept", exitcodes.REFUSED, final=True)
        donor = self.select_sst_donor()
        want = ",".join(self.donor_names) or "*any*"
        log.info(f"IST is impossible: {why}; full state transfer (SST) needed", reason=why)
        await self.announce(f"Member {self.index(node.name)}.0 ({node.name}) requested state transfer from '{want}'. "
                            f"Selected {self.index(donor.name)}.0 ({donor.name})(SYNCED) as donor.")
        writer = self.writer_member() or donor
        await joiner.state_transfer(_hostport(donor.sst), ist_donor=_hostport(donor.ist), reason=why,
                                    group=f"{writer.uuid}:{writer.last_committed}")
        self._sst_donor = donor.name
        await self.announce(f"{self.index(node.name)}.0 ({node.name}): State transfer from "
                            f"{self.index(donor.name)}.0 ({donor.name}) complete.")

    async def follow(self) -> None:
        """Join the cluster and keep following the writer, rejoining (by IST, or SST when IST is impossible)
        after any failure."""
        node = self.node
        # ist_only: the cluster decides SST itself, before any apply worker runs (_state_transfer)
        joiner = Joiner(node, [], on_caught_up=self._ist_done, on_applied=self._after_apply, retries=2,
                        ist_only=True)
        self.joiner = joiner
        backoff = FIRST_BACKOFF_SECONDS
        while True:
            try:
                await self._follow_attempt(joiner)
            except Exception as exc:
                err = unwrap(exc)
                if isinstance(err, JoinFailed) and err.final:
                    raise err from None
                if not isinstance(err, PEER_ERRORS):
                    raise
                log.warning(f"Lost the cluster: {describe(err)}; rejoining in {backoff:.1f} s",
                            error=describe(err), position=node.last_committed)
            self._fc_sent = False
            if self._synced_since_failure:  # it had rejoined: the next failure starts the backoff anew
                backoff = FIRST_BACKOFF_SECONDS
                self._synced_since_failure = False
            if node.state is not NodeState.INCONSISTENT:
                node.shift(NodeState.INITIALIZED)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, node.options["ist.retry_max"])

    async def _follow_attempt(self, joiner: Joiner) -> None:
        """One join: the IST-or-SST decision (and the SST, while no apply worker runs), then replication with
        the joiner's apply worker, until the link fails."""
        await self.probe_all()
        why = self.ist_impossible(joiner.received_upto)
        if why is not None:
            await self._state_transfer(joiner, why)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(joiner.apply_loop, nursery.cancel_scope)
            nursery.start_soon(joiner.progress_loop)
            await self._follow_once(joiner)
        joiner.check_applied()

    async def _follow_once(self, joiner: Joiner) -> None:
        node = self.node
        # write-sets held back by a failed attempt were never stored: the next subscription and IST cover them
        self._pending.clear()
        self._pending_count = self._pending_bytes = 0
        self._ist_running = False
        writer = self.writer_member()  # the view _follow_attempt (or the SST's announcement) just refreshed
        if writer is None:
            raise JoinFailed("no writer reachable among the peers: is the bootstrapped node running?", 3)
        host, port = _hostport(writer.group)
        with trio.fail_after(node.options.limits.connect_timeout):
            stream = await trio.open_tcp_stream(host, port)
        try:
            conn = IstConnection(Role.JOINER)
            receive = EventReader(stream, conn, node.options.limits.idle_timeout)
            local = joiner.received_upto
            with trio.fail_after(node.options.limits.handshake_timeout):
                await stream.send_all(conn.send(Handshake(
                    cluster_uuid=node.uuid, last_applied=local, first=local + 1, last=-1, accept=Accept.IST,
                    versions=SUPPORTED_VERSIONS, node_name=node.name, follow=True, segments=True,
                    subscribe=True)))
                response = await receive.event()
            if not isinstance(response, HandshakeResponse) or response.granted is TransferKind.NONE:
                raise Refused(writer.group, response) if isinstance(response, HandshakeResponse) else \
                    IstError(f"unexpected answer to a subscription: {response!r}")
            group = response.first - 1
            self.group_seqno = group
            if local > group:
                raise JoinFailed(f"local state {node.uuid}:{local} is ahead of the cluster's {group}: this node "
                                 "has write-sets the cluster does not; it needs a full state transfer", 6)
            await stream.send_all(conn.send(Ctrl(0)))
            self._ist_running = local < group
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._replicate, receive)
                nursery.start_soon(self._send_ctrl, stream, conn)
                if local < group:
                    await self._request_ist(joiner, local, group)
                async with self._take_lock:
                    while self._pending:
                        item = self._pending.popleft()
                        self._pending_count -= _count(item)
                        self._pending_bytes -= _nbytes(item)
                        await self.take(joiner, item)
                    self._ist_running = False
                    self._pending_flushed.set()
                    self._pending_flushed = trio.Event()
                self._after_apply()
                await trio.sleep_forever()
        finally:
            await trio.aclose_forcefully(stream)

    async def _request_ist(self, joiner: Joiner, local: int, group: int) -> None:
        node = self.node
        donor = self.select_donor(local)  # the joiner logs "State transfer required:" with the donor's answer
        want = ",".join(self.donor_names) or "*any*"
        await self.announce(f"Member {self.index(node.name)}.0 ({node.name}) requested state transfer from '{want}'. "
                            f"Selected {self.index(donor.name)}.0 ({donor.name})(SYNCED) as donor.")
        others = [m for m in self.live_members() if m.name not in (node.name, donor.name) and m.state == "Synced"]
        joiner.donors = [_hostport(donor.ist)] + [_hostport(m.ist) for m in others]
        joiner.target_last = group
        joiner.target = None
        joiner.progress = None
        joiner.caught_up = trio.Event()
        self._sst_donor = None
        await joiner.catch_up()
        await self.announce(f"{self.index(node.name)}.0 ({node.name}): State transfer from "
                            f"{self.index(donor.name)}.0 ({donor.name}) complete.")

    def _ist_done(self) -> None:
        joiner = self.joiner
        assert joiner is not None
        joiner.progress = None
        queued = self._pending_count
        log.info(f"Processing event queue:... 0.0% (0/{queued} events) complete.", done=0, total=queued)

    async def _replicate(self, receive: EventReader) -> None:
        joiner = self.joiner
        assert joiner is not None
        while True:
            event = await receive.event()
            if isinstance(event, Segment | WriteSetBatch | WriteSet):
                # memory stays bounded while an IST runs: past recv_queue_size, stop reading and let TCP push
                # back on the writer (which drops a subscriber that stays stalled past its idle timeout)
                while self._ist_running and self._pending_bytes > joiner.queue.max_bytes:
                    await self._pending_flushed.wait()
                async with self._take_lock:
                    if self._ist_running:
                        self._pending.append(event)
                        self._pending_count += _count(event)
                        self._pending_bytes += _nbytes(event)
                    else:
                        await self.take(joiner, event)
                        self._after_apply()
            elif isinstance(event, Keepalive):
                continue
            elif isinstance(event, Ctrl) and event.code == C_EOF:
                raise trio.BrokenResourceError("the writer ended replication (it is stopping)")
            elif isinstance(event, ConnectionClosed):
                raise trio.BrokenResourceError("the writer closed the replication connection")
            else:
                raise IstError(f"unexpected {event!r} on the replication connection")

    @staticmethod
    async def take(joiner: Joiner, event: Any) -> None:
        if isinstance(event, Segment):
            await joiner.take_segment(event)
        elif isinstance(event, WriteSetBatch):
            await joiner.take(event)
        else:
            await joiner.take(WriteSetBatch.from_payloads(event.seqno, bytes([event.type]), [event.payload]))

    async def _send_ctrl(self, stream: trio.SocketStream, conn: IstConnection) -> None:
        keepalive = self.node.options.limits.keepalive_period
        while True:
            with trio.move_on_after(keepalive):
                code = await self._ctrl_recv.receive()
                await stream.send_all(conn.send(Ctrl(code)))
                self.counters["wsrep_flow_control_sent"] += 1
                continue
            await stream.send_all(conn.send(Keepalive()))

    def _after_apply(self) -> None:
        """Flow control and the last step of joining, after every applied batch."""
        joiner, node = self.joiner, self.node
        if joiner is None or self._ist_running:
            return
        queue = joiner.queue.length + self._pending_count
        upper = self.upper_limit()
        lower = round(upper * self.fc_factor)
        # JOINING_RECEIVING here: an SST brought the node to the group position, no IST was needed
        if node.state in (NodeState.INITIALIZED, NodeState.JOINED, NodeState.JOINING_RECEIVING) and queue <= lower:
            node.shift(NodeState.JOINED)
            node.shift(NodeState.SYNCED)
            self._synced_since_failure = True
            log.info("Synchronized with group, ready for connections", seqno=node.last_committed)
        if node.state in (NodeState.JOINED, NodeState.SYNCED):
            if not self._fc_sent and queue > upper:
                self._fc_sent = self._queue_ctrl(C_FC_STOP)
            elif self._fc_sent and queue <= lower:
                self._fc_sent = not self._queue_ctrl(C_FC_CONT)

    def _queue_ctrl(self, code: int) -> bool:
        try:
            self._ctrl_send.send_nowait(code)
            return True
        except trio.WouldBlock:
            return False

    # ------------------------------------------------------------------------- leaving

    async def safe_to_bootstrap(self) -> bool:
        """Galera sets it on the last node to leave: the writer with no follower connected, or a follower
        that can reach no other member."""
        if self.writer:
            return not self.group_server.active
        return not await self.probe_all()


def _nbytes(event: Any) -> int:
    if isinstance(event, Segment):
        return len(event.blob)
    if isinstance(event, WriteSetBatch):
        return len(event.data)
    return len(event.payload)


def _count(event: Any) -> int:
    if isinstance(event, Segment):
        return int(event.count)
    if isinstance(event, WriteSetBatch):
        return len(event)
    return 1


__all__ = ["GROUP_PORT", "Cluster", "Member"]
