"""``fewflow bench geometry``: point clouds, populations, scene flow, optical flow and video editing.

One part per paper (see :mod:`fewflow.bench.parts`), each a module ``fewflow.bench.geo_<name>``:

* ``pufm``: PUFM++ point-cloud upsampling against midpoint interpolation (Chamfer, Hausdorff), with its
  second stage and on-manifold step ablated;
* ``mfm``: Meta Flow Matching on unseen populations against plain FM and a population-id conditional FM
  (W1 / W2 / MMD);
* ``scoop``: SCOOP scene flow (correspondences by entropic OT on learned features, then run-time refinement)
  against nearest-neighbour flow (EPE3D, accuracy, outliers);
* ``reynolds``: ReynoldsFlow (continuity equation) against Horn-Schunck under brightness change (EPE);
* ``video``: flow-conditioned video editing (FlowVid, FlowV2V) against per-frame editing and pure warping,
  with true and corrupted flows.

Writes ``geometry.{json,md,png}`` with the ``{claim, dataset, met, value}`` claims of every part.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fewflow.bench.parts import parts_main, run_parts

__all__ = ["PARTS", "main", "run"]

PARTS = ("pufm", "mfm", "scoop", "reynolds", "video")
STEM = "geometry"
TITLE = "Points, populations, motion and video"


def run(mode: str = "quick", parts: Sequence[str] = PARTS, *, cache_dir: Path | None = None,
        out_dir: Path | None = None, seed: int = 0, verbose: bool = True) -> dict[str, Any]:
    """Run the selected parts; write the tables when ``out_dir`` is set (cached parts are read back)."""
    return run_parts(STEM, "geo", PARTS, TITLE, mode, parts, cache_dir=cache_dir, out_dir=out_dir, seed=seed,
                     verbose=verbose)


def main(argv: Sequence[str] | None = None) -> int:
    """``fewflow bench geometry [--quick|--full|--smoke] [--parts pufm,mfm,...]``."""
    return parts_main(STEM, "geo", PARTS, TITLE, __doc__.split("\n\n")[0], argv)
