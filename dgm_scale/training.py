"""Compose a run: config -> run directory -> module + data + trainer -> fit -> summary."""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional

import lightning as L
import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import OmegaConf

from dgm_scale.config import ConfigError, to_yaml
from dgm_scale.core.chain import CallbackChain, callbacks_of, has_state
from dgm_scale.core.checkpoints import DirectCheckpointIO
from dgm_scale.core.errors import DiskFullError
from dgm_scale.core.files import write_text_atomic
from dgm_scale.data import DataModule, DataPosition, TOY_DATASETS, toy_centers
from dgm_scale.distributed import LaunchEnv, build_strategy, launch_env, share_run_dir
from dgm_scale.distributed.precision import build_precision_plugins
from dgm_scale.distributed.preemption import StopOnSignal
from dgm_scale.metrics.evaluation import eval_settings, prepare_evaluation, scores_samples
from dgm_scale.distributed.sync_batchnorm import GlobalBatchNormSync
from dgm_scale.modules import GenerativeModule, build_module
from dgm_scale.resume import adapt_to_world, check_compatible, checkpoint_run_dir, resume_checkpoint
from dgm_scale.runlock import RunLock
from dgm_scale.tracking import (IterationProgress, MetricsResumePoint, PeriodicCheckpoint, PeriodicEvaluation,
                                RunReport, SampleGrids, ThroughputMonitor, build_loggers)

log = logging.getLogger(__name__)


def quiet_lightning() -> None:
    """Silence Lightning's notices that do not apply to our runs (kept: its real warnings)."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    # The data module offers a validation split; only the VAE has a validation_step.
    warnings.filterwarnings("ignore", message=".*You passed in a `val_dataloader` but have no `validation_step`.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
    # Our sampler resumes mid-epoch through the DataPosition callback, which Lightning cannot see.
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")


@dataclass
class RunResult:
    run_dir: Path
    iterations: int
    seconds: float
    images_per_second: float
    checkpoint: Path
    samples: Path
    module: GenerativeModule  # the trained module of this process
    skipped: Dict[str, int] = field(default_factory=dict)  # unreadable data skipped, by kind, all ranks (none: {})


def make_run_dir(cfg, env: Optional[LaunchEnv] = None) -> Path:
    """The run directory, shared by every process of a launch; rank 0 creates it.

    Rank 0 writes the resolved config there and never reuses a directory that holds a run,
    except to continue that run (`run.resume`, a requeued SLURM job).
    """
    env = env or launch_env()
    continuing = env.requeued or bool(cfg.run.resume)
    if cfg.run.dir:
        run_dir = Path(cfg.run.dir)
    elif checkpoint_run_dir(cfg) is not None:  # run.resume=PATH: continue in that run's directory
        run_dir = checkpoint_run_dir(cfg)
    elif env.global_rank > 0 and env.run_dir:
        run_dir = Path(env.run_dir)
    elif env.run_id:
        run_dir = Path(cfg.run.root) / f"{cfg.run.name}-{env.run_id}"
    elif cfg.run.resume == "auto":
        raise ConfigError("config key 'run.resume': 'auto' needs run.dir (or a launcher run id) to know "
                          "which run directory to continue")
    elif env.global_rank > 0:
        raise ConfigError("config key 'run.dir': set it (or launch with a run id, e.g. torchrun --rdzv-id) "
                          "so that every process writes to the same run directory")
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path(cfg.run.root) / f"{cfg.run.name}-{stamp}"
        suffix = 1
        while run_dir.exists():
            run_dir = Path(cfg.run.root) / f"{cfg.run.name}-{stamp}-{suffix}"
            suffix += 1
    if env.global_rank == 0:
        if continuing and (run_dir / "config.yaml").exists():  # continue in the run's own directory
            share_run_dir(str(run_dir))
            return run_dir
        if (run_dir / "config.yaml").exists():
            raise ConfigError(f"config key 'run.dir': '{run_dir}' already holds a run; choose another directory")
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", to_yaml(cfg))
        share_run_dir(str(run_dir))
    return run_dir


def build_callbacks(cfg, run_dir: Path, images_per_iteration: int, env: LaunchEnv,
                    extractor=None) -> List[L.Callback]:
    """The run's callbacks, in the order their batch-end work must happen; `extractor`: the
    evaluation's feature extractor when already built (prepare_evaluation). Consecutive ones
    without checkpoint state go to Lightning as one (core/chain.py: fewer hook calls per step)."""
    reference = toy_centers(cfg.data.name) if cfg.data.name in TOY_DATASETS else None
    callbacks: List[L.Callback] = [
        DataPosition(cfg.trainer.log_every),  # first: a checkpoint written at a batch's end must count it
        MetricsResumePoint(),  # metrics.csv rows up to each checkpoint reach the disk with it
        # Next, so that its step time is the training step alone (sample grids, evaluations and
        # checkpoints after it count as the next iteration's data wait).
        ThroughputMonitor(cfg.trainer.log_every, images_per_iteration),
        # SIGUSR1 / SIGTERM -> checkpoint -> stop (-> requeue under SLURM), at an iteration boundary
        StopOnSignal(run_dir, env.slurm_job, cfg.run.requeue_on, cfg.run.keep_checkpoints, cfg.trainer.log_every),
        SampleGrids(run_dir / "samples", cfg.run.sample_every, cfg.run.num_samples, reference=reference),
    ]
    if cfg.eval.every > 0 or cfg.eval.at_end:  # before the checkpoint, which saves its best-so-far
        settings = eval_settings(cfg) if scores_samples(cfg) else None  # text: held-out likelihood only
        callbacks.append(PeriodicEvaluation(settings, run_dir, cfg.eval.every,
                                            cfg.trainer.max_steps if cfg.eval.at_end else None, cfg.eval.best_metric,
                                            extractor=extractor))
    callbacks.append(PeriodicCheckpoint(run_dir / "checkpoints", cfg.run.checkpoint_every, cfg.run.keep_checkpoints,
                                        cfg.trainer.max_steps))
    if cfg.tracking.report:  # after the sample grids and PeriodicEvaluation: shows this iteration's grid and scores
        callbacks.append(RunReport(run_dir, cfg.eval.every, cfg.trainer.max_steps))
    if cfg.trainer.progress_bar:
        callbacks.append(IterationProgress(cfg.trainer.max_steps, cfg.trainer.log_every))
    return chained(callbacks)


def chained(callbacks: List[L.Callback]) -> List[L.Callback]:
    """`callbacks` in order, each run of two or more without checkpoint state as one CallbackChain."""
    out: List[L.Callback] = []
    run: List[L.Callback] = []
    for callback in callbacks + [None]:
        if callback is not None and not has_state(callback):
            run.append(callback)
            continue
        out += [CallbackChain(run)] if len(run) > 1 else run
        run = []
        if callback is not None:
            out.append(callback)
    return out


def global_batch_per_iteration(cfg, module: GenerativeModule) -> int:
    """Real images consumed per training iteration by all processes together."""
    world = cfg.trainer.devices * cfg.trainer.num_nodes
    return cfg.data.batch_size * module.batches_per_iteration * world


def build_trainer(cfg, module: GenerativeModule, run_dir: Path, env: Optional[LaunchEnv] = None,
                  extractor=None) -> L.Trainer:
    env = env or launch_env()
    trainer_cfg = cfg.trainer
    precision_plugins = build_precision_plugins(trainer_cfg.precision, trainer_cfg.accelerator, trainer_cfg.strategy)
    sync_plugins = [GlobalBatchNormSync()] if trainer_cfg.sync_batchnorm else []
    # Under SLURM, StopOnSignal handles SIGUSR1 and SIGTERM instead of Lightning (see distributed/preemption.py).
    slurm_plugins = [SLURMEnvironment(auto_requeue=False)] if env.slurm_job and SLURMEnvironment.detect() else []
    return L.Trainer(
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        num_nodes=trainer_cfg.num_nodes,
        strategy=build_strategy(trainer_cfg, cfg.run.seed, micro_batch=cfg.data.batch_size),
        # 16-mixed outside DeepSpeed: our plugin (one loss scaler per network), given instead of a name.
        precision=None if precision_plugins else trainer_cfg.precision,
        plugins=precision_plugins + sync_plugins + slurm_plugins + [DirectCheckpointIO()],
        # Lightning counts optimizer.step() calls; our steps are iterations (n_critic D + 1 G).
        max_steps=trainer_cfg.max_steps * module.optimizer_steps_per_iteration,
        max_epochs=-1,
        logger=build_loggers(cfg, run_dir),
        callbacks=build_callbacks(cfg, run_dir, global_batch_per_iteration(cfg, module), env, extractor),
        use_distributed_sampler=False,  # the data module deals the data to the ranks (resumable)
        log_every_n_steps=1,  # the modules log only every trainer.log_every iterations themselves
        enable_checkpointing=False,  # PeriodicCheckpoint writes atomically instead
        enable_progress_bar=False,  # IterationProgress shows iterations, not per-epoch batches
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(run_dir),
    )


def train(cfg) -> RunResult:
    """Train the model the config describes; return where the outputs are and how fast it ran."""
    L.seed_everything(cfg.run.seed, workers=True, verbose=False)
    module = build_module(cfg)
    per_iteration_batch = cfg.data.batch_size * module.batches_per_iteration
    datamodule = DataModule(cfg.data, batch_size=per_iteration_batch, seed=cfg.run.seed)
    datamodule.setup("fit")  # bad paths and empty data fail here, before a run directory exists
    key, wanted_classes = module.label_classes()
    if wanted_classes > 0 and wanted_classes != datamodule.num_classes:
        raise ConfigError(f"config key '{key}': {wanted_classes} does not match the "
                          f"{datamodule.num_classes} classes of dataset '{cfg.data.name}'")
    env = launch_env()
    # Rank 0 builds the extractor now (a bad eval setup fails before the run directory exists);
    # the other ranks' evaluators build theirs at train start, from rank 0's files.
    extractor = prepare_evaluation(cfg, module) if env.global_rank == 0 else None
    run_dir = make_run_dir(cfg, env)
    lock = RunLock(run_dir, env.slurm_job) if env.global_rank == 0 else None
    if lock is not None:  # one training per run directory (a second one stops here)
        lock.acquire()
    try:
        return _fit(cfg, module, datamodule, run_dir, env, extractor)
    finally:
        if lock is not None:
            lock.release()


def _use_batch_size(cfg, module: GenerativeModule, datamodule: DataModule) -> None:
    """Hand a data.batch_size that adapt_to_world changed to the module (and its saved config)
    and the data module, built before the resume was known."""
    module.cfg.data.batch_size = module.hparams["config"]["data"]["batch_size"] = cfg.data.batch_size
    datamodule.batch_size = cfg.data.batch_size * module.batches_per_iteration


def _fit(cfg, module: GenerativeModule, datamodule: DataModule, run_dir: Path, env: LaunchEnv, extractor) -> RunResult:
    resume_from = resume_checkpoint(cfg, run_dir, env.requeued)
    if resume_from is not None:
        check_compatible(resume_from, cfg)
        change = adapt_to_world(resume_from, cfg)  # before the trainer: the strategy takes the batch
        _use_batch_size(cfg, module, datamodule)
    trainer = build_trainer(cfg, module, run_dir, env, extractor)
    log.info("training %s (%s) on %s for %d iterations -> %s", cfg.run.name,
             module.family.headline(lambda key, default=None: OmegaConf.select(cfg, key, default=default)),
             cfg.data.name, cfg.trainer.max_steps, run_dir)
    if resume_from is not None:
        log.info("resuming from %s (%s)", resume_from, change)
    start = time.perf_counter()
    try:
        # weights_only: our checkpoints hold tensors and plain data only (DeepSpeed partitions as bytes)
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None,
                    weights_only=True)
    except DiskFullError as error:  # the checkpoints before it are whole: say how to go on
        raise DiskFullError(f"{error} with resume=auto to continue from checkpoints/last.ckpt") from error
    finally:
        # Without this, torchrun processes sometimes abort at exit after finishing (SIGABRT).
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    seconds = time.perf_counter() - start
    if trainer.is_global_zero:  # stopped for a SLURM signal: requeue now that the loggers are closed
        for callback in callbacks_of(trainer, StopOnSignal):
            callback.requeue()
    # Throughput of this process's share of the run (a resumed run starts past iteration 0).
    images = (module.iteration - module.start_iteration) * datamodule.batch_size * trainer.world_size
    position = next(callbacks_of(trainer, DataPosition))
    return RunResult(run_dir=run_dir, iterations=module.iteration, seconds=seconds,
                     images_per_second=images / max(seconds, 1e-9),
                     checkpoint=run_dir / "checkpoints" / "last.ckpt",
                     samples=run_dir / "samples" / ("final.txt" if module.modality == "text" else "final.png"),
                     module=module, skipped=position.final_skipped)
