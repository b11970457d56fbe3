"""The cluster's IST-or-SST decision (Cluster.ist_impossible): Galera's joiner and group rules, numbers only."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from structlog.testing import capture_logs

from istd.cluster import Cluster, Member
from istd.grastate import ZERO_UUID
from istd.joiner import JoinFailed

U = uuid.UUID("0ba80362-e6b2-11f1-a838-fff90686b220")


def member(name: str, cached: int, last: int, *, writer: bool = False, state: str = "Synced") -> Member:
    return Member(name, f"{name}:4567", f"{name}:4568", "", state, last, cached, str(U), writer, 0.0, f"{name}:4444")


def view(members: list[Member], *, node_uuid: uuid.UUID = U, ist_only: bool = False) -> Any:
    """Just what ist_impossible reads of a Cluster."""
    me = SimpleNamespace(name="joiner", uuid=node_uuid)
    ns = SimpleNamespace(node=me, ist_only=ist_only, donor_names=[], _sst_donor=None)
    ns.live_members = lambda: members
    ns.writer_member = lambda: next(m for m in members if m.writer)
    ns.select_donor = lambda local: Cluster.select_donor(ns, local)
    return ns


def decide(ns: Any, local: int) -> str | None:
    result: str | None = Cluster.ist_impossible(ns, local)
    return result


def test_unknown_position_or_other_history_is_sst() -> None:
    members = [member("n1", 1, 1000, writer=True)]
    assert "is unknown" in (decide(view(members, node_uuid=ZERO_UUID), -1) or "")
    other = uuid.UUID("11111111-2222-3333-4444-555555555555")
    assert "does not match group state UUID" in (decide(view(members, node_uuid=other), 500) or "")


def test_gap_out_of_every_cache_is_sst() -> None:
    members = [member("n1", 900, 1000, writer=True), member("n2", 950, 1000)]
    assert "IST first seqno 500 not found from cache" in (decide(view(members), 499) or "")


def test_safety_gap_as_galera_and_pxc_log_it() -> None:
    # lowest cached 1, group at 128_001: safety gap (128_000 >> 7) = 1000, safe_ist_seqno = 1001
    members = [member("n1", 1, 128_001, writer=True), member("n2", 1, 128_001)]
    with capture_logs() as logs:
        why = decide(view(members), 1000)
    assert why is not None and "ist_seqno 1000 < safe_ist_seqno 1001" in why
    assert "may fallback to sst. ist_seqno [1000] < safe_ist_seqno [1001]" in [e["event"] for e in logs]
    assert decide(view(members), 1001) is None  # at the safe seqno: IST
    # seed 003: the smaller gap refused while the larger was accepted: what counts is the distance from the
    # lowest cached seqno of any member, not the gap
    assert decide(view(members), 127_000) is None


def test_ist_only_skips_the_safety_gap_as_pxc_does() -> None:
    members = [member("n1", 1, 128_001, writer=True), member("n2", 1, 128_001)]
    assert decide(view(members, ist_only=True), 1000) is None


def test_caught_up_node_needs_nothing() -> None:
    assert decide(view([member("n1", 1, 1000, writer=True)]), 1000) is None


def test_no_sst_donor_among_unsynced_members() -> None:
    ns = view([member("n1", 1, 10, writer=True, state="Donor/Desynced")])
    with pytest.raises(JoinFailed, match="no synced member serves SST"):
        Cluster.select_sst_donor(ns)
