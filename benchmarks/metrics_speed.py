"""FID feature extraction speed: our InceptionExtractor vs torch-fidelity 0.4.0's FeatureExtractorInceptionV3.

    python benchmarks/metrics_speed.py [--num-images 32] [--batch-size 16] [--repeats 3]
        [--size 32] [--weights PATH]

Both sides get the same weights file (random weights of the reference architecture made here,
BatchNorm calibrated on the images, saved like the real file; or `--weights`), the same uint8 RGB images (`--size` square, resized to
299 inside), the same batch size, the same threads, in the same run: the rows are interleaved
per repeat (order alternating) so load on a shared machine hits every row alike. images/s counts
the whole extraction (uint8 -> resize -> network -> pool features + unbiased logits). Rows:
- torch-fidelity: `FeatureExtractorInceptionV3(features_list=['2048', 'logits_unbiased'])`;
- ours: `InceptionExtractor.extract_uint8` as built by `build_extractor` (BatchNorm folded,
  channels_last on the CPU), the target (ratio >= 1);
- ours, exact: BatchNorm not folded, NCHW (bit-identical to torch-fidelity on the CPU), for
  information: where the speed comes from.
torch-fidelity is loaded file by file via tests/fidelity_reference.py (installed, or its wheel
fetched once by pip); torchvision is never imported.
"""
from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # run from a checkout; the test helper for the reference

from fidelity_reference import load_torch_fidelity

from dgm_scale.metrics.inception import (
    InceptionExtractor,
    load_inception,
    resize_bilinear_tf1,
)
from dgm_scale.metrics.inception_net import FIDInceptionV3


def make_weights(folder: Path, images: torch.Tensor) -> Path:
    """Random weights of the reference architecture, saved as `inception-bench-<sha256[:8]>.pth`.

    BatchNorm statistics are calibrated on a few of the benchmark images, so activations keep a
    realistic scale (default statistics shrink them layer by layer toward denormal floats,
    which run at a different speed than real weights do).
    """
    torch.manual_seed(0)
    net = FIDInceptionV3()
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # running statistics = the calibration batch's
    with torch.no_grad():
        net.train()((resize_bilinear_tf1(images[:4].float(), (299, 299)) - 128) / 128)
    scratch = folder / "weights.tmp"
    torch.save(net.state_dict(), scratch)
    path = folder / f"inception-bench-{hashlib.sha256(scratch.read_bytes()).hexdigest()[:8]}.pth"
    scratch.rename(path)
    return path


def time_extraction(extract, images: torch.Tensor, batch_size: int) -> float:
    """images/s extracting all of `images` in batches."""
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            extract(images[i:i + batch_size])
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=32, help="image side before the resize to 299")
    parser.add_argument("--weights", help="an Inception weights file (default: random, made here)")
    args = parser.parse_args()

    modules, reason = load_torch_fidelity()
    if modules is None:
        sys.exit(reason)
    images = torch.randint(0, 256, (args.num_images, 3, args.size, args.size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as scratch:
        weights = Path(args.weights) if args.weights else make_weights(Path(scratch), images)
        reference = modules["feature_extractor_inceptionv3"].FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(weights))
        ours = InceptionExtractor(load_inception(str(weights), scratch))
        exact = InceptionExtractor(load_inception(str(weights), scratch), fold_bn=False, channels_last=False)
    rows = {"torch-fidelity 0.4.0": reference, "ours (folded BN, channels_last)": ours.extract_uint8,
            "ours, exact (unfolded, NCHW)": exact.extract_uint8}

    warm = images[:args.batch_size]
    with torch.no_grad():
        their_features = reference(warm)[0]
    difference = max(((fn(warm)[0] - their_features).abs().max() / their_features.abs().max()).item()
                     for fn in (ours.extract_uint8, exact.extract_uint8))  # also the warm-up
    rates: dict[str, list[float]] = {name: [] for name in rows}
    for repeat in range(args.repeats):
        order = list(rows) if repeat % 2 == 0 else list(rows)[::-1]
        for name in order:
            rates[name].append(time_extraction(rows[name], images, args.batch_size))

    base = statistics.median(rates["torch-fidelity 0.4.0"])
    print(f"{args.num_images} uint8 RGB {args.size}x{args.size} images, batch {args.batch_size}, "
          f"{args.repeats} repeats, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"max relative feature difference vs torch-fidelity {difference:.1e}")
    print(f"| {'extractor':<32} | images/s (median) | runs | ratio vs torch-fidelity |")
    print(f"|{'-' * 34}|-------------------|------|-------------------------|")
    for name, values in rates.items():
        runs = " ".join(f"{v:.2f}" for v in values)
        print(f"| {name:<32} | {statistics.median(values):17.2f} | {runs} | "
              f"{statistics.median(values) / base:23.2f} |")


if __name__ == "__main__":
    main()
