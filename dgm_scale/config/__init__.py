"""Config loading: the shared sections, the family's own sections, validation (see loader.py)."""
from dgm_scale.config.loader import config_from_dict, load_config, to_dict, to_yaml, validate
from dgm_scale.core.errors import ConfigError

__all__ = ["ConfigError", "config_from_dict", "load_config", "to_dict", "to_yaml", "validate"]
