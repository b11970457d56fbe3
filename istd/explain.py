"""`istd explain`: would this node get IST or SST from that donor, and why.

Galera's users ask why a smaller gap was refused while a larger one was accepted (seed 003). The answer is in
two rules applied one after the other, and in the numbers behind them:

1. Donor selection (gcs_group.cpp, run on every node): a donor is considered for IST only if the joiner's uuid
   is the group's and its seqno is not -1, and only if ``ist_seqno >= safe_ist_seqno`` where
   ``safe_ist_seqno = lowest_cached + min((last - lowest_cached) >> 7, 2^20)`` and ``lowest_cached`` is the
   lowest ``cached_downto`` over *all* members, the joiner's own gcache included. The gap grows with the
   cached range, not with the joiner's gap: a joiner close to the cache's lower edge is sent to SST even when
   its gap is small (PXC: ``may fallback to sst. ist_seqno [x] < safe_ist_seqno [y]``). The rule is skipped
   for an IST-only request.
2. The donor's own check (replicator_str.cpp): the first missing seqno must still be in its gcache, else
   ``IST first seqno N not found from cache, falling back to SST``.

``explain()`` applies both and returns every number and the rule that decided.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from istd.donor import SAFETY_GAP_MAX_SEQNOS, SAFETY_GAP_SHIFT, safe_ist_seqno
from istd.grastate import ZERO_UUID


@dataclass(frozen=True)
class Verdict:
    kind: str  # "IST", "SST" or "impossible"
    rule: str
    lines: list[tuple[str, str]] = field(default_factory=list)


def explain(*, joiner_uuid: uuid.UUID, joiner_seqno: int, donor_uuid: uuid.UUID, donor_last: int,
            donor_cached_downto: int, joiner_cached_downto: int = -1, ist_only: bool = False) -> Verdict:
    """Galera's IST-or-SST decision for one joiner and one donor, with the numbers behind it."""
    first = joiner_seqno + 1
    cached = [c for c in (donor_cached_downto, joiner_cached_downto) if c >= 0]
    lowest = min(cached) if cached else -1
    safe = safe_ist_seqno(lowest, donor_last)
    gap = safe - lowest if lowest >= 0 else 0
    lines = [
        ("joiner position", f"{joiner_uuid}:{joiner_seqno}" + (f" (first missing seqno {first})"
                                                               if joiner_seqno >= 0 else "")),
        ("donor", f"{donor_uuid}:{donor_last}, cached_downto {donor_cached_downto}"),
        ("lowest cached", f"{lowest} (lowest cached_downto of the donor and the joiner's own gcache "
                          f"{joiner_cached_downto})"),
        ("safety gap", f"min(({donor_last} - {lowest}) >> {SAFETY_GAP_SHIFT}, {SAFETY_GAP_MAX_SEQNOS}) = {gap}: "
                       f"safe_ist_seqno = {lowest} + {gap} = {safe}"),
        ("request", "IST only (--ist-only): no SST fallback, safety gap not applied" if ist_only
         else "IST, SST as a fallback"),
    ]

    def verdict(kind: str, rule: str) -> Verdict:
        if kind == "SST" and ist_only:
            return Verdict("impossible", f"{rule}; the joiner asked for IST only, so it would stop with an error "
                                         "and keep its state", lines)
        return Verdict(kind, rule, lines)

    if joiner_uuid == ZERO_UUID or joiner_seqno < 0:
        return verdict("SST", "the joiner's position is unknown (zero uuid or seqno -1): only SST can help")
    if joiner_uuid != donor_uuid:
        return verdict("SST", f"the joiner's history {joiner_uuid} is not the donor's {donor_uuid}")
    if joiner_seqno > donor_last:
        return Verdict("impossible", f"the joiner (seqno {joiner_seqno}) is ahead of this donor ({donor_last}): "
                                     "choose a donor that is further ahead", lines)
    if first > donor_last:
        return Verdict("IST", "nothing is missing: an empty IST (the donor only sends EOF)", lines)
    if not ist_only and joiner_seqno < safe:
        return verdict("SST", f"may fallback to sst. ist_seqno [{joiner_seqno}] < safe_ist_seqno [{safe}]: "
                              "the donor-selection safety gap (1/128 of the cached range) leaves this joiner out, "
                              "even if the donor still has its first missing seqno")
    if donor_cached_downto < 0 or first < donor_cached_downto:
        return verdict("SST", f"IST first seqno {first} not found from cache (cached_downto "
                              f"{donor_cached_downto}), falling back to SST")
    return Verdict("IST", f"uuid matches, seqno {joiner_seqno} >= 0, first missing seqno {first} >= cached_downto "
                          f"{donor_cached_downto}" + ("" if ist_only else f", ist_seqno {joiner_seqno} >= "
                                                                            f"safe_ist_seqno {safe}"), lines)


def render(name: str, v: Verdict) -> str:
    width = max(len(k) for k, _ in v.lines) if v.lines else 0
    out = [f"{name}: {v.kind}"]
    out += [f"  {k:<{width}}  {text}" for k, text in v.lines]
    out.append(f"  {'rule':<{width}}  {v.rule}")
    return "\n".join(out)


def ask_donor(host: str, port: int, timeout: float = 5.0) -> dict[str, object]:
    """A donor's numbers over its IST port (a STATUS_REQUEST, answered without starting a transfer)."""
    import json
    import socket

    from protocol import NEED_DATA, Connection, Role, Status, StatusRequest

    conn = Connection(Role.JOINER)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(conn.send(StatusRequest(b"{}")))
        while (event := conn.next_event()) is NEED_DATA:
            conn.receive_data(sock.recv(65536))
    if not isinstance(event, Status):
        raise OSError(f"{host}:{port} did not answer with its status ({type(event).__name__})")
    member: dict[str, object] = json.loads(event.payload)["member"]
    return member
