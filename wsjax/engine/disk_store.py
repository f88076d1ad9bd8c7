"""The host store of a disk-tier run (``streaming.disk_path``): the compute-dtype stream copy in
memory as in :class:`~wsjax.engine.store.HostStore`, the fp32 master weights and the optimizer
state of every segment in the files of a :class:`~wsjax.engine.disk.DiskTier`.

A step asks for the first segments' state as it starts (:meth:`DiskStore.read_ahead`), so those
reads overlap its forward and backward; each update takes its segment's state (read ahead,
placed where the update wants it on the I/O thread), starts the read of the segment
``READ_AHEAD`` further on, and writes its new state behind. The bytes go to the file and come
back unchanged, so a disk-tier run is bitwise the in-memory run. :func:`tier_terms` puts the
tier into a memory plan.
"""

from __future__ import annotations

import jax
import numpy as np
import optax

from wsjax.engine.disk import ALIGN, READ_AHEAD, WINDOW_SEGMENTS, DiskTier, Layout
from wsjax.engine.store import (
    HostStore,
    _split_segments,
    abstract_tree,
    one_layer,
    opt_state_shapes,
    segment_kind,
    segment_names,
    segment_shapes,
    slice_stacked,
    tree_bytes,
)

GRADS = "grads/"  # the tier's name of a segment's gradients: grads/<segment>
STREAM = "stream/"  # and of its stream copy (streaming.disk_stream): stream/<segment>


class SegmentStates(dict):
    """name -> a function reading that segment's (master, opt_state or None) from a disk-tier
    checkpoint: what a disk-tier engine starts from, one segment at a time
    (``Checkpoints.restore(..., lazy=True)``, wsjax.checkpoint.segments). ``local``: this
    process's slices (the checkpoint was written by as many processes), else whole segments."""

    def __init__(self, states: dict, local: bool = False):
        super().__init__(states)
        self.local = local


class TierStream:
    """The stream copy in the tier (``streaming.disk_stream``), read by the step as the dict of
    a RAM store is. A training step reads the segments forward, then backward; each access moves
    a cursor along that order and starts the reads of the next ``READ_AHEAD`` segments in it, so
    a fetch finds its weights read ahead, and forgets the read just behind: RAM holds a window
    of stream copies. The tied head's embedding (``embed`` right after ``head``) is read without
    moving the cursor; any other access off the window (an evaluation's next forward pass)
    moves the cursor to that segment's next place in the order. A new copy (the update's) is
    written behind, and the tier orders a later read of it after that write. Only the read
    ahead depends on the order: any access order reads the right bytes."""

    def __init__(self, tier: DiskTier, names: list[str], place):
        self.tier, self._place = tier, place
        self.order = [*names, *reversed(names)]  # forward, then backward
        self._cursor, self._last = len(self.order) - 1, None

    def __getitem__(self, name: str):
        n, last = len(self.order), self._last
        self._last = name
        near = [(self._cursor + k) % n for k in range(READ_AHEAD + 1)]
        at = next((i for i in near if self.order[i] == name), None)
        if at is None and not (name == "embed" and last == "head"):
            at = next(i % n for i in range(self._cursor + 1, self._cursor + n + 1)
                      if self.order[i % n] == name)  # fmt: skip
        if at is not None:
            self._move(at)
        return self.tier.read(STREAM + name, self._place).result()

    def _move(self, at: int) -> None:
        n = len(self.order)
        self._cursor = at
        window = [self.order[(at + k) % n] for k in range(READ_AHEAD + 1)]
        for name in window[1:]:
            self.tier.read(STREAM + name, self._place)
        behind = self.order[(at - 1) % n]
        if behind not in window:
            self.tier.discard(STREAM + behind)

    def __setitem__(self, name: str, copy) -> None:
        self.tier.write(STREAM + name, copy)


class DiskStore(HostStore):
    """Per-segment host state with master and optimizer state on disk; build with
    :meth:`create`."""

    def __init__(
        self, num_layers, stream: dict, tier: DiskTier, host_sharding, grads_to=None, shards=None,
        full=None,
    ):  # fmt: skip
        super().__init__(num_layers, {}, {}, stream, shards, full)
        self.tier = tier
        self._to_host = lambda tree: jax.device_put(tree, host_sharding)
        # with streaming.disk_gradients: the update's gradients go there (else None: in RAM)
        self._grads_to = None if grads_to is None else (lambda t: jax.device_put(t, grads_to))
        self._next = {n: self.names[i + READ_AHEAD] for i, n in enumerate(self.names[:-READ_AHEAD])}

    @classmethod
    def create(
        cls,
        segments: tuple[dict, dict],
        num_layers: int,
        optimizer: optax.GradientTransformation,
        host_sharding,
        stream_sharding,
        compute_dtype,
        *,
        folder,
        owner: str,
        grads_to=None,
        shards=None,
        full: dict | None = None,
        disk_stream: bool = False,
    ) -> DiskStore:
        """Write each segment's parameters and optimizer state (``segments``: name -> a function
        making its (master, opt_state or None: a fresh one), name -> the master's abstract tree;
        :func:`store_segments`) into the tier at ``folder``, one segment at a time; keep only the
        stream copy in memory. ``grads_to`` (streaming.disk_gradients): each step's gradients
        are held in the tier too, and read back placed there for the update. ``shards`` (several
        processes): ``segments`` are this process's slices, ``full`` the whole trees' shapes
        ({"params", "opt_state"}), and ``folder`` this process's own. ``disk_stream``: the
        stream copy is kept in the tier too (:class:`TierStream`)."""
        make, abstract = segments
        layouts = {}
        cast = lambda p: jax.tree.map(lambda a: a.astype(compute_dtype), p)  # noqa: E731
        for name, master in abstract.items():
            layouts[name] = Layout.of((master, jax.eval_shape(optimizer.init, master)))
            if grads_to is not None:
                layouts[GRADS + name] = Layout.of(master)
            if disk_stream:
                layouts[STREAM + name] = Layout.of(jax.eval_shape(cast, master))
        tier = DiskTier.open(folder, owner, layouts)
        init = jax.jit(optimizer.init, out_shardings=host_sharding)
        stream = {}
        for name in abstract:
            p, opt = make[name]()
            tier.write(name, (p, init(p) if opt is None else opt))
            if disk_stream:
                tier.write(STREAM + name, jax.tree.map(np.asarray, cast(p)))
            else:
                stream[name] = jax.device_put(cast(p), stream_sharding, may_alias=False)
        tier.flush()
        if disk_stream:
            stream = TierStream(tier, list(abstract), lambda t: jax.device_put(t, stream_sharding))
        return cls(num_layers, stream, tier, host_sharding, grads_to, shards, full)

    # ---- the update's access to the state ----------------------------------------------------
    def read_ahead(self) -> None:
        for name in self.names[:READ_AHEAD]:
            self.tier.read(name, self._to_host)

    def state(self, name: str) -> tuple:
        master, opt_state = self.tier.take(name, self._to_host)
        if name in self._next:
            self.tier.read(self._next[name], self._to_host)
        return master, opt_state

    def hold_gradients(self, name: str, grads):
        if self._grads_to is None:
            return grads
        self.tier.write(GRADS + name, grads)  # behind: the backward goes on
        return None

    def gradients(self, name: str, held):
        if self._grads_to is None:
            return held
        if name == self.names[0]:  # the step's first update: its gradients' read ahead starts
            for n in self.names[:READ_AHEAD]:
                self.tier.read(GRADS + n, self._grads_to)
        grads = self.tier.take(GRADS + name, self._grads_to)
        if name in self._next:
            self.tier.read(GRADS + self._next[name], self._grads_to)
        return grads

    def set_state(self, name: str, master, opt_state, stream_copy) -> None:
        self.tier.write(name, (master, opt_state))
        self.stream[name] = stream_copy

    # ---- whole trees (checkpoints): read segment by segment ----------------------------------
    def params_tree(self) -> dict:
        self.tier.flush()
        return self._whole(self._join({n: self.tier.load(n)[0] for n in self.names}), "params")

    def opt_state_tree(self) -> dict:
        self.tier.flush()
        joined = self._join({n: self.tier.load(n)[1] for n in self.names})
        return self._whole(joined, "opt_state")

    def close(self) -> None:
        """Finish the writes and release the tier's folder."""
        self.tier.close()


def param_segments(params: dict, num_layers: int, opt_state: dict | None) -> tuple[dict, dict]:
    """(name -> its (parameters, optimizer state or None), name -> the parameters' abstract
    tree) of whole trees (``opt_state`` in the :meth:`opt_state_tree` layout, or None)."""
    split = _split_segments(params, num_layers)
    opts = _split_segments(opt_state, num_layers) if opt_state is not None else {}
    make = {n: (lambda p=p, n=n: (p, opts.get(n))) for n, p in split.items()}
    return make, {n: abstract_tree(p) for n, p in split.items()}


def local_segments(segments: tuple[dict, dict], optimizer, shards) -> tuple[dict, dict]:
    """``segments`` of whole segments as this process's slices (wsjax.engine.shards), each cut
    as it is made."""
    make, abstract = segments
    local = {n: shards.local_abstract(a) for n, a in abstract.items()}

    def one(name: str):
        p, opt = make[name]()
        full_p = abstract[name]
        p = shards.slice_tree(p, full_p, local[name])
        if opt is not None:
            full_o = jax.eval_shape(optimizer.init, full_p)
            opt = shards.slice_tree(opt, full_o, shards.local_abstract(full_o))
        return p, opt

    return {n: (lambda n=n: one(n)) for n in make}, local


def store_segments(model, optimizer, params, opt_state, key, host_sharding, shards):
    """(segments, full) for :meth:`DiskStore.create`: fresh weights from ``key`` (``params``
    None), a disk-tier checkpoint's (``params`` a SegmentStates), or whole (or, with several
    processes, global) trees; with ``shards``, this process's slices and the whole shapes."""
    num_layers, full = model.num_layers, None
    if shards is not None:
        shapes = model.param_shapes()
        full = {"params": shapes, "opt_state": opt_state_shapes(optimizer, shapes, num_layers)}
    if params is None:
        segments = fresh_segments(model, key, host_sharding)
    elif isinstance(params, SegmentStates):  # read as the tier fills
        segments = checkpoint_segments(params, model)
        if params.local:  # this process's slices already
            return (
                segments[0],
                {n: shards.local_abstract(a) for n, a in segments[1].items()},
            ), full
    elif shards is not None:  # this process's slices of the trees first, then split
        params = slice_stacked(shards, params, full["params"])
        if opt_state is not None:
            opt_state = slice_stacked(shards, opt_state, full["opt_state"])
        return param_segments(params, num_layers, opt_state), full
    else:
        return param_segments(params, num_layers, opt_state), full
    if shards is not None:
        segments = local_segments(segments, optimizer, shards)
    return segments, full


def checkpoint_segments(states: dict, model) -> tuple[dict, dict]:
    """(the same, abstract trees) for a disk-tier checkpoint's SegmentStates (name -> a function
    reading that segment's (master, opt_state or None) from the checkpoint)."""
    shapes = segment_shapes(model)
    return dict(states), {n: shapes[segment_kind(n)] for n in states}


def fresh_segments(model, key, host_sharding) -> tuple[dict, dict]:
    """(name -> a function building its initial parameters, name -> their abstract tree): the
    model's init from ``key`` one segment at a time (``model.init_segment``, bitwise the whole
    init), so the whole model never exists in memory at once."""
    build = jax.jit(model.init_segment, static_argnums=1, out_shardings=host_sharding)
    shapes = segment_shapes(model)
    make, abstract = {}, {}
    for name in segment_names(model.num_layers):
        kind = segment_kind(name)
        seg, layer = ("blocks", int(name.split("/")[1])) if kind == "block" else (kind, 0)
        make[name] = lambda seg=seg, layer=layer: (build(key, seg, np.int32(layer)), None)
        abstract[name] = shapes[kind]
    return make, abstract


def tier_terms(plan, model, optimizer, processes: int, s, free) -> None:
    """The plan's host total with and without the disk tier; with it (``s.disk_path``) the
    master and optimizer state become disk terms (with each leaf's alignment padding, under
    ALIGN bytes) and the host keeps the state of WINDOW_SEGMENTS segments at once, bounded by
    the largest ones'; ``s.disk_gradients`` moves the held gradients there too and
    ``s.disk_stream`` the stream copy (a window of each stays)."""
    moved = {k: plan.host[k] for k in ("master_fp32", "optimizer_state")}
    shapes = model.param_shapes()
    kinds = {"embed": shapes["embed"], "block": one_layer(shapes["blocks"]), "head": shapes["head"]}
    sizes = [tree_bytes(kinds["embed"]), tree_bytes(kinds["head"])]
    sizes += [tree_bytes(kinds["block"])] * model.num_layers
    window_master = sum(sorted(sizes, reverse=True)[:WINDOW_SEGMENTS])  # fp32 bytes
    total = max(1, tree_bytes(shapes))  # a per-parameter term's window: its share of these
    window = sum(moved.values()) * window_master // total
    plan.host_without_tier = plan.host_total
    plan.host_with_tier = plan.host_total - sum(moved.values()) + window
    if not s.disk_path:
        return
    also = {"gradients": s.disk_gradients, "stream_copy": s.disk_stream}
    also = [k for k, on in also.items() if on and k in plan.host]
    per_leaf = lambda t: len(jax.tree.leaves((t, jax.eval_shape(optimizer.init, t))))  # noqa: E731
    extra = lambda t: len(also) * len(jax.tree.leaves(t))  # noqa: E731
    leaves = {k: per_leaf(t) + extra(t) for k, t in kinds.items()}
    for k in moved:
        del plan.host[k]
    for k in also:
        moved[k] = plan.host.pop(k)
        window += moved[k] * window_master // total
    plan.host["disk_window"] = window
    count = leaves["embed"] + leaves["head"] + model.num_layers * leaves["block"]
    plan.disk = {**moved, "alignment": ALIGN * count}
    plan.disk_available = free
    names = {"gradients": "gradients", "stream_copy": "the stream copy"}
    what = ", ".join(["master", "optimizer state", *(names[k] for k in also)])
    kept = [names[k] for k in ("stream_copy", "gradients") if k not in also]
    plan.notes.append(
        f"disk tier: {what} in streaming.disk_path, {WINDOW_SEGMENTS} segments' worth in RAM "
        f"at once" + (f"; {' and '.join(kept)} stay in RAM" if kept else "")
    )
