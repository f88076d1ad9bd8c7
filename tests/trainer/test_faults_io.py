"""The fault catalogue, I/O: a real full disk (a small tmpfs, mounted for the test), a read-only
filesystem and a path under a file, met by each writer: the checkpoint, TensorBoard events, the
run's tokenizer on resume, the HF export and ``wsjax-preprocess --output``.

The disk fills at the exact moment (a writer's entry fills it, then writes), never by a guessed
size. Each case checks the exit code (2), one line naming the path and the errno, that no
library traceback (orbax, absl, TensorBoard, asyncio) reaches the output at the file-descriptor
level (capfd: C++ lines too), and that nothing already saved is damaged: once space is freed
the run resumes, exports and evaluates.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers import SMALL, small_config
from tests.trainer.faults_base import copy_md, one_line, snapshot
from wsjax.checkpoint.checkpoints import Checkpoints
from wsjax.errors import EXIT_OK, EXIT_USER
from wsjax.interop.convert import main as convert_main
from wsjax.interop.export import export_run
from wsjax.interop.load import load_start
from wsjax.models import get_model
from wsjax.train import main, run
from wsjax.trainer import trainer as trainer_module
from wsjax.trainer.metrics import Summaries

NOISE = ("Traceback", "Event loop is closed", "RESOURCE_EXHAUSTED: Error writing", "UserWarning")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """model_dir "md": checkpoints at steps 2 and 4; "ref": the same run straight to 6."""
    root = tmp_path_factory.mktemp("io")
    cfg = small_config()
    run(cfg, "train", root / "md", max_steps=4, save_checkpoints_steps=2, progress=False)
    ref = run(cfg, "train", root / "ref", max_steps=6, progress=False)
    return SimpleNamespace(cfg=cfg, md=root / "md", ref=dict(ref.losses))


@pytest.fixture
def disk(tmp_path):
    """A 16 MiB tmpfs at tmp_path/disk (unmounted afterwards); skipped where mounting is not
    permitted (it needs root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(mount: Path, free: int = 0) -> Path:
    """Fill the filesystem of ``mount`` until ``free`` bytes are left; the filler file."""
    filler = mount / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while True:
            os.write(fd, b"\0" * 4096)  # unbuffered: nothing left to fail at close
    except OSError:
        pass
    finally:
        os.close(fd)
    os.truncate(filler, max(0, filler.stat().st_size - free))
    return filler


def read_only(mount: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)


def fill_first(monkeypatch, owner, name: str, mount: Path) -> None:
    """``owner.name`` fills the disk, then does its work: the writer meets the full disk."""
    real = getattr(owner, name)

    def full_then_real(*args, **kwargs):
        fill(mount)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, full_then_real)


def clean_one_line(capfd, rc: int, pattern: str) -> str:
    out, err = capfd.readouterr()
    for noise in NOISE:
        assert noise not in out + err, (out + err)[-3000:]
    return one_line(rc, err, EXIT_USER, pattern)


def train_cli(md: Path, *extra) -> int:
    return main([str(a) for a in ["-o", md, *SMALL, "-m", "train", *extra]])


# ---- the run's writers --------------------------------------------------------------------------
def test_full_disk_at_the_checkpoint(saved, disk, capfd, monkeypatch):
    md = copy_md(saved, disk / "md")
    before = snapshot(md)
    fill_first(monkeypatch, Checkpoints, "save", disk)
    rc = train_cli(md, "--max_steps", 5)
    clean_one_line(capfd, rc, r"model-ckpt-5: cannot write the checkpoint .*(No space|ENOSPC)")
    assert snapshot(md) == before
    monkeypatch.undo()
    (disk / "filler").unlink()
    r = run(saved.cfg, "train", md, max_steps=6, progress=False)
    assert r.losses == [(5, saved.ref[5]), (6, saved.ref[6])]  # resumes exactly


def test_full_disk_at_a_tensorboard_write(saved, disk, capfd, monkeypatch):
    md = copy_md(saved, disk / "md")
    before = snapshot(md)
    fill_first(monkeypatch, Summaries, "scalars", disk)
    rc = train_cli(md, "--max_steps", 6)
    clean_one_line(capfd, rc, rf"{md}/(train|eval)\S*: cannot write \(No space .*, ENOSPC\)")
    assert snapshot(md) == before
    monkeypatch.undo()
    (disk / "filler").unlink()
    assert train_cli(md, "--max_steps", 5) == EXIT_OK


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    """A run on token shards with a trained tokenizer: its model_dir holds tokenizer/."""
    from wsjax.data.preprocess import main as preprocess_main

    root = tmp_path_factory.mktemp("tok")
    docs = "\n".join(json.dumps({"text": f"document {i} says " * 40}) for i in range(40))
    (root / "d.jsonl").write_text(docs + "\n")
    argv = ["--input", root / "d.jsonl", "--output", root / "data", "--train_tokenizer", "300"]
    assert (
        preprocess_main([str(a) for a in [*argv, "--no_progress", "--eval_fraction", "0.2"]]) == 0
    )
    data = [
        f"{s}.{k}" for s in ("train_input", "eval_input")
        for k in ("data_processor=GptTokenShardsProcessor", f"data_dir={root / 'data'}")
    ]  # fmt: skip
    md = root / "md"
    assert main([str(a) for a in ["-o", md, *SMALL, *data, "-m", "train", "--max_steps", 2]]) == 0
    assert (md / "tokenizer" / "tokenizer.json").is_file()
    return SimpleNamespace(md=md, data=data)


def test_full_disk_at_the_tokenizer_save_on_resume(tokenized, disk, capfd, monkeypatch):
    md = copy_md(tokenized, disk / "md")
    before = snapshot(md)
    fill_first(monkeypatch, trainer_module, "save_run_tokenizer", disk)
    rc = main(
        [str(a) for a in ["-o", md, *SMALL, *tokenized.data, "-m", "train", "--max_steps", 3]]
    )
    clean_one_line(capfd, rc, rf"{md}/\S*tokenizer\S*: cannot write \(No space .*, ENOSPC\)")
    assert snapshot(md) == before and (md / "tokenizer" / "tokenizer.json").is_file()
    assert not list(md.glob(".tokenizer-*"))


def test_model_dir_on_a_read_only_filesystem(saved, disk, capfd):
    md = copy_md(saved, disk / "md")
    before = snapshot(md)
    read_only(disk)
    rc = train_cli(md, "--max_steps", 5)
    clean_one_line(capfd, rc, rf"{md}: not a writable directory \(Read-only file system, EROFS\)")
    assert snapshot(md) == before


# ---- the HF export ------------------------------------------------------------------------------
def convert(md: Path, out: Path) -> int:
    return convert_main(["--from_orbax", str(md), "--to_hf", str(out)])


def loads(saved, folder: Path) -> None:
    start = load_start(folder, get_model(saved.cfg.model), None, weights_only=True)
    assert start.params is not None
    assert json.loads((folder / "config.json").read_text())["n_layer"] == 2


def test_export_onto_a_full_disk_then_again(saved, disk, capfd):
    filler = fill(disk, free=64 << 10)
    rc = convert(saved.md, disk / "hf")
    clean_one_line(capfd, rc, rf"{disk}/\S+: cannot write \(No space left on device, ENOSPC\)")
    assert not (disk / "hf").exists() and not list(disk.glob(".hf.partial-*"))
    filler.unlink()
    assert convert(saved.md, disk / "hf") == EXIT_OK
    loads(saved, disk / "hf")


@pytest.mark.parametrize("where", ["under a file", "read-only folder"])
def test_export_to_an_unwritable_place(saved, disk, capfd, tmp_path, where):
    if where == "under a file":
        (tmp_path / "file").write_text("x")
        out, pattern = (
            tmp_path / "file" / "hf",
            r"file\S*: cannot write \(Not a directory, ENOTDIR\)",
        )
    else:
        read_only(disk)
        out, pattern = disk / "hf", rf"{disk}\S*: cannot write \(Read-only file system, EROFS\)"
    clean_one_line(capfd, convert(saved.md, out), pattern)
    assert not out.exists()
    assert export_run(saved.md, tmp_path / "ok") == tmp_path / "ok"  # the run still exports


# ---- wsjax-preprocess --output ------------------------------------------------------------------
def preprocess(tmp_path: Path, out: Path) -> int:
    from wsjax.data.preprocess import main as preprocess_main

    src = tmp_path / "d.jsonl"
    if not src.exists():
        docs = [json.dumps({"text": f"words of document {i} " * 200}) for i in range(200)]
        src.write_text("\n".join(docs) + "\n")
    argv = ["--input", src, "--output", out, "--train_tokenizer", "300", "--no_progress"]
    return preprocess_main([str(a) for a in argv])


@pytest.mark.parametrize("where", ["full disk", "under a file", "read-only"])
def test_preprocess_output_unwritable_is_one_line(disk, capfd, tmp_path, where):
    out = disk / "out"
    if where == "full disk":
        filler = fill(disk, free=8 << 10)
        pattern = rf"{disk}/\S+: cannot write \(No space left on device, ENOSPC\)"
    elif where == "under a file":
        (disk / "file").write_text("x")
        out, pattern = disk / "file" / "out", r"file\S*: cannot write \(Not a directory, ENOTDIR\)"
    else:
        read_only(disk)
        pattern = rf"{disk}\S*: cannot write \(Read-only file system, EROFS\)"
    clean_one_line(capfd, preprocess(tmp_path, out), pattern)
    assert not out.exists() and not list(disk.glob(".out.partial-*"))
    if where == "full disk":  # once there is space, the same command writes it whole
        filler.unlink()
        assert preprocess(tmp_path, out) == EXIT_OK
        assert json.loads((out / "meta.json").read_text())["splits"]["train"]["tokens"] > 0


def test_preprocess_removes_the_staging_folder_a_killed_writer_left(tmp_path, capfd):
    stale = tmp_path / ".out.partial-999999999"  # no such process
    (stale / "train").mkdir(parents=True)
    assert preprocess(tmp_path, tmp_path / "out") == EXIT_OK
    assert f"removing {stale}, left by an interrupted wsjax-preprocess" in capfd.readouterr().out
    assert not stale.exists() and (tmp_path / "out" / "meta.json").is_file()
    shutil.rmtree(tmp_path / "out")
