"""RunConfig (fewflow.config), run-folder builders (fewflow.runs) and the sampling pipeline
(fewflow.sampling): round trips, validation messages, numeric parsing, builders, generate."""

from __future__ import annotations

import json

import pytest
import torch

from fewflow import FewflowError
from fewflow.config import RunConfig, default_config, read_config
from fewflow.runs import build_context, build_data, build_model, resolve_model_config
from fewflow.sampling import generate
from fewflow.solvers import get_grid, steps_for_nfe


def test_round_trip_dict_and_json(tmp_path):
    cfg = default_config("moons").replace(
        {"objective.coupling": "ot", "train.steps": 123, "model.hidden": 64}
    )
    d = cfg.to_dict()
    again = RunConfig.from_dict(json.loads(json.dumps(d)))
    assert again == cfg
    assert again.to_dict() == d
    path = cfg.to_json(tmp_path / "c.json")
    assert RunConfig.from_file(path) == cfg
    # YAML reads the same
    import yaml

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    assert RunConfig.from_file(tmp_path / "c.yaml") == cfg
    # to_dict is a deep copy: editing it does not touch the config
    d["model"]["hidden"] = 7
    assert cfg.model["hidden"] == 64


def test_defaults_per_data_set():
    toy = default_config("checkerboard")
    assert toy.model == {"type": "MLP", "hidden": 256, "depth": 4}
    assert not toy.objective.conditional
    digits = default_config("digits")
    assert digits.objective.conditional and digits.objective.label_dropout > 0
    assert default_config("mnist").model["type"] == "UNet"


@pytest.mark.parametrize(
    "patch, words",
    [
        ({"bogus": 1}, ["unknown key", "bogus"]),
        ({"objective": {"nope": 1}}, ["unknown key", "nope", "objective"]),
        ({"data": {"name": "cifar"}}, ["unknown data set", "cifar", "checkerboard"]),
        ({"method": {"name": "magic"}}, ["unknown method", "magic", "cfm"]),
        ({"method": {"name": "meanflow", "ratoi": 0.5}}, ["unknown key", "ratoi", "did you mean 'ratio'"]),
        ({"method": {"name": "meanflow", "ratio": "lots"}}, ["method.ratio", "number"]),
        ({"objective": {"coupling": "otx"}}, ["unknown coupling", "otx", "sinkhorn"]),
        ({"objective": {"path": "wiggly"}}, ["unknown path schedule", "wiggly"]),
        ({"objective": {"time_sampler": "beta"}}, ["unknown time sampler", "beta"]),
        ({"objective": {"source": "laplace"}}, ["unknown source", "laplace"]),
        ({"objective": {"label_dropout": 1.5}}, ["label_dropout", "[0, 1)"]),
        ({"sampler": {"stepper": "leapfrog"}}, ["unknown stepper", "leapfrog", "heun"]),
        ({"sampler": {"nfe": 0}}, ["sampler.nfe", "positive"]),
        ({"sampler": {"grid": "log"}}, ["unknown time grid", "log"]),
        ({"model": {"type": "ResNet"}}, ["unknown model type", "ResNet"]),
        ({"model": {"hidden": 3}}, ["model", "type"]),
        ({"data": {"n": -5}}, ["data.n", "positive"]),
        ({"train": {"stepz": 5}}, ["unknown key", "stepz", "train", "did you mean 'steps'"]),
        ({"version": 99}, ["version", "99"]),
    ],
)
def test_bad_values_name_the_problem(patch, words):
    d = default_config("checkerboard").to_dict()
    for k, v in patch.items():
        if isinstance(v, dict) and k not in ("model", "method"):
            d[k].update(v)
        else:
            d[k] = v
    with pytest.raises(FewflowError) as e:
        RunConfig.from_dict(d)
    for w in words:
        assert w in str(e.value)


def test_label_dropout_needs_conditional():
    with pytest.raises(FewflowError, match="conditional"):
        default_config("moons").replace({"objective.label_dropout": 0.1})


def test_read_config_errors(tmp_path):
    with pytest.raises(FewflowError, match="not found"):
        read_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(FewflowError, match="cannot parse"):
        read_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(FewflowError, match="mapping"):
        read_config(lst)


def test_numbers_from_strings_and_yaml(tmp_path):
    """``--set train.lr=3e-4`` and ``lr: 3e-4`` in YAML are numbers (YAML 1.1 reads 3e-4 as a string)."""
    sets = {"train.lr": "3e-4", "method.name": "meanflow", "method.ratio": "5e-1"}
    cfg = default_config("moons").replace(sets)
    assert cfg.train["lr"] == 3e-4 and isinstance(cfg.train["lr"], float)
    assert cfg.method["ratio"] == 0.5
    y = tmp_path / "c.yaml"
    y.write_text("data: {name: moons}\ntrain: {lr: 3e-4, steps: 10}\n")
    assert read_config(y)["train"]["lr"] == 3e-4
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a: &a [1, 2]\nb: [*a, *a]\n")
    with pytest.raises(FewflowError, match="aliases"):
        read_config(bomb)


def test_method_section_is_filled_with_the_method_defaults():
    cfg = default_config("moons").replace({"method.name": "meanflow"})
    assert cfg.method["name"] == "meanflow"
    assert cfg.method["ratio"] == 0.25 and cfg.method["adaptive_p"] == 1.0
    # switching the method drops the previous method's fields
    back = cfg.replace({"method.name": "cfm"})
    assert back.method == {"name": "cfm", "sigma_path_noise": None, "norm": "l2"}
    # a variant's fixed field cannot be set to something else
    with pytest.raises(FewflowError, match="fixes ratio"):
        default_config("moons").replace({"method.name": "meanflow_ratio0", "method.ratio": 0.5})


def test_builders_make_library_objects():
    from fewflow.couplings import ExactOTCoupling, SinkhornCoupling
    from fewflow.objectives import CFMLoss, LogitNormalTime, ShiftedTime

    cfg = default_config("moons").replace({"data.n": 256, "model.hidden": 32, "model.depth": 2})
    data = build_data(cfg)
    assert data.x.shape == (256, 2)
    cfg.meta = {"shape": [2], "num_classes": None, "conditional": False}
    model = build_model(cfg)
    assert model.config["dim"] == 2 and model.config["hidden"] == 32

    def ctx(**over):
        c = cfg.replace(over)
        c.meta = cfg.meta
        return build_context(c, data)

    assert isinstance(ctx(**{"objective.coupling": "ot"}).coupling, ExactOTCoupling)
    sk = ctx(**{"objective.coupling": "sinkhorn", "objective.coupling_kwargs": {"reg": 0.2}}).coupling
    assert isinstance(sk, SinkhornCoupling) and sk.reg == 0.2
    assert isinstance(ctx(**{"objective.time_sampler": "logit_normal"}).time_sampler, LogitNormalTime)
    shifted = ctx(**{"objective.time_sampler": "shifted", "objective.time_kwargs": {"shift": 3.0}})
    assert isinstance(shifted.time_sampler, ShiftedTime)
    with pytest.raises(FewflowError, match="shift"):
        ctx(**{"objective.time_sampler": "shifted"})
    with pytest.raises(FewflowError, match="coupling"):
        ctx(**{"objective.coupling": "ot", "objective.coupling_kwargs": {"bogus": 1}})
    from fewflow.methods import get_method

    spec = get_method("cfm")
    (stage,) = spec.build(spec.make_config(), ctx())
    assert isinstance(stage.objective, CFMLoss) and stage.share == 1.0


def test_resolve_model_config_fills_data_dependent_entries():
    cfg = default_config("digits").replace({"data.n": 50})
    meta = {"shape": [1, 8, 8], "num_classes": 10, "conditional": True}
    m = resolve_model_config(cfg, meta)
    assert m["dim"] == 64 and m["num_classes"] == 10
    unet = cfg.replace({"model": {"type": "unet", "base": 8, "mults": [1, 2]}})
    m = resolve_model_config(unet, meta)
    assert m["type"] == "UNet" and m["in_channels"] == 1 and m["size"] == 8
    toy = default_config("moons").replace({"model": {"type": "UNet"}, "data.n": 10})
    with pytest.raises(FewflowError, match="images"):
        resolve_model_config(toy, {"shape": [2]})
    mf = default_config("moons").replace({"method.name": "meanflow"})
    m = resolve_model_config(mf, {"shape": [2]})
    assert m["flow_map"] is True and m["time_features"] == "fourier"


def test_steps_for_nfe():
    assert steps_for_nfe("euler", 8) == 8
    assert steps_for_nfe("heun", 8) == 4
    assert steps_for_nfe("rk4", 9) == 2
    with pytest.raises(FewflowError, match="too small"):
        steps_for_nfe("heun", 1)
    with pytest.raises(FewflowError, match="multiple"):
        steps_for_nfe("heun", 5, exact=True)
    # FlowTurbo: one Heun step (2 NFE) then pseudo-corrector steps (1 NFE each); the same rule everywhere
    assert steps_for_nfe("flowturbo", 3) == 2
    with pytest.raises(FewflowError, match="flowturbo"):
        steps_for_nfe("flowturbo", 2)
    with pytest.raises(FewflowError, match="100000"):
        steps_for_nfe("euler", 10**9)


def test_grid_by_name_endpoints():
    for kind, kw in (("uniform", {}), ("shift", {"shift": 3.0}), ("edm", {}), ("logsnr", {})):
        g = get_grid(kind, 6, **kw)
        assert g.shape == (7,)
        assert float(g[0]) == 0.0 and float(g[-1]) == 1.0
        assert bool((g.diff() > 0).all())
    assert not torch.allclose(get_grid("shift", 4, shift=3.0), get_grid("uniform", 4))
    assert torch.allclose(get_grid("shift", 4, shift=1.0), get_grid("uniform", 4))


def test_generate_matches_exact_flow_of_a_known_velocity():
    """A velocity field whose flow is known in closed form: v(x, t) = a (constant drift) moves x0 to x0 + a.
    Euler is exact here at any NFE, and conditional/cfg bookkeeping must leave it untouched."""
    a = torch.tensor([1.5, -0.5])

    class Drift(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t, y=None):
            return a.to(x) + 0 * self.p + 0 * x

    cfg = default_config("moons").replace({"meta": {"shape": [2], "num_classes": None, "conditional": False}})
    gen = torch.Generator().manual_seed(0)
    res = generate(Drift(), cfg, 5, nfe=3, stepper="euler", generator=gen)
    x0 = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(res.x, x0 + a)
    assert res.nfe == 3
    res = generate(Drift(), cfg, 5, nfe=4, stepper="heun", generator=torch.Generator().manual_seed(0))
    assert res.nfe == 4
    torch.testing.assert_close(res.x, x0 + a)
    with pytest.raises(FewflowError, match="unconditional"):
        generate(Drift(), cfg, 5, label=3)
    with pytest.raises(FewflowError, match="unconditional"):
        generate(Drift(), cfg, 5, cfg_scale=2.0)


def test_generate_conditional_labels_and_cfg():
    seen = []

    class Echo(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t, y=None):
            seen.append(y.clone())
            # the conditional velocity pushes along y; the null class (y = 3) gives 0
            return (y != 3).to(x)[:, None] * y.to(x)[:, None].expand_as(x) + 0 * self.p

    cfg = default_config("gmm").replace(
        {"objective.conditional": True, "meta": {"shape": [2], "num_classes": 3, "conditional": True}}
    )
    res = generate(Echo(), cfg, 4, nfe=1, label=2, generator=torch.Generator().manual_seed(0))
    x0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(res.x, x0 + 2.0)
    # CFG with w = 3: v_u + 3 (v_c - v_u) = 3 * 2 = 6
    res = generate(Echo(), cfg, 4, nfe=1, label=2, cfg_scale=3.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(res.x, x0 + 6.0)
    with pytest.raises(FewflowError, match="labels must lie"):
        generate(Echo(), cfg, 4, label=3)


def test_generate_refuses_non_finite_samples():
    class Blow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t, y=None):
            return x * float("inf") + self.p

    cfg = default_config("moons").replace({"meta": {"shape": [2], "num_classes": None, "conditional": False}})
    with pytest.raises(FewflowError, match="non-finite"):
        generate(Blow(), cfg, 5, nfe=2)
    assert not torch.isfinite(generate(Blow(), cfg, 5, nfe=2, check_finite=False).x).all()


def test_image_grid_places_each_image(tmp_path):
    from fewflow.plotting import image_grid, plot_metric_vs_nfe, plot_samples

    imgs = torch.arange(5, dtype=torch.float32)[:, None, None, None].expand(5, 1, 3, 3) + 1
    g = image_grid(imgs, nrow=3, pad=1)
    assert g.shape == (2 * 4 + 1, 3 * 4 + 1, 1)
    # image i sits at row i // 3, column i % 3; padding (and the empty sixth cell) takes the minimum value
    for i in range(5):
        r, c = divmod(i, 3)
        assert (g[1 + 4 * r : 4 + 4 * r, 1 + 4 * c : 4 + 4 * c] == i + 1).all()
    assert g[0, 0, 0] == 1 and (g[5:8, 9:12] == 1).all()
    # flat 64-vectors are drawn as 8x8 images, 2-D points as a scatter; others are refused
    assert plot_samples(torch.randn(16, 64), tmp_path / "d.png").stat().st_size > 0
    assert plot_samples(torch.randn(100, 2), tmp_path / "p.png").stat().st_size > 0
    # vectors of more than two (non-square) features: the first two coordinates; 1-D samples are refused
    assert plot_samples(torch.randn(40, 3), tmp_path / "x3.png").stat().st_size > 0
    with pytest.raises(FewflowError, match="cannot plot"):
        plot_samples(torch.randn(4), tmp_path / "x.png")
    # MMD can be negative (unbiased): the plot falls back to a linear axis instead of failing
    assert plot_metric_vs_nfe({"euler": {1: 0.1, 2: -0.01}}, tmp_path / "m.png", floor=-0.001).is_file()
