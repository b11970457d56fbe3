"""The ``istd`` command line: one click group, a subcommand per job.

Every command body builds its configuration, then either runs synchronously (files) or calls
``trio.run``. Domain errors (IstError) become one line on stderr and a documented exit code
(istd/exitcodes.py); a traceback is never shown unless ``--log-level debug`` asks for it.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from istd import exitcodes
from istd import grastate as gs
from istd.config import format_size, resolve
from istd.errors import (
    ConfigError,
    GcacheError,
    IstError,
    ProtocolError,
    StateError,
)
from istd.logs import LOG_FORMATS, configure_logging

CONTEXT_SETTINGS = {"auto_envvar_prefix": "ISTD", "show_default": True, "help_option_names": ["-h", "--help"]}


class IstdCliError(click.ClickException):
    """One line on stderr, a documented exit code."""

    def __init__(self, message: str, exit_code: int = exitcodes.INTERNAL) -> None:
        super().__init__(message)
        # click declares exit_code a class variable; each error here carries its own documented code
        setattr(self, "exit_code", exit_code)  # noqa: B010

    def show(self, file: Any = None) -> None:
        click.echo(f"istd: error: {self.format_message()}", err=True)


def exit_code_for(exc: IstError) -> int:
    if isinstance(exc, ConfigError):
        return exitcodes.USAGE
    if isinstance(exc, StateError | GcacheError):
        return exitcodes.LOCAL_STATE
    if isinstance(exc, ProtocolError):
        return exitcodes.PROTOCOL
    return getattr(exc, "exit_code", exitcodes.INTERNAL)


def fail(exc: IstError | str, code: int | None = None) -> NoReturn:
    if isinstance(exc, IstError):
        raise IstdCliError(str(exc), code if code is not None else exit_code_for(exc)) from exc
    raise IstdCliError(exc, code if code is not None else exitcodes.INTERNAL)


def provider_options_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--provider-options",
        "provider_options",
        envvar="ISTD_PROVIDER_OPTIONS",
        default="",
        show_default=False,
        help='Galera-style options, e.g. "gcache.size=256M; gcache.recover=yes" (env ISTD_PROVIDER_OPTIONS).',
    )(f)


def load_options(provider_options: str) -> Any:
    try:
        return resolve(("--provider-options/ISTD_PROVIDER_OPTIONS", provider_options))
    except ConfigError as exc:
        fail(exc)


@click.group(context_settings=CONTEXT_SETTINGS)
@click.option("--log-format", type=click.Choice(LOG_FORMATS), default="auto",
              help="console on a terminal, JSON lines otherwise (auto).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
@click.version_option(package_name="istd", prog_name="istd")
@click.pass_context
def cli(ctx: click.Context, log_format: str, log_level: str) -> None:
    """istd: Galera's Incremental State Transfer, as a donor and a joiner daemon over TCP."""
    configure_logging(log_format, log_level)
    ctx.obj = {"log_level": log_level}


# --------------------------------------------------------------------------------------------- config


@cli.group()
def config() -> None:
    """Show the effective configuration."""


@config.command("show")
@provider_options_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def config_show(provider_options: str, as_json: bool) -> None:
    """Print every provider option: effective value, default and where it came from."""
    options = load_options(provider_options)
    rows = options.rows()
    if as_json:
        click.echo(json.dumps({k: {"value": v, "default": d, "source": s, "meaning": m}
                               for k, v, d, s, m in rows}, indent=2))
        return
    header = ("option", "value", "default", "source", "meaning")
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(4)]
    for row in (header, *rows):
        click.echo("  ".join(f"{cell:<{w}}" for cell, w in zip(row[:4], widths, strict=True)) + f"  {row[4]}")


# ------------------------------------------------------------------------------------------- grastate


@cli.group()
def grastate() -> None:
    """Read or edit a data directory's grastate.dat (as operators do by hand)."""


def _explain_state(state: gs.SavedState) -> str:
    if state.uuid == gs.ZERO_UUID:
        return "no history: this node can only join by SST"
    if state.seqno == gs.SEQNO_UNDEFINED:
        return ("seqno -1: the node is running or did not stop cleanly; istd recovers the position "
                "from its state database at start (as wsrep-recover does)")
    return f"stopped cleanly at {state.gtid}: can rejoin by IST from seqno {state.seqno + 1}"


@grastate.command("show")
@click.argument("datadir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def grastate_show(datadir: Path, as_json: bool) -> None:
    """Print DATADIR/grastate.dat and what it means."""
    try:
        state = gs.read(datadir)
    except StateError as exc:
        fail(exc)
    if state is None:
        fail(f"{gs.path_in(datadir)} does not exist: the node has no saved state (it would join by SST)",
             exitcodes.LOCAL_STATE)
    if as_json:
        click.echo(json.dumps({"uuid": str(state.uuid), "seqno": state.seqno,
                               "safe_to_bootstrap": int(state.safe_to_bootstrap), "version": state.version}))
        return
    click.echo(gs.path_in(datadir).read_bytes().decode("ascii").rstrip())
    click.echo(f"# {_explain_state(state)}")


@grastate.command("set")
@click.argument("datadir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--safe-to-bootstrap", type=click.IntRange(0, 1), default=None, show_default=False)
@click.option("--uuid", "new_uuid", type=click.UUID, default=None, show_default=False)
@click.option("--seqno", type=click.IntRange(min=-1), default=None, show_default=False)
def grastate_set(datadir: Path, safe_to_bootstrap: int | None, new_uuid: uuid.UUID | None,
                 seqno: int | None) -> None:
    """Change fields of DATADIR/grastate.dat atomically (refused while a daemon uses DATADIR)."""
    if safe_to_bootstrap is None and new_uuid is None and seqno is None:
        raise click.UsageError("nothing to set: give --safe-to-bootstrap, --uuid and/or --seqno")
    try:
        with gs.DatadirLock(datadir):
            state = gs.read(datadir) or gs.SavedState()
            if safe_to_bootstrap is not None:
                state = state.with_(safe_to_bootstrap=bool(safe_to_bootstrap))
            if new_uuid is not None:
                state = state.with_(uuid=new_uuid)
            if seqno is not None:
                state = state.with_(seqno=seqno)
            gs.write(datadir, state)
    except StateError as exc:
        fail(exc)
    click.echo(state.render().decode("ascii").rstrip())


# ---------------------------------------------------------------------------------------------- entry


def _register_optional() -> None:
    """Attach subcommands that live in their own modules."""
    from istd import cli_daemon, cli_gcache, demo

    cli.add_command(cli_gcache.gcache)
    cli.add_command(demo.demo)
    for cmd in (cli_daemon.donor, cli_daemon.joiner, cli_daemon.node, cli_daemon.state, cli_daemon.explain):
        cli.add_command(cmd)
    try:
        from istd.cli_client import load_cmd, status_cmd, write_cmd
    except ImportError:  # pragma: no cover - during development only
        return
    for cmd in (status_cmd, write_cmd, load_cmd):
        cli.add_command(cmd)


_register_optional()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: never a traceback for a user error."""
    try:
        rv = cli.main(args=argv, prog_name="istd", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("istd: interrupted", err=True)
        sys.exit(exitcodes.INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except IstError as exc:
        click.echo(f"istd: error: {exc}", err=True)
        sys.exit(exit_code_for(exc))
    except KeyboardInterrupt:
        click.echo("istd: interrupted", err=True)
        sys.exit(exitcodes.INTERRUPTED)
    except SystemExit:
        raise
    except Exception as exc:  # a bug: one line, the traceback only when asked for
        import logging
        import traceback

        if logging.getLogger().isEnabledFor(logging.DEBUG):
            traceback.print_exc()
        click.echo(f"istd: internal error: {type(exc).__name__}: {exc} "
                   f"(rerun with --log-level debug for the traceback and please report it)", err=True)
        sys.exit(exitcodes.INTERNAL)
    sys.exit(rv if isinstance(rv, int) else exitcodes.OK)


__all__ = ["cli", "fail", "format_size", "load_options", "main"]
