"""Several processes (jax.distributed): which one writes the run's files."""

from __future__ import annotations

import jax


def is_main_process() -> bool:
    """Process 0 writes logs, TensorBoard events, plan.json and performance.json."""
    return jax.process_index() == 0


def initialize() -> None:  # placeholder until the launch branch lands (replaced by it)
    import os

    n = int(os.environ.get("WSJAX_NUM_PROCESSES", "1"))
    if n > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            os.environ["WSJAX_COORDINATOR_ADDRESS"], n, int(os.environ["WSJAX_PROCESS_ID"])
        )
