"""Initialisation (wsjax.models.init): which config initializer each weight gets, a process's
slice of the init equals that slice of the whole init, and the layer-by-layer init's scratch
does not grow with depth."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from tests.models.base import FAMILIES, model_cfg
from wsjax.models import get_model

# ---- initialisation: which config initializer each weight gets ------------------------------
OUTPUT_PROJECTIONS = {  # residual-branch output projections: output_layer_initializer
    "gptj": [("attn", "out_proj"), ("mlp", "fc_out")],
    "gpt2": [("attn", "c_proj"), ("mlp", "c_proj")],
    "neox": [("attn", "dense"), ("mlp", "dense_4h_to_h")],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_init_uses_the_configs_initializers(family):
    """Distinct stds per kind; sample stds within 10% (>= 1000 samples: ~2.2% standard error)."""
    stds = {"initializer": 0.05, "embedding_initializer": 0.3, "output_layer_initializer": 0.005}
    inits = {k: {"name": "normal", "std": v} for k, v in stds.items()}
    model = get_model(model_cfg(family, **inits))
    params = jax.jit(model.init)(jax.random.key(0))
    blocks = params["blocks"]
    np.testing.assert_allclose(np.std(params["embed"]["wte"]), 0.3, rtol=0.1)
    for path in OUTPUT_PROJECTIONS[family]:
        kernel = blocks[path[0]][path[1]]["kernel"]
        np.testing.assert_allclose(np.std(kernel), 0.005, rtol=0.1)
    first = blocks["attn"][{"gptj": "q_proj", "gpt2": "c_attn", "neox": "query_key_value"}[family]]
    np.testing.assert_allclose(np.std(first["kernel"]), 0.05, rtol=0.1)
    assert not np.allclose(first["kernel"][0], first["kernel"][1])  # each layer its own draw
    np.testing.assert_array_equal(blocks["ln_1"]["scale"], 1.0)
    np.testing.assert_array_equal(blocks["ln_1"]["bias"], 0.0)
    if "bias" in first:
        np.testing.assert_array_equal(first["bias"], 0.0)


def _process_shards(count: int, index: int, devices: int):
    """This process's place among ``count`` (the shapes only: a stand-in for the device mesh)."""
    from types import SimpleNamespace

    from wsjax.engine.shards import ProcessShards

    mesh = SimpleNamespace(devices=np.empty(devices))
    return ProcessShards(mesh=mesh, host_mesh=None, count=count, index=index)


def _sliced_init(model, shards):
    """The engine's init: layer by layer, each process keeping its slices."""
    from wsjax.engine.engine import layerwise_init

    return jax.jit(layerwise_init(model, shards))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("devices", [2, 4], ids=["2x1", "2x2"])
def test_init_of_a_process_slice_is_that_slice_of_the_whole_init(family, devices):
    """Several processes: each builds only its slices, layer by layer (the engine's init). The
    slices are the whole init's, bitwise, and the two processes' slices make the whole."""
    from wsjax.engine.store import local_stacked, slice_stacked

    model = get_model(model_cfg(family, num_hidden_layers=4))
    key = jax.random.key(3)
    whole = jax.tree.map(np.asarray, jax.jit(model.init)(key))  # all layers at once (vmap)
    one_process = jax.tree.map(np.asarray, _sliced_init(model, None)(key))
    jax.tree.map(np.testing.assert_array_equal, one_process, whole)
    full = model.param_shapes()
    parts = []
    for index in (0, 1):
        shards = _process_shards(2, index, devices)
        got = jax.tree.map(np.asarray, _sliced_init(model, shards)(key))
        local = local_stacked(shards, full)
        assert jax.tree.map(np.shape, got) == jax.tree.map(lambda a: tuple(a.shape), local)
        jax.tree.map(np.testing.assert_array_equal, got, slice_stacked(shards, whole, full))
        parts.append(got)
    # together: every element of the whole once (a cut leaf in two halves, the rest in both)
    for a, b, w in zip(*(jax.tree.leaves(p) for p in parts), jax.tree.leaves(whole), strict=True):
        if a.shape == w.shape:
            np.testing.assert_array_equal(a, w)
            np.testing.assert_array_equal(b, w)
        else:
            axis = next(i for i, (m, n) in enumerate(zip(a.shape, w.shape)) if m != n)
            np.testing.assert_array_equal(np.concatenate([a, b], axis=axis), w)


def test_layer_by_layer_init_scratch_does_not_grow_with_depth():
    """XLA's own memory analysis of the compiled inits: all layers at once needs scratch that
    grows with depth (the random bits of every layer: 38.5 GiB besides the 22.5 GiB of weights
    for GPT-J 6B, benchmarks/bench_init.py); the engine's layer-by-layer init needs the same
    scratch at 4 and 8 layers, and with two processes outputs half the model. (The layer loop
    is the families' common code; the test above covers each family's values.)"""
    family = "gptj"

    def analysis(layers: int, shards):
        model = get_model(model_cfg(family, num_hidden_layers=layers, hidden_size=64))
        init = jax.jit(model.init) if shards == "vmap" else _sliced_init(model, shards)
        return init.lower(jax.random.key(0)).compile().memory_analysis()

    at_once = {n: analysis(n, "vmap") for n in (4, 8)}
    assert at_once[8].temp_size_in_bytes > 1.5 * at_once[4].temp_size_in_bytes
    for shards in (None, _process_shards(2, 0, 2)):
        by_layer = {n: analysis(n, shards) for n in (4, 8)}
        assert by_layer[8].temp_size_in_bytes == by_layer[4].temp_size_in_bytes
        assert by_layer[8].temp_size_in_bytes < at_once[8].temp_size_in_bytes / 2
        share = by_layer[8].output_size_in_bytes / at_once[8].output_size_in_bytes
        assert share == pytest.approx(1.0 if shards is None else 0.5, abs=0.01)
