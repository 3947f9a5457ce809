"""Sample-quality metrics: FID, KID, IS, precision/recall, density/coverage, NDB on feature sets, an
exact gather of per-rank features, a name registry and an on-disk cache of real-data features."""
from dgm_scale.metrics.cache import cache_key, cached_real_features
from dgm_scale.metrics.fid import (
    feature_statistics,
    fid_from_features,
    frechet_distance,
)
from dgm_scale.metrics.gather import all_gather_features
from dgm_scale.metrics.inception_score import inception_score
from dgm_scale.metrics.kid import kid, mmd2_unbiased, polynomial_kernel
from dgm_scale.metrics.ndb import (
    NDBResult,
    js_divergence,
    kmeans,
    ndb,
    two_proportion_p_values,
)
from dgm_scale.metrics.prdc import density_coverage, knn_radii, precision_recall
from dgm_scale.metrics.registry import (
    METRICS,
    OPTION_DEFAULTS,
    compute_metrics,
    resolve_options,
)
from dgm_scale.metrics.toy import ModeCoverage, mode_coverage

__all__ = [
    "METRICS",
    "OPTION_DEFAULTS",
    "ModeCoverage",
    "NDBResult",
    "all_gather_features",
    "cache_key",
    "cached_real_features",
    "compute_metrics",
    "density_coverage",
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    "inception_score",
    "js_divergence",
    "kid",
    "kmeans",
    "knn_radii",
    "mmd2_unbiased",
    "mode_coverage",
    "ndb",
    "polynomial_kernel",
    "precision_recall",
    "resolve_options",
    "two_proportion_p_values",
]
