"""Metrics: distances between sample sets, Fréchet distance in classifier features (FD-digits / FD-MNIST),
trajectory straightness, and wall-time / NFE bookkeeping."""

from __future__ import annotations

from fewflow.metrics.cost import CostMeter, Timer, nfe_of
from fewflow.metrics.distances import (
    energy_distance,
    median_bandwidth,
    mmd_rbf,
    sliced_wasserstein,
    two_sample_floor,
    wasserstein2,
    wasserstein_1d,
)
from fewflow.metrics.features import (
    FeatureClassifier,
    class_histogram,
    classifier_accuracy,
    classifier_features,
    classifier_predict,
    digits_classifier_accuracy,
    fd_digits,
    fd_features,
    fd_mnist,
    get_feature_classifier,
    train_feature_classifier,
)
from fewflow.metrics.frechet import frechet_distance, frechet_from_stats, gaussian_stats
from fewflow.metrics.straightness import straightness, straightness_of_model

__all__ = [
    "CostMeter", "Timer", "nfe_of",
    "energy_distance", "median_bandwidth", "mmd_rbf", "sliced_wasserstein", "two_sample_floor",
    "wasserstein2", "wasserstein_1d",
    "FeatureClassifier", "class_histogram", "classifier_accuracy", "classifier_features",
    "classifier_predict", "digits_classifier_accuracy",
    "fd_digits", "fd_features", "fd_mnist", "get_feature_classifier", "train_feature_classifier",
    "frechet_distance", "frechet_from_stats", "gaussian_stats",
    "straightness", "straightness_of_model",
]
