"""Validation of a network's config block (NetConfig: dgm_scale.config.schema)."""
from __future__ import annotations

from typing import Any

from dgm_scale.core.checks import MAX_LAYERS, at_least, between, choice, require


def validate_net(key: str, net: Any, modality: str) -> None:
    """`key`: the block's config key (e.g. `model.generator`); `modality`: images or points.
    A block with a `target` (your own class) is checked when it is built (nets/custom.py)."""
    from dgm_scale.nets import ARCHS, NORMS

    if net.target:
        require(":" in str(net.target), f"config key '{key}.target': '{net.target}' is not of the form "
                                         "package.module:Class or path/to/file.py:Class")
        return
    choice(f"{key}.arch", net.arch, sorted(ARCHS))
    choice(f"{key}.norm", net.norm, list(NORMS))
    require(not (net.arch == "mlp" and net.norm == "instance"),
            f"config key '{key}.norm': instance norm is not defined for the mlp arch")
    require(not (net.arch == "stylegan2" and net.spectral_norm),
            f"config key '{key}.spectral_norm': stylegan2 uses the equalised learning rate, not spectral norm")
    at_least(f"{key}.width", net.width, 1)
    between(f"{key}.depth", net.depth, 1, MAX_LAYERS)
    if modality == "points":
        require(net.arch == "mlp", f"config key '{key}.arch': 2-D toy data needs arch 'mlp', got '{net.arch}'")
