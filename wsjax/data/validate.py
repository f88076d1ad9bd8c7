"""The data checked against the model before anything is allocated (``--validate_only``).

``check_data_vocab(input_cfg, model_vocab_size, split=...)``: the model must hold every token id
the data can contain. Token shards name their vocabulary in meta.json (read in full: dtype, EOS
id, splits; the split must exist). HDF5 and TFRecord files name none: their structure is checked
(shapes, dtypes, record framing) and the first examples of every file are read, so data
tokenised for a larger vocabulary is refused at once; the loader checks each batch it reads.
``builtin:stdlib`` is built for the model's vocabulary and synthetic ids are drawn below it.
Every failure is one DataError line naming the file and what would be valid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from wsjax.data.loader import BUILTIN_STDLIB, make_source
from wsjax.data.shards import check_split, check_vocab, read_meta

SAMPLE_EXAMPLES = 64  # examples read from the start of each HDF5 / TFRecord file


def check_data_vocab(input_cfg: Any, model_vocab_size: int, split: str = "train") -> None:
    """Raise a one-line DataError when ``input_cfg``'s data (its ``split``, for token shards)
    holds token ids the model's ``model_vocab_size`` rows cannot embed."""
    processor = getattr(input_cfg, "data_processor", None) or "GptTokenShardsProcessor"
    if processor == "SyntheticDataProcessor":
        return
    if processor == "GptTokenShardsProcessor":
        dirs = [input_cfg.data_dir] if isinstance(input_cfg.data_dir, str) else input_cfg.data_dir
        for d in dirs:
            if str(d) == BUILTIN_STDLIB:
                continue
            meta = read_meta(Path(d))
            check_vocab(Path(d), meta, model_vocab_size)
            check_split(Path(d), meta, split)
        return
    source = make_source(input_cfg, split=split, model_vocab_size=model_vocab_size, seed=0)
    try:
        starts = source.offsets  # the first example of each file, then the total
        for start, stop in zip(starts[:-1], starts[1:]):
            source.read(np.arange(start, min(stop, start + SAMPLE_EXAMPLES)))
    finally:
        source.close()
