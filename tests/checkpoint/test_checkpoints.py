"""Checkpoints: model-ckpt-<step> naming, keep, NamedTuple optimizer state, shape errors."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from wsjax.checkpoint import Checkpoints, check_shapes
from wsjax.engine.store import opt_state_shapes
from wsjax.errors import CheckpointError
from wsjax.interop.load import load_start
from wsjax.models import get_model
from wsjax.optim import make_optimizer


def _state(tiny_config, **kw):
    cfg = tiny_config("gptj", layers=2, **kw)
    model = get_model(cfg.model)
    opt = make_optimizer(cfg.optimizer)
    params = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(0)))
    shapes = opt_state_shapes(opt, model.param_shapes(), model.num_layers)
    opt_state = jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype), shapes)
    return model, opt, params, opt_state


def test_save_restore_roundtrip_names_and_keep(tmp_path, tiny_config):
    model, opt, params, opt_state = _state(tiny_config)
    ck = Checkpoints(tmp_path, keep=2)
    for step in (2, 4, 6):
        ck.save(step, params, opt_state, {"step": step, "loader": {"epoch": 0, "index": step}})
    (tmp_path / "model-ckpt-8.orbax-checkpoint-tmp-123").mkdir()  # a crashed save: ignored
    assert ck.steps() == [4, 6]
    assert sorted(p.name for p in tmp_path.glob("model-ckpt-?")) == ["model-ckpt-4", "model-ckpt-6"]
    p2, o2, meta = ck.restore(
        6, model.param_shapes(), opt_state_shapes(opt, model.param_shapes(), model.num_layers)
    )
    assert meta["loader"]["index"] == 6
    assert jax.tree.structure(o2) == jax.tree.structure(opt_state)  # NamedTuples restored
    for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    start = load_start(tmp_path, model, opt, weights_only=False)  # a model_dir: its latest
    assert (start.step, start.loader_state["index"]) == (6, 6)
    start = load_start(tmp_path / "model-ckpt-4", model, opt, weights_only=True)
    assert start.step == 0 and start.opt_state is None and start.params is not None


def test_other_shape_names_the_parameter(tmp_path, tiny_config):
    _, _, params, opt_state = _state(tiny_config)
    Checkpoints(tmp_path).save(1, params, opt_state, {"step": 1})
    cfg = tiny_config("gptj", layers=2, hidden=32)
    other = get_model(cfg.model)
    with pytest.raises(CheckpointError, match=r"parameter \S+ has shape \(.*\), the model expects"):
        load_start(
            tmp_path / "model-ckpt-1", other, make_optimizer(cfg.optimizer), weights_only=True
        )


def test_check_shapes_missing_and_extra():
    want = {"a": jax.ShapeDtypeStruct((2, 3), np.float32)}
    with pytest.raises(CheckpointError, match="has no parameter a"):
        check_shapes(want, {"b": (2, 3)}, "ckpt")
    with pytest.raises(CheckpointError, match="parameter b is not in the model"):
        check_shapes(want, {"a": (2, 3), "b": (1,)}, "ckpt")


def test_missing_or_foreign_path(tmp_path, tiny_config):
    model, opt, _, _ = _state(tiny_config)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_start(tmp_path / "nope", model, opt, weights_only=True)
    with pytest.raises(CheckpointError, match="neither an orbax checkpoint"):
        load_start(tmp_path, model, opt, weights_only=True)
