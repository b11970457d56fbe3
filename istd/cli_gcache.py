"""`istd gcache inspect | create | fill`: look at and make galera.cache files (istd's or Galera's)."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from pathlib import Path

import click

from gcache import GCache, ScanReport, parse_size, scan
from istd import exitcodes
from istd.cli import fail
from istd.config import format_size
from istd.errors import GcacheError
from istd.writeset import synthetic

# Write-sets appended per GCache.append_many call by `fill`: large enough to amortize the call.
FILL_BATCH_RECORDS = 5000
_TYPE_NAMES = {0: "WRITESET", 3: "CCHANGE"}
_FLAG_NAMES = {1: "RELEASED", 2: "SKIPPED"}
_STORE_NAMES = {0: "MEM", 1: "RB", 2: "PAGE"}


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@click.group()
def gcache() -> None:
    """Inspect, create and fill a gcache file (Galera 4's galera.cache layout)."""


def _flags(flags: int) -> str:
    return "|".join(name for bit, name in _FLAG_NAMES.items() if flags & bit) or "-"


def _print_report(report: ScanReport, records: bool) -> None:
    run = f"{report.seqno_min}-{report.seqno_max}" if report.seqno_min >= 0 else "none"
    payload = sum(r.length for r in report.records if report.seqno_min <= r.seqno <= report.seqno_max)
    lines = [
        ("file", report.path),
        ("file size", f"{report.file_size} bytes (ring {report.ring_size} bytes = {format_size(report.ring_size)})"),
        ("Version", str(report.version)),
        ("GID", str(report.gid)),
        ("synced", f"{int(report.synced)} ({'clean close' if report.synced else 'open, or not closed cleanly'})"),
        ("preamble seqnos", f"{report.preamble_seqno_min} - {report.preamble_seqno_max}"
                            f" offset {report.preamble_offset}"),
        ("recovery", report.method),
        ("seqnos", f"{run} ({report.count} write-sets, {payload} payload bytes)"),
        ("ring", f"first buffer at {report.first}, next at {report.next}, "
                 f"{'wrapped' if report.wrapped else 'not wrapped'}"),
        ("headers found", str(len(report.records))),
        ("holes", ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in report.holes) or "none"),
        ("duplicates", ", ".join(map(str, report.duplicates)) or "none"),
        ("discarded", str(report.discarded)),
        ("bad checksums", str(report.garbage)),
    ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        click.echo(f"{key + ':':<{width + 1}} {value}")
    if records:
        click.echo(f"\n{'seqno':>12} {'offset':>12} {'size':>9} {'payload':>9} {'type':<9} {'flags':<17} "
                   f"{'store':<5} checksum")
        for r in report.records:
            type_name = _TYPE_NAMES.get(r.type, str(r.type))
            click.echo(f"{r.seqno:>12} {r.offset:>12} {r.size:>9} {r.length:>9} {type_name:<9} "
                       f"{_flags(r.flags):<17} {_STORE_NAMES.get(r.store, str(r.store)):<5} {r.checksum}")


@gcache.command("inspect")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--records", is_flag=True, help="list every buffer header found")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def inspect(file: Path, records: bool, as_json: bool) -> None:
    """Show FILE's preamble, seqno range, counts, sizes and holes, without changing it."""
    try:
        report = scan(file)
    except FileNotFoundError:
        fail(f"{file} does not exist", exitcodes.LOCAL_STATE)
    except GcacheError as exc:
        fail(exc)
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror}", exitcodes.LOCAL_STATE)
    if as_json:
        data = dataclasses.asdict(report)
        data["gid"] = str(report.gid)
        data["count"] = report.count
        if not records:
            data.pop("records")
        click.echo(json.dumps(data, indent=2))
        return
    _print_report(report, records)


@gcache.command("create")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--size", "size_text", default="128M", help="ring buffer size (gcache.size)")
@click.option("--gid", type=click.UUID, default=None, help="history uuid (default: a new one)")
def create(file: Path, size_text: str, gid: uuid.UUID | None) -> None:
    """Create an empty gcache FILE of the given size."""
    if file.exists():
        fail(f"{file} already exists; remove it first or choose another name", exitcodes.USAGE)
    size = _size(size_text)
    gid = gid or uuid.uuid1()
    try:
        with GCache.open(file, size=size) as cache:
            cache.reset(gid, 0)
    except GcacheError as exc:
        fail(exc)
    click.echo(f"created {file}: {format_size(size)} ring, GID {gid}")


@gcache.command("fill")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--count", type=click.IntRange(min=1), required=True, help="write-sets to append")
@click.option("--size", "ws_size", type=click.IntRange(min=1), default=500, help="bytes per write-set")
@click.option("--cache-size", "size_text", default="128M", help="ring size if FILE does not exist yet")
@click.option("--keyspace", type=click.IntRange(min=1), default=None, help="rows the write-sets cycle over")
def fill(file: Path, count: int, ws_size: int, size_text: str, keyspace: int | None) -> None:
    """Append COUNT synthetic write-sets (istd's write-set format) under the next seqnos."""
    try:
        size = _existing_ring(file) if file.exists() else _size(size_text)
        with GCache.open(file, size=size) as cache:
            if cache.gid == uuid.UUID(int=0):
                cache.reset(uuid.uuid1(), 0)
            start = time.perf_counter()
            first = cache.next_seqno
            done = 0
            while done < count:
                n = min(FILL_BATCH_RECORDS, count - done)
                base = first + done
                cache.append_many([synthetic(base + i, ws_size, keyspace=keyspace) for i in range(n)], first=base)
                done += n
            elapsed = time.perf_counter() - start
            click.echo(f"appended {count} write-sets of {ws_size} bytes as seqnos {first}-{first + count - 1} "
                       f"in {elapsed:.2f} s ({count / max(elapsed, 1e-9):,.0f}/s); cached now "
                       f"{cache.seqno_min}-{cache.seqno_max}, GID {cache.gid}")
    except GcacheError as exc:
        fail(exc)


def _existing_ring(file: Path) -> int:
    from gcache.format import FILE_OVERHEAD

    return file.stat().st_size - FILE_OVERHEAD
