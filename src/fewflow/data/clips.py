"""Moving-digit clips: a tiny video data set (8x8 digits moving on a 16x16 canvas).

Each clip holds one scikit-learn 8x8 digit that starts at a random position of a 16x16 canvas and moves by
a constant velocity ``(dy, dx) in {-1, 0, 1}^2 \\ {(0, 0)}`` pixels per frame, bouncing off the borders
(a velocity component flips when the next step would leave the canvas). Values are in ``[-1, 1]`` with
the background at ``-1`` (the digits' own scale), and the label is the digit's class. Everything is
drawn from one seeded generator, so ``moving_digit_clips(n, frames, seed)`` is deterministic.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fewflow._validate import FewflowError

__all__ = ["CANVAS", "moving_digit_clips"]

CANVAS = 16
_DIGIT = 8


def moving_digit_clips(n: int, frames: int = 4, seed: int = 0, split: str = "train") -> tuple[Tensor, Tensor]:
    """``n`` clips ``(n, frames, 1, 16, 16)`` float32 in ``[-1, 1]`` and their digit labels ``(n,)``.

    ``split`` picks the digits ("train", "test" or "all": the digits data set's split), so test clips show
    unseen digit images."""
    from fewflow.data.images import load_digits_tensors

    for name, v in (("n", n), ("frames", frames)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise FewflowError(f"{name} must be a positive integer, got {v!r}")
    digits, labels = load_digits_tensors(split)
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(0, digits.shape[0], (n,), generator=g)
    span = CANVAS - _DIGIT  # top-left corner in [0, span]
    pos = torch.randint(0, span + 1, (n, 2), generator=g)
    vel = torch.randint(0, 8, (n,), generator=g)
    moves = torch.tensor([[-1, -1], [-1, 0], [-1, 1], [0, -1], [0, 1], [1, -1], [1, 0], [1, 1]])
    vel = moves[vel].clone()
    out = torch.full((n, frames, 1, CANVAS, CANVAS), -1.0)
    for f in range(frames):
        for i in range(n):
            r, c = int(pos[i, 0]), int(pos[i, 1])
            out[i, f, 0, r:r + _DIGIT, c:c + _DIGIT] = digits[idx[i], 0]
        nxt = pos + vel
        bounce = (nxt < 0) | (nxt > span)
        vel = torch.where(bounce, -vel, vel)
        pos = pos + vel
    return out, labels[idx].clone()
