"""The step estimate (wsjax.engine.estimate): its schedule by hand, and against measured steps."""

from __future__ import annotations

import statistics
import time
import types

import numpy as np
import pytest

from wsjax.engine.estimate import StepTimes, estimate_step_seconds, measure_step_times

KINDS = ("embed", "block", "head")


def test_estimate_follows_the_step_schedule():
    """Hand-computed: the zero fills (one per segment), per item max(compute x micro-batches,
    transfers), then the updates."""
    compute = {"embed_fwd": 1.0, "block_fwd": 2.0, "head": 3.0, "block_bwd": 4.0}
    compute |= {"embed_bwd": 5.0, "update/embed": 0.1, "update/block": 0.2, "update/head": 0.3}
    compute |= {"zeros/embed": 0.01, "zeros/block": 0.02, "zeros/head": 0.03}
    fills, updates = 0.01 + 3 * 0.02 + 0.03, 0.1 + 3 * 0.2 + 0.3
    fast = StepTimes(compute, dict.fromkeys(KINDS, 1e-3), dict.fromkeys(KINDS, 1e-3))
    t = estimate_step_seconds(fast, num_layers=3, n_micro=2)
    assert t == pytest.approx(fills + 2 * (1 + 3 * 2 + 3 + 3 * 4 + 5) + updates)
    # transfer-bound: weights in 100 s, gradients out 50 s (backward items carry both)
    slow = StepTimes(compute, dict.fromkeys(KINDS, 100.0), dict.fromkeys(KINDS, 50.0))
    t = estimate_step_seconds(slow, num_layers=3, n_micro=2)
    assert t == pytest.approx(fills + 4 * 100 + 5 * 150 + updates)
    # no overlap (a CPU device): compute and transfers add
    t = estimate_step_seconds(slow, num_layers=3, n_micro=2, overlap=False)
    assert t == pytest.approx(fills + 2 * 27 + 4 * 100 + 5 * 150 + updates)
    # tied embeddings: the head also fills the wte gradient
    tied = StepTimes(compute | {"zeros/g_wte": 7.0}, fast.to_device, fast.to_host)
    t_tied = estimate_step_seconds(tied, num_layers=3, n_micro=2)
    assert t_tied == pytest.approx(estimate_step_seconds(fast, num_layers=3, n_micro=2) + 7.0)


@pytest.mark.slow
@pytest.mark.parametrize("recompute", [True, False])
def test_estimate_is_within_25_percent_of_measured_steps(recompute, monkeypatch):
    """The estimate (executables and transfers timed on this device) against real steps of the
    default run's model and batch (configs/params_gptj_tiny.yaml, synthetic tokens).

    Both are timed in CPU seconds of this process (``time.process_time``, all its threads; the
    estimate's own clock is pointed at it): on the CPU backend a transfer is a copy by the same
    cores (``overlap=False``), so the step's CPU seconds are the sum of its parts', which is what
    the estimate adds up, plus the engine's own work between them (dispatch, bookkeeping).
    Other processes' load does not move that ratio: it lengthens wall time (a step hands work
    between threads at every layer, each handoff waiting for a core: CI once saw 0.72 in wall
    seconds) but not the CPU seconds this process spends. Measured here: 0.96-1.03 alone,
    0.91-0.98 beside two busy processes on the 2 cores (load 14). So one attempt, and the
    window is the estimate's stated accuracy, 25%; an estimate that is really off (issue 14's
    was 4.9x the measured rate) fails it. Estimate and steps are interleaved in rounds and
    their medians compared."""
    import wsjax.engine.estimate
    from tests.helpers import TINY
    from wsjax.config import load_config
    from wsjax.engine import StreamingEngine
    from wsjax.models import get_model

    synthetic = "train_input.data_processor=SyntheticDataProcessor"
    cfg = load_config(TINY, [synthetic, f"streaming.recompute={recompute}"])
    model = get_model(cfg.model)
    engine = StreamingEngine(model, cfg)
    rng = np.random.default_rng(0)
    shape = (cfg.train_input.batch_size, cfg.train_input.max_sequence_length)
    ids = rng.integers(0, cfg.model.vocab_size, shape).astype(np.int32)
    batch = {"input_ids": ids, "labels": ids, "loss_mask": np.ones(shape, np.float32)}
    engine.train_step(batch)  # compiles
    executables = engine.executables(shape, train=True)
    train_set = executables.training(recompute=recompute)
    cpu_clock = types.SimpleNamespace(perf_counter=time.process_time)
    monkeypatch.setattr(wsjax.engine.estimate, "time", cpu_clock)

    estimates, steps = [], []
    for _ in range(5):
        times = measure_step_times(executables, train_set, engine.placement)
        # on CPU, transfers are copies by the computing cores: they add to compute
        step_s = estimate_step_seconds(
            times, num_layers=model.num_layers, n_micro=executables.n_micro, overlap=False
        )
        estimates.append(step_s)
        for _ in range(2):
            t0 = time.process_time()
            engine.train_step(batch)
            steps.append(time.process_time() - t0)
    ratio = statistics.median(estimates) / statistics.median(steps)
    assert 0.75 <= ratio <= 1.25, (ratio, estimates, steps)
