"""Building and validating each params section: raw YAML values -> typed dataclasses.

Owns YAML type checks (a string where an int is needed), family inference and family defaults,
initializer and learning-rate phase specs, value ranges, and the cross-section checks
(sequence length vs positions, vocab sizes, micro-batch vs batch). `wsjax.config` calls
`build_config` after it has normalised keys and applied overrides. Every error is a one-line
ConfigError naming the file, the section.key, the value and what would be valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from wsjax.config_schema import (
    DATA_PROCESSORS,
    FAMILIES,
    FAMILY_DEFAULTS,
    HOST_MEMORY_KINDS,
    KNOWN_INITIALIZERS,
    LR_PHASE_ALIASES,
    NONLINEARITIES,
    OPTIMIZER_PLACEMENTS,
    OPTIMIZERS,
    POSITION_EMBEDDINGS,
    SCHEDULERS,
    SPLITS,
    Config,
    InitSpec,
    InputConfig,
    LRPhase,
    ModelConfig,
    OptimizerConfig,
    RunConfig,
    StreamingConfig,
)
from wsjax.errors import ConfigError

logger = logging.getLogger("wsjax.config")

# YAML 1.1 reads "1e-4" (no dot) as a string; float fields accept such strings.
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def build_config(raw: dict[str, dict[str, Any]], source: str) -> Config:
    """Sections (keys already normalised to field names) -> a validated Config."""
    for section in ("model", "optimizer"):
        if section not in raw:
            raise ConfigError(f"{source}: missing required section {section}")
    model = _build_model(raw["model"], source)
    optimizer = _build_optimizer(raw["optimizer"], source)
    if optimizer.loss_scaling_factor is not None and model.mixed_precision:
        logger.info("%s: optimizer.loss_scaling_factor ignored: bf16 needs no loss scaling", source)
    cfg = Config(
        model=model,
        optimizer=optimizer,
        runconfig=_build_runconfig(raw.get("runconfig", {}), source),
        streaming=_build_streaming(raw.get("streaming", {}), source),
        train_input=_build_input(raw["train_input"], "train_input", source)
        if "train_input" in raw
        else None,
        eval_input=_build_input(raw["eval_input"], "eval_input", source)
        if "eval_input" in raw
        else None,
        source=source,
    )
    return _cross_check(cfg)


# ---------------------------------------------------------------- types


def suggest(key: str, valid: Iterable[str], prefix: str = "") -> str:
    """' (did you mean <prefix><closest>?)' or ''."""
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def options(tp: Any) -> tuple[type, ...]:
    """The scalar types a field annotation allows (containers are handled by their builders)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return tuple(t for t in typing.get_args(tp) if t in (int, float, bool, str, type(None)))
    return (tp,)


def type_name(opts: tuple[type, ...]) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in opts)


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    opts = options(tp)
    is_num = isinstance(value, int | float) and not isinstance(value, bool)
    if value is None and type(None) in opts:
        return None
    if isinstance(value, bool) and bool in opts:
        return value
    if int in opts and is_num and float(value).is_integer():
        return int(value)
    if float in opts and is_num:
        return float(value)
    if float in opts and isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
        return float(value)
    if str in opts and isinstance(value, str):
        return value
    got = "null" if value is None else type(value).__name__
    raise ConfigError(f"{source}: {key}={value!r} is a {got}, expected {type_name(opts)}")


def _build(cls: type, body: Mapping[str, Any], prefix: str, source: str, **given: Any) -> Any:
    """Coerce each present field to its annotated type; `given` fields are already built."""
    hints = field_types(cls)
    kwargs = dict(given)
    for f in dataclasses.fields(cls):
        if f.name in kwargs:
            continue
        if f.name in body:
            kwargs[f.name] = _coerce(body[f.name], hints[f.name], f"{prefix}.{f.name}", source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key {prefix}.{f.name}")
    return cls(**kwargs)


def _check_subkeys(value: Mapping[str, Any], cls: type, key: str, source: str) -> None:
    valid = field_names(cls)
    for sub in value:
        if sub not in valid:
            raise ConfigError(f"{source}: unknown key {key}.{sub}{suggest(sub, valid, key + '.')}")


# ---------------------------------------------------------------- checks


def _bad(source: str, key: str, value: Any, valid: str) -> typing.NoReturn:
    raise ConfigError(f"{source}: {key}={value!r} is invalid; {valid}")


def _check_choice(value: Any, choices: Iterable[str], source: str, key: str) -> None:
    choices = tuple(choices)
    if value not in choices:
        hint = suggest(str(value), choices)
        raise ConfigError(f"{source}: {key}={value!r}{hint} is invalid; use {' | '.join(choices)}")


def _check_min(obj: Any, prefix: str, source: str, minimum: float, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < minimum:
            _bad(source, f"{prefix}.{name}", value, f"must be >= {minimum}")


def _check_rate(obj: Any, prefix: str, source: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not 0.0 <= value < 1.0:
            _bad(source, f"{prefix}.{name}", value, "must be in [0, 1)")


# ---------------------------------------------------------------- sections


def _infer_family(body: dict, source: str) -> tuple[str, str]:
    """(family, position_embedding_type): explicit model_family wins; else rotary -> gptj."""
    family = _coerce(body.get("family"), str | None, "model.model_family", source)
    key = "model.position_embedding_type"
    position = _coerce(body.get("position_embedding_type"), str | None, key, source)
    if position is not None:
        position = position.lower()
        _check_choice(position, POSITION_EMBEDDINGS, source, key)
    if family is None:
        position = position or "learned"  # the Cerebras GPT-2 default
        family = "gptj" if position == "rotary" else "gpt2"
        logger.info("%s: model_family inferred %s from %s positions", source, family, position)
    family = family.lower()
    _check_choice(family, FAMILIES, source, "model.model_family")
    wanted = FAMILY_DEFAULTS[family]["position_embedding_type"]
    if position not in (None, wanted):
        _bad(source, key, position, f"model_family {family} uses {wanted} positions")
    return family, wanted


def _build_model(body: dict, source: str) -> ModelConfig:
    body = dict(body)
    dropout = _coerce(body.pop("dropout_rate", None), float | None, "model.dropout_rate", source)
    family, position = _infer_family(body, source)
    body = {**FAMILY_DEFAULTS[family], **body, "family": family}
    body["position_embedding_type"] = position
    if dropout is not None:  # Cerebras GPT-2 key: residual + embedding dropout
        body.setdefault("residual_dropout_rate", dropout)
        body.setdefault("embedding_dropout_rate", dropout)
    if position == "learned" and body.get("rotary_dim") is not None:
        logger.warning("%s: model.rotary_dim ignored with learned positions", source)
        body["rotary_dim"] = None
    init_range = _coerce(
        body.get("initializer_range", 0.02), float, "model.initializer_range", source
    )
    if init_range <= 0:
        _bad(source, "model.initializer_range", init_range, "must be > 0")
    inits = {
        name: _build_init(body.get(name), f"model.{name}", init_range, source)
        for name in ("initializer", "embedding_initializer", "output_layer_initializer")
    }
    body.setdefault("rotary_dim", None)
    body.setdefault("embedding_size", None)
    if isinstance(body.get("nonlinearity"), str):
        act = body["nonlinearity"].lower()
        body["nonlinearity"] = "gelu" if act == "gelu_new" else act
    m = _build(ModelConfig, body, "model", source, **inits)
    _check_min(m, "model", source, 1, "vocab_size", "hidden_size", "num_heads")
    _check_min(m, "model", source, 1, "num_hidden_layers", "filter_size", "max_position_embeddings")
    _check_choice(m.nonlinearity, NONLINEARITIES, source, "model.nonlinearity")
    if m.hidden_size % m.num_heads:
        _bad(source, "model.num_heads", m.num_heads, f"must divide hidden_size={m.hidden_size}")
    if m.embedding_size not in (None, m.hidden_size):
        _bad(
            source,
            "model.embedding_size",
            m.embedding_size,
            f"must equal hidden_size={m.hidden_size}",
        )
    _check_rate(m, "model", source, "embedding_dropout_rate", "attention_dropout_rate")
    _check_rate(m, "model", source, "residual_dropout_rate")
    if m.layer_norm_epsilon <= 0:
        _bad(source, "model.layer_norm_epsilon", m.layer_norm_epsilon, "must be > 0")
    if family == "gptj":
        rotary = m.head_dim if m.rotary_dim is None else m.rotary_dim
        if not (0 < rotary <= m.head_dim and rotary % 2 == 0):
            _bad(
                source,
                "model.rotary_dim",
                rotary,
                f"must be even and in [2, {m.head_dim}] (head_dim)",
            )
        m = dataclasses.replace(m, rotary_dim=rotary)
    return m


def _build_init(value: Any, key: str, init_range: float, source: str) -> InitSpec:
    if value is None:
        return InitSpec(name="normal", std=init_range)
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: {key}={value!r} must be a mapping with a name")
    _check_subkeys(value, InitSpec, key, source)
    spec = _build(InitSpec, value, key, source)
    takes_std = spec.name in ("normal", "truncated_normal", "scaled_init_normal")
    if spec.std is None and (takes_std or spec.name not in KNOWN_INITIALIZERS):
        spec = dataclasses.replace(spec, std=init_range)  # unknown names fall back to normal
    if spec.std is not None and spec.std <= 0:
        _bad(source, f"{key}.std", spec.std, "must be > 0")
    _check_choice(spec.mode, ("fan_in", "fan_out", "fan_avg"), source, f"{key}.mode")
    dists = ("truncated_normal", "normal", "uniform")
    _check_choice(spec.distribution, dists, source, f"{key}.distribution")
    return spec


def _build_optimizer(body: dict, source: str) -> OptimizerConfig:
    body = dict(body)
    if isinstance(body.get("optimizer_type"), str):
        body["optimizer_type"] = body["optimizer_type"].lower()
    if "learning_rate" not in body:
        raise ConfigError(f"{source}: missing required key optimizer.learning_rate")
    lr = body["learning_rate"]
    lr = [lr] if isinstance(lr, Mapping) else lr
    if isinstance(lr, list):
        if not lr:
            raise ConfigError(f"{source}: optimizer.learning_rate is an empty list of phases")
        lr = tuple(_build_phase(p, i, i == len(lr) - 1, source) for i, p in enumerate(lr))
    else:
        lr = _coerce(lr, float, "optimizer.learning_rate", source)
        if lr < 0:
            _bad(source, "optimizer.learning_rate", lr, "must be >= 0")
    o = _build(OptimizerConfig, body, "optimizer", source, learning_rate=lr)
    _check_choice(o.optimizer_type, OPTIMIZERS, source, "optimizer.optimizer_type")
    _check_rate(o, "optimizer", source, "beta1", "beta2", "momentum")
    if o.epsilon <= 0:
        _bad(source, "optimizer.epsilon", o.epsilon, "must be > 0")
    _check_min(o, "optimizer", source, 0, "weight_decay_rate")
    _check_min(o, "optimizer", source, 1, "grad_accum_steps")
    if o.max_gradient_norm is not None and o.max_gradient_norm <= 0:
        _bad(
            source,
            "optimizer.max_gradient_norm",
            o.max_gradient_norm,
            "must be > 0 (omit it to disable clipping)",
        )
    return o


def _build_phase(value: Any, i: int, last: bool, source: str) -> LRPhase:
    key = f"optimizer.learning_rate[{i}]"
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: {key}={value!r} must be a mapping with a scheduler")
    value = {LR_PHASE_ALIASES.get(k, k): v for k, v in value.items()}
    _check_subkeys(value, LRPhase, key, source)
    if isinstance(value.get("scheduler"), str):
        value["scheduler"] = value["scheduler"].lower()
    p = _build(LRPhase, value, key, source)
    _check_choice(p.scheduler, SCHEDULERS, source, f"{key}.scheduler")
    _check_min(p, key, source, 1, "steps", "decay_steps")
    _check_min(p, key, source, 0, "initial_learning_rate", "end_learning_rate", "learning_rate")
    _check_min(p, key, source, 0, "alpha")

    def need(name: str, why: str) -> None:
        if getattr(p, name) is None:
            raise ConfigError(f"{source}: missing {key}.{name}: {why}")

    if not last or p.scheduler == "linear":
        need("steps", "only the last phase may omit steps, and never a linear one")
    need(
        "learning_rate" if p.scheduler == "constant" else "initial_learning_rate",
        f"required by the {p.scheduler} scheduler",
    )
    if p.scheduler == "linear":
        need("end_learning_rate", "required by the linear scheduler")
    if p.scheduler in ("cosine", "cosinedecay") and p.steps is None:
        need("decay_steps", "cosine needs decay_steps or steps")
    if p.scheduler == "exponential":
        need("decay_steps", "required by the exponential scheduler")
        need("decay_rate", "required by the exponential scheduler")
        if p.decay_rate <= 0:
            _bad(source, f"{key}.decay_rate", p.decay_rate, "must be > 0")
    return p


def _build_runconfig(body: dict, source: str) -> RunConfig:
    r = _build(RunConfig, body, "runconfig", source)
    _check_min(r, "runconfig", source, 1, "max_steps", "log_steps", "save_summary_steps")
    _check_min(r, "runconfig", source, 1, "max_consecutive_skips")
    # Cerebras: keep_checkpoint_max 0 keeps all; eval_steps <= 0 is a full pass (any int)
    _check_min(r, "runconfig", source, 0, "keep_checkpoint_max")
    _check_min(r, "runconfig", source, 0, "save_checkpoints_steps", "seed")  # 0: no periodic ckpt
    _check_choice(r.on_nonfinite, ("stop", "skip"), source, "runconfig.on_nonfinite")
    return r


def _build_streaming(body: dict, source: str) -> StreamingConfig:
    s = _build(StreamingConfig, body, "streaming", source)
    _check_min(s, "streaming", source, 1, "prefetch_depth", "micro_batch_size")
    _check_min(s, "streaming", source, 1e-6, "device_memory_gb", "host_memory_gb")
    key = "streaming.optimizer_placement"
    _check_choice(s.optimizer_placement, OPTIMIZER_PLACEMENTS, source, key)
    _check_choice(s.host_memory_kind, HOST_MEMORY_KINDS, source, "streaming.host_memory_kind")
    return s


def _build_input(body: dict, section: str, source: str) -> InputConfig:
    body = dict(body)
    body.setdefault("split", "train" if section == "train_input" else "eval")
    given = {}
    if isinstance(body.get("data_dir"), list):
        dirs = body["data_dir"]
        if not dirs or not all(isinstance(x, str) for x in dirs):
            _bad(source, f"{section}.data_dir", dirs, "must be a path or a list of paths")
        given["data_dir"] = tuple(dirs)
    c = _build(InputConfig, body, section, source, **given)
    _check_choice(c.data_processor, DATA_PROCESSORS, source, f"{section}.data_processor")
    _check_choice(c.split, SPLITS, source, f"{section}.split")
    _check_min(c, section, source, 1, "max_sequence_length", "batch_size", "vocab_size")
    _check_min(c, section, source, 1, "prefetch_factor")
    _check_min(c, section, source, 0, "num_workers", "shuffle_seed")
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
            _bad(src, f"{section}.max_sequence_length", inp.max_sequence_length, want)
        if inp.vocab_size not in (None, m.vocab_size):
            want = f"must equal model.vocab_size={m.vocab_size}"
            _bad(src, f"{section}.vocab_size", inp.vocab_size, want)
    micro, accum = cfg.streaming.micro_batch_size, cfg.optimizer.grad_accum_steps
    if cfg.train_input is None or (micro is None and accum == 1):
        return cfg
    batch = cfg.train_input.batch_size
    if micro is None:
        if batch % accum:
            _bad(
                src,
                "optimizer.grad_accum_steps",
                accum,
                f"must divide train_input.batch_size={batch}",
            )
        micro = batch // accum
    if batch % micro:
        _bad(
            src, "streaming.micro_batch_size", micro, f"must divide train_input.batch_size={batch}"
        )
    if accum not in (1, batch // micro):
        want = (
            f"must be 1 or train_input.batch_size / streaming.micro_batch_size = {batch // micro}"
        )
        _bad(src, "optimizer.grad_accum_steps", accum, want)
    return dataclasses.replace(
        cfg,
        optimizer=dataclasses.replace(cfg.optimizer, grad_accum_steps=batch // micro),
        streaming=dataclasses.replace(cfg.streaming, micro_batch_size=micro),
    )
