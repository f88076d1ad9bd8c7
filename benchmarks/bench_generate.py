"""Generation: tokens/s of wsjax's streamed decoder against transformers' generate, same process.

    python benchmarks/bench_generate.py [--smoke] [--results_dir DIR] [--config PATH]
        [--batches 1,8] [--prompt_len 16] [--new_tokens 64] [--kv_cache host]

The model of ``--config`` (default: the built-in tiny GPT-J, configs/params_gptj_tiny.yaml) with
random weights is exported with ``wsjax.interop.hf.export_hf`` and loaded by transformers (fp32,
eager attention, PyTorch's default CPU threads; on the GPU when torch sees one), so both generate
from the same weights. Per batch
size: greedy generation of ``--new_tokens`` tokens from random prompts of ``--prompt_len``
tokens, best of ``--reps`` timed calls after one warm-up (wsjax compiles there); the tokens of
the two must agree. One JSON line per batch: both tokens/s, their ratio, the model bytes and
the bytes a decode step streams per generated token (model bytes / batch). ``--smoke``: 2 layers,
8 new tokens. ``--kv_cache host``: per batch, one more line (setting ``b<batch>_kv_host``):
wsjax's tokens/s with the KV caches offloaded to host memory (streamed with their layer's
weights) against resident, timed the same way in the same run, the tokens of the two equal, and
the link bytes a generated token then costs (weights + the caches in and out).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as C  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "params_gptj_tiny.yaml"


def _args(p) -> None:
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--kv_cache", choices=("device", "host"), default="device")


def main() -> None:
    import torch
    import transformers

    from wsjax.config import load_config
    from wsjax.inference.decode import StreamingDecoder, link_bytes_per_token
    from wsjax.interop.hf import export_hf
    from wsjax.models import get_model

    args = C.parse_args(__doc__, _args)
    overrides = ["model.num_hidden_layers=2"] if args.smoke else []
    new_tokens, reps = (8, 1) if args.smoke else (args.new_tokens, args.reps)
    config = load_config(args.config, overrides)
    model = get_model(config.model)
    params = jax.tree.map(np.asarray, jax.jit(model.init)(jax.random.PRNGKey(0)))
    decoder = StreamingDecoder(model, params, config.streaming)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = export_hf(config.model, params, Path(tmp) / "hf")
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    hf_device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = hf.to(hf_device)
    hf.generation_config.eos_token_id = None  # every call makes exactly new_tokens tokens

    out = C.results_path(args.results_dir)
    for batch in [int(b) for b in args.batches.split(",")]:
        rng = np.random.default_rng(batch)
        prompts = rng.integers(1, config.model.vocab_size, (batch, args.prompt_len))
        got = {}  # each side's last tokens

        def ours(prompts=prompts, got=got, kv_cache="device"):
            got[kv_cache] = decoder.generate(prompts.tolist(), new_tokens, kv_cache=kv_cache)

        def theirs(prompts=prompts, got=got):
            with torch.no_grad():
                ids = torch.as_tensor(prompts, dtype=torch.long, device=hf_device)
                g = hf.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )
            got["hf"] = g[:, args.prompt_len :].cpu().numpy()

        t_ours = C.time_calls(ours, warmup=1, reps=reps)["best"]
        t_hf = C.time_calls(theirs, warmup=1, reps=reps)["best"]
        generated = batch * new_tokens
        model_bytes = decoder.model_bytes()

        def record(setting: str, batch=batch) -> dict:
            """What every line of this batch size starts with."""
            return {
                "bench": "generate",
                "setting": setting,
                **C.machine(),
                "config": Path(args.config).name,
                "layers": model.num_layers,
                "batch": batch,
                "prompt_len": args.prompt_len,
                "new_tokens": new_tokens,
            }

        C.emit(
            {
                **record(f"b{batch}"),
                "params": model.num_params(),
                "wsjax_tokens_per_sec": round(generated / t_ours, 1),
                "hf_tokens_per_sec": round(generated / t_hf, 1),
                "wsjax_vs_hf": round(t_hf / t_ours, 3),
                "same_greedy_tokens": bool(np.array_equal(got["device"], got["hf"])),
                "model_bytes": model_bytes,
                "streamed_bytes_per_token": link_bytes_per_token(model_bytes, batch),
                "torch_threads": torch.get_num_threads(),
                "hf_device": hf_device,
                "compile_count": decoder.compile_count,
            },
            out,
        )
        if args.kv_cache == "host":
            t_off = C.time_calls(lambda o=ours: o(kv_cache="host"), warmup=1, reps=reps)["best"]
            kv_bytes = decoder.plan.kv_cache_bytes
            C.emit(
                {
                    **record(f"b{batch}_kv_host"),
                    "resident_tokens_per_sec": round(generated / t_ours, 1),
                    "offload_tokens_per_sec": round(generated / t_off, 1),
                    "offload_vs_resident": round(t_ours / t_off, 3),
                    "same_tokens": bool(np.array_equal(got["host"], got["device"])),
                    "kv_cache_bytes": kv_bytes,
                    # every step streams the weights in and each layer's cache in and out
                    "offload_link_bytes_per_token": (model_bytes + 2 * kv_bytes) / batch,
                },
                out,
            )


if __name__ == "__main__":
    main()
