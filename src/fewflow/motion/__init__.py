"""Motion: synthetic videos with exact optical flow, warping, and training-free flow estimators.

- :mod:`fewflow.motion.sprites`: :func:`sprite_video`, :func:`moving_digits_video` -> :class:`SpriteVideo`.
- :mod:`fewflow.motion.warp`: :func:`warp` (backward warping), :func:`occlusion_mask`,
  :func:`endpoint_error`.
- :mod:`fewflow.motion.horn_schunck`: :func:`horn_schunck` (brightness constancy + smoothness).
- :mod:`fewflow.motion.reynolds`: :func:`reynolds_flow` (continuity equation + Poisson solve),
  :func:`reynolds_plus` (the three-channel ReynoldsFlow+ encoding), :func:`solve_poisson`.
"""

from fewflow.motion.horn_schunck import horn_schunck
from fewflow.motion.reynolds import ReynoldsFlowResult, reynolds_flow, reynolds_plus, solve_poisson
from fewflow.motion.sprites import SpriteVideo, moving_digits_video, sprite_video
from fewflow.motion.warp import endpoint_error, occlusion_mask, pixel_grid, warp

__all__ = [
    "ReynoldsFlowResult",
    "SpriteVideo",
    "endpoint_error",
    "horn_schunck",
    "moving_digits_video",
    "occlusion_mask",
    "pixel_grid",
    "reynolds_flow",
    "reynolds_plus",
    "solve_poisson",
    "sprite_video",
    "warp",
]
