"""A folder of images (png, jpg, bmp, gif, webp) read with Pillow into one ``uint8`` tensor.

* Class subfolders become labels: the sorted subfolder names are classes ``0..K-1`` (images may sit
  deeper inside a class folder). Images directly in the folder (and no subfolders) are unlabelled; both
  at once is refused. Hidden files and folders (``.name``) and files of other types are skipped.
* Grayscale images stay one channel, colour images (RGB, RGBA, palette, CMYK) become RGB; alpha is dropped.
  When grayscale and colour images are mixed, all become RGB. 16-bit and float images are refused.
* Every image must have the same size, unless ``image_size=S``: then each is centre-cropped to a square
  and resized (bicubic) to ``S x S``.
* ``sha256`` digests the sorted relative paths and the bytes of every image, so a changed, added or
  removed image changes it.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fewflow._validate import FewflowError

__all__ = ["IMAGE_SUFFIXES", "ImageFolder", "read_image_folder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_GRAY = ("1", "L", "LA")
_COLOUR = ("RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV")


@dataclass
class ImageFolder:
    """What :func:`read_image_folder` read: pixels ``x`` (uint8 ``(N, C, H, W)``), labels ``y`` (or None),
    the class names, the files (relative paths, in the order of ``x``) and the folder's sha256."""

    x: Tensor
    y: Tensor | None
    classes: list[str] | None
    files: list[str]
    sha256: str


def _visible(p: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in p.relative_to(root).parts)


def _images_in(folder: Path, root: Path, recursive: bool) -> list[Path]:
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p for p in it if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and _visible(p, root)
    )


def _list(root: Path) -> tuple[list[Path], list[int] | None, list[str] | None]:
    top = _images_in(root, root, recursive=False)
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    per_class = [(d.name, _images_in(d, root, recursive=True)) for d in subdirs]
    nested = [c for c in per_class if c[1]]
    kinds = ", ".join(IMAGE_SUFFIXES)
    if top and nested:
        raise FewflowError(
            f"{root} holds images both at the top and in subfolders: put every image in a class "
            "subfolder (labels) or none in subfolders (no labels)"
        )
    if top:
        return top, None, None
    if not nested:
        raise FewflowError(f"no images ({kinds}) found in {root}")
    empty = [name for name, files in per_class if not files]
    if empty:
        raise FewflowError(f"class folder {root / empty[0]} holds no images ({kinds}): remove it or fill it")
    files = [f for _, fs in per_class for f in fs]
    labels = [k for k, (_, fs) in enumerate(per_class) for _ in fs]
    return files, labels, [name for name, _ in per_class]


def _resample() -> int:
    from PIL import Image

    return int(getattr(Image, "Resampling", Image).BICUBIC)


def _decode(blob: bytes, path: Path, image_size: int | None):  # -> PIL.Image.Image
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(blob))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise FewflowError(f"cannot read image {path}: {e}") from None
    if img.mode in _GRAY:
        img = img.convert("L")
    elif img.mode in _COLOUR:
        img = img.convert("RGB")
    else:
        raise FewflowError(
            f"image {path} has mode {img.mode!r} (16-bit or float pixels); save it as 8-bit grayscale or RGB"
        )
    if image_size is not None:
        w, h = img.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s)).resize((image_size, image_size), _resample())
    return img


def read_image_folder(root: str | Path, image_size: int | None = None) -> ImageFolder:
    """Read every image under ``root`` (module docstring)."""
    try:
        import PIL  # noqa: F401
    except ImportError:  # pragma: no cover - Pillow comes with matplotlib
        raise FewflowError("reading image folders needs Pillow: pip install pillow") from None
    root = Path(root)
    if not root.is_dir():
        raise FewflowError(f"image folder not found: {root}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size < 1):
        raise FewflowError(f"image_size must be a positive integer, got {image_size!r}")
    files, labels, classes = _list(root)
    digest = hashlib.sha256()
    images = []
    first: tuple[Path, tuple[int, int]] | None = None
    for path in files:
        try:
            blob = path.read_bytes()
        except OSError as e:
            raise FewflowError(f"cannot read image {path}: {e}") from None
        rel = path.relative_to(root).as_posix()
        digest.update(rel.encode() + b"\0" + hashlib.sha256(blob).digest())
        img = _decode(blob, path, image_size)
        if first is None:
            first = (path, img.size)
        elif img.size != first[1]:
            (w0, h0), (w1, h1) = first[1], img.size
            raise FewflowError(
                f"images differ in size: {first[0].relative_to(root)} is {w0}x{h0}, "
                f"{path.relative_to(root)} is {w1}x{h1}; "
                "pass --image-size S (data.kwargs.image_size) to resize them all to S x S"
            )
        images.append(img)
    colour = any(img.mode == "RGB" for img in images)
    arrays = [np.asarray(img.convert("RGB") if colour else img, dtype=np.uint8) for img in images]
    x = torch.from_numpy(np.stack(arrays))
    x = x.permute(0, 3, 1, 2) if colour else x[:, None]
    y = torch.tensor(labels, dtype=torch.int64) if labels is not None else None
    return ImageFolder(x.contiguous(), y, classes, [p.relative_to(root).as_posix() for p in files],
                       digest.hexdigest())
