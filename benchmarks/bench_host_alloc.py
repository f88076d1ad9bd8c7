"""Why host copies run at ~1 GB/s on the CPU client: a fresh, page-faulted buffer per output.

    python benchmarks/bench_host_alloc.py [--smoke] [--results_dir DIR] [--mb 64]

In a child process per setting, a jitted ``a + 1`` over a ``--mb`` MiB fp32 array on the CPU
device runs 5 times after a warm-up; each line reports the kernel's minor page faults per call
(``getrusage``; one per 4 KiB page touched for the first time) and the seconds, with glibc's
allocator as it is (``plain``) and after ``mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=1 GiB,
M_ARENA_MAX=1)`` (``mallopt``), which keeps freed memory mapped. The output buffer is new on
every call; if its pages were reused the fault count would be near 0. The GPU record
(benchmarks/reports/2026-11-26-h100-gptj6b.md) traces the slow GPU <-> CPU-device crossing to the
same cause.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as C  # noqa: E402

CHILD = r"""
import ctypes, json, resource, sys, time
import numpy as np
if sys.argv[1] == "mallopt":
    libc = ctypes.CDLL("libc.so.6")
    assert libc.mallopt(-4, 0) and libc.mallopt(-1, 1 << 30) and libc.mallopt(-8, 1)
import jax
mb = int(sys.argv[2])
x = jax.device_put(np.ones((mb << 20) // 4, np.float32), jax.devices("cpu")[0])
f = jax.jit(lambda a: a + 1.0)
jax.block_until_ready(f(x))
faults, secs = [], []
for _ in range(5):
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    y = f(x)
    jax.block_until_ready(y)
    secs.append(time.perf_counter() - t0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
    del y
print(json.dumps({"faults": faults, "seconds": secs}))
"""


def _args(p) -> None:
    p.add_argument("--mb", type=int, default=64)


def main() -> None:
    args = C.parse_args(__doc__, _args)
    mb = 4 if args.smoke else args.mb
    out = C.results_path(args.results_dir)
    for mode in ("plain", "mallopt"):
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, mode, str(mb)], capture_output=True, text=True
        )
        if proc.returncode:
            raise SystemExit(proc.stderr[-2000:])
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        pages = (mb << 20) // 4096
        C.emit(
            {
                "bench": "host_alloc",
                **C.machine(),
                "setting": mode,
                "buffer_bytes": mb << 20,
                "pages_4k": pages,
                "minor_faults_per_call": got["faults"],
                "bytes_per_sec_best": (mb << 20) / min(got["seconds"]),
            },
            out,
        )


if __name__ == "__main__":
    main()
