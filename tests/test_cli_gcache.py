"""`istd gcache inspect | create | fill` through click's CliRunner, and `python -m istd` for exit codes.

The real Galera file (tests/data/real-galera/galera.cache) is only ever read; every other cache is made in
tmp_path. A crash is simulated on a file `fill` closed cleanly: its preamble is set back to `synced: 0` and
its last record is torn.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from click.testing import CliRunner, Result

from gcache import GCache
from gcache.format import FILE_OVERHEAD
from istd import exitcodes
from istd.cli import cli
from istd.writeset import Op, decode, synthetic
from tests.conftest import REAL_GALERA

ROOT = Path(__file__).resolve().parents[1]
REAL_CACHE = REAL_GALERA / "galera.cache"
REAL_GID = "0ba80362-e6b2-11f1-a838-fff90686b220"
REAL_FIRST, REAL_LAST = 328567, 328773
RING = 64 * 1024  # room for a few hundred small write-sets: no eviction in these tests
GID = uuid.UUID("6c2f4a1e-e6b2-11f1-9d3c-0242ac120002")
SUBPROCESS_TIMEOUT_SECONDS = 60  # a deadline against hangs, not a timing assertion


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The CLI configures logging onto CliRunner's stream, which is closed after invoke()."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    config = structlog.get_config()
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    structlog.configure(**config)


def invoke(*args: str | os.PathLike[str], code: int = 0) -> Result:
    result = CliRunner().invoke(cli, ["--log-format", "json", *map(str, args)])
    assert result.exit_code == code, (result.output, result.exception)
    return result


def run_istd(*args: str | os.PathLike[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISTD_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "istd", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=SUBPROCESS_TIMEOUT_SECONDS)


def fields(output: str) -> dict[str, str]:
    """The `key: value` lines of the plain inspect report (up to the records table)."""
    out: dict[str, str] = {}
    for line in output.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def record_rows(output: str) -> list[list[str]]:
    """The rows of the `--records` table, split into columns."""
    _, _, table = output.partition("\n\n")
    lines = table.splitlines()
    assert lines and lines[0].split()[:4] == ["seqno", "offset", "size", "payload"], table[:200]
    return [line.split() for line in lines[1:] if line.strip()]


def inspect_json(path: Path, *extra: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(invoke("gcache", "inspect", "--json", *extra, path).stdout)
    return data


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("istd: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ------------------------------------------------------------------------------ inspect: the real file


def test_inspect_real_galera_file() -> None:
    result = invoke("gcache", "inspect", REAL_CACHE)
    f = fields(result.stdout)
    assert f["GID"] == REAL_GID
    assert f["Version"] == "2"
    assert f["recovery"] == "preamble"
    assert f["seqnos"].startswith(f"{REAL_FIRST}-{REAL_LAST} (207 write-sets,")
    assert f["holes"] == "none"
    assert f["duplicates"] == "none"
    assert f["bad checksums"] == "0"
    assert f["synced"].startswith("1 ")
    assert "\n\n" not in result.stdout  # no records table without --records


def test_inspect_real_galera_records() -> None:
    result = invoke("gcache", "inspect", "--records", REAL_CACHE)
    rows = record_rows(result.stdout)
    assert len(rows) == int(fields(result.stdout)["headers found"]) > 207
    seqnos = [int(r[0]) for r in rows]
    kept = sorted(s for s in seqnos if REAL_FIRST <= s <= REAL_LAST)
    assert kept == list(range(REAL_FIRST, REAL_LAST + 1))
    assert max(seqnos) == REAL_LAST
    offsets = [int(r[1]) for r in rows]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    for row in rows:
        assert int(row[2]) % 8 == 0 and int(row[3]) <= int(row[2]) - 24
        assert row[4] in {"WRITESET", "CCHANGE"} or row[4].lstrip("-").isdigit()
        assert row[-2] in {"MEM", "RB", "PAGE"}
        assert row[-1] == "none"  # Galera's buffers carry a pointer, not istd's checksum


def test_inspect_real_galera_json() -> None:
    data = inspect_json(REAL_CACHE)
    assert (data["seqno_min"], data["seqno_max"], data["count"]) == (REAL_FIRST, REAL_LAST, 207)
    assert data["gid"] == REAL_GID
    assert data["holes"] == [] and data["duplicates"] == []
    assert data["method"] == "preamble" and data["synced"] is True
    assert data["file_size"] == REAL_CACHE.stat().st_size == data["ring_size"] + FILE_OVERHEAD
    assert "records" not in data
    with_records = inspect_json(REAL_CACHE, "--records")
    assert len(with_records["records"]) > 207
    assert {r["seqno"] for r in with_records["records"]} >= set(range(REAL_FIRST, REAL_LAST + 1))


def test_inspect_does_not_modify_the_file() -> None:
    before, stat = digest(REAL_CACHE), REAL_CACHE.stat()
    invoke("gcache", "inspect", REAL_CACHE)
    invoke("gcache", "inspect", "--records", REAL_CACHE)
    invoke("gcache", "inspect", "--json", "--records", REAL_CACHE)
    assert digest(REAL_CACHE) == before
    assert REAL_CACHE.stat().st_size == stat.st_size and REAL_CACHE.stat().st_mtime_ns == stat.st_mtime_ns


def test_inspect_of_an_unclean_file_does_not_modify_it(tmp_path: Path) -> None:
    path = tmp_path / "g.cache"
    invoke("gcache", "fill", path, "--count", "10", "--size", "100", "--cache-size", "64K")
    set_unsynced(path)
    before = digest(path)
    assert inspect_json(path)["method"] == "scan"
    assert digest(path) == before


# ------------------------------------------------------------------------------ create


def test_create_then_inspect(tmp_path: Path) -> None:
    path = tmp_path / "g.cache"
    result = invoke("gcache", "create", path, "--size", "64K", "--gid", str(GID))
    assert str(GID) in result.stdout
    assert path.stat().st_size == RING + FILE_OVERHEAD
    data = inspect_json(path, "--records")
    assert data["ring_size"] == RING
    assert data["gid"] == str(GID)
    assert (data["seqno_min"], data["seqno_max"], data["count"]) == (-1, -1, 0)
    assert data["records"] == [] and data["holes"] == []
    assert data["synced"] is True
    assert fields(invoke("gcache", "inspect", path).stdout)["seqnos"].startswith("none (0 write-sets")


def test_create_without_gid_makes_a_new_history(tmp_path: Path) -> None:
    invoke("gcache", "create", tmp_path / "a.cache", "--size", "4K")
    invoke("gcache", "create", tmp_path / "b.cache", "--size", "4K")
    a, b = inspect_json(tmp_path / "a.cache"), inspect_json(tmp_path / "b.cache")
    assert a["ring_size"] == b["ring_size"] == 4096
    assert a["gid"] != b["gid"]
    assert uuid.UUID(a["gid"]) != uuid.UUID(int=0)


def test_create_on_an_existing_file_fails(tmp_path: Path) -> None:
    path = tmp_path / "g.cache"
    invoke("gcache", "create", path, "--size", "4K", "--gid", str(GID))
    before = digest(path)
    proc = run_istd("gcache", "create", path, "--size", "8K", cwd=tmp_path)
    assert_one_line_error(proc, exitcodes.USAGE, str(path), "already exists")
    assert digest(path) == before
    invoke("gcache", "create", path, code=exitcodes.USAGE)


def test_create_with_a_bad_size_is_a_usage_error(tmp_path: Path) -> None:
    proc = run_istd("gcache", "create", tmp_path / "g.cache", "--size", "lots", cwd=tmp_path)
    assert proc.returncode == exitcodes.USAGE
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "g.cache").exists()


# ------------------------------------------------------------------------------ fill


def test_fill_then_inspect_and_fill_again(tmp_path: Path) -> None:
    path = tmp_path / "g.cache"
    result = invoke("gcache", "fill", path, "--count", "25", "--size", "120", "--cache-size", "64K")
    assert "seqnos 1-25" in result.stdout
    data = inspect_json(path)
    assert (data["seqno_min"], data["seqno_max"], data["count"]) == (1, 25, 25)
    assert data["ring_size"] == RING
    gid = data["gid"]
    assert uuid.UUID(gid) != uuid.UUID(int=0)

    result = invoke("gcache", "fill", path, "--count", "7", "--size", "300")
    assert "seqnos 26-32" in result.stdout
    data = inspect_json(path, "--records")
    assert (data["seqno_min"], data["seqno_max"], data["count"]) == (1, 32, 32)
    assert data["gid"] == gid  # the same history continues
    assert data["ring_size"] == RING  # the existing file's size, not the --cache-size default
    assert data["holes"] == [] and data["garbage"] == 0
    lengths = {r["seqno"]: r["length"] for r in data["records"]}
    assert lengths == {s: 120 if s <= 25 else 300 for s in range(1, 33)}


@pytest.mark.parametrize("ws_size", [100, 513])
def test_fill_writes_valid_write_sets_of_the_exact_size(tmp_path: Path, ws_size: int) -> None:
    path = tmp_path / "g.cache"
    invoke("gcache", "fill", path, "--count", "12", "--size", str(ws_size), "--cache-size", "64K")
    invoke("gcache", "fill", path, "--count", "3", "--size", str(ws_size))
    with GCache.open(path, size=RING, readonly=True) as cache:
        assert (cache.seqno_min, cache.seqno_max) == (1, 15)
        payloads = {s: bytes(cache.get(s).payload) for s in range(1, 16)}
    for seqno, payload in payloads.items():
        assert len(payload) == ws_size
        assert payload == synthetic(seqno, ws_size)
        changes = decode(payload)
        assert len(changes) == 1
        assert changes[0].op == Op.UPSERT
        assert changes[0].key == b"k%d" % seqno
    assert len(set(payloads.values())) == 15


def test_fill_with_keyspace_cycles_keys(tmp_path: Path) -> None:
    path = tmp_path / "g.cache"
    invoke("gcache", "fill", path, "--count", "10", "--size", "80", "--cache-size", "64K", "--keyspace", "3")
    with GCache.open(path, size=RING, readonly=True) as cache:
        keys = [decode(bytes(cache.get(s).payload))[0].key for s in range(1, 11)]
    assert keys == [b"k%d" % (s % 3) for s in range(1, 11)]


def test_fill_rejects_a_zero_count(tmp_path: Path) -> None:
    proc = run_istd("gcache", "fill", tmp_path / "g.cache", "--count", "0", cwd=tmp_path)
    assert proc.returncode == exitcodes.USAGE
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "g.cache").exists()


# ------------------------------------------------------------------------------ bad files


def test_inspect_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.cache"
    proc = run_istd("gcache", "inspect", path, cwd=tmp_path)
    assert_one_line_error(proc, exitcodes.LOCAL_STATE, str(path), "does not exist")
    assert not path.exists()
    invoke("gcache", "inspect", path, code=exitcodes.LOCAL_STATE)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(random.Random(7).randbytes(200_000), id="random-bytes"),
        pytest.param(b"this is not a gcache file\n" * 5000, id="text"),
        pytest.param(b"Version: 2\nGID: 6c2f4a1e-e6b2-11f1-9d3c-0242ac120002\n", id="short-preamble"),
        pytest.param(random.Random(8).randbytes(100), id="tiny"),
        pytest.param(b"", id="empty"),
    ],
)
def test_inspect_garbage_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.cache"
    path.write_bytes(content)
    proc = run_istd("gcache", "inspect", path, cwd=tmp_path)
    assert_one_line_error(proc, exitcodes.LOCAL_STATE, str(path))
    assert proc.stdout == ""
    assert path.read_bytes() == content
    invoke("gcache", "inspect", path, code=exitcodes.LOCAL_STATE)


# ------------------------------------------------------------------------------ after a crash


def set_unsynced(path: Path) -> None:
    data = bytearray(path.read_bytes())
    head = bytes(data[:1024])
    assert head.count(b"synced: 1") == 1, head.rstrip(b"\0")
    i = head.index(b"synced: 1")
    data[i:i + 9] = b"synced: 0"
    path.write_bytes(data)


@pytest.mark.parametrize("damage", ["torn-write", "file-truncated"])
def test_inspect_after_a_crash(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "g.cache"
    invoke("gcache", "fill", path, "--count", "20", "--size", "100", "--cache-size", "64K")
    clean = inspect_json(path, "--records")
    assert (clean["method"], clean["seqno_max"]) == ("preamble", 20)
    last = next(r for r in clean["records"] if r["seqno"] == 20)

    set_unsynced(path)
    cut = last["offset"] + 24 + 10  # the write stopped 10 bytes into the last payload
    if damage == "torn-write":
        with open(path, "r+b") as f:
            f.seek(cut)
            f.write(bytes(last["size"] - 34))
    else:
        os.truncate(path, cut)

    data = inspect_json(path, "--records")
    assert data["synced"] is False
    assert data["method"] == "scan"
    assert (data["seqno_min"], data["seqno_max"], data["count"]) == (1, 19, 19)
    assert data["holes"] == []
    torn = [r for r in data["records"] if r["seqno"] == 20]
    assert all(r["checksum"] == "bad" for r in torn)
    text = fields(invoke("gcache", "inspect", path).stdout)
    assert text["recovery"] == "scan"
    assert text["seqnos"].startswith("1-19 (19 write-sets")
    assert text["synced"].startswith("0 ")
    # What inspect promised is what a read-only open serves: 1-19 and never the torn record.
    with GCache.open(path, size=RING, readonly=True) as cache:
        assert (cache.seqno_min, cache.seqno_max) == (1, 19)
        assert 20 not in cache
        assert bytes(cache.get(19).payload) == synthetic(19, 100)
