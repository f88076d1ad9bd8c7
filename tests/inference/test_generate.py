"""Generation with streamed weights (wsjax.inference.generate, wsjax.inference.decode, the KV
cache path).

Yardsticks: transformers' ``generate(do_sample=False)`` on the HF export of the same weights
(GPT-J, GPT-2, NeoX; two prompts of different lengths, so left padding and per-row positions
are exercised; needs torch, so CI's leg 1 only), the resident model re-run on the whole sequence
without a cache, and a hand computation of the nucleus filter. The other tests decode the tiny
GPT-2 checkpoint of tests/fixtures/golden (transformers' format, every tensor random), which
needs no torch. Tiny models (2 layers): every case runs in seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.fixtures.golden.make_golden import GOLDEN_DIR
from tests.helpers import REPO, small_config
from wsjax.config.schema import StreamingConfig
from wsjax.inference.decode import Sampling, StreamingDecoder, sample_next
from wsjax.interop.hf import export_hf, import_hf
from wsjax.models import get_model

PROMPTS = [[5, 17, 3, 9, 44, 61, 2], [7, 2, 30]]  # different lengths: left padding matters
NEW = 8


def _hf_greedy(hf_dir: Path, prompts: list[list[int]], new: int) -> np.ndarray:
    """transformers' greedy continuation of left-padded prompts (its own attention mask)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    model.generation_config.eos_token_id = None  # run all ``new`` steps, as we are asked to
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0
        )
    return out[:, width:].numpy()


@pytest.mark.needs_torch
@pytest.mark.parametrize("family", ["gptj", "gpt2", "neox"])
def test_greedy_equals_transformers_generate(tmp_path, family):
    from tests.interop.test_hf import _save, _torch_model  # tiny HF models, every tensor random

    cfg, params = import_hf(_save(_torch_model(family), tmp_path / "hf"))
    exported = export_hf(cfg, params, tmp_path / "export")  # what a user's export would be
    with jax.default_matmul_precision("highest"):
        decoder = StreamingDecoder(get_model(cfg), params, StreamingConfig())
        ours = decoder.generate(PROMPTS, NEW)
    ref = _hf_greedy(exported, PROMPTS, NEW)
    assert ours.shape == ref.shape == (2, NEW)
    np.testing.assert_array_equal(ours, ref)
    # embed, block, head, once for the prefill bucket and once for the decode step
    assert decoder.compile_count == 6
    # other prompt lengths in the same bucket (<= 8 tokens) compile nothing new
    with jax.default_matmul_precision("highest"):
        decoder.generate([[1, 2], [3, 4, 5, 6, 7, 8]], NEW)
    assert decoder.compile_count == 6
    # the weights crossed the link once per pass: the prefill + (NEW - 1) decode steps, twice
    assert decoder.stats.h2d_bytes == 2 * NEW * decoder.model_bytes()


@pytest.fixture(scope="module")
def gpt2():
    """A tiny GPT-2 (tied embeddings, vocab 64, 32 positions) in transformers' format, every
    tensor random (tests/fixtures/golden/gpt2): (model, params)."""
    cfg, params = import_hf(GOLDEN_DIR / "gpt2")
    assert (cfg.vocab_size, cfg.max_position_embeddings) == (64, 32) and cfg.share_embedding_weights
    return get_model(cfg), params


@pytest.fixture(scope="module")
def gpt2_decoder(gpt2):
    return StreamingDecoder(*gpt2, StreamingConfig())


def test_sampling_is_deterministic_for_a_seed(gpt2_decoder):
    warm = Sampling(temperature=1.0, seed=3)
    first = gpt2_decoder.generate(PROMPTS, NEW, warm)
    again = gpt2_decoder.generate(PROMPTS, NEW, warm)
    other = gpt2_decoder.generate(PROMPTS, NEW, Sampling(temperature=1.0, seed=4))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)  # 16 draws over 64 tokens: equal by chance ~never


def test_top_k_1_and_tiny_top_p_equal_greedy(gpt2_decoder):
    greedy = gpt2_decoder.generate(PROMPTS, NEW)
    top1 = gpt2_decoder.generate(PROMPTS, NEW, Sampling(temperature=1.0, top_k=1, seed=5))
    nucleus = gpt2_decoder.generate(PROMPTS, NEW, Sampling(temperature=1.0, top_p=1e-6, seed=5))
    np.testing.assert_array_equal(top1, greedy)
    np.testing.assert_array_equal(nucleus, greedy)


def test_top_p_keeps_the_smallest_set_reaching_p():
    # softmax([3, 2, 1, 0]) = [0.644, 0.237, 0.087, 0.032]: mass before each = [0, 0.644,
    # 0.881, 0.968], so top_p 0.7 keeps tokens 0 and 1 only, in the odds 0.644 : 0.237.
    logits = jnp.tile(jnp.asarray([[3.0, 2.0, 1.0, 0.0]]), (4000, 1))
    picked = np.asarray(sample_next(logits, jax.random.PRNGKey(0), Sampling(1.0, top_p=0.7)))
    assert set(np.unique(picked)) == {0, 1}
    share = float((picked == 1).mean())
    expected = 0.237 / (0.644 + 0.237)  # 0.269; binomial sd over 4000 draws is 0.007
    assert abs(share - expected) < 5 * 0.007


def test_eos_stops_a_row_and_repeats_eos(gpt2_decoder):
    greedy = gpt2_decoder.generate(PROMPTS, NEW)
    eos = int(greedy[0, 2])  # make row 0's third token the end of text
    out = gpt2_decoder.generate(PROMPTS, NEW, eos_id=eos)
    first = int(np.argmax(out[0] == eos))
    np.testing.assert_array_equal(out[0, : first + 1], greedy[0, : first + 1])
    assert (out[0, first:] == eos).all()


def test_prompt_too_long_is_one_clear_error(gpt2_decoder):
    from wsjax.errors import ConfigError

    with pytest.raises(ConfigError, match="max_position_embeddings 32"):
        gpt2_decoder.generate([[1] * 30], 8)


# ---- the command line, on a model_dir that training wrote ---------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step run of the small GPT-J, its params file and a byte-level BPE of 300 ids."""
    from wsjax.data.textio import train_bpe
    from wsjax.train import run

    root = tmp_path_factory.mktemp("run")
    config = small_config("runconfig.max_steps=2")
    result = run(config, "train", root / "model_dir", max_steps=2, progress=False)
    tok = train_bpe(["def main():\n    return 0\n" * 20, "import os\nprint(os.sep)\n"], 300)
    tok.save(str(root / "tokenizer.json"))
    return config, result.model_dir, root / "tokenizer.json", tok


def _resident_greedy(config, params, prompt: list[int], new: int) -> list[int]:
    """Greedy decoding without a cache: the whole sequence through the resident model each step."""
    model, seq = get_model(config.model), list(prompt)
    logits = jax.jit(model.logits)
    for _ in range(new):
        seq.append(int(jnp.argmax(logits(params, jnp.asarray([seq]))[0, -1])))
    return seq[len(prompt) :]


@pytest.mark.slow  # a 2-step training run and two CLI processes: about 60 s on 2 cores
def test_cli_streams_the_greedy_continuation(trained):
    from wsjax.inference.generate import load_params

    config, model_dir, tok_file, tok = trained
    prompt = "def main"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    params_file = model_dir / "train" / "params_train.yaml"
    cmd = [sys.executable, "-m", "wsjax.inference.generate", "-p", str(params_file)]
    cmd += ["--checkpoint_path", str(model_dir), "--prompt", prompt, "--max_new_tokens", "6"]
    offload = ["--tokenizer", str(tok_file), "--kv_cache", "host"]  # offloaded: the same tokens
    proc = subprocess.run([*cmd, *offload], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "KV cache: host (--kv_cache host)" in proc.stderr  # the plan, logged at the start
    ids = _resident_greedy(config, load_params(config, model_dir), tok.encode(prompt).ids, 6)
    expected = prompt + tok.decode(ids[: ids.index(0)] if 0 in ids else ids)  # id 0: EOS
    assert proc.stdout.rstrip("\n") == expected
    assert "tokens/s" in proc.stderr

    # synthetic training data has no tokenizer: one clear line, exit 2
    bad = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: no tokenizer found") and bad.stderr.count("\n") == 1


# ---- where the KV caches live: the generation plan and offload -----------------------------------
def test_offloaded_cache_gives_the_same_tokens(gpt2_decoder):
    for sampling in (Sampling(), Sampling(temperature=1.0, top_k=20, seed=7)):
        resident = gpt2_decoder.generate(PROMPTS, NEW, sampling, kv_cache="device")
        offloaded = gpt2_decoder.generate(PROMPTS, NEW, sampling, kv_cache="host")
        assert gpt2_decoder.plan.kv_cache == "host"
        np.testing.assert_array_equal(offloaded, resident)


def _cache_arrays(shape: tuple) -> dict[str, list]:
    """The live arrays of the KV caches' shape, by memory kind (what really holds memory)."""
    by_kind: dict[str, list] = {}
    for a in jax.live_arrays():
        if a.shape == shape and not a.is_deleted():
            by_kind.setdefault(a.sharding.memory_kind, []).append(a.nbytes)
    return by_kind


def _device_bytes() -> int:
    """Bytes of every live array in device memory (host memory kinds excluded)."""
    live = (a for a in jax.live_arrays() if not a.is_deleted())
    return sum(a.nbytes for a in live if a.sharding.memory_kind == "device")


@pytest.mark.parametrize("depth", [1, 2])
def test_offload_keeps_only_the_layers_in_flight_on_the_device(tiny_config, depth):
    """Measured on the live arrays, each time a block runs: offloaded, the device (memory kind
    "device") holds the caches of the prefetch window only, depth + 1 layers, and every layer's
    cache stays in host memory ("pinned_host"); resident, the device holds all L. Either way,
    what the call adds to device memory stays within the plan's array terms."""
    layers = 4
    config = tiny_config("gptj", layers=layers, streaming={"prefetch_depth": depth})
    model, rng = get_model(config.model), np.random.default_rng(0)
    # random weights without compiling the initialiser: only bytes and placement are checked
    params = jax.tree.map(
        lambda a: rng.normal(0, 0.02, a.shape).astype(a.dtype), model.param_shapes()
    )
    decoder = StreamingDecoder(model, params, config.streaming)
    heads, head_dim = config.model.num_heads, config.model.hidden_size // config.model.num_heads
    shape = (len(PROMPTS), 8 + NEW, heads, head_dim)  # (B, prompt bucket + NEW, H, K)
    seen, added = [], []
    run = decoder._run

    def measure_then_run(name, fn, *args, **kw):
        added.append(_device_bytes() - before)
        if name == "block":
            seen.append(_cache_arrays(shape))
        return run(name, fn, *args, **kw)

    def arrays_planned(where: str) -> int:  # the plan's terms that are arrays, not scratch
        return decoder.plan.device_bytes(where) - decoder.plan.fixed["executable_temp"]

    decoder._run = measure_then_run
    before = _device_bytes()  # whatever else this process holds on the device
    decoder.generate(PROMPTS, NEW, kv_cache="host")
    on_device = [len(s.get("device", [])) for s in seen]
    # keys + values of the window: prefetched with the weights, depth layers ahead
    assert max(on_device) == 2 * (depth + 1)
    assert all(len(s["pinned_host"]) == 2 * layers for s in seen)
    offloaded_peak = max(added)
    assert 0 < offloaded_peak <= arrays_planned("host")

    seen.clear(), added.clear()
    decoder.generate(PROMPTS, NEW, kv_cache="device")
    assert {len(s["device"]) for s in seen} == {2 * layers} and "pinned_host" not in seen[0]
    assert max(added) <= arrays_planned("device")
    # offload saved exactly the caches of the layers not in flight, as the plan says
    saved = arrays_planned("device") - arrays_planned("host")
    per_layer = 2 * int(np.prod(shape)) * 4  # keys + values, fp32
    assert max(added) - offloaded_peak == saved == (layers - depth - 1) * per_layer
    # the plan's scratch bounds what XLA compiled for every executable
    temps = [exe.memory_analysis().temp_size_in_bytes for exe in decoder._compiled.values()]
    assert max(temps) <= decoder.plan.fixed["executable_temp"]


def test_offload_without_a_host_memory_kind_uses_the_host_cpu_device(gpt2):
    """An accelerator without the configured host memory kind keeps offloaded caches on the
    host CPU device (as activation offload falls back); the tokens do not change."""
    model, params = gpt2
    decoder = StreamingDecoder(model, params, StreamingConfig(host_memory_kind="no_such_kind"))
    assert decoder.cache_home(True) == decoder.placement.host
    offloaded = decoder.generate(PROMPTS, NEW, kv_cache="host")
    resident = StreamingDecoder(model, params, StreamingConfig()).generate(PROMPTS, NEW)
    np.testing.assert_array_equal(offloaded, resident)


def test_plan_offloads_when_only_that_fits_and_refuses_below(tiny_config):
    from wsjax.engine.plan import GiB
    from wsjax.errors import PlanError
    from wsjax.inference.decode import generation_plan

    layers, batch, prompt_len, new = 6, 4, 5, 24
    prompts = [[1] * prompt_len] * batch

    def plan_with(device_gb=None, kv_cache="auto"):
        streaming = {} if device_gb is None else {"device_memory_gb": device_gb}
        config = tiny_config("gptj", layers=layers, streaming=streaming)
        model = get_model(config.model)
        return generation_plan(model, config.streaming, prompts, new, kv_cache), config

    free, config = plan_with()  # the CPU reports no limit: not checked, caches stay resident
    assert free.kv_cache == "device" and free.device_available is None
    m = config.model
    cache_len = 8 + new  # prompts padded to the 8-slot bucket
    hand = 2 * layers * batch * cache_len * m.num_heads * (m.hidden_size // m.num_heads) * 4
    assert free.kv_cache_bytes == hand
    window = 2  # prefetch_depth 1: the layer computed and the one arriving
    saved = free.device_bytes("device") - free.device_bytes("host")
    assert saved == (layers - window) * hand // layers

    between = (free.device_bytes("host") + free.device_bytes("device")) / 2 / GiB
    plan, _ = plan_with(between)
    assert plan.kv_cache == "host" and plan.device_available == int(between * GiB)
    with pytest.raises(PlanError, match="--kv_cache host or auto"):
        plan_with(between, kv_cache="device")

    below = 0.9 * free.device_bytes("host") / GiB
    with pytest.raises(PlanError) as refused:
        plan_with(below)
    message = str(refused.value)
    assert refused.value.exit_code == 3 and "\n" not in message
    assert "fewer prompts per batch (now 4)" in message and "max_new_tokens (now 24)" in message


def test_cli_refuses_a_call_that_fits_no_way_in_one_line(tmp_path, capsys):
    import yaml

    from wsjax.data.textio import train_bpe
    from wsjax.inference.generate import main

    params = yaml.safe_load((REPO / "configs" / "params_gptj_tiny.yaml").read_text())
    params.setdefault("streaming", {})["device_memory_gb"] = 1e-4  # 105 kB: less than a layer
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    train_bpe(["def main():\n    return 0\n"], 300).save(str(tmp_path / "tokenizer.json"))
    argv = ["-p", str(tmp_path / "params.yaml"), "--checkpoint_path", str(tmp_path / "none")]
    argv += ["--tokenizer", str(tmp_path / "tokenizer.json"), "--prompt", "def main"]
    assert main([*argv, "--kv_cache", "host", "--max_new_tokens", "16"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: generation does not fit the device") and err.count("\n") == 1
