"""`dgm-scale probe CKPT --data SRC [--test SRC2] --labels-per-class K[,K2...]`: how well a
model's representation separates classes, next to raw pixels and PCA of the pixels.

Representations, each [N, D]:
- raw pixels: the images at the model's resolution and channels, in [-1, 1], flattened;
- PCA of the pixels: fitted on the train split, as many components as the model's
  representation has (at most the number of train samples); left out when the representation
  is at least as wide as the pixels (all components: the pixels rotated, with near-empty
  directions that standardisation would blow up to unit variance);
- the model: the first feature of its family's `encode_features` (a VAE's `mu`, a GAN's
  discriminator features, the autoregressive model's hidden state), encoded as `encode` does.
For each:
- k-means on the test split: accuracy (Hungarian matching of clusters to classes) and NMI;
- a linear probe for each K: the test accuracy of logistic regression on standardised features
  trained on K labels per class of the train split, over `seeds` label draws
  (metrics/representation.py has the measures, shared with the `probe` evaluation metric).
Train / test: SRC and the held-out --test SRC2, else a stratified seeded split of SRC.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dgm_scale.core.errors import ConfigError
# The measures live with the metrics (the `probe` evaluation metric uses them too).
from dgm_scale.metrics.representation import (cluster_accuracy, draw_labelled, kmeans_scores,  # noqa: F401
                                              linear_probe, seeded_split)


# ----------------------------------------------------------------------------- data
@dataclass
class Split:
    """The labels of the train [N] and test [M] rows, and how they were split (for the output)."""

    train_y: np.ndarray
    test_y: np.ndarray
    description: str


def representations(train: dict[str, np.ndarray], test: dict[str, np.ndarray], name: str,
                    seed: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(label, train [N, D], test [M, D]) for raw pixels, PCA of pixels (see the module docstring)
    and the model's `name`."""
    from sklearn.decomposition import PCA

    pixels_train, pixels_test = train["pixels"], test["pixels"]
    rows = [("raw pixels", pixels_train, pixels_test)]
    if train[name].shape[1] < pixels_train.shape[1]:
        pca = PCA(n_components=min(train[name].shape[1], len(pixels_train)), random_state=seed).fit(pixels_train)
        rows.append(("PCA of pixels", pca.transform(pixels_train), pca.transform(pixels_test)))
    return [*rows, (f"model: {name}", train[name], test[name])]


def probe_arrays(train: dict[str, np.ndarray], test: dict[str, np.ndarray], name: str, split: Split,
                 labels_per_class: Sequence[int], seeds: int = 5, seed: int = 0) -> list[dict]:
    """The metrics of each representation (see the module docstring), one dict per row."""
    rows = []
    for label, train_x, test_x in representations(train, test, name, seed):
        accuracy, nmi = kmeans_scores(test_x, split.test_y, seed)
        probes = {str(k): linear_probe(train_x, split.train_y, test_x, split.test_y, k, seeds, seed)
                  for k in labels_per_class}
        rows.append({"representation": label, "dim": int(train_x.shape[1]), "kmeans_accuracy": accuracy,
                     "nmi": nmi, "linear_probe": probes})
    return rows


# ----------------------------------------------------------------------------- checkpoint
def require_labels(src: str, option: str) -> None:
    """ConfigError naming `option` and `src` unless the source's samples are labelled (its first is)."""
    from dgm_scale.data.shards.sources import open_source

    first = next(iter(open_source(src).samples()), None)
    if first is None or first.label is None:
        raise ConfigError(f"{option} '{src}': the source has no labels (class folders, an npz's y / labels, "
                          "shard .cls and builtin datasets have them); probe needs labelled data")


def encoded_rows(module, src: str, option: str, batch_size: int):
    """`src` encoded, with its pixels; ConfigError naming `option` when a row has no label."""
    from dgm_scale.represent.encode import encode_source

    encoded = encode_source(module, src, batch_size, strict=False, keep_pixels=True)
    if encoded.labels is None:
        raise ConfigError(f"{option} '{src}': some samples have no label; probe needs labelled data")
    return encoded


def _rows(encoded, indices: np.ndarray | None = None) -> dict[str, np.ndarray]:
    arrays = {**encoded.features, "pixels": encoded.pixels}
    return arrays if indices is None else {key: value[indices] for key, value in arrays.items()}


def probe_checkpoint(checkpoint: str, data: str, labels_per_class: Sequence[int], test: str | None = None,
                     seeds: int = 5, seed: int = 0, test_fraction: float = 0.3, batch_size: int = 256,
                     device: str | None = None, trust_code: bool = False) -> dict:
    """Probe the model of `checkpoint` on `data` (see the module docstring): the JSON-ready result."""
    from dgm_scale.modules import load_module
    from dgm_scale.represent.encode import model_device

    if not labels_per_class or min(labels_per_class) < 1:
        raise ConfigError(f"--labels-per-class must be >= 1, got {','.join(map(str, labels_per_class))}")
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    require_labels(data, "--data")
    if test is not None:
        require_labels(test, "--test")
    module = load_module(checkpoint, trust_code=trust_code).to(model_device(device))
    first = encoded_rows(module, data, "--data", batch_size)
    name = next(iter(first.features))
    if test is not None:
        second = encoded_rows(module, test, "--test", batch_size)
        train, held_out = _rows(first), _rows(second)
        split = Split(first.labels, second.labels, f"held-out: train = --data {data}, test = --test {test}")
        skipped = first.skipped + second.skipped
    else:
        train_idx, test_idx = seeded_split(first.labels, test_fraction, seed)
        train, held_out = _rows(first, train_idx), _rows(first, test_idx)
        split = Split(first.labels[train_idx], first.labels[test_idx],
                      f"seeded split of --data {data}: {1 - test_fraction:.0%} train / {test_fraction:.0%} test "
                      f"(stratified, seed {seed})")
        skipped = first.skipped
    rows = probe_arrays(train, held_out, name, split, labels_per_class, seeds, seed)
    return {"checkpoint": str(checkpoint), "family": module.family.name, "data": data, "test": test,
            "split": split.description, "num_train": len(split.train_y), "num_test": len(split.test_y),
            "num_classes": len(np.unique(split.train_y)), "labels_per_class": list(labels_per_class),
            "seeds": seeds, "seed": seed, "representations": rows,
            "skipped": [{"name": n, "reason": r} for _, n, r in skipped]}


def format_table(result: dict) -> str:
    """The result as a text table (one row per representation, one column per K)."""
    ks = [str(k) for k in result["labels_per_class"]]
    header = f"{'representation':<24}{'dim':>6}{'k-means acc':>13}{'NMI':>8}" + "".join(
        f"{f'linear acc, {k}/class':>34}" for k in ks)
    title = (f"{result['split']}: {result['num_train']} train, {result['num_test']} test, "
             f"{result['num_classes']} classes; linear probe over {result['seeds']} label draws: "
             "mean ± std [min, max]")
    lines = [title, header]
    for row in result["representations"]:
        cells = "".join(f"{_spread(row['linear_probe'][k]):>34}" for k in ks)
        lines.append(f"{row['representation']:<24}{row['dim']:>6}{row['kmeans_accuracy']:>13.3f}"
                     f"{row['nmi']:>8.3f}{cells}")
    return "\n".join(lines)


def _spread(probe: dict) -> str:
    return f"{probe['mean']:.3f} ± {probe['std']:.3f} [{probe['min']:.3f}, {probe['max']:.3f}]"
