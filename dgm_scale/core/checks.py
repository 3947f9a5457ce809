"""Small checks that raise a one-line ConfigError naming the key (used by every validator)."""
from __future__ import annotations

from typing import Any, Sequence

from dgm_scale.core.errors import ConfigError


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def choice(key: str, value: Any, allowed: Sequence[Any]) -> None:
    require(value in allowed, f"config key '{key}': '{value}' is not one of {', '.join(map(str, allowed))}")


def at_least(key: str, value: Any, minimum: Any) -> None:
    require(value >= minimum, f"config key '{key}' must be >= {minimum}, got {value}")


def between(key: str, value: Any, minimum: Any, maximum: Any) -> None:
    require(minimum <= value <= maximum, f"config key '{key}' must be in [{minimum}, {maximum}], got {value}")


#: the most layers a network's depth key accepts: deeper is a typo, and building its
#: per-layer modules alone would take minutes before any size check could run
MAX_LAYERS = 1000


def is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0
