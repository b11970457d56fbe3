"""SST end to end: the real CLI as separate processes on loopback, each node on its own 127.0.0.x."""

from __future__ import annotations

from pathlib import Path

import pytest

from istd import exitcodes

from .procs import cluster, digest, load

pytestmark = pytest.mark.slow


def test_empty_joiner_gets_sst_then_ist_with_equal_digests(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        donor = c.donor("donor", "--bootstrap").start()
        donor.wait_synced()
        load(donor, 3000, size=300)
        joiner = c.joiner("joiner", donor).start()
        assert joiner.wait_exit() == exitcodes.OK, joiner.log()
        assert digest(joiner.datadir) == digest(donor.datadir)
        messages = joiner.messages()
        assert any(m.startswith("SST received: ") and m.endswith(":3000") for m in messages), messages
        assert any(m.startswith("Installed new state from SST: ") for m in messages)
        grastate = (joiner.datadir / "grastate.dat").read_text()
        assert "seqno:   3000\n" in grastate
