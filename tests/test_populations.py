"""Population data: synthetic letters and patients, the h5ad reader, pbmc pseudo-patients, splits, fetch."""

from __future__ import annotations

import hashlib
import zipfile

import h5py
import numpy as np
import pytest
import torch

import fewflow.data.sequences as sequences
from fewflow._validate import FewflowError
from fewflow.data import populations as P

torch.set_num_threads(1)


def test_letters_shapes_groups_and_noise_level():
    pops = P.letters(["A", "O"], rotations=3, n=400, noise=0.5, jitter=0.0, seed=1)
    assert len(pops) == 6 and pops.dim == 2 and pops.groups == ["A"] * 3 + ["O"] * 3
    # the source is the target plus 0.5 N(0, I): per-coordinate std of the difference is 0.5
    diff = torch.cat([s - t for s, t in zip(pops.sources, pops.targets)])
    assert abs(float(diff.std()) - 0.5) < 0.03 and abs(float(diff.mean())) < 0.03
    # jitter 0: an "O" is a 27-gon inscribed in a circle of radius 0.9 * scale (scale in [0.8, 1.2])
    r = pops.targets[3].norm(dim=1)
    assert float(r.min()) >= float(r.max()) * np.cos(np.pi / 27) - 1e-5
    assert 0.72 * np.cos(np.pi / 27) - 1e-5 < float(r.min()) and float(r.max()) < 1.08 + 1e-5


def test_gmm_response_is_the_composition_dependent_shift():
    pops = P.gmm_patients(patients=5, n=2000, dim=3, strength=1.5, response_noise=0.05, seed=0)
    for i, w in enumerate(pops.meta["weights"]):
        shift = (pops.targets[i] - pops.sources[i]).mean(0)
        expect = torch.tensor([0.0, 1.5 * 2 * w[0], 0.0])
        torch.testing.assert_close(shift, expect, atol=0.01, rtol=0)
        assert abs(sum(w) - 1.0) < 1e-9


def test_split_holds_out_whole_groups():
    pops = P.letters(["A", "B", "C", "D"], rotations=2, n=16, seed=0)
    tr, te = P.split_populations(pops, ["B", "D"])
    assert set(te.groups) == {"B", "D"} and set(tr.groups) == {"A", "C"}
    assert not set(tr.names) & set(te.names) and len(tr) + len(te) == len(pops)
    tr2, te2 = P.split_populations(pops, 0.5, seed=3)
    assert not set(tr2.groups) & set(te2.groups) and len(set(te2.groups)) == 2


def test_batches_pair_rows_with_their_population():
    pops = P.gmm_patients(patients=6, n=30, seed=2)
    b = next(pops.batches(populations_per_batch=4, samples_per_population=10, set_size=20,
                          generator=torch.Generator().manual_seed(0)))
    assert b["x1"].shape == (40, 2) and b["x0"].shape == (40, 2) and b["sets"].shape == (4, 20, 2)
    assert b["index"].tolist() == sum(([k] * 10 for k in range(4)), [])
    for row in range(40):
        i = int(b["pid"][b["index"][row]])
        j = int((pops.sources[i] == b["x0"][row]).all(1).nonzero()[0])
        assert torch.equal(pops.targets[i][j], b["x1"][row])
    for k in range(4):  # the set is drawn from the same population, without replacement
        src = pops.sources[int(b["pid"][k])]
        hits = [(src == p).all(1).nonzero()[0].item() for p in b["sets"][k]]
        assert len(set(hits)) == 20


def _write_old_h5ad(path, x, labels, phases):
    cats, pcats = sorted(set(labels)), sorted(set(phases))
    obs = np.zeros(len(x), dtype=[("index", "S8"), ("bulk_labels", "i1"), ("phase", "i1")])
    obs["index"] = [f"c{i}".encode() for i in range(len(x))]
    obs["bulk_labels"] = [cats.index(v) for v in labels]
    obs["phase"] = [pcats.index(v) for v in phases]
    obsm = np.zeros(len(x), dtype=[("X_pca", "<f4", (x.shape[1],))])
    obsm["X_pca"] = x
    with h5py.File(path, "w") as f:
        f["X"] = np.zeros((len(x), 3), np.float32)
        f["obs"] = obs
        f["obsm"] = obsm
        f["uns/bulk_labels_categories"] = np.array([c.encode() for c in cats])
        f["uns/phase_categories"] = np.array([c.encode() for c in pcats])


def _write_new_h5ad(path, x, labels):
    cats = sorted(set(labels))
    with h5py.File(path, "w") as f:
        f["obsm/X_pca"] = x
        f["obs/bulk_labels/codes"] = np.array([cats.index(v) for v in labels], np.int8)
        f["obs/bulk_labels/categories"] = np.array([c.encode() for c in cats])


@pytest.fixture()
def cells():
    rng = np.random.default_rng(0)
    types = ["CD14+ Monocyte", "CD19+ B", "CD56+ NK"]
    labels = [types[i % 3] for i in range(90)]
    phases = ["G1" if i % 2 else "S" for i in range(90)]
    x = rng.standard_normal((90, 12)).astype(np.float32)
    return x, labels, phases


def test_h5ad_reader_reads_both_layouts(tmp_path, cells):
    x, labels, phases = cells
    _write_old_h5ad(tmp_path / "old.h5ad", x, labels, phases)
    _write_new_h5ad(tmp_path / "new.h5ad", x, labels)
    xo, obs = P.read_h5ad_cells(tmp_path / "old.h5ad", columns=("bulk_labels", "phase"))
    np.testing.assert_array_equal(xo, x)
    assert obs["bulk_labels"] == labels and obs["phase"] == phases
    xn, obsn = P.read_h5ad_cells(tmp_path / "new.h5ad", columns=("bulk_labels",))
    np.testing.assert_array_equal(xn, x)
    assert obsn["bulk_labels"] == labels


def test_pbmc_pseudo_patients_no_leakage_and_exact_response(tmp_path, cells):
    x, labels, phases = cells
    path = tmp_path / "p.h5ad"
    _write_old_h5ad(path, x, labels, phases)
    tr, te = P.pbmc_populations(path, patients=8, n=40, dims=5, strength=1.5, seed=0)
    assert len(tr) == 6 and len(te) == 2 and tr.dim == 5
    train_cells = set(torch.cat(tr.cells).tolist())
    test_cells = set(torch.cat(te.cells).tolist())
    assert train_cells and test_cells and not train_cells & test_cells
    lab = np.asarray(labels)
    for pops in (tr, te):
        for src, tgt, rows, f in zip(pops.sources, pops.targets, pops.cells, pops.meta["fractions"]):
            frac = float(np.mean(lab[rows.numpy()] == "CD14+ Monocyte"))
            assert frac == pytest.approx(f)
            d = tgt - src
            torch.testing.assert_close(d[:, 0], torch.full((40,), 1.5 * 2 * frac), atol=1e-5, rtol=0)
            assert float(d[:, 1:].abs().max()) == 0.0
    # the points are the cells' first PCA coordinates, centred and scaled by the std of the first
    z = (x[:, :5] - x[:, :5].mean(0)) / x[:, 0].std()
    np.testing.assert_allclose(tr.sources[0].numpy(), z[tr.cells[0].numpy()], atol=1e-5)


def test_fetch_checks_sha_and_caches(tmp_path, monkeypatch):
    blob = b"fake h5ad bytes"

    def fake_wheel(req, dest):
        w = dest / "scanpy-1.11.5-py3-none-any.whl"
        with zipfile.ZipFile(w, "w") as zf:
            zf.writestr(P.PBMC_MEMBER, blob)
        return w

    monkeypatch.setattr(sequences, "_download_wheel", fake_wheel)
    with pytest.raises(FewflowError, match="sha256 mismatch"):
        P.fetch_pbmc68k(tmp_path)
    monkeypatch.setattr(P, "PBMC_SHA256", hashlib.sha256(blob).hexdigest())
    out = P.fetch_pbmc68k(tmp_path)
    assert out.read_bytes() == blob and out.with_name(out.name + ".sha256").exists()

    def no_download(req, dest):
        raise AssertionError("the cache should be reused")

    monkeypatch.setattr(sequences, "_download_wheel", no_download)
    assert P.fetch_pbmc68k(tmp_path) == out


def test_errors(tmp_path, cells):
    a = torch.zeros(4, 2)
    with pytest.raises(FewflowError, match="at least one population"):
        P.Populations([], [], [])
    with pytest.raises(FewflowError, match="paired"):
        P.Populations([a], [torch.zeros(5, 2)], ["p"])
    with pytest.raises(FewflowError, match="not finite|NaN|non-finite"):
        P.Populations([a], [torch.full((4, 2), float("nan"))], ["p"])
    with pytest.raises(FewflowError, match="unknown letters"):
        P.letters(["?"])
    with pytest.raises(FewflowError, match="unknown groups"):
        P.split_populations(P.letters(["A", "B"], rotations=1, n=4), ["C"])
    with pytest.raises(FewflowError, match="no h5ad file"):
        P.read_h5ad_cells(tmp_path / "missing.h5ad")
    x, labels, phases = cells
    _write_old_h5ad(tmp_path / "o.h5ad", x, labels, phases)
    with pytest.raises(FewflowError, match="no obs column 'louvain'"):
        P.read_h5ad_cells(tmp_path / "o.h5ad", columns=("louvain",))
    with pytest.raises(FewflowError, match="no obsm 'X_umap'"):
        P.read_h5ad_cells(tmp_path / "o.h5ad", obsm="X_umap")
    with pytest.raises(FewflowError, match="response_type"):
        P.pbmc_populations(tmp_path / "o.h5ad", response_type="Dendritic")
