"""Tests for wsjax.optim: LR phases by hand, weight-decay mask, clipping, per-segment updates.

Tolerances, from the arithmetic (no machine's measurement):

- The LR schedules compute in fp32 by design (``wsjax.optim._f32``): unit roundoff
  U32 = 2^-24 = 6.0e-8. A value is at most 8 fp32 roundings (the constants' conversion, the
  step's division, 1 +- x, the products and the sum), each relative to a term no larger than the
  phase's largest rate, plus one transcendental (cos, or pow as exp(y log x)) that XLA's CPU
  kernels compute within a few ulps, carrying its argument's 2-3 roundings times |x cos'(x)| <=
  pi or |y log x| <= 4 here. SCHED_RTOL = 16 U32 = 9.5e-7 of the largest rate (the hand values
  are float64); measured: at most 4.3 U32.
- The optimizer steps are checked in float64 (``x64``: float64 params and gradients, so optax
  computes in float64): u = 2^-53 = 1.1e-16, about 30 operations a step on O(1) values, 4 steps
  at most; Adam's bias correction 1 - beta^t cancels, amplifying the 1-ulp rounding of beta^t in
  either implementation by beta^t / (1 - beta^t) <= 999 (beta 0.999, t 1): <= 2e3 u = 2.2e-13.
  OPT_RTOL = 1e-12 (relative; absolute where a value may cross zero: of the terms' size).
  A real bug (a bias correction missing, decay on a bias, a wrong clip factor) moves >= 1e-3.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from wsjax.config import LRPhase, OptimizerConfig
from wsjax.optim import (
    apply_clip_factor,
    clip_factor,
    global_norm_from_sq,
    learning_rate_schedule,
    make_optimizer,
    make_optimizer_with_clipping,
    sq_norm,
    weight_decay_mask,
)

U32 = 2.0**-24
SCHED_RTOL = 16 * U32  # fp32 schedules: see the module docstring
OPT_RTOL = 1e-12  # float64 optimizer steps: see the module docstring


def opt(lr, **kw) -> OptimizerConfig:
    return OptimizerConfig(optimizer_type=kw.pop("optimizer_type", "adamw"), learning_rate=lr, **kw)


def lr_at(cfg: OptimizerConfig, step: int) -> float:
    return float(learning_rate_schedule(cfg)(jnp.asarray(step, jnp.int32)))


# ---------------------------------------------------------------- schedules


def test_constant_float():
    assert lr_at(opt(3e-4), 0) == pytest.approx(3e-4) and lr_at(opt(3e-4), 10**6) == pytest.approx(
        3e-4
    )


def test_linear_then_cosine_decay():
    cfg = opt(
        (
            LRPhase("linear", steps=10, initial_learning_rate=0.0, end_learning_rate=1e-3),
            LRPhase("cosinedecay", steps=90, initial_learning_rate=1e-3, end_learning_rate=1e-4),
        )
    )

    def cosine(t):  # Cerebras CosineDecay by hand
        return 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * min(t, 90) / 90))

    expected = {
        0: 0.0,
        5: 5e-4,
        9: 9e-4,
        10: cosine(0),
        55: cosine(45),
        99: cosine(89),
        100: 1e-4,
        500: 1e-4,
    }
    for step, want in expected.items():
        assert lr_at(cfg, step) == pytest.approx(want, rel=0, abs=SCHED_RTOL * 1e-3), step
    assert expected[55] == pytest.approx(5.5e-4)  # the midpoint of the cosine is the mean


def test_cosine_with_alpha_and_decay_steps():
    phase = LRPhase("cosine", initial_learning_rate=2.0, alpha=0.1, decay_steps=20)
    cfg = opt((phase,))
    for t in (0, 7, 10, 20, 40):
        want = 2.0 * ((1 - 0.1) * 0.5 * (1 + math.cos(math.pi * min(t, 20) / 20)) + 0.1)
        assert lr_at(cfg, t) == pytest.approx(want, rel=0, abs=SCHED_RTOL * 2.0), t
    assert lr_at(cfg, 10) == pytest.approx(1.1, rel=0, abs=SCHED_RTOL * 2.0)


@pytest.mark.parametrize("staircase", [False, True])
def test_exponential(staircase):
    phase = LRPhase(
        "exponential", initial_learning_rate=1.0, decay_steps=4, decay_rate=0.5, staircase=staircase
    )
    cfg = opt((phase,))
    for t in (0, 1, 3, 4, 6, 8, 13):
        p = t // 4 if staircase else t / 4
        assert lr_at(cfg, t) == pytest.approx(0.5**p, rel=0, abs=SCHED_RTOL), t


def test_three_phases_and_boundaries():
    cfg = opt(
        (
            LRPhase("linear", steps=4, initial_learning_rate=1.0, end_learning_rate=2.0),
            LRPhase("constant", steps=3, learning_rate=0.7),
            LRPhase("exponential", initial_learning_rate=0.5, decay_steps=2, decay_rate=0.1),
        )
    )
    want = [1.0, 1.25, 1.5, 1.75, 0.7, 0.7, 0.7] + [0.5 * 0.1 ** (t / 2) for t in range(4)]
    got = [lr_at(cfg, t) for t in range(len(want))]
    np.testing.assert_allclose(got, want, rtol=0, atol=SCHED_RTOL * 2.0)


def test_last_linear_phase_holds_its_end_value():
    cfg = opt((LRPhase("linear", steps=10, initial_learning_rate=1.0, end_learning_rate=0.0),))
    assert lr_at(cfg, 5) == pytest.approx(0.5) and lr_at(cfg, 50) == 0.0


def test_schedule_is_the_lr_the_optimizer_applies():
    cfg = opt(
        (LRPhase("linear", steps=10, initial_learning_rate=0.0, end_learning_rate=1.0),),
        optimizer_type="sgd",
    )
    tx, p = make_optimizer(cfg), {"w": jnp.ones(3)}
    state = tx.init(p)
    for step in range(3):
        u, state = tx.update({"w": jnp.ones(3)}, state, p)
        np.testing.assert_allclose(u["w"], -step / 10.0, rtol=0, atol=SCHED_RTOL)


# ---------------------------------------------------------------- weight decay


def tree(seed: int = 0, dtype=np.float32) -> dict:
    """Random leaves named like a model's; ``dtype`` float64 needs jax_enable_x64 (``x64``)."""
    ks = iter(jax.random.split(jax.random.key(seed), 16))

    def r(*shape):
        return jnp.asarray(jax.random.normal(next(ks), shape, jnp.float32), dtype)

    return {
        "embed": {"wte": r(11, 4), "wpe": r(8, 4)},
        "blocks": {
            "ln_1": {"scale": r(2, 4), "bias": r(2, 4)},
            "attn": {"q_proj": {"kernel": r(2, 4, 4)}},
            "mlp": {"fc_in": {"kernel": r(2, 4, 6), "bias": r(2, 6)}},
        },
        "head": {
            "ln_f": {"scale": r(4), "bias": r(4)},
            "lm_head": {"kernel": r(4, 11), "bias": r(11)},
        },
    }


def flat(t) -> dict:
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(t)}


DECAYED = {
    "['embed']['wte']",
    "['embed']['wpe']",
    "['blocks']['attn']['q_proj']['kernel']",
    "['blocks']['mlp']['fc_in']['kernel']",
    "['head']['lm_head']['kernel']",
}


def test_mask_is_by_leaf_name():
    mask = flat(weight_decay_mask(tree()))
    assert {k for k, v in mask.items() if v} == DECAYED
    assert weight_decay_mask({"blocks": {"mlp": {"fc_in": {"kernel": 1, "bias": 2}}}}) == {
        "blocks": {"mlp": {"fc_in": {"kernel": True, "bias": False}}}
    }


@pytest.mark.parametrize("kind", ["adamw", "adam", "sgd"])
def test_zero_gradient_decays_only_kernels_and_embeddings(kind, x64):
    cfg = opt(0.1, optimizer_type=kind, weight_decay_rate=0.5)
    with x64():
        tx, params = make_optimizer(cfg), tree(dtype=np.float64)
        updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
        new = flat(jax.tree.map(np.asarray, optax.apply_updates(params, updates)))
    old = flat(jax.tree.map(np.asarray, params))
    for key in old:
        p = old[key]
        assert new[key].dtype == np.float64
        if key not in DECAYED:
            np.testing.assert_array_equal(new[key], p, err_msg=key)
        elif kind == "adam":  # L2 through Adam: the first step moves each weight ~lr towards 0
            g = 0.5 * p  # the decay term is the gradient; step 1: m_hat = g, v_hat = g^2
            want = p - 0.1 * g / (np.abs(g) + cfg.epsilon)
            err = np.abs(new[key] - want) / (np.abs(p) + 0.1)  # relative to the terms' size
            assert err.max() <= OPT_RTOL, (key, err.max())
        else:  # decoupled (adamw) and sgd L2: p * (1 - lr * wd)
            np.testing.assert_allclose(new[key], p * (1 - 0.1 * 0.5), rtol=OPT_RTOL)


# ---------------------------------------------------------------- adam variants


def f64(*values) -> jax.Array:
    """A float64 array (inside ``x64``)."""
    return jnp.asarray(values, jnp.float64)


def test_adamw_matches_hand_computation(x64):
    cfg = opt(0.01, beta1=0.9, beta2=0.95, epsilon=1e-8, weight_decay_rate=0.1)
    with x64():
        tx, p = make_optimizer(cfg), {"kernel": f64(1.0, -2.0)}
        state, w, m, v = tx.init(p), np.array([1.0, -2.0]), 0.0, 0.0
        for t, g in enumerate([np.array([0.5, 1.0]), np.array([-1.0, 2.0])], start=1):
            u, state = tx.update({"kernel": f64(*g)}, state, p)
            p = optax.apply_updates(p, u)
            m, v = 0.9 * m + 0.1 * g, 0.95 * v + 0.05 * g * g
            mhat, vhat = m / (1 - 0.9**t), v / (1 - 0.95**t)
            w = w - 0.01 * (mhat / (np.sqrt(vhat) + 1e-8) + 0.1 * w)
            assert p["kernel"].dtype == jnp.float64
            np.testing.assert_allclose(p["kernel"], w, rtol=OPT_RTOL)


def test_adam_without_bias_correction(x64):
    cfg = opt(0.01, beta1=0.9, beta2=0.999, epsilon=1e-8, use_bias_correction=False)
    with x64():
        tx, p = make_optimizer(cfg), {"b": f64(3.0)}
        state, w, m, v = tx.init(p), 3.0, 0.0, 0.0
        for g in (2.0, -1.0, 0.5):
            u, state = tx.update({"b": f64(g)}, state, p)
            p = optax.apply_updates(p, u)
            m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
            w = w - 0.01 * m / (math.sqrt(v) + 1e-8)
            np.testing.assert_allclose(p["b"], [w], rtol=OPT_RTOL)
        assert int(state[0].count) == 3
        # The first step differs from bias-corrected Adam (which moves by exactly lr):
        first, _ = tx.update({"b": f64(2.0)}, tx.init(p), p)
    want = -0.01 * 0.1 * 2.0 / (math.sqrt(0.001 * 4.0) + 1e-8)
    assert float(first["b"][0]) == pytest.approx(want, rel=OPT_RTOL)


def test_sgd_momentum_by_hand(x64):
    cfg = opt(0.1, optimizer_type="sgd", momentum=0.9)
    with x64():
        tx, p = make_optimizer(cfg), {"w": f64(1.0)}
        state, w, buf = tx.init(p), 1.0, 0.0
        for g in (1.0, 1.0, -2.0):
            u, state = tx.update({"w": f64(g)}, state, p)
            p = optax.apply_updates(p, u)
            buf = 0.9 * buf + g
            w -= 0.1 * buf
            np.testing.assert_allclose(p["w"], [w], rtol=OPT_RTOL)


# ---------------------------------------------------------------- clipping


def test_clip_factor_values():
    assert float(clip_factor(5.0, 1.0)) == pytest.approx(0.2)
    assert float(clip_factor(0.5, 1.0)) == 1.0
    assert float(clip_factor(1.0, 1.0)) == 1.0  # strict <, as optax: max/g = 1 anyway
    assert float(clip_factor(0.0, 1.0)) == 1.0
    assert float(clip_factor(100.0, None)) == 1.0


@pytest.mark.parametrize("scale", [0.01, 10.0])
def test_clipping_matches_optax(scale, x64):
    with x64():
        grads = jax.tree.map(lambda x: x * scale, tree(1, np.float64))
        tx = make_optimizer_with_clipping(opt(1.0, optimizer_type="sgd", max_gradient_norm=1.0))
        ours, _ = tx.update(grads, tx.init(grads))
        ref, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
        norm, grad_norm = float(optax.global_norm(ref)), float(optax.global_norm(grads))
    ours_flat = flat(ours)  # sgd lr 1: update = -clipped gradient
    for k, v in flat(ref).items():
        assert v.dtype == jnp.float64
        np.testing.assert_allclose(-ours_flat[k], v, rtol=OPT_RTOL, err_msg=k)
    assert norm == pytest.approx(min(1.0, grad_norm), rel=OPT_RTOL)


def test_engine_path_equals_clipped_optimizer(x64):
    """Per-segment sq norms -> clip_factor -> per-segment update == the resident chain."""
    with x64():
        _engine_path_equals_clipped_optimizer()


def _engine_path_equals_clipped_optimizer():
    cfg = opt(1e-2, weight_decay_rate=0.1, max_gradient_norm=0.5)
    params = tree(2, np.float64)
    ref_tx, seg_tx = make_optimizer_with_clipping(cfg), make_optimizer(cfg)
    ref_state = ref_tx.init(params)
    seg_states = {k: seg_tx.init({k: v}) for k, v in params.items()}
    ref_p, seg_p = params, dict(params)
    for step in range(3):
        grads = jax.tree.map(lambda x, s=step + 3.0: x * s, tree(10 + step, np.float64))
        u, ref_state = ref_tx.update(grads, ref_state, ref_p)
        ref_p = optax.apply_updates(ref_p, u)
        norm = global_norm_from_sq([sq_norm({k: g}) for k, g in grads.items()])
        assert float(norm) == pytest.approx(float(optax.global_norm(grads)), rel=OPT_RTOL)
        factor = clip_factor(norm, cfg.max_gradient_norm)
        assert float(factor) < 1.0
        for k in params:
            g = apply_clip_factor({k: grads[k]}, factor)
            u, seg_states[k] = seg_tx.update(g, seg_states[k], {k: seg_p[k]})
            seg_p[k] = optax.apply_updates({k: seg_p[k]}, u)[k]
    for k, v in flat(ref_p).items():  # O(1) params: the error is relative to that scale
        assert v.dtype == jnp.float64
        np.testing.assert_allclose(flat(seg_p)[k], v, rtol=OPT_RTOL, atol=OPT_RTOL, err_msg=k)


# ---------------------------------------------------------------- per-segment updates


@pytest.mark.parametrize("kind", ["adamw", "adam", "sgd"])
def test_whole_tree_update_equals_per_segment_updates(kind):
    phases = (
        LRPhase("linear", steps=2, initial_learning_rate=0.0, end_learning_rate=1e-2),
        LRPhase("cosinedecay", steps=5, initial_learning_rate=1e-2, end_learning_rate=1e-3),
    )
    cfg = opt(phases, optimizer_type=kind, weight_decay_rate=0.1, momentum=0.9)
    tx, params = make_optimizer(cfg), tree(3)
    halves = ({"embed": params["embed"]}, {"blocks": params["blocks"], "head": params["head"]})
    whole_state = tx.init(params)
    half_states = [tx.init(h) for h in halves]
    whole, parts = params, list(halves)
    for step in range(4):
        grads = tree(20 + step)
        u, whole_state = tx.update(grads, whole_state, whole)
        whole = optax.apply_updates(whole, u)
        for i, part in enumerate(parts):
            g = {k: grads[k] for k in part}
            u, half_states[i] = tx.update(g, half_states[i], part)
            parts[i] = optax.apply_updates(part, u)
    merged = {**parts[0], **parts[1]}
    for k, v in flat(whole).items():
        np.testing.assert_array_equal(flat(merged)[k], v, err_msg=k)
    # The state splits too: each leaf of a half's state equals the whole state's leaf.
    whole_state_leaves = flat(whole_state)
    for i, state in enumerate(half_states):
        for k, v in flat(state).items():
            np.testing.assert_array_equal(whole_state_leaves[k], v, err_msg=f"{i}{k}")
