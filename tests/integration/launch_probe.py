"""A child for tests/integration/test_launch.py, started by ``python -m wsjax.launch --module
tests.integration.launch_probe -- OUT_DIR ACTION``: joins the run through
:func:`wsjax.distributed.initialize` (settings from the launcher's environment), writes
``OUT_DIR/ready-<process>.json`` (pid, process index and count), then does ACTION:

- ``sum``: log ``probe info`` and ``probe warning`` (through wsjax.logs.setup_logging, also
  into ``OUT_DIR/run.log``), then a jitted sum over a global mesh of every process's devices,
  each device holding ``1 + its global position``; writes it to ``OUT_DIR/sum-<process>.json``;
- ``exit:<process>:<code>``: that process exits with ``code``, the others wait (for the launcher
  to stop them);
- ``wait``: wait, exiting 5 on SIGTERM after writing ``OUT_DIR/sigterm-<process>``, like a
  training run that saves on preemption;
- ``stubborn``: ignore SIGTERM and wait (only SIGKILL ends it);
- ``collectives``: run sums in a loop until one fails (a peer died): then exit 1.

``WAIT_S`` bounds every wait, so a broken launcher cannot leave a probe behind.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

WAIT_S = 60.0


def global_sum():
    """The jitted sum of ``1 + global position`` over every device of every process."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    # global position: processes in order, then their local devices in order
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    mesh = Mesh(np.array(devices), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    local = [
        jax.device_put(np.array([float(devices.index(d) + 1)]), d)
        for d in devices
        if d.process_index == jax.process_index()
    ]
    values = jax.make_array_from_single_device_arrays((len(devices),), sharding, local)
    summed = jax.jit(jnp_sum, out_shardings=NamedSharding(mesh, PartitionSpec()))(values)
    return float(summed), len(devices)


def jnp_sum(values):
    return values.sum()


def main(out: Path, action: str, heartbeat_s: int | None) -> int:
    import jax

    from wsjax import distributed
    from wsjax.logs import setup_logging

    kwargs = {"heartbeat_timeout_s": heartbeat_s} if heartbeat_s else {}
    distributed.initialize(**kwargs)
    index = distributed.process_index()
    ready = {
        "pid": os.getpid(),
        "index": index,
        "count": distributed.process_count(),
        "jax_count": jax.process_count(),
        "local_devices": len(jax.local_devices()),
    }
    if action == "wait":
        signal.signal(signal.SIGTERM, lambda *_: on_sigterm(out, index))
    if action == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    (out / f"ready-{index}.json").write_text(json.dumps(ready))
    if action == "sum":
        handler = setup_logging(out / "run.log")
        log = logging.getLogger("wsjax.probe")
        log.info("probe info")
        log.warning("probe warning")
        logging.getLogger("wsjax").removeHandler(handler)
        handler.close()
        value, devices = global_sum()
        (out / f"sum-{index}.json").write_text(json.dumps({"sum": value, "devices": devices}))
        return 0
    if action.startswith("exit:"):
        _, who, code = action.split(":")
        if int(who) == index:
            return int(code)
    if action == "collectives":
        try:
            while True:
                global_sum()
        except Exception as e:  # the peer's death, as JAX reports it
            print(f"probe {index}: collective failed: {type(e).__name__}", flush=True)
            return 1
    time.sleep(WAIT_S)
    return 0


def on_sigterm(out: Path, index: int) -> None:
    from wsjax.distributed import exit_process

    (out / f"sigterm-{index}").write_text("")
    exit_process(5)  # what wsjax.train does after saving on a preemption


if __name__ == "__main__":
    from wsjax.distributed import exit_process

    heartbeat = int(sys.argv[3]) if len(sys.argv) > 3 else None
    exit_process(main(Path(sys.argv[1]), sys.argv[2], heartbeat))
