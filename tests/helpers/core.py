"""Small helpers every kind of test uses: config adaptation, hang guards, one-line errors."""
from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from omegaconf import OmegaConf

from dgm_scale.config.loader import family_of



def adapt(config: str | Path | None, overrides: list[str]) -> list[str]:
    """`overrides` written with the GAN's names (model.generator.*, model.discriminator.*,
    optim.g.*) in the names of the family `config` trains (a VAE: model.decoder.*,
    model.encoder.*, optim.*; its `renamed` map), so that one list of tiny settings serves
    every family; keys the family dropped are left out."""
    family = family_of(OmegaConf.load(config) if config is not None else {})
    adapted = []
    for item in overrides:
        key, _, value = item.partition("=")
        for old, new in family.renamed.items():
            if key == old or key.startswith(old + "."):
                key = None if new is None else new + key[len(old):]
                break
        if key is not None:
            adapted.append(f"{key}={value}")
    return adapted


def adapt_args(args: list[str]) -> list[str]:
    """[CONFIG, key=value, ...] with the overrides adapted to CONFIG's family (see adapt)."""
    return [args[0], *adapt(args[0], list(args[1:]))]


class Hang(BaseException):
    """Raised by hang_guard. A BaseException: code under test that catches OSError (TimeoutError
    is one) or Exception, as decoders and shard readers do, must not swallow it and run on."""


@contextlib.contextmanager
def hang_guard(seconds: int):
    """Fail (Hang) instead of hanging when the block runs longer than `seconds` (main thread)."""
    def expired(signum, frame):
        raise Hang(f"still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    """The dotted keys of the leaves of a nested dict (an empty mapping is a leaf)."""
    keys = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        keys.extend(leaf_keys(value, dotted + ".") if isinstance(value, dict) and value else [dotted])
    return keys


def under_ci() -> bool:
    """Whether the suite runs under CI (env CI set, as CI services do): optional test
    dependencies (the `test` extra, the torch-fidelity reference) must then be there."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def one_line(error: Exception) -> str:
    """The message of `error`, which must be one line."""
    message = str(error)
    assert "\n" not in message
    return message
