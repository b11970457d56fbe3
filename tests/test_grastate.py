from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from istd import grastate as gs
from istd.cli import cli
from istd.errors import DatadirLocked, StateFileCorrupt

from .conftest import REAL_GALERA

GALERA_UUID = uuid.UUID("0ba80362-e6b2-11f1-a838-fff90686b220")


def test_real_file_round_trips_byte_for_byte() -> None:
    data = (REAL_GALERA / "grastate.dat").read_bytes()
    state = gs.parse(data)
    assert state == gs.SavedState(uuid=GALERA_UUID, seqno=328773, safe_to_bootstrap=False)
    assert state.render() == data


def test_padded_file_from_in_place_rewrite_is_read() -> None:
    data = (REAL_GALERA / "grastate.padded.dat").read_bytes()
    assert data.endswith(b"\n    ")
    state = gs.parse(data)
    assert state.uuid == gs.ZERO_UUID and state.seqno == -1 and not state.safe_to_bootstrap
    assert state.is_undefined
    assert state.render() == data.rstrip(b" ")


def test_exact_spacing_of_written_file() -> None:
    text = gs.SavedState(uuid=GALERA_UUID, seqno=35, safe_to_bootstrap=True).render()
    assert text == (
        b"# GALERA saved state\nversion: 2.1\nuuid:    0ba80362-e6b2-11f1-a838-fff90686b220\n"
        b"seqno:   35\nsafe_to_bootstrap: 1\n"
    )


def test_missing_safe_to_bootstrap_means_one_and_unknown_keys_are_ignored() -> None:
    data = b"# GALERA saved state\nversion: 2.1\nuuid:    %s\nseqno:   7\nfuture_key: x\n" % str(
        GALERA_UUID
    ).encode()
    state = gs.parse(data)
    assert state.safe_to_bootstrap is True and state.seqno == 7


@pytest.mark.parametrize(
    "data",
    [
        b"uuid:    not-a-uuid\nseqno:   1\n",
        b"uuid:    %s\nseqno:   one\n" % str(GALERA_UUID).encode(),
        b"uuid:    %s\nseqno:   -5\n" % str(GALERA_UUID).encode(),
        b"uuid:    %s\nseqno:   1\nsafe_to_bootstrap: 2\n" % str(GALERA_UUID).encode(),
        b"seqno:   12\n",
        b"\xff\xfe garbage",
    ],
)
def test_corrupt_files_raise_one_clear_error(data: bytes) -> None:
    with pytest.raises(StateFileCorrupt):
        gs.parse(data)


def test_write_then_read(tmp_path: Path) -> None:
    assert gs.read(tmp_path) is None
    state = gs.SavedState(uuid=GALERA_UUID, seqno=-1, safe_to_bootstrap=False)
    gs.write(tmp_path, state)
    assert gs.read(tmp_path) == state
    assert not list(tmp_path.glob(".*.tmp"))


WRITER = """
import sys, uuid
from istd import grastate as gs
d = sys.argv[1]
u = uuid.UUID(int=12345)
print("ready", flush=True)
i = 0
while True:
    i += 1
    gs.write(d, gs.SavedState(uuid=u, seqno=i, safe_to_bootstrap=False))
"""


def test_kill_9_never_leaves_a_torn_or_empty_file(tmp_path: Path) -> None:
    gs.write(tmp_path, gs.SavedState(uuid=uuid.UUID(int=12345), seqno=0))
    for _ in range(15):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        # let it rewrite the file a variable number of times, then kill it at an arbitrary instant
        for _ in range(3):
            gs.read(tmp_path)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        state = gs.read(tmp_path)
        assert state is not None and state.uuid == uuid.UUID(int=12345) and state.seqno >= 0
        assert (tmp_path / "grastate.dat").read_bytes() == state.render()


def test_datadir_lock_is_exclusive_across_processes(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from istd.grastate import DatadirLock; l = DatadirLock(sys.argv[1]); l.acquire();"
         "print('locked', flush=True); sys.stdin.read()", str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        with pytest.raises(DatadirLocked, match=f"pid {holder.pid}"):
            gs.DatadirLock(tmp_path).acquire()
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait()
    with gs.DatadirLock(tmp_path):
        pass


def test_cli_show_and_set(tmp_path: Path) -> None:
    (tmp_path / "grastate.dat").write_bytes((REAL_GALERA / "grastate.dat").read_bytes())
    runner = CliRunner()
    result = runner.invoke(cli, ["grastate", "show", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "seqno:   328773" in result.output
    assert "can rejoin by IST from seqno 328774" in result.output
    result = runner.invoke(cli, ["grastate", "set", str(tmp_path), "--safe-to-bootstrap", "1"])
    assert result.exit_code == 0, result.output
    state = gs.read(tmp_path)
    assert state is not None and state.safe_to_bootstrap and state.seqno == 328773


def test_cli_errors_are_one_line_with_exit_codes(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    missing = subprocess.run([sys.executable, "-m", "istd", "grastate", "show", str(tmp_path)],
                             capture_output=True, text=True, env=env)
    assert missing.returncode == 6
    assert missing.stderr.count("\n") == 1 and "does not exist" in missing.stderr
    (tmp_path / "grastate.dat").write_bytes(b"uuid:    zzz\n")
    corrupt = subprocess.run([sys.executable, "-m", "istd", "grastate", "show", str(tmp_path)],
                             capture_output=True, text=True, env=env)
    assert corrupt.returncode == 6 and "Traceback" not in corrupt.stderr
    assert "grastate.dat:1: bad value for uuid" in corrupt.stderr
