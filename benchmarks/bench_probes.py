"""Probes: the pieces of a CPU step timed one by one, against torch where it is installed.

    python benchmarks/bench_probes.py [--smoke] [--results_dir DIR] [--rounds 15]
        [--bf16_rounds 5] [--no_flags]

One JSON line per probe, appended to ``<results_dir>/<host>-<date>-probes.jsonl``, each with
the machine (``_common.machine``) and torch's version (null without torch):

- ``attention_fp32``: the 256 x 16 block's attention shape (B 4, T 256, 4 heads of 64). JAX:
  the scores as the model computes them (``btgrk,bsgk->bgrts``), the scores from q and k laid
  out (B, H, T, K), one 2-D dot of the same FLOPs (B H T x K x T), the model's
  ``causal_attention`` forward and its gradient (forward included). torch (2 threads, as many
  as the process's cores): the scores, and HF GPT-J's attention (matmul, where, softmax,
  matmul) forward and forward + backward.
- ``attention_xla_flags``: the same JAX attention forward in one process per XLA CPU flag
  (oneDNN, XNNPACK, YNNPACK dot fusion), the processes in turn.
- ``head_fp32_<B:T:D:V>``: the LM head's value-and-grad (projection + the model's
  ``token_loss_sum``) with ``wsjax.precision.einsum`` (what the model uses: its backward written
  as two einsums) against autodiff of ``jnp.einsum``.
- ``bf16_pieces``: the 1024 x 4 block's shape (B 32, T 256, D 1024, F 4096, 16 heads of 64,
  rotary 32) in bf16: fc_in, fc_out, GELU (in bf16, and in fp32 then cast), the attention
  forward, rotary, layer norm, each through the model's own functions.
- ``bf16_attention_<B:H>``: the bf16 attention as the model runs it against q, k and v upcast to
  fp32 first, forward and gradient, at the 1024 x 4 shape and the 512 x 8 one (B 8, 8 heads).

Each timing is in milliseconds: the median of ``--rounds`` calls after a warm-up, with the
fastest and slowest (``<piece>_ms = [median, min, max]``). The pieces of a probe take turns,
one call each per round, so a change in the machine's load falls on all of them alike;
``loadavg_1m`` (at the start) and ``loadavg_1m_end`` say how loaded the machine was.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as C  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from wsjax import precision  # noqa: E402
from wsjax.losses import token_loss_sum  # noqa: E402
from wsjax.models.layers import activation, apply_rotary, causal_attention, layer_norm  # noqa: E402

FLAGS = (
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_experimental_onednn_fusion_type=dot",
    "--xla_cpu_experimental_onednn_custom_call=true",
    "--xla_cpu_experimental_xnn_fusion_type=dot",
    "--xla_cpu_experimental_ynn_fusion_type=dot",
)
F32, BF16 = jnp.float32, jnp.bfloat16


def timings(pieces: dict, rounds: int) -> dict:
    """``{<name>_ms: [median, min, max]}`` of each ``pieces[name]()`` (which blocks until done):
    one warm-up call each, then ``rounds`` rounds of one call each, in turn."""
    times = C.take_turns(pieces, rounds)
    return {
        f"{k}_ms": [round(1e3 * f(v), 3) for f in (statistics.median, min, max)]
        for k, v in times.items()
    }


def ready(f, *args):
    """A call of jitted ``f`` on ``args`` that blocks until its outputs exist."""
    return lambda: jax.block_until_ready(f(*args))


def normal(key: int, shape, dtype=F32):
    return jax.random.normal(jax.random.PRNGKey(key), shape, F32).astype(dtype)


def grad_of(f):
    """Forward and gradient of ``sum(f(q, k, v))`` in q, k, v."""
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(F32)), argnums=(0, 1, 2)))


def attention(q, k, v):
    return causal_attention(q, k, v, None, 0.0)


def scores(q, k):
    """The model's scores (``masked_attention``): q as (B, T, G, H/G, K), here G = H."""
    b, t, h, k_dim = q.shape
    q = q.reshape(b, t, h, 1, k_dim)
    return jnp.einsum("btgrk,bsgk->bgrts", q, k, preferred_element_type=F32)


def attention_fp32(b: int, t: int, h: int, k: int, rounds: int) -> dict:
    q, kk, v = (normal(i, (b, t, h, k)) for i in range(3))  # (B, T, H, K)
    a2, b2 = normal(3, (b * h * t, k)), normal(4, (k, t))
    pieces = {
        "jax_scores": ready(jax.jit(scores), q, kk),
        "jax_scores_bhtk": ready(
            jax.jit(lambda q, k: jnp.einsum("bhtk,bhsk->bhts", q, k)),
            q.transpose(0, 2, 1, 3),
            kk.transpose(0, 2, 1, 3),
        ),
        "jax_one_2d_dot_same_flops": ready(jax.jit(jnp.matmul), a2, b2),
        "jax_attention_fwd": ready(jax.jit(attention), q, kk, v),
        "jax_attention_grad": ready(grad_of(attention), q, kk, v),
    }
    pieces |= torch_attention(q, kk, v)
    return timings(pieces, rounds)


def torch_or_none():
    try:
        import torch  # lazy: an optional yardstick (CI's leg 2 has no torch)
    except ImportError:
        return None
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    return torch


def torch_attention(q, k, v) -> dict:
    """HF GPT-J's attention in torch on the same (B, T, H, K) arrays; {} without torch."""
    torch = torch_or_none()
    if torch is None:
        return {}
    tq, tk, tv = (torch.tensor(jax.device_get(x)).transpose(1, 2).contiguous() for x in (q, k, v))
    t, scale = q.shape[1], math.sqrt(q.shape[-1])
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))

    def forward(q, k, v):  # (B, H, T, K)
        scores = torch.where(causal, torch.matmul(q, k.transpose(-1, -2)), torch.finfo().min)
        return torch.matmul(torch.softmax(scores / scale, dim=-1), v)

    def scores():
        with torch.no_grad():
            torch.matmul(tq, tk.transpose(-1, -2))

    def forward_only():
        with torch.no_grad():
            forward(tq, tk, tv)

    def forward_backward():
        leaves = [x.detach().requires_grad_() for x in (tq, tk, tv)]
        forward(*leaves).sum().backward()

    return {
        "torch_scores": scores,
        "torch_attention_fwd": forward_only,
        "torch_attention_fwd_bwd": forward_backward,
    }


def attention_only(b: int, t: int, h: int, k: int, rounds: int) -> dict:
    """The JAX attention forward alone (one process of ``attention_xla_flags``)."""
    q, kk, v = (normal(i, (b, t, h, k)) for i in range(3))
    return timings({"jax_attention_fwd": ready(jax.jit(attention), q, kk, v)}, rounds)


def xla_flags(shape: tuple, rounds: int, flags) -> dict:
    """The attention forward in one child process per flag ("none": no flag), in turn."""
    out = {}
    for flag in ("none", *flags):
        env = dict(os.environ, XLA_FLAGS="" if flag == "none" else flag)
        args = ["--attention_only", ":".join(map(str, shape)), "--rounds", str(rounds)]
        p = subprocess.run(
            [sys.executable, __file__, *args], env=env, capture_output=True, text=True
        )
        if p.returncode:
            out[flag] = f"failed: {(p.stderr.strip().splitlines() or ['?'])[-1][:200]}"
        else:
            out[flag] = json.loads(p.stdout.strip().splitlines()[-1])["jax_attention_fwd_ms"]
    return {"attention_fwd_ms_by_flag": out}


def head_fp32(b: int, t: int, d: int, v: int, rounds: int) -> dict:
    h, w = normal(0, (b, t, d)), normal(1, (d, v)) / math.sqrt(d)
    labels = jax.random.randint(jax.random.PRNGKey(2), (b, t), 0, v)
    mask = jnp.ones((b, t), F32)

    def value_and_grad(einsum):
        def loss(h, w):
            return token_loss_sum(einsum("btd,dv->btv", h, w), labels, mask)[0]

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    pieces = {
        "precision_einsum": ready(value_and_grad(precision.einsum), h, w),
        "jnp_einsum_autodiff": ready(value_and_grad(jnp.einsum), h, w),
    }
    return timings(pieces, rounds)


def bf16_pieces(b: int, t: int, d: int, f: int, h: int, rounds: int) -> dict:
    x, hidden = normal(0, (b, t, d), BF16), normal(1, (b, t, f), BF16)
    w_in, w_out = normal(2, (d, f), BF16), normal(3, (f, d), BF16)
    q, k, v = (normal(4 + i, (b, t, h, d // h), BF16) for i in range(3))
    ln = layer_norm(SimpleNamespace(hidden_size=d, layer_norm_epsilon=1e-5), nnx.Rngs(0))
    gelu = jax.jit(lambda y: activation("gelu", y))
    pieces = {
        "fc_in": ready(jax.jit(lambda x, w: precision.einsum("btd,df->btf", x, w)), x, w_in),
        "fc_out": ready(jax.jit(lambda y, w: precision.einsum("btf,fd->btd", y, w)), hidden, w_out),
        "gelu_bf16": ready(gelu, hidden),
        "gelu_in_fp32_then_cast": ready(
            jax.jit(lambda y: activation("gelu", y.astype(F32)).astype(BF16)), hidden
        ),
        "attention_fwd": ready(jax.jit(attention), q, k, v),
        "rotary": ready(jax.jit(lambda q: apply_rotary(q, min(32, d // h))), q),
        "layer_norm": ready(jax.jit(lambda x: ln(x)), x),
    }
    return timings(pieces, rounds)


def bf16_attention(b: int, t: int, h: int, k: int, rounds: int) -> dict:
    q, kk, v = (normal(i, (b, t, h, k), BF16) for i in range(3))

    def upcast(q, k, v):
        return attention(q.astype(F32), k.astype(F32), v.astype(F32)).astype(BF16)

    pieces = {
        "current_fwd": ready(jax.jit(attention), q, kk, v),
        "upcast_to_fp32_fwd": ready(jax.jit(upcast), q, kk, v),
        "current_grad": ready(grad_of(attention), q, kk, v),
        "upcast_to_fp32_grad": ready(grad_of(upcast), q, kk, v),
    }
    return timings(pieces, rounds)


def probes(smoke: bool, rounds: int, bf16_rounds: int, flags: bool) -> list:
    """(setting, function of no arguments) of each probe, in the order they run."""
    attn = (1, 16, 2, 16) if smoke else (4, 256, 4, 64)
    heads = [(1, 16, 32, 64)] if smoke else [(4, 256, 256, 8192), (8, 256, 512, 8192)]
    wide = (1, 16, 64, 256, 4) if smoke else (32, 256, 1024, 4096, 16)
    bf16_attn = [(1, 16, 4, 16)] if smoke else [(32, 256, 16, 64), (8, 256, 8, 64)]
    out = [("attention_fp32", lambda: attention_fp32(*attn, rounds))]
    if flags:
        out.append(("attention_xla_flags", lambda: xla_flags(attn, rounds, () if smoke else FLAGS)))
    for s in heads:
        out.append((f"head_fp32_{':'.join(map(str, s))}", lambda s=s: head_fp32(*s, rounds)))
    out.append(("bf16_pieces", lambda: bf16_pieces(*wide, bf16_rounds)))
    for s in bf16_attn:
        out.append((f"bf16_attention_{s[0]}:{s[2]}", lambda s=s: bf16_attention(*s, bf16_rounds)))
    return out


def add_args(p) -> None:
    p.add_argument("--rounds", type=int, default=15, help="rounds of the fp32 probes")
    p.add_argument("--bf16_rounds", type=int, default=5, help="rounds of the bf16 probes")
    p.add_argument("--no_flags", action="store_true", help="leave out attention_xla_flags")
    p.add_argument("--attention_only", help="B:T:H:K: print the attention forward's timing")


def main() -> None:
    args = C.parse_args(__doc__, add_args)
    if args.attention_only:  # a child of attention_xla_flags
        shape = tuple(int(x) for x in args.attention_only.split(":"))
        print(json.dumps(attention_only(*shape, args.rounds)))
        return
    rounds, bf16_rounds = (2, 2) if args.smoke else (args.rounds, args.bf16_rounds)
    date = datetime.date.today().isoformat()
    out = Path(args.results_dir) / f"{socket.gethostname()}-{date}-probes.jsonl"
    torch = torch_or_none()
    torch_version = None if torch is None else torch.__version__
    for setting, measure in probes(args.smoke, rounds, bf16_rounds, not args.no_flags):
        record = {**C.machine(), "torch": torch_version, "bench": "probes", "setting": setting}
        record |= {"rounds": bf16_rounds if setting.startswith("bf16") else rounds}
        record |= measure()
        C.emit({**record, "loadavg_1m_end": round(os.getloadavg()[0], 2)}, out)


if __name__ == "__main__":
    main()
