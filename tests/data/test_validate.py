"""The vocabulary set once, and the data checked against the model before anything runs.

Config: the input sections take vocab_size from the model; the model takes it from the token
shards' meta.json when nothing names it. ``check_data_vocab`` (what ``--validate_only`` calls)
refuses data the model cannot embed, in one line; so do the loaders, for HDF5 ids stored as
floats, masks other than 0 / 1, TFRecord features of the wrong kind and a meta.json EOS id
outside the vocabulary.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.helpers import BPE_VOCAB, input_config, make_shards, tiny_config_dict
from wsjax.config import config_from_dict
from wsjax.data import check_data_vocab, make_loader
from wsjax.data import shards as shards_io
from wsjax.data import tfrecord as tfr
from wsjax.errors import ConfigError, DataError

T = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Token shards of a 320-token BPE (train + eval), as wsjax-preprocess writes them."""
    return make_shards(tmp_path_factory.mktemp("d") / "shards")


def shards_config(root: Path, model: dict | None = None, **inputs) -> dict:
    d = tiny_config_dict("gptj", layers=1)
    d["model"].pop("vocab_size")
    d["model"] |= model or {}
    for section, split in (("train_input", "train"), ("eval_input", "eval")):
        d[section] = {"data_dir": str(root), "batch_size": 2, "split": split, **inputs}
    return d


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_vocab_is_set_once(shards):
    """Shards alone: model and inputs take the meta.json vocab; a model vocab alone: the
    inputs take it; an explicit equal value is accepted, another one refused naming both."""
    cfg = config_from_dict(shards_config(shards))
    assert (
        cfg.model.vocab_size
        == BPE_VOCAB
        == json.loads((shards / "meta.json").read_text())["vocab_size"]
    )
    assert cfg.train_input.vocab_size == cfg.eval_input.vocab_size == BPE_VOCAB
    for section, split in (("train_input", "train"), ("eval_input", "eval")):
        inp = getattr(cfg, section)
        check_data_vocab(inp, cfg.model.vocab_size, split=split)
        with make_loader(inp, split=split, model_vocab_size=cfg.model.vocab_size, seed=0) as ld:
            assert next(ld)["input_ids"].max() < BPE_VOCAB
    cfg = config_from_dict(shards_config(shards, {"vocab_size": 384}))
    assert {cfg.model.vocab_size, cfg.train_input.vocab_size, cfg.eval_input.vocab_size} == {384}
    assert config_from_dict(shards_config(shards, {"vocab_size": 384}, vocab_size=384))
    with pytest.raises(ConfigError, match=r"train_input\.vocab_size.*384") as err:
        config_from_dict(shards_config(shards, {"vocab_size": 384}, vocab_size=320), "p.yaml")
    assert one_line(err).startswith("p.yaml: ")
    # a config round trip keeps it (params_train.yaml)
    again = config_from_dict(cfg.to_dict())
    assert again.train_input.vocab_size == again.model.vocab_size == 384


def test_no_vocab_anywhere_still_names_the_key(tmp_path):
    d = shards_config(tmp_path / "none")  # no meta.json there
    with pytest.raises(ConfigError, match="model.vocab_size"):
        config_from_dict(d)


def test_check_data_vocab_token_shards(shards):
    inp = input_config(shards, seq=T, batch=2)
    check_data_vocab(inp, BPE_VOCAB, split="train")  # equal: fits
    check_data_vocab(inp, 50257, split="eval")  # larger model: fits
    with pytest.raises(DataError) as err:
        check_data_vocab(inp, BPE_VOCAB - 1, split="train")
    msg = one_line(err)
    assert f"{shards}/meta.json has vocab_size {BPE_VOCAB}" in msg
    assert f"the model's vocab_size is {BPE_VOCAB - 1}" in msg
    meta = json.loads((shards / "meta.json").read_text())
    other = shards.parent / "no_eval"
    other.mkdir()
    (other / "meta.json").write_text(
        json.dumps(meta | {"splits": {"train": meta["splits"]["train"]}})
    )
    with pytest.raises(DataError, match=r"no_eval/meta.json has no 'eval' split"):
        check_data_vocab(input_config(other, seq=T, batch=2), 512, split="eval")
    check_data_vocab(input_config("builtin:stdlib", seq=T, batch=2), 512)  # built to fit
    check_data_vocab(input_config("x", seq=T, batch=2, processor="SyntheticDataProcessor"), 64)


def test_meta_eos_id_outside_the_vocabulary(tmp_path, shards):
    bad = tmp_path / "bad"
    bad.mkdir()
    meta = json.loads((shards / "meta.json").read_text())
    (bad / "meta.json").write_text(json.dumps(meta | {"eos_id": BPE_VOCAB}))
    with pytest.raises(DataError) as err:
        check_data_vocab(input_config(bad, seq=T, batch=2), 512)
    assert one_line(err).endswith(
        f"meta.json: eos_id {BPE_VOCAB} is outside the vocabulary "
        f"(vocab_size {BPE_VOCAB}: ids 0..{BPE_VOCAB - 1})"
    )


def write_h5(path: Path, data: np.ndarray) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=data)


def examples(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (n, T))
    return np.stack([ids, np.ones((n, T), np.int64), np.roll(ids, -1, 1)], axis=1)  # (n, 3, T)


def test_check_data_vocab_hdf5_reads_the_start_of_every_file(tmp_path):
    write_h5(tmp_path / "a.h5", examples(100, 500))
    write_h5(tmp_path / "b.h5", examples(100, 1000, seed=1))  # tokenised for a larger vocab
    check_data_vocab(
        input_config(tmp_path / "a.h5", seq=T, batch=2, processor="GptHDF5DataProcessor"), 500
    )
    inp = input_config(tmp_path, seq=T, batch=2, processor="GptHDF5DataProcessor")
    with pytest.raises(DataError, match=r"b\.h5: input id \d+ outside \[0, vocab_size 500\)"):
        check_data_vocab(inp, 500)
    check_data_vocab(inp, 1000)


@pytest.mark.parametrize(
    "data,pattern",
    [
        (
            examples(4, 90).astype(np.float32) + 0.7,  # 3.7 was read as 3
            r"x\.h5: dataset 'data' has dtype float32; token ids, mask and labels must be integers",
        ),
        (
            examples(4, 90) * np.array([1, 2, 1])[None, :, None],  # mask values 2
            r"x\.h5: mask value 2: must be 0 or 1",
        ),
    ],
)
def test_hdf5_values_checked_before_training(tmp_path, data, pattern):
    write_h5(tmp_path / "x.h5", data)
    inp = input_config(tmp_path, seq=T, batch=2, processor="GptHDF5DataProcessor")
    with pytest.raises(DataError, match=pattern) as err:
        check_data_vocab(inp, 100)
    one_line(err)
    with (
        pytest.raises(DataError, match=pattern),
        make_loader(inp, split="train", model_vocab_size=100, seed=0) as ld,
    ):
        next(ld)  # the loader too: at open (dtype) or at the first read (mask)


def _entry(name: str, feature: bytes) -> bytes:
    """One map entry of tf.train.Features: {1: name, 2: Feature}."""
    return tfr._len_field(1, tfr._len_field(1, name.encode()) + tfr._len_field(2, feature))


def test_tfrecord_float_feature_is_named(tmp_path):
    """input_ids stored as a float_list (TF's tf.train.FloatList) is refused by name."""
    ints = b"".join(tfr._enc_varint(1) for _ in range(T))
    int64_list = tfr._len_field(3, tfr._len_field(1, ints))
    float_list = tfr._len_field(2, tfr._len_field(1, np.full(T, 1.0, np.float32).tobytes()))
    entries = [("input_ids", float_list), ("input_mask", int64_list), ("labels", int64_list)]
    payload = tfr._len_field(1, b"".join(_entry(n, f) for n, f in entries))
    assert tfr.feature_kinds(payload) == {
        "input_ids": "float_list",
        "input_mask": "int64_list",
        "labels": "int64_list",
    }
    with open(tmp_path / "x.tfrecord", "wb") as f:
        for _ in range(4):
            header = struct.pack("<Q", len(payload))
            f.write(header + struct.pack("<I", tfr.masked_crc(header)))
            f.write(payload + struct.pack("<I", tfr.masked_crc(payload)))
    inp = input_config(tmp_path, seq=T, batch=2, processor="GptTfRecordsProcessor")
    with pytest.raises(DataError) as err:
        check_data_vocab(inp, 100)
    assert one_line(err).endswith(
        "x.tfrecord record 0: feature 'input_ids' is a float_list, not an int64_list"
    )


def test_publish_over_an_older_output_never_mixes_old_and_new(tmp_path, monkeypatch):
    """preprocess --overwrite: a kill while the new shards replace the old ones (here the
    second move fails) leaves a folder without meta.json, which the reader refuses in one line;
    the rerun's publish then completes, with the new metadata."""

    def folder(root: Path, tag: str) -> Path:
        for split in ("train", "eval"):
            (root / split).mkdir(parents=True)
            (root / split / "0.bin").write_text(tag)
        (root / "meta.json").write_text(json.dumps({"tag": tag}))
        return root

    final, stage = folder(tmp_path / "out", "old"), folder(tmp_path / "stage", "new")
    moves, real = [], os.replace

    def dies_on_the_second(src, dst):
        moves.append(src)
        if len(moves) == 2:
            raise KeyboardInterrupt  # the process dies between two moves
        real(src, dst)

    monkeypatch.setattr(shards_io.os, "replace", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        shards_io.publish(stage, final)
    assert (final / "train" / "0.bin").read_text() == "new"  # moved before the kill
    with pytest.raises(DataError, match="no meta.json in"):
        shards_io.read_meta(final)
    monkeypatch.setattr(shards_io.os, "replace", real)
    shards_io.publish(folder(tmp_path / "rerun", "new"), final)
    assert json.loads((final / "meta.json").read_text()) == {"tag": "new"}
    assert (final / "eval" / "0.bin").read_text() == "new"
