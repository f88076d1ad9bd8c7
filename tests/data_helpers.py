"""The loader config of the data tests: one builder for test_data_{formats,loader,preprocess}.py.

It makes the real ``InputConfig`` (the type the run hands to ``make_loader``), so a field the
loader reads but the config lacks fails here too, with defaults that keep the tests
deterministic: no shuffling, one worker, repeat on.
"""

from __future__ import annotations

from pathlib import Path

from wsjax.config import InputConfig


def input_config(
    data_dir: str | Path | tuple[str, ...] | list[str],
    *,
    seq: int,
    batch: int,
    processor: str = "GptTokenShardsProcessor",
    **fields,
) -> InputConfig:
    """An InputConfig reading ``data_dir`` in windows of ``seq`` tokens, ``batch`` at a time."""
    if isinstance(data_dir, Path):
        data_dir = str(data_dir)
    base = {
        "data_processor": processor,
        "shuffle": False,
        "shuffle_seed": 0,
        "repeat": True,
        "num_workers": 1,
        "prefetch_factor": 2,
    }
    return InputConfig(
        data_dir=data_dir, max_sequence_length=seq, batch_size=batch, **(base | fields)
    )
