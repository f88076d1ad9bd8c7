"""The Trainer's hooks, as a notebook uses them: user callbacks see every step, checkpoint and
evaluation the run makes, in order, at the steps the config names; the log line carries the
Cerebras words first and the step's rates after them."""

from __future__ import annotations

import logging

import pytest

from tests.helpers import small_config
from wsjax.trainer import Callback, RunOptions, StepInfo, Trainer


class Recorder(Callback):
    def __init__(self, every: int = 1):
        self.every = every
        self.events: list[tuple] = []

    def on_train_begin(self, trainer, step):
        self.events.append(("begin", step))

    def on_step(self, trainer, info: StepInfo):
        self.events.append(("step", info.step, info.loss, info.last))

    def on_checkpoint(self, trainer, step, path):
        self.events.append(("checkpoint", step, path.name))

    def on_eval(self, trainer, step, scalars):
        self.events.append(("eval", step, scalars["loss"]))

    def on_train_end(self, trainer, result):
        self.events.append(("end", result.global_step))

    def close(self):
        self.events.append(("close",))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One train_and_eval run of 6 steps (checkpoints every 3) with two recorders."""
    md = tmp_path_factory.mktemp("hooks") / "md"
    every_step, every_4 = Recorder(), Recorder(every=4)
    options = RunOptions(mode="train_and_eval", max_steps=6, progress=False)
    trainer = Trainer(small_config(), options, md, callbacks=[every_step, every_4])
    result = trainer.train()
    return result, every_step.events, every_4.events


def test_callbacks_see_each_step_checkpoint_and_eval_in_order(recorded):
    result, events, _ = recorded
    kinds = [e[0] for e in events]
    assert kinds[0] == "begin" and events[0][1] == 0
    assert kinds[-2:] == ["close", "end"]  # closed with the loop; the end after the totals
    steps = [e for e in events if e[0] == "step"]
    assert [e[1] for e in steps] == [1, 2, 3, 4, 5, 6]
    assert [e[2] for e in steps] == [loss for _, loss in result.losses]
    assert [e[3] for e in steps] == [False] * 5 + [True]
    # a checkpoint at 3 and 6, each followed by its evaluation; the built-in hooks (which save)
    # run before the user's, so a callback's on_step sees its step already saved
    order = [(e[0], e[1]) for e in events if e[0] in ("step", "checkpoint", "eval")]
    assert order[order.index(("step", 2)) + 1 : order.index(("step", 3))] == [
        ("checkpoint", 3),
        ("eval", 3),
    ]
    assert order[-3:] == [("checkpoint", 6), ("eval", 6), ("step", 6)]
    assert [e[2] for e in events if e[0] == "eval"] == [ev["loss"] for ev in result.evals]
    assert events[-1] == ("end", 6)


def test_callback_every_n_steps_and_the_last(recorded):
    _, _, events = recorded
    assert [e[1] for e in events if e[0] == "step"] == [4, 6]  # every 4th, and the last


def test_log_line_has_cerebras_words_then_rates(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="wsjax"):
        Trainer(small_config(), RunOptions(max_steps=2, progress=False), tmp_path / "m").train()
    lines = [r.getMessage() for r in caplog.records if "global_step = " in r.getMessage()]
    assert len(lines) == 2 and lines[-1].startswith("global_step = 2, loss = ")
    for word in ("lr = ", "grad_norm = ", " s/step", " tokens/s", "MFU ", "ETA "):
        assert word in lines[-1], (word, lines[-1])


def test_a_failing_callback_still_closes_every_hook(tmp_path):
    class Boom(Callback):
        def on_step(self, trainer, info):
            raise RuntimeError("boom")

    rec = Recorder()
    trainer = Trainer(
        small_config(), RunOptions(max_steps=3), tmp_path / "m", callbacks=[rec, Boom()]
    )
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert rec.events[-1] == ("close",)
    # the model_dir is unlocked again: a second Trainer can take it
    Trainer(small_config(), RunOptions(max_steps=1), tmp_path / "m").train()
