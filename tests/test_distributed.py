"""wsjax.distributed: where a process's run settings come from (flags, WSJAX_* variables,
SLURM / Open MPI through JAX), and the one-line errors of bad ones; the launcher's own flags."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import probe_env
from wsjax import distributed, launch
from wsjax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


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
