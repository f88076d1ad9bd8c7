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

With several processes each process stages and links its own slices' files into
``segments/process-<index>/``, with each leaf's whole shape in its layout; ``meta`` holds every
process's digests (gathered). A run with as many processes resumes from its own slices; any
other reader joins each leaf's slices along the axis they are cut on (wsjax.engine.shards).
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
from jax.experimental import multihost_utils

from wsjax.checkpoint.digest import CorruptCheckpoint, crc32c, fmt_path
from wsjax.engine.disk import file_name
from wsjax.engine.disk_store import SegmentStates
from wsjax.engine.shards import cut_axis
from wsjax.engine.store import one_layer, segment_names, stack_trees
from wsjax.errors import CheckpointError, NonFiniteError

ITEM, LAYOUT, STAGE = "segments", "layout.json", ".segments-"
PART = "process-"  # written by several processes: one folder each, process-<index>
DIGEST_PREFIX = ITEM + "/"  # meta's digest keys: "segments/[process-<index>/]<file>"


@dataclasses.dataclass
class SegmentsSave(ocp.args.CheckpointArgs):
    staged: Path  # the staged segment files
    layout: dict  # name -> its layout entry (file, bytes, shapes, dtypes, offsets, params)
    process: int | None = None  # several processes: this one's files go to process-<index>/


@dataclasses.dataclass
class SegmentsRestore(ocp.args.CheckpointArgs):
    pass


class SegmentsHandler(ocp.CheckpointHandler):
    """Orbax's handler of the ``segments`` item: moves staged files in; restores lazily (the
    folder and its layout; :class:`SegmentFiles` reads)."""

    def save(self, directory, args: SegmentsSave) -> None:
        folder = Path(str(directory))
        if args.process is not None:
            folder = folder / f"{PART}{args.process}"
        folder.mkdir(parents=True, exist_ok=True)
        for entry in args.layout.values():
            os.replace(args.staged / entry["file"], folder / entry["file"])
        (folder / LAYOUT).write_text(json.dumps(args.layout, indent=1) + "\n")
        shutil.rmtree(args.staged, ignore_errors=True)

    def restore(self, directory, args: SegmentsRestore | None = None) -> SegmentFiles:
        folder = Path(str(directory))
        found = sorted((int(p.name[len(PART) :]), p) for p in folder.glob(PART + "*"))
        if not found:  # one process wrote it
            return SegmentFiles([(folder, json.loads((folder / LAYOUT).read_text()), "")])
        if [i for i, _ in found] != list(range(len(found))):
            raise ValueError(f"{folder}: process folders {[p.name for _, p in found]}")
        return SegmentFiles(
            [(p, json.loads((p / LAYOUT).read_text()), f"{p.name}/") for _, p in found]
        )

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


def stage(tier, names: list[str], staged: Path, where: str, full=None) -> tuple[dict, dict]:
    """Link (else copy) the files of segments ``names`` of ``tier`` (a DiskTier whose writes
    have finished) into ``staged``: (layout, digest). NonFiniteError, naming the parameter, when
    a segment holds a NaN or an infinity (nothing is kept then). ``full`` (several processes:
    the whole trees' shapes, {"params", "opt_state"}): the tier holds this process's slices;
    the layout records each leaf's whole shape too, the digest keys name this process."""
    staged.mkdir(parents=True)
    layout, digest = {}, {}
    whole = None if full is None else segment_abstract(full["params"], full["opt_state"])
    prefix = "" if full is None else f"{PART}{jax.process_index()}/"
    try:
        for name in names:
            lay = tier.layouts[name]
            master = jax.tree.unflatten(lay.treedef, list(range(len(lay.shapes))))[0]
            entry = {**lay.to_json(file_name(name)), "params": param_labels(master)}
            if whole is not None:
                entry["whole_shapes"] = [list(a.shape) for a in jax.tree.leaves(whole[name])]
            src, dst = tier.folder / entry["file"], staged / entry["file"]
            buf = _read(src, entry["bytes"])
            for label, leaf in zip(entry["params"], _leaves(buf, entry), strict=False):
                if np.issubdtype(leaf.dtype, np.inexact) and not np.isfinite(leaf).all():
                    raise NonFiniteError(
                        f"not writing {where}: {name} {label} holds non-finite values (the run "
                        "diverged; lower the learning rate or set runconfig.on_nonfinite: skip)"
                    )
            digest[DIGEST_PREFIX + prefix + entry["file"]] = crc32c(buf)
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
    """The segment files of one committed checkpoint (what restoring the item gives): ``parts``,
    one (folder, layout, digest key prefix) per process that wrote it, in process order."""

    def __init__(self, parts: list[tuple[Path, dict, str]]):
        self.parts = parts
        self.layout = parts[0][1]

    def restore(self, params_shapes, opt_shapes, digest: dict | None, where: Path, lazy: bool):
        """(params, opt_state or None) as whole trees; ``lazy``: (SegmentStates, None), every
        digest it will read checked first: this process's slices when as many processes wrote
        it as run now (SegmentStates.local), else whole segments. Shapes are checked before
        anything is read."""
        abstract, with_opt = segment_abstract(params_shapes, opt_shapes), opt_shapes is not None
        self.check(abstract, with_opt, where)
        if not digest:
            raise CorruptCheckpoint(f"{where}: its crc32c digest is missing (corrupt metadata)")
        if not lazy:
            return self.whole(abstract, digest, where, with_opt)
        if len(self.parts) > 1 and len(self.parts) == jax.process_count():
            own = jax.process_index()
            for name in self.layout:
                self.load(name, digest, where, own)
            read = lambda name: self._read(name, abstract, digest, where, with_opt, own)  # noqa: E731
            return SegmentStates({n: (lambda n=n: read(n)) for n in abstract}, local=True), None
        for part in range(len(self.parts)):
            for name in self.layout:
                self.load(name, digest, where, part)
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
            stored = entry.get("whole_shapes", entry["shapes"])
            got = [tuple(s) for s in stored][: len(want)]
            for i, (g, w) in enumerate(zip(got, want, strict=False)):
                if g != w:
                    label = entry["params"][i] if i < len(entry["params"]) else f"optimizer {i}"
                    raise CheckpointError(
                        f"{where}: {name} {label} has shape {g}, the model expects {w} (check "
                        "model.* and optimizer.* in the params file against the checkpoint)"
                    )
            if len(got) < len(want) or (with_opt and len(stored) != len(want)):
                raise CheckpointError(
                    f"{where}: {name}'s optimizer state ({len(stored)} arrays with the "
                    "weights) does not match the config's optimizer: start from it with "
                    "--is_pretrained_checkpoint to take only the weights"
                )

    def load(self, name: str, digest: dict, where: Path, part: int = 0) -> list[np.ndarray]:
        """Segment ``name``'s leaves (master, then optimizer state) as process ``part`` wrote
        them, its digest checked."""
        folder, layout, prefix = self.parts[part]
        entry = layout[name]
        try:
            buf = _read(folder / entry["file"], entry["bytes"])
        except OSError as e:
            raise CorruptCheckpoint(f"{where}: {entry['file']} unreadable ({e.strerror})") from None
        want = digest.get(DIGEST_PREFIX + prefix + entry["file"])
        if want is None or crc32c(buf) != want:
            raise CorruptCheckpoint(
                f"{where}: {prefix}{entry['file']} fails its crc32c digest (corrupt on disk)"
            )
        return _leaves(buf, entry)

    def _whole_leaves(self, name: str, digest: dict, where: Path) -> list[np.ndarray]:
        """Segment ``name``'s whole leaves: with several parts, each leaf's slices joined along
        the axis where they are cut (a leaf no axis of which is cut is whole in every part)."""
        pieces = [self.load(name, digest, where, part) for part in range(len(self.parts))]
        if len(pieces) == 1:
            return pieces[0]
        whole = self.layout[name]["whole_shapes"]
        out = []
        for j, full in enumerate(whole):
            axis = cut_axis(tuple(full), tuple(pieces[0][j].shape))
            out.append(
                pieces[0][j] if axis is None else np.concatenate([p[j] for p in pieces], axis)
            )
        return out

    def _read(self, name, abstract, digest, where, with_opt: bool, part: int | None = None):
        """Segment ``name``'s (master, opt_state or None): whole, or process ``part``'s slices."""
        master, opt = abstract[name]
        if part is None:
            leaves = self._whole_leaves(name, digest, where)
        else:
            leaves = self.load(name, digest, where, part)
        n = len(jax.tree.leaves(master))
        unflatten = lambda t, xs: jax.tree.unflatten(jax.tree.structure(t), xs)  # noqa: E731
        return unflatten(master, leaves[:n]), (unflatten(opt, leaves[n:]) if with_opt else None)

    def states(self, abstract: dict, digest: dict, where: Path, with_opt: bool) -> dict:
        """name -> a function reading that whole segment's (master, opt_state or None)."""
        read = lambda name: self._read(name, abstract, digest, where, with_opt)  # noqa: E731
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


def gathered(digest: dict) -> dict:
    """Every process's file digests (each staged its own files; keys ``segments/process-<i>/
    <file>``), the same dict on every process; one process: ``digest`` itself."""
    if jax.process_count() == 1:
        return digest
    keys, own = sorted(digest), f"{PART}{jax.process_index()}/"
    # as two 16-bit halves: JAX's 32-bit default would cut an int64 (as digest.process_digest)
    halves = np.asarray([[digest[k] >> 16, digest[k] & 0xFFFF] for k in keys], np.int32)
    every = np.asarray(multihost_utils.process_allgather(halves)).astype(np.int64)
    return {
        k.replace(own, f"{PART}{p}/", 1): int(hi << 16 | lo)
        for p in range(every.shape[0])
        for k, (hi, lo) in zip(keys, every[p], strict=True)
    }


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
