"""The fault catalogue, in-process, part two: checkpoint and runtime faults (corrupt, torn and
non-finite checkpoints, a changed optimizer or model on resume, a full disk, non-finite steps).

Every case asserts the exit code of its class (wsjax.errors: 2 user error, 4 non-finite), that
the message is one line starting with "error: " with no traceback, and, where a model_dir held
checkpoints before the fault, that they are unchanged and still restore; the resume cases also
compare losses bitwise with an uninterrupted run."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.helpers import SMALL, small_config
from tests.trainer.faults_base import cli, copy_md, one_line, snapshot, unaside
from wsjax.checkpoint import Checkpoints
from wsjax.errors import EXIT_NONFINITE, EXIT_USER
from wsjax.interop.load import load_start
from wsjax.models import get_model
from wsjax.optim import make_optimizer
from wsjax.train import build_parser, run


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """model_dir "md": checkpoints at steps 2 and 4; "ref": the same run straight to 6 steps."""
    root = tmp_path_factory.mktemp("faults")
    cfg = small_config()
    first = run(cfg, "train", root / "md", max_steps=4, save_checkpoints_steps=2, progress=False)
    ref = run(cfg, "train", root / "ref", max_steps=6, progress=False)
    assert first.losses == ref.losses[:4]
    return SimpleNamespace(cfg=cfg, md=root / "md", ref=dict(ref.losses))


# ---- checkpoints -------------------------------------------------------------------------------
def _biggest(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip_bytes(ckpt: Path) -> None:
    data = _biggest(ckpt / "params")
    raw = bytearray(data.read_bytes())
    for i in range(100, 500):  # 400 flipped bytes in the parameter data, as in the issue
        raw[i] ^= 0xFF
    data.write_bytes(bytes(raw))


def _flip_one_bit(ckpt: Path) -> None:
    data = _biggest(ckpt / "params")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))


def _truncate(ckpt: Path) -> None:
    data = _biggest(ckpt / "params")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


CORRUPTIONS = {
    "400 flipped bytes": (_flip_bytes, r"fails its crc32c digest"),
    "one flipped bit": (_flip_one_bit, r"fails its crc32c digest"),
    "truncated data": (_truncate, r"unreadable \(OUT_OF_RANGE"),
    "garbage _METADATA": (
        lambda c: (c / "params" / "_METADATA").write_text("garbage{"),
        r"unreadable params metadata",
    ),
    "garbage meta item": (lambda c: (c / "meta" / "metadata").write_text("{x"), r"unreadable"),
    "opt_state data deleted": (
        lambda c: shutil.rmtree(c / "opt_state" / "ocdbt.process_0"),
        r"unreadable",
    ),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_latest_checkpoint_falls_back_and_is_named(capsys, saved, tmp_path, corruption):
    damage, pattern = CORRUPTIONS[corruption]
    md = copy_md(saved, tmp_path / "md")
    damage(md / "model-ckpt-4")
    cfg = saved.cfg
    model, opt = get_model(cfg.model), make_optimizer(cfg.optimizer)
    start = load_start(md, model, opt, weights_only=False)  # resume: the newest good one
    assert start.step == 2 and start.source.endswith("model-ckpt-2")
    out = capsys.readouterr().out
    assert re.search(rf"model-ckpt-4: .*{pattern}.*falling back", out), out
    # named explicitly, it is one line naming it (read before weights or compile)
    ckpt = md / "model-ckpt-4"
    rc, err = cli(capsys, "-o", tmp_path / "e", *SMALL, "--max_steps", 6, "--checkpoint_path", ckpt)
    one_line(rc, err, EXIT_USER, rf"model-ckpt-4: .*{pattern}")


def test_resume_past_a_corrupt_checkpoint_is_exact(saved, tmp_path):
    md = copy_md(saved, tmp_path / "md")
    _flip_bytes(md / "model-ckpt-4")
    r = run(saved.cfg, "train", md, max_steps=6, progress=False)
    assert [s for s, _ in r.losses] == [3, 4, 5, 6]
    assert r.losses == [(s, saved.ref[s]) for s in (3, 4, 5, 6)]  # bitwise


def test_eval_all_skips_a_corrupt_checkpoint(saved, tmp_path, capsys):
    md = copy_md(saved, tmp_path / "md")
    _truncate(md / "model-ckpt-2")
    r = run(saved.cfg, "eval_all", md)
    assert [e["step"] for e in r.evals] == [4]
    assert re.search(r"model-ckpt-2: unreadable .*; skipped", capsys.readouterr().out)


def test_every_checkpoint_corrupt_is_one_line(saved, tmp_path, capsys):
    md = copy_md(saved, tmp_path / "md")
    before = snapshot(md)
    for step in (2, 4):
        (md / f"model-ckpt-{step}" / "params" / "_METADATA").write_text("")
    rc, err = cli(capsys, "-o", md, *SMALL, "--max_steps", "6")
    one_line(rc, err, EXIT_USER, r"no readable checkpoint \(model-ckpt-4, model-ckpt-2 are corrupt")
    assert set(unaside(snapshot(md))) == set(before)  # nothing deleted (set aside)


def test_optimizer_change_on_resume_is_one_short_line(saved, tmp_path, capsys):
    md = copy_md(saved, tmp_path / "md")
    before = snapshot(md)
    rc, err = cli(capsys, "-o", md, *SMALL, "--max_steps", "6", "optimizer.optimizer_type=SGD")
    line = one_line(rc, err, EXIT_USER, r"model-ckpt-4: its optimizer state .* does not match")
    assert len(line) < 400 and "--is_pretrained_checkpoint" in line
    assert snapshot(md) == before


def test_model_change_on_resume_names_the_parameter(saved, tmp_path, capsys):
    md = copy_md(saved, tmp_path / "md")
    rc, err = cli(capsys, "-o", md, *SMALL, "--max_steps", "6", "model.filter_size=96")
    one_line(rc, err, EXIT_USER, r"model-ckpt-4: parameter \S+ has shape")


def test_leftovers_of_a_killed_writer_are_ignored_then_cleared(saved, tmp_path):
    md = copy_md(saved, tmp_path / "md")
    shutil.copytree(md / "model-ckpt-2", md / ".trash-model-ckpt-0")  # a half-finished prune
    shutil.copytree(md / "model-ckpt-4", md / "model-ckpt-6.orbax-checkpoint-tmp-1")  # a save
    assert Checkpoints(md, read_only=True).steps() == [2, 4]
    Checkpoints(md, keep=2)  # the lock holder's writable manager clears them
    assert sorted(p.name for p in md.iterdir() if "ckpt" in p.name) == [
        "model-ckpt-2",
        "model-ckpt-4",
    ]


def test_pruning_keeps_the_checkpoint_just_written(saved, tmp_path):
    """keep=1 with a newer (corrupt) checkpoint on disk: the good one just saved survives
    (pruning by step number alone would keep model-ckpt-9 and delete it)."""
    md = copy_md(saved, tmp_path / "md")
    shutil.copytree(md / "model-ckpt-4", md / "model-ckpt-9")
    _truncate(md / "model-ckpt-9")
    cfg = saved.cfg
    model = get_model(cfg.model)
    start = load_start(
        md / "model-ckpt-4", model, make_optimizer(cfg.optimizer), weights_only=False
    )
    ckpts = Checkpoints(md, keep=1)
    ckpts.save(5, start.params, start.opt_state, {"step": 5})
    assert ckpts.steps() == [5]  # the newer corrupt one goes, the one just written stays
    assert load_start(md / "model-ckpt-5", model, None, weights_only=True).params is not None


def test_a_non_finite_checkpoint_is_never_written(saved, tmp_path):
    from wsjax.errors import NonFiniteError

    md = copy_md(saved, tmp_path / "md")
    cfg = saved.cfg
    model, opt = get_model(cfg.model), make_optimizer(cfg.optimizer)
    start = load_start(md / "model-ckpt-4", model, opt, weights_only=False)
    start.params["head"]["lm_head"]["bias"][3] = np.nan
    ckpts = Checkpoints(md, keep=1)
    with pytest.raises(NonFiniteError, match=r"not writing model-ckpt-6: params.head.lm_head.bias"):
        ckpts.save(6, start.params, start.opt_state, {"step": 6})
    assert ckpts.steps() == [2, 4] and not list(md.glob("*ckpt-6*"))


# ---- HuggingFace checkpoints -------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_folder(saved, tmp_path_factory):
    import jax

    from wsjax.interop.hf import export_hf

    model = get_model(saved.cfg.model)
    folder = tmp_path_factory.mktemp("hf") / "hf"
    export_hf(saved.cfg.model, jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(1))), folder)
    return folder


def _hf_copy(hf_folder: Path, dest: Path) -> Path:
    shutil.copytree(hf_folder, dest)
    return dest


HF_FAULTS = {
    "truncated safetensors": (
        lambda d: (d / "model.safetensors").write_bytes(
            (d / "model.safetensors").read_bytes()[:999]
        ),
        [],
        r"model.safetensors|unreadable weights",
    ),
    "pickle refused": (
        lambda d: ((d / "model.safetensors").unlink(), (d / "pytorch_model.bin").write_bytes(b"x")),
        [],
        r"pickled PyTorch checkpoint.*--allow_pickle",
    ),
    "bad pickle allowed": (
        lambda d: ((d / "model.safetensors").unlink(), (d / "pytorch_model.bin").write_bytes(b"x")),
        ["--allow_pickle"],
        r"cannot load PyTorch checkpoint",
    ),
    "garbage config.json": (lambda d: (d / "config.json").write_text("{"), [], r"config.json"),
}


@pytest.mark.parametrize("fault", list(HF_FAULTS))
def test_hf_checkpoint_fault_is_one_line(capsys, hf_folder, tmp_path, fault):
    damage, extra, pattern = HF_FAULTS[fault]
    folder = _hf_copy(hf_folder, tmp_path / "hf")
    damage(folder)
    argv = ["-o", tmp_path / "md", *SMALL, "--checkpoint_path", folder, *extra]
    line = one_line(*cli(capsys, *argv, "--is_pretrained_checkpoint"), EXIT_USER, pattern)
    for flag in re.findall(r"--\w+", line):  # every flag a message names exists
        assert flag in build_parser().format_help(), flag


# ---- runtime: non-finite, full disk ------------------------------------------------------------
def test_non_finite_loss_stops_at_its_step_and_saves_nothing(saved, tmp_path, capsys):
    """lr 1e30 from the step-4 checkpoint: step 5's update puts weights near 1e30, so step 6's
    loss overflows; the run stops there (exit 4) and no checkpoint is written or pruned."""
    md = copy_md(saved, tmp_path / "md")
    before = snapshot(md)
    argv = ["-o", md, *SMALL, "--max_steps", "9", "optimizer.learning_rate=1e30"]
    rc, err = cli(capsys, *argv, "--keep_checkpoint_max", "1", "--save_checkpoints_steps", "7")
    one_line(rc, err, EXIT_NONFINITE, r"global_step 6: non-finite loss .*nothing saved")
    assert snapshot(md) == before
    start = load_start(md, get_model(saved.cfg.model), None, weights_only=True)
    assert start.source.endswith("model-ckpt-4")  # still restores (digest checked)


def test_non_finite_weights_are_never_saved_by_a_run(saved, tmp_path, capsys):
    """lr 1e39 overflows float32: step 5's update makes weights infinite before any loss can
    show it; the checkpoint at step 5 is refused (exit 4) and the good ones stay."""
    md = copy_md(saved, tmp_path / "md")
    before = snapshot(md)
    argv = ["-o", md, *SMALL, "--max_steps", "9", "optimizer.learning_rate=1e39"]
    rc, err = cli(capsys, *argv, "--save_checkpoints_steps", "1", "--keep_checkpoint_max", "1")
    one_line(rc, err, EXIT_NONFINITE, r"not writing model-ckpt-5: .* non-finite values")
    assert snapshot(md) == before


def test_skip_policy_stops_after_the_allowed_skips(saved, tmp_path, capsys):
    md = copy_md(saved, tmp_path / "md")
    before = snapshot(md)
    argv = ["-o", md, *SMALL, "--max_steps", "12", "optimizer.learning_rate=1e30"]
    extra = ["runconfig.on_nonfinite=skip", "runconfig.max_consecutive_skips=3"]
    rc, err = cli(capsys, *argv, *extra, "--save_checkpoints_steps", "100")
    # an engine that skips the update counts 3 in a row; one that applied it cannot skip
    one_line(rc, err, EXIT_NONFINITE, r"3 non-finite steps in a row|cannot be skipped")
    assert snapshot(md) == before


@pytest.mark.parametrize(
    "limit,pattern",
    [(64 << 10, r"model-ckpt-5: cannot write the checkpoint"), (1 << 10, r"cannot write \(File")],
    ids=["at the checkpoint", "at the first file"],
)
def test_full_disk_is_one_line_and_damages_nothing(saved, tmp_path, capsys, limit, pattern):
    """A file-size limit makes every write past it fail (EFBIG, as a full disk fails with
    ENOSPC): at 64 KiB the checkpoint write fails, at 1 KiB already the run's effective config
    (and run.log, whose lines are then dropped quietly); one line, and the old checkpoints
    still restore and resume exactly."""
    import resource
    import signal

    md = copy_md(saved, tmp_path / "md")
    before = snapshot(md)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limits[1]))
    try:
        rc, err = cli(capsys, "-o", md, *SMALL, "--max_steps", "5")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, old_handler)
    one_line(rc, err, EXIT_USER, pattern)
    assert snapshot(md) == before
    r = run(saved.cfg, "train", md, max_steps=6, progress=False)  # resumes exactly afterwards
    assert r.losses == [(5, saved.ref[5]), (6, saved.ref[6])]


# ---- the non-finite policy, step by step (engine metrics as the engine reports them) -------------
def _metrics(loss=1.0, grad_norm=1.0, skipped=None) -> dict:
    m = {"train/loss": loss, "train/grad_norm": grad_norm}
    if skipped is not None:
        m["train/update_skipped"] = skipped
    return m


@pytest.mark.parametrize(
    "metrics",
    [_metrics(loss=float("nan")), _metrics(grad_norm=float("inf")), _metrics(skipped=1.0)],
    ids=["nan loss", "inf grad norm", "engine skipped"],
)
def test_stop_policy_stops_at_the_step(metrics):
    from wsjax.errors import NonFiniteError
    from wsjax.trainer.faults import NonFinitePolicy

    policy = NonFinitePolicy("stop", 10)
    assert policy.check(1, _metrics()) is False
    with pytest.raises(NonFiniteError, match=r"global_step 2: non-finite .*nothing saved"):
        policy.check(2, metrics)


def test_skip_policy_counts_resets_and_stops_after_n_in_a_row():
    from wsjax.errors import NonFiniteError
    from wsjax.trainer.faults import NonFinitePolicy

    policy = NonFinitePolicy("skip", 2)
    bad = _metrics(loss=float("nan"), skipped=1.0)
    assert policy.check(1, bad) is True and (policy.consecutive, policy.total) == (1, 1)
    assert policy.check(2, _metrics(skipped=0.0)) is False and policy.consecutive == 0
    assert policy.check(3, bad) is True and policy.total == 2
    with pytest.raises(NonFiniteError, match=r"2 non-finite steps in a row"):
        policy.check(4, bad)
    with pytest.raises(NonFiniteError, match="cannot be skipped"):  # the update went in
        NonFinitePolicy("skip", 5).check(1, _metrics(grad_norm=float("nan")))
