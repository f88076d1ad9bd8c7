"""configs/params_continuous_pretraining.yaml starts from the released GPT-J 6B: its layout (an
untied LM head with a bias) is the one transformers saves for GPT-J. A tiny GPT-J with the
config's own model keys, shrunk, saved by transformers with tie_word_embeddings=False, loads
through --checkpoint_path into that layout, every parameter where it belongs."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import transformers

from tests.helpers import REPO
from wsjax.config import load_config
from wsjax.interop.load import load_start
from wsjax.models import get_model

try:
    import torch
except ImportError:  # leg 2: skipped, saying so (tests/conftest.py)
    torch = None

SHRINK = [
    "model.hidden_size=32",
    "model.num_heads=4",
    "model.num_hidden_layers=2",
    "model.filter_size=64",
    "model.rotary_dim=4",
    "model.vocab_size=64",
    "model.max_position_embeddings=16",
    "train_input.vocab_size=64",
    "train_input.max_sequence_length=16",
]


@pytest.mark.needs_torch
def test_released_gptj_layout_loads_into_the_continued_pretraining_config(tmp_path):
    config = load_config(REPO / "configs" / "params_continuous_pretraining.yaml", SHRINK)
    m = config.model
    assert not m.share_embedding_weights and m.use_bias_in_output  # as the released model
    hf_cfg = transformers.GPTJConfig(
        vocab_size=m.vocab_size,
        n_positions=m.max_position_embeddings,
        n_embd=m.hidden_size,
        n_layer=m.num_hidden_layers,
        n_head=m.num_heads,
        n_inner=m.filter_size,
        rotary_dim=m.rotary_dim,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = transformers.GPTJForCausalLM(hf_cfg)
    with torch.no_grad():  # the head differs from the embedding, so untied is visible
        hf.lm_head.bias.copy_(torch.randn_like(hf.lm_head.bias))
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    model = get_model(m)
    start = load_start(tmp_path / "hf", model, None, weights_only=True)
    assert start.step == 0 and "HuggingFace" in start.source
    shapes = jax.tree.map(lambda a: tuple(a.shape), start.params)
    assert shapes == jax.tree.map(lambda s: tuple(s.shape), model.param_shapes())
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    head, embed = start.params["head"], start.params["embed"]
    kernel = next(v for k, v in jax.tree_util.tree_leaves_with_path(head) if "kernel" in str(k))
    bias = next(v for k, v in jax.tree_util.tree_leaves_with_path(head) if "bias" in str(k))
    np.testing.assert_array_equal(np.asarray(kernel).T, state["lm_head.weight"])
    np.testing.assert_array_equal(np.asarray(bias), state["lm_head.bias"])
    np.testing.assert_array_equal(np.asarray(embed["wte"]), state["transformer.wte.weight"])
