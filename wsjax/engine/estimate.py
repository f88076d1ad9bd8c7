"""What a training step should take on this device: the device's peaks (FLOP/s and host link
bandwidth), each compiled executable and transfer of a step timed once, and the step's schedule
over those parts.

Peaks: GPUs from a table by ``device_kind`` (dense bf16 tensor-core FLOP/s; host link bandwidth
as measured on typical systems, conservative); on CPU both are measured at start, in about half
a second: a jitted fp32 matmul and a host-to-device copy.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("wsjax.train")

# device_kind substring -> (peak dense bf16 FLOP/s, host-to-device bytes/s).
GPU_PEAKS = {
    "H200": (989e12, 50e9),
    "H100": (989e12, 50e9),  # SXM; PCIe 5 x16 measures ~50-55 GB/s pinned
    "A100": (312e12, 24e9),  # PCIe 4 x16 measures ~24 GB/s pinned
    "L40S": (362e12, 24e9),
    "A10": (125e12, 24e9),
    "V100": (125e12, 12e9),
}


@dataclass
class DevicePeaks:
    flops: float  # FLOP/s
    h2d_bandwidth: float  # bytes/s
    source: str  # "table (H100)" or "measured"


def device_peaks(device=None) -> DevicePeaks:
    device = device or jax.devices()[0]
    kind = str(getattr(device, "device_kind", ""))
    if device.platform == "gpu":
        for name, (flops, bw) in GPU_PEAKS.items():
            if name.lower() in kind.lower():
                return DevicePeaks(flops, bw, f"table ({name})")
        log.warning("unknown GPU %r: measuring peaks (the estimate may be rough)", kind)
    return DevicePeaks(_measure_matmul(device), _measure_h2d(device), "measured")


def _measure_matmul(device, n: int = 512, budget: float = 0.4) -> float:
    x = jax.device_put(jnp.ones((n, n), jnp.float32), device)
    f = jax.jit(lambda a: (a @ a) * 1e-3)
    f(x).block_until_ready()
    best, t_end = float("inf"), time.perf_counter() + budget
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def _measure_h2d(device, nbytes: int = 32 << 20, repeats: int = 3) -> float:
    host = np.ones(nbytes // 4, np.float32)
    best = float("inf")
    for _ in range(repeats):
        src = host + 0.0  # fresh buffer: CPU device_put may otherwise alias
        t0 = time.perf_counter()
        jax.block_until_ready(jax.device_put(src, device, may_alias=False))
        best = min(best, time.perf_counter() - t0)
    return nbytes / max(best, 1e-9)


@dataclass(frozen=True)
class StepTimes:
    """Seconds of one call of each executable of a training step and of each transfer, timed
    on the run's own device (:func:`measure_step_times`)."""

    # embed_fwd, block_fwd, head, block_bwd, embed_bwd, update/<kind>, zeros/<kind>
    compute: dict[str, float]
    to_device: dict[str, float]  # segment kind -> its streamed weights, host -> device
    to_host: dict[str, float]  # segment kind -> its fp32 gradients, device -> host


def estimate_step_seconds(
    times: StepTimes, *, num_layers: int, n_micro: int, overlap: bool = True
) -> float:
    """The step's schedule over measured parts: the zero fills of the gradient accumulators;
    per streamed item (embed, L blocks forward, head, L blocks backward, embed backward)
    max(compute x micro-batches, its transfers: the weights in, and for the backward items the
    gradients out); then the host updates, which run after the global norm is known.
    ``overlap=False`` adds the two instead: on a CPU "device" a transfer is a copy by the same
    cores that compute, so nothing hides it."""
    c = times.compute
    combine = max if overlap else (lambda a, b: a + b)

    def item(exe: str, kind: str, grads: bool) -> float:
        moved = times.to_device[kind] + (times.to_host[kind] if grads else 0.0)
        return combine(c[exe] * n_micro, moved)

    L = num_layers
    # each backward segment starts from fresh zero accumulators (one compiled fill each; the
    # tied wte's gradient is a fifth, filled with the head's)
    total = c["zeros/embed"] + L * c["zeros/block"] + c["zeros/head"] + c.get("zeros/g_wte", 0.0)
    total += item("embed_fwd", "embed", False) + L * item("block_fwd", "block", False)
    total += item("head", "head", True) + L * item("block_bwd", "block", True)
    total += item("embed_bwd", "embed", True)
    return total + c["update/embed"] + L * c["update/block"] + c["update/head"]


def _zeros(shape, dtype, sharding) -> jax.Array:
    """Zeros placed by ``sharding``, in whatever memory kind it names (e.g. pinned_host)."""
    return jax.device_put(np.zeros(shape, dtype), sharding)


def _zeros_like_args(exe, fallback):
    """Fresh zero arguments for a compiled executable, laid out as it expects them (a fresh
    set per call: donated arguments are consumed)."""
    args_info = exe.args_info[0]
    shardings = exe.input_shardings[0]
    info_leaves, treedef = jax.tree.flatten(args_info)
    # one sharding per argument leaf; None where the executable does not use the argument
    try:
        shard_leaves = treedef.flatten_up_to(shardings)
    except (ValueError, TypeError):
        shard_leaves = [None] * len(info_leaves)
    leaves = [
        _zeros(i.shape, i.dtype, sh if sh is not None else fallback)
        for i, sh in zip(info_leaves, shard_leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, leaves)


def measure_step_times(executables, train_set, placement, reps: int = 3) -> StepTimes:
    """Time each executable of a training step (``train_set``: a ``TrainExecutables`` of
    ``executables``, a ``StepExecutables``) on zero inputs, and the weight and gradient transfers
    of each segment kind, on the devices of ``placement``: the median of ``reps`` calls after a
    warm-up (the median, not the best: a step is a median draw of each of its parts)."""

    def zeros(tree, sharding=None):
        return jax.tree.map(lambda a: _zeros(a.shape, a.dtype, sharding or a.sharding), tree)

    def seconds(make_args, fn) -> float:
        times = []
        for _ in range(reps + 1):  # the first call is the warm-up
            args = jax.block_until_ready(make_args())  # building inputs is not the call's time
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])

    def call(exe) -> float:
        return seconds(lambda: _zeros_like_args(exe, placement.replicated), exe)

    names = ("embed_fwd", "block_fwd", "head", "block_bwd", "embed_bwd")
    compute = {name: call(getattr(train_set, name)) for name in names}
    compute.update({f"update/{kind}": call(exe) for kind, exe in train_set.update.items()})
    compute.update({f"zeros/{name}": call(exe) for name, exe in train_set.zeros.items()})
    to_device, to_host = {}, {}
    for kind in executables.weights:
        # the host holds the stream copy's shape of this process (a slice with several)
        stream = jax.tree.map(
            lambda w, h: jax.ShapeDtypeStruct(h.shape, w.dtype),
            executables.weights[kind],
            executables.host_shapes[kind],
        )
        to_device[kind] = seconds(
            lambda s=stream: (zeros(s, placement.stream),),
            lambda w, k=kind: executables.broadcast(k, w),
        )
        to_host[kind] = seconds(
            lambda k=kind: (zeros(executables.grads[k]),),
            lambda g, k=kind: executables.reduce_to_host(k, g),
        )
    return StepTimes(compute, to_device, to_host)
