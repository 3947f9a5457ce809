"""A local report of a run, for people without W&B: RUN/plots/*.png and RUN/report.html.

`build_report(run_dir)` reads only the run directory (config.yaml, metrics.csv, hparams.yaml,
eval/metrics.jsonl, eval/projection.npz, checkpoints/best.json, samples/, and files of the
family's own through `Family.report_charts`, e.g. a diffusion run's phema/fid.json), so it works for a
running, finished or crashed run alike (`dgm-scale report RUN`). During training, `RunReport` refreshes it on rank 0
at every evaluation and at the end, adding the metric rows the CSV logger still holds in memory.
Every file is written to a temporary name and renamed, so a browser never sees half a file.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import lightning as L
import numpy as np
import yaml

from dgm_scale.core.errors import DiskFullError
from dgm_scale.core.files import save_png_atomic, write_bytes_atomic, write_text_atomic
from dgm_scale.metrics.report import DESCRIPTIONS
from dgm_scale.metrics.representation import PROJECTIONS
from dgm_scale.tracking.plots import Series, line_chart, scatter_chart

log = logging.getLogger(__name__)

Row = Dict[str, float]


class NotARunDirectory(ValueError):
    """The path holds no run (no config.yaml)."""


@dataclass
class RunData:
    """Everything the report shows, read from a run directory."""
    run_dir: Path
    config_text: str
    config: dict
    rows: List[Row]  # metrics.csv rows (then unsaved in-memory rows), values as floats (NaN = empty)
    evaluations: List[dict]  # eval/metrics.jsonl, in order
    best: Optional[dict]  # checkpoints/best.json
    params: Dict[str, int] = field(default_factory=dict)  # hparams.yaml params/<network>
    projection: Optional[dict] = None  # eval/projection.npz (the probe metric's newest)

    def setting(self, dotted: str, default=None):
        """A config value by dotted key (config.yaml of another version may lack it)."""
        node = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node


@dataclass
class Plot:
    """One chart of the report: its file (relative to the run directory) and title."""
    path: str
    title: str


def to_float(text) -> float:
    """A CSV cell as a float; empty or unreadable cells are NaN (a column only some rows have)."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def read_metrics_csv(path: Path) -> List[Row]:
    """metrics.csv rows as floats; a missing file (nothing flushed yet) gives no rows."""
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        # An empty cell is a value that row did not log; a logged NaN reads "nan".
        return [{key: to_float(value) for key, value in row.items() if key and value not in ("", None)}
                for row in csv.DictReader(handle)]


def read_jsonl(path: Path) -> List[dict]:
    """One JSON object per line; a torn last line (a crash mid-write) is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def read_yaml(path: Path) -> dict:
    try:
        loaded = yaml.safe_load(path.read_text()) if path.is_file() else None
    except yaml.YAMLError:
        loaded = None
    return loaded if isinstance(loaded, dict) else {}


def load_run(run_dir: str | Path, unsaved_rows: Iterable[dict] = ()) -> RunData:
    """Read a run directory (raises NotARunDirectory without config.yaml)."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise NotARunDirectory(f"'{run_dir}' is not a run directory (no config.yaml)")
    config_text = config_path.read_text()
    best_path = run_dir / "checkpoints" / "best.json"
    try:
        best = json.loads(best_path.read_text()) if best_path.is_file() else None
    except json.JSONDecodeError:
        best = None
    hparams = read_yaml(run_dir / "hparams.yaml")
    params = {key.split("/", 1)[1]: int(value) for key, value in hparams.items()
              if key.startswith("params/") and isinstance(value, (int, float))}
    rows = read_metrics_csv(run_dir / "metrics.csv")
    rows += [{key: to_float(value) for key, value in row.items()} for row in unsaved_rows]
    return RunData(run_dir, config_text, read_yaml(config_path), rows,
                   read_jsonl(run_dir / "eval" / "metrics.jsonl"), best, params, read_projection(run_dir))


# ----------------------------------------------------------------------------- the projection
PROJECTION = "eval/projection.npz"
PROJECTION_PNG = "plots/projection.png"


def save_projection(run_dir: str | Path, projection, iteration: int) -> Path:
    """RUN/eval/projection.npz (plain arrays): `points` [M, 2], `labels` [M], `feature`, `method`,
    `iteration` of a probe evaluation's projection (metrics.probe_metric.Projection)."""
    buffer = io.BytesIO()
    np.savez(buffer, points=projection.points, labels=projection.labels, feature=np.array(projection.feature),
             method=np.array(projection.method), iteration=np.array(iteration))
    return write_bytes_atomic(Path(run_dir) / PROJECTION, buffer.getvalue())


def read_projection(run_dir: Path) -> Optional[dict]:
    """eval/projection.npz as {points, labels, feature, method, iteration}; None when missing or
    unreadable."""
    try:
        with np.load(run_dir / PROJECTION, allow_pickle=False) as npz:
            return {"points": npz["points"], "labels": npz["labels"], "feature": str(npz["feature"]),
                    "method": str(npz["method"]), "iteration": int(npz["iteration"])}
    except (OSError, ValueError, KeyError):
        return None


def projection_title(projection: dict) -> str:
    name = PROJECTIONS[projection["method"]][0]
    return (f"{name} of the model's {projection['feature']}: {len(projection['labels'])} held-out images "
            f"by class (iteration {projection['iteration']:,})")


def projection_image(projection: dict):
    """The projection drawn: held-out images' features in 2-D (PCA or t-SNE), by class."""
    axis = PROJECTIONS[projection["method"]][1]
    return scatter_chart(projection["points"], projection["labels"], projection_title(projection),
                         f"{axis} 1", f"{axis} 2").image


def iterations(rows: Sequence[Row]) -> np.ndarray:
    """The training iteration of each row: `train/iteration` where logged, else Lightning's step
    plus the offset the rows with both show (rows of callbacks, validation and evaluations)."""
    logged = np.array([row.get("train/iteration", math.nan) for row in rows], dtype=float)
    steps = np.array([row.get("step", math.nan) for row in rows], dtype=float)
    both = np.isfinite(logged) & np.isfinite(steps)
    offset = float(np.median(logged[both] - steps[both])) if both.any() else 1.0
    return np.where(np.isfinite(logged), logged, steps + offset)


def column_series(rows: Sequence[Row], x: np.ndarray, key: str) -> Series:
    """Column `key` over iterations, at the rows that logged it (no gaps between logged rows;
    a logged NaN stays, and is counted as non-finite)."""
    present = np.array([key in row for row in rows], dtype=bool)
    y = np.array([row.get(key, math.nan) for row in rows], dtype=float)
    return Series(key, x[present], y[present])


# Groups of training columns drawn together: file stem, title, which columns. Later groups
# only take columns no earlier group took; every other numeric column gets a chart of its own.
# The family's own groups (e.g. the GAN's critic outputs, the VAE's ELBO terms) come after the losses.
TRAIN_GROUPS: List[Tuple[str, str, Callable[[str], bool]]] = [
    ("losses", "Losses", lambda k: k.startswith("train/") and (k.endswith("_loss") or k == "train/gradient_penalty")),
]
COMMON_GROUPS: List[Tuple[str, str, Callable[[str], bool]]] = [
    ("grad_norms", "Global gradient norms", lambda k: "grad_norm" in k),
    ("throughput", "Throughput (images/s, all processes)", lambda k: k == "perf/images_per_s"),
    ("step_time", "Step time and data wait (s per iteration)", lambda k: k in ("perf/step_time_s", "perf/data_wait_s")),
    ("memory", "Peak memory (MiB)", lambda k: k == "perf/peak_memory_mb"),
    ("data_skipped", "Skipped data (damaged shards / images)", lambda k: k.startswith("data/skipped")),
]
NOT_PLOTTED = {"step", "epoch", "train/iteration", "train/loss"}  # train/loss is -ELBO, drawn as elbo
EVAL_NOT_PLOTTED = {"iteration", "eval_seconds", "probe_seconds"}
# Evaluation metrics drawn together (file stem, title, which names); every other gets its own chart.
EVAL_GROUPS: List[Tuple[str, str, Callable[[str], bool]]] = [
    ("eval_probe", "eval/probe_*: how well the model's features separate the classes (higher is better)",
     lambda name: name.startswith("probe_")),
]


def legend_order(key: str) -> Tuple[int, str]:
    """Within a chart: D before G, real before fake, train before val; else alphabetical."""
    first = ("train/d_loss", "train/g_loss", "train/d_real", "train/d_fake", "train/elbo", "train/reconstruction")
    return (first.index(key) if key in first else len(first) + key.startswith("val/"), key)


def family_of_run(run: RunData):
    """The run's model family, or None where it cannot be found here (a family of user code
    that this process does not import)."""
    from dgm_scale.families.registry import get_family

    try:
        return get_family(run.setting("model.kind", "gan"))
    except Exception:  # noqa: BLE001 - the report still shows everything else
        return None


def training_groups(rows: Sequence[Row], family=None) -> List[Tuple[str, str, List[Series]]]:
    """(stem, title, series) for the training columns that have at least one finite value."""
    x = iterations(rows)
    keys = sorted({key for row in rows for key in row} - NOT_PLOTTED)
    keys = [key for key in keys if not key.startswith("eval")]  # drawn from eval/metrics.jsonl
    groups, taken = [], set()
    family_groups = list(family.chart_groups) if family is not None else []
    for stem, title, wanted in TRAIN_GROUPS + family_groups + COMMON_GROUPS:
        chosen = sorted((key for key in keys if key not in taken and wanted(key)), key=legend_order)
        taken.update(chosen)
        groups.append((stem, title, [column_series(rows, x, key) for key in chosen]))
    for key in keys:
        if key not in taken:
            groups.append((key.replace("/", "_"), key, [column_series(rows, x, key)]))
    return [(stem, title, series) for stem, title, series in groups if any(len(s.finite()[0]) for s in series)]


def evaluation_groups(evaluations: Sequence[dict]) -> List[Tuple[str, str, List[Series]]]:
    """One chart per evaluation metric, or per EVAL_GROUPS group (standard deviations stay in the
    table); the metric of every sampler on the same chart (a GAN's `eval/fid` of the EMA
    generator and `eval_raw/fid`)."""
    keys = [key for key in dict.fromkeys(k for record in evaluations for k in record)
            if key.rpartition("/")[2] not in EVAL_NOT_PLOTTED and not key.endswith("_std")]
    names = list(dict.fromkeys(key.rpartition("/")[2] for key in keys))
    x = np.array([to_float(record.get("iteration")) for record in evaluations], dtype=float)
    grouped = [(stem, title, [name for name in names if wanted(name)]) for stem, title, wanted in EVAL_GROUPS]
    taken = {name for _, _, chosen in grouped for name in chosen}
    charts = []
    for name in (name for name in names if name not in taken):
        label, better = DESCRIPTIONS.get(name, ("", ""))
        title = f"eval/{name}" + (f": {label}" if label else "") + (f"; {better} is better" if better else "")
        charts.append((f"eval_{name}", title, [name]))
    groups = []
    for stem, title, chosen in charts + grouped:
        series = []
        for key in (key for key in keys if key.rpartition("/")[2] in chosen):
            variant, _, name = key.rpartition("/")
            y = np.array([to_float(record.get(key)) for record in evaluations], dtype=float)
            series.append(Series(f"eval_{variant}/{name}" if variant else f"eval/{name}", x, y))
        if any(len(s.finite()[0]) for s in series):
            groups.append((stem, title, series))
    return groups


def family_charts(run: RunData) -> list:
    """The family's own charts of this run (Family.report_charts), where it has any to draw."""
    family = family_of_run(run)
    if family is None or family.report_charts is None:
        return []
    return [chart for chart in family.report_charts(run.run_dir)
            if any(np.isfinite(np.asarray(y, dtype=float)).any() for _, _, y in chart[3])]


def write_plots(run: RunData) -> List[Plot]:
    """Draw every chart into RUN/plots/<stem>.png; returns them in report order (the curves;
    then plots/projection.png when the run has a projection)."""
    plots = []
    for stem, title, series in training_groups(run.rows, family_of_run(run)) + evaluation_groups(run.evaluations):
        path = run.run_dir / "plots" / f"{stem}.png"
        save_png_atomic(line_chart(series, title).image, path)
        plots.append(Plot(path.relative_to(run.run_dir).as_posix(), title))
    for stem, title, x_label, curves in family_charts(run):
        path = run.run_dir / "plots" / f"{stem}.png"
        save_png_atomic(line_chart([Series(name, x, y) for name, x, y in curves], title, x_label).image, path)
        plots.append(Plot(path.relative_to(run.run_dir).as_posix(), title))
    if run.projection is not None and len(run.projection["labels"]):
        save_png_atomic(projection_image(run.projection), run.run_dir / PROJECTION_PNG)
        plots.append(Plot(PROJECTION_PNG, projection_title(run.projection)))
    return plots


def build_report(run_dir: str | Path, unsaved_rows: Iterable[dict] = (), status: Optional[str] = None) -> Path:
    """(Re)write RUN/plots/*.png and RUN/report.html; returns the HTML's path.

    `status` overrides the status line (the training callback knows whether the run is still
    going); without it, a run that reached trainer.max_steps is "finished", any other "incomplete".
    """
    from dgm_scale.tracking.report_html import render_report

    run = load_run(run_dir, unsaved_rows)
    plots = write_plots(run)
    return write_text_atomic(run.run_dir / "report.html", render_report(run, plots, status))


class RunReport(L.Callback):
    """Refresh the report on rank 0 every `every` iterations (the evaluations; 0 = never), at the
    end of training and when training fails. A report that cannot be written is logged, never
    raised: it must not stop a run - except on a full disk, where the next checkpoint would fail
    too: the run stops now, resumable from its last checkpoint, with the one-line DiskFullError."""

    def __init__(self, run_dir: str | Path, every: int, max_steps: int):
        self.run_dir, self.every, self.max_steps = Path(run_dir), every, max_steps

    def refresh(self, trainer: L.Trainer, status: str) -> None:
        from dgm_scale.tracking.loggers import unsaved_metric_rows

        if not trainer.is_global_zero:
            return
        start = time.perf_counter()
        try:
            build_report(self.run_dir, unsaved_metric_rows(trainer), status)
        except DiskFullError:
            raise
        except Exception as error:  # noqa: BLE001 - a report problem is reported, not fatal
            log.warning("could not write the run report: %s: %s", type(error).__name__, error)
            return
        log.debug("report refreshed in %.2f s", time.perf_counter() - start)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, *args) -> None:
        if self.every > 0 and pl_module.iteration % self.every == 0:
            self.refresh(trainer, f"running (iteration {pl_module.iteration})")

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        done = pl_module.iteration >= self.max_steps
        self.refresh(trainer, "finished" if done else f"stopped at iteration {pl_module.iteration} (resumable)")

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, DiskFullError):  # it would fail too, and hide the error that stopped the run
            return
        self.refresh(trainer, f"failed at iteration {pl_module.iteration}: {type(exception).__name__}: {exception}")
