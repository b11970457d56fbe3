"""Logging: structlog, configured once by the CLI.

Event texts read like Galera's error log (``Receiving IST: 14 writesets, seqnos 1349-1363``) and carry the
same facts as key/value fields. On a terminal the console renderer is used, JSON lines otherwise
(``--log-format``). The stdlib ``logging`` (gcache, hypercorn, trio) is routed through the same renderer.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import IO, Any

import structlog

LOG_FORMATS = ("auto", "console", "json")


def _add_logger_name(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    record = event_dict.get("_record")
    if record is not None and record.name and not record.name.startswith("istd.daemon"):
        event_dict.setdefault("logger", record.name)
    return event_dict


def configure_logging(fmt: str = "auto", level: str = "info", stream: IO[str] | None = None) -> None:
    """Configure structlog and stdlib logging. Safe to call again (tests, several CLI invocations)."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty(), pad_event_to=0)
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info if fmt == "json" else structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    foreign: list[Any] = [*shared, _add_logger_name]
    if fmt == "json":  # a stdlib logger's exc_info becomes an "exception" field with the traceback text
        foreign.append(structlog.processors.format_exc_info)
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=foreign,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # hypercorn's access log and trio internals are noise at info level.
    logging.getLogger("hypercorn").setLevel(logging.WARNING)
    logging.getLogger("istd.http").setLevel(max(logging.INFO, root.level))
