"""Host optimizer: parameters/s and bytes/s of the engine's host update, against the machine's
memory bandwidth measured in the same run.

    python benchmarks/bench_host_update.py [--smoke] [--results_dir DIR]
        [--hidden 1024,2048] [--mixed_precision]

Times the engine's own ``update/block`` executable (AdamW, clip scale, fp32 master and moments
donated, a fresh streaming copy out) on one GPT-J layer of ``--hidden`` (12 h^2 parameters:
12.6M at 1024, 50M at 2048), best of ``--reps``. Bytes per parameter: read master, mu, nu and
grad (16) + write master, mu, nu (12) + write the streaming copy (4 fp32, 2 bf16). A second
line per size times the same AdamW written in numpy (in place, ``out=``), to show what the
memory system allows for this update; the bandwidth is the best of a numpy copy and a jitted
triad of 256 MB arrays. Target: engine update bytes/s >= 50% of the measured bandwidth.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as C  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from wsjax.config import config_from_dict  # noqa: E402
from wsjax.engine import StreamingEngine  # noqa: E402
from wsjax.engine.store import segment_shapes  # noqa: E402
from wsjax.models import get_model  # noqa: E402


def _args(p) -> None:
    p.add_argument("--hidden", default="1024,2048")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--bandwidth_mb", type=int, default=256)
    p.add_argument("--mixed_precision", action="store_true")


def engine_update(hidden: int, mixed: bool, reps: int) -> dict:
    cfg = config_from_dict(C.gptj_dict(1, hidden, 1, 8, vocab=256, mixed_precision=mixed))
    model = get_model(cfg.model)
    eng = StreamingEngine(model, cfg, allocate=False)
    exe = eng.executables((1, 8), train=True).update("block")
    shapes = segment_shapes(model)["block"]
    rng = np.random.default_rng(0)
    on_host = eng.placement.host
    host = lambda: jax.tree.map(  # noqa: E731
        lambda s: jax.device_put(rng.standard_normal(s.shape, np.float32) * 0.02, on_host),
        shapes,
    )
    master, grads = host(), host()
    opt = jax.jit(eng.optimizer.init, out_shardings=on_host)(master)
    scale = jax.device_put(np.float32(0.5), on_host)
    box = [master, opt]

    def step():
        box[0], box[1], stream = exe(box[0], box[1], grads, scale)
        jax.block_until_ready((box[0], box[1], stream))

    t = C.time_calls(step, warmup=2, reps=reps)
    n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    return {"params": n, "seconds": t["best"], "median_seconds": t["median"]}


def numpy_adamw(n: int, reps: int, stream_dtype) -> float:
    """The same AdamW in numpy, in place: what the memory system allows (best seconds)."""
    rng = np.random.default_rng(0)
    p, g = (rng.standard_normal(n, np.float32) for _ in range(2))
    m, v, tmp = np.zeros(n, np.float32), np.zeros(n, np.float32), np.empty(n, np.float32)
    s = np.empty(n, stream_dtype)
    b1, b2, lr, wd, eps = np.float32(0.9), np.float32(0.999), 1e-4, 0.01, 1e-8

    def step():
        np.multiply(m, b1, out=m)
        m.__iadd__(np.multiply(g, 1 - b1, out=tmp))
        np.multiply(v, b2, out=v)
        np.multiply(g, g, out=tmp)
        v.__iadd__(np.multiply(tmp, 1 - b2, out=tmp))
        np.sqrt(v, out=tmp)
        tmp.__iadd__(np.float32(eps))
        np.divide(m, tmp, out=tmp)
        tmp.__iadd__(np.float32(wd) * p)
        p.__isub__(np.float32(lr) * tmp)
        s[...] = p

    return C.time_calls(step, warmup=1, reps=reps)["best"]


def main() -> None:
    args = C.parse_args(__doc__, _args)
    if args.smoke:
        args.hidden, args.reps, args.bandwidth_mb = "128", 2, 16
    out = C.results_path(args.results_dir)
    bw = C.memory_bandwidth(args.bandwidth_mb << 20, reps=2 if args.smoke else 5)
    common = {
        "bench": "host_update",
        **C.machine(),
        "mixed_precision": args.mixed_precision,
        "memory_bytes_per_sec": round(bw["bytes_per_sec"]),
        "memory_copy_bytes_per_sec": round(bw["copy_bytes_per_sec"]),
        "memory_triad_bytes_per_sec": round(bw["triad_bytes_per_sec"]),
    }
    stream_bytes = 2 if args.mixed_precision else 4
    per_param = 16 + 12 + stream_bytes
    for hidden in (int(h) for h in args.hidden.split(",")):
        r = engine_update(hidden, args.mixed_precision, args.reps)
        n = r["params"]
        np_s = numpy_adamw(n, args.reps, np.float16 if args.mixed_precision else np.float32)
        rate = per_param * n / r["seconds"]
        rec = {
            **common,
            "setting": f"block_h{hidden}",
            "hidden": hidden,
            "params": n,
            "bytes_per_param": per_param,
            "update_seconds": round(r["seconds"], 5),
            "params_per_sec": round(n / r["seconds"]),
            "bytes_per_sec": round(rate),
            "fraction_of_bandwidth": round(rate / bw["bytes_per_sec"], 4),
            "numpy_adamw_seconds": round(np_s, 5),
            "numpy_adamw_bytes_per_sec": round(per_param * n / np_s),
            "engine_vs_numpy": round(np_s / r["seconds"], 4),
            "target": C.target(
                "host update bytes/s / memory bandwidth", rate / bw["bytes_per_sec"], 0.5
            ),
        }
        C.emit(rec, out)


if __name__ == "__main__":
    main()
