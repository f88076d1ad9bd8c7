"""Metrics: the FLOPs formula, eval scalars, performance.json, TensorBoard events read back."""

from __future__ import annotations

import json
import math

import pytest

from wsjax.trainer.metrics import (
    Performance,
    Summaries,
    eval_scalars,
    model_flops_per_token,
)

KINDS = ("embed", "block", "head")


def test_model_flops_per_token_counts_matmul_params(tiny_config):
    from wsjax.models import get_model

    cfg = tiny_config("gptj", layers=2, hidden=64).model
    n = get_model(cfg).num_params()
    got = model_flops_per_token(cfg, n, 16)
    assert got == 6 * (n - cfg.vocab_size * 64) + 12 * 2 * 64 * 16
    tied = tiny_config("gpt2", layers=2, hidden=64).model  # learned positions, tied head
    n2 = get_model(tied).num_params()
    assert model_flops_per_token(tied, n2, 16) == 6 * (n2 - 32 * 64) + 12 * 2 * 64 * 16


def test_eval_scalars():
    out = eval_scalars(loss_sum=20.0, count=10.0, correct=4.0)
    assert out == {"loss": 2.0, "perplexity": pytest.approx(math.exp(2.0)), "accuracy": 0.4}


def test_performance_json_has_cerebras_keys(tmp_path):
    path = tmp_path / "performance" / "performance.json"
    Performance(compile_time=1.5, samples_per_sec=3.0).write(path)
    d = json.loads(path.read_text())
    for key in (
        "compile_time",
        "est_samples_per_sec",
        "programming_time",
        "samples_per_sec",
        "suspected_input_bottleneck",
        "total_samples",
        "total_time",
    ):
        assert key in d
    assert d["compile_time"] == 1.5


def test_events_read_back_with_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = Summaries(tmp_path)
    for step in (1, 2):
        tb.scalars("train", {"loss": 5.0 - step, "lr": 1e-3, "skip": None}, step)
    tb.scalars("eval", {"perplexity": 7.0}, 2)
    tb.close()
    acc = EventAccumulator(str(tmp_path / "train")).Reload()
    assert [e.value for e in acc.Scalars("loss")] == [4.0, 3.0]
    assert "skip" not in acc.Tags()["scalars"]
    ev = EventAccumulator(str(tmp_path / "eval")).Reload()
    assert ev.Scalars("perplexity")[0].step == 2
