"""Write what a selection run found: report.md, results.json, pareto.png, transferability.png.

`write_report` takes the candidate records (`recommend.Candidate`, or dicts
with the same keys), the `Recommendation` and the run's bookkeeping, and
writes into one directory:

- `results.json`: everything, machine-readable, with `schema_version`
  (`SCHEMA_VERSION`); `read_results` checks it on the way back in.
- `report.md`: the recommendation and its reason, a table of every candidate
  (failed ones with the reason), every recorded figure, the ranking table
  (`ranking.py`: each transferability score beside the data-free priors,
  parameter count and FLOPs, with weighted tau, tau and top-1 regret against
  the fine-tuned metric, and in words whether a score beat the priors), the
  budget spent, and the selection's wall time against the estimated
  brute-force time.
- `pareto.png`: fine-tuned quality against serving latency (left) and against
  training time per epoch (right), point area by parameter count, shape by
  adaptation, each panel's Pareto front highlighted and connected, the
  recommendation marked in both, every point labelled, constraints drawn.
- `transferability.png`: each transferability score against the fine-tuned
  metric, one panel per score (only when scores were recorded).

Every file is written through `io_utils` (a temporary name moved into place),
so a crash never leaves a half-written report behind.
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tfhub_finetune.errors import InputError
from tfhub_finetune.io_utils import atomic_path, atomic_write_text
from tfhub_finetune.selection.config import export_mode, serving_forms_of
from tfhub_finetune.selection.ranking import (
    PRIORS,
    prior_verdicts,
    transferability_correlations,
)
from tfhub_finetune.selection.recommend import (
    REFERENCE_FORM,
    Candidate,
    Recommendation,
    adaptation_label,
    as_candidates,
    is_fraction_metric,
    pareto_front,
    violations,
)

SCHEMA_VERSION = 1
RESULTS_KEYS = (
    "schema_version",
    "created_utc",
    "title",
    "metric_name",
    "device",
    "constraints",
    "recommendation",
    "candidates",
    "kendall_tau",
    "budget",
    "timing",
    "extra",
)

# Main-table columns: (where to read it, header, how to show it).
_CORE_COLUMNS = (
    ("latency_ms", "p50 latency (ms)", "float"),
    ("latency_p95_ms", "p95 latency (ms)", "float"),
    ("model_latency_p50_ms", "model-only p50 (ms)", "float"),
    ("throughput_eps", "throughput (ex/s)", "int"),
    ("params", "params", "count"),
    ("flops_per_example", "FLOPs/ex", "count"),
    ("memory_mb", "peak infer mem (MB)", "float"),
    ("peak_train_memory_mb", "peak train mem (MB)", "float"),
    ("saved_model_mb", "SavedModel (MB)", "float"),
    ("train_minutes_projected", "full fine-tune (min, projected)", "float"),
    ("peak_train_rss_mb", "peak train RSS (MB)", "float"),
)
# What each constraint limits, in words (the report's constraint lines).
_CONSTRAINT_FIGURES = {
    "max_latency_ms": "batch-1 p50 latency of the serving form",
    "max_memory_mb": "peak inference memory of the serving form",
    "max_params": "parameters",
    "min_metric": "fine-tuned metric of the serving form",
    "max_train_minutes": "projected minutes of a full fine-tuning (the first rung's epoch time "
    "x max_epochs)",
    "max_train_memory_mb": "peak training RSS of the trial's process",
}
_SCORE_LABELS = {
    "logme": "LogME (per example)",
    "knn_accuracy": "kNN accuracy (held-out)",
    "linear_probe_accuracy": "linear-probe accuracy (held-out)",
}


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #


def write_report(
    out_dir: str | os.PathLike,
    candidates: Iterable[Candidate | Mapping[str, Any]],
    recommendation: Recommendation,
    *,
    device: str | None = None,
    budget: Mapping[str, Any] | None = None,
    selection_seconds: float | None = None,
    brute_force_seconds: float | None = None,
    title: str = "Model selection",
    extra: Mapping[str, Any] | None = None,
    search: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Writes report.md, results.json, pareto.png and transferability.png.

    Args:
        out_dir: str or Path. Created if missing.
        candidates: Candidate records or dicts (failed ones included).
        recommendation: Recommendation. From `recommend(...)`.
        device: str or None. What the figures were measured on. Defaults to
            the `device` figure the profiles recorded.
        budget: dict or None. What the selection spent, e.g.
            `{"fine_tune_epochs": 42, "trials": 12, "device_hours": 0.4}`.
        selection_seconds: float or None. Wall time of the whole selection.
        brute_force_seconds: float or None. Estimated time to fine-tune every
            candidate at the full budget.
        title: str. Report heading. Defaults to `"Model selection"`.
        extra: dict or None. Anything else to keep in results.json (e.g. the
            run's flags).
        search: dict or None. Model selection's facts (`select.py` records
            them: stage times, brute force, the rungs, the settings); report.md
            then tells the search, brute force, "is pretraining worth it" and
            the next step, after the summary.

    Returns:
        Name -> path of each file written (`transferability` only when
        transferability scores were recorded).

    Raises:
        InputError: for bad candidate records.

    Example:

    ```python
    rec = recommend(records, max_latency_ms=20)
    paths = write_report("runs/select", records, rec, selection_seconds=740.0,
                         brute_force_seconds=3100.0, budget={"fine_tune_epochs": 42})
    paths["report"]  # runs/select/report.md
    ```
    """
    pool = as_candidates(candidates)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = results_payload(
        pool,
        recommendation,
        device=device,
        budget=budget,
        selection_seconds=selection_seconds,
        brute_force_seconds=brute_force_seconds,
        title=title,
        extra=extra,
    )
    paths = {"results": out / "results.json", "report": out / "report.md"}
    paths["pareto"] = plot_pareto(
        pool, recommendation, out / "pareto.png", device=payload["device"]
    )
    transfer = plot_transferability(pool, out / "transferability.png", recommendation.metric_name)
    if transfer is not None:
        paths["transferability"] = transfer
    atomic_write_text(paths["results"], json.dumps(payload, indent=2, allow_nan=False) + "\n")
    atomic_write_text(paths["report"], _markdown(pool, recommendation, payload, paths, search))
    return paths


def results_payload(
    candidates: Iterable[Candidate | Mapping[str, Any]],
    recommendation: Recommendation,
    *,
    device: str | None = None,
    budget: Mapping[str, Any] | None = None,
    selection_seconds: float | None = None,
    brute_force_seconds: float | None = None,
    title: str = "Model selection",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The results.json content (JSON-safe: NaN and inf become null)."""
    pool = as_candidates(candidates)
    feasible = set(recommendation.feasible)
    pareto = set(recommendation.pareto)
    records = []
    for c in pool:
        record = c.to_dict()
        record["recommended"] = c.name == recommendation.name
        record["feasible"] = c.name in feasible
        record["on_pareto_front"] = c.name in pareto
        record["excluded"] = recommendation.excluded.get(c.name)
        records.append(record)
    speedup = None
    if selection_seconds and brute_force_seconds:
        speedup = brute_force_seconds / selection_seconds
    payload = {
        "schema_version": SCHEMA_VERSION,
        "created_utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "title": title,
        "metric_name": recommendation.metric_name,
        "device": device or _recorded_device(pool),
        "constraints": dict(recommendation.constraints),
        "recommendation": recommendation.to_dict(),
        "candidates": records,
        "kendall_tau": transferability_correlations(pool),
        "budget": dict(budget or {}),
        "timing": {
            "selection_seconds": selection_seconds,
            "brute_force_seconds_estimate": brute_force_seconds,
            "speedup": speedup,
        },
        "extra": dict(extra or {}),
    }
    return _json_safe(payload)


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a results.json and checks its schema.

    Raises:
        InputError: when the file is unreadable, from a newer schema, or
            missing keys.

    Example:

    ```python
    results = read_results("runs/select/results.json")
    [c["name"] for c in results["candidates"]]
    ```
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(
            "Cannot read the selection results.",
            received={"path": str(path)},
            fix=f"({type(err).__name__}: {err})",
        ) from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise InputError(
            "Unsupported results.json schema version.",
            received={"path": str(path), "schema_version": version},
            fix=f"This version reads schema_version <= {SCHEMA_VERSION}; upgrade tfhub_finetune.",
        )
    missing = [k for k in RESULTS_KEYS if k not in data]
    if missing:
        raise InputError(
            "results.json is missing keys.", received={"path": str(path), "missing": missing}
        )
    return data


def plot_pareto(
    candidates: Iterable[Candidate | Mapping[str, Any]],
    recommendation: Recommendation,
    path: str | os.PathLike,
    *,
    device: str | None = None,
) -> Path:
    """Fine-tuned quality vs serving latency (left) and vs training time (right).

    Both panels share the quality axis, mark each panel's Pareto front, the
    recommendation (a red star) and the 95% interval bars, size points by
    parameter count and shape them by adaptation (`figures["adaptation"]`,
    `full` when not recorded). Constraints are drawn where an axis shows them;
    a candidate breaking one the axes cannot show is crossed out.

    Returns:
        The PNG's path.
    """
    pool = as_candidates(candidates)
    metric_name = recommendation.metric_name
    fraction = is_fraction_metric(metric_name)
    scale = 100.0 if fraction else 1.0
    fine_tuned = [c for c in pool if not c.error and _finite(c.metric)]
    train_cost = _train_cost(fine_tuned)
    panels = [
        ("latency_ms", [c for c in fine_tuned if _finite(c.latency_ms)]),
        (train_cost, [c for c in fine_tuned if _finite(c.value(train_cost))]),
    ]
    fig = _new_figure((18.0, 7.0))
    axes = fig.subplots(1, 2, sharey=True)
    chosen = recommendation.name
    max_params = max((float(c.params) for _, shown in panels for c in shown
                      if _finite(c.params)), default=0.0)

    def area(c: Candidate) -> float:
        # Marker area proportional to parameter count (the honest encoding).
        if not _finite(c.params) or max_params <= 0:
            return 60.0
        return max(25.0, 1400.0 * float(c.params) / max_params)

    markers = _adaptation_markers(c for _, shown in panels for c in shown)
    all_ys = [float(c.metric) * scale for _, shown in panels for c in shown]
    all_ys += [v * scale for _, shown in panels for c in shown if _interval(c)
               for v in _interval(c)]
    crossed: set[str] = set()
    closest_drawn = False
    for ax, (key, shown) in zip(axes, panels, strict=True):
        if not shown:
            what = "a latency" if key == "latency_ms" else "a recorded training time"
            ax.text(0.5, 0.5, f"No fine-tuned candidate has {what}.", ha="center",
                    va="center", transform=ax.transAxes, fontsize=12)
            ax.set_xticks([])
            continue
        divisor = 1.0 if key != _TRAIN_COST else _train_unit(shown)[1]
        xs = [float(c.value(key)) / divisor for c in shown]
        ys = [float(c.metric) * scale for c in shown]
        front = {c.name for c in pareto_front(shown, {"metric": "max", key: "min"})}
        for marker in dict.fromkeys(markers.values()):
            for hollow in (False, True):
                group = [i for i, c in enumerate(shown) if markers[_adaptation(c)] == marker
                         and (c.serving_form != REFERENCE_FORM) == hollow]
                if not group:
                    continue
                colours = [_point_colour(shown[i], front, chosen) for i in group]
                # Fill = serving form: float32 filled, a quantized form hollow (its colour
                # on the edge), so the two forms of one model read as a pair.
                ax.scatter([xs[i] for i in group], [ys[i] for i in group],
                           s=[area(shown[i]) for i in group], marker=marker,
                           facecolors="white" if hollow else colours,
                           edgecolors=colours if hollow else "black",
                           alpha=0.9 if hollow else 0.55, linewidths=2.0 if hollow else 0.8,
                           zorder=3)
        _error_bars(ax, shown, xs, ys, scale)
        line = sorted((i for i, c in enumerate(shown) if c.name in front), key=lambda i: xs[i])
        steps = []  # The drawn steps-post line, so labels keep off it.
        for a, b in zip(line, line[1:], strict=False):
            steps += [(xs[a], ys[a]), (xs[b], ys[a])]
        if line:
            steps.append((xs[line[-1]], ys[line[-1]]))
        if len(line) > 1:
            ax.plot([xs[i] for i in line], [ys[i] for i in line], color="tab:blue",
                    linewidth=2, zorder=2, drawstyle="steps-post")
        for i, c in enumerate(shown):
            if c.name == chosen:
                # Its own shape, size and fill, red and outlined: adaptation and form stay
                # readable.
                hollow = c.serving_form != REFERENCE_FORM
                ax.scatter([xs[i]], [ys[i]], marker=markers[_adaptation(c)], s=area(c),
                           facecolors="white" if hollow else "tab:red",
                           edgecolors="tab:red" if hollow else "black", linewidths=2.5,
                           zorder=5)
        # Constraints this panel's x-axis cannot show: cross out who breaks them.
        drawn = {"min_metric", _X_LIMITS.get(key)}
        hidden_limits = {k: v for k, v in recommendation.constraints.items() if k not in drawn}
        breaking = [i for i, c in enumerate(shown) if violations(c, hidden_limits)]
        if breaking:
            ax.scatter([xs[i] for i in breaking], [ys[i] for i in breaking], marker="x", s=90,
                       color="tab:red", linewidths=2.0, zorder=4)
            crossed |= {k for i in breaking for k in violations(shown[i], hidden_limits)}
        if chosen is None and recommendation.relaxations:
            # Nothing fits: ring the candidate the smallest relaxation would admit.
            admits = recommendation.relaxations[0].admits
            for i, c in enumerate(shown):
                if c.name == admits:
                    closest_drawn = True
                    ax.scatter([xs[i]], [ys[i]], s=area(c) + 500, facecolors="none",
                               edgecolors="tab:red", linewidths=1.8, zorder=4)
        log_x = max(xs) / max(min(xs), 1e-9) > 20
        if log_x:
            from matplotlib.ticker import FuncFormatter

            ax.set_xscale("log")
            # Plain numbers (1, 10, 100 ms), not powers of ten.
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        _set_limits(ax, xs, all_ys, log_x, recommendation, x_limit=_X_LIMITS.get(key))
        _draw_constraints(ax, recommendation, scale, x_limit=_X_LIMITS.get(key))
        ax.grid(True, which="both", alpha=0.3)
        scale_note = ", log scale" if log_x else ""
        if key == "latency_ms":
            ax.set_xlabel(f"serving: p50 latency at batch 1 (ms{scale_note})", fontsize=11)
            ax.set_title(f"Fine-tuned {metric_name} vs serving latency", fontsize=12)
        elif key == _TRAIN_COST:
            unit = _train_unit(shown)[0]
            ax.set_xlabel(f"training: time per epoch ({unit}, median measured epoch"
                          f"{scale_note})", fontsize=11)
            ax.set_title(f"Fine-tuned {metric_name} vs training time", fontsize=12)
        else:
            ax.set_xlabel(f"training: a full fine-tuning (min, projected from the first rung"
                          f"{scale_note})", fontsize=11)
            ax.set_title(f"Fine-tuned {metric_name} vs training time", fontsize=12)
        ax.tick_params(labelleft=True)
        fig.canvas.draw()  # Label placement needs the final layout.
        _place_labels(ax, shown, xs, ys, chosen, [area(c) for c in shown], steps)
    axes[0].set_ylabel(f"fine-tuned {metric_name}" + (" (%)" if fraction else ""), fontsize=11)
    title = f"Fine-tuned {metric_name}: what it costs to serve and to train"
    if recommendation.constraints and chosen is None:
        title += " (no candidate meets the constraints)"
    if device:
        title += f"\n{device}"
    fig.suptitle(title, fontsize=13)
    _pareto_legends(fig, recommendation, markers, max_params, panels, crossed, closest_drawn)
    hidden = [c for c in pool if c not in panels[0][1]]
    untimed = [c for c in panels[0][1] if c not in panels[1][1]]
    notes = []
    if hidden:
        notes.append("Not shown: " + "; ".join(f"{c.name} ({_why_hidden(c)})" for c in hidden))
    if untimed:
        notes.append("No training time (right panel): " + ", ".join(c.name for c in untimed))
    if notes:
        # A figure-level caption: constrained layout keeps room for it.
        fig.supxlabel(_wrap(". ".join(notes), 220), x=0.01, ha="left", fontsize=9,
                      color="0.25")
    _atomic_save_figure(fig, Path(path))
    return Path(path)


# The training-cost figure of the right panel (`seconds_per_epoch` from the trials: the
# median measured epoch, evaluation pass included) and the marker of each adaptation family.
_TRAIN_COST = "seconds_per_epoch"
_ADAPTATION_MARKERS = {"full": "o", "head": "s", "top": "^v<>", "lora": "DdPX"}
_ADAPTATION_LABELS = {"full": "full (every weight)", "head": "head only (backbone frozen)",
                      "top": "top {} layers", "lora": "LoRA rank {}"}


# The constraint each panel's x-axis draws, and how its line is labelled.
_X_LIMITS = {"latency_ms": "max_latency_ms", "train_minutes_projected": "max_train_minutes"}
_X_LIMIT_WORDS = {"max_latency_ms": ("max latency", "ms"),
                  "max_train_minutes": ("max training", "min")}


def _point_colour(c: Candidate, front: set[str], chosen: str | None) -> str:
    if c.name == chosen:
        return "tab:red"
    return "tab:blue" if c.name in front else "0.6"


def _adaptation(c: Candidate) -> str:
    return c.adaptation


def _train_cost(fine_tuned: Sequence[Candidate]) -> str:
    """The right panel's x: projected full fine-tune minutes where recorded (what
    `max_train_minutes` and `prefer=train_time` use), else the median epoch time."""
    projected = "train_minutes_projected"
    return projected if any(_finite(c.value(projected)) for c in fine_tuned) else _TRAIN_COST


def _adaptation_markers(shown: Iterable[Candidate]) -> dict[str, str]:
    """Adaptation -> marker: one shape per family, a variant per setting (top:2, top:4)."""
    found = sorted({_adaptation(c) for c in shown}, key=lambda a: (
        list(_ADAPTATION_MARKERS).index(a.split(":")[0]) if a.split(":")[0] in
        _ADAPTATION_MARKERS else len(_ADAPTATION_MARKERS), a))
    markers, used = {}, {}
    for adaptation in found:
        family = adaptation.split(":")[0]
        shapes = _ADAPTATION_MARKERS.get(family, "hH8p")
        markers[adaptation] = shapes[min(used.get(family, 0), len(shapes) - 1)]
        used[family] = used.get(family, 0) + 1
    return markers


def _adaptation_label(adaptation: str) -> str:
    family, _, setting = adaptation.partition(":")
    label = _ADAPTATION_LABELS.get(family)
    return adaptation if label is None else label.format(setting)


def _train_unit(shown: Sequence[Candidate]) -> tuple[str, float]:
    """Seconds, or minutes when an epoch takes over two: (unit, seconds per unit)."""
    longest = max(float(c.value(_TRAIN_COST)) for c in shown)
    return ("min", 60.0) if longest >= 120 else ("s", 1.0)


def _pareto_legends(fig: Any, rec: Recommendation, markers: Mapping[str, str],
                    max_params: float, panels: Sequence[tuple[str, Sequence[Candidate]]],
                    crossed: set[str], closest: bool) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    def handle(label: str, **style: Any) -> Any:
        return Line2D([], [], linestyle="none", markeredgecolor="black", **style, label=label)

    handles = [
        handle("on the panel's Pareto front", color="tab:blue", marker="o", markersize=9,
               alpha=0.7),
        handle("dominated", color="0.6", marker="o", markersize=9, alpha=0.7),
    ]
    if rec.name:
        handles.append(handle(f"recommended: {rec.name}", color="tab:red", marker="o",
                              markersize=11, markeredgewidth=2.0))
    if rec.constraints:
        handles.append(Patch(color="tab:green", alpha=0.12, label="within the axis's limits"))
    if crossed:
        names = ", ".join(sorted(k.removeprefix("max_").removesuffix("_mb")
                                 .removesuffix("_ms") for k in crossed))
        handles.append(Line2D([], [], marker="x", linestyle="none", markersize=9,
                              color="tab:red", markeredgewidth=2.0,
                              label=f"breaks a constraint ({names})"))
    if closest:
        handles.append(Line2D([], [], marker="o", linestyle="none", markersize=14,
                              markerfacecolor="none", markeredgecolor="tab:red",
                              markeredgewidth=1.8, label="closest fit (smallest relaxation)"))
    # Figure legends "outside" the axes: constrained layout makes room, and they never
    # cover a point.
    fig.legend(handles=handles, loc="outside right upper", fontsize=9, title="candidates",
               title_fontsize=9)
    shapes = [handle(_adaptation_label(a), color="white", marker=m, markersize=9)
              for a, m in markers.items()]
    forms = sorted({c.serving_form for _, group in panels for c in group},
                   key=lambda f: (f != REFERENCE_FORM, f))
    title = "shape = adaptation"
    if forms != [REFERENCE_FORM]:
        # One legend (two at the same spot would overlap): the shapes, then the fills.
        shapes += [handle(f"{form} (filled)" if form == REFERENCE_FORM else f"{form} (hollow)",
                          color="0.6" if form == REFERENCE_FORM else "white", marker="o",
                          markersize=9, markeredgewidth=0.8 if form == REFERENCE_FORM else 2.0)
                   for form in forms]
        title += "\nfill = serving form"
    fig.legend(handles=shapes, loc="outside right center", fontsize=9, title=title,
               title_fontsize=9)
    shown = list({c.name: c for _, group in panels for c in group}.values())
    sizes = [handle(f"{_count(value)} params", color="white", marker="o",
                    markersize=math.sqrt(max(25.0, 1400.0 * value / max_params)))
             for value in _size_legend_values(shown)]
    if sizes:
        fig.legend(handles=sizes, loc="outside right lower", fontsize=9, labelspacing=2.2,
                   borderpad=1.2, handletextpad=1.5, title="area = parameters",
                   title_fontsize=9)


def plot_transferability(
    candidates: Iterable[Candidate | Mapping[str, Any]],
    path: str | os.PathLike,
    metric_name: str = "accuracy",
) -> Path | None:
    """One panel per transferability score: score vs fine-tuned metric, tau in the title.

    Returns:
        The PNG's path, or None (nothing written) when no score has two
        candidates with both figures.
    """
    pool = as_candidates(candidates)
    correlations = transferability_correlations(pool)
    # The priors' figures are in the main table; these panels show what was measured.
    panels = [name for name, info in correlations.items()
              if info["kind"] == "score" and info["n"] >= 2]
    if not panels:
        return None
    fraction = is_fraction_metric(metric_name)
    scale = 100.0 if fraction else 1.0
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig = _new_figure((5.4 * columns, 4.8 * rows))
    labels = []
    for index, name in enumerate(panels):
        ax = fig.add_subplot(rows, columns, index + 1)
        used = [c for c in pool if c.name in set(correlations[name]["candidates"])]
        xs = [float(c.scores[name]) for c in used]
        ys = [float(c.metric) * scale for c in used]
        ax.scatter(xs, ys, s=70, color="tab:purple", alpha=0.7, edgecolors="black", zorder=3)
        _error_bars(ax, used, xs, ys, scale)
        x_pad = (max(xs) - min(xs)) * 0.25 or 0.1
        y_pad = (max(ys) - min(ys)) * 0.15 or 1.0
        ax.set_xlim(min(xs) - x_pad, max(xs) + x_pad)
        ends = ys + [v * scale for c in used if _interval(c) for v in _interval(c)]
        ax.set_ylim(min(ends) - y_pad, max(ends) + y_pad)
        labels.append((ax, [(_fidelity_label(c, pool), x, y)
                            for c, x, y in zip(used, xs, ys, strict=True)]))
        tau = correlations[name]["tau"]
        tau_text = "undefined" if tau is None else f"{tau:+.2f}"
        ax.set_title(f"{name}: Kendall tau {tau_text} (n={len(used)})", fontsize=11)
        ax.set_xlabel(_SCORE_LABELS.get(name, name) + " (higher = better expected)", fontsize=10)
        ax.set_ylabel(f"fine-tuned {metric_name}" + (" (%)" if fraction else ""), fontsize=10)
        ax.grid(True, alpha=0.3)
    fig.suptitle("Transferability scores vs fine-tuned quality (tau +1: same ranking)", fontsize=12)
    fig.canvas.draw()  # Label placement needs the final layout.
    for ax, items in labels:
        _place_text_labels(ax, items, radii=[math.sqrt(70.0) / 2] * len(items))
    _atomic_save_figure(fig, Path(path))
    return Path(path)


# --------------------------------------------------------------------------- #
# Markdown
# --------------------------------------------------------------------------- #


def _markdown(
    pool: Sequence[Candidate],
    rec: Recommendation,
    payload: Mapping[str, Any],
    paths: Mapping[str, Path],
    search: Mapping[str, Any] | None = None,
) -> str:
    metric_name = rec.metric_name
    lines = [f"# {payload['title']}", ""]
    if rec.name:  # The reason starts with the name.
        lines += [f"**Recommendation:** {_md(rec.reason)}", ""]
    else:
        lines += [f"**No recommendation.** {_md(rec.reason)}", ""]
    constraints = ", ".join(f"`{k}={v:g}` ({_CONSTRAINT_FIGURES.get(k, k)})"
                            for k, v in rec.constraints.items()) or "none"
    lines += _tie_lines(rec)
    lines += [
        f"- Constraints: {constraints}",
        *_serving_form_lines(pool, rec, (search or {}).get("data", {}).get("modality")),
        f"- Metric: fine-tuned `{metric_name}` (higher is better)",
        f"- Device: {payload['device'] or 'not recorded'}",
        f"- Pareto front ({metric_name} up; latency, memory, params down): "
        + (", ".join(rec.pareto) or "empty"),
        f"- Time: {_timing_sentence(payload['timing'])}",
        f"- Written: {payload['created_utc']} (results.json schema {SCHEMA_VERSION})",
        *_contention_lines(pool),
        "",
    ]
    if search:
        lines += _search_sections(search, pool, rec)
    if payload["budget"]:
        lines += ["## Budget spent", "", "| item | value |", "|---|---|"]
        lines += [f"| {_md(k)} | {_md(_plain(v))} |" for k, v in payload["budget"].items()]
        lines.append("")

    score_names = sorted({k for c in pool for k in c.scores})
    # Fine-tuning epochs, when the candidates' metrics come from different ones (halving).
    epochs = {c.name: c.figures.get("fine_tune_epochs") for c in pool}
    show_epochs = len({e for e in epochs.values() if e is not None}) > 1
    shown_metric = f"{metric_name} [95% interval]" if any(
        _interval(c) for c in pool) else metric_name
    headers = ["candidate", "status", shown_metric, *(["epochs"] if show_epochs else []),
               "adaptation", "serving form", *score_names] + [h for _, h, _ in _CORE_COLUMNS]
    lines += ["## Candidates", "", "| " + " | ".join(headers) + " |"]
    lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(headers) - 2)) + "|")
    for c in sorted(pool, key=lambda c: _table_order(c, rec)):
        cells = [f"**{c.name}**" if c.name == rec.name else c.name, _status(c, rec)]
        cells.append(_metric_cell(c, metric_name))
        if show_epochs:
            cells.append("—" if epochs[c.name] is None else str(epochs[c.name]))
        cells += [adaptation_label(c.adaptation), c.serving_form]
        cells += [_fmt(c.scores.get(s), "score") for s in score_names]
        cells += [_fmt(c.value(key), kind) for key, _, kind in _CORE_COLUMNS]
        lines.append("| " + " | ".join(_md(x) for x in cells) + " |")
    lines.append("")

    lines += _ranking_section(payload["kendall_tau"], metric_name)

    lines += ["## Plots", "", f"![{metric_name} vs latency]({paths['pareto'].name})", ""]
    if "transferability" in paths:
        lines += [f"![transferability vs fine-tuned]({paths['transferability'].name})", ""]

    lines += _all_figures_table(pool)
    if any(c.figures.get("memory_method") for c in pool):
        isolated = [c.name for c in pool if c.figures.get("isolated_process")]
        lines += [
            "## How the figures were measured",
            "",
            "- Latency: one request at batch 1 after warm-up, on the TF Serving export's "
            "`serving_default` loaded in a fresh process: end to end, raw strings (filling the "
            "sequence length) or a JPEG of the model's size in, tokenizer or decoding included "
            "(else on the built Keras model: see `inference_measured_on`); p50/p95 over timed "
            "calls (at least the configured count and time, until the two halves' medians agree "
            "within 5%). Model-only: the same network on token ids or pixels (the token-id twin "
            "or `predict_images`), p50.",
            "- Clock: " + _clock_sentence(pool),
            "- Throughput: examples/s at the serving batch (halved on out-of-memory).",
            "- Memory: " + (_recorded(pool, "memory_method") or "not recorded") + ".",
            "- FLOPs: TF graph profiler on the frozen forward at the task's input shape, per "
            "example (a multiply-add counts 2).",
            "- SavedModel: size on disk of the served export (strings or encoded images in, "
            "with the tokenizer or decoding; the token-id twin not counted).",
            "- Timings share the machine with whatever else ran; compare candidates measured "
            "in the same run.",
            "- Own process per candidate (clean memory figures): "
            + (", ".join(isolated) if isolated else "none")
            + ".",
            "",
        ]
    return "\n".join(lines)


def _serving_form_lines(pool: Sequence[Candidate], rec: Recommendation,
                        modality: str | None = None) -> list[str]:
    """How the forms other than float32 were measured, or a hint when only float32 was."""
    forms = [c for c in pool if c.serving_form != REFERENCE_FORM and not c.error]
    if forms:
        return [f"- Serving forms: {', '.join(sorted({c.serving_form for c in forms}))} rows are "
                "the same fine-tuned weights (the trial's last epoch) exported and measured beside "
                "float32: their metric on the eval set is their own; latency is the float32 "
                "profile's with its network share scaled by the measured ratio, memory the "
                "float32 profile's plus the measured difference (`serving_vs_float32` in "
                "results.json)."]
    serving = {"max_latency_ms", "max_memory_mb"} & set(rec.constraints)
    if serving and rec.name is None:
        # Text classifiers also have the int8 network as a TFLite file, the fastest form.
        forms = ",".join(serving_forms_of(modality))
        return ["- Serving forms: float32 only; an int8 form may meet "
                + " and ".join(f"`{k}`" for k in sorted(serving))
                + f": rerun with `--serving_forms={forms}` (the cache keeps the trials)."]
    return []


def _contention_lines(pool: Sequence[Candidate]) -> list[str]:
    """A warning when wall-clock latencies were timed while other work ran."""
    busy = [c for c in pool if c.figures.get("latency_clock", "wall") == "wall"
            and _finite(c.figures.get("load_average")) and c.figures.get("cpu_count")
            and c.figures["load_average"] > c.figures["cpu_count"] + 1]
    if not busy:
        return []
    worst = max(busy, key=lambda c: c.figures["load_average"])
    return [
        f"- **Latency was timed on a busy machine** (load average up to "
        f"{worst.figures['load_average']:.1f} on {worst.figures['cpu_count']} CPUs, for "
        f"{', '.join(c.name for c in busy)}): wall-clock figures are inflated and differ from "
        "run to run, so the latency limit may cut the wrong candidates. Profile on a quiet "
        "machine, or rerun with `--latency_clock=cpu --profile_threads=1 --overwrite` (CPU time "
        "per request on one thread, steady under load)."
    ]


def _clock_sentence(pool: Sequence[Candidate]) -> str:
    clocks = {c.figures.get("latency_clock", "wall") for c in pool if c.figures.get("device")}
    if clocks == {"cpu"}:
        return ("latency figures are CPU time per request (all of the serving process's "
                "threads), which on one thread is the wall time of the same request on a quiet "
                "core and barely moves when other work shares the machine; the wall-clock "
                "median is in results.json (`latency_wall_p50_ms`).")
    return ("latency figures are elapsed (wall-clock) time per request; the serving process's "
            "CPU time per request and the machine's load average while timing are in "
            "results.json (`latency_cpu_p50_ms`, `load_average`).")


def _ranking_section(table: Mapping[str, Mapping[str, Any]], metric_name: str) -> list[str]:
    """The rankers' table (scores and data-free priors), what it means, and the verdicts."""
    lines = [f"## Transferability scores and data-free priors vs fine-tuned {metric_name}", ""]
    if not any(info["kind"] == "score" for info in table.values()):
        lines += ["No transferability scores were recorded."]
        if not table:
            return [*lines, ""]
        lines.append("")
    unit = " (points)" if is_fraction_metric(metric_name) else ""
    lines += [f"| ranker | needs | weighted tau | tau | first choice | top-1 regret{unit} | "
              "candidates |", "|---|---|---:|---:|---|---:|---:|"]
    for name, info in table.items():
        label = f"{name} ({PRIORS[name]})" if info["kind"] == "prior" else name
        needs = ("nothing (data-free, from the profile)" if info["kind"] == "prior"
                 else "the task's data (frozen features)")
        pick = ", ".join(info["top_pick"] or []) or "—"
        if info["top_pick"] and len(info["top_pick"]) > 1:
            pick += " (tied)"
        regret = info["regret"]
        shown = "—" if regret is None else (f"{regret * 100:.1f}" if unit else f"{regret:.4g}")
        lines.append(f"| {_md(label)} | {needs} | {_tau(info['weighted_tau'])} | "
                     f"{_tau(info['tau'])} | {_md(pick)} | {shown} | {info['n']} |")
    lines += [
        "",
        "Weighted tau (Vigna's, as transferability papers report it) counts a swap near the "
        "top more than one at the bottom; tau is Kendall's tau-b. +1: the ranker orders the "
        "candidates as fine-tuning did; 0: no better than chance; with few candidates one "
        f"swapped pair moves either a lot. Top-1 regret: the best fine-tuned {metric_name} "
        "minus that of the ranker's first choice (0: it picked the best). The data-free priors "
        "(bigger ranks higher) cost nothing; on the standard 11-model x 11-dataset benchmark "
        "they reach a weighted tau of about 0.61-0.65 against LogME's 0.51, so a score earns "
        "its cost only by beating them on this task.",
        "",
    ]
    verdicts = prior_verdicts(table, metric_name)
    lines += [f"- {_md(v, 400)}" for v in verdicts]
    if any(not info["equal_fidelity"] for info in table.values()):
        lines.append("- These figures come from the search: candidates that halving cut early "
                     "trained fewer epochs, which the rankings and regrets include. Rerun with "
                     "`--brute_force` for equal-fidelity figures.")
    return lines if lines[-1] == "" else [*lines, ""]


def _fidelity_label(c: Candidate, pool: Sequence[Candidate]) -> str:
    """The name, plus `, 1 ep` when it trained fewer epochs than the most any candidate did."""
    most = max((e for e in (p.figures.get("fine_tune_epochs") for p in pool)
                if isinstance(e, int)), default=None)
    epochs = c.figures.get("fine_tune_epochs")
    return f"{c.name}, {epochs} ep" if isinstance(epochs, int) and epochs != most else c.name


def _interval(c: Candidate) -> tuple[float, float] | None:
    """The metric's 95% interval (`figures["metric_interval"]`), if recorded."""
    value = c.figures.get("metric_interval")
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_finite(v) for v in value):
        return float(value[0]), float(value[1])
    return None


def _metric_cell(c: Candidate, metric_name: str) -> str:
    """`91.2% [88.7, 93.6]`: the figure and its interval, in the figure's unit."""
    cell = _fmt(c.metric, "metric", metric_name)
    interval = _interval(c)
    if interval is None or not _finite(c.metric):
        return cell
    scale, digits = (100.0, 1) if is_fraction_metric(metric_name) else (1.0, 3)
    low, high = (f"{v * scale:.{digits}f}" for v in interval)
    return f"{cell} [{low}, {high}]"


def _error_bars(ax: Any, shown: Sequence[Candidate], xs: Sequence[float],
                ys: Sequence[float], scale: float) -> None:
    """Vertical 95% interval bars under the points that have one."""
    bars = [(x, y, _interval(c)) for c, x, y in zip(shown, xs, ys, strict=True) if _interval(c)]
    if not bars:
        return
    ax.errorbar([x for x, _, _ in bars], [y for _, y, _ in bars],
                yerr=[[max(y - iv[0] * scale, 0.0) for _, y, iv in bars],
                      [max(iv[1] * scale - y, 0.0) for _, y, iv in bars]],
                fmt="none", ecolor="0.35", elinewidth=1.0, capsize=3, zorder=2.5)


def _tie_lines(rec: Recommendation) -> list[str]:
    """Which candidates the paired test could not tell from the best, and the rule applied."""
    if not rec.name or len(rec.tied) < 2:
        return []
    others = [f"{n} (p={rec.p_values[n]:.2g})" if n in rec.p_values else n
              for n in rec.tied if n != rec.best]
    return [f"- Within noise of the best ({rec.best}; paired test on the same examples, "
            f"p >= {rec.tie_alpha:g}): " + ", ".join(others)
            + f"; the cheapest by {rec.prefer} is recommended."]


def _all_figures_table(pool: Sequence[Candidate]) -> list[str]:
    keys: list[str] = []
    for c in pool:
        keys += [k for k in c.figures if k not in keys]
    if not keys:
        return []
    lines = [
        "## Every recorded figure",
        "",
        "| figure | " + " | ".join(c.name for c in pool) + " |",
    ]
    lines.append("|---|" + "|".join(["---"] * len(pool)) + "|")
    for key in ("metric", "latency_ms", "memory_mb", "params", "error", *keys):
        row = [key] + [_plain(c.value(key)) for c in pool]
        lines.append("| " + " | ".join(_md(x, limit=120) for x in row) + " |")
    lines.append("")
    return lines


def _timing_sentence(timing: Mapping[str, Any]) -> str:
    spent, brute = timing.get("selection_seconds"), timing.get("brute_force_seconds_estimate")
    if spent and brute:
        return (
            f"selection took {_duration(spent)}; fine-tuning every candidate at the full budget "
            f"would take an estimated {_duration(brute)} ({brute / spent:.1f}x longer)."
        )
    if spent:
        return f"selection took {_duration(spent)} (no brute-force estimate recorded)."
    return "not recorded."


def _status(c: Candidate, rec: Recommendation) -> str:
    if c.error:
        return f"failed: {c.error}"
    if c.name in rec.excluded:
        return f"excluded: {rec.excluded[c.name]}"
    tags = []
    if c.name == rec.name:
        tags.append("recommended")
    if c.name in rec.pareto:
        tags.append("Pareto")
    if rec.constraints:
        tags.append("meets constraints" if c.name in rec.feasible else "breaks constraints")
    return ", ".join(tags) or "ok"


def _table_order(c: Candidate, rec: Recommendation) -> tuple:
    recommended = c.name != rec.name
    failed = bool(c.error) or c.name in rec.excluded
    metric = -float(c.metric) if _finite(c.metric) else math.inf
    return (recommended, failed, metric, c.name)


# --------------------------------------------------------------------------- #
# Plot helpers
# --------------------------------------------------------------------------- #


def _set_limits(ax: Any, xs: list[float], ys: list[float], log_x: bool, rec: Recommendation,
                x_limit: str | None = "max_latency_ms"):
    # A constraint widens the view only when it is near the data; a far one
    # would squash every point into a corner (it is noted at the edge instead).
    limit = rec.constraints.get(x_limit) if x_limit else None
    near = limit is not None and (
        min(xs) / 3 <= limit <= max(xs) * 3
        if log_x
        else limit <= max(xs) + 0.5 * ((max(xs) - min(xs)) or max(xs))
    )
    xs_all = xs + ([limit] if near else [])
    if log_x:
        ax.set_xlim(min(xs_all) / 1.6, max(xs_all) * 1.6)
    else:
        span = (max(xs_all) - min(xs_all)) or max(xs_all) or 1.0
        ax.set_xlim(max(0.0, min(xs_all) - 0.15 * span), max(xs_all) + 0.25 * span)
    floor = rec.constraints.get("min_metric")
    scale = 100.0 if is_fraction_metric(rec.metric_name) else 1.0
    span = (max(ys) - min(ys)) or 1.0
    ys_all = ys + ([floor * scale] if floor is not None and floor * scale >= min(ys) - span else [])
    span = (max(ys_all) - min(ys_all)) or 1.0
    ax.set_ylim(min(ys_all) - 0.2 * span, max(ys_all) + 0.2 * span)


def _draw_constraints(ax: Any, rec: Recommendation, scale: float,
                      x_limit: str | None = "max_latency_ms") -> None:
    """The x-axis's limit (`x_limit`: latency or training minutes), the metric floor, the shade."""
    style = {"color": "tab:red", "fontsize": 9}
    if rec.constraints and x_limit:
        # Shade where a candidate would have to sit to be admitted.
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        right = min(x1, rec.constraints.get(x_limit, x1))
        floor = rec.constraints.get("min_metric")
        bottom = y0 if floor is None else max(y0, floor * scale)
        if right > x0 and bottom < y1:
            ax.fill_between(
                [x0, right], bottom, y1, color="tab:green", alpha=0.12, zorder=0, linewidth=0
            )
            ax.set_xlim(x0, x1)
            ax.set_ylim(y0, y1)
    limit = rec.constraints.get(x_limit) if x_limit else None
    what, unit = _X_LIMIT_WORDS.get(x_limit, ("", ""))
    if limit:
        low, high = ax.get_xlim()
        if low <= limit <= high:
            ax.axvline(limit, color="tab:red", linestyle="--", linewidth=1.2, zorder=1)
            ax.text(
                limit,
                0.99,
                f" {what} {limit:g} {unit}",
                va="top",
                ha="left",
                transform=ax.get_xaxis_transform(),
                **style,
            )
        else:
            side = "right" if limit > high else "left"
            ax.text(
                0.99 if side == "right" else 0.01,
                0.99,
                f"{what} {limit:g} {unit} (off the {side} edge)",
                va="top",
                ha=side,
                transform=ax.transAxes,
                **style,
            )
    floor = rec.constraints.get("min_metric")
    if floor is not None:
        low, high = ax.get_ylim()
        unit = "%" if scale == 100.0 else ""
        label = f"min {rec.metric_name} {floor * scale:g}{unit}"
        if low <= floor * scale <= high:
            ax.axhline(floor * scale, color="tab:red", linestyle=":", linewidth=1.2, zorder=1)
            ax.text(
                0.01,
                floor * scale,
                f" {label}",
                va="bottom",
                transform=ax.get_yaxis_transform(),
                **style,
            )
        else:
            where = "below" if floor * scale < low else "above"
            ax.text(
                0.01,
                0.01 if where == "below" else 0.99,
                f"{label} ({where} the plotted range)",
                va="bottom" if where == "below" else "top",
                ha="left",
                transform=ax.transAxes,
                **style,
            )


def _place_labels(ax: Any, shown: Sequence[Candidate], xs: Sequence[float],
                  ys: Sequence[float], chosen: str | None, areas: Sequence[float],
                  polyline: Sequence[tuple[float, float]]) -> None:
    items = []
    epochs = {c.name: c.figures.get("fine_tune_epochs") for c in shown}
    most = max((e for e in epochs.values() if isinstance(e, int)), default=None)
    bold = set()
    for c, x, y in zip(shown, xs, ys, strict=True):
        text = f"{c.name} (recommended)" if c.name == chosen else c.name
        if isinstance(epochs[c.name], int) and epochs[c.name] != most:
            # Its metric is not comparable at a glance: say it trained for less.
            text += f", {epochs[c.name]} ep"
        if c.name == chosen:
            bold.add(text)
        items.append((text, x, y))
    # Marker area is in points^2; its radius in points is sqrt(area) / 2.
    _place_text_labels(
        ax, items, bold=bold, radii=[math.sqrt(a) / 2 for a in areas], polyline=polyline
    )


def _place_text_labels(
    ax: Any,
    items: Sequence[tuple[str, float, float]],
    bold: Iterable[str] = (),
    radii: Sequence[float] | None = None,
    polyline: Sequence[tuple[float, float]] = (),
) -> None:
    """Puts each label beside its point where it overlaps no label, point, line or edge.

    Candidate spots around the point (right, left, above, below, then twice
    as far with a leader line) are tried in order; each label's real extent
    comes from the renderer, and the spot with the least overlap wins.
    """
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    px_per_pt = fig.dpi / 72.0
    bold = set(bold)
    radii = list(radii) if radii is not None else [5.0] * len(items)
    centres = ax.transData.transform([(x, y) for _, x, y in items])
    point_boxes = [
        (cx - r * px_per_pt, cy - r * px_per_pt, cx + r * px_per_pt, cy + r * px_per_pt)
        for (cx, cy), r in zip(centres, radii, strict=True)
    ]
    # The line becomes a chain of small boxes every few pixels.
    drawn = ax.transData.transform(polyline) if len(polyline) else []
    for (x0, y0), (x1, y1) in zip(drawn, drawn[1:], strict=False):
        count = max(1, int(math.hypot(x1 - x0, y1 - y0) / 4))
        for k in range(count + 1):
            px, py = x0 + (x1 - x0) * k / count, y0 + (y1 - y0) * k / count
            point_boxes.append((px - 2, py - 2, px + 2, py + 2))
    frame = ax.get_window_extent(renderer)
    frame_box = (frame.x0, frame.y0, frame.x1, frame.y1)
    placed: list[tuple[float, float, float, float]] = []
    # Place labels of big points first: they have the fewest free spots.
    order = sorted(range(len(items)), key=lambda i: -radii[i])
    for i in order:
        text, x, y = items[i]
        r = radii[i] * 0.75 + 3
        spots = []
        for far in (1.0, 2.4):
            d = r * far
            spots += [
                (d, 0, "left", "center"),
                (-d, 0, "right", "center"),
                (0, d, "center", "bottom"),
                (0, -d, "center", "top"),
                (d, d * 0.7, "left", "bottom"),
                (-d, d * 0.7, "right", "bottom"),
                (d, -d * 0.7, "left", "top"),
                (-d, -d * 0.7, "right", "top"),
            ]
        label = ax.annotate(
            text,
            (x, y),
            xytext=spots[0][:2],
            textcoords="offset points",
            fontsize=9,
            fontweight="bold" if text in bold else "normal",
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
            zorder=6,
        )
        label.set_in_layout(False)  # Placed last; must not reshuffle the layout.
        best = None
        for dx, dy, ha, va in spots:
            label.xyann = (dx, dy)
            label.set_ha(ha)
            label.set_va(va)
            extent = label.get_window_extent(renderer)
            box = (extent.x0, extent.y0, extent.x1, extent.y1)
            cost = sum(_overlap_area(box, other) for other in placed)
            cost += sum(_overlap_area(box, other) for j, other in enumerate(point_boxes) if j != i)
            cost += (extent.width * extent.height) - _overlap_area(box, frame_box)
            if best is None or cost < best[0]:
                best = (cost, dx, dy, ha, va, box)
            if cost == 0:
                break
        _, dx, dy, ha, va, box = best
        label.xyann = (dx, dy)
        label.set_ha(ha)
        label.set_va(va)
        if abs(dx) > r * 1.5 or abs(dy) > r * 1.5:
            ax.annotate(
                "",
                (x, y),
                xytext=(dx, dy),
                textcoords="offset points",
                arrowprops={
                    "arrowstyle": "-",
                    "color": "0.5",
                    "linewidth": 0.6,
                    "shrinkA": 0,
                    "shrinkB": radii[i] * 0.8,
                },
                zorder=5,
            )
        placed.append(box)


def _overlap_area(a: Sequence[float], b: Sequence[float]) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    return width * height if width > 0 and height > 0 else 0.0


def _size_legend_values(shown: Sequence[Candidate]) -> list[float]:
    values = sorted(float(c.params) for c in shown if _finite(c.params))
    if not values:
        return []
    picks = [values[0], values[len(values) // 2], values[-1]]
    return sorted({_round_count(v) for v in picks if v > 0})


def _round_count(value: float) -> float:
    magnitude = 10 ** math.floor(math.log10(value))
    return round(value / magnitude, 1) * magnitude


def _why_hidden(c: Candidate) -> str:
    if c.error:
        return "failed: " + c.error.split(":")[0]
    if not _finite(c.metric):
        return "no metric"
    return "no latency"


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


# --------------------------------------------------------------------------- #
# Formatting, JSON, files
# --------------------------------------------------------------------------- #


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _fmt(value: Any, kind: str, metric_name: str = "") -> str:
    if not _finite(value):
        return "—"
    if kind == "metric":
        return f"{value * 100:.1f}%" if is_fraction_metric(metric_name) else f"{value:.4g}"
    if kind == "count":
        return _count(float(value))
    if kind == "int":
        return f"{value:,.0f}"
    if kind == "score":
        return f"{value:.3f}"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def _plain(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(_json_safe(value), sort_keys=True)
    return str(value)


def _md(value: Any, limit: int = 200) -> str:
    text = " ".join(str(value).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _recorded(pool: Sequence[Candidate], key: str) -> str | None:
    return next((str(c.figures[key]) for c in pool if c.figures.get(key)), None)


def _recorded_device(pool: Sequence[Candidate]) -> str | None:
    return _recorded(pool, "device")


def _json_safe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):  # numpy scalars
        return _json_safe(value.item())
    if hasattr(value, "to_dict"):
        return _json_safe(value.to_dict())
    return str(value)


def _new_figure(size: tuple[float, float]) -> Any:
    # An Agg canvas of its own: no pyplot global state, works headless and in threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=130, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _atomic_save_figure(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


# --------------------------------------------------------------------------- #
# Model selection's sections: the search, from the facts `select.py` records
# --------------------------------------------------------------------------- #


def _search_sections(search: Mapping[str, Any], pool: Sequence[Candidate],
                     rec: Recommendation) -> list[str]:
    """Selection vs brute force, "is pretraining worth it", the search, the next step."""
    return [*_brute_force_section(search, pool, rec), *_pretraining_section(search, pool),
            *_the_search_section(search), *_next_step_section(search, pool, rec)]


def _brute_force_section(search: Mapping[str, Any], pool: Sequence[Candidate],
                         rec: Recommendation) -> list[str]:
    metric, stages = search["metric"], search["stage_seconds"]
    compute, brute = search["compute_seconds"], search["brute_force"]
    wall = search["selection_seconds"]
    lines = ["## Selection vs brute force", ""]
    staged = sum(stages.get(k, 0.0) for k in ("profile", "transferability", "search"))
    lines.append(f"- Selection wall time (this run): **{_duration(wall)}** "
                 f"(data {_duration(stages.get('data', 0))}, profiling "
                 f"{_duration(stages.get('profile', 0))}, transferability "
                 f"{_duration(stages.get('transferability', 0))}, fine-tuning search "
                 f"{_duration(stages.get('search', 0))}; stages {_duration(staged)}).")
    reused, total = search["reused"], sum(compute.values())
    if reused:
        lines.append(f"- Reused from the cache: {reused['trials']} finished trials, "
                     f"{reused['profiles']} profiles, {reused['transferability']} transferability "
                     "scores (their time is not in the wall time above).")
    lines.append(
        f"- Selection compute behind these results (recorded when each stage ran, cached ones "
        f"included): **{_duration(total)}** = "
        + ", ".join(f"{k} {_duration(v)}" for k, v in compute.items())
        + " (model loading, data preparation and process start-up are in the wall time only)."
    )
    spent, against = (total, "the selection's recorded compute") if reused else (
        wall, "the selection's wall time")
    estimate, measured = brute["estimated_seconds"], brute["measured_seconds"]
    if estimate:
        lines.append(
            f"- Brute force, **estimated**: {_duration(estimate)} = profiling (measured, needed "
            f"either way) + every pretrained candidate x {brute['learning_rates']} learning "
            f"rate(s) and the baseline x 1 x {brute['epochs']} epochs at its measured time "
            "per epoch (median over its "
            "epochs; a configuration cut after the first rung has only its first epoch, which "
            "includes graph tracing, so its share errs high). Early stopping is not assumed. "
            f"That is {estimate / spent:.1f}x {against}."
        )
    if measured is not None and brute["metrics"] is not None:
        # The report above answers with brute force's figures; the search's answer is here.
        found = brute["search"]
        same = ("**matches**" if brute["choice"] == found["choice"]
                else "**ties within noise with**" if brute["matches_recommendation"]
                else "**differs from**")
        regret = ("" if brute.get("regret") is None else
                  f"; its regret against brute force's best ({brute['best']}): "
                  + (f"{brute['regret']:.1f} points" if is_fraction_metric(metric)
                     else f"{brute['regret']:.3g}"))
        lines.append(
            f"- Brute force, **measured** (`--brute_force`): every configuration fine-tuned to "
            f"{brute['epochs']} epochs (or its early stop); {_duration(measured)} = profiling "
            "+ the measured time of every epoch trained (epochs the search already trained are "
            "counted once, as a brute-force run pays them). The recommendation, tables and "
            "plots above use these full-epoch figures; its choice under the same constraints: "
            f"**{brute['choice'] or 'none'}**."
        )
        lines.append(f"- The search's answer: {_md(found['reason'], 400)} It {same} brute "
                     f"force's choice{regret}.")
        lines += ["", f"| candidate | search {metric} (epochs) | brute-force {metric} "
                  f"({brute['epochs']} epochs) |", "|---|---:|---:|"]
        for c in pool:
            full, epochs = brute["metrics"].get(c.name), brute["fine_tune_epochs"].get(c.name)
            searched = found["metrics"].get(c.name)
            if searched is None and full is None:
                continue
            lines.append(f"| {c.name} | {_fmt(searched, 'metric', metric)} "
                         f"({found['fine_tune_epochs'].get(c.name) or '—'}) | "
                         f"{_fmt(full, 'metric', metric)} ({'—' if epochs is None else epochs}) |")
        if brute["kendall_tau"]:
            shown = ", ".join(f"{k} {_tau(v['tau'])}" for k, v in brute["kendall_tau"].items())
            lines += ["", f"Kendall tau against the brute-force {metric}: {shown}."]
    elif not brute["requested"]:
        lines.append("- Whether brute force would choose the same: not measured; rerun with "
                     "`--brute_force` (it continues the cached trials to the full epochs).")
    return [*lines, ""]


def _pretraining_section(search: Mapping[str, Any], pool: Sequence[Candidate]) -> list[str]:
    metric, brute = search["metric"], search["brute_force"]
    lines = ["## Is pretraining worth it here?", ""]
    by_name = {c.name: c for c in pool}
    baseline = by_name.get(search["baseline"])
    # Training answers this: each configuration's float32 row.
    pretrained = [c for c in pool if c.figures.get("pretrained") and c.metric is not None
                  and c.serving_form == REFERENCE_FORM]
    if baseline is None or baseline.metric is None or not pretrained:
        return [*lines, "Not answered: the baseline or every pretrained candidate has no "
                f"fine-tuned {metric}.", ""]
    best = max(pretrained, key=lambda c: c.metric)
    gap = best.metric - baseline.metric
    verdict = "Yes" if gap > 0.01 else "Barely" if gap > 0 else "No"
    lines.append(
        f"{verdict}: the best pretrained candidate, {best.name}, reaches "
        f"{_fmt(best.metric, 'metric', metric)} ({_epochs(best.figures.get('fine_tune_epochs'))}) "
        f"against {_fmt(baseline.metric, 'metric', metric)} for the from-scratch baseline "
        f"{baseline.name} ({_epochs(baseline.figures.get('fine_tune_epochs'))}): "
        f"{_points(gap, metric)}, at {_ratio(best.latency_ms, baseline.latency_ms)} its latency "
        f"and {_ratio(best.params, baseline.params)} its parameters."
    )
    if baseline.figures.get("fine_tune_epochs") != best.figures.get("fine_tune_epochs"):
        lines.append("(The two trained for different epochs: halving stopped the weaker one "
                     "earlier.)")
    full = {name: value for name, value in (brute["metrics"] or {}).items() if value is not None}
    pretrained_full = [c for c in pool if c.figures.get("pretrained") and c.name in full]
    if baseline.name in full and pretrained_full:
        top = max(pretrained_full, key=lambda c: full[c.name])
        lines.append(f"With every candidate fine-tuned for {brute['epochs']} epochs "
                     f"(brute force): {top.name} {_fmt(full[top.name], 'metric', metric)} against "
                     f"{_fmt(full[baseline.name], 'metric', metric)}, "
                     f"{_points(full[top.name] - full[baseline.name], metric)}.")
    return [*lines, ""]


def _the_search_section(search: Mapping[str, Any]) -> list[str]:
    metric, t, h = search["metric"], search["training"], search["halving"]
    trials = search["trials"]
    factor = h["reduction_factor"]
    over = h["first_rung_only"]
    over_training = h.get("over_training_limits") or {}
    # A search over adaptations too: each has its own learning rates (a dict since the grid).
    adaptations = t.get("adaptations")
    grid = isinstance(adaptations, Mapping) and list(adaptations) != ["full"]
    rates = (", ".join(f"{a} at {', '.join(f'{lr:g}' for lr in lrs)}"
                       for a, lrs in adaptations.items()) if grid
             else f"learning rates {', '.join(f'{lr:g}' for lr in t['learning_rates'])}")
    unit = "configurations (backbone x adaptation)" if grid else "backbones"
    lines = [
        "## The search", "",
        f"- Data: {_data_sentence(search['data'])}",
        f"- Training: batch {t['batch_size']}, AdamW (weight decay {t['weight_decay']:g}), "
        + (f"adaptations {rates}" if grid else rates)
        + f" (the from-scratch baseline, `full` only, at {t['baseline_learning_rate']:g}), "
        + ("`head` trials fit the head on the frozen backbone's features, computed once and "
           "cached, " if grid and any(a == "head" for a in adaptations) else "")
        + "warm-up over "
        f"{t['warmup_ratio']:.0%} of the first epoch then constant (so trials continue "
        f"exactly), seed {t['seed']} and the same per-epoch data order for every candidate, "
        + (f"early stopping after {_epochs(t['early_stopping_patience'])} without improvement"
           if t["early_stopping_patience"] else "no early stopping")
        + f"; the metric is the best {t['objective']} so far.",
        f"- Successive halving: rungs at {', '.join(map(str, h['rungs']))} epochs. Every "
        f"candidate runs the first rung at its first learning rate; the best "
        f"1/{factor} of the {unit} that meet the hard constraints also "
        "try the other learning rates for the same epochs and continue from their checkpoints, "
        + (f"every rate for {h['lr_race_rungs']} more rung(s) (a lower rate starts slower), "
           "then the best one alone" if h.get("lr_race_rungs") else "with the best one")
        + f"; each later rung keeps the best 1/{factor} (each scored by its best rate). "
        + ("Over a hard constraint from profiling, so first rung only: "
           + ", ".join(f"{name} ({', '.join(broken)})" for name, broken in over.items())
           + ". " if over else "")
        + ("Over a training limit projected from the first rung, so not promoted: "
           + ", ".join(f"{name} ({', '.join(broken)})" for name, broken in over_training.items())
           + ". " if over_training else "")
        + f"Budget: {h['budget_epochs'] or 'no'} epoch limit, "
        f"{h['budget_minutes'] or 'no'} minute limit"
        + (f"; {h['budget_stop']}." if h["budget_stop"] else "."),
        f"- Transferability: frozen features of {search['transfer_examples']} training "
        + ("words (seeded sample of sentences), each word's first word piece (where the tag "
           "is read) labelled with its tag" if search["data"]["modality"] == "tokens" else
           "examples (seeded sample), pooled as the classifier pools them")
        + "; LogME, 5-NN and a linear probe (30% held out).",
        f"- Trials: {trials['run']} trained by this run, {trials['reused']} reused from the cache "
        f"(`{trials['cache']}`).",
        "",
        f"| rung | epochs | candidate | learning rate | {metric} | status |",
        "|---:|---:|---|---:|---:|---|",
    ]
    for r, rung in enumerate(search["rungs"]):
        # Promoted: the configuration trains on at the next rung (a raced rate included).
        later = search["rungs"][r + 1]["entries"] if r + 1 < len(search["rungs"]) else []
        going_on = {(e["candidate"], f"{e['learning_rate']:.6g}") for e in later}
        for e in rung["entries"]:
            status = e["status"]
            if (e["candidate"] in rung["promoted"]
                    and (e["candidate"], f"{e['learning_rate']:.6g}") in going_on):
                status += ", promoted"
            if e["status"] == "done" and e["epochs"] < rung["epochs"]:
                status += f", stopped early at {e['epochs']}"
            lines.append(f"| {rung['rung']} | {rung['epochs']} | {e['candidate']} | "
                         f"{e['learning_rate']:g} | {_fmt(e['score'], 'metric', metric)} | "
                         f"{status} |")
    lines.append("")
    taus = ", ".join(f"{k} {_tau(v['tau'])} (n={v['n']})"
                     for k, v in search["kendall_tau"].items())
    if taus:
        lines += [f"Kendall tau of each ranker (the scores, then the data-free priors) against the search's {metric}: "
                  f"{taus}. Candidates cut early were fine-tuned for fewer epochs, which the "
                  "ranking includes.", ""]
    return lines


def _next_step_section(search: Mapping[str, Any], pool: Sequence[Candidate],
                       rec: Recommendation) -> list[str]:
    chosen = next((c for c in pool if c.name == rec.name), None)
    if chosen is None or not chosen.figures.get("learning_rate"):
        return []
    lr, backbone = chosen.figures["learning_rate"], chosen.figures.get("backbone", rec.name)
    modality, epochs = search["data"]["modality"], search["brute_force"]["epochs"]
    module = search["data"].get("pipeline") or (
        "text_classify" if modality == "text" else "image_classify")
    served = "" if chosen.serving_form == REFERENCE_FORM else (
        f" --export_dir=... --export_quantized={export_mode(chosen.serving_form)}")
    adapted = "" if chosen.adaptation == "full" else f" --adaptation={chosen.adaptation}"
    if importlib.util.find_spec(f"pipelines.{module}") is not None:
        how = (f"`python -m pipelines.{module} --backbone={backbone}{adapted} "
               f"--learning_rate={lr:g} --epochs={epochs}{served} ...`")
    else:
        how = (f"`build_{module.removesuffix('_classify')}_classifier(\"{backbone}\", ...)` "
               f"with AdamW at {lr:g} for "
               f"{epochs} epochs")
    return ["## Next step", "",
            f"Fine-tune the recommendation on all the data: {how} (the search kept the "
            "learning rate constant after warm-up; a decaying schedule usually does a "
            "little better).", ""]


def _data_sentence(d: Mapping[str, Any]) -> str:
    subset = (f"the first {d['max_train_examples']} training examples"
              if d["max_train_examples"] else "all training examples")
    evaluation = f"evaluated on `{d['eval_data']}`" if d["eval_data"] else \
        f"evaluated on a {d['validation_split']:.0%} held-out split"
    if d["modality"] == "tokens":
        return (f"`{d['train_data']}` (sentences tagged per word), {subset}, {evaluation}; "
                f"windows of {d['sequence_length']} word pieces (profiled at that length), "
                "each word tagged on its first piece.")
    if d["modality"] in ("text", "text_pair"):
        pairs = " (text pairs, packed as one sequence)" if d["modality"] == "text_pair" else ""
        return (f"`{d['train_data']}`{pairs}, {subset}, {evaluation}; sequence length "
                f"{d['sequence_length']} word pieces (profiled at that length), pooling "
                f"`{d['pooling']}`.")
    side = f"{d['image_size']}" if d["image_size"] else \
        f"each backbone's own ({', '.join(map(str, d['profiled_sizes']))} px)"
    return (f"`{d['train_data']}`, {subset}, {evaluation}; images at {side}, "
            f"augmentation `{d['augment']}`.")


def _epochs(value: Any) -> str:
    return "? epochs" if value is None else f"{value} epoch" + ("" if value == 1 else "s")


def _points(gap: float, metric: str) -> str:
    return f"{gap * 100:+.1f} points" if is_fraction_metric(metric) else f"{gap:+.4g}"


def _ratio(mine: float | None, theirs: float | None) -> str:
    return f"{mine / theirs:.1f}x" if mine and theirs else "? x"


def _tau(value: float | None) -> str:
    return "undefined" if value is None else f"{value:+.2f}"
