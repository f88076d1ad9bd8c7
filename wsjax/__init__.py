"""wsjax: weight-streaming training of GPT-J / GPT-2 / GPT-NeoX / Llama-family models in JAX.

    import wsjax
    cfg = wsjax.load_config("configs/params_gptj_6B.yaml")
    wsjax.get_model(cfg.model).num_params()          # 6,050,882,784, nothing allocated

    trainer = wsjax.Trainer(cfg, wsjax.RunOptions(mode="train"), "model_dir", callbacks=[...])
    result = trainer.train()                         # losses, evals, checkpoints, speed

The packages: ``wsjax.config`` (params files), ``wsjax.models`` (the families),
``wsjax.engine`` (weight streaming), ``wsjax.trainer`` (the Trainer and its hooks),
``wsjax.checkpoint``, ``wsjax.data``, ``wsjax.interop`` (HuggingFace in and out) and
``wsjax.inference`` (generation). The names below are loaded on first use, so
``import wsjax.config`` (and tools that only read params files) never import jax.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "Callback",
    "Config",
    "RunOptions",
    "RunResult",
    "Trainer",
    "WsjaxError",
    "config_from_dict",
    "get_model",
    "load_config",
]
__version__ = "0.1.0"

_HOMES = {
    "Config": "wsjax.config",
    "config_from_dict": "wsjax.config",
    "load_config": "wsjax.config",
    "WsjaxError": "wsjax.errors",
    "get_model": "wsjax.models",
    "Callback": "wsjax.trainer",
    "RunOptions": "wsjax.trainer",
    "RunResult": "wsjax.trainer",
    "Trainer": "wsjax.trainer",
}


def __getattr__(name: str) -> Any:
    """The names above, or a submodule (``wsjax.models``, ``wsjax.engine``, ...), on first use."""
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    try:
        return importlib.import_module(f"wsjax.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"wsjax.{name}":
            raise
        raise AttributeError(f"module 'wsjax' has no attribute {name!r}") from None
