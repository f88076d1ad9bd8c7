"""HuggingFace ``config.json`` <-> our ModelConfig: GPT-J, GPT-2, GPT-NeoX, Llama, Mistral, Qwen2.

Import reads what HF's class computes with; export refuses (one line) a config HF's class cannot
express, so an exported checkpoint never means something else in transformers.
"""

from __future__ import annotations

from typing import Any

from wsjax.config.schema import LLAMA3_SCALING_ARGS, LLAMA_FAMILIES, InitSpec, ModelConfig
from wsjax.errors import CheckpointError

CONFIG_FILE = "config.json"
ARCHITECTURES = {
    "gptj": "GPTJForCausalLM", "gpt2": "GPT2LMHeadModel", "neox": "GPTNeoXForCausalLM",
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
}  # fmt: skip
_MODEL_TYPES = {  # HF model_type -> family
    "gptj": "gptj", "gpt2": "gpt2", "gpt_neox": "neox",
    "llama": "llama", "mistral": "mistral", "qwen2": "qwen2",
}  # fmt: skip
# HF activation_function <-> our nonlinearity
_ACTIVATIONS = {
    "gelu_new": "gelu",
    "gelu_pytorch_tanh": "gelu",
    "gelu": "gelu_exact",
    "relu": "relu",
}
_ACTIVATIONS_OUT = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu"}
_NEOX_ROTARY_PCT = 0.25  # transformers' default when config.json names no rotary fraction


def config_from_hf(hf: dict, source: str = CONFIG_FILE) -> ModelConfig:
    """Our ModelConfig for an HF ``config.json`` dict (GPT-J, GPT-2 or GPT-NeoX).

    It is long because it is the mapping table of HF's keys, family by family, in one place.
    """
    family = _MODEL_TYPES.get(hf.get("model_type"))
    if family is None:
        raise CheckpointError(
            f"{source}: model_type {hf.get('model_type')!r} is not supported; "
            f"valid: {sorted(_MODEL_TYPES)}"
        )

    def get(*names, default=None):
        for n in names:
            if n in hf and hf[n] is not None:
                return hf[n]
        if default is None:
            raise CheckpointError(f"{source}: missing key {names[0]!r}")
        return default

    if family in LLAMA_FAMILIES:
        return _llama_from_hf(hf, family, get, source)
    hidden = int(get("n_embd", "hidden_size"))
    heads = int(get("n_head", "num_attention_heads"))
    act = get(
        "activation_function", "hidden_act", default="gelu" if family == "neox" else "gelu_new"
    )
    if act not in _ACTIVATIONS:
        raise CheckpointError(
            f"{source}: activation_function {act!r} is not supported; valid: {sorted(_ACTIVATIONS)}"
        )
    if family == "gpt2":
        for key, ok in (
            ("scale_attn_weights", True),
            ("scale_attn_by_inverse_layer_idx", False),
            ("add_cross_attention", False),
        ):
            if hf.get(key, ok) != ok:
                raise CheckpointError(f"{source}: {key}={hf[key]!r} is not supported; need {ok}")
    init_range = float(get("initializer_range", default=0.02))
    init = InitSpec(name="normal", std=init_range)
    common = dict(
        family=family,
        vocab_size=int(get("vocab_size")),
        hidden_size=hidden,
        num_heads=heads,
        num_hidden_layers=int(get("n_layer", "num_hidden_layers")),
        filter_size=int(get("n_inner", "intermediate_size", default=4 * hidden)),
        max_position_embeddings=int(get("n_positions", "max_position_embeddings")),
        embedding_size=None,
        use_ffn_bias=True,
        layer_norm_epsilon=float(get("layer_norm_epsilon", "layer_norm_eps", default=1e-5)),
        nonlinearity=_ACTIVATIONS[act],
        initializer=init,
        embedding_initializer=init,
        output_layer_initializer=init,
        initializer_range=init_range,
    )
    if family == "neox":
        return ModelConfig(**common, **_neox_from_hf(hf, get, hidden // heads, source))
    gptj = family == "gptj"
    return ModelConfig(
        **common,
        position_embedding_type="rotary" if gptj else "learned",
        rotary_dim=int(get("rotary_dim", default=hidden // heads)) if gptj else None,
        share_embedding_weights=bool(hf.get("tie_word_embeddings", not gptj)),
        use_bias_in_output=gptj,
        use_projection_bias_in_attention=not gptj,
        use_ffn_bias_in_attention=not gptj,
        embedding_dropout_rate=float(get("embd_pdrop", default=0.0)),
        attention_dropout_rate=float(get("attn_pdrop", default=0.0)),
        residual_dropout_rate=float(get("resid_pdrop", default=0.0)),
    )


def _neox_from_hf(hf: dict, get, head_dim: int, source: str) -> dict:
    # transformers >= 5 writes rope_parameters; older files (Pythia on the hub) the flat keys
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise CheckpointError(
            f"{source}: rope_type {rope['rope_type']!r} is not supported; valid: ['default']"
        )
    pct = float(rope.get("partial_rotary_factor", get("rotary_pct", default=_NEOX_ROTARY_PCT)))
    theta = float(rope.get("rope_theta", get("rotary_emb_base", default=10000.0)))
    bias = bool(hf.get("attention_bias", True))
    hidden_dropout = float(get("hidden_dropout", default=0.0))
    return dict(
        position_embedding_type="rotary",
        rotary_dim=int(head_dim * pct),  # as HF computes it
        rope_theta=theta,
        share_embedding_weights=bool(hf.get("tie_word_embeddings", False)),
        use_bias_in_output=False,
        use_projection_bias_in_attention=bias,
        use_ffn_bias_in_attention=bias,
        use_untied_layer_norm=True,
        use_parallel_residual=bool(hf.get("use_parallel_residual", True)),
        embedding_dropout_rate=hidden_dropout,
        attention_dropout_rate=float(get("attention_dropout", default=0.0)),
        residual_dropout_rate=hidden_dropout,
    )


def config_to_hf(cfg) -> dict:
    """An HF ``config.json`` dict for our ModelConfig; error if HF's class cannot express it."""
    if cfg.family == "neox":
        return _neox_to_hf(cfg)
    if cfg.family in LLAMA_FAMILIES:
        return _llama_to_hf(cfg)
    gptj = cfg.family == "gptj"
    _require(
        cfg,
        use_bias_in_output=gptj,
        use_projection_bias_in_attention=not gptj,
        use_ffn_bias_in_attention=not gptj,
        use_ffn_bias=True,
        position_embedding_type="rotary" if gptj else "learned",
        **({"use_untied_layer_norm": False, "use_parallel_residual": True} if gptj else {}),
        **({"rope_theta": 10000.0} if gptj else {}),
    )
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[cfg.family]],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "n_embd": cfg.hidden_size,
        "n_head": cfg.num_heads,
        "n_layer": cfg.num_hidden_layers,
        "n_inner": cfg.filter_size,
        "n_positions": cfg.max_position_embeddings,
        "activation_function": _ACTIVATIONS_OUT[cfg.nonlinearity],
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "initializer_range": cfg.initializer_range,
        "embd_pdrop": cfg.embedding_dropout_rate,
        "attn_pdrop": cfg.attention_dropout_rate,
        "resid_pdrop": cfg.residual_dropout_rate,
        "tie_word_embeddings": bool(cfg.share_embedding_weights),
        "dtype": "float32",
    }
    if gptj:
        out["rotary_dim"] = cfg.rotary_dim or cfg.head_dim
    return out


def _neox_to_hf(cfg) -> dict:
    bias = cfg.use_projection_bias_in_attention  # HF's attention_bias covers qkv and dense
    _require(
        cfg,
        use_bias_in_output=False,
        use_ffn_bias_in_attention=bias,
        use_ffn_bias=True,
        use_untied_layer_norm=True,
        share_embedding_weights=False,
        embedding_dropout_rate=cfg.residual_dropout_rate,  # both are HF's hidden_dropout
    )
    pct = cfg.rotary_dim / cfg.head_dim
    if int(cfg.head_dim * pct) != cfg.rotary_dim:  # HF recomputes rotary_dim from the fraction
        raise CheckpointError(
            f"model.rotary_dim={cfg.rotary_dim} cannot be exported to HF GPTNeoXForCausalLM: "
            f"int(head_dim {cfg.head_dim} * {pct!r}) != {cfg.rotary_dim}"
        )
    return {
        "architectures": [ARCHITECTURES["neox"]],
        "model_type": "gpt_neox",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "intermediate_size": cfg.filter_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": _ACTIVATIONS_OUT[cfg.nonlinearity],
        "layer_norm_eps": cfg.layer_norm_epsilon,
        "initializer_range": cfg.initializer_range,
        "hidden_dropout": cfg.residual_dropout_rate,
        "attention_dropout": cfg.attention_dropout_rate,
        "attention_bias": bool(bias),
        "use_parallel_residual": bool(cfg.use_parallel_residual),
        "tie_word_embeddings": False,
        # both spellings: rope_parameters for transformers >= 5, the flat keys for older ones
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": cfg.rope_theta,
            "partial_rotary_factor": pct,
        },
        "rotary_pct": pct,
        "rotary_emb_base": cfg.rope_theta,
        "dtype": "float32",
    }


def _require(cfg, **need: Any) -> None:
    for key, value in need.items():
        if getattr(cfg, key) != value:
            raise CheckpointError(
                f"model.{key}={getattr(cfg, key)!r} cannot be exported to HF "
                f"{ARCHITECTURES[cfg.family]}; it needs {value!r}"
            )


# ---- Llama, Mistral, Qwen2 ----------------------------------------------------------------------
# Biases each HF class can express: (q/k/v, o_proj, MLP) as config keys, or fixed by the class.
_LLAMA_BIASES = {"mistral": (False, False, False), "qwen2": (True, False, False)}


def _llama_from_hf(hf: dict, family: str, get, source: str) -> ModelConfig:
    hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
    if hf.get("head_dim") not in (None, hidden // heads):
        raise CheckpointError(
            f"{source}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads "
            f"{hidden // heads} is not supported"
        )
    if get("hidden_act", default="silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {hf['hidden_act']!r}: only 'silu' (SwiGLU)")
    bias = bool(hf.get("attention_bias", False))
    qkv_bias, out_bias, mlp_bias = _LLAMA_BIASES.get(
        family, (bias, bias, bool(hf.get("mlp_bias", False)))
    )
    init_range = float(get("initializer_range", default=0.02))
    init = InitSpec(name="normal", std=init_range)
    return ModelConfig(
        family=family,
        vocab_size=int(get("vocab_size")),
        hidden_size=hidden,
        num_heads=heads,
        num_hidden_layers=int(get("num_hidden_layers")),
        filter_size=int(get("intermediate_size")),
        max_position_embeddings=int(get("max_position_embeddings")),
        position_embedding_type="rotary",
        rotary_dim=hidden // heads,
        embedding_size=None,
        share_embedding_weights=bool(hf.get("tie_word_embeddings", False)),
        use_bias_in_output=False,
        use_projection_bias_in_attention=qkv_bias,
        use_ffn_bias_in_attention=out_bias,
        use_ffn_bias=mlp_bias,
        layer_norm_epsilon=float(get("rms_norm_eps", default=1e-6)),
        nonlinearity="swiglu",
        attention_dropout_rate=float(get("attention_dropout", default=0.0)),
        initializer=init,
        embedding_initializer=init,
        output_layer_initializer=init,
        initializer_range=init_range,
        norm_type="rmsnorm",
        num_kv_groups=int(get("num_key_value_heads", default=heads)),
        attention_sliding_window_length=_sliding_window(hf, family, source),
        **_rope_from_hf(hf, source),
    )


def _sliding_window(hf: dict, family: str, source: str) -> int | None:
    """Mistral's window; Qwen2's when every layer slides (HF: layer_types, else the layers from
    max_window_layers on, default 28, when use_sliding_window); HF's Llama has none."""
    window = hf.get("sliding_window")
    if family == "llama" or window is None:
        return None
    if family == "mistral":
        return int(window)
    if not hf.get("use_sliding_window", False):
        return None
    first = int(hf.get("max_window_layers", 28))
    kinds = hf.get("layer_types") or [
        "sliding_attention" if i >= first else "full_attention"
        for i in range(int(hf["num_hidden_layers"]))
    ]
    if len(set(kinds)) > 1:
        raise CheckpointError(
            f"{source}: a sliding window on some layers only (layer_types / max_window_layers) "
            "is not supported: every layer or none"
        )
    return int(window) if kinds[0] == "sliding_attention" else None


def _rope_from_hf(hf: dict, source: str) -> dict:
    # transformers >= 5 writes rope_parameters; older files rope_theta + rope_scaling
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise CheckpointError(
            f"{source}: rope_type {kind!r} is not supported; valid: default, linear, llama3"
        )
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError(f"{source}: partial_rotary_factor {rope['partial_rotary_factor']}")
    out = {"rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if kind != "default":
        out |= {"pos_scaling_type": kind, "pos_scaling_factor": float(rope["factor"])}
    if kind == "llama3":
        args = {k: float(rope.get(k, v)) for k, v in LLAMA3_SCALING_ARGS.items()}
        out["pos_scaling_extra_args"] = tuple(sorted(args.items()))
    return out


def _llama_to_hf(cfg) -> dict:
    qkv, out, mlp = _LLAMA_BIASES.get(
        cfg.family, (cfg.use_projection_bias_in_attention,) * 2 + (cfg.use_ffn_bias,)
    )
    _require(
        cfg,
        use_projection_bias_in_attention=qkv,
        use_ffn_bias_in_attention=out,  # HF Llama's attention_bias covers q, k, v and o_proj
        use_ffn_bias=mlp,
        use_bias_in_output=False,
        embedding_dropout_rate=0.0,  # HF's Llama classes have no embedding / residual dropout
        residual_dropout_rate=0.0,
        **({"attention_sliding_window_length": None} if cfg.family == "llama" else {}),
    )
    window = cfg.attention_sliding_window_length
    hf = {
        "architectures": [ARCHITECTURES[cfg.family]],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "num_hidden_layers": cfg.num_hidden_layers,
        "intermediate_size": cfg.filter_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.layer_norm_epsilon,
        "initializer_range": cfg.initializer_range,
        "attention_dropout": cfg.attention_dropout_rate,
        "tie_word_embeddings": bool(cfg.share_embedding_weights),
        "rope_parameters": _rope_to_hf(cfg),
        "dtype": "float32",
    }
    if cfg.family == "llama":
        hf |= {"attention_bias": bool(qkv), "mlp_bias": bool(mlp)}
    elif cfg.family == "mistral":
        hf["sliding_window"] = window
    elif window is not None:  # Qwen2: every layer slides
        hf |= {"use_sliding_window": True, "sliding_window": window, "max_window_layers": 0}
    else:
        hf |= {"use_sliding_window": False, "sliding_window": None}
    return hf


def _rope_to_hf(cfg) -> dict:
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.pos_scaling_type == "llama3":
        args = LLAMA3_SCALING_ARGS | dict(cfg.pos_scaling_extra_args or ())
        rope |= {"rope_type": "llama3", "factor": cfg.pos_scaling_factor, **args}
        rope["original_max_position_embeddings"] = int(args["original_max_position_embeddings"])
    elif cfg.pos_scaling_factor != 1.0:
        rope |= {"rope_type": "linear", "factor": cfg.pos_scaling_factor}
    return rope
