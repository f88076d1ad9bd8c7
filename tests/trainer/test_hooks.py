"""The Trainer's hooks, as a notebook uses them: user callbacks see every step, checkpoint and
evaluation the run makes, in order, at the steps the config names; the log line carries the
Cerebras words first and the step's rates after them."""

from __future__ import annotations

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


def run_log(md) -> list[str]:
    """The messages of the run's train/run.log (after its timestamp and level)."""
    text = (md / "train" / "run.log").read_text().splitlines()
    return [line.split(": ", 1)[1] for line in text if ": " in line]


def test_log_line_has_cerebras_words_then_rates(tmp_path):
    Trainer(small_config(), RunOptions(max_steps=2, progress=False), tmp_path / "m").train()
    lines = [t for t in run_log(tmp_path / "m") if "global_step = " in t]
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


def test_log_says_where_things_go_and_logs_the_first_step(tmp_path):
    """With log_steps larger than the run, the first and the last step are still logged, and
    the log names the checkpoint, summary and log locations before the first step."""
    md = tmp_path / "m"
    cfg = small_config("runconfig.log_steps=100")
    Trainer(cfg, RunOptions(max_steps=3, progress=False), md).train()
    text = run_log(md)
    steps = [t.split(",")[0] for t in text if t.startswith("global_step = ")]
    assert steps == ["global_step = 1", "global_step = 3"]
    where = next(t for t in text if t.startswith("Checkpoints go to"))
    assert f"{md.absolute()}/model-ckpt-<step> (every 3 steps and at the end)" in where
    assert f"{md.absolute()}/train every 1 steps" in where
    assert any(t.endswith(f"to {md.absolute()}/model-ckpt-3") for t in text)
