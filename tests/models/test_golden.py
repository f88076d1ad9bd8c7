"""wsjax's models against transformers' golden outputs, without torch (every CI leg).

tests/fixtures/golden/<case>/ holds a tiny transformers checkpoint of each family and variant
(every parameter random, the values float32-exact) and transformers' float64 logits, mean token
cross-entropy and its gradient for every checkpoint tensor on a fixed batch; made by
``python -m tests.fixtures.golden.make_golden`` (its docstring says how). Here each checkpoint
goes through wsjax.interop.hf's import (config mapping, renaming table, transposes, stacking),
and wsjax's model computes the same three things in JAX float64 (jax_enable_x64).

Tolerance, from float64 arithmetic: unit roundoff u = 2^-53 = 1.1e-16. A logit ends a chain of
2 blocks x (5 matmuls with dot products of length <= 32, 2 layer norms, a softmax over <= 8
keys) + the head: about n = 300 roundings along its path, each at most u relative to the O(1)
values it rounds (layer norm outputs, unit-scale activations); a gradient runs the chain again
backwards, n <= 1000 (the Llama families: 7 matmuls and 2 RMSNorms a block, n <= 400 and
1200). Worst case n u = 1.3e-13 relative to the values' scale, and the two implementations
round independently, so their distance is at most twice that. A random-weight network may
amplify an early rounding on its way to the output by its Jacobian's norm, which for these O(1)
weights (std 0.3, norms renormalising each block's input) is a modest factor per block; 1e-10
leaves a factor ~400 for it. A real discrepancy (a dropped bias, a rotary pair taken from the
wrong dims, the wrong layer norm, a transposed kernel) moves the outputs by 1e-3 or more:
seven orders above the bound; so do the llama3 scaling and Mistral's window of the Llama
cases (test_scaling_and_window_are_not_vacuous). Logits: max |ours - golden| <= RTOL x
max |golden|; loss: relative; gradients: ||ours - golden|| <= RTOL x ||golden|| per tensor.

Leg 1 (torch installed) also regenerates the data with the transformers it has and checks it
equals what is committed, to the same tolerance: a transformers change that moves its models is
caught there, and the committed data stays what transformers computes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.fixtures.golden.make_golden import CASES, GOLDEN_DIR
from wsjax.interop.hf import hf_table, import_hf
from wsjax.losses import token_loss_sum
from wsjax.models import get_model

RTOL = 1e-10
COMMITTED = sorted(p.parent.name for p in GOLDEN_DIR.glob("*/golden.json"))
INPUTS = ("input_ids", "labels", "loss_mask")


def rel(ours, ref) -> float:
    """||ours - ref|| / ||ref|| (the plain difference where ref is all zeros)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    den = np.linalg.norm(ref)
    return float(np.linalg.norm(ours - ref) / (den if den else 1.0))


def wsjax_outputs(folder: Path, golden: dict, x64) -> tuple[object, np.ndarray, float, dict]:
    """(config, logits, loss, {checkpoint tensor name: gradient}) computed by wsjax in float64
    from the checkpoint in ``folder``, on the golden inputs."""
    cfg, params = import_hf(folder)  # float32 numpy: the golden values are float32-exact
    model = get_model(cfg)
    model.compute_dtype = jnp.float64  # the model's compute dtype (as tests/engine/test_exact)
    tokens, labels = golden["input_ids"], golden["labels"]
    with x64():
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        mask = jnp.asarray(golden["loss_mask"], jnp.float64)

        def loss_fn(p):
            logits = model.logits(p, jnp.asarray(tokens))  # (B, T, V)
            total, count = token_loss_sum(logits, jnp.asarray(labels), mask)
            return total / count, logits

        (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
        assert logits.dtype == jnp.float64 and loss.dtype == jnp.float64
        logits, loss = np.asarray(logits), float(loss)
        by_name = {}
        for e in hf_table(cfg):  # our leaf -> the checkpoint's tensor(s), in HF's layout
            g = grads
            for k in e.path:
                g = g[k]
            g = np.asarray(g)
            layers = [(e.hf_name.format(i=i), g[i]) for i in range(len(g))] if e.stacked else []
            for name, value in layers or [(e.hf_name, g)]:
                by_name[name] = value.T if e.transpose else value
    return cfg, logits, loss, by_name


def test_every_case_is_committed_and_nothing_else():
    """The table of make_golden and the committed folders agree, and the data stays small."""
    assert sorted(CASES) == COMMITTED
    size = sum(f.stat().st_size for f in GOLDEN_DIR.glob("*/*") if f.is_file())
    assert size < 1_000_000, size
    for case in COMMITTED:
        meta = json.loads((GOLDEN_DIR / case / "golden.json").read_text())
        assert meta["case"] == case and meta["model"] == CASES[case].model


@pytest.mark.parametrize("case", COMMITTED)
def test_wsjax_matches_transformers_golden(case, x64):
    folder = GOLDEN_DIR / case
    golden = load_file(folder / "golden.safetensors")
    cfg, logits, loss, grads = wsjax_outputs(folder, golden, x64)
    ref = golden["logits"]
    scale = float(np.abs(ref).max())
    assert scale > 1.0  # random weights give O(1-10) logits: the check is not vacuous
    err = float(np.abs(logits - ref).max())
    assert err <= RTOL * scale, f"logits: max |diff| {err:.3g} > {RTOL} x {scale:.3g}"
    want_loss = float(golden["loss"][0])
    assert abs(loss - want_loss) <= RTOL * want_loss, (loss, want_loss)
    want = {k.removeprefix("grad/"): v for k, v in golden.items() if k.startswith("grad/")}
    # every checkpoint tensor has a gradient and our tree covers each once: with tied
    # embeddings the input embedding's gradient sums both of its uses, in both
    assert sorted(grads) == sorted(want)
    for name, g in want.items():
        assert np.linalg.norm(g) > 0, name  # every tensor is reached by the loss
        err = rel(grads[name], g)
        assert err <= RTOL, f"{case} {name}: relative gradient error {err:.3g} > {RTOL}"


@pytest.mark.parametrize(
    "case, change",
    [
        ("llama", dict(pos_scaling_type="linear", pos_scaling_factor=1.0,
                       pos_scaling_extra_args=None)),
        ("llama", dict(pos_scaling_extra_args=(("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                                               ("original_max_position_embeddings", 16.0)))),
        ("mistral", dict(attention_sliding_window_length=None)),
        ("mistral", dict(attention_sliding_window_length=5)),
    ],
)  # fmt: skip
def test_scaling_and_window_are_not_vacuous(case, change, x64):
    """Without llama3 scaling (or with its bands moved), without Mistral's window (or with it
    one token wider), the logits move by far more than RTOL: the golden cases test them."""
    folder = GOLDEN_DIR / case
    golden = load_file(folder / "golden.safetensors")
    cfg, params = import_hf(folder)
    model = get_model(dataclasses.replace(cfg, **change))
    model.compute_dtype = jnp.float64
    with x64():
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        logits = np.asarray(jax.jit(model.logits)(params, jnp.asarray(golden["input_ids"])))
    ref = golden["logits"]
    assert float(np.abs(logits - ref).max()) > 1e4 * RTOL * float(np.abs(ref).max())


@pytest.mark.needs_torch
def test_committed_data_is_what_transformers_computes(tmp_path):
    """Regenerated with this machine's transformers and torch: the checkpoints and inputs are
    identical (numpy draws them); the float64 outputs agree to RTOL (torch's kernels may sum
    in another order on another CPU or version, nothing more)."""
    from tests.fixtures.golden.make_golden import main

    main([str(tmp_path)])
    for case in COMMITTED:
        new, old = tmp_path / case, GOLDEN_DIR / case
        new_w, old_w = load_file(new / "model.safetensors"), load_file(old / "model.safetensors")
        assert sorted(new_w) == sorted(old_w), case
        for k, v in old_w.items():
            np.testing.assert_array_equal(new_w[k], v, err_msg=f"{case} {k}")
        new_g, old_g = load_file(new / "golden.safetensors"), load_file(old / "golden.safetensors")
        assert sorted(new_g) == sorted(old_g), case
        for k, v in old_g.items():
            if k in INPUTS:
                np.testing.assert_array_equal(new_g[k], v, err_msg=f"{case} {k}")
            else:
                assert rel(new_g[k], v) <= RTOL, (case, k, rel(new_g[k], v))
        assert import_hf(new)[0] == import_hf(old)[0], case  # the same model config
