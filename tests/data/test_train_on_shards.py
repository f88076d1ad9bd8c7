"""Cerebras-prepared data trains unchanged: HDF5 and TFRecord sources through the engine.

The yardstick is a hand computation: the first step's loss equals the mean, over tokens whose
attention mask is 1, of -log softmax(logits)[label], computed in numpy from the model's logits
on the initial parameters. Padded positions carry garbage labels, so a loader or engine that
ignored the mask would get a different number. Then a few more steps must lower the loss.
"""

from __future__ import annotations

import dataclasses

import h5py
import jax
import numpy as np
import pytest

from wsjax.data import make_loader
from wsjax.data.tfrecord import write_tfrecords
from wsjax.engine import StreamingEngine
from wsjax.models import get_model

T, N = 16, 16


def _examples(seed: int = 0):
    """Padded examples; labels at padded positions are arbitrary (must be ignored)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 90, (N, T))
    lengths = rng.integers(T // 2, T + 1, N)
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)
    labels = np.concatenate([ids[:, 1:], ids[:, :1]], axis=1)
    labels = np.where(mask == 1, labels, rng.integers(1, 90, (N, T)))
    return ids, mask, labels


def _write_hdf5(d):
    ids, mask, labels = _examples()
    with h5py.File(d / "data-0.h5", "w") as f:
        f.create_dataset("data", data=np.stack([ids, mask, labels], axis=1))
        f.attrs["n_examples"] = N


def _write_tfrecord(d):
    ids, mask, labels = _examples()
    write_tfrecords(
        d / "data-0.tfrecord",
        (
            {"input_ids": ids[i].tolist(), "input_mask": mask[i].tolist(), "labels": labels[i]}
            for i in range(N)
        ),
    )


def _hand_loss(model, params, batch) -> float:
    logits = np.asarray(model.logits(params, batch["input_ids"]), np.float64)  # (B, T, V)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, batch["labels"][..., None], -1)[..., 0]
    m = batch["loss_mask"]
    return float((nll * m).sum() / m.sum())


@pytest.mark.parametrize(
    "processor,write",
    [("GptHDF5DataProcessor", _write_hdf5), ("GptTfRecordsProcessor", _write_tfrecord)],
)
def test_cerebras_format_trains_with_mask_honoured(tmp_path, tiny_config, processor, write):
    write(tmp_path)
    cfg = tiny_config("gptj", layers=2, optimizer={"learning_rate": 3e-3})
    inp = dataclasses.replace(
        cfg.train_input, data_processor=processor, data_dir=str(tmp_path), batch_size=8
    )
    cfg = dataclasses.replace(cfg, train_input=inp)
    model = get_model(cfg.model)
    params = model.init(jax.random.PRNGKey(0))
    engine = StreamingEngine(model, cfg, params=params)
    with make_loader(inp, split="train", model_vocab_size=97, seed=0) as loader:
        batches = [next(loader) for _ in range(12)]
    assert batches[0]["loss_mask"].min() == 0.0  # padding is present and masked
    expected = _hand_loss(model, params, batches[0])
    losses = [engine.train_step(b)["train/loss"] for b in batches]
    assert losses[0] == pytest.approx(expected, rel=1e-5)
    assert np.mean(losses[-2:]) < losses[0] - 0.1  # it learns (the data repeats every 2 steps)


def test_run_on_the_builtin_corpus_records_it_with_its_eval_loss(tmp_path):
    """A run on the built-in corpus writes model_dir/train/corpus.json: the corpus' size and
    split (from its meta.json) and the run's own eval results, the last one under "eval"."""
    import json

    from tests.helpers import MODEL_VOCAB, make_shards, tiny_config_dict
    from wsjax.config import config_from_dict
    from wsjax.train import run

    shards = make_shards(tmp_path / "shards")
    meta = json.loads((shards / "meta.json").read_text())
    meta["builtin"] = {"python": "3.x", "train": {"files": 3}, "eval": {"files": 1}}  # as builtin
    (shards / "meta.json").write_text(json.dumps(meta))
    d = tiny_config_dict("gptj", layers=1, model={"vocab_size": MODEL_VOCAB})
    data = {"data_processor": "GptTokenShardsProcessor", "data_dir": str(shards)}
    d["train_input"] = {"batch_size": 2, "max_sequence_length": 16, **data}
    d["eval_input"] = {"batch_size": 2, "max_sequence_length": 16, "split": "eval", **data}
    d["runconfig"] |= {"save_checkpoints_steps": 2, "eval_steps": 2}
    result = run(config_from_dict(d), "train_and_eval", tmp_path / "md", max_steps=2)
    record = json.loads((tmp_path / "md" / "train" / "corpus.json").read_text())
    assert record["corpus"] == meta["builtin"]
    assert result.evals and record["eval"]["loss"] == result.evals[-1]["loss"]

    # mode train evaluates nothing: the record says so instead of inventing a loss
    run(config_from_dict(d), "train", tmp_path / "md2", max_steps=1)
    assert json.loads((tmp_path / "md2" / "train" / "corpus.json").read_text())["eval"] is None
