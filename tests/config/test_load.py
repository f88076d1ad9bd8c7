"""Tests for wsjax.config: params files, key checks, validation, overrides, InitSpec."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from wsjax.config import InitSpec, LRPhase, config_from_dict, load_config
from wsjax.errors import ConfigError
from wsjax.models.init import make_initializer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

BASE = {
    "train_input": {"data_dir": "builtin:stdlib", "max_sequence_length": 32, "batch_size": 8},
    "eval_input": {"data_dir": "builtin:stdlib", "max_sequence_length": 32, "batch_size": 8},
    "model": {
        "vocab_size": 256,
        "hidden_size": 64,
        "num_heads": 4,
        "num_hidden_layers": 2,
        "filter_size": 128,
        "max_position_embeddings": 64,
        "position_embedding_type": "rotary",
    },
    "optimizer": {"optimizer_type": "AdamW", "learning_rate": 1.0e-3},
}


def build(overrides=(), **sections):
    """BASE with some section keys replaced: build(model={"num_heads": 5})."""
    d = copy.deepcopy(BASE)
    for section, keys in sections.items():
        if keys is None:
            d.pop(section, None)
        else:
            d.setdefault(section, {}).update(keys)
    return config_from_dict(d, source="t.yaml", overrides=overrides)


def raises(match: str, **sections):
    with pytest.raises(ConfigError, match=match) as info:
        build(**sections)
    msg = str(info.value)
    assert msg.startswith("t.yaml: ") and "\n" not in msg
    return msg


# ---------------------------------------------------------------- shipped files


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path):
    cfg = load_config(path)
    assert cfg.source == str(path)
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())), source=str(path))
    assert again == cfg


def test_shipped_config_key_fields():
    j6 = load_config(CONFIGS / "params_gptj_6B.yaml")
    assert (j6.model.family, j6.model.num_hidden_layers, j6.model.hidden_size) == ("gptj", 28, 4096)
    assert (j6.model.vocab_size, j6.model.rotary_dim, j6.model.head_dim) == (50400, 64, 256)
    assert not j6.model.share_embedding_weights and j6.model.use_bias_in_output
    assert j6.model.initializer == InitSpec("truncated_normal", 0.00446, 0.0, -0.00892, 0.00892)
    lr = j6.optimizer.learning_rate
    assert [p.scheduler for p in lr] == ["linear", "cosinedecay"] and lr[0].steps == 1500
    assert (j6.optimizer.beta2, j6.optimizer.weight_decay_rate) == (0.95, 0.1)
    assert j6.train_input.data_processor == "GptHDF5DataProcessor"

    cp = load_config(CONFIGS / "params_continuous_pretraining.yaml")
    assert cp.model.family == "gptj" and cp.model.share_embedding_weights

    tiny = load_config(CONFIGS / "params_gptj_tiny.yaml")
    m = tiny.model
    assert (m.family, m.vocab_size, m.hidden_size, m.num_heads, m.num_hidden_layers) == (
        "gptj",
        4096,
        128,
        4,
        4,
    )
    assert (m.filter_size, m.max_position_embeddings, m.rotary_dim) == (512, 256, 16)
    assert not m.mixed_precision
    assert tiny.train_input.data_dir == "builtin:stdlib" and tiny.train_input.shuffle_seed == 1337
    assert tiny.eval_input.split == "eval" and not tiny.eval_input.shuffle
    assert sum(p.steps for p in tiny.optimizer.learning_rate) == tiny.runconfig.max_steps == 200
    assert tiny.streaming.prefetch_depth == 1 and tiny.runconfig.keep_checkpoint_max == 3

    small = load_config(CONFIGS / "params_gpt2_small.yaml")
    assert small.model.family == "gpt2" and small.model.share_embedding_weights
    assert small.model.residual_dropout_rate == small.model.embedding_dropout_rate == 0.1
    assert small.model.rotary_dim is None

    xl = load_config(CONFIGS / "params_gpt3_xl.yaml")
    assert (xl.model.family, xl.model.hidden_size, xl.model.num_hidden_layers) == ("gpt2", 2048, 24)
    assert not xl.model.use_bias_in_output and xl.model.filter_size == 8192


# ---------------------------------------------------------------- keys


def test_unknown_key_suggests_closest():
    d = copy.deepcopy(BASE)
    d["model"]["hiden_size"] = d["model"].pop("hidden_size")
    with pytest.raises(ConfigError) as info:
        config_from_dict(d, source="configs/x.yaml")
    assert str(info.value) == (
        "configs/x.yaml: unknown key model.hiden_size (did you mean model.hidden_size?)"
    )


def test_unknown_section_and_nested_keys():
    with pytest.raises(ConfigError, match=r"unknown section modle \(did you mean model\?\)"):
        config_from_dict({**BASE, "modle": {}}, source="t.yaml")
    raises(
        r"model.initializer.stdd \(did you mean model.initializer.std\?\)",
        model={"initializer": {"name": "normal", "stdd": 0.1}},
    )
    bad_phase = [{"scheduler": "constant", "learning_rat": 1e-3}]
    raises(r"learning_rate\[0\].learning_rat", optimizer={"learning_rate": bad_phase})


def test_hardware_keys_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="wsjax"):
        build(
            model={"precision_opt_level": 1},
            runconfig={"num_csx": 2, "use_cs_grad_accum": True, "compile_dir": "/tmp"},
            train_input={"persistent_workers": True},
        )
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    for key in (
        "model.precision_opt_level",
        "runconfig.num_csx",
        "runconfig.use_cs_grad_accum",
        "runconfig.compile_dir",
        "train_input.persistent_workers",
    ):
        assert key in msg
    assert "t.yaml" in msg and "\n" not in msg


def test_no_warning_without_ignored_keys(caplog):
    with caplog.at_level(logging.WARNING, logger="wsjax"):
        build()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_aliases():
    cfg = build(
        optimizer={"eps": 1e-6, "correct_bias": False},
        runconfig={"checkpoint_steps": 7, "grad_accum_steps": 2},
    )
    assert cfg.optimizer.epsilon == 1e-6 and not cfg.optimizer.use_bias_correction
    assert cfg.runconfig.save_checkpoints_steps == 7
    assert cfg.optimizer.grad_accum_steps == 2 and cfg.streaming.micro_batch_size == 4
    raises("given twice", optimizer={"eps": 1e-6, "epsilon": 1e-7})


def test_fixed_value_keys():
    """attention_type is accepted at Cerebras' scaled_dot_product only: unscaled dot-product
    attention would change the logits, so it is refused rather than ignored."""
    assert build(model={"attention_type": "scaled_dot_product"}).model.vocab_size == 256
    raises(
        r"model.attention_type='dot_product' is not supported",
        model={"attention_type": "dot_product"},
    )


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


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("sections", "key"),
    [
        ({"model": {"num_heads": 5}}, "model.num_heads"),
        ({"model": {"rotary_dim": 7}}, "model.rotary_dim"),
        ({"model": {"rotary_dim": 32}}, "model.rotary_dim"),
        ({"model": {"hidden_size": 0}}, "model.hidden_size"),
        ({"model": {"num_hidden_layers": -1}}, "model.num_hidden_layers"),
        ({"model": {"vocab_size": 0}}, "model.vocab_size"),
        ({"model": {"embedding_size": 32}}, "model.embedding_size"),
        ({"model": {"residual_dropout_rate": 1.0}}, "model.residual_dropout_rate"),
        ({"model": {"attention_dropout_rate": -0.1}}, "model.attention_dropout_rate"),
        ({"model": {"nonlinearity": "swish"}}, "model.nonlinearity"),
        ({"model": {"position_embedding_type": "alibi"}}, "model.position_embedding_type"),
        ({"model": {"hidden_size": "sixty-four"}}, "model.hidden_size"),
        ({"model": {"num_heads": 4.5}}, "model.num_heads"),
        ({"model": {"mixed_precision": "yes"}}, "model.mixed_precision"),
        ({"model": {"initializer": {"name": "normal", "std": -1.0}}}, "model.initializer.std"),
        ({"optimizer": {"optimizer_type": "lamb"}}, "optimizer.optimizer_type"),
        ({"optimizer": {"beta2": 1.0}}, "optimizer.beta2"),
        ({"optimizer": {"epsilon": 0}}, "optimizer.epsilon"),
        ({"optimizer": {"max_gradient_norm": 0.0}}, "optimizer.max_gradient_norm"),
        ({"optimizer": {"learning_rate": "fast"}}, "optimizer.learning_rate"),
        ({"optimizer": {"grad_accum_steps": 3}}, "optimizer.grad_accum_steps"),
        ({"runconfig": {"max_steps": 0}}, "runconfig.max_steps"),
        ({"runconfig": {"log_steps": -5}}, "runconfig.log_steps"),
        ({"runconfig": {"max_steps": "100"}}, "runconfig.max_steps"),
        ({"streaming": {"prefetch_depth": 0}}, "streaming.prefetch_depth"),
        ({"streaming": {"optimizer_placement": "disk"}}, "streaming.optimizer_placement"),
        ({"streaming": {"micro_batch_size": 3}}, "streaming.micro_batch_size"),
        ({"streaming": {"host_memory_kind": "pinned"}}, "streaming.host_memory_kind"),
        ({"train_input": {"batch_size": 0}}, "train_input.batch_size"),
        ({"train_input": {"max_sequence_length": 65}}, "train_input.max_sequence_length"),
        ({"eval_input": {"max_sequence_length": 128}}, "eval_input.max_sequence_length"),
        ({"train_input": {"vocab_size": 255}}, "train_input.vocab_size"),
        ({"train_input": {"data_processor": "GptHdf5Processor"}}, "train_input.data_processor"),
        ({"train_input": {"split": "test"}}, "train_input.split"),
        ({"train_input": {"shuffle": "true"}}, "train_input.shuffle"),
    ],
)
def test_invalid_values_name_the_key(sections, key):
    msg = raises(key.replace(".", r"\."), **sections)
    assert key in msg


@pytest.mark.parametrize(
    ("phase", "key"),
    [
        ({"scheduler": "Sawtooth", "initial_learning_rate": 1.0, "steps": 5}, "scheduler"),
        ({"scheduler": "Linear", "initial_learning_rate": 1.0, "end_learning_rate": 0.0}, "steps"),
        (
            {"scheduler": "Linear", "initial_learning_rate": 1, "end_learning_rate": 0, "steps": 0},
            "steps",
        ),
        ({"scheduler": "Constant", "steps": 5}, "learning_rate"),
        (
            {
                "scheduler": "InverseExponentialTimeDecay",
                "initial_learning_rate": 1.0,
                "decay_rate": 0.5,
                "decay_steps": 4,
            },
            "step_exponent",
        ),  # fmt: skip
        ({"scheduler": "PiecewiseConstant", "values": [1.0, 0.5], "boundaries": [3, 4]}, "values"),
        ({"scheduler": "Cosine", "initial_learning_rate": 1.0}, "decay_steps"),
    ],
)
def test_invalid_lr_phases(phase, key):
    msg = raises(r"learning_rate\[0\]", optimizer={"learning_rate": [phase]})
    assert key in msg


def test_only_last_phase_may_omit_steps():
    first = {"scheduler": "Constant", "learning_rate": 1.0}
    msg = raises(r"learning_rate\[0\]\.steps", optimizer={"learning_rate": [first, first]})
    assert "only the last phase" in msg
    cfg = build(optimizer={"learning_rate": [{**first, "steps": 3}, first]})
    assert cfg.optimizer.learning_rate[1] == LRPhase("constant", learning_rate=1.0)


def test_missing_sections_and_keys():
    raises("missing required section optimizer", optimizer=None)
    d = copy.deepcopy(BASE)
    del d["model"]["filter_size"]
    with pytest.raises(ConfigError, match="missing required key model.filter_size"):
        config_from_dict(d)
    d = copy.deepcopy(BASE)
    del d["train_input"]["data_dir"]
    with pytest.raises(ConfigError, match="missing required key train_input.data_dir"):
        config_from_dict(d)


def test_float_strings_and_integral_floats_are_accepted():
    cfg = build(optimizer={"learning_rate": "1e-4"}, runconfig={"max_steps": 1.0e3})
    assert cfg.optimizer.learning_rate == 1e-4 and cfg.runconfig.max_steps == 1000
    assert isinstance(cfg.runconfig.max_steps, int)


def test_micro_batch_and_grad_accum_are_derived():
    cfg = build(streaming={"micro_batch_size": 2})
    assert cfg.optimizer.grad_accum_steps == 4
    cfg = build(optimizer={"grad_accum_steps": 2})
    assert cfg.streaming.micro_batch_size == 4
    cfg = build(train_input={"micro_batch_size": 4})  # Cerebras puts it in train_input
    assert cfg.streaming.micro_batch_size == 4 and cfg.optimizer.grad_accum_steps == 2
    both = {"streaming": {"micro_batch_size": 2}, "optimizer": {"grad_accum_steps": 2}}
    raises("optimizer.grad_accum_steps", **both)


def test_data_dir_list_becomes_tuple():
    cfg = build(train_input={"data_dir": ["a", "b"]})
    assert cfg.train_input.data_dir == ("a", "b")
    assert config_from_dict(cfg.to_dict()) == dataclasses.replace(cfg, source="<dict>")


# ---------------------------------------------------------------- overrides


def test_overrides_are_typed():
    cfg = build(
        overrides=[
            "model.num_hidden_layers=3",
            "optimizer.learning_rate=2e-4",
            "model.mixed_precision=true",
            "optimizer.max_gradient_norm=None",
            "runconfig.model_dir=/tmp/run",
            "model.initializer.std=0.05",
            "optimizer.eps=1e-7",
            "train_input.shuffle=False",
        ],
        optimizer={"max_gradient_norm": 1.0},
    )
    assert cfg.model.num_hidden_layers == 3 and isinstance(cfg.model.num_hidden_layers, int)
    assert cfg.optimizer.learning_rate == 2e-4
    assert cfg.model.mixed_precision is True
    assert cfg.optimizer.max_gradient_norm is None
    assert cfg.runconfig.model_dir == "/tmp/run"
    assert cfg.model.initializer.std == 0.05
    assert cfg.optimizer.epsilon == 1e-7 and cfg.train_input.shuffle is False


def test_overrides_replace_lr_phases_and_apply_before_validation():
    phases = [{"scheduler": "Constant", "learning_rate": 1.0}]
    cfg = build(overrides=["optimizer.learning_rate=0.5"], optimizer={"learning_rate": phases})
    assert cfg.optimizer.learning_rate == 0.5
    cfg = build(overrides=["model.num_heads=8"], model={"num_heads": 5})  # fixes the bad value
    assert cfg.model.num_heads == 8
    with pytest.raises(ConfigError, match="model.num_heads=3"):
        build(overrides=["model.num_heads=3"])


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("model.num_hidden_layers", "expected section.key=value"),
        ("model.num_hiden_layers=2", r"did you mean model.num_hidden_layers\?.*valid keys: "),
        ("modle.hidden_size=2", r"unknown section modle \(did you mean model\?\)"),
        ("model.num_hidden_layers=two", "'two' is not a valid int"),
        ("model.mixed_precision=maybe", "not a valid bool"),
        ("optimizer.learning_rate=fast", "not a valid float"),
        ("model.hidden_size.x=2", "has no sub-key"),
    ],
)
def test_bad_overrides(override, match):
    with pytest.raises(ConfigError, match=match) as info:
        build(overrides=[override])
    assert f"override {override!r}" in str(info.value)


# ---------------------------------------------------------------- files, round trip


def test_to_dict_round_trip_with_everything_set():
    cfg = build(
        model={
            "model_family": "gptj",
            "dropout_rate": 0.1,
            "embedding_size": 64,
            "initializer": {"name": "truncated_normal", "std": 0.01, "a": -0.02, "b": 0.02},
        },
        optimizer={
            "learning_rate": [
                {
                    "scheduler": "Linear",
                    "initial_learning_rate": 0,
                    "end_learning_rate": 1,
                    "steps": 3,
                },
                {
                    "scheduler": "Exponential",
                    "initial_learning_rate": 1,
                    "decay_steps": 2,
                    "decay_rate": 0.5,
                    "staircase": True,
                },
            ],
            "max_gradient_norm": 1.0,
        },
        streaming={"micro_batch_size": 4, "activation_offload": True},
        runconfig={"model_dir": "m"},
    )
    d = cfg.to_dict()
    assert d["model"]["model_family"] == "gptj" and "family" not in d["model"]
    text = yaml.safe_dump(d)
    assert config_from_dict(yaml.safe_load(text), source="t.yaml") == cfg


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml: cannot read params file"):
        load_config(path)


def test_bad_yaml_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  vocab_size: 10\n  hidden_size: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid YAML at line \d+") as info:
        load_config(path)
    assert "\n" not in str(info.value)


def test_load_config_with_overrides(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(BASE))
    cfg = load_config(path, overrides=["runconfig.max_steps=7"])
    assert cfg.runconfig.max_steps == 7 and cfg.source == str(path)
    assert dataclasses.replace(cfg, source="<dict>") == config_from_dict(
        BASE, overrides=["runconfig.max_steps=7"]
    )


def test_frozen():
    cfg = build()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.hidden_size = 3  # type: ignore[misc]


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
