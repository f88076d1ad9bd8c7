"""Golden tests of wsjax.interop.hf and scripts/convert_hf.py against transformers' PyTorch
GPT-J, GPT-2 and GPT-NeoX.

Tiny models with EVERY tensor randomised (HF init leaves layer norms at 1 and biases at 0, which
would hide a swapped scale/bias or a dropped bias). fp32 on CPU, matmul precision "highest".
Tolerance from the arithmetic: fp32 unit roundoff u = 2^-24 = 6e-8. A logit is the end of a chain
of 2 blocks x (5 matmuls with dot products of length <= 96, 2 layer norms) + the head, about
n = 700 accumulated roundings: the worst-case bound n*u = 4e-5, the random-rounding estimate
sqrt(n)*u = 2e-6, both relative to the size of the values, and torch and XLA each round their
own way. So logits: max |ours - torch| <= 1e-5 * max |torch logits| (O(10) here); gradients
(one more pass through the same chain): ||ours - torch|| <= 1e-5 * ||torch|| per tensor.

These run transformers itself, so they need torch (CI's leg 1); tests/models/test_golden.py
checks the models against transformers' float64 outputs, committed, on every leg.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

from tests.helpers import hf_grad_errors
from wsjax.errors import CheckpointError
from wsjax.interop.hf import export_hf, import_hf
from wsjax.losses import token_loss_sum
from wsjax.models import get_model

try:
    import torch
except ImportError:  # CI's leg 2: each test below is skipped, saying so (tests/conftest.py)
    torch = None

pytestmark = pytest.mark.needs_torch  # every test here runs transformers' PyTorch models

REPO = Path(__file__).resolve().parents[2]
VOCAB, SEQ = 96, 12
LOGIT_RTOL = 1e-5
GRAD_RTOL = 1e-5

# transformers' model classes by name: resolving one needs torch, so it waits for a test
CLASS_NAMES = {"gptj": "GPTJForCausalLM", "gpt2": "GPT2LMHeadModel", "neox": "GPTNeoXForCausalLM"}


def hf_class(family: str):
    return getattr(transformers, CLASS_NAMES[family])


def _hf_config(family: str, tied: bool | None = None, parallel: bool = True):
    tokens = dict(vocab_size=VOCAB, attn_implementation="eager", bos_token_id=0, eos_token_id=0)
    if family == "neox":  # head_dim 16, rotate-half on 4 dims, a non-default base
        rope = {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.25}
        cfg = transformers.GPTNeoXConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
            max_position_embeddings=32, rope_parameters=rope, use_parallel_residual=parallel,
            hidden_act="gelu", **tokens,
        )  # fmt: skip
    else:
        common = dict(n_positions=32, n_embd=64, n_layer=2, n_head=4, **tokens)
        if family == "gptj":  # head_dim 16, rotary on the first 8 dims only
            cfg = transformers.GPTJConfig(rotary_dim=8, n_inner=96, **common)
        else:
            cfg = transformers.GPT2Config(n_inner=None, **common)
    if tied is not None:
        cfg.tie_word_embeddings = tied
    return cfg


def _torch_model(family: str, tied: bool | None = None, seed: int = 0, parallel: bool = True):
    """A tiny HF model in eval mode with every parameter random (LN scales around 1)."""
    torch.manual_seed(seed)
    model = hf_class(family)(_hf_config(family, tied, parallel)).eval()
    ln_scales = {
        f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)
    }
    norms_per_block = 1 if family == "gptj" else 2
    assert len(ln_scales) == 2 * norms_per_block + 1  # the blocks' + the final one: all random
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if name in ln_scales else 0.0) + 0.3 * torch.randn_like(p))
    return model


def _tokens(seed: int = 0, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, SEQ)).astype(np.int32)


def _torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


def _our_logits(cfg, params, tokens: np.ndarray) -> np.ndarray:
    with jax.default_matmul_precision("highest"):
        return np.asarray(jax.jit(get_model(cfg).logits)(params, jnp.asarray(tokens)))


def _assert_logits_close(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    scale = float(np.abs(ref).max())
    assert scale > 1.0  # random weights give O(10) logits: the check is not vacuous
    err = float(np.abs(ours - ref).max())
    assert err <= LOGIT_RTOL * scale, f"max |diff| {err:.3g} > {LOGIT_RTOL} * {scale:.3g}"


def _save(model, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    return path


def _random_params(cfg, seed: int = 1) -> dict:
    """Our own random params (every leaf random, LN scales around 1) for the export direction."""
    shapes = get_model(cfg).param_shapes()
    leaves, treedef = jax.tree.flatten_with_path(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for (path, s), k in zip(leaves, keys, strict=True):
        base = 1.0 if path[-1].key == "scale" else 0.0
        out.append(np.asarray(base + 0.3 * jax.random.normal(k, s.shape), np.float32))
    return jax.tree.unflatten(treedef, out)


# (family, tie override, NeoX use_parallel_residual)
CASES = [
    ("gptj", None, True),
    ("gpt2", None, True),
    ("gpt2", False, True),
    ("neox", None, True),
    ("neox", None, False),
]
IDS = ["gptj", "gpt2_tied", "gpt2_untied", "neox_parallel", "neox_sequential"]


@pytest.mark.parametrize("family,tied,parallel", CASES, ids=IDS)
def test_import_matches_transformers(tmp_path, family, tied, parallel):
    model = _torch_model(family, tied, parallel=parallel)
    cfg, params = import_hf(_save(model, tmp_path / "hf"))
    assert cfg.family == family
    assert cfg.share_embedding_weights == (family == "gpt2" if tied is None else tied)
    if family == "gptj":
        assert (cfg.rotary_dim, cfg.head_dim, cfg.filter_size) == (8, 16, 96)
        assert "bias" in params["head"]["lm_head"]
    if family == "neox":
        assert (cfg.rotary_dim, cfg.rope_theta, cfg.filter_size) == (4, 500.0, 96)
        assert cfg.use_parallel_residual == parallel and cfg.use_untied_layer_norm
        assert "bias" in params["blocks"]["attn"]["query_key_value"]
    tokens = _tokens()
    _assert_logits_close(_our_logits(cfg, params, tokens), _torch_logits(model, tokens))


@pytest.mark.parametrize("family,tied,parallel", CASES, ids=IDS)
def test_export_loads_in_transformers(tmp_path, family, tied, parallel):
    cfg, _ = import_hf(_save(_torch_model(family, tied, parallel=parallel), tmp_path / "hf"))
    params = _random_params(cfg)
    export_hf(cfg, params, tmp_path / "out")
    loaded = hf_class(family).from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    tokens = _tokens(1)
    _assert_logits_close(_our_logits(cfg, params, tokens), _torch_logits(loaded, tokens))
    cfg2, params2 = import_hf(tmp_path / "out")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.mark.parametrize("family", ["gptj", "gpt2", "neox"])
def test_sharded_export_round_trip(tmp_path, family):
    cfg, _ = import_hf(_save(_torch_model(family), tmp_path / "hf"))
    params = _random_params(cfg, seed=2)
    out = export_hf(cfg, params, tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    for p in shards[:-1]:  # every shard but a single over-size tensor stays under the limit
        sizes = [a.nbytes for a in load_file(p).values()]
        assert sum(sizes) <= 40_000 or len(sizes) == 1
    _, back = import_hf(out)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    loaded = hf_class(family).from_pretrained(out, attn_implementation="eager").eval()
    tokens = _tokens(2)
    _assert_logits_close(_our_logits(cfg, params, tokens), _torch_logits(loaded, tokens))


def test_neox_legacy_config_keys_and_export_refusals(tmp_path):
    """Hub Pythia files name the rotary fraction and base with the pre-transformers-5 flat keys."""
    src = _save(_torch_model("neox", seed=9), tmp_path / "hf")
    want, _ = import_hf(src)
    hf = json.loads((src / "config.json").read_text())
    rope = hf.pop("rope_parameters")
    hf.update(rotary_pct=rope["partial_rotary_factor"], rotary_emb_base=rope["rope_theta"])
    (src / "config.json").write_text(json.dumps(hf))
    got, _ = import_hf(src)
    assert got == want and (got.rotary_dim, got.rope_theta) == (4, 500.0)
    refused = [
        (dict(use_untied_layer_norm=False), "use_untied_layer_norm=False cannot be exported"),
        (dict(use_bias_in_output=True), "use_bias_in_output=True cannot be exported"),
        # head_dim 44: 44 * (30 / 44) = 29.99.. in floats, and HF would rotate int() = 29 dims
        (dict(hidden_size=176, rotary_dim=30), r"rotary_dim=30 cannot be exported.*!= 30"),
    ]
    for change, match in refused:
        with pytest.raises(CheckpointError, match=match) as info:
            export_hf(dataclasses.replace(want, **change), {}, tmp_path / "refused")
        assert "\n" not in str(info.value)


GRAD_CASES = [("gptj", True), ("gpt2", True), ("neox", True), ("neox", False)]


@pytest.mark.parametrize(
    "family,parallel", GRAD_CASES, ids=["gptj", "gpt2", "neox_parallel", "neox_sequential"]
)
def test_loss_gradient_matches_torch(tmp_path, family, parallel):
    model = _torch_model(family, seed=3, parallel=parallel)
    cfg, params = import_hf(_save(model, tmp_path / "hf"))
    tokens = _tokens(3)
    labels = np.roll(tokens, -1, axis=1)
    mask = np.ones(tokens.shape, np.float32)
    mask[:, -1] = 0.0  # the last position has no next token
    ours_model = get_model(cfg)

    def loss_fn(p):
        s, n = token_loss_sum(ours_model.logits(p, jnp.asarray(tokens)), labels, mask)
        return s / n

    with jax.default_matmul_precision("highest"):
        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)

    model.zero_grad()
    logits = model(torch.as_tensor(tokens, dtype=torch.long)).logits
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, VOCAB), torch.as_tensor(labels, dtype=torch.long).reshape(-1),
        reduction="none",
    )  # fmt: skip
    m = torch.as_tensor(mask).reshape(-1)
    t_loss = (nll * m).sum() / m.sum()
    t_loss.backward()
    np.testing.assert_allclose(float(loss), t_loss.item(), rtol=1e-6)

    t_grads = {n: p.grad.numpy() for n, p in model.named_parameters()}
    if family == "neox" and "embed_out.weight" not in t_grads:
        # transformers >= 5 calls NeoX's head lm_head in memory, embed_out in the checkpoint
        t_grads["embed_out.weight"] = t_grads.pop("lm_head.weight")
    for path, rel in hf_grad_errors(cfg, grads, t_grads).items():
        assert rel <= GRAD_RTOL, f"{path}: relative gradient error {rel:.3g}"


def test_pickled_checkpoint_refused_unless_allowed(tmp_path):
    model = _torch_model("gptj", seed=4)
    _save(model, tmp_path / "st")
    pkl = tmp_path / "pkl"
    pkl.mkdir()
    (pkl / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save(model.state_dict(), pkl / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled PyTorch checkpoint.*allow_pickle"):
        import_hf(pkl)
    _, from_pickle = import_hf(pkl, allow_pickle=True)
    _, from_st = import_hf(tmp_path / "st")
    jax.tree.map(np.testing.assert_array_equal, from_pickle, from_st)


def test_buffers_and_unprefixed_names_are_accepted(tmp_path):
    """Old GPT-J files carry attn.bias / attn.masked_bias buffers; hub GPT-2 has no prefix."""
    model = _torch_model("gpt2", seed=5)
    src = _save(model, tmp_path / "hf")
    _, want = import_hf(src)
    tensors = load_file(src / "model.safetensors")
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
    tensors["h.0.attn.masked_bias"] = np.array(-1e4, np.float32)
    save_file(tensors, str(src / "model.safetensors"))
    _, got = import_hf(src)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_checkpoint_errors_are_one_line(tmp_path):
    src = _save(_torch_model("gptj", seed=6), tmp_path / "hf")
    weights = src / "model.safetensors"
    tensors = load_file(weights)

    def err(match: str, path=src, **kw) -> str:
        with pytest.raises(CheckpointError, match=match) as info:
            import_hf(path, **kw)
        assert "\n" not in str(info.value)
        return str(info.value)

    err("does not exist", tmp_path / "nope")
    bad = dict(tensors)
    bad["transformer.h.1.mlp.fc_in.weight"] = np.zeros((96, 63), np.float32)
    save_file(bad, str(weights))
    msg = err(r"'transformer.h.1.mlp.fc_in.weight' has shape \(96, 63\), expected \(96, 64\)")
    assert str(weights) in msg
    del bad["transformer.h.1.mlp.fc_in.weight"]
    save_file(bad, str(weights))
    err("missing tensor 'transformer.h.1.mlp.fc_in.weight'")
    weights.unlink()
    err("no weights found")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    err("model_type 'bert' is not supported")
    (src / "config.json").unlink()
    err("config.json: missing")


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "wsjax.interop.convert", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_convert_cli_round_trip_and_bad_input(tmp_path):
    src = _save(_torch_model("gptj", seed=7), tmp_path / "hf")
    r = _cli("--from_hf", str(src), "--to_orbax", str(tmp_path / "orbax"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "orbax" / "params.yaml").is_file()
    orbax = tmp_path / "orbax"
    r = _cli(
        "--from_orbax", str(orbax), "--params", str(orbax / "params.yaml"),
        "--to_hf", str(tmp_path / "back"), "--max_shard_size", "100KB",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    cfg, want = import_hf(src)
    cfg2, got = import_hf(tmp_path / "back")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, got, want)

    r = _cli("--from_hf", str(tmp_path / "missing"), "--to_orbax", str(tmp_path / "o2"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr
    r = _cli("--from_orbax", str(tmp_path / "orbax"), "--to_hf", str(tmp_path / "b2"),
             "--params", str(tmp_path / "nope.yaml"))  # fmt: skip
    assert r.returncode == 2 and "nope.yaml" in r.stderr


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoint_imports_as_fp32(tmp_path, dtype):
    model = _torch_model("gpt2", seed=8)
    _, want = import_hf(_save(model, tmp_path / "fp32"))
    _save(model.to(getattr(torch, dtype)), tmp_path / "half")
    _, got = import_hf(tmp_path / "half")
    rtol = 2**-7 if dtype == "bfloat16" else 2**-10  # rounding of the stored half values
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, w, rtol=rtol, atol=1e-6)
