"""FASTA files as training data: ``fewflow train --data seqs.fasta`` trains a sequence method (GSFM by
default) and ``fewflow sample RUN --out x.fasta`` writes FASTA; bad files fail with one line, and records
left out are counted, never dropped silently."""

from __future__ import annotations

import json
import random

import pytest
from cli_helpers import assert_one_line_error, invoke

from fewflow import FewflowError
from fewflow.data import load_dataset


def _fasta(path, records) -> str:
    path.write_text("".join(f">{name}\n{seq}\n" for name, seq in records))
    return str(path)


@pytest.fixture
def dna(tmp_path) -> str:
    rng = random.Random(0)
    return _fasta(tmp_path / "s.fasta", [(f"r{i}", "".join(rng.choice("ACGT") for _ in range(12)))
                                         for i in range(200)])


def test_fasta_trains_and_samples_fasta(dna, tmp_path):
    out = tmp_path / "run"
    r = invoke(["train", "--data", dna, "--steps", "5", "--out", str(out), "--no-progress",
                "--set", "train.ckpt_every=0"])
    assert r.exit_code == 0, r.output + r.stderr
    cfg = json.loads((out / "config.json").read_text())["run_config"]
    assert cfg["method"]["name"] == "gsfm" and cfg["meta"]["alphabet"] == "ACGT"
    assert cfg["meta"]["shape"] == [12, 4] and cfg["meta"]["kind"] == "sequence"
    r = invoke(["sample", str(out), "--n", "5", "--out", str(tmp_path / "o.fasta")])
    assert r.exit_code == 0, r.output + r.stderr
    lines = (tmp_path / "o.fasta").read_text().split()
    seqs = [ln for ln in lines if not ln.startswith(">")]
    assert len(seqs) == 5 and all(len(s) == 12 and set(s) <= set("ACGT") for s in seqs)


def test_fasta_alphabet_is_inferred_and_drops_are_counted(tmp_path):
    prot = _fasta(tmp_path / "p.fa", [("a", "MKVL"), ("b", "MKQL"), ("c", "MKXL")])
    with pytest.raises(FewflowError, match="unknown letter 'X'"):
        load_dataset(prot)
    d = load_dataset(prot, unknown="drop")
    assert d.meta["alphabet"] == "ACDEFGHIKLMNPQRSTVWY" and d.x.shape == (2, 4, 20)
    assert d.meta["dropped"] == {"unknown_letters": 1} and "1 dropped" in d.description
    mixed = _fasta(tmp_path / "m.fasta", [("a", "ACGTAC"), ("b", "ACGT")])
    d = load_dataset(mixed, length=4, policy="crop")
    assert d.x.shape == (2, 4, 4)


def test_bad_fasta_is_one_error_line(tmp_path):
    mixed = _fasta(tmp_path / "m.fasta", [("a", "ACGT"), ("b", "ACGTA")])
    empty = _fasta(tmp_path / "e.fasta", [("a", "ACGT"), ("b", "")])
    for path, words in ((mixed, "length"), (empty, "empty")):
        r = invoke(["train", "--data", path, "--steps", "2", "--out", str(tmp_path / "x"), "--no-progress"])
        assert_one_line_error(r, words)
    r = invoke(["train", "--data", mixed, "--set", "data.kwargs.image_size=8", "--steps", "2",
                "--out", str(tmp_path / "y")])
    assert r.exit_code == 2
