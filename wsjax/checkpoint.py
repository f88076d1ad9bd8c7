"""Checkpoints: orbax ``model-ckpt-<step>`` folders in model_dir, and the starting state of a run.

Each checkpoint holds three items: ``params`` (the fp32 master tree, blocks stacked),
``opt_state`` (``{"embed", "blocks" (stacked per leaf), "head"}``, the engine's layout) and
``meta`` (JSON: step, data-loader position, seed and rng derivation, the effective config).
Orbax writes each into a temporary folder renamed on commit, so a crash at any moment leaves the
latest complete checkpoint restorable; ``keep_checkpoint_max`` older ones are deleted.

``--checkpoint_path`` may name an orbax checkpoint (``.../model-ckpt-<step>``), a model_dir
(its latest checkpoint) or a HuggingFace GPT-J / GPT-2 folder (``config.json`` + weights).
Shapes are compared with the model before anything is read; a mismatch names the parameter.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.path import step as step_lib

from wsjax.errors import CheckpointError

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


class Checkpoints:
    """The orbax checkpoints of one model_dir (``read_only`` for someone else's folder)."""

    def __init__(self, directory: str | Path, *, keep: int | None = None, read_only=False):
        self.directory = Path(directory).absolute()
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
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
        self._mngr = ocp.CheckpointManager(self.directory, options=opts, item_handlers=handlers)

    def steps(self) -> list[int]:
        self._mngr.reload()
        return sorted(self._mngr.all_steps())

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def path(self, step: int) -> Path:
        return self.directory / f"{PREFIX}-{step}"

    def save(self, step: int, params: dict, opt_state: dict, meta: dict) -> Path:
        """Write ``model-ckpt-<step>`` (synchronously) and prune to ``keep``."""
        self._mngr.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )
        self._mngr.wait_until_finished()
        return self.path(step)

    def param_shapes(self, step: int) -> Any:
        """Shapes stored in ``step``'s params item (read from metadata, no arrays loaded)."""
        md = self._mngr.item_metadata(step)["params"]
        tree = getattr(md, "tree", md)
        return jax.tree.map(lambda m: tuple(m.shape), tree, is_leaf=lambda m: hasattr(m, "shape"))

    def restore(
        self, step: int, params_shapes: dict, opt_shapes: dict | None
    ) -> tuple[dict, dict | None, dict]:
        """(params, opt_state or None, meta) of checkpoint ``step``; shapes checked first."""
        where = self.path(step)
        check_shapes(params_shapes, self.param_shapes(step), where)
        items = {
            "params": ocp.args.StandardRestore(_shape_tree(params_shapes)),
            "meta": ocp.args.JsonRestore(),
        }
        if opt_shapes is not None:
            items["opt_state"] = ocp.args.StandardRestore(_shape_tree(opt_shapes))
        try:
            r = self._mngr.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, FileNotFoundError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{where}: cannot restore ({msg})") from None
        opt = r["opt_state"] if opt_shapes is not None else None
        return r["params"], opt, dict(r["meta"] or {})

    def close(self) -> None:
        self._mngr.close()


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


def load_start(path: str | Path, model, optimizer, *, weights_only: bool) -> StartState:
    """The state in ``path`` (orbax checkpoint, model_dir, or HF folder) for ``model``.

    ``weights_only`` (``--is_pretrained_checkpoint``, and always for HF): step 0, fresh
    optimizer, loader from the start.
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
        step = loc[1] if loc[1] is not None else ckpts.latest()
        if step is None or step not in ckpts.steps():
            raise CheckpointError(f"{path}: not a complete orbax checkpoint")
        opt_shapes = None if weights_only else abstract_opt_state(model, optimizer)
        params, opt, meta = ckpts.restore(step, shapes, opt_shapes)
        src = str(ckpts.path(step))
        if weights_only:
            return StartState(params=params, source=src)
        return StartState(params, opt, int(meta.get("step", step)), meta.get("loader"), src)
    if (path / "config.json").is_file():
        from wsjax.hf import import_hf

        _, params = import_hf(path)
        check_shapes(shapes, jax.tree.map(lambda a: tuple(a.shape), params), path)
        return StartState(params=params, source=f"HuggingFace checkpoint {path}")
    raise CheckpointError(
        f"{path}: neither an orbax checkpoint (model-ckpt-<step>) nor a HuggingFace folder "
        "(config.json + weights)"
    )
