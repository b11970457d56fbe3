"""End to end: the real CLI as separate processes on loopback, each node on its own 127.0.0.x."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import struct
import threading
import time
import uuid
import zlib
from pathlib import Path

import pytest

from istd import exitcodes
from protocol import (
    SUPPORTED_VERSIONS,
    Accept,
    Connection,
    Handshake,
    HandshakeResponse,
    RefusalReason,
    Role,
    TransferKind,
)

from .procs import Cluster, Daemon, cluster, digest, load, run_istd, seed_joiner, wait_until

pytestmark = pytest.mark.slow


def test_100k_catch_up_with_equal_digests(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        donor = c.donor("donor", "--bootstrap").start()
        donor.wait_synced()
        joiner = c.joiner("joiner", donor)
        seed_joiner(joiner, donor)
        load(donor, 100_000, size=200, keyspace=30_000)
        joiner.start()
        assert joiner.wait_exit() == exitcodes.OK, joiner.log()
        donor_pos, donor_digest = digest(donor.datadir)
        joiner_pos, joiner_digest = digest(joiner.datadir)
        assert donor_pos == joiner_pos and donor_pos.endswith(":100000")
        assert donor_digest == joiner_digest
        messages = joiner.messages()
        assert any(m.startswith("Receiving IST: 100000 writesets, seqnos 1-100000") for m in messages)
        assert any(m.startswith("IST received: ") and m.endswith(":100000") for m in messages)
        assert "Receiving IST... 100.0% (100000/100000 events) complete." in messages
        grastate = (joiner.datadir / "grastate.dat").read_text()
        assert "seqno:   100000\n" in grastate
        donor_messages = donor.messages()
        assert any(m.startswith("async IST sender starting to serve") and m.endswith("sending 1-100000")
                   for m in donor_messages)
        assert "async IST sender served" in donor_messages


def test_joiner_killed_mid_apply_resumes_without_loss_or_duplicate(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        donor = c.donor("donor", "--bootstrap").start()
        donor.wait_synced()
        joiner = c.joiner("joiner", donor, args=("--provider-options", "ist.recv_queue_size=256K"))
        seed_joiner(joiner, donor)
        load(donor, 60_000, size=300)  # every write-set a new row: a lost or repeated one changes the digest
        joiner.start()
        wait_until(lambda: (joiner.status() or {}).get("wsrep_last_committed", 0) > 1000, "apply under way")
        assert joiner.proc is not None
        joiner.stop(signal.SIGKILL)
        assert "seqno:   -1" in (joiner.datadir / "grastate.dat").read_text()
        joiner.start()
        assert joiner.wait_exit() == exitcodes.OK, joiner.log()
        events = joiner.events()
        assert any(e.get("event", "").startswith("Recovered position: ") for e in events)
        assert digest(joiner.datadir) == digest(donor.datadir)


def test_donor_killed_mid_transfer_second_donor_resumes(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        first = c.donor("donor1", "--bootstrap").start()
        first.wait_synced()
        load(first, 80_000, size=400)
        first.stop()
        # donor2 gets a copy of donor1's data directory (what an rsync SST does): same history, same gcache
        shutil.copytree(first.datadir, tmp_path / "donor2", ignore=shutil.ignore_patterns("istd.lock"))
        second = c.donor("donor2")
        first.start().wait_synced()
        second.start().wait_synced()
        joiner = c.joiner("joiner", first, second,
                          args=("--provider-options", "ist.recv_queue_size=128K; ist.batch_size=64K"))
        seed_joiner(joiner, first)
        joiner.start()
        wait_until(lambda: (joiner.status() or {}).get("wsrep_last_committed", 0) > 100, "transfer under way")
        first.stop(signal.SIGKILL)
        assert joiner.wait_exit() == exitcodes.OK, joiner.log()
        assert digest(joiner.datadir) == digest(second.datadir)
        messages = joiner.messages()
        assert any(m.startswith("Resuming IST from " + second.ist) for m in messages), messages


def test_writes_continue_during_transfer_and_two_joiners_at_once(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        donor = c.donor("donor", "--bootstrap").start()
        donor.wait_synced()
        a = c.joiner("a", donor)
        b = c.joiner("b", donor, args=("--follow",))
        seed_joiner(a, donor)
        seed_joiner(b, donor)
        load(donor, 50_000, size=300)
        writer = threading.Thread(target=load, args=(donor, 20_000), kwargs={"size": 100})
        a.start()
        b.start()
        writer.start()
        assert a.wait_exit() == exitcodes.OK, a.log()
        writer.join(timeout=120)
        assert not writer.is_alive()
        # the follower keeps applying what the donor takes while and after it caught up
        final = (donor.status() or {})["wsrep_last_committed"]
        assert final == 70_000
        wait_until(lambda: (b.status() or {}).get("wsrep_last_committed") == final, "follower caught up")
        b.stop()
        a_pos, _ = digest(a.datadir)
        assert int(a_pos.rsplit(":", 1)[1]) >= 50_000
        assert digest(b.datadir) == digest(donor.datadir)


def test_ist_only_joiner_of_another_history_exits_4_and_keeps_position(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        donor = c.donor("donor", "--bootstrap").start()
        donor.wait_synced()
        joiner = c.joiner("joiner", donor, args=("--ist-only",))
        run_istd("grastate", "set", str(joiner.datadir), "--uuid", "11111111-2222-3333-4444-555555555555",
                 "--seqno", "7")
        before = sorted(p.name for p in joiner.datadir.iterdir())
        joiner.start()
        assert joiner.wait_exit() == exitcodes.REFUSED
        assert "UUID_MISMATCH" in joiner.log() and "--ist-only forbids SST" in joiner.log()
        assert "seqno:   7\n" in (joiner.datadir / "grastate.dat").read_text()
        assert not any(p.name.endswith(".sst") for p in joiner.datadir.iterdir()), before


def test_unreachable_donor_names_address_and_keeps_position(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        donor = c.donor("donor", "--bootstrap")  # never started: nothing listens there
        joiner = c.joiner("joiner", donor, args=("--retries", "1"))
        run_istd("grastate", "set", str(joiner.datadir), "--uuid", "11111111-2222-3333-4444-555555555555",
                 "--seqno", "42")
        proc = run_istd("joiner", "--datadir", str(joiner.datadir), "--donor", donor.ist, "--retries", "1",
                        "--api-listen", "none", check=False)
        assert proc.returncode == exitcodes.UNREACHABLE
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("istd: error: no donor reachable: " + donor.ist)
        assert "connection refused" in last and "Traceback" not in proc.stderr
        assert "seqno:   42\n" in (joiner.datadir / "grastate.dat").read_text()


def test_two_daemons_cannot_share_a_datadir(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        donor = c.donor("donor", "--bootstrap").start()
        donor.wait_synced()
        proc = run_istd("joiner", "--datadir", str(donor.datadir), "--donor", donor.ist, "--api-listen", "none",
                        check=False)
        assert proc.returncode == exitcodes.LOCAL_STATE
        assert "is in use by another istd process" in proc.stderr


def test_bad_flag_is_one_line_with_usage_exit_code(tmp_path: Path) -> None:
    proc = run_istd("joiner", "--datadir", str(tmp_path), "--donor", "host:notaport", check=False)
    assert proc.returncode == exitcodes.USAGE and "port must be a number" in proc.stderr
    proc = run_istd("donor", "--datadir", str(tmp_path), "--provider-options", "gcache.size=huge", check=False)
    assert proc.returncode == exitcodes.USAGE and "bad value for gcache.size" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_donor_without_state_needs_bootstrap(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    donor = c.donor("donor")
    proc = run_istd("donor", "--datadir", str(donor.datadir), "--listen", donor.ist, "--api-listen", "none",
                    check=False)
    assert proc.returncode == exitcodes.LOCAL_STATE
    assert "--bootstrap" in proc.stderr


def test_sigterm_mid_transfer_leaves_files_consistent_and_restart_finishes(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        donor = c.donor("donor", "--bootstrap").start()
        donor.wait_synced()
        joiner = c.joiner("joiner", donor, args=("--provider-options", "ist.recv_queue_size=256K"))
        seed_joiner(joiner, donor)
        load(donor, 60_000, size=300)
        joiner.start()
        wait_until(lambda: (joiner.status() or {}).get("wsrep_last_committed", 0) > 1000, "apply under way")
        assert joiner.stop(signal.SIGTERM) == exitcodes.TERMINATED
        # a clean stop: grastate.dat holds the position the state database committed, not -1
        position, _ = digest(joiner.datadir)
        saved = (joiner.datadir / "grastate.dat").read_text()
        assert f"seqno:   {position.rsplit(':', 1)[1]}\n" in saved and "seqno:   -1" not in saved
        inspect = run_istd("gcache", "inspect", str(joiner.datadir / "galera.cache"), "--json").stdout
        assert '"synced": true' in inspect
        joiner.start()
        assert joiner.wait_exit() == exitcodes.OK, joiner.log()
        assert digest(joiner.datadir) == digest(donor.datadir)


def test_status_shows_the_transfer_while_it_runs(tmp_path: Path) -> None:
    import re

    with cluster(tmp_path) as c:
        donor = c.donor("donor", "--bootstrap").start()
        donor.wait_synced()
        joiner = c.joiner("joiner", donor, args=("--provider-options", "ist.recv_queue_size=256K"))
        seed_joiner(joiner, donor)
        load(donor, 100_000, size=300)
        joiner.start()
        samples = []
        while joiner.proc is not None and joiner.proc.poll() is None:
            status = joiner.status()
            if status:
                samples.append(status)
        assert joiner.proc is not None and joiner.proc.returncode == exitcodes.OK
        receiving = [s for s in samples if s["wsrep_local_state_comment"] == "Joining: receiving State Transfer"]
        assert receiving, [s["wsrep_local_state_comment"] for s in samples]
        pattern = re.compile(r"^(\d+)% complete, received seqno (\d+) of 1-100000$")
        matches = [pattern.match(s["wsrep_ist_receive_status"]) for s in receiving]
        assert any(matches), [s["wsrep_ist_receive_status"] for s in receiving]
        assert all(s["wsrep_local_state"] == 1 for s in receiving)
        assert max(s["wsrep_local_recv_queue"] for s in receiving) > 0
        served = donor.status() or {}
        assert served["istd_ist_served"] == 1 and served["istd_ist_sent_writesets"] == 100_000


def test_relative_datadir_and_digest_in_status(tmp_path: Path) -> None:
    """A data directory given relative to the working directory works for the whole daemon's life."""
    import subprocess
    import sys

    from .procs import free_port, http_status

    port, api = free_port("127.0.0.1"), free_port("127.0.0.1")
    proc = subprocess.Popen([sys.executable, "-m", "istd", "donor", "--datadir", "rel", "--bootstrap", "--listen",
                             f"127.0.0.1:{port}", "--api-listen", f"127.0.0.1:{api}"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def status() -> dict | None:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            return http_status(f"127.0.0.1:{api}")

        wait_until(status, "donor API")
        run_istd("load", "--node", f"127.0.0.1:{api}", "--count", "10", "--size", "100")
        st = wait_until(lambda: (s := status()) and s.get("istd_state_digest_seqno") == 10 and s, "digest at 10")
        assert st["istd_state_digest"] == digest(tmp_path / "rel")[1]
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0


# -- hostile clients against a real donor process ---------------------------------------------------------

HOSTILE_TIMEOUT_SECONDS = 60


def _hostile_socket(donor: Daemon) -> socket.socket:
    host, port = donor.ist.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=HOSTILE_TIMEOUT_SECONDS)
    return s


def _until_closed(s: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(65536):
            data += chunk
    s.close()
    return data


def _handshake(cluster_uuid: uuid.UUID) -> Handshake:
    return Handshake(cluster_uuid=cluster_uuid, last_applied=0, first=1, last=-1, accept=Accept.IST,
                     versions=SUPPORTED_VERSIONS, node_name="hostile")


def _hostile_handshake(cluster_uuid: uuid.UUID) -> bytes:
    return Connection(Role.JOINER).send(_handshake(cluster_uuid))


def test_hostile_clients_are_dropped_and_never_disturb_a_transfer(tmp_path: Path) -> None:
    """Garbage bytes, a wrong uuid, an oversize frame, a client that stalls and one that trickles, all against a
    real `istd donor` while a real `istd joiner` catches up from it: each is answered or dropped with a line
    in the donor's log, the donor keeps running, and the joiner ends with the donor's digest."""
    with cluster(tmp_path) as c:
        donor = c.donor("donor", "--bootstrap", "--sst-listen", "none",
                        "--provider-options", "ist.handshake_timeout=PT2S").start()
        donor.wait_synced()
        joiner = c.joiner("joiner", donor)
        seed_joiner(joiner, donor)
        load(donor, 20_000, size=300)
        donor_uuid = uuid.UUID(json.loads(run_istd("grastate", "show", str(donor.datadir), "--json").stdout)["uuid"])
        results: dict[str, bytes] = {}

        def garbage() -> None:
            s = _hostile_socket(donor)
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 4)
            results["garbage"] = _until_closed(s)

        def wrong_uuid() -> None:
            s = _hostile_socket(donor)
            s.sendall(_hostile_handshake(uuid.uuid4()))
            results["wrong_uuid"] = _until_closed(s)

        def oversize() -> None:
            s = _hostile_socket(donor)
            head = struct.pack("<BBBbIq", 1, 1, 0, 0, 1 << 31, -1)
            s.sendall(head + struct.pack("<II", zlib.crc32(head), 0))
            results["oversize"] = _until_closed(s)

        def stall() -> None:
            results["stall"] = _until_closed(_hostile_socket(donor))

        def trickle() -> None:
            s = _hostile_socket(donor)
            try:
                for byte in _hostile_handshake(donor_uuid):
                    s.sendall(bytes([byte]))
                    time.sleep(0.05)
            except (BrokenPipeError, ConnectionResetError):
                s.close()
                results["trickle"] = b"dropped while trickling"
                return
            results["trickle"] = _until_closed(s)

        attackers = [threading.Thread(target=f) for f in (garbage, wrong_uuid, oversize, stall, trickle)]
        for t in attackers:
            t.start()
        joiner.start()
        assert joiner.wait_exit() == exitcodes.OK, joiner.log()
        for t in attackers:
            t.join(HOSTILE_TIMEOUT_SECONDS)
            assert not t.is_alive()
        assert donor.proc is not None and donor.proc.poll() is None  # still serving
        assert digest(joiner.datadir) == digest(donor.datadir)

        assert results["stall"] == b""  # dropped at the handshake timeout, told nothing
        refused = Connection(Role.JOINER)
        refused.send(_handshake(uuid.uuid4()))
        refused.receive_data(results["wrong_uuid"])
        response = refused.next_event()
        assert isinstance(response, HandshakeResponse)
        assert response.granted is TransferKind.NONE and response.reason is RefusalReason.UUID_MISMATCH
        status = donor.status() or {}
        assert status["istd_ist_refused"] == 1
        assert status["istd_ist_failed"] >= 4  # garbage, oversize, stall, trickle
        assert status["istd_ist_served"] == 1
        failures = [m for m in donor.messages() if m.startswith("async IST sender failed to serve ")]
        assert len(failures) >= 4, donor.log()
        assert any(m.startswith("IST refused to hostile: ") for m in donor.messages()), donor.log()
