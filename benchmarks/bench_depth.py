"""Depth scaling: step time, peak device-resident bytes and compile time against depth.

    python benchmarks/bench_depth.py [--smoke] [--results_dir DIR]
        [--hidden 256] [--layers 4,8,16,24] [--batch 4] [--seq 256] [--mixed_precision]

One JSON line per depth, for the engine with ``activation_offload: true`` (nothing on the device
grows with depth), the engine without offload (kept block inputs grow by batch x seq x hidden
per layer) and the resident reference: step seconds (best of ``--steps`` after a warm-up),
bytes (engine: what ``jax.live_arrays()`` holds at the step's peak, sampled by
``_common.LivePeak``, against what ``make_plan`` says will be held; resident: its compiled
memory analysis) and compile seconds (engine: every executable of its step, from the compile
log; resident: the one jitted step). A last line gives the least-squares slopes per layer and
the ratios depth_max / depth_min, with the target that the plan never under-estimates the live
peak (live_over_plan <= 1 at every depth). On the CPU backend the host store, the gradients and
the device terms share one memory: the step's live bytes grow per layer by the gradients (host
memory on a GPU) and, without offload only, by the kept block inputs.
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as C  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from wsjax.config import config_from_dict  # noqa: E402
from wsjax.engine import StreamingEngine  # noqa: E402
from wsjax.engine.plan import make_plan  # noqa: E402
from wsjax.models import get_model  # noqa: E402
from wsjax.reference import ResidentTrainer  # noqa: E402


def _args(p) -> None:
    C.add_model_args(p)
    p.add_argument("--steps", type=int, default=2)


def engine_run(model, cfg, params, batch, steps: int) -> dict:
    """Compile (timed, from the log), then step; the bytes JAX really holds at the step's peak
    (``jax.live_arrays()``, sampled by ``LivePeak``) against the plan."""
    gc.collect()
    before = sum(C.live_bytes_by_kind().values())
    eng = StreamingEngine(model, cfg, params=params)
    store = sum(C.live_bytes_by_kind().values()) - before  # master, optimizer state, stream copy
    shape = batch["input_ids"].shape
    t0 = time.perf_counter()
    records = eng.compile(shape)
    wall = time.perf_counter() - t0
    probe = C.LivePeak(eng)
    t = C.time_calls(lambda: (eng.train_step(batch), probe.sample()), warmup=1, reps=steps)["best"]
    plan = make_plan(
        model,
        cfg,
        eng.optimizer,
        batch_size=shape[0],
        seq=shape[1],
        n_micro=cfg.micro_batches(shape[0]),
        platform=jax.devices()[0].platform,
        compile_records=records,
    )
    not_arrays = ("process_overhead", "input_batches")  # and executable_temp: not live arrays
    plan_arrays = (
        sum(v for k, v in plan.host.items() if k not in not_arrays)
        + plan.device_total
        - plan.device["executable_temp"]
    )
    live = probe.peak_total - before
    return {
        "step_seconds": round(t, 4),
        "live_peak_bytes": live,  # everything the engine holds at the step's peak
        "live_step_bytes": live - store,  # what the step adds to the host store
        "live_peak_by_kind": probe.peak_by_kind,
        "plan_array_bytes": plan_arrays,
        "live_over_plan": round(live / plan_arrays, 4),
        "plan_device_bytes": int(plan.device_total),
        "rss_peak_bytes": C.rss_bytes("VmHWM"),  # the process's, monotone over the rows
        "compile_seconds": round(sum(r["seconds"] for r in records), 3),
        "compile_wall_seconds": round(wall, 3),
        "num_executables": eng.num_executables,
    }


def resident_run(model, cfg, params, batch, steps: int) -> dict:
    ref = ResidentTrainer(model, cfg.optimizer, seed=1)
    state = jax.eval_shape(ref.init_state, model.param_shapes())
    b = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    t0 = time.perf_counter()
    compiled = ref.train_step.lower(state, b).compile()
    compile_s = time.perf_counter() - t0
    box = [ref.init_state(jax.tree.map(jax.numpy.asarray, params))]

    def step():
        box[0], m = compiled(box[0], batch)
        float(m["loss"])

    t = C.time_calls(step, warmup=1, reps=steps)["best"]
    out = {
        "step_seconds": round(t, 4),
        "device_peak_bytes": C.compiled_bytes(compiled),
        "compile_seconds": round(compile_s, 3),
    }
    return out


def slope(xs: list, ys: list) -> float:
    return float(np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)[0])


def main() -> None:
    args = C.parse_args(__doc__, _args)
    if args.smoke:
        args.hidden, args.vocab, args.seq, args.batch = 64, 256, 32, 2
        args.layers, args.steps = "2,3", 1  # from 2 layers: two blocks in flight at once
    out = C.results_path(args.results_dir)
    common = {"bench": "depth", **C.machine(), "mixed_precision": args.mixed_precision}
    batch = C.random_batch(args.batch, args.seq, args.vocab)
    depths = [int(x) for x in args.layers.split(",")]
    modes = {"engine_offload": {"activation_offload": True}, "engine": {}}
    if args.smoke:
        del modes["engine"]
    rows = []
    for L in depths:
        d = C.gptj_dict(
            L, args.hidden, args.batch, args.seq, vocab=args.vocab,
            mixed_precision=args.mixed_precision,
        )  # fmt: skip
        model = get_model(config_from_dict(d).model)
        params = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(1)))
        rec = {
            **common,
            "setting": f"L{L}",
            "layers": L,
            "hidden": args.hidden,
            "batch": args.batch,
            "seq": args.seq,
            "params": model.num_params(),
        }
        for name, streaming in modes.items():
            cfg = config_from_dict({**d, "streaming": streaming})
            rec[name] = engine_run(model, cfg, params, batch, args.steps)
            gc.collect()
        rec["resident"] = resident_run(model, config_from_dict(d), params, batch, args.steps)
        rows.append(rec)
        C.emit(rec, out)

    if len(rows) < 2:
        return
    summary = {**common, "setting": "slopes", "layers": depths, "per_layer": {}, "ratio": {}}
    keys = {name: ("step_seconds", "live_step_bytes", "compile_seconds") for name in modes}
    keys["resident"] = ("step_seconds", "device_peak_bytes", "compile_seconds")
    for name, names in keys.items():
        for key in names:
            ys = [r[name][key] for r in rows]
            summary["per_layer"][f"{name}/{key}"] = round(slope(depths, ys), 6)
            summary["ratio"][f"{name}/{key}"] = round(ys[-1] / ys[0], 4) if ys[0] else None
    worst = max(r[name]["live_over_plan"] for r in rows for name in modes)
    summary["target"] = C.target(
        "live peak / plan, worst over depths and modes", worst, 1.0, higher_is_better=False
    )
    C.emit(summary, out)


if __name__ == "__main__":
    main()
