"""Evaluation results for people and programs: a text table and a JSON report."""
from __future__ import annotations

from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dgm_scale.core.files import write_json_atomic

#: how each result reads: (label, which way is better)
DESCRIPTIONS = {
    "fid": ("Frechet distance of features", "lower"),
    "kid_mean": ("kernel inception distance", "lower"), "kid_std": ("KID std over subsets", ""),
    "is_mean": ("inception score", "higher"), "is_std": ("IS std over splits", ""),
    "precision": ("precision (k-NN manifolds)", "higher"), "recall": ("recall (k-NN manifolds)", "higher"),
    "density": ("density", "higher"), "coverage": ("coverage", "higher"),
    "ndb": ("statistically different bins", "lower"), "ndb_fraction": ("NDB / bins", "lower"),
    "ndb_js": ("JS divergence of bin histograms", "lower"),
    "bits_per_dim": ("held-out negative log-likelihood, bits per dimension (VAE, diffusion VLB: "
                     "upper bounds; diffusion ODE: an estimate of one)", "lower"),
    "bits_per_char": ("held-out negative log-likelihood, bits per character", "lower"),
    "test_accuracy": ("held-out accuracy of the classifier", "higher"),
    "eval_seconds": ("seconds", ""),
    "probe_kmeans_accuracy": ("k-means accuracy of the model's features of labelled real images (Hungarian)",
                              "higher"),
    "probe_nmi": ("normalised mutual information of those k-means clusters and the classes", "higher"),
    "probe_linear_accuracy": ("linear-probe test accuracy from probe_labels_per_class labels per class "
                              "(mean over probe_seeds draws)", "higher"),
    "probe_linear_accuracy_std": ("linear-probe accuracy std over the label draws", ""),
    "probe_pixels_kmeans_accuracy": ("the same k-means accuracy on the raw pixels of those images (the baseline)",
                                     "higher"),
    "probe_pixels_nmi": ("the same NMI on the raw pixels (the baseline)", "higher"),
    "probe_pixels_linear_accuracy": ("the same linear probe on the raw pixels (the baseline)", "higher"),
    "probe_seconds": ("seconds of the probe", ""),
}


def format_table(results: dict[str, float]) -> str:
    """Aligned rows: metric, value, what it is, which way is better."""
    rows = [("metric", "value", "meaning", "better")]
    for name, value in results.items():  # a sampler variant's metric: `raw/fid`
        label, better = DESCRIPTIONS.get(name.rpartition("/")[2], ("", ""))
        rows.append((name, f"{value:.6g}", label, better))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows)
    return "\n".join(lines)


def write_report(path: Path, results: dict[str, float], settings: Any, checkpoint: Path, iteration: int,
                 extractor_key: dict[str, Any]) -> Path:
    """JSON {results, checkpoint, iteration, settings, extractor, time}, written atomically."""
    report = {"results": results, "checkpoint": str(checkpoint), "iteration": iteration,
              "settings": asdict(settings) if settings is not None else None, "extractor": extractor_key,
              "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return write_json_atomic(Path(path), report)
