"""wsjax's data path: text -> token shards (preprocess), sources, and the resumable loader.

``make_loader(input_cfg, split=..., model_vocab_size=..., seed=...)`` is the entry point the
trainer uses; ``python -m wsjax.data.preprocess`` makes shards; ``builtin:stdlib`` as data_dir
builds (once) a corpus from the running interpreter's standard library.
"""

from wsjax.data.loader import BUILTIN_STDLIB, PROCESSORS, Loader, make_loader, make_source

__all__ = ["BUILTIN_STDLIB", "PROCESSORS", "Loader", "make_loader", "make_source"]
