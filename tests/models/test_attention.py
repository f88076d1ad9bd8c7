"""Attention through ``jax.nn.dot_product_attention``: the call wsjax makes for cuDNN's flash
attention on a GPU (bf16) is checked here through the same call's XLA implementation, against
:func:`masked_attention` (the path the CPU, fp32 and float64 exactness tests run): the causal
mask, the sliding window's bounds, grouped-query heads and the 1/sqrt(K) scale all agree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsjax.models import layers


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("groups", [4, 2])
def test_dot_product_attention_call_equals_masked_attention(monkeypatch, window, groups):
    """fp32, B 2, T 16, H 4 query heads over ``groups`` kv heads: the two agree to fp32
    rounding (1e-5 relative; a wrong window bound or scale is O(1))."""
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (2, 16, 4, 16), jnp.float32)
    k = jax.random.normal(keys[1], (2, 16, groups, 16), jnp.float32)
    v = jax.random.normal(keys[2], (2, 16, groups, 16), jnp.float32)
    want = layers.causal_attention(q, k, v, None, 0.0, window)  # masked_attention here
    monkeypatch.setattr(layers, "attention_implementation", lambda *a: "xla")
    got = layers.causal_attention(q, k, v, None, 0.0, window)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_cudnn_only_where_it_applies():
    """On this CPU, in float32 or with attention dropout: never cuDNN (masked_attention runs)."""
    q = jnp.zeros((1, 8, 2, 16), jnp.bfloat16)
    rng = jax.random.PRNGKey(0)
    assert layers.attention_implementation(q, None, 0.0) is None  # CPU backend
    assert layers.attention_implementation(q, rng, 0.1) is None
    if jax.default_backend() == "gpu":  # pragma: no cover (the GPU check runs it)
        assert layers.attention_implementation(q, None, 0.0) == "cudnn"
        assert layers.attention_implementation(q.astype(jnp.float32), None, 0.0) is None
