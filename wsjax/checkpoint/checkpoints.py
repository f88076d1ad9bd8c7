"""Checkpoints: orbax ``model-ckpt-<step>`` folders in model_dir.

Each checkpoint holds three items: ``params`` (the fp32 master tree, blocks stacked),
``opt_state`` (``{"embed", "blocks" (stacked per leaf), "head"}``, the engine's layout) and
``meta`` (JSON: step, data-loader position, seed and rng derivation, the effective config).
Orbax writes each into a temporary folder renamed on commit, so a crash at any moment leaves the
latest complete checkpoint restorable. ``meta`` also holds a crc32c digest of every array
(wsjax.checkpoint.digest), computed at save and checked on restore; a checkpoint that fails it
or cannot be read is reported in one line and skipped in favour of the newest good one. Pruning
to ``keep_checkpoint_max`` (0 = keep all) renames before it deletes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.path import step as step_lib

from wsjax.checkpoint.digest import (
    DIGEST_KEY,
    CorruptCheckpoint,
    array_digest,
    first_line,
    fmt_path,
    process_digest,
    verify_digest,
    verify_process_digest,
)
from wsjax.checkpoint.shards import barrier, multi_process, restore_targets
from wsjax.distributed import is_main_process
from wsjax.errors import CheckpointError

log = logging.getLogger("wsjax.checkpoint")

PREFIX = "model-ckpt"
TRASH = ".trash-"
_TMP_MARK = "orbax-checkpoint-tmp"
NAME = re.compile(rf"{PREFIX}-(0|[1-9]\d*)")


@dataclasses.dataclass(frozen=True)
class _DashNameFormat(step_lib._StandardNameFormat):
    """Orbax step names ``model-ckpt-<step>`` (orbax's own prefix format uses ``_``)."""

    def build_name(self, step: int) -> str:
        return f"{PREFIX}-{step}"

    def _build_metadata(self, step_path, step=None):
        m = NAME.fullmatch(step_path.name)
        if m is None or not step_lib.is_path_finalized(step_path):
            return None  # temporary (uncommitted) folders are not checkpoints
        return step_lib.Metadata(step=int(m.group(1)), path=step_path)

    def _glob_step_paths(self, base_path):
        return [p for p in epath.Path(base_path).iterdir() if p.name.startswith(PREFIX + "-")]


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
        if multi_process():  # every process writes its blocks (wsjax.checkpoint.shards)
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
                f"{self.path(step)}: cannot write the checkpoint ({first_line(e)}); the earlier "
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
                f"{self.path(step)}: unreadable {item} metadata ({first_line(e)})"
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
            raise CorruptCheckpoint(f"{where}: unreadable ({first_line(e)})") from None
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


def _is_shape(x) -> bool:
    return isinstance(x, tuple)


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
