"""Resume on another world size (issue 20): 2 -> 1 -> 3 processes under ddp, DeepSpeed ZeRO-2 and fsdp.

One run on the 2-D toy (104 points, 8 per process and step) is stopped and resumed twice:
2 processes for 1 step (16 points), 1 process with trainer.keep_global_batch (16 per step:
1 step; its weights equal those of 2 processes for 2 steps), 3 processes at 8 each (24 per
step: 3 steps) - together exactly the 104 points of epoch 0. At every resume the state right after loading must equal the checkpoint's (weights on
every rank; optimizer state, ZeRO's re-cut partitions and FSDP's re-cut shards gathered), and the trained points,
identified by value, must be the epoch's, each once.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from dgm_scale.config import load_config
from dgm_scale.data.datasets import build_dataset
from helpers import lean_zero_state, torchrun

POINTS = 104
ARGS = ["tracking.wandb.mode=disabled", "eval.every=0", "eval.at_end=false", "trainer.log_every=1",
        "trainer.progress_bar=false", "trainer.accelerator=cpu", "run.sample_every=100", "run.num_samples=16",
        "run.checkpoint_every=1", f"data.toy_samples={POINTS}", "data.batch_size=8", "loss.n_critic=1",
        "model.generator.width=16", "model.discriminator.width=16", "model.generator.depth=2",
        "model.discriminator.depth=2"]
# (processes, max_steps, extra overrides, the resume's log line)
LEGS = [(2, 1, [], None),
        (1, 2, ["trainer.keep_global_batch=true"], "world size 2 -> 1, global batch kept (16 per process)"),
        (3, 5, ["data.batch_size=8"], "world size 1 -> 3, global batch 16 -> 24 (8 per process)")]


def _flat(per_rank: list) -> dict:
    """ZeRO partitions of all ranks (lean, in rank order) -> {group: {key: full flat tensor}}."""
    return {group: {key: per_rank[0][group][key] if key == "step" else
                    torch.cat([rank[group][key] for rank in per_rank]) for key in per_rank[0][group]}
            for group in per_rank[0]}


def saved_state(checkpoint: Path) -> dict:
    """Weights and optimizer state a checkpoint holds (ZeRO: every rank's shard file, joined;
    FSDP: every rank's DCP shards, read whole)."""
    from dgm_scale.distributed.dcp_checkpoint import fold, is_sharded
    from dgm_scale.distributed.zero_checkpoint import ZERO_SHARDS, read_shard

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if is_sharded(ckpt):  # FSDP: the DCP shard folder it names, folded (full weights, torch's optimizer format)
        ckpt = fold(ckpt, checkpoint.parent)
    optimizers = []
    for index, state in enumerate(ckpt["optimizer_states"]):
        if ZERO_SHARDS in state:
            info = state[ZERO_SHARDS]
            optimizers.append(_flat([lean_zero_state(read_shard(checkpoint.parent, info["dir"], rank, index))
                                     for rank in range(int(info["world_size"]))]))
        else:
            optimizers.append(state["state"])
    return {"params": ckpt["state_dict"], "optimizers": optimizers}


def assert_loaded_equals_saved(out: Path, world: int, saved: dict, zero: bool) -> None:
    loaded = [torch.load(out / f"loaded{rank}.pt", weights_only=True) for rank in range(world)]
    assert [state["world"] for state in loaded] == [world] * world
    for state in loaded:
        assert state["params"].keys() == saved["params"].keys()
        for name, tensor in saved["params"].items():
            torch.testing.assert_close(state["params"][name], tensor, rtol=0, atol=0, msg=name)
    for index, expected in enumerate(saved["optimizers"]):
        got = _flat([state["optimizers"][index] for state in loaded]) if zero else loaded[0]["optimizers"][index]
        assert got.keys() == expected.keys()
        for group, values in expected.items():
            assert values.keys() == got[group].keys()
            for key, value in values.items():
                torch.testing.assert_close(torch.as_tensor(got[group][key]), torch.as_tensor(value), rtol=0, atol=0,
                                           msg=f"optimizer {index} group {group} {key}")


def trained_points(outs: list, worlds: list) -> list:
    """Indices (into the training set) of every point the legs trained on, by value."""
    cfg = load_config("configs/ring8.yaml", ARGS)
    index = {tuple(x.tolist()): i for i, x in enumerate(build_dataset(cfg.data, "train").x)}
    seen = []
    for out, world in zip(outs, worlds):
        for rank in range(world):
            for batch in torch.load(out / f"batches{rank}.pt", weights_only=True):
                seen += [index[tuple(x.tolist())] for x in batch]
    return seen


# ddp in CI; deepspeed and fsdp under -m slow (suite time): their loads are covered in CI by the
# ZeRO re-cut tests below and by tests/test_fsdp.py's 2 -> 1 process resume
@pytest.mark.parametrize("strategy", ["ddp", pytest.param("deepspeed", marks=pytest.mark.slow),
                                      pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_one_three_processes_resume_with_state_and_epoch_intact(strategy, tmp_path, monkeypatch):
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
    monkeypatch.setenv("DGM_TEST_ELASTIC", "1")
    run, outs = tmp_path / "run", []
    for leg, (world, steps, extra, line) in enumerate(LEGS):
        out = tmp_path / f"leg{leg}"
        out.mkdir()
        saved = saved_state(run / "checkpoints" / "last.ckpt") if leg else None
        proc = torchrun(["tests/ddp_worker.py", "configs/ring8.yaml", str(out), *ARGS, f"trainer.devices={world}",
                         f"trainer.strategy={strategy}", f"trainer.max_steps={steps}", f"run.dir={run}", *extra,
                         *(["resume=auto"] if leg else [])], nproc=world)
        assert proc.returncode == 0, proc.stderr[-3000:]
        if leg:
            assert line in proc.stderr + proc.stdout
            assert_loaded_equals_saved(out, world, saved, zero=strategy == "deepspeed")
        assert torch.load(out / "rank0.pt", weights_only=True)["iterations"] == steps
        outs.append(out)
    seen = trained_points(outs, [world for world, *_ in LEGS])
    assert sorted(seen) == list(range(POINTS))  # the epoch: every point once, none repeated, none lost
    if strategy == "ddp":  # keep_global_batch: 2 -> 1 process trained as 2 processes would have
        reference = tmp_path / "reference"
        reference.mkdir()
        proc = torchrun(["tests/ddp_worker.py", "configs/ring8.yaml", str(reference), *ARGS, "trainer.devices=2",
                         "trainer.max_steps=2", f"run.dir={reference / 'run'}"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        two = torch.load(reference / "rank0.pt", weights_only=True)["params"]
        for name, tensor in torch.load(outs[1] / "rank0.pt", weights_only=True)["params"].items():
            torch.testing.assert_close(tensor, two[name], rtol=1e-5, atol=1e-6, msg=name)


def test_keep_global_batch_refuses_a_global_batch_that_does_not_divide(tmp_path):
    from dgm_scale.config import ConfigError, to_dict
    from dgm_scale.resume import adapt_to_world

    checkpoint = tmp_path / "last.ckpt"
    stored = load_config("configs/ring8.yaml", ARGS + ["trainer.devices=2"])
    torch.save({"hyper_parameters": {"config": to_dict(stored)}}, checkpoint)
    cfg = load_config("configs/ring8.yaml", ARGS + ["trainer.devices=4", "trainer.keep_global_batch=true"])
    assert adapt_to_world(checkpoint, cfg) == "world size 2 -> 4, global batch kept (4 per process)"
    assert cfg.data.batch_size == 4
    cfg = load_config("configs/ring8.yaml", ARGS + ["trainer.devices=3", "trainer.keep_global_batch=true"])
    with pytest.raises(ConfigError, match=r"^config key 'trainer.keep_global_batch': .*global batch 16 "
                                          r"\(8 x 2 processes\) does not divide over 3 processes"):
        adapt_to_world(checkpoint, cfg)
    cfg = load_config("configs/ring8.yaml", ARGS + ["trainer.devices=3"])
    assert adapt_to_world(checkpoint, cfg) == "world size 2 -> 3, global batch 16 -> 24 (8 per process)"


# ----------------------------------------------------------------------------- the data, without processes
def _stream(shards, rank: int, world: int, **options):
    from dgm_scale.data.shards.stream import ShardStream, Source

    return ShardStream(Source(tuple(shards)), batch_size=BATCH, resolution=8, rank=rank, world_size=world,
                       shuffle_buffer=options.pop("shuffle_buffer", 4), **options)


def _dealt(shards, world: int, workers: int, epoch: int, left=None) -> dict:
    """{(rank, worker): [global sample ids]} as the streams of `world` simulated ranks deal `epoch`
    (their shard order: the stream's own; ids: a shard's manifest offset + the index inside it)."""
    from dgm_scale.data.shards.assign import Span, pieces_for, shard_offsets

    stream = _stream(shards, 0, world)
    stream.deal_from(epoch, left)
    order, left = stream._epoch_order(0, epoch), Span(stream.epoch_left(epoch)[0])
    offsets = shard_offsets(order)
    starts = dict(zip((shard.url for shard in shards), np.cumsum([0] + [shard.num_samples for shard in shards])))
    return {(rank, worker): np.concatenate([np.arange(piece.start, piece.stop) + starts[piece.shard.url]
                                            for piece in pieces_for(order, left, world, rank, workers, worker, offsets)]
                                           or [np.zeros(0, int)])
            for rank in range(world) for worker in range(workers)}


def _delivered(ids: np.ndarray, count: int, seed: int, epoch: int, rank: int, worker: int) -> np.ndarray:
    """The first `count` samples a worker's pipeline delivers: its positions through the mixer and
    the shuffle buffer (the stream's own order-making pieces, run forward)."""
    from dgm_scale.data.shards.assign import rng_for
    from dgm_scale.data.shards.mixing import Shuffler

    out = Shuffler(4, rng_for(seed, epoch, rank, worker, "shuffle")).run(iter(ids.tolist()))
    return np.array([next(out) for _ in range(count)], dtype=int)


BATCH = 32


def test_simulated_1024_ranks_x_8_workers_read_a_shard_epoch_once_and_resume_at_512():
    """Item 6: 3,000 shards of 20-150 samples (about 250k) dealt to 1,024 ranks x 8 loader workers
    by the streams' own dealing; then every worker delivers a random part, and the rest of the
    epoch is re-dealt to 512 ranks x 8: each sample once in all, ranks within one batch."""
    from dgm_scale.data.shards.assign import leftover
    from dgm_scale.data.shards.urls import Shard

    rng = np.random.default_rng(0)
    shards = [Shard(f"/sim/{i:05d}.tar", int(n)) for i, n in enumerate(rng.integers(20, 151, 3000))]
    total, epoch = sum(shard.num_samples for shard in shards), 3
    first = _dealt(shards, 1024, 8, epoch)
    seen = np.bincount(np.concatenate(list(first.values())), minlength=total)
    assert (seen == 1).all()
    per_rank = [sum(len(first[rank, w]) for w in range(8)) for rank in range(1024)]
    assert max(per_rank) - min(per_rank) <= BATCH

    counts = {slot: int(rng.integers(0, len(ids) + 1)) for slot, ids in first.items()}
    delivered = np.concatenate([_delivered(ids, counts[slot], 0, epoch, *slot) for slot, ids in first.items()])
    stream = _stream(shards, 0, 1024)
    left = leftover(stream.epoch_left(epoch), 1024, 8, counts, [1.0], 4, 0, epoch)
    second = _dealt(shards, 512, 8, epoch, left)
    seen = np.bincount(np.concatenate([delivered, *second.values()]), minlength=total)
    assert (seen == 1).all()  # delivered before + dealt after: every sample once
    per_rank = [sum(len(second[rank, w]) for w in range(8)) for rank in range(512)]
    assert max(per_rank) - min(per_rank) <= BATCH and sum(per_rank) == total - len(delivered) > 0


def test_simulated_1024_ranks_read_a_map_style_epoch_once_and_resume_at_512():
    """The same for map-style data, dealt by the samplers' own function (a loader's workers then
    take the rank's batches in turn: torch's rule, not ours)."""
    from dgm_scale.data.position import deal, epoch_order

    total, epoch, seed = 300_000, 2, 7
    order = epoch_order(total, seed, epoch)  # the samplers' rank_samples = deal(epoch_order(...)[consumed:], ...)
    first = [deal(order, 1024, rank) for rank in range(1024)]
    seen = np.bincount(np.concatenate(first), minlength=total)
    assert (seen >= 1).all() and (seen - 1).sum() < 1024  # repeats: only the padding that evens ranks out
    assert len({len(share) for share in first}) == 1
    batches = 5  # every rank trained 5 batches of BATCH, then the job came back on 512 ranks
    consumed = 1024 * batches * BATCH
    delivered = np.concatenate([share[:batches * BATCH] for share in first])
    rest = order[consumed:]
    second = [deal(rest, 512, rank) for rank in range(512)]
    seen = np.bincount(np.concatenate([delivered, *second]), minlength=total)
    assert (seen >= 1).all() and (seen - 1).sum() < 512
    assert len({len(share) for share in second}) == 1


def test_shard_stream_epoch_re_dealt_2x2_then_1x3_then_3x1_reads_every_sample_once(tmp_path):
    """Real tar shards, two sources mixed 1:2, a shuffle buffer: 2 ranks x 2 workers read 3
    batches each, 1 rank x 3 workers 5, then 3 ranks x 1 worker the rest of the epoch - each key
    once, none lost (no rank caps and partial batches kept, so nothing is trimmed by design)."""
    from dgm_scale.data.shards.loader import STATE_FORMAT
    from helpers import epoch_keys, flat, make, write_set

    everything = write_set(tmp_path / "a", [23, 17, 31, 9]) + write_set(tmp_path / "b", [40, 12, 5], first=1000)
    specs, options = [str(tmp_path / "a"), str(tmp_path / "b")], dict(batch_size=4, shuffle_buffer=8, drop_last=False,
                                                                       even_ranks=False, weights=[1.0, 2.0])
    seen, state = [], None
    for world, workers, limit in ((2, 2, 3), (1, 3, 5), (3, 1, None)):
        ranks = {}
        for rank in range(world):
            loader = make(specs, workers=workers, rank=rank, world_size=world, **options)
            if state is not None:
                loader.load_state_dict(state)
            seen += flat(epoch_keys(loader, limit=limit))
            ranks[rank] = loader.state_dict()
        # what a checkpoint holds: every rank's position (gathered), the deal they shared
        state = {**ranks[0], "format": STATE_FORMAT, "ranks": {str(r): s["ranks"][str(r)] for r, s in ranks.items()}}
    assert len(seen) == len(set(seen)) and sorted(seen) == sorted(everything)


@pytest.mark.parametrize("old_world, new_world", [(2, 3), (3, 2), (2, 1), (4, 7)])
def test_zero_partitions_re_cut_equal_the_partitions_of_the_new_world(old_world, new_world):
    """DeepSpeed's layout built by hand: a flat group of 103 values padded at its end to a multiple
    of 2 x W, cut in W equal partitions (fp32 saved without the padding, Adam's moments with it).
    Re-cut for W' ranks, each must equal the W'-layout cut of the same flat tensors; a rank reads
    only the old partitions its new one overlaps."""
    from dgm_scale.distributed.zero_reshard import repartition

    flat = {key: torch.randn(103) for key in ("fp32", "exp_avg", "exp_avg_sq")}

    def partitions(world: int) -> list:
        size = -(-103 // (2 * world)) * 2
        padded = {key: torch.cat([value, torch.zeros(size * world - 103)]) for key, value in flat.items()}
        parts = []
        for rank in range(world):
            piece = {key: value[rank * size:(rank + 1) * size] for key, value in padded.items()}
            padding = max(0, min(size, (rank + 1) * size - 103))
            parts.append({"single_partition_of_fp32_groups": [piece["fp32"][:size - padding].clone()],
                          "group_paddings": [padding], "loss_scaler": "scaler",
                          "base_optimizer_state": {"state": {0: {"step": torch.tensor(5.0), "exp_avg": piece["exp_avg"],
                                                                 "exp_avg_sq": piece["exp_avg_sq"]}},
                                                   "param_groups": [{"lr": 0.1, "params": [0]}]}})
        return parts

    old, new = partitions(old_world), partitions(new_world)
    for rank, expected in enumerate(new):
        reads = []
        size = expected["single_partition_of_fp32_groups"][0].numel() + expected["group_paddings"][0]
        got = repartition(lambda j: reads.append(j) or old[j], old_world, rank, new_world, [size],
                          expected["group_paddings"], "test")
        fp32 = got["single_partition_of_fp32_groups"][0]
        torch.testing.assert_close(fp32[:expected["single_partition_of_fp32_groups"][0].numel()],
                                   expected["single_partition_of_fp32_groups"][0], rtol=0, atol=0)
        assert fp32.numel() == size and not fp32[size - expected["group_paddings"][0]:].any()
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(got["base_optimizer_state"]["state"][0][key],
                                       expected["base_optimizer_state"]["state"][0][key], rtol=0, atol=0)
        assert got["group_paddings"] == expected["group_paddings"] and got["partition_count"] == [new_world]
        old_size = old[0]["single_partition_of_fp32_groups"][0].numel()
        overlapping = {j for j in range(old_world) if j * old_size < (rank + 1) * size and rank * size < (j + 1) * old_size}
        assert set(reads) == overlapping | {0}


def test_training_on_shards_with_another_worker_count_reads_the_epoch_once(tmp_path, monkeypatch):
    """Through train(): 128 samples, batches of 8, stopped after 3 steps on 2 loader workers,
    continued for 4 on 1, then 9 on 3 - a new layout each time, so the rest of epoch 0 is re-dealt
    (the checkpoint's position, applied when the loader is built; Lightning's epoch length counts
    the restored batches): the 16 steps trained on each sample once."""
    import tarfile

    from dgm_scale.data.shards.loader import StreamLoader
    from dgm_scale.data.shards.stream import ShardStream
    from dgm_scale.data.shards.writer import BuildOptions, build_shards
    from dgm_scale.training import quiet_lightning, train
    from helpers import TINY

    images = np.random.default_rng(0).integers(0, 256, (128, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "noise.npz", x=images)
    build_shards(str(tmp_path / "noise.npz"), tmp_path / "shards", BuildOptions(samples_per_shard=16, progress=False))
    every = set()
    for path in (tmp_path / "shards").glob("*.tar"):
        with tarfile.open(path) as tar:
            every |= {member.name.split(".", 1)[0] for member in tar.getmembers()}
    seen, init, consumed = [], ShardStream.__init__, StreamLoader.consumed
    monkeypatch.setattr(ShardStream, "__init__", lambda self, *a, **k: init(self, *a, **{**k, "return_keys": True}))
    monkeypatch.setattr(StreamLoader, "consumed", lambda self, info: seen.append(list(info["keys"])) or consumed(self, info))
    quiet_lightning()
    common = [*TINY, "data.name=shards", "data.channels=1", "data.shuffle_buffer=16", f"data.path={tmp_path / 'shards'}",
              "run.checkpoint_every=1", f"run.dir={tmp_path / 'run'}"]
    for leg, (workers, steps) in enumerate(((2, 3), (1, 7), (3, 16))):
        train(load_config("configs/nsgan.yaml", common + [f"data.num_workers={workers}", f"trainer.max_steps={steps}",
                                                          *(["resume=auto"] if leg else [])]))
        assert len(seen) == steps
    keys = [key for batch in seen for key in batch]
    assert len(keys) == len(set(keys)) == 128 and set(keys) == every
