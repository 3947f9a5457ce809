"""Tar shards written and read back."""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import tarfile
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from helpers.images import encode_image, random_rgb




# ----------------------------------------------------------------------------- tar shards
def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A ustar archive of (name, payload) members, in order."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.write_bytes(tar_bytes(members))


def png_bytes(i: int, size: int = 8, fmt: str = "PNG") -> bytes:
    return encode_image(Image.fromarray(random_rgb(i, size)), fmt)


def sample(index: int, bad: bool = False) -> list[tuple[str, bytes]]:
    """The members of sample `index` (key = the index, 9 digits): a PNG (garbage if `bad`), a label."""
    key = f"{index:09d}"
    image = b"\x89PNG not really" if bad else png_bytes(index)
    return [(f"{key}.png", image), (f"{key}.cls", str(index % 10).encode())]


def write_set(root: Path, sizes: list[int], manifest: bool = True, bad: frozenset = frozenset(),
              first: int = 0) -> list[str]:
    """Shards x-000000.tar ... with sizes[i] samples (global keys from `first`; those in `bad`
    with an undecodable image) and a manifest as our writer makes it; returns all keys."""
    root.mkdir(parents=True, exist_ok=True)
    index, entries = first, []
    for i, size in enumerate(sizes):
        name = f"x-{i:06d}.tar"
        write_tar(root / name, [m for j in range(index, index + size) for m in sample(j, j in bad)])
        data = (root / name).read_bytes()  # (read_manifest validates the entries)
        entries.append({"name": name, "num_samples": size, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        index += size
    if manifest:
        (root / "manifest.json").write_text(json.dumps({
            "format": "dgm_scale.shards/1", "name": "x", "num_samples": index - first, "encoding": "png",
            "shards": entries, "image": {}, "labels": {"num_classes": 10}}))
    return [f"{i:09d}" for i in range(first, index)]


@contextmanager
def workers_stop_inside():
    """Fails when a worker process started in the block outlives it: left to the garbage
    collector, shard workers stop at some later moment, which then waits seconds on each."""
    before = set(multiprocessing.active_children())
    yield
    left = set(multiprocessing.active_children()) - before
    assert not left, f"{len(left)} worker processes outlived the block"


def make(spec, workers: int = 2, **kwargs):
    """A StreamLoader over `spec` (batches of 8 at 8 x 8 with keys, shuffle buffer 16 unless set)."""
    from dgm_scale.data.shards.loader import make_stream_loader
    from dgm_scale.data.shards.stream import ShardStream

    options = dict(batch_size=8, resolution=8, return_keys=True, shuffle_buffer=16)
    options.update(kwargs)
    return make_stream_loader(ShardStream(spec, **options), num_workers=workers, persistent_workers=False)


def single_worker(spec, **options):
    """Epoch 0 of a stream's only worker, in this process (keys returned, batches of 1 at 8 x 8,
    no shuffling, a last partial batch kept unless set): iterate `.batches()`, then
    `.faults.counts` holds every fault it met, also those after its last batch (which reach no
    batch's info)."""
    from dgm_scale.data.shards.stream import ShardStream, WorkerEpoch, WorkerPosition

    settings = dict(batch_size=1, resolution=8, shuffle_buffer=0, drop_last=False, return_keys=True)
    return WorkerEpoch(ShardStream(spec, **{**settings, **options}), 0, 0, 1, WorkerPosition())


def epoch_keys(loader, consume: bool = True, limit: int | None = None) -> list[list[str]]:
    """Key lists of the batches of one epoch (marking them consumed)."""
    out = []
    for _, _, info in loader:
        out.append(info["keys"])
        if consume:
            loader.consumed(info)
        if limit is not None and len(out) == limit:
            break
    return out


def flat(batches: list[list[str]]) -> list[str]:
    return [k for b in batches for k in b]


def interrupted(spec, k: int, epochs: int = 2, **kwargs) -> list[list[str]]:
    """Batches of `epochs` epochs, stopping after k consumed batches and resuming (a new loader)."""
    loader, got, state = make(spec, **kwargs), [], None
    for _ in range(epochs):
        got += epoch_keys(loader, limit=k - len(got))
        if len(got) == k:
            state = loader.state_dict()
            break
    loader = make(spec, **kwargs)
    loader.load_state_dict(state)
    for _ in range(state["ranks"][str(kwargs.get("rank", 0))]["epoch"], epochs):
        got += epoch_keys(loader)
    return got
