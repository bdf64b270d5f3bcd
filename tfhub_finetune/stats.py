"""How sure a quality figure is: bootstrap intervals and paired tests over evaluation examples.

On 500 evaluation examples one example is 0.2 points and the 95% interval of
a ~91% accuracy is about +-2.5 points, so "91.2 beats 91.5" means nothing
until a test on the same examples says so. Everything here works on what a
model predicted for each evaluation example (`EvalPredictions`), so the
driver, selection and tests share one implementation.

The bootstrap is vectorised: a resample is a row of example counts `W`
(resamples x examples), and every metric is written as sums weighted by `W`
(accuracy `W @ correct`, per-class counts `W @ one_hot`, Pearson from
weighted moments, ranks from cumulative weights), so 1,000 resamples of a few
thousand examples take milliseconds. A paired comparison draws the same rows
for both models.

Example:

```python
preds = EvalPredictions.from_outputs("classification", y_true, probabilities)
bootstrap_intervals(preds)["accuracy"]        # Interval(value=0.91, low=0.886, high=0.934)
paired_test(preds, other_preds, "accuracy")   # PairedTest(..., p_value=0.61)
```
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from tfhub_finetune.errors import InputError

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95
DEFAULT_SEED = 0
KINDS = ("classification", "regression", "multi_label")
# Largest resamples x examples block of weights built at once (float64: 64 MB).
_MAX_CELLS = 1 << 23

# Which metrics each kind of prediction supports ("f1", of class 1 as GLUE's MRPC F1, only for
# two classes; "auc" only for two classes with scores).
METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "macro_f1", "macro_precision", "macro_recall", "f1", "auc"),
    "regression": ("mse", "rmse", "mae", "pearson", "spearman"),
    "multi_label": ("exact_match", "macro_f1"),
}
# Metrics where smaller is better (a paired difference is still reported as a - b).
LOWER_IS_BETTER = ("mse", "rmse", "mae")


@dataclasses.dataclass(frozen=True)
class EvalPredictions:
    """What a model predicted for each evaluation example, in file order.

    Attributes:
        kind: str. `classification`, `regression` or `multi_label`.
        y_true: array. (n,) class ids, (n,) targets, or (n, labels) bools.
        y_pred: array. (n,) predicted ids, (n,) predictions, or (n, labels) bools.
        num_classes: int. Classes (or labels); 1 for regression.
        scores: array or None. (n,) positive-class probability, for binary AUC.

    Example:

    ```python
    preds = EvalPredictions.from_outputs("classification", [0, 1], [[.9, .1], [.3, .7]])
    preds.save("model_dir/eval_predictions.npz")
    ```
    """

    kind: str
    y_true: np.ndarray
    y_pred: np.ndarray
    num_classes: int
    scores: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError("Unknown prediction kind.", received={"kind": self.kind},
                             fix=f"Expected one of: {', '.join(KINDS)}.")
        if len(self.y_true) != len(self.y_pred):
            raise InputError(
                "Predictions and targets differ in length.",
                received={"targets": len(self.y_true), "predictions": len(self.y_pred)},
            )

    @classmethod
    def from_outputs(cls, kind: str, y_true: Sequence | np.ndarray,
                     outputs: Sequence | np.ndarray) -> EvalPredictions:
        """From a model's raw outputs: class probabilities, sigmoid scores or regression values.

        Args:
            kind: str. `classification` (outputs (n, classes) probabilities),
                `multi_label` (outputs (n, labels), thresholded at 0.5) or
                `regression` (outputs (n,) or (n, 1)).
            y_true: targets, as the report functions take them.
            outputs: what `model.predict` returned.
        """
        outputs = np.asarray(outputs)
        if kind == "classification":
            probabilities = outputs.reshape(len(outputs), -1)
            k = probabilities.shape[1]
            return cls(kind, np.asarray(y_true).astype(np.int64).reshape(-1),
                       probabilities.argmax(axis=-1), k,
                       probabilities[:, 1].astype(np.float32) if k == 2 else None)
        if kind == "multi_label":
            return cls(kind, np.asarray(y_true) > 0.5, outputs >= 0.5, outputs.shape[-1])
        # The first output, as `metrics.regression_report` scores it.
        targets = np.asarray(y_true, np.float64)
        return cls(kind, targets.reshape(len(targets), -1)[:, 0],
                   outputs.astype(np.float64).reshape(len(outputs), -1)[:, 0], 1)

    @property
    def num_examples(self) -> int:
        return len(self.y_true)

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics these predictions can be scored on."""
        names = METRICS[self.kind]
        if self.kind == "classification" and self.num_classes != 2:
            names = tuple(n for n in names if n != "f1")
        if self.kind == "classification" and (self.scores is None or self.num_classes != 2):
            names = tuple(n for n in names if n != "auc")
        return names

    def save(self, path: str | Path) -> None:
        """Writes a compact `.npz` (class ids as small ints), atomically."""
        from tfhub_finetune.io_utils import atomic_path

        small = np.int16 if self.num_classes < 2**15 else np.int64
        arrays = {"kind": np.array(self.kind), "num_classes": np.array(self.num_classes)}
        if self.kind == "classification":
            arrays.update(y_true=self.y_true.astype(small), y_pred=self.y_pred.astype(small))
        elif self.kind == "multi_label":
            arrays.update(y_true=np.packbits(self.y_true, axis=1),
                          y_pred=np.packbits(self.y_pred, axis=1))
        else:
            # Targets exactly (paired tests compare them); predictions at the model's float32.
            arrays.update(y_true=self.y_true.astype(np.float64),
                          y_pred=self.y_pred.astype(np.float32))
        if self.scores is not None:
            arrays["scores"] = self.scores.astype(np.float32)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> EvalPredictions:
        with np.load(path) as data:
            kind, k = str(data["kind"]), int(data["num_classes"])
            y_true, y_pred = data["y_true"], data["y_pred"]
            if kind == "multi_label":
                y_true = np.unpackbits(y_true, axis=1, count=k).astype(bool)
                y_pred = np.unpackbits(y_pred, axis=1, count=k).astype(bool)
            elif kind == "classification":
                y_true, y_pred = y_true.astype(np.int64), y_pred.astype(np.int64)
            else:
                y_true, y_pred = y_true.astype(np.float64), y_pred.astype(np.float64)
            scores = data.get("scores")
        return cls(kind, y_true, y_pred, k, scores)


@dataclasses.dataclass(frozen=True)
class Interval:
    """A figure and its bootstrap interval.

    Attributes:
        value: float. The figure on all examples.
        low: float. Lower end of the interval.
        high: float. Upper end.
        level: float. Coverage, e.g. 0.95.
    """

    value: float
    low: float
    high: float
    level: float = DEFAULT_LEVEL

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def to_list(self) -> list[float | None]:
        """`[low, high]` for JSON; None where no resample gave a figure (e.g. a constant output)."""
        return [_round(self.low), _round(self.high)]


@dataclasses.dataclass(frozen=True)
class PairedTest:
    """Two models compared on the same examples.

    Attributes:
        metric: str.
        a: float. Model a's figure.
        b: float. Model b's figure.
        difference: float. `a - b`.
        low: float. Lower end of the difference's interval.
        high: float. Upper end.
        p_value: float. Two-sided: how likely a difference this large is when
            the two models are equally good on such examples.
        method: str. `mcnemar_exact` (accuracy) or `paired_bootstrap`.
    """

    metric: str
    a: float
    b: float
    difference: float
    low: float
    high: float
    p_value: float
    method: str

    def to_dict(self) -> dict[str, float | str]:
        return {k: _round(v) if isinstance(v, float) else v
                for k, v in dataclasses.asdict(self).items()}


def metric_values(predictions: EvalPredictions,
                  metrics: Sequence[str] | None = None) -> dict[str, float]:
    """Each metric on all examples (the figures the intervals are around).

    Example:

    ```python
    metric_values(preds, ["accuracy"])  # {'accuracy': 0.91}
    ```
    """
    names = _check_metrics(predictions, metrics)
    if predictions.num_examples == 0:
        return {}
    return {m: float(v[0]) for m, v in _evaluate(predictions, names, _ones(predictions)).items()}


def bootstrap_intervals(
    predictions: EvalPredictions,
    metrics: Sequence[str] | None = None,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = DEFAULT_SEED,
) -> dict[str, Interval]:
    """Percentile-bootstrap intervals over evaluation examples, one per metric.

    Args:
        predictions: EvalPredictions.
        metrics: list of str or None. Defaults to every metric the
            predictions support (`predictions.metrics`).
        resamples: int. Defaults to 1,000.
        level: float. Coverage in (0, 1). Defaults to 0.95.
        seed: int. The same seed draws the same resamples.

    Returns:
        dict metric -> Interval (empty for zero examples).

    Example:

    ```python
    bootstrap_intervals(preds, ["accuracy"])["accuracy"].to_list()  # [0.886, 0.934]
    ```
    """
    names = _check_metrics(predictions, metrics)
    _check_level(level, resamples)
    if predictions.num_examples == 0:
        return {}
    point = metric_values(predictions, names)
    draws = _bootstrap(predictions.num_examples, resamples, seed,
                       lambda w: _evaluate(predictions, names, w))
    tail = (1 - level) / 2 * 100
    out = {}
    for m in names:
        finite = draws[m][np.isfinite(draws[m])]
        if not finite.size:
            out[m] = Interval(point[m], math.nan, math.nan, level)
            continue
        low, high = np.percentile(finite, [tail, 100 - tail])
        out[m] = Interval(point[m], float(low), float(high), level)
    return out


def paired_test(
    a: EvalPredictions,
    b: EvalPredictions,
    metric: str,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = DEFAULT_SEED,
) -> PairedTest:
    """Compares two models evaluated on the same examples.

    Accuracy gets McNemar's exact test (on the examples exactly one model
    gets right); every other metric a paired bootstrap: the same resampled
    examples for both, p = the share of resampled differences at least as
    far from the observed one as the observed one is from zero (the null
    distribution is the resampled one shifted to zero). The interval of the
    difference is the paired bootstrap's in both cases.

    Args:
        a: EvalPredictions. The first model.
        b: EvalPredictions. The second, on the same examples.
        metric: str. One both support.
        resamples: int. Defaults to 1,000.
        level: float. Coverage of the difference's interval.
        seed: int.

    Returns:
        A `PairedTest` (`difference = a - b`).

    Raises:
        InputError: when the two were not evaluated on the same examples.

    Example:

    ```python
    paired_test(preds_a, preds_b, "macro_f1").p_value  # 0.61: a tie
    ```
    """
    _check_same_examples(a, b)
    (name,) = _check_metrics(a, [metric])
    _check_level(level, resamples)
    value_a = float(_evaluate(a, [name], _ones(a))[name][0])
    value_b = float(_evaluate(b, [name], _ones(b))[name][0])
    observed = value_a - value_b
    diffs = _bootstrap(a.num_examples, resamples, seed, lambda w: {
        "d": _evaluate(a, [name], w)[name] - _evaluate(b, [name], w)[name]})["d"]
    diffs = diffs[np.isfinite(diffs)]
    tail = (1 - level) / 2 * 100
    low, high = (np.percentile(diffs, [tail, 100 - tail]) if diffs.size else (math.nan, math.nan))
    if name == "accuracy" and a.kind == "classification":
        p, method = mcnemar_exact(a.y_pred == a.y_true, b.y_pred == b.y_true), "mcnemar_exact"
    else:
        method = "paired_bootstrap"
        if observed == 0 or not diffs.size:
            p = 1.0
        else:
            extreme = np.count_nonzero(np.abs(diffs - observed) >= abs(observed) - 1e-12)
            p = (extreme + 1) / (diffs.size + 1)
    return PairedTest(name, value_a, value_b, observed, float(low), float(high), float(p), method)


def mcnemar_exact(correct_a: Sequence | np.ndarray, correct_b: Sequence | np.ndarray) -> float:
    """Two-sided exact McNemar p-value from two models' per-example correctness.

    Only the examples exactly one model gets right count: under the null each
    is equally likely to favour either model, so the count favouring `a` is
    Binomial(discordant, 1/2).

    Example:

    ```python
    mcnemar_exact([1] * 10 + [0] * 2, [0] * 10 + [1] * 2)  # 0.0386 (10 vs 2 discordant)
    ```
    """
    correct_a, correct_b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    only_a = int(np.count_nonzero(correct_a & ~correct_b))
    only_b = int(np.count_nonzero(correct_b & ~correct_a))
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2**n)


def _check_metrics(predictions: EvalPredictions, metrics: Sequence[str] | None) -> list[str]:
    supported = predictions.metrics
    names = list(supported if metrics is None else metrics)
    for m in names:
        if m not in supported:
            from tfhub_finetune.errors import did_you_mean

            raise InputError(
                f"No interval for this metric on {predictions.kind} predictions.",
                received={"metric": m},
                fix=did_you_mean(m, supported) or f"Expected one of: {', '.join(supported)}.",
            )
    return names


def _check_level(level: float, resamples: int) -> None:
    if not 0 < level < 1:
        raise InputError("The interval's level must be in (0, 1).", received={"level": level},
                         fix="E.g. 0.95.")
    if not isinstance(resamples, int) or resamples < 1:
        raise InputError("`resamples` must be a positive integer.",
                         received={"resamples": resamples}, fix="E.g. 1000.")


def _check_same_examples(a: EvalPredictions, b: EvalPredictions) -> None:
    same = (a.kind == b.kind and a.num_examples == b.num_examples
            and np.array_equal(a.y_true, b.y_true))
    if not same:
        raise InputError(
            "A paired comparison needs both models evaluated on the same examples.",
            received={"a": f"{a.kind}, {a.num_examples} examples",
                      "b": f"{b.kind}, {b.num_examples} examples"},
            fix="Evaluate both on the same eval file, in the same order.",
        )


def _ones(predictions: EvalPredictions) -> np.ndarray:
    return np.ones((1, predictions.num_examples))


def _bootstrap(n: int, resamples: int, seed: int,
               evaluate: Callable[[np.ndarray], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """`evaluate` on every block of resample weights, concatenated per key."""
    parts: dict[str, list[np.ndarray]] = {}
    for w in _weights(n, resamples, seed):
        for k, v in evaluate(w).items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def _weights(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Blocks of (resamples, n) counts: how often each example is drawn in each resample."""
    rng = np.random.default_rng(seed)
    block = max(1, _MAX_CELLS // max(n, 1))
    for start in range(0, resamples, block):
        rows = min(block, resamples - start)
        draws = rng.integers(0, n, size=(rows, n)) + (np.arange(rows) * n)[:, None]
        yield np.bincount(draws.ravel(), minlength=rows * n).reshape(rows, n).astype(np.float64)


def _evaluate(p: EvalPredictions, names: Sequence[str], w: np.ndarray) -> dict[str, np.ndarray]:
    """Each metric under each row of weights `w` (rows, n) -> (rows,) arrays."""
    total = w.sum(axis=1)
    out: dict[str, np.ndarray] = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        if p.kind == "classification":
            if "accuracy" in names:
                out["accuracy"] = w @ (p.y_pred == p.y_true).astype(np.float64) / total
            if {"macro_f1", "macro_precision", "macro_recall", "f1"} & set(names):
                truth = _one_hot(p.y_true, p.num_classes)
                guess = _one_hot(p.y_pred, p.num_classes)
                tp, actual, predicted = w @ (truth * guess), w @ truth, w @ guess
                precision = np.where(predicted > 0, tp / predicted, 0.0)
                recall = np.where(actual > 0, tp / actual, 0.0)
                f1 = np.where(actual + predicted > 0, 2 * tp / (actual + predicted), 0.0)
                out.update(macro_f1=f1.mean(1), macro_precision=precision.mean(1),
                           macro_recall=recall.mean(1))
                if p.num_classes == 2:
                    out["f1"] = f1[:, 1]
            if "auc" in names:
                out["auc"] = _weighted_auc(p.y_true == 1, p.scores, w)
        elif p.kind == "multi_label":
            if "exact_match" in names:
                out["exact_match"] = w @ (p.y_true == p.y_pred).all(1).astype(np.float64) / total
            if "macro_f1" in names:
                truth, guess = p.y_true.astype(np.float64), p.y_pred.astype(np.float64)
                tp, actual, predicted = w @ (truth * guess), w @ truth, w @ guess
                f1 = np.where(actual + predicted > 0, 2 * tp / (actual + predicted), 0.0)
                out["macro_f1"] = f1.mean(1)
        else:
            err = p.y_pred - p.y_true
            mse = w @ (err**2) / total
            out.update(mse=mse, rmse=np.sqrt(mse), mae=w @ np.abs(err) / total)
            if "pearson" in names:
                out["pearson"] = _weighted_pearson(p.y_true[None, :], p.y_pred[None, :], w)
            if "spearman" in names:
                out["spearman"] = _weighted_pearson(
                    average_ranks(p.y_true, w), average_ranks(p.y_pred, w), w)
    return {m: out[m] for m in names}


def _one_hot(ids: np.ndarray, k: int) -> np.ndarray:
    return (ids[:, None] == np.arange(k)[None, :]).astype(np.float64)


def _weighted_pearson(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Row-wise Pearson correlation of x and y (rows or broadcast) under weights w."""
    total = w.sum(1, keepdims=True)
    mx = (w * x).sum(1, keepdims=True) / total
    my = (w * y).sum(1, keepdims=True) / total
    dx, dy = x - mx, y - my
    cov = (w * dx * dy).sum(1)
    return cov / np.sqrt((w * dx * dx).sum(1) * (w * dy * dy).sum(1))


def _tie_groups(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sort order, start of each group of equal values in it, group of each sorted value)."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    new = np.r_[True, ordered[1:] != ordered[:-1]]
    return order, np.flatnonzero(new), np.cumsum(new) - 1


def average_ranks(values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """1-based ranks, ties given the mean of their ranks (as `scipy.stats.rankdata`).

    With `weights` (resamples x examples, a resample's count of each
    example), the mid rank each example has in each resample: the one rank
    code behind Spearman's rho and its bootstrap.

    Example:

    ```python
    average_ranks(np.array([3.0, 1.0, 3.0]))  # [2.5, 1.0, 2.5]
    ```
    """
    values = np.asarray(values)
    w = np.ones((1, len(values))) if weights is None else weights
    order, starts, group = _tie_groups(values)
    per_group = np.add.reduceat(w[:, order], starts, axis=1)
    before = np.cumsum(per_group, axis=1) - per_group
    mid = before + (per_group + 1) / 2
    ranks = np.empty_like(w, dtype=np.float64)
    ranks[:, order] = mid[:, group]
    return ranks[0] if weights is None else ranks


def _weighted_auc(positive: np.ndarray, scores: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ROC AUC (Mann-Whitney, ties count one half) under each row of weights."""
    order, starts, _ = _tie_groups(np.asarray(scores, np.float64))
    pos = np.add.reduceat(w[:, order] * positive[order], starts, axis=1)
    neg = np.add.reduceat(w[:, order] * ~positive[order], starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    wins = (pos * (below + neg / 2)).sum(1)
    return wins / (pos.sum(1) * neg.sum(1))


def _round(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None
