"""Streaming with a bounded window: weights for the next ``depth`` items in flight.

:class:`WeightStream` issues host-to-device transfers in order and hands them out one by one
(:meth:`~WeightStream.take`); the step driver calls :meth:`~WeightStream.release` only after the
computation that used an item has finished, so at most ``depth + 1`` items are ever resident on
the device. An item whose host data do not exist yet (an offloaded kept value its own forward
has not produced) is not issued until they do. :class:`Residency` tracks the bytes the engine
has placed on the device and their peak (plus executables' temporaries).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import numpy as np


@dataclass
class StepStats:
    """Per-step instrumentation (seconds and bytes)."""

    h2d_wait: float = 0.0
    d2h_wait: float = 0.0
    update_wait: float = 0.0
    h2d_bytes: int = 0
    d2h_bytes: int = 0

    def as_metrics(self) -> dict[str, float]:
        return {
            "stream/h2d_wait_seconds": self.h2d_wait,
            "stream/d2h_wait_seconds": self.d2h_wait,
            "stream/update_wait_seconds": self.update_wait,
            "stream/h2d_bytes": float(self.h2d_bytes),
            "stream/d2h_bytes": float(self.d2h_bytes),
        }


@dataclass
class Residency:
    """Bytes the engine holds on the device, by name, and the peak including temporaries: the
    engine's own ledger (TensorBoard's ``memory/device_peak_bytes``), not a measurement.

    ``observers``: callables ``(event, name, nbytes)`` told of every placement (``"add"``),
    release (``"drop"``) and executable start (``"running"``, nbytes its scratch), before the
    ledger changes; a notebook or a benchmark measures what is really live at those moments."""

    live: dict[str, int] = field(default_factory=dict)
    peak: int = 0
    observers: list = field(default_factory=list)

    def add(self, name: str, nbytes: int) -> None:
        self._tell("add", name, nbytes)
        self.live[name] = self.live.get(name, 0) + nbytes
        self._bump(0)

    def drop(self, name: str) -> None:
        self._tell("drop", name, self.live.get(name, 0))
        self.live.pop(name, None)

    def running(self, temp_bytes: int) -> None:
        """An executable with ``temp_bytes`` of scratch is running now."""
        self._tell("running", "", temp_bytes)
        self._bump(temp_bytes)

    def _tell(self, event: str, name: str, nbytes: int) -> None:
        for observe in self.observers:
            observe(event, name, nbytes)

    def _bump(self, extra: int) -> None:
        self.peak = max(self.peak, sum(self.live.values()) + extra)


@dataclass
class Fetch:
    """One item of the weight stream: a name, its byte count and a thunk issuing the transfer."""

    name: str
    nbytes: int
    issue: Callable[[], object]
    pending_update: Callable[[], object] | None = None  # host update that must finish first
    data_exist: Callable[[], bool] | None = None  # host data that must exist before issuing


class WeightStream:
    """Issues ``fetches`` in order, at most ``depth + 1`` on the device at a time."""

    def __init__(self, fetches: list[Fetch], depth: int, stats: StepStats, residency: Residency):
        self._fetches = fetches
        self._window = depth + 1  # the item computed now, plus ``depth`` ahead of it
        self._stats = stats
        self._residency = residency
        self._issued: deque = deque()  # (residency key, device arrays), not yet taken
        self._taken: deque = deque()  # residency keys of taken, unreleased items
        self._next = 0
        self._top_up()

    def _top_up(self) -> None:
        while self._next < len(self._fetches) and len(self._issued) + len(self._taken) < (
            self._window
        ):
            fetch = self._fetches[self._next]
            if fetch.data_exist is not None and not fetch.data_exist():
                return  # issued once its data exist (the next take or release tries again)
            self._next += 1
            if fetch.pending_update is not None:  # this segment's host update must be done
                t0 = time.perf_counter()
                jax.block_until_ready(fetch.pending_update())
                self._stats.update_wait += time.perf_counter() - t0
            key = f"weights:{fetch.name}:{self._next}"
            self._residency.add(key, fetch.nbytes)
            self._stats.h2d_bytes += fetch.nbytes
            self._issued.append((key, fetch.issue()))

    def take(self):
        """The next item's device arrays, waiting (measured) until they have arrived."""
        self._top_up()
        if not self._issued:
            name = self._fetches[self._next].name
            raise RuntimeError(f"stream item {name} taken before its host data exist")
        key, arrays = self._issued.popleft()
        t0 = time.perf_counter()
        jax.block_until_ready(arrays)
        self._stats.h2d_wait += time.perf_counter() - t0
        self._taken.append(key)
        return arrays

    def release(self) -> None:
        """The computation that used the oldest taken item has finished: free its weights."""
        self._residency.drop(self._taken.popleft())
        self._top_up()


# ---- the batch: host -> devices --------------------------------------------------------
def split_batch(batch: dict, executables, placement, stats: StepStats):
    """(input_ids, labels, loss_mask), each a list of per-micro-batch device arrays."""
    micro, n = executables.micro, executables.n_micro

    def split(values, dtype):
        values = np.asarray(values, dtype)
        if placement.shards is None:
            parts = [values[i * micro : (i + 1) * micro] for i in range(n)]
            return [jax.device_put(part, placement.data) for part in parts]
        # several processes: ``values`` holds this process's rows of each micro-batch, in
        # micro-batch order (wsjax.engine.shards.process_rows)
        rows = micro // placement.shards.count
        shape = (micro, *values.shape[1:])
        parts = [values[i * rows : (i + 1) * rows] for i in range(n)]
        return [jax.make_array_from_process_local_data(placement.data, p, shape) for p in parts]

    stats.h2d_bytes += 3 * n * micro * executables.seq * 4
    return (
        split(batch["input_ids"], np.int32),
        split(batch["labels"], np.int32),
        split(batch["loss_mask"], np.float32),
    )
