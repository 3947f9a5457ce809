"""Exported samplers: `dgm-scale export` writes one (build.py, cli.py); `load_export` runs one
(runtime.py). Names load on first use: the CLI's parser imports this package without torch."""
from dgm_scale.core.imports import lazy_attributes

FORMATS = ("torchscript", "onnx", "exported")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")

_LAZY = {name: f"{__name__}.{module}" for name, module in (
    ("export_checkpoint", "build"), ("export_module", "build"),
    ("ExportedSampler", "runtime"), ("load_export", "runtime"))}
__getattr__ = lazy_attributes(__name__, _LAZY)
__all__ = ["FORMATS", "PRECISIONS", *_LAZY]
