"""Model tests: pinned parameter counts, rotary by hand, causality, dropout, mixed precision."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsjax.config import config_from_dict, load_config
from wsjax.models import get_model
from wsjax.models.layers import apply_rotary

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
OPTIMIZER = {"optimizer_type": "adamw", "learning_rate": 1e-3}
VOCAB, SEQ = 64, 10


def _model_cfg(family: str, **overrides):
    model = {
        "model_family": family,
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "num_heads": 4,
        "num_hidden_layers": 2,
        "filter_size": 64,
        "max_position_embeddings": 16,
        **({"rotary_dim": 4} if family == "gptj" else {}),
        **overrides,
    }
    return config_from_dict({"model": model, "optimizer": OPTIMIZER}).model


def _tokens(seed: int = 0) -> jnp.ndarray:
    return jax.random.randint(jax.random.key(seed), (2, SEQ), 0, VOCAB)


def _random_params(model, seed: int = 0) -> dict:
    """Init, then perturb every leaf so layer norms and biases are not the trivial 1 / 0."""
    params = model.init(jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [a + 0.1 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, leaves)


# ---- parameter counts (no allocation) ----------------------------------------------------------
PINNED = [
    ("params_gptj_6B.yaml", "gptj", 6_050_882_784),
    ("params_gpt2_small.yaml", "gpt2", 124_439_808),
    ("params_gpt3_xl.yaml", "gpt2", 1_315_723_264),
]


@pytest.mark.parametrize("fname,family,count", PINNED, ids=[p[0] for p in PINNED])
def test_param_count_of_shipped_configs(fname, family, count):
    cfg = load_config(CONFIGS / fname).model
    assert cfg.family == family
    model = get_model(cfg)
    assert model.num_params() == count
    shapes = model.param_shapes()
    assert all(isinstance(s, jax.ShapeDtypeStruct) for s in jax.tree.leaves(shapes))


def test_param_count_by_formula():
    """The same pins from the architecture definitions, independent of the shipped YAMLs."""
    gptj = dict(vocab_size=50400, hidden_size=4096, num_heads=16, num_hidden_layers=28)
    gptj.update(filter_size=16384, max_position_embeddings=2048, rotary_dim=64)
    gpt2 = dict(vocab_size=50257, hidden_size=768, num_heads=12, num_hidden_layers=12)
    gpt2.update(filter_size=3072, max_position_embeddings=1024)
    xl = dict(vocab_size=50257, hidden_size=2048, num_heads=16, num_hidden_layers=24)
    xl.update(filter_size=8192, max_position_embeddings=2048, use_bias_in_output=False)
    for family, d, count in (
        ("gptj", gptj, 6_050_882_784),
        ("gpt2", gpt2, 124_439_808),
        ("gpt2", xl, 1_315_723_264),
    ):
        model = get_model(_model_cfg(family, **d))
        assert model.num_params() == count
        if family == "gpt2":
            v, p, h = d["vocab_size"], d["max_position_embeddings"], d["hidden_size"]
            f, n = d["filter_size"], d["num_hidden_layers"]
            per_layer = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)
            assert count == v * h + p * h + n * per_layer + 2 * h


# ---- rotary ---------------------------------------------------------------------------------
def test_rotary_by_hand():
    # (1, T, 1, K): rotary on the first 2 of 4 dims; the pair (1, 0) at position t -> (cos t, sin t)
    x = jnp.tile(jnp.array([1.0, 0.0, 0.5, -2.0]), (1, 5, 1, 1))
    y = apply_rotary(x, rotary_dim=2)
    t = np.arange(5)
    np.testing.assert_allclose(y[0, :, 0, 0], np.cos(t), atol=1e-6)
    np.testing.assert_allclose(y[0, :, 0, 1], np.sin(t), atol=1e-6)
    np.testing.assert_array_equal(y[0, :, 0, 2:], x[0, :, 0, 2:])  # dims past rotary_dim: as is
    np.testing.assert_array_equal(y[:, 0], x[:, 0])  # position 0 is the identity


def test_rotary_relative_position():
    """q(m) . k(n) depends only on m - n (same q and k vectors at every position)."""
    k_dim, seq = 8, 12
    q_vec, k_vec = jax.random.normal(jax.random.key(0), (2, k_dim))
    q = apply_rotary(jnp.tile(q_vec, (1, seq, 1, 1)), rotary_dim=k_dim)[0, :, 0]  # (T, K)
    k = apply_rotary(jnp.tile(k_vec, (1, seq, 1, 1)), rotary_dim=k_dim)[0, :, 0]
    dots = np.asarray(q @ k.T)  # (T, T): [m, n]
    for offset in (-3, 0, 2, 5):
        diag = np.diagonal(dots, offset=offset)
        np.testing.assert_allclose(diag, diag[0], rtol=1e-5, atol=1e-5)
    assert not np.allclose(dots[0, 0], dots[0, 3])  # and it does depend on the offset
    np.testing.assert_allclose(np.linalg.norm(q, axis=-1), np.linalg.norm(q_vec), rtol=1e-6)


# ---- causality, dropout, precision ----------------------------------------------------------
@pytest.mark.parametrize("family", ["gptj", "gpt2"])
def test_causal(family):
    model = get_model(_model_cfg(family))
    params = _random_params(model)
    tokens = _tokens()
    t = 4
    changed = tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] + 7) % VOCAB)
    logits = jax.jit(model.logits)
    a, b = logits(params, tokens), logits(params, changed)
    np.testing.assert_array_equal(a[:, : t + 1], b[:, : t + 1])
    assert np.abs(a[:, t + 1 :] - b[:, t + 1 :]).max() > 1e-3


@pytest.mark.parametrize("family", ["gptj", "gpt2"])
def test_dropout(family):
    rates = dict(embedding_dropout_rate=0.1, attention_dropout_rate=0.1, residual_dropout_rate=0.1)
    model = get_model(_model_cfg(family, **rates))
    params = _random_params(model)
    tokens = _tokens()
    logits = jax.jit(model.logits)
    ev1, ev2 = logits(params, tokens), logits(params, tokens)
    np.testing.assert_array_equal(ev1, ev2)  # eval (rng None) is deterministic
    tr1 = logits(params, tokens, rng=jax.random.key(1))
    tr2 = logits(params, tokens, rng=jax.random.key(1))
    tr3 = logits(params, tokens, rng=jax.random.key(2))
    np.testing.assert_array_equal(tr1, tr2)  # same rng, same masks
    assert np.abs(tr1 - ev1).max() > 1e-3
    assert np.abs(tr1 - tr3).max() > 1e-3
    # a model without dropout ignores the rng
    plain = jax.jit(get_model(_model_cfg(family)).logits)
    np.testing.assert_array_equal(plain(params, tokens, rng=jax.random.key(1)), ev1)


MP_RTOL = 0.03  # bf16: 8-bit mantissa; measured ~1.1% (gptj), ~0.9% (gpt2) of max |logit|


@pytest.mark.parametrize("family", ["gptj", "gpt2"])
def test_mixed_precision_close_to_fp32(family):
    cfg = _model_cfg(family)
    fp32 = get_model(cfg)
    bf16 = get_model(dataclasses.replace(cfg, mixed_precision=True))
    params = _random_params(fp32)
    tokens = _tokens()
    ref = jax.jit(fp32.logits)(params, tokens)
    got = jax.jit(bf16.logits)(params, tokens)
    assert got.dtype == jnp.float32 and ref.dtype == jnp.float32
    scale = float(jnp.abs(ref).max())
    err = float(jnp.abs(got - ref).max())
    assert 0 < err <= MP_RTOL * scale, (err, scale)
    assert math.isfinite(err)
