"""Where each thing of a streamed step lives, decided once per engine.

    host              the host compute device: fp32 master weights, optimizer state, host update
    stream            the compute-dtype copy that crosses the link: in the accelerator's host
                      memory kind (``pinned_host``) when it has one, so the copy is DMA-able
    replicated        weights, gradients and scalars on every device of the data mesh
    data              tokens, activations and their gradients, sharded over the ``data`` axis
    activation_host   kept block inputs / residuals offloaded to host memory (activation_offload)
    update            where the optimizer update runs: ``host``, or the devices (``device``)

Nothing here allocates; the engine builds one :class:`Placement` and hands it down.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
from jax.sharding import Mesh, NamedSharding, Sharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from wsjax.engine.shards import ProcessShards


@dataclass(frozen=True)
class Placement:
    mesh: Mesh
    host: SingleDeviceSharding
    stream: SingleDeviceSharding
    replicated: NamedSharding
    data: NamedSharding
    activation_memory_kind: str | None  # None: the accelerator has no host memory kind
    optimizer_on_host: bool
    update_writes_stream: bool  # the host update emits the stream copy in its final place
    shards: ProcessShards | None = None  # several processes: each host holds 1/P (shards.py)

    @classmethod
    def create(cls, mesh: Mesh, streaming_cfg) -> Placement:
        # this process's first device and CPU device (with several processes, the mesh also
        # holds the others' devices)
        index = jax.process_index()
        first = next(d for d in mesh.devices.flat if d.process_index == index)
        host_device = jax.local_devices(backend="cpu")[0]
        kinds = {m.kind for m in first.addressable_memories()}
        kind = streaming_cfg.host_memory_kind if streaming_cfg.host_memory_kind in kinds else None
        on_host = streaming_cfg.optimizer_placement == "host"
        # On a CPU-only machine the host update can write the stream copy directly; with an
        # accelerator the copy moves into its host memory kind with one device_put.
        same_platform = first.platform == host_device.platform
        return cls(
            mesh=mesh,
            host=SingleDeviceSharding(host_device),
            stream=SingleDeviceSharding(first, memory_kind=kind),
            replicated=NamedSharding(mesh, P()),
            data=NamedSharding(mesh, P("data")),
            activation_memory_kind=kind,
            optimizer_on_host=on_host,
            update_writes_stream=on_host and same_platform,
            shards=ProcessShards.create(mesh) if jax.process_count() > 1 else None,
        )

    @property
    def update(self) -> Sharding:
        """Where master weights, optimizer state and gradients meet for the update."""
        return self.host if self.optimizer_on_host else self.replicated

    @property
    def update_output(self) -> Sharding:
        """Where the update's stream-copy output lands."""
        return self.stream if self.update_writes_stream else self.update

    @property
    def num_devices(self) -> int:
        return int(self.mesh.devices.size)

    def offloaded(self, sharding: Sharding) -> Sharding:
        """``sharding`` moved to host memory (unchanged where there is no host memory kind)."""
        kind = self.activation_memory_kind
        return sharding.with_memory_kind(kind) if kind else sharding
