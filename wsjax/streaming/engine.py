"""``StreamingEngine``: the public API of weight-streaming training.

    engine = StreamingEngine(model, config)            # or params=..., opt_state=..., step=...
    metrics = engine.train_step(batch)                 # numpy batch from the loader
    metrics = engine.eval_step(batch)
    engine.params_tree(), engine.opt_state_tree()      # host state, for checkpoints

fp32 master weights and optimizer state stay on the host (:mod:`wsjax.streaming.store`); each
step streams every segment's compute-dtype copy through one compiled function per segment kind
(:mod:`wsjax.streaming.executables`) in the order of :mod:`wsjax.streaming.scheduler`.
"""

from __future__ import annotations

import functools
import hashlib
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from wsjax.errors import ConfigError
from wsjax.optim import clip_factor, global_norm_from_sq, learning_rate_schedule, make_optimizer
from wsjax.streaming.executables import ExecutableCache, SegmentFunctions
from wsjax.streaming.scheduler import StepProgram
from wsjax.streaming.store import HostStore
from wsjax.streaming.transfer import Residency


def default_mesh(devices=None) -> Mesh:
    """A 1-D ``data`` mesh over all local devices."""
    devices = devices if devices is not None else jax.local_devices()
    return Mesh(np.asarray(devices), ("data",))


def num_micro_batches(config, batch_size: int) -> int:
    mbs = config.streaming.micro_batch_size
    n = batch_size // mbs if mbs else config.optimizer.grad_accum_steps
    if n < 1 or batch_size % n:
        raise ConfigError(
            f"{config.source}: batch_size {batch_size} is not divisible into {n} micro-batches "
            "(optimizer.grad_accum_steps / streaming.micro_batch_size)"
        )
    return n


class StreamingEngine:
    """Trains ``model`` by weight streaming on ``mesh`` (default: all local devices)."""

    def __init__(
        self,
        model,
        config,
        *,
        mesh: Mesh | None = None,
        params: dict | None = None,
        opt_state: dict | None = None,
        step: int = 0,
        allocate: bool = True,
    ):
        self.model = model
        self.config = config
        self.mesh = mesh or default_mesh()
        self.step = int(step)
        self.seed = int(config.runconfig.seed)
        s = config.streaming
        self.prefetch_depth = int(s.prefetch_depth)
        self.activation_offload = bool(s.activation_offload)
        self.recompute = bool(s.recompute)
        self.optimizer_placement = s.optimizer_placement
        self.compute_dtype = model.compute_dtype
        self.max_norm = config.optimizer.max_gradient_norm
        self.optimizer = make_optimizer(config.optimizer)
        self.lr_schedule = learning_rate_schedule(config.optimizer)

        # Where things live. The host compute device runs the host update; the stream copy
        # sits in the accelerator's host memory kind when it has one (DMA-able), else there.
        dev0 = self.mesh.devices.flat[0]
        self.host_device = jax.devices("cpu")[0]
        self.host = SingleDeviceSharding(self.host_device)
        kinds = {m.kind for m in dev0.addressable_memories()}
        kind = s.host_memory_kind if s.host_memory_kind in kinds else None
        self.stream_sharding = SingleDeviceSharding(dev0, memory_kind=kind)
        self.act_host = NamedSharding(self.mesh, P("data"), memory_kind=kind)
        self.replicated = NamedSharding(self.mesh, P())
        self.data_sharding = NamedSharding(self.mesh, P("data"))
        self._update_writes_stream = dev0.platform == self.host_device.platform

        self.fns = SegmentFunctions(model, self.optimizer, self.compute_dtype)
        self.cache = ExecutableCache(context=self._cache_context())
        self.residency = Residency()
        self._programs: dict = {}
        self.store: HostStore | None = None
        if allocate:
            if params is None:  # one compiled init, straight into host memory
                init = jax.jit(model.init, out_shardings=self.host)
                params = init(jax.random.PRNGKey(self.seed))
            self.store = HostStore.create(
                params,
                model.num_layers,
                self.optimizer,
                self.host,
                self.stream_sharding,
                self.compute_dtype,
                opt_state=opt_state,
            )

    def _cache_context(self) -> str:
        """What the on-disk executables depend on beyond their shapes (see ExecutableCache)."""
        c = self.config
        devices = [(d.platform, d.device_kind) for d in self.mesh.devices.flat]
        parts = (c.model, c.optimizer, c.streaming, c.runconfig.seed, devices, jax.__version__)
        return f"{parts!r}|{_source_digest()}"

    # ---- public API ----------------------------------------------------------------------
    def train_step(self, batch: dict) -> dict:
        """One optimizer step on a global batch (numpy dict); returns float metrics."""
        t0 = time.perf_counter()
        program = self.program(batch["input_ids"].shape, train=True)
        metrics = program.train(self.store, batch, self.step)
        metrics["train/lr"] = float(self.lr_schedule(self.step))
        self.step += 1
        metrics["step_seconds"] = time.perf_counter() - t0
        metrics["memory/device_peak_bytes"] = float(self.residency.peak)
        return metrics

    def eval_step(self, batch: dict) -> dict:
        """Forward-only: summed loss, token count and correct predictions of the batch."""
        program = self.program(batch["input_ids"].shape, train=False)
        return program.evaluate(self.store, batch)

    def params_tree(self) -> dict:
        return self.store.params_tree()

    def opt_state_tree(self) -> dict:
        return self.store.opt_state_tree()

    def compile(self, batch_shape: tuple[int, int], *, train: bool = True) -> list:
        """Compile the executables of a training (or eval) step of ``batch_shape`` without
        allocating weights; return the compile log (all executables compiled so far)."""
        self.program(tuple(batch_shape), train=train).compile_all()
        return [r.to_dict() for r in self.cache.records]

    @property
    def num_executables(self) -> int:
        return self.cache.count

    def program(self, batch_shape, *, train: bool) -> StepProgram:
        batch_size, seq = int(batch_shape[0]), int(batch_shape[1])
        n_micro = num_micro_batches(self.config, batch_size) if train else 1
        if not train:
            n_micro = max(1, _eval_micro(self.config, batch_size))
        micro = batch_size // n_micro
        ndev = self.mesh.devices.size
        if micro % ndev:
            raise ConfigError(
                f"{self.config.source}: micro-batch size {micro} is not divisible by the "
                f"{ndev} devices of the data mesh"
            )
        key = (batch_size, seq, train)
        if key not in self._programs:
            self._programs[key] = StepProgram(self, n_micro, micro, seq, train)
        return self._programs[key]

    def step_key(self, step: int) -> jax.Array:
        return jax.device_put(
            jax.random.fold_in(jax.random.PRNGKey(self.seed), step), self.replicated
        )

    def clip_scale(self, sqnorms: list) -> tuple[float, jax.Array]:
        """Exact global norm from the per-segment squared norms, and the clip factor."""
        g_norm = global_norm_from_sq(sqnorms)
        return float(g_norm), clip_factor(g_norm, self.max_norm)


def _eval_micro(config, batch_size: int) -> int:
    """Eval uses the training micro-batch size when it divides the eval batch."""
    mbs = config.streaming.micro_batch_size
    if mbs and batch_size % mbs == 0:
        return batch_size // mbs
    return 1


@functools.cache
def _source_digest() -> str:
    """Digest of wsjax's own sources: an edit to them invalidates serialized executables."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
    return h.hexdigest()
