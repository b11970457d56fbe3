"""Run real istd processes on loopback for end-to-end tests.

Each node gets its own 127.0.0.x address; ports are free ports found on that address. Every wait has a
deadline; every process started is stopped by PID at the end.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEADLINE_SECONDS = 120.0


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def istd_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "istd", "--log-format", "json", *args]


def run_istd(*args: str, timeout: float = DEADLINE_SECONDS, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(istd_cmd(*args), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"istd {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = DEADLINE_SECONDS) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def http_status(api: str) -> dict[str, Any] | None:
    """GET /status of the node whose API is at api (HOST:PORT); None while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://{api}/status", timeout=5) as resp:
            result: dict[str, Any] = json.loads(resp.read())
            return result
    except (OSError, http.client.HTTPException, ValueError):  # down, starting, or exiting mid-answer
        return None


def log_events(text: str) -> list[dict[str, Any]]:
    events = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return events


@dataclass
class Daemon:
    """One istd process (donor or joiner) with its data directory and addresses."""

    role: str
    datadir: Path
    host: str
    api_port: int
    ist_port: int | None = None
    args: tuple[str, ...] = ()
    sst_port: int | None = None
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=Path)

    def start(self) -> Daemon:
        self.log_path = self.datadir.parent / f"{self.datadir.name}.{int(time.monotonic() * 1000)}.log"
        self.datadir.mkdir(parents=True, exist_ok=True)
        cmd = istd_cmd(self.role, "--datadir", str(self.datadir), "--name", self.datadir.name,
                       "--api-listen", f"{self.host}:{self.api_port}", *self.args)
        if self.role == "donor":
            cmd += ["--listen", f"{self.host}:{self.ist_port}"]
            if "--sst-listen" not in self.args:
                cmd += ["--sst-listen", f"{self.host}:{self.sst_port}"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        return self

    @property
    def api(self) -> str:
        return f"{self.host}:{self.api_port}"

    @property
    def ist(self) -> str:
        return f"{self.host}:{self.ist_port}"

    def status(self) -> dict[str, Any] | None:
        return http_status(self.api)

    def wait_synced(self, timeout: float = DEADLINE_SECONDS) -> dict[str, Any]:
        def synced() -> dict[str, Any] | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.role} exited {self.proc.returncode}:\n{self.log()}")
            st = self.status()
            return st if st and st.get("wsrep_local_state_comment") == "Synced" else None

        result: dict[str, Any] = wait_until(synced, f"{self.role} {self.datadir.name} Synced", timeout)
        return result

    def wait_exit(self, timeout: float = DEADLINE_SECONDS) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.role} did not exit in time:\n{self.log()}") from None

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        return self.wait_exit(30)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def events(self) -> list[dict[str, Any]]:
        return log_events(self.log())

    def messages(self) -> list[str]:
        """The log's messages, in order."""
        return [str(e.get("event", "")) for e in self.events()]


class Cluster:
    """Creates daemons on distinct loopback addresses and stops them all at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.daemons: list[Daemon] = []
        self._next_host = 2

    def host(self) -> str:
        host = f"127.0.0.{self._next_host}"
        self._next_host += 1
        return host

    def donor(self, name: str, *args: str, host: str | None = None) -> Daemon:
        host = host or self.host()
        d = Daemon("donor", self.root / name, host, free_port(host), free_port(host), args=args,
                   sst_port=free_port(host))
        self.daemons.append(d)
        return d

    def joiner(self, name: str, *donors: Daemon, args: tuple[str, ...] = (), host: str | None = None) -> Daemon:
        host = host or self.host()
        donor_args: list[str] = []
        for donor in donors:
            donor_args += ["--donor", donor.ist]
        d = Daemon("joiner", self.root / name, host, free_port(host), args=(*donor_args, *args))
        self.daemons.append(d)
        return d

    def stop_all(self) -> None:
        for d in self.daemons:
            if d.proc is not None and d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait()


@contextlib.contextmanager
def cluster(root: Path) -> Iterator[Cluster]:
    c = Cluster(root)
    try:
        yield c
    finally:
        c.stop_all()


def load(node: Daemon, count: int, size: int = 200, keyspace: int | None = None) -> None:
    args = ["load", "--node", node.api, "--count", str(count), "--size", str(size)]
    if keyspace:
        args += ["--keyspace", str(keyspace)]
    run_istd(*args)


def digest(datadir: Path) -> tuple[str, str]:
    out = run_istd("state", "digest", str(datadir)).stdout
    lines = dict(line.split(":", 1) for line in out.splitlines())
    return lines["position"].strip(), lines["digest"].strip()


def seed_joiner(joiner: Daemon, donor: Daemon) -> None:
    """A joiner whose node stopped at the start of the donor's history (uuid:0)."""
    uuid = json.loads(run_istd("grastate", "show", str(donor.datadir), "--json").stdout)["uuid"]
    run_istd("grastate", "set", str(joiner.datadir), "--uuid", uuid, "--seqno", "0", "--safe-to-bootstrap", "0")


__all__ = ["Cluster", "Daemon", "cluster", "digest", "free_port", "load", "os", "run_istd", "seed_joiner"]
