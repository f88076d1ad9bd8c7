"""The train modes: where the run starts, the step loop, checkpoints, and the two fault policies
that run inside the loop (non-finite steps, preemption).

``train_mode`` reads and checks everything before it builds weights or compiles: the start
checkpoint (newest good one, with its optimizer layout), the train data and, for
train_and_eval, the eval data. Then one loop: step, log, summaries, checkpoint (+ eval).

- A non-finite loss or gradient norm stops the run at that step (NonFiniteError, exit 4) and
  writes nothing; with ``runconfig.on_nonfinite: skip`` the engine's skipped update is counted
  (log, TensorBoard ``skipped_updates``) and ``max_consecutive_skips`` in a row stop the run.
  A checkpoint holding a NaN or an infinity is refused by wsjax.checkpoint anyway.
- SIGTERM / SIGINT finish the current step, save a checkpoint and raise Preempted (exit 5); a
  second signal kills the process at once. Resuming from that checkpoint is exact.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, replace

import numpy as np

from wsjax.errors import NonFiniteError, Preempted
from wsjax.trainer.run import Run, RunResult, build_engine, compile_engine, estimate, plan_run

log = logging.getLogger("wsjax.train")


def train_mode(r: Run) -> RunResult:
    """``train`` / ``train_and_eval``: resume or start, check inputs, build, compile, loop."""
    from wsjax.checkpoint import Checkpoints
    from wsjax.data import make_loader
    from wsjax.data.builtin import CORPUS_RECORD, corpus_record, write_corpus_record
    from wsjax.trainer.evaluation import check_eval_input
    from wsjax.trainer.run import process_rows_of, write_effective_config
    from wsjax.trainer.tokenizer import save_run_tokenizer

    rc = r.config.runconfig
    ckpts = Checkpoints(r.md.path, keep=rc.keep_checkpoint_max)
    start = resolve_start(r, ckpts)
    target = start.step + r.options.steps if r.options.steps else rc.max_steps
    if r.options.steps:
        write_effective_config(r.md, replace_max_steps(r.config, target), training=True)
    if start.step >= target:
        message = (
            f"max_steps {target} already reached: {start.source} is at step {start.step}; "
            "nothing to do (raise --max_steps or give --steps to train further)"
        )
        log.info("%s", message)
        return r.result(global_step=start.step, message=message)
    loader = make_loader(
        # training runs to max_steps (as on Cerebras), so the train data always wraps around;
        # repeat: false matters for evaluation only
        replace(r.config.train_input, repeat=True),
        split="train",
        model_vocab_size=r.config.model.vocab_size,
        seed=rc.seed,
        start_state=start.loader_state,
        rows=process_rows_of(r.config, r.config.train_input.batch_size, train=True),
    )
    try:
        save_run_tokenizer(loader.source, r.md.path, r.config.model.max_position_embeddings)
        corpus = corpus_record(loader.source)
        first = next(loader)  # read now: a corrupt first record fails before weights or compile
        if r.mode == "train_and_eval":
            check_eval_input(r)
        engine, init_s, programming_s = build_engine(r, start)
        records, compile_s = compile_engine(r, engine)
        plan_run(r, records, strict=False)
        est, peaks = estimate(r, engine, records)
        result = r.result(compile_time=compile_s, plan_path=r.md.plan_json)
        stats = train_loop(r, engine, first, loader, ckpts, target, result, peaks.flops)
    finally:
        loader.close()
    finish(r, result, stats, est, peaks, init_s, programming_s)
    if corpus is not None:
        write_corpus_record(r.md.train_dir / CORPUS_RECORD, corpus, result.evals)
    return result


def replace_max_steps(config, max_steps: int):
    return replace(config, runconfig=replace(config.runconfig, max_steps=max_steps))


def resolve_start(r: Run, ckpts):
    """Where training starts: --checkpoint_path, else the newest good checkpoint in model_dir
    (a corrupt newer one is skipped with a warning), else fresh weights."""
    from wsjax.checkpoint import StartState, load_start, restore_newest_good
    from wsjax.engine.store import opt_state_shapes

    opts = r.options
    steps = ckpts.steps()
    if opts.checkpoint_path is not None:
        if steps:
            log.warning(
                "model_dir has checkpoints up to step %d; starting from --checkpoint_path %s "
                "as asked",
                steps[-1],
                opts.checkpoint_path,
            )
        return load_start(
            opts.checkpoint_path,
            r.model,
            r.optimizer,
            weights_only=opts.is_pretrained_checkpoint,
            allow_pickle=opts.allow_pickle,
        )
    if not steps:
        return StartState()
    if opts.steps is None and steps[-1] >= r.config.runconfig.max_steps:
        return StartState(step=steps[-1], source=str(ckpts.path(steps[-1])))
    opt_shapes = opt_state_shapes(r.optimizer, r.model.param_shapes(), r.model.num_layers)
    step, (params, opt, meta) = restore_newest_good(
        ckpts, r.model.param_shapes(), opt_shapes, steps
    )
    log.info("Found checkpoint %s: resuming from it", ckpts.path(step))
    source = str(ckpts.path(step))
    return StartState(params, opt, int(meta.get("step", step)), meta.get("loader"), source)


@dataclass(frozen=True)
class LoopStats:
    steps_done: int
    seconds: float
    input_wait: float


def train_loop(
    r: Run, engine, first: dict, loader, ckpts, target: int, result: RunResult, peak_flops: float
) -> LoopStats:
    """Steps until ``target`` (the first on ``first``, then on ``loader``'s batches); fills
    ``result.losses`` / ``skipped_steps`` / ``evals``."""
    from wsjax.trainer.evaluation import evaluate
    from wsjax.trainer.metrics import Progress, Summaries, model_flops_per_token, train_scalars

    rc = r.config.runconfig
    B, T = r.shape
    flops_tok = model_flops_per_token(r.config.model, r.model.num_params(), T)
    policy = NonFinitePolicy(rc.on_nonfinite, rc.max_consecutive_skips)
    tb = Summaries(r.md.path)
    from wsjax.distributed import is_main_process

    # one progress bar: process 0's
    bar = Progress(engine.step, target, r.options.progress if is_main_process() else False)
    steps_done, wait, t_start = 0, 0.0, time.perf_counter()
    batches = itertools.chain([first], loader)
    profiler = StepProfiler(rc.profile_steps, r.md.path / "profile")
    try:
        with PreemptionGuard() as preemption:
            while engine.step < target:
                batch = next(batches)
                with profiler.step(engine.step + 1):
                    m = engine.train_step(batch)
                m["input/wait_seconds"] = loader.wait_seconds_last
                wait += loader.wait_seconds_last
                steps_done += 1
                step, loss = engine.step, m["train/loss"]
                if policy.check(step, m):
                    result.skipped_steps.append(step)
                result.losses.append((step, loss))
                step_s = m["step_seconds"] + loader.wait_seconds_last
                sps = B / step_s if step_s > 0 else 0.0
                bar.update(loss, sps)
                last = step == target
                if step % rc.log_steps == 0 or last:
                    log.info("global_step = %d, loss = %.5f", step, loss)
                if step % rc.save_summary_steps == 0 or last:
                    mfu = flops_tok * B * T / step_s / peak_flops if step_s > 0 else 0.0
                    tags = train_scalars(m, samples_per_sec=sps, tokens_per_sec=sps * T, mfu=mfu)
                    tb.scalars("train", {**tags, "skipped_updates": policy.total}, step)
                periodic = rc.save_checkpoints_steps and step % rc.save_checkpoints_steps == 0
                preempted = preemption.agreed()
                if periodic or last or preempted:
                    result.checkpoints.append(save(r, engine, loader, ckpts, step))
                    if r.mode == "train_and_eval":
                        result.evals.append(evaluate(r, engine, step, tb))
                if preempted and not last:  # on the last step the run is simply done
                    raise Preempted(
                        f"preempted by {signal.Signals(preempted).name}: finished global "
                        f"step {step} and saved {ckpts.path(step)}; rerun the same command to "
                        "resume exactly"
                    )
    finally:
        profiler.close()
        bar.close()
        tb.close()
    return LoopStats(steps_done, time.perf_counter() - t_start, wait)


def save(r: Run, engine, loader, ckpts, step: int):
    log.info("Saving checkpoint at global step %d", step)
    meta = {
        "step": step,
        "loader": loader.state(),
        "seed": r.config.runconfig.seed,
        "rng": "dropout keys = fold_in(PRNGKey(seed), step); nothing else is random",
        "config": r.config.to_dict(),
    }
    return ckpts.save(step, engine.params_tree(), engine.opt_state_tree(), meta)


def finish(r: Run, result: RunResult, stats: LoopStats, est, peaks, init_s, programming_s):
    """Totals into the result and performance.json; the closing log lines."""
    from wsjax.trainer.metrics import Performance, model_flops_per_token

    B, T = r.shape
    samples, total = stats.steps_done * B, stats.seconds
    result.global_step = result.losses[-1][0]
    result.final_loss = result.losses[-1][1]
    result.total_samples, result.total_time = samples, total
    result.samples_per_sec = samples / total if total > 0 else 0.0
    result.checkpoints = [p for p in result.checkpoints if p.exists()]
    flops_tok = model_flops_per_token(r.config.model, r.model.num_params(), T)
    wait_share = stats.input_wait / total if total > 0 else 0.0
    perf = Performance(
        compile_time=result.compile_time,
        est_samples_per_sec=est,
        programming_time=programming_s,
        samples_per_sec=result.samples_per_sec,
        total_samples=samples,
        total_time=total,
        input_wait_fraction=wait_share,
        tokens_per_sec=result.samples_per_sec * T,
        mfu=flops_tok * result.samples_per_sec * T / peaks.flops,
        peak_flops=peaks.flops,
        h2d_bandwidth=peaks.h2d_bandwidth,
        peaks_source=peaks.source,
        weight_init_time=init_s,
    )
    perf.suspected_input_bottleneck = wait_share > perf.input_wait_threshold
    perf.write(r.md.performance_json)
    result.performance_path = r.md.performance_json
    log.info(
        "Training finished with %d samples in %.3f seconds, %.2f samples/second.",
        samples,
        total,
        result.samples_per_sec,
    )
    log.info("Loss for final step: %.5f.", result.final_loss)
    if result.skipped_steps:
        log.warning("%d updates skipped (non-finite)", len(result.skipped_steps))
    if perf.suspected_input_bottleneck:
        log.warning(
            "suspected input bottleneck: waited for data %.0f%% of the time", 100 * wait_share
        )
    return result


class StepProfiler:
    """A ``jax.profiler`` trace of the steps in ``runconfig.profile_steps``, into ``log_dir``.

    A trace starts before the first step of each run of consecutive chosen steps and stops after
    its last, so other steps cost nothing. Each step is a ``StepTraceAnnotation`` (TensorBoard's
    step view); the engine names its spans inside (wsjax/engine/step.py). The trace is
    written as TensorBoard's ``plugins/profile/<run>/*.xplane.pb`` and as Perfetto's
    ``perfetto_trace.json.gz`` next to it.
    """

    def __init__(self, steps: tuple[int, ...], log_dir):
        self.steps, self.log_dir = frozenset(steps), log_dir
        self.tracing = False

    @contextlib.contextmanager
    def step(self, step: int):
        if step not in self.steps:
            yield
            return
        import jax

        if not self.tracing:
            log.info("profiling from global step %d into %s", step, self.log_dir)
            jax.profiler.start_trace(self.log_dir, create_perfetto_trace=True)
            self.tracing = True
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            yield
        if step + 1 not in self.steps:
            self.close()

    def close(self) -> None:
        if self.tracing:
            import jax

            jax.profiler.stop_trace()
            self.tracing = False


# ---- fault policies -----------------------------------------------------------------------------
class NonFinitePolicy:
    """What a step with a non-finite loss or gradient norm does (``runconfig.on_nonfinite``).

    The engine reports ``train/update_skipped`` = 1.0 when it saw the non-finite value and left
    weights and optimizer state untouched; an engine that applied the update leaves nothing to
    skip back to, so that stops the run under either policy.
    """

    def __init__(self, on_nonfinite: str, max_consecutive_skips: int):
        self.skip = on_nonfinite == "skip"
        self.max_consecutive = max_consecutive_skips
        self.consecutive = 0
        self.total = 0

    def check(self, step: int, metrics: dict) -> bool:
        """True when this step's update was skipped; NonFiniteError when the run must stop."""
        loss = float(metrics["train/loss"])
        grad_norm = float(metrics.get("train/grad_norm", 0.0))
        engine_skipped = float(metrics.get("train/update_skipped", 0.0)) >= 0.5
        if math.isfinite(loss) and math.isfinite(grad_norm) and not engine_skipped:
            self.consecutive = 0
            return False
        what = f"global_step {step}: non-finite loss {loss:.6g} / gradient norm {grad_norm:.6g}"
        if not self.skip:
            raise NonFiniteError(
                f"{what}: stopped, nothing saved; the latest checkpoint is intact (lower the "
                "learning rate, or set runconfig.on_nonfinite: skip)"
            )
        if not engine_skipped:
            raise NonFiniteError(
                f"{what}: the engine applied this update, so it cannot be skipped; stopped, "
                "nothing saved"
            )
        self.consecutive += 1
        self.total += 1
        log.warning(
            "%s: update skipped (%d in a row, %d in all)", what, self.consecutive, self.total
        )
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"{what}: {self.consecutive} non-finite steps in a row "
                f"(runconfig.max_consecutive_skips = {self.max_consecutive}): stopped; the latest "
                "checkpoint is intact"
            )
        return True


class PreemptionGuard:
    """While active: the first SIGTERM / SIGINT is recorded in ``signal`` for the loop to act on
    after its step; both signals then get their default action, so a second one kills at once.
    Outside the main thread (signals cannot be caught there) it does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal: int | None = None
        self._before: dict = {}

    def _record(self, signum, frame) -> None:
        self.signal = signum
        for s in self.SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        log.warning(
            "received %s: finishing this step, then saving a checkpoint (a second signal stops "
            "at once)",
            signal.Signals(signum).name,
        )

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            self._before = {s: signal.signal(s, self._record) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._before.items():
            signal.signal(s, handler)

    def agreed(self) -> int | None:
        """The signal, as every process sees it after this step: with several processes one
        that got it makes all of them save at the same step (they save together)."""
        import jax

        if jax.process_count() == 1:
            return self.signal
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(self.signal or 0, np.int32))
        found = int(np.max(flags))
        return found or None
