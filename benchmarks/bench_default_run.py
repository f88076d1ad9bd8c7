"""The README's first command, measured: ``python -m wsjax.train`` with no arguments, cold.

    python benchmarks/bench_default_run.py [--smoke]

Runs the built-in default (configs/params_gptj_tiny.yaml, train_and_eval, on ``builtin:stdlib``)
in a fresh folder with a fresh corpus cache, as a new user would, in a subprocess of THIS
interpreter; so run it once per Python to see how the corpus and the loss vary by version. One
JSON line (appended to ``benchmarks/results/<hostname>-<date>.jsonl``) holds the machine, the
Python and library versions, the corpus record of its meta.json (files, bytes and tokens per
split, eval unigram entropy), every evaluation (step, loss, perplexity, accuracy) and the wall
time of the whole command. ``--smoke``: 2 steps, 2 eval batches (the full corpus is still built).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as C  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EVAL_LINE = re.compile(
    r"Eval at global step (\d+) \(\d+ batches\): loss = ([\d.]+), perplexity = ([\d.]+), "
    r"accuracy = ([\d.]+)"
)
SMOKE_ARGS = ["--max_steps", "2", "--eval_steps", "2", "runconfig.save_checkpoints_steps=2"]


def default_run(extra_args: list[str]) -> dict:
    """Run the default command in a scratch folder; return its evaluations, corpus and time."""
    with tempfile.TemporaryDirectory(prefix="wsjax-default-run-") as scratch:
        env = {
            **os.environ,
            "WSJAX_CACHE_DIR": str(Path(scratch) / "cache"),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "wsjax.train", *extra_args],
            cwd=scratch,
            env=env,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"python -m wsjax.train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        evals = [
            {"step": int(s), "loss": float(loss), "perplexity": float(ppl), "accuracy": float(acc)}
            for s, loss, ppl, acc in EVAL_LINE.findall(proc.stdout + proc.stderr)
        ]
        (corpus_dir,) = (Path(scratch) / "cache").glob("builtin-*")
        corpus = json.loads((corpus_dir / "meta.json").read_text())["builtin"]
    return {"wall_seconds": round(wall, 1), "corpus": corpus, "evals": evals}


def main() -> None:
    args = C.parse_args(__doc__)
    import flax
    import optax

    got = default_run(SMOKE_ARGS if args.smoke else [])
    if not got["evals"]:
        sys.exit("python -m wsjax.train printed no 'Eval at global step' line")
    record = {
        "bench": "default_run",
        **C.machine(),
        "setting": "smoke" if args.smoke else "default",
        "python": platform.python_version(),
        "flax": flax.__version__,
        "optax": optax.__version__,
        **got,
        "final_eval_loss": got["evals"][-1]["loss"],
    }
    C.emit(record, C.results_path(args.results_dir))


if __name__ == "__main__":
    main()
