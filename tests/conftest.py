"""Shared test fixtures: tiny model configs, random token batches, a per-session compile cache.

The compile cache: tests build many engines whose executables are identical (the same tiny model
with a different knob); a JAX persistent compilation cache in a temporary folder, made for this
session and removed after it, lets the second engine load what the first compiled. It changes
no result, only the time. Subprocesses that tests start inherit it through the environment.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pytest

_CACHE_ENV = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}
_own_cache_dir: str | None = None


def pytest_configure(config) -> None:
    """Point JAX at a fresh compile cache before anything compiles (unless the user set one)."""
    global _own_cache_dir
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        _own_cache_dir = tempfile.mkdtemp(prefix="wsjax-test-jaxcache-")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = _own_cache_dir
    for k, v in _CACHE_ENV.items():
        os.environ.setdefault(k, v)
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config) -> None:
    if _own_cache_dir is not None:
        shutil.rmtree(_own_cache_dir, ignore_errors=True)


VOCAB, BATCH, SEQ = 97, 8, 16


def tiny_config_dict(
    family: str = "gptj",
    *,
    layers: int = 3,
    hidden: int = 64,
    model: dict | None = None,
    optimizer: dict | None = None,
    streaming: dict | None = None,
    seed: int = 3,
    batch: int = BATCH,
    seq: int = SEQ,
) -> dict:
    """A params-YAML dict of a tiny GPT-J (rotary_dim 8 < head_dim), GPT-2 (tied) or GPT-NeoX
    (untied layer norms, rotate-half rotary on 8 of 16 head dims) model."""
    m = {
        "hidden_size": hidden,
        "num_heads": 4,
        "num_hidden_layers": layers,
        "filter_size": 2 * hidden,
        "vocab_size": VOCAB,
        "max_position_embeddings": 32,
    }
    if family == "gptj":
        m |= {"position_embedding_type": "rotary", "rotary_dim": 8}
    elif family == "neox":
        m |= {"model_family": "neox", "position_embedding_type": "rotary", "rotary_dim": 8}
    else:
        m |= {"position_embedding_type": "learned", "share_embedding_weights": True}
    opt = {"optimizer_type": "adamw", "learning_rate": 1e-3, "weight_decay_rate": 0.01}
    return {
        "model": m | (model or {}),
        "optimizer": opt | (optimizer or {}),
        "runconfig": {"max_steps": 10, "seed": seed},
        "streaming": dict(streaming or {}),
        "train_input": {"batch_size": batch, "max_sequence_length": seq, "data_dir": "x"},
    }


def token_batches(
    n: int, *, batch: int = BATCH, seq: int = SEQ, vocab: int = VOCAB, seed: int = 0
) -> list[dict]:
    """``n`` random loader-style batches; about 1 token in 8 is masked out of the loss."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
        labels = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
        mask = (rng.random((batch, seq)) > 0.125).astype(np.float32)
        out.append({"input_ids": ids, "labels": labels, "loss_mask": mask})
    return out


@pytest.fixture(scope="session")
def tiny_config():
    """Factory: ``tiny_config(family, layers=..., model=..., optimizer=..., streaming=...)``."""
    from wsjax.config import config_from_dict

    return lambda *a, **kw: config_from_dict(tiny_config_dict(*a, **kw))


@pytest.fixture(scope="session")
def make_batches():
    """Factory: ``make_batches(n, batch=8, seq=16, seed=0)`` -> list of numpy batches."""
    return token_batches


@pytest.fixture(scope="session")
def config_dict():
    """Factory: the dict behind ``tiny_config`` (to hand to a subprocess as JSON)."""
    return tiny_config_dict


def normwise_rel_err(a, b) -> dict[str, float]:
    """Per leaf ``||a - b|| / ||b||`` (``||a - b||`` where ``b`` is all zeros), by key path."""
    import jax

    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b), "trees differ in structure"
    out = {}
    for (path, x), y in zip(flat_a, flat_b, strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert x.shape == y.shape, (jax.tree_util.keystr(path), x.shape, y.shape)
        den = np.linalg.norm(y)
        out[jax.tree_util.keystr(path)] = float(np.linalg.norm(x - y) / (den if den else 1.0))
    return out


@pytest.fixture(scope="session")
def rel_err():
    """``rel_err(a, b)`` -> (worst key path, its norm-wise relative error) over two pytrees."""

    def worst(a, b) -> tuple[str, float]:
        errs = normwise_rel_err(a, b)
        key = max(errs, key=errs.get)
        return key, errs[key]

    return worst


@pytest.fixture(scope="session")
def x64():
    """Context-manager factory: ``with x64(): ...`` runs with jax_enable_x64, then restores it
    (the exactness tests compare engine and reference in float64 inside such a block)."""
    import contextlib

    import jax

    @contextlib.contextmanager
    def enabled():
        before = jax.config.jax_enable_x64
        jax.config.update("jax_enable_x64", True)
        try:
            yield
        finally:
            jax.config.update("jax_enable_x64", before)

    return enabled
