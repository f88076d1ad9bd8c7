"""The README's "After training" commands, timed and recorded on a trained model_dir.

    python benchmarks/bench_after_training.py --model_dir model_dir [--eval_text FILE]
    python benchmarks/bench_after_training.py --smoke      # trains 2 steps of the default first

Runs, as a user would, each in a fresh process:
``python scripts/convert_hf.py --from_orbax MODEL_DIR --to_hf OUT`` (the export), then loads OUT
with transformers (``AutoModelForCausalLM`` + ``AutoTokenizer``) and compares its logits on the
first window of the eval text with wsjax's from the same checkpoint (max |diff| / max |logit|;
a note where torch is not installed), then ``python -m wsjax.train -o MODEL_DIR --eval_text
FILE`` and parses its result line (loss, perplexity, accuracy, bits per byte); zlib level 9
on the same bytes is the yardstick of a compressor with no model of the language. The default
text is ``turtledemo/__main__.py`` of this Python's standard library: the built-in corpus leaves
``turtledemo`` out, so the model never saw it. One JSON line.
"""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _common as C  # noqa: E402

RESULT = re.compile(
    r"Eval of .* at global step (\d+) \((\d+) tokens, (\d+) bytes\): loss = ([0-9.]+), "
    r"perplexity = ([0-9.]+), accuracy = ([0-9.]+), bits per byte = ([0-9.]+)"
)


def default_text() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]) / "turtledemo" / "__main__.py"


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    seconds = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log[-3000:]}")
    return seconds, log


def logits_agreement(model_dir: Path, hf_dir: Path, text: Path) -> dict:
    """transformers on the export vs wsjax on the checkpoint, on the text's first window (a
    note instead where torch, which transformers' models need, is not installed)."""
    try:
        import torch
    except ImportError:
        print("bench_after_training: torch is not installed: logits not compared", file=sys.stderr)
        return {"logits_agreement": "skipped: torch is not installed"}
    import jax
    import numpy as np
    import transformers

    from wsjax.interop.export import PARAMS_TRAIN, load_model_config
    from wsjax.interop.load import load_start
    from wsjax.models import get_model

    cfg = load_model_config(model_dir / PARAMS_TRAIN)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = hf_tok(text.read_text())["input_ids"][: min(128, cfg.max_position_embeddings)]
    tokens = np.asarray([ids], np.int32)
    with torch.no_grad():
        ref = hf_model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    model = get_model(cfg)
    params = load_start(model_dir, model, None, weights_only=True).params
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(jax.jit(model.logits)(params, tokens))
    return {
        "tokenizer_class": type(hf_tok).__name__,
        "logits_max_abs_diff_rel": float(np.abs(ours - ref).max() / np.abs(ref).max()),
    }


def main() -> None:
    def add(p):
        p.add_argument("--model_dir", help="a trained run (default with --smoke: a fresh one)")
        p.add_argument("--eval_text", default=str(default_text()))

    args = C.parse_args(__doc__, add)
    text = Path(args.eval_text)
    with tempfile.TemporaryDirectory(prefix="wsjax-after-") as tmp:
        tmp = Path(tmp)
        model_dir = Path(args.model_dir).absolute() if args.model_dir else tmp / "model_dir"
        if args.smoke and not args.model_dir:
            train = ["-m", "train", "--max_steps", "2", "--eval_steps", "1"]
            timed([sys.executable, "-m", "wsjax.train", "-o", str(model_dir), *train], tmp)
        elif not args.model_dir:
            sys.exit("give --model_dir (a trained run), or --smoke")
        export_cmd = ["scripts/convert_hf.py", "--from_orbax", str(model_dir)]
        export_s, _ = timed([sys.executable, *export_cmd, "--to_hf", str(tmp / "hf")], ROOT)
        agreement = logits_agreement(model_dir, tmp / "hf", text)
        eval_cmd = ["-m", "wsjax.train", "-o", str(model_dir), "--eval_text", str(text)]
        eval_s, log = timed([sys.executable, *eval_cmd], tmp)
    found = RESULT.findall(log)
    if not found:
        sys.exit(f"no eval result line in:\n{log[-3000:]}")
    step, tokens, nbytes, loss, ppl, acc, bpb = found[-1]
    nb = len(text.read_bytes())
    C.emit(
        {
            "bench": "after_training",
            **C.machine(),
            "setting": "smoke" if args.smoke else "default_run",
            "export_command": "python scripts/convert_hf.py --from_orbax model_dir --to_hf OUT",
            "export_seconds": round(export_s, 2),
            **agreement,
            "eval_command": f"python -m wsjax.train -o model_dir --eval_text {text.name}",
            "eval_text": str(text.relative_to(sysconfig.get_paths()["stdlib"]))
            if text.is_relative_to(sysconfig.get_paths()["stdlib"])
            else str(text),
            "eval_seconds": round(eval_s, 2),
            "step": int(step),
            "tokens": int(tokens),
            "bytes": int(nbytes),
            "loss": float(loss),
            "perplexity": float(ppl),
            "accuracy": float(acc),
            "bits_per_byte": float(bpb),
            "zlib9_bits_per_byte": round(len(zlib.compress(text.read_bytes(), 9)) * 8 / nb, 4),
        },
        C.results_path(args.results_dir),
    )


if __name__ == "__main__":
    main()
