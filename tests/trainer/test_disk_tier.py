"""Runs with the disk tier (--disk_path / streaming.disk_path): the flag sets the key, a run
trains bitwise like the RAM run and resumes from its checkpoint to the uninterrupted losses,
--validate_only says when a run fits only with the tier, and a folder holding another run's
tier is refused in one line (exit 2) without touching it."""

from __future__ import annotations

import argparse
import json

import pytest

from tests.helpers import small_config
from wsjax.engine.disk import MANIFEST, DiskTierError, run_owner
from wsjax.errors import EXIT_USER, PlanError
from wsjax.train import run
from wsjax.trainer.options import add_arguments, options_from_args

GiB = 1024**3


def test_flag_sets_the_streaming_key(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    options = options_from_args(parser.parse_args(["--disk_path", str(tmp_path / "tier")]))
    config = options.with_runconfig(small_config())
    assert config.streaming.disk_path == str(tmp_path / "tier")
    assert options_from_args(parser.parse_args([])).with_runconfig(small_config()).streaming == (
        small_config().streaming
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A RAM run of 6 steps; a disk-tier run of 4 steps, then resumed to 6."""
    root = tmp_path_factory.mktemp("disk_runs")
    ram = run(small_config(), "train", root / "ram", max_steps=6)
    tier = root / "tier"
    first = run(small_config(), "train", root / "md", max_steps=4, disk_path=tier)
    second = run(small_config(), "train", root / "md", max_steps=6, disk_path=tier)
    return root, dict(ram.losses), dict(first.losses), dict(second.losses)


def test_trains_and_resumes_bitwise_like_the_ram_run(runs):
    root, ram, first, second = runs
    assert first == {s: ram[s] for s in range(1, 5)}
    assert second == {s: ram[s] for s in (5, 6)}  # resumed from model-ckpt-4
    manifest = json.loads((root / "tier" / MANIFEST).read_text())
    assert manifest["owner"] == run_owner(root / "md")
    assert len(list((root / "tier").glob("*.bin"))) == len(manifest["segments"]) == 4


def test_another_runs_folder_is_refused_untouched(runs):
    root, *_ = runs
    before = {p.name: p.read_bytes() for p in (root / "tier").iterdir()}
    with pytest.raises(DiskTierError) as e:
        run(small_config(), "train", root / "other", max_steps=1, disk_path=root / "tier")
    assert e.value.exit_code == EXIT_USER and "\n" not in str(e.value)
    assert f"{root / 'tier'}: holds the disk tier of another run" in str(e.value)
    assert {p.name: p.read_bytes() for p in (root / "tier").iterdir()} == before


def test_validate_only_says_it_fits_only_with_the_tier(tmp_path):
    """A host budget between the plan's totals with and without the tier: refused (exit 3)
    naming streaming.disk_path without it; with --disk_path, it fits "only with the disk
    tier"; the tier folder is not created by validation. 12 layers: the tier's window (the
    largest segments' state) is then less than the whole state."""
    deep = "model.num_hidden_layers=12"
    run(small_config(deep, "streaming.host_memory_gb=1000"), "train", tmp_path / "p",
        validate_only=True)  # fmt: skip
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert plan["host_with_tier"] < plan["host_without_tier"]
    gb = (plan["host_with_tier"] + plan["host_without_tier"]) / 2 / GiB
    cfg = small_config(deep, f"streaming.host_memory_gb={gb!r}")
    with pytest.raises(PlanError, match="set streaming.disk_path: DIR"):
        run(cfg, "train", tmp_path / "a", validate_only=True)
    tier = tmp_path / "tier"
    result = run(cfg, "train", tmp_path / "b", validate_only=True, disk_path=tier)
    assert result.message.endswith("the plan fits only with the disk tier (streaming.disk_path)")
    plan = json.loads((tmp_path / "b" / "plan.json").read_text())
    assert plan["disk"]["master_fp32"] > 0 and plan["disk_available"] > 0
    assert not tier.exists()
