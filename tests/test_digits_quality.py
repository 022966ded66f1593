"""A class-conditional CFM model trained on 8x8 digits produces samples that the frozen digits classifier
labels as the requested class, and whose unconditional class distribution is plausible."""

from __future__ import annotations

import pytest
import torch

from fewflow.config import default_config
from fewflow.metrics import class_histogram, classifier_accuracy, fd_digits
from fewflow.runs import load_run, train_run
from fewflow.sampling import generate


@pytest.mark.slow
def test_conditional_digits_samples_are_classified_as_their_label(tmp_path):
    """Also covers the lazy path: the classifier is trained on first use, inside a no-grad metric."""
    cfg = default_config("digits").replace(
        {
            "train.steps": 600,
            "train.batch_size": 128,
            "train.ckpt_every": 0,
            "train.progress": False,
            "train.device": "cpu",
            "model.hidden": 256,
        }
    )
    train_run(cfg, tmp_path / "run", figures=False)
    model, cfg = load_run(tmp_path / "run")
    y = torch.arange(300) % 10
    gen = torch.Generator().manual_seed(0)
    x = generate(model, cfg, 300, nfe=8, stepper="euler", label=y, generator=gen).x
    assert x.shape == (300, 1, 8, 8)
    acc = classifier_accuracy(x, y)
    assert acc > 0.8, acc  # chance is 0.1; measured ~0.99 after 1500 steps

    # unconditional samples (the null label, trained by label dropout): every class appears, none dominates
    null = torch.full((500,), 10)
    xu = generate(model, cfg, 500, nfe=8, stepper="euler", label=null, generator=gen).x
    frac = class_histogram(xu).double() / 500
    assert frac.min() > 0.02 and frac.max() < 0.25, frac

    # FD-digits: the samples are far closer to real digits than pure noise is
    noise = torch.rand(300, 1, 8, 8) * 2 - 1
    assert fd_digits(x) < 0.2 * fd_digits(noise)
