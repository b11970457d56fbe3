"""`istd demo`: the main job on its embedded default, narrated. No Docker, loopback only.

A donor on 127.0.0.1 bootstraps a new history and takes writes; a joiner on 127.0.0.2, whose node stopped
at the start of that history, catches up by IST; then more writes, and a second IST resumes from where
the joiner stopped. The digests of both applied states are compared at the end. Every step runs the real
CLI as a separate process, so what the demo shows is what an operator would type.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

DONOR_HOST = "127.0.0.1"
JOINER_HOST = "127.0.0.2"
# A process that has not answered in this long is stuck: the demo stops it and says so.
STEP_TIMEOUT_SECONDS = 300.0


def _say(text: str) -> None:
    click.secho(f"\n==> {text}", fg="cyan", bold=True)


class Demo:
    def __init__(self, workdir: Path, ist_port: int, api_port: int, count: int, size: int,
                 group_port: int = 4567) -> None:
        self.workdir = workdir
        self.group_port = group_port
        self.ist_port = ist_port
        self.api_port = api_port
        self.sst_port = 4444
        self.count = count
        self.size = size
        self.donor_dir = workdir / "donor"
        self.joiner_dir = workdir / "joiner"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def istd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "istd", "--log-format", "console", *args]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        click.secho("$ istd " + " ".join(args), fg="yellow")
        proc = subprocess.run(self.istd(*args), text=True, capture_output=True, env=self.env,
                              timeout=STEP_TIMEOUT_SECONDS)
        out = (proc.stdout + proc.stderr).rstrip()
        if out:
            click.echo(out)
        if check and proc.returncode != 0:
            raise click.ClickException(f"`istd {' '.join(args)}` exited with {proc.returncode}")
        return proc

    @contextmanager
    def background(self, label: str, *args: str) -> Iterator[subprocess.Popen[str]]:
        click.secho(f"$ istd {' '.join(args)} &", fg="yellow")
        proc = subprocess.Popen(self.istd(*args), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=self.env)
        pump = threading.Thread(target=self._pump, args=(label, proc), daemon=True)
        pump.start()
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            pump.join(timeout=5)

    @staticmethod
    def _pump(label: str, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            click.echo(click.style(f"[{label}] ", fg="magenta") + line.rstrip())

    def wait_for_api(self, host: str, proc: subprocess.Popen[str]) -> None:
        from istd.client import ClientError, fetch_status

        deadline = time.monotonic() + STEP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise click.ClickException(f"the node on {host} exited with {proc.returncode}")
            try:
                status = fetch_status(f"{host}:{self.api_port}")
                if status.get("wsrep_local_state_comment") == "Synced":
                    return
            except ClientError:
                pass
            time.sleep(0.1)
        raise click.ClickException(f"the node on {host} did not become Synced in time")

    def digest(self, datadir: Path) -> str:
        proc = self.run("state", "digest", str(datadir))
        return proc.stdout.split("digest:")[1].strip()

    def main(self) -> None:
        donor_args = ("donor", "--datadir", str(self.donor_dir), "--name", "donor", "--bootstrap",
                      "--listen", f"{DONOR_HOST}:{self.ist_port}", "--api-listen", f"{DONOR_HOST}:{self.api_port}",
                      "--sst-listen", f"{DONOR_HOST}:{self.sst_port}")
        joiner_args = ("joiner", "--datadir", str(self.joiner_dir), "--name", "joiner",
                       "--donor", f"{DONOR_HOST}:{self.ist_port}", "--api-listen", f"{JOINER_HOST}:{self.api_port}")
        _say(f"Start a donor on {DONOR_HOST}: it bootstraps a new history (like --wsrep-new-cluster)")
        with self.background("donor", *donor_args) as donor:
            self.wait_for_api(DONOR_HOST, donor)
            self.run("status", "--node", f"{DONOR_HOST}:{self.api_port}")
            _say(f"{self.count} writes reach the donor")
            self.run("load", "--node", f"{DONOR_HOST}:{self.api_port}", "--count", str(self.count),
                     "--size", str(self.size), "--keyspace", "50000")
            self.run("gcache", "inspect", str(self.donor_dir / "galera.cache"))

            _say(f"Start a joiner on {JOINER_HOST} with an empty data directory: its position is unknown, so IST "
                 "is impossible; it gets a full snapshot (SST, port 4444), then IST for what came meanwhile")
            self.run(*joiner_args)
            self.run("grastate", "show", str(self.joiner_dir))

            _say(f"{self.count // 5} more writes while the joiner is down; it comes back by IST (only the gap)")
            self.run("load", "--node", f"{DONOR_HOST}:{self.api_port}", "--count", str(self.count // 5),
                     "--size", str(self.size), "--keyspace", "50000")
            self.run(*joiner_args)

            _say("Both applied states, side by side")
            donor_digest = self.digest(self.donor_dir)
            joiner_digest = self.digest(self.joiner_dir)
        _say("Stopped cleanly: grastate.dat holds the real seqno again")
        self.run("grastate", "show", str(self.donor_dir))
        if donor_digest != joiner_digest:
            raise click.ClickException(f"digests differ: donor {donor_digest} joiner {joiner_digest}")
        click.secho(f"\nIST demo complete: donor and joiner digests are equal ({donor_digest[:16]}...)",
                    fg="green", bold=True)


class ClusterDemo(Demo):
    """Three `istd node`s on 127.0.0.1-3: node3 is stopped, misses writes, and comes back by IST."""

    HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
    # Galera's default fc_limit (16) pauses the writer after a handful of queued write-sets; the demo's
    # bulk load is smoother with PXC's order of magnitude.
    OPTIONS = "gcs.fc_limit=200"

    def node_args(self, i: int) -> tuple[str, ...]:
        peers = ",".join(f"{h}:{self.group_port}" for h in self.HOSTS)
        return ("node", "--name", f"node{i + 1}", "--datadir", str(self.workdir / f"node{i + 1}"),
                "--address", self.HOSTS[i], "--peers", peers, "--writer", "node1", "--group-port",
                str(self.group_port), "--ist-port", str(self.ist_port), "--api-port", str(self.api_port),
                "--sst-port", str(self.sst_port),
                "--provider-options", self.OPTIONS)

    def wait_all(self, procs: list[subprocess.Popen[str]], last: int | None = None) -> None:
        from istd.client import ClientError, fetch_status

        deadline = time.monotonic() + STEP_TIMEOUT_SECONDS
        pending = list(zip(self.HOSTS, procs, strict=True))
        while pending:
            host, proc = pending[0]
            if proc.poll() is not None:
                raise click.ClickException(f"the node on {host} exited with {proc.returncode}")
            try:
                st = fetch_status(f"{host}:{self.api_port}")
                if st.get("wsrep_local_state_comment") == "Synced" and (
                        last is None or st.get("wsrep_last_committed") == last):
                    pending.pop(0)
                    continue
            except ClientError:
                pass
            if time.monotonic() > deadline:
                raise click.ClickException(f"the node on {host} did not become Synced in time")
            time.sleep(0.1)

    def main(self) -> None:
        nodes = [f"{h}:{self.api_port}" for h in self.HOSTS]
        status = ("status", "--node", nodes[0], "--node", nodes[1], "--node", nodes[2])
        _say("node1 (127.0.0.1) bootstraps a new cluster, like --wsrep-new-cluster; it is the writer")
        with contextlib.ExitStack() as stack:
            procs = [stack.enter_context(self.background("node1", *self.node_args(0), "--bootstrap"))]
            self.wait_for_api(self.HOSTS[0], procs[0])
            _say("node2 and node3 start with empty data directories: each joins by a full state transfer (SST) "
                 "from node1, as Galera's nodes do when a cluster forms")
            for i in (1, 2):
                procs.append(stack.enter_context(self.background(f"node{i + 1}", *self.node_args(i))))
            node3 = procs[2]
            self.wait_all(procs)
            self.run(*status)

            _say(f"{self.count} writes on node1; replication brings every one to node2 and node3")
            self.run("load", "--node", nodes[0], "--count", str(self.count), "--size", str(self.size))
            self.wait_all(procs, self.count)

            _say("Stop node3 (as `docker compose stop node3` or a maintenance would)")
            node3.send_signal(signal.SIGTERM)
            node3.wait(timeout=60)
            self.run("grastate", "show", str(self.workdir / "node3"))
            more = self.count // 2
            _say(f"{more} more writes while node3 is down")
            self.run("load", "--node", nodes[0], "--count", str(more), "--size", str(self.size))

            _say("Start node3 again: it subscribes to replication, asks a synced member for the missing seqnos "
                 "(IST), applies them, then what was queued, and is Synced")
            node3 = stack.enter_context(self.background("node3", *self.node_args(2)))
            procs[2] = node3
            self.wait_all(procs, self.count + more)
            self.run(*status)

            _say("The three applied states")
            digests = [self.digest(self.workdir / f"node{i}") for i in (1, 2, 3)]
            for proc in (procs[2], procs[1], procs[0]):  # the last to leave is safe to bootstrap
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
        _say("Stopped in order node3, node2, node1: only node1, the last to leave, is safe to bootstrap")
        self.run("grastate", "show", str(self.workdir / "node1"))
        if len(set(digests)) != 1:
            raise click.ClickException(f"digests differ: {digests}")
        click.secho(f"\nIST demo complete: node3 came back by IST and all three digests are equal "
                    f"({digests[0][:16]}...)", fg="green", bold=True)


@click.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="where the data directories go (default: a fresh temporary directory, removed at the end)")
@click.option("--count", type=click.IntRange(min=1), default=100_000, help="write-sets in the first gap")
@click.option("--size", type=click.IntRange(min=64), default=500, help="bytes per write-set")
@click.option("--ist-port", type=click.IntRange(1, 65535), default=4568)
@click.option("--api-port", type=click.IntRange(1, 65535), default=4580)
@click.option("--group-port", type=click.IntRange(1, 65535), default=4567)
@click.option("--sst-port", type=click.IntRange(1, 65535), default=4444)
@click.option("--pair", is_flag=True, help="the donor/joiner pair instead of the three-node cluster")
def demo(workdir: Path | None, count: int, size: int, ist_port: int, api_port: int, group_port: int,
         sst_port: int, pair: bool) -> None:
    """Three nodes on 127.0.0.1-3; node3 is stopped, misses writes, and comes back by IST (no Docker needed).

    With --pair: a donor and a joiner, the joiner catching up by IST twice."""
    keep = workdir is not None
    root = workdir or Path(tempfile.mkdtemp(prefix="istd-demo-"))
    if keep and root.exists() and any(root.iterdir()):
        raise click.ClickException(f"--workdir {root} is not empty; give a new or empty directory")
    root.mkdir(parents=True, exist_ok=True)
    try:
        story = Demo(root, ist_port, api_port, count, size) if pair else \
            ClusterDemo(root, ist_port, api_port, count, size, group_port)
        story.sst_port = sst_port
        story.main()
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


__all__ = ["demo"]
