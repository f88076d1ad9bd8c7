"""What every benchmark shares: the machine description, the results file, the machine's limits
measured in the same process (matmul peak, memory bandwidth), timing, targets, and the
GPT-J-shaped test models.

Each benchmark prints one JSON line per setting and appends it to
``<results_dir>/<hostname>-<date>.jsonl`` (:func:`emit`); every line carries :func:`machine`.
A target is ``{"name", "value", "threshold", "reached"}`` (:func:`target`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---- results and machine ------------------------------------------------------------------
def parse_args(doc: str, add: Callable[[argparse.ArgumentParser], None] | None = None):
    """The common command line: ``--smoke`` and ``--results_dir`` (+ the script's own)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a seconds-long run (for the tests)")
    p.add_argument("--results_dir", default=str(RESULTS_DIR))
    if add is not None:
        add(p)
    return p.parse_args()


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The GPT-J-shaped model every depth/throughput sweep builds (``gptj_dict``)."""
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--layers", default="4,8,16,24")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--mixed_precision", action="store_true", help="bf16 streaming and matmuls")


def results_path(results_dir: str | os.PathLike) -> Path:
    date = datetime.date.today().isoformat()
    return Path(results_dir) / f"{socket.gethostname()}-{date}.jsonl"


def emit(record: dict, out: Path) -> None:
    """Print ``record`` as one JSON line and append it to ``out``."""
    line = json.dumps(record)
    print(line, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(line + "\n")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """Where and when: host, CPU model and cores, JAX version, backend and device, load."""
    dev = jax.devices()[0]
    return {
        "host": socket.gethostname(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "jax": jax.__version__,
        "backend": dev.platform,
        "device_kind": str(getattr(dev, "device_kind", "")),
        "num_devices": jax.device_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def target(name: str, value: float, threshold: float, *, higher_is_better: bool = True) -> dict:
    reached = value >= threshold if higher_is_better else value <= threshold
    return {
        "name": name,
        "value": round(float(value), 4),
        "threshold": threshold,
        "reached": bool(reached),
    }


# ---- timing -------------------------------------------------------------------------------
def time_calls(fn: Callable[[], object], *, warmup: int = 1, reps: int = 3) -> dict:
    """Seconds of ``fn()`` (which must block until done): best, median, all."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"best": min(times), "median": statistics.median(times), "all": times}


def take_turns(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict:
    """``{name: [seconds, ...]}`` of each ``fns[name]()`` (which must block until done): ``warmup``
    untimed calls each, then ``rounds`` rounds of one call each, in turn. All stay built and take
    turns, so a change in the machine's load (other virtual machines share its cores) falls on
    all of them alike, instead of on whichever ran during it."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


# ---- the machine's limits, measured in the same run ---------------------------------------
def matmul_peak(n: int = 2048, reps: int = 5, dtype=jnp.float32, device=None) -> dict:
    """Best-of FLOP/s of a jitted n x n x n matmul (2 n^3 FLOPs) on ``device``."""
    device = device or jax.devices()[0]
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    a = jax.device_put(jax.random.normal(k1, (n, n), dtype), device)
    b = jax.device_put(jax.random.normal(k2, (n, n), dtype), device)
    f = jax.jit(lambda a, b: a @ b)
    t = time_calls(lambda: f(a, b).block_until_ready(), warmup=2, reps=reps)
    flops = 2.0 * n**3
    return {
        "n": n,
        "dtype": jnp.dtype(dtype).name,
        "flops_per_sec": flops / t["best"],
        "median_flops_per_sec": flops / t["median"],
    }


def memory_bandwidth(nbytes: int = 256 << 20, reps: int = 5) -> dict:
    """Host memory bandwidth, best-of: numpy copy (2 x bytes) and a jitted triad (3 x bytes).

    ``bytes_per_sec`` is the larger of the two: the most this machine showed it can move.
    """
    n = nbytes // 4
    b = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    c = np.ones(n, np.float32)
    a = np.empty_like(b)
    copy = time_calls(lambda: np.copyto(a, b), warmup=1, reps=reps)
    cpu = jax.devices("cpu")[0]
    jb, jc = jax.device_put(b, cpu), jax.device_put(c, cpu)
    triad = jax.jit(lambda b, c: b + np.float32(1.5) * c)
    tri = time_calls(lambda: triad(jb, jc).block_until_ready(), warmup=2, reps=reps)
    copy_bw, triad_bw = 2 * nbytes / copy["best"], 3 * nbytes / tri["best"]
    return {
        "array_bytes": nbytes,
        "copy_bytes_per_sec": copy_bw,
        "triad_bytes_per_sec": triad_bw,
        "bytes_per_sec": max(copy_bw, triad_bw),
    }


# ---- memory as allocated (never the engine's own ledger) ----------------------------------
def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory from /proc/self/status: VmRSS now, VmHWM its peak."""
    status = Path("/proc/self/status").read_text()
    for line in status.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def live_bytes_by_kind() -> dict[str, int]:
    """Bytes of every array JAX holds now (``jax.live_arrays()``), by memory kind."""
    out: dict[str, int] = {}
    for a in jax.live_arrays():
        if a.is_deleted():
            continue
        kind = getattr(a.sharding, "memory_kind", None) or "device"
        out[kind] = out.get(kind, 0) + a.nbytes
    return out


class LivePeak:
    """The peak of ``jax.live_arrays()`` bytes while an engine steps.

    It samples whenever the engine touches its residency ledger (a fetch issued, weights
    released, an executable dispatched, kept values stored or dropped; the ledger's public
    ``observers``): the ledger says only WHEN to look; the number is what JAX really holds at
    that moment, plus one sample per :meth:`sample` call (e.g. after each step).
    ``forward_kind_peaks``: each memory kind's peak while a step's forward runs (from the start
    of a step until its first gradient buffer is placed), when the kept block inputs all live.
    """

    def __init__(self, engine):
        self.peak_total = 0
        self.peak_by_kind: dict[str, int] = {}  # the split of the total at its peak
        self.kind_peaks: dict[str, int] = {}  # each memory kind's own peak
        self.forward_kind_peaks: dict[str, int] = {}
        self._forward = True
        engine.residency.observers.append(self._observe)

    def _observe(self, event: str, name: str, nbytes: int) -> None:
        if event == "add" and name.startswith("grads:"):
            self._forward = False
        by_kind = self._sample()
        if self._forward:
            for kind, n in by_kind.items():
                self.forward_kind_peaks[kind] = max(self.forward_kind_peaks.get(kind, 0), n)

    def sample(self) -> int:
        """A sample now (e.g. after a step); the next step's forward is watched again."""
        self._forward = True
        return sum(self._sample().values())

    def _sample(self) -> dict[str, int]:
        by_kind = live_bytes_by_kind()
        total = sum(by_kind.values())
        if total > self.peak_total:
            self.peak_total, self.peak_by_kind = total, by_kind
        for kind, nbytes in by_kind.items():
            self.kind_peaks[kind] = max(self.kind_peaks.get(kind, 0), nbytes)
        return by_kind

    def reset(self) -> None:
        self.peak_total, self.peak_by_kind, self.kind_peaks = 0, {}, {}
        self.forward_kind_peaks = {}


# ---- the models under test ----------------------------------------------------------------
def gptj_dict(
    layers: int,
    hidden: int,
    batch: int,
    seq: int,
    *,
    vocab: int = 4096,
    heads: int | None = None,
    mixed_precision: bool = False,
    streaming: dict | None = None,
    grad_accum_steps: int = 1,
) -> dict:
    """A GPT-J-shaped config (head_dim 64, filter 4 x hidden, rotary) as a params dict."""
    heads = heads or max(1, hidden // 64)
    return {
        "model": {
            "model_family": "gptj",
            "hidden_size": hidden,
            "num_heads": heads,
            "num_hidden_layers": layers,
            "filter_size": 4 * hidden,
            "vocab_size": vocab,
            "max_position_embeddings": seq,
            "position_embedding_type": "rotary",
            "rotary_dim": min(64, hidden // heads),
            "mixed_precision": mixed_precision,
        },
        "optimizer": {
            "optimizer_type": "adamw",
            "learning_rate": 1e-4,
            "weight_decay_rate": 0.01,
            "max_gradient_norm": 1.0,
            "grad_accum_steps": grad_accum_steps,
        },
        "runconfig": {"seed": 1},
        "streaming": dict(streaming or {}),
        "train_input": {
            "data_processor": "SyntheticDataProcessor",
            "data_dir": "synthetic",
            "batch_size": batch,
            "max_sequence_length": seq,
        },
    }


def random_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "input_ids": rng.integers(0, vocab, (batch, seq)).astype(np.int32),
        "labels": rng.integers(0, vocab, (batch, seq)).astype(np.int32),
        "loss_mask": np.ones((batch, seq), np.float32),
    }


def device_memory_bytes(device_memory_gb: float | None) -> tuple[int | None, str]:
    """The device memory a run may use: ``--device_memory_gb`` if given, else what the device
    reports (GPU) or the host's available memory (CPU: device memory is host memory)."""
    if device_memory_gb:
        return int(device_memory_gb * 2**30), "nominal (--device_memory_gb)"
    from wsjax.engine.plan import available_device_bytes, available_host_bytes

    dev = jax.devices()[0]
    if dev.platform != "cpu":
        avail = available_device_bytes(dev)
        if avail:
            return avail, "device memory_stats"
    return available_host_bytes(), "host MemAvailable (CPU: device memory is host memory)"


def compiled_bytes(compiled) -> int:
    """Device bytes a compiled executable needs: arguments + outputs (minus aliased) + temps."""
    m = compiled.memory_analysis()
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )


def train_tokens_per_sec(config_path: str | os.PathLike, steps: int = 5) -> float:
    """What the engine consumes: tokens/s of ``train_step`` on the config's batch shape
    (random tokens; best of ``steps`` after a compiling warm-up step)."""
    from wsjax.config import load_config
    from wsjax.engine import StreamingEngine
    from wsjax.models import get_model

    cfg = load_config(config_path)
    model = get_model(cfg.model)
    b, t = cfg.train_input.batch_size, cfg.train_input.max_sequence_length
    batch = random_batch(b, t, cfg.model.vocab_size)
    eng = StreamingEngine(model, cfg)
    best = time_calls(lambda: eng.train_step(batch), warmup=1, reps=steps)["best"]
    return b * t / best
