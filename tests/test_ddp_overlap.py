"""Gradient buckets all-reduced during backward (distributed/buckets.py) against the flat all-reduce,
with 2 CPU processes (gloo): a GAN's alternating steps with a gradient penalty, a skipped step,
gradient accumulation, and parameters without a gradient on some or all ranks."""
import os

import pytest
import torch
from torch import nn

from helpers import TINY, free_port, torchrun
from dgm_scale.distributed.buckets import GradientBuckets, partition


def _nets():
    torch.manual_seed(0)  # the same replicas on both ranks
    generator = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    discriminator = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    return generator, discriminator


def _d_loss(generator, discriminator, real, noise):
    """D's loss with a WGAN-GP style penalty: an autograd.grad(create_graph) through D first."""
    fake = generator(noise).detach()
    mixed = (0.5 * real + 0.5 * fake).requires_grad_(True)
    (grads,) = torch.autograd.grad(discriminator(mixed).sum(), mixed, create_graph=True)
    return discriminator(fake).mean() - discriminator(real).mean() + grads.square().sum(1).mean()


def _train(rank: int, attach, flags: dict):
    """4 iterations of D then G steps on this rank's data; iteration 1 also skips a D step (its
    gradients cleared, no step), iterations 2 and 3 accumulate two D backwards before the step
    (3: the second one not announced by arm_d, as a plain `loss.backward()` in a module).
    `attach(G, D)` -> (reduce D, reduce G, before D's backward, before G's backward)."""
    generator, discriminator = _nets()
    reduce_d, reduce_g, arm_d, arm_g = attach(generator, discriminator)
    opt_g, opt_d = torch.optim.Adam(generator.parameters(), 1e-2), torch.optim.Adam(discriminator.parameters(), 1e-2)
    data = torch.Generator().manual_seed(100 + rank)
    for iteration in range(4):
        real, noise = torch.randn(8, 3, generator=data), torch.randn(8, 4, generator=data)
        if iteration == 1:  # a NaN guard's skip: backward, then the gradients cleared
            opt_d.zero_grad(set_to_none=True)
            arm_d()
            _d_loss(generator, discriminator, real, noise).backward()
            opt_d.zero_grad(set_to_none=True)
        opt_d.zero_grad(set_to_none=True)
        for backward in range(2 if iteration >= 2 else 1):
            if iteration != 3 or backward == 0:  # 3: the second backward outside manual_backward
                arm_d()
            _d_loss(generator, discriminator, real, noise).backward()
        flags.setdefault("local_grads", []).append([p.grad.clone() for p in discriminator.parameters()])
        reduce_d()
        opt_d.step()
        discriminator.requires_grad_(False)  # G's backward runs through a frozen D
        opt_g.zero_grad(set_to_none=True)
        arm_g()
        (-discriminator(generator(noise)).mean()).backward()
        reduce_g()
        opt_g.step()
        discriminator.requires_grad_(True)
    return [p.detach() for p in (*generator.parameters(), *discriminator.parameters())]


def _flat(generator, discriminator):
    from dgm_scale.distributed import all_reduce_gradients

    nothing = lambda: None  # noqa: E731
    return (lambda: all_reduce_gradients(discriminator.parameters(), 2),
            lambda: all_reduce_gradients(generator.parameters(), 2), nothing, nothing)


def _bucketed(bucket_mb: float, made: list):
    def attach(generator, discriminator):
        g, d = (GradientBuckets(net.parameters(), 2, bucket_mb) for net in (generator, discriminator))
        made.extend([d, g])
        return d.finish, g.finish, lambda: (d.arm(), g.disarm()), lambda: (g.arm(), d.disarm())
    return attach


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    flat_flags, bucket_flags, results = {}, {}, {"launches": {}}
    results["flat"] = _train(rank, _flat, flat_flags)
    for bucket_mb in (1e-6, 25.0):  # a bucket per parameter, and one bucket per network
        made = []
        results[bucket_mb] = _train(rank, _bucketed(bucket_mb, made), bucket_flags)
        results["launches"][bucket_mb] = [(b.launches, len(b.buckets)) for b in made]
    results["flat_local"] = flat_flags["local_grads"]
    results["bucket_local"] = bucket_flags["local_grads"][:4]
    results["partial"] = _partial_gradients(rank)
    results["changed_after_launch"] = _changed_after_launch(rank)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _partial_gradients(rank: int):
    """Parameter `shared` gets a gradient on both ranks, `rank0_only` on rank 0 only, `unused` on none."""
    torch.manual_seed(1)
    shared, rank0_only, unused = (nn.Parameter(torch.randn(3)) for _ in range(3))
    buckets = GradientBuckets([shared, rank0_only, unused], 2, bucket_mb=25.0)  # one bucket holds all three
    buckets.arm()
    loss = (shared * (rank + 1)).sum() + ((rank0_only ** 2).sum() if rank == 0 else 0)
    loss.backward()
    buckets.finish()
    return {"shared": shared.grad, "rank0_only": rank0_only.grad, "unused": unused.grad,
            "rank0_only_value": rank0_only.detach()}


def _changed_after_launch(rank: int):
    """A gradient sent in its bucket, then changed by another optimizer's backward before the step."""
    weight = nn.Parameter(torch.ones(2))
    buckets = GradientBuckets([weight], 2, bucket_mb=25.0)
    buckets.arm()
    (weight * (rank + 1)).sum().backward()  # sent: 1 on rank 0, 2 on rank 1
    buckets.disarm()
    (weight * 3).sum().backward()  # now 4 and 5
    buckets.finish()
    return weight.grad


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("overlap")
    torch.multiprocessing.spawn(_worker, args=(free_port(), str(out)), nprocs=2)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def test_buckets_give_the_flat_all_reduce_bitwise(ranks):
    """Two ranks: each element is a + b either way, then / 2: bitwise equal, not merely close."""
    for rank in ranks:
        for bucket_mb in (1e-6, 25.0):
            for bucketed, flat in zip(rank[bucket_mb], rank["flat"]):
                assert torch.equal(bucketed, flat)
        assert not torch.equal(rank["flat"][0], _nets()[0][0].weight)  # training moved the weights
    for a, b in zip(ranks[0][1e-6], ranks[1][1e-6]):
        assert torch.equal(a, b)


def test_gradients_stay_local_until_the_step(ranks):
    """What a NaN guard checks between backward and step is this rank's own gradient."""
    for rank in ranks:
        for bucketed, flat in zip(rank["bucket_local"], rank["flat_local"]):
            for a, b in zip(bucketed, flat):
                assert torch.equal(a, b)
    assert not torch.equal(ranks[0]["flat_local"][0][0], ranks[1]["flat_local"][0][0])


def test_buckets_launch_during_backward(ranks):
    """Buckets launch from the hooks, not at the step: D 4 steps + the skipped round's (the
    accumulating rounds' second backwards launch nothing: they fall back to the step), G 4 steps."""
    (d_launches, d_buckets), (g_launches, g_buckets) = ranks[0]["launches"][1e-6]
    assert (d_buckets, g_buckets) == (6, 4)  # a bucket per parameter
    assert (d_launches, g_launches) == (5 * d_buckets, 4 * g_buckets)
    assert ranks[0]["launches"][25.0] == [(5, 1), (4, 1)]


def test_missing_gradients_count_as_zero_and_unused_stay_none(ranks):
    for rank, result in enumerate(ranks):
        part = result["partial"]
        torch.testing.assert_close(part["shared"], torch.full((3,), 1.5), rtol=0, atol=0)  # (1 + 2) / 2
        torch.testing.assert_close(part["rank0_only"], part["rank0_only_value"], rtol=0, atol=0)  # (2x + 0) / 2
        assert part["unused"] is None


def test_a_gradient_changed_after_its_bucket_was_sent_is_reduced_again(ranks):
    for rank in ranks:
        assert torch.equal(rank["changed_after_launch"], torch.full((2,), 4.5))  # (4 + 5) / 2


def test_autograd_grad_does_not_fire_the_hooks():
    """A gradient penalty's autograd.grad(create_graph=True) accumulates no .grad: no hook."""
    _, discriminator = _nets()
    fired = []
    for p in discriminator.parameters():
        p.register_post_accumulate_grad_hook(fired.append)
    images = torch.randn(4, 3, requires_grad=True)
    (grads,) = torch.autograd.grad(discriminator(images).sum(), images, create_graph=True)
    assert fired == []
    (grads.square().sum() + discriminator(images).sum()).backward()
    assert len(fired) == len(list(discriminator.parameters()))  # once each for the double backward


def test_partition_respects_the_size_and_dtype():
    params = [nn.Parameter(torch.zeros(n)) for n in (10, 10, 30, 5)] + [nn.Parameter(torch.zeros(2, dtype=torch.float64))]
    sizes = [[p.numel() for p in bucket] for bucket in partition(params, bucket_bytes=80)]
    assert sizes == [[10, 10], [30], [5], [2]]


# Under -m slow: test_buckets_give_the_flat_all_reduce_bitwise checks the same equality on the
# reducer itself, in CI.
@pytest.mark.slow
def test_training_with_overlap_equals_the_flat_all_reduce(tmp_path):
    """A whole WGAN-GP run (n_critic D steps with a gradient penalty, then G through a frozen D)
    on 2 ranks: the same weights with buckets during backward as with one flat all-reduce."""
    weights, launches = {}, {}
    for overlap in (True, False):
        out = tmp_path / str(overlap)
        out.mkdir()
        proc = torchrun(["tests/ddp_worker.py", "configs/wgan_gp.yaml", str(out), *TINY, "trainer.devices=2",
                         f"trainer.ddp.overlap={overlap}", "trainer.ddp.bucket_mb=0.01", f"run.dir={out / 'run'}"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        rank0 = torch.load(out / "rank0.pt", weights_only=True)
        weights[overlap], launches[overlap] = rank0["params"], rank0["bucket_launches"]
    # G's and D's buckets (10 kB each here) launched from the hooks of 3 iterations' backwards
    assert len(launches[True]) == 2 and min(launches[True]) >= 3 and launches[False] == []
    for name, tensor in weights[True].items():
        assert torch.equal(tensor, weights[False][name]), name
