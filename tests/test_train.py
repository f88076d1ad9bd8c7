"""``python -m wsjax.train`` as a user runs it: help, one-line errors, kill -9 and resume,
and the compile directory making the second run's compile at least 5x faster."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.helpers import REPO, SMALL, small_config
from wsjax.train import run

PY = sys.executable


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, "-m", "wsjax.train", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def _committed(md) -> list[int]:
    """Steps of committed checkpoints (orbax renames its temporary folder on commit)."""
    names = [p.name for p in md.glob("model-ckpt-*")] if md.is_dir() else []
    return [int(m.group(1)) for n in names if (m := re.fullmatch(r"model-ckpt-(\d+)", n))]


def _one_line_error(p: subprocess.CompletedProcess, pattern: str) -> None:
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    assert pattern in lines[0], lines[0]


def test_help_documents_every_flag():
    p = cli("--help")
    assert p.returncode == 0
    for flag in (
        "--params",
        "--mode",
        "--model_dir",
        "--max_steps",
        "--eval_steps",
        "--checkpoint_path",
        "--is_pretrained_checkpoint",
        "--validate_only",
        "--compile_only",
        "--steps",
        "--save_checkpoints_steps",
        "--save_summary_steps",
        "--keep_checkpoint_max",
        "--allow_pickle",
        "--cs_ip",
        "--device",
        "section.key=value",
    ):
        assert flag in p.stdout


def test_bad_command_lines_exit_2_with_one_line(tmp_path):
    _one_line_error(cli("-p", str(tmp_path / "nope.yaml")), "cannot read params file")
    _one_line_error(cli("-m", "predict"), "invalid choice: 'predict'")
    _one_line_error(cli("model.num_hidden_layerz=2", "--validate_only"), "num_hidden_layerz")
    (tmp_path / "f").write_text("")
    _one_line_error(cli("-o", str(tmp_path / "f" / "md"), "--validate_only"), "cannot create")


@pytest.mark.slow
def test_kill_and_rerun_resumes_to_the_uninterrupted_loss(tmp_path, own_compile_dir):
    steps = 12
    ref = run(small_config(), "train", tmp_path / "ref", max_steps=steps, progress=False)
    md = tmp_path / "md"
    args = ["-o", str(md), "--max_steps", str(steps), *SMALL, "runconfig.save_checkpoints_steps=2"]
    proc = subprocess.Popen(
        [PY, "-m", "wsjax.train", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while not _committed(md) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first_log = json.loads(next(md.glob("compile_*/compile_log.json")).read_text())
    assert {e["extra"]["source"] for e in first_log["executables"]} == {"compiled"}
    done = _committed(md)
    assert done and max(done) < steps, "killed too late to test resuming"

    p = cli(*args)
    assert p.returncode == 0, p.stderr
    assert "resuming from it" in p.stdout and "Training finished with" in p.stdout
    final = float(p.stdout.split("Loss for final step: ")[1].split()[0].rstrip("."))
    assert final == pytest.approx(ref.final_loss, abs=1e-5)  # printed with 5 decimals
    from wsjax.checkpoint import Checkpoints
    from wsjax.models import get_model

    shapes = get_model(small_config().model).param_shapes()
    got = Checkpoints(md, read_only=True).restore(steps, shapes, None)[0]
    want = Checkpoints(ref.model_dir, read_only=True).restore(steps, shapes, None)[0]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)  # the resumed weights are bitwise the same
    # the rerun loads every executable from compile_<checksum>/ (no tracing, no XLA compile):
    # the compile log it rewrote says where each came from (a behaviour, not a timing)
    rerun_log = json.loads(next(md.glob("compile_*/compile_log.json")).read_text())
    sources = [e["extra"]["source"] for e in rerun_log["executables"]]
    assert sources and set(sources) == {"disk"}, sources

    again = cli(*args)
    assert again.returncode == 0 and "already reached" in again.stdout
