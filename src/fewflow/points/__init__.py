"""Point clouds: distances, kNN graphs, analytic surfaces, meshes, PLY files and resampling.

Distances (:mod:`fewflow.points.metrics`): :func:`chamfer`, :func:`hausdorff`, :func:`emd` (exact
assignment), :func:`nearest_neighbors`; graphs: :func:`knn_graph`; surfaces with exact (or numerically
exact) point-to-surface distances: :func:`sphere`, :func:`torus`, :func:`superquadric`; meshes:
:func:`fetch_meshes`, :func:`load_mesh`, :func:`sample_mesh`; files: :func:`read_ply`, :func:`write_ply`;
resampling: :func:`farthest_point_sample`, :func:`midpoint_upsample`. See docs/points.md.
"""

from __future__ import annotations

from fewflow.points.knn import knn_graph
from fewflow.points.meshes import (
    MESH_SOURCES,
    cached_meshes,
    check_mesh,
    fetch_meshes,
    load_mesh,
    normalize_cloud,
    sample_mesh,
)
from fewflow.points.metrics import chamfer, emd, emd_assignment, hausdorff, nearest_neighbors
from fewflow.points.ply import read_ply, read_ply_mesh, write_ply
from fewflow.points.surfaces import SURFACES, Sphere, Superquadric, Torus, sphere, superquadric, torus
from fewflow.points.upsample import farthest_point_sample, gather_points, midpoint_upsample

__all__ = [
    "MESH_SOURCES", "SURFACES", "Sphere", "Superquadric", "Torus", "cached_meshes", "chamfer", "check_mesh",
    "emd", "emd_assignment", "farthest_point_sample", "fetch_meshes", "gather_points", "hausdorff",
    "knn_graph", "load_mesh", "midpoint_upsample", "nearest_neighbors", "normalize_cloud", "read_ply",
    "read_ply_mesh", "sample_mesh", "sphere", "superquadric", "torus", "write_ply",
]
