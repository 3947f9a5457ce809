"""dgm_scale: train deep generative models from a laptop to a GPU cluster."""

__version__ = "0.1.0"
