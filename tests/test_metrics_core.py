"""Metric formulas against independent truth (closed forms, naive loops), exact distributed
gathering (2 gloo processes), the real-feature cache, and parity with torch-fidelity's formulas
(installed, or its wheel fetched once by pip; loaded file by file by tests/fidelity_reference.py,
since its package __init__ imports torchvision)."""
import inspect
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dgm_scale.metrics import (
    METRICS,
    OPTION_DEFAULTS,
    all_gather_features,
    cache_key,
    cached_real_features,
    compute_metrics,
    density_coverage,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    inception_score,
    kid,
    precision_recall,
)
from dgm_scale.metrics.cache import cache_path


def gaussian(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


# ----------------------------------------------------------------------------------------- FID
def test_fid_of_a_set_against_itself_is_zero():
    x = gaussian(2000, 8, 0)
    assert abs(fid_from_features(x, x)) < 1e-6
    assert abs(fid_from_features(torch.from_numpy(x).float(), torch.from_numpy(x).float())) < 1e-6


def test_fid_equals_closed_form_for_diagonal_and_rotated_gaussians():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    var1, var2 = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(closed, rel=1e-10)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))  # the same rotation of both: FID is invariant
    rotated = frechet_distance(q @ mu1, q @ np.diag(var1) @ q.T, q @ mu2, q @ np.diag(var2) @ q.T)
    assert rotated == pytest.approx(closed, rel=1e-9)


def _symmetric_sqrt(s: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(s)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def test_fid_equals_symmetric_closed_form_for_general_covariances():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2, mu1, mu2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5), rng.normal(size=5), rng.normal(size=5)
    root1 = _symmetric_sqrt(s1)
    closed = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * _symmetric_sqrt(root1 @ s2 @ root1))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(closed, rel=1e-9)


def test_fid_of_gaussian_samples_approaches_the_population_value():
    x, y = gaussian(20000, 3, 3), gaussian(20000, 3, 4, shift=0.5) * 2.0
    closed = 3 * 0.5 ** 2 * 4 + 3 * (1 + 4 - 2 * 2)  # y = 2 z + 1: mean 1 (shift scaled), var 4
    assert fid_from_features(x, y) == pytest.approx(closed, rel=0.03)


def samples_with_covariance(n: int, mean: np.ndarray, scale: float, basis: np.ndarray, seed: int) -> np.ndarray:
    """n samples [n, D] whose sample mean is `mean` and whose unbiased sample covariance is exactly
    scale * basis @ basis.T (basis [D, k], orthonormal columns, k < n): scaled, centred,
    orthonormal coordinates along the basis."""
    coords = np.random.default_rng(seed).normal(size=(n, basis.shape[1]))
    q, _ = np.linalg.qr(coords - coords.mean(axis=0))  # orthonormal columns, each summing to 0
    return mean + math.sqrt(scale * (n - 1)) * q @ basis.T


@pytest.mark.parametrize("angles", [np.zeros(6), np.full(6, np.pi / 2), np.linspace(0.1, 1.4, 6)],
                         ids=["same subspace", "orthogonal subspaces", "principal angles 0.1-1.4"])
def test_fid_with_fewer_samples_than_dimensions_has_its_closed_form(angles):
    """10 samples in 32 dimensions, covariances s1 P1 and s2 P2 of rank 6 (P: the projections on
    6-dimensional subspaces at principal angles theta_i, so eig(P1 P2) = cos^2 theta_i):
    FID = |mu1 - mu2|^2 + 6 s1 + 6 s2 - 2 sqrt(s1 s2) sum(cos theta_i)."""
    rng = np.random.default_rng(5)
    q, _ = np.linalg.qr(rng.normal(size=(32, 12)))
    basis1, basis2 = q[:, :6], q[:, :6] * np.cos(angles) + q[:, 6:] * np.sin(angles)
    (mu1, mu2), (s1, s2) = rng.normal(size=(2, 32)), (0.7, 2.5)
    x, y = samples_with_covariance(10, mu1, s1, basis1, 6), samples_with_covariance(10, mu2, s2, basis2, 7)
    closed = np.sum((mu1 - mu2) ** 2) + 6 * (s1 + s2) - 2 * math.sqrt(s1 * s2) * np.sum(np.cos(angles))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the singular product's fallbacks
        assert fid_from_features(x, y) == pytest.approx(closed, rel=1e-6)  # observed within 1e-8


def test_fid_retries_a_non_finite_sqrtm_with_an_eps_offset_like_pytorch_fid(monkeypatch):
    rng = np.random.default_rng(13)
    mu1, mu2, var1, var2 = rng.normal(size=4), rng.normal(size=4), rng.uniform(1, 2, 4), rng.uniform(1, 2, 4)
    real_sqrtm, calls = scipy.linalg.sqrtm, []

    def first_call_fails(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(scipy.linalg, "sqrtm", first_call_fails)
    with pytest.warns(RuntimeWarning, match="adding 0.5 to the diagonal"):
        value = frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2), eps=0.5)
    # The retried square root is of (S1 + eps I)(S2 + eps I); the traces stay those of S1 and S2.
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt((var1 + 0.5) * (var2 + 0.5)))
    assert len(calls) == 2 and value == pytest.approx(expected, rel=1e-10)


def test_fid_uses_the_eigenvalue_trace_where_pytorch_fid_would_raise(monkeypatch):
    s1, s2 = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda a: np.eye(2) * (1 + 1j))
    with pytest.warns(RuntimeWarning, match="imaginary part"):
        value = frechet_distance(np.zeros(2), s1, np.zeros(2), s2)
    assert value == pytest.approx(1 + 4 + 9 + 1 - 2 * (3 + 2), rel=1e-12)


# ----------------------------------------------------------------------------------------- KID
def naive_mmd2_unbiased(x: np.ndarray, y: np.ndarray, kernel) -> float:
    m = len(x)
    xx = sum(kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(kernel(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(kernel(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_equals_the_unbiased_mmd2_double_sum():
    x, y = gaussian(7, 4, 7), gaussian(7, 4, 8, shift=0.3)
    cubic = lambda u, v: (u @ v / 4 + 1) ** 3
    mean, std = kid(x, y, subsets=3, subset_size=7)  # a full-size subset is a permutation: same value
    assert mean == pytest.approx(naive_mmd2_unbiased(x, y, cubic), rel=1e-12) and std < 1e-12


def test_kid_is_unbiased_for_the_linear_kernel_closed_form():
    # With k(u, v) = <u, v>, E[unbiased MMD^2] = ||mu_x - mu_y||^2 exactly.
    shift = np.array([0.3, -0.2, 0.0])
    estimates = [kid(gaussian(40, 3, 2 * t), gaussian(40, 3, 2 * t + 1) + shift, subsets=1, subset_size=40,
                     degree=1, gamma=1.0, coef0=0.0, seed=t)[0] for t in range(300)]
    standard_error = np.std(estimates) / math.sqrt(len(estimates))
    assert abs(np.mean(estimates) - shift @ shift) < 4 * standard_error


def test_kid_of_one_distribution_averages_to_zero_while_the_biased_estimate_does_not():
    unbiased, biased = [], []
    for t in range(300):
        x, y = gaussian(30, 4, 2 * t), gaussian(30, 4, 2 * t + 1)
        unbiased.append(kid(x, y, subsets=1, subset_size=30, seed=t)[0])
        kxx, kyy, kxy = ((p @ q.T / 4 + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
        biased.append(kxx.mean() + kyy.mean() - 2 * kxy.mean())
    standard_error = np.std(unbiased) / math.sqrt(len(unbiased))
    assert abs(np.mean(unbiased)) < 4 * standard_error
    assert np.mean(biased) > 10 * np.std(biased) / math.sqrt(len(biased))  # the check has power


def test_kid_rejects_a_subset_larger_than_a_set():
    with pytest.raises(ValueError, match="subset_size"):
        kid(gaussian(10, 2, 0), gaussian(20, 2, 1), subset_size=15)


# ------------------------------------------------------------------------------------------ IS
def test_inception_score_of_uniform_predictions_is_one():
    mean, std = inception_score(torch.zeros(200, 7))
    assert mean == pytest.approx(1.0, abs=1e-12) and std < 1e-12


def test_inception_score_of_balanced_one_hot_predictions_is_the_class_count():
    logits = torch.eye(8).repeat(50, 1) * 200.0  # each split of 40 consecutive rows: 5 of each class
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(8.0, rel=1e-9) and std < 1e-9


def test_inception_score_shuffle_permutes_rows_like_torch_fidelity():
    logits = torch.randn(103, 6, generator=torch.Generator().manual_seed(0)) * 3
    permuted = logits[np.random.RandomState(2020).permutation(103)]
    assert inception_score(logits, 10, shuffle_seed=2020) == inception_score(permuted, 10)
    assert inception_score(logits, 10, shuffle_seed=2020) != inception_score(logits, 10)


# ------------------------------------------------------------------------- precision / recall
def naive_prdc(real: np.ndarray, fake: np.ndarray, k: int) -> dict:
    d = lambda a, b: np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    r_real, r_fake = (np.sort(d(s, s), axis=1)[:, k] for s in (real, fake))
    fake_real = d(fake, real)
    return {"precision": (fake_real <= r_real[None]).any(1).mean(),
            "recall": (fake_real.T <= r_fake[None]).any(1).mean(),
            "density": (fake_real < r_real[None]).sum() / (k * len(fake)),
            "coverage": (fake_real.min(0) < r_real).mean()}


def test_precision_recall_of_identical_and_far_apart_sets():
    x = gaussian(100, 5, 9)
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x + 1000.0) == (0.0, 0.0)


def test_density_coverage_of_identical_and_far_apart_sets():
    x = gaussian(100, 5, 10)
    density, coverage = density_coverage(x, x)
    # Exactly 1 in exact arithmetic; the k-th neighbour pairs are exact ties that the strict `<`
    # decides by last-bit rounding of the (BLAS, asymmetric) distances, as in the reference.
    assert density == pytest.approx(1.0, abs=0.02) and coverage == 1.0
    assert density_coverage(x, x + 1000.0) == (0.0, 0.0)


@pytest.mark.parametrize("batch_size", [7, 1024])
def test_prdc_equals_naive_all_pairs_computation(batch_size):
    real, fake = gaussian(120, 6, 11), gaussian(90, 6, 12, shift=0.4)
    truth = naive_prdc(real, fake, 3)
    assert precision_recall(real, fake, 3, batch_size) == pytest.approx((truth["precision"], truth["recall"]))
    assert density_coverage(real, fake, 3, batch_size) == pytest.approx((truth["density"], truth["coverage"]))


# -------------------------------------------------------------------------------------- gather
def share(full: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    """Rank `rank`'s contiguous share of `full` when ranks hold `sizes` rows."""
    start = sum(sizes[:rank])
    return full[start:start + sizes[rank]]


def full_features(seed: int, n: int, d: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def gather_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for name, sizes in {"5_3": [5, 3], "0_4": [0, 4], "37_23": [37, 23]}.items():
            local = share(full_features(len(name), sum(sizes), 6), sizes, rank)  # "generate my share"
            results[name] = all_gather_features(local)
        fake = results["37_23"]
        real, logits = full_features(99, 60, 6), all_gather_features(share(full_features(7, 60, 10), [37, 23], rank))
        results["metrics"] = compute_metrics(["fid", "kid", "is", "pr", "dc"], real, fake, logits,
                                             {"kid_subsets": 5, "kid_subset_size": 20, "is_splits": 3})
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gather_is_exact_in_rank_order_for_uneven_shares_and_metrics_match_one_process(tmp_path):
    mp.spawn(gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for name, n in {"5_3": 8, "0_4": 4, "37_23": 60}.items():
        expected = full_features(len(name), n, 6)
        assert torch.equal(ranks[0][name], expected) and torch.equal(ranks[1][name], expected)
    single = compute_metrics(["fid", "kid", "is", "pr", "dc"], full_features(99, 60, 6), full_features(5, 60, 6),
                             full_features(7, 60, 10), {"kid_subsets": 5, "kid_subset_size": 20, "is_splits": 3})
    assert ranks[0]["metrics"] == single and ranks[1]["metrics"] == single


def test_gather_without_a_process_group_is_the_identity():
    x = torch.randn(3, 2)
    assert all_gather_features(x) is x


# --------------------------------------------------------------------------------------- cache
KEY = {"manifest_sha256": "ab" * 32, "extractor": "inception-v3-fid", "weights_sha256": "cd" * 32,
       "num_samples": 50, "resolution": (32, 32)}


def test_cache_miss_then_hit_then_new_key(tmp_path):
    calls = []
    compute = lambda: calls.append(1) or torch.arange(12.0).reshape(4, 3)
    first = cached_real_features(KEY, compute, tmp_path)
    again = cached_real_features(dict(reversed(list(KEY.items()))), compute, tmp_path)  # key order: same key
    assert torch.equal(first, again) and len(calls) == 1
    cached_real_features({**KEY, "num_samples": 51}, compute, tmp_path)
    assert len(calls) == 2 and len(list(tmp_path.glob("*.pt"))) == 2
    assert not list(tmp_path.glob("*.tmp"))
    assert cache_key(KEY) != cache_key({**KEY, "resolution": (64, 64)})


@pytest.mark.parametrize("damage", [b"", b"not a torch file", "truncate"])
def test_corrupt_cache_is_recomputed_with_a_warning(tmp_path, damage):
    features = torch.randn(5, 4)
    cached_real_features(KEY, lambda: features, tmp_path)
    path = cache_path(KEY, tmp_path)
    path.write_bytes(path.read_bytes()[:40] if damage == "truncate" else damage)
    with pytest.warns(RuntimeWarning, match="unusable"):
        recomputed = cached_real_features(KEY, lambda: features * 2, tmp_path)
    assert torch.equal(recomputed, features * 2)
    assert torch.equal(cached_real_features(KEY, lambda: pytest.fail("recomputed a good cache"), tmp_path),
                       features * 2)


def test_cache_entry_with_other_key_parts_is_not_trusted(tmp_path):
    torch.save({"key_parts": {**KEY, "num_samples": 1}, "features": torch.zeros(1, 1)}, cache_path(KEY, tmp_path))
    with pytest.warns(RuntimeWarning, match="key parts differ"):
        assert torch.equal(cached_real_features(KEY, lambda: torch.ones(2, 2), tmp_path), torch.ones(2, 2))


# ------------------------------------------------------------------------------------ registry
def test_registry_selects_by_name_and_rejects_unknown_names_and_options():
    real, fake, logits = gaussian(60, 4, 20), gaussian(60, 4, 21), torch.randn(60, 5)
    assert set(METRICS) == {"fid", "kid", "is", "pr", "dc", "ndb"}
    out = compute_metrics(["fid", "is"], real, fake, logits, {"is_splits": 2})
    assert out == {"fid": fid_from_features(real, fake), "is_mean": inception_score(logits, 2)[0],
                   "is_std": inception_score(logits, 2)[1]}
    assert all(isinstance(v, float) for v in compute_metrics(list(METRICS), real, fake, logits,
                                                             {"kid_subset_size": 30, "kid_subsets": 3}).values())
    with pytest.raises(KeyError, match="unknown metric"):
        compute_metrics(["fid", "lpips"], real, fake)
    with pytest.raises(KeyError, match="kid_subset"):
        compute_metrics(["kid"], real, fake, options={"kid_subset": 10})
    with pytest.raises(ValueError, match="fake_logits"):
        compute_metrics(["is"], real, fake)


# ------------------------------------------------------------------- torch-fidelity parity
def relative_error(ours: float, theirs: float) -> float:
    return abs(ours - theirs) / max(abs(theirs), 1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fid_matches_torch_fidelity(tfid, dtype):
    m = tfid["metric_fid"]
    real, fake = torch.randn(800, 64, dtype=dtype), torch.randn(700, 64, dtype=dtype) * 1.1 + 0.05
    theirs = m.fid_statistics_to_metric(m.fid_features_to_statistics(real), m.fid_features_to_statistics(fake),
                                        verbose=False)["frechet_inception_distance"]
    assert relative_error(fid_from_features(real, fake), theirs) < (1e-9 if dtype == torch.float64 else 1e-3)


def test_our_defaults_are_torch_fidelitys(tfid):
    theirs = tfid["defaults"].DEFAULTS
    ours = {name: p.default for name, p in inspect.signature(kid).parameters.items()}
    assert (ours["subsets"], ours["subset_size"], ours["degree"], ours["gamma"], ours["coef0"], ours["seed"]) == (
        theirs["kid_subsets"], theirs["kid_subset_size"], theirs["kid_kernel_poly_degree"],
        theirs["kid_kernel_poly_gamma"], theirs["kid_kernel_poly_coef0"], theirs["rng_seed"])
    assert theirs["kid_kernel"] == "poly" and theirs["prc_neighborhood"] == 3
    assert inspect.signature(inception_score).parameters["splits"].default == theirs["isc_splits"]
    assert OPTION_DEFAULTS["kid_subsets"] == theirs["kid_subsets"] and OPTION_DEFAULTS["is_splits"] == 10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kid_matches_torch_fidelity(tfid, dtype):
    # Their default subset size and seed; 10 subsets instead of 100 keeps this test at a few seconds.
    real, fake = torch.randn(1100, 32, dtype=dtype), torch.randn(1050, 32, dtype=dtype) + 0.1
    theirs = tfid["metric_kid"].kid_features_to_metric(real, fake, kid_subsets=10, verbose=False)
    ours = kid(real, fake, subsets=10)
    tolerance = 1e-9 if dtype == torch.float64 else 1e-3
    assert relative_error(ours[0], theirs["kernel_inception_distance_mean"]) < tolerance
    assert relative_error(ours[1], theirs["kernel_inception_distance_std"]) < tolerance


@pytest.mark.parametrize("shuffle", [False, True])
def test_inception_score_matches_torch_fidelity(tfid, shuffle):
    logits = torch.randn(1003, 20) * 4
    theirs = tfid["metric_isc"].isc_features_to_metric(logits, splits=10, shuffle=shuffle, rng_seed=2020)
    ours = inception_score(logits, 10, shuffle_seed=2020 if shuffle else None)
    assert relative_error(ours[0], theirs["inception_score_mean"]) < 1e-12
    assert relative_error(ours[1], theirs["inception_score_std"]) < 1e-9


def test_precision_recall_matches_torch_fidelity(tfid):
    real, fake = torch.randn(400, 16, dtype=torch.float64), torch.randn(300, 16, dtype=torch.float64) * 1.3
    theirs = tfid["metric_prc"].prc_features_to_metric(fake, real, verbose=False)  # input 1 is the generated set
    ours = precision_recall(real, fake, k=3, batch_size=128)
    assert ours == pytest.approx((theirs["precision"], theirs["recall"]), rel=1e-6)  # theirs: float32 means
