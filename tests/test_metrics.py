"""Tests for fewflow.metrics: closed forms, independent implementations, FD-digits, straightness, cost."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import ot
import pytest
import scipy.linalg
import torch

from fewflow import FewflowError
from fewflow.data import load_dataset
from fewflow.metrics import (
    CostMeter,
    class_histogram,
    classifier_accuracy,
    digits_classifier_accuracy,
    energy_distance,
    fd_digits,
    frechet_distance,
    frechet_from_stats,
    get_feature_classifier,
    mmd_rbf,
    nfe_of,
    sliced_wasserstein,
    straightness,
    straightness_of_model,
    two_sample_floor,
    wasserstein2,
    wasserstein_1d,
)
from fewflow.metrics import features as features_mod

# ------------------------------------------------------------------------------------------ distances


def test_sliced_equals_exact_w2_in_1d_and_closed_form_for_shift(gen):
    a = torch.randn(500, 1, generator=gen, dtype=torch.float64)
    for m in (0.0, 0.5, -2.0):
        # a translated copy: W2 = |m| exactly for the empirical measures
        assert sliced_wasserstein(a, a + m, n_proj=4, generator=gen) == pytest.approx(abs(m), abs=1e-9)
        assert wasserstein2(a, a + m) == pytest.approx(abs(m), abs=1e-6)
    # independent samples of N(0,1) and N(m,1): W2 -> |m| (the Gaussian closed form), sliced == exact in 1-D
    x = torch.randn(1000, 1, generator=gen, dtype=torch.float64)
    y = torch.randn(1000, 1, generator=gen, dtype=torch.float64) + 1.5
    sw, w2 = sliced_wasserstein(x, y, n_proj=8, generator=gen), wasserstein2(x, y)
    assert sw == pytest.approx(w2, rel=1e-6)
    assert w2 == pytest.approx(1.5, abs=0.12)


def test_wasserstein_1d_unequal_sizes_matches_pot(gen):
    u = torch.randn(37, 3, generator=gen, dtype=torch.float64)
    v = torch.randn(52, 3, generator=gen, dtype=torch.float64) * 2 + 0.3
    ours = wasserstein_1d(u, v, p=2)
    for j in range(3):
        ref = ot.wasserstein_1d(u[:, j].numpy(), v[:, j].numpy(), p=2)  # independent implementation
        assert float(ours[j]) == pytest.approx(float(ref), rel=1e-9)
    # the same empirical measure at different sizes is at distance 0
    assert sliced_wasserstein(u, torch.cat([u, u]), generator=gen) == pytest.approx(0.0, abs=1e-9)


def test_wasserstein2_matches_brute_force_assignment(gen):
    a = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    b = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    cost = torch.cdist(a, b).pow(2).numpy()
    best = min(sum(cost[i, p[i]] for i in range(6)) for p in itertools.permutations(range(6))) / 6
    assert wasserstein2(a, b) == pytest.approx(math.sqrt(best), rel=1e-9)
    with pytest.raises(FewflowError, match="max_points"):
        wasserstein2(torch.zeros(6001, 2), torch.zeros(10, 2))


@pytest.mark.parametrize("metric", ["sw", "w2", "mmd", "energy"])
def test_distances_zero_for_identical_and_monotone_in_shift(metric, gen):
    fns = {
        "sw": lambda a, b: sliced_wasserstein(a, b, generator=torch.Generator().manual_seed(1)),
        "w2": wasserstein2,
        "mmd": lambda a, b: mmd_rbf(a, b, bandwidth=1.0),
        "energy": energy_distance,
    }
    f = fns[metric]
    a = torch.randn(400, 2, generator=gen)
    b = torch.randn(400, 2, generator=gen)
    if metric == "mmd":
        assert abs(f(a, a)) < 0.01  # unbiased: ~0, not exactly 0
    else:
        assert f(a, a) == pytest.approx(0.0, abs=1e-7)
    direction = torch.tensor([1.0, 1.0]) / math.sqrt(2)
    vals = [f(a, b + s * direction) for s in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(v1 < v2 for v1, v2 in zip(vals, vals[1:])), vals


def test_mmd_unbiased_and_closed_form(gen):
    # population MMD^2 between N(0, s^2 I_d) and N(m, s^2 I_d) with k = exp(-|x-y|^2 / (2 sigma^2)):
    # 2 (sigma^2 / (sigma^2 + 2 s^2))^(d/2) (1 - exp(-|m|^2 / (2 (sigma^2 + 2 s^2))))
    d, s, sigma, m = 2, 1.0, 1.5, 1.0
    c = (sigma**2 / (sigma**2 + 2 * s**2)) ** (d / 2)
    closed = 2 * c * (1 - math.exp(-(m**2) / (2 * (sigma**2 + 2 * s**2))))
    a = torch.randn(2000, d, generator=gen, dtype=torch.float64)
    b = torch.randn(2000, d, generator=gen, dtype=torch.float64) + torch.tensor([m, 0.0], dtype=torch.float64)
    assert mmd_rbf(a, b, bandwidth=sigma) == pytest.approx(closed, abs=0.01)
    # unbiased: the average over many small same-law pairs is ~0 (the biased V-statistic would be ~ +2/n)
    est = [mmd_rbf(torch.randn(20, d, generator=gen), torch.randn(20, d, generator=gen)) for _ in range(200)]
    assert abs(float(np.mean(est))) < 3 * float(np.std(est)) / math.sqrt(200) + 1e-3
    assert min(est) < 0  # only an unbiased estimator goes negative
    with pytest.raises(FewflowError, match="bandwidth"):
        mmd_rbf(a, b, bandwidth=0.0)


def test_energy_distance_point_masses():
    a, b = torch.zeros(3, 2), torch.tensor([[3.0, 4.0]]).repeat(5, 1)
    assert energy_distance(a, b) == pytest.approx(2 * 5.0)


def test_distance_input_errors():
    with pytest.raises(FewflowError, match="dimension"):
        sliced_wasserstein(torch.zeros(4, 2), torch.zeros(4, 3))
    with pytest.raises(FewflowError, match="non-finite"):
        energy_distance(torch.tensor([[float("nan")]]), torch.zeros(2, 1))


def test_images_are_flattened(gen):
    a = torch.randn(50, 1, 4, 4, generator=gen)
    assert energy_distance(a, a + 1) == pytest.approx(energy_distance(a.flatten(1), a.flatten(1) + 1))


def test_two_sample_floor(gen):
    data = load_dataset("moons", n=4000).x
    sw = lambda a, b: sliced_wasserstein(a, b, generator=torch.Generator().manual_seed(0))  # noqa: E731
    floor = two_sample_floor(data, sw, 1000, generator=gen)
    assert 0 < floor < 0.15
    shifted = sw(data[:1000], data[1000:2000] + 0.5)
    assert shifted > 3 * floor

    def sampler(n, generator=None):
        return torch.randn(n, 2, generator=generator)

    f2 = two_sample_floor(sampler, energy_distance, 300, generator=gen, repeats=3)
    assert 0 < f2 < 0.05
    with pytest.raises(FewflowError, match="2n"):
        two_sample_floor(data, sw, 3000)


# ------------------------------------------------------------------------------------------- frechet


def test_frechet_closed_form_diagonal_and_general(gen):
    mu_a, mu_b = np.array([1.0, 0.0, -1.0]), np.array([0.0, 2.0, -1.0])
    da, db = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    closed = float(np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(da) - np.sqrt(db)) ** 2))
    assert frechet_from_stats(mu_a, np.diag(da), mu_b, np.diag(db)) == pytest.approx(closed, rel=1e-10)
    # non-commuting covariances: compare with tr sqrtm(A B) via scipy (independent formula)
    rng = np.random.default_rng(0)
    la, lb = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    ca, cb = la @ la.T + 0.1 * np.eye(4), lb @ lb.T
    ref = float(np.sum((mu_a[:1] - mu_b[:1]) ** 2) + np.trace(ca) + np.trace(cb)
                - 2 * np.trace(scipy.linalg.sqrtm(ca @ cb)).real)
    ours = frechet_from_stats(np.r_[mu_a[:1], 0, 0, 0], ca, np.r_[mu_b[:1], 0, 0, 0], cb)
    assert ours == pytest.approx(ref, rel=1e-8)
    # rank-deficient (tiny negative eigenvalues from round-off) stays finite and >= 0
    low = np.outer([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert frechet_from_stats(np.zeros(3), low, np.zeros(3), low) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_of_gaussian_samples(gen):
    n = 20000
    a = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    scale = torch.tensor([2.0, 1.0], dtype=torch.float64)
    b = torch.randn(n, 2, generator=gen, dtype=torch.float64) * scale + 1
    closed = 2.0 + (1 - 2) ** 2  # |mu|^2 = 2, diag sqrt-cov difference (1 - 2)^2 + 0
    assert frechet_distance(a, b) == pytest.approx(closed, abs=0.08)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


# ------------------------------------------------------------------------------------------ FD-digits


@pytest.fixture(scope="module")
def digits_classifier(tmp_path_factory):
    cache = tmp_path_factory.mktemp("fewflow_cache")
    clf = get_feature_classifier("digits", cache_dir=cache)
    return clf, cache


@pytest.mark.slow
def test_fd_digits_separates_real_from_noised(digits_classifier):
    clf, _ = digits_classifier
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    acc = classifier_accuracy(test.x, test.y, classifier=clf)
    assert acc > 0.9
    g = torch.Generator().manual_seed(0)
    real = fd_digits(train.x, classifier=clf)  # reference: the test split
    noised = [
        fd_digits(train.x + s * torch.randn(train.x.shape, generator=g), classifier=clf) for s in (0.5, 1.0)
    ]
    assert real < 0.2 * noised[0] < noised[1]
    assert fd_digits(test.x, reference=test.x, classifier=clf) == pytest.approx(0.0, abs=1e-6)
    hist = class_histogram(test.x, classifier=clf)
    assert hist.shape == (10,) and int(hist.sum()) == len(test)
    assert int(hist.min()) > 25  # every digit class is recognised
    collapsed = class_histogram(test.x[test.y == 3], classifier=clf)
    assert int(collapsed.argmax()) == 3 and int(collapsed[3]) > 0.8 * int((test.y == 3).sum())


@pytest.mark.slow
def test_feature_classifier_cache_roundtrip(digits_classifier, monkeypatch):
    clf, cache = digits_classifier
    files = sorted(p.name for p in (cache / "classifiers").iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".safetensors")
    features_mod._MEMO.clear()  # force a load from disk
    loaded = get_feature_classifier("digits", cache_dir=cache)
    assert loaded is not clf
    for (k, v), (k2, v2) in zip(clf.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    with pytest.raises(FewflowError, match="cannot tell the data set"):
        class_histogram(torch.zeros(4, 1, 5, 5))
    monkeypatch.setenv("FEWFLOW_CACHE", str(cache))  # the default cache now holds the trained classifier
    test = load_dataset("digits", split="test")
    expected = classifier_accuracy(test.x, test.y, classifier=loaded)
    assert digits_classifier_accuracy(test.x, test.y) == expected
    with pytest.raises(FewflowError, match="labels"):
        classifier_accuracy(torch.zeros(4, 1, 8, 8), torch.zeros(3, dtype=torch.long), classifier=clf)


# ---------------------------------------------------------------------------------------- straightness


def test_straightness_zero_for_straight_constant_speed(gen):
    x0, x1 = torch.randn(8, 3, generator=gen), torch.randn(8, 3, generator=gen)
    for times in (torch.linspace(0, 1, 11), torch.tensor([0.0, 0.1, 0.15, 0.5, 0.9, 1.0])):
        traj = torch.stack([x0 + t * (x1 - x0) for t in times])
        assert straightness(traj, times) == pytest.approx(0.0, abs=1e-10)
        assert straightness(list(traj), times.tolist()) == pytest.approx(0.0, abs=1e-10)


def test_straightness_positive_for_curves_matches_closed_form():
    # quarter circle x(t) = (cos(pi t / 2), sin(pi t / 2)): S = |v|^2 - |chord|^2 = pi^2/4 - 2
    times = torch.linspace(0, 1, 2001, dtype=torch.float64)
    traj = torch.stack([torch.cos(math.pi * times / 2), torch.sin(math.pi * times / 2)], -1)[:, None]
    assert straightness(traj, times) == pytest.approx(math.pi**2 / 4 - 2, rel=1e-3)
    # a straight line at non-constant speed x(t) = t^2 e: S = int (2t - 1)^2 dt = 1/3
    line = (times**2)[:, None, None] * torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    assert straightness(line, times) == pytest.approx(1 / 3, rel=1e-3)
    with pytest.raises(FewflowError, match="monotone"):
        straightness(traj[:3], torch.tensor([0.0, 0.5, 0.5]))
    with pytest.raises(FewflowError, match="entries"):
        straightness(traj[:3], torch.tensor([0.0, 1.0]))


def test_straightness_of_model_via_solver(gen):
    pytest.importorskip("fewflow.solvers")
    x0 = torch.randn(16, 2, generator=gen)
    const = torch.tensor([1.0, -2.0])
    s_const = straightness_of_model(lambda x, t: const.expand_as(x), x0, steps=8)
    assert s_const == pytest.approx(0.0, abs=1e-10)
    rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    # rotation at angular speed 2: S = |v|^2 - |chord|^2 = (4 - 2 (1 - cos 2)) mean |x0|^2 (measured: 0.996 x)
    closed = (4 - 2 * (1 - math.cos(2.0))) * float(x0.double().pow(2).sum(1).mean())
    s_rot = straightness_of_model(lambda x, t: x @ rot.T * 2.0, x0, steps=16, stepper="rk4")
    assert s_rot == pytest.approx(closed, rel=2e-2)


# -------------------------------------------------------------------------------------------- cost


def test_cost_meter_times_and_sums_nfe():
    class Res:  # stand-in with the SolveResult fields used here
        def __init__(self, nfe, n):
            self.nfe, self.x = nfe, torch.zeros(n, 2)

    with CostMeter() as cost:
        time.sleep(0.02)
        cost.add(Res(4, 10))
        cost.add(Res(8, 10))
    summ = cost.summary()
    assert summ["nfe"] == 12 and summ["n_samples"] == 20
    assert 0.015 < summ["wall_s"] < 1.0 and summ["ms_per_sample"] == pytest.approx(1000 * summ["wall_s"] / 20)
    assert nfe_of(Res(3, 1)) == 3
    with pytest.raises(FewflowError, match="nfe"):
        nfe_of(object())
