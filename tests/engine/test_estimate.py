"""The step estimate (wsjax.engine.estimate): its schedule by hand, and against measured steps."""

from __future__ import annotations

import statistics
import time

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
def test_estimate_is_within_25_percent_of_measured_steps(recompute):
    """The estimate (executables and transfers timed on this device) against real steps of the
    default run's model and batch (configs/params_gptj_tiny.yaml, synthetic tokens).

    The machine may be shared, so its load drifts: estimate and steps are interleaved in
    rounds, and the medians of both are compared, so both see the same load. Load from other
    processes (the suite's other workers, some of them several processes) slows a step more
    than its parts timed one by one: a step hands work between threads at every layer, and
    each handoff waits for a core. CI saw 0.72 once under that load (0.90-0.98 here, alone
    or beside one other step). So up to three attempts are made; an estimate that is really
    off (issue 14's was 4.9x the measured rate) fails all three."""
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

    def attempt() -> tuple[float, list, list]:
        estimates, steps = [], []
        for _ in range(5):
            times = measure_step_times(executables, train_set, engine.placement)
            # on CPU, transfers are copies by the computing cores: they add to compute
            step_s = estimate_step_seconds(
                times, num_layers=model.num_layers, n_micro=executables.n_micro, overlap=False
            )
            estimates.append(step_s)
            for _ in range(2):
                t0 = time.perf_counter()
                engine.train_step(batch)
                steps.append(time.perf_counter() - t0)
        return statistics.median(estimates) / statistics.median(steps), estimates, steps

    tries = []
    for _ in range(3):
        tries.append(attempt())
        if 0.75 <= tries[-1][0] <= 1.25:
            break
    assert 0.75 <= tries[-1][0] <= 1.25, tries
