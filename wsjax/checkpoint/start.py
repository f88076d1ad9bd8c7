"""Where a run starts when it starts from an orbax checkpoint: the :class:`StartState` (weights,
optimizer state, step, data position) read into the engine's layout. Shapes are compared with
the model before anything is read; a mismatch names the parameter. A HuggingFace folder is the
other kind of start (wsjax.interop.load).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from wsjax.checkpoint.checkpoints import NAME, Checkpoints
from wsjax.checkpoint.digest import CorruptCheckpoint, UnverifiedCheckpoint
from wsjax.engine.store import opt_state_shapes
from wsjax.errors import CheckpointError

log = logging.getLogger("wsjax.checkpoint")


@dataclass
class StartState:
    """Where a run starts: weights (None = initialise), optimizer state, step, loader state."""

    params: dict | None = None
    opt_state: dict | None = None
    step: int = 0
    loader_state: dict | None = None
    source: str | None = None  # what the log says it restored from
    config: dict | None = None  # the effective config the checkpoint was saved with


def _orbax_location(path: Path) -> tuple[Path, int | None] | None:
    """(manager folder, step) for an orbax checkpoint path or a folder holding them."""
    m = NAME.fullmatch(path.name)
    if m and path.is_dir():
        return path.parent, int(m.group(1))
    if path.is_dir() and any(NAME.fullmatch(p.name) for p in path.iterdir()):
        return path, None
    return None


def orbax_start(
    path: Path,
    model,
    optimizer,
    *,
    weights_only: bool,
    allow_unverified: bool = False,
    lazy: bool = False,
) -> StartState | None:
    """The state in ``path`` when it is an orbax checkpoint or a folder holding them, else None.

    ``weights_only`` (``--is_pretrained_checkpoint``): step 0, fresh optimizer, loader from the
    start. A model_dir whose latest checkpoint is corrupt falls back to its newest good one; a
    named ``model-ckpt-<step>`` that is corrupt is an error. ``allow_unverified``: a checkpoint
    of the layout before digests is loaded unverified instead of refused. ``lazy``: see
    :meth:`Checkpoints.restore`.
    """
    loc = _orbax_location(path)
    if loc is None:
        return None
    shapes = model.param_shapes()
    ckpts = Checkpoints(loc[0], read_only=True, allow_unverified=allow_unverified)
    steps = ckpts.steps() if loc[1] is None else [loc[1]]
    if not steps or steps[-1] not in ckpts.steps():
        raise CheckpointError(f"{path}: not a complete orbax checkpoint")
    opt_shapes = None if weights_only else opt_state_shapes(optimizer, shapes, model.num_layers)
    step, (params, opt, meta) = restore_newest_good(ckpts, shapes, opt_shapes, steps, lazy)
    src = str(ckpts.path(step))
    if weights_only:
        return StartState(params=params, source=src)
    loader = meta.get("loader")
    return StartState(params, opt, int(meta.get("step", step)), loader, src, meta.get("config"))


def run_model_dir(path: Path) -> Path:
    """The model_dir of ``path``: itself, or the parent of a ``model-ckpt-<step>`` folder."""
    return path.parent if NAME.fullmatch(path.name) else path


def restore_newest_good(
    ckpts: Checkpoints, params_shapes: dict, opt_shapes: dict | None, steps: list[int], lazy=False
) -> tuple[int, tuple[dict, dict | None, dict]]:
    """Restore the newest of ``steps`` that reads back intact; a corrupt one is skipped with a
    warning naming it. Raises CheckpointError when none is readable. ``lazy``: see restore."""
    if len(steps) == 1:  # a named checkpoint: its own error, no fallback
        return steps[0], ckpts.restore(steps[0], params_shapes, opt_shapes, lazy=lazy)
    bad = []
    for step in sorted(steps, reverse=True):
        try:
            return step, ckpts.restore(step, params_shapes, opt_shapes, lazy=lazy)
        except CorruptCheckpoint as e:
            log.warning("%s; falling back to the previous checkpoint", e)
            bad.append(ckpts.path(step).name)
            if not isinstance(e, UnverifiedCheckpoint):  # set aside so the step can be saved
                ckpts.set_aside(step, "corrupt")
    raise CheckpointError(
        f"{ckpts.directory}: no readable checkpoint ({', '.join(bad)} are corrupt); move them "
        "away to start afresh"
    )
