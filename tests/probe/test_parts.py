"""Pure parts of the probe: its config reader, derived config, plans, stats, usage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from probe import cli
from probe.checks import Planner, percentile
from probe.config import ConfigError, load
from probe.local import derive_config


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert [percentile(values, f) for f in (0.5, 0.9, 0.99, 1.0)] == [50.0, 90.0, 99.0, 100.0]
    assert percentile([3.0], 0.5) == 3.0
    assert percentile([], 0.9) == 0.0


def test_plans_mix_sizes_with_one_big_frame() -> None:
    planner = Planner(seed=1)
    plans = [planner.plan(8, 1 << 20, big=i == 0) for i in range(50)]
    ids = [stream_id for stream_id, _ in plans]
    assert len(set(ids)) == len(ids)
    for i, (_, sizes) in enumerate(plans):
        assert len(sizes) == 8 and sizes[0] == 1
        assert (1 << 20 in sizes) is (i == 0)
        assert all(1 <= s <= 64 * 1024 for s in sizes if s != 1 << 20)
    assert len({s for _, sizes in plans for s in sizes}) > 100
    assert Planner(seed=1).plan(8, 1 << 20, big=True) == plans[0]


def test_derived_config_keeps_every_other_key() -> None:
    raw: dict[str, Any] = {
        "Apps": [{"Name": "a", "Ports": [1, 2], "IdleTimeout": 5, "AllowFrom": ["10.0.0.0/8"],
                  "Targets": ["x:1", {"Address": "[::1]:2", "Weight": 4}]}],
        "Extra": True}
    derived = derive_config(raw, [["127.0.0.1:50", "127.0.0.1:51"]], {1: 60, 2: 61})
    assert derived == {"Apps": [{"Name": "a", "Ports": [60, 61], "IdleTimeout": 5,
                                 "AllowFrom": ["10.0.0.0/8"],
                                 "Targets": ["127.0.0.1:50",
                                             {"Address": "127.0.0.1:51", "Weight": 4}]}],
                       "Extra": True}
    assert raw["Apps"][0]["Ports"] == [1, 2]   # the original is left alone


@pytest.mark.parametrize("text, message", [
    ("{", "invalid JSON"),
    ('{"Apps": []}', 'expected {"Apps": [...]} with at least one app'),
    ('{"Apps": [{"Ports": [1], "Targets": ["a:1"]}]}', "Apps[0]: needs a non-empty Name"),
    ('{"Apps": [{"Name": "x", "Ports": [true], "Targets": ["a:1"]}]}',
     'Apps[0] "x": Ports must be'),
    ('{"Apps": [{"Name": "x", "Ports": [1], "Targets": [{"Weight": 1}]}]}',
     'Apps[0] "x": Targets must be'),
])
def test_config_errors_are_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert message in str(caught.value) and str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_shipped_config_reads() -> None:
    apps, raw = load(Path(__file__).resolve().parents[2] / "config.json")
    assert [a.name for a in apps] == [a["Name"] for a in raw["Apps"]]
    assert "bad.target.for.testing:6003" in apps[1].targets


@pytest.mark.parametrize("args, message", [
    (["--down", "x:1"], "--down needs --local"),
    (["--local", "--host", "h"], "--host does not apply"),
    (["--local", "--down", "nowhere:1"], "--down nowhere:1 is not a target"),
    (["--connections", "0"], "out of range"),
    (["--timeout", "soon"], "is not a number"),
])
def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                             args: list[str], message: str) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"Apps": [{"Name": "a", "Ports": [1], "Targets": ["t:1"]}]}))
    with pytest.raises(SystemExit) as caught:
        cli.main(["--config", str(config), *args])
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_an_unreadable_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--config", str(tmp_path / "missing.json")]) == 2
    assert capsys.readouterr().err.startswith("probe: error: ")
