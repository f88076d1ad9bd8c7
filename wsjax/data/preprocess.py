"""Text -> token shards: ``wsjax-preprocess --input ... --output DIR ...``.

Inputs: .txt, .jsonl(.gz/.zst), .parquet, .arrow files, folders of them, and HuggingFace datasets
saved with ``save_to_disk`` (see ``wsjax.data.textio``); ``--text_column`` names the JSON field
or table column holding the text. The tokenizer is a ``tokenizer.json``, a local HuggingFace
tokenizer folder (its ``tokenizer_config.json`` names the EOS token), or a byte-level BPE
trained here (``--train_tokenizer VOCAB_SIZE``). Output folder::

    DIR/meta.json          tokenizer, vocab size, EOS id, dtype, token/document counts, sources
    DIR/tokenizer.json     the tokenizer used (trained here, or a copy of the given one)
    DIR/train/00000.bin    flat token ids (uint16 if the vocabulary fits, else uint32), memmappable
    DIR/eval/00000.bin     the held-out split, when --eval_fraction or --eval_input is given

Every document is followed by the EOS id. Tokenisation is batched through HF tokenizers'
``encode_batch_fast`` (Rust, all cores) while a reader thread parses the next batch. Progress
bars count input bytes (compressed ones for .gz/.zst). Output is staged in a hidden sibling."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from wsjax.data.shards import ShardWriter, clear_partial, dtype_for_vocab, partial_prefix, publish
from wsjax.data.textio import (
    DEFAULT_EOS,
    DocBatch,
    batches,
    eos_id,
    find_inputs,
    hf_eos_token,
    load_tokenizer,
    prefetched,
    train_bpe,
    vocab_size_of,
)
from wsjax.errors import DataError, WsjaxError
from wsjax.fileio import write_error

__all__ = ["dtype_for_vocab", "main", "preprocess"]

INVALID_UTF8 = ("error", "replace")  # --invalid_utf8: stop at the first, or replace and count
META_FORMAT = "wsjax-token-shards"
META_VERSION = 1
DEFAULT_SHARD_TOKENS = 1 << 28  # 256 Mi tokens: 512 MiB per uint16 shard


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


@dataclass(frozen=True)
class _Job:
    """What one preprocess call reads and how: the inputs and the reading options."""

    files: list[Path]
    eval_files: list[Path]
    selector: _SplitSelector
    text_field: str
    eval_fraction: float
    shard_tokens: int
    batch_chars: int
    invalid_utf8: str
    progress: bool
    log: Callable[[str], None]

    def stream(self) -> Iterator[DocBatch]:
        split = self.selector.split
        return batches(self.files, self.text_field, split, self.batch_chars, self.invalid_utf8)

    def bar(self, desc: str, file=None) -> tqdm:
        """A bar over every input byte: ``DocBatch.bytes_read`` ends at exactly this total."""
        total = sum(f.stat().st_size for f in self.files)
        return tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc=desc,
            file=file or sys.stderr,
            disable=not self.progress,
        )


def preprocess(
    inputs: Sequence[str | Path],
    output: str | Path,
    *,
    tokenizer: str | Path | None = None,
    train_tokenizer: int | None = None,
    text_field: str = "text",
    eval_fraction: float = 0.0,
    eval_inputs: Sequence[str | Path] = (),
    eos_token: str | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    batch_chars: int = 4 << 20,
    overwrite: bool = False,
    invalid_utf8: str = "error",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Tokenise ``inputs`` (+ ``eval_inputs``) into shards under ``output``; return the meta.

    ``text_field``: the JSON field / table column holding the text. ``eos_token``: None takes
    the one a HuggingFace tokenizer folder names, else ``<|endoftext|>``."""
    if (tokenizer is None) == (train_tokenizer is None):
        raise DataError("give exactly one of --tokenizer PATH or --train_tokenizer VOCAB_SIZE")
    train_files = find_inputs(inputs, "train")
    eval_files = find_inputs(eval_inputs, "eval") if eval_inputs else []
    final = Path(output)
    if (final / "meta.json").exists() and not overwrite:
        raise DataError(f"output {final} already holds shards (meta.json); pass --overwrite")
    if invalid_utf8 not in INVALID_UTF8:
        raise DataError(f"--invalid_utf8 {invalid_utf8!r}: use {' | '.join(INVALID_UTF8)}")
    files = train_files + [f for f in eval_files if f not in train_files]
    selector = _SplitSelector({f.resolve() for f in eval_files}, eval_fraction)
    job = _Job(
        files, eval_files, selector, text_field, eval_fraction, shard_tokens, batch_chars,
        invalid_utf8, progress, log,
    )  # fmt: skip
    # Everything is written into a hidden staging folder and moved into place at the end, so a
    # failure (bad input, full disk, Ctrl-C) leaves no partial output and an old one intact.
    out = final.parent / f"{partial_prefix(final)}{os.getpid()}"
    clear_partial(final, log)
    out.mkdir(parents=True)
    try:
        meta = _write(out, job, tokenizer, train_tokenizer, eos_token)
        publish(out, final)
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


def _write(
    out: Path, job: _Job, tokenizer: str | Path | None, train_vocab: int | None, eos: str | None
) -> dict:
    """Tokenise into the staging folder ``out`` with ``tokenizer``, or a BPE of ``train_vocab``
    tokens trained here; return the meta written there."""
    t0 = time.perf_counter()
    eos_token = eos
    if train_vocab is not None:
        eos_token = eos_token or DEFAULT_EOS
        tok = _train_tokenizer(job, train_vocab, eos_token)
        tok_source = f"trained byte-level BPE ({train_vocab})"
    else:
        eos_token = eos_token or hf_eos_token(tokenizer) or DEFAULT_EOS
        tok = load_tokenizer(tokenizer)
        tok_source = str(Path(tokenizer).resolve())
    tok.save(str(out / "tokenizer.json"))
    tokenizer_meta = {"source": tok_source, "file": "tokenizer.json", "eos_token": eos_token}
    seconds = {"tokenizer": round(time.perf_counter() - t0, 3)}
    meta = _tokenise(out, job, tok, eos_id(tok, eos_token))
    meta = {"format": META_FORMAT, "version": META_VERSION, "tokenizer": tokenizer_meta} | meta
    meta["seconds"] = seconds | meta["seconds"]
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


class _ReadingBar:
    """The byte bar of the BPE trainer's reading pass. On a terminal the trainer's own bars
    (words, pairs, merges) follow it; its first one, sequences read with no total, would share
    this bar's line, so while this bar runs stderr (fd 2) points at /dev/null and the bar
    writes to a copy of the terminal's descriptor."""

    def __init__(self, job: _Job):
        self._saved: int | None = None
        self._stream = None
        if job.progress and os.isatty(2):
            self._saved = os.dup(2)
            self._stream = os.fdopen(os.dup(self._saved), "w")
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 2)
            os.close(null)
        self.bar = job.bar("reading for the BPE", file=self._stream)

    def update(self, bytes_read: int) -> None:
        self.bar.update(bytes_read - self.bar.n)

    def close(self) -> None:
        self.bar.close()
        if self._saved is not None:
            os.dup2(self._saved, 2)
            os.close(self._saved)
            self._stream.close()
            self._saved = None


def _train_tokenizer(job: _Job, vocab: int, eos_token: str) -> Tokenizer:
    job.log(f"training a byte-level BPE of {vocab} tokens on {len(job.files)} file(s)")
    reading = _ReadingBar(job)

    def texts() -> Iterator[str]:
        for b in job.stream():
            yield from (t for t, s in zip(b.texts, b.splits) if s == "train")
            reading.update(b.bytes_read)
        reading.close()  # the trainer's own bars come next

    try:
        return train_bpe(texts(), vocab, eos_token, show_progress=job.progress)
    finally:
        reading.close()


def _tokenise(out: Path, job: _Job, tok: Tokenizer, eos: int) -> dict:
    """Encode every document into shards; return the meta's data part (splits, counts...)."""
    vocab = vocab_size_of(tok)
    dtype = dtype_for_vocab(vocab)
    writers = {s: ShardWriter(out, s, dtype, job.shard_tokens) for s in ("train", "eval")}
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast: tokenizers >= 0.20
    per_file_docs = [0] * len(job.files)
    replaced = 0  # U+FFFD in the text: what --invalid_utf8 replace substituted
    t1 = time.perf_counter()
    with job.bar("tokenising") as bar:
        for batch in prefetched(job.stream()):
            encs = encode(batch.texts, add_special_tokens=False)
            for split, writer in writers.items():
                ids, docs = _flat(encs, batch.splits, split, eos)
                if docs:
                    writer.write(ids, docs)
            for fi, _ in batch.where:
                per_file_docs[fi] += 1
            if job.invalid_utf8 == "replace":
                replaced += sum(t.count("\ufffd") for t in batch.texts)
            bar.update(batch.bytes_read - bar.n)
    splits = {s: w.close() for s, w in writers.items()}
    seconds = time.perf_counter() - t1
    _check_splits(splits, job, sum(per_file_docs))
    if replaced:
        msg = f"replaced {replaced} invalid UTF-8 sequences with U+FFFD (--invalid_utf8)"
        job.log(f"warning: {msg}")
    tokens = sum(m["tokens"] for m in splits.values())
    return {
        "vocab_size": vocab,
        "eos_id": eos,
        "dtype": dtype.name,
        "num_tokens": tokens,
        "num_documents": sum(m["documents"] for m in splits.values()),
        "splits": splits,
        "eval_split": {"fraction": job.eval_fraction, "inputs": [str(f) for f in job.eval_files]},
        "text_field": job.text_field,
        "sources": _sources(job, per_file_docs),
        "tokens_per_second": round(tokens / seconds, 1),
        "seconds": {"tokenise": round(seconds, 3)},
    }


def _flat(encs: list, splits: list[str], split: str, eos: int) -> tuple[np.ndarray, int]:
    """The ids of the documents of ``split``, each followed by EOS; and how many there are."""
    flat: list[int] = []
    docs = 0
    for enc, s in zip(encs, splits):
        if s == split:
            flat.extend(enc.ids)
            flat.append(eos)
            docs += 1
    return np.asarray(flat, dtype=np.int64), docs


def _check_splits(splits: dict, job: _Job, documents: int) -> None:
    """Drop an empty eval split (warning when one was asked for); an empty train is an error."""
    if splits["eval"]["tokens"] == 0:
        del splits["eval"]
        if job.eval_fraction > 0 or job.eval_files:
            job.log(
                f"warning: the eval split came out empty (--eval_fraction {job.eval_fraction} of "
                f"{documents} documents); no eval split written: give more documents, "
                "a larger fraction, or --eval_input"
            )
    if splits["train"]["tokens"] == 0:
        raise DataError("no documents went to the train split (eval split takes everything)")


def _sources(job: _Job, per_file_docs: list[int]) -> list[dict]:
    return [
        {
            "path": str(f.resolve()),
            "bytes": f.stat().st_size,
            "sha256": _sha256(f),
            "documents": per_file_docs[i],
            "split": "eval" if f.resolve() in job.selector.eval_files else "train",
        }
        for i, f in enumerate(job.files)
    ]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wsjax-preprocess", description=__doc__)
    p.add_argument("--input", nargs="+", required=True, help="files or folders (see above)")
    p.add_argument("--output", required=True, help="shards folder to write")
    tk = p.add_mutually_exclusive_group(required=True)
    tk.add_argument(
        "--tokenizer",
        help="tokenizer.json, or a local HuggingFace tokenizer folder (tokenizer.json, or "
        "vocab.json + merges.txt)",
    )
    tk.add_argument("--train_tokenizer", type=int, metavar="VOCAB_SIZE", help="train a BPE")
    p.add_argument(
        "--text_column",
        "--text_field",
        dest="text_field",
        default="text",
        help="the JSON field (jsonl) or column (parquet, Arrow, datasets) holding the text",
    )
    p.add_argument("--eval_fraction", type=float, default=0.0, help="fraction of docs to eval")
    p.add_argument(
        "--eval_input",
        nargs="+",
        default=[],
        help="files/folders for the eval split (a DatasetDict folder: its 'validation' or "
        "'test' split)",
    )
    p.add_argument(
        "--eos_token",
        default=None,
        help="the document separator; default: the one a HuggingFace tokenizer folder names, "
        f"else {DEFAULT_EOS}",
    )
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
    except (OSError, WsjaxError) as e:  # a full or read-only disk, --output under a file too
        err = write_error(e, args.output) if isinstance(e, OSError) else e
        if not isinstance(err, WsjaxError):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def cli() -> None:
    """The ``wsjax-preprocess`` entry point."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
