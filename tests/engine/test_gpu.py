"""On an accelerator (``pytest -m gpu``; benchmarks/gpu_check.py runs these): the engine against
the resident reference on the GPU, and where the engine keeps each tier of the host store.

They need a GPU and skip without one: CI has none; the GPU check is where they run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsjax.engine import StreamingEngine
from wsjax.models import get_model
from wsjax.reference import ResidentTrainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.devices()[0].platform == "cpu", reason="needs an accelerator"),
]
EPS32 = float(jnp.finfo(jnp.float32).eps)


def test_engine_matches_reference_on_gpu_fp32(tiny_config, make_batches):
    """The first step's loss and global gradient norm, engine (streamed, micro-batched) vs the
    resident step, both on the GPU in fp32 with full-precision matmuls (no TF32).

    Tolerance: both compute the same sums in a different order (per micro-batch and per
    segment vs whole-batch). fp32 summation of n terms errs by at most ~n * eps relative
    (worst case; ~sqrt(n) * eps typical); the longest reduction here is the loss over
    B x T = 128 tokens after a vocab-97 softmax and a width-64 layer stack, n <= 128 * 97,
    and the grad norm sums every parameter's square: n <= ~1e5. sqrt(1e5) * eps ~ 4e-5, with a
    factor 2.5 for the two independent orders: ~3e-5.
    """
    cfg = tiny_config("gptj", streaming={"micro_batch_size": 4})
    model = get_model(cfg.model)
    batch = make_batches(1, seed=3)[0]
    with jax.default_matmul_precision("highest"):
        params = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(0)))
        engine = StreamingEngine(model, cfg, params=jax.tree.map(np.array, params))
        got = engine.train_step(batch)
        ref = ResidentTrainer(model, cfg.optimizer, seed=cfg.runconfig.seed)
        state = ref.init_state(jax.tree.map(jnp.asarray, params))
        _, want = ref.train_step(state, batch)
    tol = 2.5 * np.sqrt(1e5) * EPS32  # ~3e-5 (see the docstring)
    assert got["train/loss"] == pytest.approx(float(want["loss"]), rel=tol)
    assert got["train/grad_norm"] == pytest.approx(float(want["grad_norm"]), rel=tol)


U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)


def test_bf16_engine_matches_resident_bf16_step(tiny_config, make_batches):
    """mixed precision (bf16 weights and matmuls, fp32 accumulation, softmax, loss): the first
    step's loss and gradient norm, engine (streamed, 2 micro-batches, cuDNN attention) vs the
    resident step on the same bf16 copy of the same fp32 master.

    Bound: both round the same fp32 accumulations to bf16 at each matmul output; a different
    summation order flips an output's bf16 rounding by one ulp (relative U_BF16) in a few
    elements, and the loss is a mean over 128 tokens of a smooth function of them, so its
    relative change is at most U_BF16 (the case where every element flipped the same way);
    the gradient norm, one more bf16 pass (the backward), 2 x U_BF16.
    """
    cfg = tiny_config("gptj", model={"mixed_precision": True}, streaming={"micro_batch_size": 4})
    model = get_model(cfg.model)
    batch = make_batches(1, seed=3)[0]
    params = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(0)))
    engine = StreamingEngine(model, cfg, params=jax.tree.map(np.array, params))
    got = engine.train_step(batch)
    ref = ResidentTrainer(model, cfg.optimizer, seed=cfg.runconfig.seed)
    _, want = ref.train_step(ref.init_state(jax.tree.map(jnp.asarray, params)), batch)
    assert got["train/loss"] == pytest.approx(float(want["loss"]), rel=U_BF16)
    assert got["train/grad_norm"] == pytest.approx(float(want["grad_norm"]), rel=2 * U_BF16)


def test_host_state_in_pinned_host_of_the_accelerator(tiny_config):
    """Tiers (DESIGN.md, "Where host state lives on a GPU"): fp32 master, Adam state and the
    bf16 stream copy all in the accelerator's pinned_host memory (DMA-able, nothing on JAX's CPU
    client), and a fetched segment in device memory."""
    cfg = tiny_config("gptj", model={"mixed_precision": True})
    engine = StreamingEngine(get_model(cfg.model), cfg)
    dev = jax.devices()[0]
    assert "pinned_host" in {m.kind for m in dev.addressable_memories()}
    for leaf in jax.tree.leaves(engine.store.stream["block/0"]):
        assert leaf.sharding.memory_kind == "pinned_host"
        assert leaf.dtype == jnp.bfloat16
        assert leaf.sharding.device_set == {dev}
    state = (engine.store.master["block/0"], engine.store.opt_state["block/0"])
    for leaf in jax.tree.leaves(state):
        assert leaf.sharding.memory_kind == "pinned_host" and leaf.sharding.device_set == {dev}
    assert {a.dtype for a in jax.tree.leaves(engine.store.master)} == {jnp.dtype(jnp.float32)}
    fetched = jax.device_put(engine.store.stream["block/0"], engine.replicated)
    for leaf in jax.tree.leaves(fetched):
        assert leaf.sharding.memory_kind == "device"


@pytest.mark.parametrize("placement", ["host", "device"])
def test_both_update_placements_train_in_place_on_gpu(tiny_config, make_batches, placement):
    """The host update (compute_on('device_host') on pinned_host operands) and the device update
    (state streamed in from pinned_host inside the executable) run on the GPU, equal each other
    to fp32 rounding, and leave every state leaf in pinned_host."""
    losses = {}
    for where in ("host", placement):
        cfg = tiny_config("gptj", streaming={"optimizer_placement": where})
        engine = StreamingEngine(get_model(cfg.model), cfg)
        losses[where] = [engine.train_step(b)["train/loss"] for b in make_batches(3, seed=7)]
        store = engine.store
        kinds = {a.sharding.memory_kind for a in jax.tree.leaves((store.master, store.opt_state))}
        assert kinds == {"pinned_host"}
    np.testing.assert_allclose(losses[placement], losses["host"], rtol=1e-5)
