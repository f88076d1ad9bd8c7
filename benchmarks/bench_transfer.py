"""Transfers: host-to-device and device-to-host bandwidth through the engine's own path, against a
plain copy of the same bytes measured in the same run.

    python benchmarks/bench_transfer.py [--smoke] [--results_dir DIR] [--sizes_mb 64,256,400]

The engine's path (the shardings of ``StreamingEngine``): h2d = ``jax.device_put`` of a
streaming copy held in the ``pinned_host`` memory kind to the replicated device sharding (how
weights arrive); d2h = ``jax.device_put`` of a device array to ``act_host`` (how activations are
offloaded) and to the host compute device (how gradients return), plus two candidate gradient
paths: through the accelerator's pinned host memory, and through numpy (``jax.device_get``).
The plain copy: on CPU, ``np.copyto`` of the same bytes between preallocated buffers; on a
GPU, a pinned-memory copy by the CUDA runtime through torch when it is installed
(``raw_pinned``), else ``np.copyto``.
Best of ``--reps``. One JSON line per size, with the target engine h2d / plain >= 0.8.
400 MB is a GPT-J 6B layer in bf16.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as C  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from wsjax.config import config_from_dict  # noqa: E402
from wsjax.engine import StreamingEngine  # noqa: E402
from wsjax.models import get_model  # noqa: E402


def _args(p) -> None:
    p.add_argument("--sizes_mb", default="64,256,400")
    p.add_argument("--reps", type=int, default=5)


def best_seconds(fn, reps: int) -> float:
    """Best of ``reps``; ``fn`` returns what to block on (freed before the next rep)."""
    best = float("inf")
    for _ in range(reps + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        out = fn()
        jax.block_until_ready(out)
        best = min(best, time.perf_counter() - t0)
        del out
    return best


def torch_pinned(nbytes: int, reps: int) -> dict | None:
    """The CUDA runtime's pinned copy (through torch), when a GPU and torch are at hand."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    out = {}
    for name, (dst, src) in {"h2d": (dev, host), "d2h": (host, dev)}.items():
        best = float("inf")
        for _ in range(reps + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        out[name] = nbytes / best
    return out


def main() -> None:
    args = C.parse_args(__doc__, _args)
    if args.smoke:
        args.sizes_mb, args.reps = "4", 2
    out = C.results_path(args.results_dir)
    cfg = config_from_dict(C.gptj_dict(1, 64, 2, 32, vocab=256))
    eng = StreamingEngine(get_model(cfg.model), cfg, allocate=False)
    common = {
        "bench": "transfer",
        **C.machine(),
        "stream_memory_kind": eng.placement.stream.memory_kind,
        "act_host_memory_kind": eng.placement.activation_memory_kind,
    }
    for mb in (int(x) for x in args.sizes_mb.split(",")):
        C.emit({**common, **measure_size(eng, mb << 20, args.reps)}, out)


def measure_size(eng, nbytes: int, reps: int) -> dict:
    src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8).view(np.float32)
    stream = jax.device_put(src, eng.placement.stream)  # where the engine keeps the copy
    act_host = eng.placement.offloaded(eng.placement.data)  # where offloaded activations go
    on_dev = jax.device_put(src, eng.placement.replicated)
    on_host = jax.device_put(src, eng.placement.host)  # where the host update writes its output
    jax.block_until_ready((stream, on_dev, on_host))
    secs = {
        "h2d": best_seconds(lambda: jax.device_put(stream, eng.placement.replicated), reps),
        "d2h_act": best_seconds(lambda: jax.device_put(on_dev, act_host), reps),
        "d2h_grads": best_seconds(lambda: jax.device_put(on_dev, eng.placement.host), reps),
        # candidate gradient paths (a GPU's device -> CPU-client copy is slow): through the
        # accelerator's pinned host memory, and through numpy (jax.device_get)
        "d2h_grads_via_pinned": best_seconds(
            lambda: jax.device_put(jax.device_put(on_dev, act_host), eng.placement.host), reps
        ),
        "d2h_grads_via_numpy": best_seconds(
            lambda: jax.device_put(jax.device_get(on_dev), eng.placement.host), reps
        ),
        "d2h_device_get": best_seconds(lambda: jax.device_get(on_dev), reps),
        # the host update's fresh stream copy moving into the accelerator's host memory kind
        "host_to_stream": best_seconds(lambda: jax.device_put(on_host, eng.placement.stream), reps),
    }
    dst = np.empty_like(src)
    plain = nbytes / best_seconds(lambda: np.copyto(dst, src), reps)
    raw = torch_pinned(nbytes, reps)
    rec = {
        "setting": f"{nbytes >> 20}MB",
        "bytes": nbytes,
        **{f"engine_{k}_bytes_per_sec": round(nbytes / s) for k, s in secs.items()},
        "plain_copy_bytes_per_sec": round(plain),
        "baseline": "raw_pinned (torch CUDA)" if raw else "np.copyto",
    }
    base_h2d = raw["h2d"] if raw else plain
    base_d2h = raw["d2h"] if raw else plain
    if raw:
        rec["raw_pinned_h2d_bytes_per_sec"] = round(raw["h2d"])
        rec["raw_pinned_d2h_bytes_per_sec"] = round(raw["d2h"])
    rec["h2d_ratio"] = round(nbytes / secs["h2d"] / base_h2d, 4)
    rec["d2h_act_ratio"] = round(nbytes / secs["d2h_act"] / base_d2h, 4)
    for k in ("d2h_grads", "d2h_grads_via_pinned", "d2h_grads_via_numpy", "d2h_device_get"):
        rec[f"{k}_ratio"] = round(nbytes / secs[k] / base_d2h, 4)
    if rec["d2h_grads_ratio"] > 10:  # faster than memory: the array did not move
        rec["d2h_grads_note"] = "no copy: the host compute device is the device (CPU)"
    rec["target"] = C.target("engine h2d / plain copy", rec["h2d_ratio"], 0.8)
    return rec


if __name__ == "__main__":
    main()
