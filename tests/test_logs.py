"""istd.logs.configure_logging: JSON lines and console rendering, for structlog and stdlib loggers alike.

Rendering is tested here (that is this module's job); everywhere else tests assert on captured log dicts,
as the last tests of this file do for a node's state shifts.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from istd.config import resolve
from istd.logs import configure_logging
from istd.node import LocalNode
from istd.states import NodeState
from istd.writeset import synthetic

ROOT = Path(__file__).resolve().parents[1]
IST_EVENT = "Receiving IST: 14 writesets, seqnos 1349-1363"
SUBPROCESS_TIMEOUT_SECONDS = 60  # a deadline against hangs, not a timing assertion


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """configure_logging replaces the root handlers and structlog's config: put them back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in ("hypercorn", "istd.http")}
    config = structlog.get_config()
    yield
    structlog.contextvars.clear_contextvars()
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    for name, lvl in levels.items():
        logging.getLogger(name).setLevel(lvl)
    structlog.configure(**config)


class TtyStream(io.StringIO):
    def isatty(self) -> bool:
        return True


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = text.splitlines()
    assert lines, "nothing was logged"
    out = []
    for line in lines:
        obj = json.loads(line)  # every line is exactly one JSON object
        assert isinstance(obj, dict), line
        out.append(obj)
    return out


def assert_timestamp(value: str) -> None:
    ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert ts.utcoffset() == timedelta(0)


# ------------------------------------------------------------------------------ JSON


def test_json_structlog_event_with_fields() -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    structlog.get_logger().info(IST_EVENT, count=14, first=1349, last=1363)
    [line] = json_lines(stream.getvalue())
    assert line["event"] == IST_EVENT
    assert line["level"] == "info"
    assert (line["count"], line["first"], line["last"]) == (14, 1349, 1363)
    assert_timestamp(line["timestamp"])


def test_json_stdlib_logger_uses_the_same_renderer() -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    logging.getLogger("istd.gcache").info("Recovering GCache ring buffer: found gapless sequence %d-%d", 3, 9)
    logging.getLogger("istd.gcache").warning("GCache size changed")
    info, warning = json_lines(stream.getvalue())
    assert info["event"] == "Recovering GCache ring buffer: found gapless sequence 3-9"
    assert info["level"] == "info"
    assert info["logger"] == "istd.gcache"
    assert_timestamp(info["timestamp"])
    assert warning["level"] == "warning"


def test_json_is_the_default_when_not_a_terminal() -> None:
    stream = io.StringIO()
    configure_logging("auto", stream=stream)
    structlog.get_logger().info(IST_EVENT, count=14)
    [line] = json_lines(stream.getvalue())
    assert line["event"] == IST_EVENT and line["count"] == 14


def test_json_carries_bound_connection_context() -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    structlog.contextvars.bind_contextvars(role="donor", peer="127.0.0.2:4568", conn_id=3)
    structlog.get_logger().info(IST_EVENT)
    logging.getLogger("istd.gcache").info("from the stdlib")
    structlog.contextvars.clear_contextvars()
    structlog.get_logger().info("after")
    first, second, third = json_lines(stream.getvalue())
    for line in (first, second):
        assert (line["role"], line["peer"], line["conn_id"]) == ("donor", "127.0.0.2:4568", 3)
    assert "conn_id" not in third


def test_json_exception_has_the_traceback() -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    try:
        raise ValueError("bad frame")
    except ValueError:
        structlog.get_logger().exception("async IST sender failed")
    [line] = json_lines(stream.getvalue())
    assert line["level"] == "error"
    assert "Traceback" in line["exception"] and "ValueError: bad frame" in line["exception"]


def test_json_stdlib_exception_has_the_traceback() -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    try:
        raise ValueError("bad request")
    except ValueError:
        logging.getLogger("istd.http").exception("Error in ASGI Framework")
    [line] = json_lines(stream.getvalue())
    assert line["level"] == "error"
    assert "ValueError: bad request" in line.get("exception", "")


def test_level_filters_both_loggers() -> None:
    stream = io.StringIO()
    configure_logging("json", level="warning", stream=stream)
    structlog.get_logger().info("dropped")
    logging.getLogger("istd.gcache").info("dropped too")
    structlog.get_logger().warning("kept", seqno=5)
    logging.getLogger("istd.gcache").error("kept too")
    events = [(line["event"], line["level"]) for line in json_lines(stream.getvalue())]
    assert events == [("kept", "warning"), ("kept too", "error")]


def test_hypercorn_info_is_quiet() -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    logging.getLogger("hypercorn.access").info("GET /status 200")
    logging.getLogger("hypercorn.error").warning("worker restarted")
    [line] = json_lines(stream.getvalue())
    assert line["event"] == "worker restarted"


def test_configure_twice_does_not_duplicate_lines() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("json", stream=first)
    configure_logging("json", stream=second)
    structlog.get_logger().info(IST_EVENT)
    logging.getLogger("istd.gcache").info("stdlib")
    assert first.getvalue() == ""
    assert [line["event"] for line in json_lines(second.getvalue())] == [IST_EVENT, "stdlib"]


# ------------------------------------------------------------------------------ console


@pytest.mark.parametrize("fmt,stream_type", [("console", io.StringIO), ("auto", TtyStream)])
def test_console_renders_event_text(fmt: str, stream_type: type[io.StringIO]) -> None:
    stream = stream_type()
    configure_logging(fmt, stream=stream)
    structlog.get_logger().info(IST_EVENT, count=14, first=1349, last=1363)
    logging.getLogger("istd.gcache").info("Creating GCache ring buffer %s", "g.cache")
    text = stream.getvalue()
    lines = text.splitlines()
    assert len(lines) == 2
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[0])
    assert IST_EVENT in lines[0]
    for key, value in (("count", "14"), ("first", "1349"), ("last", "1363")):
        assert key in lines[0] and value in lines[0]
    assert "Creating GCache ring buffer g.cache" in lines[1]
    assert "istd.gcache" in lines[1]


# ------------------------------------------------------------------------------ through the CLI


def run_istd(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISTD_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "istd", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=SUBPROCESS_TIMEOUT_SECONDS)


def test_cli_log_format_json(tmp_path: Path) -> None:
    path = tmp_path / "g.cache"
    fill = ("gcache", "fill", str(path), "--count", "10", "--size", "100", "--cache-size", "64K")
    proc = run_istd("--log-format", "json", *fill, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "seqnos 1-10" in proc.stdout  # the result on stdout, the log on stderr
    lines = json_lines(proc.stderr)
    for line in lines:
        assert line["level"] in {"debug", "info", "warning", "error"}
        assert_timestamp(line["timestamp"])
    gcache_events = [line["event"] for line in lines if line.get("logger") == "istd.gcache"]
    assert any(e.startswith("Creating GCache ring buffer") and str(path) in e for e in gcache_events), lines

    # a second fill opens the cleanly closed file and logs its recovery, still as JSON
    proc = run_istd("--log-format", "json", *fill, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    events = [line["event"] for line in json_lines(proc.stderr)]
    assert any(e.startswith("Recovering GCache ring buffer") for e in events), events


def test_cli_log_format_console_and_level(tmp_path: Path) -> None:
    path = tmp_path / "g.cache"
    fill = ("gcache", "fill", str(path), "--count", "3", "--size", "100", "--cache-size", "64K")
    proc = run_istd("--log-format", "console", *fill, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Creating GCache ring buffer" in proc.stderr
    with pytest.raises(json.JSONDecodeError):
        json.loads(proc.stderr.splitlines()[0])
    proc = run_istd("--log-format", "json", "--log-level", "warning", *fill, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "seqnos 4-6" in proc.stdout


# ------------------------------------------------------------------------------ captured log dicts


OPTIONS = "gcache.size=1M"


def make_node(path: Path) -> LocalNode:
    return LocalNode(datadir=path, name=path.name, options=resolve(("test", OPTIONS)), applier="sqlite",
                     role="joiner")


async def test_node_logs_state_shifts_as_fields(tmp_path: Path) -> None:
    node = make_node(tmp_path / "node")
    with capture_logs() as opened:
        node.open(bootstrap=True)
    try:
        started = [e for e in opened if e["event"].startswith("Starting new cluster history")]
        assert started == [{"event": f"Starting new cluster history: {node.uuid}:0", "uuid": str(node.uuid),
                            "log_level": "info"}]
        await node.write([synthetic(s, 100) for s in range(1, 6)])
        assert node.last_committed == 5
        with capture_logs() as logs:
            node.shift(NodeState.JOINING_RECEIVING)
            node.shift(NodeState.JOINING)  # JOINER -> JOINER in Galera's names: nothing to say
            node.shift(NodeState.JOINED)
            node.shift(NodeState.JOINED)
    finally:
        node.close()
    shifts = [e for e in logs if e["event"].startswith("Shifting")]
    assert shifts == [
        {"event": "Shifting PRIMARY -> JOINER (TO: 5)", "old": "PRIMARY", "new": "JOINER", "seqno": 5,
         "log_level": "info"},
        {"event": "Shifting JOINER -> JOINED (TO: 5)", "old": "JOINER", "new": "JOINED", "seqno": 5,
         "log_level": "info"},
    ]
    assert node.state is NodeState.JOINED
