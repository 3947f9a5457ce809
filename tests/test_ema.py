"""The EMA generator: ramped decay, batch-norm statistics of its own, both generators scored."""
import json
import math

import pytest
import torch
from torch import nn

from dgm_scale.config import load_config
from dgm_scale.modules import build_module, load_module
from dgm_scale.modules.ema import make_ema_copy, ramped_decay, standing_statistics, update_ema
from dgm_scale.training import train
from helpers import TINY


def test_the_decay_ramps_up_to_its_cap():
    # half-life rampup * step until it reaches the cap's (0.999: ~693 steps)
    for step in (1, 10, 100, 1000):
        assert ramped_decay(0.999, 0.05, step) == pytest.approx(min(0.999, 0.5 ** (1 / (0.05 * step))))
    assert ramped_decay(0.999, 0.05, 10**6) == 0.999
    assert ramped_decay(0.999, 0.0, 3) == 0.999  # no ramp: the fixed decay
    half_life = math.log(0.5) / math.log(ramped_decay(0.999, 0.05, 2000))
    assert half_life == pytest.approx(100)


def test_standing_statistics_are_the_plain_average_of_the_batches():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    net.eval()
    batches = [(torch.randn(16, 3) * (i + 1),) for i in range(3)]
    assert standing_statistics(net, batches)
    hidden = [net[0](x) for (x,) in batches]
    with torch.no_grad():
        torch.testing.assert_close(net[1].running_mean, torch.stack([h.mean(0) for h in hidden]).mean(0))
        torch.testing.assert_close(net[1].running_var, torch.stack([h.var(0) for h in hidden]).mean(0))
    assert not net.training and net[1].momentum == 0.1  # mode and momentum restored
    assert not standing_statistics(nn.Linear(2, 2), batches)  # nothing to do without batch norm


def test_ema_parameters_average_and_batchnorm_statistics_are_not_copied():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = make_ema_copy(net)
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net[1].running_mean.fill_(5.0)
    update_ema(ema, net, decay=0.75)
    torch.testing.assert_close(ema[0].weight, net[0].weight - 0.75)
    assert torch.equal(ema[1].running_mean, torch.zeros(2))  # its own, recomputed before it samples
    update_ema(ema, net, decay=0.75, copy_batchnorm=True)  # model.ema_bn_batches=0: the old behaviour
    assert torch.equal(ema[1].running_mean, torch.full((2,), 5.0))


def test_the_ema_generator_samples_with_its_own_statistics_and_checkpoints_them(tmp_path):
    cfg = load_config(overrides=TINY + ["trainer.max_steps=4", "eval.at_end=true", "eval.num_samples=100",
                                        f"run.dir={tmp_path / 'run'}"])
    result = train(cfg)
    module = result.module
    stored = torch.load(result.checkpoint, weights_only=True)["state_dict"]
    # what the checkpoint holds are the statistics recomputed for the EMA weights, not G's
    fresh = load_module(result.checkpoint)
    fresh._ema_statistics_fresh = False
    fresh.refresh_ema_statistics()
    for name, buffer in fresh.generator_ema.named_buffers():
        torch.testing.assert_close(stored[f"generator_ema.{name}"], buffer, msg=name)
    assert not torch.equal(stored["generator_ema.body.2.running_mean"], stored["generator.body.2.running_mean"])
    # both generators scored, logged and drawn side by side
    record = json.loads((result.run_dir / "eval" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"fid", "raw/fid"} <= set(record) and record["fid"] != record["raw/fid"]
    assert {"eval/fid", "eval_raw/fid"} <= set((result.run_dir / "metrics.csv").read_text().splitlines()[0].split(","))
    html = (result.run_dir / "report.html").read_text()
    assert "EMA generator" in html and "raw generator" in html
    assert module.sample(4, seed=1, variant="raw").shape == (4, 1, 8, 8)
    assert not torch.equal(module.sample(4, seed=1), module.sample(4, seed=1, variant="raw"))


def test_sampling_from_a_module_recomputes_stale_statistics():
    module = build_module(load_config(overrides=TINY))
    with torch.no_grad():
        for layer in module.generator_ema.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.fill_(100.0)  # as copied from other weights
    first = module.sample(4, seed=0)
    assert all(float(layer.running_mean.abs().max()) < 100 for layer in module.generator_ema.modules()
               if isinstance(layer, nn.BatchNorm2d))
    torch.testing.assert_close(module.sample(4, seed=0), first)  # deterministic: the same statistics again
