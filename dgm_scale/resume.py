"""Which checkpoint a run continues from (`run.resume`, SLURM requeue), and whether it fits.

A checkpoint holds the full trainer state: weights, optimizers (ZeRO partitions under
DeepSpeed), the EMA generator, loop counters and the data position (see data/position.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import torch

from dgm_scale.core.errors import first_line
from dgm_scale.config import ConfigError, to_dict
from dgm_scale.distributed.preemption import requeue_checkpoint

# Keys a checkpoint must share with the config that continues it: they decide the shapes of
# the weights and of the optimizer state (and every optimizer's `name`: `optim.name` of a
# single-optimizer family, `optim.g.name` / `optim.d.name` of a GAN). Everything else (learning
# rates, max_steps, devices, logging, batch size) may change between a run and its continuation.
MUST_MATCH = ("model", "loss", "data.name", "data.resolution", "data.channels", "data.seq_len")


def must_match(key: str) -> bool:
    return any(key == name or key.startswith(name + ".") for name in MUST_MATCH) or \
        (key.startswith("optim.") and key.endswith(".name"))


def newest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The most recently written full checkpoint of a run: `checkpoints/last.ckpt` or a requeue one."""
    candidates = [path for path in (run_dir / "checkpoints" / "last.ckpt", requeue_checkpoint(run_dir))
                  if path is not None and path.is_file()]
    return max(candidates, key=lambda path: path.stat().st_mtime) if candidates else None


def checkpoint_run_dir(cfg) -> Optional[Path]:
    """For `run.resume=PATH` without `run.dir`: the run directory that holds that checkpoint."""
    resume = cfg.run.resume
    if not resume or resume == "auto" or cfg.run.dir:
        return None
    path = Path(resume)
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def resume_checkpoint(cfg, run_dir: Path, requeued: bool) -> Optional[Path]:
    """The checkpoint to continue from, or None for a fresh start."""
    if requeued:
        return newest_checkpoint(run_dir)
    resume = cfg.run.resume
    if not resume:
        return None
    if resume == "auto":
        return newest_checkpoint(run_dir)
    path = Path(resume)
    if not path.is_file():
        raise ConfigError(f"config key 'run.resume': checkpoint '{path}' does not exist")
    return path


def _flatten(tree: Dict[str, Any], prefix: str = "") -> Iterator[Tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _world(trainer: Dict[str, Any]) -> int:
    return int(trainer.get("devices", 1)) * int(trainer.get("num_nodes", 1))


def adapt_to_world(checkpoint_path: Path, cfg) -> str:
    """The resume's line on world size and global batch; with `trainer.keep_global_batch`, sets
    data.batch_size so that the checkpoint's global batch is kept (a ConfigError if it does not
    divide). A ZeRO or plain checkpoint of any world size resumes (the data position and ZeRO
    partitions reshard: data/position.py, distributed/zero_reshard.py)."""
    stored = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)["hyper_parameters"]["config"]
    old_world, world = _world(stored["trainer"]), _world(to_dict(cfg)["trainer"])
    old_batch = int(stored["data"]["batch_size"])
    old_global = old_batch * old_world
    if cfg.trainer.keep_global_batch and world != old_world:
        if old_global % world:
            raise ConfigError(f"config key 'trainer.keep_global_batch': the checkpoint's global batch {old_global} "
                              f"({old_batch} x {old_world} processes) does not divide over {world} processes; "
                              "set data.batch_size yourself with keep_global_batch=false")
        cfg.data.batch_size = old_global // world
    new_global = cfg.data.batch_size * world
    batch = "kept" if new_global == old_global else f"{old_global} -> {new_global}"
    per_device = f" ({cfg.data.batch_size} per process)" if world != old_world else ""
    return f"world size {old_world} -> {world}, global batch {batch}{per_device}"


def check_compatible(checkpoint_path: Path, cfg) -> None:
    """Raise a ConfigError naming the first MUST_MATCH key the checkpoint's config differs in."""
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)
        stored = dict(_flatten(checkpoint["hyper_parameters"]["config"]))
    except Exception as exc:
        raise ConfigError(f"config key 'run.resume': '{checkpoint_path}' is not a dgm_scale checkpoint: "
                          f"{first_line(exc)}") from None
    current = dict(_flatten(to_dict(cfg)))
    # DeepSpeed keeps its optimizer state as ZeRO partitions, the other strategies as plain state.
    was_deepspeed, is_deepspeed = stored.get("trainer.strategy") == "deepspeed", cfg.trainer.strategy == "deepspeed"
    if was_deepspeed != is_deepspeed:
        raise ConfigError(f"config key 'trainer.strategy': the checkpoint '{checkpoint_path}' was written under "
                          f"{stored.get('trainer.strategy')!r}, which cannot resume under {cfg.trainer.strategy!r}")
    for key in sorted(current):
        if must_match(key):
            if key in stored and stored[key] != current[key]:
                raise ConfigError(f"config key '{key}': the checkpoint '{checkpoint_path}' was trained with "
                                  f"{stored[key]!r}, this config has {current[key]!r}")
