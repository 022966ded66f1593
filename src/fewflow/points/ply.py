"""PLY files: read vertices (and faces) and write point clouds, in ASCII or binary little-endian.

Only the ``vertex`` x, y, z properties and the ``face`` vertex-index lists are read; other elements and
properties are skipped (their sizes are honoured). Big-endian files are refused with one clear line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fewflow._io import atomic_path
from fewflow._validate import FewflowError, check_finite

_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}


def _header(raw: bytes, path: Path) -> tuple[str, list, int]:
    end = raw.find(b"end_header")
    if not raw.startswith(b"ply") or end < 0:
        raise FewflowError(f"{path} is not a PLY file (no 'ply' magic or 'end_header')")
    body = raw.find(b"\n", end) + 1
    fmt, elements = "", []
    for line in raw[:end].decode("ascii", "replace").splitlines():
        w = line.split()
        if not w or w[0] in ("comment", "obj_info", "ply"):
            continue
        if w[0] == "format":
            fmt = w[1]
        elif w[0] == "element":
            elements.append((w[1], int(w[2]), []))
        elif w[0] == "property" and elements:
            if w[1] == "list":
                elements[-1][2].append((w[4], "list", _dtype(w[2], path), _dtype(w[3], path)))
            else:
                elements[-1][2].append((w[2], _dtype(w[1], path), None, None))
    if fmt not in ("ascii", "binary_little_endian"):
        raise FewflowError(f"{path}: PLY format {fmt!r} is not supported (ascii or binary_little_endian)")
    return fmt, elements, body


def _dtype(name: str, path: Path) -> str:
    if name not in _TYPES:
        raise FewflowError(f"{path}: unknown PLY property type {name!r}")
    return _TYPES[name]


def read_ply_mesh(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(vertices (V, 3) float64, faces (F, 3) int64)`` of a PLY file; polygons are fanned into
    triangles and ``faces`` is empty (shape ``(0, 3)``) for a point cloud."""
    path = Path(path)
    if not path.exists():
        raise FewflowError(f"PLY file {path} does not exist")
    raw = path.read_bytes()
    fmt, elements, body = _header(raw, path)
    verts, faces = None, []
    if fmt == "ascii":
        tokens = raw[body:].split()
        pos = 0
        for name, count, props in elements:
            cols: dict[str, list] = {p[0]: [] for p in props}
            for _ in range(count):
                for pname, kind, _ct, _it in props:
                    if kind == "list":
                        m = int(tokens[pos])
                        cols[pname].append([int(v) for v in tokens[pos + 1 : pos + 1 + m]])
                        pos += 1 + m
                    else:
                        cols[pname].append(float(tokens[pos]))
                        pos += 1
            verts, faces = _collect(name, cols, verts, faces)
    else:
        pos = body
        for name, count, props in elements:
            cols = {}
            if all(p[1] != "list" for p in props):
                dt = np.dtype([(p[0], "<" + p[1]) for p in props])
                arr = np.frombuffer(raw, dtype=dt, count=count, offset=pos)
                pos += dt.itemsize * count
                cols = {p[0]: arr[p[0]] for p in props}
            else:
                cols = {p[0]: [] for p in props}
                for _ in range(count):
                    for pname, kind, ct, it in props:
                        if kind == "list":
                            m = int(np.frombuffer(raw, "<" + ct, 1, pos)[0])
                            pos += np.dtype(ct).itemsize
                            cols[pname].append(np.frombuffer(raw, "<" + it, m, pos).tolist())
                            pos += np.dtype(it).itemsize * m
                        else:
                            cols[pname].append(float(np.frombuffer(raw, "<" + kind, 1, pos)[0]))
                            pos += np.dtype(kind).itemsize
            verts, faces = _collect(name, cols, verts, faces)
    if verts is None:
        raise FewflowError(f"{path} has no vertex element with x, y, z")
    f = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    return verts, f


def _collect(name: str, cols: dict, verts, faces):
    if name == "vertex":
        if not all(k in cols for k in "xyz"):
            raise FewflowError("PLY vertex element lacks x, y or z")
        verts = np.stack([np.asarray(cols[k], dtype=np.float64) for k in "xyz"], axis=1)
    elif name == "face":
        key = next((k for k in ("vertex_indices", "vertex_index") if k in cols), None)
        if key is not None:
            for poly in cols[key]:
                faces.extend([poly[0], poly[i], poly[i + 1]] for i in range(1, len(poly) - 1))
    return verts, faces


def read_ply(path: str | Path, dtype: torch.dtype = torch.float32) -> Tensor:
    """The points ``(N, 3)`` of a PLY file (its vertices; faces are ignored)."""
    v, _ = read_ply_mesh(path)
    if v.shape[0] == 0:
        raise FewflowError(f"{path} holds no points")
    return torch.from_numpy(v).to(dtype)


def write_ply(path: str | Path, points: Tensor | np.ndarray, binary: bool = True) -> Path:
    """Write a point cloud ``(N, 3)`` as PLY (binary little-endian float32 by default, else ASCII),
    atomically. Returns the path."""
    x = torch.as_tensor(points).detach()
    if x.dim() != 2 or x.shape[1] != 3 or x.shape[0] == 0:
        raise FewflowError(f"write_ply needs a non-empty (N, 3) cloud, got shape {tuple(x.shape)}")
    check_finite("points", x.float())
    arr = x.cpu().double().numpy()
    path = Path(path)
    fmt = "binary_little_endian" if binary else "ascii"
    ptype = "float" if binary else "double"
    head = (f"ply\nformat {fmt} 1.0\ncomment fewflow point cloud\nelement vertex {arr.shape[0]}\n"
            f"property {ptype} x\nproperty {ptype} y\nproperty {ptype} z\nend_header\n").encode("ascii")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(head)
            if binary:
                fh.write(arr.astype("<f4").tobytes())
            else:
                np.savetxt(fh, arr, fmt="%.17g")
    return path
