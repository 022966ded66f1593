"""One-step integrators ("steppers") shared by every sampler.

A stepper advances the state from ``t`` to ``t_next`` (both ``(B,)`` tensors on the state's device and
dtype; ``t_next < t`` integrates backwards). It calls ``f(x, t)`` -- the wrapped velocity model -- or, for
flow-map steppers (``is_flow_map = True``), ``f(x, s, t)``. Grids, NFE counting, trajectories, progress
and callbacks live once in :func:`fewflow.solvers.solve`; a new stepper only implements :meth:`Stepper.step`.

``step_last`` is called by the loop for the final step of a grid; by default it is ``step``. Heun can
fall back to Euler there (EDM's Algorithm 1 does this when the last node is the singular sigma = 0 point)
and Euler-Maruyama can skip the noise there.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from fewflow._validate import FewflowError, expand_like, unknown_name

__all__ = [
    "Stepper",
    "Euler",
    "Midpoint",
    "Heun",
    "RK4",
    "FlowMapStep",
    "EulerMaruyama",
    "get_stepper",
    "register_stepper",
    "STEPPERS",
]

VelocityFn = Callable[..., Tensor]


class Stepper:
    """Base class: ``step(f, x, t, t_next, generator=None) -> x_next``.

    Attributes:
        nfe_per_step: model evaluations per (non-final) step.
        is_flow_map: True if ``f`` is a flow-map model ``u(x, s, t)`` instead of a velocity ``v(x, t)``.
        stochastic: True if the step draws noise (uses ``generator``).
    """

    nfe_per_step: int = 1
    is_flow_map: bool = False
    stochastic: bool = False
    #: a stepper that carries state from one step to the next (e.g. FlowTurbo's cached velocity) sets this and
    #: implements ``init_carry()`` and ``step_carry(f, x, t, t_next, carry) -> (x_next, carry)``; the loop
    #: threads the carry explicitly, so the stepper object itself holds no per-solve state.
    stateful: bool = False

    def init_carry(self) -> object:
        """The state before the first step (stateful steppers only)."""
        raise NotImplementedError

    def step_carry(
        self, f: VelocityFn, x: Tensor, t: Tensor, t_next: Tensor, carry: object
    ) -> tuple[Tensor, object]:
        """One step of a stateful stepper: ``(x_next, new_carry)``."""
        raise NotImplementedError

    def step(
        self, f: VelocityFn, x: Tensor, t: Tensor, t_next: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        raise NotImplementedError

    def step_last(
        self, f: VelocityFn, x: Tensor, t: Tensor, t_next: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """The final step of a grid; the same as :meth:`step` unless a subclass says otherwise."""
        return self.step(f, x, t, t_next, generator)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Euler(Stepper):
    """Explicit Euler, order 1, 1 NFE: ``x + h v(x, t)`` with ``h = t_next - t``."""

    nfe_per_step = 1

    def step(self, f, x, t, t_next, generator=None):
        return x + expand_like(t_next - t, x) * f(x, t)


class Midpoint(Stepper):
    """Explicit midpoint rule, order 2, 2 NFE: ``x + h v(x + h/2 v(x, t), t + h/2)``."""

    nfe_per_step = 2

    def step(self, f, x, t, t_next, generator=None):
        dt = t_next - t
        h = expand_like(dt, x)
        k1 = f(x, t)
        return x + h * f(x + 0.5 * h * k1, t + 0.5 * dt)


class Heun(Stepper):
    """Heun's method (explicit trapezoid), order 2, 2 NFE:
    ``x~ = x + h v(x, t)``, ``x_next = x + h/2 (v(x, t) + v(x~, t_next))``.

    ``euler_last=True`` makes the final step of a grid a plain Euler step (1 NFE), as in Karras et al.
    "Elucidating the Design Space of Diffusion-Based Generative Models" (2022, Algorithm 1): use it when
    the grid ends exactly at a point where the model is singular (e.g. t = 1 of a VP schedule).
    """

    nfe_per_step = 2

    def __init__(self, euler_last: bool = False) -> None:
        self.euler_last = bool(euler_last)

    def step(self, f, x, t, t_next, generator=None):
        h = expand_like(t_next - t, x)
        k1 = f(x, t)
        k2 = f(x + h * k1, t_next)
        return x + 0.5 * h * (k1 + k2)

    def step_last(self, f, x, t, t_next, generator=None):
        if self.euler_last:
            return x + expand_like(t_next - t, x) * f(x, t)
        return self.step(f, x, t, t_next, generator)

    def __repr__(self) -> str:
        return f"Heun(euler_last={self.euler_last})"


class RK4(Stepper):
    """Classical 4-stage Runge-Kutta, order 4, 4 NFE."""

    nfe_per_step = 4

    def step(self, f, x, t, t_next, generator=None):
        dt = t_next - t
        h = expand_like(dt, x)
        t_mid = t + 0.5 * dt
        k1 = f(x, t)
        k2 = f(x + 0.5 * h * k1, t_mid)
        k3 = f(x + 0.5 * h * k2, t_mid)
        k4 = f(x + h * k3, t_next)
        return x + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


class FlowMapStep(Stepper):
    """Flow-map jump, 1 NFE: ``x_next = x + (t_next - t) u(x, t, t_next)`` for a flow-map model ``u(x, s, t)``
    (the average velocity on [s, t]; Boffi et al. "Flow Map Matching", Geng et al. "Mean Flows for One-step
    Generative Modeling", 2025). With the exact flow map one step is exact for any step size."""

    nfe_per_step = 1
    is_flow_map = True

    def step(self, f, x, t, t_next, generator=None):
        return x + expand_like(t_next - t, x) * f(x, t, t_next)


class EulerMaruyama(Stepper):
    """Euler-Maruyama for ``dX = f(X, t) dt + g(t) dW``:
    ``x_next = x + h f(x, t) + g(t) sqrt(|h|) z``, ``z ~ N(0, I)`` from ``generator``.

    For a stochastic interpolant / flow with velocity ``b`` and score ``s`` of ``p_t`` the forward SDE with
    diffusion ``eps(t) >= 0`` is ``dX = [b + eps s] dt + sqrt(2 eps) dW`` (Albergo, Boffi & Vanden-Eijnden,
    "Stochastic Interpolants: A Unifying Framework for Flows and Diffusions", 2023); it has the same
    marginals ``p_t`` as the ODE. The caller builds the drift ``f`` (this stepper only sees ``f``) and
    passes ``diffusion = g``: a float or a function of the ``(B,)`` time returning a float or ``(B,)`` tensor.

    ``noise_last=False`` (default) takes the final step of a grid without noise (the usual
    "denoise at the end" step, returning the drift's mean).
    """

    nfe_per_step = 1
    stochastic = True

    def __init__(
        self, diffusion: float | Callable[[Tensor], Tensor | float], noise_last: bool = False
    ) -> None:
        if not callable(diffusion):
            g = float(diffusion)
            if not math.isfinite(g) or g < 0:
                raise FewflowError(
                    f"diffusion must be a non-negative number or a function of t, got {diffusion}"
                )
        self.diffusion = diffusion
        self.noise_last = bool(noise_last)

    def _g(self, t: Tensor, x: Tensor) -> Tensor | float:
        if not callable(self.diffusion):
            return float(self.diffusion)
        g = self.diffusion(t)
        if torch.is_tensor(g) and g.dim() > 0:
            return expand_like(g.reshape(x.shape[0]), x)
        return g

    def step(self, f, x, t, t_next, generator=None):
        dt = t_next - t
        h = expand_like(dt, x)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x + h * f(x, t) + self._g(t, x) * h.abs().sqrt() * noise

    def step_last(self, f, x, t, t_next, generator=None):
        if self.noise_last:
            return self.step(f, x, t, t_next, generator)
        return x + expand_like(t_next - t, x) * f(x, t)

    def __repr__(self) -> str:
        return f"EulerMaruyama(diffusion={self.diffusion!r}, noise_last={self.noise_last})"


STEPPERS: dict[str, Callable[..., Stepper]] = {
    "euler": Euler,
    "midpoint": Midpoint,
    "heun": Heun,
    "rk4": RK4,
    "flowmap": FlowMapStep,
    "flow_map": FlowMapStep,
    "euler_maruyama": EulerMaruyama,
    "em": EulerMaruyama,
}


def register_stepper(name: str, factory: Callable[..., Stepper]) -> None:
    """Add a stepper under ``name`` (other layers' samplers, e.g. FlowTurbo, register themselves)."""
    STEPPERS[name.lower()] = factory


def get_stepper(name: str | Stepper, **kwargs) -> Stepper:
    """A stepper by name ("euler", "midpoint", "heun", "rk4", "flowmap", "euler_maruyama"/"em"), passing
    ``kwargs`` to its constructor; a :class:`Stepper` instance is returned unchanged."""
    if isinstance(name, Stepper):
        return name
    if not isinstance(name, str) or name.lower() not in STEPPERS:
        raise unknown_name("stepper", str(name), STEPPERS)
    try:
        return STEPPERS[name.lower()](**kwargs)
    except TypeError as err:
        raise FewflowError(f"bad arguments for stepper {name!r}: {err}") from err
