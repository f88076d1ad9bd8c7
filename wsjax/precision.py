"""What "computed in fp32" means, in one place (models, loss, optimizer and engine use it).

Layer norm, softmax, the loss, gradient norms and master weights run in at least fp32: fp32
when the activations are bf16 or fp32, float64 when they are float64 (``jax_enable_x64`` with a
float64 model, how the exactness tests compare engine and reference to ~1e-12).

Matmuls of bf16 operands multiply in bf16 and accumulate in fp32, forward and backward
(:func:`einsum`, :func:`dot_general`), as torch's CPU autocast does. Written as XLA's plain
``bf16 x bf16 -> bf16`` dot, XLA CPU (JAX 0.10) converts both operands to fp32, runs an fp32
matmul and converts back: slower than fp32 alone. ``bf16 x bf16 -> fp32`` it runs natively in bf16
(AVX512_BF16 / AMX where the CPU has them), several times the fp32 rate (``bench_peer.py
--matmuls`` measures it). fp32 and float64
matmuls keep their arithmetic; their backward is written as two einsums too, which XLA CPU runs
faster than autodiff's transposed dots (the same sums in another order).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def at_least_f32(dtype) -> jnp.dtype:
    """fp32 for bf16 / fp32, float64 for float64."""
    return jnp.promote_types(dtype, jnp.float32)


def einsum(spec: str, a: jax.Array, b: jax.Array, out_dtype=None) -> jax.Array:
    """Two-operand ``jnp.einsum`` whose output is ``out_dtype`` (default: the operands' type).

    Operands of one float type: products accumulated in at least fp32 (bf16: bf16 products,
    fp32 accumulation, rounded once to ``out_dtype``), and a backward of two einsums of the same
    kind, the cotangent entering them in the operands' type (as torch autocast's matmul
    backward). For fp32 that backward is the same arithmetic autodiff derives, in a form XLA CPU
    runs faster than autodiff's transposed ``dot_general`` s. Every index of an operand must
    appear in the other operand or in the output (no index summed within one operand), so that
    the backward is two einsums of the same kind. Other operands (mixed types, integers) take
    plain ``jnp.einsum``.
    """
    out_dtype = jnp.dtype(out_dtype or jnp.result_type(a, b))
    if a.dtype == b.dtype and jnp.issubdtype(a.dtype, jnp.floating):
        return _einsum(spec, out_dtype, a, b)
    return jnp.einsum(spec, a, b, preferred_element_type=out_dtype)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _einsum(spec: str, out_dtype, a: jax.Array, b: jax.Array) -> jax.Array:
    acc = at_least_f32(a.dtype)
    return jnp.einsum(spec, a, b, preferred_element_type=acc).astype(out_dtype)


def _einsum_fwd(spec, out_dtype, a, b):
    return _einsum(spec, out_dtype, a, b), (a, b)


def _einsum_bwd(spec, out_dtype, residuals, grad):
    a, b = residuals
    operands, out = spec.split("->")
    spec_a, spec_b = operands.split(",")
    acc = at_least_f32(a.dtype)
    grad = grad.astype(a.dtype)  # the cotangent enters the matmuls in the operands' type
    grad_a = jnp.einsum(f"{out},{spec_b}->{spec_a}", grad, b, preferred_element_type=acc)
    grad_b = jnp.einsum(f"{spec_a},{out}->{spec_b}", a, grad, preferred_element_type=acc)
    return grad_a.astype(a.dtype), grad_b.astype(b.dtype)


_einsum.defvjp(_einsum_fwd, _einsum_bwd)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
    """``lax.dot_general`` for ``flax.nnx.Linear``: ``x (..., K) @ kernel (K, N)`` of float
    operands of one type goes through :func:`einsum`; anything else is unchanged."""
    dense = (((lhs.ndim - 1,), (0,)), ((), ()))
    same_float = lhs.dtype == rhs.dtype and jnp.issubdtype(lhs.dtype, jnp.floating)
    if same_float and rhs.ndim == 2 and lhs.ndim >= 2 and dimension_numbers == dense:
        # (C, T, K) with C the leading dims: the weight gradient "ctk,ctn->kn" then contracts
        # two dims, a form XLA CPU runs natively in bf16; flattened to "tk,tn->kn" it does not
        # (it converts both operands to fp32 first: ``bench_peer.py --matmuls``)
        rows = lhs.reshape(-1, *lhs.shape[-2:])  # (C, T, K)
        out = einsum("ctk,kn->ctn", rows, rhs, preferred_element_type)  # (C, T, N)
        return out.reshape(*lhs.shape[:-1], rhs.shape[-1])
    return jax.lax.dot_general(
        lhs, rhs, dimension_numbers, precision, preferred_element_type=preferred_element_type, **kw
    )
