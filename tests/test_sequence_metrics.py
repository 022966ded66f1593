"""Tests for fewflow.metrics.sequences on cases with known answers and against brute-force loops."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch

from fewflow import FewflowError
from fewflow.data import DNA, encode, load_dataset, one_hot
from fewflow.metrics.sequences import (
    bigram_kl,
    default_ks,
    diversity,
    floor_kmer_distance,
    gc_content,
    kmer_counts,
    kmer_distance,
    kmer_spectrum,
    markov_log_likelihood,
    motif_presence,
    novelty,
    per_position_entropy,
    score_sequences,
    unigram_kl,
)


def _rand(n: int, L: int, K: int, seed: int) -> torch.Tensor:
    return torch.randint(0, K, (n, L), generator=torch.Generator().manual_seed(seed))


def test_kmer_spectrum_matches_a_brute_force_count():
    tok = _rand(7, 9, 3, 0)
    for k in (1, 2, 3):
        counts = Counter(tuple(row[i : i + k]) for row in tok.tolist() for i in range(9 - k + 1))
        dense = kmer_spectrum(tok, 3, k, normalize=False)
        for word in itertools.product(range(3), repeat=k):
            idx = sum(a * 3 ** (k - 1 - j) for j, a in enumerate(word))
            assert dense[idx] == counts.get(word, 0)
        assert kmer_spectrum(tok, 3, k).sum().item() == pytest.approx(1.0)
    ids, c = kmer_counts(tok, 3, 2)
    assert torch.equal(kmer_spectrum(tok, 3, 2, normalize=False)[ids], c.double())


def test_kmer_distance_identical_zero_disjoint_max_and_closed_form():
    a = _rand(50, 12, 4, 1)
    for metric in ("js", "tv"):
        same = kmer_distance(a, a.clone(), K=4, metric=metric)
        assert all(v == pytest.approx(0.0, abs=1e-12) for v in same.values())
        assert set(same) == {"k1", "k2", "k3", "k4", "mean"}  # 4^5 words > the 50 * 8 five-mers seen
        disjoint = kmer_distance(_rand(20, 8, 2, 2), _rand(20, 8, 2, 3) + 2, K=4, ks=(1, 2, 3), metric=metric)
        assert all(v == pytest.approx(1.0) for v in disjoint.values())
    # JS(p, q) for p = (1, 0), q = (1/2, 1/2): H(3/4, 1/4) - (0 + 1) / 2 bits
    p_set, q_set = torch.zeros(4, 2, dtype=torch.long), torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0]])
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert kmer_distance(p_set, q_set, K=2, ks=(1,))["k1"] == pytest.approx(h - 0.5)
    assert kmer_distance(p_set, q_set, K=2, ks=(1,), metric="tv")["k1"] == pytest.approx(0.5)
    # one-hot input scores as its tokens
    assert kmer_distance(one_hot(a, 4), a[:25], ks=(2,))["k2"] == kmer_distance(a, a[:25], K=4, ks=(2,))["k2"]


def test_default_ks_caps_k_by_the_number_of_words():
    assert default_ks(4, 1000, 128) == (1, 2, 3, 4, 5, 6)
    assert default_ks(20, 200, 64) == (1, 2, 3)
    assert default_ks(20, 1, 3) == (1,)


def test_entropy_diversity_and_novelty_known_values():
    K = 4
    tok = torch.stack([torch.arange(K), torch.zeros(K, dtype=torch.long)], 1)  # col 0 uniform, col 1 constant
    h = per_position_entropy(tok, K)
    assert h[0].item() == pytest.approx(math.log(4)) and h[1].item() == pytest.approx(0.0)
    assert per_position_entropy(tok, K, base=2)[0].item() == pytest.approx(2.0)
    x = _rand(15, 10, 3, 4)
    pairs = [(i, j) for i in range(15) for j in range(15) if i != j]
    brute = sum((x[i] != x[j]).float().mean().item() for i, j in pairs) / len(pairs)
    assert diversity(x, 3) == pytest.approx(brute)
    assert diversity(torch.zeros(5, 6, dtype=torch.long), 2) == 0.0
    assert diversity(torch.tensor([[0, 0, 0], [1, 1, 1]]), 2) == 1.0
    ref = _rand(40, 10, 3, 5)
    assert novelty(ref[:12].clone(), ref) == 0.0  # copies of the reference
    s = _rand(9, 10, 3, 6)
    d = novelty(s, ref, reduction="none")
    brute_d = torch.tensor([min((si != r).float().mean().item() for r in ref) for si in s]).double()
    assert torch.allclose(d, brute_d)


def test_gc_content_and_motif_presence():
    assert gc_content("GGCCAATT") == 0.5
    assert gc_content(["GGGG", "AT"]) == pytest.approx(4 / 6)
    assert torch.allclose(gc_content(["GGGG", "AT"], per_sequence=True), torch.tensor([1.0, 0.0]).double())
    tok = encode(["GCGCAT", "ATATAT"], DNA)
    assert gc_content(tok) == pytest.approx(4 / 12)
    assert gc_content(one_hot(tok, 4), DNA) == pytest.approx(4 / 12)
    seqs = encode(["AAGATTAC", "GATTACAA", "GATCACAA", "CCCCCCCC"], DNA)
    assert motif_presence(seqs, "GATTAC", alphabet=DNA) == 0.5
    hits = motif_presence(seqs, "GATTAC", alphabet=DNA, max_mismatches=1, per_sequence=True)
    assert hits.tolist() == [True, True, True, False]
    assert motif_presence(seqs, [2, 0, 3], alphabet=DNA) == 0.75


def test_unigram_bigram_kl_and_markov_likelihood_against_direct_sums():
    P = torch.tensor([[0.9, 0.1], [0.3, 0.7]], dtype=torch.float64)
    pi = torch.tensor([0.75, 0.25], dtype=torch.float64)
    tok = torch.tensor([[0, 0, 1], [1, 1, 0]])
    f = torch.tensor([3 / 6, 3 / 6], dtype=torch.float64)
    assert unigram_kl(tok, pi) == pytest.approx(float((f * (f / pi).log()).sum()))
    assert unigram_kl(torch.tensor([[0, 0, 0, 1]]), pi) == pytest.approx(0.0, abs=1e-12)
    joint = pi[:, None] * P
    pairs = {(0, 0): 0.25, (0, 1): 0.25, (1, 1): 0.25, (1, 0): 0.25}
    direct = sum(v * math.log(v / joint[i, j].item()) for (i, j), v in pairs.items())
    assert bigram_kl(tok, joint) == pytest.approx(direct)
    ll = markov_log_likelihood(tok, P, pi)
    assert ll[0].item() == pytest.approx(math.log(0.75 * 0.9 * 0.1))
    assert ll[1].item() == pytest.approx(math.log(0.25 * 0.7 * 0.3))
    with pytest.raises(FewflowError, match=r"\(K, K\)"):
        bigram_kl(tok, pi)


def test_score_sequences_separates_the_true_chain_from_a_wrong_one():
    """Samples from the data's own chain sit at the finite-sample floors; another chain does not."""
    tr = load_dataset("markov", n=4000, seed=0)
    te = load_dataset("markov", n=2000, seed=0, split="test")
    good = load_dataset("markov", n=2000, seed=1).x
    bad = load_dataset("markov", n=2000, seed=1, matrix_seed=7).x
    rg = score_sequences(good, te.x, train=tr.x, stats=tr.meta)
    rb = score_sequences(bad, te.x, train=tr.x, stats=tr.meta)
    n_letters = 2000 * 16
    assert rg["unigram_kl"] < 10 * 3 / (2 * n_letters) and rg["bigram_kl"] < 10 * 15 / (2 * n_letters)
    assert rb["bigram_kl"] > 100 * rg["bigram_kl"]
    assert rg["kmer_js_mean"] < 3 * rg["floor_kmer_js_mean"] < rb["kmer_js_mean"]
    assert rg["markov_nll"] == pytest.approx(rg["markov_nll_exact"], rel=0.02)
    assert rb["markov_nll"] > 1.1 * rb["markov_nll_exact"]
    assert rg["heldout_diversity"] == pytest.approx(rg["diversity"], abs=0.02)
    assert score_sequences(te.x, te.x)["copy_rate"] == 1.0
    mot = load_dataset("motifs", n=500)
    r = score_sequences(mot.x, load_dataset("motifs", n=500, split="test").x, stats=mot.meta)
    assert r["motif_rate"] == 1.0
    assert score_sequences(_rand(500, 16, 4, 9), mot.x, stats=mot.meta)["motif_rate"] < 0.2
    dna = score_sequences(one_hot(_rand(30, 20, 4, 8), 4), encode(["GC" * 10] * 5, DNA), alphabet=DNA)
    assert dna["heldout_gc_content"] == 1.0 and 0.3 < dna["gc_content"] < 0.7


def test_floor_and_input_errors():
    a, b = _rand(100, 8, 4, 10), _rand(100, 8, 4, 11)
    assert floor_kmer_distance(a, b, K=4, ks=(1, 2)) == kmer_distance(b, a, K=4, ks=(1, 2))
    with pytest.raises(FewflowError, match="outside"):
        kmer_distance(a, b + 1, K=4)
    with pytest.raises(FewflowError, match="length"):
        novelty(a, b[:, :5])
    with pytest.raises(FewflowError, match="at least two"):
        diversity(a[:1], 4)
    with pytest.raises(FewflowError, match="non-integer"):
        per_position_entropy(a.float() + 0.5)
