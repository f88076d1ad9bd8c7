"""The GPU check: GPT-J 6B trained by weight streaming on one accelerator, measured in one run.

    python benchmarks/gpu_check.py [--steps 3] [--results_dir DIR] [override ...]
    python benchmarks/gpu_check.py --smoke        # reduced size on the CPU, < 60 s (a test runs it)
    benchmarks/gpu_check.sh                       # install (offline) + this + the gpu tests

Builds the shipped configs/params_gptj_6B.yaml (28 layers, width 4096, seq 2048, bf16 compute;
``key=value`` overrides after it), initialises the 6B parameters at random on the host (numpy,
one generator per thread: 24 GB of fp32 in seconds), compiles, runs a warm-up step and
``--steps`` timed steps, then prints AND appends one JSON line to
``<results_dir>/gpu_check.jsonl`` with the machine named (``_common.machine``):

- ``tokens_per_sec`` (median step) and ``mfu`` against a bf16 matmul peak measured in this run;
- ``device_peak_bytes`` (``memory_stats()["peak_bytes_in_use"]``) against the plan's device total;
- ``host_peak_rss_bytes`` (VmHWM) against the plan's host total;
- h2d bytes/s through the engine's path (``jax.device_put`` of a block's stream copy, where the
  engine keeps it) against a raw copy of a ``pinned_host`` array of the same size;
- the result of ``pytest -m gpu tests/engine/test_gpu.py`` (run first, in a child process; the exit
  code is 1 when they fail).

Progress lines go to stdout as it runs (flushed), so a run cut short shows how far it got.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import _common as C  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from wsjax.config import load_config  # noqa: E402
from wsjax.engine import StreamingEngine, make_plan  # noqa: E402
from wsjax.engine.plan import (  # noqa: E402
    GiB,
    available_device_bytes,
    available_host_bytes,
    set_host_memory_limit,  # noqa: E402
)
from wsjax.errors import PlanError  # noqa: E402
from wsjax.models import get_model  # noqa: E402
from wsjax.optim import make_optimizer  # noqa: E402
from wsjax.trainer.metrics import model_flops_per_token  # noqa: E402

T0 = time.perf_counter()
SMOKE = [  # GPT-J shape at a size the CPU runs in seconds
    "model.num_hidden_layers=2",
    "model.hidden_size=128",
    "model.num_heads=4",
    "model.rotary_dim=16",
    "model.filter_size=512",
    "model.vocab_size=512",
    "train_input.vocab_size=512",
    "train_input.max_sequence_length=64",
    "eval_input.vocab_size=512",
    "eval_input.max_sequence_length=64",
    "model.max_position_embeddings=64",
    "train_input.batch_size=4",
    "streaming.micro_batch_size=2",
]


def say(msg: str) -> None:
    print(f"[gpu_check {time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def _args(p) -> None:
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--config", default=str(REPO / "configs" / "params_gptj_6B.yaml"))
    p.add_argument("--no_tests", action="store_true", help="skip pytest -m gpu")
    p.add_argument("--bench", default="gpu_check_6b", help="the record's bench name")
    p.add_argument("--compile_probe", action="store_true", help="(internal) time a compile")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")


# bf16 dense tensor-core peak from the datasheets (FLOP/s), by device_kind prefix
DATASHEET_PEAK = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}


def datasheet_peak(device_kind: str) -> float | None:
    return next((v for k, v in DATASHEET_PEAK.items() if device_kind.startswith(k)), None)


def commit() -> str | None:
    """The checkout's commit (read-only git), None outside a git checkout."""
    proc = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO)
    return proc.stdout.strip() or None


def compile_warm_seconds(args, overrides: list) -> float | None:
    """A second process compiles the same step on this run's compile cache: its seconds."""
    cmd = [sys.executable, __file__, "--compile_probe", "--no_tests", "--config", args.config]
    cmd += [*overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("COMPILE_SECONDS ")]
    return float(lines[-1].split()[1]) if lines else None


def use_own_compile_cache(results_dir: str) -> None:
    """The run's JAX compile cache (shared with the warm-compile child), unless one is set."""
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        os.environ["JAX_COMPILATION_CACHE_DIR"] = str(Path(results_dir) / "jax_cache")
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def limit_host_memory(cfg, model, shape) -> int | None:
    """XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB from the plan, before the GPU backend starts."""
    optimizer = make_optimizer(cfg.optimizer)
    plan = make_plan(
        model, cfg, optimizer, batch_size=shape[0], seq=shape[1],
        n_micro=cfg.micro_batches(shape[0]), platform="gpu", input_prefetch=0,
    )  # fmt: skip
    return set_host_memory_limit(plan)


def random_params(model, seed: int = 0) -> dict:
    """fp32 parameters at random, filled by one numpy generator per thread (numpy releases the
    GIL while it fills): layer norm scales 1, biases 0, weights N(0, 0.02)."""
    shapes = model.param_shapes()
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    out = [np.empty(s.shape, np.float32) for _, s in flat]
    jobs = []  # (array, index or None): fill per layer so 28 layers run in parallel
    for (path, _), arr in zip(flat, out, strict=True):
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):
            arr.fill(1.0)
        elif name.endswith("['bias']"):
            arr.fill(0.0)
        elif name.startswith("['blocks']"):
            jobs += [(arr, i) for i in range(arr.shape[0])]
        else:
            jobs.append((arr, None))
    seeds = np.random.SeedSequence(seed).spawn(len(jobs))

    def fill(job, seq):
        arr, i = job
        view = arr if i is None else arr[i]
        np.random.default_rng(seq).standard_normal(out=view, dtype=np.float32)
        view *= np.float32(0.02)

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(fill, jobs, seeds))
    return jax.tree_util.tree_unflatten(treedef, out)


def copy_rate(src, dst_sharding, reps: int = 5) -> float:
    """Best-of bytes/s of ``jax.device_put(src, dst_sharding)``, waited for."""
    nbytes = sum(a.nbytes for a in jax.tree.leaves(src))
    t = C.time_calls(
        lambda: jax.block_until_ready(jax.device_put(src, dst_sharding)), warmup=1, reps=reps
    )
    return nbytes / t["best"]


def raw_pinned_rate(nbytes: int, device) -> tuple[float | None, str]:
    """h2d of a plain ``pinned_host`` array (the fastest path the runtime offers)."""
    kinds = {m.kind for m in device.addressable_memories()}
    if "pinned_host" not in kinds:
        return None, f"no pinned_host memory on {device.platform} (kinds {sorted(kinds)})"
    pinned = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
    on_device = jax.sharding.SingleDeviceSharding(device)
    src = jax.device_put(np.ones(nbytes // 2, np.uint16), pinned)
    return copy_rate(src, on_device), "pinned_host"


# What this machine offers, read once before anything is allocated: read again after the host
# store exists, it would count the store's own bytes as unavailable (the first H100 run's second
# verdict said "106.59 GiB of 37.14 available").
_HOST_AVAILABLE = available_host_bytes()


def plan_for(model, cfg, engine, shape, records, dev):
    batch, seq = shape
    return make_plan(
        model,
        cfg,
        engine.optimizer,
        batch_size=batch,
        seq=seq,
        n_micro=cfg.micro_batches(batch),
        platform=dev.platform,
        compile_records=records,
        host_available=_HOST_AVAILABLE,
        device_available=available_device_bytes(dev),
        input_prefetch=0,  # batches come from one numpy array here, no loader
    )


def run_gpu_tests() -> dict:
    """``pytest -m gpu`` on the gpu tests; their summary line and exit code."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    cmd.append(str(REPO / "tests" / "engine" / "test_gpu.py"))
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    say("running: " + " ".join(cmd[1:]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=400)
    except subprocess.TimeoutExpired as e:
        say(f"gpu tests timed out after {e.timeout} s")
        return {"returncode": None, "summary": f"timed out after {e.timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    for ln in lines[-15:]:
        print("    " + ln, flush=True)
    return {"returncode": proc.returncode, "summary": lines[-1] if lines else proc.stderr[-300:]}


def main() -> int:
    args = C.parse_args(__doc__, _args)
    # The gpu tests first, in their own process, before this one takes the accelerator: JAX
    # preallocates 75% of GPU memory per process, so a child started later would find none.
    tests = None if args.no_tests or args.compile_probe else run_gpu_tests()
    overrides = (SMOKE if args.smoke else []) + list(args.overrides)
    cfg = load_config(args.config, overrides)
    model = get_model(cfg.model)
    shape = (int(cfg.train_input.batch_size), int(cfg.train_input.max_sequence_length))
    limit_gb = limit_host_memory(cfg, model, shape)  # before the backend starts
    use_own_compile_cache(args.results_dir)
    if args.compile_probe:
        t = time.perf_counter()
        StreamingEngine(model, cfg, allocate=False).compile(shape)
        print(f"COMPILE_SECONDS {time.perf_counter() - t}", flush=True)
        return 0
    dev = jax.devices()[0]
    say(f"jax {jax.__version__}, {jax.device_count()} x {dev.platform} {dev.device_kind}")
    if dev.platform == "cpu" and not args.smoke:
        say("no accelerator: run on a GPU machine, or --smoke for the reduced CPU check")
        return 2
    tokens = shape[0] * shape[1]
    say(
        f"{model.num_params() / 1e9:.3f} B parameters, {model.num_layers} layers, width "
        f"{cfg.model.hidden_size}, batch {shape[0]} x {shape[1]} = {tokens} tokens per step, "
        f"micro-batches {cfg.micro_batches(shape[0])}, "
        f"compute {np.dtype(model.compute_dtype).name}"
    )
    record = {"benchmark": "gpu_check", "bench": args.bench, "smoke": args.smoke}
    record |= {"commit": commit(), "device_kind": dev.device_kind, "machine": C.machine()}
    record |= {"tokens_per_step": tokens, "host_memory_limit_gb_set": limit_gb}
    record["gpu_tests"] = tests
    record["config"] = {"file": Path(args.config).name, "overrides": overrides}
    record["shape"] = {"layers": model.num_layers, "hidden": cfg.model.hidden_size}
    record["shape"] |= {"batch": shape[0], "seq": shape[1], "params": model.num_params()}
    out = Path(args.results_dir) / "gpu_check.jsonl"
    try:
        measure(args, cfg, model, shape, dev, record)
    except PlanError as e:  # refused before allocating: the plan says why
        record["error"] = str(e)
        C.emit(record, out)
        return e.exit_code
    except Exception as e:  # still record how far it got
        record["error"] = f"{type(e).__name__}: {e}"[:2000]
        C.emit(record, out)
        raise
    record["compile_warm_seconds"] = compile_warm_seconds(args, overrides)
    say("result:")
    C.emit(record, out)
    if max(record["device_peak_over_plan"] or 0, record["host_peak_over_plan"]) > 1:
        say("a measured peak exceeds the plan")
        return 3
    return 0 if tests is None or tests["returncode"] == 0 else 1  # the tests' verdict


def phases(last: dict, step_flops: float, peak: dict, raw_h2d, h2d_probe: int, dev) -> dict:
    """The step's phases, seconds: compute (its FLOPs at the measured peak: a floor), the link
    busy each way (the step's bytes at the raw pinned_host rates), the update not hidden."""
    d2h = raw_d2h_rate(h2d_probe, dev)
    return {
        "phase_compute_seconds": step_flops / peak["flops_per_sec"],
        "phase_h2d_busy_seconds": last["stream/h2d_bytes"] / raw_h2d if raw_h2d else None,
        "phase_d2h_busy_seconds": last["stream/d2h_bytes"] / d2h if d2h else None,
        "phase_exposed_update_seconds": last["stream/update_wait_seconds"],
        "raw_d2h_bytes_per_sec": d2h,
    }


def raw_d2h_rate(nbytes: int, device) -> float | None:
    """device -> ``pinned_host`` of a plain array (the gradients' and state's way back)."""
    if "pinned_host" not in {m.kind for m in device.addressable_memories()}:
        return None
    pinned = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
    src = jax.device_put(np.ones(nbytes // 2, np.uint16), jax.sharding.SingleDeviceSharding(device))
    return copy_rate(src, pinned)


def measure(args, cfg, model, shape, dev, record: dict) -> None:
    """The check, long because it is the script read top to bottom: plan, init, compile,
    steps, peaks, rates, one record."""
    engine = StreamingEngine(model, cfg, allocate=False)
    plan = plan_for(model, cfg, engine, shape, None, dev)
    say("plan before compiling (estimated scratch):\n" + plan.summary())
    plan.check()  # refuse before allocating 100 GiB that is not there

    t = time.perf_counter()
    params = random_params(model)
    record["init_seconds"] = time.perf_counter() - t
    say(f"random init on the host in {record['init_seconds']:.1f} s; building the host store")
    t = time.perf_counter()
    engine = StreamingEngine(model, cfg, params=params)
    del params  # the store holds its own copies
    record["store_seconds"] = time.perf_counter() - t
    say(f"host store (master, Adam, stream copy) in {record['store_seconds']:.1f} s")

    t = time.perf_counter()
    records = engine.compile(shape)
    record["compile_seconds"] = time.perf_counter() - t
    say(f"compiled {len(records)} executables in {record['compile_seconds']:.1f} s")
    plan = plan_for(model, cfg, engine, shape, records, dev)
    say("plan with the compiled scratch:\n" + plan.summary())

    batch = C.random_batch(*shape, cfg.model.vocab_size)
    steps = []
    for i in range(args.steps + 1):
        m = engine.train_step(batch)
        steps.append(m)
        what = "warm-up" if i == 0 else f"step {i}/{args.steps}"
        rss_now = C.rss_bytes("VmRSS") / GiB
        say(
            f"{what}: {m['step_seconds']:.2f} s, loss {m['train/loss']:.4f}, h2d wait "
            f"{m['stream/h2d_wait_seconds']:.2f} s, update wait "
            f"{m['stream/update_wait_seconds']:.2f} s, host RSS {rss_now:.1f} GiB"
        )
    timed = sorted(m["step_seconds"] for m in steps[1:]) or [steps[0]["step_seconds"]]
    step_s = timed[len(timed) // 2]
    record["compile_cold_seconds"] = record["compile_seconds"]
    stats = dev.memory_stats() or {}
    device_peak = stats.get("peak_bytes_in_use")
    host_peak = C.rss_bytes("VmHWM")

    say("measuring the bf16 matmul peak and the raw pinned_host copy")
    n = 1024 if args.smoke else 8192
    peak = C.matmul_peak(n=n, reps=5, dtype=jax.numpy.bfloat16, device=dev)
    stream_block = engine.store.stream["block/0"]
    nbytes = sum(a.nbytes for a in jax.tree.leaves(stream_block))
    engine_h2d = copy_rate(stream_block, engine.replicated)
    raw_h2d, raw_kind = raw_pinned_rate(nbytes, dev)
    flops_tok = model_flops_per_token(cfg.model, model.num_params(), shape[1])
    tps = shape[0] * shape[1] / step_s
    kind = jax.tree.leaves(stream_block)[0].sharding.memory_kind
    record |= phases(steps[-1], flops_tok * shape[0] * shape[1], peak, raw_h2d, nbytes, dev)
    record |= {
        "step_seconds": step_s,
        "step_seconds_all": [round(m["step_seconds"], 4) for m in steps],
        "losses": [round(m["train/loss"], 5) for m in steps],
        "tokens_per_sec": tps,
        "model_flops_per_token": flops_tok,
        "bf16_matmul_peak_flops": peak["flops_per_sec"],
        "mfu": flops_tok * tps / peak["flops_per_sec"],
        "mfu_measured_peak": flops_tok * tps / peak["flops_per_sec"],
        "mfu_datasheet": flops_tok * tps / ds if (ds := datasheet_peak(dev.device_kind)) else None,
        "device_peak_gib": device_peak / GiB if device_peak else None,
        "h2d_wait_seconds": steps[-1]["stream/h2d_wait_seconds"],
        "update_wait_seconds": steps[-1]["stream/update_wait_seconds"],
        "d2h_wait_seconds": steps[-1]["stream/d2h_wait_seconds"],
        "device_peak_bytes": device_peak,
        "device_bytes_limit": stats.get("bytes_limit"),
        "plan_device_bytes": plan.device_total,
        "device_peak_over_plan": device_peak / plan.device_total if device_peak else None,
        "host_peak_rss_bytes": host_peak,
        "plan_host_bytes": plan.host_total,
        "host_peak_over_plan": host_peak / plan.host_total,
        "plan": {"host": plan.host, "device": plan.device},
        "stream_copy_memory_kind": kind,
        "h2d_copy_bytes": nbytes,
        "engine_h2d_bytes_per_sec": engine_h2d,
        "raw_h2d_bytes_per_sec": raw_h2d,
        "raw_h2d_source": raw_kind,
        "engine_over_raw_h2d": engine_h2d / raw_h2d if raw_h2d else None,
    }
    say(
        f"tokens/s {tps:,.0f}, MFU {record['mfu']:.3f} of a measured bf16 peak "
        f"{peak['flops_per_sec'] / 1e12:.1f} TFLOP/s; device peak "
        f"{(device_peak or 0) / GiB:.2f} GiB vs plan {plan.device_total / GiB:.2f}; host peak "
        f"{host_peak / GiB:.2f} GiB vs plan {plan.host_total / GiB:.2f}; h2d engine "
        f"{engine_h2d / 1e9:.1f} GB/s vs raw pinned {(raw_h2d or 0) / 1e9:.1f} GB/s"
    )


if __name__ == "__main__":
    sys.exit(main())
