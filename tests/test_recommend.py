"""Tests for tfhub_finetune.selection.recommend, on recorded figures (no TensorFlow)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tfhub_finetune import stats
from tfhub_finetune.errors import InputError
from tfhub_finetune.selection.profile import ProfileResult
from tfhub_finetune.selection.recommend import (
    Candidate,
    ConstraintChange,
    majority_class_metric,
    paired_tester,
    pareto_front,
    recommend,
)
from tfhub_finetune.stats import EvalPredictions

# Every working candidate is on the Pareto front, so each can be the answer.
RECORDS = [
    {"name": "big", "metric": 0.92, "latency_ms": 40.0, "memory_mb": 800.0, "params": 110e6},
    {"name": "base", "metric": 0.91, "latency_ms": 20.0, "memory_mb": 400.0, "params": 66e6},
    {"name": "small", "metric": 0.89, "latency_ms": 8.0, "memory_mb": 150.0, "params": 29e6},
    {"name": "tiny", "metric": 0.85, "latency_ms": 3.0, "memory_mb": 60.0, "params": 4.4e6},
    {"name": "lean", "metric": 0.87, "latency_ms": 12.0, "memory_mb": 50.0, "params": 3e6},
    {"name": "broken", "error": "build: OSError: preset download failed"},
]


@pytest.mark.parametrize(
    "constraints,expected",
    [
        ({}, "big"),
        ({"max_latency_ms": 25}, "base"),
        ({"max_latency_ms": 10}, "small"),
        ({"max_latency_ms": 5}, "tiny"),
        ({"max_memory_mb": 55}, "lean"),
        ({"max_params": 3.5e6}, "lean"),
        ({"max_memory_mb": 500, "min_metric": 0.9}, "base"),
        ({"max_latency_ms": 15, "max_memory_mb": 100}, "lean"),
    ],
)
def test_each_candidate_wins_under_its_constraints(constraints, expected):
    assert recommend(RECORDS, **constraints).name == expected


def test_reason_is_built_from_the_figures():
    rec = recommend(RECORDS, max_latency_ms=10)
    assert rec.reason == (
        "small: 3.0 points below the best (big), 5.0x faster, best of 2 under 10 ms."
    )
    assert rec.feasible == ["small", "tiny"]
    only = recommend(RECORDS, max_latency_ms=5)
    assert (
        only.reason
        == "tiny: 7.0 points below the best (big), 13.3x faster, the only one under 5 ms."
    )


def test_reason_for_the_best_names_the_faster_trade_off():
    rec = recommend(RECORDS)
    assert rec.reason == "big: the best accuracy (92.0%), base is 2.0x faster but 1.0 point lower."


def test_memory_constraint_reason_mentions_memory():
    rec = recommend(RECORDS, max_memory_mb=55)
    assert "16.0x less memory" in rec.reason and "the only one under 55 MB" in rec.reason


def test_nothing_fits_says_which_constraint_to_relax_and_by_how_much():
    rec = recommend(RECORDS, max_latency_ms=2)
    assert rec.name is None and rec.feasible == []
    first = rec.relaxations[0]
    assert first.admits == "tiny"
    assert first.changes == (ConstraintChange("max_latency_ms", 2.0, 3.0),)
    assert rec.reason == (
        "No candidate meets max_latency_ms=2 ms; raise max_latency_ms from 2 ms to 3 ms (+50%) "
        "to admit tiny (85.0%)."
    )


def test_relaxing_min_metric_is_reported_in_points():
    rec = recommend(RECORDS, min_metric=0.95)
    assert rec.name is None
    assert "lower min_metric from 95.0% to 92.0% (-3.0 points) to admit big (92.0%)" in rec.reason


def test_two_constraints_name_the_smallest_move_and_an_alternative():
    rec = recommend(RECORDS, max_latency_ms=4, max_memory_mb=40)
    # tiny needs memory 40 -> 60 (+50%); lean needs memory +25% but also latency 4 -> 12.
    assert rec.relaxations[0].admits == "tiny"
    assert rec.relaxations[0].changes == (ConstraintChange("max_memory_mb", 40.0, 60.0),)
    assert rec.reason.startswith(
        "No candidate meets max_latency_ms=4 ms and max_memory_mb=40 MB; raise max_memory_mb "
        "from 40 MB to 60 MB (+50%) to admit tiny (85.0%)"
    )
    # Every alternative that only moves latency would need memory too, so none is named.
    assert ", or " not in rec.reason


def test_relaxed_limit_is_rounded_so_it_admits():
    change = ConstraintChange("max_latency_ms", 20.0, 27.34)
    assert change.describe() == "raise max_latency_ms from 20 ms to 27.4 ms (+37%)"
    fewer = ConstraintChange("min_metric", 0.9, 0.8747)
    assert fewer.describe("accuracy") == "lower min_metric from 90.0% to 87.4% (-2.5 points)"


def test_tolerance_prefers_the_fastest_near_tie():
    rec = recommend(RECORDS, metric_tolerance=0.015)
    assert rec.name == "base"
    assert "within the 1.5 points tolerance" in rec.reason


def test_failed_and_unmeasured_candidates_are_excluded_with_a_reason():
    records = [*RECORDS, {"name": "no_latency", "metric": 0.99}]
    rec = recommend(records, max_latency_ms=25)
    assert rec.excluded["broken"] == "failed: build: OSError: preset download failed"
    assert rec.excluded["no_latency"] == "missing latency_ms needed by the constraints"
    assert rec.name == "base"
    # Without a latency constraint the unmeasured-but-accurate one is eligible.
    assert recommend(records).name == "no_latency"


def test_all_failed_gives_no_recommendation():
    rec = recommend([{"name": "a", "error": "build: boom"}, {"name": "b"}])
    assert rec.name is None
    assert rec.reason == (
        "No candidate can be recommended: a failed: build: boom; b no accuracy recorded."
    )


@pytest.mark.parametrize(
    "constraints,match",
    [
        ({"max_latency_ms": -5}, "must be positive"),
        ({"max_memory_mb": 0}, "must be positive"),
        ({"max_params": 0.5}, "below one parameter"),
        ({"max_latency_ms": math.nan}, "finite number"),
        ({"max_latency_ms": True}, "finite number"),
        ({"min_metric": 85}, r"min_metric=0\.85 for 85%"),
        ({"min_metric": 1.5}, "exceeds 1"),
        ({"min_metric": -0.1}, "negative"),
        ({"metric_tolerance": -0.01}, "metric_tolerance"),
    ],
)
def test_bad_constraints_raise_input_error(constraints, match):
    with pytest.raises(InputError, match=match):
        recommend(RECORDS, **constraints)


def test_unbounded_metric_accepts_large_min_metric():
    records = [{"name": "a", "metric": 31.0}, {"name": "b", "metric": 28.0}]
    rec = recommend(records, min_metric=30, metric_name="bleu")
    assert rec.reason == "a: the best bleu (31), the only one at or above 30 bleu."


def test_bad_candidate_lists_raise_input_error():
    with pytest.raises(InputError, match="No candidates"):
        recommend([])
    with pytest.raises(InputError, match="unique"):
        recommend([{"name": "a", "metric": 0.5}, {"name": "a", "metric": 0.6}])
    with pytest.raises(InputError, match="needs a `name`"):
        recommend([{"metric": 0.5}])


def test_pareto_front_drops_dominated_and_failed():
    records = [
        *RECORDS,
        {"name": "worse", "metric": 0.88, "latency_ms": 30.0, "memory_mb": 500.0, "params": 70e6},
    ]
    names = [c.name for c in pareto_front(records)]
    assert names == ["big", "base", "small", "lean", "tiny"]  # best metric first
    two = [c.name for c in pareto_front(records, {"metric": "max", "latency_ms": "min"})]
    assert two == ["big", "base", "small", "tiny"]  # lean is slower than small and worse
    with pytest.raises(InputError, match="Did you mean: latency_ms"):
        pareto_front(records, {"latency": "min"})
    with pytest.raises(InputError, match="'max' or 'min'"):
        pareto_front(records, {"metric": "up"})


def test_candidate_from_profile_keeps_every_figure():
    profile = ProfileResult(
        name="minilm_l6_h384",
        params=22_713_218,
        latency_p50_ms=12.5,
        latency_p95_ms=14.0,
        peak_infer_memory_mb=300.0,
        saved_model_mb=None,
        error="saved_model: OSError: disk full",
    )
    c = Candidate.from_profile(profile, metric=0.9, scores={"logme": -0.3})
    assert (c.name, c.latency_ms, c.memory_mb, c.params) == (
        "minilm_l6_h384",
        12.5,
        300.0,
        22_713_218,
    )
    assert c.error is None  # Only the export failed; the figures that matter are there.
    assert c.figures["profile_error"] == "saved_model: OSError: disk full"
    assert c.figures["latency_p95_ms"] == 14.0 and c.scores == {"logme": -0.3}
    failed = Candidate.from_profile(ProfileResult(name="x", error="build: ValueError: no"))
    assert failed.error == "build: ValueError: no"
    assert Candidate.from_dict(c.to_dict()) == c


# --------------------------------------------------------------------------- #
# Ties broken by cost: paired tests on the same evaluation examples
# --------------------------------------------------------------------------- #


def _predictions(y_true, wrong: int, offset: int = 0) -> EvalPredictions:
    """Predictions getting `wrong` of the examples wrong, starting at `offset`."""
    y_pred = y_true.copy()
    miss = np.arange(offset, offset + wrong) % len(y_true)
    y_pred[miss] = (y_true[miss] + 1) % 6
    return EvalPredictions("classification", y_true, y_pred, 6)


def _recorded(errors: dict[str, tuple[int, int]], figures: dict[str, dict]) -> tuple[list, dict]:
    """Candidates (metric = their accuracy on 500 examples) and their predictions."""
    y_true = np.random.default_rng(0).integers(0, 6, 500)
    predictions = {name: _predictions(y_true, wrong, offset) for name, (wrong, offset) in errors.items()}
    records = [{"name": name, "metric": float((p.y_pred == p.y_true).mean()), **figures[name]}
               for name, p in predictions.items()]
    return records, predictions


FIGURES = {
    "l3": {"latency_ms": 9.4, "memory_mb": 300.0, "params": 17.4e6},
    "l6_2": {"latency_ms": 6.8, "memory_mb": 320.0, "params": 15.6e6},
    "tiny": {"latency_ms": 3.0, "memory_mb": 90.0, "params": 4.4e6},
}


def test_two_candidates_within_noise_the_cheaper_is_recommended():
    # 91.6% vs 91.2% on 500 examples (2 examples apart; the interval is about +-2.5 points).
    records, predictions = _recorded({"l3": (42, 0), "l6_2": (44, 20)}, FIGURES)
    rec = recommend(records, max_params=18e6, paired_p_value=paired_tester(predictions, "accuracy"))
    assert rec.name == "l6_2" and rec.best == "l3" and rec.tied == ["l3", "l6_2"]
    assert 0.05 < rec.p_values["l6_2"] < 1
    assert rec.reason == (
        f"l6_2: tied with l3 within noise (0.4 points lower, p={rec.p_values['l6_2']:.2g}); "
        "1.4x faster, 1.1x fewer parameters, one of 2 under 18M parameters."
    )
    # tie_alpha=0 turns the rule off: the highest figure wins, as before.
    off = recommend(records, tie_alpha=0, paired_p_value=paired_tester(predictions, "accuracy"))
    assert off.name == "l3" and off.tied == ["l3"]
    # Without per-example predictions there is no test, so no tie.
    assert recommend(records).name == "l3"
    # The cost to prefer: memory makes l3 (300 MB vs 320 MB) the cheaper of the two.
    by_memory = recommend(records, prefer="memory",
                          paired_p_value=paired_tester(predictions, "accuracy"))
    assert by_memory.name == "l3" and by_memory.prefer == "memory"


def test_a_significant_gap_recommends_the_better_one():
    # 91.6% vs 85.6%: 30 more examples wrong, all of them ones l3 gets right.
    records, predictions = _recorded({"l3": (42, 0), "tiny": (72, 0)}, FIGURES)
    rec = recommend(records, paired_p_value=paired_tester(predictions, "accuracy"))
    assert rec.name == "l3" and rec.tied == ["l3"]
    assert rec.p_values["tiny"] < 1e-6
    assert rec.reason.startswith("l3: the best accuracy (91.6%), tiny is 3.1x faster but 6.0 points lower")


def test_tie_rule_compares_macro_f1_by_paired_bootstrap():
    records, predictions = _recorded({"l3": (42, 0), "l6_2": (44, 20), "tiny": (80, 0)}, FIGURES)
    for r in records:
        r["metric"] = stats.bootstrap_intervals(predictions[r["name"]], ["macro_f1"])["macro_f1"].value
    rec = recommend(records, metric_name="macro_f1",
                    paired_p_value=paired_tester(predictions, "val_macro_f1"))
    assert rec.name == "l6_2" and "tiny" not in rec.tied


def test_a_lower_fidelity_figure_is_never_called_the_best():
    # `big` broke max_params and was cut after 1 epoch; `small` trained 3.
    records = [
        {"name": "big", "metric": 0.934, "latency_ms": 12.0, "params": 22e6,
         "figures": {"fine_tune_epochs": 1}},
        {"name": "small", "metric": 0.912, "latency_ms": 9.4, "params": 17e6,
         "figures": {"fine_tune_epochs": 3}},
        {"name": "smaller", "metric": 0.90, "latency_ms": 8.0, "params": 16e6,
         "figures": {"fine_tune_epochs": 3}},
    ]
    rec = recommend(records, max_params=18e6)
    assert rec.name == "small"
    assert rec.reason == (
        "small: the best accuracy after 3 epochs (91.2%), smaller is 1.2x faster but 1.2 points "
        "lower, big scored 93.4% after 1 epoch (this one: 3), best of 2 under 18M parameters."
    )


@pytest.mark.parametrize("kwargs, match", [
    ({"prefer": "latncy"}, "Did you mean: latency"),
    ({"tie_alpha": 1.0}, r"Received: tie_alpha=1\.0"),
    ({"tie_alpha": -0.1}, "tie_alpha"),
])
def test_bad_tie_settings_raise_input_error(kwargs, match):
    with pytest.raises(InputError, match=match):
        recommend(RECORDS, **kwargs)


def test_a_model_no_better_than_the_majority_class_is_never_the_answer():
    """The hymenoptera grid at 22 ms: only the from-scratch CNN fitted, and it answered `ants`
    for every photo (45.8%, below always answering `bees`, 54.2%). It must not be recommended;
    the user is told which limit to move instead."""
    y_true = np.array([0] * 70 + [1] * 83)
    constant = EvalPredictions("classification", y_true, np.zeros(153, np.int64), 2)
    chance = majority_class_metric({"scratch": constant, "missing": None}, "accuracy")
    assert chance == pytest.approx(83 / 153)
    assert majority_class_metric({"scratch": constant}, "macro_f1") is None
    records = [{"name": "scratch", "metric": 70 / 153, "latency_ms": 18.8, "params": 1.2e6},
               {"name": "mobilenet", "metric": 0.941, "latency_ms": 24.9, "params": 2.3e6}]
    rec = recommend(records, max_latency_ms=22, chance_metric=chance)
    assert rec.name is None
    assert "most frequent class" in rec.excluded["scratch"] and "54.2%" in rec.excluded["scratch"]
    assert "max_latency_ms" in rec.reason and "mobilenet" in rec.reason
    # Without the floor the useless model would have been the answer.
    assert recommend(records, max_latency_ms=22).name == "scratch"
    assert recommend(records, chance_metric=chance).name == "mobilenet"
