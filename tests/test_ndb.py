"""NDB (Richardson & Weiss 2018) against independent truth: scipy's normal tail for the z-test,
known blob centres for k-means, scipy's Jensen-Shannon distance, the false-positive rate alpha
for two samples of one distribution, and a mode-collapsed fake set."""
import math

import numpy as np
import pytest
import scipy.spatial.distance
import scipy.stats
import torch

from dgm_scale.metrics import OPTION_DEFAULTS, compute_metrics
from dgm_scale.metrics.ndb import (
    assign_to_centroids,
    js_divergence,
    kmeans,
    ndb,
    two_proportion_p_values,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """These problems are tiny: on a busy machine, handing a [1024, 8] matmul to a second thread
    costs ~50x the work itself, so run single-threaded (results do not depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mixture(n_per_mode: int, centres: np.ndarray, seed: int, modes=None) -> np.ndarray:
    """n_per_mode unit-variance Gaussian rows around each chosen centre -> [len(modes) * n, D]."""
    rng = np.random.default_rng(seed)
    modes = range(len(centres)) if modes is None else modes
    return np.concatenate([rng.normal(size=(n_per_mode, centres.shape[1])) + centres[m] for m in modes])


def spread_centres(k: int, d: int, spacing: float, seed: int = 0) -> np.ndarray:
    """k centres in d dims, pairwise at least `spacing` apart (scaled one-hots of a random basis)."""
    basis, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return spacing * basis[:k]  # orthonormal rows: pairwise distance spacing * sqrt(2)


# ------------------------------------------------------------------------------------- z-test
def test_p_values_equal_the_scipy_two_proportion_z_test():
    rng = np.random.default_rng(0)
    n1, n2 = 1000, 1500
    c1, c2 = rng.integers(1, 120, size=30), rng.integers(1, 180, size=30)
    p1, p2 = c1 / n1, c2 / n2
    pooled = (c1 + c2) / (n1 + n2)
    z = (p1 - p2) / np.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    reference = 2 * scipy.stats.norm.sf(np.abs(z))
    ours = two_proportion_p_values(torch.from_numpy(p1), n1, torch.from_numpy(p2), n2).numpy()
    np.testing.assert_allclose(ours, reference, rtol=1e-10, atol=1e-300)
    assert (reference < 0.05).any() and (reference > 0.5).any()  # both regimes were exercised


def test_p_value_of_a_bin_empty_in_both_sets_is_one_and_equal_shares_give_one():
    p = two_proportion_p_values(torch.tensor([0.0, 0.3, 1.0]), 50, torch.tensor([0.0, 0.3, 1.0]), 70)
    assert torch.equal(p, torch.ones(3, dtype=torch.float64))


# ------------------------------------------------------------------------------------ k-means
def test_kmeans_recovers_well_separated_blob_centres_and_their_members():
    centres = spread_centres(5, 6, spacing=20.0)
    x = mixture(400, centres, seed=1)
    found, labels = kmeans(torch.from_numpy(x).float(), 5, seed=3)
    dist = np.linalg.norm(centres[:, None, :] - found.numpy()[None], axis=2)  # [true, found]
    match = dist.argmin(1)
    assert sorted(match) == list(range(5))  # one found centre per blob
    assert dist.min(1).max() < 0.3  # a blob mean of 400 unit-variance rows is off by ~0.12
    truth = np.repeat(np.arange(5), 400)
    assert np.array_equal(labels.numpy(), match[truth])  # every row in its own blob's cluster


def test_kmeans_is_deterministic_for_a_seed_and_independent_of_the_block_size():
    x = mixture(150, spread_centres(4, 3, spacing=3.0), seed=2)  # overlapping: a real optimisation
    a_centres, a_labels = kmeans(x, 7, seed=11)
    b_centres, b_labels = kmeans(torch.from_numpy(x), 7, seed=11, batch_size=37)
    assert torch.equal(a_labels, b_labels)
    torch.testing.assert_close(a_centres, b_centres, rtol=1e-12, atol=1e-12)
    c_centres, _ = kmeans(x, 7, seed=12)
    assert not torch.allclose(a_centres, c_centres)  # the seed does reach the initialisation


def test_assignment_equals_a_naive_cdist_argmin():
    rng = np.random.default_rng(4)
    x, c = rng.normal(size=(500, 9)), torch.from_numpy(rng.normal(size=(12, 9)))
    naive = torch.cdist(torch.from_numpy(x), c).argmin(1)
    assert torch.equal(assign_to_centroids(x, c, batch_size=64), naive)


def test_kmeans_lloyd_fixed_point_each_centre_is_its_members_mean():
    x = mixture(100, spread_centres(3, 4, spacing=2.0), seed=5)
    centres, labels = kmeans(x, 6, seed=0)
    for j in range(6):
        np.testing.assert_allclose(centres[j].numpy(), x[labels.numpy() == j].mean(0), rtol=1e-9, atol=1e-12)
    assert torch.equal(assign_to_centroids(x, centres), labels)


# -------------------------------------------------------------------------------- Jensen-Shannon
def test_js_of_identical_histograms_is_zero_and_of_disjoint_ones_ln2():
    p = torch.tensor([0.2, 0.5, 0.3, 0.0])
    assert js_divergence(p, p) == pytest.approx(0.0, abs=1e-15)
    assert js_divergence(torch.tensor([0.5, 0.5, 0, 0]), torch.tensor([0, 0, 0.25, 0.75])) == pytest.approx(math.log(2))


def test_js_equals_scipy_jensen_shannon_distance_squared():
    rng = np.random.default_rng(6)
    for _ in range(5):
        p, q = rng.dirichlet(np.ones(10)), rng.dirichlet(np.ones(10))
        p[3] = 0.0  # a zero bin on one side exercises 0 log 0
        expected = scipy.spatial.distance.jensenshannon(p, q) ** 2  # normalises; natural log
        assert js_divergence(torch.from_numpy(p), torch.from_numpy(q)) == pytest.approx(expected, rel=1e-10)


# ------------------------------------------------------------------------------------------ NDB
CENTRES = spread_centres(8, 8, spacing=8.0)


def test_ndb_of_a_set_against_itself_is_zero():
    x = mixture(100, CENTRES, seed=7)
    result = ndb(x, x, bins=20, seed=1)
    assert result.ndb == 0 and result.ndb_fraction == 0.0 and result.js == pytest.approx(0.0, abs=1e-15)
    assert torch.equal(result.real_proportions, result.fake_proportions)


def test_ndb_false_positive_rate_of_two_samples_of_one_distribution_is_near_alpha():
    """400 bin tests at alpha 0.05 between two i.i.d. samples of N(0, I) (the z-test's null: bin
    counts multinomial; `mixture`'s fixed rows per mode would make it conservative, ~0.012).
    Observed over 10 such blocks of 20 runs: mean 0.044, 0.030-0.060 (sd 0.008); bounds 3 sd."""
    def normal(seed: int) -> np.ndarray:
        return np.random.default_rng(seed).normal(size=(2000, 2))

    fractions = [ndb(normal(100 + s), normal(200 + s), bins=20, alpha=0.05, seed=s).ndb_fraction for s in range(20)]
    assert 0.02 <= np.mean(fractions) <= 0.07, np.mean(fractions)


def test_ndb_flags_the_bins_of_dropped_modes_under_mode_collapse():
    real = mixture(250, CENTRES, seed=8)
    kept, dropped = [0, 1, 2, 3], [4, 5, 6, 7]
    fake = mixture(500, CENTRES, seed=9, modes=kept)  # same size, half the modes
    result = ndb(real, fake, bins=20, seed=0)
    owner = np.linalg.norm(result.centroids.numpy()[:, None] - CENTRES[None], axis=2).argmin(1)
    in_dropped = np.isin(owner, dropped)
    assert in_dropped.sum() >= 4  # k-means gave the dropped modes bins of their own
    assert result.different.numpy()[in_dropped].all()  # each emptied bin is flagged
    assert (result.fake_proportions.numpy()[in_dropped] == 0).all()
    assert result.ndb_fraction >= 0.75  # kept modes' bins doubled their share: flagged too
    # Population JS: real puts 1/2 on dropped modes, fake 0; kept-mode bins hold x (real) vs 2x
    # (fake), so m = (1/4 on dropped, 1.5x on kept) and JS = 0.75 ln(4/3) ~= 0.216.
    assert result.js == pytest.approx(0.75 * math.log(4 / 3), abs=0.02)


def test_ndb_accepts_numpy_and_torch_of_any_float_dtype_alike():
    real, fake = mixture(60, CENTRES, seed=10), mixture(60, CENTRES, seed=11, modes=[0, 1, 2, 3])
    real32, fake32 = real.astype(np.float32), fake.astype(np.float32)
    a = ndb(real32, fake32, bins=10, seed=2)
    b = ndb(torch.from_numpy(real32).double(), torch.from_numpy(fake32).double(), bins=10, seed=2, batch_size=17)
    assert a.ndb == b.ndb and torch.equal(a.p_values, b.p_values)


# ------------------------------------------------------------------------------------- registry
def test_registry_runs_ndb_with_its_options_and_the_shared_seed():
    real, fake = mixture(60, CENTRES, seed=12), mixture(120, CENTRES, seed=13, modes=[0, 1, 2, 3])
    assert OPTION_DEFAULTS["ndb_bins"] == 20 and OPTION_DEFAULTS["ndb_alpha"] == 0.05
    out = compute_metrics(["ndb"], real, fake, options={"ndb_bins": 12, "ndb_alpha": 0.01, "seed": 5})
    direct = ndb(real, fake, bins=12, alpha=0.01, seed=5)
    assert out == {"ndb": float(direct.ndb), "ndb_fraction": direct.ndb_fraction, "ndb_js": direct.js}
    assert out["ndb"] > 0


@pytest.mark.parametrize("options, error", [
    ({"ndb_bin": 10}, KeyError), ({"ndb_bins": 1}, ValueError), ({"ndb_bins": 500}, ValueError),
    ({"ndb_bins": 10.0}, TypeError), ({"ndb_alpha": 0.0}, ValueError), ({"ndb_alpha": 1.5}, ValueError),
    ({"ndb_alpha": "0.05"}, TypeError),
])
def test_registry_rejects_bad_ndb_options(options, error):
    real = mixture(20, CENTRES, seed=14)
    with pytest.raises(error):
        compute_metrics(["ndb"], real, real, options=options)


def test_ndb_rejects_mismatched_widths_and_non_matrices():
    with pytest.raises(ValueError):
        ndb(np.zeros((30, 3)), np.zeros((30, 4)), bins=5)
    with pytest.raises(ValueError):
        ndb(np.zeros(30), np.zeros(30), bins=5)
