"""``-m eval --eval_text FILE`` (wsjax.trainer.eval_text, wsjax.trainer.evaluation) against a
hand computation: the same stream tokenised independently with the data's own tokenizer.json, each
window's logits from the model applied directly to the checkpoint's weights, the cross-entropy
summed in float64 with numpy, and bits per byte = loss_sum / ln 2 / len(text.encode("utf-8")).

Tolerance: both sides are fp32 forwards of the same 2-layer model on the same windows (the engine
streams, the yardstick runs resident), so each token's loss agrees to a few fp32 roundings of
O(1) values (~1e-6 relative, see tests/interop/test_hf.py); a sum of positive terms keeps that
relative error, so rtol 1e-5 holds on any machine.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import make_shards, shards_input, train_briefly
from wsjax.train import main

SEQ, BATCH = 16, 4  # the window and batch of train_briefly's train_input
DOCS = [
    "Grüße aus Köln: naïve café ☕ — 3 × 4 = 12\n",
    "def area(r):\n    return 3.14159 * r ** 2\n" * 4,
    "for i in range(10):\n    print(i, i * i)\n",
]
RTOL = 1e-5


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(model_dir of a 3-step run on token shards, the shards folder)."""
    root = tmp_path_factory.mktemp("evaltext")
    shards = make_shards(root / "shards")
    train_briefly("gptj", shards_input(shards), root / "run", steps=3)
    return root / "run", shards


def hand_eval(model_dir: Path, shards: Path, docs: list[str]) -> dict:
    from tokenizers import Tokenizer

    from wsjax.interop.export import PARAMS_TRAIN, load_model_config
    from wsjax.interop.load import load_start
    from wsjax.models import get_model

    tok = Tokenizer.from_file(str(shards / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    stream = [eos]
    for d in docs:
        stream += tok.encode(d).ids + [eos]
    model = get_model(load_model_config(model_dir / PARAMS_TRAIN))
    params = load_start(model_dir, model, None, weights_only=True).params
    loss_sum, correct, count = 0.0, 0, 0
    for start in range(0, len(stream) - 1, SEQ):
        window = np.asarray(stream[start : start + SEQ + 1], np.int32)
        logits = np.asarray(model.logits(params, jnp.asarray(window[None, :-1])), np.float64)[0]
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))[:, None]
        logp -= logits.max(-1, keepdims=True)
        labels = window[1:]
        loss_sum -= float(logp[np.arange(len(labels)), labels].sum())
        correct += int((logits.argmax(-1) == labels).sum())
        count += len(labels)
    assert count == len(stream) - 1  # every token after the leading EOS, once
    num_bytes = sum(len(d.encode("utf-8")) for d in docs)
    return {
        "loss": loss_sum / count,
        "accuracy": correct / count,
        "bits_per_byte": loss_sum / math.log(2) / num_bytes,
        "tokens": count,
        "bytes": num_bytes,
    }


def _eval(model_dir: Path, path: Path):
    from wsjax.config import load_config
    from wsjax.train import run

    config = load_config(model_dir / "train" / "params_train.yaml")
    return run(config, "eval", model_dir, eval_text=path).evals[-1]


@pytest.mark.slow
def test_jsonl_matches_hand_computation(trained, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    md, shards = trained
    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    got, want = _eval(md, f), hand_eval(md, shards, DOCS)
    assert want["tokens"] > 2 * BATCH * SEQ  # several batches, the last one padded
    assert got["tokens"] == want["tokens"] and got["bytes"] == want["bytes"]
    assert len(DOCS[0].encode()) > len(DOCS[0])  # multi-byte characters count as bytes
    for key in ("loss", "bits_per_byte"):
        assert got[key] == pytest.approx(want[key], rel=RTOL), key
    assert got["perplexity"] == pytest.approx(math.exp(want["loss"]), rel=RTOL)
    # an argmax could flip only on a near-tie; allow one such token
    assert abs(got["accuracy"] - want["accuracy"]) * want["tokens"] <= 1
    ev = EventAccumulator(str(md / "eval_text")).Reload()
    assert ev.Scalars("eval/bits_per_byte")[-1].value == pytest.approx(got["bits_per_byte"])
    assert ev.Scalars("eval/perplexity")[-1].step == 3


@pytest.mark.slow
def test_cli_plain_text_and_bad_files_are_one_line(trained, tmp_path, capsys):
    md, shards = trained
    f = tmp_path / "mine.txt"
    f.write_text(DOCS[1])
    assert main(["-o", str(md), "--eval_text", str(f)]) == 0  # -m eval and the run's params
    out = capsys.readouterr()
    want = hand_eval(md, shards, [DOCS[1]])
    assert f"bits per byte = {want['bits_per_byte']:.4f}" in out.out + out.err

    bad_utf8 = tmp_path / "bad.txt"
    bad_utf8.write_bytes(b"ok \xff\xfe")
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "a"}\n{"txt": "b"}\n')
    cases = [
        (tmp_path / "missing.txt", "no such file"),
        (bad_utf8, "invalid UTF-8"),
        (empty, "holds no text"),
        (bad_json, "no field 'text'"),
    ]
    for path, words in cases:
        assert main(["-o", str(md), "-m", "eval", "--eval_text", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and words in err and str(path.name) in err, err


def test_eval_text_needs_the_run_tokenizer(tmp_path, capsys):
    md = tmp_path / "run"  # no run here, so no tokenizer: refused before any weights load
    f = tmp_path / "t.txt"
    f.write_text("hello")
    assert main(["-o", str(md), "--eval_text", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "saved no tokenizer" in err, err
    assert main(["-o", str(md), "-m", "train", "--eval_text", str(f)]) == 2
    assert "needs -m eval" in capsys.readouterr().err
