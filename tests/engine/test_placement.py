"""Where the host state lives: in the compute device's ``pinned_host`` memory, never on another
client's device, updated in place (DESIGN.md, "Where host state lives on a GPU").

What this proves on a CPU-only machine. A GPU process has two PJRT clients: the GPU's (with a
``pinned_host`` memory kind) and JAX's CPU client; a move between them goes through freshly
allocated host buffers at 1-2 GB/s. The stand-in here is a process with two CPU devices whose
mesh is ``cpu:1``: ``cpu:0`` is what ``jax.local_devices(backend="cpu")[0]`` returns, the
device the old host store used, so a crossing to it is the crossing a GPU run would make to the
CPU client. With ``jax.transfer_guard_device_to_device("log_explicit")`` XLA logs every
device-to-device move with its source and destination sharding (a memory-kind move on one
device is logged too, and a control crossing from ``cpu:0`` after the steps shows the log works);
the test asserts that every logged move of three training steps names its source and
destination and neither is ``cpu:0`` (the mesh is ``cpu:1`` alone), for the host and the device
update, and that
every host-state array sits in ``cpu:1``'s ``pinned_host`` memory afterwards, its previous
buffers donated. It cannot prove DMA speed; benchmarks/gpu_check.py measures that on a GPU.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.experimental.compute_on import compute_on

from wsjax.config import load_config
from wsjax.engine import StreamingEngine, make_plan
from wsjax.engine.plan import HOST_LIMIT_ENV, GiB, host_memory_limit_gb, set_host_memory_limit
from wsjax.models import get_model
from wsjax.optim import make_optimizer

ROOT = REPO = Path(__file__).resolve().parents[2]


def moves(log: str) -> list[str]:
    return [line for line in log.splitlines() if "device-to-device transfer" in line]


def crossing(line: str) -> bool:
    """A logged move that may touch ``cpu:0``: it names it, or (as XLA logs a move from
    another device's array) it names no source sharding; the mesh is ``cpu:1`` alone."""
    source = line.split("dst_sharding=")[0]
    return "CpuDevice(id=0)" in line or " sharding=" not in source


# Runs in a fresh process: the device count is fixed when the backend starts.
PROBE = """
import json, sys
import jax, numpy as np
from jax.sharding import Mesh
from wsjax.config import config_from_dict
from wsjax.config import load_config
from wsjax.engine import StreamingEngine, make_plan
from wsjax.engine.plan import HOST_LIMIT_ENV, GiB, host_memory_limit_gb, set_host_memory_limit
from wsjax.models import get_model
from wsjax.optim import make_optimizer
from tests.helpers import token_batches

cfg = config_from_dict(json.loads(sys.argv[1]))
model = get_model(cfg.model)
params = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(0)))
mesh = Mesh(np.asarray(jax.devices()[1:]), ("data",))
engine = StreamingEngine(model, cfg, params=params, mesh=mesh)
batches = token_batches(3, seed=1)
engine.train_step(batches[0])  # compiles outside the logged window
print("LOGGED-STEPS-BEGIN", file=sys.stderr, flush=True)
with jax.transfer_guard_device_to_device("log_explicit"):
    losses = [engine.train_step(b)["train/loss"] for b in batches]
print("LOGGED-STEPS-END", file=sys.stderr, flush=True)
control = jax.device_put(np.zeros(3, np.float32), jax.devices()[0])
with jax.transfer_guard_device_to_device("log_explicit"):  # the control: one real crossing
    jax.device_put(control, jax.devices()[1]).block_until_ready()
print("LOGGED-CONTROL-END", file=sys.stderr, flush=True)
store = engine.store
leaves = jax.tree.leaves((store.master, store.opt_state, store.stream))
places = sorted({(a.sharding.memory_kind, d.id) for a in leaves for d in a.devices()})
print(json.dumps({"places": places, "losses": losses}))
"""


@pytest.mark.parametrize("placement", ["host", "device"])
def test_no_move_leaves_the_compute_device(config_dict, placement):
    """Every device-to-device move of three steps (logged by XLA) is between memories of the
    compute device ``cpu:1``; none touches ``cpu:0`` (the CPU client's device); all host
    state ends in ``cpu:1``'s pinned_host."""
    if placement == "host" and "compute_type" in inspect.signature(compute_on).parameters:
        pytest.skip("newer JAX's compute_on signature: the host update runs without it there")
    cfg = config_dict("gptj", streaming={"optimizer_placement": placement})
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    run = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(cfg)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    logged, control = run.stderr.split("LOGGED-STEPS-BEGIN")[1].split("LOGGED-STEPS-END")
    control = moves(control)
    assert len(control) == 1 and crossing(control[0]), f"control not seen as such: {control}"
    assert moves(logged), "the steps logged no move at all"
    crossings = [line for line in moves(logged) if crossing(line)]
    assert not crossings, f"{len(crossings)} moves may touch cpu:0, e.g. {crossings[:2]}"
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["places"] == [["pinned_host", 1]], out["places"]
    assert all(np.isfinite(out["losses"]))


@pytest.mark.parametrize("placement", ["host", "device"])
def test_host_state_stays_in_pinned_host_and_is_donated(tiny_config, make_batches, placement):
    """After each of three steps every master, optimizer-state and stream-copy leaf is a fresh
    buffer in the compute device's pinned_host memory, and the step before's buffers were
    donated (deleted), not copied beside them."""
    cfg = tiny_config("gptj", streaming={"optimizer_placement": placement})
    model = get_model(cfg.model)
    params = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(0)))
    engine = StreamingEngine(model, cfg, params=params)
    device = engine.mesh.devices.flat[0]
    assert "pinned_host" in {m.kind for m in device.addressable_memories()}
    for batch in make_batches(3, seed=4):
        store = engine.store
        before = jax.tree.leaves((store.master, store.opt_state))
        engine.train_step(batch)
        after = jax.tree.leaves((store.master, store.opt_state, store.stream))
        for a in after:
            assert a.sharding.memory_kind == "pinned_host", a.sharding
            assert a.devices() == {device}
        assert all(a.is_deleted() for a in before if a.size > 1), "state was not donated"
    assert engine.placement.pinned
    assert engine.placement.host_compute == (placement == "host")


def test_state_in_device_memory_kind_skips_compute_on(tiny_config, make_batches):
    """``streaming.host_memory_kind: device`` keeps the state in device memory: the host update
    then runs as a plain executable (no ``compute_on('device_host')``) and still trains."""
    cfg = tiny_config("gptj", streaming={"host_memory_kind": "device"})
    model = get_model(cfg.model)
    params = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(0)))
    engine = StreamingEngine(model, cfg, params=params)
    assert not engine.placement.host_compute
    loss = engine.train_step(make_batches(1, seed=5)[0])["train/loss"]
    assert np.isfinite(loss)
    kinds = {a.sharding.memory_kind for a in jax.tree.leaves(engine.store.master)}
    assert kinds == {"device"}


def test_host_memory_limit_sized_from_the_plan():
    """The GPU client's pinned_host cap (``XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB``) comes from the
    plan: for GPT-J 6B (6.05e9 params: fp32 master 24 GB, Adam 48 GB, bf16 copy 12 GB, fp32
    gradients 24 GB) it is the host total x 1.25 rounded up, over 100 GiB; a user's own value
    is left alone; with the device update the gradients leave the host plan for the device's."""
    cfg = load_config(REPO / "configs" / "params_gptj_6B.yaml")
    model = get_model(cfg.model)
    plans = {}
    for where in ("host", "device"):
        c = dataclasses.replace(
            cfg, streaming=dataclasses.replace(cfg.streaming, optimizer_placement=where)
        )
        plans[where] = make_plan(
            model, c, make_optimizer(c.optimizer), batch_size=32, seq=2048, n_micro=8,
            platform="gpu",
        )  # fmt: skip
    plan = plans["host"]
    gb = host_memory_limit_gb(plan)
    assert gb == -(-1.25 * plan.host_total // GiB) and gb > 100
    assert plan.host["gradients"] == 4 * model.num_params()
    assert plans["device"].device["gradients_held"] == plan.host["gradients"]
    assert "gradients" not in plans["device"].host
    env = {}
    assert set_host_memory_limit(plan, env) == gb and env[HOST_LIMIT_ENV] == str(gb)
    env = {HOST_LIMIT_ENV: "64"}
    assert set_host_memory_limit(plan, env) is None and env[HOST_LIMIT_ENV] == "64"
