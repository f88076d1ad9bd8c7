"""Engine contracts the run relies on: non-finite steps skip the update, eval-only engines hold
no optimizer state (measured with ``jax.live_arrays()``, not the engine's own ledger).
"""

from __future__ import annotations

import gc

import jax
import numpy as np
import pytest

from wsjax.engine import StreamingEngine
from wsjax.engine.store import tree_bytes
from wsjax.models import get_model
from wsjax.reference import ResidentTrainer


def host_state(engine) -> tuple:
    return jax.tree.map(np.array, (engine.params_tree(), engine.opt_state_tree()))


@pytest.mark.parametrize("max_norm", [None, 0.5], ids=["no_clipping", "clipping"])
@pytest.mark.parametrize("poison", ["loss_mask", "weight"])
def test_nonfinite_step_applies_no_update(tiny_config, make_batches, max_norm, poison):
    """A NaN in the batch's loss mask (non-finite loss) or in a weight (non-finite gradients):
    the step reports update_skipped, master weights and optimizer state stay bitwise the same,
    ``engine.step`` advances, and the next good batch trains as if the bad one never came."""
    cfg = tiny_config("gptj", layers=2, optimizer={"max_gradient_norm": max_norm})
    model = get_model(cfg.model)
    params = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(0)))
    good, bad = make_batches(2, seed=9)
    if poison == "loss_mask":
        bad["loss_mask"][0, 0] = np.nan
    else:
        params = jax.tree.map(np.array, params)
        params["head"]["ln_f"]["scale"][3] = np.nan
        bad = good
    engine = StreamingEngine(model, cfg, params=jax.tree.map(np.array, params))
    before = host_state(engine)
    metrics = engine.train_step(bad)
    assert metrics["train/update_skipped"] == 1.0
    assert not np.isfinite(metrics["train/loss"]) or not np.isfinite(metrics["train/grad_norm"])
    assert engine.step == 1
    jax.tree.map(np.testing.assert_array_equal, host_state(engine), before)
    if poison == "weight":
        return
    # the skipped step changed nothing: a good step now equals a good step from the start
    fresh = StreamingEngine(model, cfg, params=jax.tree.map(np.array, params))
    want = fresh.train_step(good)
    got = engine.train_step(good)
    assert got["train/update_skipped"] == 0.0 and got["train/loss"] == want["train/loss"]
    jax.tree.map(np.testing.assert_array_equal, engine.params_tree(), fresh.params_tree())


def live_bytes() -> int:
    gc.collect()
    return sum(a.nbytes for a in jax.live_arrays())


def test_eval_only_engine_holds_no_optimizer_state(tiny_config, make_batches):
    """train=False: after construction and after an eval step, live arrays are the master
    weights and the stream copy (2 x params at fp32), where a training engine adds Adam's two
    moments (2 x params more); its evals equal the training engine's."""
    cfg = tiny_config("gptj")
    model = get_model(cfg.model)
    params = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(0)))
    param_bytes = tree_bytes(params)
    batch = make_batches(1, seed=2)[0]
    small = 64 << 10  # scalars, step counts, the eval step's transient inputs

    base = live_bytes()
    evaluator = StreamingEngine(model, cfg, params=params, train=False)
    built = live_bytes() - base
    got = evaluator.eval_step(batch)
    after_eval = live_bytes() - base
    assert 2 * param_bytes <= built <= 2 * param_bytes + small, (built, param_bytes)
    assert after_eval <= 2 * param_bytes + small, (after_eval, param_bytes)
    with pytest.raises(ValueError, match="train=False"):
        evaluator.train_step(batch)
    with pytest.raises(ValueError, match="train=False"):
        evaluator.opt_state_tree()
    del evaluator

    base = live_bytes()
    trainer = StreamingEngine(model, cfg, params=params)
    trainer_bytes = live_bytes() - base
    assert trainer_bytes >= 4 * param_bytes, (trainer_bytes, param_bytes)
    assert trainer.eval_step(batch) == got

    ref = ResidentTrainer(model, cfg.optimizer, seed=cfg.runconfig.seed)
    want = {k: float(v) for k, v in ref.eval_step(jax.tree.map(np.asarray, params), batch).items()}
    assert got["count"] == want["count"]
