"""Memory of the streaming engine, measured: what JAX really holds (``jax.live_arrays()``, by
memory kind) and the process's RSS (/proc/self/status), never the engine's own ledger.

- Host memory stays flat over many steps with activation offload, at prefetch depths 1-4.
- The plan never under-estimates what is really allocated, at several depths, with and without
  offload and recompute; and what is really allocated is at least what the step must hold at
  one moment by the plan's own terms (``held_at_once``), so no large term is counted twice over.
- Offload really moves the kept block inputs to host memory (the ``pinned_host`` kind).
- A run that cannot fit is refused by the plan before anything is allocated (GPT-J 6B shapes).

Peaks are sampled by ``_common.LivePeak`` whenever the engine touches its ledger (fetch issued,
weights released, executable dispatched, kept values stored): the hooks only say when to look.
"""

from __future__ import annotations

import gc
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from tests.helpers import REPO
from wsjax.config import config_from_dict
from wsjax.engine import StreamingEngine, make_plan
from wsjax.engine.plan import PROCESS_OVERHEAD
from wsjax.errors import PlanError
from wsjax.models import get_model
from wsjax.optim import make_optimizer

sys.path.insert(0, str(REPO / "benchmarks"))
import _common as C  # noqa: E402

GiB = 1024**3
B, T = 8, 16


def engine_config(tiny_config, *, layers=3, hidden=64, depth=1, offload=False, recompute=True):
    streaming = {
        "prefetch_depth": depth,
        "activation_offload": offload,
        "recompute": recompute,
        "micro_batch_size": 4,
    }
    return tiny_config(
        "gptj",
        layers=layers,
        hidden=hidden,
        optimizer={"max_gradient_norm": 1.0},
        streaming=streaming,
    )


def measured_steps(cfg, batches):
    """(engine, probe, live bytes held before the engine existed) after stepping ``batches``."""
    gc.collect()  # arrays of earlier tests' engines go now, not in the middle of this one
    before = sum(C.live_bytes_by_kind().values())
    engine = StreamingEngine(get_model(cfg.model), cfg)
    probe = C.LivePeak(engine)
    for batch in batches:
        engine.train_step(batch)
        probe.sample()
    return engine, probe, before


def allocatable(plan) -> int:
    """What the plan says JAX will hold: every term but the process itself, the executables'
    scratch (XLA temporaries are not live arrays) and the loader's numpy batches."""
    not_arrays = ("process_overhead", "input_batches")
    host = sum(v for k, v in plan.host.items() if k not in not_arrays)
    return host + plan.device_total - plan.device["executable_temp"]


def held_at_once(plan) -> int:
    """The least the step must hold at one moment, from the plan's own terms: the host state
    (fp32 master, optimizer state, stream copy) all the time, plus the larger of every segment's
    gradient (all on the host at the end of the backward, until the global norm is known) and
    every layer's kept block input or VJP residuals (all alive at the end of the forward, on the
    device or, offloaded, on the host). The real peak is at least this, with no margin to tune;
    a plan that counted one of these terms twice over, or kept values no layer keeps, puts this
    above the real peak. (The plan's other terms are transient: weights in flight, activations,
    accumulators and update scratch need not all peak at the same moment.)"""
    persistent = sum(plan.host[k] for k in ("master_fp32", "optimizer_state", "stream_copy"))
    kept = plan.host.get("offloaded_activations", plan.device["kept_activations"])
    return persistent + max(plan.host["gradients"], kept)


# ---- host memory flat over many steps ----------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_offload_host_memory_flat_over_55_steps(tiny_config, make_batches, depth):
    """activation_offload at prefetch depth 1..4: after 55 steps the process holds exactly the
    live arrays it held after 5 (a step left alive would keep its gradients, batch and
    offloaded inputs: 1.7 MB each here), and its RSS grew by less than 16 MiB (50 stale steps
    would be ~85 MB)."""
    cfg = engine_config(tiny_config, hidden=128, depth=depth, offload=True)
    batches = make_batches(4, seed=5)
    engine = StreamingEngine(get_model(cfg.model), cfg)
    live, rss = [], []
    for step in range(55):
        engine.train_step(batches[step % 4])
        if step + 1 in (5, 55):
            live.append(sum(C.live_bytes_by_kind().values()))
            rss.append(C.rss_bytes("VmRSS"))
    grads = 4 * engine.model.num_params()
    assert grads > 1.5e6  # the size of one stale step's gradients, the leak's unit
    assert live[1] == live[0], (live, grads)
    assert rss[1] - rss[0] < 16 * 2**20, (rss, grads)


# ---- the plan against what is really allocated ------------------------------------------

# (prefetch depth, offload, recompute): four depths, each knob both ways
SETTINGS = [(1, False, True), (2, True, True), (3, True, False), (4, False, False)]


@pytest.mark.parametrize(("depth", "offload", "recompute"), SETTINGS)
def test_plan_bounds_live_arrays(tiny_config, make_batches, depth, offload, recompute):
    cfg = engine_config(tiny_config, depth=depth, offload=offload, recompute=recompute)
    engine, probe, before = measured_steps(cfg, make_batches(2, seed=4))
    plan = make_plan(
        engine.model,
        cfg,
        engine.optimizer,
        batch_size=B,
        seq=T,
        n_micro=cfg.micro_batches(B),
    )
    real = probe.peak_total - before
    assert real <= allocatable(plan), (real, allocatable(plan), probe.peak_by_kind)
    assert real >= held_at_once(plan), (real, held_at_once(plan), probe.peak_by_kind)


def test_process_overhead_term_holds_a_bare_jax_process():
    """The plan's process term on the CPU bounds the peak RSS of Python + JAX with its backend
    up, before any model state (gpu_check --smoke then checks a whole run's VmHWM <= plan)."""
    code = "import jax; jax.devices(); print(open('/proc/self/status').read())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    hwm = int(re.search(r"VmHWM:\s+(\d+)", out).group(1)) * 1024
    assert 0 < hwm < PROCESS_OVERHEAD["cpu"], hwm


# ---- offload moves the kept inputs to host memory ---------------------------------------


def test_offload_moves_kept_inputs_to_host_memory(tiny_config, make_batches):
    """Between 2 and 8 layers the pinned_host bytes at the end of the forward (its peak while
    the forward runs, when every kept input lives) grow by the host state of 6 more blocks
    (master, optimizer state and stream copy live in pinned_host) and, with offload only, by
    their kept inputs: 6 x B x T x D x 4 bytes (fp32), counted by hand. The same depths with
    offload off and on isolate the inputs: the difference of the two growths is the kept
    inputs, whatever else the host state holds. (The step's overall pinned_host peak comes
    later, in the update, where the held gradients outweigh this tiny model's inputs.)"""
    batches = make_batches(1, seed=6)
    growth = {}
    for offload in (False, True):
        peak = {}
        for layers in (2, 8):
            cfg = engine_config(tiny_config, layers=layers, offload=offload)
            engine, probe, _ = measured_steps(cfg, batches)
            peak[layers] = probe.forward_kind_peaks.get("pinned_host", 0)
            del engine, probe
        growth[offload] = peak[8] - peak[2]
    kept = (8 - 2) * B * T * 64 * 4
    assert growth[False] > 0  # more layers, more host state in pinned_host
    assert abs((growth[True] - growth[False]) / kept - 1) <= 0.05, (growth, kept)


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
    assert "train_input.batch_size" in msg and "micro_batch_size" in msg
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


def test_plan_counts_kept_residuals_without_recompute(tiny_config, make_batches):
    """recompute: false keeps each block's VJP residuals: per added layer the plan's
    kept_activations grow by several block inputs, the live arrays' peak grows by no more than
    the plan's total, and at each depth it holds at least the residuals the plan counts (with
    the host state, ``held_at_once``): the residuals are really kept, not only planned."""
    grow = {}
    for layers in (2, 8):
        cfg = engine_config(tiny_config, layers=layers, recompute=False)
        engine, probe, before = measured_steps(cfg, make_batches(1, seed=2))
        plan = make_plan(engine.model, cfg, engine.optimizer, batch_size=B, seq=T, n_micro=2)
        grow[layers] = (probe.peak_total - before, allocatable(plan), plan.device)
        assert held_at_once(plan) <= grow[layers][0] <= allocatable(plan), (layers, grow[layers])
        del engine, probe
    act = B * T * 64 * 4  # one fp32 block input
    kept_growth = grow[8][2]["kept_activations"] - grow[2][2]["kept_activations"]
    assert kept_growth > 4 * (8 - 2) * act
    real_growth, plan_growth = grow[8][0] - grow[2][0], grow[8][1] - grow[2][1]
    assert 0 < real_growth <= plan_growth, (real_growth, plan_growth)
