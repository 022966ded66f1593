"""A bridge to Hugging Face diffusers (optional: ``pip install 'fewflow[diffusers]'``).

Conventions. fewflow's linear path is ``x_t = (1 - t) x0 + t x1`` with t = 0 noise, t = 1 data and the
velocity ``v = x1 - x0`` (data - noise). diffusers' flow-matching models and
``FlowMatchEulerDiscreteScheduler`` use the noise level ``sigma = 1 - t`` (sigma = 1 is noise), the
timestep ``sigma * 1000``, and a model output ``noise - data = -v``; its Euler step is
``x <- x + (sigma_next - sigma) * model_output``.

* :func:`to_diffusers_sigmas` / :func:`from_diffusers_sigmas` convert fewflow time grids (uniform, shift,
  edm, logsnr, BOSS) to diffusers sigmas and back;
* ``FewflowScheduler`` is a diffusers scheduler (``SchedulerMixin`` + ``ConfigMixin``) that steps on fewflow
  grids with fewflow's Euler, Heun or midpoint stepper inside an ordinary diffusers sampling loop;
* :class:`DiffusersVelocity` wraps a diffusers model (``UNet2DModel``, ``UNet2DConditionModel``, a
  transformer) as a fewflow velocity model ``v(x, t, **cond)`` that fewflow's solvers sample and its
  trainer trains.

diffusers is imported only when a scheduler is built; everything else here works without it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fewflow._validate import FewflowError, as_batch_time, unknown_name
from fewflow.solvers.grids import as_grid, get_grid

__all__ = [
    "to_diffusers_sigmas",
    "from_diffusers_sigmas",
    "FewflowScheduler",  # noqa: F822 (built on first access by the module __getattr__)
    "DiffusersVelocity",
    "require_diffusers",
    "SCHEDULER_STEPPERS",
]

#: steppers the scheduler runs: name -> model calls per grid interval
SCHEDULER_STEPPERS = {"euler": 1, "heun": 2, "midpoint": 2}
#: diffusers' flow-matching timestep is ``sigma * TIMESTEP_SCALE``
TIMESTEP_SCALE = 1000.0
_INSTALL = "pip install 'fewflow[diffusers]'"


def require_diffusers() -> Any:
    """Import and return ``diffusers``, or raise :class:`FewflowError` saying how to install it."""
    try:
        import diffusers
    except ImportError as err:
        raise FewflowError(
            f"fewflow.interop.diffusers needs Hugging Face diffusers, which is not installed: {_INSTALL}"
        ) from err
    return diffusers


# ---------------------------------------------------------------------------------------------- sigmas
def to_diffusers_sigmas(grid: Sequence[float] | Tensor) -> list[float]:
    """A fewflow sampling grid (increasing from ``t0`` to ``t1 = 1``) as diffusers sigmas ``1 - t``.

    The terminal node ``t = 1`` (``sigma = 0``) is left out: diffusers' flow schedulers append their own
    terminal sigma 0. The result has one sigma per step and goes to ``set_timesteps(sigmas=...)`` of
    ``FlowMatchEulerDiscreteScheduler`` or a pipeline's ``sigmas=`` argument.

    No shift is applied: a shifted (or BOSS, EDM, ...) grid already holds its nodes, so a stock scheduler
    must be created with ``shift=1.0`` and ``use_dynamic_shifting=False`` (and no Karras/exponential/beta
    sigmas), otherwise it shifts the nodes a second time. The values are Python floats (float64); the stock
    scheduler stores them as float32.
    """
    g = as_grid(grid)
    if float(g[-1]) <= float(g[0]):
        raise FewflowError("to_diffusers_sigmas needs an increasing (sampling) grid, noise -> data")
    if float(g[-1]) != 1.0:
        raise FewflowError(
            f"the grid must end at t = 1 (diffusers always ends at sigma = 0), it ends at {float(g[-1])}"
        )
    return [1.0 - v for v in g[:-1].tolist()]


def from_diffusers_sigmas(sigmas: Sequence[float] | Tensor) -> Tensor:
    """The inverse of :func:`to_diffusers_sigmas`: fewflow times ``t = 1 - sigma`` as a float64 grid.

    A trailing terminal ``sigma = 0`` (as in a scheduler's ``sigmas`` attribute) is accepted; without it
    the node ``t = 1`` is appended. Sigmas must decrease strictly (noise -> data) inside ``[0, 1]``.
    """
    if torch.is_tensor(sigmas):
        vals = [float(v) for v in sigmas.detach().to("cpu", torch.float64).reshape(-1).tolist()]
    else:
        vals = [float(v) for v in sigmas]
    if not vals:
        raise FewflowError("from_diffusers_sigmas needs at least one sigma")
    if vals[-1] != 0.0:
        vals.append(0.0)
    g = as_grid([1.0 - v for v in vals])
    if float(g[-1]) <= float(g[0]):
        raise FewflowError("diffusers sigmas must decrease (noise -> data)")
    return g


def _timestep(t: Tensor) -> Tensor:
    """diffusers' timestep of fewflow time ``t`` (same dtype): ``(1 - t) * 1000``; one formula for the
    scheduler and :class:`DiffusersVelocity`, so both feed the model identical timesteps."""
    return (1 - t) * TIMESTEP_SCALE


# ---------------------------------------------------------------------------------------------- scheduler
class _SchedulerCore:
    """The logic of ``FewflowScheduler``; the diffusers base classes are added when the class is built."""

    init_noise_sigma = 1.0

    def _setup(self, stepper: str, num_train_timesteps: int) -> None:
        if stepper not in SCHEDULER_STEPPERS:
            raise unknown_name("scheduler stepper", str(stepper), SCHEDULER_STEPPERS)
        if int(num_train_timesteps) < 1:
            raise FewflowError(f"num_train_timesteps must be positive, got {num_train_timesteps}")
        self.stepper = stepper
        self.stages = SCHEDULER_STEPPERS[stepper]
        self.order = self.stages
        self.grid: Tensor | None = None
        self.timesteps: Tensor | None = None
        self.sigmas: Tensor | None = None
        self.num_inference_steps: int | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._stash: tuple[Tensor, Tensor] | None = None

    # -------------------------------------------------------------- timesteps
    def _stage_times(self, dtype: torch.dtype, device: Any = None) -> Tensor:
        """The fewflow time of every model call, in ``dtype`` (as fewflow's solver computes it)."""
        g = self.grid.to(device=device, dtype=dtype)
        a, b = g[:-1], g[1:]
        if self.stepper == "euler":
            return a
        second = b if self.stepper == "heun" else a + 0.5 * (b - a)
        return torch.stack([a, second], dim=1).reshape(-1)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Sequence[float] | Tensor | None = None,
        grid: str | Sequence[float] | Tensor | None = None,
        timesteps: Sequence[float] | Tensor | None = None,
        mu: float | None = None,
        **grid_kwargs: Any,
    ) -> None:
        """Set the grid of the next sampling loop.

        Args:
            num_inference_steps: number of grid intervals (steps); each costs ``order`` model calls.
            device: where ``timesteps`` and ``sigmas`` live.
            sigmas: diffusers sigmas (one per step, optionally with the terminal 0), used as they are --
                e.g. :func:`to_diffusers_sigmas` of a fitted BOSS grid. Takes precedence over ``grid``.
            grid: a fewflow grid name (``uniform``, ``shift``, ``edm``, ``logsnr``; see
                :func:`fewflow.solvers.grids.get_grid`, options in ``grid_kwargs``, e.g. ``shift=3``) or the
                grid itself (increasing, ending at t = 1). ``None``: the scheduler's configured grid.
            timesteps: diffusers timesteps ``sigma * 1000``, used when ``sigmas`` is not given.
            mu: accepted for pipelines that pass resolution-dependent shifting; ignored (the grid holds
                any shift).

        Sets ``grid`` (float64 fewflow times), ``timesteps`` (one per model call, ``sigma * 1000``,
        float32) and ``sigmas`` (the noise level of every model call followed by the terminal 0).
        """
        del mu
        if sigmas is None and timesteps is not None:
            ts = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1)
            sigmas = ts / float(self.config.num_train_timesteps)
        if sigmas is not None:
            g = from_diffusers_sigmas(sigmas)
        else:
            spec = self.config.grid if grid is None else grid
            if isinstance(spec, str):
                if num_inference_steps is None:
                    raise FewflowError(f"grid {spec!r} needs num_inference_steps")
                kw = {**(self.config.grid_kwargs or {}), **grid_kwargs} if grid is None else dict(grid_kwargs)
                g = get_grid(spec, int(num_inference_steps), **kw)
            else:
                g = as_grid(spec)
            if float(g[0]) >= float(g[-1]) or float(g[-1]) != 1.0:
                raise FewflowError("the scheduler's grid must increase (noise -> data) and end at t = 1")
        n = g.numel() - 1
        if num_inference_steps is not None and int(num_inference_steps) != n:
            raise FewflowError(
                f"num_inference_steps={num_inference_steps} disagrees with the grid's {n} steps"
            )
        self.grid = g
        self.num_inference_steps = n
        t32 = self._stage_times(torch.float32)
        self.timesteps = _timestep(t32).to(device)
        terminal = torch.tensor([1.0 - float(g[-1])], dtype=torch.float32)
        self.sigmas = torch.cat([1 - t32, terminal]).to(device)
        self._step_index = None
        self._begin_index = None
        self._stash = None

    # -------------------------------------------------------------- indices
    @property
    def step_index(self) -> int | None:
        """The index of the next model call in ``timesteps`` (None before the first ``step``)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the loop at ``timesteps[begin_index]`` (image-to-image); must be a first-stage call."""
        if int(begin_index) % self.stages:
            raise FewflowError(
                f"begin_index must be a multiple of the order {self.stages}, got {begin_index}"
            )
        self._begin_index = int(begin_index)

    @property
    def state_in_first_order(self) -> bool:
        """True when the next ``step`` starts a grid interval (no predictor state is stored)."""
        return self._stash is None

    def _init_step_index(self, timestep: Any) -> None:
        if self._begin_index is not None:
            self._step_index = self._begin_index
            return
        tv = float(timestep.reshape(-1)[0]) if torch.is_tensor(timestep) else float(timestep)
        firsts = self.timesteps[:: self.stages].detach().to("cpu", torch.float64)
        hits = (firsts - tv).abs() <= 1e-4 * max(1.0, abs(tv))
        if not bool(hits.any()):
            raise FewflowError(f"timestep {tv} does not start a step of this scheduler's timesteps")
        self._step_index = int(hits.nonzero()[0, 0]) * self.stages

    # -------------------------------------------------------------- stepping
    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        """The identity (flow models take the state as it is)."""
        return sample

    def scale_noise(self, sample: Tensor, timestep: Any, noise: Tensor) -> Tensor:
        """The forward process at ``timestep = sigma * 1000``: ``sigma noise + (1 - sigma) sample``."""
        ts = torch.as_tensor(timestep, device=sample.device, dtype=torch.float32)
        sigma = ts.reshape(-1) / float(self.config.num_train_timesteps)
        if sigma.numel() == 1:
            sigma = sigma.expand(sample.shape[0])
        sigma = sigma.to(sample.dtype).reshape(-1, *([1] * (sample.dim() - 1)))
        return sigma * noise + (1.0 - sigma) * sample

    def step(
        self, model_output: Tensor, timestep: Any, sample: Tensor, return_dict: bool = True, **kwargs: Any
    ) -> Any:
        """Advance ``sample`` by one model call. ``model_output`` is diffusers' ``noise - data``.

        Euler: ``x + (t_next - t) v`` with ``v = -model_output`` (one call per interval). Heun and midpoint
        take two calls per interval, exactly as ``timesteps`` lists them: the first returns the predictor
        state at the second call's time, the second the state at the interval's end. The arithmetic is
        fewflow's own stepper's, in float32 at least (the result has ``sample``'s dtype). Extra keyword
        arguments diffusers passes (``generator``, ...) are ignored.
        """
        if self.timesteps is None:
            raise FewflowError("call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        k = self._step_index
        if k >= self.timesteps.numel():
            raise FewflowError("step called after the last timestep; call set_timesteps for a new loop")
        cdt = torch.promote_types(sample.dtype, torch.float32)
        x = sample.to(cdt)
        v = -model_output.to(cdt)
        g = self.grid.to(device=sample.device, dtype=cdt)
        i, stage = divmod(k, self.stages)
        t, tn = g[i], g[i + 1]
        h = tn - t
        if self.stepper == "euler":
            out = x + h * v
        elif stage == 0:
            self._stash = (x, v)
            out = x + h * v if self.stepper == "heun" else x + 0.5 * h * v
        else:
            x0, k1 = self._stash
            self._stash = None
            out = x0 + 0.5 * h * (k1 + v) if self.stepper == "heun" else x0 + h * v
        self._step_index = k + 1
        out = out.to(sample.dtype)
        if not return_dict:
            return (out,)
        return _output_class()(prev_sample=out)

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps)


@functools.cache
def _output_class() -> type:
    require_diffusers()
    from diffusers.schedulers.scheduling_utils import SchedulerOutput

    return SchedulerOutput


@functools.cache
def _scheduler_class() -> type:
    require_diffusers()
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    class FewflowScheduler(_SchedulerCore, SchedulerMixin, ConfigMixin):
        """A diffusers scheduler stepping on fewflow time grids with fewflow's steppers.

        Args:
            num_train_timesteps: the timestep scale (``timestep = sigma * num_train_timesteps``; 1000 like
                diffusers' flow models).
            stepper: ``"euler"`` (1 call per step, order 1), ``"heun"`` or ``"midpoint"`` (2 calls per step,
                order 2; ``step`` is called once per entry of ``timesteps`` and keeps the predictor).
            grid: the default fewflow grid name for ``set_timesteps``.
            grid_kwargs: default options of that grid (e.g. ``{"shift": 3.0}``).
        """

        config_name = "scheduler_config.json"
        _compatibles: list[str] = []

        @register_to_config
        def __init__(
            self,
            num_train_timesteps: int = 1000,
            stepper: str = "euler",
            grid: str = "uniform",
            grid_kwargs: dict[str, Any] | None = None,
        ) -> None:
            if not isinstance(grid, str):
                raise FewflowError("the configured grid must be a name; pass a grid tensor to set_timesteps")
            self._setup(stepper, num_train_timesteps)

    FewflowScheduler.__module__ = __name__
    FewflowScheduler.__qualname__ = "FewflowScheduler"
    return FewflowScheduler


def __getattr__(name: str) -> Any:
    if name == "FewflowScheduler":
        require_diffusers()
        return _scheduler_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------- model
class DiffusersVelocity(nn.Module):
    """A diffusers model as a fewflow velocity model ``v(x, t, **cond)``.

    Calls ``module(x, timestep=(1 - t) * 1000, ...)`` and takes ``.sample`` (or the first element of a
    tuple, or the tensor itself). ``output="flow"`` (diffusers' flow-matching models: ``noise - data``)
    returns its negative, the fewflow velocity ``data - noise``; ``output="velocity"`` returns the output as
    it is (a model trained in fewflow's sign). ``timestep_scale`` changes the 1000 for models that take
    sigma itself (``timestep_scale=1.0``).

    Conditions: ``y`` (class labels) goes to ``class_labels`` and needs a model with a class embedding;
    ``c`` goes to ``encoder_hidden_states``, with rows where ``c_mask`` is False (fewflow's null condition in
    classifier-free-guidance training) set to zero; any other keyword goes to the module unchanged.
    The wrapper is an ``nn.Module`` holding the diffusers model, so fewflow's trainer and EMA see its
    parameters.
    """

    is_flow_map = False

    def __init__(
        self, module: nn.Module, *, output: str = "flow", timestep_scale: float = TIMESTEP_SCALE
    ) -> None:
        super().__init__()
        if output not in ("flow", "velocity"):
            raise unknown_name("diffusers model output", str(output), ("flow", "velocity"))
        if not callable(module):
            raise FewflowError(f"module must be a callable diffusers model, got {type(module).__name__}")
        if not (math.isfinite(float(timestep_scale)) and float(timestep_scale) > 0):
            raise FewflowError(f"timestep_scale must be a positive number, got {timestep_scale}")
        self.module = module
        self.output = output
        self.timestep_scale = float(timestep_scale)

    def extra_repr(self) -> str:
        return f"output={self.output!r}, timestep_scale={self.timestep_scale}"

    def forward(
        self, x: Tensor, t: Tensor | float, y: Tensor | None = None, c: Tensor | None = None,
        c_mask: Tensor | None = None, **kwargs: Any,
    ) -> Tensor:
        tt = as_batch_time(t, x)
        kw = dict(kwargs)
        if y is not None:
            if getattr(self.module, "class_embedding", None) is None:
                raise FewflowError("labels y were given but the diffusers model has no class embedding")
            kw["class_labels"] = y
        if c is not None:
            if c_mask is not None:
                keep = c_mask.to(device=c.device).bool().reshape(-1, *([1] * (c.dim() - 1)))
                c = torch.where(keep, c, torch.zeros_like(c))
            kw["encoder_hidden_states"] = c
        out = self.module(x, timestep=(1 - tt) * self.timestep_scale, **kw)
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        return -out if self.output == "flow" else out
