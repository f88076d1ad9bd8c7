"""The README's default run, timed and recorded: ``python -m wsjax.train`` with no arguments.

    python benchmarks/bench_default_run.py [--smoke] [--results_dir DIR]

Runs the built-in default (``configs/params_gptj_tiny.yaml``, train_and_eval, the built-in
corpus, built if not cached) in a fresh process into a temporary model_dir, as a new user would,
and records one JSON line: wall seconds of the whole command, every evaluation it logged
(step, loss, perplexity, accuracy) and the final training loss, parsed from its log lines.
``--smoke`` runs 4 steps with an evaluation after 2 and 4.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as C  # noqa: E402

EVAL = re.compile(
    r"Eval at global step (\d+) \((\d+) batches\): loss = ([0-9.]+), perplexity = ([0-9.]+), "
    r"accuracy = ([0-9]+\.[0-9]+)"
)
FINAL = re.compile(r"Loss for final step: ([0-9]+\.[0-9]+)")


def main() -> None:
    args = C.parse_args(__doc__)
    extra = []
    if args.smoke:
        extra = ["--max_steps", "4", "runconfig.save_checkpoints_steps=2", "--eval_steps", "2"]
    with tempfile.TemporaryDirectory(prefix="wsjax-default-run-") as tmp:
        cmd = [sys.executable, "-m", "wsjax.train", "-o", str(Path(tmp) / "model_dir"), *extra]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
        wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        sys.exit(f"the default run failed ({proc.returncode}):\n{log[-3000:]}")
    evals = [
        {"step": int(s), "batches": int(n), "loss": float(lo), "perplexity": float(p)}
        | {"accuracy": float(a)}
        for s, n, lo, p, a in EVAL.findall(log)
    ]
    final = FINAL.search(log)
    record = {
        "bench": "default_run",
        **C.machine(),
        "setting": "smoke" if args.smoke else "default",
        "command": "python -m wsjax.train " + " ".join(extra),
        "wall_seconds": round(wall, 2),
        "evals": evals,
        "final_train_loss": float(final.group(1)) if final else None,
    }
    C.emit(record, C.results_path(args.results_dir))


if __name__ == "__main__":
    main()
