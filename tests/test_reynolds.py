"""ReynoldsFlow: the Neumann Poisson solver against closed forms and scipy, the continuity balance, the
ReynoldsFlow+ encoding, and the robustness to brightness change at tiny scale."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fewflow._validate import FewflowError
from fewflow.motion import endpoint_error, reynolds_flow, reynolds_plus, solve_poisson, sprite_video
from fewflow.motion.reynolds import div_coeff_grad, neumann_eigenvalues

torch.set_num_threads(1)


def _scipy_neumann(coeff: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Independent solve: the zero-flux matrix built edge by edge, with the mean pinned by a Lagrange row."""
    import scipy.sparse as sp
    import scipy.sparse.linalg as spla

    h, w = rhs.shape
    idx = np.arange(h * w).reshape(h, w)
    rows, cols, vals = [], [], []
    for i in range(h):
        for j in range(w):
            for di, dj in ((0, 1), (1, 0), (0, -1), (-1, 0)):
                a, b = i + di, j + dj
                if 0 <= a < h and 0 <= b < w:
                    c = (coeff[i, j] + coeff[a, b]) / 2
                    rows += [idx[i, j], idx[i, j]]
                    cols += [idx[a, b], idx[i, j]]
                    vals += [c, -c]
    n = h * w
    lap = sp.coo_matrix((vals, (rows, cols)), shape=(n, n)).tocsr()
    ones = sp.csr_matrix(np.ones((1, n)))
    big = sp.bmat([[lap, ones.T], [ones, None]]).tocsc()
    sol = spla.spsolve(big, np.concatenate([rhs.ravel() - rhs.mean(), [0.0]]))
    return sol[:n].reshape(h, w)


def test_poisson_dct_matches_cosine_eigenfunction():
    h, w = 9, 13
    i = torch.arange(h, dtype=torch.float64)[:, None]
    j = torch.arange(w, dtype=torch.float64)[None]
    for k, m in ((1, 0), (2, 3), (8, 12)):
        phi = torch.cos(math.pi * k * (i + 0.5) / h) * torch.cos(math.pi * m * (j + 0.5) / w)
        lam = (2 * math.cos(math.pi * k / h) - 2) + (2 * math.cos(math.pi * m / w) - 2)
        assert float(neumann_eigenvalues(h, w, phi)[k, m]) == pytest.approx(lam)
        sol = solve_poisson(lam * phi)
        assert torch.allclose(sol, phi - phi.mean(), atol=1e-10)


def test_poisson_continuum_closed_form_converges_second_order():
    """lap phi = -2 pi^2 phi for phi = cos(pi x) cos(pi y) on the unit square, zero flux at the walls."""
    errs = []
    for n in (16, 32, 64):
        hstep = 1.0 / n
        c = (torch.arange(n, dtype=torch.float64) + 0.5) * hstep
        y, x = torch.meshgrid(c, c, indexing="ij")
        phi = torch.cos(math.pi * x) * torch.cos(math.pi * y)
        rhs = -2 * math.pi**2 * phi * hstep**2  # the grid Laplacian is in units of pixels
        errs.append(float((solve_poisson(rhs) - phi).abs().max()))
    assert errs[-1] < 2e-3
    assert errs[0] / errs[1] > 3.5 and errs[1] / errs[2] > 3.5


def test_poisson_matches_scipy_with_and_without_coefficient():
    g = np.random.default_rng(0)
    rhs = g.normal(size=(7, 10))
    coeff = g.uniform(0.2, 1.5, size=(7, 10))
    ref_c = _scipy_neumann(coeff, rhs)
    ref_1 = _scipy_neumann(np.ones_like(rhs), rhs)
    got_c = solve_poisson(torch.tensor(rhs), torch.tensor(coeff), tol=1e-12).numpy()
    got_1 = solve_poisson(torch.tensor(rhs)).numpy()
    assert np.abs(got_c - ref_c).max() < 1e-8
    assert np.abs(got_1 - ref_1).max() < 1e-10
    out32 = solve_poisson(torch.tensor(rhs, dtype=torch.float32), torch.tensor(coeff, dtype=torch.float32))
    assert out32.dtype == torch.float32 and np.abs(out32.numpy() - ref_c).max() < 1e-4


def test_reynolds_flow_closes_the_continuity_balance():
    v = sprite_video(n_frames=3, seed=0, brightness_change=0.1, background_speed=0.5, max_speed=1.0)
    f0, f1 = v.frames[:-1], v.frames[1:]
    res = reynolds_flow(f0, f1, n_iter=100)
    assert torch.allclose(res.flow, res.v_o + res.v_r)
    f = ((f0 + f1) / 2).mean(1)
    coeff = torch.maximum(f, 1e-2 * f.mean((-2, -1), keepdim=True)).double()
    r = res.residual[:, 0].double()
    lhs = div_coeff_grad(res.phi[:, 0].double(), coeff)
    assert torch.allclose(lhs, -(r - r.mean((-2, -1), keepdim=True)), atol=1e-4)
    # identical frames: nothing moves, nothing to explain
    still = reynolds_flow(f0, f0)
    assert float(still.flow.abs().max()) < 1e-6


def test_reynolds_plus_encoding():
    v = sprite_video(n_frames=2, seed=1)
    f0, f1 = v.pair(0)
    res = reynolds_flow(f0, f1, n_iter=50)
    enc = reynolds_plus(f0, f1, result=res)
    assert enc.shape == (1, 3, 24, 24) and float(enc.min()) >= 0 and float(enc.max()) <= 1 + 1e-6
    mag_o = res.v_o.norm(dim=1)
    assert torch.allclose(enc[:, 0], mag_o / mag_o.max(), atol=1e-6)
    g = f1.mean(1)
    assert torch.allclose(enc[:, 2], g / g.max(), atol=1e-6)
    assert torch.allclose(reynolds_plus(f0, f1, n_iter=50), enc)


def test_continuity_is_more_robust_to_global_brightening_than_horn_schunck():
    """The paper's effect at tiny scale: the EPE of ReynoldsFlow grows less than Horn–Schunck's."""
    growth = {"hs": 0.0, "rf": 0.0}
    for seed in range(2):
        for b, sign in ((0.0, -1.0), (0.1, 1.0)):
            v = sprite_video(n_frames=4, seed=seed, brightness_change=b, background_speed=0.5, max_speed=1.0)
            res = reynolds_flow(v.frames[:-1], v.frames[1:], n_iter=150)
            growth["hs"] += sign * float(endpoint_error(res.v_o, v.flow_fw))
            growth["rf"] += sign * float(endpoint_error(res.flow, v.flow_fw))
    assert growth["hs"] > 0  # brightening hurts brightness constancy
    assert growth["rf"] < growth["hs"]


def test_reynolds_errors():
    a = torch.rand(1, 3, 8, 8)
    with pytest.raises(FewflowError, match="same shape"):
        reynolds_flow(a, torch.rand(1, 3, 9, 8))
    with pytest.raises(FewflowError, match="NaN"):
        reynolds_flow(a, torch.full_like(a, float("nan")))
    with pytest.raises(FewflowError, match="positive"):
        solve_poisson(torch.rand(4, 4), -torch.ones(4, 4))
    with pytest.raises(FewflowError, match="match"):
        solve_poisson(torch.rand(4, 4), torch.ones(4, 5))
    with pytest.raises(FewflowError, match="positive mean"):
        reynolds_flow(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))


def test_outputs_follow_the_input_dtype_and_leave_inputs_alone():
    v = sprite_video(n_frames=2, size=16, seed=4)
    f0, f1 = v.frames[:1].double(), v.frames[1:].double()
    c0, c1 = f0.clone(), f1.clone()
    res = reynolds_flow(f0, f1, n_iter=30)
    assert all(t.dtype == torch.float64 for t in (res.flow, res.v_o, res.v_r, res.phi, res.residual))
    assert torch.equal(f0, c0) and torch.equal(f1, c1)
    assert reynolds_plus(f0, f1, result=res).dtype == torch.float64
