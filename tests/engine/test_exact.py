"""Streaming engine vs the resident reference: exactness, micro-batching, eval, compile once.

Exactness is checked in float64 (``jax_enable_x64`` and a float64 model): engine and reference
compute the same maths in different summation orders, so they agree to float64 rounding noise
(<= 1.1e-14 measured on params, mu, nu; TOL64 = 1e-12 leaves ~100x room) on any CPU, while a
real discrepancy (a wrong clip factor, a lost micro-batch) is >= 1e-4. In fp32 the same
comparison is only as good as fp32 rounding, which depends on the CPU's vector width; there the
engine is checked against the float64 truth to be no less accurate than the fp32 reference step
(see ``test_fp32_engine_as_accurate_as_fp32_reference``).

Errors are norm-wise relative, per leaf: ``||engine - reference|| / ||reference||``. Elementwise
relative error is the wrong yardstick here: Adam divides by sqrt(nu), which amplifies the
summation-order noise of near-zero gradient entries into O(1) elementwise differences of tiny
updates, while the leaf as a whole agrees.
"""

from __future__ import annotations

import contextlib
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from wsjax.engine import StreamingEngine
from wsjax.models import get_model
from wsjax.reference import ResidentTrainer

TOL64 = 1e-12
MAX_NORM = 0.5  # below the observed global gradient norms (~1-2), so clipping is active
STEPS = 3


def init_params(model, seed: int = 0, dtype=np.float32) -> dict:
    return jax.tree.map(lambda a: np.asarray(a, dtype), model.init(jax.random.PRNGKey(seed)))


def run_engine(model, cfg, params, batches):
    engine = StreamingEngine(model, cfg, params=jax.tree.map(np.array, params))
    return engine, [engine.train_step(b) for b in batches]


def run_reference(model, cfg, params, batches):
    ref = ResidentTrainer(model, cfg.optimizer, seed=cfg.runconfig.seed)
    state = ref.init_state(jax.tree.map(jnp.asarray, params))
    metrics = []
    for b in batches:
        state, m = ref.train_step(state, b)
        metrics.append({k: float(v) for k, v in m.items()})
    return ref, state, metrics


def adam_state(opt_state) -> optax.ScaleByAdamState:
    """The one ScaleByAdamState inside a (possibly chained / nested) optax state."""
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(s)]
    assert len(found) == 1, f"expected one ScaleByAdamState, found {len(found)}"
    return found[0]


def engine_moments(engine) -> dict:
    """{"mu", "nu", "count"}: each segment's Adam state joined into one whole-model tree."""
    per_seg = {k: adam_state(v) for k, v in engine.opt_state_tree().items()}
    return {
        "mu": {k: s.mu for k, s in per_seg.items()},
        "nu": {k: s.nu for k, s in per_seg.items()},
        "count": {k: np.asarray(s.count) for k, s in per_seg.items()},
    }


class Runs:
    """Engine and reference runs of this module, computed once and shared by the tests.

    ``precision`` "f32" is the model as configured; "f64" the same model and initial values in
    float64 (compute dtype and master weights), run with jax_enable_x64.
    """

    def __init__(self, tiny_config, make_batches, x64):
        self.tiny_config = tiny_config
        self.batches = make_batches(STEPS, seed=0)
        self.x64 = x64
        self._engines: dict[tuple, tuple] = {}

    @functools.cache  # noqa: B019 (one object per module-scoped fixture)
    def model(self, family: str, precision: str):
        """The model (its config carries no optimizer / streaming knob) and its init params."""
        model = get_model(self.tiny_config(family).model)
        params = init_params(model)
        if precision == "f64":
            model.compute_dtype = jnp.float64  # the segment protocol's compute dtype
            params = jax.tree.map(lambda a: a.astype(np.float64), params)
        return model, params

    def config(self, family: str, knob: tuple = ()):
        """``family`` with clipping; ``knob`` = ((section, key, value), ...)."""
        sections = {"optimizer": {"max_gradient_norm": MAX_NORM}}
        for section, key, value in knob:
            sections.setdefault(section, {})[key] = value
        return self.tiny_config(family, **sections)

    def _precision(self, precision: str):
        return self.x64() if precision == "f64" else contextlib.nullcontext()

    @functools.cache  # noqa: B019 (one object per module-scoped fixture)
    def reference(self, family: str, precision: str, knob: tuple = ()):
        model, params = self.model(family, precision)
        with self._precision(precision):
            return run_reference(model, self.config(family, knob), params, self.batches)

    def engine(self, family: str, precision: str, knob: tuple = ()):
        """Knobs that resolve to the same config share one run: with a batch of 8,
        grad_accum_steps=4 and micro_batch_size=2 each derive the other (config/sections.py's
        cross-check), so the engine built from either is the same engine on the same inputs."""
        cfg = self.config(family, knob)
        key = (family, precision, json.dumps(cfg.to_dict(), sort_keys=True, default=str))
        if key not in self._engines:
            model, params = self.model(family, precision)
            with self._precision(precision):
                self._engines[key] = run_engine(model, cfg, params, self.batches)
        return self._engines[key]


@pytest.fixture(scope="module")
def runs(tiny_config, make_batches, x64):
    return Runs(tiny_config, make_batches, x64)


def assert_close(rel_err, a, b, tol, what):
    key, err = rel_err(a, b)
    assert err <= tol, f"{what}: {key} norm-wise relative error {err:.3g} > {tol:g}"


def split_key_bias(params: dict, tied: bool) -> tuple[dict, np.ndarray | None]:
    """GPT-2: (params with c_attn's bias reduced to its q and v thirds, the k third).

    The key bias has a mathematically zero gradient (softmax is invariant to adding q.b_k to
    every score of a row): its gradient is float noise, which Adam turns into noise-sized
    updates that differ between any two summation orders. It is checked for staying at noise
    level, the rest of the leaf for exactness.
    """
    if not tied:
        return params, None
    params = jax.tree.map(np.asarray, params)
    bias = params["blocks"]["attn"]["c_attn"]["bias"]  # (L, 3D): q | k | v
    d = bias.shape[-1] // 3
    params["blocks"]["attn"]["c_attn"]["bias"] = np.concatenate([bias[:, :d], bias[:, 2 * d :]], -1)
    return params, bias[:, d : 2 * d]


def losses(metrics, key="train/loss"):
    return np.asarray([m[key] for m in metrics])


def check_against_reference(rel_err, engine, em, state, rm, tol):
    """Losses, grad norms, params and Adam mu / nu of ``engine`` equal the reference's."""
    assert_close(rel_err, losses(em), losses(rm, "loss"), tol, "loss")
    assert_close(rel_err, losses(em, "train/grad_norm"), losses(rm, "grad_norm"), tol, "norm")
    got, got_kb = split_key_bias(engine.params_tree(), engine.model.tied)
    want, want_kb = split_key_bias(state.params, engine.model.tied)
    assert_close(rel_err, got, want, tol, "params")
    if got_kb is not None:  # noise-level, never a real move (lr * steps = 3e-3 per element)
        assert np.linalg.norm(got_kb) < 1e-4 and np.linalg.norm(want_kb) < 1e-4
    ref_adam = adam_state(state.opt_state)
    mom = engine_moments(engine)
    assert_close(rel_err, mom["mu"], ref_adam.mu, tol, "adam mu")
    assert_close(rel_err, mom["nu"], ref_adam.nu, tol, "adam nu")
    assert int(ref_adam.count) == STEPS
    for seg, count in mom["count"].items():
        assert np.all(count == STEPS), (seg, count)


@pytest.mark.parametrize("family", ["gptj", "gpt2", "neox", "llama"])
def test_matches_reference_with_clipping(runs, rel_err, family):
    """float64, 3 steps: losses, grad norms, params and Adam mu / nu equal the reference (llama:
    grouped-query attention, llama3 RoPE scaling and a sliding window, tests/helpers.py)."""
    engine, em = runs.engine(family, "f64")
    _, state, rm = runs.reference(family, "f64")
    assert engine.model.tied == (family == "gpt2")
    assert jax.tree.leaves(engine.params_tree())[0].dtype == np.float64
    # clipping really happened on every step, in both
    assert all(m["train/grad_norm"] > MAX_NORM for m in em), losses(em, "train/grad_norm")
    assert all(m["grad_norm"] > MAX_NORM for m in rm)
    check_against_reference(rel_err, engine, em, state, rm, TOL64)


MICRO_BATCHING = [(("optimizer", "grad_accum_steps", 4),), (("streaming", "micro_batch_size", 2),)]


@pytest.mark.parametrize("family", ["gptj", "gpt2", "neox", "llama"])
@pytest.mark.parametrize("knob", MICRO_BATCHING, ids=["grad_accum_steps=4", "micro_batch_size=2"])
def test_micro_batching_equals_whole_batch(runs, rel_err, family, knob):
    """float64: 4 micro-batches of 2 == one batch of 8 == the reference."""
    engine, em = runs.engine(family, "f64", knob)
    whole, _ = runs.engine(family, "f64")
    _, state, rm = runs.reference(family, "f64")
    assert engine.executables((8, 16), train=True).n_micro == 4
    assert whole.executables((8, 16), train=True).n_micro == 1
    check_against_reference(rel_err, engine, em, state, rm, TOL64)


OFFLOAD = [
    (("streaming", "activation_offload", True), ("streaming", "prefetch_depth", 3)),
    (
        ("streaming", "activation_offload", True),
        ("streaming", "prefetch_depth", 4),
        ("streaming", "recompute", False),
    ),
]


@pytest.mark.parametrize("knob", OFFLOAD, ids=["offload_depth3", "offload_depth4_keep_residuals"])
def test_offload_matches_reference(runs, rel_err, knob):
    """float64: activation offload (prefetch deeper than half the stream) == the reference."""
    engine, em = runs.engine("gptj", "f64", knob)
    _, state, rm = runs.reference("gptj", "f64")
    check_against_reference(rel_err, engine, em, state, rm, TOL64)


# fp32: both steps round at unit roundoff U32 per operation; the longest reduction feeding a
# weight gradient sums over the batch's N = 8 x 16 tokens, whose rounding grows like
# U32 * sqrt(N) (random-walk model); 3 Adam steps and nu ~ g^2 at most double it a few times.
# FP32_FLOOR = 16 * U32 * sqrt(N) covers that for leaves where the reference happens to round
# almost exactly; otherwise the engine may be at most FP32_FACTOR x less accurate than the
# reference (independent rounding walks of the same length have the same size).
U32 = float(np.finfo(np.float32).eps) / 2
FP32_FLOOR = 16 * U32 * np.sqrt(8 * 16)
FP32_FACTOR = 4.0


@pytest.mark.parametrize("family", ["gptj", "gpt2"])
def test_fp32_engine_as_accurate_as_fp32_reference(runs, rel_err, family):
    """fp32 engine and fp32 reference, each against the float64 truth, leaf by leaf: the
    engine's error is within FP32_FACTOR x the reference's own, or below FP32_FLOOR."""
    engine, em = runs.engine(family, "f32")
    _, state, rm = runs.reference(family, "f32")
    _, truth, tm = runs.reference(family, "f64")
    tied = engine.model.tied
    got = split_key_bias(engine.params_tree(), tied)[0]
    ref = split_key_bias(state.params, tied)[0]
    want = split_key_bias(truth.params, tied)[0]
    mom, ref_adam, true_adam = (
        engine_moments(engine),
        adam_state(state.opt_state),
        adam_state(truth.opt_state),
    )
    pairs = {
        "loss": (losses(em), losses(rm, "loss"), losses(tm, "loss")),
        "params": (got, ref, want),
        "mu": (mom["mu"], ref_adam.mu, true_adam.mu),
        "nu": (mom["nu"], ref_adam.nu, true_adam.nu),
    }
    for what, (engine_val, ref_val, true_val) in pairs.items():
        flat_engine = jax.tree_util.tree_flatten_with_path(engine_val)[0]
        flat_ref, flat_true = jax.tree.leaves(ref_val), jax.tree.leaves(true_val)
        for (path, e), r, t in zip(flat_engine, flat_ref, flat_true, strict=True):
            engine_err, ref_err = rel_err(e, t)[1], rel_err(r, t)[1]
            bound = FP32_FACTOR * ref_err + FP32_FLOOR
            where = f"{what}{jax.tree_util.keystr(path)}"
            assert engine_err <= bound, (
                f"{where}: {engine_err:.3g} > {bound:.3g} (ref {ref_err:.3g})"
            )


def test_eval_matches_reference(runs, make_batches, x64):
    """float64: the eval step's loss sum, count and correct tokens equal the reference's."""
    engine, _ = runs.engine("gptj", "f64")
    ref, state, _ = runs.reference("gptj", "f64")
    batch = make_batches(1, seed=7)[0]
    with x64():
        got = engine.eval_step(batch)
        want = {k: float(v) for k, v in ref.eval_step(state.params, batch).items()}
    assert got["count"] == want["count"] == float(batch["loss_mask"].sum())
    assert abs(got["loss_sum"] - want["loss_sum"]) <= TOL64 * abs(want["loss_sum"])
    assert got["correct"] == want["correct"]
    assert 0 <= got["correct"] <= got["count"]


def test_each_executable_compiled_once(runs, make_batches):
    """More steps (and evals) of a shape compile nothing new; one record per executable."""
    engine, _ = runs.engine("gptj", "f32")
    batches = make_batches(2, seed=11)
    engine.eval_step(batches[0])
    n = engine.num_executables
    # embed_fwd, block_fwd, head_train, block_bwd, embed_bwd, update/{embed,block,head},
    # zeros/{embed,block,head} (the gradient accumulators), head_eval
    assert n == 12, [r.name for r in engine.cache.records]
    for b in batches:
        engine.train_step(b)
        engine.eval_step(b)
    assert engine.num_executables == n
    names = [r.name for r in engine.cache.records]
    assert len(names) == len(set(names)) == n


@pytest.mark.parametrize("family", ["gptj", "gpt2"])
def test_zero_fills_cover_each_gradient_once(runs, family):
    """A step's zero fills make each gradient accumulator once: tied (GPT-2), wte's gradient
    is the head's fill, so the embed fill leaves it out (it was filled and thrown away, a
    vocab x hidden fp32 write every step)."""
    engine, _ = runs.engine(family, "f32")
    executables = engine.executables((8, 16), train=True)
    train_set = executables.training(recompute=False)
    filled = {name: fill() for name, fill in train_set.zeros.items()}
    assert ("g_wte" in filled) == engine.model.tied
    counted = [a.nbytes for a in jax.tree.leaves(filled)]
    grads = [a.size * a.dtype.itemsize for a in jax.tree.leaves(executables.grads)]
    assert sorted(counted) == sorted(grads)
    assert all(not np.any(np.asarray(a)) for a in jax.tree.leaves(filled))


def test_engine_leaves_callers_params_usable(tiny_config, make_batches):
    """Training must not delete (donate) the arrays the caller passed as ``params``."""
    cfg = tiny_config("gptj", layers=2)
    model = get_model(cfg.model)
    params = model.init(jax.random.PRNGKey(0))  # jax arrays, as from model.init / a checkpoint
    before = jax.tree.map(np.array, params)
    engine = StreamingEngine(model, cfg, params=params)
    engine.train_step(make_batches(1)[0])
    after = jax.tree.map(np.asarray, params)  # raises if the engine donated the caller's buffers
    jax.tree.map(np.testing.assert_array_equal, after, before)


def test_serialized_executables_reload_bitwise_and_survive_corruption(
    tmp_path, tiny_config, make_batches
):
    """With a compile dir, a second engine loads its executables from disk (no tracing) and
    trains bitwise like the first; a damaged file is compiled again, not trusted."""
    from wsjax.trainer.run_dir import use_compile_dir

    cfg = tiny_config("gptj", layers=2)
    batch = make_batches(1, seed=5)[0]

    def two_steps():
        engine = StreamingEngine(get_model(cfg.model), cfg)
        return [engine.train_step(batch)["train/loss"] for _ in range(2)], engine

    with use_compile_dir(tmp_path):
        cold, _ = two_steps()
        files = sorted((tmp_path / "wsjax-executables").glob("*.bin"))
        assert len(files) == 11  # every training executable (8, and 3 zero fills) serialized
        warm, engine = two_steps()
        assert warm == cold
        assert {r.extra["source"] for r in engine.cache.records} == {"disk"}
        files[0].write_bytes(b"not an executable")
        again, engine = two_steps()
        assert again == cold
        assert sorted(r.extra["source"] for r in engine.cache.records).count("compiled") == 1
