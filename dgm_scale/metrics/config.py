"""Validation of the `eval` section (its dataclass: dgm_scale.config.schema.EvalConfig)."""
from __future__ import annotations

from typing import Any

from dgm_scale.core.checks import at_least, choice, require


def validate_eval(ev: Any, modality: str, data_name: str) -> None:
    """`modality`: what the run models (images, points, text); text runs are scored by their
    held-out likelihood only, so their sample-metric settings are not checked."""
    from dgm_scale.metrics.registry import METRICS, OPTION_DEFAULTS

    at_least("eval.every", ev.every, 0)
    at_least("eval.num_samples", ev.num_samples, 2)
    at_least("eval.num_real", ev.num_real, 0)
    at_least("eval.batch_size", ev.batch_size, 1)
    unknown = [name for name in ev.metrics if name not in METRICS]
    require(not unknown, f"config key 'eval.metrics': unknown metric(s) {unknown}; known: {sorted(METRICS)}")
    unknown = sorted(set(ev.options) - set(OPTION_DEFAULTS))
    require(not unknown, f"config key 'eval.options': unknown option(s) {unknown}; known: {sorted(OPTION_DEFAULTS)}")
    extractor = str(ev.extractor).partition(":")[0]
    choice("eval.extractor", extractor, ["auto", "inception", "classifier", "digits", "identity"])
    points = modality == "points"
    require(not points or extractor in ("auto", "identity"),
            f"config key 'eval.extractor': 2-D toy data '{data_name}' is scored with 'identity', not '{ev.extractor}'")
    require(points or extractor != "identity", "config key 'eval.extractor': 'identity' is for the 2-D toy data")
    require(ev.best_metric in ("", "auto") or ev.best_metric in LOWER_IS_BETTER,
            f"config key 'eval.best_metric': '{ev.best_metric}' is not a lower-is-better metric "
            f"({', '.join(LOWER_IS_BETTER)}), auto or ''")


#: metrics `eval.best_metric` may name (best.ckpt keeps the lowest)
LOWER_IS_BETTER = ("fid", "kid_mean", "ndb", "ndb_fraction", "bits_per_dim", "bits_per_char")
