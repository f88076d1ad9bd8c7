"""The memory plan's disk tier terms (streaming.disk_path): host bytes with and without the tier,
disk bytes against the folder's free space, and the verdicts they give. Sizes by hand: fp32
master 4 bytes a parameter, AdamW's two moments 8, the window the largest segments' state.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import pytest

from tests.helpers import REPO
from wsjax.config import load_config
from wsjax.engine.disk import WINDOW_SEGMENTS
from wsjax.engine.plan import GiB, make_plan
from wsjax.errors import EXIT_NOT_FIT, PlanError
from wsjax.models import get_model
from wsjax.optim import make_optimizer


def plan_of(config, disk_path=None, **kw):
    config = dataclasses.replace(
        config, streaming=dataclasses.replace(config.streaming, disk_path=disk_path)
    )
    model = get_model(config.model)
    return model, make_plan(model, config, make_optimizer(config.optimizer), batch_size=8,
                            seq=16, n_micro=1, **kw)  # fmt: skip


def test_tier_moves_master_and_moments_to_disk(tiny_config):
    cfg = tiny_config("gptj", layers=10)
    model, ram = plan_of(cfg)
    _, tier = plan_of(cfg, "/tmp/somewhere")
    n = model.num_params()
    assert tier.disk["master_fp32"] == ram.host["master_fp32"] == 4 * n
    assert 8 * n <= tier.disk["optimizer_state"] == ram.host["optimizer_state"] <= 8 * n + 64
    assert "master_fp32" not in tier.host and "optimizer_state" not in tier.host
    # the window: the WINDOW_SEGMENTS largest segments (embed, head, blocks) at 12 B a param
    sizes = sorted(segment_params(model), reverse=True)[:WINDOW_SEGMENTS]
    window = tier.host["disk_window"]
    assert 12 * sum(sizes) <= window <= 12 * sum(sizes) + 64
    assert tier.host_without_tier == ram.host_total == ram.host_without_tier
    assert tier.host_total == tier.host_with_tier == ram.host_with_tier
    moved = tier.disk["master_fp32"] + tier.disk["optimizer_state"]
    assert ram.host_total - tier.host_total == moved - window
    assert 0 < tier.disk["alignment"] < 64 * 5 * (2 + 10) * 12  # < 64 B a leaf, few leaves
    assert ram.disk == {} and ram.disk_total == 0


def test_disk_gradients_move_the_held_gradients_too(tiny_config):
    """streaming.disk_gradients: the gradients term (4 B a parameter) leaves the host for the
    disk; the window grows by the largest segments' gradients."""
    cfg = tiny_config("gptj", layers=10)
    model, tier = plan_of(cfg, "/d")
    grads_cfg = dataclasses.replace(
        cfg, streaming=dataclasses.replace(cfg.streaming, disk_gradients=True)
    )
    _, both = plan_of(grads_cfg, "/d")
    n = model.num_params()
    assert both.disk["gradients"] == tier.host["gradients"] == 4 * n
    assert "gradients" not in both.host
    sizes = sorted(segment_params(model), reverse=True)[:WINDOW_SEGMENTS]
    assert both.host["disk_window"] - tier.host["disk_window"] == 4 * sum(sizes)
    assert tier.host_total - both.host_total == 4 * n - 4 * sum(sizes)


def test_disk_stream_moves_the_stream_copy_too(tiny_config):
    """streaming.disk_stream: the stream copy (2 B a parameter in bf16) leaves the host for the
    disk; the window grows by the largest segments' stream copies; the note says what moved."""
    cfg = tiny_config("gptj", layers=10)
    model, tier = plan_of(cfg, "/d")
    on = dataclasses.replace(cfg, streaming=dataclasses.replace(cfg.streaming, disk_stream=True))
    _, both = plan_of(on, "/d")
    n, dt = model.num_params(), np.dtype(model.compute_dtype).itemsize
    assert both.disk["stream_copy"] == tier.host["stream_copy"] == dt * n
    assert "stream_copy" not in both.host
    sizes = sorted(segment_params(model), reverse=True)[:WINDOW_SEGMENTS]
    assert both.host["disk_window"] - tier.host["disk_window"] == dt * sum(sizes)
    assert both.disk["alignment"] > tier.disk["alignment"]  # one more file's leaves
    assert "master, optimizer state, the stream copy in streaming.disk_path" in str(both.notes)
    assert "; gradients stay in RAM" in str(both.notes)


def segment_params(model) -> list[int]:
    """Parameters of each stored segment: embed, head, and each block."""
    shapes = model.param_shapes()
    count = lambda tree: sum(math.prod(a.shape) for a in jax.tree.leaves(tree))  # noqa: E731
    layer = count(shapes["blocks"]) // model.num_layers
    return [count(shapes["embed"]), count(shapes["head"]), *[layer] * model.num_layers]


def test_verdicts_name_the_tier_when_it_alone_fits(tiny_config):
    """A host budget between the two totals: without the tier the refusal names
    streaming.disk_path and the host it would then need; with it the plan fits, only with it;
    a disk with less free space than the tier is refused (exit 3)."""
    cfg = tiny_config("gptj", layers=10)
    _, probe = plan_of(cfg, platform="gpu")
    budget = (probe.host_with_tier + probe.host_without_tier) // 2
    _, ram = plan_of(cfg, platform="gpu", host_available=budget)
    with pytest.raises(PlanError) as e:
        ram.check()
    assert e.value.exit_code == EXIT_NOT_FIT
    assert "set streaming.disk_path: DIR" in str(e.value)
    assert f"needs {probe.host_with_tier / GiB:.2f} GiB" in str(e.value)
    _, tier = plan_of(cfg, "/d", platform="gpu", host_available=budget, disk_available=1 << 40)
    tier.check()
    assert tier.fits_only_with_tier() and not ram.fits_only_with_tier()
    assert "verdict: fits" in tier.summary() and "disk (streaming.disk_path)" in tier.summary()
    short = tier.disk_total - 1
    _, small = plan_of(cfg, "/d", platform="gpu", host_available=budget, disk_available=short)
    with pytest.raises(PlanError, match="GiB of disk space") as e:
        small.check()
    assert e.value.exit_code == EXIT_NOT_FIT and "streaming.disk_path" in str(e.value)


def test_llama3_8b_fits_80_gb_and_128_gib_with_the_tier():
    """configs/params_llama3_8b.yaml on one 80 GB GPU and a 128 GiB host: 151 GiB of host
    without the tier (refused), 87.7 GiB with streaming.disk_path (master 29.9 and moments
    59.8 GiB on disk); the device plan, 60.5 GiB, is the tier's business neither way."""
    cfg = load_config(REPO / "configs" / "params_llama3_8b.yaml")
    model = get_model(cfg.model)

    def plan(disk_path):
        c = dataclasses.replace(
            cfg, streaming=dataclasses.replace(cfg.streaming, disk_path=disk_path)
        )
        return make_plan(model, c, make_optimizer(cfg.optimizer), batch_size=8, seq=8192,
                         n_micro=cfg.train_micro_batches, platform="gpu",
                         host_available=128 * GiB, device_available=80 * GiB,
                         disk_available=100 * GiB)  # fmt: skip

    with pytest.raises(PlanError, match="set streaming.disk_path"):
        plan(None).check()
    fits = plan("/nvme/llama3-tier")
    fits.check()
    assert fits.host_total < 128 * GiB < fits.host_without_tier
    assert 87.6 * GiB < fits.host_total < 87.7 * GiB and fits.device_total < 80 * GiB
    assert 89 * GiB < fits.disk_total < 90 * GiB


def test_short_with_the_tier_names_the_keys_that_move_the_rest(tiny_config):
    """The tier on and the host still short: the refusal names streaming.disk_gradients and
    streaming.disk_stream for the two terms they move (without the tier it names neither)."""
    cfg = tiny_config("gptj", layers=10)
    for disk_path, named in (("/d", True), (None, False)):
        _, plan = plan_of(cfg, disk_path)
        plan.shared_memory = False  # the host alone
        plan.host_available = plan.host_total - 1
        with pytest.raises(PlanError) as e:
            plan.check()
        msg = str(e.value)
        assert ("set streaming.disk_gradients: true" in msg) is named, msg
        assert ("set streaming.disk_stream: true" in msg) is named, msg
