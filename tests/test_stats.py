"""Tests for `tfhub_finetune.stats`: bootstrap intervals and paired tests with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tfhub_finetune.errors import InputError
from tfhub_finetune.metrics import (
    binary_auc,
    classification_report,
    multilabel_report,
    regression_report,
)
from tfhub_finetune.stats import (
    EvalPredictions,
    _evaluate,
    _weights,
    average_ranks,
    bootstrap_intervals,
    mcnemar_exact,
    paired_test,
)


def _classification(n: int = 500, accuracy: float = 0.91, classes: int = 6, seed: int = 0,
                    y_true: np.ndarray | None = None) -> EvalPredictions:
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, classes, n) if y_true is None else y_true
    wrong = rng.permutation(n)[: round(n * (1 - accuracy))]
    y_pred = y_true.copy()
    y_pred[wrong] = (y_true[wrong] + rng.integers(1, classes, len(wrong))) % classes
    return EvalPredictions("classification", y_true, y_pred, classes)


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (1-based) with ties shared: the textbook definition."""
    out = np.empty(len(values))
    for i, v in enumerate(values):
        out[i] = np.sum(values < v) + (np.sum(values == v) + 1) / 2
    return out


def test_mcnemar_exact_matches_the_binomial_tail():
    # 10 examples only a gets right, 2 only b: 2 * P(X <= 2 | n=12, 1/2) = 2 * 79 / 4096.
    a = [1] * 10 + [0] * 2 + [1] * 30
    b = [0] * 10 + [1] * 2 + [1] * 30
    assert mcnemar_exact(a, b) == pytest.approx(2 * 79 / 4096)
    assert mcnemar_exact(b, a) == mcnemar_exact(a, b)
    assert mcnemar_exact([1, 0, 1], [1, 0, 1]) == 1.0  # No discordant example.
    assert mcnemar_exact([1, 0] * 5, [0, 1] * 5) == 1.0  # 5 vs 5.
    assert mcnemar_exact([1] * 8, [0] * 8) == pytest.approx(2 / 256)


def test_accuracy_interval_has_the_binomial_width():
    # The case: ~91% on 500 examples is about +-2.5 points.
    preds = _classification(500, 0.91)
    interval = bootstrap_intervals(preds, ["accuracy"])["accuracy"]
    assert interval.value == pytest.approx(0.91)
    normal = 1.96 * math.sqrt(0.91 * 0.09 / 500)
    assert interval.half_width == pytest.approx(normal, abs=0.004)
    assert interval.low < 0.91 < interval.high
    # Seeded: the same resamples again; another seed, other resamples.
    assert bootstrap_intervals(preds, ["accuracy"])["accuracy"] == interval
    assert bootstrap_intervals(preds, ["accuracy"], seed=1)["accuracy"] != interval


def test_accuracy_interval_covers_the_truth_about_95_percent_of_the_time():
    rng = np.random.default_rng(5)
    covered = 0
    for _ in range(200):
        correct = rng.random(300) < 0.8
        preds = EvalPredictions("classification", np.zeros(300, int), (~correct).astype(int), 2)
        interval = bootstrap_intervals(preds, ["accuracy"], resamples=400,
                                       seed=int(rng.integers(1 << 30)))["accuracy"]
        covered += interval.low <= 0.8 <= interval.high
    assert 0.89 <= covered / 200 <= 0.99, covered


def test_point_values_match_the_metrics_reports():
    rng = np.random.default_rng(1)
    probabilities = rng.dirichlet(np.ones(3), 200)
    y_true = rng.integers(0, 3, 200)
    preds = EvalPredictions.from_outputs("classification", y_true, probabilities)
    report = classification_report(y_true, probabilities, ["a", "b", "c"])
    intervals = bootstrap_intervals(preds)
    assert set(intervals) == {"accuracy", "macro_f1", "macro_precision", "macro_recall"}
    for name, interval in intervals.items():
        assert interval.value == pytest.approx(report[name]), name
        assert interval.low <= interval.value <= interval.high

    binary = rng.dirichlet(np.ones(2), 150)
    y_binary = rng.integers(0, 2, 150)
    found = bootstrap_intervals(EvalPredictions.from_outputs("classification", y_binary, binary))
    assert found["auc"].value == pytest.approx(binary_auc(y_binary == 1, binary[:, 1]))
    # GLUE's F1 (class 1), as the report gives it for two classes.
    assert found["f1"].value == pytest.approx(
        classification_report(y_binary, binary, ["n", "p"])["f1"])

    targets = rng.normal(size=120)
    outputs = targets + rng.normal(scale=0.5, size=120)
    reg = bootstrap_intervals(EvalPredictions.from_outputs("regression", targets, outputs[:, None]))
    expected = regression_report(targets, outputs)
    assert reg["pearson"].value == pytest.approx(expected["pearson"])
    assert reg["rmse"].value == pytest.approx(expected["rmse"])
    assert reg["mae"].value == pytest.approx(expected["mae"])
    assert reg["mse"].value == pytest.approx(expected["rmse"] ** 2)
    assert reg["spearman"].value == pytest.approx(np.corrcoef(_ranks(targets), _ranks(outputs))[0, 1])

    labels = rng.random((80, 4)) < 0.4
    scores = np.clip(labels + rng.normal(scale=0.4, size=(80, 4)), 0, 1)
    multi = bootstrap_intervals(EvalPredictions.from_outputs("multi_label", labels, scores))
    expected = multilabel_report(labels, scores, list("wxyz"))
    assert multi["exact_match"].value == pytest.approx(expected["exact_match"])
    assert multi["macro_f1"].value == pytest.approx(expected["macro_f1"])


def test_average_ranks_one_code_for_the_sample_and_its_resamples():
    values = np.array([3.0, 1.0, 3.0, 2.0, 3.0])
    np.testing.assert_array_equal(average_ranks(values), [4.0, 1.0, 4.0, 2.0, 4.0])
    np.testing.assert_array_equal(average_ranks(values), _ranks(values))
    # A resample's rank of each example is its rank in the resample written out.
    counts = np.array([[2.0, 0.0, 1.0, 1.0, 0.0]])
    take = np.repeat(np.arange(5), counts[0].astype(int))
    expanded = _ranks(values[take])
    ranks = average_ranks(values, counts)[0]
    for i in np.flatnonzero(counts[0]):
        assert ranks[i] == expanded[list(take).index(i)]


def test_a_resample_scores_like_the_expanded_sample():
    """The weighted formulas equal the metric on the resample written out example by example."""
    rng = np.random.default_rng(2)
    n = 60
    y_true = rng.integers(0, 2, n)
    probabilities = rng.dirichlet(np.ones(2), n).round(1)  # Rounded: tied scores.
    cls = EvalPredictions.from_outputs("classification", y_true, probabilities)
    targets = rng.integers(0, 5, n).astype(float)  # Tied targets, as STS-B's.
    outputs = targets + rng.normal(size=n).round(1)
    reg = EvalPredictions.from_outputs("regression", targets, outputs)
    w = next(_weights(n, 3, seed=7))
    for row in w:
        take = np.repeat(np.arange(n), row.astype(int))
        got = _evaluate(cls, cls.metrics, row[None, :])
        want = classification_report(y_true[take], probabilities[take], ["n", "p"])
        for name in ("accuracy", "macro_f1", "macro_precision", "macro_recall", "f1", "auc"):
            assert got[name][0] == pytest.approx(want[name]), name
        got = _evaluate(reg, reg.metrics, row[None, :])
        t, o = targets[take], outputs[take]
        assert got["pearson"][0] == pytest.approx(np.corrcoef(t, o)[0, 1])
        assert got["spearman"][0] == pytest.approx(np.corrcoef(_ranks(t), _ranks(o))[0, 1])
        assert got["mse"][0] == pytest.approx(np.mean((o - t) ** 2))


def test_paired_test_tells_a_tie_from_a_gap():
    y_true = np.random.default_rng(3).integers(0, 6, 500)
    best = _classification(y_true=y_true, accuracy=0.915, seed=3)
    # One example apart (91.5 vs 91.3): noise.
    close = EvalPredictions("classification", y_true, best.y_pred.copy(), 6)
    right = np.flatnonzero(best.y_pred == y_true)
    close.y_pred[right[:3]] = (y_true[right[:3]] + 1) % 6
    wrong = np.flatnonzero(best.y_pred != y_true)
    close.y_pred[wrong[:2]] = y_true[wrong[:2]]
    tie = paired_test(best, close, "accuracy")
    assert tie.method == "mcnemar_exact" and tie.difference == pytest.approx(0.002)
    assert tie.p_value == pytest.approx(1.0)  # 3 vs 2 discordant.
    assert tie.low < 0 < tie.high
    # Thirty examples apart, all one way (91.5 vs 85.5): significant.
    far = EvalPredictions("classification", y_true, best.y_pred.copy(), 6)
    far.y_pred[right[:30]] = (y_true[right[:30]] + 1) % 6
    gap = paired_test(best, far, "accuracy")
    assert gap.p_value == pytest.approx(2 / 2**30) and gap.low > 0
    f1_gap = paired_test(best, far, "macro_f1")
    assert f1_gap.method == "paired_bootstrap" and f1_gap.p_value < 0.01 and f1_gap.low > 0
    f1_tie = paired_test(best, close, "macro_f1")
    assert f1_tie.p_value > 0.3
    same = paired_test(best, best, "macro_f1")
    assert same.difference == 0 and same.p_value == 1.0
    assert paired_test(far, best, "accuracy").difference == pytest.approx(-gap.difference)


def test_paired_test_needs_the_same_examples():
    a = _classification(100)
    with pytest.raises(InputError, match="same examples"):
        paired_test(a, _classification(120), "accuracy")
    with pytest.raises(InputError, match="same examples"):
        paired_test(a, _classification(100, seed=9), "accuracy")
    with pytest.raises(InputError, match="macro_f1"):
        bootstrap_intervals(a, ["macro_f2"])
    with pytest.raises(InputError, match="auc"):
        bootstrap_intervals(a, ["auc"])  # Six classes: no binary AUC.


@pytest.mark.parametrize("kind", ["classification", "regression", "multi_label"])
def test_predictions_round_trip_through_npz(tmp_path, kind):
    rng = np.random.default_rng(4)
    if kind == "classification":
        preds = EvalPredictions.from_outputs(kind, rng.integers(0, 2, 50), rng.dirichlet([1, 1], 50))
    elif kind == "regression":
        preds = EvalPredictions.from_outputs(kind, rng.normal(size=50), rng.normal(size=(50, 1)))
    else:
        preds = EvalPredictions.from_outputs(kind, rng.random((50, 11)) < 0.5, rng.random((50, 11)))
    path = tmp_path / "eval_predictions.npz"
    preds.save(path)
    again = EvalPredictions.load(path)
    assert again.kind == kind and again.num_classes == preds.num_classes
    np.testing.assert_array_equal(again.y_true, preds.y_true.astype(again.y_true.dtype))
    np.testing.assert_allclose(again.y_pred, preds.y_pred, rtol=1e-6)
    before, after = bootstrap_intervals(preds), bootstrap_intervals(again)
    assert set(before) == set(after) == set(preds.metrics)
    for name, interval in before.items():
        assert after[name].to_list() == pytest.approx(interval.to_list(), abs=1e-5), name
