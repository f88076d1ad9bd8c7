"""Checkpoint integrity without a run: the digest is never optional for this layout, the older
layout only behind --allow_unverified_checkpoint, corrupt checkpoints set aside (never deleted),
asynchronous saves, orbax's public step-name protocol, and the leftovers a killed writer leaves.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.helpers import tiny_config_dict
from wsjax.checkpoint import Checkpoints, restore_newest_good
from wsjax.checkpoint.checkpoints import CORRUPT, FORMAT_KEY, DashNameFormat, _owned
from wsjax.checkpoint.digest import DIGEST_KEY, CorruptCheckpoint, UnverifiedCheckpoint
from wsjax.config import config_from_dict
from wsjax.engine.store import opt_state_shapes
from wsjax.errors import CheckpointError, NonFiniteError
from wsjax.interop.load import load_start
from wsjax.models import get_model
from wsjax.optim import make_optimizer


@pytest.fixture(scope="module")
def state():
    cfg = config_from_dict(tiny_config_dict("gptj", layers=2))
    model, opt = get_model(cfg.model), make_optimizer(cfg.optimizer)
    params = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(0)))
    oshapes = opt_state_shapes(opt, model.param_shapes(), model.num_layers)
    opt_state = jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype), oshapes)
    return model, opt, params, opt_state, oshapes


@pytest.fixture(scope="module")
def written(tmp_path_factory, state):
    """A folder with checkpoints 2 and 4 (asynchronous saves), copied by each test."""
    root = tmp_path_factory.mktemp("integrity")
    _, _, params, opt_state, _ = state
    ck = Checkpoints(root, async_save=True)
    for step in (2, 4):
        ck.save(step, params, opt_state, {"step": step, "loader": {"epoch": 0, "index": step}})
    ck.close()
    return root


def _copy(written, tmp_path) -> Path:
    return Path(shutil.copytree(written, tmp_path / "md"))


def _edit_meta(ckpt: Path, change) -> None:
    f = ckpt / "meta" / "metadata"
    meta = json.loads(f.read_text())
    change(meta)
    f.write_text(json.dumps(meta))


def _restore(md, state, step, **kw):
    model, _, _, _, oshapes = state
    return Checkpoints(md, read_only=True, **kw).restore(step, model.param_shapes(), oshapes)


# ---- the digest is never optional -----------------------------------------------------------
def test_async_saves_commit_with_digest_and_format(written, state):
    assert Checkpoints(written, read_only=True).steps() == [2, 4]
    meta = json.loads((written / "model-ckpt-4" / "meta" / "metadata").read_text())
    assert meta[FORMAT_KEY] == 2 and len(meta[DIGEST_KEY]) == len(jax.tree.leaves(state[2:4]))
    params, _, meta = _restore(written, state, 4)
    assert DIGEST_KEY not in meta and FORMAT_KEY not in meta
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state[2]), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("allow", [False, True], ids=["strict", "with the flag"])
def test_digest_removed_from_this_layout_is_corrupt(written, tmp_path, state, allow):
    md = _copy(written, tmp_path)
    _edit_meta(md / "model-ckpt-4", lambda m: m.pop(DIGEST_KEY))
    with pytest.raises(CorruptCheckpoint, match=r"model-ckpt-4: its crc32c digest is missing"):
        _restore(md, state, 4, allow_unverified=allow)


def test_digest_emptied_is_corrupt(written, tmp_path, state):
    md = _copy(written, tmp_path)
    _edit_meta(md / "model-ckpt-4", lambda m: m.update({DIGEST_KEY: {}}))
    with pytest.raises(CorruptCheckpoint, match=r"digest is missing"):
        _restore(md, state, 4, allow_unverified=True)


def test_older_layout_is_refused_without_the_flag(written, tmp_path, state):
    md = _copy(written, tmp_path)
    _edit_meta(md / "model-ckpt-4", lambda m: (m.pop(DIGEST_KEY), m.pop(FORMAT_KEY)))
    with pytest.raises(UnverifiedCheckpoint, match=r"--allow_unverified_checkpoint"):
        _restore(md, state, 4)


def test_older_layout_loads_with_the_flag(written, tmp_path, state, caplog):
    md = _copy(written, tmp_path)
    _edit_meta(md / "model-ckpt-4", lambda m: (m.pop(DIGEST_KEY), m.pop(FORMAT_KEY)))
    params, _, meta = _restore(md, state, 4, allow_unverified=True)
    assert meta["step"] == 4 and "loaded unverified" in caplog.text
    model, opt = state[:2]
    start = load_start(md, model, opt, weights_only=False, allow_unverified=True)
    assert start.step == 4


def test_older_layout_with_corrupt_weights_is_not_accepted_silently(written, tmp_path, state):
    """The issue's case: corrupt weights, digest gone, and no flag: refused."""
    md = _copy(written, tmp_path)
    _edit_meta(md / "model-ckpt-4", lambda m: m.pop(DIGEST_KEY))
    _flip(md / "model-ckpt-4")
    with pytest.raises(CorruptCheckpoint):
        _restore(md, state, 4)


@pytest.mark.parametrize("which", ["first entry", "last entry"])
def test_one_digest_entry_removed_fails(written, tmp_path, state, which):
    md = _copy(written, tmp_path)

    def drop(m):
        names = sorted(m[DIGEST_KEY])
        m[DIGEST_KEY].pop(names[0] if which == "first entry" else names[-1])

    _edit_meta(md / "model-ckpt-4", drop)
    with pytest.raises(CorruptCheckpoint, match=r"fails its crc32c digest"):
        _restore(md, state, 4)


def test_digest_value_altered_fails(written, tmp_path, state):
    md = _copy(written, tmp_path)
    _edit_meta(md / "model-ckpt-4", lambda m: m[DIGEST_KEY].update({k: 0 for k in m[DIGEST_KEY]}))
    with pytest.raises(CorruptCheckpoint, match=r"fails its crc32c digest"):
        _restore(md, state, 4)


def _flip(ckpt: Path) -> None:
    files = (p for p in (ckpt / "params").rglob("*") if p.is_file())
    data = max(files, key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))


# ---- corrupt checkpoints set aside, never deleted --------------------------------------------
def test_fallback_sets_a_corrupt_newest_aside_and_the_step_saves_again(written, tmp_path, state):
    model, _, params, opt_state, oshapes = state
    md = _copy(written, tmp_path)
    _flip(md / "model-ckpt-4")
    files = sorted(p.relative_to(md / "model-ckpt-4") for p in (md / "model-ckpt-4").rglob("*"))
    ck = Checkpoints(md, async_save=True)
    step, _ = restore_newest_good(ck, model.param_shapes(), oshapes, ck.steps())
    assert step == 2 and ck.steps() == [2]
    (aside,) = md.glob(f"model-ckpt-4{CORRUPT}*")
    assert sorted(p.relative_to(aside) for p in aside.rglob("*")) == files  # nothing deleted
    ck.save(4, params, opt_state, {"step": 4})  # the dead end of the issue: saves again
    ck.close()
    assert Checkpoints(md, read_only=True).steps() == [2, 4] and aside.is_dir()
    _restore(md, state, 4)


def test_read_only_fallback_sets_nothing_aside(written, tmp_path, state):
    model, opt = state[:2]
    md = _copy(written, tmp_path)
    _flip(md / "model-ckpt-4")
    assert load_start(md, model, opt, weights_only=False).step == 2
    assert not list(md.glob(f"*{CORRUPT}*")) and (md / "model-ckpt-4").is_dir()


def test_older_layout_in_fallback_is_skipped_not_moved(written, tmp_path, state):
    model, _, _, _, oshapes = state
    md = _copy(written, tmp_path)
    _edit_meta(md / "model-ckpt-4", lambda m: (m.pop(DIGEST_KEY), m.pop(FORMAT_KEY)))
    ck = Checkpoints(md)
    step, _ = restore_newest_good(ck, model.param_shapes(), oshapes, ck.steps())
    assert step == 2 and (md / "model-ckpt-4").is_dir()


def test_set_aside_twice_in_one_second_keeps_both(written, tmp_path, state):
    _, _, params, opt_state, _ = state
    md = _copy(written, tmp_path)
    ck = Checkpoints(md)
    first = ck.set_aside(4, "corrupt")
    ck.save(4, params, opt_state, {"step": 4})
    second = ck.set_aside(4, "corrupt")
    assert first != second and first.is_dir() and second.is_dir()
    assert ck.steps() == [2]


def test_save_over_an_unreadable_leftover_sets_it_aside(written, tmp_path, state):
    _, _, params, opt_state, _ = state
    md = _copy(written, tmp_path)
    (md / "model-ckpt-4" / "meta" / "metadata").write_text("{torn")
    ck = Checkpoints(md)
    ck.save(4, params, opt_state, {"step": 4})
    assert len(list(md.glob(f"model-ckpt-4{CORRUPT}*"))) == 1
    _restore(md, state, 4)


def test_every_checkpoint_corrupt_names_them_all(written, tmp_path, state):
    model, _, _, _, oshapes = state
    md = _copy(written, tmp_path)
    for step in (2, 4):
        _flip(md / f"model-ckpt-{step}")
    ck = Checkpoints(md)
    with pytest.raises(CheckpointError, match=r"no readable checkpoint \(model-ckpt-4, model-ckp"):
        restore_newest_good(ck, model.param_shapes(), oshapes, ck.steps())
    assert len(list(md.glob(f"*{CORRUPT}*"))) == 2


# ---- asynchronous saves ------------------------------------------------------------------------
def test_non_finite_refused_before_anything_is_written(tmp_path, state):
    _, _, params, opt_state, _ = state
    bad = jax.tree.map(lambda a: a.copy(), params)
    jax.tree.leaves(bad)[0].flat[0] = np.nan
    ck = Checkpoints(tmp_path, async_save=True)
    with pytest.raises(NonFiniteError, match="not writing model-ckpt-3"):
        ck.save(3, bad, opt_state, {"step": 3})
    ck.close()
    assert not list(tmp_path.glob("model-ckpt-*"))


def test_async_save_digests_the_arrays_as_they_were(tmp_path, state):
    """The arrays change right after save() returns (as the engine's next update would): the
    checkpoint holds, and its digest matches, the values at save time."""
    _, _, params, opt_state, _ = state
    mine = jax.tree.map(lambda a: a.copy(), params)
    ck = Checkpoints(tmp_path, async_save=True)
    ck.save(1, mine, opt_state, {"step": 1})
    for leaf in jax.tree.leaves(mine):
        leaf += 1.0
    ck.close()
    got, _, _ = _restore(tmp_path, state, 1)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_keep_prunes_after_each_write_completes(tmp_path, state):
    _, _, params, opt_state, _ = state
    ck = Checkpoints(tmp_path, keep=2, async_save=True)
    for step in (1, 2, 3, 4):
        ck.save(step, params, opt_state, {"step": step})
    assert ck.steps() == [3, 4]  # steps() waits for the write in flight
    ck.close()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("model")) == [
        "model-ckpt-3",
        "model-ckpt-4",
    ]


def test_owned_copies_views_only():
    base = np.arange(6.0)
    tree = {"view": base[:3], "own": np.arange(3.0)}
    out = _owned(tree)
    assert out["own"] is tree["own"] and out["view"] is not tree["view"]
    assert out["view"].flags.owndata


# ---- orbax's public step-name protocol ---------------------------------------------------------
def test_name_format_is_orbax_public_protocol(written):
    fmt = DashNameFormat()
    assert ocp.step.NameFormat in type(fmt).__mro__ and fmt.build_name(12) == "model-ckpt-12"
    assert [m.step for m in fmt.find_all(written)] in ([2, 4], [4, 2])
    assert fmt.find_step(written, 4).path.name == "model-ckpt-4"
    with pytest.raises(ValueError, match="no committed checkpoint for step 3"):
        fmt.find_step(written, 3)


@pytest.mark.parametrize(
    "name",
    [
        "model-ckpt-8.orbax-checkpoint-tmp-123",
        f"model-ckpt-8{CORRUPT}20260101T000000",
        ".trash-model-ckpt-8",
        "model-ckpt-08",
        "model_ckpt_8",
    ],
)
def test_other_names_are_not_checkpoints(written, tmp_path, name):
    md = _copy(written, tmp_path)
    (md / name).mkdir()
    assert Checkpoints(md, read_only=True).steps() == [2, 4]


def test_a_file_under_a_checkpoint_name_is_not_a_checkpoint(written, tmp_path):
    md = _copy(written, tmp_path)
    (md / "model-ckpt-9").write_text("not a folder")
    assert Checkpoints(md, read_only=True).steps() == [2, 4]


def test_missing_folder_has_no_steps(tmp_path):
    assert list(DashNameFormat().find_all(tmp_path / "absent")) == []


def test_close_twice_is_harmless(tmp_path, state):
    _, _, params, opt_state, _ = state
    ck = Checkpoints(tmp_path, async_save=True)
    ck.save(1, params, opt_state, {"step": 1})
    ck.wait()
    ck.wait()
    assert ck.steps() == [1] and re.fullmatch(r"model-ckpt-1", ck.path(1).name)
    ck.close()
