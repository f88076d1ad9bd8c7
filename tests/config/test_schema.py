"""Validation of every section (wsjax.config.schema / sections): invalid values name their key,
learning-rate phases, derived quantities."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest

from tests.config.base import BASE, build, raises
from wsjax.config import LRPhase, config_from_dict
from wsjax.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

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
