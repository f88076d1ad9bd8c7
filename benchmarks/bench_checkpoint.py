"""Checkpoint save and restore at the GPT-3 XL config, synchronous vs asynchronous.

    python benchmarks/bench_checkpoint.py [--layers 24] [--repeats 3] [--results_dir DIR]
    python benchmarks/bench_checkpoint.py --smoke   # a 2-layer, 64-wide model, one round

The arrays are those a training run saves: fp32 master weights (blocks stacked) and the AdamW
moments, with the shapes of configs/params_gpt3_xl.yaml (``--layers`` fewer blocks where the
machine's memory or disk is short: the line records how many). One JSON line per setting:

- ``sync``: ``Checkpoints.save`` that returns when the checkpoint is committed;
- ``async``: the same save with ``async_save``: ``save_blocking_seconds`` is what the training
  loop waits for (copy and digest), ``commit_seconds`` the write that goes on behind it;
- ``step_alone_seconds`` / ``step_during_write_seconds``: a fixed CPU workload (a stand-in for
  a training step) alone and while the asynchronous write runs, and ``hidden_seconds`` = sync
  save minus (async blocking + the step's slow-down), the step time async saving hides;
- ``restore_seconds``: restoring the checkpoint (digest checked).

Each number is the median of ``--repeats`` rounds, with the min and max beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common as C  # benchmarks/ is this script's folder, so it is on sys.path
import jax
import numpy as np

from wsjax.checkpoint import Checkpoints
from wsjax.config import load_config
from wsjax.engine.store import opt_state_shapes
from wsjax.models import get_model
from wsjax.optim import make_optimizer

REPO = Path(__file__).resolve().parent.parent
XL = REPO / "configs" / "params_gpt3_xl.yaml"


SMOKE = ["model.hidden_size=64", "model.num_heads=4", "model.filter_size=256"]


def trees(layers: int, smoke: bool = False):
    cfg = load_config(XL, [f"model.num_hidden_layers={layers}"] + (SMOKE if smoke else []))
    model, opt = get_model(cfg.model), make_optimizer(cfg.optimizer)
    shapes = model.param_shapes()
    oshapes = opt_state_shapes(opt, shapes, model.num_layers)
    rng = np.random.default_rng(0)

    def fill(s):
        return (
            rng.standard_normal(s.shape, np.float32).astype(s.dtype)
            if s.shape
            else np.zeros((), s.dtype)
        )

    return model, jax.tree.map(fill, shapes), jax.tree.map(fill, oshapes), shapes, oshapes


def step_workload(n: int = 768, reps: int = 12) -> float:
    a = np.ones((n, n), np.float32)
    t0 = time.perf_counter()
    for _ in range(reps):
        a = (a @ a) * 1e-3
    return time.perf_counter() - t0


def one_round(root: Path, params, opt_state, shapes, oshapes) -> dict:
    out = {}
    sync = Checkpoints(root / "sync")
    t0 = time.perf_counter()
    sync.save(1, params, opt_state, {"step": 1})
    out["sync_save_seconds"] = time.perf_counter() - t0
    sync.close()
    out["step_alone_seconds"] = step_workload()
    ck = Checkpoints(root / "async", async_save=True)
    t0 = time.perf_counter()
    ck.save(1, params, opt_state, {"step": 1})
    out["save_blocking_seconds"] = time.perf_counter() - t0
    out["step_during_write_seconds"] = step_workload()
    ck.wait()
    out["commit_seconds"] = time.perf_counter() - t0
    ck.close()
    slowdown = max(0.0, out["step_during_write_seconds"] - out["step_alone_seconds"])
    out["hidden_seconds"] = out["sync_save_seconds"] - out["save_blocking_seconds"] - slowdown
    t0 = time.perf_counter()
    Checkpoints(root / "async", read_only=True).restore(1, shapes, oshapes)
    out["restore_seconds"] = time.perf_counter() - t0
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--results_dir", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--smoke", action="store_true", help="a 2-layer, 64-wide model, one round")
    a = p.parse_args()
    if a.smoke:
        a.layers, a.repeats = 2, 1
    model, params, opt_state, shapes, oshapes = trees(a.layers, a.smoke)
    nbytes = sum(x.nbytes for x in jax.tree.leaves((params, opt_state)))
    rounds = []
    for _ in range(a.repeats):
        root = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
        try:
            rounds.append(one_round(root, params, opt_state, shapes, oshapes))
            print(json.dumps({"round": len(rounds), **rounds[-1]}), file=sys.stderr, flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    line = {
        "bench": "checkpoint",
        "setting": "smoke" if a.smoke else f"xl_layers{a.layers}",
        **C.machine(),
        "config": "params_gpt3_xl.yaml" + (" (smoke: 64 wide)" if a.smoke else ""),
        "layers": a.layers,
        "num_params": int(sum(np.prod(s.shape) for s in jax.tree.leaves(shapes))),
        "checkpoint_bytes": int(nbytes),
        "repeats": a.repeats,
    }
    for key in rounds[0]:
        values = [r[key] for r in rounds]
        line[key] = round(statistics.median(values), 4)
        line[f"{key}_min"], line[f"{key}_max"] = round(min(values), 4), round(max(values), 4)
    print(json.dumps(line))
    a.results_dir.mkdir(parents=True, exist_ok=True)
    with open(a.results_dir / "bench_checkpoint.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
