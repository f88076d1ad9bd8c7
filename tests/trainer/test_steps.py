"""runconfig.num_epochs (wsjax.trainer.steps): max_steps from the train data's size, checked
against a hand count of the batches an epoch holds, and a run that trains exactly that."""

from __future__ import annotations

import numpy as np
import pytest

from tests.data.test_loader import write_shards
from tests.helpers import VOCAB, tiny_config_dict
from wsjax.checkpoint import Checkpoints
from wsjax.config import config_from_dict
from wsjax.errors import ConfigError, DataError
from wsjax.models import get_model
from wsjax.train import run
from wsjax.trainer.steps import with_epochs

SEQ, BATCH = 16, 4
# 14 windows of 16 tokens (a window reads 17: the last token is the 14th window's label only),
# 3 whole batches of 4 an epoch; the 2 windows left over are dropped
TOKENS = 14 * SEQ + 1
PER_EPOCH = 14 // BATCH


@pytest.fixture
def shards(tmp_path):
    tokens = np.arange(TOKENS) % VOCAB
    return write_shards(tmp_path / "shards", {"train": [tokens]}, vocab=VOCAB)


def config(data_dir, processor="GptTokenShardsProcessor", **runconfig):
    d = tiny_config_dict("gpt2", layers=2, batch=BATCH, seq=SEQ)
    d["train_input"] |= {"data_processor": processor, "data_dir": str(data_dir)}
    d["runconfig"] = {"seed": 3, "save_checkpoints_steps": 0, **runconfig}
    return config_from_dict(d, source="t.yaml")


def test_num_epochs_sets_max_steps_from_the_data(shards):
    assert PER_EPOCH == 3
    assert with_epochs(config(shards, num_epochs=2)).runconfig.max_steps == 2 * 3
    # with max_steps too, the smaller of the two (Cerebras)
    assert with_epochs(config(shards, num_epochs=2, max_steps=4)).runconfig.max_steps == 4
    assert with_epochs(config(shards, num_epochs=2, max_steps=100)).runconfig.max_steps == 6
    plain = config(shards, max_steps=5)
    assert with_epochs(plain) is plain


def test_num_epochs_of_data_without_a_size_is_refused_in_one_line(shards, tmp_path):
    with pytest.raises(ConfigError) as info:
        with_epochs(config(shards, "SyntheticDataProcessor", num_epochs=2))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("t.yaml: runconfig.num_epochs=2 needs data")
    assert "SyntheticDataProcessor is endless; give runconfig.max_steps" in msg
    small = write_shards(tmp_path / "small", {"train": [np.arange(3 * SEQ + 1)]}, vocab=VOCAB)
    with pytest.raises(DataError, match="fewer than one batch of 4"):
        with_epochs(config(small, num_epochs=1))


def test_a_run_trains_num_epochs_whole_epochs(shards, tmp_path):
    """2 epochs: steps 1..6, and the data position after the last is the start of epoch 2; run
    again, the same model_dir is already at its end."""
    cfg = config(shards, num_epochs=2)
    result = run(cfg, "train", tmp_path / "md", progress=False)
    assert [s for s, _ in result.losses] == [1, 2, 3, 4, 5, 6]
    ckpts = Checkpoints(tmp_path / "md")
    try:
        assert ckpts.steps() == [6]
        meta = ckpts.restore(6, get_model(cfg.model).param_shapes(), None)[2]
    finally:
        ckpts.close()
    assert (meta["loader"]["epoch"], meta["loader"]["index"]) == (2, 0)
    again = run(cfg, "train", tmp_path / "md", progress=False)
    assert "max_steps 6 already reached" in again.message and again.global_step == 6
