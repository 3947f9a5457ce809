"""Run under torchrun by tests/test_distributed.py: train, then save this rank's parameters."""
import os
import sys

import lightning as L
import torch

from dgm_scale.config import load_config
from dgm_scale.training import quiet_lightning, train
from fsdp_state import full
from helpers import ActivationDtypes, ElasticProbe, SyncCounter, with_callback, with_callbacks


def record_stream_keys() -> list:
    """Make shard streams put their sample keys in each batch's info, and collect
    (epoch, keys) of every batch the training loop marks consumed (tests/test_shards_train.py)."""
    from dgm_scale.data.shards.loader import StreamLoader
    from dgm_scale.data.shards.stream import ShardStream

    recorded, init, consumed = [], ShardStream.__init__, StreamLoader.consumed

    def init_with_keys(self, *args, **kwargs):
        init(self, *args, **{**kwargs, "return_keys": True})

    def consumed_and_recorded(self, info):
        recorded.append((int(info["epoch"]), list(info["keys"])))
        return consumed(self, info)
    ShardStream.__init__, StreamLoader.consumed = init_with_keys, consumed_and_recorded
    return recorded


def record_bucket_launches() -> list:
    """The buckets each optimizer launched during backward, collected when the strategy tears
    them down (tests/test_ddp_overlap.py)."""
    from dgm_scale.distributed.buckets import GradientBuckets

    launched, remove = [], GradientBuckets.remove

    def recording_remove(self):
        launched.append(self.launches)
        remove(self)
    GradientBuckets.remove = recording_remove
    return launched


class FullParameters(L.Callback):
    """The trained weights at the end of training, gathered from FSDP's shards (a collective,
    while the processes still form a group); plain tensors as they are."""

    def on_train_end(self, trainer, pl_module) -> None:
        self.params = {name: full(p) for name, p in pl_module.named_parameters()}


def applied_steps(optimizers: list) -> list:
    """Adam's own step count on this rank, per optimizer: the steps it applied (None where the
    optimizer keeps no torch state with a step: DeepSpeed's)."""
    steps = []
    for optimizer in optimizers:
        state = next(iter(optimizer.state.values()), {}) if isinstance(optimizer, torch.optim.Optimizer) else {}
        steps.append(int(state["step"]) if "step" in state else None)
    return steps


if __name__ == "__main__":
    config_path, out_dir, *overrides = sys.argv[1:]
    quiet_lightning()
    if os.environ.get("DGM_TEST_NAN"):  # tests/test_nonfinite.py: a NaN loss on one rank
        from nan_injection import install

        install(os.environ["DGM_TEST_NAN"])
    activations = ActivationDtypes()  # what the training steps computed in (trainer.precision)
    with_callback(activations)
    bucket_launches = record_bucket_launches()
    gathered = FullParameters()
    with_callback(gathered)
    syncs = SyncCounter(int(os.environ["DGM_TEST_SYNCS"])) if os.environ.get("DGM_TEST_SYNCS") else None
    if syncs is not None:  # tests/test_sync_free.py
        with_callbacks(syncs.first, syncs.last)
    stream_keys = record_stream_keys() if os.environ.get("DGM_TEST_KEYS") else None
    if os.environ.get("DGM_TEST_ELASTIC"):  # tests/test_elastic.py: state after loading, batches trained
        with_callback(ElasticProbe(out_dir))
        import logging

        logging.basicConfig(level=logging.WARNING)
        logging.getLogger("dgm_scale").setLevel(logging.INFO)  # the resume's world-size line
    result = train(load_config(config_path, overrides))
    params = gathered.params
    # Each rank draws its own noise stream (the ranks' latents must differ to be worth two ranks).
    noise_probe = torch.randn(4)
    optimizers = result.module.trainer.strategy.optimizers
    optimizer_types = [type(opt).__name__ for opt in optimizers]
    local_steps = applied_steps(optimizers)
    buffers = {name: b.detach().clone() for name, b in result.module.named_buffers()}
    torch.save({"params": params, "buffers": buffers, "iterations": result.iterations, "noise_probe": noise_probe,
                "optimizer_types": optimizer_types, "local_steps": local_steps, "activation_dtypes": sorted(activations.dtypes),
                "stream_keys": stream_keys, "bucket_launches": bucket_launches,
                "syncs": syncs.syncs if syncs is not None else None},
               os.path.join(out_dir, f"rank{os.environ['RANK']}.pt"))
