"""Experiment trackers: where a run's scalars go besides the log (``runconfig.report_to``).

    tensorboard  (the default) tensorboardX events under model_dir/train and model_dir/eval, the
                 run's hyperparameters (TensorBoard's HPARAMS tab) and its config as text
    wandb        Weights & Biases, ``pip install 'wsjax[wandb]'``; ``WANDB_MODE=offline`` keeps
                 the run on disk (under model_dir/wandb), ``WANDB_PROJECT`` names the project
    mlflow       MLflow, ``pip install 'wsjax[mlflow]'``; ``MLFLOW_TRACKING_URI``, else the file
                 store model_dir/mlruns (``mlflow ui --backend-store-uri model_dir/mlruns``);
                 ``MLFLOW_EXPERIMENT_NAME`` names the experiment
    none         no tracker (the log lines and performance.json still come)

Each tracker is a :class:`TrackerHook`: the step's scalars every ``runconfig.save_summary_steps``
and on the last step; each evaluation's loss, perplexity and accuracy, and with
``runconfig.cerebras_eval_tags`` (the default) the same values under the tags Cerebras writes
(wsjax.trainer.metrics.eval_tags). Process 0 reports; the other processes write nothing. Outside
TensorBoard, tags carry their split: ``train/loss``, ``eval/perplexity``; tags with a namespace
already (``throughput/mfu``, ``stream/...``) keep it.
"""

from __future__ import annotations

import importlib.util
import math
import os

import yaml

from wsjax.distributed import is_main_process
from wsjax.errors import ConfigError
from wsjax.trainer.faults import NonFinitePolicy
from wsjax.trainer.hooks import Callback, StepInfo
from wsjax.trainer.metrics import Summaries, eval_tags, train_scalars

DEFAULT_PROJECT = "wsjax"  # W&B project / MLflow experiment when the environment names none


class TrackerHook(Callback):
    """One tracker: override :meth:`open`, :meth:`write` and :meth:`close`."""

    name = ""
    package = ""  # the optional package the tracker needs: missing, the run stops before step 1

    def __init__(self, every: int, policy: NonFinitePolicy, cerebras_tags: bool = True):
        self.summary_every, self.policy, self.cerebras_tags = max(1, every), policy, cerebras_tags
        self.opened = False
        if self.package and importlib.util.find_spec(self.package) is None:
            raise missing(self.package)

    def import_package(self):
        """:attr:`package`, imported when the run opens (process 0 only)."""
        try:
            return importlib.import_module(self.package)
        except ImportError:
            raise missing(self.package) from None

    def on_train_begin(self, trainer, step: int) -> None:
        if is_main_process() and not self.opened:
            self.open(trainer)
            self.opened = True

    def on_step(self, trainer, info: StepInfo) -> None:
        if info.step % self.summary_every and not info.last:
            return
        tags = train_scalars(
            info.metrics,
            samples_per_sec=info.samples_per_sec,
            tokens_per_sec=info.tokens_per_sec,
            mfu=info.mfu,
        )
        self._report("train", {**tags, "skipped_updates": self.policy.total}, info.step)

    def on_eval(self, trainer, step: int, scalars: dict) -> None:
        self._report("eval", eval_tags(scalars, cerebras=self.cerebras_tags), step)

    def _report(self, split: str, values: dict, step: int) -> None:
        if not self.opened:
            return
        finite = {k: float(v) for k, v in values.items() if v is not None}
        self.write(split, {k: v for k, v in finite.items() if math.isfinite(v)}, step)

    def open(self, trainer) -> None:
        """Training starts: create the run (process 0 only)."""

    def write(self, split: str, values: dict[str, float], step: int) -> None:
        """Finite scalars of ``split`` (train | eval) at global step ``step``."""


def split_tag(split: str, tag: str) -> str:
    """``train/loss`` for ``loss``; a tag with a namespace already is kept."""
    return tag if "/" in tag else f"{split}/{tag}"


def hparams(config) -> dict:
    """The config's scalar values as ``section/key`` (lists as text): TensorBoard's HPARAMS
    table and MLflow's parameters."""
    out = {}
    for section, body in config.to_dict().items():
        for key, value in body.items():
            if isinstance(value, bool | int | float | str):
                out[f"{section}/{key}"] = value
            elif value is not None:
                out[f"{section}/{key}"] = str(value)
    return out


def config_text(config) -> str:
    """The run's params as YAML, indented as a Markdown code block (TensorBoard's text tab)."""
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    return "\n".join("    " + line for line in text.splitlines())


class TensorBoardHook(TrackerHook):
    """tensorboardX events (wsjax.trainer.metrics.Summaries) under model_dir/train and /eval."""

    name = "tensorboard"

    def __init__(self, summaries: Summaries, every: int, policy, cerebras_tags: bool = True):
        super().__init__(every, policy, cerebras_tags)
        self.tb = summaries

    def open(self, trainer) -> None:
        self.tb.describe(hparams(trainer.config), config_text(trainer.config))

    def write(self, split: str, values: dict[str, float], step: int) -> None:
        self.tb.scalars(split, values, step)

    def close(self) -> None:
        self.tb.close()


class WandbHook(TrackerHook):
    """Weights & Biases: one run per training session, named after the model_dir, its config
    the run's params; ``WANDB_MODE`` / ``WANDB_PROJECT`` / ``WANDB_DIR`` as W&B reads them."""

    name = package = "wandb"
    run = None  # the W&B run, once open

    def open(self, trainer) -> None:
        md = trainer.md.path
        self.run = self.import_package().init(
            project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT),
            name=md.name,
            dir=os.environ.get("WANDB_DIR", str(md)),
            config=trainer.config.to_dict(),
        )

    def write(self, split: str, values: dict[str, float], step: int) -> None:
        self.run.log({split_tag(split, k): v for k, v in values.items()}, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class MlflowHook(TrackerHook):
    """MLflow: one run per training session, named after the model_dir; the config's values as
    parameters and the params YAML as an artifact."""

    name = package = "mlflow"
    PARAMS_PER_CALL = 100  # MLflow's batch limit
    mlflow = None  # the module, once the run is open

    def open(self, trainer) -> None:
        mlflow = self.import_package()
        md = trainer.md.path
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # MLflow 3 asks for this opt-in before it writes a file store
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((md / "mlruns").absolute().as_uri())
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_PROJECT))
        mlflow.start_run(run_name=md.name)
        self.mlflow = mlflow
        items = list(hparams(trainer.config).items())
        for i in range(0, len(items), self.PARAMS_PER_CALL):
            mlflow.log_params(dict(items[i : i + self.PARAMS_PER_CALL]))
        mlflow.log_text(yaml.safe_dump(trainer.config.to_dict(), sort_keys=False), "params.yaml")

    def write(self, split: str, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({split_tag(split, k): v for k, v in values.items()}, step=step)

    def close(self) -> None:
        if self.mlflow is not None:
            self.mlflow.end_run()
            self.mlflow = None


def missing(package: str) -> ConfigError:
    return ConfigError(
        f"runconfig.report_to={package} needs the {package} package: pip install "
        f"'wsjax[{package}]', or drop {package} from runconfig.report_to"
    )


def tracker_hooks(config, model_dir, policy: NonFinitePolicy) -> list[TrackerHook]:
    """The hooks of ``config.runconfig.report_to``, in its order."""
    rc = config.runconfig
    every, tags = rc.save_summary_steps, rc.cerebras_eval_tags
    made = {
        "tensorboard": lambda: TensorBoardHook(Summaries(model_dir), every, policy, tags),
        "wandb": lambda: WandbHook(every, policy, tags),
        "mlflow": lambda: MlflowHook(every, policy, tags),
    }
    return [made[name]() for name in rc.report_to]
