"""Checkpoints of a disk-tier run (``streaming.disk_path``), written and read one segment at a time.

Such a checkpoint holds, instead of the ``params`` and ``opt_state`` items, a ``segments`` item:
the tier's own segment files (``embed.bin``, ``block-0.bin`` ..., each a segment's fp32 master
and optimizer state, raw; wsjax.engine.disk) and ``layout.json`` (per segment its file, leaves
and the names of its parameters). ``meta`` carries a crc32c of every file, as it carries one of
every array otherwise.

Saving reads each segment file once (its digest, and the NaN check every checkpoint gets), then
hard-links it into a staging folder beside the checkpoints (``.segments-<step>.partial-<pid>``),
or copies it when the tier is on another filesystem; orbax's commit then moves the staged files
into the step's folder, which it renames into place as a whole. A linked file stays the state
of that step: the tier never writes a file in place, it writes ``<file>.tmp`` and renames it over
the old name, so the checkpoint's inode is never changed again. A kill at any moment leaves the
previous checkpoints and, at worst, a staging or orbax temporary folder that the next run
deletes.

Restoring is lazy for a disk-tier run: every file's digest is checked first (one segment in RAM
at a time), then the engine reads each segment as it writes it into its tier. Anything else
(a run without the tier, an export, an evaluation) gets the whole trees, joined from the
segments.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from wsjax.checkpoint.digest import CorruptCheckpoint, crc32c, fmt_path
from wsjax.engine.disk import file_name
from wsjax.engine.disk_store import SegmentStates
from wsjax.engine.store import one_layer, segment_names, stack_trees
from wsjax.errors import CheckpointError, NonFiniteError

ITEM, LAYOUT, STAGE = "segments", "layout.json", ".segments-"
DIGEST_PREFIX = ITEM + "/"  # meta's digest keys: "segments/<file>"


@dataclasses.dataclass
class SegmentsSave(ocp.args.CheckpointArgs):
    staged: Path  # the staged segment files
    layout: dict  # name -> its layout entry (file, bytes, shapes, dtypes, offsets, params)


@dataclasses.dataclass
class SegmentsRestore(ocp.args.CheckpointArgs):
    pass


class SegmentsHandler(ocp.CheckpointHandler):
    """Orbax's handler of the ``segments`` item: moves staged files in; restores lazily (the
    folder and its layout; :class:`SegmentFiles` reads)."""

    def save(self, directory, args: SegmentsSave) -> None:
        folder = Path(str(directory))
        folder.mkdir(parents=True, exist_ok=True)
        for entry in args.layout.values():
            os.replace(args.staged / entry["file"], folder / entry["file"])
        (folder / LAYOUT).write_text(json.dumps(args.layout, indent=1) + "\n")
        shutil.rmtree(args.staged, ignore_errors=True)

    def restore(self, directory, args: SegmentsRestore | None = None) -> SegmentFiles:
        folder = Path(str(directory))
        return SegmentFiles(folder, json.loads((folder / LAYOUT).read_text()))

    def metadata(self, directory) -> dict | None:
        path = Path(str(directory)) / LAYOUT
        return json.loads(path.read_text()) if path.is_file() else None


ocp.args.register_with_handler(SegmentsHandler, for_save=True)(SegmentsSave)
ocp.args.register_with_handler(SegmentsHandler, for_restore=True)(SegmentsRestore)


def _leaves(buf: np.ndarray, entry: dict) -> list[np.ndarray]:
    out = []
    for shape, dt, off in zip(entry["shapes"], entry["dtypes"], entry["offsets"], strict=True):
        n = int(np.prod(shape)) * np.dtype(dt).itemsize
        out.append(buf[off : off + n].view(np.dtype(dt)).reshape(shape))
    return out


def _read(path: Path, nbytes: int) -> np.ndarray:
    buf = np.empty(nbytes, np.uint8)
    with open(path, "rb", buffering=0) as f:
        view, got = memoryview(buf), 0
        while got < nbytes and (n := f.readinto(view[got:])):
            got += n
    if got != nbytes or path.stat().st_size != nbytes:
        raise CorruptCheckpoint(f"{path}: {path.stat().st_size} bytes, its layout says {nbytes}")
    return buf


def stage(tier, names: list[str], staged: Path, where: str) -> tuple[dict, dict]:
    """Link (else copy) the files of segments ``names`` of ``tier`` (a DiskTier whose writes
    have finished) into ``staged``: (layout, digest). NonFiniteError, naming the parameter, when
    a segment holds a NaN or an infinity (nothing is kept then)."""
    staged.mkdir(parents=True)
    layout, digest = {}, {}
    try:
        for name in names:
            lay = tier.layouts[name]
            master = jax.tree.unflatten(lay.treedef, list(range(len(lay.shapes))))[0]
            entry = {**lay.to_json(file_name(name)), "params": param_labels(master)}
            src, dst = tier.folder / entry["file"], staged / entry["file"]
            buf = _read(src, entry["bytes"])
            for label, leaf in zip(entry["params"], _leaves(buf, entry), strict=False):
                if np.issubdtype(leaf.dtype, np.inexact) and not np.isfinite(leaf).all():
                    raise NonFiniteError(
                        f"not writing {where}: {name} {label} holds non-finite values (the run "
                        "diverged; lower the learning rate or set runconfig.on_nonfinite: skip)"
                    )
            digest[DIGEST_PREFIX + entry["file"]] = crc32c(buf)
            _link_or_copy(src, dst, buf)
            layout[name] = entry
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return layout, digest


def _link_or_copy(src: Path, dst: Path, buf: np.ndarray) -> None:
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        with open(dst, "wb", buffering=0) as f:
            f.write(memoryview(buf))


class SegmentFiles:
    """The segment files of one committed checkpoint (what restoring the item gives)."""

    def __init__(self, folder: Path, layout: dict):
        self.folder, self.layout = folder, layout

    def restore(self, params_shapes, opt_shapes, digest: dict | None, where: Path, lazy: bool):
        """(params, opt_state or None) as whole trees; ``lazy``: (SegmentStates, None), every
        digest checked first. Shapes are checked before anything is read."""
        abstract, with_opt = segment_abstract(params_shapes, opt_shapes), opt_shapes is not None
        self.check(abstract, with_opt, where)
        if not digest:
            raise CorruptCheckpoint(f"{where}: its crc32c digest is missing (corrupt metadata)")
        if not lazy:
            return self.whole(abstract, digest, where, with_opt)
        self.verify(digest, where)
        return SegmentStates(self.states(abstract, digest, where, with_opt)), None

    def check(self, abstract: dict, with_opt: bool, where: Path) -> None:
        """CheckpointError naming the first segment leaf whose shape differs from ``abstract``
        (name -> (master, opt_state) abstract trees), before anything is read."""
        missing = sorted(set(abstract) - set(self.layout))
        if missing:
            raise CheckpointError(f"{where}: has no segment {missing[0]} (the model has it)")
        for name, (master, opt) in abstract.items():
            entry = self.layout[name]
            want = [tuple(a.shape) for a in jax.tree.leaves((master, opt) if with_opt else master)]
            got = [tuple(s) for s in entry["shapes"]][: len(want)]
            for i, (g, w) in enumerate(zip(got, want, strict=False)):
                if g != w:
                    label = entry["params"][i] if i < len(entry["params"]) else f"optimizer {i}"
                    raise CheckpointError(
                        f"{where}: {name} {label} has shape {g}, the model expects {w} (check "
                        "model.* and optimizer.* in the params file against the checkpoint)"
                    )
            if len(got) < len(want) or (with_opt and len(entry["shapes"]) != len(want)):
                raise CheckpointError(
                    f"{where}: {name}'s optimizer state ({len(entry['shapes'])} arrays with the "
                    "weights) does not match the config's optimizer: start from it with "
                    "--is_pretrained_checkpoint to take only the weights"
                )

    def verify(self, digest: dict, where: Path) -> None:
        """Every file against its crc32c (one segment in memory at a time)."""
        for name in self.layout:
            self.load(name, digest, where)

    def load(self, name: str, digest: dict, where: Path) -> list[np.ndarray]:
        """Segment ``name``'s leaves (master, then optimizer state), its digest checked."""
        entry = self.layout[name]
        try:
            buf = _read(self.folder / entry["file"], entry["bytes"])
        except OSError as e:
            raise CorruptCheckpoint(f"{where}: {entry['file']} unreadable ({e.strerror})") from None
        want = digest.get(DIGEST_PREFIX + entry["file"])
        if want is None or crc32c(buf) != want:
            raise CorruptCheckpoint(
                f"{where}: {entry['file']} fails its crc32c digest (corrupt on disk)"
            )
        return _leaves(buf, entry)

    def states(self, abstract: dict, digest: dict, where: Path, with_opt: bool) -> dict:
        """name -> a function reading that segment's (master, opt_state or None)."""

        def read(name: str):
            master, opt = abstract[name]
            leaves = self.load(name, digest, where)
            n = len(jax.tree.leaves(master))
            unflatten = lambda t, xs: jax.tree.unflatten(jax.tree.structure(t), xs)  # noqa: E731
            return unflatten(master, leaves[:n]), (unflatten(opt, leaves[n:]) if with_opt else None)

        return {name: (lambda name=name: read(name)) for name in abstract}

    def whole(self, abstract: dict, digest: dict, where: Path, with_opt: bool) -> tuple:
        """(params, opt_state or None) as whole trees, blocks stacked (the usual layout)."""
        per = {n: read() for n, read in self.states(abstract, digest, where, with_opt).items()}
        num_layers = len(per) - 2
        join = lambda i: {  # noqa: E731
            "embed": per["embed"][i],
            "blocks": stack_trees([per[f"block/{k}"][i] for k in range(num_layers)]),
            "head": per["head"][i],
        }
        return join(0), (join(1) if with_opt else None)


def segment_abstract(params_shapes: dict, opt_shapes: dict | None) -> dict:
    """name -> (master, opt_state) abstract trees of each segment of whole-shaped trees (opt_state
    None when ``opt_shapes`` is)."""
    num_layers = jax.tree.leaves(params_shapes["blocks"])[0].shape[0]
    kinds = {k: params_shapes[k] for k in ("embed", "head")}
    kinds["block"] = one_layer(params_shapes["blocks"])
    opts = {k: None for k in kinds}
    if opt_shapes is not None:
        opts = {"embed": opt_shapes["embed"], "head": opt_shapes["head"]}
        opts["block"] = one_layer(opt_shapes["blocks"])
    return {n: (kinds[n.split("/")[0]], opts[n.split("/")[0]]) for n in segment_names(num_layers)}


def param_labels(master) -> list[str]:
    """The names of a segment's parameters, in leaf order (for layout.json and its errors)."""
    return [fmt_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(master)[0]]
