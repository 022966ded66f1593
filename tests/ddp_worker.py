"""Worker for tests/test_ddp.py: train a tiny model with a deterministic objective under torchrun
(``python -m torch.distributed.run --nproc_per_node=2 tests/ddp_worker.py OUT``) or in-process (``run``).

Rank 0 writes ``OUT/<mode>.safetensors`` (model + EMA weights) for each DDP mode; the test compares them to a
1-process run on the same global batches.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from fewflow.objectives.base import LossOutput
from fewflow.train import TrainConfig, Trainer
from fewflow.train import distributed as ddp

STEPS = 24


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None]], dim=1))


def objective(model, x1, *, generator=None, **cond):
    """CFM with per-sample deterministic x0 and t (functions of x1), so the result does not depend on how
    the global batch is split across ranks; the loss is the mean over this rank's slice."""
    x0 = torch.sin(5.0 * x1 + 1.0)
    t = torch.sigmoid(3.0 * x1[:, 0])
    xt = t[:, None] * x1 + (1 - t[:, None]) * x0
    return LossOutput(((model(xt, t) - (x1 - x0)) ** 2).mean())


def data() -> torch.Tensor:
    return torch.randn(40, 2, generator=torch.Generator().manual_seed(0))


def config(mode: str) -> TrainConfig:
    return TrainConfig(steps=STEPS, batch_size=16, lr=1e-2, warmup=3, lr_schedule="cosine", grad_clip=0.5,
                       ema_decay=0.9, ckpt_every=10, log_every=6, progress=False, device="cpu", ddp_mode=mode)


def train(mode: str, out_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """Train with ``mode``; every rank starts from a different init, which DDP must replace by rank 0's.
    Returns model (``model.*``) and EMA (``ema.*``) weights. In one process this is the reference run."""
    torch.manual_seed(1000 + ddp.get_rank())
    trainer = Trainer(Net(), objective, data(), config(mode), out_dir=out_dir)
    result = trainer.fit()
    assert result.step == STEPS, result
    state = {f"model.{k}": v.detach().clone() for k, v in trainer.model.state_dict().items()}
    state.update({f"ema.{k}": v.detach().clone() for k, v in trainer.ema_model.state_dict().items()})
    return state


def main(out: str) -> None:
    torch.set_num_threads(1)
    info = ddp.init_distributed()
    assert info.world_size == 2, info
    out_dir = Path(out)
    for mode in ("wrap", "allreduce"):
        state = train(mode, out_dir / mode)
        if info.is_main:
            save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / f"{mode}.safetensors"))
    ddp.barrier()
    ddp.cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
