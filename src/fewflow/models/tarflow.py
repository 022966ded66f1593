"""Transformer autoregressive normalizing flows (TARFlow / STARFlow family), CPU-sized.

"Normalizing Flows are Capable Generative Models" (Zhai et al., arXiv 2412.06329; TARFlow) and
"STARFlow: Scaling Latent Normalizing Flows for High-resolution Image Synthesis" (Gu et al., arXiv
2506.06276), whose video follow-up STARFlow-V makes the flow causal across frames.

A normalizing flow maps data ``x`` to a latent ``z = f(x)`` with an exactly computable Jacobian, so

    log p(x) = log N(f(x); 0, I) + log |det df/dx|.

An image ``(C, H, W)`` is cut into ``T = (H / p)(W / p)`` patch tokens of size ``d = C p^2``. Each of the
``K`` blocks is an affine autoregressive map over the tokens (in its own order ``pi_k``): a causal
transformer reads tokens ``x_{<i}`` and outputs ``(a_i, b_i)`` (shifted right by one token, so token 0 gets
``a_0 = b_0 = 0``); then

    z_i = (x_i - b_i(x_{<i})) * exp(-a_i(x_{<i})),      log |det dz/dx| = - sum_i sum_j a_{i,j}.

The Jacobian of one block is triangular in its token order with diagonal ``exp(-a)``, hence the
log-determinant. Blocks alternate between the identity order and the reversed order (the "flip"), so
every token eventually conditions on every other. The output projection is zero-initialised: a fresh
flow is the identity map.

Inversion of a block is autoregressive: ``x_i = z_i exp(a_i(x_{<i})) + b_i(x_{<i})``. Two ways:

* sequential: one token at a time (``T`` network evaluations per block; ours re-run the causal prefix
  instead of keeping a key/value cache);
* Jacobi (STARFlow): start from a guess and update *all* tokens in parallel,
  ``x <- z exp(a(x)) + b(x)``, until the relative residual ``mean((x_new - x)^2) / mean(x_new^2)`` falls
  under a threshold. By causality token ``i`` is exact after ``i + 1`` sweeps, so at most ``T`` sweeps
  give the sequential answer exactly; usually far fewer reach it to tolerance. Tokens can be processed
  in chunks (Jacobi inside a chunk, chunks in order).

Video mode (STARFlow-V's idea at toy scale): a clip ``(F, C, H, W)`` becomes ``F T`` tokens in frame-major
order; the flip reverses tokens *within* each frame but keeps the frames in order, so every block, and the
whole flow, is causal across frames: ``z`` of frame ``f`` depends on frames ``<= f`` only, and frames can be
generated one after another (Jacobi over one frame at a time with ``chunk = T``).

Class conditioning adds a learned class embedding (``num_classes + 1`` rows; the last is the null class
used by classifier-free-guidance training) to every token of every block.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewflow._validate import FewflowError

__all__ = ["InverseStats", "TARFlow", "TARFlowBlock"]


@dataclass
class InverseStats:
    """What an inversion cost: ``iterations[k]`` network evaluations of block ``k`` (in the order the
    blocks were inverted, last block first), their total, and the wall time in seconds."""

    iterations: list[int]
    total: int
    wall_s: float
    method: str


class _Layer(nn.Module):
    """Pre-norm (causal) self-attention + MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, causal: bool = True) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(),
                                 nn.Linear(mlp_ratio * width, width))

    def forward(self, h: Tensor) -> Tensor:
        b, t, w = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, w))
        return h + self.mlp(self.norm2(h))


class TARFlowBlock(nn.Module):
    """One shifted-causal affine block over tokens ``(B, T, d)`` in its own order ``perm``.

    ``params(x)`` returns ``(a, b)``, each ``(B, T, d)``, in the *original* token order, where token ``i``'s
    parameters depend only on the tokens before it in the block's order (token ``perm[0]`` gets zeros)."""

    def __init__(self, tokens: int, dim: int, width: int, layers: int, heads: int, perm: Tensor,
                 num_classes: int | None = None, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, width)
        self.pos = nn.Parameter(torch.randn(tokens, width) * 0.02)
        self.cls = nn.Embedding(num_classes + 1, width) if num_classes else None
        if self.cls is not None:
            nn.init.normal_(self.cls.weight, std=0.02)
        self.layers = nn.ModuleList(_Layer(width, heads, mlp_ratio) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, 2 * dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        self.register_buffer("perm", perm.clone(), persistent=False)
        self.register_buffer("inv_perm", torch.argsort(perm), persistent=False)

    def _params_ordered(self, xp: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(a, b)`` for a prefix ``xp`` (B, n, d) already in the block's order (position j predicts j+1)."""
        n = xp.shape[1]
        h = self.proj_in(xp) + self.pos[:n]
        if self.cls is not None:
            if y is None:
                raise FewflowError("this flow is class-conditional: pass labels y")
            h = h + self.cls(y)[:, None, :]
        for layer in self.layers:
            h = layer(h)
        ab = self.proj_out(self.norm(h))
        ab = torch.cat([torch.zeros_like(ab[:, :1]), ab[:, :-1]], dim=1)  # shift: token i sees x_{<i}
        a, b = ab.chunk(2, dim=-1)
        return a, b

    def _guided(self, xp: Tensor, y: Tensor | None, guidance: float) -> tuple[Tensor, Tensor]:
        """TARFlow's per-token classifier-free guidance of the affine parameters,
        ``a <- a + g (a - a_null)``, ``b <- b + g (b - b_null)`` (one batched call; ``g = 0``: none)."""
        if guidance == 0 or self.cls is None or y is None:
            return self._params_ordered(xp, y)
        b = xp.shape[0]
        null = torch.full_like(y, self.cls.num_embeddings - 1)
        a2, b2 = self._params_ordered(torch.cat([xp, xp]), torch.cat([y, null]))
        ac, au, bc, bu = a2[:b], a2[b:], b2[:b], b2[b:]
        return ac + guidance * (ac - au), bc + guidance * (bc - bu)

    def params(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        a, b = self._params_ordered(x[:, self.perm], y)
        return a[:, self.inv_perm], b[:, self.inv_perm]

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x -> (z, log|det dz/dx|)`` with ``z`` of ``x``'s shape and the log-determinant ``(B,)``."""
        a, b = self.params(x, y)
        return (x - b) * torch.exp(-a), -a.flatten(1).sum(1)

    # -- inversion (in the block's order) ---------------------------------------------------------------
    def inverse_sequential(self, z: Tensor, y: Tensor | None = None, *,
                           guidance: float = 0.0) -> tuple[Tensor, int]:
        """Token by token; returns ``(x, network evaluations)``."""
        zp = z[:, self.perm]
        t = zp.shape[1]
        x = torch.zeros_like(zp)
        x[:, 0] = zp[:, 0]
        for i in range(1, t):
            a, b = self._guided(x[:, : i + 1], y, guidance)  # the prefix x_{<=i}; row i only reads x_{<i}
            x[:, i] = zp[:, i] * torch.exp(a[:, i]) + b[:, i]
        return x[:, self.inv_perm], t - 1

    def inverse_jacobi(self, z: Tensor, y: Tensor | None = None, *, threshold: float = 1e-3,
                       chunk: int | None = None, max_iter: int | None = None,
                       guidance: float = 0.0) -> tuple[Tensor, int]:
        """Parallel fixed-point iterations ``x <- z exp(a(x)) + b(x)`` per chunk of tokens (the whole sequence
        when ``chunk`` is None), stopped when the chunk's relative residual is below ``threshold`` or after
        ``max_iter`` sweeps (default: the chunk's length, which is exact). Returns ``(x, sweeps)``."""
        zp = z[:, self.perm]
        t = zp.shape[1]
        size = t if chunk is None else int(chunk)
        x = zp.clone()  # initial guess: the latent itself
        sweeps = 0
        for s in range(0, t, size):
            e = min(t, s + size)
            cap = (e - s) if max_iter is None else int(max_iter)
            for _ in range(cap):
                a, b = self._guided(x[:, :e], y, guidance)
                new = zp[:, s:e] * torch.exp(a[:, s:e]) + b[:, s:e]
                old = x[:, s:e]
                x = torch.cat([x[:, :s], new, x[:, e:]], dim=1)
                sweeps += 1
                res = (new - old).pow(2).mean() / new.pow(2).mean().clamp_min(1e-30)
                if float(res) < threshold:
                    break
        return x[:, self.inv_perm], sweeps


class TokenDenoiser(nn.Module):
    """A small non-causal transformer over the flow's tokens, ``(B, T, d) -> (B, T, d)``: STARFlow-V's
    learnable denoiser, trained by flow-score matching to predict ``sigma grad_x(-log p(x))``
    (zero-initialised output, so it starts as "no correction")."""

    def __init__(self, tokens: int, dim: int, width: int, layers: int, heads: int,
                 num_classes: int | None = None, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, width)
        self.pos = nn.Parameter(torch.randn(tokens, width) * 0.02)
        self.cls = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.layers = nn.ModuleList(_Layer(width, heads, mlp_ratio, causal=False) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, h: Tensor, y: Tensor | None = None) -> Tensor:
        h = self.proj_in(h) + self.pos
        if self.cls is not None and y is not None:
            h = h + self.cls(y)[:, None, :]
        for layer in self.layers:
            h = layer(h)
        return self.proj_out(self.norm(h))


def _check_int(name: str, v: object, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise FewflowError(f"{name} must be an integer >= {lo}, got {v!r}")
    return v


class TARFlow(nn.Module):
    """A TARFlow normalizing flow on images ``(C, H, W)``, clips ``(F, C, H, W)`` (``video=True``) or vectors
    ``(D,)`` (one coordinate per token: an affine autoregressive flow over the coordinates).

    Args:
        shape: one sample's shape without the batch: ``(C, H, W)``, ``(F, C, H, W)`` in video mode, ``(D,)``.
        patch: patch size ``p`` (must divide ``H`` and ``W``; ignored for vectors); tokens have ``C p^2``
            features.
        width, layers, heads: each block's transformer (width divisible by heads).
        blocks: number of affine autoregressive blocks ``K`` (orders alternate identity / flip).
        num_classes: classes of the class-conditional flow (``None``: unconditional); the null class
            ``num_classes`` is the unconditional branch.
        video: treat ``shape[0]`` as frames (the flip stays within frames: causal across frames).
        denoiser_layers: > 0 adds a learnable denoiser (:class:`TokenDenoiser`, flow-score matching) with
            this many non-causal layers; 0: none (denoise with the autograd score).

    ``forward(x, y) -> (z, logdet)``; :meth:`log_prob`, :meth:`inverse`, :meth:`sample`.
    """

    def __init__(self, shape: tuple[int, ...], *, patch: int = 2, width: int = 64, layers: int = 2,
                 blocks: int = 4, heads: int = 4, num_classes: int | None = None, video: bool = False,
                 mlp_ratio: int = 4, denoiser_layers: int = 0) -> None:
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if video and len(shape) != 4:
            raise FewflowError(f"video mode needs clips of shape (F, C, H, W), got {shape}")
        if not video and len(shape) not in (1, 3):
            raise FewflowError(f"TARFlow needs vectors (D,) or images (C, H, W) (clips with video=True), "
                               f"got {shape}")
        if any(s < 1 for s in shape):
            raise FewflowError(f"TARFlow needs a non-empty sample shape, got {shape}")
        self.vector = len(shape) == 1
        if self.vector:  # one coordinate per token
            patch = 1
        _check_int("blocks", blocks)
        _check_int("layers", layers)
        _check_int("patch", patch)
        _check_int("heads", heads)
        _check_int("width", width)
        if width % heads:
            raise FewflowError(f"width ({width}) must be divisible by heads ({heads})")
        c, h, w = (1, 1, shape[0]) if self.vector else shape[-3:]
        if h % patch or w % patch:
            raise FewflowError(f"patch size {patch} does not divide the image size {h}x{w}")
        if num_classes is not None:
            _check_int("num_classes", num_classes)
        self.shape, self.patch, self.video = shape, patch, video
        self.frames = shape[0] if video else 1
        self.frame_tokens = (h // patch) * (w // patch)
        self.tokens = self.frames * self.frame_tokens
        self.token_dim = c * patch * patch
        self.num_classes = num_classes
        ident = torch.arange(self.tokens)
        flip = (torch.arange(self.frames)[:, None] * self.frame_tokens
                + torch.arange(self.frame_tokens - 1, -1, -1)[None, :]).reshape(-1)
        self.blocks = nn.ModuleList(
            TARFlowBlock(self.tokens, self.token_dim, width, layers, heads, ident if k % 2 == 0 else flip,
                         num_classes=num_classes, mlp_ratio=mlp_ratio)
            for k in range(blocks)
        )
        if isinstance(denoiser_layers, bool) or not isinstance(denoiser_layers, int) or denoiser_layers < 0:
            raise FewflowError(f"denoiser_layers must be an integer >= 0, got {denoiser_layers!r}")
        self.denoiser = (TokenDenoiser(self.tokens, self.token_dim, width, denoiser_layers, heads,
                                       num_classes, mlp_ratio) if denoiser_layers else None)

    @property
    def dim(self) -> int:
        """Dimensions of one sample (``D`` in bits per dimension)."""
        return self.tokens * self.token_dim

    # -- tokens ---------------------------------------------------------------------------------------
    def tokenize(self, x: Tensor) -> Tensor:
        """``(B, *shape) -> (B, T, C p^2)`` (frame-major, patches row-major)."""
        if tuple(x.shape[1:]) != self.shape:
            raise FewflowError(f"TARFlow expects inputs of shape (B, {', '.join(map(str, self.shape))}), "
                               f"got {tuple(x.shape)}")
        b, p = x.shape[0], self.patch
        if self.vector:
            return x.reshape(b, self.tokens, 1)
        c, h, w = self.shape[-3:]
        v = x.reshape(b, self.frames, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4, 6)
        return v.reshape(b, self.tokens, self.token_dim)

    def untokenize(self, t: Tensor) -> Tensor:
        b, p = t.shape[0], self.patch
        if self.vector:
            return t.reshape(b, *self.shape)
        c, h, w = self.shape[-3:]
        v = t.reshape(b, self.frames, h // p, w // p, c, p, p).permute(0, 1, 4, 2, 5, 3, 6)
        return v.reshape(b, *self.shape)

    def _labels(self, y: Tensor | None, b: int, device: torch.device) -> Tensor | None:
        if self.num_classes is None:
            return None
        if y is None:
            return torch.full((b,), self.num_classes, device=device, dtype=torch.long)  # the null class
        return y.to(device).long().reshape(b)

    # -- density --------------------------------------------------------------------------------------
    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x -> (z, log|det dz/dx|)``; ``z`` has ``x``'s shape, the log-determinant is ``(B,)``.
        A conditional flow called without ``y`` uses the null class."""
        h = self.tokenize(x)
        yy = self._labels(y, x.shape[0], x.device)
        logdet = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        for blk in self.blocks:
            h, ld = blk(h, yy)
            logdet = logdet + ld
        return self.untokenize(h), logdet

    def log_prob(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """``log p(x) = log N(f(x); 0, I) + log|det df/dx|`` in nats, ``(B,)``."""
        z, logdet = self(x, y)
        zz = z.flatten(1)
        return -0.5 * zz.pow(2).sum(1) - 0.5 * zz.shape[1] * math.log(2 * math.pi) + logdet

    # -- sampling -------------------------------------------------------------------------------------
    @torch.no_grad()
    def inverse(self, z: Tensor, y: Tensor | None = None, *, method: str = "jacobi", threshold: float = 1e-3,
                chunk: int | None = None, max_iter: int | None = None,
                guidance: float = 0.0) -> tuple[Tensor, InverseStats]:
        """``z -> x = f^{-1}(z)``, blocks in reverse; ``method`` "sequential" or "jacobi" (see the module
        docstring); ``guidance`` ``g``: TARFlow's classifier-free guidance of every token's affine
        parameters, ``a <- a + g (a - a_null)`` and the same for ``b`` (needs a conditional flow trained with
        label dropout; ``g = 0``: none). Returns ``(x, InverseStats)``."""
        if method not in ("jacobi", "sequential"):
            raise FewflowError(f"inverse method must be 'jacobi' or 'sequential', got {method!r}")
        if not (isinstance(threshold, (int, float)) and threshold >= 0):
            raise FewflowError(f"jacobi threshold must be a number >= 0, got {threshold!r}")
        if chunk is not None:
            _check_int("chunk", chunk)
        if max_iter is not None:
            _check_int("max_iter", max_iter)
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(
                guidance):
            raise FewflowError(f"guidance must be a finite number, got {guidance!r}")
        if guidance != 0 and (self.num_classes is None or y is None):
            raise FewflowError("guidance needs a class-conditional flow and labels y")
        t0 = time.perf_counter()
        h = self.tokenize(z)
        yy = self._labels(y, z.shape[0], z.device)
        its = []
        for blk in reversed(self.blocks):
            if method == "sequential":
                h, k = blk.inverse_sequential(h, yy, guidance=guidance)
            else:
                h, k = blk.inverse_jacobi(h, yy, threshold=threshold, chunk=chunk, max_iter=max_iter,
                                          guidance=guidance)
            its.append(k)
        return self.untokenize(h), InverseStats(its, sum(its), time.perf_counter() - t0, method)

    def score(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """``grad_x log p(x)`` by autograd through the flow (``x`` is not modified)."""
        with torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            (g,) = torch.autograd.grad(self.log_prob(xg, y).sum(), xg)
        return g.detach()

    def denoise(self, x: Tensor, sigma: float, y: Tensor | None = None) -> Tensor:
        """Tweedie's one-step denoiser ``x + sigma^2 grad_x log p_sigma(x)`` with the flow's own density
        (the flow models the noise-augmented data ``x + sigma eps``, so its score is that of
        ``p_sigma``; TARFlow's score-based denoising)."""
        if sigma == 0:
            return x.clone()
        return x + sigma**2 * self.score(x, y)

    def denoiser_output(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """The learned denoiser's prediction of ``sigma grad_x(-log p(x))``, shaped like ``x``."""
        if self.denoiser is None:
            raise FewflowError("this flow has no learned denoiser (train with method.learn_denoiser=true)")
        yy = self._labels(y, x.shape[0], x.device)
        return self.untokenize(self.denoiser(self.tokenize(x), yy))

    def denoise_learned(self, x: Tensor, sigma: float, y: Tensor | None = None) -> Tensor:
        """One learned denoising step ``x - sigma D(x)`` (``D ~ sigma grad(-log p)``, so this approximates
        :meth:`denoise` without a backward pass)."""
        with torch.no_grad():
            return x - sigma * self.denoiser_output(x, y)
