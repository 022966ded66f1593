"""fewflow._io: atomic writes (no temp left, old file intact on failure), sha256_file, clean_stale_temps."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, safe_open
from torch import nn

from fewflow._io import (
    atomic_path,
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    clean_stale_temps,
    sha256_file,
)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_writes_create_parents_and_leave_no_temp(tmp_path):
    a = atomic_write_bytes(tmp_path / "sub" / "a.bin", b"\x00\x01abc")
    b = atomic_write_text(tmp_path / "sub" / "b.txt", "x\r\ny\n\u00e9")
    c = atomic_write_json(tmp_path / "sub" / "c.json", {"b": 1, "a": [1, 2]})
    assert (a, b, c) == (tmp_path / "sub" / "a.bin", tmp_path / "sub" / "b.txt", tmp_path / "sub" / "c.json")
    assert a.read_bytes() == b"\x00\x01abc"
    assert b.read_bytes() == "x\r\ny\n\u00e9".encode()  # byte for byte: no newline translation
    assert c.read_text() == json.dumps({"b": 1, "a": [1, 2]}, indent=1)
    atomic_write_text(b, "second")  # replacing an existing file
    assert b.read_text() == "second"
    assert names(tmp_path / "sub") == ["a.bin", "b.txt", "c.json"]


def test_json_handles_paths_tensors_and_non_finite_floats(tmp_path):
    obj = {
        "path": Path("/x/y"),
        "t": torch.tensor([1.0, float("nan")]),
        "n": np.array([float("inf"), 2.0]),
        "s": np.float32(0.5),
        "bad": [float("-inf"), (float("nan"), 1.5)],
    }
    p = atomic_write_json(tmp_path / "r.json", obj, indent=None, sort_keys=True)
    text = p.read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    assert json.loads(text) == {
        "bad": ["-inf", ["nan", 1.5]],
        "n": ["inf", 2.0],
        "path": "/x/y",
        "s": 0.5,
        "t": [1.0, "nan"],
    }
    assert text.startswith('{"bad"')  # sort_keys


def test_failed_json_leaves_old_file_and_no_temp(tmp_path):
    p = atomic_write_json(tmp_path / "r.json", {"ok": 1})
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        atomic_write_json(p, {"ok": 2, "bad": object()})
    assert json.loads(p.read_text()) == {"ok": 1}
    assert names(tmp_path) == ["r.json"]


def test_raise_inside_atomic_path_leaves_old_file_and_no_temp(tmp_path):
    p = atomic_write_text(tmp_path / "out.csv", "old")
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_path(p) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".out.csv.tmp-")
            tmp.write_text("half a fi")
            raise RuntimeError("midway")
    assert p.read_text() == "old"
    assert names(tmp_path) == ["out.csv"]


def test_atomic_path_for_other_writers_and_folders(tmp_path):
    arr = np.arange(5)
    with atomic_path(tmp_path / "a.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, arr)
    assert np.array_equal(np.load(tmp_path / "a.npy"), arr)
    # a folder replaces a folder (the old one is moved away and removed)
    for content in ("v1", "v2"):
        with atomic_path(tmp_path / "ckpt") as tmp:
            tmp.mkdir()
            (tmp / "f.txt").write_text(content)
    assert (tmp_path / "ckpt" / "f.txt").read_text() == "v2"
    with pytest.raises(OSError, match="disk full"):
        with atomic_path(tmp_path / "ckpt") as tmp:
            tmp.mkdir()
            (tmp / "f.txt").write_text("v3")
            raise OSError("disk full")
    assert (tmp_path / "ckpt" / "f.txt").read_text() == "v2"
    assert names(tmp_path) == ["a.npy", "ckpt"]


def test_atomic_save_safetensors(tmp_path):
    t = {"w": torch.arange(6.0).reshape(2, 3).t(), "b": torch.ones(2, requires_grad=True)}  # non-contiguous
    p = atomic_save_safetensors(tmp_path / "m.safetensors", t, metadata={"k": "v"})
    back = load_file(str(p))
    assert torch.equal(back["w"], t["w"]) and torch.equal(back["b"], t["b"].detach())
    with safe_open(str(p), framework="pt") as f:
        assert f.metadata() == {"k": "v"}
    assert names(tmp_path) == ["m.safetensors"]


def test_sha256_file_matches_hashlib(tmp_path):
    data = b"fewflow" * 1000 + bytes(range(256))
    p = atomic_write_bytes(tmp_path / "d.bin", data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()
    assert sha256_file(p, chunk=7) == hashlib.sha256(data).hexdigest()
    (tmp_path / "abc").write_bytes(b"abc")
    assert sha256_file(tmp_path / "abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_clean_stale_temps_removes_only_temps(tmp_path):
    dead, me, parent = dead_pid(), os.getpid(), os.getppid()
    stale = [
        f".a.json.tmp-{dead}-0123abcd",  # this module, killed writer
        f".b.json.tmp-{me}-0123abcd",  # this process, but not being written
        ".latest.tmp-89abcdef",  # checkpoint.py, older versions
        "pairs-00002.safetensors.tmp",  # reflow.py / boss.py / loggers.py, older versions
        "mnist.tmp.npz",  # images.py, older versions
        f"digits-0a1b.tmp{dead}.safetensors",  # features.py / bench, older versions
    ]
    stale_dirs = [f".ckpt-3.tmp-{dead}-0123abcd", ".tmp-ckpt-4-0123abcd", ".trash-ckpt-2-0123abcd"]
    keep = [
        "a.json",
        "notes.tmpl",
        ".hidden",
        "x.tmp-12",
        f".c.json.tmp-{parent}-0123abcd",  # a live writer (the parent process)
        f"bench.json.tmp{parent}",
    ]
    for n in stale + keep:
        (tmp_path / n).write_text("x")
    for n in stale_dirs + ["ckpt-1", "sub.tmp"]:
        (tmp_path / n).mkdir()
        (tmp_path / n / "f").write_text("x")
    with atomic_path(tmp_path / "d.json") as live:  # being written by this process: kept
        live.write_text("{}")
        assert clean_stale_temps(tmp_path) == len(stale) + len(stale_dirs)
        assert names(tmp_path) == sorted(keep + ["ckpt-1", "sub.tmp", live.name])
    assert clean_stale_temps(tmp_path) == 0
    assert clean_stale_temps(tmp_path / "missing") == 0


def test_clean_stale_temps_restores_a_folder_moved_to_trash(tmp_path):
    """Killed between moving the old folder away and moving the new one in: the old one comes back."""
    dead = dead_pid()
    (tmp_path / f".ckpt-5.trash-{dead}-0123abcd").mkdir()
    (tmp_path / f".ckpt-5.trash-{dead}-0123abcd" / "meta.json").write_text("old")
    (tmp_path / f".ckpt-5.tmp-{dead}-4567abcd").mkdir()
    assert clean_stale_temps(tmp_path) == 1
    assert names(tmp_path) == ["ckpt-5"] and (tmp_path / "ckpt-5" / "meta.json").read_text() == "old"


def test_save_checkpoint_cleans_stale_temps(tmp_path):
    from fewflow.train import list_checkpoints, save_checkpoint

    dead = dead_pid()
    (tmp_path / f".ckpt-1.tmp-{dead}-0123abcd").mkdir()
    (tmp_path / ".tmp-ckpt-1-0123abcd").mkdir()
    (tmp_path / f".latest.tmp-{dead}-0123abcd").write_text("ckpt-1\n")
    save_checkpoint(
        tmp_path, model=nn.Linear(2, 2), ema_model=None, optimizer=None, scheduler=None, step=2,
        run_config={}, rng_state=None,
    )  # fmt: skip
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    assert names(tmp_path) == ["ckpt-2", "config.json", "latest"]
