"""``fewflow restore`` and ``fewflow edit``: inverse problems and class editing with a trained prior.

``restore`` degrades nothing unless asked: the ``--input`` image IS the measurement (already degraded:
the low-resolution image for ``sr2`` / ``sr4``, the blurred or noisy image for ``deblur`` / ``denoise``,
the image with its hidden region for ``inpaint``, whose hidden pixels are ignored). With ``--truth`` the
clean image is degraded here (``y = A(x) + sigma n``, seeded by ``--seed``) and the restoration is scored
against it. The solver is any registered inverse solver (:func:`fewflow.inverse.get_inverse`) with its
config's defaults, changed by ``--set FIELD=VALUE``.

``edit`` runs FlowOpt editing: keep close to the input image while the prior is conditioned on the
target class.

Both commands are collected in :data:`COMMANDS` for the ``fewflow`` group.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import click

from fewflow._validate import FewflowError, parse_value, unknown_key, unknown_name

__all__ = ["COMMANDS", "edit_cmd", "read_images", "restore_cmd", "to_uint8", "write_png"]

TASK_CHOICES = ("inpaint", "sr2", "sr4", "deblur", "denoise")
MASKS = ("box", "half", "random")


# --------------------------------------------------------------------------- image files


def _value_range(meta: dict[str, Any]) -> tuple[float, float]:
    vr = meta.get("value_range")
    return (float(vr[0]), float(vr[1])) if vr and len(vr) == 2 else (-1.0, 1.0)


def read_images(path: str | Path, channels: int, value_range: tuple[float, float] = (-1.0, 1.0)) -> Any:
    """Read ``path`` as a float32 batch ``(B, C, H, W)`` in data units.

    A ``.png`` / ``.jpg`` holds one image in ``[0, 255]``, mapped linearly onto ``value_range`` (grey for
    ``channels == 1``, RGB for 3). A ``.npy`` holds data units already: ``(H, W)`` (one channel),
    ``(C, H, W)`` or a batch ``(B, C, H, W)``. The file is only read."""
    import numpy as np
    import torch

    p = Path(path)
    if not p.is_file():
        raise FewflowError(f"no such file: {p}")
    suffix = p.suffix.lower()
    if suffix == ".npy":
        try:
            a = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise FewflowError(f"cannot read {p}: {str(exc).splitlines()[0]}") from None
        if not np.issubdtype(a.dtype, np.number):
            raise FewflowError(f"{p} holds {a.dtype} values, expected numbers")
        x = torch.from_numpy(np.array(a, dtype=np.float32))
        if x.dim() == 2:
            x = x[None, None]
        elif x.dim() == 3:
            x = x[None]
        if x.dim() != 4:
            raise FewflowError(f"{p} has shape {tuple(a.shape)}: expected (H, W), (C, H, W) or (B, C, H, W)")
    elif suffix in (".png", ".jpg", ".jpeg", ".bmp"):
        from PIL import Image, UnidentifiedImageError

        if channels not in (1, 3):
            raise FewflowError(f"{p}: picture files hold 1 or 3 channels, the prior has {channels}")
        try:
            with Image.open(p) as im:
                a = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float32)
        except (OSError, UnidentifiedImageError) as exc:
            raise FewflowError(f"cannot read the image {p}: {str(exc).splitlines()[0]}") from None
        x = torch.from_numpy(a.copy())
        x = x[None, None] if x.dim() == 2 else x.permute(2, 0, 1)[None]
        lo, hi = value_range
        x = lo + (hi - lo) * x / 255.0
    else:
        raise FewflowError(f"{p}: expected a .png, .jpg or .npy file, got {suffix or 'no suffix'!r}")
    if not bool(torch.isfinite(x).all()):
        raise FewflowError(f"{p} holds NaN or infinite values")
    return x.contiguous()


def to_uint8(x: Any, value_range: tuple[float, float] = (-1.0, 1.0)) -> Any:
    """``(C, H, W)`` data units -> ``(H, W)`` or ``(H, W, 3)`` uint8 array (clipped to the range)."""
    import torch

    lo, hi = value_range
    a = ((x.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    return a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)


def write_png(path: Path, x: Any, value_range: tuple[float, float] = (-1.0, 1.0), scale: int = 1) -> Path:
    """One image ``(C, H, W)`` as a PNG at its own size (``scale`` > 1: nearest-neighbour enlarged)."""
    from PIL import Image

    from fewflow._io import atomic_path

    im = Image.fromarray(to_uint8(x, value_range))
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    with atomic_path(Path(path)) as tmp:
        im.save(tmp, format="PNG")
    return Path(path)


def _side_by_side(path: Path, columns: list[tuple[str, Any]], value_range: tuple[float, float]) -> Path:
    """Rows = images of the batch, columns = ``(title, (B, C, H, W))`` panels, written with matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fewflow._io import atomic_path

    b = min(int(columns[0][1].shape[0]), 16)
    fig, axes = plt.subplots(b, len(columns), figsize=(1.8 * len(columns), 1.8 * b), squeeze=False)
    for j, (title, xs) in enumerate(columns):
        for i in range(b):
            ax = axes[i][j]
            a = to_uint8(xs[i], value_range)
            ax.imshow(a, cmap="gray" if a.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)


def _save_batch(out: Path, stem: str, x: Any, value_range: tuple[float, float]) -> list[str]:
    """``stem.npy`` (the batch, data units) and one PNG per image (``stem.png`` or ``stem_000.png`` ...)."""
    import numpy as np

    from fewflow._io import atomic_path

    with atomic_path(out / f"{stem}.npy") as tmp, open(tmp, "wb") as fh:
        np.save(fh, x.detach().cpu().numpy())
    names = [f"{stem}.npy"]
    for i in range(x.shape[0]):
        name = f"{stem}.png" if x.shape[0] == 1 else f"{stem}_{i:03d}.png"
        write_png(out / name, x[i], value_range)
        names.append(name)
    return names


# --------------------------------------------------------------------------- shared pieces


def _prior(run_dir: str, device: str) -> tuple[Any, Any, tuple[int, int, int]]:
    import torch

    from fewflow.runs import load_run

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, cfg = load_run(run_dir, device=device)
    shape = tuple(int(s) for s in cfg.meta.get("shape") or ())
    if len(shape) != 3:
        raise FewflowError(f"{run_dir} is a prior over data of shape {shape}, not images (C, H, W)")
    if getattr(model, "is_flow_map", False):
        raise FewflowError(f"{run_dir} holds a flow-map model; the inverse solvers need a velocity prior")
    model.requires_grad_(False)
    return model, cfg, shape  # type: ignore[return-value]


def _check_image(x: Any, want: tuple[int, ...], what: str, path: str, expects: str = "this prior") -> None:
    if tuple(x.shape[1:]) != tuple(want):
        c, h, w = want
        got = tuple(x.shape[1:])
        raise FewflowError(
            f"{what} {path} is {got[1]}x{got[2]} with {got[0]} channel(s); {expects} expects {h}x{w} "
            f"with {c} channel(s)"
        )


def _solve_and_save(spec: Any, model: Any, meas: Any, scfg: Any, gen: Any, out: str, stem: str, vr: Any,
                    columns: Any, **kw: Any) -> tuple[Any, Any, float, Path, list[str]]:
    """Run the solver, refuse non-finite output, write ``<stem>`` images and ``side_by_side.png``
    (``columns(x)`` names the panels); returns ``(result, x, wall seconds, out folder, files)``."""
    import torch

    t0 = time.perf_counter()
    res = spec.solve(model, meas, scfg, generator=gen, **kw)
    wall = time.perf_counter() - t0
    x = res.x.detach()
    if not bool(torch.isfinite(x).all()):
        raise FewflowError(f"solver {spec.name!r} returned non-finite images; try a smaller step (--set)")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = _save_batch(out_dir, stem, x, vr)
    _side_by_side(out_dir / "side_by_side.png", columns(x), vr)
    files.append("side_by_side.png")
    return res, x, wall, out_dir, files


def _solver_config(spec: Any, sets: tuple[str, ...], task: str | None = None) -> Any:
    """The solver's config (its per-task defaults when it has them, e.g. FLAIR's data-term rate for
    super-resolution) with ``--set FIELD=VALUE`` applied (``solver.FIELD`` also accepted)."""
    for_task = getattr(spec.config, "for_task", None)
    cfg = for_task(task) if (task is not None and for_task is not None) else spec.config()
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    changes: dict[str, Any] = {}
    for item in sets:
        if "=" not in item:
            raise FewflowError(f"--set expects FIELD=VALUE, got {item!r}")
        k, v = (s.strip() for s in item.split("=", 1))
        k = k.split(".", 1)[1] if k.startswith(("solver.", f"{spec.name}.")) else k
        if k not in fields:
            raise unknown_key(k, spec.name, fields)
        changes[k] = _coerce(k, parse_value(v), fields[k].type, getattr(cfg, k), v)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _coerce(key: str, val: Any, typ: Any, cur: Any, text: str) -> Any:
    """Check a ``--set`` value against the field's annotation (``bool``, ``int``, ``float``, ``str``,
    optionally ``| None``)."""
    t = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    kinds = {k.strip() for k in t.split("|")}
    if val is None:
        if "None" in kinds or cur is None:
            return None
        raise FewflowError(f"--set {key} cannot be null")
    if "bool" in kinds or isinstance(cur, bool):
        if not isinstance(val, bool):
            raise FewflowError(f"--set {key} expects true or false, got {text!r}")
        return val
    number = isinstance(val, (int, float)) and not isinstance(val, bool)
    if "int" in kinds or (isinstance(cur, int) and "float" not in kinds):
        if not (number and float(val).is_integer()):
            raise FewflowError(f"--set {key} expects an integer, got {text!r}")
        return int(val)
    if "float" in kinds or isinstance(cur, float):
        if not number or not math.isfinite(float(val)):
            raise FewflowError(f"--set {key} expects a number, got {text!r}")
        return float(val)
    return val if isinstance(val, str) or "str" not in kinds else str(val)


def _config_dict(cfg: Any) -> dict[str, Any]:
    out = {}
    for k, v in dataclasses.asdict(cfg).items():
        out[k] = v if isinstance(v, (bool, int, float, str, type(None), list, dict)) else str(v)
    return out


def _restore_cond(cfg: Any, b: int, label: int | None, device: Any) -> dict[str, Any]:
    """``y`` for a class-conditional prior: the null class (unconditional restoration) or ``--label``."""
    import torch

    meta = cfg.meta
    k = meta.get("num_classes")
    if not meta.get("conditional") or not k:
        if label is not None:
            raise FewflowError("--label needs a class-conditional prior; this run is unconditional")
        return {}
    if label is None:
        if float(cfg.objective.label_dropout) <= 0:
            raise FewflowError(
                "this class-conditional prior was trained without label dropout, so it has no unconditional "
                "mode: pass --label K"
            )
        return {"y": torch.full((b,), int(k), dtype=torch.long, device=device)}
    if not 0 <= label < int(k):
        raise FewflowError(f"--label must lie in 0..{int(k) - 1}, got {label}")
    return {"y": torch.full((b,), int(label), dtype=torch.long, device=device)}


def _heldout(cfg: Any, n: int = 256) -> Any:
    """``n`` held-out images of the run's data (the test split of digits / MNIST), in data units."""
    from fewflow.data import load_dataset

    name = cfg.data.name
    if name in ("digits", "mnist"):
        test = load_dataset(name, split="test")  # the last n: the first ones are the usual examples
        return test.x[-n:], test.y[-n:] if test.y is not None else None
    from fewflow.runs import build_data

    d = build_data(cfg, n=n, seed=int(cfg.data.seed) + 1)
    return d.x[:n], d.y[:n] if d.y is not None else None


def _classifier_for(shape: tuple[int, ...]) -> Any:
    """The digits / MNIST feature classifier when the images have its shape, else ``None``."""
    from fewflow.metrics.features import CLASSIFIER_CONFIGS, get_feature_classifier

    for name, c in CLASSIFIER_CONFIGS.items():
        if tuple(shape) == (1, c["size"], c["size"]):
            try:
                return get_feature_classifier(name)
            except (FewflowError, FileNotFoundError):
                return None
    return None


def _write_metrics(out: Path, report: dict[str, Any]) -> Path:
    from fewflow._io import atomic_write_json

    return atomic_write_json(out / "metrics.json", report, indent=2)


def _mean(v: Any) -> float:
    return float(v.double().mean()) if v.numel() else float("nan")


def _finite(v: Any) -> Any:
    """Plain-JSON numbers: ``inf`` (a perfect PSNR) and NaN as strings JSON can hold."""
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
    if isinstance(v, list):
        return [_finite(a) for a in v]
    if isinstance(v, dict):
        return {k: _finite(a) for k, a in v.items()}
    return v


# --------------------------------------------------------------------------- restore


@click.command("restore")
@click.argument("run_dir", type=click.Path())
@click.option("--task", type=click.Choice(TASK_CHOICES), required=True, help="The degradation to undo.")
@click.option(
    "--input", "input_path", type=click.Path(dir_okay=False), default=None,
    help="The degraded image (.png, or .npy: one image or a batch) = the measurement; for sr2/sr4 the "
    "low-resolution image. Not needed with --truth.",
)
@click.option(
    "--truth", "truth_path", type=click.Path(dir_okay=False), default=None,
    help="The clean image(s): degraded here to make the measurement, and used to score the result.",
)
@click.option("--method", "method", default="flair", show_default=True,
              help="Inverse solver: flair | flowopt | dps.")
@click.option("--sigma", type=float, default=0.05, show_default=True,
              help="Measurement noise std (data units).")
@click.option("--mask", type=click.Choice(MASKS), default="box", show_default=True,
              help="Inpainting mask: hide a centred box or the bottom half, or keep a random 30% of the "
              "pixels.")
@click.option("--label", type=int, default=None, help="Condition a class-conditional prior on this class.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the solver (and of the noise).")
@click.option("--set", "sets", multiple=True, metavar="FIELD=VALUE",
              help="Change a solver setting, e.g. --set hdc=false --set steps=30.")
@click.option("--out", "out", type=click.Path(file_okay=False), required=True, help="Folder to write.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if available) | cpu | cuda.")
@click.option("--threads", type=int, default=None, help="torch.set_num_threads.")
def restore_cmd(run_dir, task, input_path, truth_path, method, sigma, mask, label, seed, sets, out, device,
                threads) -> None:
    """Restore degraded images with a trained flow as the prior (inpainting, x2 / x4 super-resolution,
    deblurring, denoising).

    Writes OUT/restored.npy and PNGs, OUT/side_by_side.png (measurement, restored, truth) and
    OUT/metrics.json: PSNR / SSIM against --truth, the data residual ||A(x) - y|| beside the noise floor
    sigma sqrt(m), wall time, network evaluations and the solver settings. FLAIR's calibrated weights
    (crw) are measured on 256 held-out images of the run's data.

    \b
    Examples:
      fewflow restore runs/digits --task inpaint --truth digit.png --out restored
      fewflow restore runs/digits --task sr2 --input lowres_4x4.png --sigma 0.02 --out sr
      fewflow restore runs/digits --task inpaint --truth batch.npy --method dps --out dps
      fewflow restore runs/digits --task sr4 --truth digit.npy --set hdc=false --out no_hdc
    """
    import torch

    from fewflow.inverse import get_inverse
    from fewflow.inverse.operators import make_operator, measure
    from fewflow.metrics.image import psnr, ssim

    if threads:
        torch.set_num_threads(int(threads))
    if not (math.isfinite(sigma) and sigma >= 0):
        raise FewflowError(f"--sigma must be a number >= 0, got {sigma}")
    if input_path is None and truth_path is None:
        raise FewflowError("pass --input (the degraded image) or --truth (a clean image to degrade)")
    spec = get_inverse(method)
    if "restore" not in spec.tasks:
        from fewflow.inverse import list_inverse

        names = [s.name for s in list_inverse("restore")]
        raise unknown_name("restoration solver", method, names)
    scfg = _solver_config(spec, sets, task)
    model, cfg, shape = _prior(run_dir, device)
    dev = next(iter(model.parameters())).device
    vr = _value_range(cfg.meta)
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    op_kw: dict[str, Any] = {}
    if task == "inpaint":
        op_kw["mask"] = mask
        if mask == "random":
            op_kw["generator"] = torch.Generator().manual_seed(int(seed))
    op = make_operator(task, shape, **op_kw)
    truth = None
    if truth_path is not None:
        truth = read_images(truth_path, shape[0], vr)
        _check_image(truth, shape, "the truth image", truth_path)
        truth = truth.to(dev)
        meas = measure(truth, op, sigma, generator=gen)
        if input_path is not None:
            _say(f"note: the measurement is made from --truth {truth_path}; --input is ignored")
        shown = _display(op, meas.y, shape)
    else:
        x_in = read_images(input_path, shape[0], vr).to(dev)
        from fewflow.inverse.operators import Measurement

        if task == "inpaint":
            _check_image(x_in, shape, "the input image", input_path)
            y, shown = op(x_in), x_in
        else:
            want = tuple(op(torch.zeros(1, *shape, device=dev)).shape[1:])
            _check_image(x_in, want, "the input image", input_path,
                         expects=f"the measurement of task {task} on this prior")
            y, shown = x_in, _display(op, x_in, shape)
        meas = Measurement(y=y, op=op, sigma=float(sigma))
    b = int(meas.y.shape[0])
    cond = _restore_cond(cfg, b, label, dev)
    solve_kw: dict[str, Any] = {}
    calib_s = 0.0
    if spec.name == "flair" and bool(getattr(scfg, "crw", False)):
        from fewflow.inverse.flair import calibrate

        t0 = time.perf_counter()
        xh, yh = _heldout(cfg)
        xh = xh.to(dev)
        hcond: dict[str, Any] = {}
        if cond:
            hcond = {"y": (yh.to(dev) if label is not None and yh is not None
                           else torch.full((xh.shape[0],), int(cond["y"][0]), dtype=torch.long, device=dev))}
        solve_kw["calibration"] = calibrate(model, xh, bins=100, generator=gen, **hcond)
        calib_s = time.perf_counter() - t0
    res, x, wall, out_dir, files = _solve_and_save(
        spec, model, meas, scfg, gen, out, "restored", vr,
        lambda x: [("measurement", shown), ("restored", x)] + ([("truth", truth)] if truth is not None
                                                                else []),
        **cond, **solve_kw,
    )
    resid = meas.residual(x)
    floor = float(sigma) * math.sqrt(meas.m)
    report: dict[str, Any] = {
        "run": str(run_dir), "task": task, "solver": spec.name, "solver_config": _config_dict(scfg),
        "operator": op.describe(), "sigma": float(sigma), "m": meas.m, "images": b,
        "measurement_from": "truth" if truth is not None else "input",
        "residual": [float(r) for r in resid], "residual_mean": _mean(resid), "noise_floor": floor,
        "residual_over_floor": (_mean(resid) / floor) if floor > 0 else None,
        "nfe": int(res.nfe), "wall_s": wall, "calibration_s": calib_s, "seed": int(seed),
        "condition": None if not cond else (int(label) if label is not None else "null class"),
        "solver_meta": {k: v for k, v in res.meta.items() if isinstance(v, (bool, int, float, str))},
    }
    if truth is not None:
        p, s = psnr(x, truth, data_range=vr[1] - vr[0]), ssim(x, truth, data_range=vr[1] - vr[0])
        report.update(psnr=[float(v) for v in p], ssim=[float(v) for v in s], psnr_mean=_mean(p),
                      ssim_mean=_mean(s))
        base = _baseline(op, meas.y, shape)
        if base is not None:
            report["psnr_baseline_mean"] = _mean(psnr(base, truth, data_range=vr[1] - vr[0]))
    report["files"] = files + ["metrics.json"]
    _write_metrics(out_dir, _finite(report))
    msg = f"{spec.name} {task}: {b} image(s), residual {_mean(resid):.3g} (floor {floor:.3g}), NFE {res.nfe}"
    if truth is not None:
        msg += f", PSNR {report['psnr_mean']:.2f} dB, SSIM {report['ssim_mean']:.3f}"
    _say(f"{msg} -> {out_dir}")
    click.echo(str(out_dir))


def _display(op: Any, y: Any, shape: tuple[int, ...]) -> Any:
    """The measurement as an image of the prior's shape, for the side-by-side figure."""
    if tuple(y.shape[1:]) == tuple(shape):
        return y
    try:
        return op.pinv(y)
    except FewflowError:
        return op.adjoint(y)


def _baseline(op: Any, y: Any, shape: tuple[int, ...]) -> Any:
    """The pseudo-inverse (or the measurement itself) as a no-prior baseline, when there is one."""
    if tuple(y.shape[1:]) == tuple(shape):
        return y
    try:
        return op.pinv(y)
    except FewflowError:
        return None


def _say(msg: str) -> None:
    click.echo(msg, err=True)


# --------------------------------------------------------------------------- edit


@click.command("edit")
@click.argument("run_dir", type=click.Path())
@click.option("--input", "input_path", type=click.Path(dir_okay=False), required=True,
              help="The image(s) to edit (.png, or .npy: one image or a batch).")
@click.option("--to-class", "to_class", type=int, required=True, help="The target class.")
@click.option(
    "--from-class", "from_class", type=int, default=None,
    help="The input's class (default: predicted by the digits / MNIST classifier when the images have its "
    "shape).",
)
@click.option("--method", "method", default="flowopt", show_default=True, help="Editing solver.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the solver.")
@click.option("--set", "sets", multiple=True, metavar="FIELD=VALUE",
              help="Change a solver setting, e.g. --set iters=12.")
@click.option("--out", "out", type=click.Path(file_okay=False), required=True, help="Folder to write.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if available) | cpu | cuda.")
@click.option("--threads", type=int, default=None, help="torch.set_num_threads.")
def edit_cmd(run_dir, input_path, to_class, from_class, method, seed, sets, out, device, threads) -> None:
    """Edit images toward another class with FlowOpt: invert the input under its own class, then
    optimise the starting noise so that the sampler under the target class stays close to the input.
    Needs a class-conditional prior.

    Writes OUT/edited.npy and PNGs, OUT/side_by_side.png (input, edited) and OUT/metrics.json (distance
    to the input, the classifier's probability of the target class before and after when the images are
    digits or MNIST, wall time, network evaluations, settings).

    \b
    Examples:
      fewflow edit runs/digits --input three.png --to-class 8 --out edit
      fewflow edit runs/digits --input threes.npy --from-class 3 --to-class 8 --set iters=12 --out edit
    """
    import torch

    from fewflow.inverse import get_inverse
    from fewflow.inverse.operators import Identity, Measurement

    if threads:
        torch.set_num_threads(int(threads))
    spec = get_inverse(method)
    if "edit" not in spec.tasks:
        from fewflow.inverse import list_inverse

        raise unknown_name("editing solver", method, [s.name for s in list_inverse("edit")])
    scfg = _solver_config(spec, sets)
    model, cfg, shape = _prior(run_dir, device)
    k = cfg.meta.get("num_classes")
    if not cfg.meta.get("conditional") or not k:
        raise FewflowError(f"editing needs a class-conditional prior; {run_dir} is unconditional")
    k = int(k)
    for name, v in (("--to-class", to_class), ("--from-class", from_class)):
        if v is not None and not 0 <= v < k:
            raise FewflowError(f"{name} must lie in 0..{k - 1}, got {v}")
    dev = next(iter(model.parameters())).device
    vr = _value_range(cfg.meta)
    x_in = read_images(input_path, shape[0], vr)
    _check_image(x_in, shape, "the input image", input_path)
    x_in = x_in.to(dev)
    b = int(x_in.shape[0])
    clf = _classifier_for(shape)
    if from_class is None:
        if clf is None:
            raise FewflowError("pass --from-class J: no classifier is known for images of this shape")
        with torch.no_grad():
            src = clf.to(dev)(x_in.float()).argmax(1)
    else:
        src = torch.full((b,), int(from_class), dtype=torch.long, device=dev)
    tgt = torch.full((b,), int(to_class), dtype=torch.long, device=dev)
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    meas = Measurement(y=x_in, op=Identity(shape), sigma=0.0)
    res, x, wall, out_dir, files = _solve_and_save(
        spec, model, meas, scfg, gen, out, "edited", vr,
        lambda x: [("input", x_in), (f"edited -> {to_class}", x)], y=src, target_cond={"y": tgt},
    )
    dist = (x - x_in).flatten(1).pow(2).mean(1)
    report: dict[str, Any] = {
        "run": str(run_dir), "solver": spec.name, "solver_config": _config_dict(scfg), "images": b,
        "from_class": [int(v) for v in src], "to_class": int(to_class),
        "from_class_source": "given" if from_class is not None else "classifier",
        "mse_to_input": [float(v) for v in dist], "mse_to_input_mean": _mean(dist),
        "nfe": int(res.nfe), "wall_s": wall, "seed": int(seed),
    }
    if clf is not None:
        with torch.no_grad():
            c = clf.to(dev)
            p0 = torch.softmax(c(x_in.float()), 1)[:, int(to_class)]
            p1 = torch.softmax(c(x.float()), 1)[:, int(to_class)]
        report.update(p_target_before=_mean(p0), p_target_after=_mean(p1))
    report["files"] = files + ["metrics.json"]
    _write_metrics(out_dir, _finite(report))
    msg = f"{spec.name} edit -> class {to_class}: {b} image(s), MSE to input {_mean(dist):.3g}, NFE {res.nfe}"
    if clf is not None:
        msg += f", P(target) {report['p_target_before']:.2f} -> {report['p_target_after']:.2f}"
    _say(f"{msg} -> {out_dir}")
    click.echo(str(out_dir))


COMMANDS = [restore_cmd, edit_cmd]
