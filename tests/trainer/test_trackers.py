"""Trackers (wsjax.trainer.trackers) and the progress output (wsjax.trainer.metrics.Progress).

runconfig.report_to picks the trackers; TensorBoard gets the scalars, the hyperparameters and the
config as text; the Cerebras duplicate eval tags follow runconfig.cerebras_eval_tags. W&B and
MLflow are optional extras too heavy for the test extra (wandb ~20 MB and mlflow ~13 MB of
wheels before their dependencies), so their hooks are tested against small stand-in modules
that record the calls, and against the real packages (W&B offline, MLflow's file store) only
where those are importable.
"""

from __future__ import annotations

import importlib.machinery
import logging
import sys
import types
from types import SimpleNamespace

import pytest

from tests.helpers import small_config
from wsjax.errors import ConfigError
from wsjax.trainer import RunOptions, StepInfo, Trainer
from wsjax.trainer.faults import NonFinitePolicy
from wsjax.trainer.metrics import Progress
from wsjax.trainer.trackers import MlflowHook, TensorBoardHook, WandbHook, tracker_hooks

EVAL = {"loss": 2.0, "perplexity": 7.389, "accuracy": 0.25}


def step_info(step: int, target: int = 2) -> StepInfo:
    metrics = {"train/loss": 3.0 / step, "train/lr": 1e-3, "train/grad_norm": float("nan")}
    return StepInfo(step, target, 3.0 / step, metrics, 0.1, 40.0, 1280.0, 0.01, 0.0)


def fake_trainer(tmp_path, *overrides: str):
    return SimpleNamespace(config=small_config(*overrides), md=SimpleNamespace(path=tmp_path))


def drive(hook, trainer) -> None:
    """What a 2-step train_and_eval run calls on a hook."""
    hook.on_train_begin(trainer, 0)
    for step in (1, 2):
        hook.on_step(trainer, step_info(step))
    hook.on_eval(trainer, 2, EVAL)
    hook.close()


def policy() -> NonFinitePolicy:
    return NonFinitePolicy("stop", 10)


# ---- the keys -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("tensorboard", ("tensorboard",)),
        ("wandb,mlflow", ("wandb", "mlflow")),
        ("[tensorboard, mlflow]", ("tensorboard", "mlflow")),
        ("none", ()),
    ],
)
def test_report_to_takes_a_list_or_a_comma_string(value, expected):
    assert small_config().runconfig.report_to == ("tensorboard",)  # the default
    assert small_config(f"runconfig.report_to={value}").runconfig.report_to == expected


@pytest.mark.parametrize(
    ("value", "words"),
    [("tensorbord", "did you mean tensorboard"), ("none,wandb", '"none" excludes')],
)
def test_a_bad_report_to_is_one_line_naming_the_key_and_valid_values(value, words):
    with pytest.raises(ConfigError) as e:
        small_config(f"runconfig.report_to={value}")
    message = str(e.value)
    assert "\n" not in message and "runconfig.report_to" in message and words in message
    assert "params_gptj_tiny.yaml" in message
    if value == "tensorbord":
        assert "tensorboard | wandb | mlflow | none" in message


# ---- TensorBoard ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cerebras", [True, False])
def test_tensorboard_gets_scalars_hparams_config_text_and_the_cerebras_tags_by_key(
    tmp_path, cerebras
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = fake_trainer(tmp_path, f"runconfig.cerebras_eval_tags={str(cerebras).lower()}")
    assert trainer.config.runconfig.cerebras_eval_tags is cerebras
    [hook] = tracker_hooks(trainer.config, tmp_path, policy())
    assert isinstance(hook, TensorBoardHook)
    drive(hook, trainer)
    train = EventAccumulator(str(tmp_path / "train")).Reload()
    assert [(e.step, e.value) for e in train.Scalars("loss")] == [(1, 3.0), (2, 1.5)]
    assert "grad_norm" not in train.Tags()["scalars"]  # not finite: left out
    assert "config/text_summary" in train.Tags()["tensors"]  # the text plugin's tag
    text = train.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "    model:" in text and "hidden_size: 64" in text
    plugins = {tag: m.plugin_data.plugin_name for tag, m in train.summary_metadata.items()}
    assert plugins.get("_hparams_/session_start_info") == "hparams", plugins
    ev = EventAccumulator(str(tmp_path / "eval")).Reload()
    tags = set(ev.Tags()["scalars"])
    assert {"loss", "perplexity", "accuracy"} <= tags
    assert ("eval/lm_perplexity" in tags) is cerebras and ("eval/accuracy" in tags) is cerebras


def test_report_to_none_writes_no_events(tmp_path):
    assert tracker_hooks(small_config("runconfig.report_to=none"), tmp_path, policy()) == []


# ---- W&B and MLflow through stand-in modules ----------------------------------------------------
def stand_in(monkeypatch, name: str, **functions) -> list:
    """A module ``name`` whose functions record (function, args, kwargs) into the list returned."""
    calls: list = []
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for fname, result in functions.items():

        def record(*args, _f=fname, _r=result, **kwargs):
            calls.append((_f, args, kwargs))
            return _r(calls) if callable(_r) else _r

        setattr(module, fname, record)
    monkeypatch.setitem(sys.modules, name, module)
    return calls


def test_wandb_hook_logs_split_tags_by_step_and_finishes(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "p")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    run_calls: list = []
    run = SimpleNamespace(
        log=lambda values, step: run_calls.append(("log", values, step)),
        finish=lambda: run_calls.append(("finish",)),
    )
    calls = stand_in(monkeypatch, "wandb", init=run)
    trainer = fake_trainer(tmp_path, "runconfig.report_to=wandb")
    [hook] = tracker_hooks(trainer.config, tmp_path, policy())
    assert isinstance(hook, WandbHook)
    drive(hook, trainer)
    [(_, _, init)] = calls
    assert init["project"] == "p" and init["name"] == tmp_path.name
    assert init["dir"] == str(tmp_path) and init["config"]["model"]["hidden_size"] == 64
    logs = [c for c in run_calls if c[0] == "log"]
    assert [(c[1]["train/loss"], c[2]) for c in logs[:2]] == [(3.0, 1), (1.5, 2)]
    assert logs[0][1]["throughput/tokens_per_sec"] == 1280.0 and "train/grad_norm" not in logs[0][1]
    assert logs[2][2] == 2 and logs[2][1]["eval/perplexity"] == EVAL["perplexity"]
    assert logs[2][1]["eval/lm_perplexity"] == EVAL["perplexity"]
    assert run_calls[-1] == ("finish",)


def test_mlflow_hook_uses_a_file_store_in_model_dir_and_logs_params_and_metrics(
    tmp_path, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what the hook sets when it picks
    names = ("set_tracking_uri", "set_experiment", "start_run", "log_params", "log_text")
    calls = stand_in(monkeypatch, "mlflow", **dict.fromkeys(names), log_metrics=None, end_run=None)
    trainer = fake_trainer(tmp_path, "runconfig.report_to=mlflow")
    [hook] = tracker_hooks(trainer.config, tmp_path, policy())
    assert isinstance(hook, MlflowHook)
    drive(hook, trainer)
    by_name: dict = {}
    for fname, args, kwargs in calls:
        by_name.setdefault(fname, []).append((args, kwargs))
    assert by_name["set_tracking_uri"][0][0] == ((tmp_path / "mlruns").as_uri(),)
    params = {k: v for args, _ in by_name["log_params"] for k, v in args[0].items()}
    assert params["model/hidden_size"] == 64 and params["runconfig/report_to"] == "['mlflow']"
    metrics = by_name["log_metrics"]
    assert [(a[0]["train/loss"], kw["step"]) for a, kw in metrics[:2]] == [(3.0, 1), (1.5, 2)]
    assert metrics[2][0][0]["eval/loss"] == 2.0
    assert [c[0] for c in calls][-1] == "end_run"


@pytest.mark.parametrize("package", ["wandb", "mlflow"])
def test_a_missing_tracker_package_is_one_line_naming_the_extra(monkeypatch, tmp_path, package):
    monkeypatch.setitem(sys.modules, package, None)  # find_spec: not installed
    config = small_config(f"runconfig.report_to=tensorboard,{package}")
    with pytest.raises(ConfigError, match=rf"pip install 'wsjax\[{package}\]'"):
        tracker_hooks(config, tmp_path, policy())


def test_a_run_reports_to_every_tracker_it_names(tmp_path, monkeypatch):
    """The Trainer wires runconfig.report_to: TensorBoard and (stand-in) W&B see each step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_calls: list = []
    run = SimpleNamespace(
        log=lambda values, step: run_calls.append(step), finish=lambda: run_calls.append("end")
    )
    stand_in(monkeypatch, "wandb", init=run)
    config = small_config("runconfig.report_to=tensorboard,wandb")
    Trainer(config, RunOptions(max_steps=2, progress=False), tmp_path / "m").train()
    assert run_calls == [1, 2, "end"]
    train = EventAccumulator(str(tmp_path / "m" / "train")).Reload()
    assert [e.step for e in train.Scalars("loss")] == [1, 2]


# ---- the real packages, where installed ---------------------------------------------------------
def test_wandb_offline_writes_the_run_under_model_dir(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    trainer = fake_trainer(tmp_path, "runconfig.report_to=wandb")
    drive(WandbHook(1, policy()), trainer)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_mlflow_file_store_holds_the_metrics(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what the hook sets when it picks
    trainer = fake_trainer(tmp_path, "runconfig.report_to=mlflow")
    drive(MlflowHook(1, policy()), trainer)
    client = mlflow.tracking.MlflowClient((tmp_path / "mlruns").as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("wsjax").experiment_id])
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 3.0), (2, 1.5)]
    assert run.data.params["model/hidden_size"] == "64"


# ---- progress -----------------------------------------------------------------------------------
def test_progress_without_a_terminal_is_a_plain_line_now_and_then(caplog, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    with caplog.at_level(logging.INFO, logger="wsjax"):
        bar = Progress(0, 4, None, every_s=0.0)
        for _ in range(4):
            bar.update(2.5, 10.0)
        bar.close()
        quiet = Progress(0, 4, None, every_s=3600.0)
        quiet.update(2.5, 10.0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    assert len(lines) == 4 and lines[-1].startswith("progress: step 4/4 (100%), loss 2.5000")
    assert bar._bar is None and not Progress(0, 4, False).plain


def test_progress_in_a_notebook_is_a_tqdm_auto_bar(monkeypatch):
    class ZMQInteractiveShell:  # what IPython's get_ipython() returns in a Jupyter kernel
        pass

    ipython = types.ModuleType("IPython")
    ipython.get_ipython = ZMQInteractiveShell
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    bar = Progress(0, 3, None)
    try:
        assert bar._bar is not None and not bar.plain
        bar.update(1.0, 5.0)
        assert bar._bar.n == 1
    finally:
        bar.close()
