from dgm_scale.config.loader import ConfigError, config_from_dict, load_config, to_dict, to_yaml, validate
from dgm_scale.config.schema import Config

__all__ = ["Config", "ConfigError", "config_from_dict", "load_config", "to_dict", "to_yaml", "validate"]
