"""Runs a command-line module with one function wrapped to pause there: at that moment it
writes a marker file and sleeps, so that a test can kill or signal the process at exactly that
point of a writer, on a fast machine as on a slow one.

    python -m tests.integration.pause_probe MARKER MODULE:NAME before|after -- MODULE [ARGS...]

``MODULE:NAME`` is patched on the imported module before ``MODULE`` runs as ``__main__``, so
the code that runs sees the wrapper (through ``from MODULE import NAME`` as well). With
``PAUSE_ONCE_EXISTS=PATH`` in the environment it pauses at the first call made once PATH exists
(e.g. a tier write after a given checkpoint committed).
"""

from __future__ import annotations

import importlib
import os
import runpy
import sys
import time
from pathlib import Path


def main() -> None:
    marker, target, when, sep, module, *args = sys.argv[1:]
    assert sep == "--" and when in ("before", "after"), sys.argv
    home, name = target.split(":")
    mod = importlib.import_module(home)
    original = getattr(mod, name)

    def pause() -> None:
        Path(marker).write_text("paused\n")
        time.sleep(600)  # the test kills or signals the process here

    once = os.environ.get("PAUSE_ONCE_EXISTS")

    def paused(*a, **kw):
        armed = once is None or Path(once).exists()
        if when == "before" and armed:
            pause()
        out = original(*a, **kw)
        if when == "after" and armed:
            pause()
        return out

    setattr(mod, name, paused)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
