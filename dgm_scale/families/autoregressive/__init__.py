"""The autoregressive family: a recurrent network (LSTM or GRU) that models data as a sequence
of bytes with teacher forcing, with an exact likelihood.

Images are raster-scan sequences of 8-bit sub-pixels (row by row, left to right, a pixel's
channels in order), each a 256-way categorical: a discrete distribution, so its held-out
negative log-likelihood is exact, in bits per dimension comparable to any other 8-bit model
(a VAE's discretised ELBO, PixelCNN's numbers). A discretised logistic mixture would be
smaller and smoother; the categorical needs no assumption about neighbouring levels and is
what a byte-level text model uses too, so one network serves both. Text (`data.name=text`) is a
sequence of bytes (bits per character). Sampling draws each symbol from the softmax at a
temperature, with noise keyed to (seed, sample index).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

from dgm_scale.config.schema import OptimizerConfig
from dgm_scale.core.checks import MAX_LAYERS, at_least, between, choice, require
from dgm_scale.families.registry import Family


@dataclass
class AutoregressiveModelConfig:
    kind: str = "autoregressive"  # the model family: a built-in or registered name, or package.module:FAMILY
    module: Optional[str] = None  # your own module class (a subclass of AutoregressiveModule)
    cell: str = "lstm"  # lstm | gru
    layers: int = 2  # stacked recurrent layers
    width: int = 256  # hidden units per layer
    embed_dim: int = 64  # symbol / position / class embedding size
    dropout: float = 0.0  # between recurrent layers
    num_classes: int = 0  # > 0: class-conditional (a class embedding added to every input)
    temperature: float = 1.0  # the softmax temperature of sample grids and evaluations


@dataclass
class AutoregressiveLossConfig:
    """The loss is the exact negative log-likelihood (cross-entropy of the next symbol): no setting."""


@dataclass
class AutoregressiveOptimConfig(OptimizerConfig):
    lr: float = 2e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])


def validate(cfg: Any) -> None:
    from dgm_scale.modules.optim import validate_optimizer
    from dgm_scale.nets.sequence import CELLS

    model = cfg.model
    choice("model.cell", model.cell, sorted(CELLS))
    between("model.layers", model.layers, 1, MAX_LAYERS)
    at_least("model.width", model.width, 1)
    at_least("model.embed_dim", model.embed_dim, 1)
    require(0.0 <= model.dropout < 1.0, f"config key 'model.dropout' must be in [0, 1), got {model.dropout}")
    at_least("model.num_classes", model.num_classes, 0)
    require(model.temperature > 0, f"config key 'model.temperature' must be > 0, got {model.temperature}")
    validate_optimizer("optim", cfg.optim)


def describe(setting: Callable[..., Any]) -> List[Tuple[str, str]]:
    classes = setting("model.num_classes") or 0
    return [("model", f"autoregressive {str(setting('model.cell')).upper()}: {setting('model.layers')} layers x "
                      f"{setting('model.width')}, 256-way categorical per symbol"
                      + (f", {classes} classes" if classes else "")),
            ("loss", "exact negative log-likelihood (teacher forcing)"),
            ("sampling", f"temperature {setting('model.temperature', 1.0)}"),
            ("optimizer", f"{setting('optim.name')} lr {setting('optim.lr')}")]


def summary(setting: Callable[..., Any]) -> str:
    return f"autoregressive {str(setting('model.cell')).upper()}, {setting('model.layers')} x {setting('model.width')}"


FAMILY = Family(
    name="autoregressive",
    description="a recurrent network over byte sequences with an exact likelihood",
    model=AutoregressiveModelConfig, loss=AutoregressiveLossConfig, optim=AutoregressiveOptimConfig,
    module="dgm_scale.families.autoregressive.module:AutoregressiveModule",
    validate=validate, describe=describe, summary=summary,
    modalities=("images", "text"),
    chart_groups=(("likelihood", "Training negative log-likelihood (bits per dim / char)",
                   lambda k: k in ("train/bits_per_dim", "train/bits_per_char")),),
)
