"""Memory plan: host and device bytes of a streamed run, computed before anything is allocated.

Host: fp32 master, optimizer state, compute-dtype streaming copy, gradient buffers (the whole
model when clipping needs the global norm before any update), offloaded activations.
Device (per device of the data mesh): weights in flight ((prefetch_depth + 1) segments), kept
block inputs (L x batch x seq x hidden unless offloaded), the activations flowing through the
current layer, one segment's fp32 gradient accumulator, the batch, and the largest scratch of
the compiled executables (their memory analysis when compiled, else an estimate).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp

from wsjax.errors import PlanError

GiB = 1024**3

# Which knob reduces which device term.
KNOBS = {
    "kept_activations": "set streaming.activation_offload: true",
    "executable_temp": "lower streaming.micro_batch_size (or raise optimizer.grad_accum_steps)",
    "weights_in_flight": "lower streaming.prefetch_depth",
    "activations": "lower train_input.batch_size or max_sequence_length",
}


def _bytes(tree) -> int:
    return sum(math.prod(s.shape) * jnp.dtype(s.dtype).itemsize for s in jax.tree.leaves(tree))


@dataclass
class MemoryPlan:
    host: dict[str, int]
    device: dict[str, int]
    host_available: int | None
    device_available: int | None
    shared_memory: bool  # device memory is host memory (CPU backend)
    notes: list[str] = field(default_factory=list)

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    @property
    def device_total(self) -> int:
        return sum(self.device.values())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["host_total"], d["device_total"] = self.host_total, self.device_total
        return d

    def write(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def summary(self) -> str:
        lines = ["Memory plan (per device for device terms):"]
        for title, terms, total, avail in (
            ("host", self.host, self.host_total, self.host_available),
            ("device", self.device, self.device_total, self.device_available),
        ):
            have = f" of {avail / GiB:.2f} GiB available" if avail else ""
            lines.append(f"  {title}: {total / GiB:.3f} GiB{have}")
            lines += [f"    {k:<20} {v / GiB:10.3f} GiB" for k, v in terms.items()]
        if self.shared_memory:
            lines.append("  (CPU backend: device memory is host memory; checked together)")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])

    def check(self) -> None:
        """Raise :class:`PlanError` naming the shortfall and the knob that helps."""
        if self.shared_memory:
            need, avail = self.host_total + self.device_total, self.host_available
            if avail is not None and need > avail:
                raise PlanError(self._short("host+device", need, avail, self._knob()))
            return
        if self.host_available is not None and self.host_total > self.host_available:
            raise PlanError(
                self._short("host", self.host_total, self.host_available, "a host with more RAM")
            )
        if self.device_available is not None and self.device_total > self.device_available:
            raise PlanError(
                self._short("device", self.device_total, self.device_available, self._knob())
            )

    def _knob(self) -> str:
        terms = sorted(((v, k) for k, v in self.device.items() if k in KNOBS), reverse=True)
        return "; ".join(f"{KNOBS[k]} ({k} {v / GiB:.2f} GiB)" for v, k in terms[:2])

    @staticmethod
    def _short(what: str, need: int, avail: int, knob: str) -> str:
        return (
            f"the run does not fit: it needs {need / GiB:.2f} GiB of {what} memory, "
            f"{avail / GiB:.2f} GiB available (short by {(need - avail) / GiB:.2f} GiB); "
            f"to fit: {knob}"
        )


def available_host_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def available_device_bytes(device) -> int | None:
    try:
        stats = device.memory_stats() or {}
    except Exception:  # backends without memory stats
        stats = {}
    limit = stats.get("bytes_limit")
    return int(limit) - int(stats.get("bytes_in_use", 0)) if limit else None


def make_plan(
    model,
    config,
    optimizer,
    *,
    batch_size: int,
    seq: int,
    n_micro: int,
    n_devices: int = 1,
    platform: str = "cpu",
    compile_records: list | None = None,
    host_available: int | None = None,
    device_available: int | None = None,
) -> MemoryPlan:
    """The plan of a training step on ``batch_size`` x ``seq`` tokens; allocates nothing."""
    cfg, s = model.cfg, config.streaming
    shapes = model.param_shapes()
    dt = jnp.dtype(model.compute_dtype).itemsize
    n_params = model.num_params()
    layer = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), shapes["blocks"])
    seg_params = {
        "embed": _bytes(shapes["embed"]) // 4,
        "block": _bytes(layer) // 4,
        "head": _bytes(shapes["head"]) // 4
        + (_bytes(shapes["embed"]["wte"]) // 4 if model.tied else 0),
    }
    largest = max(seg_params.values())
    d, L = cfg.hidden_size, model.num_layers
    per_dev_batch = max(1, batch_size // n_devices)
    act = per_dev_batch * seq * d * dt  # one (B, T, D) activation tensor, whole batch
    micro_dev = max(1, per_dev_batch // n_micro)

    opt_bytes = _bytes(jax.eval_shape(optimizer.init, shapes))
    clipping = config.optimizer.max_gradient_norm is not None
    host = {
        "master_fp32": 4 * n_params,
        "optimizer_state": opt_bytes,
        "stream_copy": dt * n_params,
        "gradients": 4 * (n_params if clipping else largest),
    }

    temp = _estimate_temp(cfg, micro_dev, seq)
    notes = []
    if compile_records:
        temp = max(
            r["temp_bytes"] if isinstance(r, dict) else r.temp_bytes for r in compile_records
        )
        notes.append("executable_temp from the compiled executables' memory analysis")
    else:
        notes.append("executable_temp estimated (not compiled yet)")
    kept = act if s.recompute else _residual_bytes(model, layer, per_dev_batch, seq)
    if s.activation_offload:
        host["offloaded_activations"] = L * kept * n_devices
    device = {
        "weights_in_flight": (s.prefetch_depth + 1) * largest * dt,
        "kept_activations": (s.prefetch_depth + 1) * kept if s.activation_offload else L * kept,
        "activations": 2 * act,
        "gradient_accumulator": 4 * largest,
        "batch": 3 * per_dev_batch * seq * 4,
        "executable_temp": temp,
    }
    if s.optimizer_placement == "device":
        device["optimizer_update"] = 2 * (4 * largest + opt_bytes * largest // max(1, n_params))
    shared = platform == "cpu"
    return MemoryPlan(host, device, host_available, device_available, shared, notes)


def _residual_bytes(model, layer, batch: int, seq: int) -> int:
    """Bytes a block keeps for its backward without recompute (its VJP residuals), traced."""
    from wsjax.streaming.executables import SegmentFunctions

    fns = SegmentFunctions(model, None, model.compute_dtype)
    dt = model.compute_dtype
    w = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dt), layer)
    x = jax.ShapeDtypeStruct((batch, seq, model.cfg.hidden_size), dt)
    key, idx = jax.ShapeDtypeStruct((2,), jnp.uint32), jax.ShapeDtypeStruct((2,), jnp.int32)
    return _bytes(jax.eval_shape(fns.block_fwd_save, w, x, key, idx)[1])


def _estimate_temp(cfg, micro: int, seq: int) -> int:
    """Rough scratch of the largest executable (block backward or the head's logits)."""
    d, f, h, v = cfg.hidden_size, cfg.filter_size, cfg.num_heads, cfg.vocab_size
    block = micro * seq * (6 * d + 3 * f) * 4 + 3 * micro * h * seq * seq * 4
    head = 3 * micro * seq * v * 4
    return max(block, head)
