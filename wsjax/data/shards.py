"""Token shards (the preprocess output): writing them, opening them with their checks, the
windowed source, unigram entropy.

A split is the concatenation of its shard files (memory-mapped). Example i is the window
``tokens[i*T : i*T + T + 1]``: input_ids = w[:-1], labels = w[1:], loss_mask = 1. Windows do not
overlap and may cross shard and document boundaries (documents are separated by EOS).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from wsjax.errors import DataError
from wsjax.fileio import process_alive

_SCAN_CHUNK = 1 << 24  # tokens per np.max chunk when checking ids


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ShardWriter:
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

    @contextlib.contextmanager
    def _naming(self):
        try:
            yield
        except OSError as e:  # a buffered write's error names no file: name the shard
            raise OSError(e.errno, e.strerror, e.filename or self._f.name) from None

    def _close_current(self) -> None:
        if self._f is not None:
            with self._naming():
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
            with self._naming():
                self._f.write(ids[:take].data)  # a full disk: ENOSPC (numpy's tofile: no errno)
            self._n += take
            self.tokens += take
            ids = ids[take:]

    def close(self) -> dict:
        self._close_current()
        return {"tokens": self.tokens, "documents": self.documents, "shards": self.shards}


def read_meta(root: Path) -> dict:
    if not root.exists():
        raise DataError(f"data_dir {root} does not exist")
    path = root / "meta.json"
    if not path.is_file():
        raise DataError(
            f"no meta.json in {root}: not a token-shards folder "
            "(make one with python -m wsjax.data.preprocess)"
        )
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: not a JSON object")
    for key in ("vocab_size", "eos_id", "dtype", "splits"):
        if key not in meta:
            raise DataError(f"{path} lacks the key '{key}'")
    _check_meta_values(path, meta)
    if meta["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{path}: dtype '{meta['dtype']}' is not uint16 or uint32")
    limit = np.iinfo(meta["dtype"]).max + 1
    if meta["vocab_size"] > limit:
        raise DataError(
            f"{path}: dtype {meta['dtype']} cannot hold vocab_size {meta['vocab_size']} "
            f"(ids up to {limit - 1})"
        )
    return meta


def _check_meta_values(path: Path, meta: dict) -> None:
    """Types and ranges of every meta.json value the reader uses: one line naming the key."""

    def count(value, key: str, minimum: int = 0) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise DataError(f"{path}: {key} = {value!r} is not an integer >= {minimum}")

    count(meta["vocab_size"], "vocab_size", 1)
    count(meta["eos_id"], "eos_id")
    if meta["eos_id"] >= meta["vocab_size"]:
        raise DataError(
            f"{path}: eos_id {meta['eos_id']} is outside the vocabulary "
            f"(vocab_size {meta['vocab_size']}: ids 0..{meta['vocab_size'] - 1})"
        )
    if not isinstance(meta["splits"], dict):
        raise DataError(f"{path}: splits = {meta['splits']!r} is not a mapping of split names")
    for name, split in meta["splits"].items():
        shards = split.get("shards") if isinstance(split, dict) else None
        if not isinstance(shards, list):
            raise DataError(f"{path}: splits.{name}.shards is not a list of shard entries")
        for i, shard in enumerate(shards):
            where = f"splits.{name}.shards[{i}]"
            if not isinstance(shard, dict) or not isinstance(shard.get("file"), str):
                raise DataError(f"{path}: {where} lacks a 'file' name")
            count(shard.get("tokens"), f"{where}.tokens")


def partial_prefix(final: Path) -> str:
    return f".{final.name}.partial-"


def clear_partial(final: Path, log: Callable[[str], None] = print) -> None:
    """Remove the staging folders that killed writers to ``final`` left (``.<name>.partial-<pid>``
    beside it, the pid no longer running), each named in one line."""
    if not final.parent.is_dir():
        return
    for stale in final.parent.glob(f"{partial_prefix(final)}*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and process_alive(int(pid)):
            continue  # another preprocess writing to the same output now
        log(f"removing {stale}, left by an interrupted wsjax-preprocess")
        shutil.rmtree(stale, ignore_errors=True)


def publish(stage: Path, final: Path) -> None:
    """Move the shards staged in ``stage`` into ``final``. Over an older output, its meta.json
    goes first and the new one comes last: a kill in between leaves a folder that readers
    refuse ("no meta.json", one line; rerun with --overwrite), never new shards read with old
    metadata or old shards with new. Other files a user keeps in ``final`` stay."""
    if not final.exists():
        os.replace(stage, final)
        return
    (final / "meta.json").unlink(missing_ok=True)
    for name in ("train", "eval", "tokenizer.json"):
        old = final / name
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
        if (stage / name).exists():
            os.replace(stage / name, old)
    os.replace(stage / "meta.json", final / "meta.json")


def check_vocab(root: Path, meta: dict, model_vocab_size: int) -> None:
    """The model must hold every id of the shards' vocabulary: one line naming both sizes."""
    vocab = meta["vocab_size"]
    if vocab > model_vocab_size:
        raise DataError(
            f"vocab mismatch: {root}/meta.json has vocab_size {vocab} but the model's "
            f"vocab_size is {model_vocab_size} (must be >= the data's: set model.vocab_size "
            f">= {vocab}, or tokenise with at most {model_vocab_size} tokens)"
        )


def check_split(root: Path, meta: dict, split: str) -> None:
    if split not in meta["splits"]:
        raise DataError(
            f"{root}/meta.json has no '{split}' split (has: "
            f"{', '.join(meta['splits'])}); preprocess with --eval_fraction or --eval_input"
        )


class TokenStream:
    """One split of one or more shard folders as a single read-only token array."""

    def __init__(self, roots: Sequence[Path], split: str, model_vocab_size: int):
        self.arrays: list[np.memmap] = []
        self.files: list[Path] = []
        self.meta: dict | None = None
        for root in roots:
            meta = read_meta(root)
            self._check_compatible(root, meta, model_vocab_size)
            check_split(root, meta, split)
            for shard in meta["splits"][split]["shards"]:
                self._open_shard(root / shard["file"], meta, int(shard["tokens"]))
        self.offsets = np.cumsum([0] + [a.size for a in self.arrays])
        self.num_tokens = int(self.offsets[-1])
        if self.num_tokens == 0:
            raise DataError(f"split '{split}' of {', '.join(map(str, roots))} holds no tokens")

    def _check_compatible(self, root: Path, meta: dict, model_vocab_size: int) -> None:
        check_vocab(root, meta, model_vocab_size)
        if self.meta is None:
            self.meta = meta
            return
        for key in ("vocab_size", "eos_id", "dtype"):
            if meta[key] != self.meta[key]:
                raise DataError(
                    f"{root}/meta.json {key}={meta[key]} differs from the first data_dir's "
                    f"{self.meta[key]}"
                )

    def _open_shard(self, path: Path, meta: dict, tokens: int) -> None:
        dtype = np.dtype(meta["dtype"])
        if not path.is_file():
            raise DataError(f"shard {path} listed in meta.json is missing")
        size = path.stat().st_size
        if size == 0 or tokens == 0:
            raise DataError(f"shard {path} is empty")
        if size != tokens * dtype.itemsize:
            raise DataError(
                f"shard {path}: {size} bytes is not {tokens} {dtype.name} tokens as meta.json "
                f"says (dtype mismatch or truncated file)"
            )
        arr = np.memmap(path, dtype=dtype, mode="r")
        vocab = int(meta["vocab_size"])
        for start in range(0, arr.size, _SCAN_CHUNK):
            chunk = arr[start : start + _SCAN_CHUNK]
            top = int(chunk.max())
            if top >= vocab:
                pos = start + int(np.argmax(chunk >= vocab))
                raise DataError(
                    f"shard {path}: token id {int(arr[pos])} at position {pos} >= "
                    f"vocab_size {vocab} of meta.json"
                )
        self.arrays.append(arr)
        self.files.append(path)

    def read(self, start: int, stop: int, out: np.ndarray) -> None:
        """Copy tokens[start:stop] into ``out`` (crossing shard boundaries as needed)."""
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pos = 0
        while start < stop:
            a, base = self.arrays[i], int(self.offsets[i])
            take = min(stop, base + a.size) - start
            out[pos : pos + take] = a[start - base : start - base + take]
            pos += take
            start += take
            i += 1


class ShardSource:
    """Non-overlapping windows of T+1 tokens over a TokenStream."""

    def __init__(self, roots: Sequence[Path], split: str, seq_len: int, model_vocab_size: int):
        self.stream = TokenStream(roots, split, model_vocab_size)
        self.roots = list(roots)  # the run copies the first one's tokenizer into model_dir
        self.seq_len = seq_len
        self.num_examples = (self.stream.num_tokens - 1) // seq_len
        self.name = f"token shards {', '.join(map(str, roots))} [{split}]"
        self.meta = self.stream.meta

    def too_small(self, batch_size: int) -> str:
        need = batch_size * self.seq_len + 1
        return (
            f"{self.name}: {self.stream.num_tokens} tokens, fewer than one batch of "
            f"{batch_size}x{self.seq_len} needs ({need})"
        )

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        T = self.seq_len
        windows = np.empty((len(indices), T + 1), dtype=np.int32)  # (B, T+1)
        for row, i in enumerate(indices):
            self.stream.read(int(i) * T, int(i) * T + T + 1, windows[row])
        return {
            "input_ids": windows[:, :-1],
            "labels": windows[:, 1:],
            "loss_mask": np.ones((len(indices), T), dtype=np.float32),
        }

    def close(self) -> None:
        self.stream.arrays.clear()


def _counts(stream: TokenStream, vocab: int) -> np.ndarray:
    counts = np.zeros(vocab, dtype=np.int64)
    for a in stream.arrays:
        for start in range(0, a.size, _SCAN_CHUNK):
            counts += np.bincount(a[start : start + _SCAN_CHUNK], minlength=vocab)[:vocab]
    return counts


def unigram_entropy(shards_dir: str | Path, split: str = "eval") -> float:
    """Cross-entropy (nats/token) of ``split``'s tokens under the train split's unigram model.

    p(t) = (count_train(t) + 1) / (N_train + V) (add-one smoothing over the meta vocab_size).
    It is the loss of the best context-free predictor: a language model must go below it.
    """
    root = Path(shards_dir)
    vocab = int(read_meta(root)["vocab_size"])
    train = _counts(TokenStream([root], "train", vocab), vocab)
    target = train if split == "train" else _counts(TokenStream([root], split, vocab), vocab)
    logp = np.log(train + 1.0) - np.log(train.sum() + vocab)
    return float(-(target * logp).sum() / target.sum())
