"""The disk tier in the engine (streaming.disk_path): master and optimizer state in files, read
ahead of each update and written behind it.

Yardsticks: the float64 reference (the RAM engine's own test, tests/engine/test_exact.py, at its
tolerance), the RAM engine bitwise in fp32 (the tier only moves bytes: file out, file in), and
``jax.live_arrays()`` for what stays in memory (reality, not the engine's ledger).
"""

from __future__ import annotations

import gc

import jax
import numpy as np
import pytest

from tests.engine.test_exact import (
    MAX_NORM,
    STEPS,
    TOL64,
    check_against_reference,
    init_params,
    run_reference,
)
from wsjax.engine import StreamingEngine, make_plan
from wsjax.engine.disk import READ_AHEAD, WRITE_BEHIND, file_name
from wsjax.engine.store import segment_names, tree_bytes
from wsjax.errors import ConfigError
from wsjax.models import get_model

PLACEMENTS = ["host", "device"]


def engines(tiny_config, tmp_path, *, streaming=None, layers=3, f64=False, grads=False):
    """(RAM engine, disk-tier engine, model, params): the same model, params and config but for
    streaming.disk_path."""
    streaming = streaming or {}
    ram_cfg = tiny_config("gptj", layers=layers, optimizer={"max_gradient_norm": MAX_NORM},
                          streaming=streaming)  # fmt: skip
    disk = {**streaming, "disk_path": str(tmp_path / "tier"), "disk_gradients": grads}
    disk_cfg = tiny_config("gptj", layers=layers, optimizer={"max_gradient_norm": MAX_NORM},
                           streaming=disk)  # fmt: skip
    model = get_model(ram_cfg.model)
    params = init_params(model)
    if f64:
        model.compute_dtype = np.float64
        params = jax.tree.map(lambda a: a.astype(np.float64), params)
    ram = StreamingEngine(model, ram_cfg, params=jax.tree.map(np.array, params))
    tier = StreamingEngine(model, disk_cfg, params=jax.tree.map(np.array, params))
    return ram, tier, model, params, disk_cfg


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_disk_tier_matches_reference_in_float64(tiny_config, make_batches, tmp_path, x64,
                                                rel_err, placement):  # fmt: skip
    """float64, 3 steps with clipping: losses, norms, params and Adam moments of the disk-tier
    engine equal the reference at the RAM engine's tolerance; its state is in the files."""
    batches = make_batches(STEPS, seed=0)
    with x64():
        streaming = {"optimizer_placement": placement}
        _, engine, model, params, cfg = engines(
            tiny_config, tmp_path, streaming=streaming, f64=True
        )
        em = [engine.train_step(b) for b in batches]
        _, state, rm = run_reference(model, cfg, params, batches)
        assert all(m["train/grad_norm"] > MAX_NORM for m in em)  # clipping active
        check_against_reference(rel_err, engine, em, state, rm, TOL64)
    assert engine.store.master == {} and engine.store.opt_state == {}  # none of it in RAM
    files = sorted(p.name for p in (tmp_path / "tier").glob("*.bin"))
    assert files == sorted(file_name(n) for n in segment_names(3))
    # every step read and wrote each segment's state once (plus the initial write and the
    # reads of the two trees compared above)
    state_bytes = engine.store.tier.nbytes
    assert engine.store.tier.bytes_written == (STEPS + 1) * state_bytes
    assert engine.store.tier.bytes_read == (STEPS + 2) * state_bytes


@pytest.mark.parametrize(
    "placement,grads", [("host", False), ("device", False), ("host", True)],
    ids=["host", "device", "host_disk_gradients"],
)  # fmt: skip
def test_fp32_bitwise_the_ram_engine(tiny_config, make_batches, tmp_path, placement, grads):
    """fp32, micro-batched, 4 steps: losses, grad norms, params and optimizer state bitwise
    those of the RAM engine, whichever side updates, and with the gradients held in the tier
    (streaming.disk_gradients: a grads-<segment>.bin file each)."""
    streaming = {"optimizer_placement": placement, "micro_batch_size": 4}
    ram, tier, *_ = engines(tiny_config, tmp_path, streaming=streaming, layers=4, grads=grads)
    for batch in make_batches(4, seed=3):
        a, b = ram.train_step(batch), tier.train_step(batch)
        assert (a["train/loss"], a["train/grad_norm"]) == (b["train/loss"], b["train/grad_norm"])
    assert len(list((tmp_path / "tier").glob("grads-*.bin"))) == (6 if grads else 0)
    jax.tree.map(np.testing.assert_array_equal, tier.params_tree(), ram.params_tree())
    jax.tree.map(np.testing.assert_array_equal, tier.opt_state_tree(), ram.opt_state_tree())


def live_bytes() -> int:
    gc.collect()
    return sum(a.nbytes for a in jax.live_arrays())


def test_ram_holds_the_stream_copy_not_the_state(tiny_config, make_batches, tmp_path):
    """Live arrays (measured): a RAM engine holds master + Adam moments + stream copy (4 x the
    fp32 parameters), a disk-tier engine the stream copy only, before and after steps."""
    cfg = tiny_config("gptj", layers=4, streaming={"disk_path": str(tmp_path / "t")})
    model = get_model(cfg.model)
    params = init_params(model)
    param_bytes = tree_bytes(params)
    small = 64 << 10  # step counts, scalars
    base = live_bytes()
    engine = StreamingEngine(model, cfg, params=jax.tree.map(np.array, params))
    assert param_bytes <= live_bytes() - base <= param_bytes + small
    for batch in make_batches(2, seed=1):
        engine.train_step(batch)
    engine.store.tier.flush()
    assert param_bytes <= live_bytes() - base <= param_bytes + small
    # on disk (the files, measured): master + mu + nu, within the plan's disk terms
    on_disk = sum(p.stat().st_size for p in (tmp_path / "t").glob("*.bin"))
    plan = make_plan(model, cfg, engine.optimizer, batch_size=8, seq=16, n_micro=1)
    assert 3 * param_bytes <= plan.disk["master_fp32"] + plan.disk["optimizer_state"] <= on_disk
    assert on_disk <= plan.disk_total


def test_reads_ahead_and_writes_behind_a_bounded_window(tiny_config, make_batches, tmp_path):
    """During the updates of a step, the segments read ahead and written behind stay within
    READ_AHEAD and WRITE_BEHIND (counted on the tier at every update)."""
    _, engine, *_ = engines(tiny_config, tmp_path, layers=4)
    tier, seen = engine.store.tier, []
    take = tier.take

    def counting_take(name, convert=None):
        out = take(name, convert)
        pending = sum(not f.done() for f in tier._behind)
        seen.append((name, len(tier._reads), pending))
        return out

    tier.take = counting_take
    engine.train_step(make_batches(1, seed=2)[0])
    assert [s[0] for s in seen] == segment_names(4)  # every segment once, in update order
    assert max(s[1] for s in seen) <= READ_AHEAD and max(s[2] for s in seen) <= WRITE_BEHIND
    assert seen[0][1] == READ_AHEAD - 1  # the step started READ_AHEAD reads; one was taken


def test_skipped_update_leaves_the_tier_unchanged(tiny_config, make_batches, tmp_path):
    """A non-finite loss skips the update: the files hold the same bytes, the next good step
    trains as the RAM engine does."""
    ram, tier, *_ = engines(tiny_config, tmp_path)
    folder = tmp_path / "tier"
    before = {p.name: p.read_bytes() for p in folder.glob("*.bin")}
    good, bad = make_batches(2, seed=4)
    bad["loss_mask"][0, 0] = np.nan
    assert tier.train_step(bad)["train/update_skipped"] == 1.0
    assert ram.train_step(bad)["train/update_skipped"] == 1.0
    tier.store.tier.flush()
    assert {p.name: p.read_bytes() for p in folder.glob("*.bin")} == before
    assert tier.train_step(good)["train/loss"] == ram.train_step(good)["train/loss"]
    jax.tree.map(np.testing.assert_array_equal, tier.params_tree(), ram.params_tree())


def test_fresh_weights_go_to_the_tier_segment_by_segment_bitwise(tiny_config, tmp_path):
    """No params given: the tier engine builds each segment on its own (model.init_segment),
    bitwise the RAM engine's whole-model init, tied embeddings (GPT-2) included."""
    ram_cfg = tiny_config("gpt2", layers=3)
    disk_cfg = tiny_config("gpt2", layers=3, streaming={"disk_path": str(tmp_path / "t")})
    model = get_model(ram_cfg.model)
    ram, tier = StreamingEngine(model, ram_cfg), StreamingEngine(model, disk_cfg)
    jax.tree.map(np.testing.assert_array_equal, tier.params_tree(), ram.params_tree())
    jax.tree.map(np.testing.assert_array_equal, tier.opt_state_tree(), ram.opt_state_tree())


def test_disk_gradients_needs_the_tier_and_a_host_update(tiny_config, tmp_path):
    """streaming.disk_gradients without disk_path, or with a device update (whose gradients
    stay on the device): one line naming the key (exit 2)."""
    with pytest.raises(ConfigError, match="streaming.disk_gradients=True is invalid; needs"):
        tiny_config("gptj", streaming={"disk_gradients": True})
    cfg = tiny_config("gptj", streaming={"disk_gradients": True, "optimizer_placement": "device",
                                         "disk_path": str(tmp_path / "t")})  # fmt: skip
    with pytest.raises(ConfigError, match="disk_gradients needs streaming.optimizer_placement"):
        StreamingEngine(get_model(cfg.model), cfg)
