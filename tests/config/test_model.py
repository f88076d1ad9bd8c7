"""The model section (wsjax.config.model): the family inferred from the keys, its defaults, and
the initializers (InitSpec)."""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.config.base import BASE, build, raises
from wsjax.config import InitSpec, config_from_dict
from wsjax.models.init import make_initializer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# ---------------------------------------------------------------- family


def test_family_inference_and_defaults(caplog):
    with caplog.at_level(logging.INFO, logger="wsjax"):
        j = build()
    assert j.model.family == "gptj" and "model_family gptj inferred from" in caplog.text
    assert j.model.rotary_dim == j.model.head_dim == 16
    assert not j.model.share_embedding_weights and j.model.use_bias_in_output
    assert not j.model.use_projection_bias_in_attention and not j.model.use_ffn_bias_in_attention

    g = build(model={"position_embedding_type": "learned"})
    assert g.model.family == "gpt2" and g.model.rotary_dim is None
    assert g.model.share_embedding_weights and not g.model.use_bias_in_output
    assert g.model.use_projection_bias_in_attention and g.model.use_ffn_bias_in_attention

    d = copy.deepcopy(BASE)
    del d["model"]["position_embedding_type"]
    assert config_from_dict(d).model.family == "gpt2"  # Cerebras default: learned


def test_explicit_family_overrides_inference():
    d = copy.deepcopy(BASE)
    del d["model"]["position_embedding_type"]
    d["model"]["model_family"] = "GPTJ"
    cfg = config_from_dict(d)
    assert cfg.model.family == "gptj" and cfg.model.position_embedding_type == "rotary"
    cfg = build(model={"model_family": "gptj", "share_embedding_weights": True})
    assert cfg.model.share_embedding_weights  # explicit keys beat family defaults
    raises("model_family gpt2 uses learned", model={"model_family": "gpt2"})
    raises(r"model.model_family='gpt4'", model={"model_family": "gpt4"})


def test_dropout_rate_sets_residual_and_embedding():
    m = build(model={"dropout_rate": 0.2, "residual_dropout_rate": 0.05}).model
    assert (m.residual_dropout_rate, m.embedding_dropout_rate, m.attention_dropout_rate) == (
        0.05,
        0.2,
        0.0,
    )


def test_rotary_dim_with_learned_positions_is_ambiguous_unless_family_given(caplog):
    msg = raises("ambiguous", model={"position_embedding_type": "learned", "rotary_dim": 8})
    assert "model.model_family" in msg
    with caplog.at_level(logging.WARNING, logger="wsjax"):
        m = build(model={"model_family": "gpt2", "position_embedding_type": "learned",
                         "rotary_dim": 8}).model  # fmt: skip
    assert m.rotary_dim is None and "rotary_dim ignored" in caplog.text


def test_loss_scaling_factor_info_with_mixed_precision(caplog):
    with caplog.at_level(logging.INFO, logger="wsjax"):
        cfg = build(model={"mixed_precision": True}, optimizer={"loss_scaling_factor": "dynamic"})
    assert cfg.optimizer.loss_scaling_factor == "dynamic"
    assert caplog.text.count("bf16 needs no loss scaling") == 1


# ---------------------------------------------------------------- InitSpec


def _std(spec: InitSpec, **kw) -> float:
    args = {"fan_in": 256, "fan_out": 512, "num_layers": 8, "hidden_size": 256, "vocab_size": 100}
    x = make_initializer(spec, **{**args, **kw})(jax.random.key(0), (256, 512), jnp.float32)
    return float(np.std(np.asarray(x)))


def test_initializers_std():
    assert _std(InitSpec("normal", std=0.05)) == pytest.approx(0.05, rel=0.02)
    assert _std(InitSpec("wang_init")) == pytest.approx(2 / (8 * math.sqrt(256)), rel=0.02)
    assert _std(InitSpec("small_init")) == pytest.approx(math.sqrt(2 / (5 * 256)), rel=0.02)
    scaled = InitSpec(
        "scaled_init_normal", std=0.02, key="num_hidden_layers", distribution="normal"
    )
    assert _std(scaled) == pytest.approx(0.02 / math.sqrt(16), rel=0.02)
    vs = InitSpec("variance_scaling", scale=2.0, mode="fan_out", distribution="normal")
    assert _std(vs) == pytest.approx(math.sqrt(2.0 / 512), rel=0.02)
    assert _std(InitSpec("xavier_uniform")) == pytest.approx(math.sqrt(2.0 / 768), rel=0.02)
    assert _std(InitSpec("zeros")) == 0.0


def test_truncated_normal_bounds():
    spec = InitSpec("truncated_normal", std=1.0, mean=0.5, a=0.0, b=1.0)
    x = np.asarray(make_initializer(spec, 4, 4, 1, 4, 4)(jax.random.key(1), (10000,), jnp.float32))
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.std() > 0.2


def test_unknown_initializer_warns_once_and_falls_back(caplog):
    cfg = build(model={"initializer_range": 0.03, "initializer": {"name": "fancy_init_xyz"}})
    spec = cfg.model.initializer
    assert spec.std == 0.03
    with caplog.at_level(logging.WARNING, logger="wsjax"):
        assert _std(spec) == pytest.approx(0.03, rel=0.02)
        _std(spec)
    lines = [r.getMessage() for r in caplog.records if "fancy_init_xyz" in r.getMessage()]
    assert len(lines) == 1 and "normal(std=0.03)" in lines[0]


def test_default_initializers_use_initializer_range():
    m = build(model={"initializer_range": 0.01}).model
    for spec in (m.initializer, m.embedding_initializer, m.output_layer_initializer):
        assert spec == InitSpec("normal", std=0.01)
