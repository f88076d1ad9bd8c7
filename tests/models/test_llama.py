"""The Llama families (wsjax.models.llama; Mistral and Qwen2 are its config variants) without
torch: published parameter counts, RoPE scaling against Meta's reference loop, grouped-query
attention against multi-head attention on repeated keys, the sliding window's reach, the
KV-cache decode against the full forward (float64), the config keys and their one-line errors,
and the FLOPs count MFU uses. Parity with transformers is tests/interop/test_hf_llama.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from tests.helpers import REPO, tiny_config_dict
from tests.models.test_models import _FP32_OPS, MP_RTOL, _ops
from wsjax.config import config_from_dict, load_config
from wsjax.engine.plan import GiB, make_plan
from wsjax.errors import ConfigError, PlanError
from wsjax.models import get_model
from wsjax.models.kv_cache import KVCache
from wsjax.models.layers import RopeScaling, apply_rotary, causal_attention, rope_inv_freq
from wsjax.optim import make_optimizer
from wsjax.trainer.metrics import model_flops_per_token

OPTIMIZER = {"optimizer_type": "adamw", "learning_rate": 1e-3}


def _cfg(family: str = "llama", **model):
    return config_from_dict({"model": {"model_family": family, **model}, "optimizer": OPTIMIZER})


# ---- parameter counts: published totals, and the architecture by hand -------------------------
def _arch(v, d, layers, heads, kv, f, tied=False, positions=4096):
    return dict(vocab_size=v, hidden_size=d, num_hidden_layers=layers, num_heads=heads,
                num_kv_groups=kv, filter_size=f, share_embedding_weights=tied,
                max_position_embeddings=positions)  # fmt: skip


PUBLISHED = [  # the model cards' / papers' totals (HF num_parameters of the released weights)
    ("llama2_7b", "llama", _arch(32000, 4096, 32, 32, 32, 11008), 6_738_415_616),
    ("code_llama_7b", "llama", _arch(32016, 4096, 32, 32, 32, 11008), 6_738_546_688),
    ("llama2_70b", "llama", _arch(32000, 8192, 80, 64, 8, 28672), 68_976_648_192),
    ("llama3_8b", "llama", _arch(128256, 4096, 32, 32, 8, 14336), 8_030_261_248),
    ("llama3p2_1b", "llama", _arch(128256, 2048, 16, 32, 8, 8192, tied=True), 1_235_814_400),
    ("llama3p2_3b", "llama", _arch(128256, 3072, 28, 24, 8, 8192, tied=True), 3_212_749_824),
    ("mistral_7b", "mistral", _arch(32000, 4096, 32, 32, 8, 14336), 7_241_732_096),
    ("qwen2_7b", "qwen2", _arch(152064, 3584, 28, 28, 4, 18944), 7_615_616_512),
]


@pytest.mark.parametrize("name,family,arch,count", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_published_parameter_counts(name, family, arch, count):
    model = get_model(_cfg(family, **arch).model)
    assert model.num_params() == count
    v, d, n, f = (
        arch[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "filter_size")
    )
    kv = arch["num_kv_groups"] * d // arch["num_heads"]  # key / value width under GQA
    qkv_bias = (d + 2 * kv) if family == "qwen2" else 0
    per_layer = 2 * d * d + 2 * d * kv + qkv_bias + 3 * d * f + 2 * d  # q o, k v, SwiGLU, norms
    embeddings = v * d if arch["share_embedding_weights"] else 2 * v * d
    assert count == embeddings + n * per_layer + d
    blocks = model.param_shapes()["blocks"]
    assert blocks["self_attn"]["k_proj"]["kernel"].shape == (n, d, kv)


# ---- RoPE scaling -----------------------------------------------------------------------------
def _meta_apply_scaling(freqs, factor, low, high, old):
    """Meta's llama-models ``apply_scaling`` (Llama 3.1), as its loop reads."""
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(freq)
        elif wavelen > low_wavelen:
            out.append(freq / factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return np.asarray(out)


def test_llama3_frequencies_match_metas_loop(x64):
    dim, theta = 16, 500.0
    scaling = RopeScaling("llama3", 8.0, 1.0, 4.0, 256.0)
    base = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
    wavelen = 2 * np.pi / base
    assert (
        (wavelen < 64).any() and (wavelen > 256).any() and ((wavelen > 64) & (wavelen < 256)).any()
    )
    with x64():
        ours = np.asarray(rope_inv_freq(dim, theta, jnp.float64, scaling))
    np.testing.assert_allclose(ours, _meta_apply_scaling(base, 8.0, 1.0, 4.0, 256.0), rtol=1e-15)
    with x64():  # linear: every frequency / factor
        linear = np.asarray(rope_inv_freq(dim, theta, jnp.float64, RopeScaling("linear", 4.0)))
    np.testing.assert_allclose(linear, base / 4.0, rtol=1e-15)


def test_linear_scaling_is_positions_over_factor():
    x = np.random.default_rng(0).standard_normal((1, 5, 2, 8)).astype(np.float32)
    pos = jnp.arange(5)[None]
    rotary = jax.jit(apply_rotary, static_argnums=(1, 2, 3, 5))
    scaled = rotary(x, 8, 100.0, False, 3 * pos, RopeScaling("linear", 3.0))
    np.testing.assert_allclose(scaled, rotary(x, 8, 100.0, False, pos, None), atol=1e-5)


# ---- grouped-query attention and the sliding window -------------------------------------------
def test_grouped_query_attention_is_multi_head_on_repeated_keys():
    """Query head h reads key/value head h // (H / G): HF's repeat_kv."""
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 7, 6, 4)).astype(np.float32)  # (B, T, H, K)
    k, v = rng.standard_normal((2, 2, 7, 2, 4)).astype(np.float32)  # (B, T, G, K), G = 2
    attention = jax.jit(causal_attention, static_argnums=(3, 4))
    grouped = attention(q, k, v, None, 0.0)
    repeated = attention(q, jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2), None, 0.0)
    np.testing.assert_allclose(grouped, repeated, rtol=1e-6, atol=1e-6)


def test_sliding_window_reach():
    """Query i sees keys i - window < j <= i: a key just outside changes nothing, one inside
    does; window 1 is each token's own value; a window past T is plain causal attention."""
    q, k, v = jnp.asarray(np.random.default_rng(2).standard_normal((3, 1, 9, 2, 4)), jnp.float32)
    attention = jax.jit(causal_attention, static_argnums=(3, 4, 5))
    out = attention(q, k, v, None, 0.0, 3)
    for j, moves in ((5, False), (6, True)):  # query 8 sees 6, 7, 8
        bumped = attention(q, k.at[0, j].add(1.0), v.at[0, j].add(1.0), None, 0.0, 3)
        assert (np.abs(bumped[0, 8] - out[0, 8]).max() > 1e-3) == moves
    np.testing.assert_allclose(attention(q, k, v, None, 0.0, 1), v, rtol=1e-6)
    np.testing.assert_array_equal(attention(q, k, v, None, 0.0, 9), attention(q, k, v, None, 0.0))


def _decode_logits(model, params, tokens: np.ndarray, start: np.ndarray, prefill: int):
    """Logits of every position through the KV-cache path: ``prefill`` tokens, then one at a
    time. Rows are left-padded: row r's real tokens start at slot ``start[r]``."""
    b, t = tokens.shape
    c = model.cfg

    @jax.jit
    def step(params, tokens, pos, caches, index):
        x = model.embed_decode(params["embed"], tokens, pos)
        for i in range(model.num_layers):
            layer = jax.tree.map(lambda a, i=i: a[i], params["blocks"])
            cache = KVCache(*caches[i], index, jnp.asarray(start, jnp.int32))
            x, cache = model.block_decode(layer, x, cache)
            caches[i] = (cache.k, cache.v)
        return model.head_apply(params["head"], x), caches

    shape = (b, t, c.num_kv_heads, c.head_dim)  # (B, S, G, K)
    caches = [(jnp.zeros(shape, model.compute_dtype),) * 2 for _ in range(model.num_layers)]
    out = []
    for lo, hi in [(0, prefill)] + [(i, i + 1) for i in range(prefill, t)]:
        pos = np.maximum(np.arange(lo, hi)[None] - start[:, None], 0)
        logits, caches = step(params, tokens[:, lo:hi], pos, caches, jnp.int32(lo))
        out.append(logits)
    return np.concatenate(out, axis=1)  # (B, T, V)


def test_kv_cache_decode_equals_full_forward(x64):
    """GQA + llama3 scaling + a window of 6 (tests/helpers.py), float64: the cached decode of a
    left-padded batch gives each row the logits of its own unpadded full forward. The same
    float64 maths in two orders: ~400 roundings of u = 1.1e-16 on a logit's path, twice, is
    1e-13; a wrong position, mask or cache slot moves the logits by O(1)."""
    cfg = config_from_dict(tiny_config_dict("llama", layers=2)).model
    with x64():
        model = get_model(cfg)
        model.compute_dtype = jnp.float64
        init = jax.jit(model.init)(jax.random.key(0))
        wiggle = lambda a: 0.1 * np.sin(np.arange(a.size)).reshape(a.shape)  # noqa: E731
        params = jax.tree.map(lambda a: np.asarray(a, np.float64) + wiggle(a), init)  # norms != 1
        tokens = np.random.default_rng(0).integers(1, cfg.vocab_size, (2, 13))
        start = np.array([0, 4])
        tokens[1, :4] = 0  # row 1: four pad slots, then 9 real tokens
        got = _decode_logits(model, params, tokens, start, prefill=5)
        # each row unpadded, at the left; past its end anything (causal: it cannot matter)
        unpadded = np.stack([np.roll(tokens[r], -s) for r, s in enumerate(start)])
        full = np.asarray(jax.jit(model.logits)(params, unpadded))
    for r, s in enumerate(start):
        want = full[r, : tokens.shape[1] - s]
        err = np.abs(got[r, s:] - want).max() / np.abs(want).max()
        assert err < 1e-12, (r, err)
    assert tokens.shape[1] - start[1] > cfg.attention_sliding_window_length  # the window acts


# ---- dropout, initializers, mixed precision (test_models.py's checks, for this block) ---------
def _tiny(**model):
    return config_from_dict(tiny_config_dict("llama", layers=2, model=model)).model


@functools.cache
def _perturbed() -> dict:
    """_tiny()'s init (dropout rates change no shape), every leaf moved: norm scales off 1."""
    params = jax.jit(get_model(_tiny()).init)(jax.random.key(0))
    return jax.tree.map(lambda a: np.asarray(a) + 0.1 * np.cos(np.arange(a.size)).reshape(a.shape),
                        params)  # fmt: skip


def test_dropout_masks_follow_the_rng():
    rates = dict(embedding_dropout_rate=0.1, attention_dropout_rate=0.1, residual_dropout_rate=0.1)
    model = get_model(_tiny(**rates))
    params, tokens = _perturbed(), np.arange(32).reshape(2, 16) % 97
    logits = jax.jit(model.logits)
    ev = logits(params, tokens)
    np.testing.assert_array_equal(ev, logits(params, tokens))  # eval: no rng, no dropout
    tr1, tr2 = (logits(params, tokens, rng=jax.random.key(k)) for k in (1, 2))
    np.testing.assert_array_equal(tr1, logits(params, tokens, rng=jax.random.key(1)))
    assert np.abs(tr1 - ev).max() > 1e-3 and np.abs(tr1 - tr2).max() > 1e-3


def test_init_uses_the_configs_initializers():
    """o_proj and down_proj (the residual branches' outputs) take output_layer_initializer; the
    other projections initializer; RMSNorm scales start at 1; an output bias at 0."""
    stds = {"initializer": 0.05, "embedding_initializer": 0.3, "output_layer_initializer": 0.005}
    inits = {k: {"name": "normal", "std": v} for k, v in stds.items()}
    model = get_model(_tiny(**inits, use_bias_in_output=True))
    params = jax.jit(model.init)(jax.random.key(0))
    blocks = params["blocks"]
    np.testing.assert_allclose(np.std(params["embed"]["wte"]), 0.3, rtol=0.1)
    expected = (("self_attn", "o_proj", 0.005), ("mlp", "down_proj", 0.005),
                ("self_attn", "q_proj", 0.05), ("mlp", "gate_proj", 0.05))  # fmt: skip
    for group, name, std in expected:
        np.testing.assert_allclose(np.std(blocks[group][name]["kernel"]), std, rtol=0.1)
    np.testing.assert_array_equal(blocks["input_layernorm"]["scale"], 1.0)
    np.testing.assert_array_equal(params["head"]["lm_head"]["bias"], 0.0)  # use_bias_in_output
    assert "bias" not in params["head"]["norm"]  # RMSNorm: a scale only


def test_mixed_precision_close_to_fp32():
    """bf16 matmuls accumulate and return fp32; RMSNorm statistics, silu, softmax and logits
    stay fp32 (the traced program, exactly); logits within test_models.py's MP_RTOL."""
    cfg = _tiny()
    fp32, bf16 = get_model(cfg), get_model(dataclasses.replace(cfg, mixed_precision=True))
    params, tokens = _perturbed(), np.arange(32).reshape(2, 16) % 97
    ops = _ops(jax.make_jaxpr(bf16.logits)(params, tokens).jaxpr)
    dots = [e for e in ops if e.primitive.name == "dot_general"]
    assert any(a.aval.dtype == jnp.bfloat16 for e in dots for a in e.invars)
    assert all(e.outvars[0].aval.dtype == jnp.float32 for e in dots)
    for e in (e for e in ops if e.primitive.name in _FP32_OPS):
        assert all(a.aval.dtype != jnp.bfloat16 for a in e.invars), e
    ref, got = jax.jit(fp32.logits)(params, tokens), jax.jit(bf16.logits)(params, tokens)
    err, scale = float(jnp.abs(got - ref).max()), float(jnp.abs(ref).max())
    assert 0 < err <= MP_RTOL * scale, (err, scale)


# ---- config: Cerebras keys and one-line errors ------------------------------------------------
def test_cerebras_spellings():
    m = dict(vocab_size=64, hidden_size=32, num_heads=4, num_hidden_layers=2, filter_size=48,
             max_position_embeddings=32, rotary_dim=8)  # fmt: skip
    old = _cfg("llama", **m, use_rms_norm=True).model  # Cerebras R1.9's key
    assert old.norm_type == "rmsnorm" and old.num_kv_groups is None and old.num_kv_heads == 4
    mqa = _cfg("llama", **m, attention_module="multiquery_attention").model
    assert mqa.num_kv_heads == 1  # Cerebras MultiQueryAttention's default: one group
    gqa = _cfg("llama", **m, attention_module="multiquery_attention",
               extra_attention_params={"num_kv_groups": 2}).model  # fmt: skip
    assert gqa.num_kv_heads == 2
    body = {k: v for k, v in m.items() if k != "rotary_dim"}
    inferred = config_from_dict({"model": {**body, "norm_type": "rmsnorm", "nonlinearity": "swiglu",
                                           "attention_sliding_window_length": 8},
                                 "optimizer": OPTIMIZER})  # fmt: skip
    assert inferred.model.family == "mistral" and inferred.model.rotary_dim == 8
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(_cfg("llama", **m, **{
        "pos_scaling_type": "llama3", "pos_scaling_factor": 8.0, "num_kv_groups": 2,
        "pos_scaling_extra_args": {"low_freq_factor": 2.0}}).to_dict())))  # fmt: skip
    assert dict(again.model.pos_scaling_extra_args) == {"low_freq_factor": 2.0}


REFUSED = [
    ("llama", {"norm_type": "layernorm"}, "model.norm_type='layernorm'.*llama uses rmsnorm"),
    ("llama", {"nonlinearity": "gelu"}, "model.nonlinearity='gelu'.*llama uses swiglu"),
    ("llama", {"rotary_dim": 4}, "model.rotary_dim=4.*rotates all 8 dims"),
    ("llama", {"num_kv_groups": 3}, "model.num_kv_groups=3.*must divide num_heads=4"),
    ("llama", {"pos_scaling_type": "yarn"}, "model.pos_scaling_type='yarn'.*linear | llama3"),
    ("llama", {"pos_scaling_extra_args": {"low_freq_factor": 2}}, "only pos_scaling_type llama3"),
    ("llama", {"pos_scaling_type": "llama3", "pos_scaling_extra_args": {"beta": 1}}, "keys are"),
    ("llama", {"extra_attention_params": {"num_kv_groups": 2}}, "multiquery_attention only"),
    ("llama", {"attention_module": "flash"}, "model.attention_module='flash'"),
    ("llama", {"attention_sliding_window_length": 0}, "must be >= 1"),
    ("gptj", {"nonlinearity": "swiglu"}, "model.nonlinearity='swiglu'.*only model_family llama"),
    ("neox", {"num_kv_groups": 2}, "model.num_kv_groups=2.*only model_family llama"),
    ("gpt2", {"attention_sliding_window_length": 4}, "only model_family llama"),
    ("gptj", {"norm_type": "rmsnorm"}, "model.norm_type='rmsnorm'.*only model_family llama"),
]


@pytest.mark.parametrize("family,change,match", REFUSED)
def test_config_errors_are_one_line(family, change, match):
    m = dict(vocab_size=64, hidden_size=32, num_heads=4, num_hidden_layers=2, filter_size=48,
             max_position_embeddings=32)  # fmt: skip
    if family in ("gptj", "neox"):
        m["rotary_dim"] = 8
    with pytest.raises(ConfigError, match=match) as info:
        _cfg(family, **m, **change)
    assert "\n" not in str(info.value) and "<dict>" in str(info.value)


# ---- what MFU counts ---------------------------------------------------------------------------
def test_model_flops_count_gqa_swiglu_and_window():
    """Llama-3-8B by hand: per token and layer 2 x (q, o: D^2; k, v: D x 1024; SwiGLU: 3 D F)
    matmul weights, forward and backward 3x; the head D x V; attention 12 L D x keys, the
    keys a query sees being min(seq, window) for Mistral."""
    d, f, v, layers, kv, seq = 4096, 14336, 128256, 32, 1024, 8192
    arch = _arch(v, d, layers, 32, 8, f, positions=8192)
    cfg = _cfg("llama", **arch).model
    weights = layers * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d) + d + d * v
    flops = model_flops_per_token(cfg, get_model(cfg).num_params(), seq)
    assert flops == 6 * weights + 12 * layers * d * seq
    mistral = _cfg("mistral", **{**arch, "vocab_size": 32000},
                   attention_sliding_window_length=4096).model  # fmt: skip
    n = get_model(mistral).num_params()
    gap = model_flops_per_token(mistral, n, seq) - model_flops_per_token(mistral, n, 4096)
    assert gap == 0  # past the window a longer sequence adds no attention per token


# ---- the shipped Llama-3-8B config: what its comments say the plan is ------------------------
def test_shipped_llama3_8b_config_and_its_plan():
    """configs/params_llama3_8b.yaml is Llama-3-8B to the parameter; on one GPU its device
    plan fits 80 GB and not 24 GB; in memory (no disk tier) its host needs more than 128 GiB
    but not 160 GiB, which is why it ships with streaming.disk_path (tests/engine/test_plan.py:
    with the tier it fits 128 GiB)."""
    shipped = load_config(REPO / "configs" / "params_llama3_8b.yaml")
    assert shipped.streaming.disk_path == "llama3_8b_disk_tier"
    in_memory = dataclasses.replace(shipped.streaming, disk_path=None)
    cfg = dataclasses.replace(shipped, streaming=in_memory)
    model = get_model(cfg.model)
    assert model.num_params() == 8_030_261_248 and cfg.model.num_kv_heads == 8

    def plan(device_gb: float, host_gb: float):
        return make_plan(model, cfg, make_optimizer(cfg.optimizer), batch_size=8, seq=8192,
                         n_micro=cfg.train_micro_batches, platform="gpu",
                         host_available=int(host_gb * GiB),
                         device_available=int(device_gb * GiB))  # fmt: skip

    fits = plan(80, 160)
    fits.check()
    assert 60 * GiB < fits.device_total < 61 * GiB and 151 * GiB < fits.host_total < 152 * GiB
    for device_gb, host_gb, short in ((80, 128, "host"), (24, 1000, "device")):
        with pytest.raises(PlanError, match=f"GiB of {short} memory"):
            plan(device_gb, host_gb).check()
