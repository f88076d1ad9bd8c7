"""The Llama families against transformers' LlamaForCausalLM, MistralForCausalLM and
Qwen2ForCausalLM: import (plain and sharded safetensors), export, logits, loss gradients and
greedy generation.

``CASES`` has one row per family or variant, in the form of the golden data's table
(tests/fixtures/golden/make_golden.py ``Case``: model class, config class, config keywords), so
a row moves there unchanged. Tiny models with EVERY parameter random (norm scales 1 + 0.3 N,
everything else 0.3 N, drawn by numpy and rounded to float32 so the float32 checkpoint holds
them exactly and the import is lossless).

float64, both sides. transformers casts to float32 inside a float64 model on purpose (RMSNorm,
the rotary tables, the eager softmax); ``float64_torch`` (tests/helpers.py, shared with the
golden data's make_golden) maps torch's float32 onto float64 while the reference model is built
and run, so its arithmetic is float64 throughout. Tolerance from
float64 arithmetic: u = 2^-53 = 1.1e-16. A logit ends a chain of 2 blocks x (7 matmuls with dot
products of length <= 48, 2 RMSNorms, rotary, a softmax over <= 12 keys) + the head: about
n = 400 roundings, each <= u relative to the O(1) values it rounds; a gradient runs the chain
back, n <= 1200. Worst case n u = 1.3e-13, twice that for two implementations rounding
independently; a random-weight network may amplify an early rounding by its Jacobian's norm, a
modest factor per block, so RTOL = 1e-10 (the golden tests' value) leaves ~400x for it. A float32
cast left over would show as ~1e-7 (measured: float32 transformers vs float64 wsjax 1e-6), and a
real discrepancy (a bias dropped, k / v heads grouped the wrong way, a frequency band misscaled,
a window one token off) as 1e-3 or more. Logits: max |ours - torch| <= RTOL max |torch|;
gradients: ||ours - torch|| <= RTOL ||torch|| per tensor. The float32 test checks transformers as
shipped, at test_hf.py's float32 tolerance and derivation. Greedy generation runs in float32 as
a user would (random logits: the top two differ by far more than float32 noise).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

try:
    import torch
except ImportError:  # CI's leg 2: each test below is skipped, saying so (tests/conftest.py)
    torch = None

from tests.helpers import float64_torch, hf_grad_errors
from wsjax.config.schema import StreamingConfig
from wsjax.errors import CheckpointError
from wsjax.inference.decode import StreamingDecoder
from wsjax.interop.convert import PARAMS_YAML, hf_to_orbax
from wsjax.interop.export import load_model_config
from wsjax.interop.hf import export_hf, hf_table, import_hf
from wsjax.losses import token_loss_sum
from wsjax.models import get_model

pytestmark = pytest.mark.needs_torch  # every test here runs transformers' PyTorch models

VOCAB, BATCH, SEQ = 64, 2, 12
STD = 0.3
RTOL = 1e-10  # float64 (module docstring)
RTOL32 = 1e-5  # float32, as tests/interop/test_hf.py


class Case(NamedTuple):
    """One model: transformers' class names and its config's keywords (make_golden.Case)."""

    model: str
    config: str
    kwargs: dict


_SHARED = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)  # as make_golden's
_TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
    max_position_embeddings=512, rms_norm_eps=1e-5,
)  # fmt: skip
# head_dim 8, theta 500: wavelengths 6, 30, 140, 664 against 256 / 4 and 256 / 1: one band kept,
# one blended, one divided by the factor (Llama 3.1's three cases)
_LLAMA3_ROPE = dict(
    rope_type="llama3", rope_theta=500.0, factor=8.0, low_freq_factor=1.0,
    high_freq_factor=4.0, original_max_position_embeddings=256,
)  # fmt: skip

CASES: dict[str, Case] = {
    # Llama 1 / 2 / Code Llama: multi-head attention, plain RoPE (a non-default base)
    "llama2": Case("LlamaForCausalLM", "LlamaConfig", dict(
        _TINY, rope_parameters={"rope_type": "default", "rope_theta": 1000.0})),
    # Llama 3 / 3.1: grouped-query attention (2 key/value heads for 4), llama3 RoPE scaling
    "llama3": Case("LlamaForCausalLM", "LlamaConfig", dict(
        _TINY, num_key_value_heads=2, rope_parameters=_LLAMA3_ROPE)),
    # Llama 3.2 1B / 3B: tied embeddings; here one key/value head (multi-query)
    "llama3p2_tied": Case("LlamaForCausalLM", "LlamaConfig", dict(
        _TINY, num_key_value_heads=1, rope_parameters=_LLAMA3_ROPE, tie_word_embeddings=True)),
    # linear RoPE scaling, biases on q / k / v / o and the MLP
    "llama_linear_bias": Case("LlamaForCausalLM", "LlamaConfig", dict(
        _TINY, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 100.0, "factor": 2.0})),
    # Mistral: GQA and a sliding window of 4 < SEQ
    "mistral": Case("MistralForCausalLM", "MistralConfig", dict(
        _TINY, num_key_value_heads=2, sliding_window=4)),
    # Qwen2: q / k / v biases, GQA
    "qwen2": Case("Qwen2ForCausalLM", "Qwen2Config", dict(
        _TINY, num_key_value_heads=2, rope_parameters={"rope_type": "default",
                                                      "rope_theta": 10000.0})),
    # Qwen2 with every layer sliding (window 5) and tied embeddings (Qwen2 0.5B / 1.5B tie)
    "qwen2_window_tied": Case("Qwen2ForCausalLM", "Qwen2Config", dict(
        _TINY, num_key_value_heads=2, use_sliding_window=True, sliding_window=5,
        max_window_layers=0, tie_word_embeddings=True)),
}  # fmt: skip
FAMILY = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


def torch_model(name: str, seed: int = 0, values: dict | None = None):
    """transformers' model of case ``name``: every parameter random and float32-exact (or
    ``values``, by parameter name), built in the dtype torch's default is now."""
    case = CASES[name]
    config = getattr(transformers, case.config)(
        **_SHARED, **case.kwargs, attn_implementation="eager"
    )
    model = getattr(transformers, case.model)(config).eval()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if values is not None:
                p.copy_(values[n])
                continue
            value = (1.0 if n.endswith("norm.weight") else 0.0) + STD * rng.standard_normal(p.shape)
            p.copy_(torch.from_numpy(value.astype(np.float32)))
    return model


def float64_twin(model32):
    """Its class and config, its values, float64 throughout (call it inside float64_torch)."""
    twin = type(model32)(model32.config).eval()  # rotary tables computed in float64
    with torch.no_grad():
        for n, p in twin.named_parameters():
            p.copy_(model32.get_parameter(n).detach().double())
    assert all(p.dtype == torch.float64 for p in twin.parameters())
    return twin


def _model_and_checkpoint(name: str, folder: Path, seed: int = 0):
    model = torch_model(name, seed)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def _batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32)
    mask = np.ones((BATCH, SEQ))
    mask[:, -1] = 0.0  # no next token
    return ids, np.roll(ids, -1, axis=1), mask


def _torch_loss(model, ids, labels, mask):
    logits = model(torch.as_tensor(ids, dtype=torch.long), use_cache=False).logits
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, VOCAB), torch.as_tensor(labels, dtype=torch.long).reshape(-1),
        reduction="none",
    )  # fmt: skip
    m = torch.as_tensor(mask).reshape(-1)
    return logits, (nll * m).sum() / m.sum()


def _ours(cfg, params, ids, labels, mask, x64, grads: bool = True):
    """(logits, loss, grads) of wsjax in float64 (only the logits unless ``grads``)."""
    model = get_model(cfg)
    model.compute_dtype = jnp.float64
    with x64():
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        if not grads:
            return np.asarray(jax.jit(model.logits)(params, jnp.asarray(ids))), None, None

        def loss_fn(p):
            logits = model.logits(p, jnp.asarray(ids))
            total, count = token_loss_sum(logits, jnp.asarray(labels), jnp.asarray(mask))
            return total / count, logits

        (loss, logits), g = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
        return np.asarray(logits), float(loss), jax.tree.map(np.asarray, g)


def _close(ours, ref, rtol, what):
    scale = float(np.abs(ref).max())
    err = float(np.abs(np.asarray(ours) - ref).max())
    assert scale > 1.0 and err <= rtol * scale, f"{what}: max |diff| {err:.3g}, scale {scale:.3g}"


# ---- import: logits, loss and every gradient, float64 --------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_import_logits_and_gradients_match_transformers(tmp_path, name, x64):
    model32 = _model_and_checkpoint(name, tmp_path / "hf")
    cfg, params = import_hf(tmp_path / "hf")
    assert cfg.family == FAMILY[CASES[name].model]
    kw = CASES[name].kwargs
    assert cfg.num_kv_heads == kw.get("num_key_value_heads", 4)
    assert cfg.share_embedding_weights == kw.get("tie_word_embeddings", False)
    assert cfg.attention_sliding_window_length == kw.get("sliding_window")
    ids, labels, mask = _batch()
    with float64_torch():
        ref = float64_twin(model32)
        t_logits, t_loss = _torch_loss(ref, ids, labels, mask)
        t_loss.backward()
    logits, loss, grads = _ours(cfg, params, ids, labels, mask, x64)
    _close(logits, t_logits.detach().numpy(), RTOL, "logits")
    assert abs(loss - t_loss.item()) <= RTOL * t_loss.item()
    t_grads = {n: p.grad.numpy() for n, p in ref.named_parameters()}
    for path, rel in hf_grad_errors(cfg, grads, t_grads).items():
        assert rel <= RTOL, f"{path}: relative gradient error {rel:.3g}"
    assert len(t_grads) == sum(cfg.num_hidden_layers if e.stacked else 1 for e in hf_table(cfg))


@pytest.mark.parametrize("name", ["llama3", "mistral"])
def test_float32_transformers_as_shipped(tmp_path, name):
    """transformers' own float32 arithmetic (its casts in place) against wsjax in float32."""
    model32 = _model_and_checkpoint(name, tmp_path / "hf", seed=1)
    cfg, params = import_hf(tmp_path / "hf")
    ids, _, _ = _batch(1)
    with torch.no_grad():
        ref = model32(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    with jax.default_matmul_precision("highest"):
        ours = jax.jit(get_model(cfg).logits)(params, jnp.asarray(ids))
    _close(ours, ref, RTOL32, "float32 logits")


def test_scaling_and_window_are_not_vacuous(tmp_path, x64):
    """Without the llama3 scaling, or without Mistral's window, the logits move far past RTOL:
    the cases above do test them."""
    for name, change in (("llama3", dict(pos_scaling_type="linear", pos_scaling_factor=1.0,
                                         pos_scaling_extra_args=None)),
                         ("mistral", dict(attention_sliding_window_length=None))):  # fmt: skip
        _model_and_checkpoint(name, tmp_path / name)
        cfg, params = import_hf(tmp_path / name)
        ids, labels, mask = _batch()
        with_it = _ours(cfg, params, ids, labels, mask, x64, grads=False)[0]
        off = dataclasses.replace(cfg, **change)
        without = _ours(off, params, ids, labels, mask, x64, grads=False)[0]
        assert np.abs(with_it - without).max() > 1e4 * RTOL * np.abs(with_it).max(), name


# ---- export, sharded checkpoints ----------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_export_loads_in_transformers(tmp_path, name, x64):
    _model_and_checkpoint(name, tmp_path / "hf")
    cfg, _ = import_hf(tmp_path / "hf")
    shapes = get_model(cfg).param_shapes()
    rng = np.random.default_rng(7)
    params = jax.tree_util.tree_map_with_path(
        lambda p, s: ((1.0 if p[-1].key == "scale" else 0.0)
                      + STD * rng.standard_normal(s.shape)).astype(np.float32), shapes)  # fmt: skip
    out = export_hf(cfg, params, tmp_path / "out")
    cfg2, params2 = import_hf(out)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    ids, labels, mask = _batch(2)
    hf_class = getattr(transformers, CASES[name].model)
    loaded = hf_class.from_pretrained(out, attn_implementation="eager")  # its config.json
    with float64_torch(), torch.no_grad():
        ref = float64_twin(loaded)(torch.as_tensor(ids, dtype=torch.long), use_cache=False).logits
    assert ref.dtype == torch.float64
    ours = _ours(cfg, params, ids, labels, mask, x64, grads=False)[0]
    _close(ours, ref.numpy(), RTOL, "exported logits")


def test_sharded_checkpoints_both_ways(tmp_path):
    """transformers' sharded save (index + shards) imports as the single file does; wsjax's
    sharded export loads in transformers."""
    model32 = _model_and_checkpoint("llama3", tmp_path / "one")
    model32.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    cfg, want = import_hf(tmp_path / "one")
    cfg2, got = import_hf(tmp_path / "sharded")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, got, want)
    out = export_hf(cfg, want, tmp_path / "ours", max_shard_size="20KB")
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 2
    loaded = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager")
    ids = _batch(3)[0]
    with torch.no_grad():
        a = loaded(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
        b = model32(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_array_equal(a, b)  # the same weights in the same class


# ---- greedy generation --------------------------------------------------------------------------
PROMPTS = [[5, 17, 3, 9, 44, 61, 2], [7, 2, 30]]  # left padding; 7 + 8 tokens pass the windows
NEW = 8


def _hf_greedy(folder: Path) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    model.generation_config.eos_token_id = None  # all NEW steps
    width = max(len(p) for p in PROMPTS)
    ids = torch.zeros((len(PROMPTS), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(PROMPTS):
        ids[row, width - len(p) :], mask[row, width - len(p) :] = torch.tensor(p), 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
                             do_sample=False, pad_token_id=0)  # fmt: skip
    return out[:, width:].numpy()


@pytest.mark.parametrize("name", ["llama3", "mistral", "qwen2_window_tied"])
def test_greedy_generation_equals_transformers(tmp_path, name):
    """From the HF folder, and from wsjax's export of the same weights: the same tokens as
    transformers' generate (its KV cache, its sliding-window cache) in both."""
    _model_and_checkpoint(name, tmp_path / "hf", seed=4)
    cfg, params = import_hf(tmp_path / "hf")
    exported = export_hf(cfg, params, tmp_path / "export")
    with jax.default_matmul_precision("highest"):
        ours = StreamingDecoder(get_model(cfg), params, StreamingConfig()).generate(PROMPTS, NEW)
    for folder in (tmp_path / "hf", exported):
        np.testing.assert_array_equal(ours, _hf_greedy(folder))


def test_converted_params_yaml_loads_back(tmp_path):
    """wsjax-convert --from_hf writes the imported config as a params file (GQA, llama3 scaling
    and its extra args, a window, tied): it loads back to the same model config."""
    for name in ("llama3", "qwen2_window_tied"):
        _model_and_checkpoint(name, tmp_path / name)
        out = hf_to_orbax(str(tmp_path / name), str(tmp_path / f"{name}_orbax"))
        assert load_model_config(out / PARAMS_YAML) == import_hf(tmp_path / name)[0]


# ---- config.json: legacy keys and refusals -------------------------------------------------------
def test_config_legacy_keys_and_refusals(tmp_path):
    """Hub Llama 3.1 files spell RoPE as rope_theta + rope_scaling (transformers < 5)."""
    _model_and_checkpoint("llama3", tmp_path / "hf")
    want, params = import_hf(tmp_path / "hf")
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    rope = hf.pop("rope_parameters")
    hf.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf))
    assert import_hf(tmp_path / "hf")[0] == want
    refused = [
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_type 'yarn'"),
        (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
        (dict(head_dim=16), "head_dim 16 != hidden_size / num_attention_heads 8"),
    ]
    for change, match in refused:
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**hf, **change}))
        with pytest.raises(CheckpointError, match=match) as info:
            import_hf(tmp_path / "hf")
        assert "\n" not in str(info.value)
    qwen = {**_SHARED, **CASES["qwen2"].kwargs, "model_type": "qwen2", "use_sliding_window": True,
            "sliding_window": 4, "max_window_layers": 1}  # fmt: skip
    (tmp_path / "hf" / "config.json").write_text(json.dumps(qwen))
    with pytest.raises(CheckpointError, match="some layers only"):
        import_hf(tmp_path / "hf")
    for change, match in (
        (dict(attention_sliding_window_length=4), "attention_sliding_window_length=4 cannot"),
        (dict(use_ffn_bias_in_attention=True), "use_ffn_bias_in_attention=True cannot"),
        (dict(family="mistral", use_ffn_bias=True), "MistralForCausalLM; it needs False"),
        (dict(residual_dropout_rate=0.1), "residual_dropout_rate=0.1 cannot"),
    ):
        with pytest.raises(CheckpointError, match=match):
            export_hf(dataclasses.replace(want, **change), params, tmp_path / "refused")
