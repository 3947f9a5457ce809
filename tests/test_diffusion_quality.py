"""benchmarks/diffusion_quality.py's NFE: the denoiser evaluations it reports for a sampler and
step count are the calls the sampler makes (counted), and its steps for an NFE budget are the
most that fit (EDM's Heun: NFE 2 N - 1, Karras et al. 2022)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from dgm_scale.families.diffusion import DiffusionLossConfig, SamplerConfig
from dgm_scale.families.diffusion.processes import build_process
from dgm_scale.families.diffusion.samplers import generate

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


SCRIPT = load_script("diffusion_quality")


def calls_made(process, sampler: str, steps: int) -> int:
    calls = []

    def denoise(x, t):
        calls.append(t)
        return torch.zeros_like(x)

    shape = (2, 1, 4, 4)
    generate(SamplerConfig(name=sampler, steps=steps), denoise, process, torch.randn(shape), lambda k: torch.randn(shape))
    return len(calls)


@pytest.mark.parametrize("objective", ["eps", "edm", "flow"])
@pytest.mark.parametrize("sampler", SCRIPT.SAMPLERS)
def test_the_reported_nfe_is_what_the_sampler_calls(objective, sampler):
    process = build_process(DiffusionLossConfig(objective=objective), SamplerConfig())
    for steps in (1, 2, 5, 10, 25):
        assert SCRIPT.nfe_of(process, sampler, steps) == calls_made(process, sampler, steps), steps


@pytest.mark.parametrize("objective", ["eps", "edm", "flow"])
def test_heuns_steps_are_the_most_within_the_budget(objective):
    process = build_process(DiffusionLossConfig(objective=objective), SamplerConfig())
    for budget in (10, 20, 50):
        steps = SCRIPT.steps_for(process, "heun", budget)
        assert calls_made(process, "heun", steps) <= budget < calls_made(process, "heun", steps + 1)
        if objective == "edm":  # every step but the last is corrected on EDM's grid
            assert steps == (budget + 1) // 2
        assert SCRIPT.steps_for(process, "euler", budget) == budget


def test_the_sampling_speed_rows_sample_as_the_eager_denoiser_does():
    """benchmarks/diffusion_sampling_speed.py on an untrained tiny model: a row per sampler and NFE
    target within its budget, and the compiled denoiser's samples are the eager one's (dynamo's
    `eager` backend here: the graph capture without inductor's compile time)."""
    from dgm_scale.config import load_config
    from dgm_scale.modules import build_module
    from helpers import TINY_RUN

    speed = load_script("diffusion_sampling_speed")
    module = build_module(load_config(overrides=[*TINY_RUN, "model.kind=diffusion", "loss.objective=edm",
                                                 "model.denoiser.width=8", "model.denoiser.channel_mult=[1,2]",
                                                 "model.denoiser.blocks=1"])).eval()
    eager = module.sample_batch(3, seed=5, sampler="heun", steps=4)
    rows = speed.measure(module, ["euler", "heun"], [3, 6], batch=2, seconds=0.0, backend="eager")
    assert [(row["sampler"], row["nfe"] <= target) for row, target in zip(rows, [3, 6, 3, 6])] == \
        [("euler", True), ("euler", True), ("heun", True), ("heun", True)]
    assert all(row["eager"] > 0 and row["compiled"] > 0 for row in rows)
    assert type(module.sampling_network()).__name__ == "OptimizedModule"
    torch.testing.assert_close(module.sample_batch(3, seed=5, sampler="heun", steps=4), eager, rtol=1e-5, atol=1e-5)
