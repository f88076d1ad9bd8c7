"""``wsjax-generate`` without ``-p``: the config comes from what --checkpoint_path holds (a
model_dir's train/params_train.yaml, a model-ckpt-<step> folder's parent's, an HF export's
config.json); stdout carries only the prompt and its continuation, every other line goes to
stderr. One tiny GPT-2 trained one step on token shards (so it has a tokenizer), then exported.
"""

from __future__ import annotations

import pytest

from tests.helpers import make_shards, shards_input, train_briefly
from wsjax.config import load_config
from wsjax.inference.generate import generate, main
from wsjax.interop.export import PARAMS_TRAIN, export_run

PROMPT = "def main("
ARGS = ["--prompt", PROMPT, "--max_new_tokens", "6"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    md = root / "md"
    train_briefly("gpt2", shards_input(make_shards(root / "shards")), md, steps=1)
    return md, export_run(md, root / "hf")


def test_stdout_is_exactly_the_prompt_and_its_continuation(run, capsys):
    md, _ = run
    assert main(["--checkpoint_path", str(md), *ARGS]) == 0
    out, err = capsys.readouterr()
    want = generate(load_config(md / PARAMS_TRAIN), md, [PROMPT], max_new_tokens=6).texts[0]
    assert out == PROMPT + want + "\n"
    assert "tokens in" in err and "tokens/s" in err  # the timing line: stderr


def test_the_config_comes_from_a_checkpoint_folder_or_an_hf_export(run, capsys):
    md, hf = run
    assert main(["--checkpoint_path", str(md), *ARGS]) == 0
    from_md = capsys.readouterr().out
    [ckpt] = md.glob("model-ckpt-*")
    for path in (ckpt, hf):
        assert main(["--checkpoint_path", str(path), *ARGS]) == 0, path
        assert capsys.readouterr().out == from_md, path  # the same weights, the same greedy text


def test_no_config_to_find_is_one_line_exit_2(tmp_path, capsys):
    assert main(["--checkpoint_path", str(tmp_path), *ARGS]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert "train/params_train.yaml" in err and "config.json" in err and "-p" in err
