"""Reflow pairs: the deterministic coupling ``(x0, ODE_teacher(x0))`` of a trained velocity model.

From "Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified Flow" (Liu, Gong, Liu,
2022; arXiv 2209.03003). Rectifying a teacher ``v_k`` means: draw noise ``x0 ~ p0``, integrate the teacher's
ODE ``dx/dt = v_k(x, t)`` from t = 0 to t = 1 to get ``x1 = ODE_k(x0)``, then train a new velocity model with
the ordinary flow-matching loss on the *fixed* pairs ``(x0, x1)`` (never resampling ``x0``):

    L(theta) = E_{(x0, x1) ~ pairs, t} || v_theta(t x1 + (1 - t) x0, t) - (x1 - x0) ||^2.

The new model's ODE has (nearly) straight paths, so 1-step Euler ``x1 = x0 + v(x0, 0)`` works; repeating
gives k-reflow. "Rectified Diffusion" (Wang et al., ICLR 2025) keeps a diffusion teacher's
parameterisation but uses the same matched pairs.

Large pair sets do not fit in memory, so :func:`generate_reflow_pairs` streams them to ``out_dir`` as
safetensors shards ``pairs-00000.safetensors`` (tensors ``x0``, ``x1`` and every conditioning tensor as
``cond.<name>``, e.g. ``cond.y``) plus ``manifest.json`` (counts, shapes, teacher solver, seed and the
sha256 of every shard). Shards are written atomically (temporary file + ``os.replace``) and the noise of
shard ``k`` comes from its own seed, so an interrupted run resumes from the last complete shard and gives
bit-identical shards. :class:`ReflowPairs` streams them back in shuffled batches, one shard buffer at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from torch import Tensor

from fewflow._io import atomic_save_safetensors, atomic_write_json, clean_stale_temps, sha256_file
from fewflow._validate import FewflowError, check_finite

__all__ = ["generate_reflow_pairs", "ReflowPairs", "reflow_batches", "shard_name", "read_manifest"]

MANIFEST = "manifest.json"
FORMAT = "fewflow-reflow-pairs"
_COND = "cond."


def shard_name(index: int) -> str:
    """File name of shard ``index``: ``pairs-00000.safetensors``."""
    return f"pairs-{index:05d}.safetensors"


def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``out_dir/manifest.json`` of a reflow pair set."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise FewflowError(f"no reflow pair set in {str(out_dir)!r}: {MANIFEST} is missing")
    try:
        man = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FewflowError(f"{path} is not valid JSON: {exc}") from exc
    if man.get("format") != FORMAT:
        raise FewflowError(
            f"{path} is not a reflow manifest (format {man.get('format')!r}, expected {FORMAT!r})"
        )
    return man


def _shard_seed(seed: int, index: int) -> int:
    return (int(seed) * 1_000_003 + int(index) * 7919 + 12345) % (2**63 - 1)


def _stepper_name(stepper: Any) -> str:
    return stepper if isinstance(stepper, str) else repr(stepper)


def generate_reflow_pairs(
    teacher: Callable[..., Tensor],
    source: Any,
    n: int,
    out_dir: str | os.PathLike,
    *,
    steps: int = 100,
    stepper: Any = "euler",
    batch_size: int = 1024,
    shard_size: int = 65536,
    cond_fn: Callable[[int, torch.Generator], dict[str, Tensor]] | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    max_shards: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Integrate ``teacher`` from stored noise and write ``n`` pairs ``(x0, x1 = ODE(x0))`` as shards.

    Args:
        teacher: velocity model ``v(x, t, **cond)`` (or a flow-map model; see ``fewflow.solvers.solve``).
        source: a ``Source`` with ``.sample(n, *, device, dtype, generator)`` (e.g. ``GaussianSource``).
        n: number of pairs.
        out_dir: folder for ``pairs-*.safetensors`` and ``manifest.json`` (created if missing).
        steps, stepper: the teacher's solver (``fewflow.solvers.solve`` on a uniform grid from 0 to 1).
        batch_size: pairs per teacher solve (memory); shard_size: pairs per shard file.
        cond_fn: ``cond_fn(m, generator) -> {"y": LongTensor (m,), ...}``, conditioning for ``m`` pairs
            (drawn with the shard's generator); stored as ``cond.<name>`` and passed to the teacher.
        seed: base seed; shard ``k`` uses its own derived seed, so resuming reproduces the same pairs.
        device: where the teacher runs (default: the teacher's parameters' device, else CPU).
        dtype: dtype of the noise and the solve; shards are stored on CPU in this dtype.
        max_shards: stop after writing this many *new* shards (chunked jobs); call again to continue.
        progress: show a progress bar over shards.

    Returns:
        The manifest dict (also in ``out_dir/manifest.json``); ``manifest["complete"]`` tells if all ``n``
        pairs are written. Re-running with the same arguments resumes after the last complete shard; other
        arguments for an existing folder raise :class:`FewflowError`.
    """
    from fewflow.solvers import solve  # lazy: solvers import nothing from couplings, keep it that way

    if isinstance(n, bool) or int(n) != n or n < 1:
        raise FewflowError(f"number of pairs n must be a positive integer, got {n!r}")
    for name, val in (("batch_size", batch_size), ("shard_size", shard_size), ("steps", steps)):
        if isinstance(val, bool) or int(val) != val or val < 1:
            raise FewflowError(f"{name} must be a positive integer, got {val!r}")
    if not hasattr(source, "sample"):
        raise FewflowError(
            f"source must have .sample(n, device=, dtype=, generator=), got {type(source).__name__}"
        )
    if device is None:
        p = next(iter(teacher.parameters()), None) if hasattr(teacher, "parameters") else None
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(n / shard_size)
    config = {
        "count": int(n),
        "shard_size": int(shard_size),
        "teacher_steps": int(steps),
        "stepper": _stepper_name(stepper),
        "seed": int(seed),
        "dtype": str(dtype).replace("torch.", ""),
    }
    if (out / MANIFEST).is_file():
        man = read_manifest(out)
        diff = {k: (man.get(k), v) for k, v in config.items() if man.get(k) != v}
        if diff:
            raise FewflowError(
                f"{out} holds a pair set made with different settings {diff} (existing, requested); "
                "use a new out_dir or delete it"
            )
        for rec in man["shards"]:
            fp = out / rec["file"]
            if not fp.is_file() or sha256_file(fp) != rec["sha256"]:
                raise FewflowError(f"shard {rec['file']} in {out} is missing or corrupted (sha256 mismatch)")
    else:
        man = {"format": FORMAT, "version": 1, **config, "num_shards": n_shards, "written": 0,
               "x_shape": None, "cond": {}, "complete": False, "shards": []}
    clean_stale_temps(out)  # half-written shards of an interrupted run

    todo = range(len(man["shards"]), n_shards)
    if max_shards is not None:
        todo = todo[: max(int(max_shards), 0)]
    iterator: Any = todo
    if progress:
        from fewflow._progress import progress_bar as tqdm

        iterator = tqdm(todo, desc="reflow pairs", unit="shard")
    for k in iterator:
        m = min(shard_size, n - k * shard_size)
        gen = torch.Generator().manual_seed(_shard_seed(seed, k))
        x0 = source.sample(m, device=torch.device("cpu"), dtype=dtype, generator=gen).to(dtype)
        cond = cond_fn(m, gen) if cond_fn is not None else {}
        for key, c in cond.items():
            if not torch.is_tensor(c) or c.shape[:1] != (m,):
                raise FewflowError(f"cond_fn must return tensors with {m} rows; {key!r} is not")
        xs = []
        for i in range(0, m, batch_size):
            xb = x0[i : i + batch_size].to(device)
            cb = {key: c[i : i + batch_size].to(device) for key, c in cond.items()}
            xs.append(solve(teacher, xb, steps=steps, stepper=stepper, cond=cb).x.detach().to("cpu", dtype))
        x1 = torch.cat(xs)
        check_finite(f"teacher samples of shard {k}", x1)
        tensors = {"x0": x0.contiguous(), "x1": x1.contiguous()}
        tensors.update({_COND + key: c.detach().cpu().contiguous() for key, c in cond.items()})
        # one metadata key only: safetensors writes a metadata map in hash order, which would make the
        # bytes (and the sha256) of identical shards differ between runs
        meta = {"fewflow_reflow_shard": str(k)}
        final = atomic_save_safetensors(out / shard_name(k), tensors, metadata=meta)
        digest = sha256_file(final)
        man["shards"].append({"file": final.name, "count": m, "sha256": digest})
        man["written"] = int(sum(r["count"] for r in man["shards"]))
        man["x_shape"] = list(x0.shape[1:])
        man["cond"] = {key: {"shape": list(c.shape[1:]), "dtype": str(c.dtype).replace("torch.", "")}
                       for key, c in cond.items()}
        man["complete"] = len(man["shards"]) == n_shards
        atomic_write_json(out / MANIFEST, man, indent=2)
    return man


class ReflowPairs:
    """Streams a reflow pair set in batches ``(x0, x1, y)`` without loading it all at once.

    Shards are visited in a (generator-)shuffled order; ``buffer_shards`` shards at a time are loaded,
    their sha256 checked against the manifest, shuffled together with the leftover of the previous
    buffer, and cut into batches. ``y`` is the stored ``cond.y`` or ``None``; other stored conditioning is
    available from :meth:`load_shard`. Batches feed ``CFMLoss.pair_loss(model, x0, x1, y=y)`` directly.

    Args:
        out_dir: a folder written by :func:`generate_reflow_pairs`.
        batch_size: pairs per batch.
        shuffle: shuffle shard order and pairs within the buffer.
        generator: randomness of the shuffling (CPU generator).
        buffer_shards: shards held in memory at once.
        drop_last: drop the final incomplete batch of an epoch.
        verify: check every shard's sha256 when it is loaded (a corrupted shard raises FewflowError).
        device: move batches there (default CPU).
        allow_incomplete: read a set whose generation has not finished (only its complete shards).
        as_dict: yield ``{"x0", "x1"[, "y"]}`` dicts (what :class:`fewflow.train.Trainer` feeds an
            objective as keyword arguments: ``CFMLoss(..)(model, x1, x0=x0, y=y)`` trains on the fixed
            pairs) instead of ``(x0, x1, y)`` tuples.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        batch_size: int = 256,
        *,
        shuffle: bool = True,
        generator: torch.Generator | None = None,
        buffer_shards: int = 1,
        drop_last: bool = False,
        verify: bool = True,
        device: torch.device | str | None = None,
        allow_incomplete: bool = False,
        as_dict: bool = False,
    ) -> None:
        self.as_dict = bool(as_dict)
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise FewflowError(f"batch_size must be a positive integer, got {batch_size!r}")
        if int(buffer_shards) < 1:
            raise FewflowError(f"buffer_shards must be >= 1, got {buffer_shards}")
        self.dir = Path(out_dir)
        self.manifest = read_manifest(self.dir)
        if not self.manifest["complete"] and not allow_incomplete:
            raise FewflowError(
                f"reflow pair set in {self.dir} is incomplete ({self.manifest['written']} of "
                f"{self.manifest['count']} pairs); resume generate_reflow_pairs or pass allow_incomplete=True"
            )
        self.batch_size, self.shuffle, self.generator = int(batch_size), shuffle, generator
        self.buffer_shards, self.drop_last, self.verify = int(buffer_shards), drop_last, verify
        self.device = torch.device(device) if device is not None else None

    def __len__(self) -> int:
        """Number of pairs."""
        return int(self.manifest["written"])

    @property
    def num_batches(self) -> int:
        """Batches per epoch."""
        n = len(self)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def load_shard(self, index: int) -> dict[str, Tensor]:
        """All tensors of shard ``index`` (``x0``, ``x1``, ``cond.*``), sha256-checked if ``verify``."""
        shards = self.manifest["shards"]
        if not 0 <= index < len(shards):
            raise FewflowError(f"shard index {index} out of range: the set has {len(shards)} shards")
        rec = shards[index]
        path = self.dir / rec["file"]
        if not path.is_file():
            raise FewflowError(f"shard {rec['file']} listed in the manifest is missing from {self.dir}")
        data = path.read_bytes()
        if self.verify and hashlib.sha256(data).hexdigest() != rec["sha256"]:
            raise FewflowError(f"shard {rec['file']} is corrupted: its sha256 does not match the manifest")
        try:
            tensors = st_load(data)
        except Exception as exc:  # noqa: BLE001 - the safetensors error types vary between versions
            raise FewflowError(f"shard {rec['file']} cannot be read as safetensors: {exc}") from exc
        if tensors["x0"].shape[0] != rec["count"]:
            raise FewflowError(
                f"shard {rec['file']} holds {tensors['x0'].shape[0]} pairs, the manifest says {rec['count']}"
            )
        return tensors

    def _perm(self, n: int) -> Tensor:
        if not self.shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=self.generator)

    def _emit(self, x0: Tensor, x1: Tensor, y: Tensor | None) -> Any:
        if self.device is not None:
            x0, x1 = x0.to(self.device), x1.to(self.device)
            y = y.to(self.device) if y is not None else None
        if self.as_dict:
            return {"x0": x0, "x1": x1, **({"y": y} if y is not None else {})}
        return x0, x1, y

    def __iter__(self) -> Iterator[Any]:
        order = self._perm(len(self.manifest["shards"])).tolist()
        bs = self.batch_size
        left: list[Tensor | None] = [None, None, None]
        for i in range(0, len(order), self.buffer_shards):
            loaded = [self.load_shard(j) for j in order[i : i + self.buffer_shards]]
            parts = [[d["x0"] for d in loaded], [d["x1"] for d in loaded],
                     [d[_COND + "y"] for d in loaded] if _COND + "y" in loaded[0] else None]
            buf = []
            for pos, chunks in enumerate(parts):
                if chunks is None:
                    buf.append(None)
                    continue
                if left[pos] is not None:
                    chunks = [left[pos], *chunks]
                buf.append(torch.cat(chunks))
            perm = self._perm(buf[0].shape[0])
            buf = [b[perm] if b is not None else None for b in buf]
            full = (buf[0].shape[0] // bs) * bs
            for a in range(0, full, bs):
                yield self._emit(buf[0][a : a + bs], buf[1][a : a + bs],
                                 buf[2][a : a + bs] if buf[2] is not None else None)
            left = [b[full:] if b is not None else None for b in buf]
        if left[0] is not None and left[0].shape[0] > 0 and not self.drop_last:
            yield self._emit(left[0], left[1], left[2])

    def __repr__(self) -> str:
        return f"ReflowPairs({str(self.dir)!r}, pairs={len(self)}, batch_size={self.batch_size})"


def reflow_batches(pairs_dir: str | os.PathLike, batch_size: int, seed: int) -> Iterator[dict[str, Tensor]]:
    """Endless shuffled batches ``{"x1", "x0"[, "y"]}`` of a pair set (an epoch after another, each with a
    fresh shuffle seeded by ``seed`` and the epoch), streamed with :class:`ReflowPairs`: what the trainer
    consumes when a method trains on fixed pairs (reflow, Rectified Diffusion)."""
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        got = 0
        for x0, x1, y in ReflowPairs(pairs_dir, batch_size=batch_size, generator=g, drop_last=True):
            b = {"x1": x1, "x0": x0}
            if y is not None:
                b["y"] = y
            got += 1
            yield b
        if not got:  # fewer pairs than one batch: an endless loop otherwise
            raise FewflowError(f"the pair set {pairs_dir} holds fewer pairs than one batch of {batch_size}")
        epoch += 1
