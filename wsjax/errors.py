"""The exceptions a user can cause, and the process exit codes of every failure class.

The CLI prints ``str(err)`` as a single line without a traceback and exits with the error's
``exit_code``:

    0  success
    1  a bug in wsjax (traceback)
    2  a user error: config, flag, data, path, checkpoint (WsjaxError and subclasses)
    3  the memory plan does not fit (PlanError; ``--validate_only`` too, when the plan is short)
    4  a non-finite loss or gradient norm stopped the run (NonFiniteError); nothing was saved
    5  preempted: SIGTERM/SIGINT finished the step, saved a checkpoint and exited (Preempted)
    6  another process of a multi-process run failed first; this one stopped (its line names
       the failed process, wsjax.peers)
"""

from __future__ import annotations

import argparse

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USER = 2
EXIT_NOT_FIT = 3
EXIT_NONFINITE = 4
EXIT_PREEMPTED = 5
EXIT_PEER_FAILED = 6


class WsjaxError(Exception):
    """A problem the user can fix: the message names the file/key/value and what is valid."""

    exit_code = EXIT_USER


class ConfigError(WsjaxError):
    """Invalid params YAML, override or flag."""


class DataError(WsjaxError):
    """Missing, empty or inconsistent data."""


class CheckpointError(WsjaxError):
    """Missing, unreadable or mismatched checkpoint."""


class PlanError(WsjaxError):
    """The run cannot fit in host or device memory."""

    exit_code = EXIT_NOT_FIT


class NonFiniteError(WsjaxError):
    """A non-finite loss or gradient norm; the run stops at that step and saves nothing."""

    exit_code = EXIT_NONFINITE


class Preempted(WsjaxError):
    """SIGTERM / SIGINT: the current step finished and a checkpoint was written."""

    exit_code = EXIT_PREEMPTED


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit 2, like every other user error."""

    def error(self, message: str):
        self.exit(EXIT_USER, f"error: {message} (see --help)\n")
