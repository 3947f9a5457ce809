"""Text as byte sequences (`data.name=text`): a corpus, its split, and windows of it.

`data.path` is one of
- `builtin:pydoc`: Python's documentation topics (the standard library's `pydoc_data` package,
  ~465,000 characters of English prose and code), so text models train offline;
- a text file (read as bytes, memory-mapped: any size);
- a folder of `.txt` files (recursive, sorted, joined by blank lines);
- a shard spec (`dir/`, `x-{000000..000009}.tar`, `pipe:CMD`, see data/shards/urls.py) of tar
  files whose `.txt` members are the documents.
A model sees bytes (256 symbols; UTF-8 text stays UTF-8). The held-out split is the corpus's
last `data.val_fraction`, so no held-out character was trained on. Training items are windows
of `data.seq_len + 1` bytes (input = the first seq_len, target = the last seq_len); each epoch
starts them at an offset keyed to (seed, epoch), so the model does not see the same cut of the
text every epoch, and a resumed run reads the same windows (see position.py).
"""
from __future__ import annotations

import tarfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from dgm_scale.core.errors import DataError, first_line

from .datasets import item_key
from .transforms import mix64

BUILTIN_TEXT = ("builtin:pydoc",)
DOCUMENT_SEPARATOR = b"\n\n"


def _pydoc_corpus() -> np.ndarray:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions split the standard library
        raise DataError("config key 'data.path': builtin:pydoc needs the standard library's pydoc_data "
                        "package, which this Python lacks") from None
    text = DOCUMENT_SEPARATOR.join(topics[name].encode("utf-8") for name in sorted(topics))
    return np.frombuffer(text, dtype=np.uint8)


def _is_shard_spec(spec: str, path: Path) -> bool:
    if spec.startswith("pipe:") or "{" in spec or spec.endswith(".tar"):
        return True
    return path.is_dir() and (any(path.glob("*.tar")) or (path / "manifest.json").is_file())


def _shard_corpus(spec: str) -> np.ndarray:
    from .shards.urls import expand_urls, open_shard

    documents = []
    for shard in expand_urls(spec):
        try:
            with open_shard(shard.url) as stream, tarfile.open(fileobj=stream, mode="r|*") as archive:
                for member in archive:
                    if member.isfile() and member.name.endswith(".txt"):
                        documents.append(archive.extractfile(member).read())
        except (OSError, tarfile.TarError) as error:
            raise DataError(f"text shard '{shard.url}': {first_line(error)}") from None
    if not documents:
        raise DataError(f"config key 'data.path': no .txt members in the shards of '{spec}'")
    return np.frombuffer(DOCUMENT_SEPARATOR.join(documents), dtype=np.uint8)


@lru_cache(maxsize=2)
def read_corpus(spec: str) -> np.ndarray:
    """The whole corpus of `data.path` as bytes (uint8 [n]); cached per process."""
    if spec in BUILTIN_TEXT:
        return _pydoc_corpus()
    if spec.startswith("builtin:"):
        raise DataError(f"config key 'data.path': unknown built-in text '{spec}'; known: {', '.join(BUILTIN_TEXT)}")
    path = Path(spec).expanduser()
    if _is_shard_spec(spec, path):
        return _shard_corpus(spec)
    if path.is_file():
        if path.stat().st_size == 0:
            raise DataError(f"config key 'data.path': text file '{spec}' is empty")
        return np.memmap(path, dtype=np.uint8, mode="r")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"config key 'data.path': no .txt files under '{spec}'")
        return np.frombuffer(DOCUMENT_SEPARATOR.join(p.read_bytes() for p in files), dtype=np.uint8)
    raise DataError(f"config key 'data.path': '{spec}' is neither a text file, a folder, text shards nor "
                    f"a built-in text ({', '.join(BUILTIN_TEXT)})")


def split_bounds(n: int, val_fraction: float, split: str) -> Tuple[int, int]:
    """[start, end) of a split: train the first part, val the last `val_fraction`."""
    boundary = n - int(round(n * val_fraction))
    return (0, boundary) if split == "train" else (boundary, n)


class TextWindows(Dataset):
    """Windows of `seq_len + 1` bytes of corpus[start:end]: item = (int64 [seq_len + 1], label 0).

    With `shifted`, every epoch's windows start at an offset in [0, seq_len) keyed to the
    sampler's epoch key (the last window may then be dropped); without, at 0 (held-out data).
    """

    num_classes = 0

    def __init__(self, corpus: np.ndarray, start: int, end: int, seq_len: int, shifted: bool):
        self.corpus, self.start, self.end, self.seq_len = corpus, start, end, seq_len
        self.keyed_items = shifted  # the sampler then hands over (index, epoch key): see item_key
        self.count = (end - start - 1) // seq_len - (1 if shifted else 0)

    def __len__(self) -> int:
        return max(self.count, 0)

    def __getitem__(self, key) -> Tuple[Tensor, Tensor]:
        index, epoch_key = item_key(key)
        offset = mix64(epoch_key) % self.seq_len if self.keyed_items else 0
        lo = self.start + offset + index * self.seq_len
        window = np.asarray(self.corpus[lo:lo + self.seq_len + 1], dtype=np.int64)
        return torch.from_numpy(window), torch.zeros((), dtype=torch.int64)


def build_text(cfg: Any, split: str) -> Dataset:
    """Windows of the `split` part of the corpus `data.path` names."""
    corpus = read_corpus(str(cfg.path))
    start, end = split_bounds(len(corpus), float(cfg.val_fraction), split)
    dataset = TextWindows(corpus, start, end, int(cfg.seq_len), shifted=split == "train")
    if split == "train" and len(dataset) == 0:
        raise DataError(f"config key 'data.seq_len': the training text ({end - start} bytes of '{cfg.path}') is "
                        f"shorter than two windows of {cfg.seq_len + 1} bytes")
    return dataset


def unigram_bits_per_char(corpus: np.ndarray, val_fraction: float) -> float:
    """The held-out cross-entropy (bits per byte) of the training split's byte frequencies
    (add-one smoothed): the baseline a sequence model must beat."""
    n = len(corpus)
    t0, t1 = split_bounds(n, val_fraction, "train")
    v0, v1 = split_bounds(n, val_fraction, "val")
    counts = np.bincount(np.asarray(corpus[t0:t1]), minlength=256).astype(np.float64) + 1.0
    log_p = np.log2(counts / counts.sum())
    held_out = np.bincount(np.asarray(corpus[v0:v1]), minlength=256).astype(np.float64)
    return float(-(held_out * log_p).sum() / max(held_out.sum(), 1.0))


__all__ = ["BUILTIN_TEXT", "TextWindows", "build_text", "read_corpus", "split_bounds", "unigram_bits_per_char"]
