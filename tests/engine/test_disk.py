"""The disk tier's files (wsjax.engine.disk): the layout round trip, the folder checks (one line,
exit 2; too small: exit 3 before anything is written), a full disk (a real write failure under
RLIMIT_FSIZE), and SIGKILL in the middle of writes (every file is the old state or the new one).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections import namedtuple

import jax
import numpy as np
import pytest

from tests.helpers import REPO
from wsjax.engine import disk
from wsjax.engine.disk import LOCK, MANIFEST, DiskTier, DiskTierError, Layout, file_name
from wsjax.errors import EXIT_NOT_FIT, EXIT_USER, PlanError


def state(seed: int, n: int = 1000):
    """A (master, opt_state)-like tree with odd sizes, three dtypes and a scalar."""
    rng = np.random.default_rng(seed)
    master = {"w": rng.standard_normal((7, n // 7)).astype(np.float32),
              "b": rng.standard_normal(13).astype(np.float32)}  # fmt: skip
    opt = (np.int32(seed), {"mu": rng.standard_normal(5), "nu": rng.standard_normal((3, 3))})
    return master, opt


def layouts(names=("embed", "block/0", "head"), n: int = 1000) -> dict:
    return {name: Layout.of(state(0, n)) for name in names}


def same(a, b) -> None:
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_round_trip_bitwise_and_aligned(tmp_path):
    """What is written reads back bitwise, every leaf 64-byte aligned in the file; the manifest
    names each file's leaves."""
    tier = DiskTier.open(tmp_path / "t", "run a", layouts())
    trees = {name: state(i) for i, name in enumerate(tier.names)}
    for name, tree in trees.items():
        tier.write(name, tree)
    tier.flush()
    for name, tree in trees.items():
        same(tier.take(name), tree)
        same(tier.load(name), tree)
    lay = tier.layouts["block/0"]
    assert all(off % 64 == 0 for off in lay.offsets)
    assert (tmp_path / "t" / file_name("block/0")).stat().st_size == lay.nbytes
    manifest = json.loads((tmp_path / "t" / MANIFEST).read_text())
    assert manifest["owner"] == "run a" and manifest["segments"]["block/0"]["file"] == "block-0.bin"
    assert manifest["segments"]["head"]["dtypes"] == ["float32", "float32", "int32", "float64",
                                                      "float64"]  # fmt: skip
    tier.close()


def test_a_newer_write_is_read_after_it_lands(tmp_path):
    """A read asked right after a write of the same segment returns the new bytes."""
    tier = DiskTier.open(tmp_path / "t", "run", layouts())
    tier.write("embed", state(1))
    for seed in range(2, 6):
        tier.write("embed", state(seed))
        same(tier.take("embed"), state(seed))
    tier.close()


def folder_error(tmp_path, folder, owner="run b") -> str:
    with pytest.raises(DiskTierError) as e:
        DiskTier.open(folder, owner, layouts())
    assert e.value.exit_code == EXIT_USER
    message = str(e.value)
    assert "\n" not in message and str(folder) in message
    return message


def test_folder_refusals_name_the_path_and_the_fix(tmp_path):
    ours = tmp_path / "ours"
    DiskTier.open(ours, "run a", layouts()).close()
    assert "holds the disk tier of another run (run a)" in folder_error(tmp_path, ours)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert "is not empty (notes.txt ...)" in folder_error(tmp_path, other)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "is a file; give a folder" in folder_error(tmp_path, a_file)
    under_file = a_file / "tier"
    assert "cannot write" in folder_error(tmp_path, under_file)
    assert (other / "notes.txt").read_text() == "mine"  # nothing of theirs touched
    DiskTier.open(ours, "run a", layouts()).close()  # the same run takes its folder back


def test_a_folder_in_use_by_another_process_is_refused(tmp_path):
    folder = tmp_path / "t"
    DiskTier.open(folder, "run", layouts()).close()
    fd = os.open(folder / LOCK, os.O_RDWR)  # another holder: its own open file description
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert "in use by another process" in folder_error(tmp_path, folder, "run")
    finally:
        os.close(fd)


def test_too_small_a_disk_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """PlanError (exit 3) naming the folder and the bytes; the folder gets no file."""
    need = sum(lay.nbytes for lay in layouts().values())
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda p: usage(10 * need, 9 * need, need))
    folder = tmp_path / "t"
    with pytest.raises(PlanError) as e:
        DiskTier.open(folder, "run", layouts())
    assert e.value.exit_code == EXIT_NOT_FIT and str(folder) in str(e.value)
    assert "does not fit: its disk tier needs" in str(e.value)
    assert not folder.exists() or not any(folder.iterdir())


def test_full_disk_is_one_line_and_keeps_the_previous_file(tmp_path):
    """A real write failure (the file-size limit, EFBIG): DiskTierError naming the folder and
    the fix; the segment's previous file is intact and no temporary file is left."""
    tier = DiskTier.open(tmp_path / "t", "run", layouts(n=200_000))
    tier.write("embed", state(1, 200_000))
    tier.flush()
    path = tmp_path / "t" / file_name("embed")
    before = path.read_bytes()
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, old_limit[1]))
    try:
        tier.write("embed", state(2, 200_000))
        with pytest.raises(DiskTierError) as e:
            tier.flush()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    message = str(e.value)
    assert "\n" not in message and "EFBIG" in message and "free space" in message
    assert path.read_bytes() == before
    assert not list((tmp_path / "t").glob("*.tmp"))
    assert errno.EFBIG in disk._WRITE_ERRNOS
    tier.close()


N_KILL = 2_000_000  # elements a segment: 8 MB written a segment, milliseconds to hit
WRITER = f"""
import sys
from tests.engine.test_disk import layouts, state
from wsjax.engine.disk import DiskTier
tier = DiskTier.open(sys.argv[1], "killed run", layouts(n={N_KILL}))
for name in tier.names:
    tier.write(name, state(0, {N_KILL}))
tier.flush()
print("written", flush=True)
gen = 1
while True:
    for name in tier.names:
        tier.write(name, state(gen % 2, {N_KILL}))
    gen += 1
"""


def test_sigkill_mid_write_leaves_old_or_new_state(tmp_path):
    """A process rewriting every segment, alternating two states, is killed with SIGKILL the
    moment a write is under way (a ``.tmp`` file seen), three times: each segment file reads
    back as one of the two states, whole; at least one kill left a torn ``.tmp`` behind."""
    valid = [state(0, N_KILL), state(1, N_KILL)]
    lay = layouts(n=N_KILL)["embed"]
    torn = 0
    for attempt in range(3):
        folder = tmp_path / f"t{attempt}"
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(folder)], cwd=REPO,
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert proc.stdout.readline().strip() == "written"
        deadline = time.monotonic() + 60
        while not list(folder.glob("*.tmp")) and time.monotonic() < deadline:
            os.sched_yield()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        torn += any(p.stat().st_size < lay.nbytes for p in folder.glob("*.tmp"))
        for name in layouts():
            buf = np.frombuffer((folder / file_name(name)).read_bytes(), np.uint8)
            assert buf.size == lay.nbytes
            got = jax.tree.leaves(jax.tree.unflatten(lay.treedef, lay.views(buf)))
            assert any(all(np.array_equal(x, y) for x, y in zip(got, jax.tree.leaves(v),
                                                               strict=True))
                       for v in valid), (attempt, name)  # fmt: skip
    assert torn >= 1, "no kill landed in the middle of a write"
