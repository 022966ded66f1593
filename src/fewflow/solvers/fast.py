"""Fixed-grid sampling as one captured function: ``torch.compile``, CUDA graphs and bf16 autocast.

:func:`fewflow.solvers.solve` is the general loop (trajectories, callbacks, NFE counting, stochastic and
stateful steppers, finiteness checks). Serving a trained few-step model wants the opposite trade: the same
grid, batch shape and stepper on every call, and no Python work between network evaluations.
:class:`FixedGridSampler` runs a deterministic stepper over a fixed grid with

* ``compile``: the whole integration (every step and network call) traced by ``torch.compile`` into one
  graph (works on CPU through inductor and on CUDA);
* ``cuda_graph``: on CUDA, the integration captured once per input shape into a ``torch.cuda.CUDAGraph``
  and replayed (static input buffers; each call copies its input in and the result out), which removes the
  kernel-launch overhead that dominates 1-4 step sampling of small models;
* ``autocast``: ``"bfloat16"`` (or ``"float16"`` on CUDA) mixed precision for the network calls; the state
  stays in the input's dtype and the result is returned in it.

The update of each step is the stepper's own :meth:`~fewflow.solvers.steppers.Stepper.step`, so the
samples equal :func:`~fewflow.solvers.solve`'s on the same grid (tested to float tolerance).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from fewflow._validate import FewflowError, check_batch, unknown_name
from fewflow.solvers.steppers import FlowMapStep, Stepper, get_stepper

__all__ = ["FixedGridSampler", "AUTOCAST_DTYPES"]

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class FixedGridSampler:
    """Sample ``model`` over a fixed ``grid`` (increasing times, t = 0 source to t = 1 data).

    Args:
        model: a velocity model ``v(x, t, **cond)``, or a flow-map model ``u(x, s, t, **cond)`` (its
            ``is_flow_map`` attribute True, or ``stepper="flow_map"``).
        grid: the time nodes, e.g. ``fewflow.solvers.get_grid("uniform", 4)``; ``steps`` uniform steps
            on [0, 1] when ``grid`` is None.
        stepper: a deterministic, stateless stepper (``euler``, ``midpoint``, ``heun``, ``rk4``,
            ``flow_map``).
        compile: False, True or a ``torch.compile`` mode (``"reduce-overhead"``, ``"max-autotune"``).
        cuda_graph: capture and replay a CUDA graph per input shape (CUDA inputs only).
        autocast: None, ``"bfloat16"`` or ``"float16"`` (the latter on CUDA only).

    Calling ``sampler(x0, **cond)`` returns the samples (a new tensor, the dtype of ``x0``).
    """

    def __init__(
        self,
        model: Callable[..., Tensor],
        grid: Sequence[float] | Tensor | None = None,
        *,
        steps: int | None = None,
        stepper: str | Stepper = "euler",
        compile: bool | str = False,
        cuda_graph: bool = False,
        autocast: str | None = None,
    ) -> None:
        if grid is None:
            if steps is None or int(steps) < 1:
                raise FewflowError("FixedGridSampler needs a grid or a positive number of steps")
            grid = torch.linspace(0.0, 1.0, int(steps) + 1, dtype=torch.float64)
        g = torch.as_tensor(grid, dtype=torch.float64).flatten()
        if g.numel() < 2 or not torch.isfinite(g).all() or not bool((g[1:] > g[:-1]).all()):
            raise FewflowError(f"the grid must hold at least 2 increasing finite times, got {g.tolist()}")
        if autocast is not None and autocast not in AUTOCAST_DTYPES:
            raise unknown_name("autocast dtype", autocast, AUTOCAST_DTYPES)
        flow_map = bool(getattr(model, "is_flow_map", False))
        st = FlowMapStep() if flow_map and stepper == "euler" else get_stepper(stepper)
        if st.stochastic or st.stateful:
            raise FewflowError(f"FixedGridSampler needs a deterministic, stateless stepper; {st!r} is not")
        if flow_map and not st.is_flow_map:
            raise FewflowError("a flow-map model samples with stepper='flow_map' (or 'euler') here")
        self.model, self.grid, self.stepper = model, g, st
        self.flow_map = st.is_flow_map
        self.autocast = autocast
        self.cuda_graph = bool(cuda_graph)
        self.nfe = st.nfe_per_step * (g.numel() - 1)
        self._fn: Callable[..., Tensor] = self._integrate
        if compile:
            mode = None if compile is True else str(compile)
            self._fn = torch.compile(self._integrate, mode=mode, dynamic=False)
        self._graphs: dict[Any, tuple[Any, Tensor, dict[str, Tensor], Tensor]] = {}

    # ---------------------------------------------------------------------------------------------- core

    def _integrate(self, x: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        model, st = self.model, self.stepper
        out_dtype = x.dtype
        ts = self.grid.to(device=x.device, dtype=x.dtype)
        b = x.shape[0]

        if self.flow_map:
            def f(z: Tensor, s: Tensor, t: Tensor) -> Tensor:
                return model(z, s, t, **cond).to(out_dtype)
        else:
            def f(z: Tensor, t: Tensor) -> Tensor:
                return model(z, t, **cond).to(out_dtype)

        ctx = (torch.autocast(device_type=x.device.type, dtype=AUTOCAST_DTYPES[self.autocast])
               if self.autocast else nullcontext())
        n = ts.numel() - 1
        with ctx:
            for i in range(n):
                t, t_next = ts[i].expand(b), ts[i + 1].expand(b)
                x = st.step_last(f, x, t, t_next) if i == n - 1 else st.step(f, x, t, t_next)
        return x

    def __call__(self, x0: Tensor, **cond: Tensor) -> Tensor:
        check_batch("x0", x0, min_dim=2)
        if not x0.is_floating_point():
            raise FewflowError(f"x0 must be floating point, got {x0.dtype}")
        if self.autocast == "float16" and x0.device.type != "cuda":
            raise FewflowError("float16 autocast needs a CUDA device; use autocast='bfloat16' on CPU")
        with torch.no_grad():
            if not self.cuda_graph:
                return self._fn(x0, cond)
            return self._replay(x0, cond)

    # ------------------------------------------------------------------------------------------ graphs

    def _replay(self, x0: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        if x0.device.type != "cuda":
            raise FewflowError(f"cuda_graph=True needs CUDA inputs, got a tensor on {x0.device}")
        key = (tuple(x0.shape), x0.dtype, x0.device,
               tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(cond.items())))
        if key not in self._graphs:
            static_x = x0.clone()
            static_c = {k: v.clone() for k, v in cond.items()}
            side = torch.cuda.Stream(device=x0.device)
            side.wait_stream(torch.cuda.current_stream(x0.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up (allocator, cuBLAS handles, compile) outside the capture
                    self._fn(static_x, static_c)
            torch.cuda.current_stream(x0.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._fn(static_x, static_c)
            self._graphs[key] = (graph, static_x, static_c, static_out)
        graph, static_x, static_c, static_out = self._graphs[key]
        static_x.copy_(x0)
        for k, v in cond.items():
            static_c[k].copy_(v)
        graph.replay()
        return static_out.clone()

