"""The device side of the input pipeline (data/device.py) and the layout / optimizer options:
data.pin_memory, data.prefetch_to_device, trainer.channels_last, optim.*.impl. On the CPU the
device-agnostic code paths run (the copies in line); gpu_check.sh measures them on a GPU."""
import pytest
import torch

from helpers import TINY
from dgm_scale.config import ConfigError, load_config
from dgm_scale.data.device import DevicePrefetchLoader, pin_memory_for, prefetched
from dgm_scale.training import quiet_lightning, train


class CountingBatches:
    """Batches (x, label, info) that record how many were pulled from the source."""

    def __init__(self, count: int):
        self.count, self.pulled = count, 0

    def __iter__(self):
        for index in range(self.count):
            self.pulled += 1
            yield torch.full((2, 3), float(index)), torch.tensor([index]), {"index": torch.tensor(index)}


def test_prefetched_hands_out_every_batch_in_order_one_ahead():
    source = CountingBatches(4)
    seen = []
    for x, label, info in prefetched(source, torch.device("cpu")):
        # when batch i is handed out, batch i + 1 was already taken (its copy issued)
        assert source.pulled == min(int(label) + 2, 4)
        seen.append((x[0, 0].item(), int(label), int(info["index"])))
    assert seen == [(float(i), i, i) for i in range(4)]
    assert list(prefetched(CountingBatches(0), torch.device("cpu"))) == []


def test_the_prefetching_loader_is_a_dataloader_with_the_same_batches():
    dataset = torch.utils.data.TensorDataset(torch.arange(10.0).unsqueeze(1))
    plain = DevicePrefetchLoader(dataset, batch_size=3)
    ahead = DevicePrefetchLoader(dataset, batch_size=3)
    ahead.prefetch_device = torch.device("cpu")
    assert len(ahead) == 4 and ahead.sampler is not None
    assert [b[0].tolist() for b in ahead] == [b[0].tolist() for b in plain]


def test_memory_is_pinned_only_for_copies_to_cuda():
    assert pin_memory_for(torch.device("cuda", 0), True)
    assert not pin_memory_for(torch.device("cuda", 0), False)
    assert not pin_memory_for(torch.device("cpu"), True) and not pin_memory_for(None, True)


def _trained(tmp_path, name: str, extra: list[str]):
    quiet_lightning()
    return train(load_config("configs/nsgan.yaml", [*TINY, "model.discriminator.width=8", f"run.dir={tmp_path / name}",
                                                     *extra])).module


def test_pipeline_options_train_the_same_model(tmp_path):
    """Prefetched batches, NHWC convolutions and a fused / foreach Adam: the options took effect
    and give the default run's weights (to rounding: NHWC kernels and the fused update may sum
    in another order)."""
    default = _trained(tmp_path, "default", [])
    options = _trained(tmp_path, "options", ["data.prefetch_to_device=true", "trainer.channels_last=true",
                                             "optim.g.impl=fused", "optim.d.impl=foreach"])
    opt_g, opt_d = options.trainer.optimizers
    # impl=auto is fused Adam too (a NaN guard skips through its found_inf); foreach is not fused
    assert opt_g.defaults["fused"] and opt_d.defaults["foreach"] and not opt_d.defaults["fused"]
    assert default.trainer.optimizers[0].defaults["fused"]
    assert options.trainer.train_dataloader.prefetch_device == torch.device("cpu")
    assert default.trainer.train_dataloader.prefetch_device is None
    convs = [(n, p) for n, p in options.named_parameters() if p.dim() == 4 and p.shape[1] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for _, p in convs)
    trained = dict(default.named_parameters())
    for name, param in options.named_parameters():
        torch.testing.assert_close(param, trained[name], rtol=1e-4, atol=1e-5, msg=name)
    assert any(not torch.equal(p, trained[n]) for n, p in options.named_parameters())  # not the same kernels


@pytest.mark.parametrize("override, culprit", [("optim.d.impl=fast", "optim.d.impl"),
                                               ("optim.g.impl=fused", "optim.g.impl")])
def test_optimizer_implementation_is_validated(override, culprit):
    with pytest.raises(ConfigError, match=culprit):
        load_config("configs/wgan.yaml", [override])  # RMSprop: torch has no fused kernel for it


def test_prefetch_on_a_shard_stream_trains_the_same_model(tmp_path):
    """The shard stream's loader (not a DataLoader) prefetches too; on the CPU the batches, their
    order and the consumed positions are those of the run without it: the same weights, bitwise."""
    from dgm_scale.data.shards.writer import BuildOptions, build_shards

    shards = tmp_path / "shards"
    build_shards("builtin:digits", shards, BuildOptions(samples_per_shard=400, resolution=8, progress=False))
    stream = ["data.name=shards", f"data.path={shards}", "data.channels=1", "data.shuffle_buffer=64"]
    plain = _trained(tmp_path, "plain", stream)
    ahead = _trained(tmp_path, "ahead", [*stream, "data.prefetch_to_device=true"])
    assert ahead.trainer.train_dataloader.prefetch_device == torch.device("cpu")
    trained = dict(plain.named_parameters())
    for name, param in ahead.named_parameters():
        assert torch.equal(param, trained[name]), name
