"""What a user would pick instead: wsjax vs PyTorch + HF transformers, same CPU, one process.

    python benchmarks/bench_peer.py [--smoke] [--results_dir DIR] [--shapes W:L:B:S,...]
        [--dtypes fp32,bf16] [--steps 2] [--warmup 1] [--keep_host_pages] [--parts]
        [--matmuls M:K:N,...]

For each GPT-J shape (``W:L:B:S`` = width, layers, batch, sequence; head_dim 64, filter 4 W,
rotary 32, vocab ``--vocab``) and each precision, one JSON line with tokens/s of

- ``engine`` / ``engine_recompute``: the wsjax streaming engine, ``recompute`` false / true;
- ``resident``: the resident JAX step (``wsjax.reference``);
- ``torch``: HF transformers ``GPTJForCausalLM`` built from the same model config
  (``wsjax.interop.hf_config.config_to_hf``), ``torch.optim.AdamW`` (same lr, weight decay,
  betas, eps) and ``clip_grad_norm_`` at the same max norm; bf16 is
  ``torch.autocast("cpu", bfloat16)``,
  the counterpart of wsjax's ``mixed_precision`` (fp32 master weights and optimizer state);

and each one's ratio to torch measured in the same run (``<name>_vs_torch``). torch runs with
``torch.set_num_threads`` = the cores this process may use, which is what XLA's CPU client uses.
All four stay built and take turns: ``--steps`` rounds of one step each, after ``--warmup``
untimed ones (the first compiles), so a change in the machine's load falls on all of them alike;
each timing is the best of its rounds (the least disturbed; the median beside it as
``<name>_median_step_seconds``), and ``loadavg_1m`` in each line says how loaded it was.
``--keep_host_pages`` keeps freed heap pages mapped (glibc mallopt) before JAX allocates; the
line records whether it was on. ``--parts`` adds, per engine mode,
where its step's time goes: each compiled executable and each transfer timed alone
(``wsjax.engine.estimate.measure_step_times``) and their sum over the step's schedule.

``--matmuls`` first writes one line per matmul shape ``M:K:N`` (the layers' own: tokens x
width x 4 width, ...): GFLOP/s of torch fp32 / bf16 and of jitted JAX fp32, bf16 -> bf16 (what
a plain bf16 ``x @ w`` asks for) and bf16 -> fp32 (``preferred_element_type``, what
``wsjax.precision.einsum`` asks for), the weight gradient ``x^T g`` of bf16 operands written
flattened (``tk,tn->kn``) and with its batch axis (``ctk,ctn->kn``), and for each JAX form
the ``convert`` ops XLA put around it in the compiled HLO (the upcasts that cost bf16 its speed).
"""

from __future__ import annotations

import ctypes
import gc
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as C  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from bench_throughput import ENGINE_MODES, compile_resident, resident_step  # noqa: E402

from wsjax.config import config_from_dict  # noqa: E402
from wsjax.engine import StreamingEngine  # noqa: E402
from wsjax.interop.hf_config import config_to_hf  # noqa: E402
from wsjax.models import get_model  # noqa: E402

# width:layers:batch:seq -- tokens per step 2k (issue 14's shape), 1k (deep and narrow), 8k (wide)
DEFAULT_SHAPES = "512:8:8:256,256:16:4:256,1024:4:32:256"
SMOKE_SHAPES = "64:2:2:32"
SMOKE_MATMULS = "64:32:64"
MATMUL_BATCH = 8  # the batch axis of the weight gradient's "ctk,ctn->kn" form (batch 8 x seq)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc malloc.h


def _args(p) -> None:
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="width:layers:batch:seq,...")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--steps", type=int, default=2, help="timed steps (best-of)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps (the first compiles)")
    p.add_argument("--keep_host_pages", action="store_true", help="glibc: no mmap, no trim")
    p.add_argument("--parts", action="store_true", help="also time each executable alone")
    p.add_argument("--matmuls", default="", help="M:K:N,... matmul shapes to time first")


def keep_host_pages() -> None:
    """Serve large allocations from the heap and never give freed pages back, so a new buffer
    does not page-fault fresh memory. wsjax's own switch where this branch has it."""
    try:
        from wsjax.hostmem import keep_host_pages as switch
    except ImportError:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 40)
    else:
        switch()


def cores() -> int:
    return len(os.sched_getaffinity(0))


def torch_step(cfg, batch: dict, bf16: bool):
    """One step of HF GPT-J + AdamW + clipping on ``batch`` (the user's usual loop), as a
    callable that returns when the step is done."""
    import torch
    import transformers

    torch.manual_seed(0)
    hf = config_to_hf(cfg.model)
    hf_cfg = transformers.GPTJConfig(**{k: v for k, v in hf.items() if k != "architectures"})
    model = transformers.GPTJForCausalLM(hf_cfg).train()
    o = cfg.optimizer
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=float(o.learning_rate),  # gptj_dict: a constant learning rate
        betas=(float(o.beta1), float(o.beta2)),
        eps=float(o.epsilon),
        weight_decay=float(o.weight_decay_rate),
    )
    ids = torch.from_numpy(batch["input_ids"]).long()
    labels = torch.from_numpy(batch["labels"]).long()
    max_norm = float(o.max_gradient_norm)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # wait for the step, as the JAX timings do

    return step


def step_parts(model, cfg, shape: tuple[int, int]) -> dict:
    """Where an engine step's time goes: each executable and transfer timed alone on this
    device (``wsjax.engine.estimate.measure_step_times``, the estimate's parts), and their
    schedule."""
    from wsjax.engine.estimate import estimate_step_seconds, measure_step_times

    engine = StreamingEngine(model, cfg)
    engine.compile(shape)
    executables = engine.executables(shape, train=True)
    times = measure_step_times(
        executables, executables.training(recompute=cfg.streaming.recompute), engine.placement
    )
    n = dict(num_layers=model.num_layers, n_micro=executables.n_micro, overlap=False)
    return {
        "compute": {k: round(v, 5) for k, v in times.compute.items()},
        "to_device": {k: round(v, 5) for k, v in times.to_device.items()},
        "to_host": {k: round(v, 5) for k, v in times.to_host.items()},
        "schedule_step_seconds": round(estimate_step_seconds(times, **n), 4),
    }


def interleaved_best(steps: dict, warmup: int, rounds: int, rec: dict) -> dict:
    """Best seconds of each step callable over ``rounds`` rounds of one step each, in turn
    (``_common.take_turns``); the medians go into ``rec`` (``<name>_median_step_seconds``)
    beside the bests."""
    times = C.take_turns(steps, rounds, warmup)
    for name, ts in times.items():
        rec[f"{name}_median_step_seconds"] = round(float(np.median(ts)), 4)
    return {name: min(ts) for name, ts in times.items()}


def matmul_line(shape: str, reps: int) -> dict:
    """GFLOP/s of one matmul shape in torch and in the JAX forms bf16 can take (see --matmuls)."""
    import jax.numpy as jnp
    import torch

    m, k, n = (int(v) for v in shape.split(":"))
    gflop = 2 * m * k * n / 1e9
    rng = np.random.default_rng(0)
    rec = {"setting": f"matmul_{m}x{k}x{n}", "m": m, "k": k, "n": n}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        best = C.time_calls(lambda a=a, b=b: a @ b, warmup=1, reps=reps)["best"]
        rec[f"torch_{name}_gflops"] = float(f"{gflop / best:.4g}")  # a tiny shape: not 0.0
    bf16, f32 = jnp.bfloat16, jnp.float32
    x = jnp.asarray(rng.standard_normal((m, k)), bf16)  # (T, K) activations
    w = jnp.asarray(rng.standard_normal((k, n)), bf16)  # (K, N) kernel
    g = jnp.asarray(rng.standard_normal((m, n)), bf16)  # (T, N) output gradient
    c = MATMUL_BATCH if m % MATMUL_BATCH == 0 else 1
    forms = {
        "fp32": (lambda x, w: x @ w, (x.astype(f32), w.astype(f32))),
        "bf16_to_bf16": (lambda x, w: x @ w, (x, w)),
        "bf16_to_fp32": (lambda x, w: jnp.dot(x, w, preferred_element_type=f32), (x, w)),
        "bf16_wgrad_flat": (
            lambda x, g: jnp.einsum("tk,tn->kn", x, g, preferred_element_type=f32),
            (x, g),
        ),
        "bf16_wgrad_batched": (
            lambda x, g: jnp.einsum("ctk,ctn->kn", x, g, preferred_element_type=f32),
            (x.reshape(c, m // c, k), g.reshape(c, m // c, n)),
        ),
    }
    for name, (fn, operands) in forms.items():
        compiled = jax.jit(fn).lower(*operands).compile()
        hlo = compiled.as_text()
        entry = hlo[hlo.index("ENTRY") :]  # ops of the program (fused or not) named after a convert
        rec[f"jax_{name}_converts"] = len(re.findall(r"%[\w.-]*convert[\w.-]* = ", entry))
        best = C.time_calls(
            lambda f=compiled, o=operands: f(*o).block_until_ready(), warmup=1, reps=reps
        )["best"]
        rec[f"jax_{name}_gflops"] = float(f"{gflop / best:.4g}")
    rec["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    return rec


def measure(args, shape: str, dtype: str, common: dict) -> dict:
    width, layers, batch, seq = (int(v) for v in shape.split(":"))
    bf16 = dtype == "bf16"
    d = C.gptj_dict(layers, width, batch, seq, vocab=args.vocab, mixed_precision=bf16)
    d["model"]["rotary_dim"] = 32  # GPT-J's rotary fraction (issue 14: rotary 32 of head_dim 64)
    cfg = config_from_dict(d)
    model = get_model(cfg.model)
    tokens = batch * seq
    host_batch = C.random_batch(batch, seq, args.vocab)
    rec = {
        **common,
        "setting": f"w{width}_L{layers}_t{tokens}_{dtype}",
        "width": width,
        "layers": layers,
        "batch": batch,
        "seq": seq,
        "tokens_per_step": tokens,
        "dtype": dtype,
        "params": model.num_params(),
    }
    steps = {"torch": torch_step(cfg, host_batch, bf16)}
    params = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(1)))
    ref, compiled, _ = compile_resident(model, cfg, batch, seq)
    steps["resident"] = resident_step(ref, compiled, params, host_batch)
    engines = {}
    for name, recompute in ENGINE_MODES.items():
        ecfg = config_from_dict({**d, "streaming": {"recompute": recompute}})
        engines[name] = StreamingEngine(model, ecfg, params=params)
        steps[name] = lambda e=engines[name]: e.train_step(host_batch)
        if args.parts:
            rec[f"{name}_parts_seconds"] = step_parts(model, ecfg, (batch, seq))
    seconds = interleaved_best(steps, args.warmup, args.steps, rec)
    engines.clear(), steps.clear()  # free all before the next setting
    gc.collect()
    for name, t in seconds.items():
        rec[f"{name}_step_seconds"] = round(t, 4)
        rec[f"{name}_tokens_per_sec"] = round(tokens / t, 1)
        if name != "torch":
            rec[f"{name}_vs_torch"] = round(seconds["torch"] / t, 3)
    best = min(ENGINE_MODES, key=lambda n: seconds[n])
    rec["target"] = C.target(f"engine ({best}) tokens/s / torch", rec[f"{best}_vs_torch"], 1.0)
    rec["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    return rec


def main() -> None:
    args = C.parse_args(__doc__, _args)
    if args.keep_host_pages:
        keep_host_pages()  # before JAX or torch allocate anything large
    # torch's OpenMP threads spin-wait between kernels by default: on a machine shared with
    # other processes that costs torch 5-6x here (measured: 12 s vs 2 s a step at w256 L4).
    # Passive waiting is what a fair comparison on a loaded machine needs; the line records it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch  # after mallopt: torch's allocator is glibc's too

    if args.smoke:
        args.shapes, args.vocab, args.steps, args.warmup = SMOKE_SHAPES, 256, 1, 1
        args.dtypes, args.parts, args.matmuls = "fp32", True, SMOKE_MATMULS
    torch.set_num_threads(cores())
    out = C.results_path(args.results_dir)
    common = {
        "bench": "peer",
        **C.machine(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "torch_threads": torch.get_num_threads(),
        "affinity_cores": cores(),
        "keep_host_pages": bool(args.keep_host_pages),
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "timing": f"best of {args.steps} interleaved rounds after {args.warmup} warm-up",
    }
    t0 = time.perf_counter()
    for shape in filter(None, args.matmuls.split(",")):
        rec = {**common, **matmul_line(shape, reps=max(3, args.steps))}
        rec["seconds_so_far"] = round(time.perf_counter() - t0, 1)
        C.emit(rec, out)
    for shape in args.shapes.split(","):
        for dtype in args.dtypes.split(","):
            rec = measure(args, shape, dtype, common)
            rec["seconds_so_far"] = round(time.perf_counter() - t0, 1)
            C.emit(rec, out)


if __name__ == "__main__":
    main()
