from dgm_scale.tracking.callbacks import (
    IterationProgress,
    PeriodicCheckpoint,
    SampleGrids,
)
from dgm_scale.tracking.images import (
    image_grid,
    samples_to_image,
    save_png_atomic,
    scatter_plot,
)
from dgm_scale.tracking.loggers import build_loggers
from dgm_scale.tracking.perf import ThroughputMonitor

__all__ = ["IterationProgress", "PeriodicCheckpoint", "SampleGrids", "ThroughputMonitor", "build_loggers",
           "image_grid", "samples_to_image", "save_png_atomic", "scatter_plot"]
