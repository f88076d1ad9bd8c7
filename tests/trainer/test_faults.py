"""The fault catalogue, in-process: config, data, checkpoint and runtime faults.

Every case asserts the exit code of its class (wsjax.errors: 2 user error, 4 non-finite), that
the message is one line starting with "error: " with no traceback, and, where a model_dir held
checkpoints before the fault, that they are unchanged and still restore; the resume cases also
compare losses bitwise with an uninterrupted run. Signals and kills are in test_faults_kill.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import SMALL
from tests.trainer.faults_base import cli, one_line
from wsjax.errors import EXIT_USER
from wsjax.train import main

# ---- config and flags: found before anything is built ------------------------------------------
CONFIG_FAULTS = [
    (["--max_steps", "0"], r"--max_steps 0 is invalid: must be >= 1"),
    (["--max_steps", "-5"], r"--max_steps -5 is invalid"),
    (["--steps", "0"], r"--steps 0 is invalid"),
    (["--steps", "2", "--max_steps", "3"], r"--steps and --max_steps exclude each other"),
    (["--keep_checkpoint_max", "-1"], r"--keep_checkpoint_max -1 is invalid: must be >= 0"),
    (["--save_summary_steps", "0"], r"--save_summary_steps 0 is invalid"),
    (["--save_checkpoints_steps", "-2"], r"--save_checkpoints_steps -2 is invalid"),
    (["runconfig.on_nonfinite=maybe"], r"runconfig.on_nonfinite='maybe'.*stop \| skip"),
    (["runconfig.max_consecutive_skips=0"], r"runconfig.max_consecutive_skips"),
    (["model.num_hidden_layerz=2"], r"num_hidden_layerz"),
    (["-m", "predict"], r"invalid choice: 'predict'"),
    (["--max_steps", "many"], r"invalid int value: 'many'"),
    (["-p", "/nonexistent/params.yaml"], r"cannot read params file"),
    (["runconfig.eval_steps=0", "-m", "train_and_eval"], r"eval_steps <= 0 .*full pass"),
]


@pytest.mark.parametrize("argv,pattern", CONFIG_FAULTS, ids=[" ".join(a) for a, _ in CONFIG_FAULTS])
def test_config_fault(capsys, tmp_path, argv, pattern, own_compile_dir):
    md = tmp_path / "md"
    rc, err = cli(capsys, "-o", md, *SMALL, *argv)
    one_line(rc, err, EXIT_USER, pattern)
    assert not list(md.glob("model-ckpt-*")) and not list(md.glob("compile_*/compile_log.json"))


def test_model_dir_is_a_file(capsys, tmp_path):
    (tmp_path / "f").write_text("")
    one_line(
        *cli(capsys, "-o", tmp_path / "f" / "md", "--validate_only"), EXIT_USER, "cannot create"
    )


def test_overrides_anywhere_and_cerebras_hardware_flags(capsys, tmp_path):
    """Overrides before, between and after options; --cs_ip / --device accepted with a note."""
    md = tmp_path / "md"
    argv = [SMALL[0], "-o", md, *SMALL[1:5], "--validate_only", *SMALL[5:], "--cs_ip", "1.2.3.4"]
    rc = main([str(a) for a in [*argv, "--device", "CSX", "model.num_hidden_layers=3"]])
    out = capsys.readouterr().out
    assert rc == 0 and "--cs_ip 1.2.3.4: a Cerebras hardware flag, ignored" in out
    eff = json.loads((md / "plan.json").read_text())
    assert eff["host_total"] > 0
    assert "num_hidden_layers: 3" in (md / "train" / "params_train.yaml").read_text()


# ---- data: found before weights exist or anything compiles ---------------------------------------
def write_shards(
    root: Path, tokens: int = 4096, splits=("train", "eval"), vocab: int = 512
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    meta = {"vocab_size": vocab, "eos_id": 0, "dtype": "uint16", "splits": {}}
    rng = np.random.default_rng(0)
    for split in ("train", "eval"):
        (root / split).mkdir(exist_ok=True)
        rng.integers(0, vocab, tokens).astype(np.uint16).tofile(root / split / "00000.bin")
        shards = [{"file": f"{split}/00000.bin", "tokens": tokens}]
        meta["splits"][split] = {"tokens": tokens, "documents": 1, "shards": shards}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def _meta_edit(**changes):
    def edit(root: Path) -> None:
        meta = json.loads((root / "meta.json").read_text())
        for key, value in changes.items():
            if key == "tokens":
                meta["splits"]["train"]["shards"][0]["tokens"] = value
            else:
                meta[key] = value
        (root / "meta.json").write_text(json.dumps(meta))

    return edit


DATA_FAULTS = {
    "missing data_dir": (lambda root: shutil.rmtree(root), "train", r"data_dir .* does not exist"),
    "no eval split": (
        lambda root: _meta_edit(
            splits={"train": json.loads((root / "meta.json").read_text())["splits"]["train"]}
        )(root),
        "train_and_eval",
        r"has no 'eval' split",
    ),  # fmt: skip
    "garbage meta.json": (
        lambda root: (root / "meta.json").write_text("{oops"),
        "train",
        r"meta.json is not valid JSON",
    ),
    "tokens: lots": (_meta_edit(tokens="lots"), "train", r"tokens = 'lots' is not an integer"),
    "vocab_size: big": (_meta_edit(vocab_size="big"), "train", r"vocab_size = 'big' is not an"),
    "truncated shard": (
        lambda root: (root / "train" / "00000.bin").write_bytes(b"\x01\x00" * 100),
        "train",
        r"100 tokens|200 bytes is not 4096",
    ),
    "token id >= vocab": (
        lambda root: np.full(4096, 9999, np.uint16).tofile(root / "train" / "00000.bin"),
        "train",
        r"token id 9999 at position 0 >= vocab_size 512",
    ),
}


@pytest.mark.parametrize("fault", list(DATA_FAULTS))
def test_data_fault_found_before_init_and_compile(capsys, tmp_path, fault):
    damage, mode, pattern = DATA_FAULTS[fault]
    data = write_shards(tmp_path / "data")
    damage(data)
    md = tmp_path / "md"
    data_args = [
        f"{s}.{k}" for s in ("train_input", "eval_input")
        for k in ("data_processor=GptTokenShardsProcessor", f"data_dir={data}")
    ]  # fmt: skip
    one_line(*cli(capsys, "-o", md, "-m", mode, *SMALL, *data_args), EXIT_USER, pattern)
    log = (md / "train" / "run.log").read_text()
    assert "weight initialization" not in log and "Compiled" not in log


def _tfrecord(tmp_path: Path) -> Path:
    from wsjax.data.tfrecord import write_tfrecords

    rng = np.random.default_rng(0)
    examples = [
        {"input_ids": ids, "input_mask": [1] * 32, "labels": ids}
        for ids in rng.integers(1, 500, (8, 32)).tolist()
    ]
    path = tmp_path / "tf" / "x.tfrecord"
    path.parent.mkdir()
    write_tfrecords(path, examples)
    return path


@pytest.mark.parametrize(
    "offset,pattern",
    [(40, r"x\.tfrecord record 0: payload CRC mismatch"), (3, r"x\.tfrecord record 0: bad length")],
    ids=["payload bit", "length bit"],
)
def test_tfrecord_bit_flip_is_one_line_naming_file_and_record(capsys, tmp_path, offset, pattern):
    path = _tfrecord(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x04  # one bit of a token (payload) or of the length header
    path.write_bytes(bytes(raw))
    data_args = [
        "train_input.data_processor=GptTfRecordsProcessor",
        f"train_input.data_dir={path.parent}",
    ]
    one_line(*cli(capsys, "-o", tmp_path / "md", *SMALL, *data_args), EXIT_USER, pattern)


# ---- preprocess --------------------------------------------------------------------------------
def _preprocess(capsys, *argv) -> tuple[int, str, str]:
    from wsjax.data.preprocess import main as preprocess_main

    rc = preprocess_main([str(a) for a in [*argv, "--train_tokenizer", "300", "--no_progress"]])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_preprocess_invalid_utf8_stops_and_leaves_nothing(capsys, tmp_path):
    (tmp_path / "a.txt").write_bytes(b"hello world " * 50 + b"\xff\xfe bad bytes")
    rc, _, err = _preprocess(capsys, "--input", tmp_path / "a.txt", "--output", tmp_path / "out")
    one_line(rc, err, EXIT_USER, r"a\.txt: invalid UTF-8 \(byte 0xff\).*--invalid_utf8 replace")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_preprocess_invalid_utf8_replace_counts(capsys, tmp_path):
    (tmp_path / "a.txt").write_bytes(b"hello world " * 50 + b"\xff\xfe bad bytes")
    out = tmp_path / "out"
    rc, stdout, _ = _preprocess(
        capsys, "--input", tmp_path / "a.txt", "--output", out, "--invalid_utf8", "replace"
    )
    assert rc == 0 and "replaced 2 invalid UTF-8 sequences" in stdout  # 0xff and 0xfe
    assert json.loads((out / "meta.json").read_text())["splits"]["train"]["tokens"] > 0


def test_preprocess_empty_eval_split_warns(capsys, tmp_path):
    docs = "\n".join(json.dumps({"text": f"document number {i} " * 20}) for i in range(4))
    (tmp_path / "d.jsonl").write_text(docs + "\n")
    argv = ["--input", tmp_path / "d.jsonl", "--output", tmp_path / "out"]
    rc, stdout, _ = _preprocess(capsys, *argv, "--eval_fraction", "0.01")
    assert rc == 0 and "eval split came out empty" in stdout
    assert "eval" not in json.loads((tmp_path / "out" / "meta.json").read_text())["splits"]


def test_failed_preprocess_keeps_the_previous_output(capsys, tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"text": f"text {i} " * 30}) for i in range(8)) + "\n")
    out = tmp_path / "out"
    assert _preprocess(capsys, "--input", good, "--output", out)[0] == 0
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine " * 30}) + "\n{not json\n")
    rc, _, err = _preprocess(capsys, "--input", good, bad, "--output", out, "--overwrite")
    one_line(rc, err, EXIT_USER, r"bad\.jsonl:2: invalid JSON")
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not list(tmp_path.glob(".out*"))


def test_tfrecord_of_another_sequence_length_fails_before_init(capsys, tmp_path):
    """The first batch is read before weights or compile: a wrong max_sequence_length costs
    seconds (the record's own CRCs are fine)."""
    from wsjax.data.tfrecord import write_tfrecords

    ids = np.random.default_rng(0).integers(1, 500, (8, 16)).tolist()
    (tmp_path / "tf").mkdir()
    write_tfrecords(
        tmp_path / "tf" / "x.tfrecord",
        ({"input_ids": i, "input_mask": [1] * 16, "labels": i} for i in ids),
    )
    data = [
        "train_input.data_processor=GptTfRecordsProcessor",
        f"train_input.data_dir={tmp_path / 'tf'}",
    ]
    md = tmp_path / "md"
    rc, err = cli(capsys, "-o", md, *SMALL, *data)
    one_line(rc, err, EXIT_USER, r"x\.tfrecord record \d+: 'input_ids' has 16 values, max_seq")
    assert "weight initialization" not in (md / "train" / "run.log").read_text()
