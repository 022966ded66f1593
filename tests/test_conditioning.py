"""Condition tensors ``c`` beside class labels: model shapes and errors, null-condition dropout, CFG / RAAG
with vector conditions, a continuous conditional 2-D task, MeanFlow under JVP, sampling and the CLI.

The null condition is a learned embedding used on rows with ``c_mask = False`` (``c=None``: every row);
see :class:`fewflow.models.embeddings.Conditioning`.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fewflow import FewflowError
from fewflow.data import Dataset
from fewflow.guidance import CFG, RAAG, raag_ratio, raag_scale
from fewflow.models import MLP, DiT, UNet, build_model
from fewflow.objectives import CFMLoss, MeanFlowLoss
from fewflow.objectives.common import drop_labels
from fewflow.objectives.meanflow import TimePairSampler, flow_map_jvp
from fewflow.paths import AffinePath, LinearSchedule
from fewflow.solvers import solve
from fewflow.train.batches import BatchSource


def _randomise(model: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (FiLM / adaLN / null start at zero, which would hide c)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


# (constructor, x shape, c shape); vector conditions may have any shape (B, ...) of cond_dim values
CASES = [
    (lambda: MLP(4, hidden=16, depth=2, cond_dim=6), (5, 4), (5, 2, 3)),
    (lambda: MLP(4, hidden=16, depth=2, cond_dim=3, num_classes=3, flow_map=True, time_features="fourier"),
     (5, 4), (5, 3)),
    (lambda: UNet(in_channels=1, base=8, size=8, cond_dim=3, heads=1), (5, 1, 8, 8), (5, 3)),
    (lambda: UNet(in_channels=1, base=8, size=8, cond_channels=2, flow_map=True), (5, 1, 8, 8), (5, 2, 8, 8)),
    (lambda: DiT(size=8, patch=4, hidden=16, depth=1, heads=2, cond_dim=3, flow_map=True),
     (5, 1, 8, 8), (5, 3)),
    (lambda: DiT(size=8, patch=4, hidden=16, depth=1, heads=2, cond_channels=1), (5, 1, 8, 8), (5, 1, 8, 8)),
]


@pytest.mark.parametrize("make,xshape,cshape", CASES)
def test_models_take_c_and_null_rows(make, xshape, cshape):
    model = _randomise(make()).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(xshape, generator=g, dtype=torch.float64)
    c = torch.randn(cshape, generator=g, dtype=torch.float64)
    times = (torch.full((5,), 0.2, dtype=torch.float64), torch.full((5,), 0.7, dtype=torch.float64))
    times = times if model.is_flow_map else times[1:]
    out = model(x, *times, c=c)
    assert out.shape == x.shape and torch.isfinite(out).all()
    # config is complete: the rebuilt model with the same weights gives the same output
    clone = build_model(json.loads(json.dumps(model.config))).double()
    clone.load_state_dict(model.state_dict())
    assert clone.config == model.config and torch.equal(clone(x, *times, c=c), out)
    # c matters, and null rows (c_mask False) equal c=None whatever c holds
    assert not torch.allclose(model(x, *times, c=c + 1.0), out)
    mask = torch.tensor([True, False, True, False, False])
    null = model(x, *times)
    masked = model(x, *times, c=c, c_mask=mask)
    assert torch.allclose(masked[mask], out[mask], atol=1e-12)
    assert torch.allclose(masked[~mask], null[~mask], atol=1e-12)
    masked2 = model(x, *times, c=torch.randn(cshape, dtype=torch.float64), c_mask=mask)
    assert torch.allclose(masked2[~mask], null[~mask], atol=1e-12)


def test_model_condition_errors():
    x, t = torch.randn(4, 2), torch.rand(4)
    with pytest.raises(FewflowError, match="cond_dim"):
        MLP(2, hidden=8, depth=1)(x, t, c=torch.randn(4, 3))
    m = MLP(2, hidden=8, depth=1, cond_dim=3)
    with pytest.raises(FewflowError, match=r"cond_dim=3 values per row, got \(4, 4\)"):
        m(x, t, c=torch.randn(4, 4))
    with pytest.raises(FewflowError, match="shape"):
        m(x, t, c=torch.randn(3, 3))
    with pytest.raises(FewflowError, match="torch.Tensor"):
        m(x, t, c=[[0.0] * 3] * 4)
    with pytest.raises(FewflowError, match="c_mask"):
        m(x, t, c=torch.randn(4, 3), c_mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(FewflowError, match="c_mask"):
        m(x, t, c=torch.randn(4, 3), c_mask=torch.ones(4))
    for bad in (0, -2, 1.5, True):
        with pytest.raises(FewflowError, match="cond_dim"):
            MLP(2, cond_dim=bad)
    with pytest.raises(FewflowError, match="not both"):
        UNet(cond_dim=2, cond_channels=1)
    u = UNet(in_channels=1, base=8, size=8, cond_channels=2)
    with pytest.raises(FewflowError, match=r"image condition c must have shape \(2, 2, 8, 8\)"):
        u(torch.randn(2, 1, 8, 8), torch.rand(2), c=torch.randn(2, 2, 4, 4))
    with pytest.raises(FewflowError, match="cond_dim"):  # through build_model too
        build_model({**MLP(2).config, "cond_dim": 0})


# --------------------------------------------------------------------------- null-condition dropout


def test_condition_dropout_rate_and_joint_labels(gen):
    n, p = 20_000, 0.25
    c = torch.randn(n, 2, 3, generator=gen)
    out, dropped = drop_labels({"c": c}, p, None, c, gen)
    assert torch.equal(out["c"], c)  # c itself is kept; the mask marks null rows
    assert out["c_mask"].dtype == torch.bool and torch.equal(~out["c_mask"], dropped)
    rate = float(dropped.float().mean())
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n), rate
    # labels and c are dropped together (the unconditional branch of CFG drops both)
    y = torch.randint(0, 5, (n,), generator=gen)
    out, dropped = drop_labels({"y": y, "c": c}, p, 5, c, gen)
    assert torch.equal(out["y"] == 5, dropped) and torch.equal(out["c_mask"], ~dropped)
    # an existing mask stays null
    old = torch.rand(n, generator=gen) < 0.5
    out, dropped = drop_labels({"c": c, "c_mask": old}, p, None, c, gen)
    assert torch.equal(out["c_mask"], old & ~dropped)
    # p = 0: untouched; no condition at all: an error
    same, none = drop_labels({"c": c}, 0.0, None, c, gen)
    assert none is None and "c_mask" not in same
    with pytest.raises(FewflowError, match="neither labels y nor a condition c"):
        drop_labels({}, 0.1, None, c, gen)
    with pytest.raises(FewflowError, match="num_classes"):
        drop_labels({"y": y}, 0.1, None, c, gen)


def test_cfm_loss_drops_c_at_the_requested_rate(gen):
    seen: dict[str, torch.Tensor] = {}

    def model(x, t, c=None, c_mask=None):
        seen["c"], seen["c_mask"] = c, c_mask
        return torch.zeros_like(x)

    loss = CFMLoss(AffinePath(LinearSchedule()), label_dropout=0.3)  # no num_classes needed for c alone
    x1, c = torch.randn(4000, 2, generator=gen), torch.randn(4000, 2, generator=gen)
    loss(model, x1, generator=gen, c=c)
    assert torch.equal(seen["c"], c)
    assert abs(1 - float(seen["c_mask"].float().mean()) - 0.3) < 0.04


def test_batch_source_passes_c():
    x = torch.randn(50, 2)
    data = Dataset(x, None, "toy", c=3.0 * x[:, :1])
    src = BatchSource(data, 16, seed=0, device=torch.device("cpu"))
    for _ in range(4):
        b = src.next()
        assert set(b) == {"x1", "c"} and torch.equal(b["c"], 3.0 * b["x1"][:, :1])
    assert Dataset(x, None, "toy").c is None
    with pytest.raises(FewflowError, match="condition c must be a tensor with 50 rows"):
        BatchSource(SimpleNamespace(x=x, y=None, c=torch.randn(49, 1)), 16, 0, torch.device("cpu"))


# --------------------------------------------------------------------------- guidance


A = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 1.0], [2.0, 0.0, -1.0], [0.5, 0.5, 0.5]], dtype=torch.float64)


class ClosedForm:
    """``v(x, t | y, c) = A flatten(c) + t x + y`` on conditioned rows, ``v(x, t | null) = -x``.

    A row is null when ``c_mask`` is False (or ``c`` is None) and its label is the null class K (or
    ``y`` is None); records the batch size of every call."""

    def __init__(self, flow_map: bool = False, k: int = 3) -> None:
        self.is_flow_map, self.k, self.calls = flow_map, k, []

    def cond(self, x, t, y, c):
        v = t[:, None] * x
        if c is not None:
            v = v + c.reshape(c.shape[0], -1) @ A
        return v + (y[:, None].to(x.dtype) if y is not None else 0.0)

    def __call__(self, x, *times, y=None, c=None, c_mask=None):
        self.calls.append(x.shape[0])
        t = times[-1] - (times[0] if self.is_flow_map else 0.0)
        b = x.shape[0]
        null_c = torch.ones(b, dtype=torch.bool) if c is None else (
            torch.zeros(b, dtype=torch.bool) if c_mask is None else ~c_mask)
        null_y = torch.ones(b, dtype=torch.bool) if y is None else y == self.k
        return torch.where((null_c & null_y)[:, None], -x, self.cond(x, t, y, c))


def _xc(gen, b=6):
    x = torch.randn(b, 3, generator=gen, dtype=torch.float64)
    c = torch.randn(b, 2, 2, generator=gen, dtype=torch.float64)
    return x, c, torch.rand(b, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("w", [0.0, 1.0, 2.5, 7.0])
def test_cfg_with_vector_condition_matches_closed_form(gen, w):
    x, c, t = _xc(gen)
    model = ClosedForm()
    out = CFG(model, w)(x, t, c=c)  # no num_classes: c alone
    v_c, v_u = model.cond(x, t, None, c), -x
    assert torch.allclose(out, v_u + w * (v_c - v_u), atol=1e-12)
    assert model.calls == ([6] if w == 1.0 else [12])  # one batched forward [x, x] with [c, null]
    # rows the caller already marks null are unconditional in both halves
    mask = torch.tensor([True, False, True, True, False, True])
    out = CFG(model, w)(x, t, c=c, c_mask=mask)
    ref = v_u + w * (v_c - v_u)
    assert torch.allclose(out[mask], ref[mask], atol=1e-12) and torch.allclose(out[~mask], v_u[~mask])


def test_cfg_labels_and_condition_together_flow_map_and_interval(gen):
    x, c, t = _xc(gen)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    model = ClosedForm()
    out = CFG(model, 3.0, num_classes=3)(x, t, y=y, c=c)
    v_c, v_u = model.cond(x, t, y, c), -x  # the unconditional half is the null class AND the null c
    assert torch.allclose(out, v_u + 3.0 * (v_c - v_u), atol=1e-12)
    fm = ClosedForm(flow_map=True)
    s = 0.5 * t
    out = CFG(fm, 2.0)(x, s, t, c=c)
    assert torch.allclose(out, -x + 2.0 * (fm.cond(x, t - s, None, c) + x), atol=1e-12) and fm.calls == [12]
    model.calls.clear()
    out = CFG(model, 2.0, interval=(0.9, 1.0))(x, torch.full_like(t, 0.2), c=c)  # outside: conditional
    assert torch.allclose(out, model.cond(x, torch.full_like(t, 0.2), None, c)) and model.calls == [6]
    with pytest.raises(FewflowError, match="labels y .* or a condition c"):
        CFG(model, 2.0)(x, t)
    with pytest.raises(FewflowError, match="num_classes"):
        CFG(model, 2.0)(x, t, y=y, c=c)
    with pytest.raises(FewflowError, match="condition c must be a tensor of shape"):
        CFG(model, 2.0)(x, t, c=c[:2])


def test_raag_with_vector_condition(gen):
    x, c, t = _xc(gen)
    model = ClosedForm()
    v_c, v_u = model.cond(x, t, None, c), -x
    raag = RAAG(model, w_max=4.0, alpha=0.7, record=True)
    w = raag_scale(raag_ratio(v_c, v_u), 4.0, 0.7)[:, None]
    assert torch.allclose(raag(x, t, c=c), v_u + w * (v_c - v_u), atol=1e-12)
    assert model.calls == [12] and len(raag.ratio_history) == 1


def test_cfg_on_a_network_uses_its_null_condition():
    model = _randomise(MLP(3, hidden=16, depth=2, cond_dim=4)).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    c = torch.randn(5, 4, generator=g, dtype=torch.float64)
    t = torch.rand(5, generator=g, dtype=torch.float64)
    v_c, v_u = model(x, t, c=c), model(x, t)  # c=None: the learned null condition on every row
    assert torch.allclose(CFG(model, 2.0)(x, t, c=c), v_u + 2.0 * (v_c - v_u), atol=1e-10)


# --------------------------------------------------------------------------- a conditional 2-D task


def _batch(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``c ~ U[-2, 2]^2``, ``x1 ~ N(c, 0.1^2 I)``."""
    c = 4.0 * torch.rand(n, 2, generator=g) - 2.0
    return c + 0.1 * torch.randn(n, 2, generator=g), c


def test_continuous_condition_is_learned():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = MLP(2, hidden=64, depth=2, cond_dim=2)
    loss = CFMLoss(AffinePath(LinearSchedule()), label_dropout=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(200):
        for group in opt.param_groups:
            group["lr"] = 3e-3 * (0.1 if step >= 150 else 1.0)
        x1, c = _batch(128, g)
        out = loss(model, x1, generator=g, c=c)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    ticks = torch.tensor([-1.5, -0.5, 0.5, 1.5])
    c_test = torch.cartesian_prod(ticks, ticks)  # 16 conditions
    reps = 128
    cond = c_test.repeat_interleave(reps, 0)
    x0 = torch.randn(cond.shape[0], 2, generator=g)
    with torch.no_grad():
        xc = solve(model, x0, steps=8, stepper="heun", cond={"c": cond}).x
        xu = solve(model, x0, steps=8, stepper="heun").x  # the null condition: the marginal
    m_c = xc.reshape(16, reps, 2).mean(1)
    m_u = xu.reshape(16, reps, 2).mean(1)
    err_c = float((m_c - c_test).norm(dim=1).mean())
    err_u = float((m_u - c_test).norm(dim=1).mean())
    slope_c = float((m_c * c_test).sum() / (c_test * c_test).sum())  # least squares through 0, both axes
    slope_u = float((m_u * c_test).sum() / (c_test * c_test).sum())
    # seeds 0-2 give err_c ~ 0.035 vs err_u ~ 1.5, slopes ~ 0.99 vs ~ 0.0, spread ~ 0.135
    assert err_c < 0.15 and err_c < 0.1 * err_u, (err_c, err_u)
    assert 0.9 < slope_c < 1.1 and abs(slope_u) < 0.2, (slope_c, slope_u)
    spread = float(xc.reshape(16, reps, 2).std(1).mean())
    assert spread < 0.25, spread  # N(c, 0.1^2): tight around the condition


# --------------------------------------------------------------------------- MeanFlow under JVP


def test_meanflow_one_step_with_c_under_jvp():
    g = torch.Generator().manual_seed(0)
    model = MLP(2, hidden=32, depth=2, cond_dim=2, flow_map=True, time_features="fourier", num_frequencies=3)
    _randomise(model, std=0.2)  # FiLM starts at zero: the embeddings would get no gradient at init
    x1, c = _batch(64, g)
    loss = MeanFlowLoss(label_dropout=0.3, time_sampler=TimePairSampler.uniform(), ratio=0.5)
    out = loss(model, x1, generator=g, c=c)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert float(model.cond.c_null.grad.abs().sum()) > 0  # dropped rows train the null condition
    assert float(model.cond.c_embed[0].weight.grad.abs().sum()) > 0
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    opt.step()
    # the JVP through the c pathway equals a finite difference along (v, 1, 0)
    m = _randomise(model, std=0.2).double()
    x, cc = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    s, t = torch.full((8,), 0.2, dtype=torch.float64), torch.full((8,), 0.8, dtype=torch.float64)
    v = torch.randn(8, 2, dtype=torch.float64)
    mask = torch.arange(8) % 3 != 0
    cond = {"c": cc, "c_mask": mask}
    _, du = flow_map_jvp(m, x, s, t, v, 1.0, 0.0, cond=cond)
    eps = 1e-6
    fd = (m(x + eps * v, s + eps, t, **cond) - m(x - eps * v, s - eps, t, **cond)) / (2 * eps)
    assert torch.allclose(du, fd, atol=1e-6)


def test_meanflow_guided_target_with_labels_and_c():
    g = torch.Generator().manual_seed(1)
    model = MLP(2, hidden=16, depth=1, num_classes=3, cond_dim=2, flow_map=True, time_features="fourier")
    x1, c = _batch(32, g)
    y = torch.randint(0, 3, (32,), generator=g)
    loss = MeanFlowLoss(omega=2.0, label_dropout=0.2, num_classes=3, time_sampler=TimePairSampler.uniform())
    out = loss(model, x1, generator=g, y=y, c=c)
    assert torch.isfinite(out.loss)
    out.loss.backward()


# --------------------------------------------------------------------------- sampling and the CLI


def _run_cfg(cond_shape=(2,), dropout: float = 0.1):
    from fewflow.config import default_config

    cfg = default_config("moons").replace(
        {"objective.conditional": dropout > 0, "objective.label_dropout": dropout}
    )
    cfg.meta = {"shape": [2], "num_classes": None, "conditional": False, "value_range": None}
    if cond_shape is not None:
        cfg.meta["cond_shape"] = list(cond_shape)
    return cfg


def test_generate_with_cond():
    from fewflow.sampling import generate

    model = _randomise(MLP(2, hidden=16, depth=1, cond_dim=2), std=0.2)
    cfg = _run_cfg()
    x0 = torch.randn(6, 2)
    row = torch.tensor([[1.0, -1.0]])
    a = generate(model, cfg, 6, nfe=2, stepper="euler", cond=row, x0=x0).x
    b = generate(model, cfg, 6, nfe=2, stepper="euler", cond=row.expand(6, 2), x0=x0).x
    c = generate(model, cfg, 6, nfe=2, stepper="euler", cond=np.array([1.0, -1.0]), x0=x0).x
    assert torch.equal(a, b) and torch.equal(a, c)
    u = generate(model, cfg, 6, nfe=2, stepper="euler", x0=x0).x  # null condition (dropout was trained)
    assert not torch.allclose(a, u)
    guided = generate(model, cfg, 6, nfe=1, stepper="euler", cond=row, x0=x0, cfg_scale=3.0).x
    tt = torch.zeros(6)
    v_c, v_u = model(x0, tt, c=row.expand(6, 2)), model(x0, tt)
    assert torch.allclose(guided, x0 + v_u + 3.0 * (v_c - v_u), atol=1e-5)
    with pytest.raises(FewflowError, match=r"cond must have shape \(6, 2\)"):
        generate(model, cfg, 6, nfe=2, cond=torch.zeros(6, 3))
    with pytest.raises(FewflowError, match=r"cond must have shape"):
        generate(model, cfg, 6, nfe=2, cond=torch.zeros(3, 2))
    with pytest.raises(FewflowError, match="non-finite"):
        generate(model, cfg, 6, nfe=2, cond=torch.tensor([[float("nan"), 0.0]]))
    with pytest.raises(FewflowError, match="pass cond"):
        generate(model, _run_cfg(dropout=0.0), 6, nfe=2)
    with pytest.raises(FewflowError, match="without a condition c"):
        generate(MLP(2, hidden=8, depth=1), _run_cfg(cond_shape=None, dropout=0.0), 6, nfe=2, cond=row)


def test_run_with_condition_tensor_train_and_cli_sample(tmp_path, monkeypatch):
    import fewflow.runs as runs
    from fewflow.cli.main import cli
    from fewflow.config import default_config

    g = torch.Generator().manual_seed(0)
    x, c = _batch(1000, g)
    monkeypatch.setattr(runs, "build_data", lambda cfg, **kw: Dataset(x, None, "condtoy", c=c))
    cfg = default_config("moons").replace({
        "objective.conditional": True, "objective.label_dropout": 0.1, "train.steps": 20,
        "train.batch_size": 64, "model.hidden": 32, "model.depth": 1, "train.progress": False,
        "train.ckpt_every": 0,
    })
    out = tmp_path / "run"
    res = runs.train_run(cfg, out, figures=True)  # figures sample the data's own conditions
    assert res.stopped_reason == "completed" and (out / "samples.png").is_file()
    saved = json.loads((out / "config.json").read_text())["run_config"]
    assert saved["meta"]["cond_shape"] == [2] and saved["meta"]["conditional"] is False
    assert saved["model"]["cond_dim"] == 2

    def invoke(*args: str):
        return CliRunner().invoke(cli, ["sample", str(out), "--nfe", "2", *args], catch_exceptions=False)

    cfile, samples = tmp_path / "c.npy", tmp_path / "s.npy"
    np.save(cfile, np.tile([[1.0, -1.0]], (40, 1)))
    r = invoke("--n", "40", "--cond", str(cfile), "--cfg", "2", "--out", str(samples))
    assert r.exit_code == 0, r.output + r.stderr
    assert np.load(samples).shape == (40, 2) and np.isfinite(np.load(samples)).all()
    np.save(cfile, np.array([[0.5, 0.5]]))  # one row for all samples
    assert invoke("--n", "10", "--cond", str(cfile), "--out", str(samples)).exit_code == 0
    for bad, word in ((np.zeros((10, 3)), "cond must have shape"), (np.array([[np.nan, 0.0]]), "non-finite")):
        np.save(cfile, bad)
        r = invoke("--n", "10", "--cond", str(cfile), "--out", str(samples))
        err = r.stderr.strip()
        assert r.exit_code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
        assert word in err, err
    r = invoke("--n", "10", "--cond", str(tmp_path / "missing.npy"), "--out", str(samples))
    assert r.exit_code == 2 and "cannot read the condition" in r.stderr
