"""notebooks/train_tiny.ipynb runs headless (a few steps) and leaves its loss plot."""

from __future__ import annotations

import nbformat
from nbclient import NotebookClient
from train_helpers import REPO, SMALL


def test_notebook_trains_and_plots(tmp_path, monkeypatch):
    monkeypatch.setenv("WSJAX_NOTEBOOK_STEPS", "4")
    monkeypatch.setenv("WSJAX_NOTEBOOK_OVERRIDES", " ".join(SMALL))
    monkeypatch.setenv("WSJAX_NOTEBOOK_MODEL_DIR", str(tmp_path / "md"))
    nb = nbformat.read(REPO / "notebooks" / "train_tiny.ipynb", as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    text = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "final loss" in text and "after 4 steps" in text
    png = tmp_path / "md" / "loss.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "md" / "model-ckpt-4").is_dir()
