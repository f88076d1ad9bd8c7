"""Memory of the streaming engine: device residency independent of depth, the memory plan's
terms, and a run that cannot fit refused by the plan before anything is allocated.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import pytest

from wsjax.config import config_from_dict
from wsjax.errors import PlanError
from wsjax.models import get_model
from wsjax.optim import make_optimizer
from wsjax.reference import ResidentTrainer
from wsjax.streaming import StreamingEngine, make_plan

GiB = 1024**3
B, T, D = 8, 16, 64
ACT = B * T * D * 4  # one fp32 (B, T, D) block input
SHALLOW, DEEP = 2, 16


class Depths:
    def __init__(self, tiny_config, make_batches):
        self.tiny_config = tiny_config
        self.batch = make_batches(1, seed=2)[0]

    @functools.cache  # noqa: B019 (one object per module-scoped fixture)
    def engine(self, layers: int, offload: bool):
        """An engine of ``layers`` blocks after one training step (peak tracked)."""
        cfg = self.tiny_config("gptj", layers=layers, streaming={"activation_offload": offload})
        engine = StreamingEngine(get_model(cfg.model), cfg)
        engine.train_step(self.batch)
        return engine

    def plan(self, layers: int, offload: bool):
        engine = self.engine(layers, offload)
        return make_plan(
            engine.model, engine.config, engine.optimizer, batch_size=B, seq=T, n_micro=1
        )

    @functools.cache  # noqa: B019 (one object per module-scoped fixture)
    def reference_bytes(self, layers: int) -> int:
        """Arguments + outputs + temporaries of the compiled resident train step."""
        model = get_model(self.tiny_config("gptj", layers=layers).model)
        ref = ResidentTrainer(model, self.tiny_config("gptj").optimizer)
        state = jax.eval_shape(ref.init_state, model.param_shapes())
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in self.batch.items()}
        mem = jax.jit(ref._train_step).lower(state, batch).compile().memory_analysis()
        return mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes


@pytest.fixture(scope="module")
def depths(tiny_config, make_batches):
    return Depths(tiny_config, make_batches)


def test_offload_peak_independent_of_depth(depths):
    """activation_offload: the device peak at 16 layers is within 10% of 2 layers."""
    shallow, deep = depths.engine(SHALLOW, True), depths.engine(DEEP, True)
    assert shallow.residency.peak > 0
    assert abs(deep.residency.peak / shallow.residency.peak - 1) <= 0.10, (
        shallow.residency.peak,
        deep.residency.peak,
    )
    # while the resident reference grows with depth (parameters + Adam moments + activations)
    assert depths.reference_bytes(DEEP) > 3 * depths.reference_bytes(SHALLOW)


def test_without_offload_only_kept_inputs_grow(depths):
    """No offload: the peak grows by exactly the kept block inputs, B x T x D x 4 per layer."""
    shallow, deep = depths.engine(SHALLOW, False), depths.engine(DEEP, False)
    growth = deep.residency.peak - shallow.residency.peak
    expected = (DEEP - SHALLOW) * ACT
    assert abs(growth / expected - 1) <= 0.03, (growth, expected)


@pytest.mark.parametrize("offload", [False, True])
def test_plan_shows_kept_activations(depths, offload):
    shallow, deep = depths.plan(SHALLOW, offload), depths.plan(DEEP, offload)
    if offload:  # a window of (prefetch_depth + 1) inputs on the device, the rest on the host
        assert shallow.device["kept_activations"] == deep.device["kept_activations"] == 2 * ACT
        assert deep.device_total == shallow.device_total
        assert deep.host["offloaded_activations"] == DEEP * ACT
    else:
        assert shallow.device["kept_activations"] == SHALLOW * ACT
        assert deep.device["kept_activations"] == DEEP * ACT
        assert deep.device_total - shallow.device_total == (DEEP - SHALLOW) * ACT


@pytest.mark.parametrize("offload", [False, True])
def test_executable_count_independent_of_depth(depths, offload):
    shallow, deep = depths.engine(SHALLOW, offload), depths.engine(DEEP, offload)
    assert shallow.num_executables == deep.num_executables == 8


# ---- a run that cannot fit --------------------------------------------------------------


@pytest.fixture(scope="module")
def gptj_6b(config_dict):
    """GPT-J 6B shapes (no weights: ``param_shapes`` allocates nothing)."""
    d = config_dict("gptj", layers=28, hidden=4096, seq=2048, batch=32)
    d["model"] |= {"num_heads": 16, "vocab_size": 50400, "filter_size": 16384, "rotary_dim": 64}
    d["model"]["max_position_embeddings"] = 2048
    d["optimizer"]["max_gradient_norm"] = 1.0
    cfg = config_from_dict(d)
    model = get_model(cfg.model)
    assert 6.0e9 < model.num_params() < 6.1e9
    return model, cfg


def _plan(model, cfg, **kw):
    return make_plan(model, cfg, make_optimizer(cfg.optimizer), batch_size=32, seq=2048, **kw)


def _short_by(message: str) -> float:
    m = re.search(r"short by ([0-9.]+) GiB", message)
    assert m, message
    return float(m.group(1))


KNOB = re.compile(r"activation_offload|micro_batch_size|prefetch_depth")


def test_plan_refuses_device_shortfall(gptj_6b):
    model, cfg = gptj_6b
    live = len(jax.live_arrays())
    plan = _plan(model, cfg, n_micro=1, platform="gpu", device_available=4 * GiB)
    with pytest.raises(PlanError) as err:
        plan.check()
    msg = str(err.value)
    assert "\n" not in msg and "device" in msg
    assert _short_by(msg) == pytest.approx((plan.device_total - 4 * GiB) / GiB, abs=0.006)
    assert KNOB.search(msg), msg
    # the two largest knob terms are named with their size: the attention scratch
    # (micro_batch_size) and the kept block inputs, 28 x 32 x 2048 x 4096 x 4 B = 28 GiB
    assert plan.device["kept_activations"] == 28 * GiB
    assert "activation_offload" in msg and "kept_activations 28.00 GiB" in msg
    assert "micro_batch_size" in msg
    assert len(jax.live_arrays()) == live  # nothing was allocated


def test_plan_refuses_host_shortfall(gptj_6b):
    model, cfg = gptj_6b
    plan = _plan(model, cfg, n_micro=1, platform="gpu", host_available=32 * GiB)
    assert plan.host["master_fp32"] == 4 * model.num_params()
    assert plan.host["optimizer_state"] >= 8 * model.num_params()
    with pytest.raises(PlanError) as err:
        plan.check()
    msg = str(err.value)
    assert "host" in msg
    assert _short_by(msg) == pytest.approx((plan.host_total - 32 * GiB) / GiB, abs=0.006)


def test_plan_refuses_cpu_shared_memory_shortfall(gptj_6b):
    """CPU backend: host and device are one memory, checked together; a knob is named."""
    model, cfg = gptj_6b
    plan = _plan(model, cfg, n_micro=1, platform="cpu", host_available=8 * GiB)
    with pytest.raises(PlanError) as err:
        plan.check()
    msg = str(err.value)
    need = plan.host_total + plan.device_total
    assert _short_by(msg) == pytest.approx((need - 8 * GiB) / GiB, abs=0.006)
    assert KNOB.search(msg), msg


def test_plan_that_fits_passes_and_engine_need_not_allocate(gptj_6b):
    model, cfg = gptj_6b
    _plan(model, cfg, n_micro=1, platform="gpu", host_available=1 << 50).check()
    engine = StreamingEngine(model, cfg, allocate=False)
    assert engine.store is None
    assert jnp.dtype(model.compute_dtype) == jnp.float32


def test_plan_counts_kept_residuals_without_recompute(depths):
    """recompute: false keeps each block's VJP residuals; the plan's kept_activations grow per
    layer by what the engine actually keeps (its tracked peak), several times the block input."""
    grow = {}
    for layers in (SHALLOW, DEEP):
        cfg = depths.tiny_config("gptj", layers=layers, streaming={"recompute": False})
        engine = StreamingEngine(get_model(cfg.model), cfg)
        engine.train_step(depths.batch)
        plan = make_plan(engine.model, cfg, engine.optimizer, batch_size=B, seq=T, n_micro=1)
        grow[layers] = (engine.residency.peak, plan.device["kept_activations"])
    engine_growth = grow[DEEP][0] - grow[SHALLOW][0]
    plan_growth = grow[DEEP][1] - grow[SHALLOW][1]
    assert plan_growth > 4 * (DEEP - SHALLOW) * ACT
    assert abs(engine_growth / plan_growth - 1) <= 0.03, (engine_growth, plan_growth)
