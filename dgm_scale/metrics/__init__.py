"""Sample-quality metrics (FID/KID/IS/PR join here in the evaluation issue)."""
from dgm_scale.metrics.toy import ModeCoverage, mode_coverage

__all__ = ["ModeCoverage", "mode_coverage"]
