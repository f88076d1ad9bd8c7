"""Streaming with a bounded window: weights for the next ``depth`` segments in flight.

:class:`WeightStream` issues transfers in order and hands them out one by one; the scheduler
calls :meth:`advance` only after the computation that used the previous item has finished, so
at most ``depth + 1`` items are ever resident on the device. :class:`Residency` tracks the bytes
the engine has placed on the device and their peak (plus executables' temporaries).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import jax


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
    """Bytes the engine holds on the device, by name, and the peak including temporaries."""

    live: dict[str, int] = field(default_factory=dict)
    peak: int = 0

    def add(self, name: str, nbytes: int) -> None:
        self.live[name] = self.live.get(name, 0) + nbytes
        self._bump(0)

    def drop(self, name: str) -> None:
        self.live.pop(name, None)

    def running(self, temp_bytes: int) -> None:
        """An executable with ``temp_bytes`` of scratch is running now."""
        self._bump(temp_bytes)

    def _bump(self, extra: int) -> None:
        self.peak = max(self.peak, sum(self.live.values()) + extra)


@dataclass
class Fetch:
    """One item of the weight stream: a name, its byte count and a thunk issuing the transfer."""

    name: str
    nbytes: int
    issue: Callable[[], object]
    ready: Callable[[], object] | None = None  # host-side dependency (a pending update)


class WeightStream:
    def __init__(self, fetches: list[Fetch], depth: int, stats: StepStats, residency: Residency):
        self._fetches = fetches
        self._depth = depth
        self._stats = stats
        self._res = residency
        self._queue: deque = deque()
        self._next = 0
        for _ in range(depth + 1):  # the item computed next, plus ``depth`` ahead of it
            self._issue()

    def _issue(self) -> None:
        if self._next >= len(self._fetches):
            return
        f = self._fetches[self._next]
        self._next += 1
        if f.ready is not None:  # the host update of this segment must have produced its copy
            t0 = time.perf_counter()
            jax.block_until_ready(f.ready())
            self._stats.update_wait += time.perf_counter() - t0
        self._res.add(f"weights:{f.name}:{self._next}", f.nbytes)
        self._stats.h2d_bytes += f.nbytes
        self._queue.append((f"weights:{f.name}:{self._next}", f.issue()))

    def take(self):
        """The next item's device arrays, waiting (measured) until they have arrived."""
        key, arrays = self._queue.popleft()
        t0 = time.perf_counter()
        jax.block_until_ready(arrays)
        self._stats.h2d_wait += time.perf_counter() - t0
        return key, arrays

    def release(self, key: str) -> None:
        """The computation that used ``key`` has finished: free it and issue the next fetch."""
        self._res.drop(key)
        self._issue()
