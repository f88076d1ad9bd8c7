"""The disk tier with two processes (``wsjax.launch --nproc 2``, 1 CPU device each): each process
keeps its slices of the master weights and optimizer state in its own folder,
``<disk_path>/process-<index>``, and the run is bitwise the two-process run without the tier
(the same sums in the same order: the tier only moves bytes). Its checkpoints are segment
files too, each process linking its own under ``segments/process-<index>``: read back whole
(slices joined) they equal the shared run's checkpoint, a two-process rerun resumes from its own
slices to the uninterrupted run, and a one-process disk-tier checkpoint continues on two
processes.

Yardstick: the session's shared uninterrupted two-process run (tests/integration/test_scaleout.py),
bitwise for two processes against two, to fp32 float noise across process counts."""

from __future__ import annotations

import json

import jax
import pytest

from tests.integration.test_scaleout import (
    _as_of,
    _assert_same,
    _ok,
    _restored,
    _train,
    alone,
    launch,
    two_process_run,  # noqa: F401 (the shared run, a session fixture)
)
from wsjax.engine.disk import MANIFEST

pytestmark = pytest.mark.slow


def test_two_processes_each_keep_their_slices_in_their_own_folder(tmp_path, two_process_run):  # noqa: F811
    shared, _ = two_process_run
    md, tier = tmp_path / "md", tmp_path / "tier"
    every2 = ("runconfig.save_checkpoints_steps=2", "--disk_path")
    _ok(launch(2, 1, *_train(md, 4, *every2, str(tier))))
    _assert_same(_restored(md, 4), _restored(shared, 4), exact=True)  # slices joined
    for index in (0, 1):  # each process's own segment files, linked from its own folder
        part = md / "model-ckpt-4" / "segments" / f"process-{index}"
        assert all(f.stat().st_nlink == 2 for f in part.glob("*.bin")), sorted(part.iterdir())
    sizes = []
    for index in (0, 1):
        manifest = json.loads((tier / f"process-{index}" / MANIFEST).read_text())
        assert manifest["owner"].endswith(f", process {index}"), manifest["owner"]
        sizes.append(sum(s["bytes"] for s in manifest["segments"].values()))
    whole = _restored(md, 4)
    whole_bytes = sum(a.nbytes for a in jax.tree.leaves(whole))
    for size in sizes:  # half each, plus alignment padding and the scalars both hold
        assert 0.5 <= size / whole_bytes < 0.52, (size, whole_bytes)

    resumed = tmp_path / "resumed"
    _as_of(md, resumed, 2)
    proc = launch(2, 1, *_train(resumed, 4, *every2, str(tmp_path / "tier2")))
    _ok(proc)
    assert "model-ckpt-2: resuming" in proc.stdout + proc.stderr
    _assert_same(_restored(resumed, 4), _restored(shared, 4), exact=True)


def test_a_one_process_tier_checkpoint_continues_on_two(tmp_path, two_process_run):  # noqa: F811
    shared, _ = two_process_run
    md = tmp_path / "md"
    one = _train(md, 2, "--disk_path", str(tmp_path / "tier1"))
    _ok(alone(2, "-m", "wsjax.train", *one))
    assert (md / "model-ckpt-2" / "segments").is_dir()  # segment files, read lazily
    proc = launch(2, 1, *_train(md, 4, "--disk_path", str(tmp_path / "tier2")))
    _ok(proc)
    _assert_same(_restored(md, 4), _restored(shared, 4), exact=False)
