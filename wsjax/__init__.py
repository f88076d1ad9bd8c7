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
from collections.abc import Callable
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


def lazy_getattr(package: str, homes: dict[str, str]) -> Callable[[str], Any]:
    """A package's module-level ``__getattr__`` that loads on first use: a name of ``homes``
    (name -> module) from its module, any other name as the submodule ``<package>.<name>``
    (wsjax's and wsjax.data's)."""

    def __getattr__(name: str) -> Any:
        if name in homes:
            return getattr(importlib.import_module(homes[name]), name)
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{package}.{name}":
                raise
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None

    return __getattr__


__getattr__ = lazy_getattr(__name__, _HOMES)
