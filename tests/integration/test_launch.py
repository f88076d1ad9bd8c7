"""The multi-process setup (wsjax.distributed) and the local launcher (wsjax.launch).

Real processes on this CPU machine: the launcher starts ``tests/integration/launch_probe.py`` children,
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

ROOT = Path(__file__).resolve().parents[2]
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
    """``python -m wsjax.launch <launcher> --module tests.integration.launch_probe -- out action``."""
    out.mkdir(parents=True, exist_ok=True)
    probe_args = [str(out), action] + ([str(heartbeat_s)] if heartbeat_s else [])
    cmd = [
        sys.executable,
        "-m",
        "wsjax.launch",
        *launcher,
        "--module",
        "tests.integration.launch_probe",
    ]
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
    launcher = start(tmp_path, "sum", *flags)
    out, err = launcher.communicate(timeout=START_S)
    assert launcher.returncode == 0, err
    n = 2 * per_process
    for index in range(2):
        ready = json.loads((tmp_path / f"ready-{index}.json").read_text())
        assert ready["index"] == index
        assert ready["count"] == ready["jax_count"] == 2
        assert ready["local_devices"] == per_process
        result = json.loads((tmp_path / f"sum-{index}.json").read_text())
        assert result == {"sum": n * (n + 1) / 2, "devices": n}
    # process 0 logs as a single process does; process 1 only warnings, prefixed
    lines = out.splitlines()
    assert lines.count("INFO: probe info") == 1
    assert lines.count("WARNING: probe warning") == 1
    assert lines.count("[process 1] WARNING: probe warning") == 1
    assert not [line for line in lines if line.startswith("[process 1] INFO")]
    # the run log is process 0's alone
    logged = (tmp_path / "run.log").read_text().splitlines()
    assert [line.split(" ", 2)[2] for line in logged] == [
        "INFO: probe info",
        "WARNING: probe warning",
    ]


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


def test_a_second_signal_kills_every_child(tmp_path):
    """Children that ignore the forwarded SIGTERM: a second SIGTERM to the launcher kills them
    (SIGKILL, exit 128 + 9) at once, without waiting for a grace period."""
    launcher = start(tmp_path, "stubborn", "--nproc", "2", "--grace_s", "100")
    ready = wait_ready(tmp_path, 2, launcher)
    launcher.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # forwarded and ignored
    assert launcher.poll() is None and all(alive(r["pid"]) for r in ready)
    launcher.send_signal(signal.SIGTERM)
    code, err = finish(launcher, timeout=30)  # far below the 100 s grace
    assert code == 128 + signal.SIGKILL
    assert "second signal" in err
    assert not any(alive(r["pid"]) for r in ready)


@pytest.mark.parametrize("action", ["collectives", "wait"])
def test_a_dead_peer_does_not_hang_the_survivor(tmp_path, action):
    """Without the launcher's help: two processes started directly, process 1 is SIGKILLed.

    - ``collectives``: process 0 is in a loop of collectives; the one waiting on the dead peer
      fails as soon as gloo sees the connection close, and the probe exits 1 at once
      (``exit_process`` skips JAX's shutdown barrier).
    - ``wait``: process 0 is idle (no collective to fail); JAX's coordination service, which
      process 0 hosts, declares process 1 dead after one heartbeat timeout without a heartbeat
      and aborts process 0 (SIGABRT, JAX's ``stopped sending heartbeats`` line).

    Bound: the heartbeat timeout + a generous margin for a loaded machine."""
    heartbeat_s = 5  # short for the test, long enough for a loaded 2-core machine
    port = launch.free_port()
    survivor_log = tmp_path / "survivor.log"
    procs = []
    for index in range(2):
        env = launch.child_env(probe_env(), port, 2, index, None)
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.integration.launch_probe",
                    str(tmp_path),
                    action,
                    str(heartbeat_s),
                ],
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
        time.sleep(0.5)  # in the loop of collectives, or idle
        killed_at = time.monotonic()
        procs[1].kill()
        code = procs[0].wait(timeout=heartbeat_s + 30)
        elapsed = time.monotonic() - killed_at
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert elapsed < heartbeat_s + 20, elapsed
    log = survivor_log.read_text()
    if action == "collectives":
        assert code == 1 and "collective failed" in log
    else:
        assert code == -signal.SIGABRT and "stopped sending heartbeats" in log


# ---- settings: flags, environment, cluster; one-line errors --------------------------------------
CLUSTER_VARS = (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "OMPI_MCA_orte_hnp_uri",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "PMIX_NAMESPACE",
)


@pytest.fixture
def environ(monkeypatch):
    """A clean slate: no WSJAX_* variable and no cluster launcher; returns a setter."""
    for name in CLUSTER_VARS + (
        distributed.ENV_COORDINATOR_ADDRESS,
        distributed.ENV_NUM_PROCESSES,
        distributed.ENV_PROCESS_ID,
        distributed.ENV_LOCAL_DEVICE_IDS,
    ):
        monkeypatch.delenv(name, raising=False)

    def set_env(values: dict[str, str]) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return set_env


SLURM_TWO_TASKS = {
    "SLURM_JOB_ID": "77",
    "SLURM_STEP_NODELIST": "node1",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "1",
}


def test_single_process_needs_nothing(environ):
    assert distributed.resolve() is None
    assert distributed.resolve(num_processes=1) is None
    # a one-task srun is a single-process run too
    environ({**SLURM_TWO_TASKS, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"})
    assert distributed.resolve() is None


def test_flags_win_over_environment(environ):
    environ(
        {
            distributed.ENV_COORDINATOR_ADDRESS: "10.0.0.1:1234",
            distributed.ENV_NUM_PROCESSES: "4",
            distributed.ENV_PROCESS_ID: "3",
            distributed.ENV_LOCAL_DEVICE_IDS: "2,3",
        }
    )
    from_env = distributed.resolve()
    assert (from_env.coordinator_address, from_env.num_processes, from_env.process_id) == (
        "10.0.0.1:1234",
        4,
        3,
    )
    assert from_env.local_device_ids == (2, 3)
    flags = distributed.resolve("host:99", 2, 0, [0])
    assert (flags.coordinator_address, flags.num_processes, flags.process_id) == ("host:99", 2, 0)
    assert flags.local_device_ids == (0,)
    # each setting on its own: a flag for one, the environment for the others
    mixed = distributed.resolve(process_id=1)
    assert (mixed.coordinator_address, mixed.num_processes, mixed.process_id) == (
        "10.0.0.1:1234",
        4,
        1,
    )


def test_cluster_leaves_the_rest_to_jax(environ):
    """Under srun / mpirun with several tasks (JAX's own detection says so), the unset settings
    stay None for jax.distributed.initialize to detect; a flag still wins."""
    environ(SLURM_TWO_TASKS)
    settings = distributed.resolve()
    assert settings.cluster == "SLURM srun"
    assert (settings.coordinator_address, settings.num_processes, settings.process_id) == (
        None,
        None,
        None,
    )
    assert distributed.resolve(coordinator_address="10.0.0.1:99").coordinator_address == (
        "10.0.0.1:99"
    )


def test_cluster_variables_without_srun_are_not_a_cluster(environ):
    """Inside an allocation but not started by srun (no step variables), JAX detects no SLURM
    launch: a plain single-process run."""
    environ({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "4"})
    assert distributed.resolve() is None


def test_launcher_environment_per_child(environ):
    env = launch.child_env({"XLA_FLAGS": "--xla_dump_to=/tmp/x"}, 4321, 2, 1, 2)
    environ(env)
    settings = distributed.resolve()
    assert settings.coordinator_address == "127.0.0.1:4321"
    assert (settings.num_processes, settings.process_id) == (2, 1)
    assert settings.local_device_ids == (2, 3)  # process 1 of 2 devices each
    flags = env["XLA_FLAGS"].split()
    assert flags == ["--xla_dump_to=/tmp/x", "--xla_force_host_platform_device_count=2"]


@pytest.mark.parametrize(
    ("kwargs", "variables", "names"),
    [
        ({"num_processes": 2, "process_id": 2, "coordinator_address": "h:1"}, {}, "0..1"),
        ({"num_processes": 0}, {}, "--num_processes 0"),
        ({"num_processes": 2, "process_id": 0, "coordinator_address": "h"}, {}, "host:port"),
        ({"num_processes": 2}, {}, "--coordinator_address, --process_id"),
        ({}, {distributed.ENV_NUM_PROCESSES: "two"}, "WSJAX_NUM_PROCESSES='two'"),
        ({}, {distributed.ENV_LOCAL_DEVICE_IDS: "0;1"}, "WSJAX_LOCAL_DEVICE_IDS='0;1'"),
    ],
)
def test_bad_settings_are_one_line(kwargs, variables, names, environ):
    environ(variables)
    with pytest.raises(ConfigError) as err:
        distributed.resolve(**kwargs)
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


def test_a_late_initialize_is_a_clear_error(environ):
    """After a JAX backend exists, joining is too late (the CPU client has read its collectives
    setting, the devices are fixed): a clear error instead of a run with the wrong devices."""
    import jax

    jax.devices()  # a backend exists from here on
    with pytest.raises(RuntimeError, match="must run before anything uses a JAX backend"):
        distributed.initialize("127.0.0.1:1234", 2, 0)
    assert not jax.distributed.is_initialized()
