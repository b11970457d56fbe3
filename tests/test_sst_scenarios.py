"""IST or SST, decided as Galera decides, over real processes: gcache size x gap x link killed mid-stream,
each ending in IST served or SST served and always in equal digests; and seed 000's wrong donor address."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from istd import exitcodes

from .procs import Cluster, Daemon, cluster, digest, free_port, load, run_istd

pytestmark = pytest.mark.slow

FIRST = 1000  # write-sets the joiner has before it stops
ROW_BYTES = 300


class CuttingProxy:
    """A TCP forwarder to ``target``; while armed, the next connection is cut after ``cut_after`` bytes towards
    the client (a link killed mid-stream), and the proxy disarms. Other connections pass whole."""

    def __init__(self, host: str, target: tuple[str, int], cut_after: int | None, *, armed: bool = True) -> None:
        self.target = target
        self.cut_after = cut_after
        self.armed = armed
        self.cuts = 0
        self.server = socket.create_server((host, free_port(host)))
        self.address = "{}:{}".format(*self.server.getsockname()[:2])
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.server.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            limit, self.armed = (self.cut_after if self.armed else None), False
            upstream = socket.create_connection(self.target)
            for src, dst, cap in ((client, upstream, None), (upstream, client, limit)):
                threading.Thread(target=self._pipe, args=(src, dst, cap, (client, upstream)), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, cap: int | None, both: tuple[socket.socket, ...]) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if cap is not None and sent + len(data) >= cap:
                    dst.sendall(data[: cap - sent])
                    self.cuts += 1
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in both:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop.set()
        self.server.close()


@contextlib.contextmanager
def proxy(host: str, target: tuple[str, int], cut_after: int | None, *, armed: bool = True) -> Iterator[CuttingProxy]:
    p = CuttingProxy(host, target, cut_after, armed=armed)
    try:
        yield p
    finally:
        p.close()


def _joiner_at_first(c: Cluster, donor: Daemon) -> Daemon:
    """A joiner that joined (by SST: it starts empty), then stopped at FIRST."""
    joiner = c.joiner("joiner", donor).start()
    assert joiner.wait_exit() == exitcodes.OK, joiner.log()
    assert digest(joiner.datadir)[0].endswith(f":{FIRST}")
    return joiner


@pytest.mark.parametrize("killed", [False, True], ids=["link-ok", "link-killed"])
@pytest.mark.parametrize("gap", [2_000, 12_000])
@pytest.mark.parametrize("cache", ["1M", "64M"])
def test_ist_or_sst_always_ends_in_equal_digests(tmp_path: Path, cache: str, gap: int, killed: bool) -> None:
    """IST and SST both go through proxies (the donor tells joiners the SST proxy's address); with
    ``killed`` the first connection of each is cut mid-stream, and the joiner resumes or retries."""
    with cluster(tmp_path) as c, contextlib.ExitStack() as stack:
        host = c.host()
        donor = c.donor("donor", "--bootstrap", "--provider-options", f"gcache.size={cache}")
        sst_link = stack.enter_context(proxy(host, (donor.host, int(donor.sst_port or 0)),
                                             300_000 if killed else None, armed=False))
        donor.args = (*donor.args, "--sst-address", sst_link.address)
        donor.start()
        donor.wait_synced()
        load(donor, FIRST, size=ROW_BYTES)
        first_join = _joiner_at_first(c, donor)
        load(donor, gap, size=ROW_BYTES)
        cached_downto = json.loads(run_istd("gcache", "inspect", str(donor.datadir / "galera.cache"),
                                            "--json").stdout)["seqno_min"]
        expect_sst = cached_downto > FIRST + 1
        sst_link.armed = True
        with proxy(host, (donor.host, int(donor.ist_port or 0)), 150_000 if killed else None) as link:
            joiner = Daemon("joiner", first_join.datadir, first_join.host, free_port(first_join.host),
                            args=("--donor", link.address))
            c.daemons.append(joiner)
            joiner.start()
            assert joiner.wait_exit() == exitcodes.OK, joiner.log()
            if killed:
                assert (sst_link.cuts if expect_sst else link.cuts) >= 1
        assert digest(joiner.datadir) == digest(donor.datadir)
        assert digest(joiner.datadir)[0].endswith(f":{FIRST + gap}")
        messages = joiner.messages()
        took_sst = any(m.startswith("SST received: ") for m in messages)
        assert took_sst == expect_sst, (cached_downto, messages)
        if expect_sst:
            assert any(m.startswith(f"IST impossible from {link.address}: IST first seqno {FIRST + 1} not found")
                       for m in messages), messages
            assert any(m.startswith(f"IST first seqno {FIRST + 1} not found from cache, falling back to SST")
                       for m in donor.messages())
        else:
            assert any(m.startswith(f"Receiving IST: {gap} writesets, seqnos {FIRST + 1}-{FIRST + gap}")
                       for m in messages), messages


def test_wrong_donor_address_keeps_the_position_and_the_next_start_gets_ist(tmp_path: Path) -> None:
    """Seed 000: a joiner pointed at a wrong address fails with a line naming it and the likely fix; its
    position is kept, so the next start with the right address gets IST, not SST."""
    with cluster(tmp_path) as c:
        donor = c.donor("donor", "--bootstrap").start()
        donor.wait_synced()
        load(donor, FIRST, size=ROW_BYTES)
        joiner = _joiner_at_first(c, donor)
        load(donor, 500, size=ROW_BYTES)
        wrong = f"{donor.host}:{free_port(donor.host)}"  # nothing listens there
        proc = run_istd("joiner", "--datadir", str(joiner.datadir), "--donor", wrong, "--retries", "1",
                        "--api-listen", "none", check=False)
        assert proc.returncode == exitcodes.UNREACHABLE, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"istd: error: no donor reachable: {wrong}: connection refused"), last
        assert "Check the --donor address and port" in last and f":{FIRST} is kept" in last
        assert "Traceback" not in proc.stderr
        assert f"seqno:   {FIRST}\n" in (joiner.datadir / "grastate.dat").read_text()
        again = c.joiner("joiner", donor)
        again.start()
        assert again.wait_exit() == exitcodes.OK, again.log()
        messages = again.messages()
        assert any(m.startswith(f"Receiving IST: 500 writesets, seqnos {FIRST + 1}-{FIRST + 500}") for m in messages)
        assert not any(m.startswith("SST received") for m in messages)
        assert digest(again.datadir) == digest(donor.datadir)


def test_ist_only_refusal_leaves_the_state_untouched(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        donor = c.donor("donor", "--bootstrap", "--provider-options", "gcache.size=1M").start()
        donor.wait_synced()
        load(donor, FIRST, size=ROW_BYTES)
        joiner = _joiner_at_first(c, donor)
        before = digest(joiner.datadir)
        load(donor, 12_000, size=ROW_BYTES)  # the gap leaves the donor's 1M gcache
        proc = run_istd("joiner", "--datadir", str(joiner.datadir), "--donor", donor.ist, "--ist-only",
                        "--api-listen", "none", check=False)
        assert proc.returncode == exitcodes.REFUSED, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert f"IST first seqno {FIRST + 1} not found from cache" in last and "--ist-only forbids SST" in last
        assert digest(joiner.datadir) == before
        assert f"seqno:   {FIRST}\n" in (joiner.datadir / "grastate.dat").read_text()


def test_sst_cut_half_way_leaves_the_old_state_and_a_retry_succeeds(tmp_path: Path) -> None:
    with cluster(tmp_path) as c, contextlib.ExitStack() as stack:
        donor = c.donor("donor", "--bootstrap", "--provider-options", "gcache.size=1M")
        sst_link = stack.enter_context(proxy(c.host(), (donor.host, int(donor.sst_port or 0)), None, armed=False))
        donor.args = (*donor.args, "--sst-address", sst_link.address)
        donor.start()
        donor.wait_synced()
        load(donor, FIRST, size=ROW_BYTES)
        joiner = _joiner_at_first(c, donor)
        before, grastate = digest(joiner.datadir), (joiner.datadir / "grastate.dat").read_text()
        load(donor, 12_000, size=ROW_BYTES)  # IST impossible: SST
        sst_link.cut_after, sst_link.armed = 1_000_000, True  # about a quarter of the snapshot
        proc = run_istd("joiner", "--datadir", str(joiner.datadir), "--donor", donor.ist, "--retries", "0",
                        "--api-listen", "none", check=False)
        assert sst_link.cuts == 1
        assert proc.returncode == exitcodes.UNREACHABLE, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("istd: error: SST from ") and f":{FIRST} is kept" in last, last
        assert digest(joiner.datadir) == before
        assert (joiner.datadir / "grastate.dat").read_text() == grastate
        assert not any(p.name.endswith((".sst", ".sst-wal", ".sst-shm")) for p in joiner.datadir.iterdir())
        again = c.joiner("joiner", donor).start()
        assert again.wait_exit() == exitcodes.OK, again.log()
        assert digest(again.datadir) == digest(donor.datadir)
