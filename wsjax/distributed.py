"""Several processes (jax.distributed): which one writes the run's files."""

from __future__ import annotations

import jax


def is_main_process() -> bool:
    """Process 0 writes logs, TensorBoard events, plan.json and performance.json."""
    return jax.process_index() == 0
