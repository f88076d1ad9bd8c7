"""Memory plan: host and device bytes of a streamed run, computed before anything is allocated.

Host (per process): fp32 master, optimizer state, compute-dtype streaming copy, the fp32
gradients of every segment (the step holds them until the global norm is known and the updates
have run), offloaded block inputs, one segment's update scratch, the loader's prefetched
batches, and the process itself (Python, the JAX/XLA runtime, on a GPU the CUDA libraries).
Device (per device of the data mesh): weights in flight ((prefetch_depth + 1) segments), kept
block inputs (L x batch x seq x hidden, or a (prefetch_depth + 1)-layer window when offloaded),
the activations flowing through the current layer, gradient accumulators (one summing, one
draining to the host), the batch, and the largest scratch of the compiled executables (their
memory analysis when compiled, else an estimate).

An evaluation plan (``train=False``) has no optimizer state, no gradients and keeps nothing for
a backward pass. Every term is an upper bound of what the engine allocates: the memory tests
compare the plan against live arrays and process RSS.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp

from wsjax.distributed import is_main_process
from wsjax.engine.disk_store import tier_terms
from wsjax.engine.segments import SegmentFunctions
from wsjax.engine.store import one_layer, tree_bytes
from wsjax.errors import PlanError

GiB = 1024**3

# Host memory of the process itself before any model state: Python, NumPy, the JAX/XLA
# runtime and its compiler. Measured VmRSS of a tiny CPU training run here: ~0.45 GiB (the
# plan-vs-RSS test checks this bound). A CUDA process adds the driver context, cuBLAS/cuDNN, the
# XLA GPU compiler and the pinned host memory pool, which grows with the pinned stream copy:
# benchmarks/gpu_check.py on an H100 measured a host peak 1.64 GiB over a 4 GiB allowance at 4
# layers and 5.04 GiB over at GPT-J 6B's 28 (h100-2026-11-26.jsonl); 6 GiB plus half the stream
# copy bounds both (7.1 and 11.6 GiB against 5.6 and 9.0 measured).
PROCESS_OVERHEAD = {"cpu": 1 * GiB, "gpu": 6 * GiB}
GPU_PINNED_POOL_FRACTION = 0.5  # of the stream copy, on top of PROCESS_OVERHEAD["gpu"]
BATCH_BYTES_PER_TOKEN = 12  # input_ids and labels int32, loss_mask float32

# Which knob reduces which term; the refusal names the two largest terms that have one.
DEVICE_KNOBS = {
    "kept_activations": "lower train_input.batch_size (tokens per weight pass) or set "
    "streaming.activation_offload: true",
    "executable_temp": "lower streaming.micro_batch_size (or raise optimizer.grad_accum_steps)",
    "weights_in_flight": "lower streaming.prefetch_depth",
    "activations": "lower train_input.batch_size or max_sequence_length",
    "gradients_held": "set streaming.optimizer_placement: host (gradients to pinned_host)",
}
_MORE_HOSTS = "a host with more RAM, or more hosts (the host store is sharded across processes)"
HOST_KNOBS = {
    "offloaded_activations": "set streaming.activation_offload: false (keep block inputs on "
    "the device) or lower train_input.batch_size",
    "optimizer_state": _MORE_HOSTS,
    "gradients": _MORE_HOSTS,
    "master_fp32": _MORE_HOSTS,
    "stream_copy": _MORE_HOSTS,
}
# with the disk tier on, the rest of the host state can follow it there
TIER_KNOBS = {
    "gradients": "set streaming.disk_gradients: true (with a host update: the held gradients "
    "in the disk tier too)",
    "stream_copy": "set streaming.disk_stream: true (the stream copy in the disk tier too)",
}


@dataclass
class MemoryPlan:
    host: dict[str, int]
    device: dict[str, int]
    host_available: int | None
    device_available: int | None
    shared_memory: bool  # device memory is host memory (CPU backend)
    notes: list[str] = field(default_factory=list)
    # the disk tier (streaming.disk_path): master and optimizer state in files
    disk: dict[str, int] = field(default_factory=dict)
    disk_available: int | None = None  # free bytes of the tier folder's filesystem
    host_without_tier: int | None = None  # host total with master and moments in RAM (training)
    host_with_tier: int | None = None  # host total with them on disk (training)

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    @property
    def device_total(self) -> int:
        return sum(self.device.values())

    @property
    def disk_total(self) -> int:
        return sum(self.disk.values())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["host_total"], d["device_total"] = self.host_total, self.device_total
        d["disk_total"] = self.disk_total
        return d

    def write(self, path: str | os.PathLike) -> None:
        if not is_main_process():  # process 0 writes the run's files
            return
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def summary(self) -> str:
        lines = ["Memory plan (host per process, device per device):"]
        for title, terms, total, avail in (
            ("host", self.host, self.host_total, self.host_available),
            ("device", self.device, self.device_total, self.device_available),
        ):
            have = f" of {avail / GiB:.2f} GiB available" if avail else " (not checked)"
            lines.append(f"  {title}: {total / GiB:.3f} GiB{have}")
            lines += [f"    {k:<22} {v / GiB:10.3f} GiB" for k, v in terms.items()]
        if self.disk:
            have = f" of {self.disk_available / GiB:.2f} GiB free" if self.disk_available else ""
            lines.append(f"  disk (streaming.disk_path): {self.disk_total / GiB:.3f} GiB{have}")
            lines += [f"    {k:<22} {v / GiB:10.3f} GiB" for k, v in self.disk.items()]
        if self.host_with_tier is not None:
            lines.append(
                f"  host without the disk tier {self.host_without_tier / GiB:.3f} GiB, with it "
                f"{self.host_with_tier / GiB:.3f} GiB (streaming.disk_path)"
            )
        if self.shared_memory:
            lines.append("  (CPU backend: device memory is host memory; checked together)")
        lines += [f"  note: {n}" for n in self.notes]
        try:
            self.check()
            lines.append("  verdict: fits")
        except PlanError as e:
            lines.append(f"  verdict: {e}")
        return "\n".join(lines)

    def check(self) -> None:
        """Raise :class:`PlanError` naming the shortfall and the knob that helps (the disk tier
        first, when it alone makes the run fit)."""
        if self.disk and self.disk_available is not None and self.disk_total > self.disk_available:
            raise PlanError(
                _short("disk", self.disk_total, self.disk_available, "free space in "
                       "streaming.disk_path's filesystem or give it a folder on a larger disk")
            )  # fmt: skip
        shared = self.device_total if self.shared_memory else 0
        need, avail = self.host_total + shared, self.host_available
        if avail is not None and need > avail:
            what = "host+device" if self.shared_memory else "host"
            terms = {**self.host, **self.device} if self.shared_memory else self.host
            knobs = {**HOST_KNOBS, **DEVICE_KNOBS} if self.shared_memory else HOST_KNOBS
            knob = _knobs(terms, {**knobs, **TIER_KNOBS} if self.disk else knobs)
            with_tier = None if self.host_with_tier is None else self.host_with_tier + shared
            if not self.disk and with_tier is not None and with_tier <= avail:
                knob = (
                    "set streaming.disk_path: DIR (--disk_path; the disk tier keeps master and "
                    f"optimizer state in files there: the {what} then needs "
                    f"{with_tier / GiB:.2f} GiB, the disk {self.tier_disk_bytes / GiB:.2f} GiB); "
                    f"or {knob}"
                )
            raise PlanError(_short(what, need, avail, knob))
        if self.shared_memory:
            return
        if self.device_available is not None and self.device_total > self.device_available:
            knobs = _knobs(self.device, DEVICE_KNOBS)
            raise PlanError(_short("device", self.device_total, self.device_available, knobs))

    @property
    def tier_disk_bytes(self) -> int:
        """Bytes the disk tier would hold: master and optimizer state (training plans)."""
        if self.disk:
            return self.disk_total
        return self.host.get("master_fp32", 0) + self.host.get("optimizer_state", 0)

    def fits_only_with_tier(self) -> bool:
        """The plan uses the tier, fits, and would not fit without it."""
        if not self.disk or self.host_available is None or self.host_without_tier is None:
            return False
        shared = self.device_total if self.shared_memory else 0
        return self.host_without_tier + shared > self.host_available


def _knobs(terms: dict[str, int], knobs: dict[str, str]) -> str:
    """The knobs of the two largest terms that have one, each with the terms it reduces."""
    ranked = sorted(((v, k) for k, v in terms.items() if k in knobs), reverse=True)
    named: dict[str, list[str]] = {}
    for v, k in ranked:
        if knobs[k] in named or len(named) < 2:
            named.setdefault(knobs[k], []).append(f"{k} {v / GiB:.2f} GiB")
    return "; ".join(f"{knob} ({', '.join(sizes)})" for knob, sizes in named.items())


def _short(what: str, need: int, avail: int, knob: str) -> str:
    return (
        f"the run does not fit: it needs {need / GiB:.2f} GiB of {what} "
        f"{'space' if what == 'disk' else 'memory'}, "
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


def device_budget(streaming_cfg, device=None) -> int | None:
    """Device bytes a plan is checked against: ``streaming.device_memory_gb`` when set (a
    target accelerator, whatever this machine is), else what ``device`` reports free (None
    without a device, or where it reports nothing: the CPU backend)."""
    if streaming_cfg.device_memory_gb is not None:
        return int(streaming_cfg.device_memory_gb * GiB)
    return None if device is None else available_device_bytes(device)


def segment_params(model) -> dict[str, int]:
    """Parameters each streamed segment carries: embed, one block, head (+ wte when tied)."""
    shapes = model.param_shapes()
    layer = one_layer(shapes["blocks"])
    tied_wte = tree_bytes(shapes["embed"]["wte"]) // 4 if model.tied else 0
    return {
        "embed": tree_bytes(shapes["embed"]) // 4,
        "block": tree_bytes(layer) // 4,
        "head": tree_bytes(shapes["head"]) // 4 + tied_wte,
    }


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
    train: bool = True,
    input_prefetch: int = 2,
    processes: int = 1,
    disk_available: int | None = None,
) -> MemoryPlan:
    """The plan of a training (or, ``train=False``, evaluation) step on ``batch_size`` x ``seq``
    tokens, with ``input_prefetch`` batches queued by the loader; allocates nothing.

    ``n_devices`` counts the devices of all ``processes``; host bytes are per process: with
    several, each host holds 1/P of the weights, optimizer state and gradients
    (wsjax.engine.shards) and reads 1/P of each batch.

    It is long because it lists every host and device term in one place, each with the line
    that sizes it, so a reader checks the plan against the run in one screen. A training plan
    also says what the host needs with and without the disk tier, whose folder's free bytes
    are ``disk_available``; with ``streaming.disk_path`` master and optimizer state are disk
    terms.
    """
    cfg, s = model.cfg, config.streaming
    shapes = model.param_shapes()
    dt = jnp.dtype(model.compute_dtype).itemsize
    n_params = model.num_params()
    layer = one_layer(shapes["blocks"])
    largest = max(segment_params(model).values())
    L = model.num_layers
    per_dev_batch = max(1, batch_size // n_devices)
    act = per_dev_batch * seq * cfg.hidden_size * dt  # one (B, T, D) activation, whole batch
    micro_dev = max(1, per_dev_batch // n_micro)
    gpu = platform != "cpu"

    host = {"master_fp32": 4 * n_params, "stream_copy": dt * n_params}
    if train:
        host["optimizer_state"] = tree_bytes(jax.eval_shape(optimizer.init, shapes))
        # the step keeps every segment's fp32 gradient on the host until its end: with clipping
        # the updates need the global norm first, and without it they are held all the same
        host["gradients"] = 4 * n_params
        # one segment's update: the new stream copy and the update's fp32 scratch
        host["update_scratch"] = (4 + dt) * largest
    if processes > 1:  # each host holds its slice of every leaf
        host = {k: -(-v // processes) for k, v in host.items()}
    rows = -(-batch_size // processes)  # the rows of each batch this process reads
    host["input_batches"] = (input_prefetch + 2) * rows * seq * BATCH_BYTES_PER_TOKEN
    host["process_overhead"] = PROCESS_OVERHEAD["gpu" if gpu else "cpu"]
    if gpu:
        host["process_overhead"] += int(GPU_PINNED_POOL_FRACTION * host["stream_copy"])

    notes = []
    if compile_records:
        temps = (r["temp_bytes"] if isinstance(r, dict) else r.temp_bytes for r in compile_records)
        temp = max(temps)
        notes.append("executable_temp from the compiled executables' memory analysis")
    else:
        temp = _estimate_temp(cfg, micro_dev, seq, train)
        notes.append("executable_temp estimated (not compiled yet)")

    # with several processes a segment also arrives as this device's 1/n_devices piece before
    # the all-gather makes it whole
    pieces = largest * dt // n_devices if processes > 1 else 0
    device = {
        "weights_in_flight": (s.prefetch_depth + 1) * (largest * dt + pieces),
        "activations": 2 * act,
        "batch": 3 * per_dev_batch * seq * 4,
        "executable_temp": temp,
    }
    if train:
        kept = act
        if not s.recompute:
            kept = _residual_bytes(model, layer, per_dev_batch, seq, s.recompute_policy)
        if s.activation_offload:
            host["offloaded_activations"] = L * kept * n_devices
            device["kept_activations"] = (s.prefetch_depth + 1) * kept
        else:
            device["kept_activations"] = L * kept
        device["gradient_accumulators"] = 2 * 4 * largest  # one summing, one draining to host
        if s.optimizer_placement == "device":
            opt_per_param = host["optimizer_state"] / max(1, n_params)
            device["optimizer_update"] = int(2 * (4 + opt_per_param) * largest)
            if processes == 1:  # the gradients stay on the device until the global norm
                device["gradients_held"] = host.pop("gradients")
    else:
        notes.append("evaluation: no optimizer state, no gradients, nothing kept for a backward")
    if processes > 1:
        notes.append(f"host bytes are per process, for {processes} processes")
    plan = MemoryPlan(host, device, host_available, device_available, not gpu, notes)
    if train:
        tier_terms(plan, model, optimizer, processes, s, disk_available)
    return plan


def _residual_bytes(model, layer, batch: int, seq: int, policy: str = "none") -> int:
    """Bytes a block keeps for its backward without recompute (its VJP residuals, those
    ``streaming.recompute_policy`` saves), traced."""
    fns = SegmentFunctions(model, None, model.compute_dtype, policy)
    dt = model.compute_dtype
    w = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dt), layer)
    x = jax.ShapeDtypeStruct((batch, seq, model.cfg.hidden_size), dt)
    key, idx = jax.ShapeDtypeStruct((2,), jnp.uint32), jax.ShapeDtypeStruct((2,), jnp.int32)
    return tree_bytes(jax.eval_shape(fns.block_fwd_save, w, x, key, idx)[1])


def _estimate_temp(cfg, micro: int, seq: int, train: bool) -> int:
    """Scratch of the largest executable (block backward or the head's logits) at fp32: the
    MLP's (T, F) intermediates, and up to 4 score- or logit-sized tensors (scores, softmax,
    their gradient, a cast). XLA CPU's memory analysis for GPT-J 6B at micro-batch 4: block
    backward 5.25 GiB (this estimate: 6.25), head 6.01 GiB = 3.9 logit tensors (6.16).
    SwiGLU keeps gate, up, silu(gate) and their product, and their cotangents, where GELU has
    fc_in's output and gelu's: XLA CPU's analysis of a Llama block backward (recompute, fp32,
    D 1024, F 3584, 2048 tokens) held 331.6 MB, 7.3 F-wide rows beyond the 6 D-wide ones and the
    scores, so 9 (a 15% margin; at 1024-token sequences 483 MB against 583). Grouped-query
    attention has as many (query-head) scores as multi-head, and smaller k / v."""
    d, f, h, v = cfg.hidden_size, cfg.filter_size, cfg.num_heads, cfg.vocab_size
    copies = 4 if train else 1
    mlp_rows = 9 if cfg.nonlinearity == "swiglu" else 3
    block = micro * seq * (6 * d + mlp_rows * f) * 4 + copies * micro * h * seq * seq * 4
    head = copies * micro * seq * v * 4
    return max(block, head)


# ---- the GPU client's host memory limit -------------------------------------------------------
HOST_LIMIT_ENV = "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"
HOST_LIMIT_MARGIN = 1.25  # the pinned pool's rounding and the update's scratch, on the plan


def host_memory_limit_gb(plan: MemoryPlan) -> int:
    """GiB for ``XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB``: the GPU client caps its pinned_host
    allocations at this (its default refuses a 6B model's ~100 GB of host state). The plan's
    host total (master, moments, stream copy, gradients, ...: all of it lives in pinned_host
    since the state moved off the CPU client) with a 25% margin, rounded up."""
    return int(math.ceil(HOST_LIMIT_MARGIN * plan.host_total / GiB))


def set_host_memory_limit(plan: MemoryPlan, environ=None) -> int | None:
    """Set the limit from ``plan`` in ``environ`` (``os.environ``) unless the user set it;
    return the value set, or None. Effective only before the GPU backend starts: call it
    before anything touches a device."""
    environ = os.environ if environ is None else environ
    if environ.get(HOST_LIMIT_ENV):
        return None
    gb = host_memory_limit_gb(plan)
    environ[HOST_LIMIT_ENV] = str(gb)
    return gb
