"""``streaming.optimizer_placement``: the update on the host (``compute_on('device_host')`` on
the pinned_host state) or on the device (master and moments streamed in from pinned_host and
back inside the update executable, the gradients never leaving the device) equals the resident
reference in float64, with clipping active, as tests/engine/test_exact.py checks the default
(same runs, same tolerance TOL64 and its derivation there). Also ``streaming.recompute_policy``:
exact in float64, and counted in the plan.
"""

from __future__ import annotations

import pytest

from tests.engine.test_exact import MAX_NORM, TOL64, Runs, check_against_reference
from wsjax.engine import make_plan
from wsjax.errors import ConfigError
from wsjax.models import get_model
from wsjax.optim import make_optimizer


@pytest.fixture(scope="module")
def runs(tiny_config, make_batches, x64):
    return Runs(tiny_config, make_batches, x64)


PLACEMENTS = ["host", "device"]


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("family", ["gptj", "gpt2"])
def test_update_placement_matches_reference(runs, rel_err, family, placement):
    """float64, 3 clipped steps: losses, norms, params and Adam mu / nu equal the reference
    whichever side updates; the engine really ran the update where the key says."""
    knob = (("streaming", "optimizer_placement", placement),)
    engine, em = runs.engine(family, "f64", knob)
    _, state, rm = runs.reference(family, "f64")
    assert all(m["train/grad_norm"] > MAX_NORM for m in em)  # clipping active
    assert engine.placement.optimizer_on_host == (placement == "host")
    assert engine.placement.host_compute == (placement == "host")
    names = {r.name for r in engine.cache.records}
    assert ("update/block@device" in names) == (placement == "device"), names
    check_against_reference(rel_err, engine, em, state, rm, TOL64)


def test_device_update_with_micro_batches(runs, rel_err):
    """float64: the device update after 4 accumulated micro-batches == the reference."""
    knob = (
        ("streaming", "optimizer_placement", "device"),
        ("streaming", "micro_batch_size", 2),
    )
    engine, em = runs.engine("gptj", "f64", knob)
    _, state, rm = runs.reference("gptj", "f64")
    check_against_reference(rel_err, engine, em, state, rm, TOL64)


@pytest.mark.parametrize("policy", ["dots_saveable", "dots_with_no_batch_dims_saveable"])
def test_recompute_policy_matches_reference(runs, rel_err, policy):
    """``streaming.recompute_policy`` (with recompute: false) keeps only the residuals the policy
    saves and recomputes the rest in the backward: float64 still equals the reference."""
    knob = (("streaming", "recompute", False), ("streaming", "recompute_policy", policy))
    engine, em = runs.engine("gptj", "f64", knob)
    _, state, rm = runs.reference("gptj", "f64")
    check_against_reference(rel_err, engine, em, state, rm, TOL64)


def test_recompute_policy_counted_in_the_plan(tiny_config):
    """The plan's kept activations: full recompute (the block input) < a saving policy (the
    matmul outputs) < keeping every residual; an unknown policy is refused, naming the key."""
    kept = {}
    for name, streaming in {
        "full": {"recompute": True},
        "dots": {"recompute": False, "recompute_policy": "dots_saveable"},
        "all": {"recompute": False, "recompute_policy": "none"},
    }.items():
        cfg = tiny_config("gptj", streaming=streaming)
        model = get_model(cfg.model)
        plan = make_plan(model, cfg, make_optimizer(cfg.optimizer), batch_size=8, seq=16, n_micro=1)
        kept[name] = plan.device["kept_activations"]
    assert kept["full"] < kept["dots"] < kept["all"], kept
    with pytest.raises(ConfigError, match="streaming.recompute_policy"):
        tiny_config("gptj", streaming={"recompute_policy": "most"})
