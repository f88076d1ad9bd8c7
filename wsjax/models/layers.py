"""Pieces the GPT families share: flax NNX layers built with the config's initializers, and the
pure maths (attention, rotary, dropout, activation) with shape comments.

Layers compute in the dtype of the parameters they are given (the engine streams a compute-dtype
copy: fp32, or bf16 under mixed precision); bf16 matmuls accumulate in fp32
(``wsjax.precision.einsum``: every ``linear`` and attention's ``probs @ v``); layer norm
statistics, rotary, softmax and the logits run in at least fp32
(``wsjax.precision.at_least_f32``: float64 for a float64 model, which the exactness tests use).
Shapes: B batch, T sequence, D hidden, H heads, K head dim, R rotary dims, V vocabulary; under
grouped-query attention G key/value heads, each read by H / G query heads.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from wsjax import precision
from wsjax.models.init import make_initializer
from wsjax.precision import at_least_f32

F32 = jnp.float32


# ---- parameterised layers (flax NNX) ----------------------------------------------------------
def _initializer(cfg, kind: str, fan_in: int, fan_out: int):
    """The config's initializer for a weight of ``kind``: embedding | kernel | output.

    ``output`` is the residual-branch output projection (Cerebras ``output_layer_initializer``).
    """
    spec = {
        "embedding": cfg.embedding_initializer,
        "kernel": cfg.initializer,
        "output": cfg.output_layer_initializer,
    }[kind]
    return make_initializer(
        spec,
        fan_in=fan_in,
        fan_out=fan_out,
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
    )


def linear(cfg, d_in: int, d_out: int, bias: bool, rngs: nnx.Rngs, kind="kernel") -> nnx.Linear:
    """``x @ kernel (+ bias)``; kernel (in, out) is the transpose of torch's Linear.weight."""
    init = _initializer(cfg, kind, d_in, d_out)
    return nnx.Linear(
        d_in, d_out, use_bias=bias, kernel_init=init, dot_general=precision.dot_general, rngs=rngs
    )


def layer_norm(cfg, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # two-pass variance (as torch's LayerNorm): flax's fast E[x^2] - E[x]^2 loses digits
    d, eps = cfg.hidden_size, cfg.layer_norm_epsilon
    return nnx.LayerNorm(d, epsilon=eps, use_fast_variance=False, rngs=rngs)


class RMSNorm(nnx.Module):
    """x / sqrt(mean(x^2) + eps) * scale (HF LlamaRMSNorm): the statistics in at least fp32,
    the normalised x cast back to the input dtype before the scale multiplies it, as HF does."""

    def __init__(self, d: int, eps: float):
        self.scale = nnx.Param(jnp.ones((d,), F32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(at_least_f32(x.dtype))  # (B, T, D)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * h.astype(x.dtype)


def rms_norm(cfg, rngs: nnx.Rngs) -> RMSNorm:
    del rngs  # its scale starts at ones
    return RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)


def embedding(cfg, rows: int, rngs: nnx.Rngs) -> nnx.Param:
    """A (rows, D) table as a bare parameter, so the tree keeps the HF-like leaf name (``wte``)."""
    init = _initializer(cfg, "embedding", cfg.hidden_size, cfg.hidden_size)
    return nnx.Param(init(rngs.params(), (rows, cfg.hidden_size), F32))


class PreLNBlock(nnx.Module):
    """One pre-LN block: ln_1 -> attn, ln_2 (ln_1 when the norms are tied) -> mlp.

    parallel (GPT-J, NeoX): x + attn(ln_1 x) + mlp(ln_2 x); sequential (GPT-2, NeoX with
    use_parallel_residual false): h = x + attn(ln_1 x), then h + mlp(ln_2 h). A family's
    ``Block`` passes its own ``attn(h, rng)`` and ``mlp(h)`` modules, which name their weights.
    """

    def __init__(self, cfg, attn, mlp, rngs: nnx.Rngs, *, untied_norms: bool, parallel: bool):
        self.ln_1 = layer_norm(cfg, rngs)
        self.attn = attn
        if untied_norms:
            self.ln_2 = layer_norm(cfg, rngs)
        self.mlp = mlp
        self.untied_norms, self.parallel = untied_norms, parallel
        self.rate = cfg.residual_dropout_rate

    def __call__(self, x: jax.Array, rng: jax.Array | None = None, cache=None):
        """(B, T, D) -> (B, T, D); with a ``KVCache`` (decoding) -> (y, the updated cache)."""
        r_attn, r_out, r_mlp = split_rng(rng, 3)
        ln_2 = self.ln_2 if self.untied_norms else self.ln_1
        h = self.ln_1(x)  # (B, T, D)
        attn, cache = self.attn(h, r_attn, cache)
        attn_out = dropout(r_out, self.rate, attn)  # (B, T, D)
        if self.parallel:  # tied norms: reuse h, so the backward pass has one norm, not two
            h_mlp = ln_2(x) if self.untied_norms else h
            y = x + attn_out + dropout(r_mlp, self.rate, self.mlp(h_mlp))
        else:
            x = x + attn_out
            y = x + dropout(r_mlp, self.rate, self.mlp(ln_2(x)))
        return y if cache is None else (y, cache)


# ---- pure maths ------------------------------------------------------------------------------
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


def split_rng(rng: jax.Array | None, n: int) -> list[jax.Array | None]:
    """``n`` independent keys, or ``n`` Nones when running without dropout."""
    if rng is None:
        return [None] * n
    return list(jax.random.split(rng, n))


class RopeScaling(NamedTuple):
    """RoPE frequency scaling: ``linear`` divides every frequency by ``factor`` (positions /
    factor); ``llama3`` (Meta's Llama 3.1) keeps wavelengths below original / high_freq_factor,
    divides those above original / low_freq_factor by ``factor``, and blends in between."""

    kind: str  # linear | llama3
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: float = 8192.0


def rope_inv_freq(
    rotary_dim: int, theta: float, dtype, scaling: RopeScaling | None = None
) -> jax.Array:
    """(R/2,) inverse frequencies theta^(-2i/R), rescaled by ``scaling`` (as HF's rope types)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=dtype) / rotary_dim))
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    old, low, high = (
        scaling.original_max_position_embeddings,
        scaling.low_freq_factor,
        scaling.high_freq_factor,
    )
    wavelen = 2 * math.pi / inv_freq  # (R/2,)
    smooth = (old / wavelen - low) / (high - low)  # 0 at old / low, 1 at old / high
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = jnp.where(wavelen > old / low, inv_freq / scaling.factor, blended)
    return jnp.where(wavelen < old / high, inv_freq, scaled)


def apply_rotary(
    x: jax.Array,
    rotary_dim: int,
    theta: float = 10000.0,
    interleaved: bool = True,
    positions: jax.Array | None = None,
    scaling: RopeScaling | None = None,
) -> jax.Array:
    """Rotate the first ``rotary_dim`` dims of each head by angle pos * theta^(-2i/R).

    x: (B, T, H, K); ``positions`` (B, T) ints, default 0..T-1 (training: every row starts at 0;
    decoding passes each row's own positions). ``interleaved`` (GPT-J, rotate-every-two) rotates
    the pairs (x[2i], x[2i+1]); otherwise (GPT-NeoX, Llama: rotate-half) the pairs
    (x[i], x[i + R/2]). ``scaling`` rescales the frequencies (:func:`rope_inv_freq`).
    """
    t, acc = x.shape[1], at_least_f32(x.dtype)
    inv_freq = rope_inv_freq(rotary_dim, theta, acc, scaling)  # (R/2,)
    pos = jnp.arange(t, dtype=acc)[None] if positions is None else positions.astype(acc)
    angles = pos[..., None] * inv_freq  # (1 or B, T, R/2)
    rot, rest = x[..., :rotary_dim].astype(acc), x[..., rotary_dim:]  # (B, T, H, R), (.., K - R)
    if interleaved:  # (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)
        angles = jnp.repeat(angles, 2, axis=-1)  # (1|B, T, R): each angle for its pair
        pairs = rot.reshape(*rot.shape[:-1], rotary_dim // 2, 2)
        rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(rot.shape)
    else:  # (x1, x2) halves -> (-x2, x1)
        angles = jnp.concatenate([angles, angles], axis=-1)  # (1|B, T, R)
        first, second = jnp.split(rot, 2, axis=-1)
        rotated = jnp.concatenate([-second, first], axis=-1)
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]  # (1|B, T, 1, R)
    out = (rot * cos + rotated * sin).astype(x.dtype)
    return jnp.concatenate([out, rest], axis=-1)


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    rng: jax.Array | None,
    dropout_rate: float,
    window: int | None = None,
) -> jax.Array:
    """Softmax(q k^T / sqrt(K)) v with a causal mask; scores and softmax in fp32.

    q: (B, T, H, K), k, v: (B, T, G, K) -> (B, T, H, K). ``window`` (Mistral's sliding window):
    query i sees keys i - window < j <= i only.
    """
    impl = attention_implementation(q, rng, dropout_rate)
    if impl is not None:  # cuDNN flash attention (bf16 / fp16 on a GPU, no attention dropout)
        local = None if window is None else (window - 1, 0)  # keys i - window < j <= i
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=local, implementation=impl
        )
    t = q.shape[1]
    i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    mask = j <= i  # (T, T)
    if window is not None:
        mask &= i - j < window
    return masked_attention(q, k, v, mask, rng, dropout_rate)


def attention_implementation(q: jax.Array, rng, dropout_rate: float) -> str | None:
    """``"cudnn"`` where ``jax.nn.dot_product_attention`` can run cuDNN's flash attention (a GPU,
    bf16 / fp16, head dim a multiple of 8 up to 256, no attention dropout); None elsewhere:
    then :func:`masked_attention` (plain XLA, exact in fp32 / float64) runs."""
    head = q.shape[-1]
    if jax.default_backend() != "gpu" or (rng is not None and dropout_rate > 0):
        return None
    if q.dtype not in (jnp.bfloat16, jnp.float16) or head % 8 or head > 256:
        return None
    return "cudnn"


def masked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    rng: jax.Array | None = None,
    dropout_rate: float = 0.0,
) -> jax.Array:
    """Softmax over the keys ``mask`` allows; q: (B, T, H, K), k, v: (B, S, G, K) -> (B, T, H, K).

    G divides H: query head h reads key/value head h // (H / G), as HF's ``repeat_kv`` (grouped-
    query attention; G = H is multi-head). ``mask`` broadcasts to (B, H, T, S): (T, S) in
    training (causal), (B, 1, T, S) when decoding over a KV cache. Scores and softmax in at
    least fp32.
    """
    b, t, h, k_dim = q.shape
    g, acc = k.shape[2], at_least_f32(q.dtype)
    q = q.reshape(b, t, g, h // g, k_dim)  # (B, T, G, H/G, K): heads g*H/G .. share kv head g
    scores = jnp.einsum("btgrk,bsgk->bgrts", q, k, preferred_element_type=acc)  # (B, G, H/G, T, S)
    scores = scores.reshape(b, h, t, -1) / math.sqrt(k_dim)  # (B, H, T, S)
    scores = jnp.where(mask, scores, jnp.finfo(acc).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    probs = dropout(rng, dropout_rate, probs).reshape(b, g, h // g, t, -1)  # (B, G, H/G, T, S)
    out = precision.einsum("bgrts,bsgk->btgrk", probs, v)  # (B, T, G, H/G, K)
    return out.reshape(b, t, h, k_dim)
