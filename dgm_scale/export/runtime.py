"""Loading an exported sampler back: what `dgm-scale serve`, the sampling benchmark and the tests
use. The files themselves need no dgm_scale (see docs/generators.md, "Export", for the plain
PyTorch / onnxruntime lines); this adds the sidecar's checks and one calling convention.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict

import numpy as np
import torch
from torch import Tensor

from dgm_scale.core.errors import ConfigError, first_line

#: the quantized kernels an int8 export was converted for. Packed int8 weights are re-packed for
#: the engine active when the file loads, and the x86 engine's transposed convolution gives wrong
#: images (mean error 0.45 on [-1, 1] for the default generator, measured), so a loader sets it.
QUANTIZED_ENGINE = "fbgemm"


def sidecar_path(path: str | Path) -> Path:
    """FILE.json beside the export FILE."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def read_sidecar(path: str | Path) -> Dict[str, Any]:
    side = sidecar_path(path)
    if not Path(path).is_file():
        raise ConfigError(f"export '{path}' does not exist")
    try:
        return json.loads(side.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"export '{path}': its sidecar '{side}' is missing or unreadable "
                          f"({first_line(exc)})") from None


def load_runner(path: str | Path, fmt: str, precision: str) -> Callable[..., Tensor]:
    """A function of the export's inputs (CPU tensors, in the sidecar's order) -> samples (CPU
    float32 tensor), whatever the format."""
    path = str(path)
    if fmt == "torchscript":
        if precision == "int8":
            torch.backends.quantized.engine = QUANTIZED_ENGINE
        module = torch.jit.load(path, map_location="cpu")
    elif fmt == "exported":
        with open(path, "rb") as handle:  # any file name (see build._write)
            module = torch.export.load(handle).module()
    elif fmt == "onnx":
        return _onnx_runner(path)
    else:
        raise ConfigError(f"export '{path}': unknown format '{fmt}' in its sidecar")

    def run(*inputs: Tensor) -> Tensor:
        with torch.no_grad():
            return module(*inputs).float()

    return run


def _onnx_runner(path: str) -> Callable[..., Tensor]:
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError("ONNX exports run with onnxruntime: pip install 'dgm-scale[export]'") from None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    names = [item.name for item in session.get_inputs()]

    def run(*inputs: Tensor) -> Tensor:
        feeds = {name: value.cpu().numpy() for name, value in zip(names, inputs)}
        return torch.from_numpy(np.asarray(session.run(None, feeds)[0])).float()

    return run


class ExportedSampler:
    """An exported sampler and its sidecar: `sampler(**inputs)` -> samples [N, *sample_shape],
    float32 in [-1, 1]. `meta` is the sidecar (family, inputs, sample_shape, config, ...)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta = read_sidecar(path)
        self.input_names = [spec["name"] for spec in self.meta["inputs"]]
        self._run = load_runner(path, self.meta["format"], self.meta["precision"])

    def __call__(self, **inputs: Tensor) -> Tensor:
        missing = [name for name in self.input_names if name not in inputs]
        if missing or set(inputs) - set(self.input_names):
            raise ValueError(f"the export takes {self.input_names}, got {sorted(inputs)}")
        batch = self.meta.get("batch_size")
        if not self.meta.get("dynamic_batch") and batch and inputs[self.input_names[0]].shape[0] != batch:
            raise ValueError(f"this export takes batches of exactly {batch} (exported without --dynamic-batch)")
        return self._run(*(inputs[name] for name in self.input_names))


def load_export(path: str | Path) -> ExportedSampler:
    """An exported sampler with its sidecar (`dgm-scale export` wrote both)."""
    return ExportedSampler(path)
