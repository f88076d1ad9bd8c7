"""The config tests' base dict and builders: a small valid params dict (BASE), built with some
keys replaced, and the one-line ConfigError a bad key gives."""

from __future__ import annotations

import copy

import pytest

from wsjax.config import config_from_dict
from wsjax.errors import ConfigError

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
