"""``wsjax.train.run`` in-process: resume exactness, the model_dir artifacts, modes, bad input."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from tests.helpers import small_config
from wsjax.errors import CheckpointError, ConfigError, PlanError, WsjaxError
from wsjax.train import run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A: 6 steps straight. B: 3 steps (train_and_eval), then on to 6 (resumed)."""
    cfg = small_config()
    root = tmp_path_factory.mktemp("runs")
    a = run(cfg, "train", root / "a", max_steps=6, progress=False)
    b1 = run(cfg, "train_and_eval", root / "b", max_steps=3, progress=False)
    b2 = run(cfg, "train", root / "b", max_steps=6, progress=False)
    return cfg, a, b1, b2


def test_resumed_run_equals_uninterrupted(runs):
    _, a, b1, b2 = runs
    assert [s for s, _ in b2.losses] == [4, 5, 6]
    assert b1.losses + b2.losses == a.losses  # bitwise: same batches, same rng, same state
    assert b2.final_loss == a.final_loss
    assert a.final_loss < a.losses[0][1]


def test_model_dir_has_every_artifact(runs):
    _, a, _, _ = runs
    md = a.model_dir
    assert a.compile_dir.name.startswith("compile_")  # where it goes: test_compile_dir_...
    log = json.loads((a.compile_dir / "compile_log.json").read_text())
    names = {r["name"] for r in log["executables"]}
    # the tiny config keeps VJP residuals (recompute: false): its block executables are these
    assert {"block_fwd_save", "block_bwd_saved", "head_train", "update/block"} <= names
    assert all(r["flops"] > 0 for r in log["executables"] if r["name"] == "block_fwd_save")
    perf = json.loads((md / "performance" / "performance.json").read_text())
    assert perf["total_samples"] == 6 * 4 and perf["samples_per_sec"] > 0
    assert perf["est_samples_per_sec"] > 0 and perf["compile_time"] > 0
    assert perf["programming_time"] > 0 and isinstance(perf["suspected_input_bottleneck"], bool)
    # keep_checkpoint_max=2 of the checkpoints at 3 and 6
    assert sorted(p.name for p in md.glob("model-ckpt-*")) == ["model-ckpt-3", "model-ckpt-6"]
    eff = yaml.safe_load((md / "train" / "params_train.yaml").read_text())
    assert eff["model"]["num_hidden_layers"] == 2 and eff["runconfig"]["max_steps"] == 6
    assert json.loads((md / "plan.json").read_text())["host_total"] > 0
    assert "global_step = 6, loss =" in (md / "train" / "run.log").read_text()


def test_tensorboard_train_and_eval_scalars(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, a, b1, _ = runs
    train = EventAccumulator(str(a.model_dir / "train")).Reload().Tags()["scalars"]
    for tag in ("loss", "lr", "grad_norm", "throughput/samples_per_sec", "throughput/mfu"):
        assert tag in train
    assert "stream/h2d_bytes" in train and "memory/device_peak_bytes" in train
    assert [e.value for e in EventAccumulator(str(a.model_dir / "train")).Reload().Scalars(
        "skipped_updates")] == [0.0] * 6  # fmt: skip
    ev = EventAccumulator(str(b1.model_dir / "eval")).Reload()
    assert {"loss", "perplexity", "accuracy"} <= set(ev.Tags()["scalars"])
    assert [e.step for e in ev.Scalars("loss")] == [3]  # train_and_eval: after the checkpoint
    # the tags Cerebras writes, so its dashboards carry over: the same numbers
    for ours, cerebras in (("perplexity", "eval/lm_perplexity"), ("accuracy", "eval/accuracy")):
        assert [e.value for e in ev.Scalars(cerebras)] == [e.value for e in ev.Scalars(ours)]


def test_eval_and_eval_all(runs):
    cfg, _, _, b2 = runs
    latest = run(cfg, "eval", b2.model_dir)
    assert [e["step"] for e in latest.evals] == [6]
    e = latest.evals[0]
    assert e["perplexity"] == pytest.approx(2.718281828 ** e["loss"], rel=1e-6)
    assert 0.0 <= e["accuracy"] <= 1.0
    every = run(cfg, "eval_all", b2.model_dir)
    assert [e["step"] for e in every.evals] == [3, 6]
    assert every.evals[-1]["loss"] == pytest.approx(e["loss"])


def test_max_steps_already_reached_does_nothing(runs):
    cfg, a, _, _ = runs
    before = {p.name: p.stat().st_mtime_ns for p in a.model_dir.glob("model-ckpt-*")}
    r = run(cfg, "train", a.model_dir, max_steps=6)
    assert "already reached" in r.message and r.global_step == 6
    assert {p.name: p.stat().st_mtime_ns for p in a.model_dir.glob("model-ckpt-*")} == before


def test_save_initial_checkpoint_holds_the_initial_weights(runs, tmp_path):
    """runconfig.save_initial_checkpoint: model-ckpt-0, through the normal checkpoint path
    (restored with its digest verified), holds the initialised weights at data position 0, and
    training goes on with the same step-1 loss as without it; a run started from it repeats
    that step 1 exactly."""
    import jax
    import numpy as np

    from wsjax.checkpoint import Checkpoints
    from wsjax.engine import StreamingEngine
    from wsjax.models import get_model

    _, plain, _, _ = runs
    cfg = small_config("runconfig.save_initial_checkpoint=true")
    a = run(cfg, "train", tmp_path / "a", max_steps=1, progress=False)
    names = sorted(p.name for p in a.model_dir.glob("model-ckpt-*"))
    assert names == ["model-ckpt-0", "model-ckpt-1"] and a.losses == plain.losses[:1]
    model = get_model(cfg.model)
    ckpts = Checkpoints(a.model_dir)
    try:
        params, _, meta = ckpts.restore(0, model.param_shapes(), None)
    finally:
        ckpts.close()
    assert meta["step"] == 0 and meta["loader"]["batch"] == 0
    initial = StreamingEngine(model, cfg).params_tree()  # the seed's weights, before any update
    jax.tree.map(np.testing.assert_array_equal, params, initial)
    b = run(cfg, "train", tmp_path / "b", max_steps=1, progress=False,
            checkpoint_path=a.model_dir / "model-ckpt-0")  # fmt: skip
    assert b.losses == a.losses  # bitwise: the same weights, optimizer state and batch


def test_bad_inputs_fail_cleanly_and_leave_checkpoints(runs, tmp_path):
    cfg, a, _, _ = runs
    md = a.model_dir
    before = {p.name: p.stat().st_mtime_ns for p in md.glob("model-ckpt-*")}
    with pytest.raises(ConfigError, match="unknown mode 'predict'; valid modes: train, eval"):
        run(cfg, "predict", md)
    with pytest.raises(CheckpointError, match="no checkpoint to evaluate"):
        run(cfg, "eval", tmp_path / "empty")
    with pytest.raises(CheckpointError, match="does not exist"):
        run(cfg, "train", tmp_path / "c", checkpoint_path=tmp_path / "missing")
    wide = small_config("model.hidden_size=32")
    with pytest.raises(CheckpointError, match=r"parameter \S+ has shape .*expects"):
        run(wide, "train", tmp_path / "d", checkpoint_path=md / "model-ckpt-6")
    with pytest.raises(CheckpointError, match=r"parameter \S+ has shape"):
        run(wide, "train", md)  # resuming md with another shape
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="model_dir .*file/md: cannot create it"):
        run(cfg, "train", tmp_path / "file" / "md")
    huge = small_config("model.hidden_size=16384", "model.filter_size=65536", "model.num_heads=64")
    with pytest.raises(PlanError, match="does not fit"):
        run(huge, "train", tmp_path / "e")
    assert {p.name: p.stat().st_mtime_ns for p in md.glob("model-ckpt-*")} == before


def test_lock_names_the_holder(runs):
    from wsjax.trainer.run_dir import ModelDir

    cfg, a, _, _ = runs
    holder = ModelDir(a.model_dir)
    fd = os.open(a.model_dir / ".lock", os.O_RDWR)
    import fcntl

    try:  # another process's lock: flock on a separate open file description
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.pwrite(fd, b"424242\n", 0)
        with pytest.raises(WsjaxError, match="in use by another run \\(pid 424242\\)"):
            run(cfg, "eval", a.model_dir)
    finally:
        os.close(fd)
    holder.lock()  # free again once released
    holder.unlock()


def test_validate_only_and_compile_only(tmp_path, own_compile_dir):
    cfg = small_config()
    v = run(cfg, "train", tmp_path / "v", validate_only=True)
    assert (tmp_path / "v" / "plan.json").is_file()
    assert not list((tmp_path / "v").glob("compile_*")) and "validate_only" in v.message
    c = run(cfg, "train", tmp_path / "c", compile_only=True)
    assert (c.compile_dir / "compile_log.json").is_file()
    perf = json.loads((tmp_path / "c" / "performance" / "performance.json").read_text())
    assert perf["est_samples_per_sec"] > 0 and perf["compile_time"] > 0
    assert not list((tmp_path / "c").glob("model-ckpt-*"))


def _sources(result) -> set[str]:
    """Where each executable of the run's compile log came from: compiled or loaded (disk)."""
    log = json.loads((result.compile_dir / "compile_log.json").read_text())
    return {e["extra"]["source"] for e in log["executables"]}


def test_compile_dir_is_shared_by_runs_in_other_model_dirs(tmp_path, own_compile_dir):
    """The default is the model_dir; --compile_dir (or runconfig.compile_dir) moves the
    compile_<checksum>/ folder out of it, and a run of the same config in another fresh
    model_dir loads every executable from there, to the same losses bit for bit."""
    cfg, shared = small_config(), tmp_path / "shared"
    alone = run(cfg, "train", tmp_path / "alone", max_steps=2, progress=False)
    assert alone.compile_dir.parent == tmp_path / "alone" and _sources(alone) == {"compiled"}
    first = run(cfg, "train", tmp_path / "a", max_steps=2, compile_dir=shared, progress=False)
    assert first.compile_dir.parent == shared and _sources(first) == {"compiled"}
    keyed = small_config(f"runconfig.compile_dir={shared}")
    second = run(keyed, "train", tmp_path / "b", max_steps=2, progress=False)
    assert second.compile_dir == first.compile_dir and _sources(second) == {"disk"}
    assert not list(tmp_path.glob("[ab]/compile_*"))
    assert second.losses == first.losses == alone.losses


def test_compile_dir_flag_then_key_then_environment(tmp_path, monkeypatch):
    from wsjax.trainer.run_dir import COMPILE_DIR_ENV, compile_root

    monkeypatch.delenv(COMPILE_DIR_ENV, raising=False)
    assert compile_root(None, None) is None  # the model_dir
    monkeypatch.setenv(COMPILE_DIR_ENV, "/env")
    assert compile_root(None, None) == "/env"
    assert compile_root(None, "/key") == "/key"
    assert compile_root(tmp_path, "/key") == str(tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="compile dir .*file/compile_.*--compile_dir"):
        run(small_config(), "train", tmp_path / "md", max_steps=1, compile_dir=tmp_path / "file")
    assert not list((tmp_path / "md").glob("model-ckpt-*"))


def test_starts_from_a_huggingface_checkpoint(tmp_path):
    """--checkpoint_path of a HF GPT-J folder + --is_pretrained_checkpoint: the run starts from
    those weights (step 0): after one step at a negligible learning rate the checkpoint still
    holds them, where a fresh init would differ completely."""
    import jax
    import numpy as np

    from wsjax.interop.hf import export_hf
    from wsjax.interop.load import load_start
    from wsjax.models import get_model

    cfg = small_config("optimizer.learning_rate=1e-12")
    model = get_model(cfg.model)
    hf_params = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(123)))
    export_hf(cfg.model, hf_params, tmp_path / "hf")
    r = run(
        cfg,
        "train",
        tmp_path / "md",
        max_steps=1,
        checkpoint_path=tmp_path / "hf",
        is_pretrained_checkpoint=True,
        progress=False,
    )
    assert r.global_step == 1 and r.losses[0][0] == 1
    saved = load_start(r.checkpoints[-1], model, None, weights_only=True).params
    diffs = jax.tree.leaves(
        jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), saved, hf_params)
    )
    assert max(diffs) < 1e-6


def test_validate_only_plans_gptj_6b_without_allocating(tmp_path):
    """--validate_only on GPT-J 6B from this CPU machine: the plan is written (host terms at
    fp32 master + Adam + bf16 copy + fp32 grads = 18 bytes a parameter) in a process that never
    holds more than a few hundred MB."""
    import subprocess
    import sys

    from tests.helpers import REPO

    md = tmp_path / "md"
    argv = ["-p", str(REPO / "configs" / "params_gptj_6B.yaml"), "-o", str(md), "--validate_only"]
    argv += ["streaming.device_memory_gb=80", "streaming.host_memory_gb=128"]  # its target
    # The child prints its own peak RSS (KiB) as its last stderr line: VmHWM belongs to the
    # process image (ru_maxrss would carry over the forking parent's size across exec).
    code = (
        "import re, sys\n"
        "from wsjax.train import main\n"
        f"rc = main({argv!r})\n"
        "status = open('/proc/self/status').read()\n"
        "print(re.search(r'VmHWM:\\s+(\\d+)', status).group(1), file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads((md / "plan.json").read_text())
    n = 6_050_882_784
    host = plan["host"]
    assert host["master_fp32"] == 4 * n and host["stream_copy"] == 2 * n
    assert host["optimizer_state"] >= 8 * n and host["gradients"] == 4 * n
    rss_kib = int(proc.stderr.strip().splitlines()[-1])
    assert rss_kib < 2 * 1024**2, f"validate_only used {rss_kib / 1024**2:.1f} GiB"


def _eval_shards(root, batches: int):
    """A token-shards eval split of exactly ``batches`` batches of 4 x 32 (no partial one)."""
    import numpy as np

    tokens = batches * 4 * 32 + 1
    (root / "eval").mkdir(parents=True)
    np.random.default_rng(0).integers(0, 512, tokens).astype(np.uint16).tofile(
        root / "eval" / "00000.bin"
    )
    shards = [{"file": "eval/00000.bin", "tokens": tokens}]
    split = {"tokens": tokens, "documents": 1, "shards": shards}
    meta = {"vocab_size": 512, "eos_id": 0, "dtype": "uint16", "splits": {"eval": split}}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def test_eval_steps_zero_is_a_full_pass_and_repeat_false_is_finite(runs, tmp_path):
    """Cerebras semantics: eval_steps <= 0 evaluates the whole set once; with repeat: false a
    larger eval_steps stops at the end of the set; with repeat: true it wraps around."""
    import shutil

    _, a, _, _ = runs
    md = tmp_path / "md"
    shutil.copytree(a.model_dir, md)
    data = _eval_shards(tmp_path / "data", batches=3)
    shards = ["eval_input.data_processor=GptTokenShardsProcessor", f"eval_input.data_dir={data}"]

    def evaluate(eval_steps: int, repeat: bool) -> dict:
        cfg = small_config(*shards, f"eval_input.repeat={str(repeat).lower()}")
        return run(cfg, "eval", md, eval_steps=eval_steps).evals[0]

    full = evaluate(0, repeat=True)
    assert full["batches"] == 3
    assert evaluate(-1, repeat=False)["batches"] == 3
    capped = evaluate(100, repeat=False)
    assert capped["batches"] == 3 and capped["loss"] == full["loss"]
    assert evaluate(3, repeat=True)["loss"] == full["loss"]  # the same 3 batches
    assert evaluate(5, repeat=True)["batches"] == 5


def test_cerebras_run_flags(tmp_path, capsys):
    """--save_checkpoints_steps, --keep_checkpoint_max 0 (keep all), --save_summary_steps, and
    --steps (this many more steps from where the run starts)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.helpers import SMALL
    from wsjax.train import main

    md = tmp_path / "md"
    flags = ["--save_checkpoints_steps", "1", "--keep_checkpoint_max", "0"]
    assert (
        main(["-o", str(md), *SMALL, "--max_steps", "4", *flags, "--save_summary_steps", "2"]) == 0
    )
    assert sorted(int(p.name.rsplit("-", 1)[1]) for p in md.glob("model-ckpt-*")) == [1, 2, 3, 4]
    loss = EventAccumulator(str(md / "train")).Reload().Scalars("loss")
    assert [e.step for e in loss] == [2, 4]
    assert main(["-o", str(md), *SMALL, "--steps", "2", *flags]) == 0
    assert "global_step = 6, loss" in capsys.readouterr().out
    assert sorted(int(p.name.rsplit("-", 1)[1]) for p in md.glob("model-ckpt-*")) == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]
    eff = yaml.safe_load((md / "train" / "params_train.yaml").read_text())
    assert eff["runconfig"]["max_steps"] == 6
    assert small_config("runconfig.keep_checkpoint_max=0").runconfig.keep_checkpoint_max == 0
