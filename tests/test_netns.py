"""Multi-host: the real CLI in separate network namespaces ("hosts") joined by a private bridge.

The donor runs on host A (10.213.0.1), the joiner on host B (10.213.0.2), on Galera's ports. Links are cut by
unplugging a host's bridge port: its sockets stay open and go silent, as when a cable or switch fails, so only
the idle timeout can notice. See tests/netns.py; the tests skip where namespaces cannot be created.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from istd import exitcodes

from . import netns
from .procs import digest, seed_joiner, wait_until

pytestmark = pytest.mark.slow

DEADLINE = 60.0
CUT_SECONDS = 3.0
STALL_OPTIONS = "ist.recv_queue_size=256K; ist.idle_timeout=PT2S; ist.keepalive_period=PT0.5S"


def _messages(events: list[dict]) -> list[str]:
    return [e.get("event", "") for e in events]


def test_ist_across_hosts(tmp_path: Path) -> None:
    with netns.network(2) as net:
        a, b = net.hosts
        donor = netns.donor(net, a, tmp_path / "donor", "--bootstrap").start()
        donor.wait_synced(DEADLINE)
        joiner = netns.joiner(net, b, tmp_path / "joiner", donor)
        seed_joiner(joiner, donor)
        # the writes come from the other host too: HTTP across the bridge
        netns.run_istd_on(net, b, "load", "--node", donor.api, "--count", "50000", "--size", "300",
                          timeout=DEADLINE)
        joiner.start()
        assert joiner.wait_exit(DEADLINE) == exitcodes.OK, joiner.log()
        donor_pos, donor_digest = digest(donor.datadir)
        joiner_pos, joiner_digest = digest(joiner.datadir)
        assert donor_pos == joiner_pos and donor_pos.endswith(":50000")
        assert donor_digest == joiner_digest
        assert any(m.startswith("Receiving IST: 50000 writesets, seqnos 1-50000") for m in _messages(joiner.events()))
        served = [m for m in _messages(donor.events()) if m.startswith("async IST sender starting to serve")]
        assert len(served) == 1 and b.addr in served[0] and served[0].endswith("sending 1-50000"), served


def test_link_cut_mid_ist_resumes_without_loss_or_repeat(tmp_path: Path) -> None:
    count = 100_000
    with netns.network(2) as net:
        a, b = net.hosts
        donor = netns.donor(net, a, tmp_path / "donor", "--bootstrap").start()
        donor.wait_synced(DEADLINE)
        joiner = netns.joiner(net, b, tmp_path / "joiner", donor, args=("--provider-options", STALL_OPTIONS))
        seed_joiner(joiner, donor)
        # no --keyspace: every write-set writes a new key, so a lost or repeated one changes the digest
        netns.run_istd_on(net, a, "load", "--node", donor.api, "--count", str(count), "--size", "300",
                          timeout=DEADLINE)
        net.slow_link(b, "32mbit")  # ~35 MB of IST takes ~9 s: time to cut it in the middle
        joiner.start()

        def mid_transfer() -> int:
            assert joiner.proc is not None
            if joiner.proc.poll() is not None:
                raise AssertionError(f"joiner exited {joiner.proc.returncode} before the cut:\n{joiner.log()}")
            committed = int((joiner.status() or {}).get("wsrep_last_committed", 0))
            return committed if count // 20 < committed < count // 2 else 0

        at_cut = wait_until(mid_transfer, "the joiner 5-50% through the transfer", DEADLINE)
        net.cut_link(b)
        cut_at = time.monotonic()
        try:
            # the joiner notices the silence by its idle timeout, not by a socket error
            wait_until(lambda: "interrupted after seqno" in joiner.log(), "the joiner detecting the stall", 15)
        finally:
            time.sleep(max(0.0, cut_at + CUT_SECONDS - time.monotonic()))  # a fixed-length cut, not a sync
            net.restore_link(b)
        assert joiner.wait_exit(DEADLINE) == exitcodes.OK, joiner.log()

        donor_pos, donor_digest = digest(donor.datadir)
        joiner_pos, joiner_digest = digest(joiner.datadir)
        assert donor_pos.endswith(f":{count}")
        assert joiner_pos == donor_pos
        assert joiner_digest == donor_digest

        events = joiner.events()
        interrupted = [e for e in events if "interrupted after seqno" in e.get("event", "")]
        assert interrupted, _messages(events)
        stall = interrupted[0]
        assert "timed out" in stall["error"], stall
        kept = int(stall["received_upto"])
        assert at_cut <= kept < count, (at_cut, stall)
        resumed = [m for m in _messages(events) if m.startswith("Resuming IST from ")]
        # the position is kept: the first resume asks for exactly the seqno after the last one received
        assert resumed and resumed[0] == f"Resuming IST from {donor.ist}: seqnos {kept + 1}-{count}", resumed
        assert any(m.startswith("Retrying state transfer in ") for m in _messages(events))
        assert f"seqno:   {count}\n" in (joiner.datadir / "grastate.dat").read_text()
