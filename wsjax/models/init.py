"""Weight initializers of the Cerebras params specs: ``make_initializer(spec, ...)``.

The config holds an :class:`~wsjax.config.schema.InitSpec` (data only); this module turns it into
a jax initializer ``(key, shape, dtype) -> array``. Fans are passed explicitly (not read from the
shape) so stacked ``(L, in, out)`` layers initialise like single layers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from wsjax.config.schema import InitSpec

logger = logging.getLogger("wsjax.config")


def make_initializer(
    spec: InitSpec,
    fan_in: int,
    fan_out: int,
    num_layers: int,
    hidden_size: int,
    vocab_size: int,
) -> Callable[..., jax.Array]:
    """A jax initializer `(key, shape, dtype) -> array` for this spec, Cerebras semantics.

    Fans are passed explicitly (not read from the shape) so stacked (L, in, out) layers
    initialise like single layers. `std` is already resolved by the config loader for
    normal / truncated_normal. The formulas follow the Cerebras modelzoo TF GPT-J utils
    (configure_variance_scaling_parameters, configure_scaled_init_normal_parameters):
      variance_scaling: std = sqrt(scale / fan); scale_type small_init -> scale = 2/5,
        wang_init -> scale = 4 / L^2; truncated_normal divides std by 0.8796 (the std of a
        standard normal truncated to +-2) and truncates at +-2 std; normal (TF
        "untruncated_normal") does neither; uniform has limit sqrt(3 scale / fan).
      scaled_init_normal: std = sigma / sqrt(2 L) (key num_hidden_layers) or sigma / sqrt(V)
        (key vocab_size), sigma defaulting to 1.0; truncated at +-2 std unless distribution
        is normal.
    """
    std = 0.02 if spec.std is None else spec.std
    name = spec.name
    if name in _VARIANCE_SCALING_ALIASES:
        scale, mode, dist = _VARIANCE_SCALING_ALIASES[name]
        return _variance_scaling(scale, mode, dist, fan_in, fan_out)
    if name == "variance_scaling":
        scale = {
            None: 1.0 if spec.scale is None else spec.scale,
            "small_init": 2.0 / 5.0,
            "wang_init": 4.0 / num_layers**2,
        }[spec.scale_type]
        return _variance_scaling(scale, spec.mode, spec.distribution, fan_in, fan_out)
    if name == "zeros":
        return lambda key, shape, dtype=jnp.float32: jnp.zeros(shape, dtype)
    if name == "ones":
        return lambda key, shape, dtype=jnp.float32: jnp.ones(shape, dtype)
    if name == "truncated_normal":
        # Cerebras PyTorch create_initializer: trunc_normal_(mean, std, a=-2*std, b=2*std), the
        # default bounds absolute (around 0, not around the mean).
        low = -2.0 * std if spec.a is None else spec.a
        high = 2.0 * std if spec.b is None else spec.b
        return _truncated_normal(spec.mean, std, low, high)
    if name == "wang_init":
        return _normal(spec.mean, 2.0 / (num_layers * math.sqrt(hidden_size)))
    if name == "small_init":
        return _normal(spec.mean, math.sqrt(2.0 / (5.0 * hidden_size)))
    if name == "scaled_init_normal":
        sigma = spec.sigma if spec.sigma is not None else (spec.std or 1.0)
        divisor = {None: 1.0, "num_hidden_layers": 2.0 * num_layers, "vocab_size": vocab_size}
        scaled = sigma / math.sqrt(divisor[spec.key])
        if spec.distribution == "normal":
            return _normal(spec.mean, scaled)
        return _truncated_normal(spec.mean, scaled, None, None)
    if name != "normal" and name not in _WARNED_INIT_NAMES:
        _WARNED_INIT_NAMES.add(name)
        logger.warning("initializer %r is not supported; using normal(std=%g)", name, std)
    return _normal(spec.mean, std)


_VARIANCE_SCALING_ALIASES = {
    "xavier_uniform": (1.0, "fan_avg", "uniform"),
    "glorot_uniform": (1.0, "fan_avg", "uniform"),
    "xavier_normal": (1.0, "fan_avg", "normal"),
    "glorot_normal": (1.0, "fan_avg", "normal"),
    "lecun_normal": (1.0, "fan_in", "truncated_normal"),
    "lecun_uniform": (1.0, "fan_in", "uniform"),
    "kaiming_normal": (2.0, "fan_in", "normal"),
    "kaiming_uniform": (2.0, "fan_in", "uniform"),
}
_WARNED_INIT_NAMES: set[str] = set()


def _normal(mean: float, std: float) -> Callable[..., jax.Array]:
    def init(key, shape, dtype=jnp.float32):
        return (mean + std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    return init


def _truncated_normal(
    mean: float, std: float, a: float | None, b: float | None
) -> Callable[..., jax.Array]:
    lo = -2.0 if a is None else (a - mean) / std  # default bounds: +-2 std (TF truncated_normal)
    hi = 2.0 if b is None else (b - mean) / std

    def init(key, shape, dtype=jnp.float32):
        z = jax.random.truncated_normal(key, lo, hi, shape, jnp.float32)
        return (mean + std * z).astype(dtype)

    return init


def _variance_scaling(
    scale: float, mode: str, distribution: str, fan_in: int, fan_out: int
) -> Callable[..., jax.Array]:
    fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
    variance = scale / max(1.0, fan)
    if distribution == "uniform":
        limit = math.sqrt(3.0 * variance)
        return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
            key, shape, jnp.float32, -limit, limit
        ).astype(dtype)
    if distribution == "truncated_normal":
        # 0.8796... = std of a standard normal truncated to [-2, 2] (as jax.nn.initializers)
        return _truncated_normal(0.0, math.sqrt(variance) / 0.87962566103423978, None, None)
    return _normal(0.0, math.sqrt(variance))
