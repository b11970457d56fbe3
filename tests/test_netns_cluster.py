"""Multi-host `istd node`: a three-node cluster, each node in its own network namespace ("host").

node1 (10.213.0.1, the writer, bootstrapped), node2 (10.213.0.2) and node3 (10.213.0.3) run the real CLI on
Galera's ports (4567 group, 4568 IST, 4580 API) and reach each other only across the harness's bridge; the
load comes from `istd load` run inside a namespace. The same scenarios on loopback are in
tests/test_cluster_e2e.py; the harness is tests/netns.py (the tests skip where namespaces cannot be created).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from . import netns
from .procs import digest, wait_until

pytestmark = pytest.mark.slow

DEADLINE = 45.0
CUT_SECONDS = 3.0
# node3's watchdog in the link-cut test: a silent peer is noticed after 2 s
STALL_OPTIONS = "ist.idle_timeout=PT2S; ist.keepalive_period=PT0.5S"


def _messages(events: list[dict[str, Any]]) -> list[str]:
    return [str(e.get("event", "")) for e in events]


def _load(net: netns.Network, on: netns.Host, node: netns.NsNode, count: int) -> str:
    """`istd load` from inside ``on`` to ``node``'s API; its report line."""
    return netns.run_istd_on(net, on, "load", "--node", node.api, "--count", str(count), "--size", "200",
                             timeout=DEADLINE).stdout


def _all_synced_and_equal(nodes: list[netns.NsNode], last: int) -> None:
    for n in nodes:
        n.wait_synced(last, timeout=DEADLINE)
    digests = {n.name: digest(n.datadir) for n in nodes}
    assert len(set(digests.values())) == 1, digests
    assert digests["node1"][0].endswith(f":{last}"), digests


def _stalls(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """node3's reports of a dead connection: the IST's (kept position in ``received_upto``) or the
    replication's (``position``)."""
    return [e for e in events if "interrupted after seqno" in str(e.get("event", ""))
            or str(e.get("event", "")).startswith("Lost the cluster")]


def _ist_requests(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if str(e.get("event", "")).startswith("Receiving IST: ")]


def test_node_rejoins_by_ist_from_a_follower_across_hosts(tmp_path: Path) -> None:
    before, during = 5_000, 20_000
    with netns.network(3) as net:
        nodes = netns.cluster_nodes(net, tmp_path)
        node1, node2, node3 = nodes
        netns.start_cluster(nodes, timeout=DEADLINE)
        _load(net, node2.on, node1, before)  # the writes cross the bridge: node2's host to node1's API
        for n in nodes:
            n.wait_synced(before, timeout=DEADLINE)
        assert node3.stop() == 0
        assert f"seqno:   {before}\n" in (node3.datadir / "grastate.dat").read_text()
        _load(net, node2.on, node1, during)
        total = before + during
        node3.start()
        _all_synced_and_equal(nodes, total)

        events = node3.events()
        requests = _ist_requests(events)
        assert len(requests) == 1, _messages(events)
        ist = requests[0]
        assert ist["event"] == f"Receiving IST: {during} writesets, seqnos {before + 1}-{total}", ist
        assert ist["donor"] == node2.ist, ist  # a follower serves the IST, not the writer
        assert any(m.startswith("IST received: ") and m.endswith(f":{total}") for m in _messages(events))
        served = [m for m in _messages(node2.events()) if m.startswith("async IST sender starting to serve")]
        assert len(served) == 1 and node3.on.addr in served[0] and served[0].endswith(f"sending {before + 1}-{total}")
        assert not any(m.startswith("async IST sender starting") for m in _messages(node1.events()))


def test_link_cut_mid_ist_resumes_without_loss_or_repeat(tmp_path: Path) -> None:
    # node3 leaves at `before`; Galera's safety gap (1/128 of the cached range) then still allows IST for
    # `count` more: before >= 1 + (before + count - 1) >> 7
    before, count = 1_000, 100_000
    total = before + count
    with netns.network(3) as net:
        nodes = netns.cluster_nodes(net, tmp_path)
        node1, node2, node3 = nodes
        node3.options = STALL_OPTIONS
        netns.start_cluster(nodes, timeout=DEADLINE)
        _load(net, node1.on, node1, before)
        for n in nodes:
            n.wait_synced(before, timeout=DEADLINE)
        assert node3.stop() == 0
        _load(net, node1.on, node1, count)  # distinct keys: a lost or repeated write-set changes the digest
        net.slow_link(node3.on, "32mbit")  # ~30 MB of IST takes several seconds: time to cut it in the middle
        node3.start()

        def mid_transfer() -> int:
            node3.check_running()
            st = node3.status() or {}
            committed = int(st.get("wsrep_last_committed", 0))
            receiving = st.get("wsrep_local_state_comment") == "Joining: receiving State Transfer"
            return committed if receiving and before + count // 20 < committed < before + count // 2 else 0

        at_cut = wait_until(mid_transfer, "node3 5-50% through its IST", DEADLINE)
        net.cut_link(node3.on)
        cut_at = time.monotonic()
        try:
            assert not _stalls(node3.events()), f"node3 reported a stall before the cut:\n{node3.log()}"
            # node3 notices the silence by its idle timeout (PT2S), not by a socket error
            wait_until(lambda: _stalls(node3.events()), "node3 detecting the stall", 15)
        finally:
            time.sleep(max(0.0, cut_at + CUT_SECONDS - time.monotonic()))  # a fixed-length cut, not a sync
            net.restore_link(node3.on)
        _all_synced_and_equal(nodes, total)  # same position, same digest: nothing lost, nothing repeated

        events = node3.events()
        stall = _stalls(events)[0]
        assert "timed out" in stall["error"], stall
        # the position is kept: what was received before the cut is not asked for again
        kept = int(stall.get("received_upto", stall.get("position", -1)))
        assert at_cut <= kept < total, (at_cut, stall)
        after = events[events.index(stall) + 1:]
        resumed = [e for e in after if str(e.get("event", "")).startswith(("Resuming IST from ", "Receiving IST: "))]
        assert resumed, _messages(after)
        again = resumed[0]
        assert again["last"] == total and again["donor"] in (node2.ist, node1.ist), again
        if "received_upto" in stall:  # the IST connection noticed first: the joiner resumes in place
            assert again["event"] == f"Resuming IST from {stall['donor']}: seqnos {kept + 1}-{total}", again
        else:  # the replication connection noticed first: node3 rejoins from the position it kept
            assert kept < again["first"] <= total, (stall, again)
        assert all(e["first"] > at_cut for e in resumed), resumed
        assert any(m.startswith("IST received: ") and m.endswith(f":{total}") for m in _messages(after))


def test_flow_control_pauses_the_writer_for_a_slow_host(tmp_path: Path) -> None:
    count = 20_000
    with netns.network(3) as net:
        nodes = netns.cluster_nodes(net, tmp_path, options="gcs.fc_limit=8")
        node1, _, node3 = nodes
        netns.start_cluster(nodes, timeout=DEADLINE)
        net.slow_link(node3.on, "8mbit")
        out = _load(net, node1.on, node1, count)
        assert "retries after 503 (flow control)" in out, out
        _all_synced_and_equal(nodes, count)
        writer = node1.status() or {}
        assert writer["wsrep_flow_control_recv"] > 0, writer
        assert writer["wsrep_flow_control_paused"] > 0, writer
        assert writer["wsrep_flow_control_active"] == "false", writer
        slow = node3.status() or {}
        assert slow["wsrep_flow_control_sent"] > 0, slow
        messages = _messages(node1.events())
        assert "Flow control: replication paused by a member that fell behind" in messages
        paused = [i for i, m in enumerate(messages) if m.startswith("Flow control: replication paused")]
        released = [i for i, m in enumerate(messages) if m == "Flow control: replication resumed"]
        assert paused and released and released[-1] > paused[-1], messages  # the last pause was released
