"""The run report as one HTML page: status, settings, scores, sample grid, curves, config.

Images are referenced by relative paths (plots/*.png, samples/latest.png), not embedded: the run
directory is what people copy or sync, the PNGs are written anyway, and the page stays small
when it is rewritten at every evaluation. The page itself needs nothing else - inline CSS, no
scripts, no network. Everything that comes from the config or the run's files is HTML-escaped.
"""
from __future__ import annotations

import math
import re
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple
from urllib.parse import quote

from dgm_scale.metrics.report import DESCRIPTIONS
from dgm_scale.modules.sampling import STRIP
from dgm_scale.tracking.report import PROJECTION_PNG, Plot, RunData, family_of_run, iterations

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1e1e1e; margin: 0;
       background: #f4f5f7; }
main { max-width: 1160px; margin: 0 auto; padding: 20px; }
h1 { font-size: 24px; margin: 0 0 2px; } h2 { font-size: 17px; margin: 22px 0 8px; }
.path { color: #666; font-family: ui-monospace, monospace; font-size: 12px; margin: 0 0 10px; word-break: break-all; }
.card { background: #fff; border: 1px solid #dde0e4; border-radius: 6px; padding: 12px 16px; margin-bottom: 14px; }
.status { display: inline-block; padding: 2px 10px; border-radius: 10px; font-weight: 600; color: #fff; }
.finished { background: #2e7d32; } .running { background: #1565c0; } .failed { background: #c62828; }
.incomplete { background: #b26a00; }
.bar { height: 8px; background: #e3e6ea; border-radius: 4px; margin: 8px 0 4px; overflow: hidden; }
.bar div { height: 100%; background: #1565c0; }
table { border-collapse: collapse; } td, th { padding: 3px 12px 3px 0; text-align: left; vertical-align: top; }
th { font-weight: 600; color: #444; border-bottom: 1px solid #dde0e4; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.facts td:first-child { color: #555; white-space: nowrap; }
.muted { color: #777; }
.top { display: grid; grid-template-columns: minmax(0, 1fr) auto; gap: 14px; align-items: start; }
.samples img { max-width: 420px; width: 100%; display: block; }
.samples img.strip { margin-top: 10px; }
.projection { margin: 12px 0 0; max-width: 560px; } .projection img { width: 100%; display: block; }
.plots { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 12px; }
.plots figure { margin: 0; background: #fff; border: 1px solid #dde0e4; border-radius: 6px; padding: 6px; }
.plots img { width: 100%; display: block; }
figcaption { font-size: 12px; color: #555; margin-top: 4px; }
details { margin-bottom: 10px; } summary { cursor: pointer; font-weight: 600; }
.text-samples { max-width: 520px; max-height: 420px; white-space: pre-wrap; margin: 0; }
pre { background: #fafbfc; border: 1px solid #e3e6ea; padding: 10px; overflow: auto; font-size: 12px; }
footer { color: #888; font-size: 12px; margin-top: 16px; }
"""


def esc(value) -> str:
    """Any value as HTML text (quotes too, so that it is safe inside attributes)."""
    return escape(str(value), quote=True)


def src(relative: str) -> str:
    """A relative file path as an attribute value (spaces and odd characters percent-encoded)."""
    return esc(quote(relative))


def fmt(value) -> str:
    """A metric value: 4 significant digits, integers as such, '-' for missing."""
    if value is None:
        return "-"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(number):
        return str(number)
    return f"{int(number):,}" if number.is_integer() and abs(number) < 1e15 else f"{number:.4g}"


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours} h {minutes:02d} min" if hours else (f"{minutes} min {secs:02d} s" if minutes else f"{secs} s")


def reached_iteration(run: RunData) -> int:
    """The newest iteration the files show (training rows or evaluations)."""
    values = [float(x) for x in iterations(run.rows) if math.isfinite(x)]
    values += [float(record["iteration"]) for record in run.evaluations
               if isinstance(record.get("iteration"), (int, float))]
    return int(max(values)) if values else 0


def file_times(run: RunData) -> Tuple[float, float]:
    """(start, last update) as UNIX times: config.yaml is written at the start; the newest output
    file is the last sign of life."""
    start = (run.run_dir / "config.yaml").stat().st_mtime
    outputs = ["metrics.csv", "eval/metrics.jsonl", "samples/latest.png", "checkpoints/last.ckpt"]
    times = [(run.run_dir / name).stat().st_mtime for name in outputs if (run.run_dir / name).is_file()]
    return start, max(times + [start])


def clock(unix_time: float) -> str:
    return datetime.fromtimestamp(unix_time).strftime("%Y-%m-%d %H:%M:%S")


def status_section(run: RunData, status: Optional[str]) -> str:
    max_steps = int(run.setting("trainer.max_steps", 0) or 0)
    reached = reached_iteration(run)
    if status is None:
        status = "finished" if max_steps and reached >= max_steps else "incomplete (running, stopped or crashed)"
    state = next((k for k in ("finished", "running", "failed") if status.startswith(k)), "incomplete")
    share = min(1.0, reached / max_steps) if max_steps else 0.0
    start, last = file_times(run)
    return (f'<div class="card"><span class="status {state}">{esc(status)}</span>'
            f'<div class="bar"><div style="width: {100 * share:.1f}%"></div></div>'
            f"iteration <b>{reached:,}</b> of {max_steps:,} ({100 * share:.0f}%) &middot; started {clock(start)} "
            f"&middot; last update {clock(last)} &middot; {duration(last - start)} wall clock "
            f'<span class="muted">(pauses included)</span></div>')


def describe_model(run: RunData) -> List[Tuple[str, str]]:
    """Label/value pairs of the settings a reader asks about first (the model ones from its family)."""
    s = run.setting
    family = family_of_run(run)
    if family is not None and family.describe is not None:
        model_pairs = family.describe(s)
    else:
        model_pairs = [("model", f"{s('model.kind')}" + (f": {family.description}" if family is not None else ""))]
    world = (s("trainer.devices") or 1) * (s("trainer.num_nodes") or 1)
    data = f"{s('data.name')}" + (f" ({s('data.path')})" if s("data.path") else "")
    if s("data.name") == "text":
        data += f", sequences of {s('data.seq_len')} bytes"
    elif s("data.name") not in ("ring8", "grid25"):
        data += f", {s('data.resolution')} px, {s('data.channels')} channel(s)"
    pairs = model_pairs + [("data", data),
                           ("batch", f"{s('data.batch_size')} per device x {world} process(es)"),
                           ("precision / strategy", f"{s('trainer.precision')} / {s('trainer.strategy')}"),
                           ("seed", str(s("run.seed")))]
    if run.params:
        total = sum(run.params.values())
        pairs.append(("parameters", ", ".join(f"{name} {count:,}" for name, count in run.params.items())
                      + f" (total {total:,})"))
    return pairs


def facts_table(pairs: Iterable[Tuple[str, str]]) -> str:
    rows = "".join(f"<tr><td>{esc(label)}</td><td>{esc(value)}</td></tr>" for label, value in pairs)
    return f'<table class="facts">{rows}</table>'


def metrics_table(run: RunData) -> str:
    """Latest evaluation (a column per sampler: a GAN's EMA and raw generators) next to the best
    one (checkpoints/best.json, the default sampler), one row per metric."""
    if not run.evaluations and not run.best:
        return '<p class="muted">No evaluation yet (eval.every / eval.at_end).</p>'
    latest = run.evaluations[-1] if run.evaluations else {}
    best = run.best or {}
    skip = {"iteration", "metric"}
    keys = [k for k in dict.fromkeys(list(latest) + list(best)) if k not in skip]
    variants = list(dict.fromkeys(key.rpartition("/")[0] for key in keys))
    family = family_of_run(run)
    sampler_names = dict(family.sampler_names) if family is not None else {}
    names = list(dict.fromkeys(key.rpartition("/")[2] for key in keys))
    best_head = (f"best by {esc(best.get('metric', '?'))} (iteration {fmt(best.get('iteration'))})"
                 if best else "best")
    latest_heads = "".join(
        f"<th>latest (iteration {fmt(latest.get('iteration'))})"
        + (f"<br>{esc(sampler_names.get(v, v))}" if len(variants) > 1 else "") + "</th>" for v in variants)
    head = f"<tr><th>metric</th>{latest_heads}<th>{best_head}</th><th>better</th><th>meaning</th></tr>"
    body = ""
    for name in names:
        label, better = DESCRIPTIONS.get(name, ("", ""))
        cells = "".join(f'<td class="num">{esc(fmt(latest.get(f"{v}/{name}" if v else name)))}</td>' for v in variants)
        body += (f"<tr><td>{esc(name)}</td>{cells}<td class=\"num\">{esc(fmt(best.get(name)))}</td>"
                 f"<td>{esc(better)}</td><td>{esc(label)}</td></tr>")
    return f'<table class="metrics">{head}{body}</table>'


def history_table(evaluations: Sequence[dict]) -> str:
    """Every evaluation, one row each (collapsed: long runs have many)."""
    if len(evaluations) < 2:
        return ""
    names = list(dict.fromkeys(k for record in evaluations for k in record))
    head = "".join(f"<th>{esc(name)}</th>" for name in names)
    body = "".join("<tr>" + "".join(f'<td class="num">{esc(fmt(r.get(n)))}</td>' for n in names) + "</tr>"
                   for r in evaluations)
    return (f"<details><summary>All {len(evaluations)} evaluations (eval/metrics.jsonl)</summary>"
            f"<table>{head}{body}</table></details>")


def samples_figure(run: RunData) -> str:
    """The newest samples: the grid (samples/latest.png), or text samples (samples/latest.txt)."""
    folder = run.run_dir / "samples"
    text = folder / "latest.txt"
    suffix = "txt" if text.is_file() else "png"
    if not (folder / f"latest.{suffix}").is_file():
        return '<p class="muted">No samples yet.</p>'
    numbered = sorted(p.name for p in folder.glob(f"iter_*.{suffix}"))
    match = re.match(r"iter_(\d+)\.", numbered[-1]) if numbered else None
    if (folder / f"final.{suffix}").is_file():
        caption = "final model"
    else:
        caption = f"iteration {int(match.group(1)):,}" if match else "latest"
    if suffix == "txt":
        return (f'<figure class="samples" style="margin:0"><pre class="text-samples">{esc(text.read_text())}</pre>'
                f"<figcaption>samples/latest.txt: {esc(caption)}, fixed seed</figcaption></figure>")
    figure = (f'<figure class="samples" style="margin:0"><img src="samples/latest.png" alt="latest samples">'
              f"<figcaption>samples/latest.png: {esc(caption)}, fixed seed</figcaption></figure>")
    return figure + strip_figure(run)


def strip_figure(run: RunData) -> str:
    """The latent interpolation strip (samples/interpolation.png), for models with a latent space."""
    if not (run.run_dir / "samples" / "interpolation.png").is_file():
        return ""
    seed_a, seed_b, steps = STRIP
    return ('<figure class="samples" style="margin:0"><img src="samples/interpolation.png" class="strip" '
            'alt="latent interpolation strip"><figcaption>samples/interpolation.png: latent interpolation '
            f"from seed {seed_a} to seed {seed_b} in {steps} steps (the strip dgm-scale serve shows first)"
            "</figcaption></figure>")


def projection_figure(plots: Sequence[Plot]) -> str:
    """The probe metric's 2-D projection of held-out images' features (plots/projection.png)."""
    found = [plot for plot in plots if plot.path == PROJECTION_PNG]
    if not found:
        return ""
    return (f'<figure class="projection"><img src="{src(found[0].path)}" alt="{esc(found[0].title)}">'
            f"<figcaption>{esc(found[0].path)}: {esc(found[0].title)} (eval.metrics: probe)</figcaption></figure>")


def plots_section(plots: Sequence[Plot]) -> str:
    if not plots:
        return '<p class="muted">No metrics logged yet.</p>'
    figures = "".join(f'<figure><img src="{src(plot.path)}" alt="{esc(plot.title)}">'
                      f"<figcaption>{esc(plot.path)}</figcaption></figure>" for plot in plots)
    return f'<div class="plots">{figures}</div>'


def render_report(run: RunData, plots: Sequence[Plot], status: Optional[str] = None) -> str:
    """The whole page."""
    name = run.setting("run.name") or run.run_dir.name
    now = clock(datetime.now().timestamp())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(name)} - dgm-scale report</title><style>{STYLE}</style></head>
<body><main>
<h1>{esc(name)}</h1><p class="path">{esc(run.run_dir.resolve())}</p>
{status_section(run, status)}
<div class="top"><div class="card"><h2 style="margin-top:0">Run</h2>{facts_table(describe_model(run))}</div>
<div class="card">{samples_figure(run)}</div></div>
<div class="card"><h2 style="margin-top:0">Evaluation</h2>{metrics_table(run)}{projection_figure(plots)}</div>
{history_table(run.evaluations)}
<h2>Curves</h2>{plots_section([plot for plot in plots if plot.path != PROJECTION_PNG])}
<h2>Config</h2><details><summary>config.yaml (the resolved config; repeat the run with
dgm-scale train {esc(Path(run.run_dir, "config.yaml"))})</summary><pre>{esc(run.config_text)}</pre></details>
<footer>Written by dgm-scale at {now}; rebuild with <code>dgm-scale report {esc(run.run_dir)}</code>.</footer>
</main></body></html>
"""
