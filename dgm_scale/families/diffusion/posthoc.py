"""Post-hoc EMA of a diffusion run: the power-function EMA snapshots a run writes (RUN/phema/),
and the checkpoint of an EMA of any width built from them (`dgm-scale ema`, see phema_cli.py;
the math: modules/phema.py).

A snapshot `phema/phema_<iteration>.pt` holds, for that iteration, every tracked profile's
averaged denoiser parameters by name. A reconstruction at iteration T combines all snapshots up
to T (both widths, every time) with the least-squares weights, and writes a checkpoint like the
run's own - its stored config, the state dict with the reconstruction in place of the EMA
denoiser (the raw denoiser, buffers and all else from the run's checkpoint) - so `sample`,
`evaluate`, `export`, `serve`, `encode` read it as any other.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from dgm_scale.core.errors import ConfigError, first_line
from dgm_scale.core.files import torch_save_atomic
from dgm_scale.modules.phema import MAX_SIGMA_REL, PowerFunctionEMA, exponent_of, profile_error, solve_weights

log = logging.getLogger(__name__)

SNAPSHOT_DIR = "phema"
SNAPSHOT_NAME = re.compile(r"phema_(\d{7,})\.pt")
#: the FID-against-width table the benchmark writes and the report draws (benchmarks/phema_fid.py)
FID_TABLE = "phema/fid.json"


def snapshot_path(run_dir: Path, iteration: int) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR / f"phema_{iteration:07d}.pt"


def write_snapshot(run_dir: Path, tracker: PowerFunctionEMA, names: Sequence[str], iteration: int,
                   profiles: Optional[List[Dict[str, torch.Tensor]]] = None) -> Path:
    """The tracker's profiles at `iteration` (`profiles`: read from it already) to
    RUN/phema/phema_<iteration>.pt, atomically."""
    profiles = tracker.profiles(names) if profiles is None else profiles
    snapshot = {"iteration": iteration, "sigma_rels": list(tracker.sigma_rels), "profiles": profiles}
    return torch_save_atomic(snapshot, snapshot_path(run_dir, iteration))


def snapshot_iterations(run_dir: Path) -> List[int]:
    folder = Path(run_dir) / SNAPSHOT_DIR
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for path in folder.iterdir() if (m := SNAPSHOT_NAME.fullmatch(path.name)))


def _load(path: Path, what: str, keys: Sequence[str]) -> dict:
    """torch.load (weights only) of `path`, a dict with `keys`; else a one-line error naming it."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        missing = [key for key in keys if key not in loaded]
        if missing:
            raise KeyError(f"no {missing[0]}")
    except Exception as error:  # noqa: BLE001 - torch.load raises many types for a bad file
        raise ConfigError(f"{what} '{path}' does not load: {first_line(error)}") from None
    return loaded


def _read_snapshot(path: Path) -> dict:
    return _load(path, "post-hoc EMA snapshot", ("sigma_rels", "profiles"))


@dataclass
class Reconstruction:
    """An EMA built post hoc: its parameters by name, and how (for the checkpoint's record)."""
    parameters: Dict[str, torch.Tensor]
    sigma_rel: float
    iteration: int
    inputs: List[Tuple[int, float]]  # (iteration, sigma_rel) of each snapshot profile used
    weights: List[float]
    profile_error: float  # relative L2 distance of the combined profile from the wanted one


def check_sigma_rel(sigma_rel: float, key: str = "--sigma-rel") -> None:
    if not 0 < sigma_rel <= MAX_SIGMA_REL:
        raise ConfigError(f"{key} {sigma_rel}: the width must be in (0, {MAX_SIGMA_REL:.4f}] "
                          "(1/sqrt(12): the average of the whole run)")


def chosen_iteration(run_dir: Path, at: Optional[int]) -> int:
    """The snapshot iteration to reconstruct at: `at` (one with a snapshot), default the newest."""
    found = snapshot_iterations(run_dir)
    if not found:
        raise ConfigError(f"run directory '{run_dir}' has no post-hoc EMA snapshots ({SNAPSHOT_DIR}/phema_*.pt): "
                          "train with model.phema.snapshot_every > 0")
    if at is None:
        return found[-1]
    if at not in found:
        shown = ", ".join(map(str, found[:8])) + (", ..." if len(found) > 8 else "")
        raise ConfigError(f"--at {at}: no snapshot at that iteration in '{run_dir / SNAPSHOT_DIR}' (it has {shown})")
    return at


def reconstruct(run_dir: Path, sigma_rel: float, at: Optional[int] = None) -> Reconstruction:
    """The power-function EMA of width `sigma_rel` at snapshot iteration `at` (default the
    newest), from every snapshot profile up to it; accumulated in float64."""
    check_sigma_rel(sigma_rel)
    run_dir = Path(run_dir)
    iteration = chosen_iteration(run_dir, at)
    snapshots = [(t, _read_snapshot(snapshot_path(run_dir, t))) for t in snapshot_iterations(run_dir) if t <= iteration]
    inputs = [(t, float(s)) for t, snapshot in snapshots for s in snapshot["sigma_rels"]]
    times, exponents = [t for t, _ in inputs], [exponent_of(s) for _, s in inputs]
    weights = solve_weights(times, exponents, iteration, exponent_of(sigma_rel))
    error = profile_error(times, exponents, weights, iteration, exponent_of(sigma_rel))
    total: Dict[str, torch.Tensor] = {}
    profiles = (profile for _, snapshot in snapshots for profile in snapshot["profiles"])
    for weight, profile in zip(weights.tolist(), profiles):
        if total and profile.keys() != total.keys():
            raise ConfigError(f"post-hoc EMA snapshots in '{run_dir / SNAPSHOT_DIR}' hold different networks")
        for name, value in profile.items():
            total[name] = total.get(name, 0.0) + weight * value.double()
    return Reconstruction(total, sigma_rel, iteration, inputs, weights.tolist(), error)


def base_checkpoint(run_dir: Path, iteration: int) -> Path:
    """The run's checkpoint the rest of the state comes from: iter_<iteration>.ckpt if kept, else last.ckpt."""
    folder = Path(run_dir) / "checkpoints"
    for path in (folder / f"iter_{iteration:07d}.ckpt", folder / "last.ckpt"):
        if path.is_file():
            return path
    raise ConfigError(f"run directory '{run_dir}' has no checkpoints/last.ckpt to take the model's config from")


def sampling_prefix(state_dict: dict) -> str:
    """Where the sampling denoiser's weights sit: the EMA denoiser's, or the only denoiser's."""
    return "denoiser_ema." if any(key.startswith("denoiser_ema.") for key in state_dict) else "denoiser."


def check_out(out: Path, run_dir: Path) -> None:
    """A one-line error naming `out` when it cannot be the new checkpoint."""
    if out.is_dir():
        raise ConfigError(f"--out '{out}' is a directory; name the checkpoint file to write")
    if out.resolve().parent == (Path(run_dir) / "checkpoints").resolve():
        raise ConfigError(f"--out '{out}': the run's checkpoints/ folder holds its training checkpoints "
                          "(resume reads them); write elsewhere")
    parent = next((p for p in out.resolve().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"--out '{out}': '{parent}' is a file, not a folder")


def write_posthoc_checkpoint(run_dir: Path, sigma_rel: float, out: Path, at: Optional[int] = None) -> Tuple[Path, dict]:
    """Reconstruct (see `reconstruct`) and write the checkpoint `out` atomically; returns (out,
    the record stored in it under "posthoc_ema")."""
    run_dir, out = Path(run_dir), Path(out)
    check_sigma_rel(sigma_rel)
    check_out(out, run_dir)
    result = reconstruct(run_dir, sigma_rel, at)
    base = base_checkpoint(run_dir, result.iteration)
    checkpoint = _load(base, "checkpoint", ("hyper_parameters", "state_dict"))
    state = dict(checkpoint["state_dict"])
    prefix = sampling_prefix(state)
    missing = sorted(f"{prefix}{name}" for name in result.parameters if f"{prefix}{name}" not in state)
    if missing:
        raise ConfigError(f"checkpoint '{base}' lacks {missing[0]} of the post-hoc EMA snapshots: another model?")
    for name, value in result.parameters.items():
        state[prefix + name] = value.to(state[prefix + name].dtype)
    record = {"sigma_rel": sigma_rel, "iteration": result.iteration, "network": prefix.rstrip("."),
              "rest_from": str(base), "inputs": [list(pair) for pair in result.inputs], "weights": result.weights,
              "profile_error": result.profile_error}
    # Enough for every reader (modules.load_module); not resumable (no optimizer state). One
    # optimizer step per diffusion iteration: global_step is the iteration.
    written = {"hyper_parameters": checkpoint["hyper_parameters"], "state_dict": state,
               "global_step": result.iteration, "posthoc_ema": record}
    try:
        torch_save_atomic(written, out)
    except OSError as error:
        raise ConfigError(f"--out '{out}': cannot write it: {error.strerror or error}") from None
    return out, record


def fid_chart(run_dir: Path) -> List[Tuple[str, str, str, List[Tuple[str, np.ndarray, np.ndarray]]]]:
    """The report's chart of FID against the post-hoc EMA's width, when RUN/phema/fid.json (the
    table benchmarks/phema_fid.py writes) exists: (stem, title, x label, [(name, x, y)])."""
    path = Path(run_dir) / FID_TABLE
    if not path.is_file():
        return []
    try:
        table = json.loads(path.read_text())
        rows = sorted(table["rows"], key=lambda row: row["sigma_rel"])
        x = np.array([row["sigma_rel"] for row in rows], dtype=float)
        series = [("post-hoc EMA", x, np.array([row["fid"] for row in rows], dtype=float))]
    except (ValueError, KeyError, TypeError) as error:  # the report still shows everything else
        log.warning("not drawing %s: %s: %s", path, type(error).__name__, error)
        return []
    if table.get("fixed_ema") is not None:
        fixed = np.full(len(x), float(table["fixed_ema"]))  # one value: a flat line across the widths
        series.append((f"fixed EMA ({table.get('fixed_label', 'the run')})", x, fixed))
    title = f"FID against post-hoc EMA width (iteration {table['iteration']}, {table.get('num_samples', '?')} " \
            "samples; lower is better)"
    return [("phema_fid", title, "sigma_rel", series)]
