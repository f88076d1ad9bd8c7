"""The host store sharded across processes: MemoryX holds 1/P, SwarmX broadcasts and reduces.

With P processes (``jax.distributed``), each process's host holds a 1/P slice of every leaf of
every segment: master weights, optimizer state and the streaming copy. The layout is per leaf:
the leaf is cut along its first axis whose length divides by the global device count ``P * D``
(D devices per process), into P contiguous slices, process p holding slice p. A leaf with no
such axis (in practice only small odd-sized vectors) is held whole by every process, and every
process applies the same update to it.

Why per leaf and along an existing axis, not one flat padded buffer per segment:
- the optimizer sees the same tree with the same leaf names, so the weight-decay mask and
  every per-leaf rule work unchanged, and optax state slices are slices of the one-process state;
- a slice along an axis is a rectangular block of the leaf, so a checkpoint is the ordinary
  tree of whole-shaped arrays, written by every process for its own block (orbax), and restores
  with any process count, including 1: nothing is padded, no layout is stored;
- no pad rows to keep at zero or to strip on export.

The step moves a segment through these forms:

    host slice (this process)  --to_devices-->  sharded global array  --gather-->  replicated
    backward: gradient accumulators cut as the store is (a reduce-scatter)  --to_host-->  slice

``gather`` is a compiled identity from the sharded to the replicated layout: XLA's all-gather
over the devices of all processes (the broadcast). The backward's gradient accumulators have
the store's layout, so XLA sums each micro-batch's gradient over the data axis straight into
the shards (a reduce-scatter): every process receives the sum for its own slice only (the
reduction), and each device holds 1/(P * D) of a segment's gradient. The squared norms are
summed over those shards, so the global gradient norm, and clipping, stay exact. What XLA
emits for it is its choice: XLA CPU (JAX 0.10) compiles an all-reduce and keeps each device's
slice (seen in the compiled HLO of the block backward: same sums, twice a reduce-scatter's wire
bytes); on GPUs it is unchecked here (the lent GPU machine has one GPU).

Nothing here is used with one process: the one-process store keeps whole leaves.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def global_mesh_devices() -> list:
    """All devices of all processes, grouped by process (process p's devices contiguous)."""
    return sorted(jax.devices(), key=lambda d: (d.process_index, d.id))


def leaf_axis(shape: tuple[int, ...], num_devices: int) -> int | None:
    """The axis a leaf is cut along: the first whose length divides by ``num_devices``."""
    for axis, n in enumerate(shape):
        if n >= num_devices and n % num_devices == 0:
            return axis
    return None


def cut_axis(full_shape: tuple[int, ...], local_shape: tuple[int, ...]) -> int | None:
    """Where a local slice differs from its whole leaf (None: held whole)."""
    for axis, (n, m) in enumerate(zip(full_shape, local_shape, strict=True)):
        if n != m:
            return axis
    return None


def _spec(axis: int | None, name: str) -> P:
    """Cut along ``axis`` over mesh axis ``name``; the rest whole (None: all of it whole)."""
    if axis is None:
        return P()
    return P(*([None] * axis), name)


@dataclass(frozen=True)
class ProcessShards:
    """This process's place among ``count`` processes, and the moves between the forms."""

    mesh: Mesh  # the global ``data`` mesh, devices grouped by process
    host_mesh: Mesh  # one host CPU device per process, axis ``proc`` (checkpoints)
    count: int
    index: int

    @classmethod
    def create(cls, mesh: Mesh) -> ProcessShards:
        first_cpu: dict[int, object] = {}
        for d in jax.devices("cpu"):
            first_cpu.setdefault(d.process_index, d)
        count = jax.process_count()
        host_mesh = Mesh(np.asarray([first_cpu[p] for p in range(count)]), ("proc",))
        return cls(mesh=mesh, host_mesh=host_mesh, count=count, index=jax.process_index())

    @property
    def num_devices(self) -> int:
        return int(self.mesh.devices.size)

    @property
    def local_mesh(self) -> Mesh:
        local = [d for d in self.mesh.devices.flat if d.process_index == self.index]
        return Mesh(np.asarray(local), ("data",))

    # ---- shapes ------------------------------------------------------------------------------
    def local_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        axis = leaf_axis(shape, self.num_devices)
        if axis is None:
            return tuple(shape)
        return tuple(n // self.count if a == axis else n for a, n in enumerate(shape))

    def local_abstract(self, tree):
        """ShapeDtypeStructs of this process's slices of ``tree`` (arrays or structs)."""
        return jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(self.local_shape(tuple(a.shape)), a.dtype), tree
        )

    # ---- whole <-> this process's slice (host side, numpy) -----------------------------------
    def take_slice(self, leaf, full_shape: tuple[int, ...], local_shape: tuple[int, ...]):
        """This process's slice of ``leaf``: a whole array (numpy or addressable), or a global
        array over the processes (its addressable block is the slice)."""
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return np.asarray(leaf.addressable_shards[0].data)
        axis = cut_axis(full_shape, local_shape)
        arr = np.asarray(leaf)
        if axis is None:
            return arr
        n = local_shape[axis]
        return np.take(arr, np.arange(self.index * n, (self.index + 1) * n), axis=axis)

    def cut(self, tree):
        """This process's slices of a tree of whole leaves, as static slices that trace (inside
        a jitted init: each leaf is cut as it is built)."""

        def one(leaf):
            local = self.local_shape(tuple(leaf.shape))
            axis = cut_axis(tuple(leaf.shape), local)
            if axis is None:
                return leaf
            n = local[axis]
            return jax.lax.slice_in_dim(leaf, self.index * n, (self.index + 1) * n, axis=axis)

        return jax.tree.map(one, tree)

    def slice_tree(self, tree, full_abstract, local_abstract):
        """Every leaf of ``tree`` (whole, or global over the processes) as this process's slice."""
        return jax.tree.map(
            lambda leaf, f, s: self.take_slice(leaf, tuple(f.shape), tuple(s.shape)),
            tree,
            full_abstract,
            local_abstract,
        )

    def host_global(self, local_tree, full_abstract):
        """This process's slices as global arrays over the host mesh (one CPU device per
        process): the whole-shaped tree that a multi-process checkpoint writes."""

        def one(local, full):
            axis = cut_axis(tuple(full.shape), tuple(np.shape(local)))
            sharding = NamedSharding(self.host_mesh, _spec(axis, "proc"))
            return jax.make_array_from_process_local_data(
                sharding, np.asarray(local), tuple(full.shape)
            )

        return jax.tree.map(one, local_tree, full_abstract)

    def host_shardings(self, full_abstract, local_abstract):
        """Target shardings to restore a whole-shaped tree as per-process slices."""
        return jax.tree.map(
            lambda f, s: NamedSharding(
                self.host_mesh,
                _spec(cut_axis(tuple(f.shape), tuple(s.shape)), "proc"),
            ),
            full_abstract,
            local_abstract,
        )

    # ---- host slice <-> devices -------------------------------------------------------------
    def device_sharding(self, full_shape: tuple[int, ...]) -> NamedSharding:
        axis = leaf_axis(full_shape, self.num_devices)
        return NamedSharding(self.mesh, _spec(axis, "data"))

    def to_devices(self, local_tree, full_abstract):
        """Host slices -> sharded global arrays: each local device receives its block only."""

        def one(local, full):
            sharding = self.device_sharding(tuple(full.shape))
            local_sharding = NamedSharding(self.local_mesh, sharding.spec)
            on_local = jax.device_put(local, local_sharding)
            pieces = [s.data for s in on_local.addressable_shards]
            return jax.make_array_from_single_device_arrays(tuple(full.shape), sharding, pieces)

        return jax.tree.map(one, local_tree, full_abstract)

    def to_host(self, global_tree, host_sharding):
        """Sharded global arrays -> this process's slices on the host compute device."""

        def one(arr):
            spec = arr.sharding.spec
            local_sharding = NamedSharding(self.local_mesh, spec)
            pieces = [s.data for s in arr.addressable_shards]
            local_shape = _local_shape_of(arr, self.local_mesh)
            local = jax.make_array_from_single_device_arrays(local_shape, local_sharding, pieces)
            return jax.device_put(local, host_sharding)

        return jax.tree.map(one, global_tree)


def _local_shape_of(arr: jax.Array, local_mesh: Mesh) -> tuple[int, ...]:
    """The shape of the block of ``arr`` that one process's devices hold together."""
    shape = list(arr.shape)
    for axis, name in enumerate(arr.sharding.spec):
        if name is not None:
            shape[axis] = arr.shape[axis] * local_mesh.devices.size // arr.sharding.mesh.size
    return tuple(shape)


def process_rows(batch_size: int, n_micro: int, count: int, index: int) -> np.ndarray:
    """The rows of a global batch that process ``index`` of ``count`` reads: its share of each
    micro-batch, in micro-batch order (the order the step splits them back in)."""
    micro = batch_size // n_micro
    rows = micro // count
    return np.concatenate(
        [
            np.arange(m * micro + index * rows, m * micro + (index + 1) * rows)
            for m in range(n_micro)
        ]
    )
