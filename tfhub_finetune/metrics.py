"""Metrics: sparse-label wrappers for `fit`, and the full report for `metrics.json`.

Keras' F1Score/Precision/Recall/AUC expect one-hot or positive-class inputs;
our single-label models emit softmax probabilities against integer labels, so
thin wrappers convert before delegating to the Keras implementations.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np

from tfhub_finetune import stats


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


@keras.saving.register_keras_serializable(package="tfhub_finetune")
class PearsonCorrelation(keras.metrics.Metric):
    """Pearson's r over every example seen since the last reset (not a mean of batch values).

    Keeps the five running sums (n, x, y, x^2, y^2, xy) of the first output
    against its target, so `val_pearson` is the correlation over the whole
    validation set, the number `regression_report` writes to metrics.json.
    Keras' own `PearsonCorrelation` averages per-batch correlations, which
    differ from it on small or length-grouped batches.

    Example:

    ```python
    model.compile(loss="mse", metrics=[PearsonCorrelation()])
    ```
    """

    def __init__(self, name: str = "pearson", **kwargs):
        super().__init__(name=name, **kwargs)
        # float64 sums: STS-B scores squared over a large set lose digits in float32.
        self.sums = self.add_variable(shape=(6,), initializer="zeros", dtype="float64", name="sums")

    def update_state(self, y_true, y_pred, sample_weight=None):
        x = keras.ops.cast(keras.ops.reshape(y_pred[..., :1], (-1,)), "float64")
        y = keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "float64")[: keras.ops.shape(x)[0]]
        n = keras.ops.cast(keras.ops.shape(x)[0], "float64")
        batch = keras.ops.stack([
            n, keras.ops.sum(x), keras.ops.sum(y), keras.ops.sum(x * x), keras.ops.sum(y * y),
            keras.ops.sum(x * y),
        ])
        self.sums.assign_add(batch)

    def result(self):
        n, sx, sy, sxx, syy, sxy = (self.sums[i] for i in range(6))
        cov = n * sxy - sx * sy
        var = (n * sxx - sx * sx) * (n * syy - sy * sy)
        r = cov / keras.ops.sqrt(keras.ops.maximum(var, 1e-300))
        return keras.ops.cast(keras.ops.where(var > 0, r, 0.0), "float32")

    def reset_state(self):
        self.sums.assign(keras.ops.zeros((6,), "float64"))


class ValidationSpearman(keras.callbacks.Callback):
    """Adds `val_spearman` (over the whole validation set) to the epoch logs.

    Spearman's rho needs every prediction's rank, so it cannot be a streaming
    Keras metric; this predicts the validation data once per epoch (one extra
    inference pass). Put it before the callbacks that read the monitor.

    Example:

    ```python
    model.fit(train, validation_data=dev, callbacks=[ValidationSpearman(dev, y_dev), ...])
    ```
    """

    def __init__(self, data, targets: np.ndarray):
        super().__init__()
        self.data, self.targets = data, np.asarray(targets)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        scores = self.model.predict(self.data, verbose=0)
        value = spearman(self.targets, np.asarray(scores).reshape(len(self.targets), -1)[:, 0])
        logs["val_spearman"] = float("nan") if value is None else value


@keras.saving.register_keras_serializable(package="tfhub_finetune")
class TokenAccuracy(keras.metrics.Mean):
    """Accuracy over the positions whose label is >= 0 (token classification).

    Example:

    ```python
    model.compile(..., metrics=[TokenAccuracy()])  # labels -1 are not counted
    ```
    """

    def __init__(self, name: str = "token_accuracy", **kwargs):
        super().__init__(name=name, **kwargs)

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = keras.ops.reshape(keras.ops.cast(y_true, "int32"), (-1,))
        predicted = keras.ops.reshape(keras.ops.argmax(y_pred, axis=-1), (-1,))
        hits = keras.ops.cast(keras.ops.equal(predicted, y_true), "float32")
        # Flat: Mean averages a (batch, seq) sample weight per row first, which would weight
        # batches of different lengths differently.
        return super().update_state(hits, sample_weight=keras.ops.cast(y_true >= 0, "float32"))


def training_metrics(task: str, num_classes: int) -> list[keras.metrics.Metric]:
    """The metrics `fit` reports for a task (fresh objects each call)."""
    if task == "token_classification":
        return [TokenAccuracy()]
    if task == "regression":
        return [keras.metrics.MeanAbsoluteError(name="mae"),
                keras.metrics.RootMeanSquaredError(name="rmse"), PearsonCorrelation()]
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


def monitor_names(task: str, num_classes: int) -> list[str]:
    """What `--monitor` may name: the loss and every metric `fit` logs, plain and `val_`."""
    names = ["loss", *(m.name for m in training_metrics(task, num_classes))]
    names += [f"val_{name}" for name in names]
    if task == "regression":
        names.append("val_spearman")  # Logged by ValidationSpearman (the driver adds it).
    if task == "token_classification":
        # Logged by the token task's EntityF1 callback at each epoch end.
        names += ["val_entity_f1", "val_entity_precision", "val_entity_recall"]
    return names


def check_monitor(monitor: str, task: str, num_classes: int = 2) -> None:
    """Raises InputError unless `fit` logs `monitor` for this task.

    `num_classes` defaults to 2, the case that logs the most metrics (precision,
    recall and AUC are binary only), so a check before the data is read accepts
    every name that might apply; the driver checks again with the real count.
    """
    from tfhub_finetune.errors import InputError, did_you_mean

    names = monitor_names(task, num_classes)
    if monitor not in names:
        raise InputError(
            f"--monitor names a metric this {task} task does not log"
            + (f" with {num_classes} classes." if task == "single_label" else "."),
            received={"monitor": monitor},
            fix=did_you_mean(monitor, names),
        )


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
        # GLUE's F1 for MRPC/QQP: of class id 1 (paraphrase, duplicate).
        report["f1"] = per_class[label_names[1]]["f1"]
        report["auc"] = binary_auc(y_true == 1, probabilities[:, 1])
    report.update(intervals(stats.EvalPredictions.from_outputs("classification", y_true, probabilities)))
    return report


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson's r; None when either side is constant or has under two values."""
    x, y = np.asarray(x, np.float64).reshape(-1), np.asarray(y, np.float64).reshape(-1)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rho: Pearson's r of the tie-averaged ranks (as `scipy.stats.spearmanr`)."""
    x, y = np.asarray(x).reshape(-1), np.asarray(y).reshape(-1)
    return pearson(stats.average_ranks(x), stats.average_ranks(y)) if len(x) > 1 else None


def regression_report(y_true: np.ndarray, scores: np.ndarray) -> dict:
    """MAE, MSE, RMSE, Pearson and Spearman correlation for regression (first output).

    Example:

    ```python
    regression_report(np.array([0.0, 2.5, 5.0]), np.array([[0.4], [2.0], [4.1]]))["spearman"]  # 1.0
    ```
    """
    y_true = np.asarray(y_true, np.float64).reshape(len(y_true), -1)[:, 0]
    scores = np.asarray(scores, np.float64).reshape(len(y_true), -1)[:, 0]
    err = scores - y_true
    report = {
        "num_examples": int(len(y_true)),
        "mae": float(np.abs(err).mean()) if len(err) else None,
        "mse": float((err**2).mean()) if len(err) else None,
        "rmse": float(np.sqrt((err**2).mean())) if len(err) else None,
        "pearson": pearson(y_true, scores),
        "spearman": spearman(y_true, scores),
    }
    report.update(intervals(stats.EvalPredictions.from_outputs("regression", y_true, scores)))
    return report


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
    report = {
        "num_examples": int(len(y_true)),
        "exact_match": float((y_true == y_pred).all(axis=1).mean()),
        "macro_f1": float(np.mean(f1s)),
        "per_label": per_label,
        "labels": list(label_names),
    }
    report.update(intervals(stats.EvalPredictions.from_outputs("multi_label", y_true, probabilities)))
    return report


def intervals(predictions: stats.EvalPredictions) -> dict:
    """The `intervals` and `interval_method` entries of a report (empty for no examples).

    Every quality figure gets a seeded 95% percentile-bootstrap interval over the
    evaluation examples (`stats.bootstrap_intervals`): what a figure from this
    many examples can be trusted to.

    Example:

    ```python
    intervals(preds)
    # {'intervals': {'accuracy': [0.886, 0.934], ...}, 'interval_method': '95% bootstrap ...'}
    ```
    """
    found = stats.bootstrap_intervals(predictions)
    if not found:
        return {}
    return {
        "intervals": {name: interval.to_list() for name, interval in found.items()},
        "interval_method": (
            f"{stats.DEFAULT_LEVEL:.0%} percentile bootstrap over the {predictions.num_examples} "
            f"evaluation examples, {stats.DEFAULT_RESAMPLES} resamples, seed {stats.DEFAULT_SEED}"
        ),
    }
