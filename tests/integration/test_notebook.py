"""notebooks/train_tiny.ipynb runs headless (a few steps): loss and eval plot, the device-bytes
picture at two depths, and generated samples from the trained model."""

from __future__ import annotations

import re

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers import REPO, SMALL

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # trains, measures two depths and generates: about 150 s on 2 cores
def test_notebook_trains_plots_and_generates(tmp_path, monkeypatch):
    from wsjax.data.textio import train_bpe

    # the synthetic data of SMALL has no tokenizer: hand the notebook a small byte-level BPE
    tok = train_bpe(["import os\nclass Config:\n    def __init__(self):\n"] * 10, 300)
    tok.save(str(tmp_path / "tokenizer.json"))
    monkeypatch.setenv("MPLBACKEND", "Agg")  # headless; in Jupyter the plots display inline
    monkeypatch.setenv("WSJAX_NOTEBOOK_STEPS", "4")
    monkeypatch.setenv("WSJAX_NOTEBOOK_OVERRIDES", " ".join(SMALL))
    monkeypatch.setenv("WSJAX_NOTEBOOK_MODEL_DIR", str(tmp_path / "md"))
    monkeypatch.setenv("WSJAX_NOTEBOOK_TOKENIZER", str(tmp_path / "tokenizer.json"))
    nb = nbformat.read(REPO / "notebooks" / "train_tiny.ipynb", as_version=4)
    assert "Agg" not in "".join(c.source for c in nb.cells)  # Jupyter users see their plots
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    text = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "final loss" in text and "after 4 steps" in text
    for name in ("loss.png", "device_bytes.png"):
        assert (tmp_path / "md" / name).read_bytes()[:8] == PNG
    assert (tmp_path / "md" / "model-ckpt-4").is_dir()

    # two depths measured; the resident step holds more at twice the depth (all its weights)
    rows = re.findall(r"(\d+) layers: streamed peak ([\d.]+) MiB, resident ([\d.]+) MiB", text)
    assert [int(r[0]) for r in rows] == [2, 4]
    assert float(rows[1][2]) > float(rows[0][2]) > 0 and all(float(r[1]) > 0 for r in rows)

    # every prompt printed with its continuation
    for prompt in ("'import os\\n'", "'def main('"):
        assert f"--- prompt: {prompt}" in text
    assert re.search(r"--- \d+ tokens, [\d.]+ tokens/s", text)
