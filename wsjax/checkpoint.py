"""Checkpoints: orbax ``model-ckpt-<step>`` folders in model_dir, and the starting state of a run.

Each checkpoint holds three items: ``params`` (the fp32 master tree, blocks stacked),
``opt_state`` (``{"embed", "blocks" (stacked per leaf), "head"}``, the engine's layout) and
``meta`` (JSON: step, data-loader position, seed and rng derivation, the effective config).
Orbax writes each into a temporary folder renamed on commit, so a crash at any moment leaves the
latest complete checkpoint restorable. ``meta`` also holds a crc32c digest of every array,
computed at save (where a NaN or infinity refuses the save) and checked on restore; a checkpoint
that fails it or cannot be read is reported in one line and skipped in favour of the newest good
one. Pruning to ``keep_checkpoint_max`` (0 = keep all) renames before it deletes.

``--checkpoint_path`` may name an orbax checkpoint (``.../model-ckpt-<step>``), a model_dir
(its latest checkpoint) or a HuggingFace GPT-J / GPT-2 folder (``config.json`` + weights).
Shapes are compared with the model before anything is read; a mismatch names the parameter.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.path import step as step_lib

from wsjax.checkpoint_shards import (
    barrier,
    multi_process,
    process_digest,
    restore_targets,
    verify_process_digest,
)
from wsjax.distributed import is_main_process
from wsjax.errors import CheckpointError, NonFiniteError

log = logging.getLogger("wsjax.checkpoint")

PREFIX = "model-ckpt"
_NAME = re.compile(rf"{PREFIX}-(0|[1-9]\d*)")


@dataclasses.dataclass(frozen=True)
class _DashNameFormat(step_lib._StandardNameFormat):
    """Orbax step names ``model-ckpt-<step>`` (orbax's own prefix format uses ``_``)."""

    def build_name(self, step: int) -> str:
        return f"{PREFIX}-{step}"

    def _build_metadata(self, step_path, step=None):
        m = _NAME.fullmatch(step_path.name)
        if m is None or not step_lib.is_path_finalized(step_path):
            return None  # temporary (uncommitted) folders are not checkpoints
        return step_lib.Metadata(step=int(m.group(1)), path=step_path)

    def _glob_step_paths(self, base_path):
        return [p for p in epath.Path(base_path).iterdir() if p.name.startswith(PREFIX + "-")]


def _shape_tree(tree) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(tuple(a.shape), a.dtype), tree)


def abstract_opt_state(model, optimizer) -> dict:
    """Shapes of the engine's optimizer-state layout, for restoring NamedTuple states."""
    shapes = model.param_shapes()
    layer = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), shapes["blocks"])
    L = model.num_layers
    blocks = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct((L, *s.shape), s.dtype),
        jax.eval_shape(optimizer.init, layer),
    )
    return {
        "embed": jax.eval_shape(optimizer.init, shapes["embed"]),
        "blocks": blocks,
        "head": jax.eval_shape(optimizer.init, shapes["head"]),
    }


class CorruptCheckpoint(CheckpointError):
    """A checkpoint that cannot be read or fails its digest (not a config mismatch)."""


# What orbax / tensorstore raise on bytes they cannot parse: JSONDecodeError and tensorstore's
# "OUT_OF_RANGE ... byte range" are ValueErrors, a missing file is an OSError, a truncated zstd
# stream a RuntimeError; a torn tree structure shows up as KeyError or TypeError.
READ_ERRORS = (ValueError, KeyError, TypeError, OSError, RuntimeError)


class Checkpoints:
    """The orbax checkpoints of one model_dir (``read_only`` for someone else's folder).

    ``keep`` newest checkpoints are kept after each save (0 or None: all). Pruning renames a
    checkpoint to a hidden ``.trash-`` name before deleting it, so a kill mid-delete never leaves
    a half-deleted folder under a committed name; the checkpoint just written is never pruned.
    """

    def __init__(self, directory: str | Path, *, keep: int | None = None, read_only=False):
        self.directory = Path(directory).absolute()
        self.keep = keep or None
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # pruned here: rename first, then delete
            step_name_format=_DashNameFormat(),
            enable_async_checkpointing=False,
            create=not read_only,
            read_only=read_only,
        )
        logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's info/warning chatter
        handlers = {
            "params": ocp.StandardCheckpointHandler(),
            "opt_state": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        if not read_only and is_main_process():
            self._clear_leftovers()
        barrier("checkpoints-open")
        self._mngr = ocp.CheckpointManager(self.directory, options=opts, item_handlers=handlers)

    def steps(self) -> list[int]:
        self._mngr.reload()
        return sorted(self._mngr.all_steps())

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def path(self, step: int) -> Path:
        return self.directory / f"{PREFIX}-{step}"

    # -- writing -------------------------------------------------------------------------------
    def save(self, step: int, params: dict, opt_state: dict, meta: dict) -> Path:
        """Write ``model-ckpt-<step>`` with its digest (synchronously), then prune to ``keep``.

        Raises NonFiniteError, writing nothing, when any array holds a NaN or an infinity.
        """
        trees, name = {"params": params, "opt_state": opt_state}, f"{PREFIX}-{step}"
        if multi_process():  # every process writes its blocks (wsjax.checkpoint_shards)
            digest = process_digest(trees, name)
        else:
            params, opt_state = jax.device_get(params), jax.device_get(opt_state)
            digest = array_digest({"params": params, "opt_state": opt_state}, name)
        if self.path(step).exists() and is_main_process():  # an unreadable leftover: replace it
            self._trash(self.path(step))
        barrier(f"checkpoint-{step}-clear")
        try:
            self._mngr.save(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave(params),
                    opt_state=ocp.args.StandardSave(opt_state),
                    meta=ocp.args.JsonSave({**meta, DIGEST_KEY: digest}),
                ),
                force=True,
            )
            self._mngr.wait_until_finished()
        except READ_ERRORS as e:
            if is_main_process():
                self._clear_after_failed_save()  # orbax's uncommitted temporary folder
            hint = "did another process stop? " if multi_process() else ""
            raise CheckpointError(
                f"{self.path(step)}: cannot write the checkpoint ({_first_line(e)}); the earlier "
                f"checkpoints are kept ({hint}free disk space and rerun to resume)"
            ) from None
        self._prune(newest_good=step)
        return self.path(step)

    def _prune(self, newest_good: int) -> None:
        if self.keep is None:
            return
        others = [s for s in self.steps() if s != newest_good]
        if is_main_process():
            for step in others[: max(0, len(others) - (self.keep - 1))]:
                self._trash(self.path(step))
        barrier(f"checkpoint-{newest_good}-prune")
        self._mngr.reload()

    def _trash(self, path: Path) -> None:
        """Rename out of the checkpoint namespace (atomic for readers), then delete."""
        hidden = path.with_name(f"{TRASH}{path.name}")
        if hidden.exists():
            shutil.rmtree(hidden)
        os.replace(path, hidden)
        shutil.rmtree(hidden)

    def _leftovers(self) -> list[Path]:
        """Half-pruned ``.trash-`` folders and orbax's uncommitted temporary folders."""
        if not self.directory.is_dir():
            return []
        return [
            p
            for p in self.directory.iterdir()
            if p.name.startswith(TRASH + PREFIX)
            or (p.name.startswith(PREFIX + "-") and _TMP_MARK in p.name)
        ]

    def _clear_leftovers(self) -> None:
        """Delete what a killed writer left (only the lock holder constructs a writable
        manager)."""
        for p in self._leftovers():
            shutil.rmtree(p, ignore_errors=True)

    def _clear_after_failed_save(self, quiet_s: float = 0.5, limit_s: float = 10.0) -> None:
        """Delete what a failed save left. When one item fails, orbax's writers of the other
        items may still be adding files for a moment (seen in CI: ocdbt data files written
        after the first clear), so clear until the folder stays clean for ``quiet_s``."""
        deadline = time.monotonic() + limit_s
        self._clear_leftovers()
        while time.monotonic() < deadline:
            time.sleep(quiet_s)
            if not self._leftovers():
                return
            self._clear_leftovers()

    # -- reading -------------------------------------------------------------------------------
    def param_shapes(self, step: int) -> Any:
        """Shapes stored in ``step``'s params item (read from metadata, no arrays loaded)."""
        return self._item_shapes(step, "params")

    def _item_shapes(self, step: int, item: str) -> Any:
        try:
            md = self._mngr.item_metadata(step)[item]
            tree = getattr(md, "tree", md)
            return jax.tree.map(
                lambda m: tuple(m.shape), tree, is_leaf=lambda m: hasattr(m, "shape")
            )
        except READ_ERRORS as e:
            raise CorruptCheckpoint(
                f"{self.path(step)}: unreadable {item} metadata ({_first_line(e)})"
            ) from None

    def restore(
        self, step: int, params_shapes: dict, opt_shapes: dict | None
    ) -> tuple[dict, dict | None, dict]:
        """(params, opt_state or None, meta) of checkpoint ``step``: shapes and optimizer
        layout checked first, the digest after reading."""
        where = self.path(step)
        check_shapes(params_shapes, self.param_shapes(step), where)
        if opt_shapes is not None:
            self._check_optimizer(step, opt_shapes)
        params_target, opt_target = restore_targets(params_shapes, opt_shapes)
        items = {"params": ocp.args.StandardRestore(params_target), "meta": ocp.args.JsonRestore()}
        if opt_shapes is not None:
            items["opt_state"] = ocp.args.StandardRestore(opt_target)
        try:
            r = self._mngr.restore(step, args=ocp.args.Composite(**items))
        except READ_ERRORS as e:
            raise CorruptCheckpoint(f"{where}: unreadable ({_first_line(e)})") from None
        meta = dict(r["meta"] or {})
        opt = r["opt_state"] if opt_shapes is not None else None
        params = r["params"]
        digest = meta.pop(DIGEST_KEY, None)
        trees = {"params": params} if opt is None else {"params": params, "opt_state": opt}
        if digest and isinstance(next(iter(digest.values())), dict):  # written by P processes
            verify_process_digest(digest, trees, where)
        elif multi_process():
            log.info("%s: written by one process; its digest is checked by one process", where)
        else:
            verify_digest(digest, params, opt, where)
        return params, opt, meta

    def _check_optimizer(self, step: int, opt_shapes: dict) -> None:
        """One line instead of orbax's tree dump when the optimizer changed since the save."""
        stored = sorted(jax.tree.leaves(self._item_shapes(step, "opt_state"), is_leaf=_is_shape))
        wanted = sorted(tuple(s.shape) for s in jax.tree.leaves(opt_shapes))
        if stored != wanted:
            raise CheckpointError(
                f"{self.path(step)}: its optimizer state ({len(stored)} arrays) does not match "
                f"the config's optimizer ({len(wanted)} arrays): the optimizer section changed "
                "since it was saved; start from it with --is_pretrained_checkpoint to take only "
                "the weights, or restore the optimizer settings"
            )

    def close(self) -> None:
        self._mngr.close()


def restore_newest_good(
    ckpts: Checkpoints, params_shapes: dict, opt_shapes: dict | None, steps: list[int]
) -> tuple[int, tuple[dict, dict | None, dict]]:
    """Restore the newest of ``steps`` that reads back intact; a corrupt one is skipped with a
    warning naming it. Raises CheckpointError when none is readable."""
    if len(steps) == 1:  # a named checkpoint: its own error, no fallback
        return steps[0], ckpts.restore(steps[0], params_shapes, opt_shapes)
    bad = []
    for step in sorted(steps, reverse=True):
        try:
            return step, ckpts.restore(step, params_shapes, opt_shapes)
        except CorruptCheckpoint as e:
            log.warning("%s; falling back to the previous checkpoint", e)
            bad.append(ckpts.path(step).name)
    raise CheckpointError(
        f"{ckpts.directory}: no readable checkpoint ({', '.join(bad)} are corrupt); move them "
        "away to start afresh"
    )


# -- integrity -------------------------------------------------------------------------------------
DIGEST_KEY = "digest_crc32c"  # in meta: {"params.<name>" | "opt_state.<name>": crc32c of bytes}
TRASH = ".trash-"
_TMP_MARK = "orbax-checkpoint-tmp"


def _is_shape(x) -> bool:
    return isinstance(x, tuple)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _crc32c(arr: np.ndarray) -> int:
    return google_crc32c.extend(0, arr)  # reads the buffer in place (no copy)


def array_digest(tree: dict, where: str) -> dict[str, int]:
    """crc32c of every array's bytes, keyed by its path; NonFiniteError names the first
    array holding a NaN or an infinity (so such a checkpoint is never written)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        arr = np.ascontiguousarray(leaf)
        name = _fmt_path(path)
        if np.issubdtype(arr.dtype, np.inexact) and not np.isfinite(arr).all():
            raise NonFiniteError(
                f"not writing {where}: {name} holds non-finite values (the run diverged; "
                "lower the learning rate or set runconfig.on_nonfinite: skip)"
            )
        out[name] = _crc32c(arr)
    return out


def verify_digest(digest: dict | None, params: dict, opt_state: dict | None, where: Path) -> None:
    """Compare restored arrays with the digest written at save; CorruptCheckpoint on mismatch."""
    if digest is None:
        log.warning("%s: written without a digest (older wsjax); not verified", where)
        return
    tree = {"params": params} if opt_state is None else {"params": params, "opt_state": opt_state}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = _fmt_path(path)
        arr = np.ascontiguousarray(leaf)
        if digest.get(name) != _crc32c(arr):
            raise CorruptCheckpoint(f"{where}: {name} fails its crc32c digest (corrupt bytes)")


def _fmt_path(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def check_shapes(expected: Any, found: Any, where: str | Path) -> None:
    """Raise CheckpointError naming the first parameter whose shape (or presence) differs."""
    exp = {
        _fmt_path(p): tuple(s.shape) for p, s in jax.tree_util.tree_flatten_with_path(expected)[0]
    }
    got = {
        _fmt_path(p): tuple(s)
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


@dataclass
class StartState:
    """Where a run starts: weights (None = initialise), optimizer state, step, loader state."""

    params: dict | None = None
    opt_state: dict | None = None
    step: int = 0
    loader_state: dict | None = None
    source: str | None = None  # what the log says it restored from


def _orbax_location(path: Path) -> tuple[Path, int | None] | None:
    """(manager folder, step) for an orbax checkpoint path or a folder holding them."""
    m = _NAME.fullmatch(path.name)
    if m and path.is_dir():
        return path.parent, int(m.group(1))
    if path.is_dir() and any(_NAME.fullmatch(p.name) for p in path.iterdir()):
        return path, None
    return None


def load_start(
    path: str | Path, model, optimizer, *, weights_only: bool, allow_pickle: bool = False
) -> StartState:
    """The state in ``path`` (orbax checkpoint, model_dir, or HF folder) for ``model``.

    ``weights_only`` (``--is_pretrained_checkpoint``, and always for HF): step 0, fresh
    optimizer, loader from the start. A model_dir whose latest checkpoint is corrupt falls back
    to its newest good one; a named ``model-ckpt-<step>`` that is corrupt is an error.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"{path}: --checkpoint_path does not exist (give a model-ckpt-<step> folder, a "
            "model_dir with checkpoints, or a HuggingFace GPT-J/GPT-2 folder)"
        )
    shapes = model.param_shapes()
    loc = _orbax_location(path)
    if loc is not None:
        ckpts = Checkpoints(loc[0], read_only=True)
        steps = ckpts.steps() if loc[1] is None else [loc[1]]
        if not steps or steps[-1] not in ckpts.steps():
            raise CheckpointError(f"{path}: not a complete orbax checkpoint")
        opt_shapes = None if weights_only else abstract_opt_state(model, optimizer)
        step, (params, opt, meta) = restore_newest_good(ckpts, shapes, opt_shapes, steps)
        src = str(ckpts.path(step))
        if weights_only:
            return StartState(params=params, source=src)
        return StartState(params, opt, int(meta.get("step", step)), meta.get("loader"), src)
    if (path / "config.json").is_file():
        from safetensors import SafetensorError

        from wsjax.hf import import_hf

        try:
            _, params = import_hf(path, allow_pickle=allow_pickle)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: unreadable weights ({_first_line(e)})") from None
        except CheckpointError as e:  # torch's multi-line texts: their first line is the point
            raise CheckpointError(_first_line(e)) from None
        check_shapes(shapes, jax.tree.map(lambda a: tuple(a.shape), params), path)
        return StartState(params=params, source=f"HuggingFace checkpoint {path}")
    raise CheckpointError(
        f"{path}: neither an orbax checkpoint (model-ckpt-<step>) nor a HuggingFace folder "
        "(config.json + weights)"
    )
