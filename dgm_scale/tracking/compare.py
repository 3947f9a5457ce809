"""Compare runs (a sweep's points, or any run directories): one row per run with its status,
its best and last value of a metric, and the settings in which the runs differ; written as a
CSV, an HTML table and a plot of the metric over iterations (`dgm-scale compare`).

Reads only run directories (config.yaml, eval/metrics.jsonl, checkpoints/best.json, metrics.csv),
like the report: finished, running or crashed runs alike.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence, Tuple

import numpy as np

from dgm_scale.core.files import save_png_atomic, write_text_atomic
from dgm_scale.tracking.evaluation import AUTO_BEST
from dgm_scale.tracking.plots import Series, line_chart
from dgm_scale.tracking.report import NotARunDirectory, load_run
from dgm_scale.tracking.report_html import esc, fmt, reached_iteration

#: settings that differ between runs without describing them
IGNORED = ("run.dir", "run.name", "run.root", "run.resume", "run.imports")


def run_dirs(paths: Iterable[str | Path]) -> List[Path]:
    """Run directories: each path itself, or the run directories right below it (a sweep)."""
    found: List[Path] = []
    for path in map(Path, paths):
        if (path / "config.yaml").is_file():
            found.append(path)
        elif path.is_dir():
            found += sorted(p for p in path.iterdir() if (p / "config.yaml").is_file())
    if not found:
        raise NotARunDirectory(f"no run directories in {', '.join(map(str, paths))}")
    return found


def _flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    flat: Dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def differing_settings(configs: Sequence[dict]) -> List[str]:
    """The flattened config keys whose values are not the same in every run."""
    flats = [_flatten(c) for c in configs]
    keys = sorted({key for flat in flats for key in flat})
    return [key for key in keys if not key.startswith(IGNORED) and len({repr(f.get(key)) for f in flats}) > 1]


def _metric(requested: str, evaluations: Sequence[dict]) -> str:
    if requested != "auto":
        return requested
    seen = {key for record in evaluations for key in record}
    return next((name for name in AUTO_BEST if name in seen), "fid")


def compare(paths: Iterable[str | Path], out: str | Path, metric: str = "auto") -> Tuple[List[dict], Dict[str, Path]]:
    """Rows (one per run, best first) and the files written: OUT/compare.csv, compare.html, compare.png."""
    runs = [load_run(path) for path in run_dirs(paths)]
    metric = _metric(metric, [record for run in runs for record in run.evaluations])
    settings = differing_settings([run.config for run in runs])
    rows = []
    for run in runs:
        values = [(r.get("iteration"), r.get(metric)) for r in run.evaluations if isinstance(r.get(metric), (int, float))]
        best = min(values, key=lambda pair: pair[1]) if values else (None, None)
        flat = _flatten(run.config)
        max_steps = int(run.setting("trainer.max_steps", 0) or 0)
        reached = reached_iteration(run)
        rows.append({"run": run.run_dir.name, "status": "finished" if max_steps and reached >= max_steps else "incomplete",
                     "iteration": reached, f"best_{metric}": best[1], "best_iteration": best[0],
                     f"last_{metric}": values[-1][1] if values else None,
                     **{key: flat.get(key) for key in settings}})
    rows.sort(key=lambda row: math.inf if row[f"best_{metric}"] is None else row[f"best_{metric}"])
    out = Path(out)
    files = {"csv": _write_csv(rows, out / "compare.csv"),
             "png": save_png_atomic(_chart(runs, metric).image, out / "compare.png")}
    files["html"] = write_text_atomic(out / "compare.html", _html(rows, metric, files["png"].name))
    return rows, files


def _write_csv(rows: List[dict], path: Path) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return write_text_atomic(path, buffer.getvalue())


def _chart(runs, metric: str):
    series = []
    for run in runs:
        x = np.array([float(r.get("iteration", math.nan)) for r in run.evaluations], dtype=float)
        y = np.array([float(r[metric]) if isinstance(r.get(metric), (int, float)) else math.nan
                      for r in run.evaluations], dtype=float)
        series.append(Series(run.run_dir.name, x, y))
    return line_chart(series, f"eval/{metric} of each run (lower is better)")


def _html(rows: List[dict], metric: str, plot: str) -> str:
    head = "".join(f"<th>{esc(key)}</th>" for key in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{esc(_cell(v))}</td>" for v in row.values()) + "</tr>" for row in rows)
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>dgm-scale compare</title>"
            "<style>body{font:14px system-ui,sans-serif;margin:20px}table{border-collapse:collapse}"
            "td,th{padding:3px 10px;border-bottom:1px solid #ddd;text-align:left}</style></head><body>"
            f"<h1>{len(rows)} runs by best {esc(metric)}</h1><table><tr>{head}</tr>{body}</table>"
            f"<p><img src=\"{esc(plot)}\" alt=\"{esc(metric)} curves\" style=\"max-width:900px\"></p></body></html>\n")


def _cell(value: Any) -> str:
    return fmt(value) if value is None or isinstance(value, (int, float)) else str(value)


def format_rows(rows: List[dict]) -> str:
    """A plain-text table for the terminal."""
    keys = list(rows[0])
    cells = [[_cell(row[k]) for k in keys] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)
