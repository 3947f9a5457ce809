"""The errors a user must act on; each message is one line naming the config key, file or shard."""
from __future__ import annotations


def worker_message(text: str) -> str:
    """The error's own message where a DataLoader worker raised it: PyTorch re-raises it in the
    main process as the same type, built from "Caught DataError in DataLoader worker process N.",
    the worker's traceback and, last, "<type>: <message>"; other text is returned as it is."""
    if "\nOriginal Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message, stripped; its type's name when the message is empty
    (a bare `KeyError()`, an `EOFError` from torch.load): never an empty reason."""
    lines = str(error).strip().splitlines()
    return lines[0].strip() if lines else type(error).__name__


def described(error: BaseException) -> str:
    """`Type: first line` of `error` (just `Type` when the message is empty)."""
    reason = first_line(error)
    return reason if reason == type(error).__name__ else f"{type(error).__name__}: {reason}"


def one_line(text: str) -> str:
    """`text` with line breaks and other control characters escaped (`\\n`, `\\x00`): a message
    that quotes the user's input (an override, a file name) stays one line whatever it holds."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


class _OneLineError(Exception):
    def __init__(self, *args: object) -> None:
        super().__init__(*(one_line(worker_message(arg)) if isinstance(arg, str) else arg for arg in args))


class ConfigError(_OneLineError, ValueError):
    """A config problem; the message is one line and names the offending key or file."""


class DataError(_OneLineError, ValueError):
    """A data problem the user must fix; the one-line message names the config key / file."""


class NonFiniteError(_OneLineError, RuntimeError):
    """Training produced a NaN/Inf loss, gradient or weight; the message is one line."""


class DiskFullError(_OneLineError, OSError):
    """No space left on the device (or the disk quota exceeded) while writing a file; the message
    is one line naming it. Every write goes through core/files, so the file's previous version is
    still whole."""


class CheckpointWriteError(_OneLineError, RuntimeError):
    """A checkpoint's files could not be written completely (e.g. a background shard write
    failed); the message is one line naming them. The checkpoints before it are still whole."""
