"""Trainer loop: config, LR schedule, EMA, batches, NaN guard, exact resume, callbacks, AMP/compile wiring."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fewflow import FewflowError
from fewflow.objectives.base import LossOutput
from fewflow.train import EMA, EpochSampler, TrainConfig, Trainer, load_checkpoint, lr_factor, make_scheduler


# ---------------------------------------------------------------------------------------- local stand-ins
class TinyMLP(nn.Module):
    """A small velocity model v(x, t) (local, so these tests do not depend on fewflow.models)."""

    def __init__(self, dim: int = 2, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, dim))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.config = {"dim": dim, "hidden": hidden}

    def forward(self, x, t, y=None):
        self.calls += 1
        return self.net(torch.cat([x, t[:, None].to(x.dtype)], dim=1))


def cfm(model, x1, *, generator=None, **cond):
    """Rectified-flow CFM: x_t = t x1 + (1 - t) x0, target x1 - x0. Uses the passed generator for x0, t
    and the *global* torch RNG for a small jitter, so exact resume needs both streams restored."""
    x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
    t = torch.rand(x1.shape[0], generator=generator, device=x1.device, dtype=x1.dtype)
    t = (t + 0.01 * torch.rand_like(t)).clamp(0, 1)
    xt = t[:, None] * x1 + (1 - t[:, None]) * x0
    loss = ((model(xt, t) - (x1 - x0)) ** 2).mean()
    return LossOutput(loss, {"t_mean": float(t.mean())})


def regression(model, x1, *, generator=None, **cond):
    """Deterministic: learn v(x, t=0.5) = 2 x - 1."""
    t = torch.full((x1.shape[0],), 0.5, dtype=x1.dtype, device=x1.device)
    return LossOutput(((model(x1, t) - (2 * x1 - 1)) ** 2).mean())


def quiet(**kw) -> TrainConfig:
    base = dict(steps=40, batch_size=16, lr=3e-3, progress=False, log_every=10, ckpt_every=0, ema_decay=None)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def data() -> torch.Tensor:
    return torch.randn(50, 2, generator=torch.Generator().manual_seed(1)) * 0.5 + 1.0


def params_of(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# ---------------------------------------------------------------------------------------- config
def test_config_json_round_trip_and_unknown_keys():
    cfg = TrainConfig(steps=7, betas=(0.8, 0.95), grad_clip=None, lr_schedule="cosine", warmup=2)
    d = json.loads(json.dumps(dataclasses.asdict(cfg)))
    assert TrainConfig.from_dict(d) == cfg
    assert TrainConfig(**d) == cfg  # JSON lists become tuples again
    with pytest.raises(FewflowError, match="unknown TrainConfig key.*'stepz'"):
        TrainConfig.from_dict({**d, "stepz": 3})
    with pytest.raises(FewflowError, match="lr schedule"):
        TrainConfig(lr_schedule="exp")
    with pytest.raises(FewflowError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(FewflowError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)


# ---------------------------------------------------------------------------------------- LR schedules
def test_lr_factor_closed_forms():
    assert [lr_factor(s, total=10, warmup=4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    # cosine: after warm-up p = (s - w) / (T - w); halfway the factor is (1 + m) / 2
    assert lr_factor(7, total=10, warmup=4, schedule="cosine") == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 3 / 6))
    )
    assert lr_factor(7, total=10, warmup=4, schedule="cosine", min_ratio=0.2) == pytest.approx(
        0.2 + 0.8 * 0.5
    )
    assert lr_factor(6, total=10, warmup=2, schedule="linear") == pytest.approx(1 - 4 / 8)
    assert lr_factor(10, total=10, schedule="linear") == 0.0
    with pytest.raises(FewflowError, match="lr schedule"):
        lr_factor(0, total=10, schedule="step")


def test_scheduler_drives_optimizer_and_trainer_logs_it(data):
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.5)
    sched = make_scheduler(opt, total=12, warmup=3, schedule="cosine")
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx(
        [0.5 * lr_factor(s, total=12, warmup=3, schedule="cosine") for s in range(12)]
    )

    cfg = quiet(steps=12, warmup=3, lr_schedule="linear", log_every=1, lr=0.1)
    res = Trainer(TinyMLP(), regression, data, cfg).fit()
    lrs = [row["lr"] for row in res.history]
    assert lrs == pytest.approx(
        [0.1 * lr_factor(s, total=12, warmup=3, schedule="linear") for s in range(12)]
    )


# ---------------------------------------------------------------------------------------- EMA
def test_ema_matches_closed_form_and_copies_buffers():
    m = nn.Linear(3, 1)
    m.register_buffer("count", torch.zeros(()))
    ema = EMA(m, decay=0.9, warmup=False)
    e0 = m.weight.detach().clone()
    values = [torch.full_like(e0, float(k)) for k in range(1, 6)]
    for k, v in enumerate(values):
        with torch.no_grad():
            m.weight.copy_(v)
            m.count.fill_(k + 1)
        ema.update(m)
    d, K = 0.9, len(values)
    expected = d**K * e0 + sum((1 - d) * d ** (K - 1 - k) * v for k, v in enumerate(values))
    torch.testing.assert_close(ema.module.weight, expected)
    assert float(ema.module.count) == K  # buffers copied, not averaged
    assert not ema.module.weight.requires_grad

    warm = EMA(m, decay=0.999, warmup=True)
    assert warm.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    warm.num_updates = 10_000
    assert warm.current_decay() == 0.999


def test_trainer_ema_model_is_average_of_trajectory(data):
    res_m = TinyMLP()
    tr = Trainer(res_m, regression, data, quiet(steps=30, ema_decay=0.5, ema_warmup=False, lr=1e-2))
    tr.fit()
    assert tr.model is res_m
    assert tr.ema_model is not tr.model
    diff = [(a - b).abs().max() for a, b in zip(tr.ema_model.parameters(), tr.model.parameters())]
    assert max(diff) > 0  # lags behind the weights...
    assert max(diff) < 0.05  # ...but only by a few steps at decay 0.5
    tr2 = Trainer(TinyMLP(), regression, data, quiet(steps=2, ema_decay=None))
    assert tr2.ema_model is tr2.model


# ---------------------------------------------------------------------------------------- batches
def test_epoch_sampler_without_replacement_and_resumable():
    s = EpochSampler(10, 4, seed=3)
    batches = [s.next_indices() for _ in range(5)]  # 20 indices = 2 epochs; batch 3 straddles them
    flat = torch.cat(batches)
    assert sorted(flat[:10].tolist()) == list(range(10))
    assert sorted(flat[10:].tolist()) == list(range(10))
    assert not torch.equal(flat[:10], flat[10:])  # a new permutation each epoch
    s2 = EpochSampler(10, 4, seed=3)
    s2.load_state_dict(EpochSampler(10, 4, seed=3).state_dict())
    assert torch.equal(torch.cat([s2.next_indices() for _ in range(5)]), flat)
    s3 = EpochSampler(10, 4, seed=3)
    for _ in range(2):
        s3.next_indices()
    s4 = EpochSampler(10, 4, seed=3)
    s4.load_state_dict(s3.state_dict())
    assert torch.equal(torch.cat([s4.next_indices() for _ in range(3)]), flat[8:])
    assert not torch.equal(
        torch.cat([EpochSampler(10, 4, seed=4).next_indices() for _ in range(3)])[:10], flat[:10]
    )
    with pytest.raises(FewflowError, match="batch order"):
        EpochSampler(10, 5, seed=3).load_state_dict(s3.state_dict())


def test_dataset_labels_reach_objective_aligned():
    class DS:  # duck-typed fewflow.data.Dataset
        x = torch.arange(30, dtype=torch.float32).reshape(30, 1)
        y = torch.arange(30) % 3

    seen = []

    def obj(model, x1, *, generator=None, **cond):
        seen.append((x1.squeeze(1).long(), cond["y"]))
        return LossOutput((model(x1, torch.zeros(x1.shape[0])) ** 2).mean())

    Trainer(TinyMLP(dim=1), obj, DS(), quiet(steps=4, batch_size=8)).fit()
    assert len(seen) == 4
    for x, y in seen:
        assert torch.equal(x % 3, y)
    ids = torch.cat([x for x, _ in seen])
    assert len(ids) == 32 and len(set(ids[:30].tolist())) == 30  # one epoch: each example once


def test_iterator_and_iterable_data():
    def stream(n):
        for i in range(n):
            x = torch.randn(8, 2, generator=torch.Generator().manual_seed(i))
            yield {"x1": x, "tag": i, "w": torch.ones(8)}

    tags = []

    def obj(model, x1, *, generator=None, tag, w):
        tags.append(tag)
        assert w.shape == (8,)
        return regression(model, x1)

    res = Trainer(TinyMLP(), obj, stream(5), quiet(steps=20)).fit()
    assert res.stopped_reason.startswith("data exhausted") and res.step == 5
    assert tags == [0, 1, 2, 3, 4]
    batches = [(torch.randn(8, 2),) for _ in range(3)]  # a re-iterable list of (x1,) tuples restarts
    res = Trainer(TinyMLP(), regression, batches, quiet(steps=7)).fit()
    assert res.step == 7 and res.stopped_reason == "completed"


def test_bad_inputs_raise_clear_errors(data):
    with pytest.raises(FewflowError, match="data must be"):
        Trainer(TinyMLP(), regression, 3.0, quiet())
    with pytest.raises(FewflowError, match="nn.Module"):
        Trainer(lambda x, t: x, regression, data, quiet())
    with pytest.raises(FewflowError, match="scalar"):
        Trainer(
            TinyMLP(), lambda m, x1, generator=None: LossOutput(m(x1, x1[:, 0]) ** 2), data, quiet(steps=1)
        ).fit()
    with pytest.raises(FewflowError, match="unknown TrainConfig"):
        Trainer(TinyMLP(), regression, data, {"steps": 1, "sttep": 2})


# ---------------------------------------------------------------------------------------- training works
@pytest.mark.slow
def test_trainer_fits_regression_and_logs(tmp_path, data):
    res = Trainer(
        TinyMLP(hidden=32),
        regression,
        data,
        quiet(steps=300, lr=1e-2, batch_size=25, log_every=50),
        out_dir=tmp_path,
    ).fit()
    first, last = res.history[0]["loss"], res.history[-1]["loss"]
    assert res.stopped_reason == "completed" and res.step == 300
    assert last < 0.05 * first
    header = (tmp_path / "log.csv").read_text().splitlines()[0].split(",")
    assert header[:5] == ["step", "loss", "lr", "grad_norm", "steps_per_s"]
    assert [r["step"] for r in res.history] == [50, 100, 150, 200, 250, 300]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert TrainConfig.from_dict(cfg["train_config"]).steps == 300
    assert cfg["run_config"]["model"] == {"dim": 2, "hidden": 32}
    meta = cfg["run_config"]["meta"]  # what sampling needs to know about the data
    assert meta["shape"] == [2] and meta["conditional"] is False and meta["model_class"].endswith(":TinyMLP")


def test_grad_clip_bounds_update(data):
    """The logged norm is the pre-clip one; the gradients the optimiser saw have norm grad_clip."""
    m = TinyMLP()
    tr = Trainer(
        m,
        lambda mm, x1, generator=None: LossOutput(1e3 * regression(mm, x1).loss),
        data,
        quiet(steps=1, grad_clip=0.5, log_every=1),
    )
    res = tr.fit()
    assert res.history[0]["grad_norm"] > 0.5  # the logged norm is the one before clipping
    post = torch.sqrt(sum((p.grad**2).sum() for p in m.parameters()))
    assert float(post) == pytest.approx(0.5, rel=1e-4)


# ---------------------------------------------------------------------------------------- NaN guard
def test_nan_loss_stops_and_saves_last_good_state(tmp_path, data):
    calls = {"n": 0}

    def obj(model, x1, *, generator=None, **cond):
        calls["n"] += 1
        out = regression(model, x1)
        if calls["n"] == 7:
            return LossOutput(out.loss * float("nan"))
        return out

    m = TinyMLP()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = Trainer(m, obj, data, quiet(steps=20, ckpt_every=5), out_dir=tmp_path).fit()
    assert res.step == 6 and "non-finite loss" in res.stopped_reason and "step 7" in res.stopped_reason
    assert any("non-finite loss" in str(x.message) for x in w)
    assert all(torch.isfinite(p).all() for p in m.parameters())
    # latest stays at the last good checkpoint; the state that diverged is kept apart for inspection
    assert load_checkpoint(tmp_path).step == 5
    assert res.diverged == str(tmp_path / "diverged-7")
    diverged = load_file(str(tmp_path / "diverged-7" / "model.safetensors"))
    for k, v in m.state_dict().items():
        assert torch.equal(diverged[k], v)


# ---------------------------------------------------------------------------------------- exact resume
class Crash(RuntimeError):
    pass


def _resume_cfg() -> TrainConfig:
    return TrainConfig(
        steps=40,
        batch_size=16,
        lr=5e-3,
        warmup=5,
        lr_schedule="cosine",
        grad_clip=0.5,
        ema_decay=0.9,
        ckpt_every=10,
        keep_last=2,
        log_every=5,
        progress=False,
        seed=7,
        weight_decay=1e-3,
    )


def test_resume_is_bit_identical(tmp_path, data):
    torch.manual_seed(0)
    ref = Trainer(TinyMLP(), cfm, data, _resume_cfg(), out_dir=tmp_path / "ref")
    ref_res = ref.fit()

    calls = {"n": 0}

    def crashing(model, x1, **kw):
        calls["n"] += 1
        if calls["n"] == 26:
            raise Crash("killed")
        return cfm(model, x1, **kw)

    torch.manual_seed(0)
    run = tmp_path / "run"
    with pytest.raises(Crash):
        Trainer(TinyMLP(), crashing, data, _resume_cfg(), out_dir=run).fit()
    assert load_checkpoint(run).step == 20

    torch.manual_seed(123)  # a different init and global RNG state: everything must come from the checkpoint
    resumed = Trainer(TinyMLP(), cfm, data, _resume_cfg(), out_dir=run)
    res = resumed.fit(resume=True)
    assert res.step == 40
    for (k, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    for a, b in zip(ref.ema_model.state_dict().values(), resumed.ema_model.state_dict().values()):
        assert torch.equal(a, b)
    assert ref_res.last_loss == res.last_loss
    # the log continues without duplicates: rows after the checkpoint (step 25 of the killed run) are dropped
    assert [r["step"] for r in res.history] == [r["step"] for r in ref_res.history]
    assert [r["loss"] for r in res.history] == pytest.approx([r["loss"] for r in ref_res.history])
    # keep_last=2
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("ckpt-")) == ["ckpt-30", "ckpt-40"]
    # resuming a finished run does nothing
    done = Trainer(TinyMLP(), cfm, data, _resume_cfg(), out_dir=run).fit(resume=True)
    assert done.stopped_reason == "already complete" and done.step == 40


def test_fresh_run_refuses_existing_checkpoints_and_resume_without_any_starts(tmp_path, data):
    Trainer(TinyMLP(), regression, data, quiet(steps=3), out_dir=tmp_path).fit()
    with pytest.raises(FewflowError, match="already holds checkpoints"):
        Trainer(TinyMLP(), regression, data, quiet(steps=3), out_dir=tmp_path).fit()
    with pytest.warns(UserWarning, match="nothing to resume"):
        res = Trainer(TinyMLP(), regression, data, quiet(steps=3), out_dir=tmp_path / "new").fit(resume=True)
    assert res.step == 3
    with pytest.raises(FewflowError, match="out_dir"):
        Trainer(TinyMLP(), regression, data, quiet(steps=3)).fit(resume=True)


def test_resume_with_other_model_names_mismatch(tmp_path, data):
    Trainer(TinyMLP(hidden=16), regression, data, quiet(steps=2), out_dir=tmp_path).fit()
    with pytest.raises(FewflowError, match=r"shape mismatch.*net\.0\.weight"):
        Trainer(TinyMLP(hidden=8), regression, data, quiet(steps=4), out_dir=tmp_path).fit(resume=True)


# ---------------------------------------------------------------------------------------- callbacks
def test_eval_and_sample_callbacks(tmp_path, data):
    evals, samples = [], []

    def eval_fn(trainer, step):
        evals.append(step)
        trainer.ema_model.eval()
        x = data[:8]
        return {"mse": float(regression(trainer.ema_model, x).loss)}

    def sample_fn(trainer, step, out_dir):
        samples.append(step)
        (out_dir / f"s{step}.txt").write_text("ok")

    res = Trainer(
        TinyMLP(),
        regression,
        data,
        quiet(steps=10, eval_every=4, sample_every=5, ema_decay=0.9),
        out_dir=tmp_path,
        eval_fn=eval_fn,
        sample_fn=sample_fn,
    ).fit()
    assert evals == [4, 8, 10] and samples == [5, 10]
    assert [r["step"] for r in res.evals] == [4, 8, 10]
    assert (tmp_path / "eval.csv").read_text().splitlines()[0] == "step,mse"
    assert (tmp_path / "s5.txt").exists()


# ---------------------------------------------------------------------------------------- AMP / compile
def test_amp_on_cpu_warns_and_is_a_noop(data):
    torch.manual_seed(0)
    a = Trainer(TinyMLP(), cfm, data, quiet(steps=5, device="cpu"))
    a.fit()
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="amp=True is ignored"):
        b = Trainer(TinyMLP(), cfm, data, quiet(steps=5, amp=True, device="cpu"))
    b.fit()
    for x, y in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(x, y)


def test_compile_wraps_the_model_the_objective_sees(monkeypatch, tmp_path, data):
    wrapped = []

    class Compiled(nn.Module):  # what torch.compile returns: a wrapper keeping the module as _orig_mod
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

        def forward(self, *a, **k):
            return self._orig_mod(*a, **k)

    def fake_compile(m, **kw):
        wrapped.append(m)
        return Compiled(m)

    monkeypatch.setattr(torch, "compile", fake_compile)
    seen = []

    def obj(model, x1, **kw):
        seen.append(type(model).__name__)
        return regression(model, x1)

    m = TinyMLP()
    tr = Trainer(m, obj, data, quiet(steps=2, compile=True), out_dir=tmp_path)
    tr.fit()
    assert wrapped == [m] and set(seen) == {"Compiled"}
    assert set(load_checkpoint(tmp_path).model_state()) == set(m.state_dict())  # no _orig_mod. prefix


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_amp_bf16_and_compile(tmp_path, data):
    cfg = quiet(steps=50, amp=True, compile=True, device="cuda")
    tr = Trainer(TinyMLP(), cfm, data, cfg, out_dir=tmp_path)
    res = tr.fit()
    assert res.step == 50 and math.isfinite(res.last_loss)
    assert next(tr.model.parameters()).device.type == "cuda"
    res2 = Trainer(TinyMLP(), cfm, data, quiet(steps=60, amp=True, device="cuda"), out_dir=tmp_path).fit(
        resume=True
    )
    assert res2.step == 60


# ---------------------------------------------------------------------------------------- real layers
@pytest.mark.slow
def test_with_fewflow_models_objectives_and_data(tmp_path):
    models = pytest.importorskip("fewflow.models")
    objectives = pytest.importorskip("fewflow.objectives")
    paths = pytest.importorskip("fewflow.paths")
    fdata = pytest.importorskip("fewflow.data")
    from fewflow.train import load_model

    ds = fdata.load_dataset("moons", n=512, seed=0)
    model = models.MLP(2, hidden=32, depth=2)
    loss = objectives.CFMLoss(paths.AffinePath(paths.LinearSchedule()))
    cfg = TrainConfig(steps=150, batch_size=64, lr=3e-3, ema_decay=0.99, progress=False, log_every=50)
    tr = Trainer(model, loss, ds, cfg, out_dir=tmp_path)
    res = tr.fit()
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    rebuilt, run_config = load_model(tmp_path)
    assert run_config["model"] == model.config
    for a, b in zip(rebuilt.state_dict().values(), tr.ema_model.state_dict().values()):
        assert torch.equal(a, b)


def test_labels_skipped_for_unconditional_models():
    class DS:
        x = torch.randn(20, 2)
        y = torch.arange(20) % 2

    got = []

    def obj(model, x1, *, generator=None, **cond):
        got.append(sorted(cond))
        return regression(model, x1)

    m = TinyMLP()
    m.num_classes = None  # declares itself unconditional
    Trainer(m, obj, DS(), quiet(steps=1)).fit()
    Trainer(TinyMLP(), obj, DS(), quiet(steps=1)).fit()  # no declaration: labels passed
    Trainer(m, obj, DS(), quiet(steps=1), use_labels=True).fit()
    assert got == [[], ["y"], ["y"]]


def test_progress_bar_shows_loss(data, capsys):
    Trainer(TinyMLP(), regression, data, quiet(steps=4, log_every=2, progress=True)).fit()
    err = capsys.readouterr().err
    assert "loss=" in err and "4/4" in err


# ---------------------------------------------------------------------------------------- kinds of data
def _record(seen):
    def obj(model, x1, *, generator=None, **cond):
        seen.append((x1, dict(cond)))
        return regression(model, x1)

    return obj


def test_numpy_tuples_dicts_and_torch_datasets_are_data():
    """numpy arrays (float64 -> float32, integer labels -> int64), (x, y) tuples and dicts of arrays or
    tensors, map-style torch Datasets (sampled once per epoch) and DataLoaders all train."""
    import numpy as np
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data import Dataset as TorchDataset

    x64 = np.random.default_rng(0).normal(size=(40, 2))  # float64
    y = (np.arange(40) % 3).astype(np.int32)

    class Points(TorchDataset):  # items: (float64 numpy row, python int)
        def __len__(self):
            return 40

        def __getitem__(self, i):
            return x64[i], int(y[i])

    xt, yt = torch.from_numpy(x64), torch.from_numpy(y)
    for data, labels in [
        (x64, False),
        ((x64, y), True),
        ({"x": x64, "y": y}, True),
        ((xt, yt), True),  # float64 tensors take the model's dtype
        (Points(), True),
        (TensorDataset(xt.float(), yt.long()), True),
        (DataLoader(Points(), batch_size=8), True),
        (iter([x64[:8], x64[8:16]]), False),
    ]:
        seen = []
        Trainer(TinyMLP(), _record(seen), data, quiet(steps=5, batch_size=8)).fit()
        assert seen, type(data).__name__
        for x1, cond in seen:
            assert x1.dtype == torch.float32 and x1.shape[1:] == (2,), type(data).__name__
            assert ("y" in cond) == labels, type(data).__name__
            if labels:
                assert cond["y"].dtype == torch.int64
                rows = (x1.double()[:, None] - xt[None]).abs().sum(-1).argmin(1)  # the rows drawn
                assert torch.equal(cond["y"], yt[rows].long()), type(data).__name__  # labels stay aligned
    seen = []
    Trainer(TinyMLP(), _record(seen), Points(), quiet(steps=5, batch_size=8)).fit()
    epoch = torch.cat([x1 for x1, _ in seen]).double()
    assert torch.allclose(epoch.sort(0).values, xt.sort(0).values, atol=1e-6)  # each item once per epoch


def test_bad_kinds_of_data_raise_clear_errors():
    import numpy as np
    from torch.utils.data import Dataset as TorchDataset

    x = np.zeros((10, 2))

    class Words(TorchDataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return "abc"

    cases = [
        (np.zeros((10, 2), dtype=np.int64), "floating-point"),
        ((x, np.linspace(0, 1, 10)), "integer class labels"),
        ((x, np.zeros(9, dtype=np.int64)), r"shape \(10,\)"),
        ((x, None, np.zeros((7, 1))), "10 rows"),
        ({"x": x, "labels": np.zeros(10)}, "needs 'x'"),
        ((x, x, x, x), "data tuple"),
        ("points.npy", "data must be"),
        ({1, 2}, "data must be"),
        (Words(), "must hold numbers"),
    ]
    for data, match in cases:
        with pytest.raises(FewflowError, match=match):
            Trainer(TinyMLP(), regression, data, quiet(steps=1)).fit()
