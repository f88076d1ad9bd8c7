"""Compile: cold and warm (persistent cache) compile time of every executable, no weights allocated.

    python benchmarks/bench_compile.py [--smoke] [--results_dir DIR] [--config PATH]

For the model of ``--config`` (default configs/params_gptj_6B.yaml: GPT-J 6B, micro-batch
16 x 2048) at its full depth and at 1 layer, each measurement runs in a fresh subprocess:
``StreamingEngine(model, cfg, allocate=False).compile((batch, seq))``. Cold: an empty
persistent compilation cache directory (``--reps`` processes per depth, alternating depths,
best of: the machine may be shared); warm: one more fresh process on the full depth's cache.
One JSON line per process with every executable's seconds, FLOPs and temp bytes, then a
summary: cold and warm totals for the full model and the ratio compile(full) / compile(1 layer),
with the targets (cold <= 10 s, warm <= 2 s, ratio <= 1.1). ``--smoke``: a tiny GPT-J.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as C  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "params_gptj_6B.yaml"


def _args(p) -> None:
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--child", default=None, help="(internal) run one measurement, print JSON")
    p.add_argument("--layers", type=int, default=None, help="(child) depth override")
    p.add_argument("--cache_dir", default=None, help="(child) persistent compile cache")
    p.add_argument("--reps", type=int, default=3, help="cold processes per depth (best of)")


def child(args) -> None:
    """One measurement in a fresh process: compile everything, print the records as JSON."""
    import jax

    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    from wsjax.config import config_from_dict, load_config
    from wsjax.engine import StreamingEngine
    from wsjax.models import get_model

    if args.smoke:
        cfg = config_from_dict(C.gptj_dict(args.layers, 64, 4, 32, vocab=256))
    else:
        cfg = load_config(args.config, [f"model.num_hidden_layers={args.layers}"])
    model = get_model(cfg.model)
    batch, seq = cfg.train_input.batch_size, cfg.train_input.max_sequence_length
    t0 = time.perf_counter()
    eng = StreamingEngine(model, cfg, allocate=False)
    records = eng.compile((batch, seq))
    wall = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "layers": args.layers,
                "params": model.num_params(),
                "batch": batch,
                "seq": seq,
                "micro_batches": cfg.micro_batches(batch),
                "mixed_precision": cfg.model.mixed_precision,
                "num_executables": eng.num_executables,
                "wall_seconds": round(wall, 3),
                "compile_seconds": round(sum(r["seconds"] for r in records), 3),
                "executables": [
                    {
                        "name": r["name"],
                        "seconds": round(r["seconds"], 3),
                        "flops": r["flops"],
                        "temp_bytes": r["temp_bytes"],
                    }
                    for r in records
                ],
            }
        )
    )


def run_child(args, kind: str, layers: int, cache_dir: str) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--layers", str(layers)]
    cmd += ["--cache_dir", cache_dir, "--config", args.config]
    cmd += ["--smoke"] if args.smoke else []
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        sys.exit(f"child {kind} L{layers} failed:\n{p.stderr[-3000:]}")
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    rec["process_seconds"] = round(time.perf_counter() - t0, 3)  # incl. python + jax import
    return rec


def main() -> None:
    args = C.parse_args(__doc__, _args)
    if args.child:
        return child(args)
    from wsjax.config import load_config

    if args.smoke:
        args.reps = 1
    full = 3 if args.smoke else load_config(args.config).model.num_hidden_layers
    out = C.results_path(args.results_dir)
    common = {"bench": "compile", **C.machine(), "config": Path(args.config).name}
    if args.smoke:
        common["config"] = "smoke (tiny GPT-J)"
    totals: dict = {}
    # cold: --reps fresh processes per depth, alternating depths, best of (the machine is shared:
    # one process can be slowed by others); warm: one more process on the first cold's cache
    for rep in range(args.reps):
        for layers in dict.fromkeys((full, 1)):
            with tempfile.TemporaryDirectory(prefix="wsjax-compile-cache-") as d:
                kinds = ("cold", "warm") if (layers == full and rep == 0) else ("cold",)
                for kind in kinds:
                    rec = run_child(args, kind, layers, d)
                    key = (layers, kind)
                    totals[key] = min(totals.get(key, float("inf")), rec["wall_seconds"])
                    setting = f"L{layers}_{kind}" + (f"_rep{rep}" if rep else "")
                    C.emit({**common, "setting": setting, "cache": kind, **rec}, out)
    cold, warm = totals[(full, "cold")], totals[(full, "warm")]
    ratio = cold / totals[(1, "cold")]
    C.emit(
        {
            **common,
            "setting": "summary",
            "layers": full,
            "cold_seconds": cold,
            "warm_seconds": warm,
            "cold_1_layer_seconds": totals[(1, "cold")],
            "depth_ratio": round(ratio, 4),
            "targets": [
                C.target(
                    "cold compile seconds (all executables)", cold, 10.0, higher_is_better=False
                ),
                C.target(
                    "warm compile seconds (all executables)", warm, 2.0, higher_is_better=False
                ),
                C.target(f"compile(L{full}) / compile(L1)", ratio, 1.1, higher_is_better=False),
            ],
        },
        out,
    )


if __name__ == "__main__":
    main()
