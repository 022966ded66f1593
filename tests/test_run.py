"""RunConfig: round trips, validation messages, registry, builders."""

from __future__ import annotations

import json

import pytest
import torch

from fewflow import FewflowError
from fewflow.run import (
    RunConfig,
    build_coupling,
    build_data,
    build_grid,
    build_model_from_config,
    build_objective,
    build_time_sampler,
    build_train_config,
    default_config,
    generate,
    get_method,
    list_methods,
    read_config,
    register_method,
    resolve_model_config,
    steps_for_nfe,
)


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
        ({"bogus": 1}, ["unknown run-config key", "bogus"]),
        ({"objective": {"nope": 1}}, ["unknown key", "nope", "objective"]),
        ({"data": {"name": "cifar"}}, ["unknown data set", "cifar", "checkerboard"]),
        ({"objective": {"method": "magic"}}, ["unknown method", "magic", "cfm"]),
        ({"objective": {"coupling": "otx"}}, ["unknown coupling", "otx", "sinkhorn"]),
        ({"objective": {"schedule": "wiggly"}}, ["unknown schedule", "wiggly"]),
        ({"objective": {"time_sampler": "beta"}}, ["unknown time sampler", "beta"]),
        ({"objective": {"source": "laplace"}}, ["unknown source", "laplace"]),
        ({"objective": {"label_dropout": 1.5}}, ["label_dropout", "[0, 1)"]),
        ({"sampler": {"stepper": "leapfrog"}}, ["unknown stepper", "leapfrog", "heun"]),
        ({"sampler": {"nfe": 0}}, ["sampler.nfe", "positive"]),
        ({"sampler": {"grid": "log"}}, ["unknown time grid", "log"]),
        ({"model": {"type": "ResNet"}}, ["unknown model type", "ResNet"]),
        ({"model": {"hidden": 3}}, ["model", "type"]),
        ({"data": {"n": -5}}, ["data.n", "positive"]),
        ({"train": {"stepz": 5}}, ["unknown key", "stepz", "train"]),
        ({"version": 99}, ["version", "99"]),
    ],
)
def test_bad_values_name_the_problem(patch, words):
    d = default_config("checkerboard").to_dict()
    for k, v in patch.items():
        if isinstance(v, dict) and k != "model":
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


def test_method_registry():
    assert "cfm" in list_methods()
    calls = []

    def builder(cfg, data):
        calls.append((cfg.data.name, tuple(data.x.shape[1:])))
        return "objective"

    register_method("test-method", builder, description="a stand-in")
    try:
        with pytest.raises(FewflowError, match="already registered"):
            register_method("test-method", builder)
        cfg = default_config("moons").replace({"objective.method": "test-method", "data.n": 64})
        assert build_objective(cfg, build_data(cfg)) == "objective"
        assert calls == [("moons", (2,))]
        assert get_method("test-method").description == "a stand-in"
    finally:
        from fewflow import run

        run._METHODS.pop("test-method")
    with pytest.raises(FewflowError, match="unknown method"):
        get_method("test-method")


def test_builders_make_library_objects():
    from fewflow.couplings import ExactOTCoupling, SinkhornCoupling
    from fewflow.objectives import CFMLoss, LogitNormalTime, ShiftedTime

    cfg = default_config("moons").replace({"data.n": 256, "model.hidden": 32, "model.depth": 2})
    data = build_data(cfg)
    assert data.x.shape == (256, 2)
    model = build_model_from_config(cfg, data)
    assert model.config["dim"] == 2 and model.config["hidden"] == 32
    assert isinstance(build_objective(cfg, data), CFMLoss)
    assert isinstance(build_coupling(cfg.replace({"objective.coupling": "ot"})), ExactOTCoupling)
    sk = build_coupling(
        cfg.replace({"objective.coupling": "sinkhorn", "objective.coupling_kwargs": {"reg": 0.2}})
    )
    assert isinstance(sk, SinkhornCoupling)
    assert isinstance(
        build_time_sampler(cfg.replace({"objective.time_sampler": "logit_normal"})), LogitNormalTime
    )
    shifted = cfg.replace({"objective.time_sampler": "shifted", "objective.time_kwargs": {"shift": 3.0}})
    assert isinstance(build_time_sampler(shifted), ShiftedTime)
    with pytest.raises(FewflowError, match="shift"):
        build_time_sampler(cfg.replace({"objective.time_sampler": "shifted"}))
    with pytest.raises(FewflowError, match="coupling"):
        build_coupling(cfg.replace({"objective.coupling": "ot", "objective.coupling_kwargs": {"bogus": 1}}))
    tc = build_train_config(cfg, steps=7)
    assert tc.steps == 7 and tc.batch_size == cfg.train["batch_size"]


def test_resolve_model_config_fills_data_dependent_entries():
    cfg = default_config("digits").replace({"data.n": 50})
    data = build_data(cfg)
    m = resolve_model_config(cfg, data)
    assert m["dim"] == 64 and m["num_classes"] == 10
    unet = cfg.replace({"model": {"type": "unet", "base": 8, "mults": [1, 2]}})
    m = resolve_model_config(unet, data)
    assert m["type"] == "UNet" and m["in_channels"] == 1 and m["size"] == 8
    toy = default_config("moons").replace({"model": {"type": "UNet"}, "data.n": 10})
    with pytest.raises(FewflowError, match="images"):
        resolve_model_config(toy, build_data(toy))
    cb = default_config("checkerboard").replace({"objective.conditional": True, "data.n": 10})
    with pytest.raises(FewflowError, match="no class labels"):
        resolve_model_config(cb, build_data(cb))


def test_steps_for_nfe():
    assert steps_for_nfe("euler", 8) == 8
    assert steps_for_nfe("heun", 8) == 4
    assert steps_for_nfe("rk4", 9) == 2
    with pytest.raises(FewflowError, match="too small"):
        steps_for_nfe("heun", 1)


def test_build_grid_endpoints():
    for kind, kw in (("uniform", {}), ("shift", {"shift": 3.0}), ("edm", {})):
        g = build_grid(kind, 6, **kw)
        assert g.shape == (7,)
        assert float(g[0]) == 0.0 and float(g[-1]) == 1.0
        assert bool((g.diff() > 0).all())
    assert not torch.allclose(build_grid("shift", 4, shift=3.0), build_grid("uniform", 4))
    assert torch.allclose(build_grid("shift", 4, shift=1.0), build_grid("uniform", 4))


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

    cfg = default_config("moons").replace({"meta": {"shape": [2], "num_classes": None}})
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
        {"objective.conditional": True, "meta": {"shape": [2], "num_classes": 3}}
    )
    res = generate(Echo(), cfg, 4, nfe=1, label=2, generator=torch.Generator().manual_seed(0))
    x0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(res.x, x0 + 2.0)
    # CFG with w = 3: v_u + 3 (v_c - v_u) = 3 * 2 = 6
    res = generate(Echo(), cfg, 4, nfe=1, label=2, cfg_scale=3.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(res.x, x0 + 6.0)
    with pytest.raises(FewflowError, match="labels must lie"):
        generate(Echo(), cfg, 4, label=3)


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
    with pytest.raises(FewflowError, match="cannot plot"):
        plot_samples(torch.randn(4, 3), tmp_path / "x.png")
    # MMD can be negative (unbiased): the plot falls back to a linear axis instead of failing
    assert plot_metric_vs_nfe({"euler": {1: 0.1, 2: -0.01}}, tmp_path / "m.png", floor=-0.001).is_file()
