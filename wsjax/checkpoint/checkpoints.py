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

import contextlib
import dataclasses
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from wsjax.checkpoint.digest import (
    DIGEST_KEY,
    READ_ERRORS,
    CorruptCheckpoint,
    UnverifiedCheckpoint,
    array_digest,
    check_shapes,
    first_line,
    process_digest,
    verify_digest,
    verify_process_digest,
)
from wsjax.checkpoint.segments import (
    ITEM,
    STAGE,
    SegmentsHandler,
    SegmentsRestore,
    SegmentsSave,
    gathered,
    stage,
)
from wsjax.checkpoint.shards import barrier, multi_process, restore_targets
from wsjax.distributed import is_main_process
from wsjax.errors import CheckpointError

log = logging.getLogger("wsjax.checkpoint")

PREFIX = "model-ckpt"
TRASH = ".trash-"
_TMP_MARK = "orbax-checkpoint-tmp"
CORRUPT = ".corrupt-"  # model-ckpt-<step>.corrupt-<time>: moved aside, never deleted
NAME = re.compile(rf"{PREFIX}-(0|[1-9]\d*)")
FORMAT_KEY, FORMAT = "wsjax_checkpoint_format", 2  # in meta; 2: the digest is always present


@dataclasses.dataclass(frozen=True)
class DashNameFormat(ocp.step.NameFormat):
    """Orbax step names ``model-ckpt-<step>`` through orbax's public ``NameFormat`` protocol
    (``ocp.step.standard_name_format`` joins a prefix with ``_``)."""

    def build_name(self, step: int) -> str:
        return f"{PREFIX}-{step}"

    def _metadata(self, path: epath.Path) -> ocp.step.Metadata | None:
        m = NAME.fullmatch(path.name)
        if m is None or not path.is_dir() or not ocp.step.is_path_finalized(path):
            return None  # temporary (uncommitted) or moved-aside folders are not checkpoints
        return ocp.step.Metadata(step=int(m.group(1)), path=path)

    def find_all(self, base_path):
        base = epath.Path(base_path)
        found = (self._metadata(p) for p in base.iterdir()) if base.exists() else ()
        return iter([m for m in found if m is not None])

    def find_step(self, base_path, step: int):
        found = self._metadata(epath.Path(base_path) / self.build_name(step))
        if found is None:
            raise ValueError(f"no committed checkpoint for step {step} in {base_path}")
        return found


class Checkpoints:
    """The orbax checkpoints of one model_dir (``read_only`` for someone else's folder).

    ``keep`` newest checkpoints are kept after each save (0 or None: all). Pruning renames a
    checkpoint to a hidden ``.trash-`` name before deleting it, so a kill mid-delete never leaves
    a half-deleted folder under a committed name; the checkpoint just written is never pruned.
    With ``async_save`` (training's): :meth:`save` returns once the arrays are copied and
    digested, orbax writes them while training goes on, and :meth:`wait` (or the next save)
    reports a failed write. ``allow_unverified``: a checkpoint of the layout before digests
    (no format marker, no digest) is loaded unverified instead of refused.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        keep: int | None = None,
        read_only=False,
        async_save=False,
        allow_unverified=False,
    ):
        self.directory = Path(directory).absolute()
        self.keep = keep or None
        self.read_only = read_only
        self.allow_unverified = allow_unverified
        self._pending: int | None = None
        self._save_failed = False  # a failed save was reported (orbax raises it again at close)
        # several processes save synchronously: their barriers and orbax's would interleave
        self.async_save = async_save and not read_only and not multi_process()
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # pruned here: rename first, then delete
            step_name_format=DashNameFormat(),
            enable_async_checkpointing=self.async_save,
            create=not read_only,
            read_only=read_only,
        )
        logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's info/warning chatter
        handlers = {
            "params": ocp.StandardCheckpointHandler(),
            "opt_state": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
            ITEM: SegmentsHandler(),
        }
        if not read_only and is_main_process():
            self._clear_leftovers()
        barrier("checkpoints-open")
        self._mngr = ocp.CheckpointManager(self.directory, options=opts, item_handlers=handlers)

    def steps(self) -> list[int]:
        self.wait()
        self._mngr.reload()
        return sorted(self._mngr.all_steps())

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def path(self, step: int) -> Path:
        return self.directory / f"{PREFIX}-{step}"

    # -- writing -------------------------------------------------------------------------------
    def save(self, step: int, params: dict, opt_state: dict, meta: dict) -> Path:
        """Start writing ``model-ckpt-<step>`` with its digest, after the previous save has
        finished (and been pruned to ``keep``); :meth:`wait` for this one.

        The digest is computed here from the arrays being saved and committed in the same
        folder as them (orbax renames the whole step folder at once), so a committed checkpoint
        always carries it. Raises NonFiniteError, writing nothing, when any array holds a NaN or
        an infinity.
        """
        self.wait()
        trees, name = {"params": params, "opt_state": opt_state}, f"{PREFIX}-{step}"
        if multi_process():  # every process writes its blocks (wsjax.checkpoint.shards)
            digest = process_digest(trees, name)
        else:  # own copies: the engine may reuse its buffers while orbax writes
            params, opt_state = _owned(params), _owned(opt_state)
            digest = array_digest({"params": params, "opt_state": opt_state}, name)
        save = ocp.args.StandardSave
        items = {"params": save(params), "opt_state": save(opt_state)}
        return self._commit(step, items, meta, digest)

    def save_segments(self, step: int, store, meta: dict) -> Path:
        """:meth:`save` for a disk-tier run (``store``: its DiskStore): its segment files, linked
        or copied one at a time (wsjax.checkpoint.segments). Synchronous: this step's files."""
        self.wait()
        store.tier.flush()
        staged = self.directory / f"{STAGE}{step}.partial-{os.getpid()}"
        with self._write_errors(step):
            layout, digest = stage(store.tier, store.names, staged, f"{PREFIX}-{step}", store.full)
        item = SegmentsSave(staged, layout, jax.process_index() if multi_process() else None)
        return self._commit(step, {ITEM: item}, meta, gathered(digest))

    def _commit(self, step: int, items: dict, meta: dict, digest: dict) -> Path:
        """Orbax's save of ``items`` and ``meta`` (with ``digest``) as ``model-ckpt-<step>``."""
        if self.path(step).exists() and is_main_process():  # an unreadable leftover: set aside
            self.set_aside(step, "unreadable")
        barrier(f"checkpoint-{step}-clear")
        self._mngr.reload()
        record = {**meta, DIGEST_KEY: digest, FORMAT_KEY: FORMAT}
        with self._write_errors(step):
            args = ocp.args.Composite(**items, meta=ocp.args.JsonSave(record))
            self._mngr.save(step, args=args, force=True)
        self._pending = step
        if not self.async_save or ITEM in items:
            self.wait()
        return self.path(step)

    def wait(self) -> None:
        """Block until the save in flight is committed, then prune; CheckpointError (one line)
        when it failed."""
        if self._pending is None:
            return
        step, self._pending = self._pending, None
        with self._write_errors(step):
            self._mngr.wait_until_finished()
        self._prune(newest_good=step)

    @contextlib.contextmanager
    def _write_errors(self, step: int):
        try:
            yield
        except READ_ERRORS as e:
            self._save_failed = True
            if is_main_process():
                self._clear_after_failed_save()  # orbax's uncommitted temporary folder
            hint = "did another process stop? " if multi_process() else ""
            raise CheckpointError(
                f"{self.path(step)}: cannot write the checkpoint ({first_line(e)}); the earlier "
                f"checkpoints are kept ({hint}free disk space and rerun to resume)"
            ) from None

    def set_aside(self, step: int, why: str) -> Path | None:
        """Rename ``model-ckpt-<step>`` to ``model-ckpt-<step>.corrupt-<time>`` (never
        deleted), so the run can save that step again; None for a read-only manager."""
        if self.read_only or not is_main_process():
            return None
        path = self.path(step)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        aside = path.with_name(f"{path.name}{CORRUPT}{stamp}")
        n = 1
        while aside.exists():
            aside, n = path.with_name(f"{path.name}{CORRUPT}{stamp}-{n}"), n + 1
        os.replace(path, aside)
        log.warning("%s: %s; moved aside to %s", path, why, aside.name)
        self._mngr.reload()
        return aside

    def _prune(self, newest_good: int) -> None:
        if self.keep is None:
            return
        if is_main_process():  # the others list the folder only after it is pruned (a listing
            others = [s for s in self.steps() if s != newest_good]  # mid-prune fails in orbax)
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
        """Half-pruned ``.trash-`` folders, orbax's uncommitted temporary folders and staged
        segment files."""
        if not self.directory.is_dir():
            return []
        return [
            p
            for p in self.directory.iterdir()
            if p.name.startswith(TRASH + PREFIX)
            or (p.name.startswith(PREFIX + "-") and _TMP_MARK in p.name)
            or p.name.startswith(STAGE)
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
        self, step: int, params_shapes: dict, opt_shapes: dict | None, *, lazy: bool = False
    ) -> tuple[dict, dict | None, dict]:
        """(params, opt_state or None, meta) of checkpoint ``step``: shapes and optimizer
        layout checked first, the digest after reading. ``lazy`` (a disk-tier engine's start):
        a disk-tier checkpoint comes back as (SegmentStates, None, meta), its digest checked,
        each segment read when the engine asks for it."""
        where = self.path(step)
        if (where / ITEM).is_dir():
            return self._restore_segments(step, params_shapes, opt_shapes, lazy)
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
        if not digest:
            self._no_digest(where, meta.pop(FORMAT_KEY, None))
            return params, opt, meta
        meta.pop(FORMAT_KEY, None)
        trees = {"params": params} if opt is None else {"params": params, "opt_state": opt}
        if isinstance(next(iter(digest.values())), dict):  # written by P processes
            verify_process_digest(digest, trees, where)
        elif multi_process():
            log.info("%s: written by one process; its digest is checked by one process", where)
        else:
            verify_digest(digest, params, opt, where)
        return params, opt, meta

    def _restore_segments(self, step: int, params_shapes, opt_shapes, lazy: bool) -> tuple:
        where = self.path(step)
        args = ocp.args.Composite(**{ITEM: SegmentsRestore(), "meta": ocp.args.JsonRestore()})
        try:
            r = self._mngr.restore(step, args=args)
        except READ_ERRORS as e:
            raise CorruptCheckpoint(f"{where}: unreadable ({first_line(e)})") from None
        meta = dict(r["meta"] or {})
        digest, _ = meta.pop(DIGEST_KEY, None), meta.pop(FORMAT_KEY, None)
        return (*r[ITEM].restore(params_shapes, opt_shapes, digest, where, lazy), meta)

    def _no_digest(self, where: Path, fmt) -> None:
        """A checkpoint without its digest: corrupt when this layout wrote it (it always writes
        one); the older layout only with ``allow_unverified``."""
        if fmt is not None:
            raise CorruptCheckpoint(f"{where}: its crc32c digest is missing (corrupt metadata)")
        if not self.allow_unverified:
            raise UnverifiedCheckpoint(
                f"{where}: has no crc32c digest (a wsjax checkpoint from before digests, or its "
                "digest was removed); refused unverified (--allow_unverified_checkpoint loads "
                "such a checkpoint of the older layout without checking it)"
            )
        log.warning("%s: written without a digest (older layout); loaded unverified", where)

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
        try:
            self.wait()
        except BaseException:
            self._save_failed = True
            raise
        finally:
            if self._save_failed:  # orbax raises the failed save again: reported already
                with contextlib.suppress(*READ_ERRORS):
                    self._mngr.close()
            else:
                self._mngr.close()


def _owned(tree: dict) -> dict:
    """``tree`` with every leaf an array that owns its bytes (a view is copied)."""
    return jax.tree.map(
        lambda a: a if isinstance(a, np.ndarray) and a.flags.owndata else np.array(a), tree
    )


def _is_shape(x) -> bool:
    return isinstance(x, tuple)
