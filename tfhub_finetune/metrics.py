"""Metrics: sparse-label wrappers for `fit`, and the full report for `metrics.json`.

Keras' F1Score/Precision/Recall/AUC expect one-hot or positive-class inputs;
our single-label models emit softmax probabilities against integer labels, so
thin wrappers convert before delegating to the Keras implementations.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np


@keras.saving.register_keras_serializable(package="tfhub_finetune")
class SparseMacroF1(keras.metrics.F1Score):
    """Macro-F1 for integer labels and softmax probabilities.

    Example:

    ```python
    model.compile(..., metrics=[SparseMacroF1(num_classes=2)])
    ```
    """

    def __init__(self, num_classes: int, name: str = "macro_f1", **kwargs):
        kwargs.pop("average", None)
        kwargs.pop("threshold", None)
        super().__init__(average="macro", threshold=None, name=name, **kwargs)
        self.num_classes = num_classes

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = keras.ops.one_hot(
            keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32"), self.num_classes
        )
        return super().update_state(y_true, y_pred, sample_weight)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


def _positive_class(y_true, y_pred):
    return keras.ops.reshape(y_true, (-1,)), y_pred[:, 1]


@keras.saving.register_keras_serializable(package="tfhub_finetune")
class BinaryPrecision(keras.metrics.Precision):
    """Precision of class 1 from 2-class softmax probabilities."""

    def update_state(self, y_true, y_pred, sample_weight=None):
        return super().update_state(*_positive_class(y_true, y_pred), sample_weight)


@keras.saving.register_keras_serializable(package="tfhub_finetune")
class BinaryRecall(keras.metrics.Recall):
    """Recall of class 1 from 2-class softmax probabilities."""

    def update_state(self, y_true, y_pred, sample_weight=None):
        return super().update_state(*_positive_class(y_true, y_pred), sample_weight)


@keras.saving.register_keras_serializable(package="tfhub_finetune")
class BinaryAUC(keras.metrics.AUC):
    """ROC AUC of class 1 from 2-class softmax probabilities."""

    def update_state(self, y_true, y_pred, sample_weight=None):
        return super().update_state(*_positive_class(y_true, y_pred), sample_weight)


def training_metrics(task: str, num_classes: int) -> list[keras.metrics.Metric]:
    """The metrics `fit` reports for a task (fresh objects each call)."""
    if task == "regression":
        return [keras.metrics.MeanAbsoluteError(name="mae"), keras.metrics.RootMeanSquaredError(name="rmse")]
    if task == "multi_label":
        return [
            keras.metrics.BinaryAccuracy(name="accuracy"),
            keras.metrics.F1Score(average="macro", threshold=0.5, name="macro_f1"),
            keras.metrics.AUC(multi_label=True, num_labels=num_classes, name="auc"),
        ]
    metrics = [
        keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
        SparseMacroF1(num_classes=num_classes),
    ]
    if num_classes == 2:
        metrics += [BinaryPrecision(name="precision"), BinaryRecall(name="recall"), BinaryAUC(name="auc")]
    return metrics


def binary_auc(y_true: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties averaged."""
    y_true = np.asarray(y_true).astype(bool)
    n_pos, n_neg = int(y_true.sum()), int((~y_true).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), np.float64)
    sorted_scores = np.asarray(scores)[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y_true].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_report(
    y_true: np.ndarray, probabilities: np.ndarray, label_names: Sequence[str]
) -> dict:
    """Accuracy, macro P/R/F1, per-class figures, confusion matrix (and binary AUC).

    Args:
        y_true: (n,) int class ids.
        probabilities: (n, num_classes) predicted probabilities.
        label_names: names of the classes, in id order.

    Returns:
        A JSON-ready dict; `confusion_matrix[i][j]` counts true class i
        predicted as j.

    Example:

    ```python
    report = classification_report(np.array([0, 1]), np.array([[.9, .1], [.2, .8]]), ["neg", "pos"])
    report["accuracy"]  # 1.0
    ```
    """
    y_true = np.asarray(y_true).astype(int).reshape(-1)
    probabilities = np.asarray(probabilities)
    k = len(label_names)
    y_pred = probabilities.argmax(axis=-1)
    confusion = np.zeros((k, k), dtype=int)
    np.add.at(confusion, (y_true, y_pred), 1)
    per_class = {}
    precisions, recalls, f1s = [], [], []
    for i, name in enumerate(label_names):
        tp = confusion[i, i]
        predicted, actual = confusion[:, i].sum(), confusion[i, :].sum()
        p = tp / predicted if predicted else 0.0
        r = tp / actual if actual else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        per_class[name] = {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(actual)}
        precisions.append(p)
        recalls.append(r)
        f1s.append(f)
    report = {
        "num_examples": int(len(y_true)),
        "accuracy": float((y_pred == y_true).mean()) if len(y_true) else 0.0,
        "macro_f1": float(np.mean(f1s)),
        "macro_precision": float(np.mean(precisions)),
        "macro_recall": float(np.mean(recalls)),
        "per_class": per_class,
        "labels": list(label_names),
        "confusion_matrix": confusion.tolist(),
    }
    if k == 2:
        report["auc"] = binary_auc(y_true == 1, probabilities[:, 1])
    return report


def regression_report(y_true: np.ndarray, scores: np.ndarray) -> dict:
    """MAE, RMSE and Pearson correlation for regression."""
    y_true = np.asarray(y_true, np.float64).reshape(-1)
    scores = np.asarray(scores, np.float64).reshape(-1)
    err = scores - y_true
    pearson = float(np.corrcoef(y_true, scores)[0, 1]) if len(y_true) > 1 else None
    return {
        "num_examples": int(len(y_true)),
        "mae": float(np.abs(err).mean()),
        "rmse": float(np.sqrt((err**2).mean())),
        "pearson": pearson,
    }


def multilabel_report(y_true: np.ndarray, probabilities: np.ndarray, label_names: Sequence[str]) -> dict:
    """Per-label and macro F1 at threshold 0.5, and exact-match accuracy."""
    y_true = np.asarray(y_true) > 0.5
    y_pred = np.asarray(probabilities) >= 0.5
    per_label, f1s = {}, []
    for i, name in enumerate(label_names):
        tp = int((y_true[:, i] & y_pred[:, i]).sum())
        p = tp / max(int(y_pred[:, i].sum()), 1)
        r = tp / max(int(y_true[:, i].sum()), 1)
        f = 2 * p * r / (p + r) if p + r else 0.0
        per_label[name] = {"precision": p, "recall": r, "f1": f, "support": int(y_true[:, i].sum())}
        f1s.append(f)
    return {
        "num_examples": int(len(y_true)),
        "exact_match": float((y_true == y_pred).all(axis=1).mean()),
        "macro_f1": float(np.mean(f1s)),
        "per_label": per_label,
        "labels": list(label_names),
    }
