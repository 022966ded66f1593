"""Checkpoints: flattening, safetensors + JSON round trip, atomic writes, corruption detection, load_model."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn

import fewflow.train.checkpoint as ckmod
from fewflow import FewflowError
from fewflow.train import (
    TrainConfig,
    flatten_state,
    list_checkpoints,
    load_checkpoint,
    load_model,
    load_state_into,
    make_scheduler,
    save_checkpoint,
    unflatten_state,
)
from fewflow.train.checkpoint import capture_rng_state, restore_rng_state


class Net(nn.Module):
    def __init__(self, dim: int = 3, hidden: int = 8) -> None:
        super().__init__()
        self.a = nn.Linear(dim, hidden)
        self.b = nn.Linear(hidden, dim)
        self.register_buffer("scale", torch.ones(dim))
        self.config = {"dim": dim, "hidden": hidden}

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))) * self.scale


def build(cfg: dict) -> nn.Module:
    return Net(**cfg)


def trained(steps: int = 3):
    torch.manual_seed(0)
    m = Net()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, betas=(0.8, 0.9))
    sched = make_scheduler(opt, total=10, warmup=2, schedule="cosine")
    for _ in range(steps):
        loss = m(torch.randn(4, 3)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    ema = Net()
    ema.load_state_dict({k: v * 0.5 for k, v in m.state_dict().items()})
    return m, ema, opt, sched


def save(tmp_path, step=3, keep_last=3, **kw):
    m, ema, opt, sched = trained()
    path = save_checkpoint(
        tmp_path,
        model=m,
        ema_model=ema,
        optimizer=opt,
        scheduler=sched,
        step=step,
        run_config={"model": m.config, "note": "x"},
        rng_state=capture_rng_state(),
        keep_last=keep_last,
        train_config=TrainConfig(steps=10),
        **kw,
    )
    return path, (m, ema, opt, sched)


def assert_equal_nested(a, b):
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b)
        for k in a:
            assert_equal_nested(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_equal_nested(x, y)
    else:
        assert a == b or (a != a and b != b)


def test_flatten_round_trip_preserves_structure():
    obj = {
        "state": {0: {"step": torch.tensor(3.0), "m": torch.randn(2, 2)}, 5: {"m": torch.arange(3)}},
        "groups": [{"betas": (0.9, 0.99), "params": [0, 5], "foreach": None, "lr": float("inf")}],
        "__weird": "key",
        "flag": True,
        "u8": torch.tensor([1, 2], dtype=torch.uint8),
    }
    tensors, skel = flatten_state(obj, "opt")
    json.loads(json.dumps(skel))  # the skeleton is plain JSON
    assert all(k.startswith("opt") for k in tensors)
    back = unflatten_state(json.loads(json.dumps(skel)), tensors)
    assert_equal_nested(obj, back)
    with pytest.raises(FewflowError, match="cannot save"):
        flatten_state({"f": object()})


def test_save_load_round_trip(tmp_path):
    path, (m, ema, opt, sched) = save(tmp_path)
    assert path == tmp_path / "ckpt-3"
    assert (tmp_path / "latest").read_text().strip() == "ckpt-3"
    ck = load_checkpoint(tmp_path)
    assert ck.step == 3 and ck.path == path and ck.has_ema
    assert_equal_nested(dict(m.state_dict()), ck.model_state())
    assert_equal_nested(dict(ema.state_dict()), ck.ema_state())
    assert_equal_nested(opt.state_dict(), ck.state("optimizer"))
    assert_equal_nested(sched.state_dict(), ck.state("scheduler"))
    # the restored optimiser continues exactly like the original
    m2, _, opt2, sched2 = Net(), None, None, None
    load_state_into(m2, ck.model_state())
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-2, betas=(0.8, 0.9))
    sched2 = make_scheduler(opt2, total=10, warmup=2, schedule="cosine")
    opt2.load_state_dict(ck.state("optimizer"))
    sched2.load_state_dict(ck.state("scheduler"))
    x = torch.randn(4, 3)
    for mm, oo, ss in ((m, opt, sched), (m2, opt2, sched2)):
        oo.zero_grad()
        mm(x).pow(2).mean().backward()
        oo.step()
        ss.step()
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["run_config"]["note"] == "x"
    assert TrainConfig.from_dict(cfg["train_config"]) == TrainConfig(steps=10)
    assert load_checkpoint(path).step == 3 and load_checkpoint(path / "meta.json").step == 3


def test_rng_state_round_trip():
    state = capture_rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    tensors, skel = flatten_state(state, "rng")
    restore_rng_state(unflatten_state(json.loads(json.dumps(skel)), tensors))
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert state["torch"].dtype == torch.uint8


def test_keep_last_and_latest(tmp_path):
    for step in (1, 2, 3, 4, 5):
        save(tmp_path, step=step, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    assert load_checkpoint(tmp_path).step == 5
    save(tmp_path, step=5, keep_last=2)  # re-saving a step replaces it
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    (tmp_path / "latest").write_text("ckpt-4\n")
    assert load_checkpoint(tmp_path).step == 4  # the pointer wins over the highest number
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _flip_byte(path, offset_from_end=20):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage", ["flip_model", "flip_ema", "truncate", "missing", "meta_edit", "meta_garbage"]
)
def test_corrupt_checkpoint_raises(tmp_path, damage):
    path, _ = save(tmp_path)
    if damage == "flip_model":
        _flip_byte(path / "model.safetensors")
    elif damage == "flip_ema":
        _flip_byte(path / "ema.safetensors", 3)
    elif damage == "truncate":
        p = path / "train_state.safetensors"
        p.write_bytes(p.read_bytes()[:-17])
    elif damage == "missing":
        (path / "model.safetensors").unlink()
    elif damage == "meta_edit":
        meta = json.loads((path / "meta.json").read_text())
        meta["step"] = 4
        (path / "meta.json").write_text(json.dumps(meta))
    else:
        (path / "meta.json").write_text('{"format": "fewflow-chec')
    with pytest.raises(FewflowError, match=r"checkpoint .*ckpt-3 is corrupt: "):
        load_checkpoint(tmp_path)


def test_loading_never_unpickles(tmp_path, monkeypatch):
    save(tmp_path)

    def boom(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(torch, "load", boom)
    assert load_checkpoint(tmp_path).step == 3
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.pkl"))


def test_crash_during_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    save(tmp_path, step=1)
    real = ckmod.save_file
    calls = {"n": 0}

    def failing(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ckmod, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, step=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert (tmp_path / "latest").read_text().strip() == "ckpt-1"
    assert load_checkpoint(tmp_path).step == 1
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # the half-written folder is gone


def test_mismatched_model_is_named(tmp_path):
    save(tmp_path)
    ck = load_checkpoint(tmp_path)
    with pytest.raises(
        FewflowError, match=r"shape mismatch a\.weight: checkpoint \(8, 3\) vs model \(5, 3\)"
    ):
        load_state_into(Net(hidden=5), ck.model_state())

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Linear(3, 3)

    with pytest.raises(FewflowError, match=r"missing keys \['c\.bias', 'c\.weight'\].*unexpected keys"):
        load_state_into(Other(), ck.model_state())


def test_load_model(tmp_path):
    _, (m, ema, _, _) = save(tmp_path)
    model_e, run_config = load_model(tmp_path, build_model=build)
    assert run_config["model"] == m.config and not model_e.training
    assert_equal_nested(dict(ema.state_dict()), dict(model_e.state_dict()))
    model_m, _ = load_model(tmp_path, which="model", build_model=build)
    assert_equal_nested(dict(m.state_dict()), dict(model_m.state_dict()))
    with pytest.raises(FewflowError, match="which"):
        load_model(tmp_path, which="best", build_model=build)
    with pytest.raises(FewflowError, match="shape mismatch"):
        load_model(tmp_path, build_model=lambda cfg: Net(dim=3, hidden=4))
    with pytest.raises(FewflowError, match="no checkpoint"):
        load_model(tmp_path / "nope", build_model=build)


def test_load_model_without_ema_or_model_config(tmp_path):
    m = Net()
    save_checkpoint(
        tmp_path / "a",
        model=m,
        ema_model=None,
        optimizer=None,
        scheduler=None,
        step=0,
        run_config={"model": m.config},
        rng_state=None,
    )
    with pytest.warns(UserWarning, match="no EMA"):
        got, _ = load_model(tmp_path / "a", build_model=build)
    assert_equal_nested(dict(m.state_dict()), dict(got.state_dict()))
    save_checkpoint(
        tmp_path / "b",
        model=m,
        ema_model=None,
        optimizer=None,
        scheduler=None,
        step=0,
        run_config={},
        rng_state=None,
    )
    with pytest.raises(FewflowError, match="no 'model' dict"):
        load_model(tmp_path / "b", build_model=build)


def test_load_model_with_fewflow_build_model(tmp_path):
    models = pytest.importorskip("fewflow.models")
    m = models.MLP(2, hidden=16, depth=2)
    save_checkpoint(
        tmp_path,
        model=m,
        ema_model=m,
        optimizer=None,
        scheduler=None,
        step=1,
        run_config={"model": m.config},
        rng_state=None,
    )
    got, _ = load_model(tmp_path)
    x, t = torch.randn(4, 2), torch.rand(4)
    assert torch.equal(got(x, t), m.eval()(x, t))
