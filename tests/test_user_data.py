"""Data from the user: image folders, .npy / .npz / .csv files, module:function; normalisation undone by
``generate``; the run config records the source (and its sha256); bad input is one line and exit 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import assert_one_line_error, invoke

from fewflow import FewflowError
from fewflow.data import denormalize, load_dataset
from fewflow.data.normalize import apply_normalization, fit_standardize, pixel_normalization

SMALL = ["--set", "model.hidden=32", "--set", "model.depth=2", "--batch-size", "16", "--no-progress",
         "--set", "train.ckpt_every=0"]






def write_images(folder: Path, n: int, size: tuple[int, int] = (8, 8), mode: str = "RGB", base: int = 100,
                 seed: int = 0) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    chans = (3,) if mode == "RGB" else ()
    for i in range(n):
        a = np.clip(base + rng.normal(0, 20, (size[1], size[0], *chans)), 0, 255).astype(np.uint8)
        Image.fromarray(a, mode=mode).save(folder / f"img{i}.png")


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "pets"
    write_images(root / "cats", 6, base=60, seed=1)
    write_images(root / "dogs", 6, base=190, seed=2)
    return root


# --------------------------------------------------------------------------- images


def test_image_folder_loads_with_labels_and_pixels_in_minus_one_one(image_folder):
    d = load_dataset(str(image_folder))
    assert d.x.shape == (12, 3, 8, 8) and d.x.dtype == torch.float32
    assert d.y.tolist() == [0] * 6 + [1] * 6 and d.num_classes == 2
    assert d.meta["classes"] == ["cats", "dogs"]
    assert -1.0 <= float(d.x.min()) and float(d.x.max()) <= 1.0
    assert d.normalization == pixel_normalization(255.0)
    assert d.meta["source"]["kind"] == "folder" and len(d.meta["source"]["sha256"]) == 64
    from PIL import Image

    first = np.asarray(Image.open(image_folder / "cats" / "img0.png"), dtype=np.float64)  # (H, W, 3)
    back = denormalize(d.x[0], d.normalization).permute(1, 2, 0).double().numpy()
    np.testing.assert_allclose(back, first, atol=1e-3)


def test_grayscale_folder_without_classes_and_image_size(tmp_path):
    root = tmp_path / "gray"
    write_images(root, 3, size=(10, 6), mode="L")
    write_images(root / "more", 0)  # an empty subfolder beside top-level images is ignored
    (root / "notes.txt").write_text("not an image")
    from PIL import Image

    Image.fromarray(np.zeros((12, 12), np.uint8), mode="L").save(root / "big.png")
    d = load_dataset(str(root), image_size=4)
    assert d.x.shape == (4, 1, 4, 4) and d.y is None and d.num_classes is None


def test_image_folder_trains_and_samples_via_the_cli(image_folder, tmp_path):
    run = tmp_path / "r"
    r = invoke(["train", "--data", image_folder, "--steps", 20, "--out", run, *SMALL])
    assert r.exit_code == 0, r.output + r.stderr
    assert "12 RGB images 3x8x8, 2 classes" in r.stderr
    cfg = json.loads((run / "config.json").read_text())["run_config"]
    assert cfg["data"]["kind"] == "folder" and cfg["data"]["path"] == str(image_folder.resolve())
    assert len(cfg["data"]["sha256"]) == 64
    assert cfg["meta"]["normalization"]["kind"] == "pixels" and cfg["meta"]["value_range"] == [0.0, 255.0]
    assert cfg["meta"]["class_names"] == ["cats", "dogs"] and cfg["meta"]["shape"] == [3, 8, 8]
    r = invoke(["sample", run, "--nfe", 2, "--n", 8, "--out", tmp_path / "s.png"])
    assert r.exit_code == 0, r.output + r.stderr
    assert (tmp_path / "s.png").stat().st_size > 0
    r = invoke(["sample", run, "--nfe", 2, "--n", 8, "--out", tmp_path / "s.npy"])
    assert r.exit_code == 0, r.output + r.stderr
    x = np.load(tmp_path / "s.npy")
    assert x.shape == (8, 3, 8, 8) and float(x.mean()) > 20  # pixel units (0..255), not [-1, 1]


# --------------------------------------------------------------------------- arrays


def test_csv_round_trip_with_header(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.normal([3.0, -50.0, 1e3], [0.5, 2.0, 10.0], size=(64, 3))
    path = tmp_path / "pts.csv"
    path.write_text("a,b,c\n" + "\n".join(",".join(repr(float(v)) for v in row) for row in raw) + "\n\n")
    d = load_dataset(str(path))
    assert d.x.shape == (64, 3) and d.y is None
    assert torch.allclose(d.x.mean(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(d.x.std(0, unbiased=False), torch.ones(3), atol=1e-4)
    back = denormalize(d.x.double(), d.normalization).numpy()
    np.testing.assert_allclose(back, raw, rtol=1e-6, atol=1e-4)
    assert d.normalization["shift"] == pytest.approx(raw.mean(0).tolist())
    sub = load_dataset(str(path), n=10, seed=1)  # subsets keep the statistics of the whole file
    assert sub.normalization == d.normalization and len(sub) == 10


def test_npy_round_trip_vectors_and_images(tmp_path):
    raw = np.random.default_rng(1).normal(7.0, 3.0, size=(40, 5)).astype(np.float32)
    np.save(tmp_path / "v.npy", raw)
    d = load_dataset(str(tmp_path / "v.npy"))
    np.testing.assert_allclose(denormalize(d.x, d.normalization).numpy(), raw, rtol=1e-5, atol=1e-4)
    imgs = np.random.default_rng(2).integers(0, 255, size=(6, 5, 5), dtype=np.uint8)
    np.save(tmp_path / "im.npy", imgs)
    d = load_dataset(str(tmp_path / "im.npy"))
    assert d.x.shape == (6, 1, 5, 5)  # (N, H, W) -> one channel
    assert np.asarray(d.normalization["shift"]).shape == (1, 1, 1)  # per channel
    np.testing.assert_allclose(denormalize(d.x, d.normalization)[:, 0].numpy(), imgs, atol=1e-3)
    raw_units = load_dataset(str(tmp_path / "v.npy"), normalize=False)
    assert raw_units.normalization is None and torch.equal(raw_units.x, torch.from_numpy(raw))


def test_npz_with_labels_and_continuous_conditioning(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 4))
    y = rng.integers(0, 3, size=30)
    c = rng.normal(size=(30, 2))
    np.savez(tmp_path / "d.npz", x=x, y=y, c=c)
    d = load_dataset(str(tmp_path / "d.npz"))
    assert d.x.shape == (30, 4) and d.y.dtype == torch.int64 and d.y.tolist() == y.tolist()
    assert d.num_classes == int(y.max()) + 1
    assert d.c is not None and d.c.shape == (30, 2) and d.c.dtype == torch.float32
    assert torch.allclose(d.c, torch.from_numpy(c).float())  # c is kept as given
    sub = load_dataset(str(tmp_path / "d.npz"), n=7, seed=0)
    assert sub.c.shape == (7, 2) and sub.y.shape == (7,)


def test_normalization_undo_is_exact_on_known_statistics():
    x = torch.tensor([[100.0, 0.0], [110.0, 2.0], [90.0, -2.0]], dtype=torch.float64)
    rec = fit_standardize(x)
    assert rec["shift"] == pytest.approx([100.0, 0.0])
    assert rec["scale"] == pytest.approx([(200 / 3) ** 0.5, (8 / 3) ** 0.5])
    z = apply_normalization(x, rec)
    assert torch.allclose(denormalize(z, rec), x)
    assert torch.allclose(denormalize(torch.zeros(4, 2), rec), torch.tensor([100.0, 0.0]).expand(4, 2))
    traj = torch.zeros(3, 4, 2)  # a trajectory (T, N, D) broadcasts as well
    assert torch.allclose(denormalize(traj, rec)[..., 0], torch.full((3, 4), 100.0))
    const = fit_standardize(torch.ones(5, 1) * 4)  # a constant feature keeps scale 1
    assert const["scale"] == [1.0] and const["shift"] == [4.0]
    with pytest.raises(FewflowError, match="does not fit"):
        denormalize(torch.zeros(2, 3), rec)


def _write_gaussian_csv(path: Path, mean: float = 100.0, std: float = 5.0, n: int = 500) -> None:
    raw = np.random.default_rng(4).normal(mean, std, size=(n, 2))
    path.write_text("u,v\n" + "\n".join(f"{float(a)!r},{float(b)!r}" for a, b in raw) + "\n")


def test_generate_returns_the_users_units(tmp_path):
    from fewflow.runs import load_run
    from fewflow.sampling import generate

    csv = tmp_path / "pts.csv"
    _write_gaussian_csv(csv)
    run = tmp_path / "r"
    r = invoke(["train", "--data", csv, "--steps", 300, "--out", run, *SMALL[:4], "--batch-size", 128,
                "--no-progress", "--set", "train.ckpt_every=0", "--set", "train.lr=3e-3"])
    assert r.exit_code == 0, r.output + r.stderr
    r = invoke(["sample", run, "--nfe", 8, "--n", 2000, "--out", tmp_path / "s.npy"])
    assert r.exit_code == 0, r.output + r.stderr
    x = np.load(tmp_path / "s.npy")
    assert abs(float(x.mean()) - 100.0) < 1.0, x.mean(0)
    assert 3.5 < float(x.std(0).mean()) < 6.5, x.std(0)
    model, cfg = load_run(run)
    z = generate(model, cfg, 2000, nfe=8, raw=True, generator=torch.Generator().manual_seed(0)).x
    assert abs(float(z.mean())) < 0.2  # raw=True: the model's standardised units


def test_eval_reloads_the_data_and_refuses_a_changed_file(tmp_path):
    csv = tmp_path / "pts.csv"
    _write_gaussian_csv(csv, n=300)
    run = tmp_path / "r"
    assert invoke(["train", "--data", csv, "--steps", 10, "--out", run, *SMALL]).exit_code == 0
    r = invoke(["eval", run, "--nfe", "1", "--n", 100, "--json"])
    assert r.exit_code == 0, r.output + r.stderr
    report = json.loads(r.output)
    assert report["results"][0]["sliced_w2"] < 5.0  # scored in standardised units, like the reference
    with open(csv, "a") as f:
        f.write("1.0,2.0\n")
    assert_one_line_error(invoke(["eval", run, "--nfe", "1", "--n", 100]), "changed since")


# --------------------------------------------------------------------------- module:function


@pytest.fixture
def data_module(tmp_path, monkeypatch):
    pkg = tmp_path / "userdata_mod"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "make.py").write_text(
        "import numpy as np\nimport torch\n\n"
        "def pairs():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    return torch.randn(50, 3, generator=g) * 2 + 1, torch.arange(50) % 4\n\n"
        "def tensor_dataset():\n"
        "    return torch.utils.data.TensorDataset(torch.randn(20, 2), torch.arange(20) % 2)\n\n"
        "def as_dict():\n"
        "    return {'x': np.ones((10, 2)) + np.arange(10)[:, None], 'c': np.zeros((10, 3))}\n\n"
        "def broken():\n"
        "    raise RuntimeError('no data today')\n\n"
        "def strings():\n"
        "    return np.array([['a', 'b']] * 4)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "userdata_mod.make"
    for name in [m for m in sys.modules if m.startswith("userdata_mod")]:
        del sys.modules[name]


def test_data_function_returns_arrays_tensors_or_datasets(data_module, tmp_path):
    d = load_dataset(f"{data_module}:pairs")
    assert d.x.shape == (50, 3) and d.num_classes == 4 and d.meta["source"] == {
        "kind": "function", "path": f"{data_module}:pairs", "sha256": None}
    d = load_dataset(f"{data_module}:tensor_dataset")
    assert d.x.shape == (20, 2) and d.y.tolist() == [i % 2 for i in range(20)]
    d = load_dataset(f"{data_module}:as_dict")
    assert d.c.shape == (10, 3) and d.y is None
    run = tmp_path / "r"
    r = invoke(["train", "--data", f"{data_module}:pairs", "--steps", 5, "--out", run, *SMALL])
    assert r.exit_code == 0, r.output + r.stderr
    cfg = json.loads((run / "config.json").read_text())["run_config"]
    assert cfg["data"]["kind"] == "function" and cfg["data"]["path"] == f"{data_module}:pairs"
    r = invoke(["sample", run, "--nfe", 2, "--n", 8, "--out", tmp_path / "s.npy"])
    assert r.exit_code == 0, r.output + r.stderr


def test_python_api_takes_the_function_itself(data_module):
    import importlib

    from fewflow.config import DataSpec, RunConfig

    fn = importlib.import_module(data_module).pairs
    cfg = RunConfig(data=DataSpec(name=fn))
    cfg.validate()
    assert cfg.data.name == f"{data_module}:pairs"


# --------------------------------------------------------------------------- bad input


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    (tmp / "empty").mkdir()
    write_images(tmp / "mixed" / "a", 2, size=(8, 8))
    write_images(tmp / "mixed" / "b", 2, size=(16, 16))
    write_images(tmp / "emptyclass" / "a", 2)
    (tmp / "emptyclass" / "b").mkdir()
    write_images(tmp / "both", 2)
    write_images(tmp / "both" / "cls", 2)
    (tmp / "words.csv").write_text("a,b\n1,2\n3,abc\n")
    (tmp / "nan.csv").write_text("1,2\n3,nan\n")
    (tmp / "ragged.csv").write_text("1,2\n3\n")
    np.save(tmp / "inf.npy", np.array([[1.0, np.inf], [0.0, 1.0]]))
    np.save(tmp / "bool.npy", np.ones((4, 2), dtype=bool))
    np.save(tmp / "str.npy", np.array([["a", "b"]] * 3))
    np.save(tmp / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.savez(tmp / "floaty.npz", x=np.zeros((4, 2)), y=np.array([0.5, 1.0, 0.0, 1.0]))
    np.savez(tmp / "typo.npz", x=np.zeros((4, 2)), labels=np.zeros(4, dtype=int))
    np.savez(tmp / "short.npz", x=np.zeros((4, 2)), c=np.zeros((3, 2)))
    (tmp / "notes.txt").write_text("hello")
    return {
        "empty folder": (["--data", tmp / "empty"], ["no images"]),
        "mixed sizes": (["--data", tmp / "mixed"], ["differ in size", "--image-size"]),
        "empty class": (["--data", tmp / "emptyclass"], ["holds no images"]),
        "top and classes": (["--data", tmp / "both"], ["both at the top and in subfolders"]),
        "words in csv": (["--data", tmp / "words.csv"], ["line 3", "'b'", "'abc' is not a number"]),
        "nan in csv": (["--data", tmp / "nan.csv"], ["line 2", "NaN/inf"]),
        "ragged csv": (["--data", tmp / "ragged.csv"], ["line 2", "expected 2"]),
        "inf in npy": (["--data", tmp / "inf.npy"], ["non-finite", "1 inf"]),
        "bool npy": (["--data", tmp / "bool.npy"], ["booleans"]),
        "string npy": (["--data", tmp / "str.npy"], ["strings"]),
        "object npy": (["--data", tmp / "obj.npy"], ["Python objects"]),
        "float labels": (["--data", tmp / "floaty.npz"], ["integer class labels", "'c'"]),
        "npz typo": (["--data", tmp / "typo.npz"], ["unknown array 'labels'"]),
        "short c": (["--data", tmp / "short.npz"], ["one row per sample"]),
        "missing file": (["--data", tmp / "gone.csv"], ["data file not found"]),
        "other file type": (["--data", tmp / "notes.txt"], ["cannot read", ".csv"]),
        "no module": (["--data", "nosuchmodule_xyz.sub:make"], ["cannot import", "nosuchmodule_xyz"]),
        "image size on built-in": (["--data", "moons", "--image-size", "8"], ["--image-size"]),
        "image size on csv": (["--data", tmp / "nan.csv", "--image-size", "8"], ["image folders"]),
        "conditional without labels": (["--data", tmp / "inf.npy", "--conditional"], ["no labels"]),
    }


BAD_CASES = [
    "empty folder", "mixed sizes", "empty class", "top and classes", "words in csv", "nan in csv",
    "ragged csv", "inf in npy", "bool npy", "string npy", "object npy", "float labels", "npz typo",
    "short c", "missing file", "other file type", "no module", "image size on built-in",
    "image size on csv", "conditional without labels",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_data_is_one_line_and_exit_2(tmp_path, case):
    args, words = _bad_inputs(tmp_path)[case]
    if case == "conditional without labels":
        np.save(tmp_path / "inf.npy", np.zeros((4, 2)))
    r = invoke(["train", *args, "--steps", 2, "--out", tmp_path / "r", "--no-progress"])
    assert_one_line_error(r, *words)
    assert not (tmp_path / "r" / "config.json").exists()


def test_bad_data_functions(data_module, tmp_path):
    assert_one_line_error(invoke(["train", "--data", f"{data_module}:broken", "--out", tmp_path / "r"]),
                          "raised RuntimeError", "no data today")
    assert_one_line_error(invoke(["train", "--data", f"{data_module}:strings", "--out", tmp_path / "r"]),
                          "strings")
    assert_one_line_error(invoke(["train", "--data", f"{data_module}:nothing", "--out", tmp_path / "r"]),
                          "has no 'nothing'")


def test_resume_reloads_the_recorded_file(tmp_path, monkeypatch):
    csv = tmp_path / "pts.csv"
    _write_gaussian_csv(csv, n=100)
    run = tmp_path / "r"
    assert invoke(["train", "--data", csv, "--steps", 5, "--out", run, *SMALL]).exit_code == 0
    monkeypatch.chdir(run)  # the recorded absolute path does not depend on the working folder
    r = invoke(["train", "--out", run, "--resume", "--steps", 10, "--no-progress"])
    assert r.exit_code == 0, r.output + r.stderr
    csv.write_text(csv.read_text().replace("u,v", "a,b"))
    assert_one_line_error(invoke(["train", "--out", run, "--resume", "--steps", 15]), "changed since")
