"""Cheap estimates of how well a frozen backbone's features suit a task.

Before fine-tuning anything, each candidate's features are extracted once for a
few hundred labelled examples and scored. The scores rank candidates for the
shortlist; `kendall_tau` and `weighted_kendall_tau` tell afterwards how well
each score's ranking agreed with the fine-tuned metric (`ranking.py` sets them
beside data-free priors).

Estimators:

- `logme_score`: LogME (You et al., ICML 2021), the log maximum evidence of a
  Bayesian linear model from features to one-hot targets, maximised over the
  prior precision alpha and noise precision beta by the fixed-point iteration
  of the reference implementation (thuml/LogME, `_fit_fixed_point`) on the SVD
  of the features, per class, averaged over classes. Higher is better; values
  are per example, comparable across candidates on the same examples.
- `knn_accuracy`: held-out accuracy of a cosine k-nearest-neighbour vote.
- `linear_probe_accuracy`: held-out accuracy of an L2-regularised multinomial
  logistic regression on standardised features.

All three are numpy only; `score_transferability` runs a set of them and
records how long each took.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from tfhub_finetune.errors import InputError, did_you_mean

# The reference's settings: at most 11 updates, stop when alpha/beta moves
# less than 0.1%, and 1e-5 added to the squared norms so a perfect fit or a
# zero weight vector cannot divide by zero.
_LOGME_MAX_ITERATIONS = 11
_LOGME_TOLERANCE = 1e-3
_LOGME_EPSILON = 1e-5


@dataclasses.dataclass(frozen=True)
class TransferabilityScore:
    """One estimator's score for one candidate.

    Attributes:
        estimator: str. `logme`, `knn_accuracy` or `linear_probe_accuracy`.
        value: float or None. The score (higher is better); None on failure.
        score_seconds: float. Time the estimator took (features already extracted).
        num_examples: int. Examples scored.
        error: str or None. Why it failed.
    """

    estimator: str
    value: float | None
    score_seconds: float
    num_examples: int
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- #
# Features
# --------------------------------------------------------------------------- #


def extract_features(
    model_or_fn: Any,
    dataset: Any,
    max_examples: int,
    *,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Runs a frozen feature extractor over labelled data.

    Args:
        model_or_fn: keras.Model or callable. Maps a batch of inputs to
            features `(batch, dim)`. A dict output must hold `pooled_output`
            (our text encoders) or a single entry; outputs of rank > 2 are
            averaged over all axes but the first and last (global average
            pooling), except per-position outputs `(batch, positions, dim)`
            with integer labels `(batch, positions)`: then every position
            labelled `>= 0` is one example (token classification; -1 marks
            padding and pieces without a tag), and `max_examples` counts
            those. Keras models are called with `training=False` inside a
            `tf.function`.
        dataset: tf.data.Dataset or tuple. A *batched* dataset of `(x, y)` or
            `(x, y, sample_weight)`, or a tuple `(x, y)` of arrays (x may be a
            dict of arrays), which is batched here.
        max_examples: int. Stop after this many examples.
        batch_size: int. Batch size for array input. Defaults to 64.

    Returns:
        `(features, labels)`: float32 `(n, dim)` and the labels, as integer
        class ids `(n,)` when they are class ids or one-hot rows, else as given.

    Raises:
        InputError: for a non-positive `max_examples`, an empty dataset,
            elements without labels, or outputs we cannot turn into vectors.

    Example:

    ```python
    features, labels = extract_features(backbone.encoder, train_ds, max_examples=500)
    logme_score(features, labels)
    ```
    """
    import tensorflow as tf

    if not isinstance(max_examples, int) or isinstance(max_examples, bool) or max_examples < 1:
        raise InputError(
            "Invalid value for `max_examples`.",
            received={"max_examples": max_examples},
            fix="Expected a positive integer, e.g. 500.",
        )
    if isinstance(dataset, tuple) and len(dataset) == 2:
        dataset = tf.data.Dataset.from_tensor_slices(dataset).batch(batch_size)
    if not isinstance(dataset, tf.data.Dataset):
        raise InputError(
            "`dataset` must be a batched tf.data.Dataset of (x, y) or a tuple (x, y) of arrays.",
            received={"dataset": type(dataset).__name__},
        )
    call = _feature_call(model_or_fn)
    features: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    seen = 0
    for element in dataset:
        if not isinstance(element, (tuple, list)) or len(element) < 2:
            raise InputError(
                "Dataset elements must be (x, y) or (x, y, sample_weight) batches.",
                received={"element": type(element).__name__},
                fix="Map the dataset to (inputs, labels) before extracting features.",
            )
        x, y = element[0], element[1]
        batch_features, batch_labels = _as_examples(call(x), np.asarray(y))
        take = min(len(batch_features), max_examples - seen)
        features.append(batch_features[:take])
        labels.append(batch_labels[:take])
        seen += take
        if seen >= max_examples:
            break
    if not seen:
        raise InputError(
            "The dataset yielded no examples.", received={"max_examples": max_examples}
        )
    return np.concatenate(features).astype(np.float32), _as_class_ids(np.concatenate(labels))


def _feature_call(model_or_fn: Any) -> Callable[[Any], Any]:
    import keras
    import tensorflow as tf

    if isinstance(model_or_fn, keras.Model):
        model = model_or_fn
        return tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    if not callable(model_or_fn):
        raise InputError(
            "`model_or_fn` must be a keras.Model or a callable.",
            received={"model_or_fn": type(model_or_fn).__name__},
        )
    return model_or_fn


def _as_examples(outputs: Any, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of one batch: per example, or per labelled position.

    Integer labels `(batch, positions)` beside outputs `(batch, positions,
    dim)` label positions (token classification): each position labelled
    `>= 0` is an example, the others (padding, later word pieces: -1) are
    left out.
    """
    array = outputs
    if isinstance(outputs, Mapping) and len(outputs) == 1:
        (array,) = outputs.values()
    if not isinstance(array, Mapping):
        array = np.asarray(array, dtype=np.float32)
        positional = (array.ndim == 3 and labels.ndim == 2
                      and np.issubdtype(labels.dtype, np.integer)
                      and labels.shape == array.shape[:2])
        if positional:
            keep = labels >= 0
            return array[keep], labels[keep]
    return _as_vectors(outputs), labels


def _as_vectors(outputs: Any) -> np.ndarray:
    if isinstance(outputs, Mapping):
        if "pooled_output" in outputs:
            outputs = outputs["pooled_output"]
        elif len(outputs) == 1:
            (outputs,) = outputs.values()
        else:
            raise InputError(
                "The feature extractor returned a dict without `pooled_output`.",
                received={"keys": sorted(outputs)},
                fix="Pass a function that returns one (batch, dim) tensor.",
            )
    array = np.asarray(outputs, dtype=np.float32)
    if array.ndim == 1:
        return array[:, None]
    if array.ndim > 2:
        return array.mean(axis=tuple(range(1, array.ndim - 1)))
    return array


def _as_class_ids(labels: np.ndarray) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] > 1:
        return labels.argmax(axis=1)
    labels = labels.reshape(len(labels), -1) if labels.ndim > 1 else labels
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    integral = (
        labels.ndim == 1
        and np.issubdtype(labels.dtype, np.floating)
        and np.all(np.isfinite(labels))
        and np.all(labels == np.round(labels))
    )
    if integral:  # Float class ids (e.g. from a CSV) -> int ids.
        return labels.astype(np.int64)
    return labels


# --------------------------------------------------------------------------- #
# LogME
# --------------------------------------------------------------------------- #


def logme_score(features: Any, labels: Any, *, regression: bool = False) -> float:
    """LogME: log maximum evidence of a linear model on the features, per example.

    For each class c (one-hot target y = [label == c]) the evidence of
    `y = F w + noise` with prior `w ~ N(0, I/alpha)` and noise precision beta
    is maximised over alpha and beta by the fixed-point updates

        gamma = sum_i sigma_i / (sigma_i + alpha/beta)
        alpha = gamma / |m|^2,   beta = (N - gamma) / |y - F m|^2

    computed on the SVD `F = U S V^T` (sigma = S^2) as the reference
    implementation does (thuml/LogME `_fit_fixed_point`: start at
    alpha = beta = 1, at most 11 updates, stop when alpha/beta changes by less
    than 0.1%), and the log evidence at the optimum divided by N is averaged
    over classes. One correction to the reference: `log |A|` sums over all D
    eigenvalues of `A = alpha I + beta F^T F`, the D - rank zero ones
    included; the reference drops those when N < D (thuml/LogME#23, fix
    agreed by the author in #24), which would favour wide features on small
    samples. With N > D the features' Gram matrix `F^T F` is
    eigendecomposed instead of F itself, as the reference does.

    Classes present in `labels` are scored; the reference's `range(max + 1)`
    would also score absent ids as all-zero targets.

    Args:
        features: array `(N, D)`. Frozen features.
        labels: array. Class ids `(N,)`, or for `regression=True` real
            targets `(N,)` or `(N, K)`.
        regression: bool. Score real targets instead of one-hot classes.
            Defaults to `False`.

    Returns:
        The LogME score (higher means a better fit; typically -2..2).

    Raises:
        InputError: for non-finite features, mismatched lengths, or fewer
            than two classes.

    Example:

    ```python
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    features = np.eye(3)[labels] * 3 + rng.normal(size=(200, 3))
    logme_score(features, labels) > logme_score(rng.normal(size=(200, 3)), labels)  # True
    ```
    """
    f = _check_features(features, "logme_score")
    n, d = f.shape
    targets = _logme_targets(labels, n, regression)
    u, sigma = _left_singular(f)
    rank = len(sigma)
    evidences = []
    for y in targets.T:
        x = u.T @ y  # y's coordinates on the feature space's left singular vectors.
        x2 = x**2
        residual_outside = max(float(y @ y - x2.sum()), 0.0)  # |y|^2 outside span(F)
        alpha, beta = 1.0, 1.0
        for _ in range(_LOGME_MAX_ITERATIONS):
            t = alpha / beta
            gamma = float((sigma / (sigma + t)).sum())
            m2 = float((sigma * x2 / (t + sigma) ** 2).sum())  # |m|^2
            res2 = float((x2 / (1 + sigma / t) ** 2).sum()) + residual_outside  # |y - F m|^2
            alpha = gamma / (m2 + _LOGME_EPSILON)
            beta = (n - gamma) / (res2 + _LOGME_EPSILON)
            if abs(alpha / beta - t) / t <= _LOGME_TOLERANCE:
                break
        # log|A| over all D eigenvalues: rank of them are alpha + beta*sigma,
        # the other D - rank are alpha.
        log_det_a = float(np.log(alpha + beta * sigma).sum()) + (d - rank) * math.log(alpha)
        evidence = (
            d / 2.0 * math.log(alpha)
            + n / 2.0 * math.log(beta)
            - 0.5 * log_det_a
            - beta / 2.0 * res2
            - alpha / 2.0 * m2
            - n / 2.0 * math.log(2 * math.pi)
        )
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def _left_singular(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """U (N, rank) and sigma = singular values squared (rank,) of `f`."""
    n, d = f.shape
    if n > d:
        # D x D Gram matrix: cheaper than an N x D SVD when N is large.
        eigenvalues, v = np.linalg.eigh(f.T @ f)
        eigenvalues, v = eigenvalues[::-1], v[:, ::-1]
    else:
        _, s, vh = np.linalg.svd(f, full_matrices=False)
        eigenvalues, v = s**2, vh.T
    # Eigenvalues below this are rounding noise (numpy's matrix_rank rule on
    # the Gram matrix); the reference's absolute 1e-10 keeps noise directions
    # in rank-deficient features, then divides by their tiny singular values.
    cutoff = max(eigenvalues[0], 0.0) * max(n, d) * np.finfo(np.float64).eps
    keep = eigenvalues > cutoff
    sigma = eigenvalues[keep]
    u = (f @ v[:, keep]) / np.sqrt(sigma)
    return u, sigma


def _logme_targets(labels: Any, n: int, regression: bool) -> np.ndarray:
    y = np.asarray(labels)
    if len(y) != n:
        raise InputError(
            "Features and labels have different lengths.",
            received={"features": n, "labels": len(y)},
        )
    if regression:
        y = y.astype(np.float64).reshape(n, -1)
        if not np.all(np.isfinite(y)):
            raise InputError("Regression targets contain NaN or inf.", received={"labels": "..."})
        return y
    ids = _check_class_ids(y, "logme_score")
    classes = np.unique(ids)
    return (ids[:, None] == classes[None, :]).astype(np.float64)


# --------------------------------------------------------------------------- #
# Held-out estimators
# --------------------------------------------------------------------------- #


def knn_accuracy(
    features: Any,
    labels: Any,
    *,
    k: int = 5,
    holdout_fraction: float = 0.3,
    seed: int = 0,
) -> float:
    """Held-out accuracy of a cosine k-nearest-neighbour classifier.

    A stratified `holdout_fraction` of the examples is classified by a
    majority vote of its `k` most cosine-similar training examples (ties go
    to the class with the larger summed similarity).

    Args:
        features: array `(N, D)`.
        labels: array `(N,)` of class ids.
        k: int. Neighbours. Defaults to 5.
        holdout_fraction: float. Share of each class held out. Defaults to 0.3.
        seed: int. Split seed. Defaults to 0.

    Returns:
        Accuracy on the held-out examples, in [0, 1].

    Raises:
        InputError: for bad `k` / `holdout_fraction` or too few examples.

    Example:

    ```python
    knn_accuracy(features, labels, k=5)  # e.g. 0.83
    ```
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise InputError("Invalid value for `k`.", received={"k": k}, fix="Expected an int >= 1.")
    f = _check_features(features, "knn_accuracy")
    ids = _check_class_ids(np.asarray(labels), "knn_accuracy", n=len(f))
    train, test = _stratified_split(ids, holdout_fraction, seed)
    if k > len(train):
        raise InputError(
            "`k` is larger than the number of training examples.",
            received={"k": k, "train_examples": len(train)},
            fix=f"Use k <= {len(train)} or more examples.",
        )
    normed = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    classes, train_ids = np.unique(ids[train], return_inverse=True)
    correct = 0
    for start in range(0, len(test), 1024):  # Chunks keep the similarity matrix small.
        rows = test[start : start + 1024]
        sims = normed[rows] @ normed[train].T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top_sims = np.take_along_axis(sims, top, axis=1)
        votes = np.zeros((len(rows), len(classes)))
        sim_sums = np.zeros((len(rows), len(classes)))
        row_index = np.repeat(np.arange(len(rows)), k)
        np.add.at(votes, (row_index, train_ids[top].ravel()), 1.0)
        np.add.at(sim_sums, (row_index, train_ids[top].ravel()), top_sims.ravel())
        # Counts decide; summed similarity (|.| <= k) only breaks ties.
        predicted = classes[np.argmax(votes * (2 * k + 1) + sim_sums, axis=1)]
        correct += int(np.sum(predicted == ids[rows]))
    return correct / len(test)


def linear_probe_accuracy(
    features: Any,
    labels: Any,
    *,
    holdout_fraction: float = 0.3,
    l2: float = 1e-3,
    max_iterations: int = 500,
    seed: int = 0,
) -> float:
    """Held-out accuracy of a logistic-regression probe on frozen features.

    Features are standardised with the training split's mean and std; an
    L2-regularised multinomial logistic regression (bias unregularised) is fit
    by Nesterov-accelerated full-batch gradient descent with step 1/L, L the
    loss's smoothness bound (largest singular value of the features squared,
    over 2N, plus `l2`), so it needs no learning-rate tuning.

    Args:
        features: array `(N, D)`.
        labels: array `(N,)` of class ids.
        holdout_fraction: float. Share of each class held out. Defaults to 0.3.
        l2: float. Weight decay strength. Defaults to 1e-3.
        max_iterations: int. Gradient steps. Defaults to 500.
        seed: int. Split seed. Defaults to 0.

    Returns:
        Accuracy on the held-out examples, in [0, 1].

    Raises:
        InputError: for bad arguments or too few examples.

    Example:

    ```python
    linear_probe_accuracy(features, labels)  # e.g. 0.88
    ```
    """
    if not (isinstance(l2, (int, float)) and l2 >= 0):
        raise InputError("Invalid value for `l2`.", received={"l2": l2}, fix="Expected >= 0.")
    if not isinstance(max_iterations, int) or max_iterations < 1:
        raise InputError(
            "Invalid value for `max_iterations`.",
            received={"max_iterations": max_iterations},
            fix="Expected an int >= 1.",
        )
    f = _check_features(features, "linear_probe_accuracy")
    ids = _check_class_ids(np.asarray(labels), "linear_probe_accuracy", n=len(f))
    train, test = _stratified_split(ids, holdout_fraction, seed)
    classes, y_train = np.unique(ids[train], return_inverse=True)
    mean, std = f[train].mean(axis=0), f[train].std(axis=0)
    std[std < 1e-12] = 1.0
    x_train, x_test = (f[train] - mean) / std, (f[test] - mean) / std
    n, d = x_train.shape
    num_classes = len(classes)
    onehot = np.eye(num_classes)[y_train]
    # Softmax cross-entropy's Hessian is at most 1/2 X^T X / N per class.
    lipschitz = _top_singular_value(x_train) ** 2 / (2 * n) + l2 + 1e-12
    step = 1.0 / lipschitz
    w, b = np.zeros((d, num_classes)), np.zeros(num_classes)
    w_prev, b_prev = w.copy(), b.copy()
    for it in range(1, max_iterations + 1):
        momentum = (it - 1) / (it + 2)
        w_look, b_look = w + momentum * (w - w_prev), b + momentum * (b - b_prev)
        logits = x_train @ w_look + b_look
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        grad_logits = (probs - onehot) / n
        grad_w = x_train.T @ grad_logits + l2 * w_look
        grad_b = grad_logits.sum(axis=0)
        w_prev, b_prev = w, b
        w, b = w_look - step * grad_w, b_look - step * grad_b
    predicted = classes[np.argmax(x_test @ w + b, axis=1)]
    return float(np.mean(predicted == ids[test]))


def _top_singular_value(x: np.ndarray, iterations: int = 30) -> float:
    # Power iteration: a full SVD of (N, D) would cost more than the probe.
    rng = np.random.default_rng(0)
    v = rng.normal(size=x.shape[1])
    v /= np.linalg.norm(v) + 1e-12
    value = 0.0
    for _ in range(iterations):
        u = x @ v
        value = float(np.linalg.norm(u))
        if value == 0.0:
            return 0.0
        v = x.T @ u
        v /= np.linalg.norm(v) + 1e-12
    return value


def _stratified_split(
    ids: np.ndarray, holdout_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    if not (isinstance(holdout_fraction, (int, float)) and 0 < holdout_fraction < 1):
        raise InputError(
            "Invalid value for `holdout_fraction`.",
            received={"holdout_fraction": holdout_fraction},
            fix="Expected a number strictly between 0 and 1, e.g. 0.3.",
        )
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for c in np.unique(ids):
        members = rng.permutation(np.flatnonzero(ids == c))
        # A class seen once stays in training: it cannot be both learned and tested.
        held = min(len(members) - 1, max(1, round(holdout_fraction * len(members))))
        test.append(members[:held])
        train.append(members[held:])
    train_idx, test_idx = np.concatenate(train), np.concatenate(test)
    if not len(test_idx):
        raise InputError(
            "Too few examples per class to hold any out.",
            received={"examples": len(ids), "classes": len(np.unique(ids))},
            fix="Give at least two examples of some class (a few dozen per class is better).",
        )
    return np.sort(train_idx), np.sort(test_idx)


# --------------------------------------------------------------------------- #
# Running several, ranking agreement
# --------------------------------------------------------------------------- #

ESTIMATORS: dict[str, Callable[..., float]] = {
    "logme": logme_score,
    "knn_accuracy": knn_accuracy,
    "linear_probe_accuracy": linear_probe_accuracy,
}


def score_transferability(
    features: Any,
    labels: Any,
    estimators: Iterable[str] = ("logme", "knn_accuracy", "linear_probe_accuracy"),
    **kwargs: Mapping[str, Any],
) -> dict[str, TransferabilityScore]:
    """Runs several estimators on the same features and times each.

    Args:
        features: array `(N, D)`.
        labels: array `(N,)` of class ids.
        estimators: iterable of str. Names from `ESTIMATORS`.
        **kwargs: dict per estimator name, passed to it, e.g.
            `knn_accuracy={"k": 10}`.

    Returns:
        Estimator name -> `TransferabilityScore`. A numerical failure is
        recorded in `error` (the other estimators still run); bad input raises.

    Raises:
        InputError: for unknown estimator names or bad features/labels.

    Example:

    ```python
    scores = score_transferability(features, labels, knn_accuracy={"k": 10})
    scores["logme"].value, scores["logme"].score_seconds
    ```
    """
    names = list(estimators)
    for name in [*names, *kwargs]:
        if name not in ESTIMATORS:
            raise InputError(
                "Unknown transferability estimator.",
                received={"estimator": name},
                fix=did_you_mean(name, ESTIMATORS),
            )
    results = {}
    for name in names:
        start = time.perf_counter()
        value: float | None = None
        error = None
        try:
            value = float(ESTIMATORS[name](features, labels, **dict(kwargs.get(name, {}))))
        except InputError:
            raise
        except (np.linalg.LinAlgError, FloatingPointError, ValueError) as err:
            error = f"{type(err).__name__}: {err}"
        results[name] = TransferabilityScore(
            estimator=name,
            value=value,
            score_seconds=round(time.perf_counter() - start, 6),
            num_examples=len(features),
            error=error,
        )
    return results


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b rank correlation (ties handled as scipy's default does).

    Args:
        a: sequence of float. E.g. a transferability score per candidate.
        b: sequence of float. E.g. the fine-tuned metric per candidate.

    Returns:
        tau in [-1, 1]; NaN when either sequence is constant (undefined).

    Raises:
        InputError: for different lengths, fewer than two items, or NaN.

    Example:

    ```python
    kendall_tau([1, 2, 3], [10, 20, 30])  # 1.0
    kendall_tau([1, 2, 3], [30, 20, 10])  # -1.0
    ```
    """
    x, y = _rank_pair(a, b, "kendall_tau")
    return _pair_tau(x, y, np.ones(len(x) * (len(x) - 1) // 2))


def weighted_kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Vigna's weighted Kendall tau: swaps near the top of either ranking cost more.

    Each pair counts with weight `1/(r_i + 1) + 1/(r_j + 1)`, `r` the 0-based
    position in a ranking by decreasing value; the statistic is averaged over
    the ranking by `a` (ties broken by `b`) and the ranking by `b` (ties broken
    by `a`). That is `scipy.stats.weightedtau`'s default (hyperbolic weights,
    additive), the measure the transferability literature reports, so our
    figures compare with its. A selection cares most whether a score's best
    candidates are fine-tuning's best: plain tau weighs a swap at the bottom
    the same.

    Args:
        a: sequence of float. E.g. a transferability score per candidate.
        b: sequence of float. E.g. the fine-tuned metric per candidate.

    Returns:
        tau_w in [-1, 1]; NaN when either sequence is constant.

    Raises:
        InputError: as `kendall_tau`.

    Example:

    ```python
    weighted_kendall_tau([1, 2, 3], [10, 20, 30])  # 1.0
    weighted_kendall_tau([12, 2, 1, 12, 2], [1, 4, 7, 1, 0])  # -0.567 (as scipy)
    ```
    """
    x, y = _rank_pair(a, b, "weighted_kendall_tau")
    return (_weighted_tau_ranked_by(x, y) + _weighted_tau_ranked_by(y, x)) / 2


def _weighted_tau_ranked_by(x: np.ndarray, y: np.ndarray) -> float:
    """Weighted tau with the pair weights from the decreasing ranking by (x, then y)."""
    rank = np.empty(len(x), np.int64)
    rank[np.lexsort((y, x))[::-1]] = np.arange(len(x))
    weight = 1.0 / (rank + 1.0)
    i, j = np.triu_indices(len(x), k=1)
    return _pair_tau(x, y, weight[i] + weight[j])


def _pair_tau(x: np.ndarray, y: np.ndarray, pair: np.ndarray) -> float:
    """Tau-b with each pair (upper triangle, row-major) counted with its weight.

    Concordant minus discordant weight over the root of the weights of the
    pairs untied in x and untied in y; unit weights give Kendall's tau-b.
    """
    i, j = np.triu_indices(len(x), k=1)
    sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    norm = math.sqrt(float(np.sum(pair * (sx != 0))) * float(np.sum(pair * (sy != 0))))
    return float(np.sum(pair * sx * sy)) / norm if norm else math.nan


def _rank_pair(a: Sequence[float], b: Sequence[float], where: str) -> tuple[np.ndarray, np.ndarray]:
    """Two finite 1-D float arrays of the same length (at least two), or InputError."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise InputError(
            f"{where} needs two 1-D sequences of the same length.",
            received={"a": x.shape, "b": y.shape},
        )
    if len(x) < 2:
        raise InputError(f"{where} needs at least two items.", received={"n": len(x)})
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise InputError(
            f"{where} inputs contain NaN or inf.",
            received={"a": x.tolist(), "b": y.tolist()},
            fix="Drop candidates without a score before correlating.",
        )
    return x, y


# --------------------------------------------------------------------------- #
# Validation
# --------------------------------------------------------------------------- #


def _check_features(features: Any, where: str) -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2 or f.shape[1] < 1:
        raise InputError(
            f"`{where}` needs a 2-D feature matrix (examples, dims) with at least two rows.",
            received={"shape": f.shape},
        )
    if not np.all(np.isfinite(f)):
        raise InputError(
            "Features contain NaN or inf.",
            received={"bad_values": int(np.sum(~np.isfinite(f)))},
            fix="Check the backbone's input normalisation.",
        )
    return f


def _check_class_ids(ids: np.ndarray, where: str, n: int | None = None) -> np.ndarray:
    if n is not None and len(ids) != n:
        raise InputError(
            "Features and labels have different lengths.",
            received={"features": n, "labels": len(ids)},
        )
    if ids.ndim != 1:
        raise InputError(
            f"`{where}` needs class ids of shape (N,).",
            received={"labels_shape": ids.shape},
            fix="Pass integer class ids, not one-hot rows (extract_features converts them).",
        )
    if np.issubdtype(ids.dtype, np.floating):
        if not np.all(ids == np.round(ids)):
            raise InputError(
                f"`{where}` needs integer class ids.",
                received={"labels": ids[:5].tolist()},
                fix="For real-valued targets use logme_score(..., regression=True).",
            )
        ids = ids.astype(np.int64)
    elif not np.issubdtype(ids.dtype, np.integer):
        raise InputError(
            f"`{where}` needs integer class ids.",
            received={"labels_dtype": str(ids.dtype)},
            fix="Map label names to ids first (LabelVocabulary).",
        )
    if len(np.unique(ids)) < 2:
        raise InputError(
            f"`{where}` needs at least two classes.",
            received={"classes": np.unique(ids).tolist()},
        )
    return ids
