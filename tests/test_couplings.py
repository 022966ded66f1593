"""Couplings: exact OT optimality (vs POT's emd2), class-conditional OT, Sinkhorn/SB, W-CFM, prefetch."""

from __future__ import annotations

import math
import threading

import numpy as np
import ot
import pytest
import torch

from fewflow import FewflowError
from fewflow.couplings import (
    ClassConditionalOT,
    CouplingResult,
    ExactOTCoupling,
    IndependentCoupling,
    PrefetchCoupler,
    SchrodingerBridgeCoupling,
    SinkhornCoupling,
    WeightedCoupling,
    brownian_bridge_noise,
    entropic_plan,
    pairwise_cost,
)


def _emd_cost(x0: torch.Tensor, x1: torch.Tensor, metric: str = "sqeuclidean") -> float:
    """Optimal mean cost between two uniform batches, by POT's network simplex (independent solver)."""
    a = x0.reshape(x0.shape[0], -1).double().numpy()
    b = x1.reshape(x1.shape[0], -1).double().numpy()
    m = ot.dist(a, b, metric=metric)
    w0 = np.full(len(a), 1.0 / len(a))
    w1 = np.full(len(b), 1.0 / len(b))
    return float(ot.emd2(w0, w1, m))


def _mean_pair_cost(x0: torch.Tensor, x1: torch.Tensor, metric: str = "sqeuclidean") -> float:
    d2 = (x0.double() - x1.double()).reshape(x0.shape[0], -1).pow(2).sum(1)
    return float((d2 if metric == "sqeuclidean" else d2.sqrt()).mean())


def _is_perm(perm: torch.Tensor, n: int) -> bool:
    return perm.shape == (n,) and bool((torch.sort(perm).values == torch.arange(n)).all())


@pytest.mark.parametrize("shape", [(64, 2), (50, 7), (40, 1, 4, 4)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_ot_attains_emd_cost_and_is_a_permutation(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g)
    x1 = torch.randn(shape, generator=g) * 2 + 1
    res = ExactOTCoupling()(x0, x1)
    assert _is_perm(res.perm, shape[0])
    assert torch.equal(res.x0, x0[res.perm])
    assert res.x1 is x1  # x1 never reordered
    got = _mean_pair_cost(res.x0, res.x1)
    assert got == pytest.approx(_emd_cost(x0, x1), rel=1e-9)
    assert got < _mean_pair_cost(x0, x1)  # beats the independent pairing on random data
    assert res.diagnostics["cost_coupled"] == pytest.approx(got, rel=1e-9)
    assert res.diagnostics["cost_independent"] == pytest.approx(_mean_pair_cost(x0, x1), rel=1e-9)
    emd = ExactOTCoupling(solver="emd")(x0, x1)
    assert _is_perm(emd.perm, shape[0])
    assert _mean_pair_cost(emd.x0, x1) == pytest.approx(got, rel=1e-9)


def test_exact_ot_euclidean_cost_and_dtype_preserved():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(48, 3, generator=g, dtype=torch.float64)
    x1 = torch.randn(48, 3, generator=g, dtype=torch.float64) + 2
    res = ExactOTCoupling(cost="euclidean")(x0, x1)
    assert _mean_pair_cost(res.x0, x1, "euclidean") == pytest.approx(_emd_cost(x0, x1, "euclidean"), rel=1e-9)
    assert res.x0.dtype == torch.float64 and res.perm.dtype == torch.long and res.x0.device == x0.device
    x32 = ExactOTCoupling()(x0.float(), x1.float()).x0
    assert x32.dtype == torch.float32


def test_pairwise_cost_matches_direct_distance():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 2, 3, generator=g), torch.randn(6, 2, 3, generator=g)
    c = pairwise_cost(a, b)
    direct = ((a.double()[:, None] - b.double()[None]) ** 2).flatten(2).sum(-1)
    assert c.dtype == torch.float64 and torch.allclose(c, direct, atol=1e-12)


def test_class_conditional_ot_pairs_within_classes_and_is_optimal_per_class():
    g = torch.Generator().manual_seed(5)
    n = 90
    y = torch.randint(0, 4, (n,), generator=g)
    x0 = torch.randn(n, 2, generator=g)
    x1 = torch.randn(n, 2, generator=g) + 3 * y[:, None].float()
    res = ClassConditionalOT()(x0, x1, y=y)
    assert _is_perm(res.perm, n)
    assert torch.equal(y[res.perm], y)  # every x0 came from a slot of the same class
    assert torch.equal(res.y, y)
    for k in torch.unique(y):
        idx = torch.nonzero(y == k).flatten()
        got = _mean_pair_cost(res.x0[idx], x1[idx])
        assert got == pytest.approx(_emd_cost(x0[idx], x1[idx]), rel=1e-9, abs=1e-12)
    # unconstrained exact OT is at least as good overall, and mixes classes here
    free = ExactOTCoupling()(x0, x1)
    assert _mean_pair_cost(free.x0, x1) <= _mean_pair_cost(res.x0, x1) + 1e-12
    with pytest.raises(FewflowError, match="labels y"):
        ClassConditionalOT()(x0, x1)


def test_independent_coupling_keeps_pairs():
    x0, x1 = torch.randn(8, 2), torch.randn(8, 2)
    res = IndependentCoupling()(x0, x1)
    assert res.x0 is x0 and res.x1 is x1 and res.perm is None and res.weights is None


def _naive_sinkhorn(c: torch.Tensor, reg: float, iters: int = 5000) -> torch.Tensor:
    """Plain Sinkhorn-Knopp scaling, written out independently of POT."""
    k = torch.exp(-c / reg)
    a = torch.full((c.shape[0],), 1.0 / c.shape[0], dtype=c.dtype)
    b = torch.full((c.shape[1],), 1.0 / c.shape[1], dtype=c.dtype)
    u = torch.ones_like(a)
    for _ in range(iters):
        v = b / (k.T @ u)
        u = a / (k @ v)
    return u[:, None] * k * v[None, :]


def test_entropic_plan_matches_independent_sinkhorn_and_has_uniform_marginals():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(30, 2, generator=g), torch.randn(30, 2, generator=g) + 1
    c = pairwise_cost(x0, x1)
    c = c / c.max()
    for reg in (0.5, 0.05):
        p = entropic_plan(c, reg)
        assert torch.allclose(p, _naive_sinkhorn(c, reg), atol=1e-8)
        assert torch.allclose(p.sum(0), torch.full((30,), 1 / 30, dtype=torch.float64), atol=1e-6)
    # tiny reg: the log-domain branch stays finite and approaches the exact OT cost
    p = entropic_plan(c, 1e-3)  # max(C) / reg = 1000: the plain kernel exp(-C / reg) would underflow
    assert bool(torch.isfinite(p).all())
    assert torch.allclose(p.sum(0), torch.full((30,), 1 / 30, dtype=torch.float64), atol=5e-3 / 30)
    exact = _emd_cost(x0, x1) / float(pairwise_cost(x0, x1).max())
    assert float((p * c).sum()) == pytest.approx(exact, rel=2e-2)


def test_sinkhorn_coupling_interpolates_between_exact_and_independent():
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(128, 2, generator=g), torch.randn(128, 2, generator=g) + 2
    exact = _emd_cost(x0, x1)
    indep = _mean_pair_cost(x0, x1)
    sharp = SinkhornCoupling(reg=1e-3)(x0, x1, generator=torch.Generator().manual_seed(0))
    blurry = SinkhornCoupling(reg=10.0)(x0, x1, generator=torch.Generator().manual_seed(0))
    assert _mean_pair_cost(sharp.x0, x1) < exact * 1.1
    assert abs(_mean_pair_cost(blurry.x0, x1) - indep) < 0.1 * indep  # measured 10.6 vs 11.2 (exact 7.3)
    # sampling: x1 kept, x0 rows come from x0, and repeats are possible (documented)
    assert sharp.x1 is x1 and torch.equal(sharp.x0, x0[sharp.perm])
    assert blurry.diagnostics["unique_x0_fraction"] < 1.0
    again = SinkhornCoupling(reg=10.0)(x0, x1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.perm, blurry.perm)


def test_schrodinger_bridge_coupling_reg_and_path_noise():
    sb = SchrodingerBridgeCoupling(sigma=0.5)
    assert sb.reg == pytest.approx(2 * 0.25) and sb.normalize_cost is False
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64, requires_grad=True)
    s, ds = sb.path_noise(t)
    assert torch.allclose(s, 0.5 * torch.sqrt(t * (1 - t)))
    (auto,) = torch.autograd.grad(s.sum(), t)
    assert torch.allclose(ds, auto, atol=1e-10)
    s2, _ = brownian_bridge_noise(torch.tensor([0.0, 1.0]), 0.5)
    assert bool(torch.isfinite(s2).all()) and float(s2.max()) < 1e-3
    x0, x1 = torch.randn(32, 2), torch.randn(32, 2)
    res = sb(x0, x1, generator=torch.Generator().manual_seed(0))
    assert res.x0.shape == x0.shape


def test_weighted_coupling_uniform_as_eps_grows_and_reports_ess():
    g = torch.Generator().manual_seed(2)
    n = 256
    x0, x1 = torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g) * 2
    devs, esss = [], []
    for eps in (0.05, 0.5, 5.0, 50.0, 1e4):
        res = WeightedCoupling(eps)(x0, x1)
        w = res.weights
        assert w.shape == (n,) and not w.requires_grad and float(w.min()) > 0
        assert float(w.mean()) == pytest.approx(1.0, rel=1e-5)
        ess = float(w.sum() ** 2 / (w**2).sum())
        assert res.diagnostics["ess"] == pytest.approx(ess, rel=1e-5)
        assert res.diagnostics["ess_fraction"] == pytest.approx(ess / n, rel=1e-5)
        devs.append(float((w - 1).abs().max()))
        esss.append(ess)
    assert all(a > b for a, b in zip(devs, devs[1:]))
    assert devs[-1] < 1e-3 and esss[-1] == pytest.approx(n, rel=1e-5)
    assert esss[0] < 0.5 * n
    # the Gibbs kernel: log w is affine in the cost with slope -1/eps_eff
    res = WeightedCoupling(0.5)(x0, x1)
    c = (x0 - x1).pow(2).sum(1).double()
    assert res.diagnostics["eps_effective"] == pytest.approx(0.5 * float(c.mean()), rel=1e-6)
    slope = np.polyfit(c.numpy(), res.weights.double().log().numpy(), 1)[0]
    assert slope == pytest.approx(-1.0 / res.diagnostics["eps_effective"], rel=1e-4)
    assert torch.equal(WeightedCoupling(math.inf)(x0, x1).weights, torch.ones(n))


def test_weighted_coupling_relative_eps_is_scale_free():
    g = torch.Generator().manual_seed(4)
    x0, x1 = torch.randn(64, 3, generator=g), torch.randn(64, 3, generator=g)
    w1 = WeightedCoupling(0.3)(x0, x1).weights
    w10 = WeightedCoupling(0.3)(10 * x0, 10 * x1).weights
    assert torch.allclose(w1, w10, rtol=1e-4)
    wa = WeightedCoupling(0.3, relative=False)(x0, x1).weights
    wb = WeightedCoupling(0.3, relative=False)(10 * x0, 10 * x1).weights
    assert not torch.allclose(wa, wb, rtol=1e-2)


def test_bad_inputs_raise_fewflow_error():
    x = torch.randn(8, 2)
    with pytest.raises(FewflowError, match="shape mismatch"):
        ExactOTCoupling()(x, torch.randn(7, 2))
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(FewflowError, match="non-finite"):
        ExactOTCoupling()(bad, x)
    with pytest.raises(FewflowError, match="eps"):
        WeightedCoupling(0.0)
    with pytest.raises(FewflowError, match="reg"):
        SinkhornCoupling(-1.0)
    with pytest.raises(FewflowError, match="sigma"):
        SchrodingerBridgeCoupling(0.0)
    with pytest.raises(FewflowError, match="cost"):
        ExactOTCoupling(cost="l1")
    with pytest.raises(FewflowError, match="solver"):
        ExactOTCoupling(solver="auction")
    with pytest.raises(FewflowError, match="labels"):
        ExactOTCoupling()(x, x, y=torch.zeros(3, dtype=torch.long))


def test_prefetch_coupler_matches_sequential_coupling():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 2, generator=g), torch.randint(0, 3, (32,), generator=g)) for _ in range(5)]
    coupler = PrefetchCoupler(batches, ExactOTCoupling(), depth=2, seed=7)
    got = list(coupler)
    assert len(got) == 5 and all(isinstance(r, CouplingResult) for r in got)
    ref_gen = torch.Generator().manual_seed(7)
    for (x1, y), r in zip(batches, got):
        x0 = torch.randn(x1.shape, generator=ref_gen)
        ref = ExactOTCoupling()(x0, x1, y=y)
        assert torch.equal(r.x1, x1) and torch.equal(r.y, y)
        assert torch.equal(r.x0, ref.x0) and torch.equal(r.perm, ref.perm)
    # a second pass re-iterates the loader
    assert len(list(coupler)) == 5
    # several workers: same results, same order
    with PrefetchCoupler(batches, ExactOTCoupling(), depth=2, seed=7, num_workers=3) as par:
        got3 = list(par)
    assert all(torch.equal(a.perm, b.perm) and torch.equal(a.x0, b.x0) for a, b in zip(got, got3))
    # random couplings are reproducible per seed whatever the number of workers
    sk = [r.perm for r in PrefetchCoupler(batches, SinkhornCoupling(0.5), seed=1)]
    sk3 = [r.perm for r in PrefetchCoupler(batches, SinkhornCoupling(0.5), seed=1, num_workers=3)]
    assert all(torch.equal(a, b) for a, b in zip(sk, sk3))


def test_prefetch_coupler_process_backend_matches_thread_backend():
    """The process backend (for GIL-holding solvers such as POT's emd) gives the same pairs, in order."""
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(24, 2, generator=g) for _ in range(4)]
    thr = list(PrefetchCoupler(batches, ExactOTCoupling(solver="lsa"), seed=3))
    with PrefetchCoupler(batches, ExactOTCoupling(solver="emd"), seed=3, backend="process") as proc:
        got = list(proc)
    assert len(got) == 4
    for a, b, x1 in zip(thr, got, batches):
        assert torch.equal(b.x1, x1) and torch.equal(a.x0.sort(0).values, b.x0.sort(0).values)
        # both solvers are exact: same optimal cost (the optimum may be attained by several permutations)
        ca = (a.x0 - x1).pow(2).sum(1).mean()
        cb = (b.x0 - x1).pow(2).sum(1).mean()
        assert torch.allclose(ca, cb, rtol=1e-9, atol=1e-9)
    with pytest.raises(FewflowError, match="backend"):
        PrefetchCoupler(batches, ExactOTCoupling(), backend="fibers")


def test_prefetch_coupler_with_sampler_source_and_errors():
    class ShiftedSource:
        def sample_like(self, x1, generator=None):
            return torch.randn(x1.shape, generator=generator) + 100.0

    with PrefetchCoupler(lambda: torch.zeros(16, 2), IndependentCoupling(), source=ShiftedSource(),
                         max_batches=3, seed=0) as coupler:
        out = list(coupler)
    assert len(out) == 3 and all(float(r.x0.mean()) > 90 for r in out)

    def bad_sampler():
        return torch.full((4, 2), float("nan"))

    coupler = PrefetchCoupler(bad_sampler, ExactOTCoupling())
    with pytest.raises(FewflowError, match="non-finite"):
        next(iter(coupler))
    coupler.close()
    with pytest.raises(FewflowError, match="depth"):
        PrefetchCoupler([torch.zeros(2, 2)], ExactOTCoupling(), depth=0)


def test_prefetch_coupler_close_stops_an_infinite_producer():
    coupler = PrefetchCoupler(lambda: torch.randn(8, 2), ExactOTCoupling(), depth=1).start()
    next(coupler)
    coupler.close()
    assert not any(t.name == "fewflow-prefetch-coupler" and t.is_alive() for t in threading.enumerate())
