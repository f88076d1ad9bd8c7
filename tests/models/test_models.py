"""Model tests: parameter counts (pinned and by formula), rotary by hand, causality, dropout,
mixed precision, today's parameter names (checkpoints load), and NeoX trained by the engine."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.models.base import FAMILIES, SEQ, VOCAB, model_cfg
from wsjax.config import config_from_dict, load_config
from wsjax.models import get_model
from wsjax.models.layers import apply_rotary

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _tokens(seed: int = 0) -> jnp.ndarray:
    return jax.random.randint(jax.random.key(seed), (2, SEQ), 0, VOCAB)


def _random_params(model, seed: int = 0) -> dict:
    """Init, then perturb every leaf so layer norms and biases are not the trivial 1 / 0."""
    params = model.init(jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [a + 0.1 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, leaves)


# ---- parameter counts (no allocation) ----------------------------------------------------------
PINNED = [
    ("params_gptj_6B.yaml", "gptj", 6_050_882_784),
    ("params_gpt2_small.yaml", "gpt2", 124_439_808),
    ("params_gpt3_xl.yaml", "gpt2", 1_315_723_264),
]


@pytest.mark.parametrize("fname,family,count", PINNED, ids=[p[0] for p in PINNED])
def test_param_count_of_shipped_configs(fname, family, count):
    cfg = load_config(CONFIGS / fname).model
    assert cfg.family == family
    model = get_model(cfg)
    assert model.num_params() == count
    shapes = model.param_shapes()
    assert all(isinstance(s, jax.ShapeDtypeStruct) for s in jax.tree.leaves(shapes))


def test_param_count_by_formula():
    """The same pins from the architecture definitions, independent of the shipped YAMLs."""
    gptj = dict(vocab_size=50400, hidden_size=4096, num_heads=16, num_hidden_layers=28)
    gptj.update(filter_size=16384, max_position_embeddings=2048, rotary_dim=64)
    gpt2 = dict(vocab_size=50257, hidden_size=768, num_heads=12, num_hidden_layers=12)
    gpt2.update(filter_size=3072, max_position_embeddings=1024)
    xl = dict(vocab_size=50257, hidden_size=2048, num_heads=16, num_hidden_layers=24)
    xl.update(filter_size=8192, max_position_embeddings=2048, use_bias_in_output=False)
    for family, d, count in (
        ("gptj", gptj, 6_050_882_784),
        ("gpt2", gpt2, 124_439_808),
        ("gpt2", xl, 1_315_723_264),
    ):
        model = get_model(model_cfg(family, **d))
        assert model.num_params() == count
        if family == "gpt2":
            v, p, h = d["vocab_size"], d["max_position_embeddings"], d["hidden_size"]
            f, n = d["filter_size"], d["num_hidden_layers"]
            per_layer = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)
            assert count == v * h + p * h + n * per_layer + 2 * h


NEOX_COUNTS = [  # published totals: Pythia-160M (HF model card), GPT-NeoX-20B (Black et al. 2022)
    ("pythia_160m", dict(vocab_size=50304, hidden_size=768, num_heads=12, num_hidden_layers=12,
                         filter_size=3072, max_position_embeddings=2048, rotary_dim=16),
     162_322_944),
    ("neox_20b", dict(vocab_size=50432, hidden_size=6144, num_heads=64, num_hidden_layers=44,
                      filter_size=24576, max_position_embeddings=2048, rotary_dim=24),
     20_554_567_680),
]  # fmt: skip


@pytest.mark.parametrize("name,arch,count", NEOX_COUNTS, ids=[n for n, _, _ in NEOX_COUNTS])
def test_neox_param_count_by_formula(name, arch, count):
    """Untied in/out embeddings, no positions; per block two norms, fused qkv, dense, MLP."""
    model = get_model(model_cfg("neox", **arch))
    assert model.num_params() == count
    v, h, f, n = (
        arch[k] for k in ("vocab_size", "hidden_size", "filter_size", "num_hidden_layers")
    )
    per_layer = 2 * 2 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)
    assert count == 2 * v * h + n * per_layer + 2 * h
    blocks = model.param_shapes()["blocks"]
    assert blocks["attn"]["query_key_value"]["kernel"].shape == (n, h, 3 * h)
    assert "ln_2" in blocks and "bias" not in model.param_shapes()["head"]["lm_head"]


# ---- today's parameter names: checkpoints written before the flax modules still load --------
def _pre_flax_tree(family: str, d: int, f: int, layers: int) -> dict:
    """The tree the hand-written (pre-NNX) models built for ``model_cfg(family)``, by name."""
    norm = {"scale": (d,), "bias": (d,)}

    def dense(i, o, bias=True):
        return {"kernel": (i, o), **({"bias": (o,)} if bias else {})}

    if family == "gptj":
        embed = {"wte": (VOCAB, d)}
        attn = {n: dense(d, d, False) for n in ("q_proj", "k_proj", "v_proj", "out_proj")}
        block = {"ln_1": norm, "attn": attn, "mlp": {"fc_in": dense(d, f), "fc_out": dense(f, d)}}
        head = {"ln_f": norm, "lm_head": dense(d, VOCAB)}
    else:
        embed = {"wte": (VOCAB, d), "wpe": (16, d)}
        attn = {"c_attn": dense(d, 3 * d), "c_proj": dense(d, d)}
        mlp = {"c_fc": dense(d, f), "c_proj": dense(f, d)}
        block = {"ln_1": norm, "attn": attn, "ln_2": norm, "mlp": mlp}
        head = {"ln_f": norm}  # tied: the kernel is wte
    shaped = lambda t, lead=(): jax.tree.map(  # noqa: E731
        lambda s: np.random.default_rng(0).normal(size=lead + s).astype(np.float32),
        t,
        is_leaf=lambda s: isinstance(s, tuple),
    )
    return {"embed": shaped(embed), "blocks": shaped(block, (layers,)), "head": shaped(head)}


@pytest.mark.parametrize("family", ["gptj", "gpt2"])
def test_pre_flax_checkpoint_loads_unchanged(tmp_path, family):
    from wsjax.checkpoint import Checkpoints
    from wsjax.interop.load import load_start

    cfg = model_cfg(family)
    model = get_model(cfg)
    old = _pre_flax_tree(family, cfg.hidden_size, cfg.filter_size, cfg.num_hidden_layers)
    shapes = jax.tree.map(lambda s: s.shape, model.param_shapes())
    assert shapes == jax.tree.map(np.shape, old)  # same names, same shapes, same nesting
    ckpts = Checkpoints(tmp_path / "run")
    ckpts.save(1, old, {"count": np.zeros((), np.int32)}, {"step": 1})
    ckpts.close()
    start = load_start(tmp_path / "run", model, None, weights_only=True)
    jax.tree.map(np.testing.assert_array_equal, start.params, old)
    logits = jax.jit(model.logits)(start.params, _tokens())  # and the model runs on it
    assert logits.shape == (2, SEQ, VOCAB) and bool(jnp.isfinite(logits).all())


# ---- rotary ---------------------------------------------------------------------------------
def test_rotary_by_hand():
    # (1, T, 1, K): rotary on the first 2 of 4 dims; the pair (1, 0) at position t -> (cos t, sin t)
    x = jnp.tile(jnp.array([1.0, 0.0, 0.5, -2.0]), (1, 5, 1, 1))
    y = apply_rotary(x, rotary_dim=2)
    t = np.arange(5)
    np.testing.assert_allclose(y[0, :, 0, 0], np.cos(t), atol=1e-6)
    np.testing.assert_allclose(y[0, :, 0, 1], np.sin(t), atol=1e-6)
    np.testing.assert_array_equal(y[0, :, 0, 2:], x[0, :, 0, 2:])  # dims past rotary_dim: as is
    np.testing.assert_array_equal(y[:, 0], x[:, 0])  # position 0 is the identity


def test_rotary_rotate_half_by_hand():
    """NeoX pairs dim i with dim i + R/2: (x0, x2) turn by t, (x1, x3) by t * theta^(-1/2)."""
    theta = 100.0
    x = jnp.tile(jnp.array([1.0, 0.0, 0.0, 1.0, 7.0]), (1, 5, 1, 1))  # (1, T, 1, K=5), R = 4
    y = apply_rotary(x, rotary_dim=4, theta=theta, interleaved=False)[0, :, 0]
    t = np.arange(5)
    slow = t / theta ** (2 / 4)
    np.testing.assert_allclose(y[:, 0], np.cos(t), atol=1e-6)  # (1, 0) -> (cos, sin)
    np.testing.assert_allclose(y[:, 2], np.sin(t), atol=1e-6)
    np.testing.assert_allclose(y[:, 1], -np.sin(slow), atol=1e-6)  # (0, 1) -> (-sin, cos)
    np.testing.assert_allclose(y[:, 3], np.cos(slow), atol=1e-6)
    np.testing.assert_array_equal(y[:, 4], 7.0)  # past rotary_dim: as is


def test_rotary_relative_position():
    """q(m) . k(n) depends only on m - n (same q and k vectors at every position)."""
    k_dim, seq = 8, 12
    q_vec, k_vec = jax.random.normal(jax.random.key(0), (2, k_dim))
    q = apply_rotary(jnp.tile(q_vec, (1, seq, 1, 1)), rotary_dim=k_dim)[0, :, 0]  # (T, K)
    k = apply_rotary(jnp.tile(k_vec, (1, seq, 1, 1)), rotary_dim=k_dim)[0, :, 0]
    dots = np.asarray(q @ k.T)  # (T, T): [m, n]
    for offset in (-3, 0, 2, 5):
        diag = np.diagonal(dots, offset=offset)
        np.testing.assert_allclose(diag, diag[0], rtol=1e-5, atol=1e-5)
    assert not np.allclose(dots[0, 0], dots[0, 3])  # and it does depend on the offset
    np.testing.assert_allclose(np.linalg.norm(q, axis=-1), np.linalg.norm(q_vec), rtol=1e-6)


# ---- causality, dropout, precision ----------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_causal(family):
    model = get_model(model_cfg(family))
    params = _random_params(model)
    tokens = _tokens()
    t = 4
    changed = tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] + 7) % VOCAB)
    logits = jax.jit(model.logits)
    a, b = logits(params, tokens), logits(params, changed)
    np.testing.assert_array_equal(a[:, : t + 1], b[:, : t + 1])
    assert np.abs(a[:, t + 1 :] - b[:, t + 1 :]).max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_dropout(family):
    rates = dict(embedding_dropout_rate=0.1, attention_dropout_rate=0.1, residual_dropout_rate=0.1)
    model = get_model(model_cfg(family, **rates))
    params = _random_params(model)
    tokens = _tokens()
    logits = jax.jit(model.logits)
    ev1, ev2 = logits(params, tokens), logits(params, tokens)
    np.testing.assert_array_equal(ev1, ev2)  # eval (rng None) is deterministic
    tr1 = logits(params, tokens, rng=jax.random.key(1))
    tr2 = logits(params, tokens, rng=jax.random.key(1))
    tr3 = logits(params, tokens, rng=jax.random.key(2))
    np.testing.assert_array_equal(tr1, tr2)  # same rng, same masks
    assert np.abs(tr1 - ev1).max() > 1e-3
    assert np.abs(tr1 - tr3).max() > 1e-3
    # a model without dropout ignores the rng
    plain = jax.jit(get_model(model_cfg(family)).logits)
    np.testing.assert_array_equal(plain(params, tokens, rng=jax.random.key(1)), ev1)


# bf16 keeps 8 significant bits: unit roundoff 2^-8 = 3.9e-3. On the way to a logit a value is
# rounded to bf16 at most ~36 times: the embedding row; per block (x 2) the norm's output, scale
# and bias, each matmul's weights and output (fp32 accumulation, one rounding at the end), the
# rotary output, the attention probabilities and their product with v, the activation (computed
# in bf16), the residual sums (~16); the final norm and the head's weights (~4). Worst case
# 36 x 2^-8 = 0.14 of the values' scale (a probabilistic bound at this few roundings is no
# tighter). The precision contract itself (where fp32 is kept) is checked exactly, below.
MP_RTOL = 36 * 2.0**-8
_FP32_OPS = ("reduce_sum", "reduce_max", "exp", "log", "rsqrt", "sqrt", "argmax", "logistic")


def _ops(jaxpr) -> list:
    """Every equation of ``jaxpr`` and of the jaxprs inside it (scan bodies, custom VJPs)."""
    out = []
    for e in jaxpr.eqns:
        out.append(e)
        for v in e.params.values():
            for sub in v if isinstance(v, list | tuple) else [v]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out += _ops(inner)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_precision_close_to_fp32(family):
    """bf16 matmuls accumulate in fp32, and norms, softmax and logits stay fp32 (checked on the
    traced program, exactly); the logits are then within MP_RTOL of the fp32 model's."""
    cfg = model_cfg(family)
    fp32 = get_model(cfg)
    bf16 = get_model(dataclasses.replace(cfg, mixed_precision=True))
    params = _random_params(fp32)
    tokens = _tokens()
    ops = _ops(jax.make_jaxpr(bf16.logits)(params, tokens).jaxpr)
    dots = [e for e in ops if e.primitive.name == "dot_general"]
    assert any(a.aval.dtype == jnp.bfloat16 for e in dots for a in e.invars)  # bf16 is used
    for e in dots:  # every matmul accumulates and returns fp32
        assert e.outvars[0].aval.dtype == jnp.float32, e
    for e in (e for e in ops if e.primitive.name in _FP32_OPS):  # statistics, softmax in fp32
        assert all(a.aval.dtype != jnp.bfloat16 for a in e.invars), e
    ref = jax.jit(fp32.logits)(params, tokens)
    got = jax.jit(bf16.logits)(params, tokens)
    assert got.dtype == jnp.float32 and ref.dtype == jnp.float32
    scale = float(jnp.abs(ref).max())
    err = float(jnp.abs(got - ref).max())
    assert 0 < err <= MP_RTOL * scale, (err, scale)
    assert math.isfinite(err)


# ---- NeoX through the streaming engine ------------------------------------------------------
# SGD makes the update -lr * clip * grad, so engine and reference updates differ by their
# gradients' fp32 rounding only (no Adam division amplifying near-zero entries). Both are XLA
# fp32 on one CPU, summing in different orders through ~700 roundings (see
# tests/interop/test_hf.py): worst-case 700 u = 4e-5, random-rounding sqrt(700) u = 2e-6;
# 1e-5 between the two.
ENGINE_RTOL = 1e-5


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
def test_neox_engine_matches_reference(config_dict, make_batches, rel_err, parallel):
    from wsjax.engine import StreamingEngine
    from wsjax.reference import ResidentTrainer

    neox = {"model_family": "neox", "position_embedding_type": "rotary", "rotary_dim": 4}
    neox |= {"share_embedding_weights": False, "use_parallel_residual": parallel}
    sgd = {"optimizer_type": "sgd", "learning_rate": 0.1, "max_gradient_norm": 0.5}
    cfg = config_from_dict(config_dict("neox", layers=2, model=neox, optimizer=sgd))
    model = get_model(cfg.model)
    assert model.cfg.family == "neox" and model.cfg.use_untied_layer_norm
    init = jax.tree.map(np.asarray, model.init(jax.random.key(0)))
    batches = make_batches(2, seed=1)

    engine = StreamingEngine(model, cfg, params=jax.tree.map(np.array, init))
    engine_losses = [engine.train_step(b)["train/loss"] for b in batches]
    ref = ResidentTrainer(model, cfg.optimizer, seed=cfg.runconfig.seed)
    state = ref.init_state(jax.tree.map(jnp.asarray, init))
    ref_losses, ref_norms = [], []
    for b in batches:
        state, m = ref.train_step(state, b)
        ref_losses.append(float(m["loss"]))
        ref_norms.append(float(m["grad_norm"]))
    assert min(ref_norms) > 0.5  # clipping was active
    np.testing.assert_allclose(engine_losses, ref_losses, rtol=ENGINE_RTOL)
    delta = lambda p: jax.tree.map(lambda a, b: np.asarray(a) - b, p, init)  # noqa: E731
    key, err = rel_err(delta(engine.params_tree()), delta(state.params))
    assert err <= ENGINE_RTOL, f"{key}: update relative error {err:.3g}"


def test_gptj_honours_untied_norm_and_sequential_residual():
    """The NeoX wiring knobs on GPT-J: ln_2 feeds the MLP; sequential feeds attn's output on."""
    base_cfg = model_cfg("gptj")
    params = _random_params(get_model(base_cfg))
    tokens = _tokens()
    ref = jax.jit(get_model(base_cfg).logits)(params, tokens)

    untied = get_model(dataclasses.replace(base_cfg, use_untied_layer_norm=True))
    assert "ln_2" in untied.param_shapes()["blocks"]
    blocks = params["blocks"]
    same = {**params, "blocks": {**blocks, "ln_2": blocks["ln_1"]}}
    got = jax.jit(untied.logits)(same, tokens)  # ln_2 = ln_1: the GPT-J model again
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    moved = {
        **params,
        "blocks": {**blocks, "ln_2": jax.tree.map(lambda a: a + 0.5, blocks["ln_1"])},
    }
    assert np.abs(jax.jit(untied.logits)(moved, tokens) - ref).max() > 1e-3

    seq = get_model(dataclasses.replace(base_cfg, use_parallel_residual=False))
    assert np.abs(jax.jit(seq.logits)(params, tokens) - ref).max() > 1e-3
    # with the attention output zeroed both wirings are x + mlp(ln_1 x): equal again
    attn = {**blocks["attn"], "out_proj": jax.tree.map(jnp.zeros_like, blocks["attn"]["out_proj"])}
    no_attn = {**params, "blocks": {**blocks, "attn": attn}}
    par = jax.jit(get_model(base_cfg).logits)(no_attn, tokens)
    np.testing.assert_allclose(jax.jit(seq.logits)(no_attn, tokens), par, rtol=1e-6, atol=1e-6)
