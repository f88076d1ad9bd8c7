"""The run: ``run(config, mode, model_dir, ...)`` as a short dispatch over small functions.

A :class:`Run` holds what stays fixed for one run (config, mode, model_dir, model, optimizer,
options, batch shape, compile dir), built in one place; every step below takes what it needs as
arguments and returns what it produced, so nothing can be called in the wrong order. The modes:

    validate_only   plan_run, write the plan; nothing compiled (validate_only)
    compile_only    compile every executable, plan and estimate; no weights (compile_only)
    train           wsjax.trainer.train_loop.train_mode; train_and_eval evaluates after each checkpoint
    eval, eval_all  wsjax.trainer.evaluation.eval_mode: the latest checkpoint, or every one

Everything user-visible goes through the ``wsjax.train`` logger in the Cerebras run.py wording.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from wsjax.errors import ConfigError, WsjaxError

if TYPE_CHECKING:
    from wsjax.config.schema import Config, InputConfig
    from wsjax.trainer.run_dir import ModelDir

log = logging.getLogger("wsjax.train")

MODES = ("train", "eval", "train_and_eval", "eval_all")
# Flags that override runconfig, with the smallest valid value (Cerebras run.py semantics:
# keep_checkpoint_max 0 keeps all, save_checkpoints_steps 0 saves only at the end).
RUNCONFIG_FLAGS = {
    "max_steps": 1,
    "save_checkpoints_steps": 0,
    "save_summary_steps": 1,
    "keep_checkpoint_max": 0,
    "eval_steps": None,  # <= 0: a full pass over the eval set
}


@dataclass(frozen=True)
class RunOptions:
    """Per-invocation flags that are not part of the config."""

    steps: int | None = None  # train this many more steps (instead of up to max_steps)
    checkpoint_path: Path | None = None
    is_pretrained_checkpoint: bool = False
    allow_pickle: bool = False
    validate_only: bool = False
    compile_only: bool = False
    progress: bool | None = None
    eval_text: Path | None = None  # eval modes: a text / jsonl file instead of eval_input
    plan_processes: int | None = None  # validate_only: plan for this many processes


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
class Run:
    """What stays fixed for one run; built by :func:`make_run`."""

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


def run(
    config,
    mode: str = "train",
    model_dir: str | Path | None = None,
    *,
    max_steps: int | None = None,
    steps: int | None = None,
    eval_steps: int | None = None,
    save_checkpoints_steps: int | None = None,
    save_summary_steps: int | None = None,
    keep_checkpoint_max: int | None = None,
    checkpoint_path: str | Path | None = None,
    is_pretrained_checkpoint: bool = False,
    allow_pickle: bool = False,
    validate_only: bool = False,
    compile_only: bool = False,
    progress: bool | None = None,
    eval_text: str | Path | None = None,
    plan_processes: int | None = None,
) -> RunResult:
    """Run ``mode`` for ``config`` (a :class:`wsjax.config.Config`) into ``model_dir``.

    The runconfig flags override the params file with Cerebras run.py semantics (``steps``:
    this many more steps from where the run starts; ``keep_checkpoint_max=0`` keeps all;
    ``eval_steps <= 0`` evaluates the whole eval set); 0 is a value, None is "not given".
    ``eval_text`` (eval modes): evaluate on this text or jsonl file (wsjax.trainer.eval_text).
    """
    from wsjax.distributed import is_main_process
    from wsjax.trainer.metrics import setup_logging
    from wsjax.trainer.run_dir import DEFAULT_MODEL_DIR, ModelDir

    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    flags = {
        "max_steps": max_steps,
        "eval_steps": eval_steps,
        "save_checkpoints_steps": save_checkpoints_steps,
        "save_summary_steps": save_summary_steps,
        "keep_checkpoint_max": keep_checkpoint_max,
    }
    config = with_runconfig_flags(config, flags, steps)
    options = RunOptions(
        steps=steps,
        checkpoint_path=Path(checkpoint_path) if checkpoint_path is not None else None,
        is_pretrained_checkpoint=is_pretrained_checkpoint,
        allow_pickle=allow_pickle,
        validate_only=validate_only,
        compile_only=compile_only,
        progress=progress,
        eval_text=Path(eval_text) if eval_text is not None else None,
        plan_processes=plan_processes,
    )
    if eval_text is not None and mode not in ("eval", "eval_all"):
        raise ConfigError(f"--eval_text needs -m eval or eval_all, not {mode}")
    md = ModelDir(model_dir or config.runconfig.model_dir or DEFAULT_MODEL_DIR)
    setup_logging()
    with md:
        split = "train" if mode.startswith("train") else "eval"
        # process 0 writes the run's files; the others only compute (wsjax.distributed)
        handler = setup_logging(md.path / split / "run.log") if is_main_process() else None
        try:
            return dispatch(make_run(config, mode, md, options))
        except OSError as e:
            raise disk_error(e, md.path) from None
        finally:
            if handler is not None:
                logging.getLogger("wsjax").removeHandler(handler)
                handler.close()


def with_runconfig_flags(config, flags: dict, steps: int | None):
    """``config`` with the given runconfig flags applied; a flag below its minimum is one line.
    ``0`` is a value, not "not given" (``--max_steps 0`` is an error, never the YAML's)."""
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps {steps} is invalid: must be >= 1")
    if steps is not None and flags.get("max_steps") is not None:
        raise ConfigError("--steps and --max_steps exclude each other; give one")
    given = {k: v for k, v in flags.items() if v is not None}
    for name, value in given.items():
        low = RUNCONFIG_FLAGS[name]
        if low is not None and value < low:
            raise ConfigError(f"--{name} {value} is invalid: must be >= {low}")
    rc = dataclasses.replace(config.runconfig, **given)
    return dataclasses.replace(config, runconfig=rc)


def disk_error(e: OSError, where: Path) -> WsjaxError | OSError:
    """A full or read-only disk as one line; any other OSError stays a bug (traceback)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
        return WsjaxError(
            f"{e.filename or where}: cannot write ({e.strerror}); free space in {where} and "
            "rerun: the saved checkpoints are intact"
        )
    return e


def make_run(config, mode: str, md, options: RunOptions) -> Run:
    """Build the fixed parts of a run (model, optimizer, shapes, compile dir): no arrays yet."""
    from wsjax.models import get_model
    from wsjax.optim import make_optimizer
    from wsjax.trainer.run_dir import compile_checksum

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
    return Run(
        config=config,
        mode=mode,
        md=md,
        options=options,
        model=get_model(config.model),
        optimizer=make_optimizer(config.optimizer),
        training=training,
        input=inp,
        shape=shape,
        compile_dir=md.compile_dir(checksum),
    )


def dispatch(r: Run) -> RunResult:
    """Write the effective config, log the header, then run the one action this run is."""
    import jax

    write_effective_config(r.md, r.config, r.training)
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
    if r.options.validate_only:
        return validate_only(r)
    if not r.options.compile_only:
        plan_run(r, strict=True)  # does not fit: PlanError before anything is allocated
    from wsjax.trainer.run_dir import use_compile_dir

    with use_compile_dir(r.compile_dir):
        return action(r)(r)


def action(r: Run) -> Callable[[Run], RunResult]:
    from wsjax.trainer.evaluation import eval_mode
    from wsjax.trainer.train_loop import train_mode

    if r.options.compile_only:
        return compile_only
    return {"train": train_mode, "train_and_eval": train_mode}.get(r.mode, eval_mode)


def process_rows_of(config, batch_size: int, *, train: bool):
    """The rows of each global batch this process reads (None with one process)."""
    import jax

    from wsjax.engine.shards import process_rows

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
    from wsjax.distributed import is_main_process

    if not is_main_process():  # process 0 writes the run's files
        return
    split_dir = md.train_dir if training else md.eval_dir
    split_dir.mkdir(parents=True, exist_ok=True)
    name = "params_train.yaml" if training else "params_eval.yaml"
    (split_dir / name).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


# ---- plan, validate_only, compile_only ----------------------------------------------------------
def plan_run(r: Run, records: list[dict] | None = None, *, strict: bool):
    """Make the memory plan (from compile records once there are some), write plan.json, log
    it the first time, and check it: ``strict`` raises PlanError (exit 3), otherwise a warning.

    The plan is against ``streaming.device_memory_gb`` / ``host_memory_gb`` when given (one
    accelerator of that target, with separate device and host memory, whatever this machine
    is), else against this machine."""
    import jax

    from wsjax.engine import make_plan
    from wsjax.engine.plan import GiB, available_host_bytes, device_budget

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
    processes = r.options.plan_processes or jax.process_count()
    n_devices = max(1, n_devices // jax.process_count()) * processes
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
    )
    if target:
        plan.notes.append("planned against streaming.device_memory_gb / host_memory_gb")
    plan.write(r.md.plan_json)
    if records is None:
        log.info("%s", plan.summary())
    try:
        plan.check()
    except WsjaxError as e:
        if strict:
            raise
        log.warning("%s: %s", "on the target" if target else "on this machine", e)
    return plan


def validate_only(r: Run) -> RunResult:
    """``--validate_only``: config and shapes valid and the plan written; nothing compiled. A
    plan that does not fit is the verdict: PlanError, exit 3, naming the shortfall and knob."""
    plan_run(r, strict=True)
    result = r.result(plan_path=r.md.plan_json)
    result.compile_dir = None
    result.message = "validate_only: config and shapes valid, the plan fits"
    log.info("%s", result.message)
    return result


def compile_only(r: Run) -> RunResult:
    """``--compile_only``: every executable compiled into the compile dir, plan and estimate."""
    from wsjax.engine import StreamingEngine
    from wsjax.trainer.metrics import Performance

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
def compile_engine(r: Run, engine) -> tuple[list[dict], float]:
    """Compile the mode's executables; write compile_log.json; (records, seconds)."""
    from wsjax.trainer.run_dir import backend_signature, write_compile_log

    t0 = time.perf_counter()
    records = engine.compile(r.shape, train=r.training)
    seconds = time.perf_counter() - t0
    extra = {"compile_time": seconds, "batch_shape": list(r.shape)}
    write_compile_log(r.compile_dir, records, {**extra, **backend_signature()})
    log.info(
        "Compiled %d executables in %.2f seconds (cache: %s)", len(records), seconds, r.compile_dir
    )
    return records, seconds


def estimate(r: Run, engine, records: list[dict]):
    """(estimated samples/s of a training step, the device peaks): each compiled executable and
    each transfer timed once on the device, combined by the step's schedule (see
    ``wsjax.engine.estimate.estimate_step_seconds``); the peaks are what MFU is measured against."""
    import jax

    from wsjax.engine.estimate import device_peaks, estimate_step_seconds, measure_step_times

    peaks = device_peaks()
    prog = engine.program(r.shape, train=True)
    exes = prog.training(recompute=bool(r.config.streaming.recompute))  # compiled: cache hits
    times = measure_step_times(prog, exes, engine.placement)
    overlap = jax.devices()[0].platform != "cpu"  # a CPU's "transfers" are its own copies
    step_s = estimate_step_seconds(
        times, num_layers=r.model.num_layers, n_micro=prog.n_micro, overlap=overlap
    )
    log.info("estimated step: %.4f s from timed executables and transfers", step_s)
    return (r.shape[0] / step_s if step_s > 0 else 0.0), peaks


def build_engine(r: Run, start):
    """The engine holding ``start``'s weights (or fresh ones); (engine, init s, programming s)."""
    import jax

    from wsjax.engine import StreamingEngine

    t0 = time.perf_counter()
    engine = StreamingEngine(
        r.model,
        r.config,
        params=start.params,
        opt_state=start.opt_state if r.training else None,
        step=start.step,
        train=r.training,  # eval modes: no optimizer state, no gradient buffers
    )
    init_s = time.perf_counter() - t0
    # the first weights in, as a step streams them
    first = engine.program(r.shape, train=r.training).broadcast(
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
