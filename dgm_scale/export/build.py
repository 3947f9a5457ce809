"""`dgm-scale export`: a trained sampler as one file that runs without dgm_scale.

The family gives a self-contained network (`export_network`: the EMA generator, the VAE's decoder
and its mean map) and its inputs (`export_inputs`: latents, labels); this traces it in the asked
precision, writes the file and a JSON sidecar, loads the file back and checks it against the eager
network on inputs it was not traced with, before anything appears under the output name.
"""
from __future__ import annotations

import copy
import datetime
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from dgm_scale.core.errors import ConfigError, described, first_line
from dgm_scale.core.files import atomic_path, write_json_atomic
from dgm_scale.export import FORMATS, PRECISIONS
from dgm_scale.export.runtime import QUANTIZED_ENGINE, load_runner, sidecar_path

SUFFIXES = {"torchscript": ".pt", "onnx": ".onnx", "exported": ".pt2"}
#: the largest batch a --dynamic-batch ONNX / exported file is declared for
MAX_BATCH = 65536
#: how far the file may be from the eager network of the same precision (fp32: the issue's bound)
TOLERANCE = {"torchscript": 1e-5, "exported": 1e-5, "onnx": 1e-4}
CALIBRATION_SEED = 2_000_003  # not a seed anyone samples with: calibration data differs from scored data


class Cast(nn.Module):
    """Runs `network` in `dtype` and answers float32: the exported file's inputs and outputs are
    float32 latents and images whatever precision it computes in."""

    def __init__(self, network: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.network = network.to(dtype)
        self.dtype = dtype

    def forward(self, latents: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        inputs = (latents.to(self.dtype),) if labels is None else (latents.to(self.dtype), labels)
        return self.network(*inputs).float()


def quantize_int8(network: nn.Module, calibration: list[tuple[Tensor, ...]]) -> nn.Module:
    """Post-training static int8 quantization (torch.ao FX graph mode, fbgemm kernels): weights
    per channel where the kernels allow, activations per tensor with ranges observed on the
    network's own activations over the calibration batches; batch norm folded into the convolutions.

    torch.ao rather than torchao: its CPU int8 convolution and transposed-convolution kernels ship
    inside PyTorch, so the file loads with plain torch; torchao's int8 paths target Linear layers
    and GPUs. fbgemm rather than x86: see runtime.QUANTIZED_ENGINE."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = QUANTIZED_ENGINE
    with warnings.catch_warnings():  # torch.ao's deprecation notices, one per call
        warnings.simplefilter("ignore")
        try:
            prepared = prepare_fx(copy.deepcopy(network).eval(), get_default_qconfig_mapping(QUANTIZED_ENGINE),
                                  calibration[0])
        except Exception as exc:  # a network FX cannot trace (data-dependent Python control flow)
            raise ConfigError(f"--precision int8: the network does not trace for quantization: "
                              f"{first_line(exc)}") from None
        with torch.no_grad():
            for batch in calibration:
                prepared(*batch)
        return convert_fx(prepared)


def _dynamic_shapes(names: list[str], dynamic: bool) -> Optional[tuple]:
    if not dynamic:
        return None
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    return tuple({0: batch} for _ in names)


def _write(network: nn.Module, example: tuple[Tensor, ...], names: list[str], fmt: str, path: Path,
           dynamic: bool) -> None:
    """The network traced on `example`, written to `path` in `fmt`."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(network, example, check_trace=False), str(path))
        elif fmt == "exported":
            program = torch.export.export(network, example, dynamic_shapes=_dynamic_shapes(names, dynamic))
            with open(path, "wb") as handle:  # a file object: a path not ending in .pt2 (the
                torch.export.save(program, handle)  # temporary name) makes torch warn it is no package
        else:
            _write_onnx(network, example, names, path, dynamic)


def _write_onnx(network: nn.Module, example: tuple[Tensor, ...], names: list[str], path: Path, dynamic: bool) -> None:
    try:
        import onnx  # noqa: F401  (torch.onnx's exporter needs onnx and onnxscript)
        import onnxscript  # noqa: F401
    except ImportError:
        raise ConfigError("--format onnx needs onnx, onnxscript and onnxruntime: pip install 'dgm-scale[export]'") from None
    import logging

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    torch.onnx.export(network, example, str(path), input_names=names, output_names=["samples"],
                      dynamic_shapes=_dynamic_shapes(names, dynamic), dynamo=True, verbose=False,
                      external_data=False)


def _check(path: Path, fmt: str, precision: str, reference: nn.Module, inputs: tuple[Tensor, ...]) -> float:
    """Max |file - eager| on `inputs`; a file that does not load or run is a one-line error."""
    try:
        got = load_runner(path, fmt, precision)(*inputs)
    except Exception as exc:
        raise ConfigError(f"--format {fmt} --precision {precision}: the written file does not run "
                          f"({described(exc)})") from None
    with torch.no_grad():
        expected = reference(*inputs).float()
    if got.shape != expected.shape:
        raise ConfigError(f"--format {fmt}: the file answers shape {tuple(got.shape)}, the network {tuple(expected.shape)}")
    return float((got - expected).abs().max())


def export_module(module, out: str | Path, fmt: str = "torchscript", precision: str = "fp32",
                  dynamic_batch: bool = False, batch_size: int = 1, variant: str = "",
                  calibration_batches: int = 8, checkpoint: str = "") -> Dict[str, Any]:
    """Write `module`'s sampler to `out` (and `out`.json); returns the sidecar. The file appears
    only once it loaded back and matched the eager network (fp32: within TOLERANCE)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format '{fmt}': choose one of {', '.join(FORMATS)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision '{precision}': choose one of {', '.join(PRECISIONS)}")
    if precision == "int8" and fmt != "torchscript":
        raise ConfigError(f"--precision int8 is written as --format torchscript only (torch.ao's quantized "
                          f"kernels have no {fmt} form here), got --format {fmt}")
    if fmt not in module.export_formats:
        raise ConfigError(f"--format {fmt}: the {module.family.name} family exports as "
                          f"{' or '.join(module.export_formats)}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    try:
        network = module.export_network(variant)
    except NotImplementedError as exc:
        raise ConfigError(str(exc)) from None
    names = list(module.export_inputs(1))
    # (a dynamic batch is traced at 2 or more: torch.export fixes a dimension it sees as 1)
    example = tuple(module.export_inputs(max(batch_size, 2) if dynamic_batch else batch_size,
                                         seed=CALIBRATION_SEED).values())
    # checked on other samples, and on another batch size when the batch is dynamic
    check_size = batch_size + 3 if dynamic_batch else batch_size
    check = tuple(module.export_inputs(check_size, seed=1).values())
    if precision == "int8":
        calibration = [tuple(module.export_inputs(256, CALIBRATION_SEED, 256 * i).values())
                       for i in range(calibration_batches)]
        traced = quantize_int8(network, calibration)
    elif precision == "fp32":
        traced = network
    else:
        traced = Cast(copy.deepcopy(network), {"fp16": torch.float16, "bf16": torch.bfloat16}[precision])
    traced.eval()
    out = Path(out)
    with atomic_path(out) as tmp:  # the file appears only when every check passed
        try:
            _write(traced, example, names, fmt, tmp, dynamic_batch)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"--format {fmt} --precision {precision}: export failed "
                              f"({described(exc)})") from None
        error = _check(tmp, fmt, precision, traced, check)
        if precision in ("fp32", "int8") and error > TOLERANCE[fmt]:
            raise ConfigError(f"--format {fmt}: the written file differs from the network by {error:.2e} "
                              f"(> {TOLERANCE[fmt]:.0e}); not written")
        with torch.no_grad():
            drift = float((traced(*check).float() - network(*check).float()).abs().max())
        meta = _sidecar(module, fmt, precision, dynamic_batch, batch_size, variant, names, checkpoint,
                        error, drift)
        write_json_atomic(sidecar_path(out), meta)
    return meta


def _sidecar(module, fmt: str, precision: str, dynamic: bool, batch_size: int, variant: str,
             names: list[str], checkpoint: str, error: float, drift: float) -> Dict[str, Any]:
    from dgm_scale import __version__

    example = module.export_inputs(1)
    batch = "batch" if dynamic else batch_size
    inputs = [{"name": name, "shape": [batch, *value.shape[1:]], "dtype": str(value.dtype).replace("torch.", "")}
              for name, value in example.items()]
    return {
        "format": fmt, "precision": precision, "family": module.family.name, "modality": module.modality,
        "variant": variant, "inputs": inputs,
        "output": {"name": "samples", "shape": [batch, *module.sample_shape], "dtype": "float32",
                   "value_range": [-1.0, 1.0]},
        "latent_dim": getattr(module, "latent_dim", None), "num_classes": int(module.num_classes),
        "sample_shape": list(module.sample_shape), "dynamic_batch": dynamic, "batch_size": batch_size,
        "quantized_engine": QUANTIZED_ENGINE if precision == "int8" else None,
        "check": {"max_abs_diff_file_vs_network": error, "max_abs_diff_vs_fp32": drift},
        "checkpoint": str(checkpoint), "iteration": int(getattr(module, "checkpoint_iteration", 0)),
        "config": module.hparams["config"],
        "torch_version": torch.__version__, "dgm_scale_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def export_checkpoint(checkpoint: str | Path, out: Optional[str | Path] = None, fmt: str = "torchscript",
                      **options: Any) -> tuple[Path, Dict[str, Any]]:
    """`dgm-scale export CKPT`: load the checkpoint, export its sampler; (path written, sidecar)."""
    from dgm_scale.modules import load_module

    module = load_module(checkpoint, trust_code=options.pop("trust_code", False)).cpu().eval()
    if options.get("variant", "") not in module.sampler_variants():
        raise ConfigError(f"--variant '{options['variant']}': this model has {sorted(module.sampler_variants())}")
    if out is None:
        out = Path(checkpoint).with_name(Path(checkpoint).stem + f"-{options.get('precision', 'fp32')}"
                                         + SUFFIXES.get(fmt, ""))
    meta = export_module(module, out, fmt, checkpoint=str(checkpoint), **options)
    return Path(out), meta
