"""Trackers (wsjax.trainer.trackers) and the progress output (wsjax.trainer.metrics.Progress).

runconfig.report_to picks the trackers; TensorBoard gets the scalars, the hyperparameters and the
config as text; the Cerebras duplicate eval tags follow runconfig.cerebras_eval_tags. W&B and
MLflow (in the test extra) are checked through one real training run: what W&B wrote into its
offline run file and what MLflow wrote into its file store, against the run's own losses and
evaluation.
"""

from __future__ import annotations

import json
import logging
import struct
import sys
import types
from types import SimpleNamespace

import pytest
import yaml

from tests.helpers import small_config
from wsjax.errors import ConfigError
from wsjax.trainer import RunOptions, StepInfo, Trainer
from wsjax.trainer.faults import NonFinitePolicy
from wsjax.trainer.metrics import Progress
from wsjax.trainer.trackers import TensorBoardHook, tracker_hooks

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


# ---- W&B and MLflow: a real run, and what the packages wrote -------------------------------------
ENV = {
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "WANDB_CONSOLE": "off",  # pytest captures the output; W&B would wrap it otherwise
    "WANDB_PROJECT": "wsjax-test",
    "MLFLOW_EXPERIMENT_NAME": "wsjax-test",
    "MLFLOW_ALLOW_FILE_STORE": "true",  # what the hook sets when it picks the file store
}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One 2-step train_and_eval run (checkpoint and evaluation at step 2) reporting to
    TensorBoard, W&B (offline) and MLflow (its file store in model_dir): its result and folder."""
    md = tmp_path_factory.mktemp("trackers") / "md"
    config = small_config(
        "runconfig.report_to=tensorboard,wandb,mlflow", "runconfig.save_checkpoints_steps=2"
    )
    options = RunOptions(mode="train_and_eval", max_steps=2, progress=False)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in ENV.items():
            mp.setenv(name, value)
        for name in ("WANDB_DIR", "MLFLOW_TRACKING_URI"):
            mp.delenv(name, raising=False)
        result = Trainer(config, options, md).train()
    assert [s for s, _ in result.losses] == [1, 2] and [e["step"] for e in result.evals] == [2]
    return result, md


def wandb_records(path):
    """The protobuf records of a W&B run file (``run-<id>.wandb``): a 7-byte header, then
    LevelDB's log format (32 KiB blocks; chunks with a 7-byte header: crc32c, length, kind
    1 full | 2 first | 3 middle | 4 last)."""
    from wandb.proto import wandb_internal_pb2  # lazy: only this test reads W&B's files

    data, block, pos, chunks = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B", data[:7]
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if left < 7 or kind == 0:  # the zero padding at a block's end
            pos += left
            continue
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def test_wandb_offline_run_holds_the_config_each_step_and_the_eval(tracked):
    result, md = tracked
    [run_dir] = (md / "wandb").glob("offline-run-*")  # under model_dir: WANDB_DIR is unset
    records = list(wandb_records(next(run_dir.glob("run-*.wandb"))))
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "wsjax-test" and run.display_name == md.name
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["model"]["hidden_size"] == 64 and config["runconfig"]["report_to"] == [
        "tensorboard",
        "wandb",
        "mlflow",
    ]
    history: dict = {}  # step -> {tag: value}; W&B merges the logs of one step
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item
            }
            history.setdefault(r.history.step.num, {}).update(items)
    assert sorted(history) == [1, 2]
    assert [(s, history[s]["train/loss"]) for s in (1, 2)] == result.losses  # float64 JSON
    assert history[1]["throughput/tokens_per_sec"] > 0 and "train/lr" in history[1]
    [ev] = result.evals
    assert (
        history[2]["eval/loss"] == ev["loss"] and history[2]["eval/perplexity"] == ev["perplexity"]
    )
    assert history[2]["eval/lm_perplexity"] == ev["perplexity"]  # the Cerebras tag, by default
    assert records[-1].WhichOneof("record_type") == "exit"  # finished


def test_mlflow_file_store_holds_the_params_each_step_and_the_eval(tracked):
    result, md = tracked
    store = md / "mlruns"  # MLFLOW_TRACKING_URI unset: the file store in model_dir
    [experiment] = [
        p.parent
        for p in store.glob("*/meta.yaml")
        if yaml.safe_load(p.read_text())["name"] != "Default"
    ]
    assert yaml.safe_load((experiment / "meta.yaml").read_text())["name"] == "wsjax-test"
    [run] = [p.parent for p in experiment.glob("*/meta.yaml")]
    meta = yaml.safe_load((run / "meta.yaml").read_text())
    assert meta["run_name"] == md.name and meta["status"] == 3  # RunStatus.FINISHED

    def metric(tag: str) -> list[tuple[int, float]]:  # lines "<timestamp ms> <value> <step>"
        rows = [line.split() for line in (run / "metrics" / tag).read_text().splitlines()]
        return [(int(step), float(value)) for _, value, step in rows]

    assert metric("train/loss") == result.losses  # written with repr(): exact
    [ev] = result.evals
    assert metric("eval/loss") == [(2, ev["loss"])] and metric("eval/accuracy") == [
        (2, ev["accuracy"])
    ]
    assert (run / "params" / "model" / "hidden_size").read_text() == "64"
    assert (run / "params" / "runconfig" / "report_to").read_text() == str(
        ["tensorboard", "wandb", "mlflow"]
    )
    params = yaml.safe_load((run / "artifacts" / "params.yaml").read_text())
    assert params == yaml.safe_load((md / "train" / "params_train.yaml").read_text())


def test_the_same_run_reports_each_step_to_tensorboard(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, md = tracked
    train = EventAccumulator(str(md / "train")).Reload()
    # TensorBoard keeps float32: each loss to within half a float32 ulp
    assert [(e.step, e.value) for e in train.Scalars("loss")] == [
        (s, pytest.approx(loss, rel=2**-24)) for s, loss in result.losses
    ]


@pytest.mark.parametrize("package", ["wandb", "mlflow"])
def test_a_missing_tracker_package_is_one_line_naming_the_extra(monkeypatch, tmp_path, package):
    monkeypatch.setitem(sys.modules, package, None)  # find_spec: not installed
    config = small_config(f"runconfig.report_to=tensorboard,{package}")
    with pytest.raises(ConfigError, match=rf"pip install 'wsjax\[{package}\]'"):
        tracker_hooks(config, tmp_path, policy())


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
