"""The model tests' tiny configs: one small model section per family."""

from __future__ import annotations

from wsjax.config import config_from_dict

OPTIMIZER = {"optimizer_type": "adamw", "learning_rate": 1e-3}
VOCAB, SEQ = 64, 10
FAMILIES = ["gptj", "gpt2", "neox"]
ROTARY_FAMILIES = ("gptj", "neox")


def model_cfg(family: str, **overrides):
    model = {
        "model_family": family,
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "num_heads": 4,
        "num_hidden_layers": 2,
        "filter_size": 64,
        "max_position_embeddings": 16,
        **({"rotary_dim": 4} if family in ROTARY_FAMILIES else {}),
        **overrides,
    }
    return config_from_dict({"model": model, "optimizer": OPTIMIZER}).model
