"""wsjax's data path: text -> token shards (preprocess), sources, and the resumable loader.

``make_loader(input_cfg, split=..., model_vocab_size=..., seed=...)`` is the entry point the
trainer uses; ``check_data_vocab(input_cfg, model_vocab_size, split=...)`` checks the data
against the model without loading it (``--validate_only``); ``wsjax-preprocess`` makes shards;
``builtin:stdlib`` as data_dir builds (once) a corpus from the running interpreter's standard
library. The names below are loaded on first use: ``python -m wsjax.data.preprocess`` then runs
a module the package has not imported already (which runpy warns about), and the preprocess
command does not import the loaders' h5py and friends.
"""

from __future__ import annotations

from wsjax import lazy_getattr

__all__ = [
    "BUILTIN_STDLIB",
    "PROCESSORS",
    "Loader",
    "check_data_vocab",
    "make_loader",
    "make_source",
]

_HOMES = {
    "BUILTIN_STDLIB": "wsjax.data.loader",
    "PROCESSORS": "wsjax.data.loader",
    "Loader": "wsjax.data.loader",
    "make_loader": "wsjax.data.loader",
    "make_source": "wsjax.data.loader",
    "check_data_vocab": "wsjax.data.validate",
}


__getattr__ = lazy_getattr(__name__, _HOMES)
