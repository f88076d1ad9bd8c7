"""The fault catalogue for a disk-tier run (streaming.disk_path): SIGKILL while the tier writes a
segment in the middle of a step, while a checkpoint stages its segment files, and once they are
staged but not committed. Each moment is exact: the run is paused there
(tests/integration/pause_probe.py) until the test kills it. Afterwards the previous checkpoint
is intact and the same command, run again, resumes from it to the uninterrupted run's losses,
bitwise; what the killed writer left (a staging folder, a torn ``.tmp`` tier file) is gone or
harmless."""

from __future__ import annotations

import os

import pytest

from tests.helpers import SMALL, small_config
from tests.integration.test_faults_kill import committed, poll
from tests.integration.test_faults_kill_writers import writer
from wsjax.train import run

pytestmark = pytest.mark.slow
STEPS = 6  # checkpoints at steps 3 and 6 (tests.helpers.SMALL)

# moment -> (the call the run pauses at, before/after it), at its first call once model-ckpt-3
# is committed: in step 4, or in step 6's checkpoint
MOMENTS = {
    "tier write mid-step": ("wsjax.engine.disk:_write_all", "before"),
    "staging segment files": ("wsjax.checkpoint.segments:_link_or_copy", "after"),
    "staged, not committed": ("wsjax.checkpoint.checkpoints:stage", "after"),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    r = run(small_config(), "train", tmp_path_factory.mktemp("ref") / "md", max_steps=STEPS)
    return dict(r.losses)


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_sigkill_in_a_disk_tier_run_then_again(tmp_path, reference, moment, monkeypatch):
    md, tier, marker = tmp_path / "md", tmp_path / "tier", tmp_path / "paused"
    target, when = MOMENTS[moment]
    monkeypatch.setenv("PAUSE_ONCE_EXISTS", str(md / "model-ckpt-3"))
    train = ["wsjax.train", "-o", str(md), "--max_steps", str(STEPS), *SMALL]
    proc = writer("tests.integration.pause_probe", str(marker), target, when, "--", *train,
                  "--disk_path", str(tier))  # fmt: skip
    assert poll(proc, marker.exists, timeout=300), proc.communicate()
    proc.kill()
    proc.communicate()
    before = committed(md)
    assert before == [3]  # every moment falls after model-ckpt-3 and before model-ckpt-6
    r = run(small_config(), "train", md, max_steps=STEPS, disk_path=tier, progress=False)
    assert r.losses == [(s, reference[s]) for s in range(4, STEPS + 1)]
    assert committed(md) == [3, 6]
    assert not [n for n in os.listdir(md) if n.startswith(".segments-") or "tmp" in n]
