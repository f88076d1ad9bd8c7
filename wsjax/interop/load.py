"""Where a run, an export or a generation starts: ``--checkpoint_path`` names an orbax checkpoint
(``.../model-ckpt-<step>``), a model_dir (its newest good checkpoint) or a HuggingFace folder
(``config.json`` + weights)."""

from __future__ import annotations

from pathlib import Path

import jax
from safetensors import SafetensorError

from wsjax.checkpoint import StartState, check_shapes
from wsjax.checkpoint.digest import first_line
from wsjax.checkpoint.start import orbax_start
from wsjax.errors import CheckpointError
from wsjax.interop.hf import import_hf


def load_start(
    path: str | Path,
    model,
    optimizer,
    *,
    weights_only: bool,
    allow_pickle: bool = False,
    allow_unverified: bool = False,
    lazy: bool = False,
) -> StartState:
    """The state in ``path`` (orbax checkpoint, model_dir, or HF folder) for ``model``.

    ``weights_only`` (``--is_pretrained_checkpoint``, and always for HF): step 0, fresh
    optimizer, loader from the start. ``allow_pickle``: an HF folder may hold a pickled
    ``pytorch_model.bin`` (only for a source the user trusts). ``allow_unverified``: an orbax
    checkpoint without a digest (the older layout) is loaded unverified. ``lazy``: a disk-tier
    checkpoint is read one segment at a time by the engine (wsjax.checkpoint.segments).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"{path}: --checkpoint_path does not exist (give a model-ckpt-<step> folder, a "
            "model_dir with checkpoints, or a HuggingFace folder)"
        )
    start = orbax_start(
        path,
        model,
        optimizer,
        weights_only=weights_only,
        allow_unverified=allow_unverified,
        lazy=lazy,
    )
    if start is not None:
        return start
    if (path / "config.json").is_file():
        try:
            _, params = import_hf(path, allow_pickle=allow_pickle)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: unreadable weights ({first_line(e)})") from None
        except CheckpointError as e:  # torch's multi-line texts: their first line is the point
            raise CheckpointError(first_line(e)) from None
        shapes = jax.tree.map(lambda a: tuple(a.shape), params)
        check_shapes(model.param_shapes(), shapes, path)
        return StartState(params=params, source=f"HuggingFace checkpoint {path}")
    raise CheckpointError(
        f"{path}: neither an orbax checkpoint (model-ckpt-<step>) nor a HuggingFace folder "
        "(config.json + weights)"
    )
