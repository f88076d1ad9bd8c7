"""Checkpoints written and read by several processes (``jax.distributed``).

A multi-process checkpoint is the same orbax tree as a one-process one: whole-shaped arrays,
``blocks`` stacked. Each process holds its slice of every leaf (wsjax.engine.shards) as a
global array over the host mesh and orbax writes every process's block into the one checkpoint.
Restoring names target shardings: with one process the whole arrays on the host CPU device,
with P processes each process's slice. Orbax reads any saved layout into any target, so a
checkpoint written by 2 processes restores with 1 and the other way round.

The crc32c digests of the blocks are in wsjax.checkpoint.digest.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from wsjax.engine.engine import default_mesh
from wsjax.engine.shards import ProcessShards
from wsjax.engine.store import local_stacked


def multi_process() -> bool:
    return jax.process_count() > 1


def barrier(name: str) -> None:
    """Every process waits here (process 0 pruned or cleared files the others must not see)."""
    if multi_process():
        multihost_utils.sync_global_devices(name)


def restore_targets(params_shapes: dict, opt_shapes: dict | None):
    """Orbax targets: whole numpy arrays (one process; ``np.empty`` targets say the type and
    are never written, so they cost no memory), else each process's slice over the host mesh.
    Numpy targets read a checkpoint whichever process count wrote it."""

    def shaped(tree, shardings):
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(tuple(a.shape), a.dtype, sharding=s),
            tree,
            shardings,
        )

    if not multi_process():
        one = lambda tree: jax.tree.map(  # noqa: E731
            lambda a: np.empty(tuple(a.shape), a.dtype), tree
        )
    else:
        shards = ProcessShards.create(default_mesh())
        one = lambda tree: shaped(  # noqa: E731
            tree, shards.host_shardings(tree, local_stacked(shards, tree))
        )
    return one(params_shapes), (one(opt_shapes) if opt_shapes is not None else None)
