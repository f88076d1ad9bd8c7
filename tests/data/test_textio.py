"""Reading raw text: progress counted in input bytes, and HuggingFace tokenizer folders."""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import struct
import sys
import termios
import threading
from pathlib import Path

import numpy as np
import pytest
import zstandard
from tokenizers import Tokenizer

from wsjax.data import preprocess as pre
from wsjax.data.preprocess import main, preprocess
from wsjax.data.shards import read_meta
from wsjax.data.textio import DEFAULT_EOS, batches, hf_eos_token, train_bpe

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


def corpus(d: Path) -> list[Path]:
    """One input of each text format, documents of 5 to 60 words."""
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, rng.integers(5, 60))) for _ in range(60)]
    lines = [json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)]
    (d / "a.txt").write_text(texts[0])
    (d / "b.jsonl").write_text("".join(lines[:20]))
    with gzip.open(d / "c.jsonl.gz", "wt") as f:
        f.writelines(lines[20:40])
    (d / "d.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress("".join(lines[40:]).encode())
    )
    return sorted(d.iterdir())


def test_batches_count_every_input_byte(tmp_path):
    """The last batch reports the inputs' total size; text bytes alone fall short of it (the
    bar that counted them stopped at 96% on jsonl, and had no total for .gz / .zst)."""
    files = corpus(tmp_path)
    seen = list(batches(files, "text", lambda p, i: "train", batch_chars=500))
    done = [b.bytes_read for b in seen]
    assert len(seen) > 10 and done == sorted(done)
    assert done[-1] == sum(f.stat().st_size for f in files)
    jsonl = tmp_path / "b.jsonl"
    jsonl_text = sum(len(json.loads(line)["text"]) for line in jsonl.read_text().splitlines())
    assert jsonl_text < 0.97 * jsonl.stat().st_size


class Recorder(pre.tqdm):
    bars: list = []

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        Recorder.bars.append(self)


def test_progress_bars_end_at_the_input_size_and_bpe_training_shows_progress(tmp_path, monkeypatch):
    files = corpus(tmp_path)
    Recorder.bars = []
    monkeypatch.setattr(pre, "tqdm", Recorder)
    calls = []

    def spy(*args, **kw):
        calls.append(kw)
        return train_bpe(*args, **kw)

    monkeypatch.setattr(pre, "train_bpe", spy)
    preprocess(files, tmp_path / "o", train_tokenizer=300, progress=True, log=lambda _: None)
    total = sum(f.stat().st_size for f in files)
    assert [b.desc for b in Recorder.bars] == ["reading for the BPE", "tokenising"]
    assert all(b.n == b.total == total for b in Recorder.bars)
    assert calls == [{"show_progress": True}]  # the trainer's own bars (pairs, merges) too


def hf_folder(tmp_path: Path) -> Path:
    """A save_pretrained folder whose tokenizer_config.json names "</s>" as EOS."""
    transformers = pytest.importorskip("transformers")
    tok = train_bpe([" ".join(WORDS)] * 8, 300, eos_token="</s>")
    tok.add_special_tokens([DEFAULT_EOS])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")
    fast.save_pretrained(str(tmp_path / "hf"))
    return tmp_path / "hf"


def test_hf_tokenizer_folder_gives_its_eos(tmp_path):
    folder = hf_folder(tmp_path)
    assert (folder / "tokenizer.json").is_file() and hf_eos_token(folder) == "</s>"
    assert hf_eos_token(folder / "tokenizer.json") == "</s>"  # the file: its folder's config
    (tmp_path / "docs.txt").write_text(" ".join(WORDS))
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = tok.encode(" ".join(WORDS), add_special_tokens=False).ids
    for eos, argv in [("</s>", []), (DEFAULT_EOS, ["--eos_token", DEFAULT_EOS])]:
        out = tmp_path / f"o{len(argv)}"
        args = ["--input", str(tmp_path / "docs.txt"), "--output", str(out), "--no_progress"]
        assert main([*args, "--tokenizer", str(folder), *argv]) == 0
        meta = read_meta(out)
        assert meta["tokenizer"]["eos_token"] == eos and meta["eos_id"] == tok.token_to_id(eos)
        got = np.fromfile(out / "train" / "00000.bin", dtype=meta["dtype"]).tolist()
        assert got == ids + [tok.token_to_id(eos)]


@pytest.mark.parametrize(
    "files,expected",
    [
        ({"tokenizer_config.json": {"eos_token": {"content": "<eos>", "lstrip": False}}}, "<eos>"),
        ({"special_tokens_map.json": {"eos_token": "<|im_end|>"}}, "<|im_end|>"),
        ({"tokenizer_config.json": {"bos_token": "<s>"}}, None),
        ({}, None),
    ],
)
def test_hf_eos_token_forms(tmp_path, files, expected):
    for name, obj in files.items():
        (tmp_path / name).write_text(json.dumps(obj))
    assert hf_eos_token(tmp_path) == expected


def test_bpe_progress_on_a_terminal(tmp_path):
    """On a terminal the reading bar runs to 100%, then the trainer's own bars follow; fd 2 is
    the terminal again afterwards."""
    files = corpus(tmp_path)
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 x 120
    out = bytearray()
    reader = threading.Thread(target=_drain, args=(master, out), daemon=True)
    reader.start()
    saved, stderr = os.dup(2), sys.stderr
    os.dup2(slave, 2)
    sys.stderr = os.fdopen(os.dup(slave), "w")
    try:
        preprocess(files, tmp_path / "o", train_tokenizer=300, progress=True, log=lambda _: None)
        assert os.isatty(2)
    finally:
        sys.stderr.close()
        sys.stderr = stderr
        os.dup2(saved, 2)
        os.close(saved)
        os.close(slave)
    reader.join(timeout=10)
    text = out.decode(errors="replace")
    reading, rest = text.split("reading for the BPE: 100%")
    assert "Pre-processing" not in reading  # the trainer's bar without a total stayed hidden
    assert "Compute merges" in rest and "tokenising: 100%" in rest


def _drain(fd: int, out: bytearray) -> None:
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the terminal's other end closed
            return
        if not chunk:
            return
        out.extend(chunk)
