"""Data: dataset registry (`build_dataset`), transforms and the Lightning data module."""
from dgm_scale.core.errors import DataError

from .datamodule import DataModule
from .datasets import (
    DATASETS,
    IMAGE_EXTENSIONS,
    TOY_DATASETS,
    ImageFolderDataset,
    InMemoryDataset,
    build_dataset,
    fixed_split,
    toy_centers,
)
from .position import DataPosition, ResumableDistributedSampler
from .transforms import (
    from_model_range,
    load_image,
    keyed_hflip,
    resize_tensor,
    to_model_range,
)

__all__ = [
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "TOY_DATASETS",
    "DataError",
    "DataModule",
    "DataPosition",
    "ImageFolderDataset",
    "InMemoryDataset",
    "ResumableDistributedSampler",
    "build_dataset",
    "fixed_split",
    "from_model_range",
    "load_image",
    "keyed_hflip",
    "resize_tensor",
    "to_model_range",
    "toy_centers",
]
