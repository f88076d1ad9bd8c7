"""What a run reports: FLOPs and MFU, device peaks, the step-time estimate, performance.json,
TensorBoard events and the log lines / progress bar.

MFU uses the standard model-FLOPs count (PaLM, appendix B): per token,
``6 * N + 12 * L * hidden * seq`` where N counts the parameters that take part in matmuls
(every parameter except the embedding tables wte/wpe; with tied embeddings the head matmul's
``hidden * vocab`` is counted) and the second term is attention's QK^T and AV, forward and
backward. Recomputation in the backward is not counted (that is what makes it *model* FLOPs).

Peaks: GPUs from a table by ``device_kind`` (dense bf16 tensor-core FLOP/s; host link bandwidth
as measured on typical systems, conservative); on CPU both are measured at start, in about half
a second: a jitted fp32 matmul and a host-to-device copy.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

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
INPUT_BOTTLENECK_SHARE = 0.10  # loader wait above this share of step time is reported


def model_flops_per_token(model_cfg, num_params: int, seq: int) -> float:
    """Model FLOPs per trained token (forward + backward), PaLM's formula; see module doc."""
    d, v, L = model_cfg.hidden_size, model_cfg.vocab_size, model_cfg.num_hidden_layers
    n = num_params - v * d  # wte is a lookup
    if model_cfg.position_embedding_type == "learned":
        n -= model_cfg.max_position_embeddings * d
    if model_cfg.share_embedding_weights:
        n += v * d  # the head multiplies by wte.T
    return 6.0 * n + 12.0 * L * d * seq


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


def measure_step_times(program, executables, placement, reps: int = 3) -> StepTimes:
    """Time each executable of a training step (``executables``: a ``TrainExecutables`` of
    ``program``, a ``StepExecutables``) on zero inputs, and the weight and gradient transfers
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
    compute = {name: call(getattr(executables, name)) for name in names}
    compute.update({f"update/{kind}": call(exe) for kind, exe in executables.update.items()})
    compute.update({f"zeros/{name}": call(exe) for name, exe in executables.zeros.items()})
    to_device, to_host = {}, {}
    for kind in program.weights:
        # the host holds the stream copy's shape of this process (a slice with several)
        stream = jax.tree.map(
            lambda w, h: jax.ShapeDtypeStruct(h.shape, w.dtype),
            program.weights[kind],
            program.host_shapes[kind],
        )
        to_device[kind] = seconds(
            lambda s=stream: (zeros(s, placement.stream),),
            lambda w, k=kind: program.broadcast(k, w),
        )
        to_host[kind] = seconds(
            lambda k=kind: (zeros(program.grads[k]),),
            lambda g, k=kind: program.reduce_to_host(k, g),
        )
    return StepTimes(compute, to_device, to_host)


@dataclass
class Performance:
    """``performance/performance.json`` (Cerebras keys first, then wsjax's details)."""

    compile_time: float = 0.0
    est_samples_per_sec: float = 0.0
    programming_time: float = 0.0
    samples_per_sec: float = 0.0
    suspected_input_bottleneck: bool = False
    total_samples: int = 0
    total_time: float = 0.0
    input_wait_fraction: float = 0.0
    input_wait_threshold: float = INPUT_BOTTLENECK_SHARE
    tokens_per_sec: float = 0.0
    mfu: float = 0.0
    peak_flops: float = 0.0
    h2d_bandwidth: float = 0.0
    peaks_source: str = ""
    weight_init_time: float = 0.0

    def write(self, path: Path) -> None:
        from wsjax.distributed import is_main_process

        if not is_main_process():  # process 0 writes the run's files
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, path)


class Summaries:
    """tensorboardX writers under ``<model_dir>/train`` and ``<model_dir>/eval``."""

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        self._writers: dict = {}

    def _writer(self, split: str):
        if split not in self._writers:
            from tensorboardX import SummaryWriter

            self._writers[split] = SummaryWriter(str(self.model_dir / split))
        return self._writers[split]

    def scalars(self, split: str, values: dict, step: int) -> None:
        from wsjax.distributed import is_main_process

        if not is_main_process():  # process 0 writes the events
            return
        w = self._writer(split)
        for tag, value in values.items():
            if value is not None and math.isfinite(float(value)):
                w.add_scalar(tag, float(value), step)
        w.flush()

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers.clear()


def train_scalars(m: dict, *, samples_per_sec: float, tokens_per_sec: float, mfu: float) -> dict:
    """TensorBoard tags of one training step's metrics."""
    out = {
        "loss": m.get("train/loss"),
        "lr": m.get("train/lr"),
        "grad_norm": m.get("train/grad_norm"),
        "throughput/samples_per_sec": samples_per_sec,
        "throughput/tokens_per_sec": tokens_per_sec,
        "throughput/mfu": mfu,
        "input/wait_seconds": m.get("input/wait_seconds"),
    }
    for k, v in m.items():
        if k.startswith(("stream/", "memory/")):
            out[k] = v
    return out


def eval_scalars(loss_sum: float, count: float, correct: float) -> dict:
    loss = loss_sum / max(count, 1.0)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "accuracy": correct / max(count, 1.0),
    }


# ---- log output ---------------------------------------------------------------------------------
class _CurrentStdout(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a record is emitted: notebooks and pytest's
    capture replace it, and a handler holding the first one would write to a closed file."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; always sys.stdout
        pass


def setup_logging(log_file: Path | None = None) -> logging.Handler | None:
    """Plain ``INFO: message`` lines on stdout for the ``wsjax`` loggers (once per process);
    with ``log_file``, also into that file (the returned handler; remove it when done).

    In a multi-process run only process 0 logs as above and writes ``log_file``; the others log
    warnings and errors only, each line prefixed ``[process N]``, and get a handler that writes
    nothing (so the caller's remove/close stays the same)."""
    from wsjax.distributed import process_index

    index = process_index()
    root = logging.getLogger("wsjax")
    console = next((h for h in root.handlers if getattr(h, "_wsjax_console", False)), None)
    if console is None:
        console = _CurrentStdout()
        console._wsjax_console = True
        root.addHandler(console)
        root.setLevel(logging.INFO)
        root.propagate = False
    # set on every call: the process index is known only once the run has joined the others
    prefix = f"[process {index}] " if index else ""
    console.setFormatter(logging.Formatter(prefix + "%(levelname)s: %(message)s"))
    if index != 0:
        root.setLevel(logging.WARNING)
    if log_file is None:
        return None
    if index != 0:
        return logging.NullHandler()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    fh = _RunLogFile(log_file)
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s: %(message)s"))
    root.addHandler(fh)
    return fh


class _RunLogFile(logging.FileHandler):
    """run.log: on a full disk a line is dropped quietly (logging would print a traceback); the
    run's next real write reports the disk in one line."""

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handleError(record)


class Progress:
    """A tqdm bar (steps, loss, samples/s, ETA) when stdout is a terminal, else nothing."""

    def __init__(self, start: int, total: int, enabled: bool | None = None):
        enabled = sys.stdout.isatty() if enabled is None else enabled
        self._bar = None
        self._redirect = None
        if enabled and total > start:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._redirect = logging_redirect_tqdm([logging.getLogger("wsjax")])
            self._redirect.__enter__()
            self._bar = tqdm(
                total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stdout
            )

    def update(self, loss: float, samples_per_sec: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{samples_per_sec:.1f}")
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._redirect.__exit__(None, None, None)
            self._bar = None
