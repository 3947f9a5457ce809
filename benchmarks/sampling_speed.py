"""Sampling speed of one checkpoint's sampler, eager and exported, with each variant's FID change.

    python benchmarks/sampling_speed.py CKPT [--device cpu|cuda] [--threads 2] [--num-fid 2000]

Rows: eager fp32 (the reference: what `dgm-scale sample` runs), `torch.compile` of it, the
TorchScript / torch.export / ONNX exports (fp32), fp16 and bf16, and the int8 export (CPU).
Columns: images/s at batch 256, latency p50 / p99 at batch 1, and FID of `--num-fid` samples
drawn from the same inputs as eager fp32's, with its change against eager fp32 (every sample is
8-bit quantized first, as `sample --out-dir` writes them). Run it alone on the machine. On a GPU
the exported files (CPU targets here) are left out; eager, compiled and reduced-precision rows run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dgm_scale.data.transforms import from_8bit, to_8bit  # noqa: E402
from dgm_scale.export import load_export  # noqa: E402
from dgm_scale.export.build import Cast, export_module  # noqa: E402
from dgm_scale.metrics.evaluation import Evaluator, eval_settings  # noqa: E402
from dgm_scale.modules import load_module  # noqa: E402

Runner = Callable[..., torch.Tensor]


def eager(network: torch.nn.Module, device: torch.device) -> Runner:
    network = network.to(device).eval()

    def run(*inputs):
        with torch.no_grad():
            return network(*(value.to(device) for value in inputs)).float()

    return run


def variants(module, device: torch.device, folder: Path) -> dict[str, Callable[[], Runner]]:
    """name -> a builder of the runner (built one at a time: the export time is not measured)."""
    network = module.export_network()
    rows: dict[str, Callable[[], Runner]] = {
        "eager fp32": lambda: eager(network, device),
        "torch.compile fp32": lambda: eager(torch.compile(network), device),
    }
    if device.type == "cpu":
        for fmt in module.export_formats:
            rows[f"{fmt} fp32"] = lambda fmt=fmt: exported(module, folder, fmt, "fp32")
        for precision in ("fp16", "bf16", "int8"):
            fmt = "torchscript" if precision == "int8" or "exported" not in module.export_formats else "exported"
            rows[f"{fmt} {precision}"] = lambda fmt=fmt, precision=precision: exported(module, folder, fmt, precision)
    else:
        for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            rows[f"eager {name}"] = lambda dtype=dtype: eager(Cast(module.export_network(), dtype), device)
    return rows


def exported(module, folder: Path, fmt: str, precision: str) -> Runner:
    path = folder / f"sampler-{fmt}-{precision}"
    export_module(module, path, fmt, precision, dynamic_batch=True, batch_size=2)
    sampler = load_export(path)
    names = sampler.input_names
    return lambda *inputs: sampler(**dict(zip(names, inputs)))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def throughput(run: Runner, inputs: tuple, device: torch.device, seconds: float) -> float:
    """Images per second at the inputs' batch size, over at least `seconds` after a warm-up."""
    run(*inputs)
    run(*inputs)
    synchronize(device)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls < 3:
        run(*inputs)
        calls += 1
    synchronize(device)
    return calls * inputs[0].shape[0] / (time.perf_counter() - start)


def latencies(run: Runner, inputs: tuple, device: torch.device, calls: int) -> tuple[float, float]:
    """p50, p99 of one call, milliseconds."""
    for _ in range(5):
        run(*inputs)
    times = []
    for _ in range(calls):
        synchronize(device)
        start = time.perf_counter()
        run(*inputs)
        synchronize(device)
        times.append(1000 * (time.perf_counter() - start))
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.99 * len(times)))]


def fid_of(run: Runner, module, evaluator: Evaluator, num: int) -> float:
    def batches():
        for start in range(0, num, 250):
            inputs = module.export_inputs(min(250, num - start), seed=0, start=start).values()
            yield from_8bit(to_8bit(run(*inputs).cpu()))

    return evaluator.score(batches())["fid"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-fid", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput measurement")
    parser.add_argument("--calls", type=int, default=200, help="batch-1 calls per latency measurement")
    parser.add_argument("--only", default="", help="only rows whose name contains this")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    module = load_module(args.checkpoint).eval()
    settings = eval_settings(module.cfg)
    settings.metrics, settings.num_samples = ["fid"], args.num_fid
    evaluator = Evaluator(settings, module.sample_shape, device)
    big, one = tuple(module.export_inputs(256, seed=1).values()), tuple(module.export_inputs(1, seed=1).values())
    print(f"{args.checkpoint}: {module.family.name}, {module.cfg.run.name}, sample shape {module.sample_shape}; "
          f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| sampler | images/s (batch 256) | vs eager fp32 | p50 ms (batch 1) | p99 ms | FID | FID change |")
    print("|---|---|---|---|---|---|---|")
    reference_speed = reference_fid = None
    with tempfile.TemporaryDirectory() as folder:
        for name, build in variants(module, device, Path(folder)).items():
            if args.only not in name:
                continue
            try:
                run = build()
                speed = throughput(run, big, device, args.seconds)
                p50, p99 = latencies(run, one, device, args.calls)
                fid = fid_of(run, module, evaluator, args.num_fid)
            except Exception as exc:  # a row that cannot run here: say why, go on
                print(f"| {name} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]} | | | | | |")
                continue
            if reference_speed is None:
                reference_speed, reference_fid = speed, fid
            print(f"| {name} | {speed:,.0f} | {speed / reference_speed:.2f}x | {p50:.2f} | {p99:.2f} | {fid:.2f} | "
                  f"{100 * (fid / reference_fid - 1):+.1f}% |", flush=True)


if __name__ == "__main__":
    main()
