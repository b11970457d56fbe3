"""Hosts for multi-host tests: Linux network namespaces on a private bridge, nothing on the host changes.

``network(n)`` creates n namespaces ("hosts") named after the test's pid, plus one more namespace holding a
bridge; each host is joined to the bridge by a veth pair created inside the bridge's namespace, so no
interface, address or route ever appears in the host's root namespace. Host i gets 10.213.0.(i+1)/24 on its
``eth0`` and ``lo`` is up. Traffic never leaves these namespaces.

Everything created is removed by ``Network.close()`` (run by the ``network`` context manager even when the
test fails): processes started with ``popen`` are killed by PID, then any process still inside one of our
namespaces (e.g. a child of such a process) is killed by PID, then the namespaces are deleted, which destroys
the veth pairs and the bridge with them.

``NsDaemon`` (``donor``/``joiner``) runs istd's one-shot daemons on a host; ``NsNode`` (``cluster_nodes``,
``start_cluster``) runs ``istd node``, one cluster member per host, on Galera's ports at the host's address.

The tests skip (with the reason) when not root, when iproute2 is missing, or when the kernel refuses to create
namespaces, veths or bridges.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from .procs import DEADLINE_SECONDS, Daemon, istd_cmd, log_events, run_istd, wait_until

SUBNET = "10.213.0"  # private test subnet; it only exists inside the namespaces
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
IP_TIMEOUT_SECONDS = 20.0
KILL_TIMEOUT_SECONDS = 10.0

_serial = itertools.count()
T = TypeVar("T")


class SetupRefused(Exception):
    """The machine does not let us build the network (not root, no iproute2, kernel refuses)."""


@dataclass(frozen=True)
class Host:
    """One network namespace: ``name`` for ``ip netns``, ``addr`` on its eth0, ``port`` its bridge port."""

    name: str
    addr: str
    port: str  # the veth end in the bridge's namespace
    dev: str = "eth0"  # the veth end in the host's namespace


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_SECONDS)
    if check and proc.returncode != 0:
        raise SetupRefused(f"ip {' '.join(args)}: {proc.stderr.strip() or f'exit {proc.returncode}'}")
    return proc


def _setns(name: str) -> None:
    fd = os.open(NETNS_DIR / name, os.O_RDONLY)
    try:
        if hasattr(os, "setns"):  # Python 3.12+
            os.setns(fd, CLONE_NEWNET)
            return
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


class Network:
    """n hosts on one bridge; see the module docstring."""

    def __init__(self, n: int) -> None:
        self.prefix = f"istdt{os.getpid()}x{next(_serial)}"
        self.bridge_ns = f"{self.prefix}-br"
        self.hosts = [Host(f"{self.prefix}-n{i}", f"{SUBNET}.{i + 1}", f"p{i}") for i in range(n)]
        self._created: list[str] = []  # namespaces we made, to delete in reverse
        self._procs: list[subprocess.Popen[Any]] = []

    # ------------------------------------------------------------------------------ setup and teardown

    def start(self) -> Network:
        if os.geteuid() != 0:
            raise SetupRefused("network namespaces need root")
        if shutil.which("ip") is None:
            raise SetupRefused("iproute2 (ip) is not installed")
        self._add_ns(self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        for host in self.hosts:
            self._add_ns(host.name)
            # created inside the bridge's namespace, the peer end moved straight into the host's namespace
            _ip("-n", self.bridge_ns, "link", "add", host.port, "type", "veth", "peer", "name", host.dev,
                "netns", host.name)
            _ip("-n", self.bridge_ns, "link", "set", host.port, "master", "br0", "up")
            _ip("-n", host.name, "addr", "add", f"{host.addr}/24", "dev", host.dev)
            _ip("-n", host.name, "link", "set", host.dev, "up")
            _ip("-n", host.name, "link", "set", "lo", "up")
        return self

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._created.append(name)

    def close(self) -> None:
        """Stop every process we started and every process left in our namespaces, then delete them."""
        problems: list[str] = []
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
                try:
                    proc.wait(timeout=KILL_TIMEOUT_SECONDS)
                except subprocess.TimeoutExpired:
                    problems.append(f"pid {proc.pid} did not die")
        for name in reversed(self._created):
            problems += self._empty(name)
            deleted = _ip("netns", "del", name, check=False)
            if deleted.returncode != 0:
                problems.append(f"ip netns del {name}: {deleted.stderr.strip()}")
        self._created.clear()
        if problems:
            raise AssertionError("network cleanup: " + "; ".join(problems))

    def _empty(self, name: str) -> list[str]:
        """Kill, by PID, what still runs inside namespace ``name`` (only processes this test started)."""
        deadline = time.monotonic() + KILL_TIMEOUT_SECONDS
        while True:
            pids = [int(p) for p in _ip("netns", "pids", name, check=False).stdout.split()]
            if not pids:
                return []
            if time.monotonic() > deadline:
                return [f"processes {pids} still in {name}"]
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)  # a killed process leaves the namespace when the kernel reaps it

    # ------------------------------------------------------------------------------ running things

    def cmd(self, host: Host, cmd: Sequence[str]) -> list[str]:
        """``cmd`` run inside ``host`` (``ip netns exec`` execs it: the PID is the command's own)."""
        return ["ip", "netns", "exec", host.name, *cmd]

    def run(self, host: Host, cmd: Sequence[str], *, timeout: float = DEADLINE_SECONDS, check: bool = True,
            **kwargs: Any) -> subprocess.CompletedProcess[str]:
        kwargs.setdefault("capture_output", True)
        proc = subprocess.run(self.cmd(host, cmd), text=True, timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            raise AssertionError(f"[{host.name}] {' '.join(cmd)} exited {proc.returncode}:\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def popen(self, host: Host, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(self.cmd(host, cmd), **kwargs)
        self._procs.append(proc)
        return proc

    def call(self, host: Host, fn: Callable[[], T]) -> T:
        """``fn()`` in a fresh thread that has entered ``host``'s namespace: sockets it opens live there."""
        result: list[T] = []
        error: list[BaseException] = []

        def target() -> None:
            try:
                _setns(host.name)
                result.append(fn())
            except BaseException as exc:
                error.append(exc)

        thread = threading.Thread(target=target, name=f"netns-{host.name}", daemon=True)
        thread.start()
        thread.join()  # the thread (and its namespace) ends here
        if error:
            raise error[0]
        return result[0]

    def get_json(self, host: Host, url: str, timeout: float = 5.0) -> Any:
        """GET ``url`` from inside ``host``; None when it cannot be reached."""
        def fetch() -> Any:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    return json.loads(resp.read())
            except OSError:
                return None

        return self.call(host, fetch)

    # ------------------------------------------------------------------------------ link faults

    def cut_link(self, host: Host) -> None:
        """Unplug ``host``: its bridge port goes down, so nothing reaches it or leaves it. The host's own
        address and routes stay (it only sees its carrier drop), so its sockets stay open and go silent."""
        _ip("-n", self.bridge_ns, "link", "set", host.port, "down")

    def restore_link(self, host: Host) -> None:
        _ip("-n", self.bridge_ns, "link", "set", host.port, "up")

    def slow_link(self, host: Host, rate: str) -> None:
        """Shape both directions of ``host``'s link to ``rate`` (tc's units, e.g. ``20mbit``) with tbf."""
        for ns, dev in ((host.name, host.dev), (self.bridge_ns, host.port)):
            proc = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                                   "rate", rate, "burst", "64kb", "latency", "500ms"],
                                  capture_output=True, text=True, timeout=IP_TIMEOUT_SECONDS)
            if proc.returncode != 0:
                raise SetupRefused(f"tc tbf on {ns}/{dev}: {proc.stderr.strip()}")


@contextlib.contextmanager
def network(n: int) -> Iterator[Network]:
    """n hosts on a private bridge; skips the test when the machine does not allow it."""
    net = Network(n)
    try:
        try:
            net.start()
        except (SetupRefused, OSError) as exc:
            pytest.skip(f"cannot build network namespaces: {exc}")
        yield net
    finally:
        net.close()


# ---------------------------------------------------------------------------------- istd on hosts

IST_PORT = 4568
API_PORT = 4580


@dataclass
class NsDaemon(Daemon):
    """A ``procs.Daemon`` running inside one of a ``Network``'s hosts, on Galera's ports."""

    net: Network | None = None
    on: Host | None = None

    def start(self) -> NsDaemon:
        assert self.net is not None and self.on is not None
        self.log_path = self.datadir.parent / f"{self.datadir.name}.{int(time.monotonic() * 1000)}.log"
        self.datadir.mkdir(parents=True, exist_ok=True)
        cmd = istd_cmd(self.role, "--datadir", str(self.datadir), "--name", self.datadir.name,
                       "--api-listen", self.api, *self.args)
        if self.role == "donor":
            cmd += ["--listen", self.ist]
        with open(self.log_path, "wb") as log:
            self.proc = self.net.popen(self.on, cmd, stdout=log, stderr=subprocess.STDOUT)
        return self

    def status(self) -> dict[str, Any] | None:
        assert self.net is not None and self.on is not None
        result: dict[str, Any] | None = self.net.get_json(self.on, f"http://{self.api}/status")
        return result


def donor(net: Network, on: Host, datadir: Path, *args: str) -> NsDaemon:
    return NsDaemon("donor", datadir, on.addr, API_PORT, IST_PORT, args=args, net=net, on=on)


def joiner(net: Network, on: Host, datadir: Path, *donors: NsDaemon, args: tuple[str, ...] = ()) -> NsDaemon:
    donor_args = [arg for d in donors for arg in ("--donor", d.ist)]
    return NsDaemon("joiner", datadir, on.addr, API_PORT, args=(*donor_args, *args), net=net, on=on)


def run_istd_on(net: Network, host: Host, *args: str,
                timeout: float = DEADLINE_SECONDS) -> subprocess.CompletedProcess[str]:
    """A one-shot istd command (e.g. ``load``) inside ``host``; fails the test on a non-zero exit."""
    return net.run(host, istd_cmd(*args), timeout=timeout)


# ---------------------------------------------------------------------------------- `istd node` on hosts

GROUP_PORT = 4567


@dataclass
class NsNode:
    """One ``istd node`` (a cluster member) inside ``on``, on Galera's ports at the host's address.

    ``options`` are its provider options (``--provider-options``); every start writes a new log file,
    ``logs[-1]`` is the current one."""

    net: Network
    on: Host
    name: str
    datadir: Path
    peers: str
    args: tuple[str, ...] = ()
    options: str = ""
    proc: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)

    @property
    def api(self) -> str:
        return f"{self.on.addr}:{API_PORT}"

    @property
    def ist(self) -> str:
        return f"{self.on.addr}:{IST_PORT}"

    @property
    def group(self) -> str:
        return f"{self.on.addr}:{GROUP_PORT}"

    def start(self, *extra: str) -> NsNode:
        self.datadir.mkdir(parents=True, exist_ok=True)
        log_path = self.datadir.parent / f"{self.name}.{len(self.logs)}.log"
        self.logs.append(log_path)
        options = ("--provider-options", self.options) if self.options else ()
        cmd = istd_cmd("node", "--name", self.name, "--datadir", str(self.datadir), "--address", self.on.addr,
                       "--peers", self.peers, *self.args, *options, *extra)
        with open(log_path, "wb") as log:
            self.proc = self.net.popen(self.on, cmd, stdout=log, stderr=subprocess.STDOUT)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the node (by PID) and wait for it; its exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.name} did not stop in {timeout} s:\n{self.log()}") from None

    def status(self) -> dict[str, Any] | None:
        result: dict[str, Any] | None = self.net.get_json(self.on, f"http://{self.api}/status")
        return result

    def check_running(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n{self.log()}")

    def wait_synced(self, last: int | None = None, timeout: float = DEADLINE_SECONDS) -> dict[str, Any]:
        """Wait until the node is Synced (at ``last``, when given); its status."""
        def ready() -> dict[str, Any] | None:
            self.check_running()
            st = self.status()
            ok = st and st.get("wsrep_local_state_comment") == "Synced" and (
                last is None or st.get("wsrep_last_committed") == last)
            return st if ok else None

        result: dict[str, Any] = wait_until(ready, f"{self.name} Synced at {last}", timeout)
        return result

    def log(self, index: int = -1) -> str:
        try:
            return self.logs[index].read_text(errors="replace")
        except (IndexError, OSError):
            return ""

    def events(self, index: int = -1) -> list[dict[str, Any]]:
        return log_events(self.log(index))


def cluster_nodes(net: Network, root: Path, *args: str, options: str = "", writer: str = "node1") -> list[NsNode]:
    """One node per host of ``net``, named node1..nodeN, each listing every host as a peer (Galera's
    gcomm://...); node1 is the writer unless ``writer`` says otherwise."""
    peers = ",".join(f"{h.addr}:{GROUP_PORT}" for h in net.hosts)
    return [NsNode(net, h, f"node{i + 1}", root / f"node{i + 1}", peers, ("--writer", writer, *args), options)
            for i, h in enumerate(net.hosts)]


def start_cluster(nodes: Sequence[NsNode], timeout: float = DEADLINE_SECONDS) -> str:
    """Bootstrap nodes[0]; the others start with empty data directories and join by SST; wait until all are
    Synced. The cluster's uuid."""
    first = nodes[0].start("--bootstrap")
    first.wait_synced(timeout=timeout)
    uuid = str(json.loads(run_istd("grastate", "show", str(first.datadir), "--json").stdout)["uuid"])
    for n in nodes[1:]:
        n.start()
    for n in nodes:
        n.wait_synced(timeout=timeout)
    return uuid
