"""The fault catalogue, SIGKILL during the two writers outside a training run: the HF export
(``python -m wsjax.interop.convert``) and ``wsjax-preprocess --output``.

The export's moments are exact: the export runs under tests/integration/pause_probe.py, which
stops it at a named call (before its weights are written, after, after publishing) until the
test kills or signals it. Preprocess's are found by polling the filesystem while it runs (its
staging folder appears, its shards are being written, its output is published), never by
sleeping for a guessed time. After the kill the output is absent or whole, never partial under its
final name; the same command run again succeeds (the leftover staging folder removed, and for
preprocess named in one line) and its result loads.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, small_config
from tests.integration.test_faults_kill import poll
from wsjax.errors import EXIT_PREEMPTED
from wsjax.interop.load import load_start
from wsjax.models import get_model
from wsjax.train import run

pytestmark = pytest.mark.slow
# a 32768-token vocabulary: ~17 MB of weights, so that writing them takes a moment to catch
BIG_VOCAB = [f"{s}.vocab_size=32768" for s in ("model", "train_input", "eval_input")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    md = tmp_path_factory.mktemp("export") / "md"
    run(small_config(*BIG_VOCAB), "train", md, max_steps=1, progress=False)
    return md


def staged(parent: Path, name: str, inside: str | None = None):
    """True once the writer's staging folder ``.<name>.partial-<pid>`` exists (holding
    ``inside``, when given)."""

    def seen() -> bool:
        for p in parent.glob(f".{name}.partial-*"):
            if inside is None or (p / inside).exists():
                return True
        return False

    return seen


def published(out: Path):
    return lambda: (out / "config.json").is_file() or (out / "meta.json").is_file()


def writer(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_when(proc: subprocess.Popen, seen) -> bool:
    hit = poll(proc, seen, timeout=300)
    proc.kill()
    proc.communicate()
    return hit


# moment -> the call the export pauses at (tests/integration/pause_probe.py)
EXPORT_MOMENTS = {
    "staging created": ("wsjax.interop.hf:save_file", "before"),
    "weights written, not published": ("wsjax.interop.hf:save_file", "after"),
    "published": ("wsjax.interop.export:export_run", "after"),
}


def paused_export(trained: Path, out: Path, moment: str) -> subprocess.Popen:
    """The export of ``trained`` to ``out``, paused at ``moment`` (once its marker exists)."""
    marker = out.parent / "paused"
    target, when = EXPORT_MOMENTS[moment]
    export = ["wsjax.interop.convert", "--from_orbax", str(trained), "--to_hf", str(out)]
    proc = writer("tests.integration.pause_probe", str(marker), target, when, "--", *export)
    assert poll(proc, marker.exists, timeout=300), proc.communicate()
    return proc


@pytest.mark.parametrize("moment", list(EXPORT_MOMENTS))
def test_sigkill_during_the_hf_export_then_again(trained, tmp_path, moment):
    out = tmp_path / "hf"
    cmd = ["wsjax.interop.convert", "--from_orbax", str(trained), "--to_hf", str(out)]
    proc = paused_export(trained, out, moment)
    proc.kill()
    proc.communicate()
    assert out.exists() == (moment == "published")
    if out.exists():  # renamed into place whole, or not at all
        assert {"config.json", "model.safetensors", "generation_config.json"} <= {
            p.name for p in out.iterdir()
        }
        return
    again = writer(*cmd)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert not list(tmp_path.glob(".hf.partial-*"))
    model = get_model(small_config(*BIG_VOCAB).model)
    assert load_start(out, model, None, weights_only=True).params is not None
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 32768


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_the_hf_export_is_one_line_exit_5(trained, tmp_path, sig):
    out = tmp_path / "hf"
    cmd = ["wsjax.interop.convert", "--from_orbax", str(trained), "--to_hf", str(out)]
    proc = paused_export(trained, out, "weights written, not published")
    assert staged(tmp_path, "hf", "model.safetensors")()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: {sig.name}: the conversion stopped; rerun it")
    assert not out.exists()
    again = writer(*cmd)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0 and not list(tmp_path.glob(".hf.partial-*")), err
    assert (out / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """About 8 MB of jsonl and a tokenizer.json trained on a slice of it."""
    root = tmp_path_factory.mktemp("corpus")
    words = " ".join(f"word{i % 997}" for i in range(2000))
    (root / "big.jsonl").write_text(
        "\n".join(json.dumps({"text": f"{i} {words}"}) for i in range(500)) + "\n"
    )
    (root / "small.jsonl").write_text(json.dumps({"text": words}) + "\n")
    args = ["--input", root / "small.jsonl", "--output", root / "tok", "--train_tokenizer", 300]
    subprocess.run(
        [sys.executable, "-m", "wsjax.data.preprocess", *map(str, args), "--no_progress"],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    return root / "big.jsonl", root / "tok" / "tokenizer.json"


PREPROCESS_MOMENTS = {
    "staging created": lambda out: staged(out.parent, out.name),
    "shards being written": lambda out: staged(out.parent, out.name, "train/00000.bin"),
    "published": published,
}


@pytest.mark.parametrize("moment", list(PREPROCESS_MOMENTS))
def test_sigkill_during_preprocess_then_again(corpus, tmp_path, moment):
    data, tokenizer = corpus
    out = tmp_path / "out"
    cmd = ["wsjax.data.preprocess", "--input", str(data), "--output", str(out)]
    cmd += ["--tokenizer", str(tokenizer), "--no_progress", "--shard_tokens", "100000"]
    hit = kill_when(writer(*cmd), PREPROCESS_MOMENTS[moment](out))
    assert hit, f"preprocess ended before the moment '{moment}' was seen"
    left = list(tmp_path.glob(".out.partial-*"))
    if out.exists():
        assert (out / "meta.json").is_file()  # published whole: meta.json and its shards
        meta = json.loads((out / "meta.json").read_text())
        for shard in meta["splits"]["train"]["shards"]:
            assert (out / shard["file"]).stat().st_size == shard["tokens"] * 2
        cmd.append("--overwrite")
    again = writer(*cmd)
    stdout, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    for stale in left:
        assert f"removing {stale}, left by an interrupted wsjax-preprocess" in stdout
    assert not list(tmp_path.glob(".out.partial-*"))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["train"]["tokens"] == sum(
        os.path.getsize(out / s["file"]) // 2 for s in meta["splits"]["train"]["shards"]
    )
