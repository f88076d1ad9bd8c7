"""Preprocessing (text -> token shards), its CLI, and the built-in stdlib corpus."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zstandard
from tokenizers import Tokenizer

from tests.helpers import BPE_VOCAB, input_config, make_shards, preprocess_error
from wsjax.data import builtin, make_loader
from wsjax.data.loader import BUILTIN_STDLIB
from wsjax.data.preprocess import dtype_for_vocab, preprocess
from wsjax.data.shards import ShardSource, read_meta, unigram_entropy
from wsjax.data.tokenizer import save_run_tokenizer
from wsjax.errors import DataError

REPO = Path(__file__).resolve().parents[2]
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards hex jolly boxes"


def _doc(rng: np.random.Generator, n: int = 40) -> str:
    return " ".join(rng.choice(WORDS.split(), n)) + "."


def _corpus(d: Path) -> dict[str, list[str]]:
    """One file of each format; returns the documents each holds, in order."""
    rng = np.random.default_rng(0)
    docs = {
        name: [_doc(rng) for _ in range(k)]
        for name, k in [("a.txt", 1), ("b.jsonl", 5), ("c.jsonl.gz", 4), ("d.jsonl.zst", 3)]
    }
    (d / "a.txt").write_text(docs["a.txt"][0])
    lines = [json.dumps({"id": i, "text": t}) for i, t in enumerate(docs["b.jsonl"])]
    (d / "b.jsonl").write_text("\n".join(lines[:2] + [""] + lines[2:]) + "\n")  # blank line ok
    with gzip.open(d / "c.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in docs["c.jsonl.gz"])
    data = "".join(json.dumps({"text": t}) + "\n" for t in docs["d.jsonl.zst"]).encode()
    (d / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    return docs


def _expected(tok: Tokenizer, docs: list[str], eos: int) -> np.ndarray:
    ids: list[int] = []
    for t in docs:
        ids += tok.encode(t, add_special_tokens=False).ids + [eos]
    return np.array(ids)


def _tokens(out: Path, split: str = "train") -> np.ndarray:
    meta = read_meta(out)
    parts = [
        np.fromfile(out / s["file"], dtype=meta["dtype"]) for s in meta["splits"][split]["shards"]
    ]
    return np.concatenate(parts)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    docs = _corpus(src)
    out = tmp_path_factory.mktemp("shards")
    meta = preprocess([src], out, train_tokenizer=320, progress=False, log=lambda m: None)
    return src, docs, out, meta


def test_preprocess_all_formats_match_tokenising_by_hand(built):
    src, docs, out, meta = built
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    all_docs = [t for name in sorted(docs) for t in docs[name]]
    expected = _expected(tok, all_docs, eos)
    got = _tokens(out)
    assert got.dtype == np.uint16 and meta["dtype"] == "uint16"
    np.testing.assert_array_equal(got, expected)
    assert meta["eos_id"] == eos == 0 and meta["vocab_size"] == tok.get_vocab_size() <= 320
    assert meta["num_tokens"] == expected.size and meta["num_documents"] == len(all_docs) == 13
    assert (got == eos).sum() == 13 and got[-1] == eos  # every document ends with EOS
    assert "eval" not in meta["splits"]
    by_name = {Path(s["path"]).name: s for s in meta["sources"]}
    assert [by_name[n]["documents"] for n in sorted(docs)] == [1, 5, 4, 3]
    assert by_name["b.jsonl"]["bytes"] == (src / "b.jsonl").stat().st_size
    assert len(by_name["c.jsonl.gz"]["sha256"]) == 64


def test_given_tokenizer_json_and_gpt2_vocab_merges_folder(built, tmp_path):
    src, _, out, _ = built
    reference = _tokens(out)
    folder = tmp_path / "gpt2tok"
    folder.mkdir()
    Tokenizer.from_file(str(out / "tokenizer.json")).model.save(str(folder))  # vocab + merges
    assert (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    for i, tok in enumerate([out / "tokenizer.json", folder]):
        o = tmp_path / f"o{i}"
        meta = preprocess([src], o, tokenizer=tok, progress=False, log=lambda m: None)
        np.testing.assert_array_equal(_tokens(o), reference)
        assert meta["vocab_size"] <= 320


def test_eval_split_by_fraction_is_deterministic_and_by_files_exact(built, tmp_path):
    src, docs, out, meta = built
    tok = out / "tokenizer.json"
    metas = [
        preprocess(
            [src],
            tmp_path / f"f{i}",
            tokenizer=tok,
            eval_fraction=0.3,
            progress=False,
            log=lambda m: None,
        )
        for i in range(2)
    ]
    a, b = metas
    assert a["splits"]["eval"]["documents"] > 0 and a["splits"]["train"]["documents"] > 0
    assert a["splits"]["eval"]["documents"] + a["splits"]["train"]["documents"] == 13
    assert a["num_tokens"] == meta["num_tokens"]
    np.testing.assert_array_equal(
        _tokens(tmp_path / "f0", "eval"), _tokens(tmp_path / "f1", "eval")
    )
    m = preprocess(
        [src / "a.txt", src / "b.jsonl"],
        tmp_path / "byfile",
        tokenizer=tok,
        eval_inputs=[src / "c.jsonl.gz"],
        progress=False,
        log=lambda m: None,
    )
    t = Tokenizer.from_file(str(tok))
    np.testing.assert_array_equal(
        _tokens(tmp_path / "byfile", "eval"), _expected(t, docs["c.jsonl.gz"], 0)
    )
    assert m["splits"]["eval"]["documents"] == 4 and m["splits"]["train"]["documents"] == 6


def test_dtype_choice_and_shard_rollover(built, tmp_path):
    assert dtype_for_vocab(50257) == np.uint16 and dtype_for_vocab(65536) == np.uint16
    assert dtype_for_vocab(65537) == np.uint32
    src, _, out, _ = built
    meta = preprocess(
        [src],
        tmp_path / "r",
        tokenizer=out / "tokenizer.json",
        shard_tokens=100,
        progress=False,
        log=lambda m: None,
    )
    shards = meta["splits"]["train"]["shards"]
    assert len(shards) > 3 and all(s["tokens"] == 100 for s in shards[:-1])
    np.testing.assert_array_equal(_tokens(tmp_path / "r"), _tokens(out))


def test_jsonl_without_text_field_names_file_and_line(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"text": "fine"}\n{"body": "no text here"}\n')
    with pytest.raises(DataError, match=r"x\.jsonl:2: no field 'text'"):
        preprocess([f], tmp_path / "o", train_tokenizer=300, progress=False, log=lambda m: None)
    g = tmp_path / "y.jsonl"
    g.write_text('{"body": "some text"}\n')
    meta = preprocess(
        [g],
        tmp_path / "o2",
        train_tokenizer=300,
        text_field="body",
        progress=False,
        log=lambda m: None,
    )
    assert meta["num_documents"] == 1 and meta["text_field"] == "body"


BAD_INPUTS = {  # file name -> (content or None for absent, expected message)
    "missing.txt": (None, r"input path .*missing\.txt does not exist"),
    "e.txt": ("", r"e\.txt is empty"),
    "bad.jsonl": ("{nope\n", r"bad\.jsonl:1: invalid JSON"),
    "x.csv": ("a,b", r"x\.csv: unsupported type"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, name):
    content, pattern = BAD_INPUTS[name]
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    err = preprocess_error(path, tmp_path / "o", capsys)
    assert re.search(pattern, err), err


def test_cli_subprocess(built, tmp_path):
    src, _, _, _ = built
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "wsjax.data.preprocess",
        "--input",
        str(src / "b.jsonl"),
        "--output",
        str(tmp_path / "o"),
        "--train_tokenizer",
        "300",
        "--eval_fraction",
        "0.2",
    ]
    ok = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "tokens/s" in ok.stdout and (tmp_path / "o" / "meta.json").is_file()
    bad = subprocess.run(
        cmd[:4] + [str(tmp_path / "nope.jsonl")] + cmd[5:],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nope.jsonl" in bad.stderr
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_builtin_corpus_built_once_reused_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("WSJAX_CACHE_DIR", str(tmp_path / "cache"))
    logs: list[str] = []
    d = builtin.ensure_builtin_corpus(512, log=logs.append, max_bytes=300_000)
    assert d.parent == tmp_path / "cache" and d.name.startswith("builtin-")
    assert any("building" in m for m in logs) and str(d) in logs[-1]
    meta = read_meta(d)
    assert meta["vocab_size"] == 512 and meta["splits"]["eval"]["tokens"] > 0
    # the meta's record of the corpus, checked against the files themselves
    root, files = builtin.stdlib_files(max_bytes=300_000)
    by_split = {s["path"]: s["split"] for s in meta["sources"]}
    nbytes = {
        k: sum(p.stat().st_size for p in files if by_split[str(p.resolve())] == k)
        for k in by_split.values()
    }
    info = meta["builtin"]
    assert info["python"] == sys.version.split()[0] and info["stdlib"] == str(root)
    assert info["bytes"] == nbytes and sum(info["files"].values()) == len(files)
    assert info["tokens"] == {k: meta["splits"][k]["tokens"] for k in ("train", "eval")}
    assert info["eval_fraction_bytes"] == pytest.approx(nbytes["eval"] / sum(nbytes.values()))
    # eval holds at most EVAL_FRACTION of the bytes, or (no file that small in this subset) the
    # one smallest file; a byte-level BPE emits at most one token per byte + one EOS per file
    smallest = min(p.stat().st_size for p in files)
    assert 0 < nbytes["eval"] <= builtin.EVAL_FRACTION * sum(nbytes.values()) or (
        info["files"]["eval"] == 1 and nbytes["eval"] == smallest
    )
    assert info["tokens"]["eval"] <= nbytes["eval"] + info["files"]["eval"]
    stamp = (d / "meta.json").stat().st_mtime_ns
    logs.clear()
    assert builtin.ensure_builtin_corpus(512, log=logs.append, max_bytes=300_000) == d
    assert logs and "reusing" in logs[0] and (d / "meta.json").stat().st_mtime_ns == stamp
    h_eval, h_train = unigram_entropy(d, "eval"), unigram_entropy(d, "train")
    assert info["eval_unigram_entropy"] == pytest.approx(h_eval)
    assert 3.0 < h_train < np.log(512) and h_eval > h_train - 0.5

    # a different vocab is a different corpus; a crash mid-build leaves nothing behind
    def boom(*a, **k):
        raise RuntimeError("crash")

    monkeypatch.setattr(builtin, "preprocess", boom)
    with pytest.raises(RuntimeError):
        builtin.ensure_builtin_corpus(600, log=logs.append, max_bytes=300_000)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [d.name]


def _sized_files(root: Path, sizes: dict[str, int]) -> list[Path]:
    for name, n in sizes.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x" * n)
    return sorted(root / name for name in sizes)


def test_builtin_split_is_a_byte_budget_keyed_by_relative_path(tmp_path):
    rng = np.random.default_rng(0)
    sizes = {f"pkg{i % 7}/m{i}.py": int(n) for i, n in enumerate(rng.integers(50, 5000, 300))}
    a = _sized_files(tmp_path / "a", sizes)
    train, evals = builtin.split_files(tmp_path / "a", a)
    assert sorted(train + evals) == a and not set(train) & set(evals)
    eval_bytes = sum(p.stat().st_size for p in evals)
    assert 0 < eval_bytes <= builtin.EVAL_FRACTION * sum(sizes.values())
    # deterministic whatever the listing order, and the same relative files under another root
    assert builtin.split_files(tmp_path / "a", a[::-1]) == (train, evals)
    b = _sized_files(tmp_path / "b", sizes)
    rel = [p.relative_to(tmp_path / "a") for p in evals]
    assert [p.relative_to(tmp_path / "b") for p in builtin.split_files(tmp_path / "b", b)[1]] == rel
    # a budget no file fits: eval is the single smallest file
    few = _sized_files(tmp_path / "c", {"x.py": 900, "y.py": 300, "z.py": 600})
    assert builtin.split_files(tmp_path / "c", few) == (
        [tmp_path / "c/x.py", tmp_path / "c/z.py"],
        [tmp_path / "c/y.py"],
    )


def test_builtin_split_of_this_interpreters_stdlib_is_usable():
    """On whatever Python runs the tests: eval is close to, never above, its byte budget."""
    root, files = builtin.stdlib_files()
    train, evals = builtin.split_files(root, files)
    total = sum(p.stat().st_size for p in files)
    eval_bytes = sum(p.stat().st_size for p in evals)
    assert total > 2_000_000 and len(train) > 200  # a real corpus, not a stub
    # hundreds of files of a few KB fill the budget to within one typical file
    assert 0.5 * builtin.EVAL_FRACTION * total < eval_bytes <= builtin.EVAL_FRACTION * total
    assert len(evals) >= 5


def test_builtin_key_changes_with_sources(tmp_path):
    root, files = builtin.stdlib_files(max_bytes=50_000)
    assert files and all(
        f.suffix == ".py" and "test" not in f.relative_to(root).parts for f in files
    )
    k1 = builtin.corpus_key(512, root, files)
    assert (
        builtin.corpus_key(512, root, files[:-1]) != k1
        and builtin.corpus_key(513, root, files) != k1
    )


def test_make_loader_builtin_stdlib(tmp_path, monkeypatch):
    """data_dir "builtin:stdlib" builds the corpus for the model's vocab (subset, to stay fast)."""
    monkeypatch.setenv("WSJAX_CACHE_DIR", str(tmp_path))
    full = builtin.stdlib_files
    monkeypatch.setattr(builtin, "stdlib_files", lambda max_bytes=None: full(400_000))
    cfg = input_config(BUILTIN_STDLIB, seq=128, batch=16, shuffle=True, shuffle_seed=1)
    with make_loader(cfg, split="train", model_vocab_size=1024, seed=1) as ld:
        b = next(ld)
        assert b["input_ids"].shape == (16, 128) and b["input_ids"].max() < 1024
    with make_loader(cfg, split="eval", model_vocab_size=1024, seed=1) as ld:
        assert ld.batches_per_epoch >= 1
    (d,) = tmp_path.iterdir()
    assert read_meta(d)["vocab_size"] == 1024


def test_run_tokenizer_save_replaces_the_old_and_clears_a_killed_saves_leftovers(tmp_path):
    """model_dir/tokenizer is replaced by renames (never removed first), and the staging
    folders a killed save left are removed: afterwards only the new tokenizer is there."""
    data = make_shards(tmp_path / "shards")
    md = tmp_path / "run"
    (md / ".tokenizer-killed").mkdir(parents=True)  # a save killed while writing
    (md / ".tokenizer-killed" / "tokenizer.json").write_text("{half")
    (md / "tokenizer").mkdir()
    (md / "tokenizer" / "old.json").write_text("{}")
    source = ShardSource([data], "train", 16, BPE_VOCAB)
    saved = save_run_tokenizer(source, md, 64)
    assert saved == md / "tokenizer" and sorted(p.name for p in md.iterdir()) == ["tokenizer"]
    assert (saved / "tokenizer.json").read_bytes() == (data / "tokenizer.json").read_bytes()
    assert not (saved / "old.json").exists()
