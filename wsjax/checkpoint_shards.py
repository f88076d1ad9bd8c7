"""Checkpoints written and read by several processes (``jax.distributed``).

A multi-process checkpoint is the same orbax tree as a one-process one: whole-shaped arrays,
``blocks`` stacked. Each process holds its slice of every leaf (wsjax.streaming.shards) as a
global array over the host mesh and orbax writes every process's block into the one checkpoint.
Restoring names target shardings: with one process the whole arrays on the host CPU device,
with P processes each process's slice. Orbax reads any saved layout into any target, so a
checkpoint written by 2 processes restores with 1 and the other way round.

The crc32c digest is per process: each process digests its own blocks, the digests are gathered
(``{"axis": cut axis, "crc32c": [one per process]}`` per array) and process 0 writes them into
``meta``. A restore with the same process count and cut checks its own block; any other layout
cannot see the written blocks, so the digest is not checked (said once in the log). A NaN or
infinity in any process's block refuses the save on every process.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import numpy as np

from wsjax.errors import NonFiniteError

log = logging.getLogger("wsjax.checkpoint")


def multi_process() -> bool:
    return jax.process_count() > 1


def barrier(name: str) -> None:
    """Every process waits here (process 0 pruned or cleared files the others must not see)."""
    if multi_process():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _blocks(tree: dict):
    """(name, this process's block as numpy, cut axis) of every array of a process-global tree."""
    from wsjax.checkpoint import _fmt_path
    from wsjax.streaming.shards import cut_axis

    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        block = np.require(np.asarray(leaf.addressable_shards[0].data), requirements="C")
        yield _fmt_path(path), block, cut_axis(tuple(leaf.shape), block.shape)


def process_digest(tree: dict, where: str) -> dict:
    """Per-array digests of every process's block, gathered (every process gets them all)."""
    from jax.experimental import multihost_utils

    from wsjax.checkpoint import _crc32c

    names, axes, crcs, finite = [], [], [], []
    for name, block, axis in _blocks(tree):
        names.append(name)
        axes.append(axis)
        crcs.append(_crc32c(block))
        ok = not np.issubdtype(block.dtype, np.inexact) or bool(np.isfinite(block).all())
        finite.append(ok)
    # crc32c fits in 32 bits; as two uint16 halves it survives JAX's 32-bit default dtypes
    halves = np.asarray([[c >> 16, c & 0xFFFF] for c in crcs], np.int32)
    all_halves = np.asarray(multihost_utils.process_allgather(halves))
    all_finite = np.asarray(multihost_utils.process_allgather(np.asarray(finite, np.int32)))
    bad = np.nonzero(all_finite.min(axis=0) == 0)[0]
    if bad.size:
        raise NonFiniteError(
            f"not writing {where}: {names[bad[0]]} holds non-finite values (the run diverged; "
            "lower the learning rate or set runconfig.on_nonfinite: skip)"
        )
    return {
        name: {
            "axis": axes[i],
            "crc32c": [int(h[i, 0]) << 16 | int(h[i, 1]) for h in all_halves],
        }
        for i, name in enumerate(names)
    }


def verify_process_digest(digest: dict, tree: dict, where: Path) -> bool:
    """Check this process's blocks of ``tree`` against a multi-process digest; False (nothing
    checked) when the layout differs from the one written."""
    from wsjax.checkpoint import CorruptCheckpoint, _crc32c

    count, index = jax.process_count(), jax.process_index()
    blocks = list(_blocks(tree)) if count > 1 else None
    if blocks is None or any(
        len(digest.get(n, {}).get("crc32c", [])) != count or digest[n]["axis"] != axis
        for n, _, axis in blocks
    ):
        log.info(
            "%s: written by %d processes, restored by %d: its per-process digests are checked "
            "only with the same layout",
            where,
            len(next(iter(digest.values()))["crc32c"]),
            count,
        )
        return False
    for name, block, _ in blocks:
        if digest[name]["crc32c"][index] != _crc32c(block):
            raise CorruptCheckpoint(f"{where}: {name} fails its crc32c digest (corrupt bytes)")
    return True


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
        from wsjax.streaming.engine import default_mesh
        from wsjax.streaming.shards import ProcessShards
        from wsjax.streaming.store import local_stacked

        shards = ProcessShards.create(default_mesh())
        one = lambda tree: shaped(  # noqa: E731
            tree, shards.host_shardings(tree, local_stacked(shards, tree))
        )
    return one(params_shapes), (one(opt_shapes) if opt_shapes is not None else None)
