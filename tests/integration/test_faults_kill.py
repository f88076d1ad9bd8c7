"""The fault catalogue, processes: preemption (SIGTERM / SIGINT), a second signal, and SIGKILL
at several moments of a checkpoint write and of pruning.

Each moment is found by polling the model_dir (or the run log) while the run goes on, never by
sleeping for a guessed time. After the fault, every committed checkpoint restores (its digest
checked) and a rerun resumes to the losses of an uninterrupted run, bitwise.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, SMALL, small_config
from wsjax.errors import EXIT_PREEMPTED
from wsjax.interop.load import load_start
from wsjax.models import get_model
from wsjax.train import run

pytestmark = pytest.mark.slow
STEPS = 12


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    md = tmp_path_factory.mktemp("ref") / "md"
    r = run(small_config(), "train", md, max_steps=STEPS)
    return {"losses": dict(r.losses)}


def start(md: Path, *extra: str) -> subprocess.Popen:
    """The run as a child process. It loads the reference's executables from the suite's
    compile dir (tests/conftest.py) instead of compiling them again, seconds a run; what it
    computes is the same executables' output, and the faults come after the compile."""
    argv = ["-o", str(md), "--max_steps", str(STEPS), *SMALL, *extra]
    return subprocess.Popen(
        [sys.executable, "-m", "wsjax.train", *argv],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def poll(proc: subprocess.Popen, seen, timeout: float = 300, interval: float = 0.0) -> bool:
    """True as soon as ``seen()`` holds; False if the run ended first. Between looks: a yield
    (``interval`` 0: the moments that last milliseconds), or a sleep of ``interval`` seconds,
    which leaves the CPU to the run (on 2 cores a spinning poll takes one from it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if seen():
            return True
        if interval:
            time.sleep(interval)
        else:
            os.sched_yield()
    return False


LOG_POLL = 0.002  # s: a logged line stays; the run goes on for far longer after each one


def logged(md: Path, text: str):
    log = md / "train" / "run.log"
    return lambda: log.is_file() and text in log.read_text()


def committed(md: Path) -> list[int]:
    names = os.listdir(md) if md.is_dir() else []
    return sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"model-ckpt-(\d+)", n)))


def resumes_exactly(md: Path, reference: dict) -> None:
    """Every committed checkpoint restores; the rerun's losses equal the uninterrupted run's."""
    cfg = small_config()
    model = get_model(cfg.model)
    for step in committed(md):
        assert load_start(md / f"model-ckpt-{step}", model, None, weights_only=True).params
    done = max(committed(md), default=0)
    r = run(cfg, "train", md, max_steps=STEPS, progress=False)
    losses = reference["losses"]
    assert r.losses == [(s, losses[s]) for s in range(done + 1, STEPS + 1)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_preemption_saves_the_step_and_exits_5(tmp_path, reference, sig):
    md = tmp_path / "md"
    # no periodic checkpoint before 12
    proc = start(md, "--save_checkpoints_steps", "100")
    assert poll(proc, logged(md, "global_step = 3,"), interval=LOG_POLL), proc.communicate()[1]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    step = int(re.search(rf"preempted by {sig.name}: finished global step (\d+)", lines[0])[1])
    assert committed(md) == [step] and 3 <= step < STEPS
    resumes_exactly(md, reference)


def test_second_signal_stops_at_once(tmp_path, reference):
    md = tmp_path / "md"
    proc = start(md, "--save_checkpoints_steps", "2")
    assert poll(proc, logged(md, "global_step = 3,"), interval=LOG_POLL)
    proc.send_signal(signal.SIGTERM)
    assert poll(proc, logged(md, "received SIGTERM"), interval=LOG_POLL)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, err  # at once: no save, no cleanup; one line
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "second signal: stopped at once" in lines[0], err
    resumes_exactly(md, reference)


def _writing(md: Path):
    return lambda: md.is_dir() and any("orbax-checkpoint-tmp" in n for n in os.listdir(md))


def _pruning(md: Path):
    return lambda: md.is_dir() and any(n.startswith(".trash-") for n in os.listdir(md))


def _after_commit(md: Path):
    return lambda: 3 in committed(md)


MOMENTS = {"checkpoint write": _writing, "just committed": _after_commit, "pruning": _pruning}


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_sigkill_at_a_checkpoint_moment_loses_nothing(tmp_path, reference, moment):
    md = tmp_path / "md"
    # a checkpoint and a prune at every step: many chances to meet the moment
    argv = ["--save_checkpoints_steps", "1", "--keep_checkpoint_max", "1"]
    proc = start(md, *argv)
    hit = poll(proc, MOMENTS[moment](md))
    proc.kill()
    proc.communicate()
    assert hit, f"the run ended before the moment '{moment}' was seen"
    resumes_exactly(md, reference)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_init_or_compile_is_one_line_exit_5(tmp_path, reference, sig):
    """Before the first step (weights, compile) there is nothing of this run to save: one line,
    exit 5, never a segfault or a bare 143; the run then starts afresh exactly."""
    md = tmp_path / "md"
    proc = start(md)
    ran = lambda: (md / "train" / "run.log").is_file()  # noqa: E731
    assert poll(proc, ran, interval=LOG_POLL), proc.communicate()[1]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(r"stopped before any step|preempted by", lines[0]), lines[0]
    resumes_exactly(md, reference)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_the_final_eval_stops_it_at_the_next_batch(tmp_path, reference, sig):
    """train_and_eval's last checkpoint (step 12) is followed by a 400-batch evaluation; a
    signal while it runs ends the run at the next batch, exit 5 and one line, instead of being
    held until the whole pass is done; model-ckpt-12 is kept and restores."""
    md = tmp_path / "md"
    argv = ["-m", "train_and_eval", "--save_checkpoints_steps", "100", "runconfig.eval_steps=400"]
    proc = start(md, *argv)
    evaluating = logged(md, "Evaluating global step 12: 400 batches")
    assert poll(proc, evaluating, interval=LOG_POLL), proc.communicate()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    found = re.search(
        rf"preempted by {sig.name}: finished global step 12 and saved \S+model-ckpt-12; the "
        r"evaluation at global step 12 stopped after (\d+) of 400 batches",
        lines[0],
    )
    assert found and int(found[1]) < 400, lines[0]
    assert committed(md) == [12]
    resumes_exactly(md, reference)
