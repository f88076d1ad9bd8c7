"""The fault catalogue, several processes: one process of a 2-process run fails before or
during setup, and every process stops within 10 s with one line naming it (wsjax.peers), with
the launcher, with torchrun's variables, and started by hand.

Each case is a real 2-process ``wsjax.train`` run on this CPU (tests/integration/fault_probe.py
injects the fault into one process only) and checks every exit code (the failed process's own
class, 6 for the others), that each stopped process writes exactly one line naming the failed
process with no traceback and no C++ abort, the time from the fault to the last exit, and that
the model_dir is left usable: a run in it afterwards trains.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, SMALL, probe_env, small_config
from wsjax import launch
from wsjax.errors import EXIT_BUG, EXIT_PEER_FAILED, EXIT_USER
from wsjax.train import run

pytestmark = pytest.mark.slow
BOUND_S = 10.0  # the bound: every process gone within 10 s of the fault
START_S = 240.0  # JAX imports and the coordinator handshake of a loaded 2-core machine
# what JAX's C++ side writes when a process dies under it: never in a stopped process's output
ABORT = re.compile(r"Terminating process|coordination_service|DEADLINE_EXCEEDED|Traceback")

# fault -> (exit code of the faulty process, what its own output ends with)
FAULTS = {
    "config": (EXIT_USER, r"^error: process {r}: .*unknown key model\.num_hidden_layerz"),
    "option": (EXIT_USER, r"^error: process {r}: --max_steps 0 is invalid"),
    "flag": (EXIT_USER, r"^error: argument --max_steps.*invalid int value: 'many'"),
    "init": (EXIT_BUG, r"^RuntimeError: injected fault while building the engine"),
}


def train_args(out: Path) -> list[str]:
    return ["-o", str(out / "md"), "--max_steps", "2", *SMALL]


def probe_cmd(out: Path, fault: str, faulty: int) -> list[str]:
    return ["-m", "tests.integration.fault_probe", str(out), fault, str(faulty), "--"]


def env_of(how: str, port: int, index: int) -> dict:
    if how == "torchrun":  # torchrun's variables: the coordinator on MASTER_PORT + 1
        env = probe_env()
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port - 1), WORLD_SIZE="2")
        env.update(RANK=str(index), LOCAL_RANK=str(index), LOCAL_WORLD_SIZE="1")
        return env
    return launch.child_env(probe_env(), port, 2, index, None)


def by_hand(tmp_path: Path, how: str, fault: str, faulty: int) -> tuple[list[int], list[str]]:
    """Two processes started directly (no launcher): their exit codes and stderr texts; asserts
    that both ended within BOUND_S of the fault."""
    port = launch.free_port()
    procs, errs = [], [tmp_path / f"err-{i}" for i in range(2)]
    for index in range(2):
        cmd = [sys.executable, *probe_cmd(tmp_path, fault, faulty), *train_args(tmp_path)]
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=REPO,
                env=env_of(how, port, index),
                stdout=subprocess.DEVNULL,
                stderr=errs[index].open("w"),
            )
        )
    ended: dict[int, float] = {}
    deadline = time.monotonic() + START_S
    try:
        while len(ended) < 2 and time.monotonic() < deadline:
            ended.update({i: time.time() for i, p in enumerate(procs) if p.poll() is not None})
            time.sleep(0.02)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert len(ended) == 2, [e.read_text()[-2000:] for e in errs]
    took = max(ended.values()) - float((tmp_path / "failed_at").read_text())
    assert took < BOUND_S, took
    return [p.returncode for p in procs], [e.read_text() for e in errs]


def check_faulty(err: str, fault: str, faulty: int) -> None:
    last = err.strip().splitlines()[-1]
    assert re.search(FAULTS[fault][1].format(r=faulty), last), err[-2000:]
    if fault != "init":  # a user error: one line; a bug keeps its traceback
        assert len(err.strip().splitlines()) == 1, err


def check_stopped(err: str, faulty: int, index: int, code: int) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and not ABORT.search(err), err[-2000:]
    assert re.match(
        rf"error: process {faulty} of 2 failed \(exit {code}\): .+; process {index} stops too$",
        lines[0],
    ), lines[0]


def still_trains(tmp_path: Path) -> None:
    """Nothing left locked or torn: one process trains in the same model_dir."""
    r = run(small_config(), "train", tmp_path / "md", max_steps=1, progress=False)
    assert [s for s, _ in r.losses] == [1] and (tmp_path / "md" / "model-ckpt-1").is_dir()


@pytest.mark.parametrize(
    "how,fault,faulty",
    [
        ("by hand", "config", 1),
        ("torchrun", "config", 0),  # process 0 serves the coordination service
        ("by hand", "init", 0),
        ("torchrun", "option", 1),
        ("by hand", "flag", 1),
    ],
)
def test_one_failed_process_stops_every_process(tmp_path, how, fault, faulty):
    codes, errs = by_hand(tmp_path, how, fault, faulty)
    code = FAULTS[fault][0]
    other = 1 - faulty
    assert codes[faulty] == code and codes[other] == EXIT_PEER_FAILED, (codes, errs)
    check_faulty(errs[faulty], fault, faulty)
    check_stopped(errs[other], faulty, other, code)
    assert not list((tmp_path / "md").glob("model-ckpt-*"))
    if fault == "init":
        still_trains(tmp_path)


@pytest.mark.parametrize("fault,faulty", [("init", 1), ("config", 0)])
def test_with_the_launcher_the_failed_process_is_the_one_reported(tmp_path, fault, faulty):
    """The launcher's code and line are the failed process's, not those of the process that
    stopped because of it (exit 6), whichever of them exits first."""
    cmd = [sys.executable, "-m", "wsjax.launch", "--nproc", "2", "--module"]
    module, *probe_args = probe_cmd(tmp_path, fault, faulty)[1:]
    cmd += [module, "--", *probe_args, *train_args(tmp_path)]
    proc = subprocess.run(
        cmd, cwd=REPO, env=probe_env(), capture_output=True, text=True, timeout=START_S
    )
    took = time.time() - float((tmp_path / "failed_at").read_text())
    assert took < BOUND_S, took
    code = FAULTS[fault][0]
    assert proc.returncode == code, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    # the peer may still run when the failed process's exit is seen: then the line says so
    assert re.fullmatch(
        rf"wsjax\.launch: process {faulty} \(pid \d+\) exited with code {code}"
        r"(; stopping the other 1 process\(es\))?",
        lines[-1],
    ), lines[-1]
    stopped = [line for line in lines if " stops too" in line]
    check_stopped(stopped[0] if len(stopped) == 1 else proc.stderr, faulty, 1 - faulty, code)
    assert not re.search(r"Terminating process|coordination_service", proc.stderr)
    mine = "\n".join(line for line in lines[:-1] if line not in stopped)
    check_faulty(mine, fault, faulty)
