"""Streaming engine vs the resident reference under dropout and under bf16 mixed precision.

Errors are norm-wise relative per leaf (``||a - b|| / ||b||``), as in test_streaming_exact.py.
Dropout is compared in float64 (same masks, same maths: agreement to float64 rounding, on any
CPU). Mixed precision cannot be: there both steps round activations to bf16, and which
elements round differently depends on summation order, so the engine is checked against the
float64 truth to be as accurate as the resident bf16 step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsjax.engine import StreamingEngine
from wsjax.models import get_model
from wsjax.reference import ResidentTrainer, step_key

DROPOUT = {
    "embedding_dropout_rate": 0.1,
    "attention_dropout_rate": 0.1,
    "residual_dropout_rate": 0.1,
}
TOL64 = 1e-10  # float64: ~1e-15 rounding, read back through (p0 - p1) / lr (see SGD_LR)
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
def dropout_setup(tiny_config, make_batches, x64):
    """float64 engine and reference gradients of one batch under dropout, at steps 0 and 1."""
    sgd = {"optimizer_type": "sgd", "learning_rate": SGD_LR, "weight_decay_rate": 0.0}
    cfg = tiny_config("gptj", model=DROPOUT, optimizer=sgd)
    model = get_model(cfg.model)
    model.compute_dtype = jnp.float64  # the segment protocol's compute dtype
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), model.init(jax.random.PRNGKey(0)))
    batch = make_batches(1, seed=5)[0]
    with x64():
        ref = ResidentTrainer(model, cfg.optimizer, seed=cfg.runconfig.seed)
        on_device = jax.tree.map(jnp.asarray, params)
        out = {"ref_nodrop": float(ref.grad_fn(on_device, batch, None)[0])}
        for step in (0, 1):
            rng = jax.random.fold_in(step_key(cfg.runconfig.seed, step), 0)
            loss, grads = ref.grad_fn(on_device, batch, rng)
            out[step] = {
                "engine": engine_grads(model, cfg, params, batch, step),
                "ref": (float(loss), jax.tree.map(np.asarray, grads)),
            }
    return out


@pytest.mark.parametrize("step", [0, 1])
def test_dropout_gradients_match_reference(dropout_setup, rel_err, step):
    """Same rng scheme (fold in step, micro-batch 0, segment): same masks, same gradients."""
    (e_loss, e_grads), (r_loss, r_grads) = dropout_setup[step]["engine"], dropout_setup[step]["ref"]
    assert abs(e_loss - r_loss) <= TOL64 * abs(r_loss), (e_loss, r_loss)
    key, err = rel_err(e_grads, r_grads)
    assert err <= TOL64, f"{key}: gradient norm-wise relative error {err:.3g}"


def test_dropout_masks_differ_between_steps(dropout_setup, rel_err):
    """Dropout is on (loss differs from the no-dropout loss) and each step draws new masks."""
    nodrop = dropout_setup["ref_nodrop"]
    (l0, g0), (l1, g1) = dropout_setup[0]["engine"], dropout_setup[1]["engine"]
    assert abs(l0 - nodrop) > 1e-5 * nodrop and abs(l1 - nodrop) > 1e-5 * nodrop
    assert abs(l0 - l1) > 1e-5 * nodrop  # float noise is ~1e-7
    assert rel_err(g0, g1)[1] > 1e-2


# bf16 mixed precision: both steps cast the same fp32 master to bf16 and keep layer norm,
# softmax, loss and update in fp32; they differ only where summation order flips a bf16
# rounding. Against the float64 truth, each step's error is dominated by bf16 rounding (unit
# roundoff 2^-9) of the same casts; the engine may be at most MP_FACTOR x less accurate than the
# resident bf16 step, or below MP_FLOOR = u32 * sqrt(N tokens) * 16 (the fp32 parts' rounding,
# as in test_streaming_exact.py) on a leaf the resident step happens to round almost exactly.
MP_FACTOR = 2.0
MP_FLOOR = 16 * float(np.finfo(np.float32).eps) / 2 * np.sqrt(8 * 16)


def test_mixed_precision_as_accurate_as_resident_bf16(tiny_config, make_batches, rel_err, x64):
    """bf16 streaming + fp32 master vs the resident bf16-compute / fp32-master reference, both
    against the same model in float64: losses and every parameter leaf."""
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

    truth_model = get_model(cfg.model)
    truth_model.compute_dtype = jnp.float64
    with x64():
        truth = ResidentTrainer(truth_model, cfg.optimizer, seed=cfg.runconfig.seed)
        t_state = truth.init_state(jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params))
        t_loss = []
        for b in batches:
            t_state, m = truth.train_step(t_state, b)
            t_loss.append(float(m["loss"]))
        t_params = jax.tree.map(np.asarray, t_state.params)

    pairs = [("loss", np.asarray(e_loss), np.asarray(r_loss), np.asarray(t_loss))]
    flat = jax.tree_util.tree_flatten_with_path(engine.params_tree())[0]
    for (path, got), ref_leaf, true_leaf in zip(
        flat, jax.tree.leaves(state.params), jax.tree.leaves(t_params), strict=True
    ):
        pairs.append((jax.tree_util.keystr(path), got, ref_leaf, true_leaf))
    for what, got, ref_val, true_val in pairs:
        engine_err, ref_err = rel_err(got, true_val)[1], rel_err(ref_val, true_val)[1]
        bound = MP_FACTOR * ref_err + MP_FLOOR
        assert engine_err <= bound, f"{what}: {engine_err:.3g} > {bound:.3g} ({ref_err:.3g})"
