"""Configuration: Galera's ``wsrep_provider_options`` syntax, with Galera's defaults.

``--provider-options "gcache.size=256M; gcache.recover=yes"`` (or ``ISTD_PROVIDER_OPTIONS``) sets provider
options; ordinary flags set everything else. Values use Galera's notations: sizes like ``128M`` (powers of
1024), booleans ``yes/no/true/false/on/off/1/0``, durations in ISO 8601 like ``PT5S`` or plain seconds.

Precedence, lowest first: built-in default, ``ISTD_PROVIDER_OPTIONS``, ``--provider-options``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gcache import parse_size
from istd.errors import ConfigError

_SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

_DURATION_RE = re.compile(
    r"^P(?:(?P<d>\d+(?:\.\d+)?)D)?(?:T(?:(?P<h>\d+(?:\.\d+)?)H)?(?:(?P<m>\d+(?:\.\d+)?)M)?"
    r"(?:(?P<s>\d+(?:\.\d+)?)S)?)?$"
)


def format_size(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if n and n % _SIZE_UNITS[unit] == 0:
            return f"{n // _SIZE_UNITS[unit]}{unit}"
    return str(n)


def parse_bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("yes", "true", "on", "1"):
        return True
    if value in ("no", "false", "off", "0"):
        return False
    raise ValueError(f"expected yes or no, got {text!r}")


def parse_duration(text: str) -> float:
    """ISO 8601 duration (``PT5S``, ``PT0.5S``, ``PT1M``, ``P1D``) or plain seconds -> seconds."""
    value = str(text).strip()
    try:
        seconds = float(value)
    except ValueError:
        match = _DURATION_RE.match(value.upper())
        if not match or value.upper() in ("P", "PT"):
            raise ValueError(f"expected a duration like PT5S or 5, got {text!r}") from None
        parts = {k: float(v) for k, v in match.groupdict().items() if v is not None}
        seconds = parts.get("d", 0) * 86400 + parts.get("h", 0) * 3600 + parts.get("m", 0) * 60
        seconds += parts.get("s", 0)
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative: {text!r}")
    return seconds


def _parse_int(text: str) -> int:
    return int(str(text).strip())


def _parse_positive_float(text: str) -> float:
    value = float(str(text).strip())
    if value <= 0:
        raise ValueError(f"expected a number above 0, got {text!r}")
    return value


def _parse_str(text: str) -> str:
    return str(text).strip()


@dataclass(frozen=True)
class Option:
    key: str
    default: str
    parse: Callable[[str], Any]
    help: str


OPTIONS: dict[str, Option] = {
    opt.key: opt
    for opt in (
        Option("gcache.dir", "", _parse_str, "directory of galera.cache and its pages ('' = the data directory)"),
        Option("gcache.name", "galera.cache", _parse_str, "ring buffer file name, relative to gcache.dir"),
        Option("gcache.size", "128M", parse_size, "ring buffer size (Galera's default 128M)"),
        Option("gcache.page_size", "128M", parse_size, "size of each overflow page file"),
        Option("gcache.keep_pages_size", "0", parse_size, "overflow page bytes kept after they are unneeded"),
        Option("gcache.recover", "yes", parse_bool, "recover the ring buffer on start (Galera 4: yes)"),
        Option("gcache.sync", "no", parse_bool,
               "istd: msync after every append (survives an OS crash; slower)"),
        Option("gcs.fc_limit", "16", _parse_int, "flow control: receive queue length that pauses the writer"),
        Option("gcs.fc_factor", "1.0", _parse_positive_float,
               "flow control: resume when the queue falls to fc_limit * fc_factor"),
        Option("ist.connect_timeout", "PT5S", parse_duration, "istd: TCP connect timeout to a donor"),
        Option("ist.handshake_timeout", "PT10S", parse_duration, "istd: time allowed for the handshake"),
        Option("ist.keepalive_period", "PT1S", parse_duration, "istd: keepalive frame interval when idle"),
        Option("ist.idle_timeout", "PT10S", parse_duration,
               "istd: a peer silent this long is dropped (PXC's IST watchdog is 10 s)"),
        Option("ist.batch_size", "1M", parse_size, "istd: donor packs write-sets into frames of about this size"),
        Option("ist.recv_queue_size", "64M", parse_size,
               "istd: joiner's receive queue bound in bytes (memory does not grow with the gap)"),
        Option("ist.max_frame_size", "64M", parse_size, "istd: largest frame accepted from a peer"),
        Option("ist.retry_max", "PT30S", parse_duration, "istd: longest backoff between reconnect attempts"),
    )
}


@dataclass(frozen=True)
class ProviderOptions:
    """Effective provider options: typed values plus where each came from."""

    values: Mapping[str, Any]
    raw: Mapping[str, str]
    sources: Mapping[str, str]

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def rows(self) -> list[tuple[str, str, str, str, str]]:
        """(key, effective, default, source, meaning) for `istd config show`."""
        return [(k, self.raw[k], OPTIONS[k].default, self.sources[k], OPTIONS[k].help) for k in sorted(OPTIONS)]

    @property
    def limits(self) -> ConnectionLimits:
        return ConnectionLimits(
            connect_timeout=self["ist.connect_timeout"],
            handshake_timeout=self["ist.handshake_timeout"],
            idle_timeout=self["ist.idle_timeout"],
            keepalive_period=self["ist.keepalive_period"],
            max_frame_bytes=self["ist.max_frame_size"],
        )


@dataclass(frozen=True)
class ConnectionLimits:
    """The ist.* limits every IST and SST connection keeps to, at both ends (seconds; bytes)."""

    connect_timeout: float
    handshake_timeout: float
    idle_timeout: float
    keepalive_period: float
    max_frame_bytes: int


def parse_provider_options(text: str | None, *, origin: str = "--provider-options") -> dict[str, str]:
    """``"a=1; b = 2"`` -> {"a": "1", "b": "2"}, each key known and each value valid."""
    result: dict[str, str] = {}
    if not text:
        return result
    for item in text.split(";"):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"{origin}: {item.strip()!r} is not key=value")
        if key not in OPTIONS:
            raise ConfigError(
                f"{origin}: unknown provider option {key!r}; `istd config show` lists the known ones"
            )
        try:
            OPTIONS[key].parse(value)
        except ValueError as exc:
            raise ConfigError(f"{origin}: bad value for {key}: {exc}") from exc
        result[key] = value.strip()
    return result


def resolve(*layers: tuple[str, str | None]) -> ProviderOptions:
    """Merge (origin, text) layers over the defaults, later layers winning."""
    raw = {k: o.default for k, o in OPTIONS.items()}
    sources = dict.fromkeys(OPTIONS, "default")
    for origin, text in layers:
        for key, value in parse_provider_options(text, origin=origin).items():
            raw[key] = value
            sources[key] = origin
    values = {k: OPTIONS[k].parse(v) for k, v in raw.items()}
    return ProviderOptions(values=values, raw=raw, sources=sources)
