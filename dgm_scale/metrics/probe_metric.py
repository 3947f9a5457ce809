"""The `probe` evaluation metric (`eval.metrics: [..., probe]`): how well the model's features
of labelled real images separate the classes, logged at every evaluation like FID.

Data: a seeded subset (`eval.seed`) of `probe_samples` labelled images of the evaluation's real
source (`eval.real`; auto = the training data, the same source the sample metrics compare with),
read once, split by `seeded_split` (stratified, `eval.seed`) into a test share of
`probe_test_fraction` and train rows: the split `dgm-scale probe --data SRC` makes without
--test, so with `probe_samples` >= the source's size the numbers are that command's `model:` row
for the same seed and label draws (tested). The model was trained on the same images without
their labels: that is the usual unsupervised-representation setting, not a held-out test of it.

Each evaluation, every rank encodes its contiguous share with the module's `encode_features`
(its first feature: the representation, e.g. a VAE's `mu`), the shares are gathered in rank
order (the rows one process would have), and rank 0 computes, then broadcasts to every rank:
- probe_kmeans_accuracy, probe_nmi: k-means on the test rows (metrics/representation.py);
- probe_linear_accuracy (+ _std): logistic regression on `probe_labels_per_class` labels per
  class of the train rows, mean over `probe_seeds` label draws;
- probe_seconds;
- probe_pixels_*: the first three on the raw pixels of the same rows (computed at the first
  evaluation, then repeated): the flat line the model's curves are read against.
Rank 0 also keeps the test rows' 2-D projection (`probe_projection`: pca, or tsne) with their
labels (`projection`) for the report / W&B.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from dgm_scale.core.errors import ConfigError, first_line
from dgm_scale.metrics.gather import all_gather_features, broadcast_object, rank_and_world
from dgm_scale.metrics.real_data import labelled_real_images, to_model_space
from dgm_scale.metrics.registry import resolve_options
from dgm_scale.metrics.representation import draw_labelled, kmeans_scores, linear_probe, project_2d, seeded_split

#: the options' names in error messages
PER_CLASS, TEST_FRACTION = "eval.options.probe_labels_per_class", "eval.options.probe_test_fraction"


@contextmanager
def evaluation_mode(module: torch.nn.Module) -> Iterator[None]:
    """`module` and all its submodules in eval mode inside; each one's own mode restored after
    (a GAN's EMA copy may be in eval mode while the rest trains)."""
    modes = [(sub, sub.training) for sub in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for sub, training in modes:
            sub.training = training


@torch.no_grad()
def encode_images(module, images: Tensor, labels: Optional[Tensor], context: str = "") -> dict[str, Tensor]:
    """module.encode_features of model-space images [N, C, H, W] (+ labels [N]) in eval mode:
    name -> float32 [N, D] on the CPU; a model without features, or one that cannot encode
    these images, is a one-line ConfigError starting with `context`."""
    try:
        with evaluation_mode(module):
            features = module.encode_features(images.to(module.device),
                                              None if labels is None else labels.to(module.device))
    except NotImplementedError as error:  # a family or custom network without features: its reason
        raise ConfigError(f"{context}{error}") from None
    except ValueError as error:  # e.g. a class-conditional model given unlabelled data
        raise ConfigError(f"{context}encoding failed: {first_line(error)}") from None
    return {name: value.detach().float().cpu() for name, value in features.items()}


@dataclass
class Projection:
    """What the report draws: the test rows' features in 2-D."""

    points: np.ndarray  # float [M, 2]
    labels: np.ndarray  # int64 [M]
    feature: str  # the representation's name (mu, features, hidden)
    method: str = "pca"  # how: a key of representation.PROJECTIONS


def probe_scores(x: np.ndarray, labels: np.ndarray, per_class: int, seeds: int, seed: int,
                 test_fraction: float, feature: str = "", method: str = "pca") -> tuple[dict[str, float], Projection]:
    """The metric's values on features x [N, D] (named `feature`) of labelled rows, and the test
    rows' projection by `method`."""
    train, test = seeded_split(labels, test_fraction, seed, option=TEST_FRACTION)
    accuracy, nmi = kmeans_scores(x[test], labels[test], seed)
    probe = linear_probe(x[train], labels[train], x[test], labels[test], per_class, seeds, seed, option=PER_CLASS)
    results = {"probe_kmeans_accuracy": accuracy, "probe_nmi": nmi, "probe_linear_accuracy": probe["mean"],
               "probe_linear_accuracy_std": probe["std"]}
    points = project_2d(x[test], method, seed).astype(np.float32)
    return results, Projection(points, labels[test], feature, method)


class ProbeEvaluator:
    """The probe of one run (see the module docstring): `evaluate(module)` on every rank."""

    def __init__(self, settings, sample_shape: tuple[int, ...]):
        """`settings`: the run's EvalSettings (real, seed, batch_size and the probe_* options)."""
        options = resolve_options(settings.options)
        self.src, self.seed, self.batch_size = settings.real, int(settings.seed), int(settings.batch_size)
        self.num, self.per_class = int(options["probe_samples"]), int(options["probe_labels_per_class"])
        self.seeds, self.test_fraction = int(options["probe_seeds"]), float(options["probe_test_fraction"])
        self.method = str(options["probe_projection"])
        self.sample_shape = tuple(sample_shape)
        self._share: Optional[tuple[list[np.ndarray], np.ndarray]] = None
        self._pixels_scored = False  # every rank: the pixel baseline was computed (on rank 0)
        self._pixel_scores: dict[str, float] = {}
        self.projection: Optional[Projection] = None  # rank 0, after an evaluation

    def share(self) -> tuple[list[np.ndarray], np.ndarray]:
        """This rank's uint8 images and labels (read on first use, then kept)."""
        if self._share is None:
            self._share = labelled_real_images(self.src, self.sample_shape, self.num, self.seed, *rank_and_world())
        return self._share

    def check(self, module) -> None:
        """Before training: a one-line ConfigError when the model has no features of real images
        (naming eval.metrics), the source has no labels (eval.real) or too few for the split and
        the label draws (the option)."""
        context = "config key 'eval.metrics': 'probe' needs the model's features of real images: "
        encode_images(module, torch.zeros(2, *self.sample_shape), torch.zeros(2, dtype=torch.long), context)
        _, labels = labelled_real_images(self.src, self.sample_shape, self.num, self.seed)
        train, _ = seeded_split(labels, self.test_fraction, self.seed, option=TEST_FRACTION)
        draw_labelled(labels[train], self.per_class, np.random.default_rng(0), option=PER_CLASS)

    def encode(self, module) -> tuple[str, Tensor, Tensor]:
        """(representation name, this rank's features [n, D], labels [n]) on the module's device."""
        images, labels = self.share()
        batches = [(to_model_space(images[lo:lo + self.batch_size]), torch.from_numpy(labels[lo:lo + self.batch_size]))
                   for lo in range(0, len(images), self.batch_size)]
        # An empty share still joins the gathers, with [0, D] rows of the right width.
        parts, name = [], ""
        for x, y in batches or [(torch.zeros(1, *self.sample_shape), torch.zeros(1, dtype=torch.long))]:
            name, first = next(iter(encode_images(module, x, y, "eval.metrics 'probe': ").items()))
            parts.append(first)
        features = torch.cat(parts)[:len(images)]
        return name, features.to(module.device), torch.from_numpy(labels).to(module.device)

    def pixel_scores(self, labels: np.ndarray | None, device: torch.device) -> dict[str, float]:
        """The baseline (probe_pixels_*) on rank 0, from rows gathered as the features are, so
        `labels` (rank 0's gathered labels, None elsewhere) fit them; every rank calls it."""
        if not self._pixels_scored:
            images, _ = self.share()
            pixels = to_model_space(images).flatten(1) if images else torch.zeros(0, int(np.prod(self.sample_shape)))
            rows = all_gather_features(pixels.to(device).contiguous())
            self._pixels_scored = True
            if labels is not None:
                scores, _ = probe_scores(rows.cpu().numpy(), labels, self.per_class, self.seeds, self.seed,
                                         self.test_fraction)
                self._pixel_scores = {name.replace("probe_", "probe_pixels_", 1): value
                                      for name, value in scores.items() if not name.endswith("_std")}
        return self._pixel_scores

    @torch.no_grad()
    def evaluate(self, module) -> dict[str, float]:
        """The metric's values (every rank calls this; all get rank 0's numbers)."""
        start = time.perf_counter()
        name, features, labels = self.encode(module)
        features, labels = all_gather_features(features.contiguous()), all_gather_features(labels.contiguous())
        rank_zero = rank_and_world()[0] == 0
        all_labels = labels.cpu().numpy() if rank_zero else None
        baseline = self.pixel_scores(all_labels, module.device)  # a collective: every rank
        if not rank_zero:
            return broadcast_object(None)
        results, self.projection = probe_scores(features.cpu().numpy(), all_labels, self.per_class,
                                                self.seeds, self.seed, self.test_fraction, name, self.method)
        results.update(baseline, probe_seconds=time.perf_counter() - start)
        return broadcast_object(results)
