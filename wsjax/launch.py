"""``python -m wsjax.launch``: start a multi-process run on this machine, like ``torchrun
--standalone``.

    python -m wsjax.launch --nproc 2 -- -p params.yaml -m train -o model_dir
    python -m wsjax.launch --nproc 2 --devices_per_process 2 -- -p params.yaml   # CPU: 2 x 2
    # two machines, 8 processes each; run on each machine with its own --node_rank:
    wsjax-launch --nnodes 2 --node_rank 0 --coordinator node0:1234 --nproc 8 -- -p params.yaml

It picks a free localhost port for the coordinator and starts ``--nproc`` children
``python -m wsjax.train <args>`` (``--module`` names another module), each with
``WSJAX_COORDINATOR_ADDRESS``, ``WSJAX_NUM_PROCESSES``, ``WSJAX_PROCESS_ID`` and
``WSJAX_LOCAL_DEVICE_IDS`` (process i drives local devices i*D .. i*D+D-1: on a GPU node one
process per GPU by default) set for :func:`wsjax.distributed.initialize`. With
``--devices_per_process D`` the host platform gets D devices
(``--xla_force_host_platform_device_count``, appended to ``XLA_FLAGS``), so a CPU machine runs
the same layouts as a GPU node. The children's output passes through unchanged (the children
prefix their own lines, :func:`wsjax.logs.setup_logging`).

Several machines: one launcher per machine, each with ``--nnodes N``, its own ``--node_rank R``
(0 .. N-1) and the same ``--coordinator HOST:PORT`` (machine 0's address and a free port there:
global process 0 serves the coordinator). Launcher R starts global processes R*nproc ..
R*nproc+nproc-1 of a run of N*nproc; each drives its local devices as above.

Faults and signals, so that it never hangs:

- SIGINT / SIGTERM to the launcher goes to every child once (each child is in its own session,
  so a terminal's Ctrl-C is not delivered twice: a second signal stops a training run at once);
  the run finishes its step, saves and exits 5, and the launcher exits 5. A second signal to
  the launcher kills the children.
- A child that exits non-zero or is killed: one line names it and its status, the others get
  SIGTERM, and SIGKILL ``--grace_s`` seconds later if they are still there (a peer blocked in a
  collective on the dead process may never reach its signal handler). A child that exits 6
  stopped because another one failed (wsjax.peers): that one is the failure reported, and the
  launcher waits ``--grace_s`` for it to exit by itself.
- On Linux a child also gets SIGTERM when the launcher itself dies (``PR_SET_PDEATHSIG``).

Exit code: 0 when every child succeeded, else the first failing child's code (a child killed by
a signal counts as 128 + the signal number, as a shell reports it); 2 for a bad launcher flag.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from wsjax.distributed import (
    ENV_COORDINATOR_ADDRESS,
    ENV_LOCAL_DEVICE_IDS,
    ENV_NUM_PROCESSES,
    ENV_PROCESS_ID,
)
from wsjax.errors import EXIT_PEER_FAILED, ArgumentParser

__all__ = ["GRACE_S", "build_parser", "child_env", "exit_code_of", "free_port", "main"]

GRACE_S = 10.0  # SIGTERM -> SIGKILL for the survivors of a failed child
POLL_S = 0.05
FORWARDED = (signal.SIGINT, signal.SIGTERM)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def free_port() -> int:
    """A TCP port free on localhost now (the coordinator binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def child_env(
    base: dict[str, str],
    port: int,
    nproc: int,
    index: int,
    devices_per_process: int | None,
    *,
    host: str = "127.0.0.1",
    node_rank: int = 0,
    nnodes: int = 1,
) -> dict[str, str]:
    """The environment of local child ``index`` (of ``nproc`` on node ``node_rank`` of
    ``nnodes``): ``base`` plus the run's coordinates."""
    per = devices_per_process or 1
    env = dict(base)
    env[ENV_COORDINATOR_ADDRESS] = f"{host}:{port}"
    env[ENV_NUM_PROCESSES] = str(nnodes * nproc)
    env[ENV_PROCESS_ID] = str(node_rank * nproc + index)
    env[ENV_LOCAL_DEVICE_IDS] = ",".join(str(index * per + k) for k in range(per))
    if devices_per_process is not None:
        flag = f"--xla_force_host_platform_device_count={devices_per_process}"
        env["XLA_FLAGS"] = f"{env['XLA_FLAGS']} {flag}" if env.get("XLA_FLAGS") else flag
    return env


def exit_code_of(returncode: int) -> int:
    """A Popen return code as a shell reports it: a death by signal N is 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def describe(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with code {returncode}"


# ---- command line --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m wsjax.launch",
        usage="python -m wsjax.launch --nproc N [options] -- <arguments of python -m wsjax.train>",
        description="Start N processes of one multi-process run on this machine (a free "
        "localhost port for the coordinator), forward SIGINT/SIGTERM to them, stop them all "
        "when one fails, and exit with the first failing process's code.",
    )
    p.add_argument("--nproc", type=int, required=True, help="processes to start (>= 1)")
    p.add_argument(
        "--devices_per_process",
        type=int,
        help="local devices per process: process i gets devices i*D .. i*D+D-1; on CPU the "
        "host platform gets D devices (default: 1 device each, the host's one CPU device)",
    )
    p.add_argument("--nnodes", type=int, default=1, help="machines in the run (default 1)")
    p.add_argument(
        "--node_rank", type=int, default=0, help="this machine, 0 .. nnodes-1 (default 0)"
    )
    p.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="machine 0's address and a free port there, the same on every machine (needed "
        "with --nnodes > 1; default: a free localhost port)",
    )
    p.add_argument(
        "--module", default="wsjax.train", help="the module each child runs (default: wsjax.train)"
    )
    p.add_argument(
        "--grace_s",
        type=float,
        default=GRACE_S,
        help=f"seconds between SIGTERM and SIGKILL for the others when one fails ({GRACE_S:g})",
    )
    return p


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Launcher options before ``--``, the children's arguments after it."""
    argv = list(argv)
    if "--" in argv:
        at = argv.index("--")
        return argv[:at], argv[at + 1 :]
    return argv, []


def main(argv: Sequence[str] | None = None) -> int:
    own, child_args = split_argv(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(own)
    if args.nproc < 1:
        print(f"error: --nproc {args.nproc} is invalid: must be >= 1", file=sys.stderr)
        return 2
    if args.devices_per_process is not None and args.devices_per_process < 1:
        print(
            f"error: --devices_per_process {args.devices_per_process} is invalid: must be >= 1",
            file=sys.stderr,
        )
        return 2
    if args.grace_s < 0:
        print(f"error: --grace_s {args.grace_s:g} is invalid: must be >= 0", file=sys.stderr)
        return 2
    problem = _node_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    group = ProcessGroup(
        args.nproc,
        args.devices_per_process,
        args.module,
        child_args,
        node=(args.node_rank, args.nnodes, args.coordinator),
    )
    return group.run(args.grace_s)


def _node_problem(args) -> str | None:
    """What is wrong with --nnodes / --node_rank / --coordinator, in one line; None if nothing."""
    if args.nnodes < 1:
        return f"--nnodes {args.nnodes} is invalid: must be >= 1"
    if not 0 <= args.node_rank < args.nnodes:
        return (
            f"--node_rank {args.node_rank} is invalid for --nnodes {args.nnodes}: valid ranks "
            f"are 0..{args.nnodes - 1}"
        )
    if args.nnodes > 1 and not args.coordinator:
        return "--nnodes > 1 needs --coordinator HOST:PORT (machine 0's address, the same on all)"
    if args.coordinator:
        host, sep, port = args.coordinator.rpartition(":")
        if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
            return (
                f"--coordinator {args.coordinator!r} is invalid: must be HOST:PORT with a port "
                "in 1..65535, e.g. 10.0.0.1:1234"
            )
    return None


class ProcessGroup:
    """The children of one launch and what happened to them."""

    def __init__(
        self,
        nproc: int,
        devices_per_process: int | None,
        module: str,
        args: list[str],
        node: tuple[int, int, str | None] = (0, 1, None),
    ):
        self.command = [sys.executable, "-m", module, *args]
        node_rank, nnodes, coordinator = node  # this machine, machines, HOST:PORT or None
        host, _, port = coordinator.rpartition(":") if coordinator else ("127.0.0.1", "", "")
        where = {"host": host, "node_rank": node_rank, "nnodes": nnodes}
        port = int(port) if port else free_port()
        self.envs = [
            child_env(dict(os.environ), port, nproc, i, devices_per_process, **where)
            for i in range(nproc)
        ]
        self.children: list[subprocess.Popen] = []
        self.signals: list[int] = []  # received by the launcher, in order
        self.first_failure: int | None = None  # exit code of the first child that failed
        self.kill_at: float | None = None  # SIGKILL the survivors at this time

    def run(self, grace_s: float) -> int:
        before = {s: signal.signal(s, self._on_signal) for s in FORWARDED}
        try:
            self.children = [
                subprocess.Popen(
                    self.command, env=env, start_new_session=True, preexec_fn=_pdeathsig
                )
                for env in self.envs
            ]
            self._watch(grace_s)
        finally:
            for s, handler in before.items():
                signal.signal(s, handler)
            self._kill_all()  # only reached with children left on an exception of our own
        codes = [exit_code_of(c.returncode) for c in self.children]
        return self.first_failure if self.first_failure is not None else max(codes, default=0)

    def _on_signal(self, signum: int, frame) -> None:
        # only noted here: the loop acts on it (a handler that waited on a child could interrupt
        # the loop's own wait on it and deadlock)
        self.signals.append(signum)

    def _forward(self, handled: int) -> int:
        """Act on the signals received since ``handled``; returns the new count."""
        for signum in self.signals[handled:]:
            if handled == 0:
                for child in self._running():
                    with contextlib.suppress(ProcessLookupError):
                        child.send_signal(signum)
            else:
                name = signal.Signals(signum).name
                print(
                    f"wsjax.launch: second signal ({name}): killing every process",
                    file=sys.stderr,
                    flush=True,
                )
                self._kill_all()
            handled += 1
        return handled

    def _watch(self, grace_s: float) -> None:
        reported: set[int] = set()
        handled = 0
        while self._running():
            time.sleep(POLL_S)
            handled = self._forward(handled)
            for index, child in enumerate(self.children):
                if child.poll() is None or index in reported:
                    continue
                reported.add(index)
                if child.returncode == EXIT_PEER_FAILED and self.first_failure is None:
                    # it stopped because another failed (wsjax.peers): that one exits on its
                    # own in a moment, and its code is the one to report
                    self.kill_at = self.kill_at or time.monotonic() + grace_s
                elif child.returncode != 0 and self.first_failure is None:
                    self._fail(index, child, grace_s)
                elif self.signals and self.kill_at is None:
                    # the first child done after a forwarded signal: the others are saving the
                    # same checkpoint and finish about together, so they get the grace too
                    self.kill_at = time.monotonic() + grace_s
            if self.kill_at is not None and time.monotonic() >= self.kill_at and self._running():
                left = ", ".join(str(self.children.index(c)) for c in self._running())
                print(
                    f"wsjax.launch: process(es) {left} still running {grace_s:g} s after "
                    "SIGTERM: killing them",
                    file=sys.stderr,
                    flush=True,
                )
                self._kill_all()

    def _fail(self, index: int, child: subprocess.Popen, grace_s: float) -> None:
        self.first_failure = exit_code_of(child.returncode)
        self.kill_at = time.monotonic() + grace_s
        if self.signals:
            # a forwarded signal: every child has it already (a second one would stop a run
            # before it saves), and exits 5 on its own
            return
        others = self._running()
        stopping = f"; stopping the other {len(others)} process(es)" if others else ""
        print(
            f"wsjax.launch: process {index} (pid {child.pid}) {describe(child.returncode)}"
            + stopping,
            file=sys.stderr,
            flush=True,
        )
        for other in others:
            with contextlib.suppress(ProcessLookupError):
                other.terminate()

    def _running(self) -> list[subprocess.Popen]:
        return [c for c in self.children if c.poll() is None]

    def _kill_all(self) -> None:
        for child in self._running():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)  # the child and anything it started
        for child in self.children:
            child.wait()


def _pdeathsig() -> None:
    """In the child before exec: SIGTERM when the launcher dies (Linux), so a killed launcher
    leaves no run behind."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def cli() -> None:
    """The ``wsjax-launch`` entry point."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
