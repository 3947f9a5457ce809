"""Sweeps: a grid (or list) of override sets, one run directory per point, as a SLURM job array.

A sweep file (YAML):

    name: lr-loss                  # the sweep's folder: <root>/<name>/ (root: runs, or --root)
    config: configs/nsgan.yaml     # optional base config
    overrides: [trainer.max_steps=2000]            # optional, every point
    grid:                          # the cartesian product of these values ...
      optim.g.lr: [1.0e-4, 2.0e-4]
      loss.name: [nonsaturating, hinge]
    points:                        # ... and / or these override sets, one point each
      - {loss.name: wasserstein, loss.gp_weight: 10, model.discriminator.norm: layer}

Point i trains into `<root>/<name>/<i:03d>-<key=value,...>` with `resume=auto`, so a preempted
or requeued array task continues where it stopped (each task has its own SLURM job id
ARRAYJOB_TASK, which the run-directory lock and the requeue use). `dgm-scale sweep FILE` checks
every point's config and lists them; `--point I` trains point I (what each array task runs);
`--submit` submits `launch/slurm/sweep.sbatch` as an array of all points. `dgm-scale compare
<root>/<name>` tabulates the points afterwards.
"""
from __future__ import annotations

import itertools
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from dgm_scale.config.loader import load_config, yaml_value
from dgm_scale.core.errors import ConfigError, first_line

SWEEP_KEYS = {"name", "config", "overrides", "grid", "points"}
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Sweep:
    name: str
    config: Optional[str]
    overrides: List[str]
    points: List[dict]  # one {dotted key: value} per point
    source: Path

    def point_overrides(self, index: int) -> List[str]:
        return self.overrides + [f"{key}={yaml_value(value)}" for key, value in self.points[index].items()]

    def run_dir(self, index: int, root: str | Path = "runs") -> Path:
        slug = ",".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in self.points[index].items())
        slug = re.sub(r"[^A-Za-z0-9=,._-]+", "_", slug)[:80] or "base"
        return Path(root) / self.name / f"{index:03d}-{slug}"


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def read_sweep(path: str | Path) -> Sweep:
    """Parse a sweep file; ConfigError naming the file and the key for anything malformed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file '{path}' does not exist")
    try:
        data = _plain(OmegaConf.load(path))
    except Exception as error:  # YAML syntax
        raise ConfigError(f"sweep file '{path}': {first_line(error)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"sweep file '{path}' does not hold a mapping")
    unknown = sorted(set(data) - SWEEP_KEYS)
    if unknown:
        raise ConfigError(f"sweep file '{path}': unknown key(s) {unknown}; known: {sorted(SWEEP_KEYS)}")
    grid, listed = data.get("grid") or {}, data.get("points") or []
    if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
        raise ConfigError(f"sweep file '{path}': 'grid' maps config keys to non-empty lists of values")
    if not isinstance(listed, list) or any(not isinstance(p, dict) for p in listed):
        raise ConfigError(f"sweep file '{path}': 'points' is a list of {{key: value}} mappings")
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else []
    points += [dict(p) for p in listed]
    if not points:
        raise ConfigError(f"sweep file '{path}': no points (give 'grid' and/or 'points')")
    name = str(data.get("name") or path.stem)
    return Sweep(name, data.get("config"), [str(o) for o in data.get("overrides") or []], points, path)


def check_points(sweep: Sweep, extra: Sequence[str] = ()) -> None:
    """Load every point's config (before anything is submitted): the first bad one is named."""
    for index in range(len(sweep.points)):
        try:
            load_config(sweep.config, [*sweep.point_overrides(index), *extra])
        except ConfigError as error:
            raise ConfigError(f"sweep '{sweep.source}' point {index} {sweep.points[index]}: {error}") from None


def point_args(sweep: Sweep, index: int, root: str | Path, extra: Sequence[str] = ()) -> List[str]:
    """`dgm-scale train` arguments of point `index`."""
    if not 0 <= index < len(sweep.points):
        raise ConfigError(f"--point {index}: the sweep has points 0..{len(sweep.points) - 1}")
    return [*([sweep.config] if sweep.config else []), *sweep.point_overrides(index), *extra,
            f"run.dir={sweep.run_dir(index, root)}", "resume=auto"]


def submit(sweep: Sweep, root: str | Path, sbatch_args: Sequence[str], extra: Sequence[str] = ()) -> str:
    """sbatch the array job (one task per point); returns its job id."""
    command = ["sbatch", "--parsable", f"--array=0-{len(sweep.points) - 1}", *sbatch_args,
               str(ROOT / "launch" / "slurm" / "sweep.sbatch"), str(sweep.source.resolve()), f"--root={root}", *extra]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise ConfigError(f"sbatch failed: {result.stderr.strip().splitlines()[-1] if result.stderr else result.returncode}")
    return result.stdout.strip().split(";")[0]
