"""What a resume checks against the checkpoint it continues: the data position.

The checkpoint's loader position counts batches of its own batch size, sequence length and data;
when any of them changed, that position no longer names the same samples. The resume then says
so in one line and refuses (CheckpointError, exit 2), unless ``--allow_data_position_change``
lets it continue at the same epoch and batch index of the new batching (one warning line).
"""

from __future__ import annotations

import logging

from wsjax.errors import CheckpointError

log = logging.getLogger("wsjax.train")

KEYS = ("batch_size", "max_sequence_length", "data_dir")


def data_changes(saved_config: dict | None, config) -> list[str]:
    """``key old -> new`` for each train_input key of :data:`KEYS` that differs."""
    saved = (saved_config or {}).get("train_input") or {}
    now = config.to_dict().get("train_input") or {}
    return [
        f"{key} {saved[key]} -> {now.get(key)}"
        for key in KEYS
        if key in saved and str(saved[key]) != str(now.get(key))
    ]


def check_resume(start, config, allow_change: bool) -> None:
    """Refuse (or, with ``allow_change``, warn) when the data position of ``start`` (a
    StartState with a loader state) is no longer honoured by ``config``."""
    if start.loader_state is None:
        return
    changes = data_changes(start.config, config)
    if not changes:
        return
    what = f"{start.source}: train_input changed since this checkpoint ({', '.join(changes)})"
    if not allow_change:
        raise CheckpointError(
            f"{what}: its data position (batch {start.loader_state.get('batch')}) no longer "
            "names the same samples; restore the setting, or give --allow_data_position_change "
            "to continue at the same epoch and batch index of the new batching"
        )
    log.warning(
        "%s: continuing at epoch %s, batch %s of the new batching (--allow_data_position_change)",
        what,
        start.loader_state.get("epoch"),
        start.loader_state.get("index"),
    )
