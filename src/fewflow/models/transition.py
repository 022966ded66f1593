"""Networks for Transition Matching (Shaul, Singer, Gat, Lipman, "Transition Matching: Scalable and
Flexible Generative Modeling", arXiv 2506.23589).

A transition-matching model is two networks:

* a **backbone** ``f(X_t, t) -> h`` giving per-token features ``h`` of shape ``(B, n_tokens, H)`` (an MLP
  over the flattened input, or a small transformer over patch tokens; FHTM's backbone is a causal
  transformer over the whole history ``X_0 .. X_t``);
* a small per-token **flow head** ``g(Y_s, s, h) -> (B, n_tokens, d)``, a flow-matching velocity in the
  head's own time ``s in [0, 1]`` that samples the latent ``Y`` of one transition token by token.

ARTM and FHTM add an **autoregressive context** across the tokens of one transition: token ``i`` of
``X_{t+1}`` is drawn conditioned on ``h`` and the already drawn tokens ``< i`` (a one-layer causal
transformer over the shifted tokens; teacher-forced in training).

Data are cut into tokens by :class:`Tokenizer`: a vector ``(B, D)`` into ``D / patch`` tokens of ``patch``
coordinates, an image ``(B, C, H, W)`` into ``(H / p) (W / p)`` patches of ``C p^2`` values (8x8 digits with
``p = 2``: 16 tokens of dimension 4).

Times given to the backbone are fewflow's (``t / T in [0, 1]``, 0 = noise, 1 = data), the same direction
as the paper's discrete ``t in {0 .. T}`` from noise ``X_0`` to data ``X_T``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fewflow._validate import FewflowError
from fewflow.models.embeddings import TimeEmbedding, TimeFeatures

__all__ = ["Tokenizer", "TransitionNet", "tokenize", "untokenize"]

KINDS = ("dtm", "artm", "fhtm")
ARCHS = ("mlp", "transformer")


class Tokenizer:
    """Cut data of shape ``shape`` (no batch dimension) into tokens and back.

    Vectors ``(D,)``: ``D / patch`` tokens of ``patch`` consecutive coordinates (``patch = D``: one token).
    Images ``(C, H, W)``: non-overlapping ``patch x patch`` squares in row-major order, each flattened in
    ``(C, p, p)`` order to ``C p^2`` values.
    """

    def __init__(self, shape: Sequence[int], patch: int) -> None:
        self.shape = tuple(int(v) for v in shape)
        self.patch = int(patch)
        if self.patch < 1:
            raise FewflowError(f"patch must be a positive integer, got {patch}")
        if len(self.shape) == 1:
            (dim,) = self.shape
            if dim % self.patch:
                raise FewflowError(f"patch {self.patch} does not divide the data dimension {dim}")
            self.n_tokens, self.token_dim = dim // self.patch, self.patch
        elif len(self.shape) == 3:
            c, h, w = self.shape
            if h % self.patch or w % self.patch:
                raise FewflowError(f"patch {self.patch} does not divide the image size {h}x{w}")
            self.grid = (h // self.patch, w // self.patch)
            self.n_tokens, self.token_dim = self.grid[0] * self.grid[1], c * self.patch**2
        else:
            raise FewflowError(f"transition matching takes vectors (D,) or images (C, H, W), got shape "
                               f"{self.shape}")

    def tokenize(self, x: Tensor) -> Tensor:
        """``(B, *shape) -> (B, n_tokens, token_dim)`` (a new tensor; ``x`` is not changed)."""
        if tuple(x.shape[1:]) != self.shape:
            raise FewflowError(f"expected data of shape (B, {', '.join(map(str, self.shape))}), got "
                               f"{tuple(x.shape)}")
        b = x.shape[0]
        if len(self.shape) == 1:
            return x.reshape(b, self.n_tokens, self.token_dim)
        c, p = self.shape[0], self.patch
        gh, gw = self.grid
        return x.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * p * p)

    def untokenize(self, tok: Tensor) -> Tensor:
        """``(B, n_tokens, token_dim) -> (B, *shape)``, the inverse of :meth:`tokenize`."""
        if tuple(tok.shape[1:]) != (self.n_tokens, self.token_dim):
            raise FewflowError(f"expected tokens of shape (B, {self.n_tokens}, {self.token_dim}), got "
                               f"{tuple(tok.shape)}")
        b = tok.shape[0]
        if len(self.shape) == 1:
            return tok.reshape(b, *self.shape)
        c, p = self.shape[0], self.patch
        gh, gw = self.grid
        return tok.reshape(b, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, *self.shape)


def tokenize(x: Tensor, patch: int) -> Tensor:
    """Tokens of a batch of vectors ``(B, D)`` or images ``(B, C, H, W)`` (see :class:`Tokenizer`)."""
    return Tokenizer(x.shape[1:], patch).tokenize(x)


def untokenize(tok: Tensor, shape: Sequence[int], patch: int) -> Tensor:
    """Data of shape ``(B, *shape)`` from its tokens (see :class:`Tokenizer`)."""
    return Tokenizer(shape, patch).untokenize(tok)


class _Block(nn.Module):
    """Pre-LayerNorm transformer block (attention written out; an optional boolean mask, True = blocked)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise FewflowError(f"width {width} must be divisible by heads {heads}")
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(w // self.heads)
        if mask is not None:
            att = att.masked_fill(mask, float("-inf"))
        x = x + self.proj((att.softmax(-1) @ v).transpose(1, 2).reshape(b, n, w))
        return x + self.mlp(self.norm2(x))


class TransitionNet(nn.Module):
    """Backbone + flow head (+ autoregressive context) of a transition-matching model.

    Args:
        shape: data shape without the batch dimension (``(D,)`` or ``(C, H, W)``).
        kind: ``"dtm"`` (independent per-token head), ``"artm"`` (autoregressive head) or ``"fhtm"``
            (autoregressive head on a causal backbone over the full history).
        patch: token size (:class:`Tokenizer`).
        arch: backbone of DTM / ARTM, ``"mlp"`` (flattened input) or ``"transformer"`` (over tokens);
            FHTM always uses a transformer.
        width: backbone width = feature size ``H``; depth: backbone blocks; heads: attention heads.
        head_hidden, head_depth: the per-token flow head (an MLP with ``head_depth`` hidden layers).
        transitions: FHTM's number of transitions ``T`` (length of the history it embeds).
        num_classes: class-conditional with a null class ``num_classes`` (``y=None`` means null).

    ``forward(x, t, y=None) -> h`` runs the backbone: ``x`` is ``(B, *shape)`` at time ``t`` (``(B,)``,
    fewflow time ``k / T``) for DTM / ARTM; for FHTM ``x`` is the history ``(B, L, *shape)`` of the states
    ``X_0 .. X_{L-1}`` and ``h`` belongs to the last one (``t`` is unused: a state's time is its index).
    """

    is_flow_map = False

    def __init__(
        self,
        shape: Sequence[int],
        kind: str = "dtm",
        patch: int = 2,
        arch: str = "mlp",
        width: int = 128,
        depth: int = 3,
        heads: int = 4,
        head_hidden: int = 64,
        head_depth: int = 2,
        transitions: int = 3,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise FewflowError(f"unknown transition kind {kind!r}; choose one of {list(KINDS)}")
        if arch not in ARCHS:
            raise FewflowError(f"unknown backbone arch {arch!r}; choose one of {list(ARCHS)}")
        if min(width, depth, head_hidden, head_depth, transitions) < 1:
            raise FewflowError("width, depth, head_hidden, head_depth and transitions must be >= 1")
        self.kind, self.arch = kind, ("transformer" if kind == "fhtm" else arch)
        self.tokens = Tokenizer(shape, patch)
        self.shape = self.tokens.shape
        self.transitions, self.num_classes, self.width = int(transitions), num_classes, width
        n, d = self.tokens.n_tokens, self.tokens.token_dim
        self.time_emb = TimeEmbedding(width, "sinusoidal", 1000.0)
        self.class_emb = nn.Embedding(num_classes + 1, width) if num_classes else None
        if self.arch == "mlp":
            dim = n * d
            layers: list[nn.Module] = [nn.Linear(dim, width * 2), nn.SiLU()]
            for _ in range(depth - 1):
                layers += [nn.Linear(width * 2, width * 2), nn.SiLU()]
            self.mlp_in, self.mlp = nn.Linear(width, width * 2), nn.Sequential(*layers)
            self.mlp_out = nn.Linear(width * 2, n * width)
        else:
            states = self.transitions if kind == "fhtm" else 1
            self.embed = nn.Linear(d, width)
            self.pos = nn.Parameter(torch.randn(1, n, width) * 0.02)
            self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(depth))
            self.norm = nn.LayerNorm(width)
            self.register_buffer("state_times", torch.arange(states, dtype=torch.float32) / self.transitions,
                                 persistent=False)
        # the flow head g(Y_s, s, h): per token, input [Y_s, features(s), h]
        self.s_features = TimeFeatures("fourier", num_frequencies=4, scale=1.0)
        hin = d + self.s_features.out_dim + width
        hl: list[nn.Module] = [nn.Linear(hin, head_hidden), nn.SiLU()]
        for _ in range(head_depth - 1):
            hl += [nn.Linear(head_hidden, head_hidden), nn.SiLU()]
        hl.append(nn.Linear(head_hidden, d))
        self.head_net = nn.Sequential(*hl)
        if kind in ("artm", "fhtm"):  # autoregressive context over the tokens of X_{t+1}
            self.ar_start = nn.Parameter(torch.zeros(1, 1, width))
            self.ar_embed = nn.Linear(d, width)
            self.ar_pos = nn.Parameter(torch.randn(1, n, width) * 0.02)
            self.ar_block = _Block(width, heads)
            self.ar_norm = nn.LayerNorm(width)
            self.register_buffer("ar_mask", torch.ones(n, n, dtype=torch.bool).triu(1), persistent=False)

    @property
    def autoregressive(self) -> bool:
        return self.kind in ("artm", "fhtm")

    # -- backbone ---------------------------------------------------------------------------------------
    def _class(self, y: Tensor | None, b: int, like: Tensor) -> Tensor | None:
        if self.class_emb is None:
            if y is not None:
                raise FewflowError("model was built without num_classes but received class labels y")
            return None
        if y is None:
            y = torch.full((b,), self.num_classes or 0, dtype=torch.long, device=like.device)
        return self.class_emb(y.long()).to(like.dtype)

    def _cond(self, t: Tensor, y: Tensor | None, b: int, like: Tensor) -> Tensor:
        emb = self.time_emb(t.to(like.dtype).reshape(-1).expand(b))
        cls = self._class(y, b, like)
        return emb if cls is None else emb + cls

    def forward(self, x: Tensor, t: Tensor | float = 0.0, y: Tensor | None = None) -> Tensor:
        """Backbone features ``h`` ``(B, n_tokens, width)`` (class docstring)."""
        if self.kind == "fhtm":
            return self.history_features(x, y)[:, -1]
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device, dtype=x.dtype)
        tok = self.tokens.tokenize(x)
        cond = self._cond(t, y, b, x)
        if self.arch == "mlp":
            hid = self.mlp(tok.reshape(b, -1)) + self.mlp_in(cond)
            return self.mlp_out(torch.nn.functional.silu(hid)).reshape(b, self.tokens.n_tokens, self.width)
        z = self.embed(tok) + self.pos + cond[:, None]
        for blk in self.blocks:
            z = blk(z)
        return self.norm(z)

    def history_features(self, hist: Tensor, y: Tensor | None = None) -> Tensor:
        """FHTM: features ``(B, L, n_tokens, width)`` of every state of a history ``(B, L, *shape)``; the
        features of state ``k`` see the states ``0 .. k`` only (block-causal attention, teacher forcing)."""
        if self.kind != "fhtm":
            raise FewflowError("history_features is FHTM's backbone")
        b, steps = hist.shape[0], hist.shape[1]
        if steps < 1 or steps > self.transitions:
            raise FewflowError(f"history length must lie in [1, {self.transitions}], got {steps}")
        n = self.tokens.n_tokens
        tok = self.tokens.tokenize(hist.reshape(b * steps, *self.shape)).reshape(b, steps, n, -1)
        times = self.state_times[:steps].to(hist.dtype)
        temb = self.time_emb(times)  # (L, width), one time per state
        z = self.embed(tok) + self.pos[:, None] + temb[None, :, None]
        cls = self._class(y, b, hist)
        if cls is not None:
            z = z + cls[:, None, None]
        z = z.reshape(b, steps * n, self.width)
        block = torch.arange(steps, device=hist.device).repeat_interleave(n)
        mask = block[None, :] > block[:, None]  # a token sees its own state and earlier ones
        for blk in self.blocks:
            z = blk(z, mask)
        return self.norm(z).reshape(b, steps, n, self.width)

    # -- head -------------------------------------------------------------------------------------------
    def head(self, y_s: Tensor, s: Tensor, h: Tensor) -> Tensor:
        """The flow head's velocity ``g(Y_s, s, h)``: ``y_s (B, n, d)``, ``s`` broadcastable to ``(B, n)``
        (or ``(B, n, 1)``), ``h (B, n, width)`` -> ``(B, n, d)``; every token independently."""
        s = torch.as_tensor(s, device=y_s.device, dtype=y_s.dtype)
        if s.dim() == 3:
            s = s[..., 0]
        s = s.expand(y_s.shape[:2])
        feats = self.s_features(s.reshape(-1)).reshape(*y_s.shape[:2], -1)
        return self.head_net(torch.cat([y_s, feats, h], dim=-1))

    def context(self, y_tokens: Tensor, h: Tensor) -> Tensor:
        """ARTM / FHTM: head conditioning ``(B, n, width)`` for every token ``i`` from ``h`` and the tokens
        ``y_tokens[:, :i]`` of the next state (teacher forcing; a causal one-layer transformer over the
        tokens shifted right by one, so token ``i`` never sees itself or later tokens)."""
        if not self.autoregressive:
            raise FewflowError("context is the autoregressive head of ARTM / FHTM")
        b = y_tokens.shape[0]
        prev = torch.cat([self.ar_start.expand(b, 1, -1).to(h.dtype), self.ar_embed(y_tokens[:, :-1])], 1)
        z = self.ar_block(prev + self.ar_pos + h, self.ar_mask)
        return self.ar_norm(z)

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, arch={self.arch}, tokens={self.tokens.n_tokens}x{self.tokens.token_dim}, "
                f"transitions={self.transitions}")
