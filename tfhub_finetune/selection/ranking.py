"""Did a cheap ranking order the candidates as fine-tuning did? Scores beside data-free priors.

A ranker orders the candidates before any fine-tuning. Two kinds are judged
on the same footing against the fine-tuned metric:

- the transferability scores measured on the task's data (LogME, kNN, linear
  probe: `Candidate.scores`);
- data-free priors, read from the profile already measured: parameter count
  and FLOPs per example ("the bigger model transfers better"). They cost
  nothing; on the standard 11-model x 11-dataset transferability benchmark
  they reach a weighted Kendall tau of about 0.61-0.65, above LogME's 0.51.
  A score earns its cost on a task only by beating them there, so the report
  shows both and says when it does not.

Each ranker gets Kendall's tau-b, the weighted tau the literature reports
(`weighted_kendall_tau`: a swap near the top costs more), and top-1 regret:
the best fine-tuned metric minus the metric of the ranker's first choice (0
when it picked the best), which is what a user who trusted it would lose.

The figures are only as comparable as the fine-tuned metrics: when halving cut
some candidates after fewer epochs, `equal_fidelity` is False (brute force's
full-epoch figures make it True).

Example:

```python
table = transferability_correlations(records)
table["logme"]["weighted_tau"], table["params"]["regret"]
prior_verdicts(table, "accuracy")  # ["On this task logme ranks worse than ..."]
```
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tfhub_finetune.selection.recommend import (
    REFERENCE_FORM,
    Candidate,
    as_candidates,
    is_fraction_metric,
)
from tfhub_finetune.selection.transferability import kendall_tau, weighted_kendall_tau

# Figure (Candidate.value key) -> what it is in words. Larger ranks higher.
PRIORS: dict[str, str] = {
    "params": "parameter count",
    "flops_per_example": "FLOPs per example",
}


def transferability_correlations(
    candidates: Iterable[Candidate | Mapping[str, Any]],
) -> dict[str, dict[str, Any]]:
    """Each ranker's agreement with the fine-tuned metric: tau, weighted tau, top-1 regret.

    A ranker's candidates are those with a finite value for it and a finite
    fine-tuned metric (and no error); each ranker is judged on its own. A
    prior appears when some candidate recorded its figure.

    Returns:
        Ranker name -> dict with `kind` (`score` or `prior`), `tau` and
        `weighted_tau` (None with fewer than two candidates or either side
        constant), `n`, `candidates`, `top_pick` (the names the ranker puts
        first; several when tied), `best` (the best fine-tuned candidate among
        them), `regret` (best metric minus the top pick's, the mean over a
        tie; in the metric's own units), `pick_within_noise` (whether the top
        pick's metric is inside the best's 95% interval; None without
        intervals) and `equal_fidelity`. Scores first (sorted), then the
        priors in `PRIORS` order.
    """
    # A serving form other than the export is the same fine-tuned weights, not another ranking.
    pool = [c for c in as_candidates(candidates) if not c.error and _finite(c.metric)
            and c.serving_form == REFERENCE_FORM]
    names = [*sorted({k for c in pool for k in c.scores}),
             *[p for p in PRIORS if any(_finite(c.value(p)) for c in pool)]]
    return {name: _agreement(name, pool) for name in names}


def prior_verdicts(table: Mapping[str, Mapping[str, Any]], metric_name: str) -> list[str]:
    """One sentence per measured score: does it beat the best data-free prior on this task?

    Compares weighted tau with the best prior's, and top-1 regret with the
    lowest prior regret; a first choice inside the best candidate's 95%
    interval is not called worse. A score without a defined tau is said to
    be incomparable.

    Example:

    ```python
    prior_verdicts(table, "accuracy")
    # ['On this task logme ranks worse than parameter count (weighted tau +0.40 vs +0.60) ...']
    ```
    """
    priors = {k: v for k, v in table.items() if v.get("kind") == "prior"}
    if not priors:
        return []
    by_tau = [(k, v) for k, v in priors.items() if v.get("weighted_tau") is not None]
    by_regret = [(k, v) for k, v in priors.items() if v.get("regret") is not None]
    top_tau = max(by_tau, key=lambda kv: kv[1]["weighted_tau"], default=None)
    top_regret = min(by_regret, key=lambda kv: kv[1]["regret"], default=None)
    lines = []
    for name, info in table.items():
        if info.get("kind") != "score":
            continue
        tau, regret = info.get("weighted_tau"), info.get("regret")
        if tau is None or top_tau is None:
            lines.append(f"{name} cannot be compared with the data-free priors: its weighted tau "
                         "or theirs is undefined (too few candidates, or a constant ranking).")
            continue
        prior, prior_tau = PRIORS[top_tau[0]], top_tau[1]["weighted_tau"]
        tau_worse = tau < prior_tau
        # A first choice inside the best's 95% interval is not called worse: noise can swap them.
        regret_worse = (regret is not None and top_regret is not None
                        and regret > top_regret[1]["regret"] and not info.get("pick_within_noise"))
        noisy = (regret is not None and top_regret is not None
                 and regret > top_regret[1]["regret"] and info.get("pick_within_noise"))
        taus = f"weighted tau {tau:+.2f} vs {prior_tau:+.2f}"
        regrets = "" if regret is None or top_regret is None else (
            f"top-1 regret {_gap(regret, metric_name)} vs {_gap(top_regret[1]['regret'], metric_name)}"
            f" for {PRIORS[top_regret[0]]}")
        if tau_worse and regret_worse:
            lines.append(f"On this task {name} ranks worse than {prior} ({taus}), and its first "
                         f"choice is worse too ({regrets}): the free prior would have served "
                         "better.")
        elif tau_worse:
            lines.append(f"On this task {name} ranks worse than {prior} ({taus})"
                         + (f", though its first choice is within the best's 95% interval "
                            f"({regrets})." if noisy else
                            f", though its first choice is as good ({regrets})." if regrets
                            else "."))
        elif regret_worse:
            lines.append(f"On this task {name} ranks at least as well as the data-free priors "
                         f"({taus} for {prior}), but its first choice is worse ({regrets}).")
        else:
            lines.append(f"On this task {name} ranks at least as well as the data-free priors "
                         f"({taus} for {prior}"
                         + (f"; {regrets}" if regrets else "") + ").")
    return lines


def _agreement(name: str, pool: Sequence[Candidate]) -> dict[str, Any]:
    kind = "score" if any(name in c.scores for c in pool) else "prior"
    used = [c for c in pool if _finite(_value(c, name, kind))]
    values = [float(_value(c, name, kind)) for c in used]
    metrics = [float(c.metric) for c in used]
    tau = weighted = top = best = regret = None
    if len(used) >= 2:
        tau, weighted = (_defined(f(values, metrics)) for f in (kendall_tau, weighted_kendall_tau))
    if used:
        first = max(values)
        picks = [c for c, v in zip(used, values, strict=True) if v == first]
        top = [c.name for c in picks]
        best_c = max(used, key=lambda c: c.metric)
        best = best_c.name
        regret = round(best_c.metric - sum(c.metric for c in picks) / len(picks), 6)
        low = _interval_low(best_c)
        within = None if low is None else all(c.metric >= low for c in picks)
    return {"kind": kind, "tau": tau, "weighted_tau": weighted, "n": len(used),
            "candidates": [c.name for c in used], "top_pick": top, "best": best,
            "regret": regret, "pick_within_noise": within if used else None,
            "equal_fidelity": _equal_fidelity(used)}


def _interval_low(c: Candidate) -> float | None:
    """The lower end of the metric's 95% interval (`figures["metric_interval"]`), if recorded."""
    interval = c.figures.get("metric_interval")
    if isinstance(interval, (list, tuple)) and len(interval) == 2 and _finite(interval[0]):
        return float(interval[0])
    return None


def _value(c: Candidate, name: str, kind: str) -> Any:
    return c.scores.get(name) if kind == "score" else c.value(name)


def _equal_fidelity(used: Sequence[Candidate]) -> bool:
    """Whether every metric comes from the same training: same epochs, or stopped early."""
    epochs = [c.figures.get("fine_tune_epochs") for c in used]
    most = max((e for e in epochs if isinstance(e, int)), default=None)
    return all(e is None or e == most or c.figures.get("stopped_early")
               for c, e in zip(used, epochs, strict=True))


def _gap(value: float, metric_name: str) -> str:
    if is_fraction_metric(metric_name):
        return f"{value * 100:.1f} points"
    return f"{value:.4g}"


def _defined(value: float) -> float | None:
    return None if math.isnan(value) else value


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
