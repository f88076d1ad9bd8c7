"""Multi-process setup: the one place a run joins ``jax.distributed``, and who is process 0.

    from wsjax import distributed
    distributed.initialize()            # first thing in main, before any JAX backend is used
    if distributed.is_main_process():   # process 0 writes the run's artifacts
        ...

Where the three settings come from, first match wins, each setting on its own:

1. the arguments (``python -m wsjax.train --coordinator_address host:port --num_processes N
   --process_id I``);
2. the environment: ``WSJAX_COORDINATOR_ADDRESS``, ``WSJAX_NUM_PROCESSES``, ``WSJAX_PROCESS_ID``
   (``WSJAX_LOCAL_DEVICE_IDS`` too), which the local launcher :mod:`wsjax.launch` sets;
3. torchrun's and Kubernetes' (PyTorchJob) variables: ``WORLD_SIZE`` processes, this one
   ``RANK``, the coordinator at ``MASTER_ADDR`` on port ``MASTER_PORT + 1`` (torchrun's own store
   serves on ``MASTER_PORT``; it binds nothing else, so the next port is left to JAX's
   coordinator in process 0); with several processes per node (``LOCAL_WORLD_SIZE`` > 1) process
   ``LOCAL_RANK`` drives local device ``LOCAL_RANK``;
4. the cluster: under SLURM ``srun`` or Open MPI ``mpirun`` with more than one task, JAX's own
   detection (``jax.distributed.initialize`` with what is still unset) fills in the rest.

One process and no cluster: nothing happens, so a single-process run is untouched. On CPU the
cross-process collectives use gloo (``jax_cpu_collectives_implementation``, the same option name
and the default in JAX 0.10, 0.11 and 0.12; set anyway, so an older default cannot leave a run
without collectives).

Timeouts, so that a dead peer ends a run instead of hanging it. JAX 0.10, 0.11 and 0.12 all take
the same three arguments of ``jax.distributed.initialize`` (there is no ``jax_distributed_*``
config option for them):

- ``initialization_timeout`` (s): how long connecting to the coordinator is retried; a wrong
  address or a peer that never starts fails after this long;
- ``heartbeat_timeout_seconds``: a process that stops sending heartbeats (killed, crashed, host
  gone) is declared dead after this long, and the coordination service then aborts every other
  process (JAX's own ``Terminating process because the JAX distributed service detected fatal
  errors``). A collective blocked on the dead peer usually fails sooner, as soon as gloo/NCCL
  sees the connection close; the heartbeat is the bound when it does not;
- ``shutdown_timeout_seconds``: how long a finishing process waits at exit for the others. It is
  left at JAX's 300 s: process 0 may still be writing the final checkpoint or export while the
  others wait, and a dead peer fails that barrier through the heartbeat anyway.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

import jax

from wsjax import peers
from wsjax.errors import ConfigError

try:  # JAX's own launcher detection and backend state: private names, so guarded
    from jax._src.clusters import OmpiCluster, SlurmCluster
except ImportError:  # pragma: no cover - a JAX that moved them
    OmpiCluster = SlurmCluster = None
try:
    from jax._src.xla_bridge import backends_are_initialized
except ImportError:  # pragma: no cover
    backends_are_initialized = None

__all__ = [
    "ENV_COORDINATOR_ADDRESS",
    "ENV_LOCAL_DEVICE_IDS",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
    "HEARTBEAT_TIMEOUT_S",
    "INITIALIZATION_TIMEOUT_S",
    "SHUTDOWN_TIMEOUT_S",
    "Settings",
    "exit_process",
    "initialize",
    "is_main_process",
    "launcher",
    "process_count",
    "process_index",
    "resolve",
]

ENV_COORDINATOR_ADDRESS = "WSJAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "WSJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "WSJAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "WSJAX_LOCAL_DEVICE_IDS"

# A live process sends heartbeats from a background thread, whatever its Python code is doing
# (compiling, a long host update), so a minute without one means the process is gone. JAX's
# default, 100 s, would let a survivor sit on a dead peer for longer than a training step takes.
HEARTBEAT_TIMEOUT_S = 60
# JAX's default: nodes of a cluster job can start minutes apart.
INITIALIZATION_TIMEOUT_S = 300
SHUTDOWN_TIMEOUT_S = 300


@dataclass(frozen=True)
class Settings:
    """What ``jax.distributed.initialize`` is called with; ``None`` leaves it to the cluster."""

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    local_device_ids: tuple[int, ...] | None
    cluster: str | None  # the detected launcher, if any ("SLURM srun", "Open MPI mpirun")


def resolve(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> Settings | None:
    """The settings of this process (arguments, then ``WSJAX_*`` variables, then the cluster),
    or ``None`` for a single-process run. Raises a one-line :class:`ConfigError` for a bad
    value or an incomplete set outside a cluster."""
    env = os.environ
    torch = _torch_env(env)
    address = coordinator_address or env.get(ENV_COORDINATOR_ADDRESS) or torch.get("address")
    count = _int_setting("--num_processes", num_processes, env, ENV_NUM_PROCESSES)
    count = torch.get("count") if count is None else count
    index = _int_setting("--process_id", process_id, env, ENV_PROCESS_ID)
    index = torch.get("index") if index is None else index
    devices = _device_ids(local_device_ids, env)
    devices = torch.get("devices") if devices is None else devices
    cluster = _cluster()
    if count is not None and count < 1:
        raise ConfigError(f"--num_processes {count} is invalid: must be >= 1")
    if index is not None and index < 0:
        raise ConfigError(f"--process_id {index} is invalid: must be >= 0")
    if count is not None and index is not None and index >= count:
        raise ConfigError(
            f"--process_id {index} is out of range for --num_processes {count}: "
            f"valid ids are 0..{count - 1}"
        )
    if address is not None:
        _check_address(address)
    if count == 1 or (cluster is None and (address, count, index) == (None, None, None)):
        return None  # one process: no coordinator, nothing to join
    if cluster is None:
        missing = [
            flag
            for flag, value in (
                ("--coordinator_address", address),
                ("--num_processes", count),
                ("--process_id", index),
            )
            if value is None
        ]
        if missing:
            raise ConfigError(
                f"a multi-process run needs {', '.join(missing)} (or {ENV_COORDINATOR_ADDRESS}, "
                f"{ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}; or MASTER_ADDR, MASTER_PORT, "
                "WORLD_SIZE, RANK); or start it with wsjax-launch, torchrun, SLURM srun or Open "
                "MPI mpirun, which set them"
            )
    return Settings(address, count, index, devices, cluster)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    *,
    heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
    initialization_timeout_s: int = INITIALIZATION_TIMEOUT_S,
) -> None:
    """Join the other processes of this run (see the module docstring for where the settings
    come from); a single-process run returns at once. Call it before anything uses a JAX
    backend (``jax.devices()``, a computation): a later call raises ``RuntimeError``."""
    settings = resolve(coordinator_address, num_processes, process_id, local_device_ids)
    if settings is None:
        return
    if jax.distributed.is_initialized():
        raise RuntimeError("wsjax.distributed.initialize() was called twice in one process")
    if _backends_initialized():
        raise RuntimeError(
            "wsjax.distributed.initialize() must run before anything uses a JAX backend "
            "(jax.devices(), device_put, a computation): call it first in main"
        )
    if settings.coordinator_address is not None and settings.process_id is not None:
        # JAX aborts the whole process (a C++ fatal error, no exception) when it cannot reach
        # the coordinator: find the user's mistake first and say it in one line
        _check_reachable(
            settings.coordinator_address, settings.process_id, initialization_timeout_s
        )
    # before the CPU client exists, which reads it once
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=settings.coordinator_address,
            num_processes=settings.num_processes,
            process_id=settings.process_id,
            local_device_ids=list(settings.local_device_ids)
            if settings.local_device_ids is not None
            else None,
            initialization_timeout=initialization_timeout_s,
            heartbeat_timeout_seconds=heartbeat_timeout_s,
            shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S,
        )
        _restore_sigterm()
    except (RuntimeError, ValueError) as e:  # JaxRuntimeError is a RuntimeError
        first = " ".join(str(e).split())[:300]
        where = settings.coordinator_address or f"the address {settings.cluster} gives"
        raise ConfigError(
            f"cannot join the run's coordinator at {where} "
            f"(within {initialization_timeout_s} s): {first}"
        ) from None
    peers.watch()  # a peer's failure stops this process too, within seconds (wsjax.peers)


def process_index() -> int:
    """This process's index, 0 .. process_count() - 1 (0 in a single-process run). Before
    anything has started a JAX backend in a process that joined no run, 0 without starting one
    (so setting up logging does not fix the backend early)."""
    if not jax.distributed.is_initialized() and not _backends_initialized():
        return 0
    return jax.process_index()


def process_count() -> int:
    """The number of processes in the run (1 in a single-process run)."""
    if not jax.distributed.is_initialized() and not _backends_initialized():
        return 1
    return jax.process_count()


def is_main_process() -> bool:
    """Whether this process writes the run's shared artifacts (log lines, TensorBoard events,
    performance.json, plan.json): process 0."""
    return process_index() == 0


def exit_process(code: int) -> NoReturn:
    """End this process with ``code``. A process of a multi-process run that fails exits at
    once: a normal exit would first wait in JAX's shutdown barrier for every other process (up
    to ``SHUTDOWN_TIMEOUT_S``), while they wait in their next collective for it, so nobody
    would see the failure for minutes. A failure it posted (:func:`wsjax.peers.post`) is read
    by every peer first, so they stop at once with one line naming it."""
    if code != 0 and jax.distributed.is_initialized():
        peers.exit_after_peers(code)  # returns only when it posted nothing
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


# ---- parsing -------------------------------------------------------------------------------------
def _int_setting(flag: str, value: int | None, env: Mapping[str, str], name: str) -> int | None:
    if value is not None:
        return value
    text = env.get(name)
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is invalid: must be an integer ({flag})") from None


def _torch_env(env: Mapping[str, str]) -> dict:
    """The settings torchrun's (or a Kubernetes PyTorchJob's) variables give: address, count,
    index, devices; empty without ``WORLD_SIZE`` and ``RANK``."""
    if not (env.get("WORLD_SIZE") and env.get("RANK")):
        return {}
    out = {
        "count": _int_setting("--num_processes", None, env, "WORLD_SIZE"),
        "index": _int_setting("--process_id", None, env, "RANK"),
    }
    port = _int_setting("--coordinator_address", None, env, "MASTER_PORT")
    if env.get("MASTER_ADDR") and port is not None:
        out["address"] = f"{env['MASTER_ADDR']}:{port + 1}"  # MASTER_PORT is torch's store
    local = _int_setting("LOCAL_RANK", None, env, "LOCAL_RANK")
    per_node = _int_setting("LOCAL_WORLD_SIZE", None, env, "LOCAL_WORLD_SIZE") or 1
    if local is not None and per_node > 1:
        out["devices"] = (local,)
    return out


def launcher() -> str | None:
    """What started this process as one of several: wsjax.launch, torchrun, a PyTorchJob-style
    environment, SLURM srun or Open MPI mpirun; None for a plain start."""
    env = os.environ
    if env.get(ENV_COORDINATOR_ADDRESS):
        return "wsjax.launch"
    if env.get("TORCHELASTIC_RUN_ID"):
        return "torchrun"
    if env.get("WORLD_SIZE") and env.get("RANK"):
        return "RANK/WORLD_SIZE (torchrun or Kubernetes)"
    return _cluster()


def _device_ids(given: Sequence[int] | None, env: Mapping[str, str]) -> tuple[int, ...] | None:
    if given is not None:
        return tuple(given)
    text = env.get(ENV_LOCAL_DEVICE_IDS)
    if not text:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(
            f"{ENV_LOCAL_DEVICE_IDS}={text!r} is invalid: must be comma-separated device ids, "
            "e.g. 0,1"
        ) from None


def _check_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"--coordinator_address {address!r} is invalid: must be host:port with a port in "
            "1..65535, e.g. 10.0.0.1:1234"
        )


def _check_reachable(address: str, process_id: int, timeout_s: float) -> None:
    """Process 0: the port is free to serve on. The others: something accepts connections at
    ``address`` within ``timeout_s`` (process 0 may start later, so it is retried)."""
    host, _, port_text = address.rpartition(":")
    host, port = host.strip("[]"), int(port_text)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise ConfigError(
            f"--coordinator_address {address!r}: cannot resolve host {host!r} ({e.strerror})"
        ) from None
    if process_id == 0:
        # JAX's coordinator serves on every interface ([::]:port), as this bind does
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("", port))
            except OSError as e:
                raise ConfigError(
                    f"--coordinator_address {address!r}: process 0 cannot serve on port {port} "
                    f"({e.strerror}); pick a free port"
                ) from None
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=2.0):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"--coordinator_address {address!r}: nothing answered there within "
                    f"{timeout_s} s; is process 0 running, and is this its host and port?"
                ) from None
            time.sleep(0.2)


def _cluster() -> str | None:
    """The cluster launcher (SLURM srun, Open MPI mpirun) that started this process as one of
    several tasks, if any: JAX's own detection (its SLURM and Open MPI cluster classes, the ones
    ``jax.distributed.initialize()`` consults), asked only whether it applies here."""
    if SlurmCluster is None:  # a JAX that moved them: flags and WSJAX_* still work
        return None
    for cluster, launcher in ((SlurmCluster, "SLURM srun"), (OmpiCluster, "Open MPI mpirun")):
        try:
            if cluster.is_env_present() and cluster.get_process_count() > 1:
                return launcher
        except (KeyError, ValueError):  # a partial environment: not a launch by it
            continue
    return None


def _restore_sigterm() -> None:
    """JAX's preemption notifier (started by ``jax.distributed.initialize``) catches SIGTERM
    in C++ and only records it, so a process outside wsjax's own preemption handling would
    ignore SIGTERM. Back to the default, as in a single-process run: the run's preemption
    guard (wsjax.trainer.faults) handles SIGTERM while it trains, and elsewhere SIGTERM ends the
    process, so a launcher's or a scheduler's SIGTERM always means something."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _backends_initialized() -> bool:
    """Whether a JAX backend exists already (then joining is too late). JAX checks this too,
    inside ``jax.distributed.initialize``; asking first keeps the gloo setting from being
    applied to a CPU client that has already read it."""
    if backends_are_initialized is None:  # a JAX that moved it: JAX's own check still raises
        return False
    return backends_are_initialized()
