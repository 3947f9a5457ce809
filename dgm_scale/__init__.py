"""dgm_scale: train deep generative models (GANs, VAEs, autoregressive models, or your own family)
from a laptop to a GPU cluster.

The Python API (imported on first use, so that `import dgm_scale.data` stays light):
`load_config`, `train`, `load_module`, `evaluate`, `register_family`, `Family`, `network_factory`.
"""
from __future__ import annotations

from dgm_scale.core.imports import lazy_attributes

__version__ = "0.1.0"

_API = {"load_config": "dgm_scale.api", "train": "dgm_scale.api", "load_module": "dgm_scale.api",
        "evaluate": "dgm_scale.api", "register_family": "dgm_scale.families.registry",
        "Family": "dgm_scale.families.registry", "network_factory": "dgm_scale.nets.custom"}
__getattr__ = lazy_attributes(__name__, _API)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_API))


__all__ = list(_API)
