"""``StreamingEngine``: the public API of weight-streaming training.

    engine = StreamingEngine(model, config)            # or params=..., opt_state=..., step=...
    metrics = engine.train_step(batch)                 # numpy batch from the loader
    metrics = engine.eval_step(batch)
    engine.params_tree(), engine.opt_state_tree()      # host state, for checkpoints
    StreamingEngine(model, config, train=False)        # eval only: no optimizer state
    streaming.disk_path: master and optimizer state in files (wsjax.engine.disk_store)

Reading order for one training step: this file builds the parts (where things live:
:mod:`~wsjax.engine.placement`; the host store: :mod:`~wsjax.engine.store`; the compiled
executables of a batch shape: :mod:`~wsjax.engine.executables`) and hands them to the step
(:mod:`~wsjax.engine.step`), which streams every segment through them and updates the store.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from wsjax.engine.compile_cache import ExecutableCache, source_digest
from wsjax.engine.disk_store import (
    DiskStore,
    store_segments,
)
from wsjax.engine.executables import StepExecutables
from wsjax.engine.placement import Placement
from wsjax.engine.segments import SegmentFunctions
from wsjax.engine.shards import global_mesh_devices
from wsjax.engine.step import EvalStep, TrainStep
from wsjax.engine.store import HostStore
from wsjax.engine.transfer import Residency
from wsjax.errors import ConfigError
from wsjax.losses import loss_normalizer
from wsjax.optim import learning_rate_schedule, make_optimizer
from wsjax.precision import at_least_f32
from wsjax.reference import step_key


def default_mesh(devices=None) -> Mesh:
    """A 1-D ``data`` mesh over all devices: this process's, or with several processes
    (``jax.distributed``) every process's, grouped by process."""
    if devices is None:
        devices = global_mesh_devices() if jax.process_count() > 1 else jax.local_devices()
    return Mesh(np.asarray(devices), ("data",))


def layerwise_init(model, shards=None):
    """The engine's init of ``model`` (a function of the PRNG key, to jit): built layer by
    layer, so its scratch is one layer's, where building all layers at once needed 1.7x the
    weights' bytes (38.5 GiB for GPT-J 6B; benchmarks/bench_init.py). With ``shards``
    (several processes), each layer is cut to this process's slices as it is built, so no
    process ever holds the whole model. The values are the whole init's, bitwise."""
    take = (lambda tree: tree) if shards is None else shards.cut
    return lambda key: model.init(key, take)


class StreamingEngine:
    """Trains (or, with ``train=False``, evaluates) ``model`` by weight streaming on ``mesh``."""

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
        train: bool = True,
        disk_owner: str | None = None,
    ):
        self.model = model
        self.config = config
        self.mesh = mesh or default_mesh()
        self.step = int(step)
        self.seed = int(config.runconfig.seed)
        self.training = train
        # fp32 master and gradients whatever the compute dtype (float64 under jax_enable_x64
        # with a float64 model: the exactness tests)
        self.master_dtype = at_least_f32(model.compute_dtype)
        self.optimizer = make_optimizer(config.optimizer)
        self.lr_schedule = learning_rate_schedule(config.optimizer)
        self.placement = Placement.create(self.mesh, config.streaming)
        if self.placement.shards is not None and not self.placement.optimizer_on_host:
            raise ConfigError(
                f"{config.source}: streaming.optimizer_placement: device is not supported with "
                f"{jax.process_count()} processes (each process updates its slice on the host); "
                "use host"
            )
        self.functions = SegmentFunctions(
            model,
            self.optimizer if train else None,
            model.compute_dtype,
            config.streaming.recompute_policy,
        )
        self.cache = ExecutableCache(context=self._cache_context())
        self.residency = Residency()  # the engine's own ledger of device bytes (benchmarks)
        self._executables: dict[tuple, StepExecutables] = {}
        self._steps: dict[tuple, TrainStep | EvalStep] = {}
        self.store: HostStore | None = None
        if allocate and train and config.streaming.disk_path:
            self.store = self._disk_store(params, opt_state, disk_owner)
        elif allocate:
            whole = None
            if params is None:
                params, whole = self._init_params()
            self.store = HostStore.create(
                params,
                model.num_layers,
                self.optimizer if train else None,
                self.placement.host,
                self.placement.stream,
                model.compute_dtype,
                opt_state=opt_state,
                shards=self.placement.shards,
                whole=whole,
            )

    def _disk_store(self, params, opt_state: dict | None, owner: str | None) -> DiskStore:
        """Master and optimizer state in the files of ``streaming.disk_path`` (wsjax.engine.disk),
        claimed for ``owner`` (the run: its model_dir; by default the config's source); fresh
        weights (``params`` None), and a disk-tier checkpoint's (``params`` a SegmentStates),
        go into the tier one segment at a time. With several processes each keeps its slices in
        its own folder, ``<disk_path>/process-<index>``."""
        c, shards = self.config, self.placement.shards
        grads_to = None
        if c.streaming.disk_gradients:
            if not self.placement.optimizer_on_host:
                raise ConfigError(
                    f"{c.source}: streaming.disk_gradients needs streaming.optimizer_placement: "
                    "host (a device update keeps the gradients on the device)"
                )
            grads_to = self.placement.update
        key = jax.random.PRNGKey(self.seed)
        segments, full = store_segments(
            self.model, self.optimizer, params, opt_state, key, self.placement.host, shards
        )
        folder = Path(c.streaming.disk_path)
        if shards is not None:  # each process its own folder, its own slices
            folder = folder / f"process-{shards.index}"
            owner = f"{owner or f'config {c.source}'}, process {shards.index}"
        return DiskStore.create(
            segments,
            self.model.num_layers,
            self.optimizer,
            self.placement.host,
            self.placement.stream,
            self.model.compute_dtype,
            folder=folder,
            owner=owner or f"config {c.source}",
            grads_to=grads_to,
            shards=shards,
            full=full,
            disk_stream=c.streaming.disk_stream,
        )

    def _init_params(self) -> tuple[dict, dict | None]:
        """One compiled :func:`layerwise_init`, straight into host memory: (params, None);
        with several processes, this process's slices and the whole tree's shapes."""
        shards = self.placement.shards
        init = jax.jit(layerwise_init(self.model, shards), out_shardings=self.placement.host)
        params = init(jax.random.PRNGKey(self.seed))
        return params, (None if shards is None else self.model.param_shapes())

    @property
    def replicated(self):
        """The sharding of weights on every device (callers warm the link with it)."""
        return self.placement.replicated

    def _cache_context(self) -> str:
        """What the on-disk executables depend on beyond their shapes (see ExecutableCache)."""
        c = self.config
        devices = [(d.platform, d.device_kind) for d in self.mesh.devices.flat]
        parts = (c.model, c.optimizer, c.streaming, c.runconfig.seed, devices, jax.__version__)
        parts += (str(self.master_dtype),)
        return f"{parts!r}|{source_digest()}"

    # ---- public API ----------------------------------------------------------------------
    def train_step(self, batch: dict) -> dict:
        """One optimizer step on a global batch (numpy dict); returns float metrics.

        ``train/update_skipped`` is 1.0 when the loss or the global gradient norm was not
        finite: then no segment was updated; ``engine.step`` advances either way.
        """
        if not self.training:
            raise ValueError("this engine was built with train=False: it cannot train_step")
        t0 = time.perf_counter()
        train = self._step(self.global_shape(batch), train=True)
        key = self._step_key(self.step)
        denom = self._denominator(np.asarray(batch["loss_mask"], np.float64))
        metrics = train.run(self.store, batch, key, denom)
        metrics["train/lr"] = float(self.lr_schedule(self.step))
        self.step += 1
        metrics["step_seconds"] = time.perf_counter() - t0
        metrics["memory/device_peak_bytes"] = float(self.residency.peak)
        return metrics

    def _step_key(self, step: int) -> jax.Array:
        """The step's dropout key, computed on the mesh's first device (not JAX's default
        device, which need not be in the mesh), then on every device."""
        with jax.default_device(self.placement.first or jax.devices()[0]):
            key = step_key(self.seed, step)
        return jax.device_put(key, self.placement.replicated)

    def global_shape(self, batch: dict) -> tuple[int, int]:
        """(batch size, sequence length) of the global batch: with several processes ``batch``
        holds this process's rows only (:func:`~wsjax.engine.shards.process_rows`)."""
        rows, seq = batch["input_ids"].shape
        shards = self.placement.shards
        return (rows * (shards.count if shards is not None else 1), seq)

    def _denominator(self, loss_mask: np.ndarray) -> float:
        """The global batch's loss denominator; with several processes ``loss_mask`` holds this
        process's rows, so the count is summed over the processes."""
        if self.placement.shards is None:
            return float(loss_normalizer(self.config.model, loss_mask))
        parts = np.asarray(loss_mask.sum(axis=1), np.float32)  # token counts: exact
        rows = np.asarray(multihost_utils.process_allgather(parts)).reshape(-1)
        return float(loss_normalizer(self.config.model, rows[:, None]))

    def eval_step(self, batch: dict) -> dict:
        """Forward-only: summed loss, token count and correct predictions of the batch."""
        evaluate = self._step(self.global_shape(batch), train=False)
        key = self._step_key(0)
        return evaluate.run(self.store, batch, key)

    def save_checkpoint(self, ckpts, step: int, meta: dict):
        """Write this engine's state as checkpoint ``step`` of ``ckpts`` (wsjax.checkpoint's
        Checkpoints): a disk-tier store segment by segment, never whole in memory (with several
        processes, each its own slices' files)."""
        if isinstance(self.store, DiskStore):
            return ckpts.save_segments(step, self.store, meta)
        return ckpts.save(step, self.params_tree(), self.opt_state_tree(), meta)

    def params_tree(self) -> dict:
        return self.store.params_tree()

    def opt_state_tree(self) -> dict:
        return self.store.opt_state_tree()

    def compile(self, batch_shape: tuple[int, int], *, train: bool = True) -> list:
        """Compile the executables of a training (or eval) step of ``batch_shape`` without
        allocating weights; return the compile log (all executables compiled so far)."""
        self._step(tuple(batch_shape), train=train)
        return [r.to_dict() for r in self.cache.records]

    @property
    def num_executables(self) -> int:
        return self.cache.count

    def executables(self, batch_shape, *, train: bool) -> StepExecutables:
        """The executables of a step of ``batch_shape`` (``n_micro``, ``seg_bytes``, ...);
        nothing compiles until a method of it is called."""
        batch_size, seq = int(batch_shape[0]), int(batch_shape[1])
        key = (batch_size, seq, train)
        if key not in self._executables:
            n_micro = self.config.micro_batches(batch_size, train=train)
            micro = batch_size // n_micro
            if micro % self.placement.num_devices:
                raise ConfigError(
                    f"{self.config.source}: micro-batch size {micro} is not divisible by the "
                    f"{self.placement.num_devices} devices of the data mesh"
                )
            self._executables[key] = StepExecutables(
                self.functions,
                self.cache,
                self.placement,
                n_micro=n_micro,
                micro=micro,
                seq=seq,
                master_dtype=self.master_dtype,
            )
        return self._executables[key]

    def _step(self, batch_shape, *, train: bool) -> TrainStep | EvalStep:
        """The train (or eval) step of ``batch_shape``, its executables compiled."""
        key = (int(batch_shape[0]), int(batch_shape[1]), train)
        if key not in self._steps:
            executables = self.executables(batch_shape, train=train)
            streaming = self.config.streaming
            if train:
                max_norm = self.config.optimizer.max_gradient_norm
                self._steps[key] = TrainStep(
                    executables,
                    self.placement,
                    self.residency,
                    streaming_cfg=streaming,
                    max_norm=max_norm,
                )
            else:
                self._steps[key] = EvalStep(
                    executables, self.placement, self.residency, streaming_cfg=streaming
                )
        return self._steps[key]
