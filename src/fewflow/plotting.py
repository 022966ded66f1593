"""Figures for runs and reports: 2-D scatter, image grids, trajectories, metric-vs-NFE curves.

Everything draws with matplotlib's non-interactive ``Agg`` backend and writes a PNG file; nothing
opens a window, so the functions work on headless machines and in tests. Inputs are tensors (or
arrays) on any device; they are copied to the CPU only for drawing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from fewflow._io import atomic_path  # noqa: E402
from fewflow._validate import FewflowError  # noqa: E402

__all__ = [
    "image_grid",
    "plot_images",
    "plot_metric_vs_nfe",
    "plot_samples",
    "plot_scatter",
    "plot_scatter_panels",
    "plot_trajectories",
]


def _np(x: Tensor | np.ndarray, name: str) -> np.ndarray:
    if torch.is_tensor(x):
        return x.detach().to("cpu", torch.float64).numpy()
    if isinstance(x, np.ndarray):
        return x.astype(np.float64, copy=False)
    raise FewflowError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")


def _check_2d(x: np.ndarray, name: str) -> None:
    if x.ndim != 2 or x.shape[1] != 2:
        raise FewflowError(f"{name} must have shape (N, 2) for a scatter plot, got {tuple(x.shape)}")


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    # the temp name has no extension: name the format (the extension's, else matplotlib's default)
    fmt = path.suffix[1:] or plt.rcParams["savefig.format"]
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _limits(arrays: Sequence[np.ndarray]) -> tuple[float, float, float, float]:
    allp = np.concatenate([a[np.isfinite(a).all(1)] for a in arrays], 0)
    if len(allp) == 0:
        return -1.0, 1.0, -1.0, 1.0
    lo = np.percentile(allp, 0.5, axis=0)
    hi = np.percentile(allp, 99.5, axis=0)
    pad = 0.08 * (hi - lo) + 1e-6
    return lo[0] - pad[0], hi[0] + pad[0], lo[1] - pad[1], hi[1] + pad[1]


def plot_scatter(
    samples: Tensor | np.ndarray,
    path: str | Path,
    *,
    reference: Tensor | np.ndarray | None = None,
    title: str | None = None,
    max_points: int = 5000,
) -> Path:
    """Scatter ``(N, 2)`` samples (blue), optionally over reference data (grey); write a PNG to ``path``."""
    s = _np(samples, "samples")
    _check_2d(s, "samples")
    arrays = [s[:max_points]]
    fig, ax = plt.subplots(figsize=(4, 4))
    if reference is not None:
        r = _np(reference, "reference")
        _check_2d(r, "reference")
        ax.scatter(r[:max_points, 0], r[:max_points, 1], s=2, c="0.75", label="data", rasterized=True)
        arrays.append(r[:max_points])
    ax.scatter(s[:max_points, 0], s[:max_points, 1], s=2, c="tab:blue", label="samples", rasterized=True)
    x0, x1, y0, y1 = _limits(arrays)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_aspect("equal")
    if title:
        ax.set_title(title)
    if reference is not None:
        ax.legend(loc="upper right", markerscale=4, fontsize=7)
    return _save(fig, path)


def plot_scatter_panels(
    panels: Mapping[str, Tensor | np.ndarray],
    path: str | Path,
    *,
    reference: Tensor | np.ndarray | None = None,
    max_points: int = 3000,
    ncols: int | None = None,
) -> Path:
    """One scatter panel per entry of ``panels`` (title -> ``(N, 2)`` samples), on shared axes limits."""
    if not panels:
        raise FewflowError("plot_scatter_panels needs at least one panel")
    arrs = {k: _np(v, f"panel {k!r}")[:max_points] for k, v in panels.items()}
    for k, a in arrs.items():
        _check_2d(a, f"panel {k!r}")
    ref = None
    if reference is not None:
        ref = _np(reference, "reference")[:max_points]
        _check_2d(ref, "reference")
    ncols = ncols or min(len(arrs), 5)
    nrows = math.ceil(len(arrs) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3 * ncols, 3 * nrows), squeeze=False)
    x0, x1, y0, y1 = _limits(list(arrs.values()) + ([ref] if ref is not None else []))
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, (k, a) in zip(axes.ravel(), arrs.items()):
        ax.set_axis_on()
        if ref is not None:
            ax.scatter(ref[:, 0], ref[:, 1], s=1, c="0.8", rasterized=True)
        ax.scatter(a[:, 0], a[:, 1], s=1, c="tab:blue", rasterized=True)
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(k, fontsize=9)
    return _save(fig, path)


def image_grid(images: Tensor | np.ndarray, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile ``(N, C, H, W)`` (or ``(N, H, W)``) images into one ``(rows*H', cols*W', C)`` array.

    Values are returned unchanged (no rescaling); padding pixels take the minimum value.
    """
    a = _np(images, "images")
    if a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4:
        raise FewflowError(f"images must have shape (N, C, H, W) or (N, H, W), got {tuple(a.shape)}")
    n, c, h, w = a.shape
    if n == 0:
        raise FewflowError("images is empty")
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    ncol_rows = math.ceil(n / nrow)
    fill = float(np.nanmin(a)) if np.isfinite(a).any() else 0.0
    grid = np.full((ncol_rows * (h + pad) + pad, nrow * (w + pad) + pad, c), fill)
    for i in range(n):
        r, q = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[top : top + h, left : left + w] = a[i].transpose(1, 2, 0)
    return grid


def plot_images(
    images: Tensor | np.ndarray,
    path: str | Path,
    *,
    value_range: tuple[float, float] | None = None,
    nrow: int | None = None,
    title: str | None = None,
) -> Path:
    """Write a PNG grid of ``(N, C, H, W)`` images; ``value_range`` (lo, hi) maps to black..white."""
    grid = image_grid(images, nrow=nrow)
    if value_range is None:
        lo, hi = float(np.nanmin(grid)), float(np.nanmax(grid))
    else:
        lo, hi = map(float, value_range)
    grid = np.clip((grid - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    fig, ax = plt.subplots(figsize=(max(2.0, grid.shape[1] / 24), max(2.0, grid.shape[0] / 24)))
    if grid.shape[2] == 1:
        ax.imshow(grid[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(grid[..., :3], interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_samples(
    samples: Tensor | np.ndarray,
    path: str | Path,
    *,
    reference: Tensor | np.ndarray | None = None,
    value_range: tuple[float, float] | None = None,
    title: str | None = None,
    max_images: int = 64,
) -> Path:
    """Scatter for ``(N, 2)`` samples, image grid for ``(N, C, H, W)``; flat ``(N, D)`` with a square D
    (e.g. 64 = 8x8 digits) is drawn as images too."""
    a = samples if torch.is_tensor(samples) else torch.as_tensor(samples)
    a = a[:, :2] if a.dim() == 2 and a.shape[1] > 2 and math.isqrt(a.shape[1]) ** 2 != a.shape[1] else a
    if a.dim() == 2 and a.shape[1] == 2:
        return plot_scatter(a, path, reference=reference, title=title)
    if a.dim() == 2 and int(math.isqrt(a.shape[1])) ** 2 == a.shape[1]:
        side = math.isqrt(a.shape[1])
        a = a.reshape(a.shape[0], 1, side, side)
    if a.dim() in (3, 4):
        return plot_images(a[:max_images], path, value_range=value_range, title=title)
    raise FewflowError(f"cannot plot samples of shape {tuple(a.shape)}: expected (N, 2) or images")


def plot_trajectories(
    trajectory: Tensor | np.ndarray,
    path: str | Path,
    *,
    reference: Tensor | np.ndarray | None = None,
    n_paths: int = 200,
    title: str | None = None,
) -> Path:
    """Draw 2-D ODE paths: ``trajectory`` is ``(T, N, 2)`` (states along the time grid).

    Start points (t = 0, source) are black, end points (t = 1) red, the paths thin lines; straight
    lines mean a straight flow (few-step friendly).
    """
    tr = _np(trajectory, "trajectory")
    if tr.ndim != 3 or tr.shape[2] != 2:
        raise FewflowError(f"trajectory must have shape (T, N, 2), got {tuple(tr.shape)}")
    tr = tr[:, :n_paths]
    fig, ax = plt.subplots(figsize=(4, 4))
    if reference is not None:
        r = _np(reference, "reference")
        _check_2d(r, "reference")
        ax.scatter(r[:3000, 0], r[:3000, 1], s=1, c="0.85", rasterized=True)
    ax.plot(tr[:, :, 0], tr[:, :, 1], c="tab:olive", lw=0.5, alpha=0.6)
    ax.scatter(tr[0, :, 0], tr[0, :, 1], s=3, c="black", label="t=0 (source)")
    ax.scatter(tr[-1, :, 0], tr[-1, :, 1], s=3, c="tab:red", label="t=1 (sample)")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", markerscale=3, fontsize=7)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_metric_vs_nfe(
    curves: Mapping[str, Mapping[int, float]],
    path: str | Path,
    *,
    metric: str = "metric",
    floor: float | None = None,
    logy: bool = True,
    title: str | None = None,
) -> Path:
    """Plot ``metric`` against NFE (log2 x-axis), one line per curve (e.g. per solver),
    with the two-sample floor as a dashed horizontal line."""
    if not curves:
        raise FewflowError("plot_metric_vs_nfe needs at least one curve")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    all_y: list[float] = [] if floor is None else [float(floor)]
    for label, pts in curves.items():
        items = sorted(
            (int(k), float(v)) for k, v in pts.items() if v is not None and math.isfinite(float(v))
        )
        if not items:
            continue
        xs, ys = zip(*items)
        all_y.extend(ys)
        ax.plot(xs, ys, marker="o", label=label)
    if floor is not None and math.isfinite(floor):
        ax.axhline(floor, ls="--", c="0.4", label="two-sample floor")
    ax.set_xscale("log", base=2)
    if logy and all_y and min(all_y) > 0:  # a log axis only when every value is positive
        ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    if title:
        ax.set_title(title)
    return _save(fig, path)
