"""Where a run starts: ``--checkpoint_path`` (an orbax checkpoint, a model_dir, or a HuggingFace
folder) or the newest good checkpoint, read into the engine's layout.

``--checkpoint_path`` may name an orbax checkpoint (``.../model-ckpt-<step>``), a model_dir
(its latest checkpoint) or a HuggingFace folder (``config.json`` + weights). Shapes are compared
with the model before anything is read; a mismatch names the parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax
from safetensors import SafetensorError

from wsjax.checkpoint.checkpoints import NAME, Checkpoints, check_shapes, restore_newest_good
from wsjax.checkpoint.digest import first_line
from wsjax.engine.store import opt_state_shapes
from wsjax.errors import CheckpointError
from wsjax.interop.hf import import_hf


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
    m = NAME.fullmatch(path.name)
    if m and path.is_dir():
        return path.parent, int(m.group(1))
    if path.is_dir() and any(NAME.fullmatch(p.name) for p in path.iterdir()):
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
        opt_shapes = None if weights_only else opt_state_shapes(optimizer, shapes, model.num_layers)
        step, (params, opt, meta) = restore_newest_good(ckpts, shapes, opt_shapes, steps)
        src = str(ckpts.path(step))
        if weights_only:
            return StartState(params=params, source=src)
        return StartState(params, opt, int(meta.get("step", step)), meta.get("loader"), src)
    if (path / "config.json").is_file():
        try:
            _, params = import_hf(path, allow_pickle=allow_pickle)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: unreadable weights ({first_line(e)})") from None
        except CheckpointError as e:  # torch's multi-line texts: their first line is the point
            raise CheckpointError(first_line(e)) from None
        check_shapes(shapes, jax.tree.map(lambda a: tuple(a.shape), params), path)
        return StartState(params=params, source=f"HuggingFace checkpoint {path}")
    raise CheckpointError(
        f"{path}: neither an orbax checkpoint (model-ckpt-<step>) nor a HuggingFace folder "
        "(config.json + weights)"
    )
