"""The ``wsjax`` loggers' output: plain ``INFO: message`` lines on stdout (or on stderr, for a
command whose stdout carries a result), and the run's ``run.log``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from wsjax.distributed import process_index


class _CurrentStdout(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a record is emitted: notebooks and pytest's
    capture replace it, and a handler holding the first one would write to a closed file."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; always sys.stdout
        pass


def setup_logging(log_file: Path | None = None) -> logging.Handler | None:
    """Plain ``INFO: message`` lines on stdout for the ``wsjax`` loggers (once per process);
    with ``log_file``, also into that file (the returned handler; remove it when done).

    In a multi-process run only process 0 logs as above and writes ``log_file``; the others log
    warnings and errors only, each line prefixed ``[process N]``, and get a handler that writes
    nothing (so the caller's remove/close stays the same)."""
    index = process_index()
    root = logging.getLogger("wsjax")
    console = next((h for h in root.handlers if getattr(h, "_wsjax_console", False)), None)
    if console is None:
        console = _CurrentStdout()
        console._wsjax_console = True
        root.addHandler(console)
        root.setLevel(logging.INFO)
        root.propagate = False
    # set on every call: the process index is known only once the run has joined the others
    prefix = f"[process {index}] " if index else ""
    console.setFormatter(logging.Formatter(prefix + "%(levelname)s: %(message)s"))
    if index != 0:
        root.setLevel(logging.WARNING)
    if log_file is None:
        return None
    if index != 0:
        return logging.NullHandler()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    fh = _RunLogFile(log_file)
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s: %(message)s"))
    root.addHandler(fh)
    for name in LIBRARY_LOGGERS:  # their tracebacks and lines into run.log, not the output
        lib = logging.getLogger(name)
        lib.addHandler(fh)
        lib.propagate = False
    return fh


# the loggers of libraries a run writes through (orbax logs through absl)
LIBRARY_LOGGERS = ("absl", "tensorboardX")


def close_log_file(handler: logging.Handler | None) -> None:
    """Detach and close a handler :func:`setup_logging` returned (None: nothing)."""
    if handler is None:
        return
    for name in ("wsjax", *LIBRARY_LOGGERS):
        logging.getLogger(name).removeHandler(handler)
    handler.close()


class _RunLogFile(logging.FileHandler):
    """run.log: on a full disk a line is dropped quietly (logging would print a traceback); the
    run's next real write reports the disk in one line."""

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handleError(record)
