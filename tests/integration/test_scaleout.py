"""Several processes on this CPU (issue 12): ``python -m wsjax.launch`` starts them, gloo carries
the collectives, each process's host holds half of every leaf.

The yardstick of a P-process run is the one-process run on the same total device count (1 x 2
for 2 x 1, 1 x 4 for 2 x 2). Every device computes the same per-device partial gradients and
sums, and each process applies the same elementwise optimizer update to its slice. What differs
is the grouping of the sums over devices: one process all-reduces each micro-batch's gradient
and adds it to a replicated accumulator; several reduce-scatter it into accumulators cut as the
host store is, and XLA may fold the accumulator into the reduction (in fp32, 8 of 32,768 wte
entries moved by one ulp after 3 steps). So the runs are compared in float64 (as the engine's
exactness tests do) at rtol 1e-12: regrouping a handful of terms moves a float64 sum by a few
ulps (~1e-15 relative) and three steps of Adam amplify that far less than the 1e-12 margin,
whereas a real fault (a wrong slice, a missed row, a shard counted twice) is of the order of the
update itself.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock

from tests.helpers import REPO, SMALL, child_env

PY = sys.executable
PROBE = REPO / "tests" / "integration" / "scaleout_probe.py"


def _env(devices: int) -> dict:
    env = child_env()
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def launch(nproc: int, per_process: int, *args: str, module: str = "wsjax.train", **kw):
    """``python -m wsjax.launch`` (a running Popen with ``popen=True``)."""
    cmd = [PY, "-m", "wsjax.launch", "--nproc", str(nproc)]
    cmd += ["--devices_per_process", str(per_process), "--module", module, "--", *args]
    env = child_env()
    env.pop("XLA_FLAGS", None)  # the launcher sets the device count
    if kw.pop("popen", False):
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def alone(devices: int, *cmd: str) -> subprocess.CompletedProcess:
    """One process on ``devices`` CPU devices."""
    return subprocess.run(
        [PY, *cmd], cwd=REPO, env=_env(devices), capture_output=True, text=True, timeout=300
    )


def _ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _restored(md: Path, step: int) -> dict:
    from wsjax.checkpoint import Checkpoints
    from wsjax.config import load_config
    from wsjax.engine.store import opt_state_shapes
    from wsjax.models import get_model
    from wsjax.optim import make_optimizer

    config = load_config(REPO / "configs" / "params_gptj_tiny.yaml", SMALL)
    model = get_model(config.model)
    opt_shapes = opt_state_shapes(
        make_optimizer(config.optimizer), model.param_shapes(), model.num_layers
    )
    params, opt, _ = Checkpoints(md, read_only=True).restore(step, model.param_shapes(), opt_shapes)
    return {"params": params, "opt_state": opt}


def _assert_same(a, b, *, exact: bool) -> None:
    """Every array of two checkpoints' trees: bitwise (``exact``), or to fp32 float noise.

    Float noise: the two runs group the gradient sums differently (all-reduce in one process,
    reduce-scatter in two), so gradients differ by a few ulps (relative delta ~1e-6 at most).
    Adam turns that into an update error of at most ~2 * delta * lr, and lr <= 6e-4 in the
    first 4 steps of the tiny config's warm-up: ~1e-9 absolute. atol 1e-7 and rtol 1e-5 leave
    a wide margin; a real fault (a lost optimizer state, a misplaced slice) moves weights by
    about lr (>1e-5) or by their own size."""
    import jax

    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        if exact:
            np.testing.assert_array_equal(x, y, err_msg=str(path))
        else:
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7, err_msg=str(path))


@pytest.mark.parametrize("per_process", [1, 2], ids=["2x1", "2x2"])
def test_two_processes_train_as_one(tmp_path, per_process):
    """Losses, gradient norms and weights after 3 steps equal the one-process run's to float64
    rounding; each process's live arrays (master, optimizer state, stream copy) are half of
    one's."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    _ok(alone(2 * per_process, str(PROBE), str(one), "3", "f64"))
    _ok(launch(2, per_process, str(two), "3", "f64", module="tests.integration.scaleout_probe"))
    rtol = 1e-12
    ref = json.loads((one / "process0.json").read_text())
    for index in (0, 1):
        got = json.loads((two / f"process{index}.json").read_text())
        np.testing.assert_allclose(got["losses"], ref["losses"], rtol=rtol, atol=0)
        np.testing.assert_allclose(got["grad_norms"], ref["grad_norms"], rtol=rtol, atol=0)
        # every leaf of the tiny model has an axis divisible by 2 x per_process: exactly half,
        # plus at most a few scalars (step counts) held by both
        assert abs(got["host_bytes"] / ref["host_bytes"] - 0.5) < 0.01, (got, ref)
    want, have = np.load(one / "params.npz"), np.load(two / "params.npz")
    assert sorted(want.files) == sorted(have.files)
    for name in want.files:
        np.testing.assert_allclose(have[name], want[name], rtol=rtol, atol=0, err_msg=name)


def _train(md: Path, steps: int, *extra: str) -> list[str]:
    return ["-o", str(md), "--max_steps", str(steps), *SMALL, *extra]


SHARED_STEPS = 6  # the shared run's length: past the step the kill test's rerun stops at


@pytest.fixture(scope="session")
def two_process_run(tmp_path_factory) -> tuple[Path, str]:
    """One uninterrupted 2-process run that saves every step, the yardstick of the checkpoint
    move and of the kill test (saving changes no number: the kill test's rerun, which saves
    every 2 steps, equals it bitwise); with its launcher's output.

    It runs once per session: under pytest-xdist, the first worker to ask runs it in the folder
    all workers of this session share, under a file lock the others wait on (xdist's own recipe;
    its ``loadgroup`` does not group on pytest 9.2, pytest-xdist issue 1386)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this session's, shared by its workers
    md, log = root / "two_process_run", root / "two_process_run.log"
    with FileLock(root / "two_process_run.lock"):
        if not log.is_file():
            extra = ("runconfig.save_checkpoints_steps=1", "runconfig.keep_checkpoint_max=0")
            proc = launch(2, 1, *_train(md, SHARED_STEPS, *extra))
            _ok(proc)
            log.write_text(proc.stdout + proc.stderr)
    return md, log.read_text()


def _step_of(ckpt: Path) -> int | None:
    suffix = ckpt.name.split("-")[-1]
    return int(suffix) if suffix.isdigit() else None


def _as_of(src: Path, dst: Path, step: int) -> None:
    """``dst``: run ``src`` as it stood after ``step`` (its newer checkpoints removed)."""
    shutil.copytree(src, dst)
    for ckpt in dst.glob("model-ckpt-*"):
        if (_step_of(ckpt) or 0) > step:
            shutil.rmtree(ckpt)


def test_checkpoints_move_between_process_counts(tmp_path, two_process_run):
    """From step 2 of a 2-process run, one process reaches step 4 with the same weights and
    optimizer state (2 -> 1); from that run's step 3, two processes do too (1 -> 2). The HF
    export reads the 2-process checkpoint."""
    a, output = two_process_run
    b, c = tmp_path / "b", tmp_path / "c"
    steps = sorted(_step_of(p) for p in a.glob("model-ckpt-*"))
    assert steps == list(range(1, SHARED_STEPS + 1)), steps
    # process 0 alone logs progress and writes the run's files
    assert output.count(f"global_step = {SHARED_STEPS},") == 1
    assert len(list((a / "train").glob("events.out.tfevents.*"))) == 1
    assert (a / "plan.json").is_file() and (a / "performance" / "performance.json").is_file()
    _as_of(a, b, 2)
    _ok(alone(2, "-m", "wsjax.train", *_train(b, 4, "runconfig.save_checkpoints_steps=1")))
    _assert_same(_restored(b, 4), _restored(a, 4), exact=False)
    _as_of(b, c, 3)
    proc = launch(2, 1, *_train(c, 4, "runconfig.save_checkpoints_steps=1"))
    _ok(proc)
    assert "model-ckpt-3: resuming" in proc.stdout + proc.stderr
    _assert_same(_restored(c, 4), _restored(a, 4), exact=False)

    out = tmp_path / "hf"
    export = subprocess.run(
        [PY, "scripts/convert_hf.py", "--from_orbax", str(a), "--to_hf", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    _ok(export)
    from safetensors.numpy import load_file

    tensors = load_file(next(out.glob("*.safetensors")))
    wte = _restored(a, SHARED_STEPS)["params"]["embed"]["wte"]
    assert any(t.shape == wte.shape and np.array_equal(t, wte) for t in tensors.values())


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def test_a_killed_process_stops_the_run_and_the_rerun_resumes_exactly(tmp_path, two_process_run):
    """SIGKILL of process 1 mid-run: the launcher exits non-zero within its bound (the grace
    period of the survivors plus JAX's detection of the dead peer); the same command again
    resumes from the newest checkpoint, and its next checkpoint equals (bitwise) the one of an
    uninterrupted 2-process run."""
    md = tmp_path / "md"
    args = _train(md, 400, "runconfig.save_checkpoints_steps=2", "runconfig.log_steps=50")
    proc = launch(2, 1, *args, popen=True)
    deadline = time.monotonic() + 240
    committed = lambda: [p for p in md.glob("model-ckpt-*") if _step_of(p) is not None]  # noqa: E731
    while not committed() and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.2)
    children = _children(proc.pid)
    assert len(children) == 2, children
    os.kill(children[1], signal.SIGKILL)
    t0 = time.monotonic()
    try:
        rc = proc.wait(timeout=120)
    finally:
        proc.kill()
        proc.stdout.close()
    assert rc != 0
    assert time.monotonic() - t0 < 120

    from wsjax.checkpoint import Checkpoints

    newest = Checkpoints(md, read_only=True).steps()[-1]
    target = newest + 1
    proc = launch(2, 1, *_train(md, target, "runconfig.save_checkpoints_steps=2"))
    _ok(proc)
    assert f"model-ckpt-{newest}: resuming" in proc.stdout + proc.stderr
    ref, _ = two_process_run
    if target > SHARED_STEPS:  # the kill came late: an uninterrupted run to this step
        ref = tmp_path / "ref"
        _ok(launch(2, 1, *_train(ref, target)))
    _assert_same(_restored(md, target), _restored(ref, target), exact=True)


def test_validate_only_plans_a_two_process_run_from_one(tmp_path):
    """``--validate_only --num_processes 2`` on one process: the weights, optimizer state and
    gradients each host holds are half the one-process plan's (exactly: every leaf of the
    default model has an even axis); nothing joins a coordinator."""
    plans = {}
    for n in (1, 2):
        md = tmp_path / f"p{n}"
        extra = ["--num_processes", "2"] if n == 2 else []
        proc = alone(1, "-m", "wsjax.train", "--validate_only", "-o", str(md), *extra)
        _ok(proc)
        plans[n] = json.loads((md / "plan.json").read_text())["host"]
    for term in ("master_fp32", "stream_copy", "optimizer_state", "gradients"):
        assert plans[2][term] == -(-plans[1][term] // 2), term


def test_sigterm_saves_on_every_process_at_the_same_step(tmp_path, two_process_run):
    """SIGTERM to one of the two processes mid-run: the two agree on the step to save at (the
    other never got a signal), save one checkpoint together and exit 5, and so does the
    launcher; the checkpoint restores."""
    md = tmp_path / "md"
    args = _train(md, 400, "runconfig.save_checkpoints_steps=1000", "runconfig.log_steps=1")
    proc = launch(2, 1, *args, popen=True)
    deadline = time.monotonic() + 240
    seen = ""
    while "global_step = 3," not in seen and time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, "the run ended before step 3"
        seen += line
    children = _children(proc.pid)
    assert len(children) == 2, children
    os.kill(children[1], signal.SIGTERM)
    try:
        rest, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 5, (seen + rest)[-3000:]
    from wsjax.checkpoint import Checkpoints

    (step,) = Checkpoints(md, read_only=True).steps()  # one checkpoint: the preemption's
    assert 3 <= step < 400
    restored = _restored(md, step)
    assert restored["params"]["embed"]["wte"].shape[0] == 512
