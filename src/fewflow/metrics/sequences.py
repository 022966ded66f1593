"""Metrics for discrete sequences: k-mer spectra, per-position entropy, diversity, novelty, GC content,
motif presence, KL to exact unigram / bigram statistics, and :func:`score_sequences` collecting them.

Every function takes tokens ``(N, L)`` (integers in ``0..K-1``) or one-hot / probabilities ``(N, L, K)``
(read as their argmax over the last axis), on any device. ``K`` is the one-hot width, else the
``alphabet``'s size, else ``1 +`` the largest token seen.

Definitions (``N`` sequences of length ``L`` over ``K`` letters):

* k-mer spectrum: counts of the ``K^k`` words of ``k`` consecutive letters inside each sequence (no word
  crosses two sequences); word ``(a_1..a_k)`` has id ``sum_j a_j K^(k-j)``.
* k-mer distance: Jensen-Shannon divergence in bits between the normalised spectra ``p``, ``q``:
  ``JS = H((p + q) / 2) - (H(p) + H(q)) / 2`` (0 for identical spectra, 1 for disjoint ones), or total
  variation ``TV = sum |p - q| / 2`` (same range); reported per ``k`` and as the mean over ``k``.
* per-position entropy: ``H_l = -sum_a f_la log f_la`` (nats) of the letter frequencies ``f_la`` at
  position ``l``: ``log K`` for a uniform position, 0 for a constant one.
* diversity: mean Hamming distance over all pairs ``i != j``, as a fraction of ``L``; computed exactly from
  the position counts ``c_la``: ``1 - mean_l sum_a c_la (c_la - 1) / (N (N - 1))``.
* novelty: for each sample the Hamming distance (fraction of ``L``) to its nearest reference sequence;
  the mean over samples (0 when every sample copies a reference sequence). The copy rate is the fraction
  of samples at distance 0.
* ``unigram_kl`` / ``bigram_kl``: ``KL(f || p) = sum f log(f / p)`` (nats) from the empirical letter
  frequencies (pooled over positions) or adjacent-pair frequencies (pooled over the ``L - 1`` pairs) to
  the exact distribution ``p``; finite whenever ``p > 0``. For ``n`` independent letters its expected
  value under the truth is about ``(K - 1) / (2 n)`` (``(K^2 - 1) / (2 n)`` for pairs): the sampling floor.

These serve the discrete flow-matching methods (e.g. Tang et al., "Gumbel-Softmax Flow Matching with
Straight-Through Guidance for Controllable Biological Sequence Generation", arXiv:2503.17361), whose
small experiments report KL of unigram and bigram statistics, motif rates and diversity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fewflow._validate import FewflowError
from fewflow.data.sequences import Alphabet, get_alphabet, to_tokens

__all__ = [
    "bigram_kl",
    "default_ks",
    "diversity",
    "floor_kmer_distance",
    "gc_content",
    "kmer_counts",
    "kmer_distance",
    "kmer_spectrum",
    "markov_log_likelihood",
    "motif_presence",
    "novelty",
    "per_position_entropy",
    "score_sequences",
    "unigram_kl",
]

DEFAULT_KS = (1, 2, 3, 4, 5, 6)


def default_ks(K: int, n: int, L: int, max_k: int = 6) -> tuple[int, ...]:
    """The ``k`` in ``1..max_k`` whose ``K^k`` words number at most the ``n (L - k + 1)`` words of a set of
    ``n`` sequences of length ``L`` (beyond that the spectrum of a finite set is mostly empty and every
    distance saturates near 1); always at least ``k = 1``."""
    ks = [k for k in range(1, min(max_k, L) + 1) if K**k <= n * (L - k + 1)]
    return tuple(ks) or (1,)


def _infer_k(*xs: Tensor | None, alphabet: Alphabet | str | None = None, K: int | None = None) -> int:
    if K is not None:
        if not isinstance(K, int) or K < 1:
            raise FewflowError(f"K must be a positive int, got {K!r}")
        return K
    for x in xs:
        if torch.is_tensor(x) and x.dim() == 3:
            return int(x.shape[-1])
    if alphabet is not None:
        return get_alphabet(alphabet).size
    hi = 0
    for x in xs:
        if x is not None:
            tok = to_tokens(x)
            if tok.numel():
                hi = max(hi, int(tok.max()))
    return hi + 1


def _tokens(x: Tensor, K: int, name: str) -> Tensor:
    tok = to_tokens(x, K, name)
    if tok.shape[0] < 1 or tok.shape[1] < 1:
        raise FewflowError(f"{name} must hold at least one sequence of at least one letter, "
                           f"got shape {tuple(tok.shape)}")
    return tok


def kmer_counts(tokens: Tensor, K: int, k: int) -> tuple[Tensor, Tensor]:
    """Sparse k-mer spectrum: ``(ids, counts)``, the sorted ids of the words seen and their counts."""
    tok = _tokens(tokens, K, "tokens")
    if not isinstance(k, int) or k < 1 or k > tok.shape[1]:
        raise FewflowError(f"k must be an int in 1..L={tok.shape[1]}, got {k!r}")
    if k * math.log2(max(K, 2)) > 62:
        raise FewflowError(f"K^k = {K}^{k} is too many words to index")
    win = tok.unfold(1, k, 1).reshape(-1, k)
    powers = K ** torch.arange(k - 1, -1, -1, device=tok.device, dtype=torch.long)
    ids = (win * powers).sum(1)
    return torch.unique(ids, return_counts=True)


def kmer_spectrum(tokens: Tensor, K: int, k: int, normalize: bool = True) -> Tensor:
    """Dense k-mer spectrum ``(K^k,)`` (float64): frequencies summing to 1, or counts with
    ``normalize=False``. Limited to ``K^k <= 2^24`` words; :func:`kmer_counts` is the sparse form."""
    if K**k > 2**24:
        raise FewflowError(f"K^k = {K}^{k} words is too large for a dense spectrum; use kmer_counts")
    ids, counts = kmer_counts(tokens, K, k)
    out = torch.zeros(K**k, dtype=torch.float64, device=ids.device)
    out[ids] = counts.to(torch.float64)
    return out / out.sum() if normalize else out


def _aligned(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    union = torch.unique(torch.cat([a[0], b[0].to(a[0].device)]))
    p = torch.zeros(union.shape[0], dtype=torch.float64, device=union.device)
    q = torch.zeros_like(p)
    p[torch.searchsorted(union, a[0])] = a[1].to(torch.float64)
    q[torch.searchsorted(union, b[0].to(union.device))] = b[1].to(device=union.device, dtype=torch.float64)
    return p / p.sum(), q / q.sum()


def _js_bits(p: Tensor, q: Tensor) -> float:
    m = 0.5 * (p + q)

    def kl(a: Tensor) -> Tensor:
        nz = a > 0
        return (a[nz] * (a[nz] / m[nz]).log2()).sum()

    return float((0.5 * kl(p) + 0.5 * kl(q)).clamp(0.0, 1.0))


def kmer_distance(
    a: Tensor,
    b: Tensor,
    K: int | None = None,
    ks: Sequence[int] | None = None,
    metric: str = "js",
) -> dict[str, float]:
    """Distance between the normalised k-mer spectra of two sets, for each ``k`` in ``ks`` (those above the
    sequence length are skipped) and their mean: ``{"k1": ..., "k2": ..., "mean": ...}``. ``ks=None``:
    :func:`default_ks` for the smaller set (1..6 for DNA sets of hundreds of sequences, 1..3 for a few
    hundred proteins).

    ``metric="js"``: Jensen-Shannon divergence in bits; ``"tv"``: total variation. Both are 0 for identical
    spectra and 1 for disjoint supports.
    """
    if metric not in ("js", "tv"):
        raise FewflowError(f"unknown k-mer metric {metric!r}; choose one of: js, tv")
    K = _infer_k(a, b, K=K)
    ta, tb = _tokens(a, K, "a"), _tokens(b, K, "b")
    L = min(ta.shape[1], tb.shape[1])
    if ks is None:
        ks = default_ks(K, min(ta.shape[0], tb.shape[0]), L)
    use = [int(k) for k in ks if 1 <= int(k) <= L]
    if not use:
        raise FewflowError(f"no k in {tuple(ks)} fits sequences of length {L}")
    out: dict[str, float] = {}
    for k in use:
        p, q = _aligned(kmer_counts(ta, K, k), kmer_counts(tb, K, k))
        out[f"k{k}"] = _js_bits(p, q) if metric == "js" else float(0.5 * (p - q).abs().sum())
    out["mean"] = sum(out.values()) / len(use)
    return out


def floor_kmer_distance(
    train: Tensor,
    heldout: Tensor,
    K: int | None = None,
    ks: Sequence[int] | None = None,
    metric: str = "js",
) -> dict[str, float]:
    """The k-mer distance between held-out and training data: what samples from the data distribution
    itself score (at the held-out set's size); a model's ``kmer_distance(samples, heldout)`` near it is
    as close as the finite sets can tell."""
    return kmer_distance(heldout, train, K=K, ks=ks, metric=metric)


def per_position_entropy(tokens: Tensor, K: int | None = None, base: float = math.e) -> Tensor:
    """Entropy of the letter frequencies at each position, ``(L,)`` float64 (nats; ``base=2`` for bits)."""
    K = _infer_k(tokens, K=K)
    tok = _tokens(tokens, K, "tokens")
    f = torch.nn.functional.one_hot(tok, K).to(torch.float64).mean(0)  # (L, K)
    h = -(f * torch.where(f > 0, f.log(), torch.zeros_like(f))).sum(-1)
    return h / math.log(base)


def diversity(tokens: Tensor, K: int | None = None) -> float:
    """Mean pairwise Hamming distance over all pairs ``i != j``, as a fraction of ``L`` (exact, O(NLK))."""
    K = _infer_k(tokens, K=K)
    tok = _tokens(tokens, K, "tokens")
    N = tok.shape[0]
    if N < 2:
        raise FewflowError("diversity needs at least two sequences")
    c = torch.nn.functional.one_hot(tok, K).to(torch.float64).sum(0)  # (L, K)
    agree = (c * (c - 1)).sum(-1) / (N * (N - 1))
    return float(1.0 - agree.mean())


def novelty(
    samples: Tensor,
    reference: Tensor,
    K: int | None = None,
    reduction: str = "mean",
    chunk: int = 1024,
) -> float | Tensor:
    """Hamming distance (fraction of ``L``) from each sample to its nearest reference sequence.

    ``reduction="mean"`` returns the mean (a float), ``"none"`` the ``(N,)`` distances. Computed exactly by
    matching one-hot rows (``agreements = onehot(s) . onehot(r)``), ``chunk`` samples at a time.
    """
    if reduction not in ("mean", "none"):
        raise FewflowError(f"unknown reduction {reduction!r}; choose one of: mean, none")
    K = _infer_k(samples, reference, K=K)
    ts, tr = _tokens(samples, K, "samples"), _tokens(reference, K, "reference")
    if ts.shape[1] != tr.shape[1]:
        raise FewflowError(f"samples have length {ts.shape[1]} but the reference has length {tr.shape[1]}")
    L = ts.shape[1]
    dtype = torch.float32 if L <= 2**24 else torch.float64
    ref = torch.nn.functional.one_hot(tr.to(ts.device), K).to(dtype).reshape(tr.shape[0], -1)
    best = []
    for i in range(0, ts.shape[0], chunk):
        s = torch.nn.functional.one_hot(ts[i : i + chunk], K).to(dtype).reshape(-1, L * K)
        best.append((s @ ref.T).max(1).values)
    dist = (L - torch.cat(best).round()).to(torch.float64) / L
    return float(dist.mean()) if reduction == "mean" else dist


def gc_content(
    seqs: Tensor | Sequence[str],
    alphabet: Alphabet | str = "ACGT",
    per_sequence: bool = False,
) -> float | Tensor:
    """Fraction of letters that are ``G`` or ``C`` (tokens / one-hot with ``alphabet``, or strings).

    The mean over all letters (a float), or one fraction per sequence with ``per_sequence=True``.
    """
    if isinstance(seqs, str):
        seqs = [seqs]
    if not torch.is_tensor(seqs):
        strs = list(seqs)
        if not strs or not all(isinstance(s, str) and s for s in strs):
            raise FewflowError("gc_content takes non-empty strings or a token tensor")
        per = torch.tensor([sum(c in "GCgc" for c in s) / len(s) for s in strs], dtype=torch.float64)
        total = sum(sum(c in "GCgc" for c in s) for s in strs) / sum(len(s) for s in strs)
        return per if per_sequence else float(total)
    alpha = get_alphabet(alphabet)
    gc = [alpha.index(c) for c in "GC" if alpha.index(c) is not None]
    if not gc:
        raise FewflowError(f"the alphabet {alpha.letters} has neither G nor C")
    tok = _tokens(seqs, alpha.size, "sequences")
    is_gc = torch.zeros(tok.shape, dtype=torch.bool, device=tok.device)
    for g in gc:
        is_gc |= tok == g
    per = is_gc.to(torch.float64).mean(1)
    return per if per_sequence else float(per.mean())


def _motif_tokens(motif: Tensor | Sequence[int] | str, alphabet: Alphabet | str | None) -> Tensor:
    if isinstance(motif, str):
        if alphabet is None:
            raise FewflowError("a motif given as letters needs alphabet=")
        alpha = get_alphabet(alphabet)
        idx = [alpha.index(c) for c in motif]
        if not motif or any(i is None for i in idx):
            raise FewflowError(f"motif {motif!r} has letters outside {alpha.letters}")
        return torch.tensor(idx, dtype=torch.long)
    m = torch.as_tensor(motif).long().reshape(-1)
    if m.numel() < 1:
        raise FewflowError("the motif is empty")
    return m


def motif_presence(
    tokens: Tensor,
    motif: Tensor | Sequence[int] | str,
    alphabet: Alphabet | str | None = None,
    max_mismatches: int = 0,
    per_sequence: bool = False,
) -> float | Tensor:
    """Fraction of sequences holding ``motif`` at some position with at most ``max_mismatches`` letters
    different (``per_sequence=True``: one bool per sequence). ``motif``: tokens, or letters with
    ``alphabet``."""
    m = _motif_tokens(motif, alphabet)
    K = _infer_k(tokens, alphabet=alphabet)
    tok = _tokens(tokens, K, "tokens")
    if m.numel() > tok.shape[1]:
        raise FewflowError(f"the motif ({m.numel()} letters) is longer than the sequences ({tok.shape[1]})")
    win = tok.unfold(1, m.numel(), 1)  # (N, W, m)
    mism = (win != m.to(tok.device)).sum(-1).min(1).values
    hit = mism <= int(max_mismatches)
    return hit if per_sequence else float(hit.to(torch.float64).mean())


def _kl(f: Tensor, p: Tensor, name: str) -> float:
    p = torch.as_tensor(p, dtype=torch.float64).to(f.device).reshape(-1)
    if p.shape != f.shape:
        raise FewflowError(f"the exact {name} has {p.numel()} entries, expected {f.numel()}")
    nz = f > 0
    if bool((p[nz] <= 0).any()):
        return math.inf
    return float((f[nz] * (f[nz] / p[nz]).log()).sum())


def unigram_kl(tokens: Tensor, unigram: Tensor) -> float:
    """``KL(f || p)`` (nats) from the letter frequencies ``f`` (pooled over positions) to ``p`` ``(K,)``."""
    K = int(torch.as_tensor(unigram).numel())
    tok = _tokens(tokens, K, "tokens")
    f = torch.bincount(tok.reshape(-1), minlength=K).to(torch.float64)
    return _kl(f / f.sum(), unigram, "unigram")


def bigram_kl(tokens: Tensor, bigram: Tensor) -> float:
    """``KL(f || p)`` (nats) from the adjacent-pair frequencies ``f`` (pooled over the ``L - 1`` pairs) to
    the exact joint ``p`` ``(K, K)`` (``p_ij = P(x_l = i, x_{l+1} = j)``)."""
    b = torch.as_tensor(bigram)
    if b.dim() != 2 or b.shape[0] != b.shape[1]:
        raise FewflowError(f"the exact bigram must be a (K, K) matrix, got shape {tuple(b.shape)}")
    K = int(b.shape[0])
    tok = _tokens(tokens, K, "tokens")
    if tok.shape[1] < 2:
        raise FewflowError("bigram_kl needs sequences of length >= 2")
    pairs = tok[:, :-1] * K + tok[:, 1:]
    f = torch.bincount(pairs.reshape(-1), minlength=K * K).to(torch.float64)
    return _kl(f / f.sum(), b, "bigram")


def markov_log_likelihood(tokens: Tensor, transition: Tensor, initial: Tensor) -> Tensor:
    """Exact log-probability (nats) of each sequence under a first-order Markov chain:
    ``log initial[x_1] + sum_l log transition[x_l, x_{l+1}]``, shape ``(N,)`` float64."""
    P = torch.as_tensor(transition, dtype=torch.float64)
    K = int(P.shape[0])
    tok = _tokens(tokens, K, "tokens")
    P = P.to(tok.device)
    pi = torch.as_tensor(initial, dtype=torch.float64).to(tok.device)
    ll = pi.log()[tok[:, 0]]
    if tok.shape[1] > 1:
        ll = ll + P.log()[tok[:, :-1], tok[:, 1:]].sum(1)
    return ll


def score_sequences(
    samples: Tensor,
    heldout: Tensor,
    alphabet: Alphabet | str | None = None,
    *,
    K: int | None = None,
    ks: Sequence[int] | None = None,
    train: Tensor | None = None,
    stats: dict[str, Any] | None = None,
) -> dict[str, float]:
    """All sequence metrics of ``samples`` against ``heldout`` data, as one flat dict of floats.

    Keys: ``kmer_js_k{k}`` and ``kmer_js_mean`` (samples vs held-out; ``ks=None``: :func:`default_ks` of
    the smaller of the two sets, the same ``ks`` for the floor), ``entropy`` / ``heldout_entropy``
    (mean per-position entropy, nats), ``diversity`` / ``heldout_diversity``, ``novelty`` and ``copy_rate``
    (nearest held-out sequence). With ``train``: ``floor_kmer_js_k{k}`` / ``floor_kmer_js_mean`` (held-out vs
    train), ``novelty_train`` and ``copy_rate_train`` (samples that copy a training sequence). DNA alphabet
    (``ACGT``): ``gc_content`` / ``heldout_gc_content``. ``stats`` (a sequence data set's ``meta``):
    ``unigram_kl`` (key ``"unigram"``), ``bigram_kl`` (``"bigram"``), ``markov_nll`` (mean negative
    log-likelihood per letter under ``"transition"`` / ``"stationary"``) beside ``markov_nll_exact`` (its
    value for the chain itself: ``(H(pi) + (L - 1) h) / L``, ``h`` the entropy rate), and ``motif_rate``
    (fraction of samples holding one of ``"motifs"`` exactly).
    """
    K = _infer_k(samples, heldout, train, alphabet=alphabet, K=K)
    s, h = _tokens(samples, K, "samples"), _tokens(heldout, K, "heldout")
    if s.shape[1] != h.shape[1]:
        raise FewflowError(
            f"samples have length {s.shape[1]} but held-out sequences have length {h.shape[1]}"
        )
    h = h.to(s.device)
    if ks is None:
        ks = default_ks(K, min(s.shape[0], h.shape[0]), s.shape[1])
    out: dict[str, float] = {}
    for key, v in kmer_distance(s, h, K=K, ks=ks).items():
        out[f"kmer_js_{key}"] = v
    out["entropy"] = float(per_position_entropy(s, K).mean())
    out["heldout_entropy"] = float(per_position_entropy(h, K).mean())
    if s.shape[0] > 1:
        out["diversity"] = diversity(s, K)
    if h.shape[0] > 1:
        out["heldout_diversity"] = diversity(h, K)
    d = novelty(s, h, K=K, reduction="none")
    assert isinstance(d, Tensor)
    out["novelty"], out["copy_rate"] = float(d.mean()), float((d == 0).to(torch.float64).mean())
    if train is not None:
        tr = _tokens(train, K, "train").to(s.device)
        for key, v in floor_kmer_distance(tr, h, K=K, ks=ks).items():
            out[f"floor_kmer_js_{key}"] = v
        d = novelty(s, tr, K=K, reduction="none")
        assert isinstance(d, Tensor)
        out["novelty_train"] = float(d.mean())
        out["copy_rate_train"] = float((d == 0).to(torch.float64).mean())
    if alphabet is not None and get_alphabet(alphabet).letters == "ACGT":
        out["gc_content"] = float(gc_content(s, alphabet))
        out["heldout_gc_content"] = float(gc_content(h, alphabet))
    stats = stats or {}
    if stats.get("unigram") is not None:
        out["unigram_kl"] = unigram_kl(s, stats["unigram"])
    if stats.get("bigram") is not None:
        out["bigram_kl"] = bigram_kl(s, stats["bigram"])
    if stats.get("transition") is not None and stats.get("stationary") is not None:
        pi = torch.as_tensor(stats["stationary"], dtype=torch.float64)
        P = torch.as_tensor(stats["transition"], dtype=torch.float64)
        L = s.shape[1]
        out["markov_nll"] = float(-markov_log_likelihood(s, P, pi).mean() / L)
        h_pi = float(-(pi * pi.log()).sum())
        rate = float(-(pi[:, None] * P * P.log()).sum())
        out["markov_nll_exact"] = (h_pi + (L - 1) * rate) / L
    if stats.get("motifs") is not None:
        motifs = torch.as_tensor(stats["motifs"]).long()
        hits = torch.zeros(s.shape[0], dtype=torch.bool, device=s.device)
        for m in motifs:
            if m.numel() <= s.shape[1]:
                hit = motif_presence(s, m, per_sequence=True)
                assert isinstance(hit, Tensor)
                hits |= hit
        out["motif_rate"] = float(hits.to(torch.float64).mean())
    return out
