"""The errors a user must act on; each message is one line naming the config key, file or shard."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config problem; the message is one line and names the offending key or file."""


class DataError(ValueError):
    """A data problem the user must fix; the one-line message names the config key / file."""


class NonFiniteError(RuntimeError):
    """Training produced a NaN/Inf loss, gradient or weight; the message is one line."""


def error_line(error: BaseException) -> str:
    """The one-line message of a user-facing error, also when a DataLoader worker raised it: PyTorch
    re-raises it in the main process as the same type with "Caught DataError in DataLoader worker
    process N." and the worker's traceback in front, whose last line is "<type>: <message>"."""
    message = str(error)
    if "\nOriginal Traceback" not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last
