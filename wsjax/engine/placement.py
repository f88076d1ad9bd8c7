"""Where each thing of a streamed step lives, decided once per engine.

    host              fp32 master weights and optimizer state: in the memory kind
                      ``streaming.host_memory_kind`` (``pinned_host``) of this process's first
                      device, so every move to and from the device is a DMA and nothing on a
                      step's path crosses to JAX's CPU client (DESIGN.md, "Where host state
                      lives on a GPU"). Without that memory kind, and with several processes
                      (wsjax.engine.shards), the CPU client's device.
    stream            the compute-dtype copy that crosses the link: beside ``host``
    replicated        weights, gradients and scalars on every device of the data mesh
    data              tokens, activations and their gradients, sharded over the ``data`` axis
    activation_host   kept block inputs / residuals offloaded to host memory (activation_offload)
    update            where the optimizer update runs (``streaming.optimizer_placement``):
                      ``host``: on the host, through ``compute_on('device_host')`` on the
                      pinned_host state; ``device``: on the first device, master and moments
                      streamed in from pinned_host and back inside the update executable, the
                      gradient never leaving the device

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
    first: jax.Device | None = None  # this process's first device of the mesh
    pinned: bool = False  # host state in ``first``'s host memory kind (no CPU-client crossing)

    @property
    def host_compute(self) -> bool:
        """The host update runs under ``compute_on('device_host')`` on pinned_host operands."""
        home = self.first.default_memory().kind if self.first is not None else None
        return self.pinned and self.optimizer_on_host and self.host.memory_kind != home

    @property
    def device_memory(self) -> SingleDeviceSharding:
        """``first``'s own (device) memory: where a device update computes."""
        return SingleDeviceSharding(self.first, memory_kind=self.first.default_memory().kind)

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
        pinned = kind is not None and jax.process_count() == 1
        host = SingleDeviceSharding(first, memory_kind=kind) if pinned else None
        # Otherwise the CPU client holds the state: on a CPU-only machine the host update
        # writes the stream copy directly; with an accelerator it moves with one device_put.
        same_platform = first.platform == host_device.platform
        return cls(
            mesh=mesh,
            host=host or SingleDeviceSharding(host_device),
            stream=SingleDeviceSharding(first, memory_kind=kind),
            replicated=NamedSharding(mesh, P()),
            data=NamedSharding(mesh, P("data")),
            activation_memory_kind=kind,
            optimizer_on_host=on_host,
            update_writes_stream=pinned or (on_host and same_platform),
            shards=ProcessShards.create(mesh) if jax.process_count() > 1 else None,
            first=first,
            pinned=pinned,
        )

    @property
    def update(self) -> Sharding:
        """Where the update's gradients, scale and outputs are: the host state's place, or for
        a device update ``first``'s own memory (pinned state streams in and out inside it)."""
        if self.optimizer_on_host:
            return self.host
        return self.device_memory if self.pinned else self.replicated

    def on_first(self, tree):
        """``first``'s shard of each replicated array of ``tree``: a view, no copy."""
        if self.num_devices == 1:
            return tree
        take = lambda a: next(s.data for s in a.addressable_shards if s.device == self.first)  # noqa: E731
        return jax.tree.map(take, tree)

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
