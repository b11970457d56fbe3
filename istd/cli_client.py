"""``istd status``, ``istd write`` and ``istd load``: the command-line clients of the HTTP API.

Exit codes (the same numbers as every istd command, see istd/exitcodes.py):

    ====  ==========================================================================
    0     success (and Ctrl-C ending ``istd status --watch``)
    1     unexpected internal error
    2     usage error: a bad flag or --node value (click's own)
    3     EXIT_UNREACHABLE: no istd API answered at a --node address
    4     EXIT_REFUSED: the node answered with an error: 409 not the writer,
          503 flow control / not ready, 400 bad request, 413 too large, 500
    ====  ==========================================================================
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from typing import Any

import click

from istd import exitcodes
from istd.client import (
    DEFAULT_BATCH,
    DEFAULT_SIZE_BYTES,
    ClientError,
    NodeAddress,
    NodeRefused,
    NodeUnreachable,
    fetch_status,
    format_cluster,
    format_node,
    format_status,
    parse_node,
    run_load,
    send_write,
)
from istd.http import DEFAULT_API_PORT
from istd.writeset import Op, RowChange, WriteSetError, encode

__all__ = ["EXIT_REFUSED", "EXIT_UNREACHABLE", "load_cmd", "status_cmd", "write_cmd"]

EXIT_UNREACHABLE = exitcodes.UNREACHABLE  # 3
EXIT_REFUSED = exitcodes.REFUSED  # 4

DEFAULT_NODE = f"127.0.0.1:{DEFAULT_API_PORT}"

# Indirection so that tests can end a --watch loop without waiting (a fake sleep raising ^C).
_sleep = time.sleep


class NodeUnreachableError(click.ClickException):
    exit_code = EXIT_UNREACHABLE


class NodeRefusedError(click.ClickException):
    exit_code = EXIT_REFUSED


def _click_error(exc: ClientError) -> click.ClickException:
    if isinstance(exc, NodeRefused):
        return NodeRefusedError(str(exc))
    if isinstance(exc, NodeUnreachable):
        return NodeUnreachableError(str(exc))
    return click.ClickException(str(exc))


class NodeParam(click.ParamType):
    """HOST[:PORT] of a daemon's API (default port 4580); IPv6 in brackets."""

    name = "HOST:PORT"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> NodeAddress:
        if isinstance(value, tuple):
            return value
        try:
            return parse_node(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


NODE = NodeParam()


# ---------------------------------------------------------------------------------------- status


def _collect(nodes: tuple[NodeAddress, ...], timeout: float) -> dict[str, dict[str, Any] | ClientError]:
    out: dict[str, dict[str, Any] | ClientError] = {}
    for node in nodes:
        try:
            out[format_node(node)] = fetch_status(node, timeout=timeout)
        except ClientError as exc:
            out[format_node(node)] = exc
    return out


def _render(statuses: dict[str, dict[str, Any] | ClientError], as_json: bool) -> str:
    if as_json:
        doc = {n: ({"error": str(st)} if isinstance(st, ClientError) else st) for n, st in statuses.items()}
        return json.dumps(next(iter(doc.values())) if len(doc) == 1 else doc, indent=2, sort_keys=True)
    if len(statuses) == 1:
        (st,) = statuses.values()
        return f"error: {st}" if isinstance(st, ClientError) else format_status(st)
    return format_cluster(statuses)


def _first_error(statuses: dict[str, dict[str, Any] | ClientError]) -> ClientError | None:
    errors = [st for st in statuses.values() if isinstance(st, ClientError)]
    # Unreachable outranks refused: it is the more basic thing to fix.
    errors.sort(key=lambda e: not isinstance(e, NodeUnreachable))
    return errors[0] if errors else None


@click.command("status")
@click.option("--node", "nodes", type=NODE, multiple=True, default=(DEFAULT_NODE,), show_default=True,
              help="API address of a daemon (its --api-listen); repeat for a side-by-side view.")
@click.option("--watch", type=click.FloatRange(min=0.1), default=None, metavar="SECONDS",
              help="Refresh every SECONDS until Ctrl-C.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              help="Seconds to wait for each node.")
def status_cmd(nodes: tuple[NodeAddress, ...], watch: float | None, as_json: bool, timeout: float) -> None:
    """Show Galera status variables of one or more nodes (like SHOW STATUS LIKE 'wsrep%')."""
    if watch is None:
        statuses = _collect(nodes, timeout)
        error = _first_error(statuses)
        if error is not None and len(statuses) == 1:
            raise _click_error(error)
        click.echo(_render(statuses, as_json))
        if error is not None:
            raise _click_error(error)
        return
    tty = sys.stdout.isatty()
    try:
        while True:
            block = _render(_collect(nodes, timeout), as_json)
            stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            if tty:
                click.clear()
                click.echo(f"Every {watch:g}s: istd status    {stamp}\n")
            else:
                click.echo(f"--- {stamp}")
            click.echo(block)
            _sleep(watch)
    except KeyboardInterrupt:
        return


# ---------------------------------------------------------------------------------------- write


@click.command("write")
@click.option("--node", type=NODE, default=DEFAULT_NODE, show_default=True,
              help="API address of the writer (the donor's --api-listen).")
@click.option("--table", default="t", show_default=True, help="Table name ([A-Za-z0-9_]{1,64}).")
@click.option("--key", required=True, help="Row key (UTF-8).")
@click.option("--value", default=None, help="Row value (UTF-8); not with --delete.")
@click.option("--delete", is_flag=True, help="Delete the row instead of upserting it.")
def write_cmd(node: NodeAddress, table: str, key: str, value: str | None, delete: bool) -> None:
    """Replicate one row change as one write-set; prints its seqno."""
    if delete and value is not None:
        raise click.UsageError("--delete takes no --value")
    change = RowChange(Op.DELETE if delete else Op.UPSERT, table, key.encode(), (value or "").encode())
    try:
        encode([change])  # the node would answer 400; say it as a usage error instead
    except WriteSetError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        seqno = send_write(node, [change])
    except ClientError as exc:
        raise _click_error(exc) from None
    click.echo(f"seqno {seqno}")


# ---------------------------------------------------------------------------------------- load


@click.command("load")
@click.option("--node", type=NODE, default=DEFAULT_NODE, show_default=True,
              help="API address of the writer (the donor's --api-listen).")
@click.option("--count", type=click.IntRange(min=1), default=None,
              help="Send N write-sets as fast as possible.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Write-sets per second (with --duration).")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
              help="How long to send at --rate.")
@click.option("--size", type=click.IntRange(min=1), default=DEFAULT_SIZE_BYTES, show_default=True,
              metavar="BYTES", help="Size of each write-set.")
@click.option("--batch", type=click.IntRange(min=1), default=DEFAULT_BATCH, show_default=True,
              help="Most write-sets per HTTP request.")
@click.option("--keyspace", type=click.IntRange(min=1), default=None,
              help="Overwrite N distinct keys instead of a new key per write-set.")
@click.option("--table", default="t", show_default=True, help="Table name.")
def load_cmd(node: NodeAddress, count: int | None, rate: float | None, duration: float | None, size: int,
             batch: int, keyspace: int | None, table: str) -> None:
    """Generate write load on the writer (like pt-heartbeat): --count N, or --rate R --duration D."""
    if count is not None and (rate is not None or duration is not None):
        raise click.UsageError("give --count, or --rate with --duration, not both")
    if count is None and (rate is None or duration is None):
        raise click.UsageError("give --count N, or --rate R with --duration SECONDS")
    try:
        report = run_load(node, count=count, rate=rate, duration=duration, size=size, batch=batch,
                          table=table, keyspace=keyspace)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    except ClientError as exc:
        raise _click_error(exc) from None
    click.echo(report.format())
