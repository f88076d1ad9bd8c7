"""The one exception family a user can cause (config, data, paths, checkpoints, plan).

The CLI prints ``str(err)`` as a single line without a traceback and exits with code 2.
"""

from __future__ import annotations


class WsjaxError(Exception):
    """A problem the user can fix: the message names the file/key/value and what is valid."""


class ConfigError(WsjaxError):
    """Invalid params YAML, override or flag."""


class DataError(WsjaxError):
    """Missing, empty or inconsistent data."""


class CheckpointError(WsjaxError):
    """Missing, unreadable or mismatched checkpoint."""


class PlanError(WsjaxError):
    """The run cannot fit in host or device memory."""
