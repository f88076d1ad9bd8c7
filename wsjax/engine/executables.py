"""The compiled executables of a streamed step: one method per executable, for one batch shape.

:class:`~wsjax.engine.segments.SegmentFunctions` holds the pure functions (a segment's forward,
its backward, the head's loss and gradients, the optimizer update); :class:`StepExecutables`
lowers each from abstract
shapes and compiles it once through the :class:`~wsjax.engine.compile_cache.ExecutableCache`
(so ``--compile_only`` needs no weights). Distinct executables, whatever the depth:

    embed_fwd   block_fwd       head_train   block_bwd        embed_bwd   update/<kind>
                block_fwd_save               block_bwd_saved              (recompute off)
    embed_eval  block_eval      head_eval                                 (eval, when it differs)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.compute_on import compute_on

from wsjax.engine.compile_cache import ExecutableCache
from wsjax.engine.placement import Placement
from wsjax.engine.segments import SegmentFunctions
from wsjax.engine.store import abstract_tree, segment_shapes, tree_bytes


def _shardings(abstract_tree) -> Any:
    """The shardings of an abstract tree, as out_shardings."""
    return jax.tree.map(lambda a: a.sharding, abstract_tree)


def _streamed_in(update, device_memory):
    """``update`` with master and optimizer state moved into ``device_memory`` first: inside
    the jitted update these are DMAs from pinned_host that XLA overlaps with the compute."""

    def streamed(master, opt_state, grads, scale):
        master, opt_state = jax.device_put((master, opt_state), device_memory)
        return update(master, opt_state, grads, scale)

    return streamed


def _structure(tree) -> Any:
    """Output tree structure with leaves elided (to rebuild a serialized executable)."""
    return jax.tree.map(lambda _: 0, tree)


@dataclass(frozen=True)
class TrainExecutables:
    """What a training step runs, resolved once per batch shape."""

    embed_fwd: Any
    block_fwd: Any  # recompute: x -> y; else x -> (y, residuals)
    head: Any
    block_bwd: Any  # recompute: from the kept input; else from the kept residuals
    embed_bwd: Any
    update: dict  # segment kind -> update executable
    zeros: dict  # segment kind (and "g_wte" when tied) -> fresh zero gradient accumulators
    kept: Any  # abstract value kept per block and micro-batch: its input, or its residuals
    temp_bytes: dict  # executable attribute name above -> compiled scratch bytes


@dataclass(frozen=True)
class EvalExecutables:
    embed_fwd: Any
    block_fwd: Any
    head: Any


class StepExecutables:
    """The executables of a step on ``n_micro`` micro-batches of ``micro`` x ``seq`` tokens."""

    def __init__(
        self,
        functions: SegmentFunctions,
        cache: ExecutableCache,
        placement: Placement,
        *,
        n_micro: int,
        micro: int,
        seq: int,
        master_dtype,
    ):
        self.functions, self.cache, self.placement = functions, cache, placement
        self.n_micro, self.micro, self.seq = n_micro, micro, seq
        model, compute_dtype = functions.model, functions.compute_dtype
        self.tied, self.master_dtype = model.tied, master_dtype
        self.master_shapes = segment_shapes(model, master_dtype)
        rep, data = placement.replicated, placement.data
        self.weights = {
            k: abstract_tree(v, rep, compute_dtype) for k, v in self.master_shapes.items()
        }
        # the gradient accumulators: replicated; with several processes cut as the host store
        # is, so the backward's sum over the data axis is a reduce-scatter (SwarmX's reduction)
        shards = placement.shards
        self.grads = {
            k: abstract_tree(v, rep)
            if shards is None
            else jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(
                    a.shape, a.dtype, sharding=shards.device_sharding(a.shape)
                ),
                v,
            )
            for k, v in self.master_shapes.items()
        }
        self.seg_bytes = {k: tree_bytes(v) for k, v in self.weights.items()}
        hidden = model.cfg.hidden_size
        self.activation = jax.ShapeDtypeStruct((micro, seq, hidden), compute_dtype, sharding=data)
        self.tokens = jax.ShapeDtypeStruct((micro, seq), jnp.int32, sharding=data)
        self.mask = jax.ShapeDtypeStruct((micro, seq), jnp.float32, sharding=data)
        self.step_key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)
        self.index = jax.ShapeDtypeStruct((2,), jnp.int32, sharding=rep)  # (micro-batch, seg)
        self.denom = jax.ShapeDtypeStruct((), master_dtype, sharding=rep)
        self.wte = self.weights["embed"]["wte"] if self.tied else None
        self.g_wte = self.grads["embed"]["wte"] if self.tied else None
        # what the host store holds per segment: whole leaves, or this process's slices
        shards = placement.shards
        self.host_shapes = (
            self.master_shapes
            if shards is None
            else {k: shards.local_abstract(v) for k, v in self.master_shapes.items()}
        )
        self._moves: dict = {}

    # ---- the link: host store <-> devices ------------------------------------------------
    def broadcast(self, kind: str, stream_copy):
        """A segment's stream copy from the host onto every device (replicated). With several
        processes each sends its slice to its own devices and they all-gather (SwarmX's
        broadcast)."""
        shards = self.placement.shards
        if shards is None:
            return jax.device_put(stream_copy, self.placement.replicated)
        weights = self.weights[kind]
        sharded = shards.to_devices(stream_copy, weights)
        return self._move(f"gather/{kind}", sharded, self.placement.replicated)(sharded)

    def reduce_to_host(self, kind: str, grads):
        """A segment's summed gradients to the host: replicated ones whole; with several
        processes the backward already reduce-scattered them (``self.grads``), and each process
        takes home its slice."""
        shards = self.placement.shards
        if shards is None:
            # first's shard (a view), then one move into its pinned_host
            return jax.device_put(self.placement.on_first(grads), self.placement.host)
        return shards.to_host(grads, self.placement.host)

    def _move(self, name: str, example, out_shardings):
        """A compiled identity into ``out_shardings`` (XLA chooses the collective)."""
        if name not in self._moves:
            abstract_args = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), example
            )
            self._moves[name] = self.cache.get(
                name, lambda t: t, (abstract_args,), out_shardings=out_shardings,
                out_tree=lambda n: jax.tree.structure(_structure(example)),
            )  # fmt: skip
        return self._moves[name]

    def _get(self, name, fn, args, out_shardings, out_tree, donate=()):
        return self.cache.get(
            name, fn, args, out_shardings=out_shardings, donate=donate, out_tree=out_tree
        )

    # ---- forward ---------------------------------------------------------------------------
    def embed_forward(self, *, train: bool):
        fn = lambda w, x, k, i: self.functions.embed_fwd(w, x, k, i, train)
        args = (self.weights["embed"], self.tokens, self.step_key, self.index)
        name = "embed_fwd" if train else "embed_eval"
        return self._get(name, fn, args, self.placement.data, lambda n: jax.tree.structure(0))

    def block_forward(self, *, train: bool):
        fn = lambda w, x, k, i: self.functions.block_fwd(w, x, k, i, train)
        args = (self.weights["block"], self.activation, self.step_key, self.index)
        name = "block_fwd" if train else "block_eval"
        return self._get(name, fn, args, self.placement.data, lambda n: jax.tree.structure(0))

    def block_forward_keep(self):
        """(block forward that also emits its residuals, the residuals' abstract values as
        the compiled executable lays them out: batch-sharded where they carry the batch)."""
        args = (self.weights["block"], self.activation, self.step_key, self.index)
        out_tree = lambda n: jax.tree.structure((0, [0] * (n - 1)))
        exe = self._get(
            "block_fwd_save", self.functions.block_fwd_save, args, (self.placement.data, None),
            out_tree,
        )  # fmt: skip
        outs, shardings = exe.out_info[1], exe.output_shardings[1]
        kept = [
            jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=s)
            for o, s in zip(outs, shardings, strict=True)
        ]
        return exe, kept

    # ---- head ------------------------------------------------------------------------------
    def head_train(self):
        args = (self.weights["head"], self.wte, self.activation, self.tokens, self.mask)
        args += (self.denom, self.grads["head"], self.g_wte)
        rep = self.placement.replicated
        g_wte = 0 if self.tied else None
        out_tree = lambda n: jax.tree.structure((0, 0, _structure(self.grads["head"]), g_wte, 0))
        g_wte_sharding = self.g_wte.sharding if self.tied else rep
        out_shardings = (rep, self.placement.data, _shardings(self.grads["head"]), g_wte_sharding)
        out_shardings += (rep,)
        return self._get(
            "head_train", self.functions.head_train, args, out_shardings, out_tree, donate=(6, 7)
        )

    def head_eval(self):
        args = (self.weights["head"], self.wte, self.activation, self.tokens, self.mask)
        rep = self.placement.replicated
        out_tree = lambda n: jax.tree.structure((0, 0, 0))
        return self._get("head_eval", self.functions.head_eval, args, (rep, rep, rep), out_tree)

    # ---- backward --------------------------------------------------------------------------
    def block_backward(self):
        """Recompute from the kept block input, then the VJP."""
        args = (self.weights["block"], self.activation, self.activation, self.step_key)
        args += (self.index, self.grads["block"])
        return self._block_bwd("block_bwd", self.functions.block_bwd, args)

    def block_backward_kept(self, kept: list):
        """The VJP from ``kept``, the residuals :meth:`block_forward_keep` emitted."""
        fwd_args = (self.weights["block"], self.activation, self.step_key, self.index)
        layout = self.functions.residual_layout(*fwd_args)
        fn = lambda w, res, dy, g: self.functions.block_bwd_saved(layout, w, res, dy, g)
        args = (self.weights["block"], kept, self.activation, self.grads["block"])
        return self._block_bwd("block_bwd_saved", fn, args)

    def _block_bwd(self, name, fn, args):
        rep = self.placement.replicated
        out_tree = lambda n: jax.tree.structure((0, _structure(self.grads["block"]), 0))
        donate = (len(args) - 1,)  # the gradient accumulator
        out_shardings = (self.placement.data, _shardings(self.grads["block"]), rep)
        return self._get(name, fn, args, out_shardings, out_tree, donate)

    def embed_backward(self):
        args = (self.weights["embed"], self.tokens, self.activation, self.step_key, self.index)
        args += (self.grads["embed"],)
        rep = self.placement.replicated
        out_tree = lambda n: jax.tree.structure((_structure(self.grads["embed"]), 0))
        out_shardings = (_shardings(self.grads["embed"]), rep)
        return self._get(
            "embed_bwd", self.functions.embed_bwd, args, out_shardings, out_tree, donate=(5,)
        )

    # ---- update ----------------------------------------------------------------------------
    def update(self, kind: str):
        """The optimizer update of one segment kind, where the placement says it runs.

        Master and optimizer state are donated: updated in place in their memory. With the
        state in the device's pinned_host memory (``placement.pinned``) a host update runs
        under ``compute_on('device_host')``; a device update takes the state in from
        pinned_host, updates it in device memory and writes it back, all in this executable
        (DMAs XLA schedules), the gradients and the scale already on the device."""
        optimizer, placement = self.functions.optimizer, self.placement
        if optimizer is None:
            raise ValueError("this engine was built with train=False: it has no optimizer")
        where = placement.update
        state_at = placement.host if placement.pinned else where
        master = abstract_tree(self.host_shapes[kind], state_at)
        opt_abstract = jax.eval_shape(optimizer.init, self.host_shapes[kind])
        opt_state = abstract_tree(opt_abstract, state_at)
        grads = abstract_tree(self.host_shapes[kind], where)
        scale = jax.ShapeDtypeStruct((), self.master_dtype, sharding=where)
        out_tree = lambda n: jax.tree.structure(
            (_structure(master), _structure(opt_state), _structure(master))
        )
        name = f"update/{kind}" + ("" if placement.optimizer_on_host else "@device")
        out_shardings = (state_at, state_at, placement.update_output)
        fn = self.functions.update
        if placement.host_compute:
            fn = _on_host(fn)
        elif placement.pinned and not placement.optimizer_on_host:
            fn = _streamed_in(fn, placement.device_memory)
        return self._get(
            name, fn, (master, opt_state, grads, scale), out_shardings, out_tree, donate=(0, 1)
        )

    def zeros(self, name: str, grads):
        """Zero-filled accumulators ``grads`` in one call. The backward donates them, so each
        segment needs fresh ones every step; a ``jnp.zeros`` per leaf would cost a Python
        dispatch each, every step."""
        fill = lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), grads)
        out_tree = lambda n: jax.tree.structure(_structure(grads))
        return self._get(f"zeros/{name}", fill, (), _shardings(grads), out_tree)

    # ---- what a step runs ------------------------------------------------------------------
    def training(self, *, recompute: bool) -> TrainExecutables:
        """Every executable of a training step, compiled (or loaded) now."""
        if recompute:
            block_fwd, kept = self.block_forward(train=True), self.activation
            block_bwd = self.block_backward()
        else:
            block_fwd, kept = self.block_forward_keep()
            block_bwd = self.block_backward_kept(kept)
        by_name = {
            "embed_fwd": self.embed_forward(train=True),
            "block_fwd": block_fwd,
            "head": self.head_train(),
            "block_bwd": block_bwd,
            "embed_bwd": self.embed_backward(),
        }
        update = {kind: self.update(kind) for kind in ("embed", "block", "head")}
        grads = dict(self.grads)
        if self.tied:  # wte's gradient is the head's share (its own fill), added to in embed_bwd
            grads["embed"] = {k: g for k, g in grads["embed"].items() if k != "wte"}
            grads["g_wte"] = self.g_wte
        zeros = {name: self.zeros(name, g) for name, g in grads.items()}
        # scratch of each, from the compile log (also for executables loaded from disk)
        temp = {name: self.cache.record_of(exe).temp_bytes for name, exe in by_name.items()}
        return TrainExecutables(**by_name, update=update, zeros=zeros, kept=kept, temp_bytes=temp)

    def evaluation(self, *, recompute: bool) -> EvalExecutables:
        """Forward-only executables; the training forward serves where it is the same function
        (no dropout) and a training step compiles it anyway (recompute)."""
        train_fwd = recompute and not self.functions.dropout
        return EvalExecutables(
            embed_fwd=self.embed_forward(train=train_fwd),
            block_fwd=self.block_forward(train=train_fwd),
            head=self.head_eval(),
        )


def _on_host(fn):
    """``fn`` under ``compute_on('device_host')`` (JAX 0.10 / 0.11). Newer JAX asks for the
    outputs' memory spaces in another signature: there ``fn`` runs as a plain computation, its
    outputs placed in pinned_host by the executable's out_shardings (the same values)."""
    try:
        return compute_on("device_host")(jax.jit(fn))
    except TypeError:  # compute_on(f, *, compute_type, out_memory_spaces) in newer JAX
        return fn
