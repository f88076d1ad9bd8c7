"""The two fault policies that act inside the training loop.

- A non-finite loss or gradient norm stops the run at that step (NonFiniteError, exit 4) and
  writes nothing; with ``runconfig.on_nonfinite: skip`` the engine's skipped update is counted
  (log, TensorBoard ``skipped_updates``) and ``max_consecutive_skips`` in a row stop the run.
  A checkpoint holding a NaN or an infinity is refused by wsjax.checkpoint anyway.
- SIGTERM / SIGINT finish the current step, save a checkpoint and raise Preempted (exit 5); a
  second signal stops the process at once with one line, exit 5. Resuming from that checkpoint
  is exact. An evaluation pass (eval modes, and train_and_eval's after a checkpoint) stops at
  its next batch (:func:`stoppable`, :func:`stop_requested`), one line, exit 5. Elsewhere outside
  the training loop (init, compile, export) a signal stops at once, one line, exit 5: there is
  nothing of this run to save (:func:`exit_on_signal`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

from wsjax.errors import EXIT_PREEMPTED, NonFiniteError

log = logging.getLogger("wsjax.train")


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


def _stop_now(what: str):
    """A handler that writes one line and ends the process with exit 5 (no cleanup: what a
    killed writer leaves is cleared by the next run)."""

    def stop(signum, frame) -> None:
        name = signal.Signals(signum).name
        line = f"error: {name}: {what}; the latest complete checkpoint is kept (rerun to resume)"
        os.write(2, (line + "\n").encode())
        os._exit(EXIT_PREEMPTED)

    return stop


@contextlib.contextmanager
def exit_on_signal():
    """SIGTERM / SIGINT end the process at once, one line, exit 5, until the training loop's
    PreemptionGuard takes over (and again after it): during init, compile, eval or export
    nothing of this run is there to save. Only in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stop = _stop_now("stopped before any step of this run could be saved")
    before = {s: signal.signal(s, stop) for s in PreemptionGuard.SIGNALS}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


class PreemptionGuard:
    """While active: the first SIGTERM / SIGINT is recorded in ``signal`` for the loop to act on
    after its step; a second one then stops the process at once (one line, exit 5).
    Outside the main thread (signals cannot be caught there) it does nothing.

    The handler only records: it runs between two bytecodes of the main thread, which may be
    inside a log handler's flush, and logging from there re-enters that stream (``reentrant
    call inside BufferedWriter``). The line saying the signal was received is written by a
    small thread the handler wakes through a ``queue.SimpleQueue`` (whose ``put`` is safe in a
    signal handler)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal: int | None = None
        self._before: dict = {}
        self._notes: queue.SimpleQueue = queue.SimpleQueue()
        self._announcer: threading.Thread | None = None

    def _record(self, signum, frame) -> None:
        self.signal = signum
        for s in self.SIGNALS:
            signal.signal(s, _stop_now("a second signal: stopped at once without saving"))
        self._notes.put(signum)

    def _announce(self) -> None:
        while (signum := self._notes.get()) is not None:
            log.warning(
                "received %s: finishing this step, then saving a checkpoint (a second signal "
                "stops at once)",
                signal.Signals(signum).name,
            )

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            self._announcer = threading.Thread(
                target=self._announce, name="wsjax-signal-note", daemon=True
            )
            self._announcer.start()
            self._before = {s: signal.signal(s, self._record) for s in self.SIGNALS}
        _active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._before.items():
            signal.signal(s, handler)
        self._before = {}
        if self._announcer is not None:
            self._notes.put(None)  # after any signal's note: that line is written first
            self._announcer.join()
            self._announcer = None
        if self in _active:
            _active.remove(self)

    def agreed(self) -> int | None:
        """The signal, as every process sees it after this step: with several processes one
        that got it makes all of them save at the same step (they save together)."""
        if jax.process_count() == 1:
            return self.signal
        flags = multihost_utils.process_allgather(np.asarray(self.signal or 0, np.int32))
        found = int(np.max(flags))
        return found or None


_active: list[PreemptionGuard] = []  # the guards entered and not yet left, innermost last


def stop_requested() -> int | None:
    """The signal every process agrees it got, while a :class:`PreemptionGuard` is active (the
    training loop's, or :func:`stoppable`'s); else None. A long pass inside one step (an
    evaluation) asks between its batches, so it stops at the next batch."""
    return _active[-1].agreed() if _active else None


@contextlib.contextmanager
def stoppable():
    """A :class:`PreemptionGuard` for an evaluation pass, unless one is active already (the
    training loop's, in train_and_eval): a signal then stops the pass at its next batch
    (:func:`stop_requested`) instead of at once."""
    if _active:
        yield
        return
    with PreemptionGuard():
        yield
