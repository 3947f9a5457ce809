"""Typed configuration schema: one small dataclass per shared section, plus the family's own.

A config is `data`, `trainer`, `run`, `eval`, `tracking` (here) and `model`, `loss`, `optim`
(the model family's dataclasses: dgm_scale/families/*): `config_class(family)` puts them together.
The defaults ARE the default job (`dgm-scale train` with no arguments): the GAN family's DCGAN
with the non-saturating loss on scikit-learn's offline 8x8 digits, upsampled to 16x16. Variant
YAML files in `configs/` only state what differs from these defaults.
"""
from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional

if TYPE_CHECKING:
    from dgm_scale.families.registry import Family


@dataclass
class DataConfig:
    name: str = "digits"  # digits | ring8 | grid25 | folder | shards | text
    # folder: the image folder root. shards: a shard spec - a directory (with manifest.json), a
    # brace pattern `x-{000000..000127}.tar`, `pipe:CMD` (s3/gcs/http via your CLI); '::' joins parts.
    # text: a text file, a folder of .txt files, a shard spec of tars holding .txt members, or
    # builtin:pydoc (Python's own documentation topics, shipped with the standard library).
    path: Optional[str] = None
    # shards only: more datasets mixed with data.path, by data.weights (one weight per dataset)
    mix: List[str] = field(default_factory=list)
    weights: List[float] = field(default_factory=list)  # shards: one per dataset (data.path, *data.mix); empty = equal
    shuffle_buffer: int = 1000  # shards: samples held per worker for shuffling
    resampled: bool = False  # shards: draw shards with replacement; epochs of data.steps_per_epoch batches
    steps_per_epoch: int = 0  # shards, resampled: batches per rank per epoch
    strict: bool = False  # folders, shards: an unreadable file / shard / missing key stops training (else skipped, counted)
    val_path: Optional[str] = None  # shards: held-out shard spec (the VAE's validation ELBO); none = no validation
    resolution: int = 16  # square side in pixels (images); power of two in [8, 256]
    channels: int = 1  # 1 = greyscale, 3 = RGB (folder images are converted)
    hflip: bool = False  # random horizontal flip (off for digits: flipped digits are not digits)
    batch_size: int = 64  # real images per discriminator step, per device
    num_workers: int = 0  # DataLoader worker processes per rank (0 = load in the training process)
    # page-locked host batches when training on CUDA (their copies to the GPU then run asynchronously)
    pin_memory: bool = True
    # copy the next batch to the device while the current step runs (on CUDA on a side stream)
    prefetch_to_device: bool = False
    val_fraction: float = 0.1  # held-out share of built-in datasets (used by the VAE's val ELBO)
    toy_samples: int = 50_000  # points drawn for the 2-D toy mixtures
    toy_std: float = 0.02  # standard deviation of each toy mixture component
    # fraction of the training split kept (a fixed, seed-independent subset): limited-data runs;
    # the held-out split and the evaluation's real data stay whole
    subset: float = 1.0
    seq_len: int = 256  # text: characters (bytes) per training sequence
    # semi-supervised training: K labelled samples per class of the training split keep their
    # label, every other one is labelled -1 (hidden); a choice keyed to run.seed (data/labels.py).
    # unset = every label (0 is an error: say how many)
    labels_per_class: Optional[int] = None


@dataclass
class NetConfig:
    """One network of a family (generator, discriminator, encoder, decoder): a built-in arch,
    or your own class by import path (`target`), built with `kwargs` (see dgm_scale/nets)."""
    arch: str = "dcgan"  # mlp | dcgan | resnet
    width: int = 64  # base channel count (conv) or hidden units (mlp)
    depth: int = 3  # hidden layers (mlp only)
    norm: str = "batch"  # none | batch | layer | instance
    spectral_norm: bool = False  # spectral normalisation of every linear / conv weight (SNGAN)
    # your own nn.Module instead of `arch`: package.module:Class or path/to/file.py:Class
    target: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)  # keyword arguments for `target`


@dataclass
class OptimizerConfig:
    """One optimizer: `optim.g` / `optim.d` of a GAN, `optim` of a single-optimizer family."""
    name: str = "adam"  # adam | rmsprop
    lr: float = 2e-4  # learning rate
    betas: List[float] = field(default_factory=lambda: [0.5, 0.999])  # Adam's (beta1, beta2); unused by rmsprop
    weight_decay: float = 0.0  # L2 penalty added to the gradients (torch's weight_decay)
    eps: float = 1e-8  # added to the denominator for numerical stability
    # the update's implementation: auto (torch's choice: foreach on CUDA) | for_loop | foreach |
    # fused (Adam only: one kernel for all parameters, on CPU and CUDA)
    impl: str = "auto"


@dataclass
class DDPConfig:
    """Our data parallel (trainer.strategy=ddp, or auto with several processes)."""
    # all-reduce gradients in buckets launched during backward, as each bucket's gradients are
    # ready (overlapping communication with the rest of backward); false: one flat all-reduce of
    # all of an optimizer's gradients at its step
    overlap: bool = True
    bucket_mb: float = 25.0  # bucket size in MB (DDP's default); smaller starts sooner, more calls


@dataclass
class FSDPConfig:
    """trainer.strategy=fsdp: PyTorch FSDP2 settings (dgm_scale/distributed/fsdp.py)."""
    # free each block's gathered weights after its forward (gathered again for the backward):
    # less memory, one more all-gather per block and step
    reshard_after_forward: bool = True
    # float32 | bfloat16: the dtype weights are gathered and computed in (gradients are reduced
    # and the optimizer steps in float32 either way)
    param_dtype: str = "float32"
    cpu_offload: bool = False  # shards, gradients and optimizer state live in CPU memory (GPU runs)
    # where FSDP's tensors live in CPU memory (a CPU run, or cpu_offload): every allocation of
    # 1 MiB or more is mapped on its own and returned to the OS when freed; glibc's default heap
    # keeps the block-sized buffers FSDP frees and gathers again each step (benchmarks/README.md)
    return_freed_memory: bool = True
    # checkpoints: the shards are copied to CPU memory, then written while training goes on; the
    # checkpoint file naming them is written once all are complete (at the next save or the end)
    async_save: bool = False


@dataclass
class TrainerConfig:
    max_steps: int = 3000  # training iterations: one iteration = n_critic D steps + one G step
    accelerator: str = "auto"  # auto | cpu | gpu
    devices: int = 1  # processes (GPUs) per node
    num_nodes: int = 1  # machines; the world size is devices x num_nodes
    strategy: str = "auto"  # auto | ddp | deepspeed | fsdp
    # DeepSpeed config block (trainer.strategy=deepspeed), merged over our defaults; e.g.
    # {zero_optimization: {stage: 2, offload_optimizer: {device: cpu}}}
    deepspeed: Dict[str, Any] = field(default_factory=lambda: {"zero_optimization": {"stage": 2}})
    ddp: DDPConfig = field(default_factory=DDPConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    precision: str = "32-true"  # 32-true | bf16-mixed | 16-mixed
    # Batch norm statistics over all ranks' batches (our GlobalBatchNorm: CPU and GPU) instead of
    # each rank's own; only matters with more than one process and norm=batch.
    sync_batchnorm: bool = False
    log_every: int = 10  # iterations between logged metrics
    # A NaN/Inf loss or gradient: "stop" (an error naming the iteration and network) or "skip"
    # (the step is not applied, counted in train/nonfinite_skips; at most max_nonfinite_skips steps are
    # skipped, the next non-finite one stops).
    nonfinite: str = "stop"
    max_nonfinite_skips: int = 100  # nonfinite=skip: skipped steps allowed before a non-finite one stops the run
    progress_bar: bool = True  # a progress bar of iterations on the terminal (rank 0)
    # torch.compile the networks' training forwards (the gradient penalty and R1, whose double
    # backward torch.compile does not support, stay eager); checkpoints hold the plain modules
    compile: bool = False
    # convolutional networks and image batches in channels_last (NHWC) memory layout, which
    # tensor-core convolutions prefer under bf16/fp16
    channels_last: bool = False
    # On a resume with another number of processes: true = keep the checkpoint's global batch (the
    # per-device batch becomes global / processes, so the optimisation is unchanged); false = keep
    # data.batch_size per device (the global batch changes with the world size). A log line says which.
    keep_global_batch: bool = False


@dataclass
class RunConfig:
    name: str = ""  # run name; empty = derived from the config file name
    root: str = "runs"  # parent folder of run directories
    dir: Optional[str] = None  # explicit run directory (overrides root/name)
    seed: int = 0  # seeds initialisation, data order and the sample grids' fixed latents
    sample_every: int = 250  # iterations between sample grids
    checkpoint_every: int = 500  # iterations between kept checkpoints (last.ckpt is always kept)
    keep_checkpoints: int = 5  # newest iter_XXXXXXX.ckpt files kept (0 = all); last/best are always kept
    num_samples: int = 64  # images in each sample grid (fixed latent batch)
    # "" = a fresh run; "auto" = continue from the run directory's newest checkpoint if it has one
    # (needs run.dir or a launcher run id); a path = continue from that checkpoint. `resume=` works too.
    resume: str = ""
    # Python modules or files imported before the config is read, in every process (e.g. your
    # own model family registering itself); `dgm-scale train --import X` appends here.
    imports: List[str] = field(default_factory=list)
    # SIGUSR1 and SIGTERM checkpoint and stop a run at the next iteration; under SLURM, these
    # signals also requeue the job (USR1: `#SBATCH --signal=USR1@120`; add TERM to requeue after
    # scancel, preemption or the time limit's SIGTERM too)
    requeue_on: List[str] = field(default_factory=lambda: ["USR1"])


@dataclass
class WandbConfig:
    """Weights & Biases logging (beside the CSV metrics every run writes)."""

    # auto | online | offline | disabled. auto = online when an API key is configured
    # (WANDB_API_KEY or `wandb login`), else offline; the default job never needs an account. A
    # resumed run continues the same W&B run.
    mode: str = "auto"
    project: str = "dgm_scale"  # the W&B project runs are logged to
    entity: Optional[str] = None  # W&B user or team owning the project; none = your default entity
    tags: List[str] = field(default_factory=list)  # tags of the W&B run
    log_checkpoints: bool = False  # upload checkpoints as W&B artifacts
    # Seconds wandb.init may wait for the server (online); then the run logs offline instead
    # (one warning; `wandb sync` uploads it later), so an unreachable server never holds up training.
    init_timeout: float = 60.0


@dataclass
class TrackingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    report: bool = True  # RUN/report.html + RUN/plots/*.png (curves), refreshed at evaluations and the end


@dataclass
class EvalConfig:
    """Sample quality during training (FID, KID, precision/recall, IS, NDB) of every sampler the
    family offers (a GAN with an EMA: eval/* the EMA generator, eval_raw/* the raw one), and
    the held-out likelihood of families that have one; computed across all ranks."""

    every: int = 1000  # iterations between evaluations; 0 = none during training
    at_end: bool = True  # also evaluate the final model
    metrics: List[str] = field(default_factory=list)  # empty = fid, kid, pr, ndb (+ is with logits)
    num_samples: int = 2000  # generated samples per evaluation (all ranks together)
    num_real: int = 0  # real samples (a seeded subset); 0 = as many as num_samples, at most all
    real: str = "auto"  # real data: auto = the training data, or a source (folder, shards, .npz, builtin:NAME)
    # auto = identity for 2-D toys, digits (a small classifier trained once, offline) for digits,
    # inception otherwise; inception:PATH_OR_URL, classifier:PATH (`dgm-scale train-classifier`)
    extractor: str = "auto"
    inception_weights: Optional[str] = None  # path or URL of pt_inception-2015-12-05; none = the reference URL
    cache_dir: str = "~/.cache/dgm_scale"  # real-feature statistics, weights and trained classifiers
    batch_size: int = 250  # per rank, for generation and feature extraction
    seed: int = 0  # the evaluation latents and the real subset (same every evaluation)
    # checkpoints/best.ckpt keeps the lowest value of this metric; auto = fid where samples are
    # scored, else the held-out bits per dim / char; "" = off
    best_metric: str = "auto"
    options: Dict[str, Any] = field(default_factory=dict)  # metric options, e.g. {kid_subset_size: 500}


SHARED_SECTIONS = {"data": DataConfig, "trainer": TrainerConfig, "run": RunConfig, "eval": EvalConfig,
                   "tracking": TrackingConfig}


def config_class(family: "Family") -> type:
    """The dataclass of a whole config for `family`: its model / loss / optim sections and the
    shared ones."""
    sections = {"data": DataConfig, "model": family.model, "loss": family.loss, "optim": family.optim,
                **family.sections, **{name: cls for name, cls in SHARED_SECTIONS.items() if name != "data"}}
    return make_dataclass(f"{family.name.title()}Config",
                          [(name, cls, field(default_factory=cls)) for name, cls in sections.items()])
