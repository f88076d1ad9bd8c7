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


def test_stream_copy_in_pinned_host_and_master_on_cpu(tiny_config):
    """Tiers: fp32 master on the host CPU device, the bf16 stream copy in the accelerator's
    pinned_host memory (DMA-able), and a fetched segment in device memory."""
    cfg = tiny_config("gptj", model={"mixed_precision": True})
    engine = StreamingEngine(get_model(cfg.model), cfg)
    dev = jax.devices()[0]
    assert "pinned_host" in {m.kind for m in dev.addressable_memories()}
    for leaf in jax.tree.leaves(engine.store.stream["block/0"]):
        assert leaf.sharding.memory_kind == "pinned_host"
        assert leaf.dtype == jnp.bfloat16
        assert {d.platform for d in leaf.sharding.device_set} == {dev.platform}
    for leaf in jax.tree.leaves(engine.store.master["block/0"]):
        assert {d.platform for d in leaf.sharding.device_set} == {"cpu"}
        assert leaf.dtype == jnp.float32
    fetched = jax.device_put(engine.store.stream["block/0"], engine.replicated)
    for leaf in jax.tree.leaves(fetched):
        assert leaf.sharding.memory_kind == "device"
