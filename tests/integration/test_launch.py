"""The multi-process setup (wsjax.distributed) and the local launcher (wsjax.launch).

Real processes on this CPU machine: the launcher starts ``tests/integration/launch_probe.py``
children, which join through gloo collectives exactly as a training run does. Each launch costs
about 2-4 s (two JAX imports and a coordinator handshake), so the file stays cheap.
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

from tests.helpers import probe_env
from wsjax import launch

ROOT = Path(__file__).resolve().parents[2]
# A bound on "about 2-4 s": JAX import and the coordinator handshake, on a loaded 2-core machine
# (a client that starts before the coordinator retries with a back-off of up to ~20 s).
START_S = 60.0


def start(out: Path, action: str, *launcher: str, heartbeat_s: int | None = None):
    """``python -m wsjax.launch <launcher> --module tests.integration.launch_probe -- out
    action``."""
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
