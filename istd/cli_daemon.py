"""`istd donor`, `istd joiner` and `istd state digest`."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import trio

from istd import exitcodes
from istd.cli import fail, load_options, provider_options_option
from istd.cluster import GROUP_PORT
from istd.daemon import DEFAULT_API_PORT, DEFAULT_IST_PORT, DaemonConfig, run
from istd.errors import IstError
from istd.sst import DEFAULT_SST_PORT
from istd.trioutil import unwrap


def parse_hostport(text: str, default_port: int) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST``, ``:PORT``, ``[v6]:PORT`` -> (host, port)."""
    text = text.strip()
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']' in an IPv6 address")
        host, rest = text[1:end], text[end + 1:]
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected [IPv6]:PORT")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        raise ValueError(f"{text!r}: an IPv6 address needs brackets, as in [::1]:4568")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: port must be a number from 0 to 65535")
    return host, int(port_text)


class HostPort(click.ParamType):
    name = "HOST:PORT"

    def __init__(self, default_port: int, allow_none: bool = False) -> None:
        self.default_port = default_port
        self.allow_none = allow_none

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> object:
        if isinstance(value, tuple) or value is None:
            return value
        if self.allow_none and str(value).strip().lower() in ("", "none", "off"):
            return None
        try:
            return parse_hostport(str(value), self.default_port)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def common_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--api-listen", "api", type=HostPort(DEFAULT_API_PORT, allow_none=True),
                     default=f"0.0.0.0:{DEFAULT_API_PORT}",
                     help="HTTP API address (GET /status, POST /write); 'none' disables it")(f)
    return storage_options(f)


def storage_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--datadir", required=True, type=click.Path(file_okay=False, path_type=Path),
                     help="data directory: grastate.dat, galera.cache, the applied state")(f)
    f = click.option("--name", default=socket.gethostname(), show_default="host name",
                     help="node name (wsrep_node_name)")(f)
    f = click.option("--applier", type=click.Choice(["sqlite", "none"]), default="sqlite",
                     help="how write-sets are applied: SQLite state, or none (keep them in the gcache only)")(f)
    return provider_options_option(f)


def _run(cfg: DaemonConfig, role: str) -> int:
    try:
        return trio.run(run, cfg, role)
    except Exception as exc:  # trio's nurseries wrap errors in exception groups
        err = unwrap(exc)
        if isinstance(err, IstError):
            fail(err)
        raise


@click.command()
@common_options
@click.option("--listen", type=HostPort(DEFAULT_IST_PORT), default=f"0.0.0.0:{DEFAULT_IST_PORT}",
              help="IST address joiners connect to (Galera's IST port is 4568)")
@click.option("--sst-listen", "sst", type=HostPort(DEFAULT_SST_PORT, allow_none=True), default=None,
              help=f"SST address for full snapshots (default: the --listen host, port {DEFAULT_SST_PORT}); "
                   "'none' disables SST")
@click.option("--sst-address", "sst_address", type=HostPort(DEFAULT_SST_PORT), default=None,
              help="the SST address joiners are told to use, when it is not --sst-listen (NAT, a port mapping, a "
                   "proxy; like Galera's wsrep_sst_receive_address)")
@click.option("--bootstrap", is_flag=True,
              help="start a new history when DATADIR has none (like --wsrep-new-cluster)")
@click.pass_context
def donor(ctx: click.Context, datadir: Path, name: str, applier: str, api: tuple[str, int] | None,
          provider_options: str, listen: tuple[str, int], sst: tuple[str, int] | None,
          sst_address: tuple[str, int] | None, bootstrap: bool) -> int:
    """Serve write-sets from DATADIR/galera.cache to joiners by IST, snapshots of the state by SST, and take
    writes (the writer of the cluster)."""
    if sst is None and ctx.get_parameter_source("sst") is click.core.ParameterSource.DEFAULT:
        sst = (listen[0], DEFAULT_SST_PORT)
    cfg = DaemonConfig(datadir=datadir, name=name, options=load_options(provider_options), applier=applier,
                       listen=listen, api=api, bootstrap=bootstrap, sst=sst, sst_advertise=sst_address)
    return _run(cfg, "donor")


@click.command()
@common_options
@click.option("--donor", "donors", multiple=True, required=True, type=HostPort(DEFAULT_IST_PORT),
              help="donor IST address; repeat to give several, tried in order")
@click.option("--follow", is_flag=True, help="stay connected and apply new write-sets as the donor takes them")
@click.option("--retries", type=click.IntRange(min=0), default=5,
              help="rounds over all donors without progress before giving up")
@click.option("--ist-only", is_flag=True,
              help="never take a full state transfer: if IST is impossible, exit 4 and leave the state as it is")
def joiner(datadir: Path, name: str, applier: str, api: tuple[str, int] | None, provider_options: str,
           donors: tuple[tuple[str, int], ...], follow: bool, retries: int, ist_only: bool) -> int:
    """Catch DATADIR up by IST from a donor (by SST first when IST is impossible); exit 0 once caught up (or
    keep following)."""
    cfg = DaemonConfig(datadir=datadir, name=name, options=load_options(provider_options), applier=applier,
                       api=api, donors=donors, follow=follow, retries=retries, ist_only=ist_only)
    return _run(cfg, "joiner")


def _peers(text: str) -> tuple[tuple[str, int], ...]:
    try:
        return tuple(parse_hostport(p, GROUP_PORT) for p in text.split(",") if p.strip())
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--peers") from exc


@click.command()
@storage_options
@click.option("--address", default="127.0.0.1", help="this node's address: group, IST and API ports listen here")
@click.option("--peers", default="", help="the other members' group addresses, HOST[:4567],... (Galera's gcomm://)")
@click.option("--bootstrap", is_flag=True, help="start a new cluster from this node (like --wsrep-new-cluster)")
@click.option("--writer", default=None, help="name of the node that takes writes (default: the bootstrapped one)")
@click.option("--donor", "donor_names", default="", help="preferred donors by name, NAME,... (wsrep_sst_donor)")
@click.option("--group-port", type=click.IntRange(1, 65535), default=GROUP_PORT, help="Galera's group port")
@click.option("--ist-port", type=click.IntRange(1, 65535), default=DEFAULT_IST_PORT, help="IST port")
@click.option("--sst-port", type=click.IntRange(0, 65535), default=DEFAULT_SST_PORT,
              help="SST port (full snapshots), 0: off")
@click.option("--api-port", type=click.IntRange(0, 65535), default=DEFAULT_API_PORT, help="HTTP API port, 0: off")
@click.option("--ist-only", is_flag=True,
              help="never take a full state transfer: if IST is impossible, exit 4 and leave the state as it is")
def node(datadir: Path, name: str, applier: str, provider_options: str, address: str,
         peers: str, bootstrap: bool, writer: str | None, donor_names: str, group_port: int, ist_port: int,
         sst_port: int, api_port: int, ist_only: bool) -> int:
    """Run a cluster member: replication (4567), IST (4568) and the API (4580), all on --address; a node that
    is behind joins by IST from a synced member, then follows the writer."""
    cfg = DaemonConfig(datadir=datadir, name=name, options=load_options(provider_options), applier=applier,
                       listen=(address, ist_port), api=(address, api_port) if api_port else None,
                       bootstrap=bootstrap, address=address, group_port=group_port, peers=_peers(peers),
                       donor_names=tuple(n for n in donor_names.split(",") if n), writer=writer,
                       sst=(address, sst_port) if sst_port else None, ist_only=ist_only)
    return _run(cfg, "node")


@click.command()
@click.option("--datadir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="the joiner's data directory (its position and its own gcache)")
@click.option("--donor", "donors", multiple=True, type=HostPort(DEFAULT_IST_PORT),
              help="a donor's IST address to ask for its numbers; repeat for several")
@click.option("--uuid", "joiner_uuid", type=click.UUID, default=None, help="offline: the joiner's uuid")
@click.option("--seqno", "joiner_seqno", type=int, default=None, help="offline: the joiner's seqno")
@click.option("--joiner-cached-downto", type=int, default=-1, help="offline: the joiner's own cached_downto")
@click.option("--donor-uuid", type=click.UUID, default=None, help="offline: the donor's uuid")
@click.option("--donor-last", type=int, default=None, help="offline: the donor's last seqno")
@click.option("--cached-downto", "donor_cached", type=int, default=None, help="offline: the donor's cached_downto")
@click.option("--ist-only", is_flag=True, help="the joiner accepts IST only (no SST fallback)")
def explain(datadir: Path | None, donors: tuple[tuple[str, int], ...], joiner_uuid: uuid.UUID | None,
            joiner_seqno: int | None, joiner_cached_downto: int, donor_uuid: uuid.UUID | None,
            donor_last: int | None, donor_cached: int | None, ist_only: bool) -> None:
    """Say, for each donor, whether this node would get IST or SST, with every number and the rule.

    Online: --datadir D --donor HOST:PORT ... asks each donor. Offline: give the numbers as options."""
    from istd.explain import ask_donor, render
    from istd.explain import explain as decide

    if datadir is not None:
        joiner_uuid, joiner_seqno, joiner_cached_downto = _joiner_numbers(datadir)
    if joiner_uuid is None or joiner_seqno is None:
        raise click.UsageError("give --datadir, or the joiner's numbers with --uuid and --seqno")
    asked: list[tuple[str, dict[str, object]]] = []
    for host, port in donors:
        try:
            asked.append((f"donor {host}:{port}", ask_donor(host, port)))
        except OSError as exc:
            click.echo(f"donor {host}:{port}: no answer ({exc}); is a donor listening there?", err=True)
    if donor_uuid is not None or donor_last is not None or donor_cached is not None:
        if donor_uuid is None or donor_last is None or donor_cached is None:
            raise click.UsageError("offline mode needs --donor-uuid, --donor-last and --cached-downto together")
        asked.append(("donor (given)", {"uuid": str(donor_uuid), "last_committed": donor_last,
                                        "cached_downto": donor_cached}))
    if not asked:
        fail("no donor to explain against: give --donor HOST:PORT or the donor's numbers", exitcodes.UNREACHABLE)
    for label, numbers in asked:
        name = f"{label} ({numbers['name']})" if numbers.get("name") else label
        verdict = decide(joiner_uuid=joiner_uuid, joiner_seqno=joiner_seqno,
                         donor_uuid=uuid.UUID(str(numbers["uuid"])), donor_last=int(str(numbers["last_committed"])),
                         donor_cached_downto=int(str(numbers["cached_downto"])),
                         joiner_cached_downto=joiner_cached_downto, ist_only=ist_only)
        click.echo(render(name, verdict))


def _joiner_numbers(datadir: Path) -> tuple[uuid.UUID, int, int]:
    """The joiner's position as its daemon would find it (grastate.dat, or the state database when it says
    -1) and its own gcache's lowest seqno, read without locking or changing anything."""
    from gcache import scan
    from istd import grastate as gs
    from istd.applier import STATE_DB_NAME, open_applier

    try:
        saved = gs.read(datadir) or gs.SavedState()
        node_uuid, seqno = saved.uuid, saved.seqno
        if seqno < 0 and (datadir / STATE_DB_NAME).exists():
            store = open_applier("sqlite", datadir)
            try:
                recorded = store.position()
            finally:
                store.close()
            if recorded is not None and node_uuid in (gs.ZERO_UUID, recorded[0]):
                node_uuid, seqno = recorded
        cached = -1
        if (datadir / "galera.cache").exists():
            report = scan(datadir / "galera.cache")
            cached = report.seqno_min if report.gid == node_uuid else -1
    except IstError as exc:
        fail(exc)
    return node_uuid, seqno, cached


@click.group()
def state() -> None:
    """The applied state of a data directory."""


@state.command("digest")
@click.argument("datadir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--applier", type=click.Choice(["sqlite"]), default="sqlite")
def state_digest(datadir: Path, applier: str) -> None:
    """Print the position and a digest of the applied state (same history, same digest, on any node)."""
    from istd.applier import STATE_DB_NAME, open_applier

    if not (datadir / STATE_DB_NAME).exists():
        fail(f"{datadir / STATE_DB_NAME} does not exist: no applied state in {datadir}", exitcodes.LOCAL_STATE)
    try:
        store = open_applier(applier, datadir)
        try:
            position = store.position()
            digest = store.digest()
        finally:
            store.close()
    except IstError as exc:
        fail(exc)
    where = f"{position[0]}:{position[1]}" if position else "none"
    click.echo(f"position: {where}")
    click.echo(f"digest:   {digest}")
