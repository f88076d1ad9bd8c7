"""The loader: deterministic, resumable batch order over any source, with background prefetch.

Batch k of a run is a pure function of (config, seed, k): with ``bpe = num_examples // B``
batches per epoch, batch k is examples ``perm(epoch)[i*B : (i+1)*B]`` where
``epoch, i = divmod(k, bpe)`` and ``perm(epoch)`` is the identity, or, with ``shuffle``, the
permutation drawn by ``np.random.default_rng([shuffle_seed, epoch])`` (PCG64: the same on every
machine). Resuming is jumping to k: nothing is replayed; so is ``skip`` (Cerebras'
``skip_steps``): a fresh loader starts at batch ``skip``. The last partial batch of an epoch is
dropped. A thread pool (``num_workers`` readers) fills batches k+1 .. k+depth while the trainer
works on k; the batches do not depend on the number of readers.

A source is any object with ``name``, ``num_examples``, ``seq_len``, ``read(indices) -> batch``,
``too_small(batch_size) -> str`` and ``close()``; ``read`` must be thread-safe.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from wsjax.data.builtin import ensure_builtin_corpus
from wsjax.data.hdf5 import HDF5Source
from wsjax.data.shards import ShardSource
from wsjax.data.synthetic import SyntheticSource
from wsjax.data.tfrecord import TfRecordSource
from wsjax.errors import ConfigError, DataError

log = logging.getLogger("wsjax.data")

BUILTIN_STDLIB = "builtin:stdlib"
PROCESSORS = (
    "GptTokenShardsProcessor",
    "GptHDF5DataProcessor",
    "GptTfRecordsProcessor",
    "SyntheticDataProcessor",
)


class Source(Protocol):
    name: str
    num_examples: int
    seq_len: int

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]: ...
    def too_small(self, batch_size: int) -> str: ...
    def close(self) -> None: ...


class Loader:
    """Iterator of {"input_ids", "labels": int32 (B,T), "loss_mask": float32 (B,T)} batches."""

    def __init__(
        self,
        source: Source,
        *,
        batch_size: int,
        shuffle: bool = False,
        shuffle_seed: int = 0,
        repeat: bool = True,
        num_workers: int = 1,
        prefetch_factor: int = 2,
        start_state: dict | None = None,
        rows: np.ndarray | None = None,
        skip: int = 0,
    ):
        self.source = source
        # with several processes: the positions in each global batch this process reads (the
        # batch order stays the global one, so batch k is the same whatever the process count)
        self.rows = rows
        self.batch_size = batch_size
        self.shuffle, self.shuffle_seed, self.repeat = shuffle, shuffle_seed, repeat
        self.num_examples = source.num_examples
        self.batches_per_epoch = self.num_examples // batch_size
        if self.batches_per_epoch == 0:
            source.close()
            raise DataError(source.too_small(batch_size))
        self.tokens_per_batch = batch_size * source.seq_len
        self.wait_seconds_last = 0.0
        self.wait_seconds_total = 0.0
        self._perms: dict[int, np.ndarray] = {}
        self._perm_lock = threading.Lock()
        self._next_out = self._resume_batch(start_state) if start_state else skip
        if skip and not start_state:
            log.info("%s: skipping the first %d batches (skip_steps)", source.name, skip)
        self._next_submit = self._next_out
        self._depth = max(1, prefetch_factor) * max(1, num_workers)
        self._pool = ThreadPoolExecutor(max(1, num_workers), thread_name_prefix="wsjax-data")
        self._pending: deque[tuple[int, Future]] = deque()
        self._closed = False
        self._fill()

    # -- order ---------------------------------------------------------------------------------
    def _perm(self, epoch: int) -> np.ndarray:
        with self._perm_lock:
            p = self._perms.get(epoch)
            if p is None:
                rng = np.random.default_rng([self.shuffle_seed, epoch])
                dtype = np.uint32 if self.num_examples < 2**32 else np.int64
                p = rng.permutation(self.num_examples).astype(dtype)
                for old in [e for e in self._perms if e < epoch - 1]:
                    del self._perms[old]
                self._perms[epoch] = p
            return p

    def batch_indices(self, k: int) -> np.ndarray:
        """Example indices of batch k (global batch counter, epochs included)."""
        epoch, i = divmod(k, self.batches_per_epoch)
        lo, hi = i * self.batch_size, (i + 1) * self.batch_size
        if not self.shuffle:
            return np.arange(lo, hi, dtype=np.int64)
        return self._perm(epoch)[lo:hi].astype(np.int64)

    def _fetch(self, k: int) -> dict[str, np.ndarray]:
        indices = self.batch_indices(k)
        batch = self.source.read(indices if self.rows is None else indices[self.rows])
        return {
            "input_ids": np.ascontiguousarray(batch["input_ids"], dtype=np.int32),
            "labels": np.ascontiguousarray(batch["labels"], dtype=np.int32),
            "loss_mask": np.ascontiguousarray(batch["loss_mask"], dtype=np.float32),
        }

    # -- state ---------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Position after the last batch handed out; ``start_state=`` it to continue from there."""
        epoch, index = divmod(self._next_out, self.batches_per_epoch)
        return {
            "batch": self._next_out,
            "epoch": epoch,
            "index": index,
            "batches_per_epoch": self.batches_per_epoch,
            "num_examples": self.num_examples,
        }

    def _resume_batch(self, state: dict) -> int:
        try:
            epoch, index = int(state["epoch"]), int(state["index"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"loader state {state!r} lacks integer 'epoch' and 'index'") from None
        if state.get("num_examples", self.num_examples) != self.num_examples:
            log.warning(
                "data changed since the checkpoint (%s examples, now %d): resuming at epoch %d, "
                "batch %d of the new order",
                state.get("num_examples"),
                self.num_examples,
                epoch,
                index,
            )
        return epoch * self.batches_per_epoch + min(index, self.batches_per_epoch)

    # -- iteration -----------------------------------------------------------------------------
    def _fill(self) -> None:
        end = None if self.repeat else self.batches_per_epoch
        while len(self._pending) < self._depth and (end is None or self._next_submit < end):
            k = self._next_submit
            self._pending.append((k, self._pool.submit(self._fetch, k)))
            self._next_submit += 1

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._closed:
            raise RuntimeError("loader is closed")
        if not self._pending:
            raise StopIteration
        k, fut = self._pending.popleft()
        t0 = time.perf_counter()
        batch = fut.result()  # re-raises a DataError from the worker
        self.wait_seconds_last = time.perf_counter() - t0
        self.wait_seconds_total += self.wait_seconds_last
        self._next_out = k + 1
        self._fill()
        return batch

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for _, fut in self._pending:
            fut.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)
        self.source.close()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            # At interpreter exit the pool's module globals may already be gone: nothing to do.
            with contextlib.suppress(Exception):
                self._pool.shutdown(wait=False, cancel_futures=True)


def _dirs(data_dir: Any) -> list[str]:
    if isinstance(data_dir, str | Path):
        return [str(data_dir)]
    return [str(d) for d in data_dir]


def make_source(input_cfg: Any, *, split: str, model_vocab_size: int, seed: int) -> Source:
    """The source named by ``input_cfg.data_processor`` (duck-typed InputConfig)."""
    processor = getattr(input_cfg, "data_processor", None) or "GptTokenShardsProcessor"
    T = int(input_cfg.max_sequence_length)
    if processor == "SyntheticDataProcessor":
        vocab = getattr(input_cfg, "vocab_size", None) or model_vocab_size
        return SyntheticSource(min(vocab, model_vocab_size), T, seed)
    if processor not in PROCESSORS:
        raise ConfigError(f"data_processor '{processor}' is not one of {', '.join(PROCESSORS)}")
    dirs = _dirs(input_cfg.data_dir)
    if processor == "GptTokenShardsProcessor":
        roots = []
        for d in dirs:
            if d == BUILTIN_STDLIB:
                roots.append(ensure_builtin_corpus(model_vocab_size, log=log.info))
            else:
                roots.append(Path(d))
        return ShardSource(roots, split, T, model_vocab_size)
    if processor == "GptHDF5DataProcessor":
        return HDF5Source(dirs, T, model_vocab_size)
    return TfRecordSource(dirs, T, model_vocab_size)


def make_loader(
    input_cfg: Any,
    *,
    split: str,
    model_vocab_size: int,
    seed: int,
    start_state: dict | None = None,
    rows: np.ndarray | None = None,
) -> Loader:
    """A Loader for ``train_input`` / ``eval_input``; ``start_state`` is a ``Loader.state()``
    (without one, the loader starts at batch ``skip_steps``); ``rows``: read only these
    positions of each global batch (this process's share)."""
    source = make_source(input_cfg, split=split, model_vocab_size=model_vocab_size, seed=seed)
    synthetic = getattr(input_cfg, "data_processor", None) == "SyntheticDataProcessor"
    return Loader(
        source,
        batch_size=int(input_cfg.batch_size),
        shuffle=bool(getattr(input_cfg, "shuffle", False)) and not synthetic,
        shuffle_seed=int(getattr(input_cfg, "shuffle_seed", 0) or 0),
        repeat=bool(getattr(input_cfg, "repeat", True)),
        num_workers=int(getattr(input_cfg, "num_workers", 1) or 1),
        prefetch_factor=int(getattr(input_cfg, "prefetch_factor", 2) or 2),
        start_state=start_state,
        rows=rows,
        skip=int(getattr(input_cfg, "skip_steps", 0) or 0),
    )
