"""Shard streaming vs a folder of PNGs, measured in the same run; then memory as data grows.

    python benchmarks/data_throughput.py [--samples 20000] [--size 32] [--resolution 32]
        [--batch 256] [--workers 2] [--repeats 3] [--rss-samples 10000 100000]

1. Throughput (samples/s, median of `--repeats` interleaved runs, timed from the first batch to
   the end of an epoch so worker start-up is excluded on both sides) and CPU time per sample
   (main process + workers, whole epoch; steadier than samples/s on a shared machine):
   - folder: `ImageFolderDataset` (our folder dataset: decode, EXIF transpose, resize /
     centre crop, per-sample tensors, default collate) in a shuffling DataLoader;
   - shards: `ShardStream` over the same PNG bytes stored one image per member (`.png` +
     `.cls`, our writer's layout), same decode function, workers and batch size.
   Both decode every image with `transforms.decode_square` (libspng for plain 8-bit PNGs when
   pyspng is installed, else PIL; `--pil` forces PIL on both sides). The images are random
   `--size` crops of scikit-learn's two bundled photos, so PNG sizes are realistic.
   - for information, not the target: shards holding the same pixels as `.npy` members (the
     writer's `encoding=npy`): no PNG decode at all, so not the same decode.
2. Tar parsing alone: our `tario` vs `tarfile` on one shard (microseconds per member).
3. Peak RSS while streaming `--rss-samples` samples (one epoch, 2 workers, each in a fresh
   subprocess): main process and largest worker, and the growth between the two sizes.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Iterable, List, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

# Run from a checkout without installing: the repository root first on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dgm_scale.data import transforms  # noqa: E402
from dgm_scale.data.datasets import ImageFolderDataset  # noqa: E402
from dgm_scale.data.shards.manifest import sha256_file  # noqa: E402
from dgm_scale.data.shards.loader import make_stream_loader  # noqa: E402
from dgm_scale.data.shards.stream import ShardStream  # noqa: E402
from dgm_scale.data.shards.tario import iter_members  # noqa: E402

SHARD_SIZE = 1000


# ----------------------------------------------------------------------------- data
def photo_crops(count: int, size: int, seed: int = 0) -> List[bytes]:
    """`count` PNG-encoded random size x size crops of sklearn's two sample photos."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        photo = photos[rng.integers(len(photos))]
        top = rng.integers(photo.shape[0] - size)
        left = rng.integers(photo.shape[1] - size)
        buffer = io.BytesIO()
        Image.fromarray(photo[top:top + size, left:left + size]).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def write_folder(root: Path, images: List[bytes]) -> List[Tuple[Path, int]]:
    """root/<label>/<index>.png with label = index % 10; returns (path, label) pairs."""
    samples = []
    for i, data in enumerate(images):
        path = root / str(i % 10) / f"{i:09d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        samples.append((path, i % 10))
    return samples


def as_npy(png: bytes) -> bytes:
    """The decoded pixels of a PNG as a `.npy` payload (uint8 [H, W, 3])."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
    return buffer.getvalue()


def write_shards(root: Path, images: Iterable[bytes], total: int, ext: str = "png") -> None:
    """Shards of SHARD_SIZE samples (`.<ext>` + `.cls`, ustar, mtime 0) and a manifest."""
    root.mkdir(parents=True, exist_ok=True)
    images, entries = iter(images), []
    for shard in range(-(-total // SHARD_SIZE)):
        name = f"bench-{shard:06d}.tar"
        first = shard * SHARD_SIZE
        count = min(SHARD_SIZE, total - first)
        with tarfile.open(root / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(first, first + count):
                for suffix, data in ((ext, next(images)), ("cls", str(i % 10).encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{suffix}")
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
        # The same PNG bytes as the folder (our writer would re-encode them): a manifest as it writes one.
        entries.append({"name": name, "num_samples": count, "bytes": (root / name).stat().st_size,
                        "sha256": sha256_file(root / name)})
    (root / "manifest.json").write_text(json.dumps({
        "format": "dgm_scale.shards/1", "name": "bench", "num_samples": total,
        "encoding": ext, "shards": entries, "image": {}, "labels": {"num_classes": 10}}))


# ----------------------------------------------------------------------------- timing
def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the joined loader workers)."""
    own, children = (resource.getrusage(who) for who in
                     (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed_epoch(loader: Iterable) -> Tuple[float, float]:
    """(samples/s from the first batch to the end of one pass, so start-up is excluded;
    CPU microseconds per sample of main + workers over the whole pass, start-up included)."""
    cpu, start, seen, total = cpu_seconds(), None, 0, 0
    for batch in loader:
        total += batch[0].shape[0]
        if start is None:
            start = time.perf_counter()
            continue
        seen += batch[0].shape[0]
    rate = seen / (time.perf_counter() - start)
    del loader  # joins the (non-persistent) workers, so their CPU time is counted
    return rate, (cpu_seconds() - cpu) / total * 1e6


def folder_loader(samples, args) -> DataLoader:
    dataset = ImageFolderDataset(samples, [str(i) for i in range(10)], 3, args.resolution)
    return DataLoader(dataset, batch_size=args.batch, shuffle=True, drop_last=True,
                      num_workers=args.workers, persistent_workers=False)


def shard_loader(root: Path, args, spec: str = ""):
    stream = ShardStream(spec or str(root), batch_size=args.batch, resolution=args.resolution,
                         channels=3, shuffle_buffer=1000)
    return make_stream_loader(stream, num_workers=args.workers, persistent_workers=False)


def parse_speed(shard: Path) -> Tuple[float, float]:
    """Microseconds per member: (tario, tarfile), reading every payload of one shard."""
    raw = shard.read_bytes()
    start = time.perf_counter()
    ours = sum(1 for _ in iter_members(io.BufferedReader(io.BytesIO(raw))))
    ours_us = (time.perf_counter() - start) / ours * 1e6
    start = time.perf_counter()
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r|") as tar:
        ref = sum(1 for m in tar if m.isreg() and tar.extractfile(m).read() is not None)
    return ours_us, (time.perf_counter() - start) / ref * 1e6


# ----------------------------------------------------------------------------- memory
def rss_child(spec: str, samples: int) -> None:
    """(Subprocess) stream one epoch of `spec`; print peak RSS of main and workers in MiB."""
    stream = ShardStream(spec, batch_size=256, resolution=32, shuffle_buffer=1000,
                         drop_last=False)
    loader = make_stream_loader(stream, num_workers=2, persistent_workers=False)
    seen = sum(batch[0].shape[0] for batch in loader)
    main = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"samples": seen, "main_mib": main, "worker_mib": workers,
                      "expected": samples}))


def peak_rss(root: Path, samples: int) -> dict:
    spec = f"{root}/bench-{{000000..{samples // SHARD_SIZE - 1:06d}}}.tar"
    out = subprocess.run([sys.executable, __file__, "--rss-child", spec, str(samples)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--size", type=int, default=32, help="source image side")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rss-samples", type=int, nargs="*", default=[10000, 100000])
    parser.add_argument("--pil", action="store_true", help="decode with PIL on both sides (no libspng)")
    parser.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pil:  # both loaders share transforms.decode_square; forked workers inherit this
        transforms.pyspng = None
    if args.rss_child:
        return rss_child(args.rss_child[0], int(args.rss_child[1]))
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="dgm_bench_") as tmp:
        run(Path(tmp), args)


def run(tmp: Path, args) -> None:
    images = photo_crops(args.samples, args.size)
    samples = write_folder(tmp / "folder", images)
    write_shards(tmp / "shards", images, args.samples)
    write_shards(tmp / "npy", (as_npy(png) for png in images), args.samples, ext="npy")
    loaders = {
        "folder of PNGs (ImageFolderDataset)": lambda: folder_loader(samples, args),
        "shards, PNG members (ShardStream)": lambda: shard_loader(tmp / "shards", args),
        "shards, npy members (other decode)": lambda: shard_loader(tmp / "npy", args),
    }
    rates = {name: [] for name in loaders}
    cpu = {name: [] for name in loaders}
    for _ in range(args.repeats):  # interleaved, so machine noise hits every loader alike
        for name, build in loaders.items():
            rate, cpu_us = timed_epoch(build())
            rates[name].append(rate)
            cpu[name].append(cpu_us)
    decoder = "PIL" if transforms.pyspng is None else "libspng (pyspng) for plain PNGs"
    print(f"\ndecode on both sides: {decoder}")
    print(f"\n{args.samples} RGB {args.size}x{args.size} PNGs -> {args.resolution}x"
          f"{args.resolution}, batch {args.batch}, {args.workers} workers, {os.cpu_count()} CPUs, "
          f"median of {args.repeats}\n")
    print("| loader | samples/s | runs | CPU us/sample |\n|---|---|---|---|")
    for name, values in rates.items():
        runs = ", ".join(f"{v:,.0f}" for v in values)
        print(f"| {name} | {statistics.median(values):,.0f} | {runs} | "
              f"{statistics.median(cpu[name]):.0f} |")
    speed = [statistics.median(v) for v in rates.values()]
    work = [statistics.median(v) for v in cpu.values()]
    print(f"| ratio PNG shards / folder (same decode; target >= 2) | {speed[1] / speed[0]:.2f} | "
          f"| {work[0] / work[1]:.2f} |")
    print(f"| ratio npy shards / folder (no PNG decode) | {speed[2] / speed[0]:.2f} | | "
          f"{work[0] / work[2]:.2f} |")
    ours, ref = parse_speed(tmp / "shards" / "bench-000000.tar")
    print(f"\ntar parsing, us per member: tario {ours:.1f}, tarfile {ref:.1f} "
          f"({ref / ours:.1f}x)")
    report_memory(tmp / "rss", args.rss_samples, images)


def report_memory(root: Path, sizes: List[int], images: List[bytes]) -> None:
    if not sizes:
        return
    total = max(sizes)
    write_shards(root, (images[i % len(images)] for i in range(total)), total)
    print("\n| samples streamed | peak RSS main, MiB | peak RSS worker, MiB |\n|---|---|---|")
    peaks = []
    for n in sizes:
        peak = peak_rss(root, n)
        assert peak["samples"] == n, peak
        peaks.append(peak["main_mib"] + peak["worker_mib"])
        print(f"| {n:,} | {peak['main_mib']:.0f} | {peak['worker_mib']:.0f} |")
    growth = 100 * (peaks[-1] / peaks[0] - 1)
    print(f"\npeak RSS growth (main + largest worker) {sizes[0]:,} -> {sizes[-1]:,}: "
          f"{growth:+.1f}% (target <= 10%)")


if __name__ == "__main__":
    main()
