"""Raw text in: finding input files and reading their documents, and the tokenizer.

Formats: plain text (``.txt``, ``.text``, ``.md``, ``.py``: one file is one document) and JSON
lines (``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``: one object per line, the text under a named
field). Bytes that are not UTF-8 stop the read with the file named, or, with
``invalid_utf8="replace"``, become U+FFFD. Tokenizers: a HuggingFace ``tokenizer.json`` (file or
folder holding one), a folder with GPT-2-style ``vocab.json`` + ``merges.txt``, or a byte-level
BPE trained here. ``batches`` groups documents for batched tokenising and ``prefetched`` reads
them in a thread while the previous batch is tokenised.
"""

from __future__ import annotations

import gzip
import io
import json
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from wsjax.errors import DataError

PLAIN_SUFFIXES = (".txt", ".text", ".md", ".py")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
DEFAULT_EOS = "<|endoftext|>"


def _suffix_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PLAIN_SUFFIXES):
        return "plain"
    return None


def find_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Expand files and folders (recursively, sorted) into the list of readable input files."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise DataError(f"input path {p} does not exist")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _suffix_kind(f))
            if not found:
                raise DataError(f"input folder {p} holds no .txt/.jsonl/.jsonl.gz/.jsonl.zst files")
            out.extend(found)
        elif _suffix_kind(p) is None:
            raise DataError(
                f"input file {p}: unsupported type (use .txt, .jsonl, .jsonl.gz or .jsonl.zst)"
            )
        else:
            out.append(p)
    seen: set[Path] = set()
    unique = []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def _open_text(path: Path, errors: str) -> io.TextIOBase:
    name = path.name.lower()
    if name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors=errors)
    if name.endswith(".zst"):
        import zstandard

        f = open(path, "rb")  # noqa: SIM115 (closed with the returned reader)
        raw = zstandard.ZstdDecompressor().stream_reader(f, closefd=True)
        return io.TextIOWrapper(raw, encoding="utf-8", errors=errors)
    return open(path, encoding="utf-8", errors=errors)


def iter_documents(
    path: Path, text_field: str = "text", invalid_utf8: str = "error"
) -> Iterator[str]:
    """Yield the non-empty documents of one input file; DataError names file and line.

    ``invalid_utf8``: "error" stops at bytes that are not UTF-8, "replace" substitutes U+FFFD.
    """
    if path.stat().st_size == 0:
        raise DataError(f"input file {path} is empty")
    try:
        yield from _documents(path, text_field, "strict" if invalid_utf8 == "error" else "replace")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: invalid UTF-8 (byte 0x{e.object[e.start]:02x}); fix the file or pass "
            "--invalid_utf8 replace to substitute U+FFFD and count them"
        ) from None


def _documents(path: Path, text_field: str, errors: str) -> Iterator[str]:
    kind = _suffix_kind(path)
    n = 0
    with _open_text(path, errors) as f:
        if kind == "plain":
            text = f.read()
            if text.strip():
                n += 1
                yield text
        else:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or text_field not in obj:
                    keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
                    raise DataError(
                        f"{path}:{lineno}: no field '{text_field}' (found {keys}; set --text_field)"
                    )
                text = obj[text_field]
                if not isinstance(text, str):
                    raise DataError(
                        f"{path}:{lineno}: field '{text_field}' is {type(text).__name__}, not text"
                    )
                if text:
                    n += 1
                    yield text
    if n == 0:
        raise DataError(f"input file {path} holds no text")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer.json file, a folder holding one, or a folder with vocab.json + merges.txt."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"tokenizer path {p} does not exist")
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            p = p / "tokenizer.json"
        elif (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
            tok = Tokenizer(models.BPE.from_file(str(p / "vocab.json"), str(p / "merges.txt")))
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            return tok
        else:
            raise DataError(
                f"tokenizer folder {p} has neither tokenizer.json nor vocab.json + merges.txt"
            )
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # the Rust side raises plain Exception on bad files
        raise DataError(f"tokenizer file {p} is not a HuggingFace tokenizer.json ({e})") from None


def train_bpe(texts: Iterable[str], vocab_size: int, eos_token: str = DEFAULT_EOS) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE; the EOS token gets id 0."""
    if vocab_size < 257:
        raise DataError(f"--train_tokenizer {vocab_size}: a byte-level BPE needs at least 257")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def eos_id(tok: Tokenizer, eos_token: str = DEFAULT_EOS) -> int:
    i = tok.token_to_id(eos_token)
    if i is None:
        raise DataError(f"tokenizer has no EOS token '{eos_token}' (set --eos_token)")
    return i


def vocab_size_of(tok: Tokenizer) -> int:
    """Number of ids the tokenizer can emit (max id + 1, added tokens included)."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def batches(
    files: list[Path],
    text_field: str,
    split_of: Callable[[Path, int], str],
    batch_chars: int,
    invalid_utf8: str = "error",
) -> Iterator[tuple[list[str], list[str], list[tuple[int, int]]]]:
    """Yield (texts, splits, per-text (file index, doc index)) in batches of ~batch_chars."""
    texts: list[str] = []
    splits: list[str] = []
    where: list[tuple[int, int]] = []
    size = 0
    for fi, path in enumerate(files):
        for di, text in enumerate(iter_documents(path, text_field, invalid_utf8)):
            texts.append(text)
            splits.append(split_of(path, di))
            where.append((fi, di))
            size += len(text)
            if size >= batch_chars:
                yield texts, splits, where
                texts, splits, where, size = [], [], [], 0
    if texts:
        yield texts, splits, where


def prefetched(it: Iterator, depth: int = 4) -> Iterator:
    """Run a generator in a reader thread so parsing overlaps tokenisation; errors re-raise."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in it:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # handed to the consumer, re-raised there
            put(e)

    threading.Thread(target=run, daemon=True, name="wsjax-preprocess-reader").start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()  # the consumer failed or stopped: let the reader thread end
