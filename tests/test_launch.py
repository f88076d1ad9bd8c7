"""The multi-process setup (wsjax.distributed) and the local launcher (wsjax.launch).

Real processes on this CPU machine: the launcher starts ``tests/launch_probe.py`` children,
which join through gloo collectives exactly as a training run does. Each launch costs about
2-4 s (two JAX imports and a coordinator handshake), so the file stays cheap.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wsjax import distributed, launch
from wsjax.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
# A bound on "about 2-4 s": JAX import and the coordinator handshake, on a loaded 2-core machine
# (a client that starts before the coordinator retries with a back-off of up to ~20 s).
START_S = 60.0


def probe_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSJAX_")}
    env.pop("XLA_FLAGS", None)  # 1 CPU device per process unless --devices_per_process
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT)
    return env


def start(out: Path, action: str, *launcher: str, heartbeat_s: int | None = None):
    """``python -m wsjax.launch <launcher> --module tests.launch_probe -- out action``."""
    out.mkdir(parents=True, exist_ok=True)
    probe_args = [str(out), action] + ([str(heartbeat_s)] if heartbeat_s else [])
    cmd = [sys.executable, "-m", "wsjax.launch", *launcher, "--module", "tests.launch_probe"]
    return subprocess.Popen(
        [*cmd, "--", *probe_args],
        cwd=ROOT,
        env=probe_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_ready(out: Path, nproc: int, launcher: subprocess.Popen) -> list[dict]:
    """The ready files of every probe (pid, index, count), once all have joined."""
    deadline = time.monotonic() + START_S
    paths = [out / f"ready-{i}.json" for i in range(nproc)]
    while not all(p.is_file() for p in paths):
        assert launcher.poll() is None, launcher.communicate()
        assert time.monotonic() < deadline, "probes did not start"
        time.sleep(0.05)
    time.sleep(0.1)  # the file is written in one call; let the writer close it
    return [json.loads(p.read_text()) for p in paths]


def finish(launcher: subprocess.Popen, timeout: float = START_S) -> tuple[int, str]:
    _, err = launcher.communicate(timeout=timeout)
    return launcher.returncode, err


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ---- collectives through the launcher ------------------------------------------------------------
@pytest.mark.parametrize("per_process", [1, 2])
def test_two_process_gloo_sum(tmp_path, per_process):
    """2 processes x 1 and x 2 CPU devices: every process sees the global sum of
    1 + global device position, 1 + 2 + ... + n = n (n + 1) / 2 by hand."""
    flags = ["--nproc", "2"] + (["--devices_per_process", "2"] if per_process == 2 else [])
    code, err = finish(start(tmp_path, "sum", *flags))
    assert code == 0, err
    n = 2 * per_process
    for index in range(2):
        ready = json.loads((tmp_path / f"ready-{index}.json").read_text())
        assert ready["index"] == index
        assert ready["count"] == ready["jax_count"] == 2
        assert ready["local_devices"] == per_process
        result = json.loads((tmp_path / f"sum-{index}.json").read_text())
        assert result == {"sum": n * (n + 1) / 2, "devices": n}


# ---- faults --------------------------------------------------------------------------------------
def test_exit_code_is_forwarded_and_the_other_stopped(tmp_path):
    launcher = start(tmp_path, "exit:1:3", "--nproc", "2")
    ready = wait_ready(tmp_path, 2, launcher)
    code, err = finish(launcher)
    assert code == 3
    assert "process 1" in err and "exited with code 3" in err
    assert not alive(ready[0]["pid"])  # the waiting process 0 was stopped, not left behind


def test_sigkill_of_one_child_ends_the_launch_in_bounded_time(tmp_path):
    """Process 1 is SIGKILLed; process 0 ignores SIGTERM, so the launcher must SIGKILL it after
    the grace period: done within grace + a generous margin for polling and reaping."""
    grace_s = 2.0
    launcher = start(tmp_path, "stubborn", "--nproc", "2", "--grace_s", str(grace_s))
    ready = wait_ready(tmp_path, 2, launcher)
    killed_at = time.monotonic()
    os.kill(ready[1]["pid"], signal.SIGKILL)
    code, err = finish(launcher)
    elapsed = time.monotonic() - killed_at
    assert code == 128 + signal.SIGKILL
    assert elapsed < grace_s + 10.0, elapsed
    assert elapsed >= grace_s  # process 0 ignored SIGTERM: only the escalation ended it
    assert "process 1" in err and "killed by SIGKILL" in err
    assert "killing them" in err
    assert not alive(ready[0]["pid"])


def test_sigterm_to_the_launcher_reaches_every_child(tmp_path):
    """Like a preemption: the launcher forwards SIGTERM once, each child exits 5 (it saves in
    a training run) and the launcher exits 5."""
    launcher = start(tmp_path, "wait", "--nproc", "2")
    wait_ready(tmp_path, 2, launcher)
    launcher.send_signal(signal.SIGTERM)
    code, err = finish(launcher)
    assert code == 5, err
    assert (tmp_path / "sigterm-0").is_file() and (tmp_path / "sigterm-1").is_file()


def test_a_peer_dying_mid_collective_does_not_hang_the_survivor(tmp_path):
    """Without the launcher's help: two processes started directly, in a loop of collectives;
    process 1 is SIGKILLed. The survivor's collective fails when gloo sees the connection close,
    and its exit (JAX's shutdown barrier) ends at the latest when the coordination service
    declares process 1 dead: one heartbeat timeout. Bound: heartbeat + a generous margin."""
    heartbeat_s = 3
    port = launch.free_port()
    survivor_log = tmp_path / "survivor.log"
    procs = []
    for index in range(2):
        env = launch.child_env(probe_env(), port, 2, index, None)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.launch_probe"]
                + [str(tmp_path), "collectives", str(heartbeat_s)],
                cwd=ROOT,
                env=env,
                stdout=survivor_log.open("w") if index == 0 else subprocess.DEVNULL,
                stderr=subprocess.STDOUT if index == 0 else subprocess.DEVNULL,
            )
        )
    try:
        deadline = time.monotonic() + START_S
        while not all((tmp_path / f"ready-{i}.json").is_file() for i in range(2)):
            assert time.monotonic() < deadline and procs[0].poll() is None
            time.sleep(0.05)
        time.sleep(0.5)  # in the loop of collectives
        killed_at = time.monotonic()
        procs[1].kill()
        code = procs[0].wait(timeout=heartbeat_s + 30)
        elapsed = time.monotonic() - killed_at
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert code != 0
    assert elapsed < heartbeat_s + 20, elapsed
    assert "collective failed" in survivor_log.read_text()


# ---- settings: flags, environment, cluster; one-line errors --------------------------------------
def test_single_process_needs_nothing():
    assert distributed.resolve(environ={}) is None
    assert distributed.resolve(num_processes=1, environ={}) is None
    # a one-task SLURM allocation is a single-process run too
    assert distributed.resolve(environ={"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None


def test_flags_win_over_environment():
    env = {
        distributed.ENV_COORDINATOR_ADDRESS: "10.0.0.1:1234",
        distributed.ENV_NUM_PROCESSES: "4",
        distributed.ENV_PROCESS_ID: "3",
        distributed.ENV_LOCAL_DEVICE_IDS: "2,3",
    }
    from_env = distributed.resolve(environ=env)
    assert (from_env.coordinator_address, from_env.num_processes, from_env.process_id) == (
        "10.0.0.1:1234",
        4,
        3,
    )
    assert from_env.local_device_ids == (2, 3)
    flags = distributed.resolve("host:99", 2, 0, [0], environ=env)
    assert (flags.coordinator_address, flags.num_processes, flags.process_id) == ("host:99", 2, 0)
    assert flags.local_device_ids == (0,)
    # each setting on its own: a flag for one, the environment for the others
    mixed = distributed.resolve(process_id=1, environ=env)
    assert (mixed.coordinator_address, mixed.num_processes, mixed.process_id) == (
        "10.0.0.1:1234",
        4,
        1,
    )


def test_cluster_leaves_the_rest_to_jax():
    """Under srun / mpirun with several tasks, unset settings stay None for JAX to detect."""
    for env, name in (
        ({"SLURM_NTASKS": "2", "SLURM_PROCID": "1"}, "SLURM srun"),
        ({"OMPI_COMM_WORLD_SIZE": "8"}, "Open MPI mpirun"),
    ):
        settings = distributed.resolve(environ=env)
        assert settings.cluster == name
        assert (settings.coordinator_address, settings.num_processes, settings.process_id) == (
            None,
            None,
            None,
        )


def test_launcher_environment_per_child():
    env = launch.child_env({"XLA_FLAGS": "--xla_dump_to=/tmp/x"}, 4321, 2, 1, 2)
    settings = distributed.resolve(environ=env)
    assert settings.coordinator_address == "127.0.0.1:4321"
    assert (settings.num_processes, settings.process_id) == (2, 1)
    assert settings.local_device_ids == (2, 3)  # process 1 of 2 devices each
    flags = env["XLA_FLAGS"].split()
    assert flags == ["--xla_dump_to=/tmp/x", "--xla_force_host_platform_device_count=2"]


@pytest.mark.parametrize(
    ("kwargs", "environ", "names"),
    [
        ({"num_processes": 2, "process_id": 2, "coordinator_address": "h:1"}, {}, "0..1"),
        ({"num_processes": 0}, {}, "--num_processes 0"),
        ({"num_processes": 2, "process_id": 0, "coordinator_address": "h"}, {}, "host:port"),
        ({"num_processes": 2}, {}, "--coordinator_address, --process_id"),
        ({}, {distributed.ENV_NUM_PROCESSES: "two"}, "WSJAX_NUM_PROCESSES='two'"),
        ({}, {distributed.ENV_LOCAL_DEVICE_IDS: "0;1"}, "WSJAX_LOCAL_DEVICE_IDS='0;1'"),
    ],
)
def test_bad_settings_are_one_line(kwargs, environ, names):
    with pytest.raises(ConfigError) as err:
        distributed.resolve(**kwargs, environ=environ)
    assert names in str(err.value) and "\n" not in str(err.value)


def test_cli_errors_are_one_line_exit_2():
    """The train flags reach initialize: a bad id and a coordinator that never answers (a short
    connect timeout, else JAX would abort the process after its own) are one line, exit 2."""
    env = probe_env()
    bad_id = subprocess.run(
        [sys.executable, "-m", "wsjax.train", "--num_processes", "2", "--process_id", "5"]
        + ["--coordinator_address", "127.0.0.1:1234"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad_id.returncode == 2
    assert bad_id.stderr.strip().splitlines() == [
        "error: --process_id 5 is out of range for --num_processes 2: valid ids are 0..1"
    ]
    port = launch.free_port()  # nothing listens there
    code = (
        "import sys\nfrom wsjax import distributed\nfrom wsjax.errors import ConfigError\n"
        "try:\n"
        f"    distributed.initialize('127.0.0.1:{port}', 2, 1, initialization_timeout_s=1)\n"
        "except ConfigError as e:\n    print(e)\n    sys.exit(2)\n"
    )
    unreachable = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert unreachable.returncode == 2, unreachable.stderr
    assert unreachable.stdout.strip().splitlines() == [
        f"--coordinator_address '127.0.0.1:{port}': nothing answered there within 1 s; is "
        "process 0 running, and is this its host and port?"
    ]


def test_launcher_flag_errors_are_one_line():
    bad = subprocess.run(
        [sys.executable, "-m", "wsjax.launch", "--nproc", "0", "--", "-p", "x.yaml"],
        cwd=ROOT,
        env=probe_env(),
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["error: --nproc 0 is invalid: must be >= 1"]
