"""Validation of the `eval` section (its dataclass: dgm_scale.config.schema.EvalConfig)."""
from __future__ import annotations

from typing import Any

from dgm_scale.core.checks import at_least, choice, require


def validate_eval(ev: Any, modality: str, data_name: str) -> None:
    """`modality`: what the run models (images, points, text); text runs are scored by their
    held-out likelihood only, so their sample-metric settings are not checked."""
    from dgm_scale.metrics.registry import OPTION_DEFAULTS, known_metrics

    at_least("eval.every", ev.every, 0)
    at_least("eval.num_samples", ev.num_samples, 2)
    at_least("eval.num_real", ev.num_real, 0)
    at_least("eval.batch_size", ev.batch_size, 1)
    unknown = [name for name in ev.metrics if name not in known_metrics()]
    require(not unknown, f"config key 'eval.metrics': unknown metric(s) {unknown}; known: {known_metrics()}")
    unknown = sorted(set(ev.options) - set(OPTION_DEFAULTS))
    require(not unknown, f"config key 'eval.options': unknown option(s) {unknown}; known: {sorted(OPTION_DEFAULTS)}")
    if "probe" in ev.metrics:
        validate_probe(ev.options, modality, data_name)
    extractor = str(ev.extractor).partition(":")[0]
    choice("eval.extractor", extractor, ["auto", "inception", "classifier", "digits", "identity"])
    points = modality == "points"
    require(not points or extractor in ("auto", "identity"),
            f"config key 'eval.extractor': 2-D toy data '{data_name}' is scored with 'identity', not '{ev.extractor}'")
    require(points or extractor != "identity", "config key 'eval.extractor': 'identity' is for the 2-D toy data")
    require(ev.best_metric in ("", "auto") or ev.best_metric in LOWER_IS_BETTER,
            f"config key 'eval.best_metric': '{ev.best_metric}' is not a lower-is-better metric "
            f"({', '.join(LOWER_IS_BETTER)}), auto or ''")


def validate_probe(options: Any, modality: str, data_name: str) -> None:
    """The `probe` metric's data and options (whether the model has features: see
    probe_metric.ProbeEvaluator.check, which needs the model)."""
    from dgm_scale.metrics.registry import resolve_options
    from dgm_scale.metrics.representation import PROJECTIONS

    require(modality == "images", f"config key 'eval.metrics': 'probe' encodes labelled images; "
                                  f"'{data_name}' holds {modality}")
    resolved = resolve_options(options)
    for key in ("probe_samples", "probe_labels_per_class", "probe_seeds"):
        value = resolved[key]
        require(isinstance(value, int) and not isinstance(value, bool),
                f"config key 'eval.options.{key}' must be an integer, got {value!r}")
        at_least(f"eval.options.{key}", value, 2 if key == "probe_samples" else 1)
    choice("eval.options.probe_projection", resolved["probe_projection"], sorted(PROJECTIONS))
    fraction = resolved["probe_test_fraction"]
    require(isinstance(fraction, (int, float)) and 0 < fraction < 1,
            f"config key 'eval.options.probe_test_fraction' must be in (0, 1), got {fraction!r}")


#: metrics `eval.best_metric` may name (best.ckpt keeps the lowest)
LOWER_IS_BETTER = ("fid", "kid_mean", "ndb", "ndb_fraction", "bits_per_dim", "bits_per_char")
