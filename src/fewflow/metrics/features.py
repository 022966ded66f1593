"""FD-digits / FD-MNIST: Fréchet distance in the penultimate features of a small, deterministic classifier.

The Inception network of FID (Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a
Local Nash Equilibrium") is replaced by :class:`FeatureClassifier`, a small GroupNorm CNN trained on the
*train* split of the same data set with a fixed seed, one thread and a fixed number of epochs. It is
cached as ``<cache>/classifiers/<dataset>-<config hash>.safetensors`` plus a ``.json`` with its config
and test accuracy, and reloaded when present. Scores are comparable only between runs that share the
classifier (same config hash), like FID between runs that share Inception weights.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewflow._io import atomic_save_safetensors, atomic_write_json
from fewflow._validate import FewflowError, check_batch, check_finite, unknown_name
from fewflow.data import default_cache_dir, load_dataset
from fewflow.metrics.frechet import frechet_distance

CLASSIFIER_VERSION = 1
# dataset -> (image size, training recipe)
CLASSIFIER_CONFIGS: dict[str, dict[str, Any]] = {
    "digits": {"size": 8, "width": 32, "feat_dim": 64, "epochs": 10, "batch_size": 64, "lr": 3e-3,
               "seed": 0, "version": CLASSIFIER_VERSION},
    "mnist": {"size": 28, "width": 32, "feat_dim": 128, "epochs": 2, "batch_size": 128, "lr": 2e-3,
              "seed": 0, "version": CLASSIFIER_VERSION},
}
_MEMO: dict[tuple[str, str], FeatureClassifier] = {}


class FeatureClassifier(nn.Module):
    """``conv3x3 -> [GN, SiLU, conv3x3 stride 2] x 2 -> GN, SiLU -> mean -> Linear -> SiLU -> Linear``.

    ``features(x)`` returns the ``feat_dim`` penultimate activations used for the Fréchet distance.
    GroupNorm only (no BatchNorm), so outputs do not depend on the batch.
    """

    def __init__(self, in_channels: int = 1, size: int = 8, width: int = 32, feat_dim: int = 64,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.size, self.in_channels, self.num_classes = size, in_channels, num_classes
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * width), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * width), nn.SiLU(),
        )
        self.feat = nn.Linear(2 * width, feat_dim)
        self.head = nn.Linear(feat_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features ``(B, feat_dim)``."""
        return F.silu(self.feat(self.body(x).mean(dim=(2, 3))))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(B, num_classes)``."""
        return self.head(self.features(x))


@contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """Single thread, fixed RNG; restores the caller's thread count and RNG state afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)


def _config_hash(dataset: str, cfg: dict[str, Any]) -> str:
    blob = json.dumps({"dataset": dataset, **cfg}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _check_dataset(dataset: str) -> None:
    if dataset not in CLASSIFIER_CONFIGS:
        raise unknown_name("feature data set", dataset, CLASSIFIER_CONFIGS)


@torch.no_grad()
def _accuracy(model: FeatureClassifier, x: Tensor, y: Tensor, batch: int = 1000) -> float:
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    return correct / len(x)


@torch.enable_grad()  # it may be called lazily from inside a no_grad metric (classifier_predict, fd_*)
def train_feature_classifier(
    dataset: str = "digits", config: dict[str, Any] | None = None, **data_kw: Any
) -> tuple[FeatureClassifier, float]:
    """Train the feature classifier on ``dataset``'s train split; returns ``(model, test accuracy)``.

    Deterministic for a given machine: seed ``config["seed"]``, one CPU thread, Adam with a fixed
    number of epochs, shuffling from a seeded generator. ``data_kw`` go to :func:`load_dataset`
    (e.g. ``cache_dir`` for MNIST).
    """
    _check_dataset(dataset)
    cfg = dict(CLASSIFIER_CONFIGS[dataset] if config is None else config)
    train = load_dataset(dataset, split="train", **data_kw)
    test = load_dataset(dataset, split="test", **data_kw)
    assert train.y is not None and test.y is not None
    with _deterministic(int(cfg["seed"])):
        model = FeatureClassifier(1, cfg["size"], cfg["width"], cfg["feat_dim"], 10)
        opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
        gen = torch.Generator().manual_seed(int(cfg["seed"]))
        n, bs = len(train), int(cfg["batch_size"])
        steps_per_epoch = n // bs
        total = int(cfg["epochs"]) * steps_per_epoch
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg["lr"], total_steps=total)
        model.train()
        for _ in range(int(cfg["epochs"])):
            perm = torch.randperm(n, generator=gen)
            for i in range(steps_per_epoch):
                idx = perm[i * bs : (i + 1) * bs]
                loss = F.cross_entropy(model(train.x[idx]), train.y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        model.eval()
        acc = _accuracy(model, test.x, test.y)
    return model, acc


def get_feature_classifier(
    dataset: str = "digits", cache_dir: str | Path | None = None, retrain: bool = False, **data_kw: Any
) -> FeatureClassifier:
    """The cached feature classifier for ``dataset`` (trained once and saved if absent), in eval mode.

    Cache files: ``<cache_dir>/classifiers/<dataset>-<hash>.safetensors`` and ``.json`` (``cache_dir``
    defaults to ``$FEWFLOW_CACHE`` or ``~/.cache/fewflow``); the hash covers the training config.
    """
    from safetensors.torch import load_file

    _check_dataset(dataset)
    cfg = CLASSIFIER_CONFIGS[dataset]
    folder = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "classifiers"
    stem = f"{dataset}-{_config_hash(dataset, cfg)}"
    wpath, jpath = folder / f"{stem}.safetensors", folder / f"{stem}.json"
    key = (dataset, str(wpath.resolve()))
    if not retrain and key in _MEMO:
        return _MEMO[key]
    if wpath.exists() and jpath.exists() and not retrain:
        meta = json.loads(jpath.read_text())
        c = meta["config"]
        model = FeatureClassifier(1, c["size"], c["width"], c["feat_dim"], 10)
        model.load_state_dict(load_file(str(wpath)))
    else:
        if dataset == "mnist" and cache_dir is not None:
            data_kw.setdefault("cache_dir", cache_dir)
        model, acc = train_feature_classifier(dataset, cfg, **data_kw)
        # weights first: the .json marks a complete cache entry (temps are unique per writer)
        atomic_save_safetensors(wpath, model.state_dict())
        atomic_write_json(jpath, {"dataset": dataset, "config": cfg, "test_accuracy": acc}, indent=2)
    model.eval().requires_grad_(False)
    _MEMO[key] = model
    return model


def _infer_dataset(x: Tensor, dataset: str | None) -> str:
    if dataset is not None:
        _check_dataset(dataset)
        return dataset
    check_batch("samples", x, 4)
    for name, cfg in CLASSIFIER_CONFIGS.items():
        if tuple(x.shape[1:]) == (1, cfg["size"], cfg["size"]):
            return name
    raise FewflowError(f"cannot tell the data set from sample shape {tuple(x.shape)}; expected (B, 1, 8, 8) "
                       "for digits or (B, 1, 28, 28) for mnist")


@torch.no_grad()
def classifier_features(
    x: Tensor, dataset: str | None = None, classifier: FeatureClassifier | None = None, batch: int = 1000
) -> Tensor:
    """Penultimate features ``(B, feat_dim)`` of images in ``[-1, 1]`` (on ``x``'s device, float32)."""
    check_finite("samples", x)
    clf = classifier if classifier is not None else get_feature_classifier(_infer_dataset(x, dataset))
    clf = clf.to(x.device)
    if x.shape[1:] != (clf.in_channels, clf.size, clf.size):
        raise FewflowError(
            f"samples must have shape (B, {clf.in_channels}, {clf.size}, {clf.size}), got {tuple(x.shape)}"
        )
    xf = x.float()
    return torch.cat([clf.features(xf[i : i + batch]) for i in range(0, x.shape[0], batch)])


def fd_features(
    samples: Tensor, reference: Tensor | None = None, dataset: str | None = None,
    classifier: FeatureClassifier | None = None,
) -> float:
    """Fréchet distance (float64) between classifier features of ``samples`` and of ``reference``
    (default: the real test split of ``dataset``, inferred from the image size)."""
    name = _infer_dataset(samples, dataset)
    if reference is None:
        reference = load_dataset(name, split="test").x.to(samples.device)
    fa = classifier_features(samples, name, classifier)
    fb = classifier_features(reference, name, classifier)
    return frechet_distance(fa.double(), fb.double())


def fd_digits(
    samples: Tensor, reference: Tensor | None = None, classifier: FeatureClassifier | None = None
) -> float:
    """FD-digits: :func:`fd_features` on 8x8 digits (reference: the real digits test split, 359 images)."""
    return fd_features(samples, reference, "digits", classifier)


def fd_mnist(
    samples: Tensor, reference: Tensor | None = None, classifier: FeatureClassifier | None = None
) -> float:
    """FD-MNIST: :func:`fd_features` on 28x28 MNIST (reference: the cached MNIST test split, 10,000)."""
    return fd_features(samples, reference, "mnist", classifier)


@torch.no_grad()
def classifier_predict(samples: Tensor, dataset: str | None = None,
                       classifier: FeatureClassifier | None = None, batch: int = 1000) -> Tensor:
    """Predicted classes ``(B,)`` (int64, on ``samples``' device)."""
    check_finite("samples", samples)
    clf = classifier if classifier is not None else get_feature_classifier(_infer_dataset(samples, dataset))
    clf = clf.to(samples.device)
    xf = samples.float()
    return torch.cat([clf(xf[i : i + batch]).argmax(1) for i in range(0, samples.shape[0], batch)])


def classifier_accuracy(samples: Tensor, labels: Tensor, dataset: str | None = None,
                        classifier: FeatureClassifier | None = None) -> float:
    """Fraction of ``samples`` the classifier assigns to their intended ``labels`` (conditional fidelity)."""
    if labels.shape != (samples.shape[0],):
        raise FewflowError(f"labels must have shape ({samples.shape[0]},), got {tuple(labels.shape)}")
    pred = classifier_predict(samples, dataset, classifier)
    return float((pred == labels.to(pred.device)).double().mean())


def digits_classifier_accuracy(samples: Tensor, labels: Tensor) -> float:
    """:func:`classifier_accuracy` with the digits classifier (8x8 samples)."""
    return classifier_accuracy(samples, labels, dataset="digits")


def class_histogram(samples: Tensor, dataset: str | None = None,
                    classifier: FeatureClassifier | None = None) -> Tensor:
    """Counts ``(10,)`` (int64) of predicted classes: a mode-coverage / mode-collapse check."""
    pred = classifier_predict(samples, dataset, classifier)
    return torch.bincount(pred, minlength=10)
