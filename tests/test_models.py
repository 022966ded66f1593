"""Tests for fewflow.models: shapes, conditioning, forward-mode AD (jvp vs finite differences), configs."""

from __future__ import annotations

import pytest
import torch
from torch.func import jvp

from fewflow import FewflowError
from fewflow.models import MLP, DiT, UNet, build_model
from fewflow.models.embeddings import TimeFeatures


def _small(kind: str, flow_map: bool = False, num_classes: int | None = None):
    if kind == "mlp":
        return MLP(2, hidden=32, depth=2, flow_map=flow_map, num_classes=num_classes), (2,)
    if kind == "mlp_img":
        return MLP(64, hidden=32, depth=2, flow_map=flow_map, num_classes=num_classes,
                   time_features="fourier"), (1, 8, 8)
    if kind == "unet":
        return UNet(1, base=8, mults=(1, 2), size=8, flow_map=flow_map, num_classes=num_classes), (1, 8, 8)
    if kind == "unet28":
        net = UNet(1, base=8, mults=(1, 2, 2), size=28, flow_map=flow_map, num_classes=num_classes)
        return net, (1, 28, 28)
    return DiT(8, 2, 1, hidden=32, depth=2, heads=4, flow_map=flow_map, num_classes=num_classes), (1, 8, 8)


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter (incl. zero-initialised adaLN / output layers) a non-trivial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _call(model, x, s, t, y=None):
    return model(x, s, t, y=y) if model.is_flow_map else model(x, t, y=y)


KINDS = ["mlp", "mlp_img", "unet", "unet28", "dit"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("flow_map", [False, True])
@pytest.mark.parametrize("num_classes", [None, 10])
def test_shapes_and_conditioning(kind, flow_map, num_classes, gen):
    model, shape = _small(kind, flow_map, num_classes)
    _randomize(model)
    assert model.is_flow_map is flow_map
    x = torch.randn(3, *shape, generator=gen)
    t = torch.rand(3, generator=gen)
    s = t * 0.5
    y = torch.tensor([0, 1, 2]) if num_classes else None
    out = _call(model, x, s, t, y)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    # output depends on the time (and on s for flow maps) and on the class
    assert not torch.allclose(out, _call(model, x, s, t * 0.3 + 0.1, y))
    if flow_map:
        assert not torch.allclose(out, _call(model, x, s * 0.1, t, y))
    if num_classes:
        assert not torch.allclose(out, _call(model, x, s, t, torch.tensor([3, 4, 5])))
        null = _call(model, x, s, t, torch.full((3,), num_classes))
        assert torch.allclose(null, _call(model, x, s, t, None))  # y=None is the null class
    # scalar times broadcast
    sc = model(x, 0.2, 0.7, y=y) if flow_map else model(x, 0.7, y=y)
    full = _call(model, x, torch.full((3,), 0.2), torch.full((3,), 0.7), y)
    assert torch.allclose(sc, full, rtol=1e-5, atol=1e-5)
    # samples are processed independently (no batch statistics): row 0 alone gives the same output
    one = _call(model, x[:1], s[:1], t[:1], y[:1] if y is not None else None)
    assert torch.allclose(one, out[:1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["mlp", "unet", "dit"])
def test_jvp_matches_finite_differences_float64(kind, gen):
    model, shape = _small(kind, flow_map=True, num_classes=10)
    model = model.double()
    _randomize(model, 1)
    x = torch.randn(2, *shape, generator=gen, dtype=torch.float64)
    s = torch.tensor([0.1, 0.3], dtype=torch.float64)
    t = torch.tensor([0.6, 0.9], dtype=torch.float64)
    y = torch.tensor([1, 10])
    dx = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    ds = torch.tensor([0.3, -0.2], dtype=torch.float64)
    dt = torch.tensor([1.0, 0.5], dtype=torch.float64)

    def f(x_, s_, t_):
        return model(x_, s_, t_, y=y)

    out, tangent = jvp(f, (x, s, t), (dx, ds, dt))
    assert out.dtype == torch.float64
    eps = 1e-6
    plus = f(x + eps * dx, s + eps * ds, t + eps * dt)
    fd = (plus - f(x - eps * dx, s - eps * ds, t - eps * dt)) / (2 * eps)
    assert tangent.abs().max() > 1e-3  # non-trivial derivative
    assert torch.allclose(tangent, fd, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out, f(x, s, t))


def test_jvp_velocity_model_wrt_time(gen):
    model = UNet(1, base=8, size=8).double()
    _randomize(model, 2)
    x = torch.randn(2, 1, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.2, 0.7], dtype=torch.float64)
    _, d = jvp(lambda t_: model(x, t_), (t,), (torch.ones_like(t),))
    eps = 1e-6
    fd = (model(x, t + eps) - model(x, t - eps)) / (2 * eps)
    assert torch.allclose(d, fd, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_build_model_roundtrip(kind):
    model, _ = _small(kind, flow_map=True, num_classes=10)
    clone = build_model(model.config)
    assert type(clone) is type(model) and clone.is_flow_map and clone.config == model.config
    sd, sd2 = model.state_dict(), clone.state_dict()
    assert list(sd) == list(sd2) and all(sd[k].shape == sd2[k].shape for k in sd)
    clone.load_state_dict(sd)
    x = torch.randn(2, *_small(kind)[1])
    assert torch.equal(model(x, 0.1, 0.5, y=torch.tensor([1, 2])), clone(x, 0.1, 0.5, y=torch.tensor([1, 2])))
    import json

    assert json.loads(json.dumps(model.config)) == model.config  # JSON-serialisable for checkpoints


def test_no_batchnorm_anywhere():
    for kind in KINDS:
        model, _ = _small(kind, True, 10)
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_dit_starts_at_zero_and_unet_nonzero(gen):
    x = torch.randn(2, 1, 8, 8, generator=gen)
    assert torch.equal(DiT(8, 2, 1, 32, 2, 4)(x, 0.5), torch.zeros_like(x))  # adaLN-Zero + zero head
    assert UNet(1, 8, size=8)(x, 0.5).abs().sum() > 0


def test_time_features_well_conditioned():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for kind in ("sinusoidal", "fourier"):
        scale = 1000.0 if kind == "sinusoidal" else 1.0
        f = TimeFeatures(kind, 64, scale)(t)
        assert f.dtype == torch.float64 and torch.isfinite(f).all()
        # nearby times (dt = 0.01) map to clearly different features
        assert (f[1:] - f[:-1]).norm(dim=1).min() > 0.05
    assert MLP(2).config["time_scale"] == 1000.0 and MLP(2, flow_map=True).config["time_scale"] == 1.0


def test_errors():
    with pytest.raises(FewflowError, match="unknown time_features"):
        MLP(2, time_features="learned")
    with pytest.raises(FewflowError, match="expects 4 features"):
        MLP(4)(torch.randn(3, 2), torch.rand(3))
    with pytest.raises(FewflowError, match=r"forward\(x, s, t\)"):
        MLP(2, flow_map=True)(torch.randn(3, 2), torch.rand(3))
    with pytest.raises(FewflowError, match="class labels"):
        MLP(2, num_classes=3)(torch.randn(3, 2), torch.rand(3), y=torch.tensor([0, 1, 4]))
    with pytest.raises(FewflowError, match="without num_classes"):
        MLP(2)(torch.randn(3, 2), torch.rand(3), y=torch.tensor([0, 1, 2]))
    with pytest.raises(FewflowError, match="divisible"):
        UNet(1, 8, mults=(1, 2, 2), size=10)
    with pytest.raises(FewflowError, match="expects x of shape"):
        DiT(8, 2, 1, 32, 2, 4)(torch.randn(2, 1, 6, 6), 0.5)
    with pytest.raises(FewflowError, match="unknown model type"):
        build_model({"type": "ResNet"})
    with pytest.raises(FewflowError, match="time must be"):
        MLP(2)(torch.randn(3, 2), torch.rand(4))
