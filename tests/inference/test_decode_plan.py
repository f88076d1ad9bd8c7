"""The generation plan (wsjax.inference.decode_plan): the KV cache it sizes, by hand and against
the cache arrays the decoder allocates. No torch."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from tests.helpers import REPO
from wsjax.config import load_config
from wsjax.inference.decode import StreamingDecoder, generation_plan
from wsjax.inference.decode_plan import plan_generation
from wsjax.models import get_model


def test_llama3_8b_cache_counts_the_key_value_heads():
    """The shipped Llama-3-8B config: 8 key/value heads of 128 dims for 32 query heads, 32
    layers, bf16. By hand, keys + values are 2 x 8 x 128 x 2 bytes = 4 KiB a token and a layer,
    128 KiB a token for the model; 2048 cache slots (1024 prompt + 1024 new) of one prompt:
    8 MiB a layer, 256 MiB in all (sized by the 32 query heads it would be 4x that)."""
    config = load_config(REPO / "configs" / "params_llama3_8b.yaml")
    assert (config.model.num_heads, config.model.num_kv_heads) == (32, 8)
    streaming = dataclasses.replace(config.streaming, device_memory_gb=80.0)
    plan = plan_generation(
        get_model(config.model), streaming, batch=1, width=1024, max_new_tokens=1024
    )
    assert plan.cache_len == 2048
    assert plan.kv_cache_per_layer == 2048 * 2 * 8 * 128 * 2 == 8 * 2**20
    assert plan.kv_cache_bytes == 2048 * 128 * 2**10 == 256 * 2**20
    assert plan.kv_cache == "device"  # 256 MiB of cache beside the streamed weights fits 80 GB


def test_plan_equals_the_cache_arrays_the_decoder_allocates(tiny_config):
    """A tiny Llama with 2 key/value heads for 4 query heads: the plan's bytes a layer are the
    nbytes of the (keys, values) arrays the decoder makes for the same call."""
    config = tiny_config("llama", layers=2)
    assert (config.model.num_heads, config.model.num_kv_heads) == (4, 2)
    model, rng = get_model(config.model), np.random.default_rng(0)
    params = jax.tree.map(
        lambda a: rng.normal(0, 0.02, a.shape).astype(a.dtype), model.param_shapes()
    )
    decoder = StreamingDecoder(model, params, config.streaming)
    prompts, new = [[5, 17, 3, 9, 44, 61, 2], [7, 2, 30]], 8
    plan = generation_plan(model, config.streaming, prompts, new)
    caches = decoder._empty_caches(len(prompts), plan.cache_len, offload=False)
    assert len(caches) == plan.num_layers == 2
    for k, v in caches:
        assert k.shape == (2, plan.cache_len, 2, 16)  # (B, S, kv heads, head_dim)
        assert k.nbytes + v.nbytes == plan.kv_cache_per_layer
    assert sum(k.nbytes + v.nbytes for k, v in caches) == plan.kv_cache_bytes
