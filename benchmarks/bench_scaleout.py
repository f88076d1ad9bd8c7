"""Scale-out: one process against P processes on the same global batch (issue 12).

    python benchmarks/bench_scaleout.py [--smoke] [--results_dir DIR] [--processes 1,2]
        [--layers 4] [--hidden 512] [--batch 8] [--seq 256] [--steps 5]

For each P, ``python -m wsjax.launch --nproc P`` (P = 1 runs the worker directly) trains the
same GPT-J-shaped model on the same global batch, one CPU device per process. Each process
reports what it measured: tokens/s of the global batch (median step), the host update (every
segment's update executable on this process's slices, timed alone, median of 3), its live
array bytes and its RSS. One line per P, then a line of ratios against P = 1.

On a GPU node, one process per GPU (the launcher gives process i GPU i):

    python -m wsjax.launch --nproc 8 -- -p configs/params_gptj_6B.yaml -o model_dir

and this benchmark with ``--processes 1,2,4,8 --devices gpu``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also under -m

import _common as C  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _args(p) -> None:
    p.add_argument("--processes", default="1,2")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--devices", default="cpu", choices=("cpu", "gpu"))


def worker(out: Path, layers: int, hidden: int, batch: int, seq: int, steps: int) -> None:
    """One process of a P-process run (started by the launcher)."""
    import gc

    from wsjax import distributed

    distributed.initialize()
    import jax

    from wsjax.config import config_from_dict
    from wsjax.engine import StreamingEngine
    from wsjax.models import get_model
    from wsjax.trainer.setup import process_rows_of

    config = config_from_dict(C.gptj_dict(layers, hidden, batch, seq))
    engine = StreamingEngine(get_model(config.model), config)
    rows = process_rows_of(config, batch, train=True)
    full = C.random_batch(batch, seq, config.model.vocab_size)
    local = full if rows is None else {k: v[rows] for k, v in full.items()}
    engine.train_step(local)  # compile and warm up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.train_step(local)
        times.append(time.perf_counter() - t0)

    # the host update of this process's slices, every segment, timed alone: one process at a
    # time (on a cluster each process has a host of its own; here they share these cores)
    updates = engine.executables((batch, seq), train=True).training(recompute=True).update
    store = engine.store
    update_times = []
    for turn in range(jax.process_count()):
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"update-turn-{turn}")
        if turn == jax.process_index():
            update_times = _time_updates(updates, store)
    gc.collect()
    record = {
        "step_seconds": statistics.median(times),
        "tokens_per_sec": batch * seq / statistics.median(times),
        "host_update_seconds": statistics.median(update_times),
        "live_bytes": sum(a.nbytes for a in jax.live_arrays()),
        "rss_bytes": C.rss_bytes(),
        "num_params": engine.model.num_params(),
    }
    (out / f"process{jax.process_index()}.json").write_text(json.dumps(record))


def _time_updates(updates, store, reps: int = 3) -> list[float]:
    """Seconds of one update of every segment (copies of the store's slices), ``reps`` times."""
    import jax
    import numpy as np

    from wsjax.engine.store import segment_kind

    # fresh buffers where the store keeps its own (pinned_host on one process): the update
    # donates them
    copy = lambda t: jax.tree.map(lambda a: jax.device_put(np.asarray(a), a.sharding), t)  # noqa: E731
    times = []
    for _ in range(reps):
        total = 0.0
        for name in store.names:
            args = jax.block_until_ready(
                (copy(store.master[name]), copy(store.opt_state[name]), copy(store.master[name]))
            )
            t0 = time.perf_counter()
            jax.block_until_ready(updates[segment_kind(name)](*args, np.float32(1.0)))
            total += time.perf_counter() - t0
        times.append(total)
    return times


def run(processes: int, args, out: Path) -> list[dict]:
    cmd = [str(Path(__file__).resolve()), "--worker", str(out)]
    cmd += [f"--{k}={getattr(args, k)}" for k in ("layers", "hidden", "batch", "seq", "steps")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSJAX_")}
    if args.devices == "cpu":
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    if processes == 1:
        subprocess.run([sys.executable, *cmd], env=env, check=True, cwd=REPO)
    else:
        env.pop("XLA_FLAGS", None)  # the launcher sets one device per process
        launch = [sys.executable, "-m", "wsjax.launch", "--nproc", str(processes)]
        if args.devices == "cpu":
            launch += ["--devices_per_process", "1"]
        launch += ["--module", "benchmarks.bench_scaleout", "--", *cmd[1:]]
        subprocess.run(launch, env=env, check=True, cwd=REPO)
    return [json.loads((out / f"process{i}.json").read_text()) for i in range(processes)]


def main() -> None:
    if "--worker" in sys.argv:
        i = sys.argv.index("--worker")
        out = Path(sys.argv[i + 1])
        opts = dict(a.lstrip("-").split("=", 1) for a in sys.argv[i + 2 :])
        worker(out, *(int(opts[k]) for k in ("layers", "hidden", "batch", "seq", "steps")))
        return
    args = C.parse_args(__doc__, _args)
    if args.smoke:
        args.layers, args.hidden, args.batch, args.seq, args.steps = 2, 64, 4, 32, 2
    results = C.results_path(args.results_dir)
    counts = [int(p) for p in args.processes.split(",")]
    lines = {}
    for processes in counts:
        with tempfile.TemporaryDirectory() as tmp:
            per = run(processes, args, Path(tmp))
        line = {
            "benchmark": "scaleout",
            "setting": f"P{processes}",
            "processes": processes,
            "model": {"layers": args.layers, "hidden": args.hidden, "params": per[0]["num_params"]},
            "global_batch": [args.batch, args.seq],
            "tokens_per_sec": min(p["tokens_per_sec"] for p in per),
            "host_update_seconds_per_process": max(p["host_update_seconds"] for p in per),
            "live_bytes_per_process": max(p["live_bytes"] for p in per),
            "rss_bytes_per_process": [p["rss_bytes"] for p in per],
            "smoke": args.smoke,
            **C.machine(),
        }
        lines[processes] = line
        C.emit(line, results)
    base = lines.get(1)
    for processes, line in lines.items():
        if base is None or processes == 1:
            continue
        ratios = {
            "benchmark": "scaleout",
            "setting": f"P{processes}_vs_P1",
            "tokens_per_sec_ratio": line["tokens_per_sec"] / base["tokens_per_sec"],
            "host_update_ratio": line["host_update_seconds_per_process"]
            / base["host_update_seconds_per_process"],
            "live_bytes_ratio": line["live_bytes_per_process"] / base["live_bytes_per_process"],
            "smoke": args.smoke,
            **C.machine(),
        }
        C.emit(ratios, results)


if __name__ == "__main__":
    main()
