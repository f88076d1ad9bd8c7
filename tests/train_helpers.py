"""Shared settings of the train tests: the built-in tiny config made smaller and faster."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "params_gptj_tiny.yaml"

# 2 layers x 64 wide, 4 x 32 tokens of synthetic data: a step takes milliseconds on a CPU.
SMALL = [
    "model.num_hidden_layers=2",
    "model.hidden_size=64",
    "model.num_heads=2",
    "model.filter_size=128",
    "model.vocab_size=512",
    "model.max_position_embeddings=64",
    "runconfig.log_steps=1",
    "runconfig.save_summary_steps=1",
    "runconfig.save_checkpoints_steps=3",
    "runconfig.keep_checkpoint_max=2",
    "runconfig.eval_steps=2",
] + [
    f"{section}.{key}"
    for section in ("train_input", "eval_input")
    for key in (
        "data_processor=SyntheticDataProcessor",
        "vocab_size=512",
        "max_sequence_length=32",
        "batch_size=4",
    )
]


def small_config(*extra: str):
    from wsjax.config import load_config

    return load_config(TINY, [*SMALL, *extra])
