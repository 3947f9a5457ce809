from dgm_scale.tracking.callbacks import (
    IterationProgress,
    PeriodicCheckpoint,
    SampleGrids,
)
from dgm_scale.tracking.images import image_grid, samples_to_image, samples_to_text, scatter_plot
from dgm_scale.tracking.evaluation import PeriodicEvaluation
from dgm_scale.tracking.loggers import MetricsResumePoint, build_loggers
from dgm_scale.tracking.perf import ThroughputMonitor
from dgm_scale.tracking.report import RunReport, build_report

__all__ = ["IterationProgress", "MetricsResumePoint", "PeriodicCheckpoint", "PeriodicEvaluation", "RunReport",
           "SampleGrids", "ThroughputMonitor", "build_loggers", "build_report", "image_grid", "samples_to_image",
           "samples_to_text", "scatter_plot"]
