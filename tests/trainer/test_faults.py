"""The fault catalogue, in-process: config, data, checkpoint and runtime faults.

Every case asserts the exit code of its class (wsjax.errors: 2 user error, 4 non-finite), that
the message is one line starting with "error: " with no traceback, and, where a model_dir held
checkpoints before the fault, that they are unchanged and still restore; the resume cases also
compare losses bitwise with an uninterrupted run. Signals and kills are in test_faults_kill.py.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.helpers import SMALL, small_config
from wsjax.checkpoint import Checkpoints
from wsjax.errors import EXIT_NONFINITE, EXIT_USER
from wsjax.interop.load import load_start
from wsjax.models import get_model
from wsjax.optim import make_optimizer
from wsjax.train import build_parser, main, run


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """model_dir "md": checkpoints at steps 2 and 4; "ref": the same run straight to 6 steps."""
    root = tmp_path_factory.mktemp("faults")
    cfg = small_config()
    first = run(cfg, "train", root / "md", max_steps=4, save_checkpoints_steps=2, progress=False)
    ref = run(cfg, "train", root / "ref", max_steps=6, progress=False)
    assert first.losses == ref.losses[:4]
    return SimpleNamespace(cfg=cfg, md=root / "md", ref=dict(ref.losses))


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


def copy_md(saved, dest: Path) -> Path:
    shutil.copytree(saved.md, dest)
    return dest


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
def test_config_fault(capsys, tmp_path, argv, pattern):
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
    assert set(snapshot(md)) == set(before)  # nothing deleted


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
