"""Throughput: the streaming engine against the resident reference, same model, batch and process.

    python benchmarks/bench_throughput.py [--smoke] [--results_dir DIR]
        [--hidden 256] [--layers 4,8,16,24] [--batch 4] [--seq 256]
        [--sweep_layers 8] [--sweep_batches 1,16] [--device_memory_gb G] [--mixed_precision]

For each GPT-J-shaped model (head_dim 64, filter 4 x hidden; growing depth at fixed width, then
growing tokens per step at fixed depth) one JSON line: tokens/s of the resident step
(``wsjax.reference``) and of the engine with ``recompute: false`` (``engine``) and ``true``
(``engine_recompute``); the ratios engine / resident (targets on the faster engine mode);
model-FLOPs utilisation (``wsjax.trainer.metrics.model_flops_per_token``: 6 N + 12 L D T per token,
PaLM, recompute not counted) against the matmul peak measured at the start of the same run;
the engine's stream waits; and whether each fits the device memory (``--device_memory_gb``,
else what the device reports, else the host's available memory): the engine from
``make_plan``, the resident step from its compiled memory analysis. The reference runs only
where it fits; the engine goes on. Steps: warm-up (compile) steps, then the best of
``--steps`` timed steps, same batch for all. A last line: the resident step's device bytes per
layer and the depth where it stops fitting.
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
from wsjax.trainer.metrics import model_flops_per_token  # noqa: E402

ENGINE_MODES = {"engine": False, "engine_recompute": True}  # name -> streaming.recompute
ENGINE_TARGET_MIN_LAYERS = 12


def _args(p) -> None:
    C.add_model_args(p)
    p.add_argument("--sweep_layers", type=int, default=8)
    p.add_argument("--sweep_batches", default="1,16")
    p.add_argument("--steps", type=int, default=3, help="timed steps (best-of)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (the first compiles)")
    p.add_argument("--micro_batch_size", type=int, default=None)
    p.add_argument("--prefetch_depth", type=int, default=1)
    p.add_argument("--device_memory_gb", type=float, default=None)
    p.add_argument("--peak_n", type=int, default=2048, help="matmul size of the peak")


def compile_resident(model, cfg, batch: int, seq: int):
    """The resident step compiled from shapes (no allocation) and the device bytes it needs."""
    ref = ResidentTrainer(model, cfg.optimizer, seed=1)
    state = jax.eval_shape(ref.init_state, model.param_shapes())
    b = {k: jax.ShapeDtypeStruct((batch, seq), v.dtype) for k, v in C.random_batch(1, 1, 2).items()}
    compiled = ref.train_step.lower(state, b).compile()
    return ref, compiled, C.compiled_bytes(compiled)


def resident_step(ref, compiled, params, batch):
    """One resident training step on ``batch`` as a callable (it holds the step's state)."""
    box = [ref.init_state(jax.tree.map(jax.numpy.asarray, params))]

    def step():
        box[0], m = compiled(box[0], batch)
        float(m["loss"])

    return step


def time_resident(ref, compiled, params, batch, warmup: int, steps: int) -> float:
    step = resident_step(ref, compiled, params, batch)
    return C.time_calls(step, warmup=warmup, reps=steps)["best"]  # state freed on return


def time_engine(model, cfg, params, batch, warmup: int, steps: int):
    eng = StreamingEngine(model, cfg, params=params)
    last: dict = {}

    def step():
        last.update(eng.train_step(batch))

    t = C.time_calls(step, warmup=warmup, reps=steps)["best"]
    waits = {
        k.split("/")[1]: round(last[k], 4)
        for k in (
            "stream/h2d_wait_seconds",
            "stream/d2h_wait_seconds",
            "stream/update_wait_seconds",
        )
    }
    waits["last_step_seconds"] = round(last["step_seconds"], 4)
    return t, waits, float(eng.residency.peak), [r.to_dict() for r in eng.cache.records]


def measure(args, layers: int, batch: int, peak: float, mem: int | None, common: dict) -> dict:
    streaming = {"prefetch_depth": args.prefetch_depth}
    if args.micro_batch_size:
        streaming["micro_batch_size"] = args.micro_batch_size
    d = C.gptj_dict(
        layers,
        args.hidden,
        batch,
        args.seq,
        vocab=args.vocab,
        mixed_precision=args.mixed_precision,
        streaming=streaming,
    )
    cfg = config_from_dict(d)
    model = get_model(cfg.model)
    n_params = model.num_params()
    tokens = batch * args.seq
    fpt = model_flops_per_token(cfg.model, n_params, args.seq)
    host_batch = C.random_batch(batch, args.seq, args.vocab)

    ref, ref_compiled, ref_bytes = compile_resident(model, cfg, batch, args.seq)
    rec = {
        **common,
        "setting": f"L{layers}_b{batch}",
        "layers": layers,
        "hidden": args.hidden,
        "batch": batch,
        "seq": args.seq,
        "tokens_per_step": tokens,
        "params": n_params,
        "model_flops_per_token": fpt,
        "device_memory_bytes": mem,
        "resident_device_bytes": ref_bytes,
        "resident_fits": mem is None or ref_bytes <= mem,
    }
    params = model.init(jax.random.PRNGKey(1))
    params = jax.tree.map(np.asarray, params)
    seconds = {}
    if rec["resident_fits"]:
        seconds["resident"] = time_resident(ref, ref_compiled, params, host_batch, *_w(args))
    del ref, ref_compiled
    gc.collect()
    for name, recompute in ENGINE_MODES.items():
        ecfg = config_from_dict({**d, "streaming": {**streaming, "recompute": recompute}})
        t, waits, dev_peak, records = time_engine(model, ecfg, params, host_batch, *_w(args))
        gc.collect()  # the engine's host store
        seconds[name] = t
        rec[f"{name}_waits"] = waits
        rec[f"{name}_device_peak_bytes"] = dev_peak
        if name == "engine":  # the plan of the fast mode, with its executables' temporaries
            plan = make_plan(
                model,
                ecfg,
                StreamingEngine(model, ecfg, allocate=False).optimizer,
                batch_size=batch,
                seq=args.seq,
                n_micro=ecfg.micro_batches(batch),
                platform=jax.devices()[0].platform,
                compile_records=records,
            )
            rec["engine_device_bytes_plan"] = plan.device_total
            rec["engine_fits"] = mem is None or plan.device_total <= mem
    for name, t in seconds.items():
        rec[f"{name}_step_seconds"] = round(t, 4)
        rec[f"{name}_tokens_per_sec"] = round(tokens / t, 1)
        rec[f"{name}_mfu"] = round(fpt * tokens / t / peak, 4)
    best = min(ENGINE_MODES, key=lambda n: seconds[n])  # the faster engine mode on this machine
    rec["engine_best_mode"] = best
    if "resident" in seconds:
        for name in ENGINE_MODES:
            rec[f"{name}_vs_resident"] = round(seconds["resident"] / seconds[name], 4)
        if layers >= ENGINE_TARGET_MIN_LAYERS:
            rec["target"] = C.target(
                f"engine ({best}) tokens/s / resident ({ENGINE_TARGET_MIN_LAYERS}+ layers)",
                rec[f"{best}_vs_resident"],
                1.0,
            )
    rec["target_mfu"] = C.target(f"{best} MFU vs measured matmul peak", rec[f"{best}_mfu"], 0.6)
    return rec


def _w(args) -> tuple[int, int]:
    return args.warmup, args.steps


def main() -> None:
    args = C.parse_args(__doc__, _args)
    if args.smoke:
        args.hidden, args.vocab, args.seq, args.batch = 64, 256, 32, 2
        args.layers, args.sweep_batches = "2", ""
        args.steps, args.warmup, args.peak_n = 1, 1, 256
    out = C.results_path(args.results_dir)
    t0 = time.perf_counter()
    mm = C.matmul_peak(args.peak_n, reps=2 if args.smoke else 5)
    peak = mm["flops_per_sec"]
    mem, mem_source = C.device_memory_bytes(args.device_memory_gb)
    common = {
        "bench": "throughput",
        **C.machine(),
        "matmul_peak_flops_per_sec": round(peak),
        "matmul_peak_n": mm["n"],
        "mixed_precision": args.mixed_precision,
        "device_memory_source": mem_source,
        "mfu_flops": "6N + 12LDT per token (wsjax.trainer.metrics; recompute not counted)",
    }
    settings = [(int(L), args.batch) for L in args.layers.split(",")]
    settings += [(args.sweep_layers, int(b)) for b in args.sweep_batches.split(",") if b]
    rows = []
    for layers, batch in dict.fromkeys(settings):
        rec = measure(args, layers, batch, peak, mem, common)
        rows.append(rec)
        C.emit(rec, out)

    # where the resident step stops fitting: its device bytes grow linearly with depth
    depth_rows = sorted((r for r in rows if r["batch"] == args.batch), key=lambda r: r["layers"])
    if len(depth_rows) >= 2 and mem:
        a, b = depth_rows[0], depth_rows[-1]
        slope = (b["resident_device_bytes"] - a["resident_device_bytes"]) / (
            b["layers"] - a["layers"]
        )
        base = a["resident_device_bytes"] - slope * a["layers"]
        e_slope = (b["engine_device_bytes_plan"] - a["engine_device_bytes_plan"]) / (
            b["layers"] - a["layers"]
        )
        C.emit(
            {
                **common,
                "setting": "fit_summary",
                "batch": args.batch,
                "device_memory_bytes": mem,
                "resident_bytes_per_layer": round(slope),
                "engine_bytes_per_layer": round(e_slope),
                "resident_max_layers": int((mem - base) // slope) if slope > 0 else None,
                "resident_fits": {r["layers"]: r["resident_fits"] for r in depth_rows},
                "engine_fits": {r["layers"]: r["engine_fits"] for r in depth_rows},
                "seconds": round(time.perf_counter() - t0, 1),
            },
            out,
        )


if __name__ == "__main__":
    main()
