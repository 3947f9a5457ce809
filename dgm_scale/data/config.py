"""Validation of the `data` section (its dataclass: dgm_scale.config.schema.DataConfig)."""
from __future__ import annotations

from typing import Any

from dgm_scale.core.checks import at_least, choice, is_power_of_two, require

TEXT_DATASETS = ("text",)


def modality_of(name: str) -> str:
    """What a dataset holds: "points" (2-D toys), "text" (byte sequences) or "images"."""
    from .datasets import TOY_DATASETS

    if name in TOY_DATASETS:
        return "points"
    return "text" if name in TEXT_DATASETS else "images"


def validate_data(data: Any) -> None:
    from .datasets import DATASETS, STREAM_DATASETS, TOY_DATASETS

    choice("data.name", data.name, sorted(DATASETS) + list(STREAM_DATASETS))
    modality = modality_of(data.name)
    if data.name in TOY_DATASETS:
        require(data.toy_samples >= 1, f"config key 'data.toy_samples' must be >= 1, got {data.toy_samples}")
        require(data.toy_std > 0, f"config key 'data.toy_std' must be > 0, got {data.toy_std}")
    elif modality == "images":
        res = data.resolution
        require(is_power_of_two(res) and 8 <= res <= 256,
                f"config key 'data.resolution' must be a power of two in [8, 256], got {res}")
        choice("data.channels", data.channels, [1, 3])
    else:
        at_least("data.seq_len", data.seq_len, 2)
        require(bool(data.path), "config key 'data.path' is required when data.name=text "
                                 "(a text file, a folder of .txt files, text shards, or builtin:pydoc)")
    if data.name in ("folder", "shards"):
        require(bool(data.path), f"config key 'data.path' is required when data.name={data.name}")
    if data.name == "shards":
        datasets = 1 + len(data.mix)
        require(len(data.weights) in (0, datasets), f"config key 'data.weights': {len(data.weights)} weights for "
                                                    f"{datasets} datasets (data.path + data.mix)")
        require(all(w > 0 for w in data.weights), f"config key 'data.weights' must be > 0, got {list(data.weights)}")
        at_least("data.shuffle_buffer", data.shuffle_buffer, 1)
        require(not data.resampled or data.steps_per_epoch >= 1,
                "config key 'data.steps_per_epoch' must be >= 1 with data.resampled=true")
    at_least("data.batch_size", data.batch_size, 1)
    require(0.0 <= data.val_fraction < 1.0, f"config key 'data.val_fraction' must be in [0, 1), got {data.val_fraction}")
    require(0.0 < data.subset <= 1.0, f"config key 'data.subset' must be in (0, 1], got {data.subset}")
    require(data.subset == 1.0 or data.name not in STREAM_DATASETS,
            "config key 'data.subset': a subset of streamed shards is not offered; build a smaller shard set")
    validate_labels_per_class(data, modality)


def validate_labels_per_class(data: Any, modality: str) -> None:
    """`data.labels_per_class`: unset, or >= 1 on map-style data that has labels (whether every
    class has that many is checked when the training split is built: data/labels.py)."""
    from .datasets import STREAM_DATASETS

    per_class = data.labels_per_class
    if per_class is None:
        return
    require(per_class >= 1, f"config key 'data.labels_per_class' must be >= 1 (unset = every label), got {per_class}")
    require(modality != "text", "config key 'data.labels_per_class': text data has no labels")
    require(data.name not in STREAM_DATASETS, "config key 'data.labels_per_class': not offered for streamed shards "
                                              f"(data.name={data.name}): choosing K per class needs every label before training")
