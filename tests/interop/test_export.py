"""A training run exported to HuggingFace in one call (wsjax.interop.export,
scripts/convert_hf.py) and the run's tokenizer kept in model_dir (wsjax.data.tokenizer).

Yardsticks: transformers' PyTorch models loaded from the export against wsjax's own logits from
the checkpoint the run wrote (both fp32 on CPU, matmul precision "highest"; tolerance as in
tests/interop/test_hf.py, whose docstring derives it), and the shards folder's own tokenizer.json
(HF tokenizers) against AutoTokenizer loaded from the export. The model comparisons need torch
(marked ``needs_torch``: CI's leg 1); the tokenizer's needs only transformers' tokenizers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from tests.helpers import MODEL_VOCAB, make_shards, shards_input, train_briefly
from tests.interop.test_hf import LOGIT_RTOL, torch
from wsjax.interop.export import export_run

REPO = Path(__file__).resolve().parents[2]
TEXT = "def main(argv):\n    return sorted(set(argv))  # unique names\n"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("data") / "shards")


def wsjax_logits(path: Path, tokens: np.ndarray) -> np.ndarray:
    """Logits of checkpoint ``path`` (a model-ckpt-<step>, or a model_dir's newest),
    computed by wsjax itself."""
    from wsjax.checkpoint import run_model_dir
    from wsjax.interop.export import PARAMS_TRAIN, load_model_config
    from wsjax.interop.load import load_start
    from wsjax.models import get_model

    model = get_model(load_model_config(run_model_dir(path) / PARAMS_TRAIN))
    params = load_start(path, model, None, weights_only=True).params
    with jax.default_matmul_precision("highest"):
        return np.asarray(jax.jit(model.logits)(params, jnp.asarray(tokens)))


@pytest.mark.slow
@pytest.mark.needs_torch
@pytest.mark.parametrize("family", ["gptj", "gpt2", "neox"])
def test_trained_run_exports_to_transformers(tmp_path, shards, family):
    from tokenizers import Tokenizer

    md = tmp_path / "run"
    result = train_briefly(family, shards_input(shards), md)
    assert result.global_step == 2
    # the run keeps its tokenizer: the shards' own, as an HF tokenizer folder
    run_tok = md / "tokenizer" / "tokenizer.json"
    assert run_tok.read_bytes() == (shards / "tokenizer.json").read_bytes()

    out = export_run(md, tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert isinstance(hf_tok, transformers.PreTrainedTokenizerFast)  # the Rust tokenizer
    want_ids = Tokenizer.from_file(str(shards / "tokenizer.json")).encode(TEXT).ids
    assert hf_tok(TEXT)["input_ids"] == want_ids
    assert hf_tok.decode(want_ids) == TEXT  # byte-level BPE round-trips the text
    eos = Tokenizer.from_file(str(shards / "tokenizer.json")).token_to_id("<|endoftext|>")
    assert hf_tok.eos_token_id == eos == model.config.eos_token_id

    tokens = np.asarray([want_ids[:16], want_ids[-16:]], np.int32)
    with torch.no_grad():
        ref = model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    _assert_logits_close(wsjax_logits(md, tokens), ref)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "wsjax.interop.convert", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _assert_logits_close(ours: np.ndarray, ref: np.ndarray) -> None:
    """test_hf's rule (max |diff| <= LOGIT_RTOL x the largest logit), where a briefly trained
    model's logits may all lie below 1: then the floor 1 keeps the bound at fp32 roundings of
    the O(1) values inside the chain (layer norms, residual stream)."""
    assert ours.shape == ref.shape
    scale = float(np.abs(ref).max())
    assert scale > 0.05  # not a degenerate all-zero output
    err = float(np.abs(ours - ref).max())
    assert err <= LOGIT_RTOL * max(scale, 1.0), f"max |diff| {err:.3g}, largest logit {scale:.3g}"


def _hf_logits(hf_dir: Path, tokens: np.ndarray) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


@pytest.mark.slow
@pytest.mark.needs_torch
def test_cli_exports_the_newest_good_checkpoint_and_errors_are_one_line(tmp_path):
    md = tmp_path / "run"
    synthetic = {"data_processor": "SyntheticDataProcessor", "data_dir": "x"}
    train_briefly("gptj", synthetic, md, 3, save_checkpoints_steps=2)  # model-ckpt-2 and -3
    assert not (md / "tokenizer").exists()  # synthetic data has no tokenizer
    tokens = np.arange(32, dtype=np.int32).reshape(2, 16) % MODEL_VOCAB

    r = _cli("--from_orbax", str(md / "model-ckpt-3"), "--to_hf", str(tmp_path / "hf3"))
    assert r.returncode == 0, r.stderr
    assert "no tokenizer" in r.stdout + r.stderr  # one warning; the export has none
    assert json.loads((tmp_path / "hf3" / "config.json").read_text())["eos_token_id"] is None
    assert not (tmp_path / "hf3" / "tokenizer.json").exists()
    step3 = _hf_logits(tmp_path / "hf3", tokens)
    _assert_logits_close(wsjax_logits(md / "model-ckpt-3", tokens), step3)

    # a corrupt newest checkpoint: the model_dir exports the newest good one, with a warning
    data = max((p for p in (md / "model-ckpt-3" / "params").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)  # fmt: skip
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    r = _cli("--from_orbax", str(md), "--to_hf", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    said = r.stdout + r.stderr
    assert "model-ckpt-3" in said and "crc32c" in said and "falling back" in said, said
    step2 = _hf_logits(tmp_path / "hf", tokens)
    _assert_logits_close(wsjax_logits(md / "model-ckpt-2", tokens), step2)
    assert np.abs(step2 - step3).max() > 1e-3  # step 3's weights differ: not exported

    for args, words in [
        (["--from_orbax", str(tmp_path / "nope")], "does not exist"),
        (["--from_orbax", str(md)], "not empty"),  # tmp_path/hf is written already
        (["--from_orbax", str(tmp_path)], "params_train.yaml"),
        (["--from_orbax", str(md / "model-ckpt-3")], "crc32c"),  # named: no fallback
    ]:
        out = str(tmp_path / "hf") if words == "not empty" else str(tmp_path / "o2")
        r = _cli(*args, "--to_hf", out)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().count("\n") == 0 and words in r.stderr, r.stderr
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["n_layer"] == 2 and cfg["vocab_size"] == MODEL_VOCAB


def test_run_tokenizer_folder_loads_in_transformers_and_a_broken_one_is_skipped(
    tmp_path, shards, caplog
):
    import shutil

    from tokenizers import Tokenizer

    from wsjax.data.shards import ShardSource
    from wsjax.data.tokenizer import save_run_tokenizer

    md = tmp_path / "run"
    md.mkdir()
    saved = save_run_tokenizer(ShardSource([shards], "train", 16, MODEL_VOCAB), md, 64)
    hf_tok = transformers.AutoTokenizer.from_pretrained(saved)
    assert (
        hf_tok(TEXT)["input_ids"]
        == Tokenizer.from_file(str(shards / "tokenizer.json")).encode(TEXT).ids
    )
    assert hf_tok.model_max_length == 64

    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    (broken / "tokenizer.json").write_text("{not json")
    md2 = tmp_path / "run2"
    md2.mkdir()
    assert save_run_tokenizer(ShardSource([broken], "train", 16, MODEL_VOCAB), md2, 64) is None
    assert "keeps no tokenizer" in caplog.text and "tokenizer.json" in caplog.text
    assert list(md2.iterdir()) == []  # no half-written folder left behind
