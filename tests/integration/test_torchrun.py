"""Launchers other than ``wsjax.launch`` start the same multi-process run: torchrun's (and a
Kubernetes PyTorchJob's) RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT / LOCAL_RANK variables,
and ``wsjax-launch`` on several machines (``--nnodes --node_rank --coordinator``), here two
launchers on localhost as two "nodes". A model_dir two runs collide on names who started them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import CACHE_ENV, REPO, SMALL, TINY, probe_env
from wsjax import distributed, launch
from wsjax.errors import ConfigError
from wsjax.trainer.run_dir import ModelDir

TORCH_ENV = {
    "RANK": "1",
    "WORLD_SIZE": "2",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "10.0.0.5",
    "MASTER_PORT": "29500",
    "TORCHELASTIC_RUN_ID": "x",
}
START_S = 300.0  # two JAX imports, a compile and 2 steps on a loaded 2-core machine


@pytest.fixture
def torch_env(monkeypatch):
    for k in list(os.environ):
        if (k.startswith("WSJAX_") and k not in CACHE_ENV) or k in TORCH_ENV:
            monkeypatch.delenv(k)
    for k, v in TORCH_ENV.items():
        monkeypatch.setenv(k, v)
    return monkeypatch


# ---- the settings torchrun's variables give --------------------------------------------------
def test_torchrun_variables_give_the_wsjax_settings(torch_env):
    s = distributed.resolve()
    # MASTER_PORT is torchrun's own store; the JAX coordinator takes the next port
    assert (s.coordinator_address, s.num_processes, s.process_id) == ("10.0.0.5:29501", 2, 1)
    assert s.local_device_ids == (1,)  # several processes a node: LOCAL_RANK's device
    assert distributed.launcher() == "torchrun"


def test_flags_and_wsjax_variables_win_over_torchrun_variables(torch_env):
    torch_env.setenv(distributed.ENV_COORDINATOR_ADDRESS, "127.0.0.1:1234")
    s = distributed.resolve(process_id=0, local_device_ids=[0])
    assert (s.coordinator_address, s.num_processes, s.process_id) == ("127.0.0.1:1234", 2, 0)
    assert s.local_device_ids == (0,)


def test_one_process_a_node_keeps_every_local_device_and_world_size_1_is_single(torch_env):
    torch_env.setenv("LOCAL_WORLD_SIZE", "1")
    torch_env.delenv("TORCHELASTIC_RUN_ID")  # a PyTorchJob pod: the variables, no torchrun
    assert distributed.resolve().local_device_ids is None
    assert distributed.launcher().startswith("RANK/WORLD_SIZE")
    torch_env.setenv("WORLD_SIZE", "1")
    torch_env.setenv("RANK", "0")
    assert distributed.resolve() is None


def test_a_bad_torchrun_variable_is_one_line_naming_it(torch_env):
    torch_env.setenv("RANK", "one")
    with pytest.raises(ConfigError, match=r"^RANK='one' is invalid: must be an integer"):
        distributed.resolve()


def test_a_model_dir_collision_names_the_launchers(torch_env, tmp_path):
    """A process started by torchrun that runs alone (here: no jax.distributed) and finds the
    model_dir taken is told who holds it and that it joined no run."""
    with ModelDir(tmp_path / "md"):
        assert (tmp_path / "md" / ".lock").read_text().split() == [str(os.getpid()), "torchrun"]
        with pytest.raises(ConfigError) as e, ModelDir(tmp_path / "md"):
            pass
    message = str(e.value)
    assert "\n" not in message and "started by torchrun)" in message
    assert "this process was started by torchrun but joined no multi-process run" in message


# ---- real runs ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_starts_one_two_process_run(tmp_path):
    """``torchrun --standalone --nproc_per_node 2 -m wsjax.train``: one run of two processes
    (one set of checkpoints; the header counts both processes' devices), not two runs that
    collide on the model_dir lock."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    if not Path(torchrun).exists():
        pytest.skip("torchrun (PyTorch) is not installed")
    md = tmp_path / "md"
    args = ["-p", str(TINY), "-o", str(md), *SMALL, "--max_steps", "2"]
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "wsjax.train", *args]
    run = subprocess.run(
        cmd, cwd=REPO, env=probe_env(), capture_output=True, text=True, timeout=START_S
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    assert "on 2 cpu device(s)" in out  # jax.process_count() == 2: both joined one run
    assert out.count("global_step = 2, loss = ") == 1  # process 0 logs the run
    assert "in use by another run" not in out
    assert sorted(p.name for p in md.glob("model-ckpt-*")) == ["model-ckpt-2"]


def test_two_launchers_as_two_nodes_make_one_run(tmp_path):
    """``wsjax-launch --nnodes 2 --node_rank R --coordinator HOST:PORT --nproc 1`` twice: global
    processes 0 and 1 of one run; their gloo sum over both is 1 + 2."""
    port = launch.free_port()
    node = ["--nnodes", "2", "--coordinator", f"127.0.0.1:{port}", "--nproc", "1"]
    probe = ["--module", "tests.integration.launch_probe", "--", str(tmp_path), "sum"]
    launchers = [
        subprocess.Popen(
            [sys.executable, "-m", "wsjax.launch", *node, "--node_rank", str(rank), *probe],
            cwd=REPO,
            env=probe_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (1, 0)  # the far node first: it waits for the coordinator
    ]
    for p in launchers:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    for index in (0, 1):
        ready = json.loads((tmp_path / f"ready-{index}.json").read_text())
        assert (ready["index"], ready["count"], ready["jax_count"]) == (index, 2, 2)
        assert json.loads((tmp_path / f"sum-{index}.json").read_text()) == {"sum": 3, "devices": 2}


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--nnodes", "2", "--node_rank", "2"], "--node_rank 2 is invalid for --nnodes 2"),
        (["--nnodes", "2"], "--nnodes > 1 needs --coordinator HOST:PORT"),
        (["--coordinator", "node0"], "--coordinator 'node0' is invalid"),
    ],
)
def test_bad_node_flags_are_one_line_exit_2(flags, words, capsys):
    assert launch.main(["--nproc", "1", *flags, "--", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and words in err
