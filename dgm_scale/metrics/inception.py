"""FID's InceptionV3 feature extractor, computing what torch-fidelity 0.4.0's `FeatureExtractorInceptionV3`
computes (within float32 tolerance), for FID/KID ('2048' pool features) and IS ('logits_unbiased').

The input contract is torch-fidelity's: uint8 RGB images of any size, resized to 299x299 with
TensorFlow 1.x's bilinear resize (no half-pixel centres, no antialiasing; the original FID graph
resized that way, and torch's `interpolate` differs), then scaled by (x - 128) / 128. The network
runs in float32 (torch-fidelity's default), by default with the BatchNorms folded into the
convolutions and, on the CPU, in channels_last layout (oneDNN's fast path): the same result up to
float32 rounding, ~1.8x faster on 2 CPU cores.

Weights: `load_inception(path_or_url, cache_dir)` takes a local file or an http(s)/file URL
(downloaded once into cache_dir), checks the sha256 prefix in the file name as torch.hub does
(`...-6726825d.pth`), and loads the state dict strictly. Default: torch-fidelity's release of the
2015-12-05 weights.
"""
from __future__ import annotations

import hashlib
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dgm_scale.core.errors import first_line
from dgm_scale.core.files import atomic_open
from dgm_scale.metrics.extractors import Extracted, FeatureExtractor, to_uint8
from dgm_scale.metrics.inception_net import FIDInceptionV3, fold_batchnorm

# torch-fidelity 0.4.0's URL_INCEPTION_V3 (converted from TensorFlow's 2015-12-05 graph).
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
INPUT_SIZE = 299
# torch.hub's convention: `name-<first 8+ hex digits of the sha256>.ext`. torch.hub accepts any
# number of digits; we ask for 8 or more so that names like `model-2015.pth` are not read as hashes.
HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.")


class InceptionWeightsError(ValueError):
    """The Inception weights are missing, unreadable, fail their checksum or do not fit the network."""


# ------------------------------------------------------------------------------------ resize
def resize_bilinear_tf1(images: Tensor, size: tuple[int, int]) -> Tensor:
    """TensorFlow 1.x `resize_bilinear` (align_corners=False): float [N, C, H, W] -> [N, C, *size].

    Output pixel i samples the input at i * in / out (no half-pixel offset), clamping the upper
    neighbour at the border. The arithmetic is torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x`
    (method "slow") op for op, so the result is bit-identical: positions in the input dtype times
    the float32 scale, truncation to the lower neighbour, then lerp along x and then along y as
    a + (b - a) * t. Rows are gathered once and reused for both x gathers (theirs gathers twice).
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"resize_bilinear_tf1 needs float images [N, C, H, W], got {images.dtype} "
                         f"{tuple(images.shape)}")

    def sample_points(out_size: int, in_size: int) -> tuple[Tensor, Tensor, Tensor]:
        scale = torch.tensor(in_size / out_size, dtype=torch.float32)
        position = torch.arange(out_size, dtype=images.dtype, device=images.device) * scale
        low = position.long()
        high = (low + 1).clamp_max(in_size - 1)
        return low, high, position - low.float()

    y_low, y_high, dy = sample_points(size[0], images.shape[2])
    x_low, x_high, dx = sample_points(size[1], images.shape[3])
    dx, dy = dx.view(1, 1, 1, -1), dy.view(1, 1, -1, 1)
    top, bottom = images.index_select(2, y_low), images.index_select(2, y_high)
    top_left, top_right = top.index_select(3, x_low), top.index_select(3, x_high)
    bottom_left, bottom_right = bottom.index_select(3, x_low), bottom.index_select(3, x_high)
    upper = top_left + (top_right - top_left) * dx
    lower = bottom_left + (bottom_right - bottom_left) * dx
    return upper + (lower - upper) * dy


# ----------------------------------------------------------------------------------- weights
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_hash_prefix(name: str, sha256: str, source: str) -> None:
    """Raise unless the file's sha256 starts with the hex prefix in its name (when it has one)."""
    match = HASH_IN_NAME.search(name)
    if match and not sha256.startswith(match.group(1)):
        raise InceptionWeightsError(f"Inception weights {source}: sha256 {sha256[:16]}... does not start "
                                    f"with {match.group(1)} (the prefix in the file name); corrupt or wrong file")


def _download(url: str, cache_dir: Path) -> Path:
    """url -> cache_dir/<its file name>; a file already there is reused without network.

    The bytes go to a temporary file in cache_dir, are checked against the name's hash prefix,
    and only then renamed into place (core.files.atomic_open), so the cache never holds a partial file.
    """
    name = Path(urllib.parse.urlparse(url).path).name
    if not name:
        raise InceptionWeightsError(f"Inception weights URL {url} has no file name")
    target = cache_dir / name
    if target.exists():
        return target
    try:
        digest = hashlib.sha256()
        with atomic_open(target, "wb", unique=True) as out, urllib.request.urlopen(url, timeout=60) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
            _check_hash_prefix(name, digest.hexdigest(), url)  # before the file takes its name
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise InceptionWeightsError(f"could not download Inception weights from {url}: {error}") from error
    return target


def _check_state_dict(state: Any, model: nn.Module, source: str) -> None:
    """Raise naming the first missing, unexpected or wrongly shaped key."""
    if not isinstance(state, dict):
        raise InceptionWeightsError(f"Inception weights {source}: expected a state dict, got {type(state).__name__}")
    expected = model.state_dict()
    # BatchNorm fills a missing counter itself (pytorch-fid's file has none); it is no weight.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        first = f"missing key '{missing[0]}'" if missing else f"unexpected key '{unexpected[0]}'"
        raise InceptionWeightsError(f"Inception weights {source} do not fit FID InceptionV3: {first} "
                                    f"({len(missing)} missing, {len(unexpected)} unexpected)")
    for key, value in state.items():
        if not isinstance(value, Tensor) or value.shape != expected[key].shape:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise InceptionWeightsError(f"Inception weights {source} do not fit FID InceptionV3: '{key}' has "
                                        f"shape {shape}, expected {tuple(expected[key].shape)}")


def load_inception(path_or_url: str | None = None, cache_dir: str | Path = "~/.cache/dgm_scale") -> FIDInceptionV3:
    """FID InceptionV3 in eval mode (float32, CPU, no grad) from a file or URL (None: torch-fidelity's).

    The returned module carries `weights_sha256` (the file's full sha256) and `weights_source`.
    Raises InceptionWeightsError (one line, naming the file or URL) when the file is missing,
    unreadable, fails the hash prefix in its name, or does not fit the network.
    """
    source = path_or_url or INCEPTION_URL
    if re.match(r"^(https?|file)://", source):
        path = _download(source, Path(cache_dir).expanduser())
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise InceptionWeightsError(f"Inception weights {source}: no such file")
    try:
        sha256 = _sha256(path)
    except OSError as error:
        raise InceptionWeightsError(f"Inception weights {path}: unreadable ({error})") from error
    _check_hash_prefix(path.name, sha256, str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for a bad file
        raise InceptionWeightsError(f"Inception weights {path}: not a readable torch file ({first_line(error)})") from error
    with torch.device("meta"):  # no random init of 24M parameters that are overwritten next
        model = FIDInceptionV3()
    _check_state_dict(state, model, str(path))
    counters = {k: torch.zeros((), dtype=torch.long) for k in model.state_dict() if k not in state}
    model.load_state_dict({**state, **counters}, strict=True, assign=True)
    model.weights_sha256, model.weights_source = sha256, source
    return model.float().eval().requires_grad_(False)


def _state_dict_sha256(model: nn.Module) -> str:
    """sha256 of a model's tensors (names, dtypes, shapes, bytes): the key of weights built in memory."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------- extractor
class InceptionExtractor(FeatureExtractor):
    """Model-space images [N, C in {1, 3}, H, W] in [-1, 1] -> Extracted(pool features [N, 2048],
    logits_unbiased [N, 1008]), both float32, as torch-fidelity extracts them from uint8 images.

    fold_bn: run a copy with the BatchNorms folded into the convolutions (see `fold_batchnorm`).
    channels_last: run the convolutions in NHWC layout, weights and activations (None: on the CPU
    only, where oneDNN runs it faster). Both change only float32 rounding (~1e-6 relative); with
    both off the CPU result is bit-identical to torch-fidelity's. Measured on 2 CPU cores: ~1.8x.
    """

    name = "inception-v3-compat"
    feature_dim = 2048
    has_logits = True

    def __init__(self, net: FIDInceptionV3, fold_bn: bool = True, channels_last: bool | None = None):
        super().__init__()
        # Computed once: the file's sha256 when loaded by load_inception, else the tensors' own.
        self.weights_sha256: str = getattr(net, "weights_sha256", None) or _state_dict_sha256(net)
        net = net.float().eval().requires_grad_(False)
        self.net = fold_batchnorm(net) if fold_bn else net
        self.channels_last = channels_last
        self._layout = torch.contiguous_format  # the weights' current memory format

    def key(self) -> dict[str, Any]:
        return {"name": self.name, "weights_sha256": self.weights_sha256, "resize": "tf1-bilinear-299"}

    def _memory_format(self, device: torch.device) -> torch.memory_format:
        """The layout for this device; the weights are converted (once) when it changes."""
        nhwc = self.channels_last if self.channels_last is not None else device.type == "cpu"
        layout = torch.channels_last if nhwc else torch.contiguous_format
        if layout != self._layout:
            self.net.to(memory_format=layout)
            self._layout = layout
        return layout

    @torch.no_grad()
    def extract_uint8(self, images: Tensor) -> Extracted:
        """uint8 images [N, C in {1, 3}, H, W] (torch-fidelity's input) -> Extracted, on images.device."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"extract_uint8 needs uint8 images [N, 1 or 3, H, W], got {images.dtype} "
                             f"{tuple(images.shape)}")
        device = self.net.fc.weight.device
        x = images.to(device).float().expand(-1, 3, -1, -1)  # grey -> RGB: the same plane three times
        x = resize_bilinear_tf1(x, (INPUT_SIZE, INPUT_SIZE))
        x = (x - 128) / 128  # torch-fidelity's form; bit-equal to the graph's (x - 128) * 0.0078125
        features, logits = self.net(x.contiguous(memory_format=self._memory_format(device)))
        return Extracted(features.float().to(images.device), logits.float().to(images.device))

    def extract(self, samples: Tensor) -> Extracted:
        if samples.ndim != 4 or samples.shape[1] not in (1, 3):
            raise ValueError(f"InceptionExtractor needs images [N, 1 or 3, H, W], got {tuple(samples.shape)}")
        return self.extract_uint8(to_uint8(samples))
