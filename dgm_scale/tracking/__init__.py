from dgm_scale.tracking.callbacks import IterationProgress, PeriodicCheckpoint, SampleGrids
from dgm_scale.tracking.images import image_grid, samples_to_image, save_png_atomic, scatter_plot
from dgm_scale.tracking.loggers import build_loggers

__all__ = ["IterationProgress", "PeriodicCheckpoint", "SampleGrids", "build_loggers", "image_grid",
           "samples_to_image", "save_png_atomic", "scatter_plot"]
