"""Shared test fixtures (the helpers behind them are in tests/helpers.py): tiny model configs,
random token batches, a per-session compile cache.

Tests marked ``needs_torch`` (PyTorch: transformers' models as yardsticks) are skipped one by one,
with the reason, where torch is not installed (CI's leg 2); every other test runs on both legs.

The compile cache: tests build many engines whose executables are identical (the same tiny model
with a different knob); a JAX persistent compilation cache in a temporary folder, made for this
session and removed after it, lets the second engine load what the first compiled. Runs get one
too: ``WSJAX_COMPILE_DIR`` (the default of ``--compile_dir``) points every run's
``compile_<checksum>/`` at a session folder instead of its fresh model_dir, so a run loads what
an earlier run of the same config compiled. It changes no result, only the time. Subprocesses
that tests start inherit both through the environment. A test of the model_dir's own compile
folder uses the ``own_compile_dir`` fixture.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

import pytest

from tests.helpers import normwise_rel_err, tiny_config_dict, token_batches

_CACHE_ENV = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}
_own_dirs: list[str] = []


def pytest_configure(config) -> None:
    """Point JAX and the runs at fresh compile caches before anything compiles (unless the user
    set them); xdist's workers inherit the controller's."""
    for env, prefix in (("JAX_COMPILATION_CACHE_DIR", "jaxcache"), ("WSJAX_COMPILE_DIR", "runs")):
        if not os.environ.get(env):
            _own_dirs.append(tempfile.mkdtemp(prefix=f"wsjax-test-{prefix}-"))
            os.environ[env] = _own_dirs[-1]
    for k, v in _CACHE_ENV.items():
        os.environ.setdefault(k, v)
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


NO_TORCH = "needs torch (leg 1 installs it)"


def pytest_collection_modifyitems(config, items) -> None:
    """Skip each ``needs_torch`` test, saying why, where torch is not installed."""
    if importlib.util.find_spec("torch") is not None:
        return
    for item in items:
        if item.get_closest_marker("needs_torch"):
            item.add_marker(pytest.mark.skip(reason=NO_TORCH))


def pytest_unconfigure(config) -> None:
    for path in _own_dirs:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def own_compile_dir(monkeypatch):
    """Runs in this test compile into their own model_dir (no shared ``WSJAX_COMPILE_DIR``)."""
    monkeypatch.delenv("WSJAX_COMPILE_DIR", raising=False)


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
