"""Input-pipeline benchmark: loader tokens/s for the default config, against training consumption.

    python benchmarks/bench_input.py [--smoke] [--train_tokens_per_sec N]

Defaults follow configs/params_gptj_tiny.yaml: seq 128, batch 16, the built-in stdlib corpus,
vocab 4096. Each setting prints ONE JSON line and appends it to
``benchmarks/results/<hostname>-<date>.jsonl``. ``tokens_per_sec`` is the loader alone (a
consumer that does nothing); ``wait_ms_per_step`` is what a trainer taking ``--step_ms`` per step
would block on. ``ratio`` = loader / trainer, where the trainer's tokens/s is
``--train_tokens_per_sec`` or, by default, measured: the engine's ``train_step`` on
configs/params_gptj_tiny.yaml (target: ratio >= 10).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as C  # noqa: E402

from wsjax.data import make_loader  # noqa: E402
from wsjax.data.builtin import ensure_builtin_corpus  # noqa: E402
from wsjax.data.shards import read_meta, unigram_entropy  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "params_gptj_tiny.yaml"


def measure(cfg: SimpleNamespace, vocab: int, steps: int, step_ms: float) -> dict:
    with make_loader(cfg, split="train", model_vocab_size=vocab, seed=1) as ld:
        next(ld)  # first batch: thread start and first read, not steady state
        t0 = time.perf_counter()
        for _ in range(steps):
            next(ld)
        free = time.perf_counter() - t0
        tokens_per_sec = steps * ld.tokens_per_batch / free
        waits = []
        for _ in range(steps if step_ms > 0 else 0):
            time.sleep(step_ms / 1000)  # a trainer busy for step_ms
            next(ld)
            waits.append(ld.wait_seconds_last)
    return {
        "tokens_per_sec": round(tokens_per_sec, 1),
        "batches_per_sec": round(steps / free, 2),
        "wait_ms_per_step": round(1000 * sum(waits) / len(waits), 4) if waits else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--data_dir", default="builtin:stdlib")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--step_ms", type=float, default=5.0, help="simulated trainer step time")
    p.add_argument("--train_tokens_per_sec", type=float, default=None, help="default: measured")
    p.add_argument("--no_train", action="store_true", help="do not measure the trainer")
    p.add_argument("--smoke", action="store_true", help="a seconds-long run")
    p.add_argument("--results_dir", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    steps = 50 if args.smoke else args.steps
    if args.train_tokens_per_sec is None and not args.no_train:  # the engine on the default config
        args.train_tokens_per_sec = C.train_tokens_per_sec(DEFAULT_CONFIG, 2 if args.smoke else 5)
    out = C.results_path(args.results_dir)
    common = {
        "bench": "input",
        **C.machine(),
        "python": platform.python_version(),
        "seq": args.seq,
        "batch": args.batch,
        "vocab": args.vocab,
        "steps": steps,
    }

    if args.data_dir == "builtin:stdlib":
        logs: list[str] = []
        t0 = time.perf_counter()
        root = ensure_builtin_corpus(args.vocab, log=logs.append)
        seconds = time.perf_counter() - t0
        meta = read_meta(root)
        C.emit(
            {
                **common,
                "setting": "builtin_corpus",
                "dir": str(root),
                "built_now": any("building" in m for m in logs),
                "ensure_seconds": round(seconds, 2),
                "source_mb": round(sum(s["bytes"] for s in meta["sources"]) / 1e6, 2),
                "files": len(meta["sources"]),
                "tokens": {s: m["tokens"] for s, m in meta["splits"].items()},
                "unigram_entropy_eval_nats": round(unigram_entropy(root, "eval"), 4),
            },
            out,
        )

    settings = [
        ("shards_w1_p2", "GptTokenShardsProcessor", 1, 2),
        ("shards_w2_p4", "GptTokenShardsProcessor", 2, 4),
        ("synthetic_w1_p2", "SyntheticDataProcessor", 1, 2),
    ]
    for name, processor, workers, prefetch in settings:
        cfg = SimpleNamespace(
            data_processor=processor,
            data_dir=args.data_dir,
            max_sequence_length=args.seq,
            batch_size=args.batch,
            shuffle=True,
            shuffle_seed=0,
            repeat=True,
            num_workers=workers,
            prefetch_factor=prefetch,
            vocab_size=args.vocab,
        )
        rec = {
            **common,
            "setting": name,
            "num_workers": workers,
            "prefetch_factor": prefetch,
            "step_ms": args.step_ms,
            **measure(cfg, args.vocab, steps, args.step_ms),
        }
        if args.train_tokens_per_sec:
            rec["train_tokens_per_sec"] = round(args.train_tokens_per_sec, 1)
            rec["ratio"] = round(rec["tokens_per_sec"] / args.train_tokens_per_sec, 2)
            rec["target"] = C.target("loader tokens/s / training", rec["ratio"], 10.0)
        C.emit(rec, out)


if __name__ == "__main__":
    main()
