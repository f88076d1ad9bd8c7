"""wsjax.precision: bf16 matmuls with fp32 accumulation, forward and backward, against float64.

The yardstick is numpy float64 on the same bf16-rounded operands, so the only errors left are
the kernel's: fp32 accumulation (K * 2^-24 relative, negligible at these K) and one final
rounding to bf16 (unit roundoff 2^-9 per element). Norm-wise, the relative error is then at most
2^-9 + K * 2^-24; BF16_TOL = 2^-8 leaves a factor 2 for the accumulation term. A wrong
backward (a swapped or missing transpose, a dropped term) is off by O(1), far above it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsjax import precision

BF16_TOL = 2.0**-8


def _bf16(rng: np.random.Generator, *shape: int) -> jax.Array:
    return jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)


def _f64(a: jax.Array) -> np.ndarray:
    return np.asarray(a.astype(jnp.float32), np.float64)


def _rel(got: jax.Array, want: np.ndarray) -> float:
    return float(np.linalg.norm(_f64(got) - want) / np.linalg.norm(want))


@pytest.mark.parametrize(
    "spec, shape_a, shape_b",
    [
        ("ctk,kn->ctn", (2, 8, 16), (16, 12)),  # Linear (what precision.dot_general calls)
        ("bhqs,bshk->bqhk", (2, 3, 5, 5), (2, 5, 3, 4)),  # attention's probs @ v
        ("btd,vd->btv", (2, 4, 8), (10, 8)),  # tied head
    ],
)
def test_bf16_einsum_value_and_gradients_match_float64(spec, shape_a, shape_b):
    rng = np.random.default_rng(0)
    a, b = _bf16(rng, *shape_a), _bf16(rng, *shape_b)
    out, vjp = jax.vjp(lambda a, b: precision.einsum(spec, a, b), a, b)
    assert out.dtype == jnp.bfloat16
    cotangent = _bf16(rng, *out.shape)
    grad_a, grad_b = vjp(cotangent)
    assert grad_a.dtype == grad_b.dtype == jnp.bfloat16

    a64, b64, g64 = _f64(a), _f64(b), _f64(cotangent)
    operands, result = spec.split("->")
    spec_a, spec_b = operands.split(",")
    assert _rel(out, np.einsum(spec, a64, b64)) <= BF16_TOL
    assert _rel(grad_a, np.einsum(f"{result},{spec_b}->{spec_a}", g64, b64)) <= BF16_TOL
    assert _rel(grad_b, np.einsum(f"{spec_a},{result}->{spec_b}", a64, g64)) <= BF16_TOL


def test_bf16_einsum_fp32_output_keeps_the_accumulator():
    """``out_dtype`` fp32 (attention scores, logits): no rounding to bf16 at the end, so the
    error is the fp32 accumulation alone (K * 2^-24 with K = 64), far below bf16's 2^-9."""
    rng = np.random.default_rng(1)
    a, b = _bf16(rng, 4, 64), _bf16(rng, 64, 6)
    out = precision.einsum("tk,kn->tn", a, b, jnp.float32)
    assert out.dtype == jnp.float32
    assert _rel(out, _f64(a) @ _f64(b)) <= 64 * 2.0**-24


def test_dot_general_is_linear_with_fp32_accumulation():
    """``nnx.Linear``'s contraction, (B, T, K) @ (K, N), through ``precision.dot_general``."""
    rng = np.random.default_rng(2)
    x, w = _bf16(rng, 2, 3, 16), _bf16(rng, 16, 8)
    dims = (((2,), (0,)), ((), ()))
    out, vjp = jax.vjp(lambda x, w: precision.dot_general(x, w, dims), x, w)
    assert out.shape == (2, 3, 8) and out.dtype == jnp.bfloat16
    cotangent = _bf16(rng, 2, 3, 8)
    grad_x, grad_w = vjp(cotangent)
    x64, w64, g64 = _f64(x), _f64(w), _f64(cotangent)
    assert _rel(out, x64 @ w64) <= BF16_TOL
    assert _rel(grad_x, g64 @ w64.T) <= BF16_TOL
    assert _rel(grad_w, np.einsum("btk,btn->kn", x64, g64)) <= BF16_TOL


@pytest.mark.parametrize(
    "spec, shape_a, shape_b",
    [
        ("ctk,kn->ctn", (2, 8, 16), (16, 12)),  # Linear
        ("bhqs,bshk->bqhk", (2, 3, 5, 5), (2, 5, 3, 4)),  # attention's probs @ v
        ("btd,vd->btv", (2, 4, 8), (10, 8)),  # tied head
    ],
)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fp32_and_float64_einsum_is_autodiffs_arithmetic(x64, spec, shape_a, shape_b, dtype):
    """fp32 / float64 operands: the forward is ``jnp.einsum`` bitwise; the backward (two
    einsums, the form XLA CPU runs faster than autodiff's transposed dots) equals autodiff's
    gradient of ``jnp.einsum`` up to the order of the sums. Each element is a sum of at most
    K = 16 products, so each of the two is within K u of the exact sum, scaled by the sum of
    the products' magnitudes (u = 2^-24 fp32, 2^-53 float64): the bound below is 2 K u times
    the norm of that magnitude sum. A wrong backward is off by O(1)."""
    operands, result = spec.split("->")
    spec_a, spec_b = operands.split(",")
    with x64():
        rng = np.random.default_rng(3)
        a = jnp.asarray(rng.standard_normal(shape_a), dtype)
        b = jnp.asarray(rng.standard_normal(shape_b), dtype)
        out, vjp = jax.vjp(lambda a, b: precision.einsum(spec, a, b), a, b)
        want, want_vjp = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), a, b)
        assert out.dtype == jnp.dtype(dtype)
        np.testing.assert_array_equal(out, want)
        cotangent = jnp.asarray(rng.standard_normal(out.shape), dtype)
        got, ref = vjp(cotangent), want_vjp(cotangent)
        abs_a, abs_b, abs_g = (np.abs(np.asarray(t, np.float64)) for t in (a, b, cotangent))
        magnitude = (
            np.einsum(f"{result},{spec_b}->{spec_a}", abs_g, abs_b),
            np.einsum(f"{spec_a},{result}->{spec_b}", abs_a, abs_g),
        )
        u = 2.0**-24 if dtype == "float32" else 2.0**-53
        for grad, grad_ref, mag in zip(got, ref, magnitude, strict=True):
            assert grad.dtype == grad_ref.dtype == jnp.dtype(dtype)
            err = np.asarray(grad, np.float64) - np.asarray(grad_ref, np.float64)
            assert np.linalg.norm(err) <= 2 * 16 * u * np.linalg.norm(mag)


def test_integer_operands_take_the_plain_path():
    """Outside float operands of one type nothing changes: bitwise ``jnp.einsum``."""
    a = jnp.arange(15, dtype=jnp.int32).reshape(3, 5)
    b = jnp.arange(20, dtype=jnp.int32).reshape(5, 4)
    np.testing.assert_array_equal(
        precision.einsum("tk,kn->tn", a, b), jnp.einsum("tk,kn->tn", a, b)
    )
    dims = (((1,), (0,)), ((), ()))
    np.testing.assert_array_equal(
        precision.dot_general(a, b, dims), jax.lax.dot_general(a, b, dims)
    )
