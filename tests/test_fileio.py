"""wsjax.fileio: whether a writer's process still runs (the test of every stale staging folder
and of a failed peer's exit): a running process is, a zombie and a reaped one are not."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from wsjax.fileio import process_alive


def test_process_alive_running_zombie_and_reaped():
    assert process_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert process_alive(child.pid)
    finally:
        child.kill()
    deadline = time.monotonic() + 10
    while process_alive(child.pid) and time.monotonic() < deadline:  # exited, not yet reaped
        time.sleep(0.01)
    assert not process_alive(child.pid)  # a zombie: it runs no more
    child.wait()
    assert not process_alive(child.pid)  # reaped (the pid may not be reused this fast)
