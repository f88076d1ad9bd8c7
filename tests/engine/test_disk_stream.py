"""streaming.disk_stream: the compute-dtype stream copy in the disk tier too, read ahead of each
fetch along the step's order (wsjax.engine.disk_store.TierStream).

Yardsticks: the RAM engine bitwise (the tier only moves bytes), with the update on either side
and a tied head (GPT-2, whose head also reads the embedding); ``jax.live_arrays()`` for what
stays in memory; the tier's own record of which reads were started before they were needed."""

from __future__ import annotations

import gc

import jax
import numpy as np
import pytest

from tests.engine.test_exact import init_params
from wsjax.engine import StreamingEngine
from wsjax.engine.disk import READ_AHEAD
from wsjax.engine.disk_store import STREAM, TierStream
from wsjax.engine.store import segment_names, tree_bytes
from wsjax.errors import ConfigError
from wsjax.models import get_model


def pair(tiny_config, tmp_path, family="gptj", layers=4, model=None, **streaming):
    ram_cfg = tiny_config(family, layers=layers, model=model, streaming=streaming)
    disk = {**streaming, "disk_path": str(tmp_path / "tier"), "disk_stream": True}
    disk_cfg = tiny_config(family, layers=layers, model=model, streaming=disk)
    model = get_model(ram_cfg.model)
    params = init_params(model)
    ram = StreamingEngine(model, ram_cfg, params=jax.tree.map(np.array, params))
    tier = StreamingEngine(model, disk_cfg, params=jax.tree.map(np.array, params))
    return ram, tier, model


@pytest.mark.parametrize(
    "family,placement,bf16",
    [("gptj", "host", False), ("gptj", "device", False), ("gpt2", "host", True)],
    ids=["host", "device", "tied_head_bf16"],
)  # fmt: skip
def test_bitwise_the_ram_engine(tiny_config, make_batches, tmp_path, family, placement, bf16):
    """Losses, norms and weights bitwise the RAM engine's; the bf16 stream copies go through
    the files as they are (mixed precision)."""
    ram, tier, model = pair(tiny_config, tmp_path, family, model={"mixed_precision": bf16},
                        optimizer_placement=placement, micro_batch_size=4)  # fmt: skip
    assert isinstance(tier.store.stream, TierStream)
    for batch in make_batches(3, seed=5):
        a, b = ram.train_step(batch), tier.train_step(batch)
        assert (a["train/loss"], a["train/grad_norm"]) == (b["train/loss"], b["train/grad_norm"])
    jax.tree.map(np.testing.assert_array_equal, tier.params_tree(), ram.params_tree())
    files = list((tmp_path / "tier").glob("stream-*.bin"))
    assert len(files) == len(segment_names(4))
    on_disk, n = sum(f.stat().st_size for f in files), model.num_params()
    width = 2 if bf16 else 4  # bytes a parameter of the stream copy, each leaf 64-B aligned
    leaves = len(files) * len(jax.tree.leaves(model.param_shapes()))  # more than the files hold
    assert width * n <= on_disk < width * n + 64 * leaves


def test_reads_are_started_before_the_fetch_needs_them(tiny_config, make_batches, tmp_path,
                                                       monkeypatch):  # fmt: skip
    """Of a step's stream reads, all but the step's first were started ahead (by the access
    READ_AHEAD segments before them in the forward-then-backward order)."""
    _, tier, _ = pair(tiny_config, tmp_path, layers=6)
    seen, get = [], TierStream.__getitem__

    def recording(self, name):
        seen.append((name, STREAM + name in self.tier._reads))
        return get(self, name)

    monkeypatch.setattr(TierStream, "__getitem__", recording)
    for batch in make_batches(2, seed=6):
        seen.clear()
        tier.train_step(batch)
        names = segment_names(6)
        assert {n for n, _ in seen} == set(names) and len(seen) >= 2 * len(names)
        assert sum(not ahead for _, ahead in seen) <= 1, seen


def live_bytes() -> int:
    gc.collect()
    return sum(a.nbytes for a in jax.live_arrays())


def test_ram_holds_a_window_of_stream_copies(tiny_config, make_batches, tmp_path):
    """Live arrays (measured) of an engine built and trained for 2 steps: with disk_stream at
    most READ_AHEAD + 2 segments' stream copies (and a few scalars), where the plain disk tier
    holds every segment's."""
    layers, held = 10, {}
    for on in (False, True):
        cfg = tiny_config("gptj", layers=layers, streaming={
            "disk_path": str(tmp_path / f"tier-{on}"), "disk_stream": on})  # fmt: skip
        model = get_model(cfg.model)
        params = init_params(model)
        base = live_bytes()
        engine = StreamingEngine(model, cfg, params=params)
        for batch in make_batches(2, seed=7):
            engine.train_step(batch)
        engine.store.tier.flush()
        held[on] = live_bytes() - base
        engine.store.close()
        del engine
    shapes = model.param_shapes(model.compute_dtype)
    stream = tree_bytes(shapes)
    biggest = max(tree_bytes(shapes["blocks"]) // layers, tree_bytes(shapes["embed"]),
                  tree_bytes(shapes["head"]))  # fmt: skip
    small = 64 << 10  # step counts, scalars
    assert stream <= held[False] <= stream + small  # the yardstick sees the stream copy
    assert held[True] <= (READ_AHEAD + 2) * biggest + small, (held, biggest)
    assert held[True] < stream / 2


def test_disk_stream_needs_the_tier(tiny_config):
    with pytest.raises(ConfigError, match="streaming.disk_stream=True is invalid; needs"):
        tiny_config("gptj", streaming={"disk_stream": True})
