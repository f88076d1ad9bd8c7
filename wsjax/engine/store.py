"""Host store: fp32 master weights, optimizer state and the compute-dtype streaming copy.

One entry per segment: ``embed``, ``block/0`` ... ``block/{L-1}``, ``head``. Each layer's
buffers are their own arrays (not one stacked buffer) so that each layer's update runs in place
(donated) and independently: the next step's forward of layer i waits only for layer i's
update. ``params_tree()`` and ``opt_state_tree()`` present the blocks stacked on the leading
layer axis, the layout of checkpoints and of the resident reference.

Tiers: ``master``, ``optimizer`` and ``stream`` (bf16 under mixed precision: the bytes that
cross the link) live in the accelerator's ``pinned_host`` memory where it has one (the
placement's ``host`` and ``stream``), allocated here once and then replaced by the donated
outputs of each update, so they never cross to JAX's CPU client on a step's path.

With several processes (``shards``), every entry is this process's slice of each leaf (the
layout: :mod:`~wsjax.engine.shards`), and the two trees come back as global arrays over the
processes, whole-shaped, for a checkpoint that every process writes its part of.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax


def segment_names(num_layers: int) -> list[str]:
    return ["embed", *[f"block/{i}" for i in range(num_layers)], "head"]


def segment_kind(name: str) -> str:
    """``embed`` / ``block`` / ``head``: segments of one kind share shapes and executables."""
    return name.split("/")[0]


# ---- shapes: the one place abstract trees are built -------------------------------------------
def abstract_tree(tree, sharding=None, dtype=None):
    """ShapeDtypeStructs of ``tree`` (arrays or structs), with ``sharding`` and ``dtype`` when
    given (else the leaf's dtype and no sharding)."""
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(tuple(a.shape), dtype or a.dtype, sharding=sharding), tree
    )


def one_layer(blocks):
    """The abstract tree of one layer of stacked ``blocks`` (the leading layer axis dropped)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(tuple(a.shape[1:]), a.dtype), blocks)


def segment_shapes(model, dtype=jnp.float32) -> dict:
    """Abstract parameters of each segment kind; ``block`` is one layer (no layer axis)."""
    shapes = model.param_shapes(dtype)
    return {"embed": shapes["embed"], "block": one_layer(shapes["blocks"]), "head": shapes["head"]}


def opt_state_shapes(optimizer, params_abstract: dict, num_layers: int) -> dict | None:
    """Whole-shaped abstract optimizer state in the :meth:`HostStore.opt_state_tree` layout
    (``params_abstract``: the whole stacked parameter tree, e.g. ``model.param_shapes()``), the
    layout checkpoints hold; None without an optimizer."""
    if optimizer is None:
        return None
    init = lambda tree: jax.eval_shape(optimizer.init, tree)  # noqa: E731
    stack = lambda a: jax.ShapeDtypeStruct((num_layers, *a.shape), a.dtype)  # noqa: E731
    return {
        "embed": init(params_abstract["embed"]),
        "blocks": jax.tree.map(stack, init(one_layer(params_abstract["blocks"]))),
        "head": init(params_abstract["head"]),
    }


def tree_bytes(tree) -> int:
    """Bytes of a pytree of arrays or ShapeDtypeStructs."""
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def split_blocks(blocks, num_layers: int) -> list:
    return [jax.tree.map(lambda a, i=i: a[i], blocks) for i in range(num_layers)]


def stack_trees(trees: list):
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


class HostStore:
    """Per-segment host state. Build with :meth:`create`; the step's updates replace entries."""

    def __init__(
        self, num_layers: int, master: dict, opt_state: dict, stream: dict, shards=None, full=None
    ):
        self.num_layers = num_layers
        self.names = segment_names(num_layers)
        self.master = master  # name -> fp32 pytree on the host compute device
        self.opt_state = opt_state  # name -> optax state pytree (host)
        self.stream = stream  # name -> compute-dtype pytree (stream memory)
        self.shards = shards  # ProcessShards with several processes, else None
        self.full = full  # with shards: {"params", "opt_state"}: whole-shaped abstract trees

    @classmethod
    def create(
        cls,
        params: dict,
        num_layers: int,
        optimizer: optax.GradientTransformation | None,
        host_sharding,
        stream_sharding,
        compute_dtype,
        opt_state: dict | None = None,
        shards=None,
        whole: dict | None = None,
    ) -> HostStore:
        """Place ``params`` ({"embed", "blocks" (stacked), "head"}) and optimizer state on the host.

        ``opt_state`` (optional) is in the :meth:`opt_state_tree` layout, e.g. from a checkpoint.
        ``optimizer=None`` (an eval-only engine): no optimizer state at all. ``shards``
        (several processes): ``params`` / ``opt_state`` are whole (numpy) or global arrays over
        the processes; the store keeps this process's slices. ``whole`` (with ``shards``): the
        whole tree's shapes, when ``params`` are this process's slices already.
        """
        full = None
        if shards is not None:
            full = {"params": whole if whole is not None else abstract_tree(params)}
            full["opt_state"] = opt_state_shapes(optimizer, full["params"], num_layers)
            if whole is None:
                params = slice_stacked(shards, params, full["params"])
            if opt_state is not None:
                opt_state = slice_stacked(shards, opt_state, full["opt_state"])
        # Copies (may_alias=False): updates donate these buffers, the caller's arrays stay valid.
        place = lambda t: jax.device_put(t, host_sharding, may_alias=False)
        master = {n: place(p) for n, p in _split_segments(params, num_layers).items()}
        if optimizer is None:
            opt = {}
        elif opt_state is None:
            init = jax.jit(optimizer.init, out_shardings=host_sharding)
            opt = {n: init(p) for n, p in master.items()}
        else:
            opt = {n: place(s) for n, s in _split_segments(opt_state, num_layers).items()}
        # its own buffers even where it shares the master's memory and dtype (fp32 compute)
        cast = lambda p: jax.tree.map(lambda a: a.astype(compute_dtype), p)  # noqa: E731
        stream = {
            n: jax.device_put(cast(p), stream_sharding, may_alias=False) for n, p in master.items()
        }
        return cls(num_layers, master, opt, stream, shards, full)

    # ---- the update's access to the state (a disk-tier store reads and writes files here) ----
    def read_ahead(self) -> None:
        """Called as a step starts; the state is in memory, so nothing to fetch."""

    def state(self, name: str) -> tuple:
        """(master, optimizer state) of segment ``name``, for its update."""
        return self.master[name], self.opt_state[name]

    def hold_gradients(self, name: str, grads):
        """Segment ``name``'s host gradients, held until its update: here, in memory."""
        return grads

    def gradients(self, name: str, held):
        """What :meth:`hold_gradients` kept, for the update."""
        return held

    def set_state(self, name: str, master, opt_state, stream_copy) -> None:
        """Segment ``name``'s updated state and its fresh stream copy."""
        self.master[name], self.opt_state[name] = master, opt_state
        self.stream[name] = stream_copy

    def params_tree(self) -> dict:
        """fp32 master weights as one tree with blocks stacked (numpy, host; with several
        processes, global arrays over them)."""
        return self._whole(self._join(self.master), "params")

    def opt_state_tree(self) -> dict:
        """Optimizer state {"embed", "blocks" (stacked per leaf), "head"} (as params_tree)."""
        if not self.opt_state:
            raise ValueError("this engine was built with train=False: it has no optimizer state")
        return self._whole(self._join(self.opt_state), "opt_state")

    def _whole(self, tree: dict, item: str) -> dict:
        if self.shards is None:
            return tree
        return self.shards.host_global(tree, self.full[item])

    def _join(self, per_seg: dict) -> dict:
        blocks = [per_seg[f"block/{i}"] for i in range(self.num_layers)]
        return {
            "embed": jax.tree.map(np.asarray, per_seg["embed"]),
            "blocks": stack_trees(blocks),
            "head": jax.tree.map(np.asarray, per_seg["head"]),
        }


def local_stacked(shards, full: dict) -> dict:
    """This process's slice shapes of a whole {"embed", "blocks" (stacked), "head"} tree: a
    block leaf is cut as one layer's leaf is, below its layer axis."""
    blocks = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct((a.shape[0], *shards.local_shape(a.shape[1:])), a.dtype),
        full["blocks"],
    )
    return {
        "embed": shards.local_abstract(full["embed"]),
        "blocks": blocks,
        "head": shards.local_abstract(full["head"]),
    }


def slice_stacked(shards, tree: dict, full: dict) -> dict:
    """This process's slices (numpy) of a whole or process-global stacked tree."""
    return shards.slice_tree(tree, full, local_stacked(shards, full))


def _split_segments(tree: dict, num_layers: int) -> dict:
    out = {"embed": tree["embed"]}
    for i, layer in enumerate(split_blocks(tree["blocks"], num_layers)):
        out[f"block/{i}"] = layer
    out["head"] = tree["head"]
    return out
