"""DDP under torchrun: 2 CPU processes (gloo) on a shared global batch equal 1 process on that batch."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fewflow.train import distributed as ddp
from fewflow.train import list_checkpoints, load_checkpoint
from fewflow.train.batches import shard

HERE = Path(__file__).parent


def _worker():
    spec = importlib.util.spec_from_file_location("fewflow_ddp_worker", HERE / "ddp_worker.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_init_distributed_without_torchrun_is_single_process(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    info = ddp.init_distributed()
    assert (info.rank, info.world_size, info.is_main, info.enabled) == (0, 1, True, False)
    assert ddp.get_world_size() == 1 and ddp.is_main_process()
    x = torch.randn(3)
    assert ddp.all_reduce_mean(x) is x and ddp.all_gather_object(5) == [5]


def test_shard_gives_equal_slices_of_the_global_batch():
    x, y = torch.arange(12).reshape(6, 2), torch.arange(6)
    parts = [shard({"x1": x, "y": y, "k": 3}, r, 3) for r in range(3)]
    assert torch.equal(torch.cat([p["x1"] for p in parts]), x)
    assert torch.equal(torch.cat([p["y"] for p in parts]), y)
    assert all(p["k"] == 3 for p in parts)
    from fewflow import FewflowError

    with pytest.raises(FewflowError, match="equal per-rank"):
        shard({"x1": x}, 0, 4)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    src = str(HERE.parent / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    for attempt in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", str(HERE / "ddp_worker.py"), str(tmp_path)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        # Seen once in ~30 runs on a loaded 2-core machine: a rank aborts in gloo's C++ teardown
        # ("terminate called without an active exception", SIGABRT) after training finished. That is
        # torch's process-group shutdown, not the code under test; it gets one fresh retry. Any other
        # failure, or the same one twice, fails the test.
        teardown_abort = "terminate called without an active exception" in proc.stdout + proc.stderr
        if proc.returncode == 0 or not teardown_abort or attempt == 1:
            break
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    worker = _worker()
    for mode in ("wrap", "allreduce"):
        got = load_file(str(tmp_path / f"{mode}.safetensors"))
        want = worker.train(mode)
        assert set(got) == set(want)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=f"{mode}: {k}")
        # only rank 0 wrote: one set of checkpoints, log rows not duplicated
        run_dir = tmp_path / mode
        assert [s for s, _ in list_checkpoints(run_dir)] == [10, 20, 24]
        ck = load_checkpoint(run_dir)
        assert len(ck.state("rng")["ranks"]) == 2  # both ranks' RNG streams are saved
        rows = (run_dir / "log.csv").read_text().splitlines()[1:]
        assert [int(r.split(",")[0]) for r in rows] == [6, 12, 18, 24]
    # sanity: the two processes really trained (weights moved away from the rank-0 init)
    torch.manual_seed(1000)
    init = worker.Net().state_dict()
    got = load_file(str(tmp_path / "wrap.safetensors"))
    assert not torch.allclose(got["model.net.0.weight"], init["net.0.weight"])
    _resume_two_process_run_in_one_process(worker, tmp_path)


def _resume_two_process_run_in_one_process(worker, tmp_path: Path) -> None:
    """A checkpoint written by 2 ranks resumes in 1 process (a different world size): it warns that the
    random streams are reseeded, and, the objective being deterministic per sample and the global batches
    the same, it ends where the uninterrupted 2-process run ended."""
    import shutil
    import warnings

    from fewflow.train import Trainer

    run = tmp_path / "resume1"
    shutil.copytree(tmp_path / "wrap", run)
    for step, folder in list_checkpoints(run):
        if step > 10:
            shutil.rmtree(folder)
    (run / "latest").write_text("ckpt-10\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(worker.Net(), worker.objective, worker.data(), worker.config("wrap"), out_dir=run)
        result = trainer.fit(resume=True)
    assert result.step == worker.STEPS
    assert any("resuming with 1" in str(w.message) for w in caught)
    want = load_file(str(tmp_path / "wrap.safetensors"))
    for k, v in trainer.model.state_dict().items():
        torch.testing.assert_close(v, want[f"model.{k}"], rtol=1e-5, atol=1e-6, msg=k)
