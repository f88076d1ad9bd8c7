"""Tests for wsjax.config: params files, key checks, validation, overrides, InitSpec."""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

import pytest
import yaml

from tests.config.base import BASE, build, raises
from wsjax.config import InitSpec, config_from_dict, load_config
from wsjax.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

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
    # the released GPT-J 6B: an LM head of its own, with a bias (tests/interop/test_continued_...)
    assert cp.model.family == "gptj" and not cp.model.share_embedding_weights
    assert cp.model.use_bias_in_output

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
            runconfig={"num_csx": 2, "use_cs_grad_accum": True, "num_wgt_servers": 4},
            train_input={"persistent_workers": True},
        )
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    for key in (
        "model.precision_opt_level",
        "runconfig.num_csx",
        "runconfig.use_cs_grad_accum",
        "runconfig.num_wgt_servers",
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
