"""Faults and bad input: diverged training, a crafted ``latest``, stale temps, non-finite samples, unknown
names, boundary checks of models / guidance / couplings / TrainConfig, the benchmarks' output folder, and a
seeded fuzz over the public functions of paths, couplings, solvers, metrics and guidance."""

from __future__ import annotations

import json
import math
import random
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from cli_helpers import invoke
from safetensors.torch import load_file
from torch import nn

from fewflow import FewflowError
from fewflow.objectives.base import LossOutput
from fewflow.train import TrainConfig, Trainer, load_checkpoint

TINY = [
    "--set", "model.hidden=16", "--set", "model.depth=1", "--n", "400", "--batch-size", "64",
    "--no-progress", "--set", "train.log_every=5", "--set", "train.device=cpu",
]




def one_line_error(result, code: int, *words: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.output, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0]), result.stderr
    err = errors[0]
    assert "Traceback" not in result.output
    for w in words:
        assert w in err, (w, err)
    return err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "moons"
    r = invoke(["train", "--data", "moons", "--steps", "6", "--out", str(out), *TINY,
                "--set", "train.ckpt_every=0"])
    assert r.exit_code == 0, r.output + r.stderr
    return out


# ------------------------------------------------------------------------------------ 1. diverged training
def test_diverged_cli_run_exits_3_keeps_latest_and_saves_the_diverged_state(tmp_path, monkeypatch):
    from fewflow.objectives.cfm import CFMLoss

    calls = {"n": 0}
    pair_loss = CFMLoss.pair_loss

    def nan_at_step_8(self, *args, **kw):
        calls["n"] += 1
        out = pair_loss(self, *args, **kw)
        return LossOutput(out.loss * float("nan"), out.diagnostics) if calls["n"] == 8 else out

    monkeypatch.setattr(CFMLoss, "pair_loss", nan_at_step_8)
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = invoke(["train", "--data", "moons", "--steps", "12", "--out", str(out), *TINY,
                    "--set", "train.ckpt_every=3"])
    err = one_line_error(r, 3, "non-finite loss", "step 8", "diverged-8")
    assert "ckpt-6" in err
    assert (out / "latest").read_text().strip() == "ckpt-6"  # the last good checkpoint, never the NaN one
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-3", "ckpt-6"]
    assert not (out / "samples.png").exists()
    div = out / "diverged-8"
    doc = json.loads((div / "diverged.json").read_text())
    assert doc["step"] == 8 and doc["weights_after_step"] == 7 and doc["loss"] == "nan"
    assert doc["non_finite"] == "loss" and doc["last_good_checkpoint"] == "ckpt-6"
    weights = load_file(str(div / "model.safetensors"))
    grads = load_file(str(div / "grads.safetensors"))
    assert set(grads) <= set(weights) and grads and (div / "ema.safetensors").is_file()
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())  # the weights after step 7
    good = load_checkpoint(out).model_state()
    assert any(not torch.equal(good[k], weights[k]) for k in weights)  # one more step than ckpt-6
    assert "3" in invoke(["train", "--help"]).output.split("Exit status:")[1][:200]


def test_non_finite_gradient_is_saved_apart_with_the_offending_parameters(tmp_path):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Parameter(torch.ones(3))
            self.b = nn.Parameter(torch.ones(3))

    def obj(model, x1, *, generator=None, **cond):  # finite loss, infinite gradient of a at step 4
        k = obj.n = getattr(obj, "n", 0) + 1
        a = model.a * (0.0 if k == 4 else 1.0)
        return LossOutput((a.abs().sqrt().sum() + (model.b - x1.mean()) ** 2).sum())

    cfg = TrainConfig(steps=10, batch_size=4, progress=False, ckpt_every=2, log_every=0, grad_clip=None,
                      device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = Trainer(Net(), obj, torch.randn(16, 3), cfg, out_dir=tmp_path).fit()
    assert res.step == 3 and "non-finite gradient norm" in res.stopped_reason
    assert res.checkpoint == str(tmp_path / "ckpt-2") and load_checkpoint(tmp_path).step == 2
    doc = json.loads((tmp_path / "diverged-4" / "diverged.json").read_text())
    assert doc["non_finite_grads"] == ["a"] and math.isfinite(doc["loss"])


# ------------------------------------------------------------------------------------ 2. latest, stale temps
@pytest.mark.parametrize("name", ["../evil", "{abs}", "ckpt-1/../../evil", "evil", "\x00\xff"])
def test_latest_never_points_outside_the_run(run_dir, tmp_path, name):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    evil = tmp_path / "evil"  # a perfectly valid checkpoint, outside the run folder
    shutil.copytree(next(run.glob("ckpt-*")), evil)
    shutil.copytree(next(run.glob("ckpt-*")), run / "evil")
    (run / "latest").write_bytes(name.replace("{abs}", str(evil)).encode("utf-8", "surrogateescape"))
    with pytest.raises(FewflowError, match="refusing to follow"):
        load_checkpoint(run)
    one_line_error(invoke(["sample", str(run), "--n", "5", "--out", str(tmp_path / "s.npy")]), 2, "latest")


def test_stale_temps_are_removed_when_training_starts(tmp_path):
    import subprocess
    import sys

    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()  # a writer that was killed: its pid is no longer running
    dead = done.pid
    stale = [tmp_path / ".tmp-ckpt-3-deadbeef", tmp_path / f".latest.tmp-{dead}-0123abcd",
             tmp_path / f".ckpt-5.tmp-{dead}-89abcdef"]
    stale[0].mkdir()
    stale[1].write_text("ckpt-")
    stale[2].mkdir()
    seen: list[bool] = []

    def sample_fn(trainer, step, out_dir):  # step 1: before the first checkpoint is written
        seen.append(any(p.exists() for p in stale))

    cfg = TrainConfig(steps=2, batch_size=4, progress=False, ckpt_every=0, log_every=0, sample_every=1,
                      device="cpu")
    obj = lambda model, x1, **kw: LossOutput(((model(x1) - x1) ** 2).mean())  # noqa: E731
    Trainer(nn.Linear(2, 2), obj, torch.randn(8, 2), cfg, out_dir=tmp_path, sample_fn=sample_fn).fit()
    assert seen and not seen[0]


# ------------------------------------------------------------------------------------ 3. non-finite samples
@pytest.fixture(scope="module")
def nan_run(run_dir, tmp_path_factory) -> Path:
    """A copy of the run whose newest checkpoint holds NaN weights."""
    from fewflow.runs import load_run
    from fewflow.train import save_checkpoint

    run = tmp_path_factory.mktemp("nan") / "run"
    shutil.copytree(run_dir, run)
    model, cfg = load_run(run)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    step = load_checkpoint(run).step + 1
    save_checkpoint(run, model=model, ema_model=model, optimizer=None, scheduler=None, step=step,
                    run_config=cfg.to_dict(), rng_state=None)
    return run


def test_eval_of_a_diverged_model_is_an_error(nan_run, tmp_path):
    r = invoke(["eval", str(nan_run), "--nfe", "2", "--n", "50", "--json"])
    one_line_error(r, 2, "non-finite", "euler")


def test_sample_of_a_diverged_model_is_an_error(nan_run, tmp_path):
    r = invoke(["sample", str(nan_run), "--n", "20", "--nfe", "2", "--out", str(tmp_path / "s.npy")])
    one_line_error(r, 2, "non-finite")
    assert not (tmp_path / "s.npy").exists()


def test_evaluate_run_scores_nonfinite_only_when_asked(nan_run):
    from fewflow.evaluate import evaluate_run
    from fewflow.runs import load_run

    model, cfg = load_run(nan_run)
    with pytest.raises(FewflowError, match="non-finite"):
        evaluate_run(model, cfg, nfes=(2,), n=20)
    rep = evaluate_run(model, cfg, nfes=(2,), n=20, allow_nonfinite=True)
    assert rep["results"][0]["sliced_w2"] == math.inf


def test_eval_refuses_unknown_solver_names(run_dir):
    r = invoke(["eval", str(run_dir), "--nfe", "2", "--n", "20", "--solver", "euler,bogus", "--json"])
    one_line_error(r, 2, "unknown stepper 'bogus'", "euler")
    # a budget below a stepper's cost is still skipped for it (rk4 needs 4 evaluations), not an error
    r = invoke(["eval", str(run_dir), "--nfe", "2", "--n", "20", "--solver", "euler, rk4", "--json"])
    assert r.exit_code == 0, r.stderr
    assert [row["solver"] for row in json.loads(r.output)["results"]] == ["euler"]


# ------------------------------------------------------------------------------------ 4. boundary checks
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_models_accept_other_float_precisions(dtype):
    from fewflow.models import MLP, DiT, UNet

    torch.manual_seed(0)
    nets = [(MLP(dim=2, hidden=16, depth=1), (3, 2)), (UNet(base=8, mults=(1, 2)), (3, 1, 8, 8)),
            (DiT(hidden=16, depth=1, heads=2), (3, 1, 8, 8))]
    for net, shape in nets:
        x, t = torch.randn(*shape), torch.rand(3)
        ref = net(x, t)
        out = net(x.to(dtype), t.to(dtype))
        assert out.dtype == torch.float32 and out.shape == x.shape
        assert torch.allclose(out, ref, atol=5e-2 if dtype == torch.float16 else 1e-6)
        with pytest.raises(FewflowError, match="floating-point"):
            net(x.long(), t)


def _cond_model() -> nn.Module:
    class V(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(4, 2)

        def forward(self, x, t, y=None):
            return x * t[:, None] + self.emb(y)

    return V()


@pytest.mark.parametrize("t", [-0.1, 1.5, float("nan"), torch.tensor([0.2, float("nan")]),
                               torch.tensor([0.5, 1.01])])
def test_guidance_rejects_times_outside_0_1(t):
    from fewflow.guidance import CFG, RAAG

    x, y = torch.randn(2, 2), torch.tensor([0, 2])
    for g in (CFG(_cond_model(), 2.0, 3), RAAG(_cond_model(), 3.0, 1.0, 3)):
        with pytest.raises(FewflowError, match="t (must|contains)"):
            g(x, t, y=y)
        assert torch.isfinite(g(x, torch.tensor([0.0, 1.0]), y=y)).all()


def test_gibbs_weights_and_train_config_bounds():
    from fewflow.couplings import gibbs_weights

    c = torch.rand(5)
    for eps in (0.0, -1.0, float("nan"), -math.inf):
        with pytest.raises(FewflowError, match="eps"):
            gibbs_weights(c, eps)
    with pytest.raises(FewflowError, match="non-finite"):
        gibbs_weights(torch.tensor([0.1, float("nan")]), 0.5)
    assert torch.equal(gibbs_weights(c, math.inf), torch.ones(5))  # the documented independent limit
    assert gibbs_weights(c, 0.1).mean().item() == pytest.approx(1.0)
    with pytest.raises(FewflowError, match="absurd"):
        TrainConfig(steps=10**9 + 1)
    TrainConfig(steps=10**9)


# ------------------------------------------------------------------------------------ 4b. fuzz
class _Vel(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.emb = nn.Embedding(4, d)

    def forward(self, x, t, y=None):
        h = self.lin(x.reshape(x.shape[0], -1)) * t.reshape(-1, 1)
        if y is not None:
            h = h + self.emb(y)
        return h.reshape(x.shape)


def _finite(out) -> bool:
    if torch.is_tensor(out):
        return not out.is_floating_point() or bool(torch.isfinite(out).all())
    if isinstance(out, float):
        return math.isfinite(out)
    if isinstance(out, (tuple, list)):
        return all(_finite(o) for o in out)
    if isinstance(out, dict):
        return all(_finite(v) for v in out.values())
    if hasattr(out, "__dataclass_fields__"):
        return all(_finite(getattr(out, f)) for f in out.__dataclass_fields__)
    return True


def _fuzz_calls(r: random.Random):
    """One round of calls with random (often bad) arguments: NaN / inf / empty / 1-D / 3-D / integer
    tensors, times outside [0, 1] or of the wrong shape, zero / negative / NaN / inf / huge parameters."""
    from fewflow import couplings as C
    from fewflow import guidance as G
    from fewflow import metrics as M
    from fewflow import paths as P
    from fewflow import solvers as S

    b, d = r.choice([(4, 2), (3, 5), (1, 2)])

    def x():
        z = torch.randn(b, d, generator=torch.Generator().manual_seed(r.randrange(10**6)))
        kind = r.choice(["ok", "ok", "nan", "inf", "empty", "1d", "3d", "int"])
        if kind == "nan":
            z[r.randrange(b)] = float("nan")
        elif kind == "inf":
            z.view(-1)[0] = -float("inf")
        bad = {"empty": z[:0], "1d": z.reshape(-1), "3d": z.reshape(b, 1, -1), "int": (3 * z).long()}
        return bad.get(kind, z)

    def t():
        return r.choice([torch.rand(b), r.random(), -torch.rand(b), 1 + torch.rand(b),
                         torch.full((b,), float("nan")), torch.rand(b + 1)])

    def num():
        return r.choice([0.5, 1.0, 2.0, 3, 0.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e12])

    def steps():
        return r.choice([1, 2, 5, 0, -1, 10**9])

    gen = torch.Generator().manual_seed(0)
    path = P.AffinePath(r.choice(list(P.SCHEDULES)))
    conv = r.choice(["velocity_to_x1", "velocity_to_x0", "x1_to_velocity", "x0_to_velocity", "x1_to_x0",
                     "x0_to_x1", "x0_to_score", "score_to_x0", "velocity_to_score", "score_to_velocity"])
    cname = r.choice(sorted(C.COUPLINGS))
    ckw = {"sinkhorn": {"reg": num()}, "wcfm": {"eps": num()}, "sb": {"sigma": num()}}.get(cname, {})
    grid = r.choice(["uniform", "shift", "edm", "logsnr"])
    gkw = {"shift": {"shift": num()}, "edm": {"rho": num()}}.get(grid, {})
    stepper = r.choice(["euler", "midpoint", "heun", "rk4"])
    labels = r.choice([torch.randint(0, 4, (b,)), torch.randint(-2, 6, (b,)), torch.rand(b),
                       torch.randint(0, 3, (b + 1,))])
    yield "AffinePath.sample", lambda: path.sample(x(), x(), t())
    yield f"AffinePath.{conv}", lambda: getattr(path, conv)(x(), x(), t())
    yield "brownian_bridge_noise", lambda: C.brownian_bridge_noise(r.choice([torch.rand(b), t()]), num())
    yield f"coupling {cname}", lambda: C.get_coupling(cname, **ckw)(
        x(), x(), y=torch.randint(0, 3, (b,)) if cname == "class_ot" else None, generator=gen)
    yield "pairwise_cost", lambda: C.pairwise_cost(x(), x())
    yield "gibbs_weights", lambda: C.gibbs_weights(x().reshape(-1), num())
    yield "effective_sample_size", lambda: C.effective_sample_size(x())
    yield "entropic_plan", lambda: C.entropic_plan(x().double(), num())
    yield f"get_grid {grid}", lambda: S.get_grid(grid, steps(), schedule=P.get_schedule("linear"), **gkw)
    yield "uniform_grid", lambda: S.uniform_grid(steps(), num(), num())
    yield "edm_grid", lambda: S.edm_grid(steps(), num(), num(), num())
    yield "shift_time", lambda: S.shift_time(r.choice([torch.rand(b), -torch.rand(b), torch.rand(b) * 0 / 0]),
                                             num())
    yield "as_grid", lambda: S.as_grid(r.choice([[0, 0.5, 1], [0, float("nan"), 1], [], [0.3], [1, 0.5, 0],
                                                 [0, 2], [[0.0, 1.0]]]))
    yield "steps_for_nfe", lambda: S.steps_for_nfe(r.choice([*S.STEPPER_NAMES, "bogus"]), steps())
    yield f"solve {stepper}", lambda: S.solve(_Vel(d), x(), steps=steps(), stepper=stepper)
    grids = [[0, 0.5, 1], [0, float("nan"), 1], [0.5], [0, 2.0], [1, 0]]
    yield f"solve {stepper} grid", lambda: S.solve(_Vel(d), x(), grid=r.choice(grids), stepper=stepper)
    yield "sliced_wasserstein", lambda: M.sliced_wasserstein(x(), x(), n_proj=steps(), p=num(), generator=gen)
    yield "mmd_rbf", lambda: M.mmd_rbf(x(), x(), bandwidth=r.choice([None, num()]))
    yield "energy_distance", lambda: M.energy_distance(x(), x())
    yield "CFG", lambda: G.CFG(_Vel(d), num(), 3)(x(), t(), y=labels)
    yield "RAAG", lambda: G.RAAG(_Vel(d), num(), num(), 3)(x(), t(), y=labels)


def test_fuzz_public_functions_fail_cleanly_or_return_finite_values():
    """Every call returns finite values or raises FewflowError / ValueError: never NaN / inf silently,
    never an unrelated internal exception (IndexError, RuntimeError from deep inside torch, ...).
    (Raw schedule callables ``alpha(t)``... are elementwise maps used in inner loops: NaN in, NaN out;
    their public callers above validate the times.)"""
    r = random.Random(1234)
    torch.manual_seed(0)
    failures: list[str] = []
    calls = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(15):
            for name, call in _fuzz_calls(r):
                calls += 1
                try:
                    out = call()
                except ValueError:  # FewflowError is a ValueError
                    continue
                except Exception as e:  # noqa: BLE001 - this is what the test looks for
                    failures.append(f"{name}: {type(e).__name__}: {str(e)[:100]}")
                    continue
                if not _finite(out):
                    failures.append(f"{name}: returned non-finite values")
    assert calls >= 300
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------------------ 5. benchmark output
@pytest.mark.parametrize("bench", ["fewstep", "samplers"])
def test_bench_writes_the_committed_results_only_in_full_mode(bench, tmp_path):
    import importlib

    from fewflow.bench.common import RESULTS
    from fewflow.data import default_cache_dir

    mod = importlib.import_module(f"fewflow.bench.{bench}")
    scratch = default_cache_dir() / "bench"
    assert mod.config_from_args([]).out_dir == scratch
    assert mod.config_from_args(["--quick"]).out_dir == scratch
    assert mod.config_from_args(["--smoke"]).out_dir == scratch
    assert mod.config_from_args(["--full"]).out_dir == RESULTS
    assert mod.config_from_args(["--mode", "full"]).out_dir == RESULTS
    assert mod.config_from_args(["--out", str(tmp_path), "--full"]).out_dir == tmp_path
    assert mod.config_from_args(["--full", "--out", str(tmp_path)]).out_dir == tmp_path
    assert "--full only" in " ".join(mod.parser().format_help().split())
