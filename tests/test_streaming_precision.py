"""Streaming engine vs the resident reference under dropout and under bf16 mixed precision.

Errors are norm-wise relative per leaf (``||a - b|| / ||b||``), as in test_streaming_exact.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsjax.models import get_model
from wsjax.reference import ResidentTrainer, step_key
from wsjax.streaming import StreamingEngine

DROPOUT = {
    "embedding_dropout_rate": 0.1,
    "attention_dropout_rate": 0.1,
    "residual_dropout_rate": 0.1,
}
# Mixed precision, 3 steps: measured loss 2.7e-8, params 5.0e-8 (engine vs resident bf16 step).
MP_LOSS_TOL = 1.5e-7
MP_PARAM_TOL = 2.5e-7
SGD_LR = 1e4  # grads read back as (p0 - p1) / lr: a large lr keeps p0 - p1 free of cancellation


def engine_grads(model, cfg, params, batch, step):
    """Gradients of the engine's step ``step`` from an SGD (lr SGD_LR, no momentum) update."""
    engine = StreamingEngine(model, cfg, params=jax.tree.map(np.array, params), step=step)
    metrics = engine.train_step(batch)
    grads = jax.tree.map(
        lambda a, b: (np.float64(a) - np.float64(b)) / SGD_LR, params, engine.params_tree()
    )
    return metrics["train/loss"], grads


@pytest.fixture(scope="module")
def dropout_setup(tiny_config, make_batches):
    sgd = {"optimizer_type": "sgd", "learning_rate": SGD_LR, "weight_decay_rate": 0.0}
    cfg = tiny_config("gptj", model=DROPOUT, optimizer=sgd)
    model = get_model(cfg.model)
    params = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(0)))
    ref = ResidentTrainer(model, cfg.optimizer, seed=cfg.runconfig.seed)
    batch = make_batches(1, seed=5)[0]
    out = {"ref_nodrop": float(ref.grad_fn(jax.tree.map(jnp.asarray, params), batch, None)[0])}
    for step in (0, 1):
        rng = jax.random.fold_in(step_key(cfg.runconfig.seed, step), 0)
        loss, grads = ref.grad_fn(jax.tree.map(jnp.asarray, params), batch, rng)
        out[step] = {
            "engine": engine_grads(model, cfg, params, batch, step),
            "ref": (float(loss), grads),
        }
    return out


@pytest.mark.parametrize("step", [0, 1])
def test_dropout_gradients_match_reference(dropout_setup, rel_err, step):
    """Same rng scheme (fold in step, micro-batch 0, segment): same masks, same gradients."""
    (e_loss, e_grads), (r_loss, r_grads) = dropout_setup[step]["engine"], dropout_setup[step]["ref"]
    assert abs(e_loss - r_loss) <= 1e-6 * abs(r_loss), (e_loss, r_loss)
    key, err = rel_err(e_grads, r_grads)
    # without dropout the same readout agrees to ~5e-7 (float summation order only)
    assert err <= 1e-5, f"{key}: gradient norm-wise relative error {err:.3g}"


def test_dropout_masks_differ_between_steps(dropout_setup, rel_err):
    """Dropout is on (loss differs from the no-dropout loss) and each step draws new masks."""
    nodrop = dropout_setup["ref_nodrop"]
    (l0, g0), (l1, g1) = dropout_setup[0]["engine"], dropout_setup[1]["engine"]
    assert abs(l0 - nodrop) > 1e-5 * nodrop and abs(l1 - nodrop) > 1e-5 * nodrop
    assert abs(l0 - l1) > 1e-5 * nodrop  # float noise is ~1e-7
    assert rel_err(g0, g1)[1] > 1e-2


def test_mixed_precision_matches_resident_bf16(tiny_config, make_batches, rel_err):
    """bf16 streaming + fp32 master == the resident bf16-compute / fp32-master reference.

    Both cast the fp32 master to bf16 for compute and keep layer norm, softmax, loss and the
    update in fp32, so only summation order differs; bf16 rounding amplifies it.
    """
    cfg = tiny_config("gptj", model={"mixed_precision": True}, optimizer={"max_gradient_norm": 0.5})
    model = get_model(cfg.model)
    assert model.compute_dtype == jnp.bfloat16
    params = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(0)))
    batches = make_batches(3, seed=0)
    engine = StreamingEngine(model, cfg, params=jax.tree.map(np.array, params))
    ref = ResidentTrainer(model, cfg.optimizer, seed=cfg.runconfig.seed)
    state = ref.init_state(jax.tree.map(jnp.asarray, params))
    e_loss, r_loss = [], []
    for b in batches:
        e_loss.append(engine.train_step(b)["train/loss"])
        state, m = ref.train_step(state, b)
        r_loss.append(float(m["loss"]))
    assert all(jax.tree.leaves(jax.tree.map(lambda a: a.dtype == np.float32, engine.params_tree())))
    loss_err = rel_err(np.asarray(e_loss), np.asarray(r_loss))[1]
    key, param_err = rel_err(engine.params_tree(), state.params)
    print(f"mixed precision: loss err {loss_err:.3g}, params err {param_err:.3g} ({key})")
    assert loss_err <= MP_LOSS_TOL
    assert param_err <= MP_PARAM_TOL, key
