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
    LOSS_SCALINGS,
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
    _derive_from_inputs(raw, source)
    model = _build_model(raw["model"], source)
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
    """model.vocab_size from train_input when only the input names it (Cerebras TF GPT-J
    files: the TF model reads it from train_input)."""
    model = raw["model"]
    if model.get("vocab_size") is None:
        for section in ("train_input", "eval_input"):
            vocab = raw.get(section, {}).get("vocab_size")
            if vocab is not None:
                model["vocab_size"] = vocab
                logger.info("%s: model.vocab_size=%s taken from %s.vocab_size", source, vocab,
                            section)  # fmt: skip
                break


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


# Keys that only the rotary families read: evidence that a file means GPT-J or GPT-NeoX even
# where it names no position_embedding_type (Cerebras TF files pick the model by directory).
_ROTARY_KEYS = ("rotary_dim", "rotary_pct", "rope_theta")
_NEOX_KEYS = ("use_untied_layer_norm", "use_parallel_residual", "rotary_pct")


def _infer_family(body: dict, source: str) -> tuple[str, str]:
    """(family, why): explicit model_family wins; otherwise the evidence must agree.

    GPT-NeoX: use_untied_layer_norm true (the NeoX files of the Cerebras gptj directory) or a
    NeoX-only key; GPT-J: rotary positions or a rotary key; GPT-2: learned positions, or no
    evidence at all (the Cerebras GPT-2 default). Conflicting evidence stops with one line.
    """
    family = _coerce(body.get("family"), str | None, "model.model_family", source)
    key = "model.position_embedding_type"
    position = _coerce(body.get("position_embedding_type"), str | None, key, source)
    if position is not None:
        position = position.lower()
        _check_choice(position, POSITION_EMBEDDINGS, source, key)
    if family is not None:
        family = family.lower()
        _check_choice(family, FAMILIES, source, "model.model_family")
        return family, "model_family given"
    rotary_keys = [k for k in _ROTARY_KEYS if body.get(k) is not None]
    neox_keys = [k for k in _NEOX_KEYS if k in body and body[k] not in (None, False)]
    if neox_keys == ["use_parallel_residual"] and body.get("use_untied_layer_norm") is False:
        neox_keys = []
    evidence = {
        "neox": neox_keys,
        "gptj": rotary_keys + (["position_embedding_type: rotary"] if position == "rotary" else []),
        "gpt2": ["position_embedding_type: learned"] if position == "learned" else [],
    }
    if evidence["neox"] and not evidence["gpt2"]:
        family, why = "neox", evidence["neox"] + evidence["gptj"]
    elif evidence["gptj"] and not evidence["gpt2"]:
        family, why = "gptj", evidence["gptj"]
    elif not evidence["gptj"] and not evidence["neox"]:
        family = "gpt2"
        why = evidence["gpt2"] or ["no rotary or NeoX keys (the Cerebras GPT-2 default)"]
    else:
        seen = ", ".join(f"{k}" for k in evidence["gpt2"] + evidence["gptj"] + evidence["neox"])
        raise ConfigError(
            f"{source}: model family is ambiguous ({seen}); set model.model_family to "
            f"{' | '.join(FAMILIES)}"
        )
    reason = ", ".join(why)
    logger.info("%s: model_family %s inferred from %s", source, family, reason)
    return family, reason


def _rotary_dim_from_pct(body: dict, source: str) -> None:
    """A HF-style rotary_pct becomes rotary_dim = int(head_dim * rotary_pct) (contract 2)."""
    pct = _coerce(body.pop("rotary_pct", None), float | None, "model.rotary_pct", source)
    if pct is None:
        return
    if not 0.0 < pct <= 1.0:
        _bad(source, "model.rotary_pct", pct, "must be in (0, 1]")
    heads = _coerce(body.get("num_heads"), int, "model.num_heads", source)
    hidden = _coerce(body.get("hidden_size"), int, "model.hidden_size", source)
    rotary = int(hidden // heads * pct)
    if body.get("rotary_dim") not in (None, rotary):
        _bad(source, "model.rotary_dim", body["rotary_dim"], f"disagrees with rotary_pct={pct}")
    body["rotary_dim"] = rotary


def _build_model(body: dict, source: str) -> ModelConfig:
    body = dict(body)
    dropout = _coerce(body.pop("dropout_rate", None), float | None, "model.dropout_rate", source)
    use_pos = {k: body.pop(k) for k in ("use_position_embedding", "use_position_embeddings")
               if k in body}  # fmt: skip
    family, _ = _infer_family(body, source)
    _rotary_dim_from_pct(body, source)
    body = {**FAMILY_DEFAULTS[family], **body, "family": family}
    position = FAMILY_DEFAULTS[family]["position_embedding_type"]
    given = body.get("position_embedding_type")
    if given is not None and str(given).lower() != position:
        _bad(source, "model.position_embedding_type", given,
             f"model_family {family} uses {position} positions")  # fmt: skip
    body["position_embedding_type"] = position
    for key, value in use_pos.items():
        if value is False and position == "learned":
            _bad(source, f"model.{key}", value, "GPT-2 in wsjax always has learned positions")
    if dropout is not None:  # Cerebras GPT-2 key: residual + embedding dropout
        body.setdefault("residual_dropout_rate", dropout)
        body.setdefault("embedding_dropout_rate", dropout)
    if position == "learned" and body.get("rotary_dim") is not None:
        logger.warning("%s: model.rotary_dim ignored: model_family gpt2 has learned positions",
                       source)  # fmt: skip
        body["rotary_dim"] = None
    if family != "neox" and body.get("use_untied_layer_norm"):
        why = f"two layer norms per block are GPT-NeoX's; set model_family neox, not {family}"
        _bad(source, "model.use_untied_layer_norm", True, why)
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
    if isinstance(body.get("loss_scaling"), str):
        body["loss_scaling"] = body["loss_scaling"].lower()
    m = _build(ModelConfig, body, "model", source, **inits)
    _check_min(m, "model", source, 1, "vocab_size", "hidden_size", "num_heads")
    _check_min(m, "model", source, 1, "num_hidden_layers", "filter_size", "max_position_embeddings")
    _check_choice(m.nonlinearity, NONLINEARITIES, source, "model.nonlinearity")
    _check_choice(m.loss_scaling, LOSS_SCALINGS, source, "model.loss_scaling")
    if m.loss_weight <= 0:
        _bad(source, "model.loss_weight", m.loss_weight, "must be > 0")
    if m.rope_theta <= 0:
        _bad(source, "model.rope_theta", m.rope_theta, "must be > 0")
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
    if position == "rotary":
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
    if isinstance(value, list):  # Cerebras TF list form: `- name: ...` (it reads item 0)
        if len(value) != 1:
            _bad(source, key, value, "the list form holds exactly one initializer")
        value = value[0]
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: {key}={value!r} must be a mapping with a name")
    _check_subkeys(value, InitSpec, key, source)
    value = dict(value)
    if value.get("distribution") == "untruncated_normal":  # TF's name for a plain normal
        value["distribution"] = "normal"
    spec = _build(InitSpec, value, key, source)
    takes_std = spec.name in ("normal", "truncated_normal")
    if spec.std is None and (takes_std or spec.name not in KNOWN_INITIALIZERS):
        spec = dataclasses.replace(spec, std=init_range)  # unknown names fall back to normal
    if spec.std is not None and spec.std <= 0:
        _bad(source, f"{key}.std", spec.std, "must be > 0")
    _check_choice(spec.mode, ("fan_in", "fan_out", "fan_avg"), source, f"{key}.mode")
    dists = ("truncated_normal", "normal", "uniform")
    _check_choice(spec.distribution, dists, source, f"{key}.distribution")
    if spec.name == "variance_scaling":
        # Cerebras TF: exactly one of scale / scale_type (configure_variance_scaling_parameters)
        if "scale" in value and spec.scale_type is not None:
            _bad(source, f"{key}.scale_type", spec.scale_type, "give scale or scale_type, not both")
        if spec.scale_type is not None:
            _check_choice(spec.scale_type, ("small_init", "wang_init"), source, f"{key}.scale_type")
    elif spec.scale_type is not None:
        _bad(source, f"{key}.scale_type", spec.scale_type, "only variance_scaling takes it")
    if spec.key is not None:
        _check_choice(spec.key, ("num_hidden_layers", "vocab_size"), source, f"{key}.key")
    return spec


# Keys of the learning-rate adjustment Cerebras muP files use (adjust_learning_rate).
LR_ADJUSTABLE = ("decoder_kernel",)


def _build_optimizer(body: dict, source: str) -> OptimizerConfig:
    body = dict(body)
    if isinstance(body.get("optimizer_type"), str):
        body["optimizer_type"] = body["optimizer_type"].lower()
    if "betas" in body:  # PyTorch spelling: betas: [beta1, beta2]
        betas = body.pop("betas")
        if not (isinstance(betas, list | tuple) and len(betas) == 2):
            _bad(source, "optimizer.betas", betas, "must be a list [beta1, beta2]")
        for name, value in zip(("beta1", "beta2"), betas, strict=True):
            if name in body and body[name] != value:
                _bad(source, f"optimizer.{name}", body[name], f"disagrees with betas={betas}")
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
        lr = _coerce(lr, float, "optimizer.learning_rate", source)
        if lr < 0:
            _bad(source, "optimizer.learning_rate", lr, "must be >= 0")
    given: dict[str, Any] = {"learning_rate": lr}
    adjust = body.get("adjust_learning_rate")
    if adjust is not None:
        if not isinstance(adjust, Mapping):
            _bad(
                source,
                "optimizer.adjust_learning_rate",
                adjust,
                "must map a layer type to a factor",
            )
        for name, factor in adjust.items():
            _check_choice(name, LR_ADJUSTABLE, source, "optimizer.adjust_learning_rate")
            _coerce(factor, float, f"optimizer.adjust_learning_rate.{name}", source)
        given["adjust_learning_rate"] = tuple((k, float(v)) for k, v in adjust.items())
    o = _build(OptimizerConfig, body, "optimizer", source, **given)
    _check_choice(o.optimizer_type, OPTIMIZERS, source, "optimizer.optimizer_type")
    _check_rate(o, "optimizer", source, "beta1", "beta2", "momentum")
    if o.epsilon <= 0:
        _bad(source, "optimizer.epsilon", o.epsilon, "must be > 0")
    _check_min(o, "optimizer", source, 0, "weight_decay_rate")
    _check_min(o, "optimizer", source, 1, "grad_accum_steps")
    for name in ("max_gradient_norm", "max_gradient_value"):
        value = getattr(o, name)
        if value is not None and value <= 0:
            _bad(source, f"optimizer.{name}", value, "must be > 0 (omit it to disable clipping)")
    if o.max_gradient_norm is not None and o.max_gradient_value is not None:
        _bad(source, "optimizer.max_gradient_value", o.max_gradient_value,
             "give max_gradient_norm or max_gradient_value, not both")  # fmt: skip
    return o


def _build_phase(value: Any, i: int, last: bool, source: str) -> LRPhase:
    key = f"optimizer.learning_rate[{i}]"
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: {key}={value!r} must be a mapping with a scheduler")
    value = {LR_PHASE_ALIASES.get(k, k): v for k, v in value.items()}
    _check_subkeys(value, LRPhase, key, source)
    if isinstance(value.get("scheduler"), str):
        name = value["scheduler"].lower()
        value["scheduler"] = name[:-2] if name.endswith("lr") and name[:-2] in SCHEDULERS else name
    given = {}
    for name, kind in (("values", float), ("boundaries", int)):
        if name in value:
            items = value[name]
            if not isinstance(items, list) or not items:
                _bad(source, f"{key}.{name}", items, "must be a non-empty list")
            given[name] = tuple(_coerce(x, kind, f"{key}.{name}", source) for x in items)
    p = _build(LRPhase, value, key, source, **given)
    _check_choice(p.scheduler, SCHEDULERS, source, f"{key}.scheduler")
    _check_min(p, key, source, 1, "steps", "decay_steps")
    _check_min(p, key, source, 0, "initial_learning_rate", "end_learning_rate", "learning_rate")
    _check_min(p, key, source, 0, "alpha", "power")

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
            _bad(source, f"{key}.values", list(p.values), "needs one more value than boundaries")
        if list(p.boundaries) != sorted(set(p.boundaries)) or p.boundaries[0] < 1:
            _bad(source, f"{key}.boundaries", list(p.boundaries), "must increase from >= 1")
    else:
        need("initial_learning_rate", f"required by the {p.scheduler} scheduler")
    if p.scheduler in ("linear", "polynomial", "cosinedecay", "cosine") and p.length is None:
        need("decay_steps", f"the {p.scheduler} scheduler needs decay_steps or steps")
    if p.scheduler in ("linear", "polynomial", "cosinedecay"):
        need("end_learning_rate", f"required by the {p.scheduler} scheduler")
    if p.scheduler in ("exponential", "inverseexponentialtimedecay"):
        need("decay_rate", f"required by the {p.scheduler} scheduler")
        if p.decay_rate <= 0:
            _bad(source, f"{key}.decay_rate", p.decay_rate, "must be > 0")
    if p.scheduler == "inverseexponentialtimedecay":
        need("decay_steps", "required by the inverseexponentialtimedecay scheduler")
        need("step_exponent", "required by the inverseexponentialtimedecay scheduler")
    return p


def _build_runconfig(body: dict, source: str) -> RunConfig:
    r = _build(RunConfig, body, "runconfig", source)
    _check_min(r, "runconfig", source, 1, "max_steps", "log_steps", "save_summary_steps")
    _check_min(r, "runconfig", source, 0, "keep_checkpoint_max")  # 0: keep all (Cerebras)
    _check_min(r, "runconfig", source, 0, "save_checkpoints_steps", "seed")  # 0: no periodic ckpt
    return r


def _build_streaming(body: dict, source: str) -> StreamingConfig:
    s = _build(StreamingConfig, body, "streaming", source)
    _check_min(s, "streaming", source, 1, "prefetch_depth", "micro_batch_size")
    _check_min(s, "streaming", source, 1e-6, "device_memory_gb", "host_memory_gb")
    key = "streaming.optimizer_placement"
    _check_choice(s.optimizer_placement, OPTIMIZER_PLACEMENTS, source, key)
    _check_choice(s.host_memory_kind, HOST_MEMORY_KINDS, source, "streaming.host_memory_kind")
    return s


def _build_input(body: dict, section: str, model: ModelConfig, source: str) -> InputConfig:
    body = dict(body)
    body.setdefault("split", "train" if section == "train_input" else "eval")
    body.setdefault("repeat", section == "train_input")  # Cerebras: train repeats, eval does not
    if body.get("max_sequence_length") is None:
        body["max_sequence_length"] = model.max_position_embeddings
        logger.info("%s: %s.max_sequence_length=%d derived from model.max_position_embeddings",
                    source, section, model.max_position_embeddings)  # fmt: skip
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
