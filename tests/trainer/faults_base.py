"""What the fault tests share: the CLI in-process, the one-line check, and snapshots of a
model_dir's checkpoints (to show a fault damaged nothing)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from types import SimpleNamespace

from tests.helpers import small_config
from wsjax.train import main, run


def cli(capsys, *argv) -> tuple[int, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    return rc, capsys.readouterr().err


def one_line(rc: int, err: str, code: int, pattern: str) -> str:
    assert rc == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def snapshot(md: Path) -> dict:
    """Every file of every committed checkpoint, with its bytes' size and mtime."""
    return {
        str(p.relative_to(md)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(md.glob("model-ckpt-*/**/*"))
        if p.is_file()
    }


def unaside(snap: dict) -> dict:
    """``snap`` with set-aside folder names (``model-ckpt-<step>.corrupt-<time>``) back under
    their own name: the same files, none deleted."""
    return {re.sub(r"\.corrupt-[^/]+", "", k): v for k, v in snap.items()}


def copy_md(saved, dest: Path) -> Path:
    shutil.copytree(saved.md, dest)
    return dest


def saved_run(root: Path) -> SimpleNamespace:
    """``root``/md: checkpoints at steps 2 and 4 of the small config (``.cfg``, ``.md``)."""
    cfg = small_config()
    run(cfg, "train", root / "md", max_steps=4, save_checkpoints_steps=2, progress=False)
    return SimpleNamespace(cfg=cfg, md=root / "md")
