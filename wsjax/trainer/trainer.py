"""The Trainer: one run of a config into a model_dir, in the mode its options ask for.

    trainer = Trainer(config, RunOptions(mode="train_and_eval"), "model_dir", callbacks=[...])
    result = trainer.train()            # or .evaluate(), .validate(), .compile(), .run()

Training reads and checks everything before it builds weights or compiles (the start
checkpoint, the train data and, for train_and_eval, the eval data), then loops: a step, then
the hooks (wsjax.trainer.hooks) in order. The model_dir is locked for the whole run; process 0
writes the run's files. ``run(config, mode, model_dir, **options)`` is the same in one call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from wsjax.checkpoint import Checkpoints
from wsjax.data.builtin import CORPUS_RECORD, corpus_record, write_corpus_record
from wsjax.data.tokenizer import save_run_tokenizer
from wsjax.distributed import is_main_process
from wsjax.errors import Preempted, WsjaxError
from wsjax.logs import close_log_file, setup_logging
from wsjax.trainer import evaluation
from wsjax.trainer.faults import NonFinitePolicy
from wsjax.trainer.hooks import (
    CheckpointHook,
    Clock,
    EvalHook,
    Hooks,
    LogHook,
    NonFiniteHook,
    PreemptionHook,
    ProfileHook,
    ProgressHook,
    StepInfo,
    preempted_message,
)
from wsjax.trainer.metrics import Performance, model_flops_per_token
from wsjax.trainer.options import RunOptions
from wsjax.trainer.run_dir import DEFAULT_MODEL_DIR, ModelDir, use_compile_dir
from wsjax.trainer.setup import (
    RunResult,
    RunSpec,
    build_engine,
    compile_engine,
    compile_only,
    disk_error,
    estimate,
    log_header,
    make_spec,
    open_train_loader,
    plan_run,
    resolve_start,
    validate_only,
    write_effective_config,
)
from wsjax.trainer.steps import replace_max_steps, with_epochs
from wsjax.trainer.trackers import tracker_hooks

log = logging.getLogger("wsjax.train")


@dataclass
class _Prepared:
    """What training needs once everything is read and compiled."""

    engine: object
    result: RunResult
    estimate: float
    peaks: object
    init_s: float
    programming_s: float


class Trainer:
    """Train, evaluate, validate or compile ``config`` into ``model_dir``.

    ``options``: the run's flags (:class:`RunOptions`; ``model_dir`` here overrides its
    ``model_dir``). ``callbacks``: :class:`wsjax.trainer.hooks.Callback` objects, run after the
    built-in hooks every ``callback.every`` steps.
    """

    def __init__(
        self,
        config,
        options: RunOptions | None = None,
        model_dir: str | Path | None = None,
        *,
        callbacks=(),
    ):
        options = options or RunOptions()
        if model_dir is not None:
            options = dataclasses.replace(options, model_dir=Path(model_dir))
        self.options = options
        self.config = options.with_runconfig(config)
        self.callbacks = list(callbacks)
        self.md = ModelDir(
            options.model_dir or self.config.runconfig.model_dir or DEFAULT_MODEL_DIR
        )
        self.spec: RunSpec | None = None
        self.engine = None
        self.result: RunResult | None = None
        self._hooks = Hooks([])
        self._ckpts = self._loader = None

    # ---- the public entry points --------------------------------------------------------------
    def run(self) -> RunResult:
        """What the options ask for: --validate_only and/or --compile_only, else the mode."""
        o = self.options
        mode = o.mode or "train"
        if o.validate_only and o.compile_only:  # both asked: the verdict, then the executables
            self.validate()
            return self.compile()
        if o.validate_only:
            return self.validate()
        if o.compile_only:
            return self.compile()
        return self.train() if mode.startswith("train") else self.evaluate()

    def validate(self) -> RunResult:
        """Config and shapes valid and the memory plan written; nothing compiled (exit 3 if the
        plan does not fit)."""
        with self._session(self.options.mode or "train", plan=False, cache=False):
            return validate_only(self.spec)

    def compile(self) -> RunResult:
        """Every executable compiled into the compile cache, with the plan and the estimate."""
        with self._session(self.options.mode or "train", plan=False):
            return compile_only(self.spec)

    def train(self) -> RunResult:
        """Train to max_steps (or ``steps`` more), from the newest good checkpoint or
        --checkpoint_path; train_and_eval evaluates after each checkpoint."""
        mode = "train_and_eval" if self.options.mode == "train_and_eval" else "train"
        with self._session(mode):
            try:
                return self._train()
            finally:
                self._close_checkpoints()

    def evaluate(self) -> RunResult:
        """``eval``: the newest good checkpoint (or --checkpoint_path); ``eval_all``: every
        checkpoint in model_dir, skipping corrupt ones with a warning."""
        mode = "eval_all" if self.options.mode == "eval_all" else "eval"
        with self._session(mode):
            self.result = evaluation.eval_mode(self.spec)
            return self.result

    # ---- what the hooks call ------------------------------------------------------------------
    def save_checkpoint(self, step: int, loader_state: dict | None = None) -> Path:
        """A checkpoint of the engine's state at ``step`` (and the data position ``loader_state``,
        else the loader's now); the hooks' ``on_checkpoint`` after."""
        log.info("Saving checkpoint at global step %d to %s", step, self._ckpts.path(step))
        meta = {
            "step": step,
            "loader": self._loader.state() if loader_state is None else loader_state,
            "seed": self.config.runconfig.seed,
            "rng": "dropout keys = fold_in(PRNGKey(seed), step); nothing else is random",
            "config": self.config.to_dict(),
        }
        path = self.engine.save_checkpoint(self._ckpts, step, meta)
        self.result.checkpoints.append(path)
        self._hooks.on_checkpoint(self, step, path)
        return path

    def evaluate_now(self, step: int) -> dict:
        """One evaluation pass with the engine's current weights; the hooks' ``on_eval``."""
        row = evaluation.evaluate(self.spec, self.engine, step)
        self.result.evals.append(row)
        self._hooks.on_eval(self, step, row)
        return row

    # ---- inside -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _session(self, mode: str, *, plan: bool = True, cache: bool = True):
        """The model_dir locked, the run's log file, the fixed parts built and the header
        logged; the plan checked (``plan``: PlanError before anything is allocated); the run's
        compile cache in use (``cache``; validation compiles nothing). A full disk ends as one
        line."""
        setup_logging()
        with self.md:
            split = "train" if mode.startswith("train") else "eval"
            # process 0 writes the run's files; the others only compute (wsjax.distributed)
            handler = setup_logging(self.md.path / split / "run.log") if is_main_process() else None
            try:
                self.spec = make_spec(self.config, mode, self.md, self.options)
                write_effective_config(self.md, self.config, self.spec.training)
                log_header(self.spec)
                if plan:
                    plan_run(self.spec, strict=True)
                with use_compile_dir(self.spec.compile_dir) if cache else contextlib.nullcontext():
                    yield
            except OSError as e:
                raise disk_error(e, self.md.path) from None
            finally:
                close_log_file(handler)

    def _close_checkpoints(self) -> None:
        """Wait for a save in flight and close; under another error a failed save is logged."""
        ckpts, self._ckpts, failing = self._ckpts, None, sys.exc_info()[0] is not None
        try:
            if ckpts is not None:
                ckpts.close()
        except WsjaxError as e:
            if not failing:
                raise
            log.error("%s", e)

    def _train(self) -> RunResult:
        self.config = with_epochs(self.config)  # runconfig.num_epochs -> max_steps, from the data
        self.spec = spec = dataclasses.replace(self.spec, config=self.config)
        rc = self.config.runconfig
        self._ckpts = Checkpoints(
            spec.md.path,
            keep=rc.keep_checkpoint_max,
            async_save=True,
            allow_unverified=self.options.allow_unverified_checkpoint,
        )
        start = resolve_start(spec, self._ckpts)
        target = start.step + self.options.steps if self.options.steps else rc.max_steps
        if self.options.steps:
            write_effective_config(spec.md, replace_max_steps(self.config, target), True)
        if start.step >= target:
            message = (
                f"max_steps {target} already reached: {start.source} is at step {start.step}; "
                "nothing to do (raise --max_steps or give --steps to train further)"
            )
            log.info("%s", message)
            return spec.result(global_step=start.step, message=message)
        self._loader = open_train_loader(spec, start.loader_state)
        try:
            save_run_tokenizer(
                self._loader.source, spec.md.path, spec.config.model.max_position_embeddings
            )
            corpus = corpus_record(self._loader.source)
            at_start = self._loader.state()  # the data position of the start's checkpoint
            first = next(self._loader)  # read now: a corrupt record fails before any compile
            ready = self._prepare(start)
            if rc.save_initial_checkpoint and start.step not in self._ckpts.steps():
                self.save_checkpoint(start.step, at_start)  # the start's weights, then train
            stats = self._loop(first, target, ready.peaks.flops)
            self._ckpts.wait()  # the last save committed (and pruned) before the totals
        finally:
            self._loader.close()
        self._finish(stats, ready)
        if corpus is not None:
            write_corpus_record(spec.md.train_dir / CORPUS_RECORD, corpus, self.result.evals)
        self._hooks.on_train_end(self, self.result)
        return self.result

    def _prepare(self, start) -> _Prepared:
        """The eval data checked, the engine built on ``start``, compiled, planned, estimated."""
        spec = self.spec
        if spec.mode == "train_and_eval":
            evaluation.check_eval_input(spec)
        self.engine, init_s, programming_s = build_engine(spec, start)
        records, compile_s = compile_engine(spec, self.engine)
        plan_run(spec, records, strict=False)
        est, peaks = estimate(spec, self.engine, records)
        self.result = spec.result(compile_time=compile_s, plan_path=spec.md.plan_json)
        return _Prepared(self.engine, self.result, est, peaks, init_s, programming_s)

    def _builtin_hooks(self, target: int) -> tuple[list, list]:
        rc, spec = self.config.runconfig, self.spec
        policy = NonFinitePolicy(rc.on_nonfinite, rc.max_consecutive_skips)
        trackers = tracker_hooks(self.config, spec.md.path, policy)  # a missing package: now
        hooks = [
            NonFiniteHook(policy),
            PreemptionHook(),
            LogHook(rc.log_steps),
            ProgressHook(
                self.engine.step, target, self.options.progress if is_main_process() else False
            ),
            *trackers,
            CheckpointHook(rc.save_checkpoints_steps),
            ProfileHook(rc.profile_steps, spec.md.path / "profile"),
        ]
        # the eval after a checkpoint runs once every hook, the user's too, has seen it
        return hooks, [EvalHook()] if spec.mode == "train_and_eval" else []

    def _loop(self, first: dict, target: int, peak_flops: float) -> _LoopStats:
        """Steps until ``target``, each followed by the hooks. Reads in one screen."""
        builtin, last = self._builtin_hooks(target)
        self._hooks = Hooks([*builtin, *self.callbacks, *last])
        batches, clock = itertools.chain([first], self._loader), Clock(self.engine.step)
        stats = _LoopStats()
        try:
            self._hooks.on_train_begin(self, self.engine.step)
            while self.engine.step < target:
                batch = next(batches)
                with self._hooks.step_context(self.engine.step + 1):
                    metrics = self.engine.train_step(batch)
                info = self._step_info(metrics, target, peak_flops, clock)
                stats.add(self._loader.wait_seconds_last)
                self._hooks.on_step(self, info)
                self.result.losses.append((info.step, info.loss))
                if info.skipped:
                    self.result.skipped_steps.append(info.step)
                if info.preempted and not info.last:  # on the last step the run is simply done
                    path = self._ckpts.path(info.step)
                    self._ckpts.wait()
                    raise Preempted(preempted_message(info.preempted, info.step, path))
        finally:
            self._hooks.close()
        stats.seconds = time.perf_counter() - clock.t0
        return stats

    def _step_info(self, metrics: dict, target: int, peak_flops: float, clock: Clock) -> StepInfo:
        B, T = self.spec.shape
        wait = self._loader.wait_seconds_last
        metrics["input/wait_seconds"] = wait
        seconds = metrics["step_seconds"] + wait
        sps = B / seconds if seconds > 0 else 0.0
        flops_tok = model_flops_per_token(self.config.model, self.spec.model.num_params(), T)
        step = self.engine.step
        return StepInfo(
            step=step,
            target=target,
            loss=float(metrics["train/loss"]),
            metrics=metrics,
            seconds=seconds,
            samples_per_sec=sps,
            tokens_per_sec=sps * T,
            mfu=flops_tok * sps * T / peak_flops if peak_flops > 0 else 0.0,
            eta_seconds=clock.eta(step, target),
        )

    def _finish(self, stats: _LoopStats, ready: _Prepared) -> None:
        """Totals into the result and performance.json; the closing log lines."""
        B, T = self.spec.shape
        result, total = self.result, stats.seconds
        samples = stats.steps * B
        result.global_step, result.final_loss = result.losses[-1]
        result.total_samples, result.total_time = samples, total
        result.samples_per_sec = samples / total if total > 0 else 0.0
        result.checkpoints = [p for p in result.checkpoints if p.exists()]
        flops_tok = model_flops_per_token(self.config.model, self.spec.model.num_params(), T)
        wait_share = stats.input_wait / total if total > 0 else 0.0
        perf = Performance(
            compile_time=result.compile_time,
            est_samples_per_sec=ready.estimate,
            programming_time=ready.programming_s,
            samples_per_sec=result.samples_per_sec,
            total_samples=samples,
            total_time=total,
            input_wait_fraction=wait_share,
            tokens_per_sec=result.samples_per_sec * T,
            mfu=flops_tok * result.samples_per_sec * T / ready.peaks.flops,
            peak_flops=ready.peaks.flops,
            h2d_bandwidth=ready.peaks.h2d_bandwidth,
            peaks_source=ready.peaks.source,
            weight_init_time=ready.init_s,
        )
        perf.suspected_input_bottleneck = wait_share > perf.input_wait_threshold
        perf.write(self.spec.md.performance_json)
        result.performance_path = self.spec.md.performance_json
        log_finish(result, perf, wait_share)


@dataclass
class _LoopStats:
    steps: int = 0
    input_wait: float = 0.0
    seconds: float = 0.0

    def add(self, wait: float) -> None:
        self.steps += 1
        self.input_wait += wait


def log_finish(result: RunResult, perf: Performance, wait_share: float) -> None:
    log.info(
        "Training finished with %d samples in %.3f seconds, %.2f samples/second.",
        result.total_samples,
        result.total_time,
        result.samples_per_sec,
    )
    log.info("Loss for final step: %.5f.", result.final_loss)
    if result.skipped_steps:
        log.warning("%d updates skipped (non-finite)", len(result.skipped_steps))
    if perf.suspected_input_bottleneck:
        log.warning(
            "suspected input bottleneck: waited for data %.0f%% of the time", 100 * wait_share
        )


def run(config, mode: str = "train", model_dir: str | Path | None = None, **options) -> RunResult:
    """``Trainer(config, RunOptions(mode=mode, **options), model_dir).run()``: ``options`` are
    :class:`RunOptions` fields (``max_steps``, ``steps``, ``checkpoint_path`` ...)."""
    return Trainer(config, RunOptions(mode=mode, **options), model_dir).run()
