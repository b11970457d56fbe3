"""`istd node`: a three-node cluster on loopback, each node on its own 127.0.0.x (real processes)."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from .procs import digest, free_port, http_status, istd_cmd, log_events, run_istd, wait_until

pytestmark = pytest.mark.slow


class Node:
    def __init__(self, root: Path, name: str, host: str, group_port: int, peers: str, *args: str) -> None:
        self.name = name
        self.host = host
        self.datadir = root / name
        self.group_port = group_port
        self.ist_port = free_port(host)
        self.api_port = free_port(host)
        self.sst_port = free_port(host)
        self.peers = peers
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []

    @property
    def api(self) -> str:
        return f"{self.host}:{self.api_port}"

    def start(self, *extra: str) -> Node:
        log = self.datadir.parent / f"{self.name}.{len(self.logs)}.log"
        self.logs.append(log)
        cmd = istd_cmd("node", "--name", self.name, "--datadir", str(self.datadir), "--address", self.host,
                       "--peers", self.peers, "--group-port", str(self.group_port), "--ist-port",
                       str(self.ist_port), "--api-port", str(self.api_port), "--sst-port", str(self.sst_port),
                       *self.args, *extra)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    def status(self) -> dict[str, Any] | None:
        return http_status(self.api)

    def wait_synced(self, last: int | None = None) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n{self.logs[-1].read_text()}")
            st = self.status()
            ok = st and st["wsrep_local_state_comment"] == "Synced" and (
                last is None or st["wsrep_last_committed"] == last)
            return st if ok else None

        result: dict[str, Any] = wait_until(ready, f"{self.name} Synced at {last}")
        return result

    def events(self, index: int = -1) -> list[dict[str, Any]]:
        return log_events(self.logs[index].read_text(errors="replace"))


@contextmanager
def three_nodes(root: Path, options: str = "") -> Iterator[list[Node]]:
    hosts = ["127.0.0.21", "127.0.0.22", "127.0.0.23"]
    group_ports = [free_port(h) for h in hosts]
    peers = ",".join(f"{h}:{p}" for h, p in zip(hosts, group_ports, strict=True))
    extra = ("--provider-options", options) if options else ()
    nodes = [Node(root, f"node{i + 1}", h, p, peers, "--writer", "node1", *extra)
             for i, (h, p) in enumerate(zip(hosts, group_ports, strict=True))]
    try:
        yield nodes
    finally:
        for n in nodes:
            if n.proc is not None and n.proc.poll() is None:
                n.proc.kill()
                n.proc.wait()


def start_cluster(nodes: list[Node]) -> str:
    node1 = nodes[0].start("--bootstrap")
    node1.wait_synced()
    uuid = json.loads(run_istd("grastate", "show", str(node1.datadir), "--json").stdout)["uuid"]
    for n in nodes[1:]:  # empty data directories: they join by SST, as Galera's nodes do at formation
        n.start()
    for n in nodes:
        n.wait_synced()
    for n in nodes[1:]:
        assert any(str(e.get("event", "")).startswith("Installed new state from SST: ") for e in n.events()), n.name
    return str(uuid)


def load(node: Node, count: int) -> str:
    return run_istd("load", "--node", node.api, "--count", str(count), "--size", "200").stdout


def test_stop_and_start_a_node_rejoins_by_ist_from_a_follower(tmp_path: Path) -> None:
    with three_nodes(tmp_path, "gcs.fc_limit=100") as nodes:
        node1, node2, node3 = nodes
        start_cluster(nodes)
        load(node1, 20_000)
        for n in nodes:
            n.wait_synced(20_000)
        assert node3.stop() == 0
        assert "seqno:   20000\n" in (node3.datadir / "grastate.dat").read_text()
        load(node1, 30_000)
        node3.start()
        for n in nodes:
            n.wait_synced(50_000)
        messages = [e.get("event", "") for e in node3.events()]
        assert any(m.startswith("Receiving IST: 30000 writesets, seqnos 20001-50000") for m in messages), messages
        assert any(m.startswith("IST received: ") and m.endswith(":50000") for m in messages)
        selection = "Member 2.0 (node3) requested state transfer from '*any*'. Selected 1.0 (node2)(SYNCED) as donor."
        assert selection in messages
        # logged on every node, as Galera does
        for n in (node1, node2):
            assert selection in [e.get("event") for e in n.events()], n.name
        donor_events = [e.get("event", "") for e in node2.events()]
        assert any(m.startswith("async IST sender starting to serve") and m.endswith("sending 20001-50000")
                   for m in donor_events)
        assert digest(node1.datadir) == digest(node2.datadir) == digest(node3.datadir)
        # the same digest in every node's status, and `istd status` shows the cluster side by side
        wait_until(lambda: all((n.status() or {}).get("istd_state_digest_seqno") == 50_000 for n in nodes),
                   "digests in the status")
        assert len({(n.status() or {})["istd_state_digest"] for n in nodes}) == 1
        table = run_istd("status", "--node", node1.api, "--node", node2.api, "--node", node3.api).stdout
        rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
        assert rows["wsrep_local_state_comment"].count("Synced") == 3
        assert rows["wsrep_last_committed"].count("50000") == 3
        assert "istd_state_digest" in rows


def test_writes_to_a_follower_name_the_writer_and_flow_control_pauses_the_writer(tmp_path: Path) -> None:
    with three_nodes(tmp_path, "gcs.fc_limit=4") as nodes:
        node1, node2, _ = nodes
        start_cluster(nodes)
        refused = run_istd("write", "--node", node2.api, "--table", "t", "--key", "k", "--value", "v", check=False)
        assert refused.returncode == 4
        assert "node2 is not the writer of this cluster; send writes to node1's API at " + node1.api in refused.stderr
        out = load(node1, 20_000)
        assert "retries after 503 (flow control)" in out
        for n in nodes:
            n.wait_synced(20_000)
        writer = node1.status() or {}
        assert writer["wsrep_flow_control_recv"] > 0 and writer["wsrep_flow_control_paused"] > 0
        assert writer["wsrep_flow_control_active"] == "false"
        assert sum((n.status() or {})["wsrep_flow_control_sent"] for n in nodes[1:]) > 0
        assert digest(node1.datadir) == digest(node2.datadir)


def test_last_node_to_leave_is_safe_to_bootstrap(tmp_path: Path) -> None:
    with three_nodes(tmp_path) as nodes:
        start_cluster(nodes)
        load(nodes[0], 1000)
        for n in nodes:
            n.wait_synced(1000)
        for n in (nodes[2], nodes[1], nodes[0]):
            assert n.stop() == 0
        saved = {n.name: (n.datadir / "grastate.dat").read_text() for n in nodes}
        assert "safe_to_bootstrap: 1" in saved["node1"]
        assert "safe_to_bootstrap: 0" in saved["node2"] and "safe_to_bootstrap: 0" in saved["node3"]
        # bootstrapping from a node that was not the last to leave is refused, with Galera's explanation
        proc = run_istd("node", "--name", "node3", "--datadir", str(nodes[2].datadir), "--address", "127.0.0.23",
                        "--bootstrap", "--api-port", "0", check=False)
        assert proc.returncode == 6
        assert "It may not be safe to bootstrap the cluster from this node" in proc.stderr
