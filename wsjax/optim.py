"""The optimizer from `OptimizerConfig`: optax chain, Cerebras LR phases, wd mask, clipping.

Gradient clipping is NOT inside `make_optimizer`'s chain: the streaming engine computes the global
norm itself from per-segment squared norms (`sq_norm`, `global_norm_from_sq`), turns it into a
scale with `clip_factor` and multiplies each segment's gradients (`apply_clip_factor`) before
calling the optimizer on that segment. The resident reference uses `make_optimizer_with_clipping`,
whose clipping step is built from the same `clip_factor`, so both paths do the same arithmetic.

The optimizer works on any subtree (one segment at a time, e.g. {"blocks": layer_i}): the
weight-decay mask depends only on leaf names, and every state leaf mirrors a parameter or is a
per-tree step count, so state initialised per segment equals the slices of a whole-tree state.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from wsjax.config.schema import LRPhase, OptimizerConfig
from wsjax.errors import ConfigError
from wsjax.precision import at_least_f32

# Weight decay applies to leaves with these names only: matrices ("kernel") and the token /
# position embedding tables. Biases ("bias") and layer-norm parameters ("scale", "bias") are
# never decayed. Names, not positions, decide, so the mask is the same for a segment or the tree.
DECAY_LEAF_NAMES = frozenset({"kernel", "wte", "wpe"})


# ---------------------------------------------------------------- learning rate


def learning_rate_schedule(opt_cfg: OptimizerConfig) -> optax.Schedule:
    """The LR as a function of the update count (0 for the first update).

    Cerebras semantics (modelzoo common/pytorch/PyTorchBaseModel._configure_lr_scheduler and
    common/pytorch/optim/lr_scheduler.py): phases run one after another; a phase lasts `steps`,
    else `decay_steps` (so a non-final Cosine phase given only decay_steps ends there); the
    boundaries are `OptimizerConfig.phase_boundaries`. Each phase sees the steps since its own
    start, or the global step when `disable_lr_steps_reset` is set.
    """
    lr = opt_cfg.learning_rate
    if not isinstance(lr, tuple):
        return optax.constant_schedule(float(lr))
    schedules = [_phase_schedule(p) for p in lr]
    boundaries = list(opt_cfg.phase_boundaries)
    if opt_cfg.disable_lr_steps_reset:  # no reset: phase i is evaluated at the global step
        starts = [0, *boundaries]
        schedules = [
            (lambda step, fn=fn, start=start: fn(step + start))
            for fn, start in zip(schedules, starts, strict=True)
        ]
    if len(schedules) == 1:
        return schedules[0]
    return optax.join_schedules(schedules, boundaries)


def _phase_schedule(p: LRPhase) -> optax.Schedule:
    """One Cerebras scheduler of the step t since its phase start; each holds its end value once
    its decay steps are done (formulas of Cerebras' lr_scheduler.py, cited per branch)."""
    if p.scheduler == "constant":
        value = float(p.learning_rate)
        return lambda step: jnp.full((), value, jnp.float32)
    if p.scheduler == "piecewiseconstant":  # values[i] while boundaries[i-1] <= t < boundaries[i]
        values = jnp.asarray(p.values, jnp.float32)
        bounds = jnp.asarray(p.boundaries, jnp.float32)
        return lambda step: values[jnp.sum(_f32(step) >= bounds)]
    initial = float(p.initial_learning_rate)
    n = p.length or 1  # Cerebras: `steps` overrides decay_steps; Exponential defaults to 1
    if p.scheduler in ("linear", "polynomial"):
        # Polynomial: (initial - end) * (1 - t / T) ** power + end for t < T, end after.
        # Linear is power 1. Cerebras' `cycle` divides by T * ceil((t + 1) / T), which is T for
        # every t < T, and t >= T gives `end` first: it never changes the value, nor here.
        end, power = float(p.end_learning_rate), 1.0 if p.scheduler == "linear" else p.power

        def polynomial(step):
            frac = jnp.clip(_f32(step) / n, 0.0, 1.0)
            return (initial - end) * jnp.power(1.0 - frac, power) + end

        return polynomial
    if p.scheduler in ("cosine", "cosinedecay"):
        # CosineDecay: end + (initial - end) * (1 + cos(pi * min(t, T) / T)) / 2.
        # TF Cosine gives alpha instead of end: end = alpha * initial (tf cosine_decay).
        end = p.end_learning_rate
        end = initial * (p.alpha or 0.0) if end is None else float(end)
        return lambda step: (
            end + (initial - end) * 0.5 * (1.0 + jnp.cos(math.pi * _f32(step).clip(0, n) / n))
        )
    rate, stair = float(p.decay_rate), p.staircase
    if p.scheduler == "exponential":  # initial * rate ** (t / T), the exponent floored if staircase

        def exponential(step):
            t = _f32(step) / n
            return initial * jnp.power(rate, jnp.floor(t) if stair else t)

        return exponential
    if p.scheduler == "inverseexponentialtimedecay":
        # initial / (1 + rate * (t ** step_exponent / T)), the ratio floored if staircase
        exponent = float(p.step_exponent)

        def inverse_time(step):
            alpha = jnp.power(_f32(step), exponent) / n
            return initial / (1.0 + rate * (jnp.floor(alpha) if stair else alpha))

        return inverse_time
    raise ConfigError(f"optimizer.learning_rate scheduler={p.scheduler!r} is not supported")


def _f32(step: Any) -> jax.Array:
    return jnp.asarray(step, jnp.float32)


# ---------------------------------------------------------------- optimizer


def weight_decay_mask(params: Any) -> Any:
    """True for leaves named in DECAY_LEAF_NAMES (kernels, wte, wpe), False for the rest."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _leaf_name(path) in DECAY_LEAF_NAMES, params
    )


def _leaf_name(path: tuple) -> str | None:
    if not path:
        return None
    last = path[-1]
    return getattr(last, "key", getattr(last, "name", None))


def make_optimizer(opt_cfg: OptimizerConfig) -> optax.GradientTransformation:
    """AdamW / Adam / SGD with the LR schedule and masked weight decay; no global-norm clipping.

    adamw: decoupled decay, lr-scaled (torch AdamW, Cerebras AdamW): u = -lr * (adam + wd * p).
    adam, sgd: L2 decay added to the gradient first (torch Adam / SGD `weight_decay`).
    max_gradient_value clips each gradient element to [-v, v] first (Cerebras GradientClipper;
    element-wise, so applying it per segment is exact). adjust_learning_rate scales the update
    of the blocks' kernels (Cerebras muP "decoder_kernel": non-embedding kernels).
    """
    b1, b2, eps = opt_cfg.beta1, opt_cfg.beta2, opt_cfg.epsilon
    lr = optax.scale_by_learning_rate(learning_rate_schedule(opt_cfg))
    clip = [] if opt_cfg.max_gradient_value is None else [optax.clip(opt_cfg.max_gradient_value)]
    adjust = dict(opt_cfg.adjust_learning_rate or ())
    if "decoder_kernel" in adjust:
        lr = optax.chain(lr, _scale_where(decoder_kernel_mask, adjust["decoder_kernel"]))
    wd = opt_cfg.weight_decay_rate
    decay = [optax.add_decayed_weights(wd, mask=weight_decay_mask)] if wd > 0 else []
    kind = opt_cfg.optimizer_type
    if kind in ("adamw", "adam"):
        if opt_cfg.use_bias_correction:
            adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
        else:
            adam = scale_by_adam_without_bias_correction(b1, b2, eps)
        steps = [adam, *decay, lr] if kind == "adamw" else [*decay, adam, lr]
    elif kind == "sgd":
        momentum = [optax.trace(decay=opt_cfg.momentum)] if opt_cfg.momentum > 0 else []
        steps = [*decay, *momentum, lr]
    else:
        raise ConfigError(f"optimizer.optimizer_type={kind!r} is invalid; use adamw | adam | sgd")
    return optax.chain(*clip, *steps)


def decoder_kernel_mask(params: Any) -> Any:
    """True for "kernel" leaves under "blocks" (the decoder's matrices, not embeddings/head)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _leaf_name(path) == "kernel" and _under(path, "blocks"), params
    )


def _under(path: tuple, name: str) -> bool:
    return any(getattr(k, "key", None) == name for k in path)


def _scale_where(mask_fn, factor: float) -> optax.GradientTransformation:
    """Multiply the updates of leaves selected by `mask_fn` by `factor` (stateless)."""

    def update(updates, state, params=None):
        del params
        mask = mask_fn(updates)
        return jax.tree.map(lambda u, m: u * factor if m else u, updates, mask), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def make_optimizer_with_clipping(opt_cfg: OptimizerConfig) -> optax.GradientTransformation:
    """`make_optimizer` preceded by global-norm clipping (when max_gradient_norm is set)."""
    base = make_optimizer(opt_cfg)
    if opt_cfg.max_gradient_norm is None:
        return base
    return optax.chain(clip_by_global_norm(opt_cfg.max_gradient_norm), base)


def scale_by_adam_without_bias_correction(
    b1: float, b2: float, eps: float
) -> optax.GradientTransformation:
    """Adam's m / (sqrt(v) + eps) without the 1 - beta^t corrections (Cerebras correct_bias=False).

    Its state is optax.ScaleByAdamState, so checkpoints look like those of optax.scale_by_adam.
    """

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=zeros)

    def update(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda g, m: b1 * m + (1 - b1) * g, updates, state.mu)
        nu = jax.tree.map(lambda g, v: b2 * v + (1 - b2) * jnp.square(g), updates, state.nu)
        out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
        return out, optax.ScaleByAdamState(optax.safe_increment(state.count), mu, nu)

    return optax.GradientTransformation(init, update)


# ---------------------------------------------------------------- clipping


def sq_norm(tree: Any) -> jax.Array:
    """Sum of squares of all leaves, in fp32 (one segment's share of the global norm)."""
    leaves = jax.tree.leaves(tree)
    dtype = at_least_f32(jnp.result_type(*leaves)) if leaves else jnp.float32
    return sum((jnp.sum(jnp.square(x.astype(dtype))) for x in leaves), jnp.zeros((), dtype))


def global_norm_from_sq(sq_norms: Any) -> jax.Array:
    """Global norm from per-segment squared norms (a list or array of scalars)."""
    stacked = jnp.stack([jnp.asarray(s) for s in sq_norms])
    return jnp.sqrt(jnp.sum(stacked.astype(at_least_f32(stacked.dtype))))


def clip_factor(global_norm: jax.Array | float, max_norm: float | None) -> jax.Array:
    """Scale for the gradients: 1 if global_norm < max_norm else max_norm / global_norm.

    The same trigger as optax.clip_by_global_norm (strict <); None means no clipping.
    """
    g = jnp.asarray(global_norm)
    g = g.astype(at_least_f32(g.dtype))
    if max_norm is None:
        return jnp.ones((), g.dtype)
    return jnp.where(g < max_norm, jnp.ones((), g.dtype), jnp.asarray(max_norm, g.dtype) / g)


def apply_clip_factor(tree: Any, factor: jax.Array) -> Any:
    """Multiply every leaf by the clip factor (in the leaf's dtype)."""
    return jax.tree.map(lambda g: g * factor.astype(g.dtype), tree)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """optax.clip_by_global_norm's behaviour, computed as g * clip_factor(norm) like the engine."""

    def update(updates, state, params=None):
        del params
        return apply_clip_factor(updates, clip_factor(optax.tree.norm(updates), max_norm)), state

    return optax.GradientTransformation(optax.init_empty_state, update)
