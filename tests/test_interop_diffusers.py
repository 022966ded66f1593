"""The diffusers bridge: sigma conversion, FewflowScheduler in a diffusers loop, DiffusersVelocity."""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel  # noqa: E402

import fewflow.interop.diffusers as fd  # noqa: E402
from fewflow._validate import FewflowError  # noqa: E402
from fewflow.interop.diffusers import (  # noqa: E402
    DiffusersVelocity,
    from_diffusers_sigmas,
    to_diffusers_sigmas,
)
from fewflow.objectives.cfm import CFMLoss  # noqa: E402
from fewflow.paths import AffinePath  # noqa: E402
from fewflow.solvers.grids import get_grid  # noqa: E402
from fewflow.solvers.loop import solve  # noqa: E402

GRIDS = [("uniform", {}), ("shift", {"shift": 3.0}), ("edm", {})]


def tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()


def diffusers_loop(unet, sched, x):
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(x, t).sample
            x = sched.step(out, t, x).prev_sample
    return x


@pytest.mark.parametrize("name,kw", GRIDS)
def test_sigmas_round_trip_and_stock_scheduler(name, kw):
    g = get_grid(name, 8, **kw)
    sig = to_diffusers_sigmas(g)
    assert len(sig) == 8 and sig[0] == pytest.approx(1.0 - float(g[0]))
    back = from_diffusers_sigmas(sig)
    assert back.dtype == torch.float64 and back.shape == g.shape
    torch.testing.assert_close(back, g, rtol=0, atol=1e-15)  # exact up to float64 rounding of 1 - t
    assert float(back[-1]) == 1.0 and float(back[0]) == float(g[0])
    # with the terminal sigma 0 given too
    torch.testing.assert_close(from_diffusers_sigmas([*sig, 0.0]), g, rtol=0, atol=1e-15)
    stock = FlowMatchEulerDiscreteScheduler(shift=1.0)
    stock.set_timesteps(sigmas=sig)
    expect = torch.tensor([*sig, 0.0], dtype=torch.float32)
    torch.testing.assert_close(stock.sigmas, expect, rtol=0, atol=0)
    torch.testing.assert_close(from_diffusers_sigmas(stock.sigmas), g, rtol=0, atol=1e-7)


def test_sigma_errors():
    with pytest.raises(FewflowError, match="end at t = 1"):
        to_diffusers_sigmas([0.0, 0.5, 0.9])
    with pytest.raises(FewflowError, match="increasing"):
        to_diffusers_sigmas([1.0, 0.5, 0.0])
    with pytest.raises(FewflowError):
        from_diffusers_sigmas([0.5, 0.8])


@pytest.mark.parametrize("name,kw", GRIDS)
def test_scheduler_loop_equals_fewflow_solve_euler(name, kw):
    unet = tiny_unet()
    g = get_grid(name, 8, **kw)
    x0 = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = solve(DiffusersVelocity(unet), x0, grid=g, stepper="euler").x

    sched = fd.FewflowScheduler()
    sched.set_timesteps(8, grid=name, **kw)
    assert sched.order == 1 and sched.init_noise_sigma == 1.0
    assert sched.timesteps.shape == (8,) and sched.sigmas.shape == (9,)
    torch.testing.assert_close(sched.timesteps, sched.sigmas[:-1] * 1000)
    torch.testing.assert_close(diffusers_loop(unet, sched, x0), ref, rtol=0, atol=0)  # fewflow's own Euler

    # the same grid given as exported sigmas, and the stock diffusers flow scheduler on them
    sched.set_timesteps(sigmas=to_diffusers_sigmas(g))
    torch.testing.assert_close(diffusers_loop(unet, sched, x0), ref, rtol=0, atol=1e-5)
    stock = FlowMatchEulerDiscreteScheduler(shift=1.0)
    stock.set_timesteps(sigmas=to_diffusers_sigmas(g))
    torch.testing.assert_close(diffusers_loop(unet, stock, x0), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("stepper", ["heun", "midpoint"])
def test_scheduler_two_stage_equals_fewflow_solve(stepper):
    unet = tiny_unet()
    g = get_grid("shift", 4, shift=3.0)
    x0 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    res = solve(DiffusersVelocity(unet), x0, grid=g, stepper=stepper)
    sched = fd.FewflowScheduler(stepper=stepper, grid="shift", grid_kwargs={"shift": 3.0})
    sched.set_timesteps(4)
    assert sched.order == 2 and sched.timesteps.numel() == res.nfe == 8
    assert sched.state_in_first_order
    torch.testing.assert_close(diffusers_loop(unet, sched, x0), res.x, rtol=0, atol=0)
    with pytest.raises(FewflowError, match="after the last timestep"):
        sched.step(torch.zeros_like(x0), sched.timesteps[-1], x0)


def test_scheduler_scale_noise_return_tuple_and_config():
    sched = fd.FewflowScheduler()
    sched.set_timesteps(grid=get_grid("edm", 5))
    x1, noise = torch.ones(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)
    out = sched.scale_noise(x1, torch.tensor(250.0), noise)
    torch.testing.assert_close(out, torch.full_like(x1, 0.75))
    out = sched.scale_noise(x1, torch.tensor([1000.0, 0.0]), noise)
    torch.testing.assert_close(out[:, 0, 0, 0], torch.tensor([0.0, 1.0]))
    res = sched.step(torch.zeros_like(x1), sched.timesteps[0], x1, return_dict=False)
    assert isinstance(res, tuple) and torch.equal(res[0], x1)
    again = type(sched).from_config(fd.FewflowScheduler(stepper="heun").config)
    assert again.order == 2
    with pytest.raises(FewflowError, match="unknown scheduler stepper"):
        fd.FewflowScheduler(stepper="rk45")


def test_wrapped_unet_trains_with_cfm_and_samples():
    unet = tiny_unet().train()
    model = DiffusersVelocity(unet)
    loss_fn = CFMLoss(AffinePath("linear"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(8, 1, 8, 8, generator=gen).sign() * 0.5
    losses = []
    for _ in range(4):
        out = loss_fn(model, x1, generator=gen)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    model.eval()
    x = solve(model, torch.randn(4, 1, 8, 8, generator=gen), steps=4).x
    assert x.shape == (4, 1, 8, 8) and bool(torch.isfinite(x).all())


def test_velocity_sign_and_conditions():
    class Probe(torch.nn.Module):
        class_embedding = None

        def forward(self, x, timestep, encoder_hidden_states=None):
            self.seen = (timestep, encoder_hidden_states)
            return (x * 0 + 2.0,)

    probe = Probe()
    x = torch.zeros(2, 3)
    t, c, mask = torch.tensor([0.25, 1.0]), torch.ones(2, 4), torch.tensor([1, 0])
    v = DiffusersVelocity(probe)(x, t, c=c, c_mask=mask)
    assert torch.equal(v, torch.full_like(x, -2.0))
    torch.testing.assert_close(probe.seen[0], torch.tensor([750.0, 0.0]))
    torch.testing.assert_close(probe.seen[1], torch.tensor([[1.0] * 4, [0.0] * 4]))
    assert torch.equal(DiffusersVelocity(probe, output="velocity")(x, 0.5), torch.full_like(x, 2.0))
    with pytest.raises(FewflowError, match="class embedding"):
        DiffusersVelocity(probe)(x, 0.5, y=torch.zeros(2, dtype=torch.long))


def test_missing_diffusers_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` fail
    with pytest.raises(FewflowError, match=r"pip install 'fewflow\[diffusers\]'"):
        fd.FewflowScheduler  # noqa: B018
    with pytest.raises(FewflowError, match="diffusers"):
        fd.require_diffusers()
    assert to_diffusers_sigmas([0.0, 1.0]) == [1.0]  # conversions need no diffusers


def test_loop_started_mid_grid_and_in_a_pipeline():
    from diffusers import DDPMPipeline

    unet = tiny_unet()
    g = get_grid("uniform", 6)
    x0 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = solve(DiffusersVelocity(unet), x0, grid=g[2:], stepper="heun").x
    sched = fd.FewflowScheduler(stepper="heun")
    sched.set_timesteps(6)
    x = x0
    with torch.no_grad():  # the first step is found from the first timestep given (image-to-image)
        for t in sched.timesteps[4:]:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
    assert sched.step_index == 12
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-6)

    pipe = DDPMPipeline(unet=unet, scheduler=fd.FewflowScheduler(grid="shift", grid_kwargs={"shift": 3.0}))
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    img = pipe(batch_size=2, num_inference_steps=3, output_type="np", generator=gen)
    assert img.images.shape == (2, 8, 8, 1)
