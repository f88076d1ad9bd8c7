"""Cerebras' GPT HDF5 layout (``GptHDF5DataProcessor``), read with h5py.

Each file holds a dataset ``data`` of shape (n_examples, 3, max_sequence_length): row 0 the
input_ids, row 1 the attention_mask, row 2 the labels; attribute ``n_examples``. The mask becomes
``loss_mask``. The dataset's dtype must be an integer one (float ids would be truncated), ids
and labels in [0, vocab_size) and mask values 0 or 1. data_dir is a file, a folder of ``*.h5``
/ ``*.hdf5`` files, or a list of these.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from wsjax.errors import DataError


def find_files(dirs: Sequence[str], patterns: Sequence[str], kind: str) -> list[Path]:
    """Files named by data_dir entries: files as given, folders globbed (sorted)."""
    files: list[Path] = []
    for d in dirs:
        p = Path(d)
        if not p.exists():
            raise DataError(f"data_dir {p} does not exist")
        if p.is_dir():
            found = sorted({f for pat in patterns for f in p.glob(pat) if f.is_file()})
            if not found:
                raise DataError(f"data_dir {p} holds no {kind} files ({', '.join(patterns)})")
            files.extend(found)
        else:
            files.append(p)
    return files


def check_ids(name: str, ids: np.ndarray, labels: np.ndarray, mask: np.ndarray, vocab: int):
    """Raise on ids outside [0, vocab) (labels only where the mask counts) and on mask values
    other than 0 / 1; zero masked labels."""
    bad = (mask != 0) & (mask != 1)
    if bad.any():
        raise DataError(f"{name}: mask value {int(mask[bad][0])}: must be 0 or 1")
    bad = (ids < 0) | (ids >= vocab)
    if bad.any():
        raise DataError(f"{name}: input id {int(ids[bad][0])} outside [0, vocab_size {vocab})")
    live = mask != 0
    bad = live & ((labels < 0) | (labels >= vocab))
    if bad.any():
        raise DataError(f"{name}: label {int(labels[bad][0])} outside [0, vocab_size {vocab})")
    labels[~live] = 0


class HDF5Source:
    def __init__(self, dirs: Sequence[str], seq_len: int, model_vocab_size: int):
        self.seq_len, self.vocab = seq_len, model_vocab_size
        self.files = find_files(dirs, ("*.h5", "*.hdf5"), "HDF5")
        self.name = f"HDF5 {', '.join(dirs)}"
        self._handles: list[h5py.File] = []
        self._lock = threading.Lock()
        counts = []
        for f in self.files:
            h = self._open(f)
            counts.append(h["data"].shape[0])
            self._handles.append(h)
        self.offsets = np.cumsum([0] + counts)
        self.num_examples = int(self.offsets[-1])

    def _open(self, path: Path) -> h5py.File:
        if path.stat().st_size == 0:
            raise DataError(f"HDF5 file {path} is empty")
        try:
            h = h5py.File(path, "r")
        except OSError as e:
            raise DataError(f"{path} is not an HDF5 file ({e})") from None
        if "data" not in h:
            raise DataError(f"{path}: no dataset 'data' (Cerebras GPT HDF5 layout expected)")
        shape = h["data"].shape
        if len(shape) != 3 or shape[1] != 3:
            raise DataError(
                f"{path}: dataset 'data' has shape {shape}, expected "
                f"(n_examples, 3, {self.seq_len}) [input_ids, attention_mask, labels]"
            )
        if h["data"].dtype.kind not in "iu":
            raise DataError(
                f"{path}: dataset 'data' has dtype {h['data'].dtype}; token ids, mask and labels "
                "must be integers (Cerebras writes int32)"
            )
        if shape[2] != self.seq_len:
            raise DataError(
                f"{path}: sequence length {shape[2]} != max_sequence_length {self.seq_len}"
            )
        if shape[0] == 0:
            raise DataError(f"HDF5 file {path} holds no examples")
        n_attr = h.attrs.get("n_examples")
        if n_attr is not None and int(n_attr) != shape[0]:
            raise DataError(f"{path}: attribute n_examples={int(n_attr)} but data has {shape[0]}")
        return h

    def too_small(self, batch_size: int) -> str:
        return f"{self.name}: {self.num_examples} examples, fewer than one batch of {batch_size}"

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        B, T = len(indices), self.seq_len
        out = np.empty((B, 3, T), dtype=np.int64)  # (B, [ids, mask, labels], T)
        file_of = np.searchsorted(self.offsets, indices, side="right") - 1
        for fi in np.unique(file_of):
            rows = np.nonzero(file_of == fi)[0]
            local = indices[rows] - self.offsets[fi]
            order = np.argsort(local)  # h5py wants increasing indices
            with self._lock:
                out[rows[order]] = self._handles[fi]["data"][local[order]]
            part = out[rows]
            check_ids(str(self.files[fi]), part[:, 0], part[:, 2], part[:, 1], self.vocab)
        ids, mask, labels = out[:, 0], out[:, 1], out[:, 2]
        labels[mask == 0] = 0
        return {"input_ids": ids, "labels": labels, "loss_mask": (mask != 0).astype(np.float32)}

    def close(self) -> None:
        for h in self._handles:
            h.close()
        self._handles.clear()
