"""What a run is built from, and the pieces every mode shares: the run's fixed parts
(:class:`RunSpec`), its result (:class:`RunResult`), the memory plan, compiling, the step
estimate and the engine holding the starting weights.

A :class:`RunSpec` holds what stays fixed for one run (config, mode, model_dir, model, optimizer,
options, batch shape, compile dir), built in one place by :func:`make_spec`; every function below
takes what it needs and returns what it produced, so nothing can be called in the wrong order.
Everything user-visible goes through the ``wsjax.train`` logger in the Cerebras run.py wording.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import yaml

from wsjax.checkpoint import StartState, restore_newest_good
from wsjax.config.schema import Config, InputConfig
from wsjax.data.loader import BUILTIN_STDLIB, make_loader
from wsjax.data.validate import check_data_vocab
from wsjax.distributed import is_main_process
from wsjax.engine import StreamingEngine, make_plan
from wsjax.engine.disk import run_owner, tier_space
from wsjax.engine.estimate import device_peaks, estimate_step_seconds, measure_step_times
from wsjax.engine.plan import GiB, available_host_bytes, device_budget
from wsjax.engine.shards import process_rows
from wsjax.engine.store import opt_state_shapes
from wsjax.errors import ConfigError, WsjaxError
from wsjax.fileio import atomic_write_text
from wsjax.interop.load import load_start
from wsjax.models import get_model
from wsjax.optim import make_optimizer
from wsjax.trainer.metrics import Performance
from wsjax.trainer.options import RunOptions
from wsjax.trainer.resume import check_resume
from wsjax.trainer.run_dir import (
    ModelDir,
    backend_signature,
    compile_checksum,
    compile_root,
    write_compile_log,
)

log = logging.getLogger("wsjax.train")


@dataclass
class RunResult:
    mode: str
    model_dir: Path
    global_step: int = 0
    final_loss: float | None = None
    samples_per_sec: float = 0.0
    total_samples: int = 0
    total_time: float = 0.0
    compile_time: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) every step
    skipped_steps: list[int] = field(default_factory=list)  # updates skipped (non-finite)
    evals: list[dict] = field(default_factory=list)  # step, batches, loss, perplexity, accuracy
    checkpoints: list[Path] = field(default_factory=list)
    compile_dir: Path | None = None
    performance_path: Path | None = None
    plan_path: Path | None = None
    message: str = ""


@dataclass(frozen=True)
class RunSpec:
    """What stays fixed for one run; built by :func:`make_spec`."""

    config: Config
    mode: str
    md: ModelDir
    options: RunOptions
    model: object  # a wsjax.models family (the segment protocol)
    optimizer: object  # an optax GradientTransformation
    training: bool
    input: InputConfig  # the mode's input section: train_input, or eval_input for eval modes
    shape: tuple[int, int]  # (batch, seq) of ``input``
    compile_dir: Path

    def result(self, **values) -> RunResult:
        return RunResult(self.mode, self.md.path, compile_dir=self.compile_dir, **values)


def disk_error(e: OSError, where: Path) -> WsjaxError | OSError:
    """A full or read-only disk, or a path under a file, as one line naming the path and the
    errno; any other OSError stays a bug (traceback)."""
    if e.errno in WRITE_ERRNOS:
        return WsjaxError(
            f"{e.filename or where}: cannot write ({e.strerror}, {errno.errorcode[e.errno]}); "
            f"free space in {where} or fix the path, and rerun: the saved checkpoints are intact"
        )
    return e


WRITE_ERRNOS = (
    errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.EACCES
)  # fmt: skip


def make_spec(config, mode: str, md, options: RunOptions) -> RunSpec:
    """Build the fixed parts of a run (model, optimizer, shapes, compile dir): no arrays yet."""

    training = mode in ("train", "train_and_eval")
    sections = ["train_input"] if training else ["eval_input"]
    if mode == "train_and_eval":
        sections.append("eval_input")
    if options.eval_text is not None and config.eval_input is None:
        sections = ["train_input"]  # --eval_text takes only the batch and window shape
    for section in sections:
        if getattr(config, section) is None:
            raise ConfigError(f"{config.source}: mode {mode} needs a {section} section")
    inp = getattr(config, sections[0])
    shape = (int(inp.batch_size), int(inp.max_sequence_length))
    checksum = compile_checksum(config, {"train" if training else "eval": shape})
    root = compile_root(options.compile_dir, config.runconfig.compile_dir)
    return RunSpec(
        config=config,
        mode=mode,
        md=md,
        options=options,
        model=get_model(config.model),
        optimizer=make_optimizer(config.optimizer),
        training=training,
        input=inp,
        shape=shape,
        compile_dir=md.compile_dir(checksum, root),
    )


def process_rows_of(config, batch_size: int, *, train: bool):
    """The rows of each global batch this process reads (None with one process)."""

    count = jax.process_count()
    if count == 1:
        return None
    n_micro = config.micro_batches(int(batch_size), train=train)
    if (int(batch_size) // n_micro) % count:
        section = "train_input" if train else "eval_input"
        raise ConfigError(
            f"{config.source}: {section}.batch_size {batch_size} in {n_micro} micro-batches "
            f"does not split over {count} processes; give a batch size whose micro-batch is a "
            f"multiple of {count}"
        )
    return process_rows(int(batch_size), n_micro, count, jax.process_index())


def write_effective_config(md, config, training: bool) -> None:
    if not is_main_process():  # process 0 writes the run's files
        return
    split_dir = md.train_dir if training else md.eval_dir
    split_dir.mkdir(parents=True, exist_ok=True)
    name = "params_train.yaml" if training else "params_eval.yaml"
    atomic_write_text(split_dir / name, yaml.safe_dump(config.to_dict(), sort_keys=False))


# ---- plan, validate_only, compile_only ----------------------------------------------------------
def plan_run(r: RunSpec, records: list[dict] | None = None, *, strict: bool):
    """Make the memory plan (from compile records once there are some), write plan.json, log
    it the first time, and check it: ``strict`` raises PlanError (exit 3), otherwise a warning.

    The plan is against ``streaming.device_memory_gb`` / ``host_memory_gb`` when given (one
    accelerator of that target, with separate device and host memory, whatever this machine
    is), else against this machine."""

    s, dev = r.config.streaming, jax.devices()[0]
    target = s.device_memory_gb is not None or s.host_memory_gb is not None
    if target:
        platform, n_devices = "gpu", (jax.device_count() if dev.platform != "cpu" else 1)
        device_avail = device_budget(s)  # the target's device: unchecked unless given
        host_avail = int(s.host_memory_gb * GiB) if s.host_memory_gb else None
    else:
        platform, n_devices = dev.platform, jax.device_count()
        device_avail, host_avail = device_budget(s, dev), available_host_bytes()
    # this run's processes, or (--validate_only --num_processes P) the P of a run to plan
    processes = r.options.planning_processes or jax.process_count()
    n_devices = max(1, n_devices // jax.process_count()) * processes
    disk_free = tier_space(s.disk_path, run_owner(r.md.path)) if s.disk_path else None
    plan = make_plan(
        r.model,
        r.config,
        r.optimizer,
        batch_size=r.shape[0],
        seq=r.shape[1],
        n_micro=r.config.micro_batches(r.shape[0], train=r.training),
        n_devices=n_devices,
        platform=platform,
        compile_records=records,
        host_available=host_avail,
        device_available=device_avail,
        train=r.training,
        input_prefetch=int(r.input.prefetch_factor) * int(r.input.num_workers),
        processes=processes,
        disk_available=disk_free,
    )
    if target:
        plan.notes.append("planned against streaming.device_memory_gb / host_memory_gb")
    if plan.fits_only_with_tier():
        plan.notes.append(f"fits only with the disk tier (streaming.disk_path): without it the "
                          f"host needs {plan.host_without_tier / GiB:.2f} GiB")  # fmt: skip
    if is_main_process():  # process 0 writes the run's files, atomically
        atomic_write_text(r.md.plan_json, json.dumps(plan.to_dict(), indent=2) + "\n")
    if records is None:
        log.info("%s", plan.summary())
    try:
        plan.check()
    except WsjaxError as e:
        if strict:
            raise
        log.warning("%s: %s", "on the target" if target else "on this machine", e)
    return plan


def validate_only(r: RunSpec) -> RunResult:
    """``--validate_only``: config and shapes valid and the plan written; nothing compiled. A
    plan that does not fit is the verdict: PlanError, exit 3, naming the shortfall and knob.
    Data whose vocabulary the model cannot hold is refused first (one line, exit 2); data that
    is not on this machine is named in a warning, and the plan goes on."""
    sections = {"train_input": "train", "eval_input": "eval"}
    reads = ["train_input"] if r.training else ["eval_input"]
    if r.mode == "train_and_eval":
        reads.append("eval_input")
    for section in reads:
        if (inp := getattr(r.config, section)) is None:
            continue
        missing = [d for d in data_dirs(inp) if d != BUILTIN_STDLIB and not Path(d).exists()]
        if missing:  # planning on a machine without the data: the plan still holds
            log.warning("%s.data_dir %s is not here: its data is not checked", section, missing[0])
            continue
        check_data_vocab(inp, r.config.model.vocab_size, split=sections[section])
    plan = plan_run(r, strict=True)
    result = r.result(plan_path=r.md.plan_json)
    result.compile_dir = None
    result.message = "validate_only: config, shapes and data vocabulary valid, the plan fits"
    if plan.fits_only_with_tier():
        result.message += " only with the disk tier (streaming.disk_path)"
    log.info("%s", result.message)
    return result


def compile_only(r: RunSpec) -> RunResult:
    """``--compile_only``: every executable compiled into the compile dir, plan and estimate."""

    plan_run(r, strict=False)
    engine = StreamingEngine(r.model, r.config, allocate=False)
    records, compile_time = compile_engine(r, engine)
    plan_run(r, records, strict=False)
    est, peaks = estimate(r, engine, records)
    Performance(
        compile_time=compile_time,
        est_samples_per_sec=est,
        peak_flops=peaks.flops,
        h2d_bandwidth=peaks.h2d_bandwidth,
        peaks_source=peaks.source,
    ).write(r.md.performance_json)
    result = r.result(compile_time=compile_time, plan_path=r.md.plan_json)
    result.performance_path = r.md.performance_json
    result.message = f"compile_only: executables compiled into {r.compile_dir}"
    log.info("%s", result.message)
    return result


# ---- pieces the modes share ---------------------------------------------------------------------
def compile_engine(r: RunSpec, engine) -> tuple[list[dict], float]:
    """Compile the mode's executables; write compile_log.json; (records, seconds)."""

    t0 = time.perf_counter()
    records = engine.compile(r.shape, train=r.training)
    seconds = time.perf_counter() - t0
    extra = {"compile_time": seconds, "batch_shape": list(r.shape)}
    write_compile_log(r.compile_dir, records, {**extra, **backend_signature()})
    log.info(
        "Compiled %d executables in %.2f seconds (cache: %s)", len(records), seconds, r.compile_dir
    )
    return records, seconds


def estimate(r: RunSpec, engine, records: list[dict]):
    """(estimated samples/s of a training step, the device peaks): each compiled executable and
    each transfer timed once on the device, combined by the step's schedule (see
    ``wsjax.engine.estimate.estimate_step_seconds``); the peaks are what MFU is measured against."""

    peaks = device_peaks()
    executables = engine.executables(r.shape, train=True)
    train_set = executables.training(recompute=bool(r.config.streaming.recompute))  # cache hits
    times = measure_step_times(executables, train_set, engine.placement)
    overlap = jax.devices()[0].platform != "cpu"  # a CPU's "transfers" are its own copies
    step_s = estimate_step_seconds(
        times, num_layers=r.model.num_layers, n_micro=executables.n_micro, overlap=overlap
    )
    log.info("estimated step: %.4f s from timed executables and transfers", step_s)
    return (r.shape[0] / step_s if step_s > 0 else 0.0), peaks


def build_engine(r: RunSpec, start):
    """The engine holding ``start``'s weights (or fresh ones); (engine, init s, programming s)."""

    t0 = time.perf_counter()
    engine = StreamingEngine(
        r.model,
        r.config,
        params=start.params,
        opt_state=start.opt_state if r.training else None,
        step=start.step,
        train=r.training,  # eval modes: no optimizer state, no gradient buffers
        disk_owner=run_owner(r.md.path),
    )
    init_s = time.perf_counter() - t0
    # the first weights in, as a step streams them
    first = engine.executables(r.shape, train=r.training).broadcast(
        "embed", engine.store.stream["embed"]
    )
    jax.block_until_ready(first)
    programming_s = time.perf_counter() - t0
    where = jax.devices()[0].platform.upper()
    if start.source is None:
        log.info("Completed weight initialization on %s in: %.3f seconds", where, init_s)
    else:
        log.info("Restored weights from %s in: %.3f seconds", start.source, init_s)
    return engine, init_s, programming_s


def log_header(r: RunSpec) -> None:
    log.info(
        "%s: %s %s, %.2fM parameters, batch %d x %d, on %d %s device(s)",
        r.config.source,
        r.mode,
        r.config.model.family,
        r.model.num_params() / 1e6,
        *r.shape,
        jax.device_count(),
        jax.devices()[0].platform,
    )


def open_train_loader(r: RunSpec, loader_state: dict | None):
    """The train data from ``loader_state`` (None: the start). Training runs to max_steps (as
    on Cerebras), so the train data always wraps around; ``repeat: false`` is for evaluation."""
    return make_loader(
        dataclasses.replace(r.config.train_input, repeat=True),
        split="train",
        model_vocab_size=r.config.model.vocab_size,
        seed=r.config.runconfig.seed,
        start_state=loader_state,
        rows=process_rows_of(r.config, r.config.train_input.batch_size, train=True),
    )


def resolve_start(r: RunSpec, ckpts):
    """Where training starts: --checkpoint_path, else the newest good checkpoint in model_dir
    (a corrupt newer one is set aside with a warning), else fresh weights; a resume whose data
    position the config no longer honours is refused (wsjax.trainer.resume)."""
    start = _find_start(r, ckpts)
    check_resume(start, r.config, r.options.allow_data_position_change)
    return start


def _find_start(r: RunSpec, ckpts):
    opts = r.options
    lazy = bool(r.training and r.config.streaming.disk_path)  # a disk-tier checkpoint: by segment
    steps = ckpts.steps()
    if opts.checkpoint_path is not None:
        if steps:
            last, path = steps[-1], opts.checkpoint_path
            log.warning("model_dir has checkpoints up to step %d; starting from "
                        "--checkpoint_path %s as asked", last, path)  # fmt: skip
        return load_start(
            opts.checkpoint_path,
            r.model,
            r.optimizer,
            weights_only=opts.is_pretrained_checkpoint,
            allow_pickle=opts.allow_pickle,
            allow_unverified=opts.allow_unverified_checkpoint,
            lazy=lazy,
        )
    if not steps:
        return StartState()
    if opts.steps is None and steps[-1] >= r.config.runconfig.max_steps:
        return StartState(step=steps[-1], source=str(ckpts.path(steps[-1])))
    shapes = r.model.param_shapes()
    opt_shapes = opt_state_shapes(r.optimizer, shapes, r.model.num_layers)
    step, (params, opt, meta) = restore_newest_good(ckpts, shapes, opt_shapes, steps, lazy)
    log.info("Found checkpoint %s: resuming from it", ckpts.path(step))
    source = str(ckpts.path(step))
    loader = meta.get("loader")
    return StartState(params, opt, int(meta.get("step", step)), loader, source, meta.get("config"))


def data_dirs(inp: InputConfig) -> list[str]:
    """The data folders (or files) of an input section."""
    d = inp.data_dir
    return [] if d is None else [str(d)] if isinstance(d, str | Path) else [str(x) for x in d]
