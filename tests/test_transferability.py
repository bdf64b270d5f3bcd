"""Tests for tfhub_finetune.selection.transferability."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfhub_finetune.errors import InputError
from tfhub_finetune.selection.transferability import (
    extract_features,
    kendall_tau,
    knn_accuracy,
    linear_probe_accuracy,
    logme_score,
    score_transferability,
    weighted_kendall_tau,
)


def _clusters(n=300, classes=4, informative=4, noise_dims=12, spread=0.5, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = np.eye(classes, informative) * 3
    informative_part = centres[labels] + rng.normal(size=(n, informative)) * spread
    return np.concatenate([informative_part, rng.normal(size=(n, noise_dims))], 1), labels


def _deterministic_example():
    # No RNG: the pinned value must not depend on numpy's generator streams.
    i = np.arange(12)
    labels = i % 3
    features = np.stack([np.sin(i * (j + 1)) for j in range(3)], 1) + np.eye(3)[labels] * 1.5
    return features, labels


# --- Independent LogME references, written from the model's definition ---


def _log_evidence(f, y, alpha, beta):
    """log p(y | F, alpha, beta) / N with dense D x D algebra (no SVD, no shortcuts)."""
    n, d = f.shape
    a = alpha * np.eye(d) + beta * f.T @ f
    m = beta * np.linalg.solve(a, f.T @ y)
    _, log_det = np.linalg.slogdet(a)
    value = (
        d / 2 * math.log(alpha)
        + n / 2 * math.log(beta)
        - 0.5 * log_det
        - beta / 2 * np.sum((y - f @ m) ** 2)
        - alpha / 2 * m @ m
        - n / 2 * math.log(2 * math.pi)
    )
    return value / n


def _max_log_evidence(f, labels):
    """Mean over classes of the evidence maximised by a coarse-to-fine grid in log space."""
    values = []
    for c in np.unique(labels):
        y = (labels == c).astype(float)
        best, log_a, log_b = -np.inf, 0.0, 0.0
        for width in (6.0, 1.5, 0.4, 0.1, 0.025, 0.006, 0.0015):
            grid = np.linspace(-width, width, 13)
            best, log_a, log_b = max(
                (
                    _log_evidence(f, y, math.exp(log_a + da), math.exp(log_b + db)),
                    log_a + da,
                    log_b + db,
                )
                for da in grid
                for db in grid
            )
        values.append(best)
    return float(np.mean(values))


def _logme_icml_reference(f, labels):
    """The ICML-paper variant of the reference (`each_evidence`): eigenvectors of F^T F,
    update alpha and beta until lambda = alpha/beta moves < 1%, at most 11 times."""
    n, d = f.shape
    v, s, vh = np.linalg.svd(f.T @ f, full_matrices=True)
    values = []
    for c in np.unique(labels):
        y = (labels == c).astype(float)
        alpha, beta, lam = 1.0, 1.0, 1.0
        projected = vh @ (f.T @ y)
        for _ in range(11):
            gamma = (s / (s + lam)).sum()
            m = v @ (projected * beta / (alpha + beta * s))
            m2 = (m * m).sum()
            alpha = gamma / (m2 + 1e-5)
            res2 = ((y - f @ m) ** 2).sum()
            beta = (n - gamma) / (res2 + 1e-5)
            new_lam = alpha / beta
            if abs(new_lam - lam) / lam < 0.01:
                break
            lam = new_lam
        evidence = (
            d / 2 * np.log(alpha)
            + n / 2 * np.log(beta)
            - 0.5 * np.sum(np.log(alpha + beta * s))
            - beta / 2 * (res2 + 1e-5)
            - alpha / 2 * (m2 + 1e-5)
            - n / 2 * np.log(2 * np.pi)
        )
        values.append(evidence / n)
    return float(np.mean(values))


# --- LogME ---


def test_logme_prefers_separable_features_to_noise():
    features, labels = _clusters()
    noise = np.random.default_rng(1).normal(size=features.shape)
    assert logme_score(features, labels) > logme_score(noise, labels) + 0.5


def test_logme_pinned_value_on_fixed_example():
    # Computed once with this implementation and confirmed equal to the dense
    # maximum below (and to the ICML variant of the reference within 1e-3).
    features, labels = _deterministic_example()
    assert logme_score(features, labels) == pytest.approx(-0.44544184269545034, abs=1e-9)
    assert logme_score(features, labels) == pytest.approx(
        _max_log_evidence(features, labels), abs=1e-6
    )


@pytest.mark.parametrize("n,d", [(60, 10), (200, 32)])
def test_logme_is_the_maximum_evidence_when_examples_outnumber_dims(n, d):
    rng = np.random.default_rng(n)
    labels = rng.integers(0, 3, n)
    features = rng.normal(size=(n, d)) + np.eye(3)[labels] @ rng.normal(size=(3, d))
    assert logme_score(features, labels) == pytest.approx(
        _max_log_evidence(features, labels), abs=1e-6
    )
    assert logme_score(features, labels) == pytest.approx(
        _logme_icml_reference(features, labels), abs=1e-4
    )


def test_logme_counts_every_eigenvalue_when_dims_outnumber_examples():
    # thuml/LogME#23: with N < D the log-determinant needs the D - N zero
    # eigenvalues too. With them the score is the evidence maximum (up to the
    # reference's 11-update cap); without them it would be 1.8 higher here.
    rng = np.random.default_rng(7)
    n, d = 40, 60
    labels = rng.integers(0, 3, n)
    features = rng.normal(size=(n, d)) + np.eye(3)[labels] @ rng.normal(size=(3, d))
    score = logme_score(features, labels)
    assert score == pytest.approx(_max_log_evidence(features, labels), abs=5e-4)
    assert score == pytest.approx(_logme_icml_reference(features, labels), abs=1e-3)


def test_logme_ignores_how_classes_are_numbered():
    features, labels = _clusters(n=120, classes=3)
    renumbered = np.array([7, 2, 5])[labels]
    assert logme_score(features, renumbered) == pytest.approx(logme_score(features, labels))


def test_logme_regression_targets():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(100, 5))
    targets = features @ rng.normal(size=(5, 2)) + 0.01 * rng.normal(size=(100, 2))
    noisy = rng.normal(size=(100, 2))
    assert logme_score(features, targets, regression=True) > logme_score(
        features, noisy, regression=True
    )


@pytest.mark.parametrize(
    "features,labels,match",
    [
        (np.full((4, 2), np.nan), [0, 1, 0, 1], "NaN"),
        (np.ones((4, 2)), [0, 0, 0, 0], "two classes"),
        (np.ones((4, 2)), [0, 1, 0], "different lengths"),
        (np.ones(4), [0, 1, 0, 1], "2-D"),
        (np.ones((4, 2)), [0.5, 1, 0, 1], "integer class ids"),
    ],
)
def test_logme_rejects_bad_input(features, labels, match):
    with pytest.raises(InputError, match=match):
        logme_score(features, labels)


# --- Held-out estimators ---


def test_knn_and_linear_probe_separate_signal_from_noise():
    features, labels = _clusters()
    noise = np.random.default_rng(2).normal(size=features.shape)
    assert knn_accuracy(features, labels, k=5) > 0.95
    assert linear_probe_accuracy(features, labels) > 0.95
    assert knn_accuracy(noise, labels, k=5) < 0.5  # 4 classes: chance is 0.25.
    assert linear_probe_accuracy(noise, labels) < 0.5


def test_held_out_estimators_are_deterministic_per_seed():
    features, labels = _clusters(spread=2.0)
    assert knn_accuracy(features, labels, seed=3) == knn_accuracy(features, labels, seed=3)
    assert linear_probe_accuracy(features, labels, seed=3) == linear_probe_accuracy(
        features, labels, seed=3
    )


def test_held_out_estimators_reject_bad_arguments():
    features, labels = _clusters(n=20)
    with pytest.raises(InputError, match="`k`"):
        knn_accuracy(features, labels, k=0)
    with pytest.raises(InputError, match="larger than the number of training"):
        knn_accuracy(features, labels, k=100)
    with pytest.raises(InputError, match="holdout_fraction"):
        linear_probe_accuracy(features, labels, holdout_fraction=1.0)
    with pytest.raises(InputError, match="hold any out"):
        knn_accuracy(np.eye(2), [0, 1], k=1)


def test_score_transferability_times_each_estimator():
    features, labels = _clusters(n=120)
    scores = score_transferability(features, labels, knn_accuracy={"k": 3})
    assert set(scores) == {"logme", "knn_accuracy", "linear_probe_accuracy"}
    for score in scores.values():
        assert score.error is None and score.value is not None
        assert score.score_seconds >= 0 and score.num_examples == 120
    with pytest.raises(InputError, match="Did you mean: logme"):
        score_transferability(features, labels, estimators=["logmee"])


# --- Kendall tau ---


@pytest.mark.parametrize(
    "a,b,expected",
    [
        ([1, 2, 3, 4], [10, 20, 30, 40], 1.0),
        ([1, 2, 3, 4], [40, 30, 20, 10], -1.0),
        ([1, 2, 3, 4], [1, 3, 2, 4], 4 / 6),  # 5 concordant, 1 discordant pair
        ([1, 1, 2], [1, 2, 3], 2 / math.sqrt(2 * 3)),  # tau-b with a tie in a
        ([0.3, -0.1, 0.2, 0.0], [0.91, 0.85, 0.9, 0.8], 4 / 6),
    ],
)
def test_kendall_tau_known_values(a, b, expected):
    assert kendall_tau(a, b) == pytest.approx(expected)


def test_kendall_tau_edge_cases():
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))
    with pytest.raises(InputError, match="same length"):
        kendall_tau([1, 2], [1, 2, 3])
    with pytest.raises(InputError, match="at least two"):
        kendall_tau([1], [1])
    with pytest.raises(InputError, match="NaN"):
        kendall_tau([1, float("nan")], [1, 2])


# Reference values from scipy.stats.weightedtau (hyperbolic weights, additive, rank=True).
@pytest.mark.parametrize(
    "a,b,expected",
    [
        ([1, 2, 3, 4], [10, 20, 30, 40], 1.0),
        ([1, 2, 3, 4], [40, 30, 20, 10], -1.0),
        ([1, 1, 2], [1, 2, 3], 0.8790490729915326),
        ([0.3, -0.1, 0.2, 0.0], [0.91, 0.85, 0.9, 0.8], 0.8133333333333331),
        ([12, 2, 1, 12, 2], [1, 4, 7, 1, 0], -0.5669496815368272),  # scipy's docstring example
    ],
)
def test_weighted_kendall_tau_known_values(a, b, expected):
    assert weighted_kendall_tau(a, b) == pytest.approx(expected, abs=1e-12)


def test_weighted_kendall_tau_punishes_a_swap_at_the_top_more():
    # Plain tau cannot tell which pair was swapped; a selection can: the top is the choice.
    top = weighted_kendall_tau([1, 2, 3, 4], [1, 2, 4, 3])
    bottom = weighted_kendall_tau([1, 2, 3, 4], [2, 1, 3, 4])
    assert top == pytest.approx(0.52) and bottom == pytest.approx(0.8133333333333331)
    assert kendall_tau([1, 2, 3, 4], [1, 2, 4, 3]) == kendall_tau([1, 2, 3, 4], [2, 1, 3, 4])
    assert math.isnan(weighted_kendall_tau([2, 2, 2], [1, 2, 3]))
    with pytest.raises(InputError, match="weighted_kendall_tau needs at least two"):
        weighted_kendall_tau([1], [1])


# --- Feature extraction ---


def test_extract_features_from_a_dataset_stops_at_max_examples():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, use_bias=False)(inputs))
    x = np.arange(30, dtype="float32").reshape(10, 3)
    onehot = np.eye(2, dtype="float32")[np.arange(10) % 2]
    dataset = tf.data.Dataset.from_tensor_slices((x, onehot)).batch(4)
    features, labels = extract_features(model, dataset, max_examples=7)
    assert features.shape == (7, 2) and features.dtype == np.float32
    np.testing.assert_array_equal(labels, np.arange(7) % 2)
    np.testing.assert_allclose(features, model.predict(x[:7], verbose=0), rtol=1e-5)


def test_extract_features_from_arrays_and_dict_outputs():
    def encoder(x):
        return {"pooled_output": x * 2.0, "sequence_output": x[:, None, :]}

    x = np.ones((5, 4), dtype="float32")
    features, labels = extract_features(encoder, (x, np.array([0, 1, 0, 1, 1])), 100)
    assert features.shape == (5, 4) and np.all(features == 2.0)
    assert labels.tolist() == [0, 1, 0, 1, 1]


def test_extract_features_rejects_bad_input():
    with pytest.raises(InputError, match="max_examples"):
        extract_features(lambda x: x, (np.ones((2, 2)), np.array([0, 1])), 0)
    unlabeled = tf.data.Dataset.from_tensor_slices(np.ones((4, 2))).batch(2)
    with pytest.raises(InputError, match=r"\(x, y\)"):
        extract_features(lambda x: x, unlabeled, 4)
    with pytest.raises(InputError, match="pooled_output"):
        extract_features(
            lambda x: {"a": x, "b": x}, (np.ones((2, 2)), np.array([0, 1])), max_examples=2
        )
