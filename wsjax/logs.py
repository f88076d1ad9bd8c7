"""The ``wsjax`` loggers' output: plain ``INFO: message`` lines on stdout (or on stderr, for a
command whose stdout carries a result), and the run's ``run.log``."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
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
    logging.captureWarnings(True)  # a library's warnings (JAX's compile cache) too
    if sys.unraisablehook is not _library_unraisable:  # for good: late callbacks meet it too
        _unraisable_before[:] = [sys.unraisablehook]
        sys.unraisablehook = _library_unraisable
    _hooks_before[:] = [sys.excepthook, threading.excepthook]
    sys.excepthook, threading.excepthook = _library_excepthook, _library_thread_excepthook
    return fh


# the loggers of libraries a run writes through (orbax logs through absl; warnings.warn
# through py.warnings once captured; asyncio's own errors)
LIBRARY_LOGGERS = ("absl", "tensorboardX", "py.warnings", "asyncio")
_hooks_before: list = []  # sys.excepthook and threading.excepthook while run.log is open
_unraisable_before: list = []  # sys.unraisablehook before the first run.log


def _from_a_library_thread(exc: BaseException | None) -> bool:
    """What a library's background thread raises when a write fails (a full disk: an OSError)
    or when its callbacks outlive the event loop it was cancelled from (orbax's tensorstore
    writes after a failed save: "Event loop is closed")."""
    return threading.current_thread() is not threading.main_thread() and (
        isinstance(exc, OSError) or _closed_loop(exc)
    )


def _closed_loop(exc: BaseException | None) -> bool:
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _library_unraisable(unraisable) -> None:
    """orbax's tensorstore callbacks that outlive their event loop after a failed save report
    "Event loop is closed" as unraisable: into run.log while it is open, else dropped (the
    failed save is reported in its own line); anything else as before."""
    if not _closed_loop(unraisable.exc_value):
        _unraisable_before[0](unraisable)
        return
    info = (unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback)
    lib = logging.getLogger("asyncio")
    if lib.handlers:
        lib.error("a library callback after its event loop closed", exc_info=info)


def _library_excepthook(exc_type, exc, tb) -> None:
    """A traceback a library's C++ thread prints (through sys.excepthook): into run.log."""
    if _from_a_library_thread(exc):
        logging.getLogger("asyncio").error("in a library thread", exc_info=(exc_type, exc, tb))
    else:
        _hooks_before[0](exc_type, exc, tb)


def _library_thread_excepthook(args) -> None:
    """An exception ending a library's Python thread (tensorboardX's writer): into run.log."""
    if _from_a_library_thread(args.exc_value):
        info = (args.exc_type, args.exc_value, args.exc_traceback)
        logging.getLogger("asyncio").error("in thread %s", args.thread, exc_info=info)
    else:
        _hooks_before[1](args)


def close_log_file(handler: logging.Handler | None) -> None:
    """Detach and close a handler :func:`setup_logging` returned (None: nothing)."""
    if handler is None:
        return
    for name in ("wsjax", *LIBRARY_LOGGERS):
        logging.getLogger(name).removeHandler(handler)
    handler.close()
    if isinstance(handler, _RunLogFile) and _hooks_before:
        logging.captureWarnings(False)
        sys.excepthook, threading.excepthook = _hooks_before
        _hooks_before.clear()


class _RunLogFile(logging.FileHandler):
    """run.log: on a full disk a line is dropped quietly (logging would print a traceback); the
    run's next real write reports the disk in one line."""

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handleError(record)

    def flush(self) -> None:
        with contextlib.suppress(OSError):  # the buffered lines of a full disk: dropped
            super().flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            super().close()
