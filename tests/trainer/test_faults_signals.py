"""The fault catalogue, signals during an evaluation pass (in-process, through the CLI entry).

SIGTERM / SIGINT arrive while the k-th batch of a pass is computed (the engine's eval_step sends
it to this process, so the moment is exact, not guessed): the pass stops before the next batch
with one line and exit 5, in ``eval``, ``eval_all`` and train_and_eval (its periodic and its
final evaluation, which follow a checkpoint that is then kept). Afterwards the model_dir still
evaluates, resumes and exports. Real signals from outside, in a subprocess, are in
tests/integration/test_faults_kill.py.
"""

from __future__ import annotations

import logging
import os
import re
import signal

import pytest

from tests.helpers import SMALL
from tests.trainer.faults_base import cli, copy_md, one_line, saved_run, snapshot
from wsjax.checkpoint import Checkpoints
from wsjax.engine import StreamingEngine
from wsjax.errors import EXIT_OK, EXIT_PREEMPTED
from wsjax.interop.export import export_run
from wsjax.train import run
from wsjax.trainer.faults import PreemptionGuard

EVAL_BATCHES = 20
LONG_EVAL = f"runconfig.eval_steps={EVAL_BATCHES}"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """model_dir "md": checkpoints at steps 2 and 4 of the small config."""
    return saved_run(tmp_path_factory.mktemp("signals"))


@pytest.fixture
def signal_at(monkeypatch):
    """``signal_at(sig, k)``: the k-th eval batch (1-based) sends ``sig`` to this process while
    it is computed; returns the list of batches computed so far (a one-element counter)."""

    def arm(sig: int, k: int) -> list[int]:
        calls = [0]
        real = StreamingEngine.eval_step

        def eval_step(self, batch):
            calls[0] += 1
            if calls[0] == k:
                os.kill(os.getpid(), sig)  # handled by the pass's guard: recorded, not fatal
            return real(self, batch)

        monkeypatch.setattr(StreamingEngine, "eval_step", eval_step)
        return calls

    return arm


SIGNALS = [signal.SIGTERM, signal.SIGINT]


@pytest.mark.parametrize("sig", SIGNALS, ids=["SIGTERM", "SIGINT"])
def test_signal_during_eval_stops_at_the_next_batch(saved, tmp_path, capsys, signal_at, sig):
    md = copy_md(saved, tmp_path / "md")
    before = snapshot(md)
    calls = signal_at(sig, 3)
    rc, err = cli(capsys, "-o", md, *SMALL, LONG_EVAL, "-m", "eval")
    pattern = (
        rf"preempted by {sig.name}: the evaluation at global step 4 stopped after 3 of "
        rf"{EVAL_BATCHES} batches; nothing of it was written"
    )
    one_line(rc, err, EXIT_PREEMPTED, pattern)
    assert calls == [3] and snapshot(md) == before
    assert signal.getsignal(signal.SIGTERM) is not None  # the handlers are given back
    r = run(saved.cfg, "eval", md)  # the model_dir still evaluates
    assert [e["step"] for e in r.evals] == [4]


def test_signal_during_eval_all_stops_at_the_next_batch(saved, tmp_path, capsys, signal_at):
    md = copy_md(saved, tmp_path / "md")
    calls = signal_at(signal.SIGTERM, 1)
    rc, err = cli(capsys, "-o", md, *SMALL, LONG_EVAL, "-m", "eval_all")
    pattern = rf"the evaluation at global step 2 stopped after 1 of {EVAL_BATCHES} batches"
    one_line(rc, err, EXIT_PREEMPTED, pattern)
    assert calls == [1]  # model-ckpt-4 was not evaluated either


@pytest.mark.parametrize(
    "max_steps,which", [(6, "final"), (8, "periodic")], ids=["final eval", "periodic eval"]
)
def test_signal_during_train_and_eval_keeps_the_checkpoint(
    saved, tmp_path, capsys, signal_at, max_steps, which
):
    """From step 4, saving every 2 steps: the evaluation after model-ckpt-6 (the run's last
    one for max_steps 6, a periodic one for 8) gets SIGTERM at its 2nd batch. The run stops
    there with exit 5 (not 0 after the whole pass), model-ckpt-6 is committed, and the run then
    resumes from it and exports."""
    md = copy_md(saved, tmp_path / "md")
    calls = signal_at(signal.SIGTERM, 2)
    argv = ["-o", md, *SMALL, LONG_EVAL, "-m", "train_and_eval", "--max_steps", max_steps]
    rc, err = cli(capsys, *argv, "--save_checkpoints_steps", 2)
    line = one_line(
        rc,
        err,
        EXIT_PREEMPTED,
        rf"preempted by SIGTERM: finished global step 6 and saved \S+model-ckpt-6; the "
        rf"evaluation at global step 6 stopped after 2 of {EVAL_BATCHES} batches",
    )
    assert which in ("final", "periodic") and "rerun the same command" in line
    assert calls == [2] and Checkpoints(md, read_only=True).steps()[-1] == 6
    r = run(saved.cfg, "train", md, max_steps=7, progress=False)  # resumes from step 6
    assert [s for s, _ in r.losses] == [7]
    out = export_run(md, tmp_path / "hf")
    assert (out / "config.json").is_file() and not list(tmp_path.glob(".hf.partial-*"))


def test_an_uninterrupted_train_and_eval_still_ends_0(saved, tmp_path, capsys):
    """The yardstick of the cases above: the same command without a signal exits 0 and
    evaluates every batch of the pass."""
    md = copy_md(saved, tmp_path / "md")
    argv = ["-o", md, *SMALL, "runconfig.eval_steps=3", "-m", "train_and_eval"]
    rc, err = cli(capsys, *argv, "--max_steps", 6, "--save_checkpoints_steps", 2)
    assert rc == EXIT_OK, err
    log = (md / "train" / "run.log").read_text()
    assert re.search(r"Eval at global step 6 \(3 batches\)", log)


class _SignalOnFlush:
    """A log stream that sends SIGTERM to this process inside its first flush, and fails if it is
    entered again while writing or flushing (what a BufferedWriter refuses with 'reentrant
    call')."""

    def __init__(self):
        self.text, self.busy, self.reentered, self.sent = "", False, False, False

    def _enter(self) -> None:
        self.reentered |= self.busy
        self.busy = True

    def write(self, s: str) -> None:
        self._enter()
        self.text += s
        self.busy = False

    def flush(self) -> None:
        self._enter()
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the Python handler runs at a bytecode boundary in here
                pass
        self.busy = False


def test_a_signal_inside_a_log_flush_is_noted_without_reentering_it():
    """The guard's handler may run while the main thread is inside a log handler's flush; it must
    not log from there (CI saw 'reentrant call inside BufferedWriter' on run.log). The signal is
    recorded at once and its line is written once, outside the flush."""
    stream = _SignalOnFlush()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("wsjax")
    logger.addHandler(handler)
    try:
        with PreemptionGuard() as guard:
            logging.getLogger("wsjax.train").warning("a line whose flush is interrupted")
            assert guard.signal == signal.SIGTERM
    finally:
        logger.removeHandler(handler)
    assert not stream.reentered
    assert stream.text.count("received SIGTERM: finishing this step") == 1, stream.text
