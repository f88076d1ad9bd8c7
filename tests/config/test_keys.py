"""The Cerebras keys that once sat in the ignored table and now act (wsjax.config.keys):
save_initial_checkpoint, num_epochs, n_parallel_reads, skip_steps, read from both layouts.
What they do in a run is tested with the trainer and the loader (tests/trainer/test_trainer.py,
tests/trainer/test_steps.py, tests/data/test_loader.py)."""

from __future__ import annotations

import pytest
import yaml

from tests.config.base import build, raises
from tests.config.test_cerebras_semantics import CORPUS
from wsjax.config import config_from_dict, load_config
from wsjax.config.keys import IGNORED_KEYS


def test_none_of_them_is_ignored_any_more():
    every = set().union(*IGNORED_KEYS.values())
    assert not every & {"save_initial_checkpoint", "num_epochs", "n_parallel_reads", "skip_steps"}


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("r1_pt_mistral_7B.yaml", True),  # runconfig.save_initial_checkpoint: True
        ("r2_pt_mistral_7B.yaml", True),  # trainer.init.checkpoint.save_initial_checkpoint
        ("r1_pt_llama3_8b.yaml", False),
        ("r2_pt_llama3_8b.yaml", False),
    ],
)
def test_save_initial_checkpoint_is_read_from_both_layouts(name, want):
    assert load_config(CORPUS / name).runconfig.save_initial_checkpoint is want
    assert build().runconfig.save_initial_checkpoint is False  # Cerebras' default


def test_num_epochs_leaves_max_steps_to_the_data_unless_given():
    alone = build(runconfig={"num_epochs": 3}).runconfig
    assert (alone.num_epochs, alone.max_steps) == (3, None)  # set from the data at train time
    both = build(runconfig={"num_epochs": 3, "max_steps": 40}).runconfig
    assert (both.num_epochs, both.max_steps) == (3, 40)  # the smaller of the two, later
    assert build().runconfig.max_steps == 1000 and build().runconfig.num_epochs is None
    raises(r"runconfig.num_epochs=0 is invalid; must be >= 1", runconfig={"num_epochs": 0})
    raises(r"runconfig.max_steps=None is invalid; give the steps to train, or runconfig.num_e",
           runconfig={"max_steps": None})  # fmt: skip


def test_num_epochs_in_the_trainer_layout():
    """A 2.x file whose loop gives num_epochs in place of max_steps (Cerebras' TrainingLoop)."""
    d = yaml.safe_load((CORPUS / "r2_pt_mistral_7B.yaml").read_text())
    d["trainer"]["init"]["loop"] = {"num_epochs": 2, "eval_steps": 233}
    rc = config_from_dict(d, source="t.yaml").runconfig
    assert (rc.num_epochs, rc.max_steps, rc.eval_steps) == (2, None, 233)


def test_n_parallel_reads_is_the_loaders_reader_threads():
    cfg = build(train_input={"n_parallel_reads": 3}, eval_input={"n_parallel_reads": 2})
    assert (cfg.train_input.num_workers, cfg.eval_input.num_workers) == (3, 2)
    assert build(overrides=["train_input.n_parallel_reads=5"]).train_input.num_workers == 5
    raises(r"train_input.(num_workers|n_parallel_reads) given twice",
           train_input={"n_parallel_reads": 3, "num_workers": 2})  # fmt: skip


def test_skip_steps_in_train_input_or_runconfig():
    assert build(train_input={"skip_steps": 7}).train_input.skip_steps == 7
    assert build(runconfig={"skip_steps": 7}).train_input.skip_steps == 7  # moved there
    assert build(overrides=["runconfig.skip_steps=4"]).train_input.skip_steps == 4
    # the same move for the other runconfig alias given as an override
    assert build(overrides=["runconfig.grad_accum_steps=2"]).optimizer.grad_accum_steps == 2
    assert build().train_input.skip_steps == 0
    assert build(eval_input={"skip_steps": 0}).eval_input.skip_steps == 0
    raises(r"eval_input.skip_steps=2 is invalid; only train_input skips batches",
           eval_input={"skip_steps": 2})  # fmt: skip
    raises(r"train_input.skip_steps=-1 is invalid; must be >= 0", train_input={"skip_steps": -1})
    # an eval-only file: nothing to skip, so the key is accepted and named as ignored
    assert build(train_input=None, runconfig={"skip_steps": 3}).train_input is None
