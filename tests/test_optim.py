"""Tests for wsjax.optim: LR phases by hand, weight-decay mask, clipping, per-segment updates."""

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
        assert lr_at(cfg, step) == pytest.approx(want, rel=1e-5, abs=1e-10), step
    assert expected[55] == pytest.approx(5.5e-4)  # the midpoint of the cosine is the mean


def test_cosine_with_alpha_and_decay_steps():
    phase = LRPhase("cosine", initial_learning_rate=2.0, alpha=0.1, decay_steps=20)
    cfg = opt((phase,))
    for t in (0, 7, 10, 20, 40):
        want = 2.0 * ((1 - 0.1) * 0.5 * (1 + math.cos(math.pi * min(t, 20) / 20)) + 0.1)
        assert lr_at(cfg, t) == pytest.approx(want, rel=1e-6), t
    assert lr_at(cfg, 10) == pytest.approx(1.1, rel=1e-6)


@pytest.mark.parametrize("staircase", [False, True])
def test_exponential(staircase):
    phase = LRPhase(
        "exponential", initial_learning_rate=1.0, decay_steps=4, decay_rate=0.5, staircase=staircase
    )
    cfg = opt((phase,))
    for t in (0, 1, 3, 4, 6, 8, 13):
        p = t // 4 if staircase else t / 4
        assert lr_at(cfg, t) == pytest.approx(0.5**p, rel=1e-6), t


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
    np.testing.assert_allclose(got, want, rtol=1e-5)


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
        np.testing.assert_allclose(u["w"], -step / 10.0, rtol=1e-6)


# ---------------------------------------------------------------- weight decay


def tree(seed: int = 0) -> dict:
    ks = iter(jax.random.split(jax.random.key(seed), 16))

    def r(*shape):
        return jax.random.normal(next(ks), shape, jnp.float32)

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
def test_zero_gradient_decays_only_kernels_and_embeddings(kind):
    cfg = opt(0.1, optimizer_type=kind, weight_decay_rate=0.5)
    tx, params = make_optimizer(cfg), tree()
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    new = flat(optax.apply_updates(params, updates))
    old = flat(params)
    for key in old:
        if key not in DECAYED:
            np.testing.assert_array_equal(new[key], old[key], err_msg=key)
        elif kind == "adam":  # L2 through Adam: the first step moves each weight lr towards 0
            np.testing.assert_allclose(new[key], old[key] - 0.1 * np.sign(old[key]), atol=1e-5)
        else:  # decoupled (adamw) and sgd L2: p * (1 - lr * wd) exactly
            np.testing.assert_allclose(new[key], old[key] * (1 - 0.1 * 0.5), rtol=1e-6)


# ---------------------------------------------------------------- adam variants


def test_adamw_matches_hand_computation():
    cfg = opt(0.01, beta1=0.9, beta2=0.95, epsilon=1e-8, weight_decay_rate=0.1)
    tx, p = make_optimizer(cfg), {"kernel": jnp.array([1.0, -2.0])}
    state, w, m, v = tx.init(p), np.array([1.0, -2.0]), 0.0, 0.0
    for t, g in enumerate([np.array([0.5, 1.0]), np.array([-1.0, 2.0])], start=1):
        u, state = tx.update({"kernel": jnp.asarray(g, jnp.float32)}, state, p)
        p = optax.apply_updates(p, u)
        m, v = 0.9 * m + 0.1 * g, 0.95 * v + 0.05 * g * g
        mhat, vhat = m / (1 - 0.9**t), v / (1 - 0.95**t)
        w = w - 0.01 * (mhat / (np.sqrt(vhat) + 1e-8) + 0.1 * w)
        np.testing.assert_allclose(p["kernel"], w, rtol=1e-5)


def test_adam_without_bias_correction():
    cfg = opt(0.01, beta1=0.9, beta2=0.999, epsilon=1e-8, use_bias_correction=False)
    tx, p = make_optimizer(cfg), {"b": jnp.array([3.0])}
    state, w, m, v = tx.init(p), 3.0, 0.0, 0.0
    for g in (2.0, -1.0, 0.5):
        u, state = tx.update({"b": jnp.array([g])}, state, p)
        p = optax.apply_updates(p, u)
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        w = w - 0.01 * m / (math.sqrt(v) + 1e-8)
        np.testing.assert_allclose(p["b"], [w], rtol=1e-5)
    assert int(state[0].count) == 3
    # The first step differs from bias-corrected Adam (which moves by exactly lr):
    first, _ = tx.update({"b": jnp.array([2.0])}, tx.init(p), p)
    assert float(first["b"][0]) == pytest.approx(-0.01 * 0.1 / math.sqrt(0.001), rel=1e-5)


def test_sgd_momentum_by_hand():
    cfg = opt(0.1, optimizer_type="sgd", momentum=0.9)
    tx, p = make_optimizer(cfg), {"w": jnp.array([1.0])}
    state, w, buf = tx.init(p), 1.0, 0.0
    for g in (1.0, 1.0, -2.0):
        u, state = tx.update({"w": jnp.array([g])}, state, p)
        p = optax.apply_updates(p, u)
        buf = 0.9 * buf + g
        w -= 0.1 * buf
        np.testing.assert_allclose(p["w"], [w], rtol=1e-6)


# ---------------------------------------------------------------- clipping


def test_clip_factor_values():
    assert float(clip_factor(5.0, 1.0)) == pytest.approx(0.2)
    assert float(clip_factor(0.5, 1.0)) == 1.0
    assert float(clip_factor(1.0, 1.0)) == 1.0  # strict <, as optax: max/g = 1 anyway
    assert float(clip_factor(0.0, 1.0)) == 1.0
    assert float(clip_factor(100.0, None)) == 1.0


@pytest.mark.parametrize("scale", [0.01, 10.0])
def test_clipping_matches_optax(scale):
    grads = jax.tree.map(lambda x: x * scale, tree(1))
    tx = make_optimizer_with_clipping(opt(1.0, optimizer_type="sgd", max_gradient_norm=1.0))
    ours, _ = tx.update(grads, tx.init(grads))
    ref, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    ours_flat = flat(ours)  # sgd lr 1: update = -clipped gradient
    for k, v in flat(ref).items():
        np.testing.assert_allclose(-ours_flat[k], v, rtol=1e-6, err_msg=k)
    norm = float(optax.global_norm(ref))
    assert norm == pytest.approx(min(1.0, float(optax.global_norm(grads))), rel=1e-6)


def test_engine_path_equals_clipped_optimizer():
    """Per-segment sq norms -> clip_factor -> per-segment update == the resident chain."""
    cfg = opt(1e-2, weight_decay_rate=0.1, max_gradient_norm=0.5)
    params = tree(2)
    ref_tx, seg_tx = make_optimizer_with_clipping(cfg), make_optimizer(cfg)
    ref_state = ref_tx.init(params)
    seg_states = {k: seg_tx.init({k: v}) for k, v in params.items()}
    ref_p, seg_p = params, dict(params)
    for step in range(3):
        grads = jax.tree.map(lambda x, s=step + 3.0: x * s, tree(10 + step))
        u, ref_state = ref_tx.update(grads, ref_state, ref_p)
        ref_p = optax.apply_updates(ref_p, u)
        norm = global_norm_from_sq([sq_norm({k: g}) for k, g in grads.items()])
        assert float(norm) == pytest.approx(float(optax.global_norm(grads)), rel=1e-6)
        factor = clip_factor(norm, cfg.max_gradient_norm)
        assert float(factor) < 1.0
        for k in params:
            g = apply_clip_factor({k: grads[k]}, factor)
            u, seg_states[k] = seg_tx.update(g, seg_states[k], {k: seg_p[k]})
            seg_p[k] = optax.apply_updates({k: seg_p[k]}, u)[k]
    for k, v in flat(ref_p).items():
        np.testing.assert_allclose(flat(seg_p)[k], v, rtol=1e-5, atol=1e-7, err_msg=k)


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
