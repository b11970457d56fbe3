"""`istd explain`: Galera's IST-or-SST decision with every number (seed 003's question)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner

from istd.cli import cli
from istd.donor import IstServer
from istd.explain import explain

from .test_donor_joiner import GAP, make_node

U = uuid.UUID("0ba80362-e6b2-11f1-a838-fff90686b220")


def test_measured_galera_sst_case() -> None:
    # galera-measured.md section 9: ist_seqno 308628, lowest cached 308598 (the joiner's own gcache),
    # conf_seqno 328683 -> safe_ist_seqno 308754 -> SST
    v = explain(joiner_uuid=U, joiner_seqno=308628, donor_uuid=U, donor_last=328683, donor_cached_downto=326564,
                joiner_cached_downto=308598)
    assert v.kind == "SST" and "may fallback to sst. ist_seqno [308628] < safe_ist_seqno [308754]" in v.rule


def test_measured_galera_ist_case() -> None:
    # section 6.4: ist_seqno 304195, lowest cached 1, conf_seqno 305215 -> safe_ist_seqno 2385 -> IST
    v = explain(joiner_uuid=U, joiner_seqno=304195, donor_uuid=U, donor_last=305215, donor_cached_downto=2,
                joiner_cached_downto=1)
    assert v.kind == "IST"
    assert "safe_ist_seqno = 1 + 2384 = 2385" in dict(v.lines)["safety gap"]


def test_smaller_gap_refused_while_larger_gap_accepted() -> None:
    # seed 003: the rule depends on the distance to the cache's lower edge, not on the gap's size
    near_edge = explain(joiner_uuid=U, joiner_seqno=1_050, donor_uuid=U, donor_last=100_000,
                        donor_cached_downto=1_000)
    far_from_edge = explain(joiner_uuid=U, joiner_seqno=3_000, donor_uuid=U, donor_last=200_000,
                            donor_cached_downto=1_000)
    assert (100_000 - 1_050) < (200_000 - 3_000)
    assert near_edge.kind == "SST" and far_from_edge.kind == "IST"


@pytest.mark.parametrize(
    ("kwargs", "kind", "words"),
    [
        ({"joiner_uuid": uuid.UUID(int=0), "joiner_seqno": -1}, "SST", "position is unknown"),
        ({"joiner_uuid": uuid.uuid4(), "joiner_seqno": 10}, "SST", "is not the donor's"),
        ({"joiner_seqno": 5000}, "impossible", "ahead of this donor"),
        ({"joiner_seqno": 1000}, "IST", "nothing is missing"),
        ({"joiner_seqno": 50, "donor_cached_downto": 100, "joiner_cached_downto": 1}, "SST",
         "IST first seqno 51 not found from cache"),
    ],
)
def test_rules(kwargs: dict, kind: str, words: str) -> None:
    args = {"joiner_uuid": U, "joiner_seqno": 500, "donor_uuid": U, "donor_last": 1000, "donor_cached_downto": 1,
            **kwargs}
    v = explain(**args)
    assert v.kind == kind and words in v.rule


def test_ist_only_skips_the_safety_gap_and_turns_sst_into_impossible() -> None:
    args = {"joiner_uuid": U, "joiner_seqno": 1_050, "donor_uuid": U, "donor_last": 100_000,
            "donor_cached_downto": 1_000}
    assert explain(**args).kind == "SST"
    assert explain(**args, ist_only=True).kind == "IST"
    gone = explain(**{**args, "donor_cached_downto": 2_000}, ist_only=True)
    assert gone.kind == "impossible" and "IST only" in gone.rule


def test_cli_offline() -> None:
    result = CliRunner().invoke(cli, ["explain", "--uuid", str(U), "--seqno", "308628", "--joiner-cached-downto",
                                      "308598", "--donor-uuid", str(U), "--donor-last", "328683",
                                      "--cached-downto", "326564"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("donor (given): SST")
    assert "safe_ist_seqno = 308598 + 156 = 308754" in result.output


async def test_cli_online_asks_the_donor(tmp_path: Path) -> None:
    node = make_node(tmp_path / "donor", "donor")
    node.open(bootstrap=True)
    try:
        from istd.writeset import synthetic

        await node.write([synthetic(s, 100) for s in range(1, GAP + 1)])
        from istd import grastate as gs

        joiner = tmp_path / "joiner"
        joiner.mkdir()
        gs.write(joiner, gs.SavedState(uuid=node.uuid, seqno=GAP - 10))
        server = IstServer(node)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve, "127.0.0.1", 0)
            result = await trio.to_thread.run_sync(
                lambda: CliRunner().invoke(cli, ["explain", "--datadir", str(joiner), "--donor", f"127.0.0.1:{port}"]))
            nursery.cancel_scope.cancel()
    finally:
        node.close()
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"donor 127.0.0.1:{port} (donor): IST")
    assert f"{node.uuid}:{GAP}, cached_downto 1" in result.output
