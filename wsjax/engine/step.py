"""One streamed step for a fixed batch shape: the stream order, the driver, what each item does.

A step is an explicit list of :class:`StreamItem` (segment, phase). A training step:

    embed/embed_forward, block/0..L-1 block_forward, head/head_loss,
    block/L-1..0 block_backward, embed/embed_backward

and evaluation is the forward half with ``head_eval``. :func:`drive` runs either list the same
way: take the item's weights from the :class:`~wsjax.engine.transfer.WeightStream` (fetched
``prefetch_depth`` items ahead), dispatch its computation, then wait for the previous item and
release its weights.

Layer-major micro-batching: every item runs over all micro-batches before its weights are
dropped, so weights cross the link once per pass, not once per micro-batch. Block inputs (or,
without recompute, their VJP residuals) are kept for the backward: on the device, or offloaded
to host memory and fetched back with the block's weights. Each segment's summed gradients go
to the host as its backward finishes; once the step's global norm is known, the updates run per
segment, or none at all when the loss or the norm is not finite.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import numpy as np
from jax.profiler import TraceAnnotation

from wsjax.engine.executables import StepExecutables
from wsjax.engine.placement import Placement
from wsjax.engine.store import HostStore, segment_kind, segment_names, tree_bytes
from wsjax.engine.transfer import Fetch, Residency, StepStats, WeightStream, split_batch
from wsjax.optim import clip_factor, global_norm_from_sq


@dataclass(frozen=True)
class StreamItem:
    segment: str  # "embed", "block/<i>", "head": whose weights are streamed
    phase: str  # what runs on them: a key of the step's handlers
    index: int  # the segment's dropout fold-in: embed 0, block i -> i + 1, head L + 1
    layer: int | None = None  # block i: the slot of its kept value
    first_use: bool = True  # first use in the step: wait for its pending host update


def training_order(num_layers: int) -> list[StreamItem]:
    blocks = [StreamItem(f"block/{i}", "block_forward", i + 1, i) for i in range(num_layers)]
    back = [
        StreamItem(f"block/{i}", "block_backward", i + 1, i, first_use=False)
        for i in reversed(range(num_layers))
    ]
    return [
        StreamItem("embed", "embed_forward", 0),
        *blocks,
        StreamItem("head", "head_loss", num_layers + 1),
        *back,
        StreamItem("embed", "embed_backward", 0, first_use=False),
    ]


def eval_order(num_layers: int) -> list[StreamItem]:
    blocks = [StreamItem(f"block/{i}", "block_forward", i + 1, i) for i in range(num_layers)]
    return [
        StreamItem("embed", "embed_forward", 0),
        *blocks,
        StreamItem("head", "head_eval", num_layers + 1),
    ]


def drive(items: list[StreamItem], stream: WeightStream, dispatch: Callable) -> None:
    """Run ``items`` in order: take weights, dispatch, wait for the previous item, release it.

    ``dispatch(item, weights)`` enqueues the item's computation and returns its outputs; the
    wait is on those outputs, so the device always has the next item queued behind the current.
    """
    previous = None
    for item in items:
        # named spans for runconfig.profile_steps traces (free when no trace is running)
        with TraceAnnotation("stream/take", segment=item.segment):
            weights = stream.take()
        with TraceAnnotation(f"dispatch/{item.phase}", segment=item.segment):
            outputs = dispatch(item, weights)
        if previous is not None:
            with TraceAnnotation("wait/previous_item"):
                jax.block_until_ready(previous)
            stream.release()
        previous = outputs
    with TraceAnnotation("wait/previous_item"):
        jax.block_until_ready(previous)
    stream.release()


@dataclass
class _TrainState:
    """What one training step carries from item to item (no reference to the stream)."""

    ids: list
    labels: list
    mask: list
    step_key: jax.Array
    denom: jax.Array
    kept: list  # kept[i][m]: block i's input or residuals of micro-batch m (device or host)
    stats: StepStats
    x: list = field(default_factory=list)  # activations (forward) or their gradients (backward)
    loss_sums: list = field(default_factory=list)
    g_wte: jax.Array | None = None  # tied: the head's share of the wte gradient
    grads_host: dict = field(default_factory=dict)
    sq_norms: dict = field(default_factory=dict)
    store: HostStore | None = None  # holds the host gradients (a disk tier: in its files)


class TrainStep:
    """Forward, head, backward and updates of one training step, for one batch shape."""

    def __init__(
        self,
        executables: StepExecutables,
        placement: Placement,
        residency: Residency,
        *,
        streaming_cfg,
        max_norm: float | None,
    ):
        self.executables, self.placement, self.residency = executables, placement, residency
        self.prefetch_depth = int(streaming_cfg.prefetch_depth)
        self.recompute = bool(streaming_cfg.recompute)
        self.offload = bool(streaming_cfg.activation_offload)
        self.max_norm = max_norm
        self.train_set = executables.training(recompute=self.recompute)
        self.kept_bytes = tree_bytes(self.train_set.kept)
        self.num_layers = executables.functions.model.num_layers
        self.order = training_order(self.num_layers)
        # phase -> (what it does, the compiled scratch of the executable it runs)
        temp = self.train_set.temp_bytes
        self.handlers = {
            "embed_forward": (self._embed_forward, temp["embed_fwd"]),
            "block_forward": (self._block_forward, temp["block_fwd"]),
            "head_loss": (self._head_loss, temp["head"]),
            "block_backward": (self._block_backward, temp["block_bwd"]),
            "embed_backward": (self._embed_backward, temp["embed_bwd"]),
        }

    def run(self, store: HostStore, batch: dict, step_key: jax.Array, denom: float) -> dict:
        """One optimizer step on ``batch``; ``denom`` is the batch loss's denominator."""
        stats = StepStats()
        ids, labels, mask = split_batch(batch, self.executables, self.placement, stats)
        denom_device = jax.device_put(
            np.asarray(denom, self.executables.master_dtype), self.placement.replicated
        )
        kept: list = [None] * self.num_layers
        state = _TrainState(ids, labels, mask, step_key, denom_device, kept, stats, store=store)
        kept_back = (kept, self.train_set.kept) if self.offload else None
        fetches = []
        for item in self.order:
            back = kept_back if item.phase == "block_backward" else None
            fetches.append(weight_fetch(item, store, self.executables, self.placement, back))
        stream = WeightStream(fetches, self.prefetch_depth, stats, self.residency)
        store.read_ahead()  # a disk tier's first reads overlap the forward and backward
        self.residency.add(
            "activations", 2 * self.executables.n_micro * tree_bytes(self.executables.activation)
        )
        drive(self.order, stream, functools.partial(self._dispatch, state))
        self.residency.drop("activations")

        # how long the step waits for the last gradients to reach the host
        t0 = time.perf_counter()
        with TraceAnnotation("wait/gradients_to_host"):
            jax.block_until_ready(list(state.grads_host.values()))
        stats.d2h_wait += time.perf_counter() - t0

        loss = float(np.sum([np.float64(s) for s in state.loss_sums])) / float(denom)
        grad_norm = float(global_norm_from_sq(list(state.sq_norms.values())))
        skip = not (np.isfinite(loss) and np.isfinite(grad_norm))
        if not skip:  # updates in the order the next forward needs them
            scale = clip_factor(grad_norm, self.max_norm)
            for name in segment_names(self.num_layers):
                with TraceAnnotation("update", segment=name):
                    grads = store.gradients(name, state.grads_host[name])
                    self._update(store, name, grads, scale, stats)
        for name in state.grads_host:  # held on the device until here (a device update)
            self.residency.drop(f"grads_held:{name}")
        return {
            "train/loss": loss,
            "train/grad_norm": grad_norm,
            "train/update_skipped": float(skip),
            **stats.as_metrics(),
        }

    def _dispatch(self, state: _TrainState, item: StreamItem, weights) -> list:
        handler, temp_bytes = self.handlers[item.phase]
        self.residency.running(temp_bytes)
        return handler(state, item, *weights)

    # ---- the items -------------------------------------------------------------------------
    def _embed_forward(self, state, item, w, _wte, _kept):
        exe, n = self.train_set.embed_fwd, self.executables.n_micro
        state.x = [exe(w, state.ids[m], state.step_key, _index(m, item)) for m in range(n)]
        return state.x

    def _block_forward(self, state, item, w, _wte, _kept):
        exe, n = self.train_set.block_fwd, self.executables.n_micro
        outs = [exe(w, state.x[m], state.step_key, _index(m, item)) for m in range(n)]
        if self.recompute:  # keep the input, recompute the rest in the backward
            kept, state.x = state.x, outs
        else:
            state.x, kept = [o[0] for o in outs], [o[1] for o in outs]
        self._keep(state, item.layer, kept)
        return state.x

    def _keep(self, state, layer: int, kept: list) -> None:
        nbytes = len(kept) * self.kept_bytes
        if self.offload:
            host = jax.tree.map(lambda s: self.placement.offloaded(s.sharding), self.train_set.kept)
            state.kept[layer] = [jax.device_put(k, host) for k in kept]
            state.stats.d2h_bytes += nbytes
        else:
            state.kept[layer] = kept
            self.residency.add(f"kept:{layer}", nbytes)

    def _head_loss(self, state, item, w, wte, _kept):
        """Loss and its gradient per micro-batch; head gradients summed on the device."""
        exe, executables = self.train_set.head, self.executables
        g = self.train_set.zeros["head"]()
        g_wte = self.train_set.zeros["g_wte"]() if executables.tied else None
        self.residency.add("grads:head", tree_bytes(executables.grads["head"]))
        dy = []
        for m in range(executables.n_micro):
            loss_sum, dy_m, g, g_wte, sq = exe(
                w, wte, state.x[m], state.labels[m], state.mask[m], state.denom, g, g_wte
            )
            state.loss_sums.append(loss_sum)
            dy.append(dy_m)
        state.x, state.g_wte = dy, g_wte
        self._send(state, "head", g, sq)
        return dy

    def _block_backward(self, state, item, w, _wte, fetched_kept):
        exe, executables = self.train_set.block_bwd, self.executables
        kept = fetched_kept if fetched_kept is not None else state.kept[item.layer]
        g = self.train_set.zeros["block"]()
        self.residency.add(f"grads:{item.segment}", tree_bytes(executables.grads["block"]))
        dy = state.x
        for m in range(executables.n_micro):
            if self.recompute:
                dy[m], g, sq = exe(w, kept[m], dy[m], state.step_key, _index(m, item), g)
            else:
                dy[m], g, sq = exe(w, kept[m], dy[m], g)
        state.kept[item.layer] = None
        self.residency.drop(f"kept:{item.layer}")
        self._send(state, item.segment, g, sq)
        return dy

    def _embed_backward(self, state, item, w, _wte, _kept):
        exe, executables = self.train_set.embed_bwd, self.executables
        g = self.train_set.zeros["embed"]()  # tied: all but wte
        if executables.tied:  # the wte gradient starts from the head's share
            g["wte"] = state.g_wte
        for m in range(executables.n_micro):
            g, sq = exe(w, state.ids[m], state.x[m], state.step_key, _index(m, item), g)
        self._send(state, "embed", g, sq)
        return [g, sq]

    def _send(self, state, name: str, g, sq) -> None:
        """Start a segment's summed gradients back to the host (updated once the norm is known);
        a device update over pinned state keeps them on the first device instead."""
        state.sq_norms[name] = sq
        if self._grads_stay:
            state.grads_host[name] = self.placement.on_first(g)
            self.residency.add(f"grads_held:{name}", tree_bytes(g))
        else:
            state.stats.d2h_bytes += tree_bytes(g)
            g_host = self.executables.reduce_to_host(segment_kind(name), g)
            state.grads_host[name] = state.store.hold_gradients(name, g_host)
        self.residency.drop(f"grads:{name}")

    @property
    def _grads_stay(self) -> bool:
        return self.placement.pinned and not self.placement.optimizer_on_host

    # ---- the update ------------------------------------------------------------------------
    def _update(self, store: HostStore, name: str, grads, scale, stats: StepStats) -> None:
        """One segment's update, its master and optimizer state donated. Over pinned state
        (``placement.pinned``) every input is already where the executable wants it: nothing
        moves here; the device update's state crosses the link inside the executable."""
        placement, where = self.placement, self.placement.update
        exe = self.train_set.update[segment_kind(name)]
        master, opt_state = store.state(name)
        legacy_device = not (placement.optimizer_on_host or placement.pinned)
        state_bytes = tree_bytes(master) + tree_bytes(opt_state)
        if not placement.optimizer_on_host:
            stats.h2d_bytes += state_bytes
            stats.d2h_bytes += state_bytes
            self.residency.add(f"update:{name}", 2 * state_bytes + tree_bytes(grads))
        if legacy_device:  # state on the CPU client: to the devices and back
            stats.h2d_bytes += tree_bytes(grads)
            master, opt_state, grads = jax.device_put((master, opt_state, grads), where)
        scale = jax.device_put(np.asarray(scale, self.executables.master_dtype), where)
        master, opt_state, stream_copy = exe(master, opt_state, grads, scale)
        if legacy_device:
            master, opt_state = jax.device_put((master, opt_state), placement.host)
        if not placement.optimizer_on_host:
            self.residency.drop(f"update:{name}")
        if not placement.update_writes_stream:
            stream_copy = jax.device_put(stream_copy, placement.stream)
        store.set_state(name, master, opt_state, stream_copy)


class EvalStep:
    """Forward-only evaluation of one batch shape: summed loss, token count, correct tokens."""

    def __init__(self, executables: StepExecutables, placement, residency, *, streaming_cfg):
        self.executables, self.placement, self.residency = executables, placement, residency
        self.prefetch_depth = int(streaming_cfg.prefetch_depth)
        self.eval_set = executables.evaluation(recompute=bool(streaming_cfg.recompute))
        self.order = eval_order(executables.functions.model.num_layers)

    def run(self, store: HostStore, batch: dict, step_key: jax.Array) -> dict:
        stats = StepStats()
        ids, labels, mask = split_batch(batch, self.executables, self.placement, stats)
        fetches = [
            weight_fetch(item, store, self.executables, self.placement) for item in self.order
        ]
        stream = WeightStream(fetches, self.prefetch_depth, stats, self.residency)
        n, eval_set = self.executables.n_micro, self.eval_set
        forward = {"embed_forward": eval_set.embed_fwd, "block_forward": eval_set.block_fwd}
        x: list = ids  # tokens, then activations
        results: list = []

        def dispatch(item: StreamItem, weights) -> list:
            nonlocal x
            w, wte, _ = weights
            if item.phase == "head_eval":
                results.extend(eval_set.head(w, wte, x[m], labels[m], mask[m]) for m in range(n))
                return results
            x = [forward[item.phase](w, x[m], step_key, _index(m, item)) for m in range(n)]
            return x

        drive(self.order, stream, dispatch)
        return {
            "loss_sum": sum(float(r[0]) for r in results),
            "count": sum(float(r[1]) for r in results),
            "correct": sum(float(r[2]) for r in results),
        }


# ---- helpers of both steps --------------------------------------------------------------


def weight_fetch(
    item: StreamItem,
    store: HostStore,
    executables: StepExecutables,
    placement: Placement,
    kept_back=None,
) -> Fetch:
    """The fetch of ``item``'s weights (+ the tied wte for the head). ``kept_back`` = (the
    step's list of host kept values, the abstract kept value) fetches the block's kept values
    too, once they exist. The closures hold the store and that list, never the step's state,
    so a finished step is freed by reference counting."""
    name = item.segment
    with_wte = name == "head" and executables.tied
    nbytes = executables.seg_bytes[segment_kind(name)] + (
        executables.seg_bytes["embed"] if with_wte else 0
    )
    data_exist = None
    if kept_back is not None:
        kept_host, kept_abstract = kept_back
        device = jax.tree.map(lambda s: s.sharding, kept_abstract)
        nbytes += executables.n_micro * tree_bytes(kept_abstract)
        data_exist = lambda: kept_host[item.layer] is not None  # noqa: E731

    def issue():
        weights = executables.broadcast(segment_kind(name), store.stream[name])
        wte = executables.broadcast("embed", store.stream["embed"])["wte"] if with_wte else None
        kept = None
        if kept_back is not None:
            kept = [jax.device_put(k, device) for k in kept_host[item.layer]]
        return weights, wte, kept

    pending = (lambda: store.stream[name]) if item.first_use else None
    return Fetch(name, nbytes, issue, pending_update=pending, data_exist=data_exist)


def _index(micro_batch: int, item: StreamItem) -> np.ndarray:
    return np.asarray([micro_batch, item.index], np.int32)
