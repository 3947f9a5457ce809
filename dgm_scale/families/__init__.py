"""Model families: the registry (registry.py) and the built-in families (gan, vae, autoregressive).

Adding a family: a package beside these with its config dataclasses, validation, description
and module class (see `Family`), plus one line in `registry.BUILTIN`; or, without touching the
package, `register_family(Family(...))` in your own module (see docs/architecture.md, "Extending").
"""
from dgm_scale.families.registry import BUILTIN, Family, family_names, get_family, register_family

__all__ = ["BUILTIN", "Family", "family_names", "get_family", "register_family"]
