"""Integrity of checkpoints: a crc32c digest of every array, written at save and checked on restore.

One process digests each whole array (``array_digest``); with several processes each digests
its own block of every array, the digests are gathered (``{"axis": cut axis, "crc32c": [one per
process]}`` per array) and process 0 writes them (``process_digest``). A restore with the same
process count and cut checks its own block; any other layout cannot see the written blocks, so
the digest is not checked (said once in the log). A NaN or infinity in any array refuses the
save, so no checkpoint holds one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import google_crc32c
import jax
import numpy as np
from jax.experimental import multihost_utils

from wsjax.engine.shards import cut_axis
from wsjax.errors import CheckpointError, NonFiniteError

log = logging.getLogger("wsjax.checkpoint")

# What orbax / tensorstore raise on bytes they cannot parse: JSONDecodeError and tensorstore's
# "OUT_OF_RANGE ... byte range" are ValueErrors, a missing file is an OSError, a truncated zstd
# stream a RuntimeError; a torn tree structure shows up as KeyError or TypeError.
READ_ERRORS = (ValueError, KeyError, TypeError, OSError, RuntimeError)
DIGEST_KEY = "digest_crc32c"  # in meta: {"params.<name>" | "opt_state.<name>": crc32c of bytes}


class CorruptCheckpoint(CheckpointError):
    """A checkpoint that cannot be read or fails its digest (not a config mismatch)."""


class UnverifiedCheckpoint(CorruptCheckpoint):
    """A checkpoint of the layout before digests, refused without --allow_unverified_checkpoint."""


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def crc32c(arr: np.ndarray) -> int:
    return google_crc32c.extend(0, arr)  # reads the buffer in place (no copy)


def array_digest(tree: dict, where: str) -> dict[str, int]:
    """crc32c of every array's bytes, keyed by its path; NonFiniteError names the first
    array holding a NaN or an infinity (so such a checkpoint is never written)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        arr = np.ascontiguousarray(leaf)
        name = fmt_path(path)
        if np.issubdtype(arr.dtype, np.inexact) and not np.isfinite(arr).all():
            raise NonFiniteError(
                f"not writing {where}: {name} holds non-finite values (the run diverged; "
                "lower the learning rate or set runconfig.on_nonfinite: skip)"
            )
        out[name] = crc32c(arr)
    return out


def verify_digest(digest: dict | None, params: dict, opt_state: dict | None, where: Path) -> None:
    """Compare restored arrays with the digest written at save; CorruptCheckpoint on mismatch."""
    if digest is None:
        log.warning("%s: written without a digest (older wsjax); not verified", where)
        return
    tree = {"params": params} if opt_state is None else {"params": params, "opt_state": opt_state}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = fmt_path(path)
        arr = np.ascontiguousarray(leaf)
        if digest.get(name) != crc32c(arr):
            raise CorruptCheckpoint(f"{where}: {name} fails its crc32c digest (corrupt bytes)")


def fmt_path(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _blocks(tree: dict):
    """(name, this process's block as numpy, cut axis) of every array of a process-global tree."""

    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        block = np.require(np.asarray(leaf.addressable_shards[0].data), requirements="C")
        yield fmt_path(path), block, cut_axis(tuple(leaf.shape), block.shape)


def process_digest(tree: dict, where: str) -> dict:
    """Per-array digests of every process's block, gathered (every process gets them all)."""

    names, axes, crcs, finite = [], [], [], []
    for name, block, axis in _blocks(tree):
        names.append(name)
        axes.append(axis)
        crcs.append(crc32c(block))
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
        if digest[name]["crc32c"][index] != crc32c(block):
            raise CorruptCheckpoint(f"{where}: {name} fails its crc32c digest (corrupt bytes)")
    return True


def check_shapes(expected: Any, found: Any, where: str | Path) -> None:
    """Raise CheckpointError naming the first parameter whose shape (or presence) differs."""
    exp = {
        fmt_path(p): tuple(s.shape) for p, s in jax.tree_util.tree_flatten_with_path(expected)[0]
    }
    got = {
        fmt_path(p): tuple(s)
        for p, s in jax.tree_util.tree_flatten_with_path(
            found, is_leaf=lambda x: isinstance(x, tuple)
        )[0]
    }
    for name, shape in exp.items():
        if name not in got:
            raise CheckpointError(f"{where}: has no parameter {name} (model expects {shape})")
        if got[name] != shape:
            raise CheckpointError(
                f"{where}: parameter {name} has shape {got[name]}, the model expects {shape} "
                "(check model.* in the params file against the checkpoint)"
            )
    extra = sorted(set(got) - set(exp))
    if extra:
        raise CheckpointError(f"{where}: parameter {extra[0]} is not in the model")
