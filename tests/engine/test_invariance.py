"""Knob invariance of the streaming engine: prefetch depth, optimizer placement, activation
offload, and the number of local devices do not change the result.

Every run here is float64 (jax_enable_x64, a float64 model and master weights, as
tests/engine/test_exact.py), so no tolerance depends on a machine's fp32 rounding. Knobs that
move no arithmetic (prefetch depth, offloading a kept value) must give bitwise the same run.
Knobs that reorder sums (kept VJP residuals instead of a recomputed forward, the update on the
device instead of the host, the batch's gradient summed over two devices) agree to TOL64, from
float64 arithmetic: unit roundoff u = 2^-53 = 1.1e-16; a gradient ends a chain of about
n = 10^3 roundings (3 layers of dot products of length <= 128, their backward, the sum over
the batch's 128 tokens), so two summation orders differ by at most 2 n u = 2.2e-13 relative to
the gradient's scale. Adam's update m / (sqrt(v) + eps) is invariant to the gradient's scale
where |g| >> eps, so it passes that relative error on (entries never reached are exact zeros in
both runs: GPT-J has no parameter whose gradient is rounding noise), and 3 steps add at most 3
such errors to the parameters: 6.6e-13 < TOL64 = 1e-12 per leaf, norm-wise, and for the losses.
A real discrepancy (a lost micro-batch, a stale weight, a wrong clip factor) is >= 1e-4.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import REPO
from wsjax.engine import StreamingEngine
from wsjax.models import get_model

STEPS = 3
BASE = {"optimizer": {"max_gradient_norm": 0.5}}  # clipping active (norms ~1-2)
TOL64 = 1e-12  # derived in the module docstring


def float64_model(cfg):
    """(model computing in float64, its init params in float64) for ``cfg``'s seed."""
    model = get_model(cfg.model)
    init = model.init(jax.random.PRNGKey(cfg.runconfig.seed))
    model.compute_dtype = jnp.float64  # the segment protocol's compute dtype
    return model, jax.tree.map(lambda a: np.asarray(a, np.float64), init)


class Runs:
    def __init__(self, tiny_config, make_batches, x64):
        self.tiny_config = tiny_config
        self.batches = make_batches(STEPS, seed=1)
        self.x64 = x64

    @functools.cache  # noqa: B019 (one object per module-scoped fixture)
    def run(self, **streaming):
        """3 float64 steps from the init of the config's seed: (losses, params)."""
        cfg = self.tiny_config("gptj", streaming=streaming, **BASE)
        model, params = float64_model(cfg)
        with self.x64():
            engine = StreamingEngine(model, cfg, params=params)
            losses = np.asarray([engine.train_step(b)["train/loss"] for b in self.batches])
            out = jax.tree.map(np.asarray, engine.params_tree())
        assert jax.tree.leaves(out)[0].dtype == np.float64
        return losses, out


@pytest.fixture(scope="module")
def runs(tiny_config, make_batches, x64):
    return Runs(tiny_config, make_batches, x64)


def assert_bitwise(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("depth", [2, 3])
def test_prefetch_depth_is_bitwise_invariant(runs, depth):
    losses, params = runs.run(prefetch_depth=depth)
    base_losses, base_params = runs.run()
    np.testing.assert_array_equal(losses, base_losses)
    assert_bitwise(params, base_params)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_activation_offload_is_bitwise_invariant(runs, depth):
    """Offloaded block inputs come back bit for bit at every prefetch depth, also deeper than
    the model (3 layers): a backward fetch is never issued before its forward kept the value."""
    losses, params = runs.run(activation_offload=True, prefetch_depth=depth)
    base_losses, base_params = runs.run()
    np.testing.assert_array_equal(losses, base_losses)
    assert_bitwise(params, base_params)


def _alive(cls) -> int:
    return sum(1 for o in gc.get_objects() if type(o) is cls)


@pytest.mark.parametrize("streaming", [{"activation_offload": True, "prefetch_depth": 3}, {}])
def test_past_steps_are_freed(tiny_config, make_batches, streaming):
    """No reference cycle keeps a finished step alive: with the cycle collector off, no step
    state or weight stream survives its step, and live device arrays do not grow over steps."""
    from wsjax.engine.step import WeightStream, _TrainState

    cfg = tiny_config("gptj", layers=2, streaming=streaming)
    engine = StreamingEngine(get_model(cfg.model), cfg)
    batches = make_batches(2, seed=4)
    engine.train_step(batches[0])  # compiles
    gc.collect()
    gc.disable()  # what survives now is kept by references, not waiting for the collector
    try:
        live = []
        for i in range(6):
            engine.train_step(batches[i % 2])
            arrays = jax.live_arrays()
            live.append((len(arrays), sum(a.nbytes for a in arrays)))
            del arrays
        alive = (_alive(_TrainState), _alive(WeightStream))
    finally:
        gc.enable()
    assert alive == (0, 0)
    assert len(set(live)) == 1, live  # same count and bytes after every step


def test_keeping_residuals_matches_recompute(runs, rel_err):
    """recompute: false (VJP residuals kept) computes the same step as recomputing the forward;
    with offload the residuals round-trip through host memory bit for bit."""
    losses, params = runs.run(recompute=False)
    base_losses, base_params = runs.run()
    assert rel_err(losses, base_losses)[1] <= TOL64
    key, err = rel_err(params, base_params)
    assert err <= TOL64, f"{key}: {err:.3g}"
    off_losses, off_params = runs.run(recompute=False, activation_offload=True)
    np.testing.assert_array_equal(off_losses, losses)
    assert_bitwise(off_params, params)


def test_device_optimizer_placement_matches_host(runs, rel_err):
    losses, params = runs.run(optimizer_placement="device")
    base_losses, base_params = runs.run()
    assert rel_err(losses, base_losses)[1] <= TOL64
    key, err = rel_err(params, base_params)
    assert err <= TOL64, f"{key}: {err:.3g}"


_TWO_DEVICE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from wsjax.config import config_from_dict
    from wsjax.engine import StreamingEngine
    from tests.engine.test_invariance import float64_model
    cfg_dict, batch_file, out_file = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    cfg = config_from_dict(cfg_dict)
    data = np.load(batch_file)
    batches = [{k: data[f"{k}{i}"] for k in ("input_ids", "labels", "loss_mask")}
               for i in range(int(data["n"]))]
    model, params = float64_model(cfg)  # the init as the parent draws it: before x64
    jax.config.update("jax_enable_x64", True)
    engine = StreamingEngine(model, cfg, params=params)
    losses = [engine.train_step(b)["train/loss"] for b in batches]
    flat = jax.tree_util.tree_flatten_with_path(engine.params_tree())[0]
    np.savez(out_file, **{jax.tree_util.keystr(p): np.asarray(a) for p, a in flat})
    print(json.dumps({"devices": len(jax.local_devices()), "mesh": int(engine.mesh.devices.size),
                      "losses": losses}))
    """
)


def test_two_local_devices_match_one(runs, config_dict, tmp_path, rel_err):
    """Batch sharded over a 2-device data mesh (the default mesh) == 1 device, within TOL64."""
    batch_file = tmp_path / "batches.npz"
    arrays = {f"{k}{i}": b[k] for i, b in enumerate(runs.batches) for k in b}
    np.savez(batch_file, n=len(runs.batches), **arrays)
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu"
    )
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-c", _TWO_DEVICE_SCRIPT, json.dumps(config_dict("gptj", **BASE))]
    cmd += [str(batch_file), str(tmp_path / "params.npz")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 2 and out["mesh"] == 2
    base_losses, base_params = runs.run()
    assert rel_err(np.asarray(out["losses"]), base_losses)[1] <= TOL64
    flat = jax.tree_util.tree_flatten_with_path(base_params)[0]
    got = np.load(tmp_path / "params.npz")
    two = [got[jax.tree_util.keystr(p)] for p, _ in flat]
    assert {a.dtype for a in two} == {np.dtype(np.float64)}
    key, err = rel_err(two, [a for _, a in flat])
    assert err <= TOL64, f"leaf {key}: {err:.3g}"
