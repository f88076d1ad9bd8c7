"""The Cerebras 2.x params layout (`trainer:` with `init` / `fit` / `validate`) -> 1.x sections.

Cerebras modelzoo 2.x keeps the model under `trainer.init.model`, the optimizer as
`trainer.init.optimizer: {AdamW: {...}}`, the LR as torch-style `schedulers`, clipping under
`precision`, and the data loaders under `fit` / `validate`. `from_trainer_layout` rewrites such a
file into the 1.x sections wsjax validates (`train_input`, `eval_input`, `model`, `optimizer`,
`runconfig`), so both layouts give the same Config. A part it cannot express stops the load with
one line naming it; parts that mean nothing here (backend, logging callbacks) are recorded in the
caller's `ignored` list, which the loader reports in its one warning line.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from wsjax.errors import ConfigError

logger = logging.getLogger("wsjax.config")

# trainer.init.model.name -> wsjax family. Cerebras "gpt3" is its GPT-2 code with GPT-3 sizes.
MODEL_NAMES = {
    "gpt2": "gpt2", "gpt3": "gpt2", "gptj": "gptj", "gpt_neox": "neox", "neox": "neox",
    "llama": "llama", "llamamodel": "llama", "mistral": "mistral",
}  # fmt: skip
# trainer.init.optimizer.<name> keys (torch names) -> 1.x optimizer keys.
_OPTIMIZER_KEYS = {
    "eps": "epsilon",
    "weight_decay": "weight_decay_rate",
    "correct_bias": "use_bias_correction",
    "momentum": "momentum",
    "lr": "learning_rate",
}
_PRECISION_TO_OPTIMIZER = ("max_gradient_norm", "max_gradient_value", "loss_scaling_factor")
_PRECISION_IGNORED = ("enabled", "fp16_type", "precision_opt_level", "log_loss_scale")
# ComputeNorm logs the gradient norm; LoadCheckpointStates picks the states a checkpoint load
# restores (1.x runconfig.load_checkpoint_states, ignored as well): neither changes training.
_INERT_CALLBACKS = ("ComputeNorm", "LoadCheckpointStates")
# CS runtime flags; of them only the micro-batch size of training has a meaning here (the 1.x
# train_input.micro_batch_size); the rest (csx.debug.*, ...) are compiler and runtime knobs.
_FLAG_CALLBACKS = ("GlobalFlags", "ScopedTrainFlags", "ScopedValidateFlags")
_MICRO_BATCH_FLAG = "csx.performance.micro_batch_size"


def from_trainer_layout(d: Mapping[str, Any], source: str, ignored: list[str]) -> dict:
    """A 2.x params dict -> the equivalent 1.x sections dict (other top-level keys kept)."""
    trainer = d["trainer"]
    if not isinstance(trainer, Mapping):
        _refuse(source, "trainer", "a list of trainers (multi-phase training)")
    out: dict[str, Any] = {k: v for k, v in d.items() if k != "trainer"}
    for part in trainer:
        if part not in ("init", "fit", "validate", "validate_all"):
            _refuse(source, f"trainer.{part}", "only init / fit / validate are read")
    init = dict(trainer.get("init") or {})
    out["model"] = _model(init.pop("model", None), source)
    optimizer, runconfig = _optimizer(init, source), {}
    for precision_key, value in (init.pop("precision", None) or {}).items():
        if precision_key in _PRECISION_TO_OPTIMIZER:
            optimizer[precision_key] = value
        elif precision_key in _PRECISION_IGNORED:
            ignored.append(f"trainer.init.precision.{precision_key}")
        else:
            _refuse(source, f"trainer.init.precision.{precision_key}", "not expressible")
    loop = dict(init.pop("loop", None) or {})
    for key in ("max_steps", "num_epochs", "eval_steps"):
        if key in loop:
            runconfig[key] = loop.pop(key)
    for key in loop:
        ignored.append(f"trainer.init.loop.{key}")
    checkpoint = dict(init.pop("checkpoint", None) or {})
    if "steps" in checkpoint:
        runconfig["save_checkpoints_steps"] = checkpoint.pop("steps")
    if "save_initial_checkpoint" in checkpoint:
        runconfig["save_initial_checkpoint"] = checkpoint.pop("save_initial_checkpoint")
    for key in checkpoint:
        ignored.append(f"trainer.init.checkpoint.{key}")
    logging_part = init.pop("logging", None) or {}
    if "log_steps" in logging_part:
        runconfig["log_steps"] = logging_part["log_steps"]
    for key in ("seed", "model_dir"):
        if key in init:
            runconfig[key] = init.pop(key)
    micro = _callbacks(init.pop("callbacks", None) or [], source, ignored)
    if "backend" in init:
        init.pop("backend")
        ignored.append("trainer.init.backend")
    for key in init:
        _refuse(source, f"trainer.init.{key}", "not expressible")
    out["optimizer"], out["runconfig"] = optimizer, {**out.get("runconfig", {}), **runconfig}
    out.update(_loaders(trainer, source))
    if micro is not None and "train_input" in out:  # as a 1.x file's train_input would carry it
        out["train_input"]["micro_batch_size"] = micro
    validate_all = (trainer.get("validate_all") or {}).get("val_dataloaders")
    if validate_all not in (None, out.get("eval_input"), [out.get("eval_input")]):
        ignored.append("trainer.validate_all (eval_all reads eval_input)")
    return out


def _refuse(source: str, part: str, why: str) -> None:
    raise ConfigError(f"{source}: {part} cannot be expressed in wsjax ({why})")


def _callbacks(callbacks: list, source: str, ignored: list[str]) -> Any:
    """Check the callbacks; returns the training micro-batch size they set (or None)."""
    micro = None
    for callback in callbacks:
        name = next(iter(callback)) if isinstance(callback, Mapping) and callback else callback
        where = f"trainer.init.callbacks.{name}"
        if name in _FLAG_CALLBACKS:
            for flag, value in dict(callback[name] or {}).items():
                if not str(flag).startswith("csx."):
                    _refuse(source, f"{where}.{flag}", "only csx.* runtime flags are read")
                if flag == _MICRO_BATCH_FLAG and name != "ScopedValidateFlags":
                    micro = value
                else:
                    ignored.append(f"{where}.{flag}")
        elif name in _INERT_CALLBACKS:
            ignored.append(where)
        else:
            _refuse(source, where, "may change training")
    return micro


def _model(model: Any, source: str) -> dict:
    if not isinstance(model, Mapping):
        _refuse(source, "trainer.init.model", "missing or not a mapping")
    model = dict(model)
    name = model.pop("name", None)
    if name is not None:
        if str(name).lower() not in MODEL_NAMES:
            valid = " | ".join(MODEL_NAMES)
            _refuse(source, f"trainer.init.model.name={name!r}", f"wsjax models {valid}")
        family = model.setdefault("model_family", MODEL_NAMES[str(name).lower()])
        logger.info("%s: model_family %s from trainer.init.model.name %s", source, family, name)
    return model


def _optimizer(init: dict, source: str) -> dict:
    spec = init.pop("optimizer", None)
    if not isinstance(spec, Mapping) or len(spec) != 1:
        _refuse(source, "trainer.init.optimizer", "expected one optimizer, e.g. AdamW: {...}")
    ((kind, args),) = spec.items()
    optimizer: dict[str, Any] = {"optimizer_type": kind}
    for key, value in (args or {}).items():
        if key == "betas":
            optimizer["betas"] = value
        elif key in _OPTIMIZER_KEYS:
            optimizer[_OPTIMIZER_KEYS[key]] = value
        else:
            _refuse(source, f"trainer.init.optimizer.{kind}.{key}", "not expressible")
    schedulers = init.pop("schedulers", None)
    if schedulers is not None:
        optimizer["learning_rate"] = _schedule(schedulers, source)
    return optimizer


def _schedule(schedulers: Any, source: str) -> list[dict]:
    """[{SequentialLR: {schedulers: [{LinearLR: {...}}, ...]}}] or [{CosineDecayLR: {...}}]
    -> the 1.x list of phases ({scheduler: ..., ...}); total_iters is the phase length."""
    if not isinstance(schedulers, list) or len(schedulers) != 1:
        _refuse(source, "trainer.init.schedulers", "expected one scheduler or one SequentialLR")
    ((name, args),) = schedulers[0].items()
    if name == "SequentialLR":
        phases = (args or {}).get("schedulers") or []
    else:
        phases = [schedulers[0]]
    out = []
    for phase in phases:
        ((phase_name, phase_args),) = phase.items()
        if phase_name in ("SequentialLR", "ChainedScheduler"):
            _refuse(source, f"trainer.init.schedulers.{phase_name}", "nested schedulers")
        out.append({"scheduler": phase_name, **(phase_args or {})})
    return out


def _loaders(trainer: Mapping[str, Any], source: str) -> dict:
    fit = trainer.get("fit") or {}
    for key in fit:
        if key not in ("train_dataloader", "val_dataloader"):
            _refuse(source, f"trainer.fit.{key}", "only train_dataloader / val_dataloader")
    out = {}
    if fit.get("train_dataloader") is not None:
        out["train_input"] = dict(fit["train_dataloader"])
    val = fit.get("val_dataloader") or (trainer.get("validate") or {}).get("val_dataloader")
    if isinstance(val, list):
        if len(val) != 1:
            _refuse(source, "trainer.fit.val_dataloader", "several eval loaders")
        val = val[0]
    if val is not None:
        out["eval_input"] = dict(val)
    return out
