"""Checkpoints of a disk-tier run are written and read one segment at a time
(wsjax.checkpoint.segments).

Yardsticks: the RAM engine's orbax checkpoint of the same run (the segment checkpoint must
restore to it bit for bit), the tier files it was linked from, and tracemalloc's count of the
bytes numpy allocates (a save or a lazy restore holds about one segment, a whole restore all
of them)."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import tracemalloc

import jax
import numpy as np
import pytest

from tests.helpers import small_config
from wsjax.checkpoint import Checkpoints, CorruptCheckpoint, restore_newest_good
from wsjax.checkpoint import segments as seg
from wsjax.engine import StreamingEngine
from wsjax.engine.disk import run_owner, tier_bytes_present
from wsjax.engine.disk_store import SegmentStates
from wsjax.engine.store import opt_state_shapes
from wsjax.errors import CheckpointError
from wsjax.models import get_model
from wsjax.optim import make_optimizer
from wsjax.train import run

LAYERS = ["model.num_hidden_layers=6"]  # 8 segments: the whole state is several segments' worth
STEPS = 6  # checkpoints at 3 and 6 (tests.helpers.SMALL)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("segments")
    cfg = small_config(*LAYERS)
    ram = run(cfg, "train", root / "ram", max_steps=STEPS, progress=False)
    tier = run(cfg, "train", root / "md", max_steps=STEPS, disk_path=root / "tier", progress=False)
    assert tier.losses == ram.losses  # the premise: the same run, bitwise
    return root, cfg


def shapes(cfg, with_opt=True):
    model = get_model(cfg.model)
    params = model.param_shapes()
    opt = make_optimizer(cfg.optimizer) if with_opt else None
    return model, params, opt_state_shapes(opt, params, model.num_layers)


def test_a_tier_checkpoint_restores_to_the_ram_checkpoint_bit_for_bit(runs):
    root, cfg = runs
    _, params, opt = shapes(cfg)
    assert (root / "md" / "model-ckpt-6" / seg.ITEM).is_dir()
    assert not (root / "md" / "model-ckpt-6" / "params").exists()
    for step in (3, 6):
        want = Checkpoints(root / "ram", read_only=True).restore(step, params, opt)
        got = Checkpoints(root / "md", read_only=True).restore(step, params, opt)
        jax.tree.map(np.testing.assert_array_equal, got[:2], want[:2])
        assert got[2]["step"] == want[2]["step"] == step
        assert got[2]["loader"] == want[2]["loader"]


def test_its_files_are_the_tier_files_linked(runs):
    """Same filesystem: step 6's files are the tier's files of step 6 (hard links, no copy);
    step 3's were linked too and keep step 3's bytes after the tier moved on."""
    root, _ = runs
    ckpt = root / "md" / "model-ckpt-6" / seg.ITEM
    for f in sorted(ckpt.glob("*.bin")):
        assert os.path.samefile(f, root / "tier" / f.name)
    old = sorted((root / "md" / "model-ckpt-3" / seg.ITEM).glob("*.bin"))
    assert len(old) == 8 and all(f.stat().st_nlink == 1 for f in old)
    assert any(f.read_bytes() != (ckpt / f.name).read_bytes() for f in old)


def test_across_filesystems_the_files_are_copied(runs, tmp_path, monkeypatch):
    """os.link failing with EXDEV (the tier on another disk): the files are copied, and the
    checkpoint restores to the RAM run's."""
    root, cfg = runs
    _, params, opt = shapes(cfg)

    def no_link(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))

    monkeypatch.setattr(seg.os, "link", no_link)
    md = tmp_path / "md"
    run(cfg, "train", md, max_steps=3, disk_path=tmp_path / "tier", progress=False)
    files = list((md / "model-ckpt-3" / seg.ITEM).glob("*.bin"))
    assert len(files) == 8 and all(f.stat().st_nlink == 1 for f in files)
    want = Checkpoints(root / "ram", read_only=True).restore(3, params, opt)
    got = Checkpoints(md, read_only=True).restore(3, params, opt)
    jax.tree.map(np.testing.assert_array_equal, got[:2], want[:2])


def _peak(fn) -> int:
    """The most bytes Python and numpy held at once during ``fn()``, above what they held."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_save_and_lazy_restore_hold_one_segment_at_a_time(runs, tmp_path):
    root, cfg = runs
    _, params, opt = shapes(cfg)
    ckpts = Checkpoints(root / "md", read_only=True)
    layout = json.loads((root / "md" / "model-ckpt-6" / seg.ITEM / seg.LAYOUT).read_text())
    sizes = sorted(e["bytes"] for e in layout.values())
    whole, largest = sum(sizes), sizes[-1]
    assert whole > 3 * largest  # the premise: the bounds below tell the two apart
    slack = 1 << 20  # Python objects, orbax's metadata reads

    assert _peak(lambda: ckpts.restore(6, params, opt)) > whole  # the yardstick sees them

    def lazy_restore() -> None:
        states, none, meta = ckpts.restore(6, params, opt, lazy=True)  # every digest checked
        assert isinstance(states, SegmentStates) and none is None and meta["step"] == 6
        for read in states.values():  # as the engine writes them into its tier
            master, opt_state = read()
            assert jax.tree.leaves(opt_state)
            del master, opt_state

    assert _peak(lazy_restore) < 2 * largest + slack

    engine = StreamingEngine(get_model(cfg.model), with_disk(cfg, tmp_path / "tier"))
    out = Checkpoints(tmp_path / "out")
    assert _peak(lambda: engine.save_checkpoint(out, 1, {"step": 1})) < 2 * largest + slack
    out.close()
    engine.store.close()
    assert out.steps() == [1]


def test_a_corrupt_segment_falls_back_to_the_previous_checkpoint(runs, tmp_path):
    root, cfg = runs
    _, params, opt = shapes(cfg)
    md = tmp_path / "md"
    shutil.copytree(root / "md", md)
    f = md / "model-ckpt-6" / seg.ITEM / "block-2.bin"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint) as e:
        Checkpoints(md, read_only=True).restore(6, params, opt)
    assert (
        str(e.value)
        == f"{md / 'model-ckpt-6'}: block-2.bin fails its crc32c digest (corrupt on disk)"
    )
    ckpts = Checkpoints(md)
    step, (states, _, meta) = restore_newest_good(ckpts, params, opt, [3, 6], lazy=True)
    assert step == meta["step"] == 3 and len(states) == 8
    assert ckpts.steps() == [3]  # model-ckpt-6 set aside (renamed, kept)
    assert len(list(md.glob("model-ckpt-6.corrupt-*"))) == 1
    ckpts.close()


def test_another_models_shapes_are_named_before_reading(runs):
    root, _ = runs
    _, params, opt = shapes(small_config(*LAYERS, "model.filter_size=96"))
    with pytest.raises(CheckpointError) as e:
        Checkpoints(root / "md", read_only=True).restore(6, params, opt)
    assert str(e.value) == (
        f"{root / 'md' / 'model-ckpt-6'}: block/0 mlp.fc_in.bias has shape (128,), the model "
        "expects (96,) (check model.* and optimizer.* in the params file against the checkpoint)"
    )


def with_disk(cfg, folder):
    streaming = dataclasses.replace(cfg.streaming, disk_path=str(folder))
    return dataclasses.replace(cfg, streaming=streaming)


def test_tier_files_a_checkpoint_links_are_not_free_space(runs, tmp_path):
    """Replacing a tier file frees its space only when no checkpoint links it."""
    root, _ = runs
    owner = run_owner(root / "md")
    assert tier_bytes_present(root / "tier", owner) == 0  # all linked by model-ckpt-6
    shutil.copytree(root / "tier", tmp_path / "tier")  # copies: the tier's own bytes
    layout = json.loads((root / "md" / "model-ckpt-6" / seg.ITEM / seg.LAYOUT).read_text())
    assert tier_bytes_present(tmp_path / "tier", owner) == sum(e["bytes"] for e in layout.values())
