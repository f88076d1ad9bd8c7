"""The README's default run, timed and recorded: ``python -m wsjax.train`` with no arguments.

    python benchmarks/bench_default_run.py [--smoke] [--results_dir DIR]

Runs the built-in default (``configs/params_gptj_tiny.yaml``, train_and_eval, on
``builtin:stdlib``) in a fresh process, in a scratch folder with a fresh corpus cache, as a new
user would, with THIS interpreter: run it once per Python to see how the corpus and the loss vary
by version. One JSON line holds the machine, the Python and library versions, the corpus record
of its meta.json (files, bytes and tokens per split, eval unigram entropy), every evaluation it
logged (step, batches, loss, perplexity, accuracy), the final training loss and the wall seconds
of the whole command. ``--smoke`` runs 4 steps with an evaluation after 2 and 4, on the corpus
cache a user's run would use (``$WSJAX_CACHE_DIR``, else ``~/.cache/wsjax``; built there only if
missing): the smoke checks the run and its record, not the seconds of a first build.
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
EVAL = re.compile(
    r"Eval at global step (\d+) \((\d+) batches\): loss = ([0-9.]+), perplexity = ([0-9.]+), "
    r"accuracy = ([0-9]+\.[0-9]+)"
)
FINAL = re.compile(r"Loss for final step: ([0-9]+\.[0-9]+)")
SMOKE_ARGS = ["--max_steps", "4", "runconfig.save_checkpoints_steps=2", "--eval_steps", "2"]
CORPUS = re.compile(r"(?:reusing|into) (\S*builtin-[0-9a-f]+)")  # the corpus the run logged


def main() -> None:
    args = C.parse_args(__doc__)
    import flax
    import optax

    extra = SMOKE_ARGS if args.smoke else []
    with tempfile.TemporaryDirectory(prefix="wsjax-default-run-") as tmp:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        if not args.smoke:  # the corpus is built, as on first use
            env["WSJAX_CACHE_DIR"] = str(Path(tmp) / "cache")
        cmd = [sys.executable, "-m", "wsjax.train", "-o", str(Path(tmp) / "model_dir"), *extra]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=env)
        wall = time.perf_counter() - t0
        log = proc.stdout + proc.stderr
        if proc.returncode != 0:
            sys.exit(f"the default run failed ({proc.returncode}):\n{log[-3000:]}")
        corpus_dir = Path(CORPUS.findall(log)[-1])
        corpus = json.loads((corpus_dir / "meta.json").read_text())["builtin"]
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
        "python": platform.python_version(),
        "flax": flax.__version__,
        "optax": optax.__version__,
        "wall_seconds": round(wall, 2),
        "corpus": corpus,
        "evals": evals,
        "final_eval_loss": evals[-1]["loss"] if evals else None,
        "final_train_loss": float(final.group(1)) if final else None,
    }
    C.emit(record, C.results_path(args.results_dir))


if __name__ == "__main__":
    main()
