"""The README's main job, `istd demo`, run as a user would (smaller, on free ports)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .procs import free_port

pytestmark = pytest.mark.slow


def _demo(tmp_path: Path, *args: str) -> str:
    ports = ["--group-port", str(free_port("127.0.0.1")), "--ist-port", str(free_port("127.0.0.1")),
             "--api-port", str(free_port("127.0.0.1")), "--sst-port", str(free_port("127.0.0.1"))]
    proc = subprocess.run([sys.executable, "-m", "istd", "demo", "--workdir", str(tmp_path / "demo"),
                           "--count", "4000", *ports, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def test_cluster_demo_brings_node3_back_by_ist_with_equal_digests(tmp_path: Path) -> None:
    out = _demo(tmp_path)
    assert "[node3]" in out and "Receiving IST: 2000 writesets, seqnos 4001-6000" in out
    assert "Selected 1.0 (node2)(SYNCED) as donor." in out
    assert "[node2]" in out and out.count("Installed new state from SST: ") >= 2  # node2, node3 join by SST
    assert "node3 came back by IST and all three digests are equal" in out
    assert "safe_to_bootstrap: 1" in out.rsplit("only node1, the last to leave", 1)[1]


def test_pair_demo_catches_the_joiner_up_twice(tmp_path: Path) -> None:
    out = _demo(tmp_path, "--pair")
    assert "SST received: " in out and "Installed new state from SST: " in out  # it starts empty
    assert "Receiving IST: 800 writesets, seqnos 4001-4800" in out
    assert "donor and joiner digests are equal" in out
