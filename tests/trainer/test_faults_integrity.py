"""The fault catalogue, part three: integrity and resume through the CLI (in-process).

A checkpoint without its digest, a corrupt newest checkpoint that the run saves again, an
``eval_all`` that evaluates nothing, a resume whose data position changed, the temporaries of
killed writers, writes under a file. Each case checks the exit code, the one line, and that
the model_dir still resumes afterwards."""

from __future__ import annotations

import errno
import json
import re
from types import SimpleNamespace

import pytest

from tests.helpers import SMALL
from tests.trainer.faults_base import cli, copy_md, one_line, saved_run, snapshot, unaside
from wsjax.checkpoint import Checkpoints
from wsjax.checkpoint.checkpoints import CORRUPT, FORMAT_KEY
from wsjax.checkpoint.digest import DIGEST_KEY
from wsjax.errors import EXIT_OK, EXIT_USER
from wsjax.fileio import atomic_write_text
from wsjax.train import run
from wsjax.trainer.resume import check_resume, data_changes
from wsjax.trainer.run_dir import ModelDir
from wsjax.trainer.setup import disk_error


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """model_dir "md": checkpoints at steps 2 and 4 of the small config."""
    return saved_run(tmp_path_factory.mktemp("integrity"))


def _meta(ckpt, change) -> None:
    f = ckpt / "meta" / "metadata"
    meta = json.loads(f.read_text())
    change(meta)
    f.write_text(json.dumps(meta))


def _flip(ckpt) -> None:
    data = max((p for p in (ckpt / "params").rglob("*") if p.is_file()), key=_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))


def _size(p) -> int:
    return p.stat().st_size


# ---- the fallback that dead-ended ---------------------------------------------------------------
def test_resume_past_a_corrupt_newest_saves_that_step_again(saved, tmp_path, capsys):
    md = copy_md(saved, tmp_path / "md")
    _flip(md / "model-ckpt-4")
    before = unaside(snapshot(md))
    rc, err = cli(capsys, "-o", md, *SMALL, "--max_steps", 6, "--save_checkpoints_steps", 2)
    assert rc == EXIT_OK, err
    assert Checkpoints(md, read_only=True).steps()[-2:] == [4, 6]  # step 4 saved again
    (aside,) = md.glob(f"model-ckpt-4{CORRUPT}*")  # set aside, not deleted
    kept = {k for k in snapshot(md) if k.startswith(aside.name)}
    assert {k.replace(aside.name, "model-ckpt-4") for k in kept} == {
        k for k in before if k.startswith("model-ckpt-4/")
    }


@pytest.mark.parametrize("removed", ["digest", "digest and format"])
def test_resume_without_a_digest_falls_back(saved, tmp_path, capsys, removed):
    md = copy_md(saved, tmp_path / "md")
    keys = [DIGEST_KEY] if removed == "digest" else [DIGEST_KEY, FORMAT_KEY]
    _meta(md / "model-ckpt-4", lambda m: [m.pop(k) for k in keys])
    rc, err = cli(capsys, "-o", md, *SMALL, "--max_steps", 5)
    assert rc == EXIT_OK, err
    log = (md / "train" / "run.log").read_text()
    assert re.search(r"model-ckpt-4: .*(digest is missing|no crc32c digest)", log)
    assert re.search(r"model-ckpt-2: resuming from it", log)
    assert Checkpoints(md, read_only=True).steps()[-1] == 5


def test_older_layout_resumes_with_the_flag(saved, tmp_path, capsys):
    md = copy_md(saved, tmp_path / "md")
    _meta(md / "model-ckpt-4", lambda m: (m.pop(DIGEST_KEY), m.pop(FORMAT_KEY)))
    r = run(saved.cfg, "train", md, max_steps=5, progress=False, allow_unverified_checkpoint=True)
    assert [s for s, _ in r.losses] == [5]  # from step 4, not 2


def test_older_layout_named_is_one_line_without_the_flag(saved, tmp_path, capsys):
    md = copy_md(saved, tmp_path / "md")
    _meta(md / "model-ckpt-4", lambda m: (m.pop(DIGEST_KEY), m.pop(FORMAT_KEY)))
    ckpt = md / "model-ckpt-4"
    argv = ["-o", tmp_path / "new", *SMALL, "--max_steps", 6, "--checkpoint_path", ckpt]
    rc, err = cli(capsys, *argv)
    one_line(rc, err, EXIT_USER, r"model-ckpt-4: has no crc32c digest .*--allow_unverified")


# ---- modes that end having done nothing ---------------------------------------------------------
@pytest.mark.parametrize("mode", ["eval_all", "eval"])
def test_eval_with_every_checkpoint_unreadable_is_exit_2(saved, tmp_path, capsys, mode):
    md = copy_md(saved, tmp_path / "md")
    for step in (2, 4):
        (md / f"model-ckpt-{step}" / "params" / "_METADATA").write_text("")
    rc, err = cli(capsys, "-o", md, *SMALL, "-m", mode)
    one_line(rc, err, EXIT_USER, r"no checkpoint could be evaluated|no readable checkpoint")


# ---- a resume whose data position changed -------------------------------------------------------
@pytest.mark.parametrize(
    "override,change",
    [
        ("train_input.batch_size=2", r"batch_size 4 -> 2"),
        ("train_input.max_sequence_length=16", r"max_sequence_length 32 -> 16"),
    ],
    ids=["batch size", "sequence length"],
)
def test_resume_with_changed_data_position_refuses(saved, tmp_path, capsys, override, change):
    md = copy_md(saved, tmp_path / "md")
    before = snapshot(md)
    rc, err = cli(capsys, "-o", md, *SMALL, "--max_steps", 6, override)
    line = one_line(rc, err, EXIT_USER, rf"model-ckpt-4: train_input changed .*{change}")
    assert "--allow_data_position_change" in line
    assert snapshot(md) == before


def test_resume_with_changed_batch_continues_with_the_flag(saved, tmp_path, capsys):
    md = copy_md(saved, tmp_path / "md")
    argv = ["-o", md, *SMALL, "--max_steps", 5, "train_input.batch_size=2"]
    rc, err = cli(capsys, *argv, "--allow_data_position_change")
    assert rc == EXIT_OK, err
    out = capsys.readouterr().out + err
    assert Checkpoints(md, read_only=True).steps()[-1] == 5
    assert "batch_size 4 -> 2" in (md / "train" / "run.log").read_text() + out


@pytest.mark.parametrize(
    "saved_input,now,expected",
    [
        ({"batch_size": 4}, {"batch_size": 4}, []),
        ({"batch_size": 4}, {"batch_size": 8}, ["batch_size 4 -> 8"]),
        (
            {"max_sequence_length": 32},
            {"max_sequence_length": 64},
            ["max_sequence_length 32 -> 64"],
        ),
        ({"data_dir": "a"}, {"data_dir": "b"}, ["data_dir a -> b"]),
        ({"shuffle_seed": 1}, {"shuffle_seed": 2}, []),  # order, not position
        ({}, {"batch_size": 8}, []),  # nothing recorded: nothing to compare
    ],
    ids=["same", "batch", "seq", "data", "seed", "unrecorded"],
)
def test_data_changes(saved_input, now, expected):
    config = SimpleNamespace(to_dict=lambda: {"train_input": now})
    assert data_changes({"train_input": saved_input}, config) == expected


def test_check_resume_ignores_a_weights_only_start():
    start = SimpleNamespace(loader_state=None, config={"train_input": {"batch_size": 1}})
    config = SimpleNamespace(to_dict=lambda: {"train_input": {"batch_size": 2}})
    check_resume(start, config, allow_change=False)  # no data position to honour


# ---- temporaries of killed writers, writes under a file ----------------------------------------
@pytest.mark.parametrize(
    "leftover",
    [
        ".plan.json.tmp-abc",
        "train/.params_train.yaml.tmp-abc",
        "performance/.performance.json.tmp-abc",
        ".tokenizer-abc/",
        "eval/.params_eval.yaml.tmp-1",
    ],
)
def test_temporaries_of_killed_writers_are_removed(tmp_path, leftover):
    md = ModelDir(tmp_path / "md")
    path = md.path / leftover.rstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    if leftover.endswith("/"):
        path.mkdir()
        (path / "tokenizer.json").write_text("{")
    else:
        path.write_text("torn")
    keep = md.path / "plan.json"
    keep.write_text("{}")
    with md:
        assert not path.exists() and keep.exists()


def test_validate_only_writes_plan_atomically(tmp_path, capsys):
    rc, err = cli(capsys, "-o", tmp_path / "md", *SMALL, "--validate_only")
    assert rc == EXIT_OK, err
    assert json.loads((tmp_path / "md" / "plan.json").read_text())
    assert not [p for p in (tmp_path / "md").rglob(".*tmp-*")]


def test_model_dir_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    rc, err = cli(capsys, "-o", tmp_path / "file" / "md", *SMALL, "--max_steps", 1)
    one_line(rc, err, EXIT_USER, r"file/md.*(Not a directory|ENOTDIR|not a folder|exists)")


@pytest.mark.parametrize("errname", ["ENOSPC", "EROFS", "ENOTDIR", "EFBIG", "EISDIR"])
def test_disk_errors_name_path_and_errno(tmp_path, errname):
    code = getattr(errno, errname)
    err = disk_error(OSError(code, "msg", str(tmp_path / "x")), tmp_path)
    assert str(err).startswith(f"{tmp_path / 'x'}: cannot write (msg, {errname})")
    assert "\n" not in str(err)


def test_other_os_errors_stay_bugs(tmp_path):
    e = OSError(5, "I/O error")
    assert disk_error(e, tmp_path) is e


def test_atomic_write_under_a_file_leaves_nothing(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises((NotADirectoryError, FileExistsError)):
        atomic_write_text(tmp_path / "f" / "plan.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]
