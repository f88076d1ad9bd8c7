"""The Trainer's hooks: what runs around and after each training step.

A hook is a :class:`Callback`. After every step the Trainer hands a :class:`StepInfo` to each
hook in order; the built-in ones come first, each acting every N steps of its own setting:

    NonFiniteHook    a non-finite loss or gradient norm: stop, or count a skipped update
    PreemptionHook   SIGTERM / SIGINT seen (agreed by every process): save, then stop
    LogHook          the step line, every runconfig.log_steps (Cerebras' words first)
    ProgressHook     a tqdm.auto bar in terminals and notebooks, else a plain line now and then
    TrackerHook      TensorBoard, W&B, MLflow (runconfig.report_to; wsjax.trainer.trackers):
                     scalars every runconfig.save_summary_steps, eval scalars
    CheckpointHook   a checkpoint every runconfig.save_checkpoints_steps, at the end, on a signal
    ProfileHook      a jax.profiler trace of the steps in runconfig.profile_steps

then the user's callbacks (``Trainer(..., callbacks=[...])``), each every ``callback.every``
steps and on the last one; last, EvalHook (train_and_eval: an evaluation after each
checkpoint, once every other hook has seen the checkpoint).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import jax

from wsjax.trainer.faults import NonFinitePolicy, PreemptionGuard
from wsjax.trainer.metrics import Progress

log = logging.getLogger("wsjax.train")


@dataclass
class StepInfo:
    """One finished training step, as the hooks see it."""

    step: int  # the global step just finished
    target: int  # the step the run trains to
    loss: float
    metrics: dict  # the engine's metrics: train/loss, train/lr, train/grad_norm, stream/* ...
    seconds: float  # the step, with its wait for data
    samples_per_sec: float
    tokens_per_sec: float
    mfu: float
    eta_seconds: float  # at the mean step time so far
    skipped: bool = False  # the update was skipped (runconfig.on_nonfinite: skip)
    preempted: int | None = None  # the signal every process saw, if any

    @property
    def last(self) -> bool:
        return self.step >= self.target


class Callback:
    """Override what you need; every method is optional. ``every``: ``on_step`` runs every N
    steps (and on the last step)."""

    every: int = 1

    def on_train_begin(self, trainer, step: int) -> None:
        """Training starts (or resumes) at global step ``step``."""

    def step_context(self, step: int):
        """A context manager the step ``step`` runs inside (e.g. a profiler trace)."""
        return contextlib.nullcontext()

    def on_step(self, trainer, info: StepInfo) -> None:
        """After a step (every ``every`` steps)."""

    def on_checkpoint(self, trainer, step: int, path: Path) -> None:
        """A checkpoint of ``step`` was written to ``path``."""

    def on_eval(self, trainer, step: int, scalars: dict) -> None:
        """An evaluation at ``step``: loss, perplexity, accuracy (and the pass's size)."""

    def on_train_end(self, trainer, result) -> None:
        """Training finished normally with ``result`` (a RunResult)."""

    def close(self) -> None:
        """Training ended, normally or not: release what the hook holds."""


class Hooks:
    """Runs a list of callbacks in order."""

    def __init__(self, callbacks: list[Callback]):
        self.callbacks = list(callbacks)

    def on_train_begin(self, trainer, step: int) -> None:
        for c in self.callbacks:
            c.on_train_begin(trainer, step)

    @contextlib.contextmanager
    def step_context(self, step: int):
        with contextlib.ExitStack() as stack:
            for c in self.callbacks:
                stack.enter_context(c.step_context(step))
            yield

    def on_step(self, trainer, info: StepInfo) -> None:
        for c in self.callbacks:
            if c.every <= 1 or info.step % c.every == 0 or info.last:
                c.on_step(trainer, info)

    def on_checkpoint(self, trainer, step: int, path: Path) -> None:
        for c in self.callbacks:
            c.on_checkpoint(trainer, step, path)

    def on_eval(self, trainer, step: int, scalars: dict) -> None:
        for c in self.callbacks:
            c.on_eval(trainer, step, scalars)

    def on_train_end(self, trainer, result) -> None:
        for c in self.callbacks:
            c.on_train_end(trainer, result)

    def close(self) -> None:
        """Close every hook, even when one fails to."""
        with contextlib.ExitStack() as stack:
            for c in self.callbacks:
                stack.callback(c.close)


# ---- the built-in hooks -------------------------------------------------------------------------
class NonFiniteHook(Callback):
    def __init__(self, policy: NonFinitePolicy):
        self.policy = policy

    def on_step(self, trainer, info: StepInfo) -> None:
        info.skipped = self.policy.check(info.step, info.metrics)


class PreemptionHook(Callback):
    def __init__(self):
        self.guard = PreemptionGuard()

    def on_train_begin(self, trainer, step: int) -> None:
        self.guard.__enter__()

    def on_step(self, trainer, info: StepInfo) -> None:
        info.preempted = self.guard.agreed()

    def close(self) -> None:
        self.guard.__exit__(None, None, None)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


class LogHook(Callback):
    """``global_step = N, loss = X`` (the Cerebras line, which users grep) and, on the same
    line, the learning rate, gradient norm, step time, tokens/s, MFU and time left: every
    ``every`` steps, on the run's first step (so a long log_steps still shows the run is
    alive) and on the last."""

    def __init__(self, every: int):
        self.log_every = max(1, every)
        self.first: int | None = None  # the run's first step is always logged

    def on_train_begin(self, trainer, step: int) -> None:
        self.first = step + 1
        rc, where = trainer.config.runconfig, trainer.md.path
        every = rc.save_checkpoints_steps
        log.info(
            "Checkpoints go to %s/model-ckpt-<step> (%s), TensorBoard summaries "
            "to %s/train every %d steps, the log to %s/train/run.log",
            where,
            f"every {every} steps and at the end" if every else "at the end",
            where,
            rc.save_summary_steps,
            where,
        )

    def on_step(self, trainer, info: StepInfo) -> None:
        if info.step % self.log_every and not info.last and info.step != self.first:
            return
        m = info.metrics
        log.info(
            "global_step = %d, loss = %.5f, lr = %.3e, grad_norm = %.4f, %.3f s/step, "
            "%.0f tokens/s, MFU %.3f, ETA %s",
            info.step,
            info.loss,
            m.get("train/lr", float("nan")),
            m.get("train/grad_norm", float("nan")),
            info.seconds,
            info.tokens_per_sec,
            info.mfu,
            _duration(info.eta_seconds),
        )


class ProgressHook(Callback):
    def __init__(self, start: int, target: int, enabled: bool | None):
        self.bar = Progress(start, target, enabled)

    def on_step(self, trainer, info: StepInfo) -> None:
        self.bar.update(info.loss, info.samples_per_sec)

    def close(self) -> None:
        self.bar.close()


class CheckpointHook(Callback):
    def __init__(self, every: int):
        self.save_every = every  # 0: only at the end (and on a signal)

    def on_step(self, trainer, info: StepInfo) -> None:
        periodic = self.save_every and info.step % self.save_every == 0
        if periodic or info.last or info.preempted:
            trainer.save_checkpoint(info.step)


class EvalHook(Callback):
    """train_and_eval: one evaluation pass after each checkpoint."""

    def on_checkpoint(self, trainer, step: int, path: Path) -> None:
        trainer.evaluate_now(step)


class ProfileHook(Callback):
    """A ``jax.profiler`` trace of the steps in ``runconfig.profile_steps``, into ``log_dir``.

    A trace starts before the first step of each run of consecutive chosen steps and stops after
    its last, so other steps cost nothing. Each step is a ``StepTraceAnnotation`` (TensorBoard's
    step view); the engine names its spans inside (wsjax/engine/step.py). The trace is written
    as TensorBoard's ``plugins/profile/<run>/*.xplane.pb`` and as Perfetto's
    ``perfetto_trace.json.gz`` next to it.
    """

    def __init__(self, steps: tuple[int, ...], log_dir: Path):
        self.steps, self.log_dir = frozenset(steps), log_dir
        self.tracing = False

    @contextlib.contextmanager
    def step_context(self, step: int):
        if step not in self.steps:
            yield
            return
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
            jax.profiler.stop_trace()
            self.tracing = False


def preempted_message(signum: int, step: int, path: Path) -> str:
    return (
        f"preempted by {signal.Signals(signum).name}: finished global step {step} and saved "
        f"{path}; rerun the same command to resume exactly"
    )


class Clock:
    """Mean step time since the loop began, for the ETA."""

    def __init__(self, start_step: int):
        self.t0, self.start_step = time.perf_counter(), start_step

    def eta(self, step: int, target: int) -> float:
        done = step - self.start_step
        return (time.perf_counter() - self.t0) / done * (target - step) if done else 0.0
