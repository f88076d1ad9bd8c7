"""Building and validating the params sections: raw YAML values -> a validated Config.

Owns the optimizer and learning-rate phases, runconfig, streaming and input sections, the
values derived across sections (model.vocab_size from train_input or from the token shards'
meta.json; the inputs' vocab_size and max_sequence_length from the model) and the cross-section
checks (sequence length vs positions, vocab sizes, micro-batch vs batch). The model section
is `wsjax.config.model`; typed reading is `wsjax.config.types`. `wsjax.config` calls
`build_config` after it has normalised keys and applied overrides. Every error is a one-line
ConfigError naming the file, the section.key, the value and what is valid.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from wsjax.config.keys import DATA_PROCESSOR_ALIASES, LR_PHASE_ALIASES
from wsjax.config.model import build_model
from wsjax.config.schema import (
    DATA_PROCESSORS,
    HOST_MEMORY_KINDS,
    OPTIMIZER_PLACEMENTS,
    OPTIMIZERS,
    RECOMPUTE_POLICIES,
    REPORT_TO,
    SCHEDULERS,
    SPLITS,
    Config,
    InputConfig,
    LRPhase,
    ModelConfig,
    OptimizerConfig,
    RunConfig,
    StreamingConfig,
)
from wsjax.config.types import (
    bad,
    build_section,
    check_choice,
    check_min,
    check_rate,
    check_subkeys,
    coerce,
)
from wsjax.errors import ConfigError

logger = logging.getLogger("wsjax.config")


def build_config(raw: dict[str, dict[str, Any]], source: str) -> Config:
    """Sections (keys already normalised to field names) -> a validated Config."""
    for section in ("model", "optimizer"):
        if section not in raw:
            raise ConfigError(f"{source}: missing required section {section}")
    _derive_from_inputs(raw, source)
    model = build_model(raw["model"], source)
    optimizer = _build_optimizer(raw["optimizer"], source)
    if optimizer.loss_scaling_factor is not None and model.mixed_precision:
        logger.info("%s: optimizer.loss_scaling_factor ignored: bf16 needs no loss scaling", source)
    inputs = {
        section: _build_input(raw[section], section, model, source) if section in raw else None
        for section in ("train_input", "eval_input")
    }
    cfg = Config(
        model=model,
        optimizer=optimizer,
        runconfig=_build_runconfig(raw.get("runconfig", {}), source),
        streaming=_build_streaming(raw.get("streaming", {}), source),
        **inputs,
        source=source,
    )
    return _cross_check(cfg)


def _derive_from_inputs(raw: dict[str, dict[str, Any]], source: str) -> None:
    """model.vocab_size, when the model section does not give it: from train_input (Cerebras
    TF GPT-J files: the TF model reads it from train_input), else from the meta.json of the
    token shards an input section reads (the vocabulary preprocess wrote there)."""
    model = raw["model"]
    if model.get("vocab_size") is not None:
        return
    for section in ("train_input", "eval_input"):
        vocab = raw.get(section, {}).get("vocab_size")
        if vocab is not None:
            model["vocab_size"] = vocab
            logger.info("%s: model.vocab_size=%s taken from %s.vocab_size", source, vocab, section)
            return
    for section in ("train_input", "eval_input"):
        found = _shards_vocab(raw.get(section, {}))
        if found is not None:
            model["vocab_size"], where = found
            msg = "%s: model.vocab_size=%s taken from %s (%s.data_dir)"
            logger.info(msg, source, found[0], where, section)
            return


def _shards_vocab(body: dict[str, Any]) -> tuple[int, str] | None:
    """(vocab_size, the meta.json naming it) of the token shards an input section reads: the
    largest when it reads several folders; None when it reads none or their meta.json gives
    no vocab_size (the loader then says what is wrong with the data, by name)."""
    if body.get("data_processor", "GptTokenShardsProcessor") != "GptTokenShardsProcessor":
        return None
    dirs = body.get("data_dir")
    dirs = [dirs] if isinstance(dirs, str) else dirs if isinstance(dirs, list) else []
    best = None
    for d in dirs:
        path = Path(str(d)) / "meta.json"
        try:
            vocab = json.loads(path.read_text(encoding="utf-8")).get("vocab_size")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            continue
        usable = isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0
        if usable and (best is None or vocab > best[0]):
            best = (vocab, str(path))
    return best


# Keys of the learning-rate adjustment Cerebras muP files use (adjust_learning_rate).
LR_ADJUSTABLE = ("decoder_kernel",)


def _build_optimizer(body: dict, source: str) -> OptimizerConfig:
    body = dict(body)
    if isinstance(body.get("optimizer_type"), str):
        body["optimizer_type"] = body["optimizer_type"].lower()
    if "betas" in body:  # PyTorch spelling: betas: [beta1, beta2]
        betas = body.pop("betas")
        if not (isinstance(betas, list | tuple) and len(betas) == 2):
            bad(source, "optimizer.betas", betas, "must be a list [beta1, beta2]")
        for name, value in zip(("beta1", "beta2"), betas, strict=True):
            if name in body and body[name] != value:
                bad(source, f"optimizer.{name}", body[name], f"disagrees with betas={betas}")
            body[name] = value
    if "learning_rate" not in body:
        raise ConfigError(f"{source}: missing required key optimizer.learning_rate")
    lr = body["learning_rate"]
    lr = [lr] if isinstance(lr, Mapping) else lr
    if isinstance(lr, list):
        if not lr:
            raise ConfigError(f"{source}: optimizer.learning_rate is an empty list of phases")
        lr = tuple(_build_phase(p, i, i == len(lr) - 1, source) for i, p in enumerate(lr))
    else:
        lr = coerce(lr, float, "optimizer.learning_rate", source)
        if lr < 0:
            bad(source, "optimizer.learning_rate", lr, "must be >= 0")
    given: dict[str, Any] = {"learning_rate": lr}
    adjust = body.get("adjust_learning_rate")
    if adjust is not None:
        if not isinstance(adjust, Mapping):
            bad(
                source,
                "optimizer.adjust_learning_rate",
                adjust,
                "must map a layer type to a factor",
            )
        for name, factor in adjust.items():
            check_choice(name, LR_ADJUSTABLE, source, "optimizer.adjust_learning_rate")
            coerce(factor, float, f"optimizer.adjust_learning_rate.{name}", source)
        given["adjust_learning_rate"] = tuple((k, float(v)) for k, v in adjust.items())
    o = build_section(OptimizerConfig, body, "optimizer", source, **given)
    check_choice(o.optimizer_type, OPTIMIZERS, source, "optimizer.optimizer_type")
    check_rate(o, "optimizer", source, "beta1", "beta2", "momentum")
    if o.epsilon <= 0:
        bad(source, "optimizer.epsilon", o.epsilon, "must be > 0")
    check_min(o, "optimizer", source, 0, "weight_decay_rate")
    check_min(o, "optimizer", source, 1, "grad_accum_steps")
    for name in ("max_gradient_norm", "max_gradient_value"):
        value = getattr(o, name)
        if value is not None and value <= 0:
            bad(source, f"optimizer.{name}", value, "must be > 0 (omit it to disable clipping)")
    if o.max_gradient_norm is not None and o.max_gradient_value is not None:
        why = "give max_gradient_norm or max_gradient_value, not both"
        bad(source, "optimizer.max_gradient_value", o.max_gradient_value, why)
    return o


def _build_phase(value: Any, i: int, last: bool, source: str) -> LRPhase:
    key = f"optimizer.learning_rate[{i}]"
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: {key}={value!r} must be a mapping with a scheduler")
    value = {LR_PHASE_ALIASES.get(k, k): v for k, v in value.items()}
    check_subkeys(value, LRPhase, key, source)
    if isinstance(value.get("scheduler"), str):
        name = value["scheduler"].lower()
        value["scheduler"] = name[:-2] if name.endswith("lr") and name[:-2] in SCHEDULERS else name
    given = {}
    for name, kind in (("values", float), ("boundaries", int)):
        if name in value:
            items = value[name]
            if not isinstance(items, list) or not items:
                bad(source, f"{key}.{name}", items, "must be a non-empty list")
            given[name] = tuple(coerce(x, kind, f"{key}.{name}", source) for x in items)
    p = build_section(LRPhase, value, key, source, **given)
    check_choice(p.scheduler, SCHEDULERS, source, f"{key}.scheduler")
    check_min(p, key, source, 1, "steps", "decay_steps")
    check_min(p, key, source, 0, "initial_learning_rate", "end_learning_rate", "learning_rate")
    check_min(p, key, source, 0, "alpha", "power")

    def need(name: str, why: str) -> None:
        if getattr(p, name) is None:
            raise ConfigError(f"{source}: missing {key}.{name}: {why}")

    if not last and p.length is None:
        need("steps", "only the last phase may omit both steps and decay_steps")
    if p.scheduler == "constant":
        need("learning_rate", "required by the constant scheduler")
    elif p.scheduler == "piecewiseconstant":
        need("values", "required by the piecewiseconstant scheduler")
        need("boundaries", "required by the piecewiseconstant scheduler")
        if len(p.values) != len(p.boundaries) + 1:
            bad(source, f"{key}.values", list(p.values), "needs one more value than boundaries")
        if list(p.boundaries) != sorted(set(p.boundaries)) or p.boundaries[0] < 1:
            bad(source, f"{key}.boundaries", list(p.boundaries), "must increase from >= 1")
    else:
        need("initial_learning_rate", f"required by the {p.scheduler} scheduler")
    if p.scheduler in ("linear", "polynomial", "cosinedecay", "cosine") and p.length is None:
        need("decay_steps", f"the {p.scheduler} scheduler needs decay_steps or steps")
    if p.scheduler in ("linear", "polynomial", "cosinedecay"):
        need("end_learning_rate", f"required by the {p.scheduler} scheduler")
    if p.scheduler in ("exponential", "inverseexponentialtimedecay"):
        need("decay_rate", f"required by the {p.scheduler} scheduler")
        if p.decay_rate <= 0:
            bad(source, f"{key}.decay_rate", p.decay_rate, "must be > 0")
    if p.scheduler == "inverseexponentialtimedecay":
        need("decay_steps", "required by the inverseexponentialtimedecay scheduler")
        need("step_exponent", "required by the inverseexponentialtimedecay scheduler")
    return p


def _build_runconfig(body: dict, source: str) -> RunConfig:
    profile = _profile_steps(body.get("profile_steps", ()), source)
    trackers = _report_to(body.get("report_to", RunConfig.report_to), source)
    given = {"profile_steps": profile, "report_to": trackers}
    if body.get("num_epochs") is not None and "max_steps" not in body:
        given["max_steps"] = None  # the epochs alone set it, from the train data's size
    r = build_section(RunConfig, body, "runconfig", source, **given)
    if r.max_steps is None and r.num_epochs is None:
        bad(source, "runconfig.max_steps", None, "give the steps to train, or runconfig.num_epochs")
    check_min(r, "runconfig", source, 1, "max_steps", "num_epochs", "log_steps")
    check_min(r, "runconfig", source, 1, "save_summary_steps")
    check_min(r, "runconfig", source, 1, "max_consecutive_skips")
    # Cerebras: keep_checkpoint_max 0 keeps all; eval_steps <= 0 is a full pass (any int)
    check_min(r, "runconfig", source, 0, "keep_checkpoint_max")
    check_min(r, "runconfig", source, 0, "save_checkpoints_steps", "seed")  # 0: no periodic ckpt
    check_choice(r.on_nonfinite, ("stop", "skip"), source, "runconfig.on_nonfinite")
    return r


def _report_to(value: Any, source: str) -> tuple[str, ...]:
    """runconfig.report_to: a list of trackers or "a,b" (a command-line override); "none" (or
    an empty list) alone: no tracker."""
    parts = value.strip("[] ").split(",") if isinstance(value, str) else value
    if not isinstance(parts, list | tuple) or not all(isinstance(p, str) for p in parts):
        bad(source, "runconfig.report_to", value, f"expected a list of {' | '.join(REPORT_TO)}")
    names = tuple(dict.fromkeys(p.strip().lower() for p in parts if p.strip()))
    for name in names:
        check_choice(name, REPORT_TO, source, "runconfig.report_to")
    if "none" in names and len(names) > 1:
        bad(source, "runconfig.report_to", value, '"none" excludes the other trackers')
    return tuple(n for n in names if n != "none")


def _profile_steps(value: Any, source: str) -> tuple[int, ...]:
    """runconfig.profile_steps: a list of steps, one step, or inclusive ranges "A-B" (as text,
    e.g. a command-line override, also "3,5" or "[3, 5]")."""
    key, valid = "runconfig.profile_steps", 'expected steps >= 1: a list, one step or "A-B"'
    parts = value.strip("[] ").split(",") if isinstance(value, str) else value
    steps: list = []
    for part in parts if isinstance(parts, list | tuple) else [parts]:
        if isinstance(part, str):
            first, dash, last = part.strip().partition("-")
            if not (first.isdigit() and (not dash or last.strip().isdigit())):
                bad(source, key, value, valid)
            end = int(last) if dash else int(first)
            if end < int(first):
                bad(source, key, value, f"the range {part.strip()!r} is empty; {valid}")
            steps.extend(range(int(first), end + 1))
        else:
            steps.append(part)
    for step in steps:
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            bad(source, key, value, valid)
    return tuple(sorted(set(steps)))


def _build_streaming(body: dict, source: str) -> StreamingConfig:
    s = build_section(StreamingConfig, body, "streaming", source)
    check_min(s, "streaming", source, 1, "prefetch_depth", "micro_batch_size")
    check_min(s, "streaming", source, 1e-6, "device_memory_gb", "host_memory_gb")
    key = "streaming.optimizer_placement"
    check_choice(s.optimizer_placement, OPTIMIZER_PLACEMENTS, source, key)
    check_choice(s.host_memory_kind, HOST_MEMORY_KINDS, source, "streaming.host_memory_kind")
    policy = "streaming.recompute_policy"
    check_choice(s.recompute_policy, RECOMPUTE_POLICIES, source, policy)
    for key in ("disk_gradients", "disk_stream"):
        if getattr(s, key) and not s.disk_path:
            bad(source, f"streaming.{key}", True, "needs streaming.disk_path (the tier's folder)")
    return s


def _build_input(body: dict, section: str, model: ModelConfig, source: str) -> InputConfig:
    body = dict(body)
    body.setdefault("split", "train" if section == "train_input" else "eval")
    body.setdefault("repeat", section == "train_input")  # Cerebras: train repeats, eval does not
    processor = body.get("data_processor")
    if processor in DATA_PROCESSOR_ALIASES:
        body["data_processor"] = DATA_PROCESSOR_ALIASES[processor]
        msg = "%s: %s.data_processor %s reads as %s (the same HDF5 sample layout)"
        logger.info(msg, source, section, processor, body["data_processor"])
    if body.get("max_sequence_length") is None:
        body["max_sequence_length"] = model.max_position_embeddings
        msg = "%s: %s.max_sequence_length=%d derived from model.max_position_embeddings"
        logger.info(msg, source, section, model.max_position_embeddings)
    if body.get("vocab_size") is None:  # the vocabulary is set once, in the model section
        body["vocab_size"] = model.vocab_size
    given = {}
    if isinstance(body.get("data_dir"), list):
        dirs = body["data_dir"]
        if not dirs or not all(isinstance(x, str) for x in dirs):
            bad(source, f"{section}.data_dir", dirs, "must be a path or a list of paths")
        given["data_dir"] = tuple(dirs)
    c = build_section(InputConfig, body, section, source, **given)
    check_choice(c.data_processor, DATA_PROCESSORS, source, f"{section}.data_processor")
    check_choice(c.split, SPLITS, source, f"{section}.split")
    check_min(c, section, source, 1, "max_sequence_length", "batch_size", "vocab_size")
    check_min(c, section, source, 1, "prefetch_factor")
    check_min(c, section, source, 0, "num_workers", "shuffle_seed", "skip_steps")
    if section == "eval_input" and c.skip_steps:
        why = "only train_input skips batches (an evaluation pass always starts at the first)"
        bad(source, "eval_input.skip_steps", c.skip_steps, why)
    return c


def _cross_check(cfg: Config) -> Config:
    """Checks between sections; derives micro_batch_size <-> grad_accum_steps."""
    m, src = cfg.model, cfg.source
    for section in ("train_input", "eval_input"):
        inp = getattr(cfg, section)
        if inp is None:
            continue
        if inp.max_sequence_length > m.max_position_embeddings:
            want = f"must be <= model.max_position_embeddings={m.max_position_embeddings}"
            bad(src, f"{section}.max_sequence_length", inp.max_sequence_length, want)
        if inp.vocab_size not in (None, m.vocab_size):
            want = f"must equal model.vocab_size={m.vocab_size}"
            bad(src, f"{section}.vocab_size", inp.vocab_size, want)
    micro, accum = cfg.streaming.micro_batch_size, cfg.optimizer.grad_accum_steps
    if cfg.train_input is None or (micro is None and accum == 1):
        return cfg
    batch = cfg.train_input.batch_size
    if micro is None:
        if batch % accum:
            bad(
                src,
                "optimizer.grad_accum_steps",
                accum,
                f"must divide train_input.batch_size={batch}",
            )
        micro = batch // accum
    if batch % micro:
        bad(src, "streaming.micro_batch_size", micro, f"must divide train_input.batch_size={batch}")
    if accum not in (1, batch // micro):
        want = (
            f"must be 1 or train_input.batch_size / streaming.micro_batch_size = {batch // micro}"
        )
        bad(src, "optimizer.grad_accum_steps", accum, want)
    return dataclasses.replace(
        cfg,
        optimizer=dataclasses.replace(cfg.optimizer, grad_accum_steps=batch // micro),
        streaming=dataclasses.replace(cfg.streaming, micro_batch_size=micro),
    )
