"""Metrics selectable by name: each takes (real_features, fake_features, fake_logits, options)
and returns a dict of floats, so an evaluation callback or CLI can pick them from a config list.

Options are one flat dict; `OPTION_DEFAULTS` lists every key (torch-fidelity's defaults), and
`compute_metrics` rejects unknown metric names and unknown option keys instead of ignoring them.
Features are [N, D]; fake_logits [M, C] (only "is" reads them; the others accept None).
"ndb" (mode collapse: bins of real-feature k-means whose fake share differs) gives ndb, ndb_fraction
and ndb_js.

`MODEL_METRICS` are scored on the model rather than on its samples (once per evaluation, not per
sampler): "probe" (metrics/probe_metric.py: k-means accuracy, NMI and a few-label linear probe of
the model's features of labelled real images) with its probe_* options.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

from dgm_scale.metrics.fid import fid_from_features
from dgm_scale.metrics.inception_score import inception_score
from dgm_scale.metrics.kid import kid
from dgm_scale.metrics.ndb import ndb
from dgm_scale.metrics.prdc import density_coverage, precision_recall

MetricFn = Callable[[Any, Any, Any, Mapping[str, Any]], dict[str, float]]

OPTION_DEFAULTS: dict[str, Any] = {
    "kid_subsets": 100, "kid_subset_size": 1000, "kid_degree": 3, "kid_gamma": None, "kid_coef0": 1.0,
    "seed": 2020, "is_splits": 10, "is_shuffle_seed": None, "pr_k": 3, "dc_k": 5, "batch_size": 1024,
    "ndb_bins": 20, "ndb_alpha": 0.05,
    # probe: labelled real images read (a seeded subset), labels per class of the linear probe,
    # its label draws, the test share of the split, the report's 2-D projection (pca | tsne)
    "probe_samples": 1000, "probe_labels_per_class": 10, "probe_seeds": 3, "probe_test_fraction": 0.3,
    "probe_projection": "pca",
}


def _fid(real: Any, fake: Any, fake_logits: Any, options: Mapping[str, Any]) -> dict[str, float]:
    return {"fid": fid_from_features(real, fake)}


def _kid(real: Any, fake: Any, fake_logits: Any, options: Mapping[str, Any]) -> dict[str, float]:
    subset_size = min(options["kid_subset_size"], len(real), len(fake))
    if subset_size < options["kid_subset_size"]:
        warnings.warn(f"KID: kid_subset_size {options['kid_subset_size']} lowered to {subset_size} "
                      "(the smaller feature set); values are not comparable to the default", RuntimeWarning)
    mean, std = kid(real, fake, options["kid_subsets"], subset_size, options["kid_degree"],
                    options["kid_gamma"], options["kid_coef0"], options["seed"])
    return {"kid_mean": mean, "kid_std": std}


def _is(real: Any, fake: Any, fake_logits: Any, options: Mapping[str, Any]) -> dict[str, float]:
    if fake_logits is None:
        raise ValueError("metric 'is' needs fake_logits [M, C]")
    mean, std = inception_score(fake_logits, options["is_splits"], options["is_shuffle_seed"])
    return {"is_mean": mean, "is_std": std}


def _pr(real: Any, fake: Any, fake_logits: Any, options: Mapping[str, Any]) -> dict[str, float]:
    precision, recall = precision_recall(real, fake, options["pr_k"], options["batch_size"])
    return {"precision": precision, "recall": recall}


def _dc(real: Any, fake: Any, fake_logits: Any, options: Mapping[str, Any]) -> dict[str, float]:
    density, coverage = density_coverage(real, fake, options["dc_k"], options["batch_size"])
    return {"density": density, "coverage": coverage}


def _ndb(real: Any, fake: Any, fake_logits: Any, options: Mapping[str, Any]) -> dict[str, float]:
    bins, alpha = options["ndb_bins"], options["ndb_alpha"]
    if isinstance(bins, bool) or not isinstance(bins, int):  # 20.0 or True would slip through range checks
        raise TypeError(f"ndb_bins must be an int, got {bins!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"ndb_alpha must be a number, got {alpha!r}")
    # k-means is seeded with the shared `seed` option, as KID's subsets are.
    return ndb(real, fake, bins, float(alpha), options["seed"], batch_size=options["batch_size"]).as_metrics()


METRICS: dict[str, MetricFn] = {"fid": _fid, "kid": _kid, "is": _is, "pr": _pr, "dc": _dc, "ndb": _ndb}

#: metrics of the model itself (its features of real data), not of its samples
MODEL_METRICS = ("probe",)


def known_metrics() -> list[str]:
    """Every name `eval.metrics` takes."""
    return sorted([*METRICS, *MODEL_METRICS])


def resolve_options(options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults overridden by `options`; an unknown key raises, naming the known ones."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTION_DEFAULTS))
    if unknown:
        raise KeyError(f"unknown metric option(s) {unknown}; known: {sorted(OPTION_DEFAULTS)}")
    return {**OPTION_DEFAULTS, **options}


def compute_metrics(names: list[str], real_features: Any, fake_features: Any, fake_logits: Any = None,
                    options: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Run the named metrics on gathered features -> one merged dict of floats."""
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise KeyError(f"unknown metric(s) {unknown}; known: {sorted(METRICS)}")
    resolved = resolve_options(options)
    results: dict[str, float] = {}
    for name in names:
        results.update(METRICS[name](real_features, fake_features, fake_logits, resolved))
    return results
