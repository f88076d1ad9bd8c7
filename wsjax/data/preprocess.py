"""Text -> token shards: ``python -m wsjax.data.preprocess --input ... --output DIR ...``.

Output folder::

    DIR/meta.json          tokenizer, vocab size, EOS id, dtype, token/document counts, sources
    DIR/tokenizer.json     the tokenizer used (trained here, or a copy of the given one)
    DIR/train/00000.bin    flat token ids (uint16 if the vocabulary fits, else uint32), memmappable
    DIR/eval/00000.bin     the held-out split, when --eval_fraction or --eval_input is given

Every document is followed by the EOS id. Tokenisation is batched through HF tokenizers'
``encode_batch_fast`` (Rust, all cores) while a reader thread parses the next batch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from wsjax.data.textio import (
    DEFAULT_EOS,
    batches,
    eos_id,
    find_inputs,
    load_tokenizer,
    prefetched,
    train_bpe,
    vocab_size_of,
)
from wsjax.errors import DataError, WsjaxError

INVALID_UTF8 = ("error", "replace")  # --invalid_utf8: stop at the first, or replace and count
META_FORMAT = "wsjax-token-shards"
META_VERSION = 1
DEFAULT_SHARD_TOKENS = 1 << 28  # 256 Mi tokens: 512 MiB per uint16 shard


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _SplitSelector:
    """Deterministic split of documents: whole files (eval_inputs) or a hashed fraction of docs."""

    def __init__(self, eval_files: set[Path], fraction: float):
        if not 0.0 <= fraction < 1.0:
            raise DataError(f"--eval_fraction {fraction}: must be in [0, 1)")
        self.eval_files = eval_files
        self.threshold = int(fraction * 2**32)

    def split(self, path: Path, doc_index: int) -> str:
        if path.resolve() in self.eval_files:
            return "eval"
        key = f"{path.name}\0{doc_index}".encode()
        return "eval" if zlib.crc32(key) < self.threshold else "train"


class _ShardWriter:
    """Appends token arrays to DIR/<split>/NNNNN.bin, rolling over every shard_tokens tokens."""

    def __init__(self, root: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.dir = root / split
        self.split, self.dtype, self.shard_tokens = split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._f = None
        self._n = 0
        self.tokens = 0
        self.documents = 0

    def _open_next(self) -> None:
        self._close_current()
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"{self.split}/{len(self.shards):05d}.bin"
        self.shards.append({"file": name, "tokens": 0})
        self._f = open(self.dir.parent / name, "wb")  # noqa: SIM115 (closed in close())
        self._n = 0

    def _close_current(self) -> None:
        if self._f is not None:
            self._f.close()
            self.shards[-1]["tokens"] = self._n
            self._f = None

    def write(self, ids: np.ndarray, documents: int) -> None:
        self.documents += documents
        ids = ids.astype(self.dtype, copy=False)
        while ids.size:
            if self._f is None or self._n >= self.shard_tokens:
                self._open_next()
            take = min(ids.size, self.shard_tokens - self._n)
            ids[:take].tofile(self._f)
            self._n += take
            self.tokens += take
            ids = ids[take:]

    def close(self) -> dict:
        self._close_current()
        return {"tokens": self.tokens, "documents": self.documents, "shards": self.shards}


def preprocess(
    inputs: Sequence[str | Path],
    output: str | Path,
    *,
    tokenizer: str | Path | None = None,
    train_tokenizer: int | None = None,
    text_field: str = "text",
    eval_fraction: float = 0.0,
    eval_inputs: Sequence[str | Path] = (),
    eos_token: str = DEFAULT_EOS,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    batch_chars: int = 4 << 20,
    overwrite: bool = False,
    invalid_utf8: str = "error",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Tokenise ``inputs`` (+ ``eval_inputs``) into shards under ``output``; return the meta."""
    if (tokenizer is None) == (train_tokenizer is None):
        raise DataError("give exactly one of --tokenizer PATH or --train_tokenizer VOCAB_SIZE")
    train_files = find_inputs(inputs)
    eval_files = find_inputs(eval_inputs) if eval_inputs else []
    final = Path(output)
    if (final / "meta.json").exists() and not overwrite:
        raise DataError(f"output {final} already holds shards (meta.json); pass --overwrite")
    if invalid_utf8 not in INVALID_UTF8:
        raise DataError(f"--invalid_utf8 {invalid_utf8!r}: use {' | '.join(INVALID_UTF8)}")
    files = train_files + [f for f in eval_files if f not in train_files]
    selector = _SplitSelector({f.resolve() for f in eval_files}, eval_fraction)
    # Everything is written into a hidden staging folder and moved into place at the end, so a
    # failure (bad input, full disk, Ctrl-C) leaves no partial output and an old one intact.
    out = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    try:
        meta = _write(
            out,
            files=files,
            eval_files=eval_files,
            selector=selector,
            tokenizer=tokenizer,
            train_tokenizer=train_tokenizer,
            text_field=text_field,
            eval_fraction=eval_fraction,
            eos_token=eos_token,
            shard_tokens=shard_tokens,
            batch_chars=batch_chars,
            invalid_utf8=invalid_utf8,
            progress=progress,
            log=log,
        )
        _publish(out, final)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    counts = ", ".join(
        f"{s} {m['tokens']:,} tokens / {m['documents']:,} docs" for s, m in meta["splits"].items()
    )
    log(
        f"wrote {final}: {counts}; vocab {meta['vocab_size']} ({meta['dtype']}); "
        f"{meta['tokens_per_second']:,.0f} tokens/s over {meta['seconds']['tokenise']:.1f} s"
    )
    return meta


def _publish(stage: Path, final: Path) -> None:
    """Move the staged shards into ``final``; meta.json last, so a reader never sees new
    metadata over missing shards. Other files a user keeps in ``final`` stay."""
    if not final.exists():
        os.replace(stage, final)
        return
    for name in ("train", "eval", "tokenizer.json"):
        old = final / name
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
        if (stage / name).exists():
            os.replace(stage / name, old)
    os.replace(stage / "meta.json", final / "meta.json")


def _write(
    out: Path,
    *,
    files: list[Path],
    eval_files: list[Path],
    selector: _SplitSelector,
    tokenizer: str | Path | None,
    train_tokenizer: int | None,
    text_field: str,
    eval_fraction: float,
    eos_token: str,
    shard_tokens: int,
    batch_chars: int,
    invalid_utf8: str,
    progress: bool,
    log: Callable[[str], None],
) -> dict:
    """Tokenise into the staging folder ``out``; return the meta written there."""
    t0 = time.perf_counter()
    if train_tokenizer is not None:
        log(f"training a byte-level BPE of {train_tokenizer} tokens on {len(files)} file(s)")
        docs = batches(files, text_field, selector.split, batch_chars, invalid_utf8)
        train_texts = (
            t for texts, splits, _ in docs for t, s in zip(texts, splits) if s == "train"
        )
        tok = train_bpe(train_texts, train_tokenizer, eos_token)
        tok_source = f"trained byte-level BPE ({train_tokenizer})"
    else:
        tok = load_tokenizer(tokenizer)
        tok_source = str(Path(tokenizer).resolve())
    tok.save(str(out / "tokenizer.json"))
    eos = eos_id(tok, eos_token)
    vocab = vocab_size_of(tok)
    dtype = dtype_for_vocab(vocab)
    t_tok = time.perf_counter() - t0

    writers = {s: _ShardWriter(out, s, dtype, shard_tokens) for s in ("train", "eval")}
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast: tokenizers >= 0.20
    per_file_docs = [0] * len(files)
    replaced = 0  # U+FFFD in the text: what --invalid_utf8 replace substituted
    compressed = any(f.name.lower().endswith((".gz", ".zst")) for f in files)
    total_bytes = None if compressed else sum(f.stat().st_size for f in files)  # text bytes
    t1 = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenising", file=sys.stderr)
    stream = batches(files, text_field, selector.split, batch_chars, invalid_utf8)
    for texts, splits, where in prefetched(stream):
        encs = encode(texts, add_special_tokens=False)
        for split in ("train", "eval"):
            flat: list[int] = []
            ndocs = 0
            for enc, s in zip(encs, splits):
                if s == split:
                    flat.extend(enc.ids)
                    flat.append(eos)
                    ndocs += 1
            if ndocs:
                writers[split].write(np.asarray(flat, dtype=np.int64), ndocs)
        for fi, _ in where:
            per_file_docs[fi] += 1
        if invalid_utf8 == "replace":
            replaced += sum(t.count("\ufffd") for t in texts)
        if bar is not None:
            bar.update(sum(len(t.encode("utf-8", "replace")) for t in texts))
    if bar is not None:
        bar.close()
    splits_meta = {s: w.close() for s, w in writers.items()}
    seconds = time.perf_counter() - t1
    if splits_meta["eval"]["tokens"] == 0:
        del splits_meta["eval"]
        if eval_fraction > 0 or eval_files:
            log(
                f"warning: the eval split came out empty (--eval_fraction {eval_fraction} of "
                f"{sum(per_file_docs)} documents); no eval split written: give more documents, "
                "a larger fraction, or --eval_input"
            )
    if replaced:
        log(f"warning: replaced {replaced} invalid UTF-8 sequences with U+FFFD (--invalid_utf8)")
    if splits_meta["train"]["tokens"] == 0:
        raise DataError("no documents went to the train split (eval split takes everything)")

    meta = {
        "format": META_FORMAT,
        "version": META_VERSION,
        "tokenizer": {"source": tok_source, "file": "tokenizer.json", "eos_token": eos_token},
        "vocab_size": vocab,
        "eos_id": eos,
        "dtype": dtype.name,
        "num_tokens": sum(m["tokens"] for m in splits_meta.values()),
        "num_documents": sum(m["documents"] for m in splits_meta.values()),
        "splits": splits_meta,
        "eval_split": {
            "fraction": eval_fraction,
            "inputs": [str(f) for f in eval_files],
        },
        "text_field": text_field,
        "sources": [
            {
                "path": str(f.resolve()),
                "bytes": f.stat().st_size,
                "sha256": _sha256(f),
                "documents": per_file_docs[i],
                "split": "eval" if f.resolve() in selector.eval_files else "train",
            }
            for i, f in enumerate(files)
        ],
        "tokens_per_second": round(sum(m["tokens"] for m in splits_meta.values()) / seconds, 1),
        "seconds": {"tokenizer": round(t_tok, 3), "tokenise": round(seconds, 3)},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m wsjax.data.preprocess", description=__doc__)
    p.add_argument("--input", nargs="+", required=True, help="files or folders")
    p.add_argument("--output", required=True, help="shards folder to write")
    tk = p.add_mutually_exclusive_group(required=True)
    tk.add_argument("--tokenizer", help="tokenizer.json, or folder with vocab.json + merges.txt")
    tk.add_argument("--train_tokenizer", type=int, metavar="VOCAB_SIZE", help="train a BPE")
    p.add_argument("--text_field", default="text", help="jsonl field holding the text")
    p.add_argument("--eval_fraction", type=float, default=0.0, help="fraction of docs to eval")
    p.add_argument("--eval_input", nargs="+", default=[], help="files/folders for the eval split")
    p.add_argument("--eos_token", default=DEFAULT_EOS)
    p.add_argument("--shard_tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --output")
    p.add_argument(
        "--invalid_utf8",
        choices=INVALID_UTF8,
        default="error",
        help="input bytes that are not UTF-8: stop (default), or replace with U+FFFD and count",
    )
    p.add_argument("--no_progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        preprocess(
            args.input,
            args.output,
            tokenizer=args.tokenizer,
            train_tokenizer=args.train_tokenizer,
            text_field=args.text_field,
            eval_fraction=args.eval_fraction,
            eval_inputs=args.eval_input,
            eos_token=args.eos_token,
            shard_tokens=args.shard_tokens,
            overwrite=args.overwrite,
            invalid_utf8=args.invalid_utf8,
            progress=not args.no_progress,
        )
    except WsjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cli() -> None:
    """The ``wsjax-preprocess`` entry point."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
