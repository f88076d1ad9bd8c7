"""The names of ``wsjax`` and ``wsjax.data`` load on first use (``wsjax.lazy_getattr``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import wsjax
import wsjax.data

FIRST_USE = """
import sys, wsjax, wsjax.data
before = {m: m in sys.modules for m in ("wsjax.trainer", "wsjax.data.loader", "wsjax.data.shards")}
trainer, make_loader, shards = wsjax.Trainer, wsjax.data.make_loader, wsjax.data.shards
import wsjax.data.loader, wsjax.trainer
print(before, trainer is wsjax.trainer.Trainer, make_loader is wsjax.data.loader.make_loader,
      shards is sys.modules["wsjax.data.shards"])
"""


def test_names_and_submodules_load_from_their_homes_on_first_use():
    out = subprocess.run(
        [sys.executable, "-c", FIRST_USE], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[-3:] == ["True", "True", "True"], out  # each name is its home's object
    assert "True" not in " ".join(out[:-3]), out  # and none was imported before its use


@pytest.mark.parametrize(("package", "name"), [(wsjax, "Trainr"), (wsjax.data, "make_loadr")])
def test_an_unknown_name_is_an_attribute_error_naming_the_package(package, name):
    with pytest.raises(AttributeError, match=rf"module '{package.__name__}' has no attribute"):
        getattr(package, name)
    assert not hasattr(package, name)
