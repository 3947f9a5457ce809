"""Semi-supervised training data: `data.labels_per_class = K` keeps the labels of K samples per
class of the training split and hides every other one (label -1).

The labelled samples are a choice keyed to the run seed and the data alone: a seeded permutation
of the training split, and the first K samples of each class in it. So every rank and every
resumed run of a seed holds the same labelled set, and another seed draws another one. The images
stay as they are, every one of them (labelled or not) is still a training image; only the label
is hidden. The held-out split is never touched (its labels are what a classifier is tested on).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset

from dgm_scale.core.errors import ConfigError

from .datasets import ImageFolderDataset, InMemoryDataset, Item, KeptSubset, item_key

#: the label of a sample whose label is hidden
HIDDEN = -1
#: keeps the labelled choice apart from the other seeded choices of a run
LABELS_SEED = 7_919


def labels_of(dataset: Dataset) -> Tensor:
    """The int64 labels [N] of a map-style dataset (without decoding images where it knows them)."""
    if isinstance(dataset, KeptSubset):
        return labels_of(dataset.dataset)[torch.tensor(dataset.indices, dtype=torch.int64)]
    if isinstance(dataset, InMemoryDataset):
        return dataset.labels
    if isinstance(dataset, ImageFolderDataset):
        return torch.tensor([label for _, label in dataset.samples], dtype=torch.int64)
    return torch.stack([torch.as_tensor(dataset[index][1]) for index in range(len(dataset))]).to(torch.int64)


def choose_labelled(labels: Tensor, per_class: int, num_classes: int, seed: int) -> Tensor:
    """Sorted indices of `per_class` samples of each of the `num_classes` classes of labels [N]:
    the first ones of each class in a permutation keyed to `seed`; a ConfigError naming
    data.labels_per_class when a class has fewer."""
    counts = torch.bincount(labels, minlength=num_classes)
    short = [(cls, int(count)) for cls, count in enumerate(counts.tolist()) if count < per_class]
    if short:
        cls, count = short[0]
        raise ConfigError(f"config key 'data.labels_per_class': {per_class} labels per class asked for, class {cls} "
                          f"has only {count} samples in the training split")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(LABELS_SEED + seed))
    ordered = labels[order]
    rank_in_class = torch.zeros(len(labels), dtype=torch.int64)
    for cls in range(num_classes):
        members = ordered == cls
        rank_in_class[members] = torch.arange(int(members.sum()))
    return order[rank_in_class < per_class].sort().values


class HiddenLabels(Dataset):
    """A dataset whose labels are kept for the samples `labelled` only, HIDDEN (-1) elsewhere."""

    def __init__(self, dataset: Dataset, labelled: Tensor):
        self.dataset = dataset
        self.labelled = torch.zeros(len(dataset), dtype=torch.bool)
        self.labelled[labelled] = True
        self.num_classes = getattr(dataset, "num_classes", 0)
        self.keyed_items = getattr(dataset, "keyed_items", False)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key) -> Item:
        index, _ = item_key(key)
        x, label, *rest = self.dataset[key]  # rest: the image folder's `replaced` flag
        return (x, label if self.labelled[index] else torch.tensor(HIDDEN, dtype=torch.int64), *rest)


def hide_labels(dataset: Dataset, per_class: int | None, seed: int, name: str) -> Dataset:
    """The training split with `per_class` labels per class kept (see the module docstring);
    the dataset itself for None. ConfigError (naming data.labels_per_class) for data without
    labels or a class with fewer samples."""
    if per_class is None:
        return dataset
    num_classes = int(getattr(dataset, "num_classes", 0))
    if num_classes == 0:
        raise ConfigError(f"config key 'data.labels_per_class': dataset '{name}' has no labels "
                          "(a folder needs one sub-folder per class)")
    return HiddenLabels(dataset, choose_labelled(labels_of(dataset), per_class, num_classes, seed))
