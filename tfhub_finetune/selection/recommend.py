"""Pick one candidate from recorded figures: Pareto front, constraints, and why.

Everything here works on plain records (`Candidate`, or dicts with the same
keys) holding figures that were measured elsewhere (profiling, fine-tuning),
so the logic is testable without TensorFlow and re-runnable on a saved
`results.json` with different constraints.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from tfhub_finetune.errors import InputError, did_you_mean

# Metrics reported as fractions in [0, 1]: differences read as percentage points.
FRACTION_METRICS = (
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "micro_f1",
    "weighted_f1",
    "f1",
    "precision",
    "recall",
    "auc",
    "roc_auc",
    "pr_auc",
    "top_5_accuracy",
)

DEFAULT_OBJECTIVES: dict[str, str] = {
    "metric": "max",
    "latency_ms": "min",
    "memory_mb": "min",
    "params": "min",
}

# `prefer` -> the cost figure ties are broken on.
PREFER: dict[str, str] = {
    "latency": "latency_ms",
    "params": "params",
    "memory": "memory_mb",
    # The figure `max_train_minutes` limits: a full fine-tuning's minutes, projected from
    # the first rung (`figures["train_minutes_projected"]`).
    "train_time": "train_minutes_projected",
}
DEFAULT_TIE_ALPHA = 0.05
# Cost figures closer than this ratio are the same cost (latency is measured with noise too).
_SAME_COST = 1.05

# constraint argument -> (Candidate field, "max"/"min" limit, unit for messages)
CONSTRAINTS: dict[str, tuple[str, str, str]] = {
    "max_latency_ms": ("latency_ms", "max", "ms"),
    "max_memory_mb": ("memory_mb", "max", "MB"),
    "max_params": ("params", "max", "parameters"),
    "min_metric": ("metric", "min", ""),
    # Training costs: recorded per (backbone, adaptation) by the search.
    "max_train_minutes": ("train_minutes_projected", "max", "min"),
    "max_train_memory_mb": ("peak_train_rss_mb", "max", "MB"),
}
# The serving form every export has; others (`int8`) are measured from it.
REFERENCE_FORM = "float32"


@dataclasses.dataclass
class Candidate:
    """One candidate's recorded figures.

    Attributes:
        name: str. Backbone name, e.g. `minilm_l6_h384`.
        metric: float or None. Fine-tuned validation metric (higher is better).
        latency_ms: float or None. Forward latency at batch 1 (p50).
        memory_mb: float or None. Peak inference memory.
        params: int or None. Parameter count of the deployed model.
        error: str or None. Why the candidate failed (it is then excluded).
        figures: dict. Every other recorded figure, unit-suffixed
            (`throughput_eps`, `flops_per_example`, `saved_model_mb`, ...).
        scores: dict. Transferability scores by estimator name.
        backbone: str. The backbone's display name; empty: `name` (records
            from before adaptations and serving forms were chosen).
        adaptation: str. How it was fine-tuned: `full`, `head`, `top:K` or
            `lora:R`; empty: `figures["adaptation"]`, else `full`.
        serving_form: str. How it is served: `float32` (the export) or
            `int8` (`quantized_export`; its serving figures are its own).
    """

    name: str
    metric: float | None = None
    latency_ms: float | None = None
    memory_mb: float | None = None
    params: int | None = None
    error: str | None = None
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)
    scores: dict[str, float | None] = dataclasses.field(default_factory=dict)
    backbone: str = ""
    adaptation: str = ""
    serving_form: str = REFERENCE_FORM

    def __post_init__(self) -> None:
        # Older records (and a search that names only backbones) carry neither field.
        self.backbone = self.backbone or self.name
        self.adaptation = str(self.adaptation or self.figures.get("adaptation") or "full")
        self.serving_form = str(self.serving_form or REFERENCE_FORM)

    @property
    def configuration(self) -> tuple[str, str]:
        """(backbone, adaptation): what was fine-tuned, whatever form serves it."""
        return self.backbone, self.adaptation

    @property
    def label(self) -> str:
        """`minilm_l6_h384, LoRA r=8, int8`: backbone, adaptation and serving form in words."""
        return f"{self.backbone}, {adaptation_label(self.adaptation)}, {self.serving_form}"

    @classmethod
    def from_profile(
        cls,
        profile: Any,
        *,
        metric: float | None = None,
        scores: Mapping[str, Any] | None = None,
        error: str | None = None,
        figures: Mapping[str, Any] | None = None,
    ) -> Candidate:
        """A candidate from a `ProfileResult` (or its dict) plus the fine-tuned metric.

        A profile error only fails the candidate when a figure the
        recommendation needs (params, latency, memory) is missing; otherwise
        (e.g. only the SavedModel export failed) it is kept as
        `figures["profile_error"]`.

        Args:
            profile: ProfileResult or dict.
            metric: float or None. Fine-tuned metric.
            scores: dict or None. Transferability scores (floats, or objects
                with a `value`, like `TransferabilityScore`).
            error: str or None. A failure outside profiling (e.g. fine-tuning).
            figures: dict or None. Extra figures to record (e.g. `epochs`).

        Example:

        ```python
        Candidate.from_profile(profile, metric=0.91, scores={"logme": -0.2})
        ```
        """
        data = dict(profile.to_dict() if hasattr(profile, "to_dict") else profile)
        name = data.pop("name")
        latency, memory, params = (
            data.pop("latency_p50_ms", None),
            data.pop("peak_infer_memory_mb", None),
            data.pop("params", None),
        )
        profile_error = data.pop("error", None)
        if profile_error and None in (latency, memory, params):
            error = f"{error}; {profile_error}" if error else profile_error
        elif profile_error:
            data["profile_error"] = profile_error
        data.update(figures or {})
        return cls(
            name=name,
            metric=metric,
            latency_ms=latency,
            memory_mb=memory,
            params=params,
            error=error,
            figures=data,
            scores={k: getattr(v, "value", v) for k, v in (scores or {}).items()},
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Candidate:
        """Reads `to_dict()` output; unknown top-level keys go into `figures`."""
        known = {f.name for f in dataclasses.fields(cls)}
        if "name" not in data:
            raise InputError(
                "A candidate record needs a `name`.",
                received={"keys": sorted(data)},
            )
        fields = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        fields["figures"] = {**dict(fields.get("figures") or {}), **extra}
        fields["scores"] = dict(fields.get("scores") or {})
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def value(self, key: str) -> Any:
        """A figure by name: a field, else `figures[key]`, else `scores[key]`."""
        if key in _FIELD_NAMES:
            return getattr(self, key)
        if key in self.figures:
            return self.figures[key]
        return self.scores.get(key)


_FIELD_NAMES = {f.name for f in dataclasses.fields(Candidate)} - {"figures", "scores"}


def adaptation_label(adaptation: str) -> str:
    """`lora:8` -> `LoRA r=8`, `top:2` -> `top 2 blocks`, `head` -> `head only`."""
    kind, _, number = str(adaptation).partition(":")
    return {"full": "full fine-tune", "head": "head only", "top": f"top {number} blocks",
            "lora": f"LoRA r={number}"}.get(kind, str(adaptation))


@dataclasses.dataclass(frozen=True)
class ConstraintChange:
    """How far one constraint must move.

    Attributes:
        constraint: str. E.g. `max_latency_ms`.
        limit: float. The value the user gave.
        needed: float. The least (for `min_metric`: the most) value that
            admits the candidate.
    """

    constraint: str
    limit: float
    needed: float

    @property
    def relative_change(self) -> float:
        return abs(self.needed - self.limit) / abs(self.limit) if self.limit else math.inf

    def describe(self, metric_name: str = "metric") -> str:
        """E.g. `raise max_latency_ms from 20 ms to 27.4 ms (+37%)`.

        The shown value is rounded outwards (up for budgets, down for
        `min_metric`), so using it as the new limit does admit the candidate.
        """
        _, kind, unit = CONSTRAINTS[self.constraint]
        if self.constraint == "min_metric":
            digits = 3 if is_fraction_metric(metric_name) else 4
            limit = _format_metric(self.limit, metric_name)
            needed = _format_metric(_round_sig(self.needed, digits, "down"), metric_name)
            change = f"-{_format_gap(self.limit - self.needed, metric_name)}"
        else:
            limit = _format_limit(self.limit, unit)
            needed = _format_limit(_round_sig(self.needed, 3, "up"), unit)
            change = f"+{self.relative_change * 100:.0f}%"
        verb = "raise" if kind == "max" else "lower"
        return f"{verb} {self.constraint} from {limit} to {needed} ({change})"


@dataclasses.dataclass(frozen=True)
class Relaxation:
    """The least change to the constraints that admits one candidate.

    Attributes:
        admits: str. The candidate it admits.
        admits_metric: float. That candidate's metric.
        changes: tuple of ConstraintChange. One per constraint to move.
    """

    admits: str
    admits_metric: float
    changes: tuple[ConstraintChange, ...]

    @property
    def cost(self) -> tuple[int, float]:
        """(constraints to move, summed relative change): smaller is a smaller ask."""
        return len(self.changes), sum(c.relative_change for c in self.changes)

    def describe(self, metric_name: str = "metric") -> str:
        """E.g. `raise max_latency_ms from 20 ms to 27.4 ms (+37%) to admit bert_tiny (90.8%)`."""
        moves = " and ".join(c.describe(metric_name) for c in self.changes)
        return f"{moves} to admit {self.admits} ({_format_metric(self.admits_metric, metric_name)})"

    def to_dict(self, metric_name: str = "metric") -> dict[str, Any]:
        return {
            "admits": self.admits,
            "admits_metric": self.admits_metric,
            "changes": [dataclasses.asdict(c) for c in self.changes],
            "describe": self.describe(metric_name),
        }


@dataclasses.dataclass(frozen=True)
class Recommendation:
    """The chosen candidate and why.

    Attributes:
        name: str or None. The recommended candidate; None when nothing fits.
        reason: str. One sentence, generated from the figures.
        metric_name: str. What `Candidate.metric` measures.
        constraints: dict. The constraints that were given.
        feasible: list of str. Candidates meeting every constraint, best first.
        pareto: list of str. Candidates on the Pareto front (metric up;
            latency, memory, params down), best metric first.
        excluded: dict. Candidate -> why it was not considered.
        relaxations: list of Relaxation. When nothing fits: for each set of
            constraints that could be moved, the smallest move that admits a
            candidate; the smallest ask (fewest constraints, then least
            relative change) first.
        best: str or None. The feasible candidate with the highest metric.
        tied: list of str. Feasible candidates not significantly worse than
            `best` (it included); the recommendation is the cheapest of them.
        p_values: dict. Feasible candidate -> two-sided p-value of its
            difference from `best` on the same examples (where known).
        prefer: str. The cost ties were broken on (`PREFER`).
        tie_alpha: float. Significance level of the tie rule (0: off).
    """

    name: str | None
    reason: str
    metric_name: str = "accuracy"
    constraints: dict[str, float] = dataclasses.field(default_factory=dict)
    feasible: list[str] = dataclasses.field(default_factory=list)
    pareto: list[str] = dataclasses.field(default_factory=list)
    excluded: dict[str, str] = dataclasses.field(default_factory=dict)
    relaxations: list[Relaxation] = dataclasses.field(default_factory=list)
    best: str | None = None
    tied: list[str] = dataclasses.field(default_factory=list)
    p_values: dict[str, float] = dataclasses.field(default_factory=dict)
    prefer: str = "latency"
    tie_alpha: float = DEFAULT_TIE_ALPHA

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["relaxations"] = [r.to_dict(self.metric_name) for r in self.relaxations]
        return data


# --------------------------------------------------------------------------- #
# Public functions
# --------------------------------------------------------------------------- #


def as_candidates(candidates: Iterable[Candidate | Mapping[str, Any]]) -> list[Candidate]:
    """Normalises records to `Candidate`s and checks names are unique and present.

    Raises:
        InputError: for an empty list or duplicate names.
    """
    result = [c if isinstance(c, Candidate) else Candidate.from_dict(c) for c in candidates]
    if not result:
        raise InputError("No candidates given.", fix="Give at least one candidate record.")
    seen: set[str] = set()
    for c in result:
        if c.name in seen:
            raise InputError(
                "Candidate names must be unique.",
                received={"duplicate": c.name},
                fix="Name truncated or re-headed variants differently (e.g. name@layers=2).",
            )
        seen.add(c.name)
    return result


def pareto_front(
    candidates: Iterable[Candidate | Mapping[str, Any]],
    objectives: Mapping[str, str] | None = None,
) -> list[Candidate]:
    """Candidates no other candidate beats on every objective.

    A candidate is dominated when another is at least as good on every
    objective and strictly better on one. Failed candidates and those
    missing an objective's figure are left out.

    Args:
        candidates: Candidate records or dicts.
        objectives: dict. Figure name -> `"max"` or `"min"`. Defaults to
            `DEFAULT_OBJECTIVES` (metric up; latency, memory, params down).

    Returns:
        The front, best first by the first objective.

    Raises:
        InputError: for an unknown direction or figure name.

    Example:

    ```python
    front = pareto_front(records, {"metric": "max", "latency_ms": "min"})
    [c.name for c in front]
    ```
    """
    pool = as_candidates(candidates)
    objectives = dict(objectives or DEFAULT_OBJECTIVES)
    if not objectives:
        raise InputError(
            "`objectives` is empty.", fix="E.g. {'metric': 'max', 'latency_ms': 'min'}."
        )
    known = set(_FIELD_NAMES) | {k for c in pool for k in (*c.figures, *c.scores)}
    for key, direction in objectives.items():
        if direction not in ("max", "min"):
            raise InputError(
                "Objective directions must be 'max' or 'min'.",
                received={key: direction},
            )
        if key not in known:
            raise InputError(
                "Unknown objective.", received={"objective": key}, fix=did_you_mean(key, known)
            )
    usable = [c for c in pool if not c.error and all(_finite(c.value(k)) for k in objectives)]

    def signs(c: Candidate) -> list[float]:
        return [
            float(c.value(k)) if d == "max" else -float(c.value(k)) for k, d in objectives.items()
        ]

    front = []
    for c in usable:
        mine = signs(c)
        dominated = any(
            all(o >= m for o, m in zip(signs(other), mine, strict=True))
            and any(o > m for o, m in zip(signs(other), mine, strict=True))
            for other in usable
            if other is not c
        )
        if not dominated:
            front.append(c)
    return sorted(front, key=lambda c: -signs(c)[0])


def recommend(
    candidates: Iterable[Candidate | Mapping[str, Any]],
    max_latency_ms: float | None = None,
    max_memory_mb: float | None = None,
    max_params: float | None = None,
    min_metric: float | None = None,
    max_train_minutes: float | None = None,
    max_train_memory_mb: float | None = None,
    *,
    metric_name: str = "accuracy",
    metric_tolerance: float = 0.0,
    prefer: str = "latency",
    tie_alpha: float = DEFAULT_TIE_ALPHA,
    paired_p_value: Callable[[str, str], float | None] | None = None,
    chance_metric: float | None = None,
) -> Recommendation:
    """Recommends the cheapest candidate that meets the constraints and ties the best.

    Among candidates that did not fail and meet every constraint, the one
    with the highest metric is the best. Those not significantly worse than
    it (a paired test on the same evaluation examples, `paired_p_value`,
    with p >= `tie_alpha`), or within `metric_tolerance` of it, tie with it;
    the cheapest of the tied by `prefer` wins (costs within 5% count as
    equal, and then the higher metric wins). A person would pick the cheaper
    of two models whose difference is noise; so does this. Without
    `paired_p_value`, or with `tie_alpha=0`, the highest metric wins. When
    nothing fits, `relaxations` gives the smallest change that admits one:
    fewest constraints first, then the smallest relative change; the reason
    names it and the best alternative that moves a different constraint.

    A figure from fewer epochs (`figures["fine_tune_epochs"]`) than the
    chosen candidate's is never called "the best" in the reason: it is named
    with its epochs.

    Args:
        candidates: Candidate records or dicts.
        max_latency_ms: float or None. Latency budget at batch 1.
        max_memory_mb: float or None. Peak inference memory budget.
        max_params: float or None. Parameter budget.
        min_metric: float or None. Least acceptable metric (a fraction for
            fraction metrics such as accuracy: 0.85, not 85).
        max_train_minutes: float or None. Most minutes of a full fine-tuning
            (`figures["train_minutes_projected"]`, projected from the first rung).
        max_train_memory_mb: float or None. Most peak training RSS
            (`figures["peak_train_rss_mb"]`).
        metric_name: str. What the metric is, for messages and validation.
            Defaults to `"accuracy"`.
        metric_tolerance: float. Metric difference treated as a tie.
            Defaults to 0.0.
        prefer: str. The cost ties are broken on: `latency` (batch-1 p50,
            the default), `params`, `memory` or `train_time` (projected
            minutes of a full fine-tuning, the figure `max_train_minutes` limits).
        tie_alpha: float. Significance level in [0, 1): a candidate whose
            paired test against the best gives p >= tie_alpha ties with it.
            0 turns the rule off. Defaults to 0.05.
        paired_p_value: callable or None. `(best, other) -> p` for two
            candidate names, or None where it is unknown (that candidate
            then does not tie); e.g. `paired_tester(predictions, metric)`.
        chance_metric: float or None. The metric of a model that ignores its
            input (`majority_class_metric(predictions, metric)`: the most
            frequent class's share, for accuracy). A candidate at or below it has
            learnt nothing and is excluded, so a tight budget that only a
            useless model meets gets the relaxation advice, not that model.

    Returns:
        A `Recommendation`.

    Raises:
        InputError: for negative or zero budgets, a `min_metric` outside a
            fraction metric's [0, 1], an unknown `prefer`, a `tie_alpha`
            outside [0, 1), or bad candidate records.

    Example:

    ```python
    rec = recommend(records, max_latency_ms=20)
    print(rec.name, rec.reason)
    # bert_tiny: 0.4 points below the best (minilm), 3.1x faster, the only one under 20 ms.
    rec = recommend(records, paired_p_value=paired_tester(predictions, "accuracy"))
    # small: tied with big within noise (0.3 points lower, p=0.61); 2.5x faster.
    ```
    """
    pool = as_candidates(candidates)
    constraints = validate_constraints(
        {
            "max_latency_ms": max_latency_ms,
            "max_memory_mb": max_memory_mb,
            "max_params": max_params,
            "min_metric": min_metric,
            "max_train_minutes": max_train_minutes,
            "max_train_memory_mb": max_train_memory_mb,
        },
        metric_name,
    )
    if not (isinstance(metric_tolerance, (int, float)) and metric_tolerance >= 0):
        raise InputError(
            "Invalid value for `metric_tolerance`.",
            received={"metric_tolerance": metric_tolerance},
            fix="Expected a number >= 0.",
        )
    if prefer not in PREFER:
        raise InputError("Unknown cost to prefer.", received={"prefer": prefer},
                         fix=did_you_mean(prefer, PREFER) or f"Expected one of: {', '.join(PREFER)}.")
    if not (_finite(tie_alpha) and 0 <= tie_alpha < 1):
        raise InputError("Invalid value for `tie_alpha`.", received={"tie_alpha": tie_alpha},
                         fix="Expected a significance level in [0, 1), e.g. 0.05 (0 turns ties off).")
    settings = {"prefer": prefer, "tie_alpha": float(tie_alpha)}

    excluded: dict[str, str] = {}
    valid: list[Candidate] = []
    for c in pool:
        if c.error:
            excluded[c.name] = f"failed: {c.error}"
        elif not _finite(c.metric):
            excluded[c.name] = f"no {metric_name} recorded"
        elif _finite(chance_metric) and c.metric <= chance_metric:
            excluded[c.name] = (f"no better than predicting the most frequent class for every "
                                f"example ({_format_metric(c.metric, metric_name)} vs "
                                f"{_format_metric(chance_metric, metric_name)})")
        else:
            missing = [
                CONSTRAINTS[k][0] for k in constraints if not _finite(c.value(CONSTRAINTS[k][0]))
            ]
            if missing:
                excluded[c.name] = f"missing {', '.join(missing)} needed by the constraints"
            else:
                valid.append(c)
    pareto = [c.name for c in pareto_front(valid, _objectives_present(valid))] if valid else []

    if not valid:
        reason = "No candidate can be recommended: " + (
            "; ".join(f"{name} {why}" for name, why in excluded.items()) + "."
        )
        return Recommendation(
            None, _one_line(reason), metric_name, constraints, [], pareto, excluded, **settings
        )

    feasible = [c for c in valid if not violations(c, constraints)]
    feasible.sort(key=_rank_key)
    if not feasible:
        relaxations = _relaxations(valid, constraints)
        first = {c.constraint for c in relaxations[0].changes}
        # An alternative is worth naming only if it leaves the first move's constraints alone.
        others = [r for r in relaxations[1:] if first.isdisjoint(c.constraint for c in r.changes)]
        moves = [r.describe(metric_name) for r in relaxations[:1] + others[:1]]
        reason = (
            f"No candidate meets {_constraint_phrase(constraints, metric_name)}; "
            + ", or ".join(moves)
            + "."
        )
        return Recommendation(
            None, reason, metric_name, constraints, [], pareto, excluded, relaxations, **settings
        )

    best = feasible[0]
    p_values: dict[str, float] = {}
    if paired_p_value is not None and tie_alpha > 0:
        for c in feasible[1:]:
            p = paired_p_value(best.name, c.name)
            if p is not None:
                p_values[c.name] = float(p)
    tied = [c for c in feasible if c is best or c.metric >= best.metric - metric_tolerance
            or p_values.get(c.name, -1.0) >= tie_alpha]
    chosen = _cheapest(tied, prefer) if len(tied) > 1 else best
    reason = _reason(chosen, valid, feasible, constraints, metric_name, metric_tolerance,
                     best=best, p_value=p_values.get(chosen.name), prefer=prefer,
                     varied=_varied(valid))
    ordered = [chosen.name] + [c.name for c in feasible if c is not chosen]
    return Recommendation(chosen.name, reason, metric_name, constraints, ordered, pareto, excluded,
                          best=best.name, tied=[c.name for c in tied], p_values=p_values,
                          **settings)


def majority_class_metric(predictions: Mapping[str, Any], metric_name: str) -> float | None:
    """The `metric_name` of always predicting the most frequent class, or None.

    Defined for accuracy on single-label classification: the largest class's
    share of the evaluation examples (read from any candidate's predictions;
    all share the same examples). Other metrics have no such floor here
    (macro-F1's constant predictor scores below any real model anyway).

    Example:

    ```python
    majority_class_metric({"a": preds_a}, "accuracy")  # 0.542: 83 of 153 images are bees
    ```
    """
    if metric_name.removeprefix("val_") != "accuracy":
        return None
    for p in predictions.values():
        if p is not None and p.kind == "classification" and len(p.y_true):
            counts = Counter(int(y) for y in p.y_true)
            return max(counts.values()) / len(p.y_true)
    return None


def paired_tester(
    predictions: Mapping[str, Any], metric_name: str, **kwargs: Any
) -> Callable[[str, str], float | None]:
    """`recommend`'s `paired_p_value` from each candidate's per-example predictions.

    Args:
        predictions: dict. Candidate name -> `stats.EvalPredictions` (all on
            the same evaluation examples). Candidates without one get None.
        metric_name: str. The metric compared, e.g. `accuracy`, `macro_f1`
            (a `val_` prefix is dropped).
        **kwargs: passed to `stats.paired_test` (`resamples`, `seed`).

    Example:

    ```python
    test = paired_tester({"a": preds_a, "b": preds_b}, "accuracy")
    test("a", "b")  # 0.61
    ```
    """
    from tfhub_finetune import stats

    metric = metric_name.removeprefix("val_")
    cache: dict[tuple[str, str], float | None] = {}

    def p_value(a: str, b: str) -> float | None:
        if (a, b) not in cache:
            pa, pb = predictions.get(a), predictions.get(b)
            ok = pa is not None and pb is not None and metric in pa.metrics
            cache[(a, b)] = stats.paired_test(pa, pb, metric, **kwargs).p_value if ok else None
        return cache[(a, b)]

    return p_value


def is_fraction_metric(metric_name: str) -> bool:
    """Whether `metric_name` is reported in [0, 1] (accuracy, F1, AUC, ...)."""
    name = metric_name.lower().removeprefix("val_")
    return name in FRACTION_METRICS or name.endswith(("accuracy", "_f1", "_auc"))


# --------------------------------------------------------------------------- #
# Internals
# --------------------------------------------------------------------------- #


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_constraints(given: Mapping[str, Any], metric_name: str) -> dict[str, float]:
    """Checks `recommend`'s constraints; returns the ones given (None dropped).

    Callers that start long work (a selection run) call it first, so a
    negative or contradictory constraint fails in seconds, not hours.

    Args:
        given: dict. `max_latency_ms`, `max_memory_mb`, `max_params`,
            `min_metric` -> number or None.
        metric_name: str. The quality metric (a fraction metric caps
            `min_metric` at 1).

    Returns:
        dict of the constraints that are set.

    Raises:
        InputError: for a non-finite or non-positive limit, or
            a `min_metric` no model can reach.

    Example:

    ```python
    validate_constraints({"max_latency_ms": 20, "max_params": None}, "accuracy")
    # {'max_latency_ms': 20}
    ```
    """
    constraints: dict[str, float] = {}
    for key, value in given.items():
        if value is None:
            continue
        if not _finite(value):
            raise InputError(
                f"Invalid value for `{key}`.",
                received={key: value},
                fix="Expected a finite number or None.",
            )
        if CONSTRAINTS[key][1] == "max" and value <= 0:
            raise InputError(
                f"`{key}` must be positive; no model fits a budget of {value}.",
                received={key: value},
                fix="Give a positive budget or leave it unset.",
            )
        constraints[key] = float(value)
    if "min_metric" in constraints and is_fraction_metric(metric_name):
        value = constraints["min_metric"]
        if value > 1:
            hint = (
                f"Give it as a fraction, e.g. min_metric={value / 100:g} for {value:g}%."
                if value <= 100
                else "Give a fraction in [0, 1]."
            )
            raise InputError(
                f"`min_metric` exceeds 1, which no {metric_name} can reach.",
                received={"min_metric": value, "metric_name": metric_name},
                fix=hint,
            )
        if value < 0:
            raise InputError(
                f"`min_metric` is negative; {metric_name} is in [0, 1].",
                received={"min_metric": value},
                fix="Give a fraction in [0, 1] or leave it unset.",
            )
    if "max_params" in constraints and constraints["max_params"] < 1:
        raise InputError(
            "`max_params` is below one parameter.",
            received={"max_params": constraints["max_params"]},
            fix="Give a parameter count, e.g. 5e6 for 5 million.",
        )
    return constraints


def violations(c: Candidate, constraints: Mapping[str, float]) -> dict[str, float]:
    """Constraint -> the candidate's figure, for each constraint it breaks.

    A figure that was not recorded breaks nothing (`recommend` excludes such
    candidates before it asks). The selection uses this before training, on
    the profile alone, and the Pareto plot to mark what its axes cannot show.

    Example:

    ```python
    violations(Candidate("a", latency_ms=30.0, params=5e6), {"max_latency_ms": 20})
    # {'max_latency_ms': 30.0}
    ```
    """
    broken = {}
    for key, limit in constraints.items():
        field, kind, _ = CONSTRAINTS[key]
        if not _finite(c.value(field)):
            continue
        value = float(c.value(field))
        if (kind == "max" and value > limit) or (kind == "min" and value < limit):
            broken[key] = value
    return broken


def _relaxations(valid: Sequence[Candidate], constraints: Mapping[str, float]) -> list[Relaxation]:
    """The cheapest admitting move per set of constraints, cheapest first."""
    best: dict[tuple[str, ...], Relaxation] = {}
    for c in valid:
        broken = violations(c, constraints)
        option = Relaxation(
            c.name,
            float(c.metric),
            tuple(ConstraintChange(k, constraints[k], v) for k, v in broken.items()),
        )
        key = tuple(broken)
        # Per set: the smallest change, then the better model.
        if key not in best or (option.cost[1], -option.admits_metric) < (
            best[key].cost[1],
            -best[key].admits_metric,
        ):
            best[key] = option
    return sorted(best.values(), key=lambda r: (*r.cost, -r.admits_metric, r.admits))


def _rank_key(c: Candidate) -> tuple:
    return (-c.metric, *_speed_key(c))


def _speed_key(c: Candidate) -> tuple:
    def or_inf(v: Any) -> float:
        return float(v) if _finite(v) else math.inf

    return (or_inf(c.latency_ms), or_inf(c.memory_mb), or_inf(c.params), c.name)


def _objectives_present(valid: Sequence[Candidate]) -> dict[str, str]:
    # Objectives no usable candidate has a figure for would empty the front.
    present = {
        k: d for k, d in DEFAULT_OBJECTIVES.items() if any(_finite(c.value(k)) for c in valid)
    }
    return {k: d for k, d in present.items() if all(_finite(c.value(k)) for c in valid)} or {
        "metric": "max"
    }


def _cheapest(tied: Sequence[Candidate], prefer: str) -> Candidate:
    """The tied candidate with the least `prefer` cost; near-equal costs go to the better metric."""
    field = PREFER[prefer]
    costs = [float(c.value(field)) for c in tied if _finite(c.value(field))]
    if not costs:
        return min(tied, key=_speed_key)
    least = min(costs)
    cheap = [c for c in tied if _finite(c.value(field)) and float(c.value(field)) <= least * _SAME_COST]
    return min(cheap, key=_rank_key)


def _epochs_of(c: Candidate) -> int | None:
    value = c.figures.get("fine_tune_epochs")
    return int(value) if _finite(value) else None


def _fewer_epochs(c: Candidate, than: Candidate) -> bool:
    mine, theirs = _epochs_of(c), _epochs_of(than)
    return mine is not None and theirs is not None and mine < theirs


def _epoch_note(c: Candidate) -> str:
    epochs = _epochs_of(c)
    return f"after {epochs} epoch" + ("" if epochs == 1 else "s")


def _reason(
    chosen: Candidate,
    valid: Sequence[Candidate],
    feasible: Sequence[Candidate],
    constraints: Mapping[str, float],
    metric_name: str,
    tolerance: float,
    *,
    best: Candidate | None = None,
    p_value: float | None = None,
    prefer: str = "latency",
    varied: frozenset[str] = frozenset(),
) -> str:
    def show(c: Candidate, bracketed: bool = False) -> str:
        # The name alone while every candidate shares the adaptation and serving form.
        if not varied:
            return c.name
        return c.label if bracketed else f"{c.backbone} ({c.label.partition(', ')[2]})"

    # "The best" is a figure from at least as many epochs as the chosen one's.
    comparable = [c for c in valid if not _fewer_epochs(c, chosen)]
    top = min(comparable, key=_rank_key)
    early = [c for c in valid if _fewer_epochs(c, chosen) and c.metric > top.metric]
    parts = []
    if best is not None and chosen is not best and p_value is not None:
        gap = _format_gap(best.metric - chosen.metric, metric_name)
        parts.append(f"tied with {show(best)} within noise ({gap} lower, p={p_value:.2g})")
        costs = _comparisons(chosen, best, constraints, prefer, varied)
        if costs:
            parts[-1] += "; " + ", ".join(costs)
        if top is not best and top.metric > best.metric:
            gap = _format_gap(top.metric - chosen.metric, metric_name)
            parts.append(f"{gap} below the best ({show(top, bracketed=True)})")
    elif chosen.metric >= top.metric:
        shown = _format_metric(chosen.metric, metric_name)
        if early:
            # A higher figure from fewer epochs exists: best only among its equals.
            parts.append(f"the best {metric_name} after {_epochs_of(chosen)} epochs ({shown})")
        else:
            parts.append(f"the best {metric_name} ({shown})")
        if _finite(chosen.latency_ms):
            # The trade-off worth knowing: the best of the clearly faster, lower ones.
            quicker = [
                c
                for c in valid
                if _finite(c.latency_ms) and 0 < c.latency_ms * 1.05 <= chosen.latency_ms
            ]
            faster = [c for c in quicker if c.metric < chosen.metric]
            if faster:
                alt = min(faster, key=_rank_key)
                ratio = chosen.latency_ms / alt.latency_ms
                gap = _format_gap(chosen.metric - alt.metric, metric_name)
                note = f" ({_epoch_note(alt)})" if _fewer_epochs(alt, chosen) else ""
                parts.append(f"{show(alt)} is {ratio:.1f}x faster but {gap} lower{note}")
            elif not quicker and sum(_finite(c.latency_ms) for c in valid) > 1:
                parts.append("and the fastest")
    else:
        gap = _format_gap(top.metric - chosen.metric, metric_name)
        parts.append(f"{gap} below the best ({show(top, bracketed=True)})")
        parts.extend(_comparisons(chosen, top, constraints, prefer, varied))
        if tolerance > 0 and top in feasible:
            parts.append(f"within the {_format_gap(tolerance, metric_name)} tolerance")
    for c in sorted(early, key=_rank_key)[:1]:
        # Not comparable: it stopped training earlier (e.g. cut for breaking a constraint).
        parts.append(f"{show(c)} scored {_format_metric(c.metric, metric_name)} {_epoch_note(c)} "
                     f"(this one: {_epochs_of(chosen)})")
    if constraints:
        phrase = _constraint_phrase(constraints, metric_name, short=True)
        if len(feasible) == 1:
            parts.append(f"the only one {phrase}")
        elif best is not None and chosen is not best:
            parts.append(f"one of {len(feasible)} {phrase}")
        else:
            parts.append(f"best of {len(feasible)} {phrase}")
    return f"{chosen.label if varied else chosen.name}: {', '.join(parts)}."


def _comparisons(chosen: Candidate, best: Candidate, constraints: Mapping[str, float],
                 prefer: str = "latency", varied: frozenset[str] = frozenset()) -> list[str]:
    """How the chosen one beats the best-metric one on cost figures (`prefer`'s first).

    Where adaptations or serving forms differ, latency reads as serving
    (`serves in 7 ms (1.8x faster)`) beside training (`trains 2.4x faster`).
    """
    out = []
    # (figure, phrase when cheaper, phrase when dearer); {} is the ratio.
    pairs = [("latency_ms", "{:.1f}x faster", "{:.1f}x slower")]
    if "max_memory_mb" in constraints or prefer == "memory":
        pairs.append(("memory_mb", "{:.1f}x less memory", "{:.1f}x more memory"))
    if "max_params" in constraints or prefer == "params":
        pairs.append(("params", "{:.1f}x fewer parameters", "{:.1f}x more parameters"))
    if prefer == "train_time" or "max_train_minutes" in constraints or "adaptation" in varied:
        pairs.append(("train_minutes_projected", "trains {:.1f}x faster", "trains {:.1f}x slower"))
    if "max_train_memory_mb" in constraints:
        pairs.append(("peak_train_rss_mb", "{:.1f}x less training memory",
                      "{:.1f}x more training memory"))
    pairs.sort(key=lambda pair: pair[0] != PREFER[prefer])
    for field, better, worse in pairs:
        mine, theirs = chosen.value(field), best.value(field)
        if not (_finite(mine) and _finite(theirs)) or mine <= 0 or theirs <= 0:
            continue
        ratio = theirs / mine
        phrase = (better.format(ratio) if ratio >= 1.05
                  else worse.format(1 / ratio) if ratio <= 1 / 1.05 else "")
        if field == "latency_ms" and varied:
            serves = f"serves in {_format_quantity(float(mine), 'ms')}"
            phrase = f"{serves} ({phrase})" if phrase else serves
        if phrase:
            out.append(phrase)
    return out


def _varied(valid: Sequence[Candidate]) -> frozenset[str]:
    """Which of adaptation and serving form differ among the candidates."""
    return frozenset(key for key in ("adaptation", "serving_form")
                     if len({getattr(c, key) for c in valid}) > 1)


def _constraint_phrase(
    constraints: Mapping[str, float], metric_name: str, short: bool = False
) -> str:
    pieces = []
    for key, limit in constraints.items():
        _, _, unit = CONSTRAINTS[key]
        if key == "min_metric" and short:
            pieces.append(f"at or above {_format_metric(limit, metric_name)} {metric_name}")
        elif key == "max_train_minutes" and short:
            pieces.append(f"training in under {_format_quantity(limit, unit)}")
        elif key == "max_train_memory_mb" and short:
            pieces.append(f"under {_format_quantity(limit, unit)} training memory")
        elif key == "min_metric":
            pieces.append(f"min_metric={_format_metric(limit, metric_name)}")
        elif short:
            pieces.append(f"under {_format_quantity(limit, unit)}")
        else:
            pieces.append(f"{key}={_format_limit(limit, unit)}")
    if len(pieces) == 1:
        return pieces[0]
    return ", ".join(pieces[:-1]) + " and " + pieces[-1]


def _format_metric(value: float, metric_name: str) -> str:
    if is_fraction_metric(metric_name):
        return f"{value * 100:.1f}%"
    return f"{value:.4g}"


def _format_gap(diff: float, metric_name: str) -> str:
    if is_fraction_metric(metric_name):
        points = diff * 100
        return f"{points:.1f} point" + ("" if f"{points:.1f}" == "1.0" else "s")
    return f"{diff:.3g}"


def _format_quantity(value: float, unit: str) -> str:
    if unit == "parameters":
        for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
            if value >= scale:
                return f"{value / scale:.3g}{suffix} parameters"
        return f"{value:.0f} parameters"
    number = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return f"{number} {unit}".strip()


def _format_limit(value: float, unit: str) -> str:
    """`20 ms`, `500 MB`, `3M` (a parameter count needs no unit after the name)."""
    return _format_quantity(value, unit).removesuffix(" parameters")


def _round_sig(value: float, digits: int, direction: str) -> float:
    """Rounds to `digits` significant digits, up or down, so a shown limit still admits."""
    if value == 0 or not math.isfinite(value):
        return value
    scale = 10.0 ** (math.floor(math.log10(abs(value))) - digits + 1)
    scaled = value / scale
    # The nudge keeps float noise (27.3 stored as 27.30000001) from moving a step.
    steps = math.ceil(scaled - 1e-9) if direction == "up" else math.floor(scaled + 1e-9)
    return round(steps * scale, 12)


def _one_line(text: str) -> str:
    return " ".join(text.split())
