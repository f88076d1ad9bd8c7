"""The model section: family inference, family defaults, NeoX fields and initializer specs.

`build_model` turns the normalised `model:` keys into a `ModelConfig`. The family is explicit
(`model_family`) or inferred from evidence that cannot be silently wrong (see `infer_family`);
initializers accept both Cerebras forms (a mapping, or the TF list form `- name: ...`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from wsjax.config.schema import (
    ATTENTION_MODULES,
    FAMILIES,
    FAMILY_DEFAULTS,
    KNOWN_INITIALIZERS,
    LLAMA3_SCALING_ARGS,
    LLAMA_FAMILIES,
    LOSS_SCALINGS,
    NONLINEARITIES,
    NORM_TYPES,
    POS_SCALING_TYPES,
    POSITION_EMBEDDINGS,
    InitSpec,
    ModelConfig,
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


# Evidence for a family in a file that names no model_family (Cerebras picks the model by the
# directory a file ships in, so its TF GPT-J files name no position_embedding_type).
_ROTARY_KEYS = ("rotary_dim", "rope_theta")  # read by GPT-J and GPT-NeoX only
_NEOX_KEYS = ("rotary_pct", "use_parallel_residual")  # read by GPT-NeoX only
# read by the Cerebras llama / mistral configs only (their directories pick the model there)
_LLAMA_KEYS = ("extra_attention_params", "pos_scaling_type", "attention_sliding_window_length")
_LLAMA_VALUES = (
    ("norm_type", "rmsnorm"), ("nonlinearity", "swiglu"), ("use_rms_norm", True),
    ("attention_module", "multiquery_attention"),
)  # fmt: skip


def _llama_evidence(body: dict) -> list[str]:
    seen = [k for k in _LLAMA_KEYS if body.get(k) is not None]
    lower = lambda v: v.lower() if isinstance(v, str) else v  # noqa: E731
    return seen + [f"{k}: {v}" for k, v in _LLAMA_VALUES if lower(body.get(k)) == v]


def infer_family(body: dict, source: str) -> tuple[str, str]:
    """(family, why): explicit model_family wins; otherwise the evidence must agree.

    Llama (Mistral with a sliding window): RMSNorm, SwiGLU, grouped-query attention or RoPE
    scaling, keys only the Cerebras llama / mistral files carry. GPT-NeoX: use_untied_layer_norm
    true (the NeoX files of the Cerebras gptj directory) or a NeoX-only key. GPT-J: a rotary
    key, rotary positions, or use_untied_layer_norm false (a key only the Cerebras GPT-J model
    reads). GPT-2: learned positions, or no evidence at all (the Cerebras GPT-2 default) unless
    the head is GPT-J's (untied, with a bias). Conflicting or GPT-J-looking-but-unproven
    evidence stops with one line asking for model_family.
    """
    family = coerce(body.get("family"), str | None, "model.model_family", source)
    key = "model.position_embedding_type"
    position = coerce(body.get("position_embedding_type"), str | None, key, source)
    if position is not None:
        position = position.lower()
        check_choice(position, POSITION_EMBEDDINGS, source, key)
    if family is not None:
        family = family.lower()
        check_choice(family, FAMILIES, source, "model.model_family")
        return family, "model_family given"
    untied_norms = body.get("use_untied_layer_norm")
    neox = [k for k in _NEOX_KEYS if body.get(k) is not None]
    neox += ["use_untied_layer_norm: true"] if untied_norms is True else []
    gptj = [k for k in _ROTARY_KEYS if body.get(k) is not None]
    gptj += ["position_embedding_type: rotary"] if position == "rotary" else []
    gptj_only = ["use_untied_layer_norm: false"] if untied_norms is False else []
    gpt2 = ["position_embedding_type: learned"] if position == "learned" else []
    gptj_head = body.get("share_embedding_weights") is False and body.get("use_bias_in_output")
    llama = _llama_evidence(body)
    if llama and not (gpt2 or neox or gptj_only):
        family = "llama" if body.get("attention_sliding_window_length") is None else "mistral"
        why = llama
    elif neox and not gpt2 and not gptj_only and not llama:
        family, why = "neox", neox + gptj
    elif (gptj or gptj_only) and not gpt2 and not neox and not llama:
        family, why = "gptj", gptj + gptj_only
    elif not (gptj or gptj_only or neox or llama) and (gpt2 or not gptj_head):
        family = "gpt2"
        why = gpt2 or ["no rotary or NeoX keys (the Cerebras GPT-2 default)"]
    else:
        seen = gpt2 + gptj + gptj_only + neox + llama
        seen = seen or ["an untied output layer with a bias (GPT-J's head) but no rotary key"]
        raise ConfigError(
            f"{source}: model family is ambiguous ({', '.join(seen)}); set model.model_family"
            f" to {' | '.join(FAMILIES)}"
        )
    reason = ", ".join(why)
    logger.info("%s: model_family %s inferred from %s", source, family, reason)
    return family, reason


def _rotary_dim_from_pct(body: dict, source: str) -> None:
    """A HF-style rotary_pct becomes rotary_dim = int(head_dim * rotary_pct) (contract 2)."""
    pct = coerce(body.pop("rotary_pct", None), float | None, "model.rotary_pct", source)
    if pct is None:
        return
    if not 0.0 < pct <= 1.0:
        bad(source, "model.rotary_pct", pct, "must be in (0, 1]")
    heads = coerce(body.get("num_heads"), int, "model.num_heads", source)
    hidden = coerce(body.get("hidden_size"), int, "model.hidden_size", source)
    rotary = int(hidden // heads * pct)
    if body.get("rotary_dim") not in (None, rotary):
        bad(source, "model.rotary_dim", body["rotary_dim"], f"disagrees with rotary_pct={pct}")
    body["rotary_dim"] = rotary


def build_model(body: dict, source: str) -> ModelConfig:
    """The model section as a ModelConfig: the family inferred, its defaults, the Cerebras
    spellings resolved, every cross-key rule checked with the offending key in the message.

    It is long because it is one flat list of the section's rules, each a few lines, read top
    to bottom in the order they apply."""
    body = dict(body)
    dropout = coerce(body.pop("dropout_rate", None), float | None, "model.dropout_rate", source)
    pos_keys = ("use_position_embedding", "use_position_embeddings")
    use_pos = {k: body.pop(k) for k in pos_keys if k in body}
    family, _ = infer_family(body, source)
    _rotary_dim_from_pct(body, source)
    llama_given = _llama_keys(body, source)
    body = {**FAMILY_DEFAULTS[family], **body, "family": family}
    position = FAMILY_DEFAULTS[family]["position_embedding_type"]
    given = body.get("position_embedding_type")
    if given is not None and str(given).lower() != position:
        why = f"model_family {family} uses {position} positions"
        bad(source, "model.position_embedding_type", given, why)
    body["position_embedding_type"] = position
    for key, value in use_pos.items():
        if value is False and position == "learned":
            bad(source, f"model.{key}", value, "GPT-2 in wsjax always has learned positions")
    if dropout is not None:  # Cerebras GPT-2 key: residual + embedding dropout
        body.setdefault("residual_dropout_rate", dropout)
        body.setdefault("embedding_dropout_rate", dropout)
    if position == "learned" and body.get("rotary_dim") is not None:
        why = "model_family gpt2 has learned positions"
        logger.warning("%s: model.rotary_dim ignored: %s", source, why)
        body["rotary_dim"] = None
    if family != "neox" and body.get("use_untied_layer_norm"):
        why = f"two layer norms per block are GPT-NeoX's; set model_family neox, not {family}"
        bad(source, "model.use_untied_layer_norm", True, why)
    if family != "neox" and body.get("use_parallel_residual") is False:
        why = f"only GPT-NeoX has a sequential variant; set model_family neox, not {family}"
        bad(source, "model.use_parallel_residual", False, why)
    init_range = coerce(
        body.get("initializer_range", 0.02), float, "model.initializer_range", source
    )
    if init_range <= 0:
        bad(source, "model.initializer_range", init_range, "must be > 0")
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
    weight = coerce(body.get("loss_weight", 1.0), float, "model.loss_weight", source)
    if weight != 1.0 and body.get("loss_scaling", "num_tokens") == "num_tokens":
        # Cerebras GPT-2/3 model.py: a loss_weight with num_tokens falls back to batch_size
        msg = "%s: model.loss_weight=%g with loss_scaling num_tokens: using batch_size, as Cerebras"
        logger.warning(msg, source, weight)
        body["loss_scaling"] = "batch_size"
    m = build_section(ModelConfig, body, "model", source, **inits, **llama_given)
    check_min(m, "model", source, 1, "vocab_size", "hidden_size", "num_heads")
    check_min(m, "model", source, 1, "num_hidden_layers", "filter_size", "max_position_embeddings")
    check_choice(m.nonlinearity, NONLINEARITIES, source, "model.nonlinearity")
    check_choice(m.loss_scaling, LOSS_SCALINGS, source, "model.loss_scaling")
    if m.loss_weight <= 0:
        bad(source, "model.loss_weight", m.loss_weight, "must be > 0")
    if m.rope_theta <= 0:
        bad(source, "model.rope_theta", m.rope_theta, "must be > 0")
    if m.hidden_size % m.num_heads:
        bad(source, "model.num_heads", m.num_heads, f"must divide hidden_size={m.hidden_size}")
    if m.embedding_size not in (None, m.hidden_size):
        bad(
            source,
            "model.embedding_size",
            m.embedding_size,
            f"must equal hidden_size={m.hidden_size}",
        )
    check_rate(m, "model", source, "embedding_dropout_rate", "attention_dropout_rate")
    check_rate(m, "model", source, "residual_dropout_rate")
    if m.layer_norm_epsilon <= 0:
        bad(source, "model.layer_norm_epsilon", m.layer_norm_epsilon, "must be > 0")
    if position == "rotary":
        rotary = m.head_dim if m.rotary_dim is None else m.rotary_dim
        if not (0 < rotary <= m.head_dim and rotary % 2 == 0):
            bad(
                source,
                "model.rotary_dim",
                rotary,
                f"must be even and in [2, {m.head_dim}] (head_dim)",
            )
        m = dataclasses.replace(m, rotary_dim=rotary)
    _check_llama(m, source)
    return m


def _llama_keys(body: dict, source: str) -> dict:
    """Cerebras' spellings of the Llama-family fields, normalised in ``body``; returns the
    fields built here (``pos_scaling_extra_args``, a mapping kept as sorted pairs)."""
    rms = coerce(body.pop("use_rms_norm", None), bool | None, "model.use_rms_norm", source)
    if rms:  # Cerebras R1.9's spelling of norm_type: rmsnorm
        if str(body.get("norm_type", "rmsnorm")).lower() != "rmsnorm":
            bad(source, "model.use_rms_norm", True, f"disagrees with norm_type={body['norm_type']}")
        body["norm_type"] = "rmsnorm"
    for key in ("norm_type", "pos_scaling_type"):
        if isinstance(body.get(key), str):
            body[key] = body[key].lower()
    key = "model.attention_module"
    module = coerce(body.pop("attention_module", None), str | None, key, source)
    check_choice(module or "aiayn_attention", ATTENTION_MODULES, source, key)
    extra = body.pop("extra_attention_params", None) or {}
    if not isinstance(extra, Mapping) or set(extra) - {"num_kv_groups"}:
        bad(source, "model.extra_attention_params", extra, "only num_kv_groups is read")
    if extra and module != "multiquery_attention":
        why = "Cerebras reads it with attention_module: multiquery_attention only"
        bad(source, "model.extra_attention_params", dict(extra), why)
    if module == "multiquery_attention":  # Cerebras MultiQueryAttention: one group by default
        groups = extra.get("num_kv_groups", 1)
        if body.get("num_kv_groups") not in (None, groups):
            bad(source, "model.num_kv_groups", body["num_kv_groups"], f"disagrees with {groups}")
        body["num_kv_groups"] = groups
    args = body.pop("pos_scaling_extra_args", None)
    if args is None:
        return {}
    key = "model.pos_scaling_extra_args"
    if not isinstance(args, Mapping) or set(args) - set(LLAMA3_SCALING_ARGS):
        bad(source, key, args, f"keys are {', '.join(LLAMA3_SCALING_ARGS)}")
    pairs = tuple(sorted((k, coerce(v, float, f"{key}.{k}", source)) for k, v in args.items()))
    return {"pos_scaling_extra_args": pairs}


def _check_llama(m: ModelConfig, source: str) -> None:
    """What the Llama families need, and the keys only they read (one line each)."""
    llama = m.family in LLAMA_FAMILIES
    check_choice(m.norm_type, NORM_TYPES, source, "model.norm_type")
    check_choice(m.pos_scaling_type, POS_SCALING_TYPES, source, "model.pos_scaling_type")
    readers = f"model_family {' | '.join(LLAMA_FAMILIES)}"
    need = {"norm_type": "rmsnorm", "nonlinearity": "swiglu"} if llama else {}
    for key, value in need.items():
        if getattr(m, key) != value:
            bad(source, f"model.{key}", getattr(m, key), f"model_family {m.family} uses {value}")
    if llama and m.rotary_dim != m.head_dim:
        bad(source, "model.rotary_dim", m.rotary_dim, f"{m.family} rotates all {m.head_dim} dims")
    only_llama = {
        "norm_type": m.norm_type != "layernorm",
        "nonlinearity": m.nonlinearity == "swiglu",
        "num_kv_groups": m.num_kv_groups not in (None, m.num_heads),
        "attention_sliding_window_length": m.attention_sliding_window_length is not None,
        "pos_scaling_factor": m.pos_scaling_factor != 1.0,
        "pos_scaling_type": m.pos_scaling_type != "linear",
    }
    for key, used in only_llama.items():
        if used and not llama:
            bad(source, f"model.{key}", getattr(m, key), f"only {readers} read it")
    groups, window = m.num_kv_groups, m.attention_sliding_window_length
    if groups is not None and (groups < 1 or m.num_heads % groups):
        bad(source, "model.num_kv_groups", groups, f"must divide num_heads={m.num_heads}")
    if window is not None and window < 1:
        bad(source, "model.attention_sliding_window_length", window, "must be >= 1")
    if m.pos_scaling_factor <= 0:
        bad(source, "model.pos_scaling_factor", m.pos_scaling_factor, "must be > 0")
    args = dict(LLAMA3_SCALING_ARGS) | dict(m.pos_scaling_extra_args or ())
    if m.pos_scaling_extra_args is not None and m.pos_scaling_type != "llama3":
        bad(source, "model.pos_scaling_extra_args", args, "only pos_scaling_type llama3 reads it")
    if args["high_freq_factor"] <= args["low_freq_factor"]:
        why = f"high_freq_factor must exceed low_freq_factor={args['low_freq_factor']}"
        bad(source, "model.pos_scaling_extra_args.high_freq_factor", args["high_freq_factor"], why)


def _build_init(value: Any, key: str, init_range: float, source: str) -> InitSpec:
    if value is None:
        return InitSpec(name="normal", std=init_range)
    if isinstance(value, list):  # Cerebras TF list form: `- name: ...` (it reads item 0)
        if len(value) != 1:
            bad(source, key, value, "the list form holds exactly one initializer")
        value = value[0]
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: {key}={value!r} must be a mapping with a name")
    check_subkeys(value, InitSpec, key, source)
    value = dict(value)
    if value.get("distribution") == "untruncated_normal":  # TF's name for a plain normal
        value["distribution"] = "normal"
    spec = build_section(InitSpec, value, key, source)
    takes_std = spec.name in ("normal", "truncated_normal")
    if spec.std is None and (takes_std or spec.name not in KNOWN_INITIALIZERS):
        spec = dataclasses.replace(spec, std=init_range)  # unknown names fall back to normal
    if spec.std is not None and spec.std <= 0:
        bad(source, f"{key}.std", spec.std, "must be > 0")
    check_choice(spec.mode, ("fan_in", "fan_out", "fan_avg"), source, f"{key}.mode")
    dists = ("truncated_normal", "normal", "uniform")
    check_choice(spec.distribution, dists, source, f"{key}.distribution")
    if spec.name == "variance_scaling":
        # Cerebras TF: exactly one of scale / scale_type (configure_variance_scaling_parameters)
        if spec.scale is not None and spec.scale_type is not None:
            bad(source, f"{key}.scale_type", spec.scale_type, "give scale or scale_type, not both")
        if spec.scale_type is not None:
            check_choice(spec.scale_type, ("small_init", "wang_init"), source, f"{key}.scale_type")
    elif spec.scale_type is not None:
        bad(source, f"{key}.scale_type", spec.scale_type, "only variance_scaling takes it")
    if spec.key is not None:
        check_choice(spec.key, ("num_hidden_layers", "vocab_size"), source, f"{key}.key")
    return spec
