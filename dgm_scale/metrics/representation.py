"""How well features [N, D] of labelled data separate the classes: the measures of
`dgm-scale probe` (represent/probe.py) and of the `probe` evaluation metric (probe_metric.py).

- k-means on the test rows (k = the number of classes, 10 restarts, seeded): accuracy under the
  best one-to-one matching of clusters to classes (Hungarian: linear_sum_assignment) and NMI;
- a linear probe: logistic regression on standardised features (the scaler is fitted on all
  train rows, which needs no labels) trained on K labelled rows per class drawn from the train
  rows; its test accuracy over `seeds` draws: mean, std, min, max;
- a seeded stratified train / test split, and a 2-D projection of features for pictures (PCA,
  or t-SNE: scikit-learn's, already a dependency).
Pure numpy / scikit-learn: no torch, no model. Errors name the option at fault (`option`):
the command's `--labels-per-class`, the evaluation's `eval.options.probe_labels_per_class`.
"""
from __future__ import annotations

import warnings

import numpy as np

from dgm_scale.core.errors import ConfigError


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


def draw_labelled(labels: np.ndarray, per_class: int, rng: np.random.Generator,
                  option: str = "--labels-per-class") -> np.ndarray:
    """Indices of `per_class` samples of each class of labels [N], drawn without replacement;
    ConfigError naming `option` when a class has fewer."""
    chosen = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if len(members) < per_class:
            raise ConfigError(f"{option} {per_class}: class {cls} has only {len(members)} "
                              "samples in the train split")
        chosen.append(rng.choice(members, per_class, replace=False))
    return np.concatenate(chosen)


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 per_class: int, seeds: int = 5, seed: int = 0, option: str = "--labels-per-class") -> dict:
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
        chosen = draw_labelled(train_y, per_class, np.random.default_rng([seed, draw]), option)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            classifier = LogisticRegression(max_iter=2000).fit(train_z[chosen], train_y[chosen])
        runs.append(float((classifier.predict(test_z) == test_y).mean()))
    return {"mean": float(np.mean(runs)), "std": float(np.std(runs)), "min": min(runs), "max": max(runs),
            "runs": runs}


def seeded_split(labels: np.ndarray, test_fraction: float, seed: int,
                 option: str = "--test-fraction") -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices): a stratified split of labels [N] seeded by `seed`."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"{option} must be in (0, 1), got {test_fraction}")
    indices = np.arange(len(labels))
    try:
        train, test = train_test_split(indices, test_size=test_fraction, random_state=seed, stratify=labels)
    except ValueError as error:  # a class too small to be in both parts
        raise ConfigError(f"{option} {test_fraction}: cannot split the data: {error}") from None
    return np.sort(train), np.sort(test)


def pca_2d(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """x [N, D] projected on its first two principal components [N, 2] (signs fixed by
    scikit-learn's convention, so the same features give the same picture); one feature only:
    [x, 0]."""
    from sklearn.decomposition import PCA

    x = x.astype(np.float64)
    if x.shape[1] < 2:
        return np.concatenate([x - x.mean(0), np.zeros_like(x)], axis=1)
    return PCA(n_components=2, svd_solver="full", random_state=seed).fit_transform(x)


#: the 2-D projections `project_2d` makes, with what their axes are called
PROJECTIONS = {"pca": ("PCA", "principal component"), "tsne": ("t-SNE", "t-SNE dimension")}


def tsne_2d(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """x [N, D] embedded in 2-D by t-SNE (PCA initialisation, seeded; perplexity 30, lowered for
    small N, which t-SNE needs below N / 3): neighbourhoods kept, distances between far groups
    not meaningful. One sample: [[0, 0]]."""
    from sklearn.manifold import TSNE

    x = x.astype(np.float64)
    if len(x) < 2:
        return np.zeros((len(x), 2))
    perplexity = min(30.0, max(1.0, (len(x) - 1) / 3.0))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def project_2d(x: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """x [N, D] -> [N, 2] by `method`, a key of PROJECTIONS."""
    return tsne_2d(x, seed) if method == "tsne" else pca_2d(x, seed)
