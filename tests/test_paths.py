"""Schedules, affine paths, prediction conversions and rescheduling (fewflow.paths)."""

from __future__ import annotations

import math

import pytest
import torch

from fewflow import FewflowError
from fewflow.paths import (
    AffinePath,
    CosineSchedule,
    FunctionSchedule,
    LinearSchedule,
    PathSample,
    PolynomialSchedule,
    Schedule,
    VPSchedule,
    get_schedule,
    reschedule,
    time_derivative,
)

SCHEDULES = {
    "linear": LinearSchedule(),
    "cosine": CosineSchedule(),
    "vp": VPSchedule(),
    "poly2": PolynomialSchedule(2),
    "poly3": PolynomialSchedule(3),
    "function": FunctionSchedule(lambda t: t**2 * (3 - 2 * t), lambda t: 1 - t**2 * (3 - 2 * t)),
}
STANDARD = ["linear", "cosine", "poly2", "poly3", "function"]  # alpha_0 = 0, sigma_0 = 1, alpha_1 = 1


def fd(fn, t, h=1e-6):
    """Central finite difference in float64 (independent of autodiff)."""
    return (fn(t + h) - fn(t - h)) / (2 * h)


# ----------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("name", STANDARD)
def test_standard_boundaries(name):
    s = SCHEDULES[name]
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(s.alpha(t), torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(s.sigma(t), torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)


def test_vp_closed_form_and_start():
    s = VPSchedule(beta_min=0.1, beta_max=20.0)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    T = lambda u: 0.1 * u + 0.5 * 19.9 * u**2  # noqa: E731
    alpha = torch.exp(-0.5 * T(1 - t))
    torch.testing.assert_close(s.alpha(t), alpha)
    torch.testing.assert_close(s.sigma(t), torch.sqrt(1 - alpha**2))
    # the VP path starts at alpha(0) = exp(-T(1)/2), small but not zero
    assert s.alpha(torch.tensor(0.0, dtype=torch.float64)).item() == pytest.approx(math.exp(-0.5 * 10.05))
    assert 0 < s.alpha(torch.tensor(0.0)).item() < 1e-2
    assert torch.isfinite(s.d_sigma(torch.tensor(1.0)))  # floored, not inf


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_derivatives_match_finite_differences(name):
    s = SCHEDULES[name]
    t = torch.rand(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.9 + 0.05
    torch.testing.assert_close(s.d_alpha(t), fd(s.alpha, t), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s.d_sigma(t), fd(s.sigma, t), rtol=1e-6, atol=1e-7)
    # the autodiff fallback agrees with the closed forms
    torch.testing.assert_close(time_derivative(s.alpha, t), s.d_alpha(t))
    torch.testing.assert_close(Schedule.d_sigma(s, t), s.d_sigma(t))


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_any_shape_keeps_dtype(name, dtype):
    s = SCHEDULES[name]
    t = torch.rand(2, 3, 5).to(dtype)
    for f in (s.alpha, s.sigma, s.d_alpha, s.d_sigma, s.log_snr, s.snr):
        out = f(t)
        assert out.shape == t.shape and out.dtype == dtype and out.device == t.device
    scalar = s.alpha(torch.tensor(0.5, dtype=dtype))
    assert scalar.shape == () and scalar.dtype == dtype


def test_function_schedule_autodiff_and_given():
    a = lambda t: torch.sin(t) ** 2  # noqa: E731
    s_auto = FunctionSchedule(a, lambda t: 1 - t)
    s_given = FunctionSchedule(a, lambda t: 1 - t, d_alpha_fn=lambda t: 2 * torch.sin(t) * torch.cos(t),
                               d_sigma_fn=lambda t: -torch.ones_like(t))
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(s_auto.d_alpha(t), s_given.d_alpha(t))
    torch.testing.assert_close(s_auto.d_sigma(t), -torch.ones_like(t))
    # constant-valued function broadcasts to t's shape
    s_const = FunctionSchedule(lambda t: t, lambda t: 1.0)
    assert s_const.sigma(t).shape == t.shape and float(s_const.d_sigma(t).abs().max()) == 0.0
    with pytest.raises(FewflowError, match="callable"):
        FunctionSchedule(1.0, lambda t: t)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_log_snr_inverse_closed_form_matches_bisection(name):
    s = SCHEDULES[name]
    t = torch.linspace(0.02, 0.98, 25, dtype=torch.float64)
    lam = s.log_snr(t)
    torch.testing.assert_close(lam, torch.log(s.snr(t)))
    torch.testing.assert_close(s.t_from_log_snr(lam), t, atol=1e-9, rtol=0)
    # the generic (bisection) inverse of the base class agrees with the subclass' closed form
    torch.testing.assert_close(Schedule.t_from_log_snr(s, lam), t, atol=1e-9, rtol=0)


def test_log_snr_inverse_at_infinities():
    lam = torch.tensor([-math.inf, math.inf])
    for name in ["linear", "cosine", "poly2", "vp"]:
        torch.testing.assert_close(SCHEDULES[name].t_from_log_snr(lam), torch.tensor([0.0, 1.0]))


def test_get_schedule():
    assert isinstance(get_schedule("linear"), LinearSchedule)
    assert isinstance(get_schedule("Cosine"), CosineSchedule)
    assert get_schedule("vp", beta_max=10.0).beta_max == 10.0
    assert get_schedule("polynomial", n=3).n == 3.0
    with pytest.raises(FewflowError, match="unknown schedule 'edm'"):
        get_schedule("edm")
    with pytest.raises(FewflowError, match="bad arguments"):
        get_schedule("linear", n=2)
    with pytest.raises(FewflowError):
        PolynomialSchedule(0)


# ----------------------------------------------------------------------------- affine path
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_sample_definition_and_velocity_is_time_derivative(name):
    path = AffinePath(SCHEDULES[name])
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, generator=g, dtype=torch.float64)
    x1 = torch.randn(6, 3, generator=g, dtype=torch.float64)
    t = torch.rand(6, generator=g, dtype=torch.float64) * 0.9 + 0.05
    ps = path.sample(x0, x1, t)
    assert isinstance(ps, PathSample) and ps.z is None and ps.t.shape == (6,)
    s = SCHEDULES[name]
    torch.testing.assert_close(ps.x_t, s.alpha(t)[:, None] * x1 + s.sigma(t)[:, None] * x0)
    xt_fd = fd(lambda tt: path.sample(x0, x1, tt).x_t, t)
    torch.testing.assert_close(ps.velocity, xt_fd, rtol=1e-6, atol=1e-7)


def test_sample_scalar_time_images_dtype():
    path = AffinePath("cosine")
    x0, x1 = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3)
    ps = path.sample(x0, x1, 0.25)
    assert ps.t.shape == (4,) and ps.x_t.dtype == torch.float32 and ps.x_t.shape == x1.shape
    a = math.sin(math.pi / 8)
    torch.testing.assert_close(ps.x_t, a * x1 + math.cos(math.pi / 8) * x0)


def test_sample_validation():
    path = AffinePath()
    x = torch.randn(4, 2)
    with pytest.raises(FewflowError, match="shape mismatch"):
        path.sample(x, torch.randn(4, 3), 0.5)
    with pytest.raises(FewflowError, match=r"t must lie in \[0.0, 1.0\]"):
        path.sample(x, x, torch.tensor([0.1, 0.2, 1.5, 0.3]))
    with pytest.raises(FewflowError, match="non-finite"):
        path.sample(x, x, torch.tensor([0.1, float("nan"), 0.5, 0.3]))
    with pytest.raises(FewflowError, match="non-finite"):
        path.sample(x, torch.full((4, 2), float("nan")), 0.5)
    with pytest.raises(FewflowError, match="shape"):
        path.sample(x, x, torch.rand(5))
    with pytest.raises(FewflowError, match="batched"):
        path.sample(torch.randn(4), torch.randn(4), 0.5)
    with pytest.raises(FewflowError, match="unknown prediction type"):
        path.convert(x, x, 0.5, "velocity", "logits")


def _pairs(name, n=8, lo=0.05, hi=0.95, seed=3):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 2, 2, generator=g, dtype=torch.float64)
    x1 = torch.randn(n, 2, 2, generator=g, dtype=torch.float64) * 2 + 1
    t = lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)
    return AffinePath(SCHEDULES[name]).sample(x0, x1, t)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_conversions_agree_with_definitions(name):
    path = AffinePath(SCHEDULES[name])
    ps = _pairs(name)
    x, t, v = ps.x_t, ps.t, ps.velocity
    sig = SCHEDULES[name].sigma(t)[:, None, None]
    torch.testing.assert_close(path.velocity_to_x1(v, x, t), ps.x1)
    torch.testing.assert_close(path.velocity_to_x0(v, x, t), ps.x0)
    torch.testing.assert_close(path.x1_to_velocity(ps.x1, x, t), v)
    torch.testing.assert_close(path.x0_to_velocity(ps.x0, x, t), v)
    torch.testing.assert_close(path.x1_to_x0(ps.x1, x, t), ps.x0)
    torch.testing.assert_close(path.x0_to_x1(ps.x0, x, t), ps.x1)
    torch.testing.assert_close(path.x0_to_score(ps.x0, x, t), -ps.x0 / sig)
    torch.testing.assert_close(path.convert(v, x, t, "velocity", "epsilon"), ps.x0)
    torch.testing.assert_close(path.convert(-ps.x0 / sig, x, t, "score", "x1"), ps.x1)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_conversions_mutually_inverse(name):
    path = AffinePath(SCHEDULES[name])
    ps = _pairs(name, seed=5)
    pred = torch.randn(ps.x_t.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    kinds = ["velocity", "x1", "x0", "score"]
    for src in kinds:
        for dst in kinds:
            there = path.convert(pred, ps.x_t, ps.t, src, dst)
            back = path.convert(there, ps.x_t, ps.t, dst, src)
            torch.testing.assert_close(back, pred, rtol=1e-9, atol=1e-9, msg=f"{src}->{dst}->{src}")


def gaussian_velocity(sch: Schedule, m: torch.Tensor, S: torch.Tensor):
    """Marginal velocity for x1 ~ N(m, S), x0 ~ N(0, I):
    v = d_alpha m + (d_alpha alpha S + d_sigma sigma I) Sigma_t^{-1} (x - alpha m),
    Sigma_t = alpha^2 S + sigma^2 I."""
    eye = torch.eye(len(m), dtype=m.dtype)

    def v(x, t):
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
        a, s, da, ds = (f(t)[:, None, None] for f in (sch.alpha, sch.sigma, sch.d_alpha, sch.d_sigma))
        cov = a**2 * S + s**2 * eye
        M = (da * a * S + ds * s * eye) @ torch.linalg.inv(cov)
        return da[:, :, 0] * m + (M @ (x - a[:, :, 0] * m)[..., None])[..., 0]

    return v


def gaussian_score(sch, m, S, x, t):
    eye = torch.eye(len(m), dtype=m.dtype)
    a, s = sch.alpha(t)[:, None, None], sch.sigma(t)[:, None, None]
    cov = a**2 * S + s**2 * eye
    return -(torch.linalg.inv(cov) @ (x - a[:, :, 0] * m)[..., None])[..., 0]


M_TEST = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
L_TEST = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.5, 0.0], [-0.3, 0.2, 1.5]], dtype=torch.float64)
S_TEST = L_TEST @ L_TEST.T


@pytest.mark.parametrize("name", ["linear", "cosine", "vp", "poly2"])
def test_velocity_to_score_matches_gaussian_score(name):
    sch = SCHEDULES[name]
    path = AffinePath(sch)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(10, 3, generator=g, dtype=torch.float64) * 2
    t = torch.rand(10, generator=g, dtype=torch.float64) * 0.9 + 0.05
    v = gaussian_velocity(sch, M_TEST, S_TEST)(x, t)
    score = gaussian_score(sch, M_TEST, S_TEST, x, t)
    torch.testing.assert_close(path.velocity_to_score(v, x, t), score)
    torch.testing.assert_close(path.score_to_velocity(score, x, t), v)


def test_singular_times_are_finite_and_floored():
    path = AffinePath("linear")
    x, v = torch.randn(3, 2), torch.randn(3, 2)
    one, zero = torch.ones(3), torch.zeros(3)
    for fn, t in [(path.velocity_to_score, one), (path.x1_to_velocity, one), (path.x0_to_velocity, zero),
                  (path.score_to_velocity, zero), (path.x1_to_x0, one)]:
        assert torch.isfinite(fn(v, x, t)).all()
    # the floor is the dtype's eps by default: x0_to_score at t = 1 divides by eps
    torch.testing.assert_close(path.x0_to_score(v, x, one), -v / torch.finfo(torch.float32).eps)
    # velocity -> x1 is regular at t = 1 for the linear path: x1 = x_t
    torch.testing.assert_close(path.velocity_to_x1(v, x, one), x)
    # a stationary path (polynomial n = 2 at t = 0) clamps det with the user floor
    p2 = AffinePath(PolynomialSchedule(2), eps=1e-3)
    torch.testing.assert_close(p2.velocity_to_x1(v, x, zero), v / 1e-3)  # (0 * x - 1 * v) / (-eps)
    with pytest.raises(FewflowError):
        AffinePath("linear", eps=0.0)


def test_conversions_keep_dtype_and_scalar_time():
    path = AffinePath("cosine")
    x, v = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    out = path.velocity_to_x1(v, x, 0.3)
    assert out.dtype == torch.float64 and out.shape == x.shape
    torch.testing.assert_close(out, path.velocity_to_x1(v, x, torch.full((4,), 0.3, dtype=torch.float64)))


# ----------------------------------------------------------------------------- rescheduling
def rk4(f, x, t0, t1, n):
    """Classic fixed-step RK4 (a local stand-in for fewflow.solvers)."""
    h = (t1 - t0) / n
    for i in range(n):
        t = t0 + i * h
        k1 = f(x, t)
        k2 = f(x + 0.5 * h * k1, t + 0.5 * h)
        k3 = f(x + 0.5 * h * k2, t + 0.5 * h)
        k4 = f(x + h * k3, t + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


PAIRS = [("linear", "cosine"), ("cosine", "linear"), ("linear", "poly3"), ("cosine", "vp"),
         ("vp", "linear"), ("poly2", "cosine"), ("function", "linear")]


@pytest.mark.parametrize("a,b", PAIRS)
def test_reschedule_matches_target_velocity_pointwise(a, b):
    A, B = SCHEDULES[a], SCHEDULES[b]
    vA, vB = gaussian_velocity(A, M_TEST, S_TEST), gaussian_velocity(B, M_TEST, S_TEST)
    model = reschedule(vA, AffinePath(A), AffinePath(B))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(16, 3, generator=g, dtype=torch.float64) * 2
    t = torch.rand(16, generator=g, dtype=torch.float64) * 0.9 + 0.05
    torch.testing.assert_close(model(x, t), vB(x, t), rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("a,b,t1", [("linear", "cosine", 1.0), ("cosine", "linear", 1.0),
                                    ("linear", "poly3", 1.0), ("cosine", "vp", 0.99)])
def test_reschedule_ode_endpoint(a, b, t1):
    A, B = SCHEDULES[a], SCHEDULES[b]
    vA, vB = gaussian_velocity(A, M_TEST, S_TEST), gaussian_velocity(B, M_TEST, S_TEST)
    model = reschedule(vA, A, B)
    x0 = torch.randn(32, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    end_resched = rk4(model, x0, 0.0, t1, 200)
    end_b = rk4(vB, x0, 0.0, t1, 200)
    torch.testing.assert_close(end_resched, end_b, rtol=1e-8, atol=1e-8)
    # ... and the two schedules' own ODEs agree at t = 1 (same marginals, same x0 -> same coupling)
    if t1 == 1.0:
        torch.testing.assert_close(rk4(vA, x0, 0.0, 1.0, 400), end_b, rtol=1e-5, atol=1e-5)


def test_reschedule_identity_and_errors():
    v = gaussian_velocity(LinearSchedule(), M_TEST, S_TEST)
    same = reschedule(v, "linear", LinearSchedule())
    x = torch.randn(5, 3, dtype=torch.float64)
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    torch.testing.assert_close(same(x, t), v(x, t))
    with pytest.raises(FewflowError, match="callable"):
        reschedule(3, "linear", "cosine")
    with pytest.raises(FewflowError):
        reschedule(v, 1.0, "cosine")
