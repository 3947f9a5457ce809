"""Feature extractors for the sample-quality metrics, chosen by a spec string.

An extractor maps a batch of samples in model space (images [N, C, H, W] in [-1, 1], or 2-D
points [N, 2]) to features [N, D] (FID, KID, precision/recall, ...) and, when it is a classifier,
logits [N, K] (the Inception Score). `key()` names everything the features depend on (the
weights' sha256 included), so cached real-data features are never reused for another extractor.

Specs (`eval.extractor`, `dgm-scale evaluate --extractor`):
- `inception` / `inception:PATH_OR_URL`: FID's InceptionV3 (pytorch-fid / torch-fidelity weights);
- `classifier:PATH`: a domain classifier saved by `save_classifier` (e.g. trained on your data);
- `digits`: a small classifier trained on scikit-learn's digits (offline; trained once, cached);
- `identity`: the samples themselves, flattened (the 2-D toy mixtures);
- `auto`: `identity` for 2-D toys, `digits` for the digits dataset, `inception` otherwise.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor, nn


class Extracted(NamedTuple):
    features: Tensor  # [N, D] float32
    logits: Optional[Tensor]  # [N, K] float32 class logits, or None when the extractor has none


def to_uint8(images: Tensor) -> Tensor:
    """Images [N, C, H, W] in [-1, 1] -> uint8 [0, 255], quantised as the saved PNGs are.

    Real images were loaded as uint8 and mapped by x / 127.5 - 1, so this inverts them exactly.
    """
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class FeatureExtractor(nn.Module):
    """Base class: subclasses set `name` and `feature_dim` and implement `extract`."""

    name: str = ""
    feature_dim: int = 0
    has_logits: bool = False

    def key(self) -> dict[str, Any]:
        """JSON-able identity of the features (name, weights hash, ...), for the real-feature cache."""
        return {"name": self.name}

    def extract(self, samples: Tensor) -> Extracted:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, samples: Tensor) -> Extracted:
        """samples [N, *sample_shape] in model space -> Extracted (float32, on samples.device)."""
        return self.extract(samples)


class IdentityExtractor(FeatureExtractor):
    """The samples themselves as features (the 2-D toy mixtures): FID is then the Fréchet
    distance of the point clouds, precision/recall their k-NN manifold overlap."""

    name = "identity"

    def __init__(self, feature_dim: int):
        super().__init__()
        self.feature_dim = feature_dim

    def key(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.feature_dim}

    def extract(self, samples: Tensor) -> Extracted:
        return Extracted(samples.flatten(1).float(), None)


def resolve_extractor_spec(spec: str, data_name: str) -> str:
    """`auto` -> the spec that fits the dataset; anything else unchanged."""
    from dgm_scale.data.datasets import TOY_DATASETS

    if spec != "auto":
        return spec
    if data_name in TOY_DATASETS:
        return "identity"
    if data_name == "digits":
        return "digits"
    return "inception"


def build_extractor(spec: str, sample_shape: tuple[int, ...], cache_dir: str | Path,
                    inception_weights: Optional[str] = None) -> FeatureExtractor:
    """The extractor for a resolved spec (see the module docstring); ValueError names a bad spec.

    sample_shape: one sample's shape, (C, H, W) or (2,); cache_dir: where downloaded weights
    and trained classifiers are kept; inception_weights: path or URL for plain `inception`.
    """
    name, _, argument = spec.partition(":")
    if name == "identity":
        return IdentityExtractor(int(torch.Size(sample_shape).numel()))
    if name in ("inception", "classifier", "digits") and len(sample_shape) != 3:
        raise ValueError(f"feature extractor '{spec}' scores images; these samples have shape {tuple(sample_shape)} "
                         "(use 'identity')")
    if name == "inception":
        from dgm_scale.metrics.inception import InceptionExtractor, load_inception

        return InceptionExtractor(load_inception(argument or inception_weights, cache_dir))
    if name == "classifier" and argument:
        from dgm_scale.metrics.classifier import load_classifier_extractor

        return load_classifier_extractor(Path(argument).expanduser(), sample_shape)
    if name == "digits":
        from dgm_scale.metrics.classifier import digits_extractor

        return digits_extractor(sample_shape, Path(cache_dir).expanduser())
    raise ValueError(f"unknown feature extractor '{spec}'; use auto, inception, inception:PATH_OR_URL, "
                     "classifier:PATH, digits or identity")
