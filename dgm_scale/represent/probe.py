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
- k-means on the test split (k = the number of classes, 10 restarts, seeded): accuracy under
  the best one-to-one matching of clusters to classes (Hungarian: linear_sum_assignment) and
  NMI (normalized_mutual_info_score);
- a linear probe for each K: logistic regression on standardised features (the scaler is fitted
  on the whole train split, which needs no labels) trained on K labelled samples per class
  drawn from the train split; its test accuracy over `seeds` draws: mean, std, min, max.
Train / test: SRC and the held-out --test SRC2, else a stratified seeded split of SRC.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dgm_scale.core.errors import ConfigError


# ----------------------------------------------------------------------------- metrics
def cluster_accuracy(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Accuracy [0, 1] of cluster ids [N] against class labels [N] under the one-to-one matching
    of clusters to classes that maximises it (Hungarian); unmatched clusters count as errors."""
    from scipy.optimize import linear_sum_assignment

    _, label_ids = np.unique(labels, return_inverse=True)
    _, cluster_ids = np.unique(clusters, return_inverse=True)
    counts = np.zeros((cluster_ids.max() + 1, label_ids.max() + 1), dtype=np.int64)
    np.add.at(counts, (cluster_ids, label_ids), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / len(labels))


def kmeans_scores(x: np.ndarray, labels: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """(clustering accuracy, NMI) of k-means on x [N, D] with k = the number of classes."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    k = len(np.unique(labels))
    clusters = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x.astype(np.float64))
    return cluster_accuracy(labels, clusters), float(normalized_mutual_info_score(labels, clusters))


def draw_labelled(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of `per_class` samples of each class of labels [N], drawn without replacement;
    ConfigError naming --labels-per-class when a class has fewer."""
    chosen = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if len(members) < per_class:
            raise ConfigError(f"--labels-per-class {per_class}: class {cls} has only {len(members)} "
                              "samples in the train split")
        chosen.append(rng.choice(members, per_class, replace=False))
    return np.concatenate(chosen)


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 per_class: int, seeds: int = 5, seed: int = 0) -> dict[str, object]:
    """Test accuracy of logistic regression trained on `per_class` labels per class of the train
    split (standardised with the scaler of all of train_x), for `seeds` label draws:
    {mean, std, min, max, runs}."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    train_z, test_z = scaler.transform(train_x), scaler.transform(test_x)
    runs = []
    for draw in range(seeds):
        chosen = draw_labelled(train_y, per_class, np.random.default_rng([seed, draw]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            classifier = LogisticRegression(max_iter=2000).fit(train_z[chosen], train_y[chosen])
        runs.append(float((classifier.predict(test_z) == test_y).mean()))
    return {"mean": float(np.mean(runs)), "std": float(np.std(runs)), "min": min(runs), "max": max(runs),
            "runs": runs}


# ----------------------------------------------------------------------------- data
@dataclass
class Split:
    """The labels of the train [N] and test [M] rows, and how they were split (for the output)."""

    train_y: np.ndarray
    test_y: np.ndarray
    description: str


def seeded_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices): a stratified split of labels [N] seeded by `seed`."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    indices = np.arange(len(labels))
    try:
        train, test = train_test_split(indices, test_size=test_fraction, random_state=seed, stratify=labels)
    except ValueError as error:  # a class too small to be in both parts
        raise ConfigError(f"--test-fraction {test_fraction}: cannot split the data: {error}") from None
    return np.sort(train), np.sort(test)


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
                     device: str | None = None) -> dict:
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
    module = load_module(checkpoint).to(model_device(device))
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
