"""Cerebras formats: GPT HDF5 (h5py) and TFRecords of tf.train.Example (read without TF)."""

from __future__ import annotations

import struct
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.helpers import input_config
from wsjax.data import make_loader
from wsjax.data import tfrecord as tfr
from wsjax.errors import DataError

T, V = 16, 500


def examples(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cerebras-style padded examples: ids, mask (1 = real token), labels (next token)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, V, (n, T))
    lengths = rng.integers(T // 2, T + 1, n)
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)
    labels = np.concatenate([ids[:, 1:], np.full((n, 1), 7)], axis=1)
    ids, labels = ids * mask, labels * mask  # pad with 0
    return ids, mask, labels


def write_h5(path: Path, ids, mask, labels) -> None:
    with h5py.File(path, "w") as f:
        data = np.stack([ids, mask, labels], axis=1)  # (n, 3, T)
        f.create_dataset("data", data=data)
        f.attrs["n_examples"] = data.shape[0]


def cfg(processor: str, data_dir, **kw):
    """Three examples a batch, two reader threads (the prefetch path is exercised too)."""
    return input_config(data_dir, seq=T, batch=3, processor=processor, num_workers=2, **kw)


def collect(c, n) -> dict[str, np.ndarray]:
    with make_loader(c, split="train", model_vocab_size=V, seed=0) as ld:
        bs = [next(ld) for _ in range(n)]
    return {k: np.concatenate([b[k] for b in bs]) for k in bs[0]}


def test_hdf5_round_trip_exact_with_mask(tmp_path):
    parts = [examples(5, 0), examples(7, 1)]  # 12 examples over two files
    for i, p in enumerate(parts):
        write_h5(tmp_path / f"part{i}.h5", *p)
    ids, mask, labels = (np.concatenate(x) for x in zip(*parts))
    got = collect(cfg("GptHDF5DataProcessor", str(tmp_path)), 4)
    np.testing.assert_array_equal(got["input_ids"], ids)
    np.testing.assert_array_equal(got["labels"], labels)
    np.testing.assert_array_equal(got["loss_mask"], mask.astype(np.float32))
    assert got["loss_mask"].min() == 0 and got["input_ids"].dtype == np.int32
    # shuffled: the same examples, another order, same for the same seed
    sh = collect(cfg("GptHDF5DataProcessor", str(tmp_path), shuffle=True, shuffle_seed=5), 4)
    order = [int(np.nonzero((ids == r).all(1))[0][0]) for r in sh["input_ids"]]
    assert sorted(order) == list(range(12)) and order != list(range(12))
    np.testing.assert_array_equal(sh["loss_mask"], mask[order].astype(np.float32))


def test_hdf5_bad_data(tmp_path):
    ids, mask, labels = examples(4, 0)
    write_h5(tmp_path / "short.h5", ids[:, :8], mask[:, :8], labels[:, :8])
    with pytest.raises(DataError, match=r"short\.h5: sequence length 8 != max_sequence_length 16"):
        make_loader(
            cfg("GptHDF5DataProcessor", str(tmp_path / "short.h5")),
            split="train",
            model_vocab_size=V,
            seed=0,
        )
    ids[2, 3] = V + 5
    write_h5(tmp_path / "big.h5", ids, mask, labels)
    with (
        make_loader(
            cfg("GptHDF5DataProcessor", str(tmp_path / "big.h5")),
            split="train",
            model_vocab_size=V,
            seed=0,
        ) as ld,
        pytest.raises(DataError, match=rf"big\.h5: input id {V + 5} outside \[0, vocab_size {V}\)"),
    ):
        next(ld)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no HDF5 files"):
        make_loader(
            cfg("GptHDF5DataProcessor", str(tmp_path / "empty")),
            split="train",
            model_vocab_size=V,
            seed=0,
        )
    write_h5(tmp_path / "few.h5", *examples(2, 0))
    with pytest.raises(DataError, match="2 examples, fewer than one batch of 3"):
        make_loader(
            cfg("GptHDF5DataProcessor", str(tmp_path / "few.h5")),
            split="train",
            model_vocab_size=V,
            seed=0,
        )


def test_crc32c_and_example_encoding_match_the_formats():
    assert tfr.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    # tf.train.Example{features{feature{key:"a" value{int64_list{value:[1]}}}}}, as TF writes it
    assert tfr.encode_example({"a": [1]}).hex() == "0a0c0a0a0a016112051a030a0101"
    ex = tfr.parse_example(tfr.encode_example({"x": [0, 1, 127, 128, 300, 2**40, -1, -300]}))
    assert ex["x"].tolist() == [0, 1, 127, 128, 300, 2**40, -1, -300]


def test_tfrecord_round_trip_exact_with_mask(tmp_path):
    ids, mask, labels = examples(9, 3)
    recs = [{"input_ids": i, "input_mask": m, "labels": lb} for i, m, lb in zip(ids, mask, labels)]
    tfr.write_tfrecords(tmp_path / "a.tfrecord", recs[:4])
    tfr.write_tfrecords(tmp_path / "b.tfrecords", recs[4:])
    got = collect(cfg("GptTfRecordsProcessor", [str(tmp_path)]), 3)
    np.testing.assert_array_equal(got["input_ids"], ids)
    np.testing.assert_array_equal(got["labels"], labels)
    np.testing.assert_array_equal(got["loss_mask"], mask.astype(np.float32))


def test_tfrecord_bad_data(tmp_path):
    ids, mask, labels = examples(4, 0)
    recs = [{"input_ids": i, "input_mask": m, "labels": lb} for i, m, lb in zip(ids, mask, labels)]
    f = tmp_path / "x.tfrecord"
    tfr.write_tfrecords(f, recs)
    raw = bytearray(f.read_bytes())
    raw[12 + 5] ^= 0xFF  # flip a payload byte of record 0
    f.write_bytes(bytes(raw))
    src = tfr.TfRecordSource([str(f)], T, V, verify=True)
    with pytest.raises(DataError, match=r"x\.tfrecord record 0: payload CRC mismatch"):
        src.read(np.array([0]))
    np.testing.assert_array_equal(src.read(np.array([1]))["input_ids"][0], ids[1])
    src.close()
    tfr.write_tfrecords(f, [{"input_ids": ids[0], "labels": labels[0]}] * 3)
    with (
        make_loader(
            cfg("GptTfRecordsProcessor", str(f)), split="train", model_vocab_size=V, seed=0
        ) as ld,
        pytest.raises(DataError, match="no int64 feature 'input_mask'"),
    ):
        next(ld)
    f.write_bytes(struct.pack("<Q", 5) + b"junk")
    with pytest.raises(DataError, match="bad length CRC at byte 0"):
        make_loader(cfg("GptTfRecordsProcessor", str(f)), split="train", model_vocab_size=V, seed=0)
    f.write_bytes(b"")
    with pytest.raises(DataError, match=r"x\.tfrecord is empty"):
        make_loader(cfg("GptTfRecordsProcessor", str(f)), split="train", model_vocab_size=V, seed=0)
