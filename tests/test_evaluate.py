"""The one evaluation harness: metric keys chosen from the data, the classifier chosen from the data set
(8x8 digits or 28x28 MNIST), non-finite samples scored as diverged."""

from __future__ import annotations

import math

import pytest
import torch

from fewflow import FewflowError
from fewflow.evaluate import _image_set, metric_names, primary_metric, score


def test_metric_keys_follow_the_data():
    assert primary_metric([2]) == "sliced_w2" and primary_metric([1, 8, 8]) == "fd"
    assert metric_names([2]) == ["sliced_w2", "mmd", "energy"]
    assert metric_names([1, 28, 28], labelled=True) == ["fd", "accuracy"]


def test_vector_scores_are_zero_on_identical_sets_and_grow_with_a_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 2, generator=g)
    same = score(a, a)
    assert set(same) == {"sliced_w2", "mmd", "energy"}
    assert same["sliced_w2"] == pytest.approx(0.0, abs=1e-9) and abs(same["energy"]) < 1e-9
    shifted = score(a + 1.0, a)
    # sliced-W2 of a translation by (1, 1): the mean over directions of |<(1,1), theta>|^2, sqrt -> 1
    assert shifted["sliced_w2"] == pytest.approx(1.0, rel=0.1)
    bad = a.clone()
    bad[3, 0] = float("nan")
    assert all(math.isinf(v) for v in score(bad, a).values())


def test_the_image_classifier_is_the_data_sets():
    assert _image_set("mnist", torch.zeros(2, 1, 28, 28)) == "mnist"
    assert _image_set(None, torch.zeros(2, 1, 28, 28)) == "mnist"
    assert _image_set(None, torch.zeros(2, 1, 8, 8)) == "digits"
    with pytest.raises(FewflowError, match="no image metric"):
        _image_set(None, torch.zeros(2, 3, 32, 32))


def test_sequence_scores_are_kmer_distances():
    """One-hot sequences are scored by k-mer Jensen-Shannon distance: 0 for the same set, 1 when the two
    sets share no letter; diversity is the mean pairwise Hamming fraction."""
    import torch.nn.functional as F


    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 2, (200, 12), generator=g)
    b = torch.randint(2, 4, (200, 12), generator=g)
    oa, ob = F.one_hot(a, 4).float(), F.one_hot(b, 4).float()
    same = score(oa, oa, kind="sequence")
    assert same["kmer_js"] == pytest.approx(0.0, abs=1e-9) and 0.4 < same["diversity"] < 0.6
    assert score(oa, ob, kind="sequence")["kmer_js"] == pytest.approx(1.0, abs=1e-6)
    assert primary_metric((12, 4), "sequence") == "kmer_js"
    assert metric_names((12, 4), kind="sequence") == ["kmer_js", "diversity"]
