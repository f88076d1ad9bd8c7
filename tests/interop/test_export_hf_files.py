"""The files of an HF export (wsjax.interop.export): generation_config.json with the BOS / EOS /
pad ids and max_length, a pad token (the EOS token, as the run's tokenizer has none) in
config.json and the tokenizer's files, every file readable by others (0644), and the folder
loads in ``transformers.pipeline("text-generation")``."""

from __future__ import annotations

import json
import stat

import pytest

from tests.helpers import make_shards, shards_input, train_briefly
from wsjax.interop.export import export_run


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    md = root / "md"
    train_briefly("gpt2", shards_input(make_shards(root / "shards")), md, steps=1)
    return export_run(md, root / "hf")


def test_generation_config_and_the_pad_token(export):
    config = json.loads((export / "config.json").read_text())
    eos = config["eos_token_id"]
    assert isinstance(eos, int) and config["pad_token_id"] == eos == config["bos_token_id"]
    generation = json.loads((export / "generation_config.json").read_text())
    assert generation == {
        "bos_token_id": eos,
        "eos_token_id": eos,
        "pad_token_id": eos,
        "max_length": config["n_positions"],
    }
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        tok = json.loads((export / name).read_text())
        assert tok["pad_token"] == tok["eos_token"] == "<|endoftext|>", name


def test_every_file_is_readable_by_others(export):
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in export.iterdir()}
    assert "model.safetensors" in modes and "generation_config.json" in modes
    assert set(modes.values()) == {0o644}, modes
    assert stat.S_IMODE(export.stat().st_mode) == 0o755


@pytest.mark.needs_torch
def test_the_export_runs_in_a_transformers_pipeline(export):
    import transformers

    pipe = transformers.pipeline("text-generation", model=str(export))
    assert pipe.model.generation_config.pad_token_id == pipe.tokenizer.pad_token_id
    assert pipe.model.generation_config.max_length == pipe.model.config.n_positions
    [out] = pipe("def main(", max_new_tokens=5, do_sample=False)
    text = out["generated_text"]
    assert text.startswith("def main(") and len(text) > len("def main(")
    # the pipeline's text is the model's greedy ids, decoded
    ids = pipe.tokenizer("def main(", return_tensors="pt")["input_ids"]
    greedy = pipe.model.generate(ids, max_new_tokens=5, do_sample=False)
    assert pipe.tokenizer.decode(greedy[0]) == text
