"""The generation plan: device bytes of one ``generate`` call, and where the KV caches live.

Generation streams the weights as training does (``prefetch_depth + 1`` segments on the device),
but it also keeps, per layer, the keys and values of every token so far: L x 2 x batch x
cache_len x kv_heads x head_dim in the compute dtype (kv_heads: the key/value heads, fewer than
the query heads under grouped-query attention). That term grows with the depth, the batch and
the number of new tokens, so it decides whether a call fits. The plan computes the device bytes
two ways, before anything is allocated:

    device   (resident)  weights in flight + activations + scratch + all L layers' caches
    host     (offloaded) the same with only the caches of the layers in flight on the device:
                         each cache streams in with its layer's weights (same fetch, so
                         ``prefetch_depth`` ahead) and goes back to host memory after the step

and checks them against the device's budget (:func:`wsjax.engine.plan.device_budget`:
``streaming.device_memory_gb`` when set, else the device's ``memory_stats``). ``auto`` keeps the
caches on the device when that fits and offloads them when only that fits; when neither fits,
:class:`~wsjax.errors.PlanError` (exit 3) names the bytes and the knobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import jax.numpy as jnp

from wsjax.engine.plan import GiB, device_budget, segment_params
from wsjax.errors import ConfigError, PlanError

KV_CACHE_MODES = ("auto", "device", "host")


@dataclass(frozen=True)
class GenerationPlan:
    """Device bytes per term; ``kv_cache`` is where the caches live: "device" or "host"."""

    kv_cache: str
    requested: str  # auto / device / host, as asked
    batch: int
    cache_len: int  # padded prompt bucket + max_new_tokens
    num_layers: int
    window: int  # layers on the device at a time: prefetch_depth + 1 (at most L)
    kv_cache_per_layer: int  # keys + values of one layer
    fixed: dict[str, int]  # weights_in_flight, activations, executable_temp
    device_available: int | None
    budget: str  # where device_available comes from
    notes: list[str] = field(default_factory=list)

    @property
    def kv_cache_bytes(self) -> int:
        """All L layers' caches (on the device when resident, in host memory when offloaded)."""
        return self.num_layers * self.kv_cache_per_layer

    def device_bytes(self, where: str) -> int:
        """Device bytes with the caches on the ``device`` (all L) or on the ``host`` (window)."""
        layers = self.num_layers if where == "device" else self.window
        return sum(self.fixed.values()) + layers * self.kv_cache_per_layer

    def fits(self, where: str) -> bool:
        return self.device_available is None or self.device_bytes(where) <= self.device_available

    def summary(self) -> str:
        have = "not checked"
        if self.device_available is not None:
            have = f"{_size(self.device_available)} available: {self.budget}"
        lines = [
            f"Generation plan (batch {self.batch}, cache {self.cache_len} slots, "
            f"{self.num_layers} layers; device {have}):",
            *(f"    {k:<22} {_size(v):>12}" for k, v in self.fixed.items()),
            f"    {'kv_cache per layer':<22} {_size(self.kv_cache_per_layer):>12}",
            f"  KV cache on the device: {_size(self.device_bytes('device'))}; offloaded to host "
            f"({self.window} layers in flight): {_size(self.device_bytes('host'))} "
            f"(+ {_size(self.kv_cache_bytes)} in host memory)",
            f"  KV cache: {self.kv_cache} (--kv_cache {self.requested})",
        ]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def plan_generation(
    model,
    streaming_cfg,
    *,
    batch: int,
    width: int,
    max_new_tokens: int,
    kv_cache: str = "auto",
    device=None,
) -> GenerationPlan:
    """The plan of generating ``max_new_tokens`` for ``batch`` prompts left-padded to ``width``;
    decides where the caches live (``kv_cache`` auto) or checks the asked place; allocates
    nothing. ``device``: the one to ask for its free memory (unless device_memory_gb is set)."""
    if kv_cache not in KV_CACHE_MODES:
        raise ConfigError(f"kv_cache {kv_cache!r}: must be one of {', '.join(KV_CACHE_MODES)}")
    cfg, dt = model.cfg, jnp.dtype(model.compute_dtype).itemsize
    cache_len, layers = width + max_new_tokens, model.num_layers
    depth = int(streaming_cfg.prefetch_depth)
    # keys + values of the key/value heads (fewer than the query heads under GQA)
    per_layer = 2 * batch * cache_len * cfg.num_kv_heads * cfg.head_dim * dt
    fixed = {
        "weights_in_flight": (depth + 1) * max(segment_params(model).values()) * dt,
        # the prefill's (B, T, D) in and out, the last logits (fp32), tokens and positions
        "activations": 2 * batch * width * cfg.hidden_size * dt
        + batch * cfg.vocab_size * 4
        + 2 * batch * width * 4,
        "executable_temp": decode_temp_bytes(cfg, batch, width, cache_len),
    }
    available = device_budget(streaming_cfg, device)
    notes = ["executable_temp estimated (fp32 upper bound of the largest executable)"]
    if streaming_cfg.device_memory_gb is not None:
        budget = f"streaming.device_memory_gb {streaming_cfg.device_memory_gb:g}"
    elif available is not None:
        budget = "free on the device (memory_stats)"
    else:
        budget = "unknown"
        notes.append("the device reports no memory limit (CPU backend): the plan is not checked")
    plan = GenerationPlan(
        kv_cache="device",
        requested=kv_cache,
        batch=batch,
        cache_len=cache_len,
        num_layers=layers,
        window=min(layers, depth + 1),
        kv_cache_per_layer=per_layer,
        fixed=fixed,
        device_available=available,
        budget=budget,
        notes=notes,
    )
    where = kv_cache
    if kv_cache == "auto":
        where = "device" if plan.fits("device") or not plan.fits("host") else "host"
    if not plan.fits(where):
        raise PlanError(_refusal(plan, where, max_new_tokens, depth))
    return replace(plan, kv_cache=where)


def decode_temp_bytes(cfg, batch: int, width: int, cache_len: int) -> int:
    """Scratch of the largest decode executable, at fp32 (an upper bound in bf16 too): the
    prefill block's projections and MLP intermediates, (B, T, 6D + 3F), its attention over the
    cache, 3 (B, H, T, S) score tensors (scores, masked, softmax) and the (B, T, S) mask; the
    head's last-position logits twice (logits, the softmax of sampling); the embed's output."""
    d, f, h, v = cfg.hidden_size, cfg.filter_size, cfg.num_heads, cfg.vocab_size
    block = batch * width * (6 * d + 3 * f) * 4 + 3 * batch * h * width * cache_len * 4
    block += batch * width * cache_len
    head = batch * d * 4 + 2 * batch * v * 4
    embed = 2 * batch * width * d * 4
    return max(block, head, embed)


def _refusal(plan: GenerationPlan, where: str, max_new_tokens: int, depth: int) -> str:
    """One line: the bytes of both placements, the budget, and the knobs that shrink them."""
    knobs = [
        f"fewer prompts per batch (now {plan.batch})",
        f"a lower max_new_tokens (now {max_new_tokens})",
    ]
    if where == "device" and plan.fits("host"):  # only a forced --kv_cache device gets here
        knobs.insert(0, "--kv_cache host or auto")
    if depth > 0:
        knobs.append(f"a lower streaming.prefetch_depth (now {depth})")
    return (
        f"generation does not fit the device (--kv_cache {plan.requested}): it needs "
        f"{_size(plan.device_bytes('device'))} with the KV cache on the device, "
        f"{_size(plan.device_bytes('host'))} with it offloaded to host; "
        f"{_size(plan.device_available)} available ({plan.budget}); the KV cache is "
        f"{_size(plan.kv_cache_per_layer)} a layer at batch {plan.batch} x {plan.cache_len} "
        f"slots; to fit: {', or '.join(knobs)}"
    )


def _size(nbytes: int | None) -> str:
    if nbytes is None:
        return "?"
    if nbytes >= GiB // 10:
        return f"{nbytes / GiB:.2f} GiB"
    return f"{nbytes / 2**20:.2f} MiB"
