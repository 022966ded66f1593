"""FlowTurbo: Heun, pseudo-corrector and velocity-refiner blocks on one uniform grid.

Paper: *FlowTurbo: Towards Real-time Flow-Based Image Generation with Velocity Refiner* (Zhao, Shi, Yu,
Zhou, Lu; NeurIPS 2024, arXiv 2409.18128; code ``shiml20/FlowTurbo``, ``FlowTurboAssemble.forward``).
Convention (same as SiT and fewflow): t = 0 noise -> t = 1 data, grid ``t_i = i / (N_H + N_P + N_R)``.
With ``h = t_{i+1} - t_i`` and predictor ``v`` (the trained velocity model):

* **Heun block** (2 predictor NFE): ``d = v(x_i, t_i)``, ``x~ = x_i + h d``, ``d' = v(x~, t_{i+1})``,
  ``x_{i+1} = x_i + h/2 (d + d')``; pass on ``c = d'`` -- the velocity at the *predicted* point ``x~``.
* **Pseudo-corrector block** (1 predictor NFE): the same update with ``d = c`` reused from the previous
  step instead of a fresh ``v(x_i, t_i)``: ``c`` is the velocity at ``x~_i``, which differs from ``x_i`` by
  Heun's O(h^3) local error, so the scheme keeps Heun's second order at half its cost.
* **Refiner block** (0 predictor NFE, 2 refiner calls): with the last velocity ``c``,
  ``d = c + r(x_i, t_i, c)``, ``x~ = x_i + h d``, ``d' = d + r(x~, t_{i+1}, d)``,
  ``x_{i+1} = x_i + h/2 (d + d')``, ``c <- d``. The refiner ``r(x, t, v_prev)`` predicts the velocity
  increment and is trained by :class:`fewflow.objectives.flowturbo_refiner.FlowTurboRefinerLoss`.
  (The released ``models_assemble.py`` feeds the old ``c`` to the second refiner call, ``integrators.py``
  feeds ``d``; we feed ``d``, which is what the refiner objective trains: ``r(x + dt v, t + dt, v)``.)

The blocks carry state from step to step (``c`` and the step index). :class:`FlowTurboStepper` is a
stateful stepper: ``step_carry(f, x, t, t_next, carry) -> (x_next, carry)``, and the shared loop
(:func:`fewflow.solvers.solve`) threads the carry explicitly, so NFE counting, trajectories, progress and
callbacks come from the one loop and the stepper object holds no per-solve state.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fewflow._validate import FewflowError, as_batch_time, check_batch, expand_like
from fewflow.solvers.grids import uniform_grid
from fewflow.solvers.steppers import Stepper

__all__ = [
    "FlowTurboCarry",
    "FlowTurboRefiner",
    "FlowTurboResult",
    "FlowTurboStepper",
    "flowturbo_sample",
]


@dataclass
class FlowTurboCarry:
    """State passed between FlowTurbo steps: the step ``index``, the last velocity ``v_cache`` (the
    velocity at the predicted point of the previous predictor step, or the last refined velocity) and the
    number of refiner calls so far."""

    index: int = 0
    v_cache: Tensor | None = None
    refiner_calls: int = 0


class FlowTurboStepper(Stepper):
    """The FlowTurbo block sequence: ``n_heun`` Heun, ``n_pseudo`` pseudo-corrector, ``n_refine`` refiner
    steps (code default of ``sample.py``: 1 / 5 / 3). ``refiner(x, t, v_prev, **cond)`` returns the velocity
    increment; it is required when ``n_refine > 0``. A stateful stepper: :func:`fewflow.solvers.solve`
    threads a :class:`FlowTurboCarry` through :meth:`step_carry` (the final carry is ``SolveResult.carry``),
    so one stepper object serves any number of solves."""

    nfe_per_step = 1
    stateful = True

    def __init__(
        self,
        n_heun: int = 1,
        n_pseudo: int = 5,
        n_refine: int = 0,
        refiner: Callable[..., Tensor] | None = None,
        refiner_cond: Mapping[str, Any] | None = None,
    ) -> None:
        for name, v in (("n_heun", n_heun), ("n_pseudo", n_pseudo), ("n_refine", n_refine)):
            if isinstance(v, bool) or int(v) != v or int(v) < 0:
                raise FewflowError(f"{name} must be a non-negative integer, got {v!r}")
        self.n_heun, self.n_pseudo, self.n_refine = int(n_heun), int(n_pseudo), int(n_refine)
        if self.steps == 0:
            raise FewflowError("FlowTurbo needs at least one step (n_heun + n_pseudo + n_refine >= 1)")
        if self.n_refine > 0 and refiner is None:
            raise FewflowError("n_refine > 0 needs a refiner (train one with FlowTurboRefinerLoss)")
        if self.n_refine > 0 and self.n_heun + self.n_pseudo == 0:
            raise FewflowError("refiner steps need a previous velocity: use n_heun + n_pseudo >= 1")
        self.refiner = refiner
        self.refiner_cond = dict(refiner_cond or {})

    @property
    def steps(self) -> int:
        return self.n_heun + self.n_pseudo + self.n_refine

    def block(self, index: int) -> str:
        """``"heun"``, ``"pseudo"`` or ``"refine"`` for step ``index``."""
        if index < self.n_heun:
            return "heun"
        if index < self.n_heun + self.n_pseudo:
            return "pseudo"
        return "refine"

    def predictor_nfe(self) -> int:
        """Predictor evaluations of the whole sequence: ``2 N_H + N_P`` (+1 if it starts with a pseudo step,
        which has no cached velocity yet)."""
        return 2 * self.n_heun + self.n_pseudo + (1 if self.n_heun == 0 and self.n_pseudo > 0 else 0)

    def init_carry(self) -> FlowTurboCarry:
        return FlowTurboCarry()

    def step_carry(
        self, f: Callable[..., Tensor], x: Tensor, t: Tensor, t_next: Tensor, carry: FlowTurboCarry
    ) -> tuple[Tensor, FlowTurboCarry]:
        """One block: returns ``(x_next, new_carry)`` (the carry is not modified in place)."""
        i = carry.index
        if i >= self.steps:
            raise FewflowError(f"FlowTurbo sequence has {self.steps} steps; step index {i} is past its end")
        h = expand_like(t_next - t, x)
        kind = self.block(i)
        if kind in ("heun", "pseudo"):
            d = f(x, t) if (kind == "heun" or carry.v_cache is None) else carry.v_cache
            d2 = f(x + h * d, t_next)
            return x + 0.5 * h * (d + d2), FlowTurboCarry(i + 1, d2, carry.refiner_calls)
        c = carry.v_cache
        if c is None:
            raise FewflowError("refiner step without a previous velocity")
        r = self.refiner
        d = c + r(x, t, c, **self.refiner_cond)
        d2 = d + r(x + h * d, t_next, d, **self.refiner_cond)
        return x + 0.5 * h * (d + d2), FlowTurboCarry(i + 1, d, carry.refiner_calls + 2)

    def __repr__(self) -> str:
        return f"FlowTurboStepper(n_heun={self.n_heun}, n_pseudo={self.n_pseudo}, n_refine={self.n_refine})"


@dataclass
class FlowTurboResult:
    """``x``: samples; ``nfe_predictor`` / ``nfe_refiner``: batched calls of each network; ``times``: the
    grid; ``trajectory``: ``(T + 1, B, ...)`` states if requested."""

    x: Tensor
    nfe_predictor: int
    nfe_refiner: int
    times: Tensor
    trajectory: Tensor | None = None


_COMPILED: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _maybe_compile(fn: Callable[..., Tensor] | None, compile: bool | str) -> Callable[..., Tensor] | None:
    """Sample-aware compilation (FlowTurbo's SAC): the block sequence is fixed, so each network is
    ``torch.compile``d once and reused (``compile=True``: default backend; a string names the backend)."""
    if fn is None or not compile:
        return fn
    if not hasattr(torch, "compile"):
        return fn
    backend = compile if isinstance(compile, str) else "inductor"
    try:
        cache = _COMPILED.setdefault(fn, {})
    except TypeError:  # not weak-referenceable: compile without caching
        return torch.compile(fn, backend=backend, dynamic=False)
    if backend not in cache:
        cache[backend] = torch.compile(fn, backend=backend, dynamic=False)
    return cache[backend]


def flowturbo_sample(
    model: Callable[..., Tensor],
    x0: Tensor,
    *,
    n_heun: int = 1,
    n_pseudo: int = 5,
    n_refine: int = 0,
    refiner: Callable[..., Tensor] | None = None,
    cond: Mapping[str, Any] | None = None,
    t0: float = 0.0,
    t1: float = 1.0,
    trajectory: bool = False,
    progress: bool = False,
    callback: Callable[[int, float, Tensor], Any] | None = None,
    compile: bool | str = False,
) -> FlowTurboResult:
    """FlowTurbo sampling from ``x0`` on a uniform grid of ``n_heun + n_pseudo + n_refine`` steps.

    ``cond`` goes to the predictor and the refiner. The predictor NFE is counted by the shared loop;
    the refiner calls separately. ``compile`` turns on ``torch.compile`` of both networks (off by default;
    worth it on GPU only). Defaults ``n_heun=1, n_pseudo=5`` follow the code's ``sample.py``
    (with ``n_refine=3`` there, once a refiner is trained).
    """
    from fewflow.solvers.loop import solve

    check_batch("x0", x0)
    seq = FlowTurboStepper(n_heun, n_pseudo, n_refine, _maybe_compile(refiner, compile), refiner_cond=cond)
    res = solve(
        _maybe_compile(model, compile), x0, grid=uniform_grid(seq.steps, t0, t1), stepper=seq, cond=cond,
        trajectory=trajectory, progress=progress, callback=callback,
    )
    return FlowTurboResult(
        x=res.x, nfe_predictor=res.nfe, nfe_refiner=res.carry.refiner_calls, times=res.times,
        trajectory=res.trajectory,
    )


class FlowTurboRefiner(nn.Module):
    """A tiny velocity refiner ``r(x, t, v_prev, y=None) -> Delta v`` (shaped like ``x``).

    ``concat(x, v_prev, phi(t) [, emb(y)]) -> depth x (Linear, SiLU) -> Linear``, with Fourier time
    features ``phi(t) = [t, cos(pi 2^j t), sin(pi 2^j t)]``. The last layer starts at zero, so an untrained
    refiner returns ``v_prev`` unchanged (``d = v_prev + 0``). Images ``(B, C, H, W)`` are flattened.
    FlowTurbo uses one DiT block of the predictor's width; at toy scale a 1-2 layer MLP suffices.
    """

    def __init__(self, dim: int, hidden: int = 64, depth: int = 2, num_frequencies: int = 3,
                 num_classes: int | None = None) -> None:
        super().__init__()
        sizes = (("dim", dim), ("hidden", hidden), ("depth", depth), ("num_frequencies", num_frequencies))
        for name, v in sizes:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise FewflowError(f"FlowTurboRefiner {name} must be a positive int, got {v!r}")
        self.dim, self.num_classes = dim, num_classes
        self.config = {"type": "FlowTurboRefiner", "dim": dim, "hidden": hidden, "depth": depth,
                       "num_frequencies": num_frequencies, "num_classes": num_classes}
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(num_frequencies, dtype=torch.float32),
                             persistent=False)
        n_in = 2 * dim + 1 + 2 * num_frequencies
        self.label_emb = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        layers: list[nn.Module] = []
        width = n_in
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor | float, v_prev: Tensor, y: Tensor | None = None) -> Tensor:
        check_batch("x", x)
        if v_prev.shape != x.shape:
            raise FewflowError(f"v_prev has shape {tuple(v_prev.shape)} but x has shape {tuple(x.shape)}")
        b = x.shape[0]
        fx, fv = x.reshape(b, -1), v_prev.reshape(b, -1)
        if fx.shape[1] != self.dim:
            raise FewflowError(f"FlowTurboRefiner expects {self.dim} features, got shape {tuple(x.shape)}")
        tb = as_batch_time(t, x)
        arg = tb[:, None] * self.freqs.to(x.dtype)[None]
        h = self.body(torch.cat([fx, fv, tb[:, None], torch.cos(arg), torch.sin(arg)], dim=1))
        if self.label_emb is not None and y is not None:
            h = h + self.label_emb(y)
        return self.out(h).reshape(x.shape)
