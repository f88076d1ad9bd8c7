"""Pure layer functions shared by the GPT families: layer norm, dense, attention, rotary, MLP.

Every function takes its parameters as a plain dict and computes in the dtype of its input
activations (fp32, or bf16 under mixed precision); layer norm, softmax and the loss run in fp32
(``at_least_f32``: float64 where the activations are float64, for the exactness tests).
Shapes: B batch, T sequence, D hidden, H heads, K head dim, F filter size.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from wsjax.precision import at_least_f32

F32 = jnp.float32


def layer_norm(p: dict, x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis, computed in fp32, returned in ``x.dtype``."""
    acc = at_least_f32(x.dtype)
    x32 = x.astype(acc)  # (B, T, D)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    y = y * p["scale"].astype(acc) + p["bias"].astype(acc)
    return y.astype(x.dtype)


def dense(p: dict, x: jax.Array) -> jax.Array:
    """``x @ kernel (+ bias)``; kernel is (in, out), the transpose of torch's Linear.weight."""
    y = x @ p["kernel"].astype(x.dtype)
    if "bias" in p:
        y = y + p["bias"].astype(x.dtype)
    return y


def activation(name: str, x: jax.Array) -> jax.Array:
    """``gelu`` is the tanh approximation (HF ``gelu_new``) that GPT-J and GPT-2 use."""
    if name == "gelu":
        return jax.nn.gelu(x, approximate=True)
    if name == "gelu_exact":
        return jax.nn.gelu(x, approximate=False)
    if name == "relu":
        return jax.nn.relu(x)
    raise ValueError(f"unknown nonlinearity {name!r}")


def dropout(rng: jax.Array | None, rate: float, x: jax.Array) -> jax.Array:
    """Inverted dropout; a no-op when ``rng`` is None (eval) or ``rate`` is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def rotary_sin_cos(seq_len: int, rotary_dim: int, dtype=F32) -> tuple[jax.Array, jax.Array]:
    """GPT-J's sinusoid table: (T, rotary_dim // 2) sines and cosines, as HF builds them."""
    inv_freq = 1.0 / (10000 ** (jnp.arange(0, rotary_dim, 2, dtype=dtype) / rotary_dim))
    angles = jnp.arange(seq_len, dtype=dtype)[:, None] * inv_freq[None, :]  # (T, R/2)
    return jnp.sin(angles), jnp.cos(angles)


def apply_rotary(x: jax.Array, rotary_dim: int) -> jax.Array:
    """Rotate the first ``rotary_dim`` dims of each head, interleaved (rotate-every-two) form.

    x: (B, T, H, K). Pairs (x[2i], x[2i+1]) are rotated by angle pos * inv_freq[i].
    """
    t = x.shape[1]
    acc = at_least_f32(x.dtype)
    sin, cos = rotary_sin_cos(t, rotary_dim, acc)  # (T, R/2)
    sin = jnp.repeat(sin, 2, axis=-1)[None, :, None, :]  # (1, T, 1, R)
    cos = jnp.repeat(cos, 2, axis=-1)[None, :, None, :]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    rot32 = rot.astype(acc)
    # rotate_every_two: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)
    pairs = rot32.reshape(*rot32.shape[:-1], rotary_dim // 2, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(rot32.shape)
    out = (rot32 * cos + rotated * sin).astype(x.dtype)
    return jnp.concatenate([out, rest], axis=-1)


def causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, rng: jax.Array | None, dropout_rate: float
) -> jax.Array:
    """Softmax(q k^T / sqrt(K)) v with a causal mask; scores and softmax in fp32.

    q, k, v: (B, T, H, K) -> (B, T, H, K)
    """
    t, k_dim = q.shape[1], q.shape[-1]
    acc = at_least_f32(q.dtype)
    scores = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=acc)  # (B, H, T, T)
    scores = scores / math.sqrt(k_dim)
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    scores = jnp.where(causal, scores, jnp.finfo(acc).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    probs = dropout(rng, dropout_rate, probs)
    return jnp.einsum("bhqs,bshk->bqhk", probs, v)  # (B, T, H, K)


def split_rng(rng: jax.Array | None, n: int) -> list[jax.Array | None]:
    """``n`` independent keys, or ``n`` Nones when running without dropout."""
    if rng is None:
        return [None] * n
    return list(jax.random.split(rng, n))
