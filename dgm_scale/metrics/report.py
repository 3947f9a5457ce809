"""Evaluation results for people and programs: a text table and a JSON report."""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

#: how each result reads: (label, which way is better)
DESCRIPTIONS = {
    "fid": ("Frechet distance of features", "lower"),
    "kid_mean": ("kernel inception distance", "lower"), "kid_std": ("KID std over subsets", ""),
    "is_mean": ("inception score", "higher"), "is_std": ("IS std over splits", ""),
    "precision": ("precision (k-NN manifolds)", "higher"), "recall": ("recall (k-NN manifolds)", "higher"),
    "density": ("density", "higher"), "coverage": ("coverage", "higher"),
    "ndb": ("statistically different bins", "lower"), "ndb_fraction": ("NDB / bins", "lower"),
    "ndb_js": ("JS divergence of bin histograms", "lower"),
    "eval_seconds": ("seconds", ""),
}


def format_table(results: dict[str, float]) -> str:
    """Aligned rows: metric, value, what it is, which way is better."""
    rows = [("metric", "value", "meaning", "better")]
    for name, value in results.items():
        label, better = DESCRIPTIONS.get(name, ("", ""))
        rows.append((name, f"{value:.6g}", label, better))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows)
    return "\n".join(lines)


def write_report(path: Path, results: dict[str, float], settings: Any, checkpoint: Path, iteration: int,
                 extractor_key: dict[str, Any]) -> Path:
    """JSON {results, checkpoint, iteration, settings, extractor, time}, written atomically."""
    report = {"results": results, "checkpoint": str(checkpoint), "iteration": iteration,
              "settings": asdict(settings), "extractor": extractor_key,
              "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return write_json_atomic(Path(path), report)


def write_text_atomic(path: Path, text: str) -> Path:
    """Text (UTF-8) to a temporary file in the same folder, then renamed: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json_atomic(path: Path, data: Any) -> Path:
    """JSON, written as `write_text_atomic` writes."""
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
