"""The errors a user must act on; each message is one line naming the config key, file or shard."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config problem; the message is one line and names the offending key or file."""


class DataError(ValueError):
    """A data problem the user must fix; the one-line message names the config key / file."""


class NonFiniteError(RuntimeError):
    """Training produced a NaN/Inf loss, gradient or weight; the message is one line."""


class DiskFullError(OSError):
    """No space left on the device (or the disk quota exceeded) while writing a file; the message
    is one line naming it. Every write goes through core/files, so the file's previous version is
    still whole."""
