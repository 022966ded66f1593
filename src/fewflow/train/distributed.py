"""Data-parallel training under ``torchrun``: process-group set-up and small collective helpers.

``torchrun --nproc_per_node=W script.py`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`init_distributed` reads them and joins the group (``nccl`` on CUDA, ``gloo`` on CPU).
Gradients are averaged across ranks (Li et al., "PyTorch Distributed: Experiences on Accelerating Data
Parallel Training"), so with equal per-rank slices of one global batch and a per-rank *mean* loss, a
W-process step equals a 1-process step on the global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fewflow._validate import FewflowError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise FewflowError(f"environment variable {name} must be an integer, got {v!r}") from None


def init_distributed(backend: str | None = None, device: str | torch.device | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment variables (no-op when not launched so).

    ``backend`` defaults to ``"nccl"`` when ``device`` (default: CUDA if available) is CUDA, else ``"gloo"``.
    On CUDA the current device is set to ``cuda:LOCAL_RANK``. Safe to call twice.
    """
    if dist.is_available() and dist.is_initialized():
        return dist_info()
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size <= 1:
        return DistInfo(rank=0, world_size=1, local_rank=local_rank, backend=None)
    if not dist.is_available():
        raise FewflowError("WORLD_SIZE > 1 but torch.distributed is not available in this build")
    if not 0 <= rank < world_size:
        raise FewflowError(f"RANK={rank} must lie in [0, WORLD_SIZE={world_size})")
    if device is None:
        use_cuda = torch.cuda.is_available()
    else:
        use_cuda = torch.device(device).type == "cuda"
    if backend is None:
        backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend)


def dist_info() -> DistInfo:
    """The current process's :class:`DistInfo` (world size 1 when no group is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=_env_int("LOCAL_RANK", 0),
            backend=str(dist.get_backend()),
        )
    return DistInfo(local_rank=_env_int("LOCAL_RANK", 0))


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist_info().rank


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist_info().world_size


def is_main_process() -> bool:
    """True on rank 0 (and always without a process group)."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if get_world_size() > 1:
        dist.barrier()


def cleanup_distributed() -> None:
    """Leave the process group (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over ranks (a copy; ``x`` itself without a process group)."""
    ws = get_world_size()
    if ws == 1:
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / ws


def all_reduce_min(x: torch.Tensor) -> torch.Tensor:
    """The element-wise minimum over ranks (``x`` itself without a process group)."""
    if get_world_size() == 1:
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.MIN)
    return y


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` without a process group)."""
    ws = get_world_size()
    if ws == 1:
        return [obj]
    out: list[Any] = [None] * ws
    dist.all_gather_object(out, obj)
    return out


def average_gradients(params) -> None:
    """Average ``.grad`` over ranks with one flattened all-reduce (the ``ddp_mode="allreduce"`` path)."""
    ws = get_world_size()
    if ws == 1:
        return
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in groups.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= ws
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n
