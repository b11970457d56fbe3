from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from istd.cli import cli
from istd.config import OPTIONS, parse_bool, parse_duration, parse_provider_options, parse_size, resolve
from istd.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [("128M", 128 << 20), ("1G", 1 << 30), ("512K", 512 << 10), ("4096", 4096), ("2t", 2 << 40)],
)
def test_sizes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "12Q", "-1M", "1.5M", "1MB"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("PT5S", 5.0), ("PT0.5S", 0.5), ("PT1M", 60.0), ("P1D", 86400.0), ("PT1H2M3S", 3723.0), ("7", 7.0)],
)
def test_durations(text: str, expected: float) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["PT", "P", "5 seconds", "PTXS", "-3"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_bools() -> None:
    assert parse_bool("YES") and parse_bool("on") and not parse_bool("0")
    with pytest.raises(ValueError):
        parse_bool("maybe")


def test_provider_options_syntax_and_precedence() -> None:
    assert parse_provider_options(" gcache.size = 256M ;gcache.recover=no; ") == {
        "gcache.size": "256M", "gcache.recover": "no"}
    opts = resolve(("env", "gcache.size=64M; gcs.fc_limit=100"), ("flag", "gcache.size=256M"))
    assert opts["gcache.size"] == 256 << 20 and opts.sources["gcache.size"] == "flag"
    assert opts["gcs.fc_limit"] == 100 and opts.sources["gcs.fc_limit"] == "env"
    assert opts["gcache.recover"] is True and opts.sources["gcache.recover"] == "default"
    assert opts["ist.idle_timeout"] == 10.0


@pytest.mark.parametrize(
    ("text", "message"),
    [("gcache.sise=1M", "unknown provider option 'gcache.sise'"),
     ("gcache.size=big", "bad value for gcache.size"),
     ("gcache.size", "is not key=value"),
     ("ist.idle_timeout=soon", "bad value for ist.idle_timeout")],
)
def test_bad_provider_options(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_provider_options(text)


def test_every_default_parses() -> None:
    for opt in OPTIONS.values():
        opt.parse(opt.default)


def test_config_show_cli_flag_and_env() -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["config", "show", "--json", "--provider-options", "gcache.size=1G"],
                           env={"ISTD_PROVIDER_OPTIONS": "gcs.fc_limit=50"})
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["gcache.size"]["value"] == "1G" and shown["gcache.size"]["default"] == "128M"
    assert "ring buffer size" in shown["gcache.size"]["meaning"]
    table = runner.invoke(cli, ["config", "show"]).output
    assert "ist.recv_queue_size" in table and "memory does not grow with the gap" in table
    # the flag replaces the environment variable as a whole (click's precedence)
    assert shown["gcs.fc_limit"]["source"] == "default"
    result = runner.invoke(cli, ["config", "show", "--json"], env={"ISTD_PROVIDER_OPTIONS": "gcs.fc_limit=50"})
    assert json.loads(result.output)["gcs.fc_limit"]["value"] == "50"
    bad = runner.invoke(cli, ["config", "show", "--provider-options", "nope=1"])
    assert bad.exit_code == 2 and "unknown provider option 'nope'" in bad.output
