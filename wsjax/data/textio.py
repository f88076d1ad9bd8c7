"""Raw text in: finding input files and reading their documents, and the tokenizer.

Formats: plain text (``.txt``, ``.text``, ``.md``, ``.py``: one file is one document), JSON
lines (``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``: one object per line, the text under a named
field), and, through ``wsjax.data.arrowio`` (pyarrow, the ``[data]`` extra), Parquet files, Arrow
files and HuggingFace datasets saved with ``save_to_disk`` (one row is one document, the text in
a named column). Bytes that are not UTF-8 stop the read with the file named, or, with
``invalid_utf8="replace"``, become U+FFFD. Tokenizers: a HuggingFace ``tokenizer.json`` (file or
folder holding one, e.g. a ``save_pretrained`` folder), a folder with GPT-2-style ``vocab.json`` +
``merges.txt``, or a byte-level BPE trained here. ``batches`` groups documents for batched
tokenising, with the input bytes read so far (progress), and ``prefetched`` reads them in a
thread while the previous batch is tokenised.
"""

from __future__ import annotations

import gzip
import io
import json
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

import zstandard
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from wsjax.data.arrowio import (
    ARROW_SUFFIXES,
    PARQUET_SUFFIXES,
    dataset_dict_split,
    is_saved_dataset,
    is_saved_dataset_dict,
    iter_column,
    saved_dataset_files,
)
from wsjax.errors import DataError

PLAIN_SUFFIXES = (".txt", ".text", ".md", ".py")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
DEFAULT_EOS = "<|endoftext|>"
VALID_INPUTS = (
    ".txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet, .arrow files, or a folder of them, or a "
    "datasets save_to_disk folder"
)


def _suffix_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PLAIN_SUFFIXES):
        return "plain"
    if name.endswith(PARQUET_SUFFIXES + ARROW_SUFFIXES):
        return "columns"
    return None


def _expand(p: Path, role: str) -> list[Path]:
    """The input files one --input (role "train") or --eval_input (role "eval") path names."""
    if not p.exists():
        raise DataError(f"input path {p} does not exist")
    if not p.is_dir():
        if _suffix_kind(p) is None:
            raise DataError(f"input file {p}: unsupported type (use {VALID_INPUTS})")
        return [p]
    found = _folder_files(p, role)
    if not found:
        raise DataError(f"input folder {p} holds no input files (use {VALID_INPUTS})")
    return found


def _folder_files(folder: Path, role: str) -> list[Path]:
    """A folder's input files, depth first in name order; a ``save_to_disk`` folder met on the
    way gives its own files (a DatasetDict: only its split for ``role``)."""
    if is_saved_dataset_dict(folder):
        folder = dataset_dict_split(folder, role)
    if is_saved_dataset(folder):
        return saved_dataset_files(folder)
    found: list[Path] = []
    for child in sorted(folder.iterdir()):
        if child.is_dir():
            found += _folder_files(child, role)
        elif child.is_file() and _suffix_kind(child):
            found.append(child)
    return found


def find_inputs(paths: Iterable[str | Path], role: str = "train") -> list[Path]:
    """Expand files and folders (recursively, sorted; a ``save_to_disk`` folder in its own
    order, a DatasetDict by its split for ``role``) into the list of readable input files."""
    seen: set[Path] = set()
    unique = []
    for raw in paths:
        for p in _expand(Path(raw), role):
            if p.resolve() not in seen:
                seen.add(p.resolve())
                unique.append(p)
    return unique


def _open_text(raw: BinaryIO, path: Path, errors: str) -> io.TextIOWrapper:
    """A text reader over the binary file ``raw`` (decompressed by the name's suffix)."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return io.TextIOWrapper(gzip.GzipFile(fileobj=raw), encoding="utf-8", errors=errors)
    if name.endswith(".zst"):
        stream = zstandard.ZstdDecompressor().stream_reader(raw, closefd=False)
        return io.TextIOWrapper(stream, encoding="utf-8", errors=errors)
    return io.TextIOWrapper(raw, encoding="utf-8", errors=errors)


def iter_documents(
    path: Path, text_field: str = "text", invalid_utf8: str = "error"
) -> Iterator[str]:
    """Yield the non-empty documents of one input file; DataError names file and line.

    ``invalid_utf8``: "error" stops at bytes that are not UTF-8, "replace" substitutes U+FFFD.
    """
    for text, _ in documents_read(path, text_field, invalid_utf8):
        yield text


def documents_read(
    path: Path, text_field: str = "text", invalid_utf8: str = "error"
) -> Iterator[tuple[str, int]]:
    """Yield (document, bytes of the file read so far) for the non-empty documents of a file;
    the last count of a file is at most its size (``batches`` counts the rest at its end)."""
    if path.stat().st_size == 0:
        raise DataError(f"input file {path} is empty")
    errors = "strict" if invalid_utf8 == "error" else "replace"
    kind = _suffix_kind(path)
    n = 0
    try:
        if kind == "columns":
            docs = _column_documents(path, text_field)
        else:
            docs = _text_documents(path, kind, text_field, errors)
        for doc in docs:
            n += 1
            yield doc
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: invalid UTF-8 (byte 0x{e.object[e.start]:02x}); fix the file or pass "
            "--invalid_utf8 replace to substitute U+FFFD and count them"
        ) from None
    if n == 0:
        unit = {"plain": "", "jsonl": "line", "columns": "row"}[kind]
        has = f": no {unit} with a non-empty '{text_field}'" if unit else ""
        raise DataError(f"input file {path} holds no text{has}")


def _column_documents(path: Path, column: str) -> Iterator[tuple[str, int]]:
    size = path.stat().st_size
    for values, fraction in iter_column(path, column):
        done = int(fraction * size)
        for text in values:
            if text:  # nulls and empty strings are no documents
                yield text, done


def _text_documents(
    path: Path, kind: str | None, text_field: str, errors: str
) -> Iterator[tuple[str, int]]:
    with open(path, "rb") as raw, _open_text(raw, path, errors) as f:
        if kind == "plain":
            text = f.read()
            if text.strip():
                yield text, raw.tell()
            return
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            text = _jsonl_text(path, lineno, line, text_field)
            if text:
                yield text, raw.tell()


def _jsonl_text(path: Path, lineno: int, line: str, text_field: str) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(obj, dict) or text_field not in obj:
        keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise DataError(
            f"{path}:{lineno}: no field '{text_field}' (found {keys}; set --text_column)"
        )
    text = obj[text_field]
    if not isinstance(text, str):
        raise DataError(f"{path}:{lineno}: field '{text_field}' is {type(text).__name__}, not text")
    return text


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


def hf_eos_token(path: str | Path) -> str | None:
    """The EOS token a HuggingFace tokenizer folder names (``tokenizer_config.json``, else
    ``special_tokens_map.json``, beside the tokenizer.json), or None."""
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            eos = json.loads((folder / name).read_text(encoding="utf-8")).get("eos_token")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            continue
        if isinstance(eos, dict):  # an AddedToken as older transformers write it
            eos = eos.get("content")
        if isinstance(eos, str) and eos:
            return eos
    return None


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    eos_token: str = DEFAULT_EOS,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE; the EOS token gets id 0. ``show_progress``: the
    trainer's own bars (counting pairs, computing merges) on stderr, where it is a terminal."""
    if vocab_size < 257:
        raise DataError(f"--train_tokenizer {vocab_size}: a byte-level BPE needs at least 257")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
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


class DocBatch(NamedTuple):
    texts: list[str]
    splits: list[str]  # "train" | "eval", one per text
    where: list[tuple[int, int]]  # (file index, document index), one per text
    bytes_read: int  # input bytes read so far, all files; the sum of their sizes at the end


def batches(
    files: list[Path],
    text_field: str,
    split_of: Callable[[Path, int], str],
    batch_chars: int,
    invalid_utf8: str = "error",
) -> Iterator[DocBatch]:
    """Yield the documents of ``files`` in batches of ~batch_chars characters. The last batch
    (possibly empty) reports every input byte read, so a progress bar ends at 100%."""
    texts: list[str] = []
    splits: list[str] = []
    where: list[tuple[int, int]] = []
    size = before = 0  # characters in this batch; bytes of the files already finished
    for fi, path in enumerate(files):
        for di, (text, done) in enumerate(documents_read(path, text_field, invalid_utf8)):
            texts.append(text)
            splits.append(split_of(path, di))
            where.append((fi, di))
            size += len(text)
            if size >= batch_chars:
                yield DocBatch(texts, splits, where, before + done)
                texts, splits, where, size = [], [], [], 0
        before += path.stat().st_size
    yield DocBatch(texts, splits, where, before)


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
