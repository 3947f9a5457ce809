"""Domain classifiers as feature extractors: a meaningful FID where InceptionV3 is not available.

Inception features of 16x16 greyscale digits upsampled to 299x299 say little, and its weights
cannot be downloaded offline. A small conv classifier trained on the dataset's own labels gives
features that separate what matters there (the digit's identity and style): FID / KID /
precision-recall on its penultimate layer, IS on its logits (a perfect generator of balanced
classes scores the number of classes). Values are comparable only between runs that use the
same classifier file; its sha256 is part of the feature-cache key.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgm_scale.core.errors import first_line
from dgm_scale.core.files import torch_save_atomic
from dgm_scale.metrics.extractors import Extracted, FeatureExtractor

log = logging.getLogger(__name__)

#: bump when the architecture or the digits training recipe changes (invalidates cached files)
DIGITS_RECIPE_VERSION = 1


class DomainClassifier(nn.Module):
    """images [N, C, R, R] in [-1, 1] -> (features [N, feature_dim], logits [N, num_classes]).

    Inputs of another resolution are resized to the training resolution first (bilinear), so
    one classifier scores generators of any size.
    """

    def __init__(self, channels: int, resolution: int, num_classes: int, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.channels, self.resolution, self.num_classes = channels, resolution, num_classes
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * width, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def config(self) -> dict[str, int]:
        return {"channels": self.channels, "resolution": self.resolution, "num_classes": self.num_classes,
                "width": self.body[0].out_channels, "feature_dim": self.head.in_features}

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if images.shape[1] != self.channels:  # grey <-> RGB so a classifier fits either kind of run
            images = images.mean(1, keepdim=True) if self.channels == 1 else images.expand(-1, 3, -1, -1)
        if images.shape[-1] != self.resolution:
            images = F.interpolate(images, size=(self.resolution, self.resolution), mode="bilinear",
                                   align_corners=False, antialias=images.shape[-1] > self.resolution)
        features = self.body(images)
        return features, self.head(features)


def train_classifier(images: Tensor, labels: Tensor, num_classes: int, epochs: int = 25,
                     batch_size: int = 128, lr: float = 3e-3, seed: int = 0) -> DomainClassifier:
    """Fit a DomainClassifier on images [N, C, R, R] in [-1, 1] with integer labels [N].

    Deterministic for a seed on a given machine: seeded init and a seeded shuffle.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DomainClassifier(images.shape[1], images.shape[-1], num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            index = order[start:start + batch_size]
            _, logits = model(images[index])
            loss = F.cross_entropy(logits, labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: DomainClassifier, images: Tensor, labels: Tensor) -> float:
    _, logits = model(images)
    return float((logits.argmax(1) == labels).float().mean())


def save_classifier(model: DomainClassifier, path: Path, meta: Optional[dict[str, Any]] = None) -> Path:
    """Write {config, state_dict, meta} atomically (temporary file, then rename)."""
    return torch_save_atomic({"config": model.config(), "state_dict": model.state_dict(), "meta": meta or {}},
                             Path(path), unique=True)


class ClassifierExtractor(FeatureExtractor):
    """A DomainClassifier's penultimate features and logits."""

    name = "classifier"
    has_logits = True

    def __init__(self, model: DomainClassifier, sha256: str, source: str):
        super().__init__()
        self.model = model.eval()
        self.feature_dim = model.head.in_features
        self.sha256, self.source = sha256, source

    def key(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256}

    def extract(self, samples: Tensor) -> Extracted:
        features, logits = self.model(samples.float())
        return Extracted(features.float(), logits.float())


def load_classifier_extractor(path: Path, sample_shape: tuple[int, ...] = ()) -> ClassifierExtractor:
    """The classifier saved at `path` (by save_classifier / `dgm-scale train-classifier`)."""
    if not path.is_file():
        raise ValueError(f"classifier file '{path}' does not exist")
    data = path.read_bytes()
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
        model = DomainClassifier(**{k: int(v) for k, v in entry["config"].items()})
        model.load_state_dict(entry["state_dict"])
    except Exception as error:  # noqa: BLE001 - any failure means "not a classifier file"
        raise ValueError(f"classifier file '{path}' is not usable: {first_line(error)}") from None
    if len(sample_shape) == 3 and sample_shape[0] not in (1, 3):
        raise ValueError(f"classifier '{path}': samples of shape {sample_shape} are not images")
    return ClassifierExtractor(model, hashlib.sha256(data).hexdigest(), str(path))


def digits_classifier_path(cache_dir: Path, channels: int, resolution: int) -> Path:
    return Path(cache_dir) / f"digits-classifier-v{DIGITS_RECIPE_VERSION}-c{channels}-r{resolution}.pt"


def digits_extractor(sample_shape: tuple[int, ...], cache_dir: Path) -> ClassifierExtractor:
    """The digits classifier for this channel count and resolution: from the cache, else trained.

    Trained on the train split of scikit-learn's digits (seeded; ~5 s on 2 CPU cores); the
    held-out accuracy (0.95 at 16x16) is recorded in the file's meta and logged.
    """
    from dgm_scale.config.schema import DataConfig
    from dgm_scale.data.datasets import build_digits

    if len(sample_shape) != 3:
        raise ValueError(f"the digits classifier scores images, not samples of shape {sample_shape}")
    channels, resolution = sample_shape[0], sample_shape[-1]
    path = digits_classifier_path(cache_dir, channels, resolution)
    if not path.is_file():
        cfg = DataConfig(name="digits", channels=channels, resolution=resolution)
        splits = {split: build_digits(cfg, split) for split in ("train", "val")}
        tensors = {split: (ds.x, ds.labels) for split, ds in splits.items()}
        model = train_classifier(*tensors["train"], num_classes=10)
        held_out = accuracy(model, *tensors["val"])
        log.info("trained the digits classifier (%dx%d, %d channels): held-out accuracy %.3f -> %s",
                 resolution, resolution, channels, held_out, path)
        save_classifier(model, path, {"dataset": "digits", "val_accuracy": held_out,
                                      "recipe": DIGITS_RECIPE_VERSION})
    return load_classifier_extractor(path, sample_shape)


def fit_classifier_on_source(src: str, out: Path, resolution: int, channels: int, epochs: int = 25,
                             val_fraction: float = 0.1, seed: int = 0) -> str:
    """`dgm-scale train-classifier`: fit a DomainClassifier on a labelled source, save it to `out`.

    The source (image folder with class folders, .npz with labels, labelled shards, builtin:NAME)
    is read into memory whole; a seeded `val_fraction` is held out for the reported accuracy.
    Returns a one-line summary.
    """
    import numpy as np

    from dgm_scale.data.datasets import DataError
    from dgm_scale.data.shards.sources import open_source
    from dgm_scale.metrics.real_data import raw_to_image, to_model_space

    source = open_source(src, resolution=resolution, channels=channels)
    if source.num_classes < 2:
        raise DataError(f"SRC '{src}': a classifier needs labelled data with at least 2 classes")
    images: list[np.ndarray] = []
    labels: list[int] = []
    for raw in source.samples():
        if raw.label is None:
            raise DataError(f"SRC '{src}': sample '{raw.origin}' has no label")
        images.append(raw_to_image(raw, channels, resolution))
        labels.append(raw.label)
    x, y = to_model_space(images), torch.tensor(labels, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    num_val = int(round(len(x) * val_fraction))
    val, train = order[:num_val], order[num_val:]
    model = train_classifier(x[train], y[train], source.num_classes, epochs=epochs, seed=seed)
    held_out = accuracy(model, x[val], y[val]) if num_val else float("nan")
    save_classifier(model, Path(out), {"dataset": src, "val_accuracy": held_out, "num_train": len(train),
                                       "class_names": source.class_names or []})
    return (f"trained a {source.num_classes}-class classifier on {len(train)} samples of {src}: "
            f"held-out accuracy {held_out:.3f} ({num_val} samples) -> {out}")
