"""The choice over (backbone, adaptation, serving form), on recorded figures (no TensorFlow).

Each float32 row is what the search records for a fine-tuned configuration;
each int8 row is built by `serving_forms.form_candidate` from that row and a
recorded `measure_serving_forms` report, as the selection builds it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tfhub_finetune.selection.recommend import Candidate, paired_tester, recommend, violations
from tfhub_finetune.selection.report import write_report
from tfhub_finetune.selection.serving_forms import form_candidate
from tfhub_finetune.stats import EvalPredictions

L6, L3 = "minilm_l6_h384", "minilm_l3"

# (backbone, adaptation) -> float32 figures: metric, end-to-end p50 ms, of it the network
# alone, peak inference MB, params, projected full fine-tune minutes, peak training RSS MB.
CONFIGURATIONS = {
    (L6, "full"): (0.912, 12.0, 10.0, 400.0, 22.7e6, 30.0, 3000.0),
    (L6, "lora:8"): (0.906, 12.0, 10.0, 400.0, 22.7e6, 12.0, 2000.0),
    (L6, "head"): (0.850, 12.0, 10.0, 400.0, 22.7e6, 2.0, 900.0),
    (L3, "full"): (0.890, 6.5, 5.0, 250.0, 17.4e6, 15.0, 1800.0),
}
# int8 measured beside float32 on the same weights: metric change, network latency ratio,
# peak memory of each form in the measuring process, size of each form.
INT8 = {(L6, "full"): -0.003, (L6, "lora:8"): -0.002, (L6, "head"): -0.004, (L3, "full"): -0.005}


def float_row(backbone: str, adaptation: str) -> Candidate:
    metric, latency, network, memory, params, minutes, rss = CONFIGURATIONS[backbone, adaptation]
    name = backbone if adaptation == "full" else f"{backbone} {adaptation}"
    return Candidate(
        name=name, metric=metric, latency_ms=latency, memory_mb=memory, params=int(params),
        backbone=backbone, adaptation=adaptation,
        figures={"model_latency_p50_ms": network, "latency_p95_ms": latency * 1.2,
                 "throughput_eps": 400.0, "saved_model_mb": params * 4 / 2**20,
                 "train_minutes_projected": minutes, "peak_train_rss_mb": rss,
                 "fine_tune_epochs": 3, "metric_interval": [metric - 0.02, metric + 0.02]},
        scores={"logme": 0.1},
    )


def serving_report(row: Candidate, delta: float) -> dict:
    """What `measure_serving_forms` records for float32 and int8 of `row`'s weights."""
    size = row.figures["saved_model_mb"]
    return {"reference": "float32", "forms": {
        "int8": {"runtime": "tf_saved_model", "quantization": "int8",
                 "eval": {"accuracy": row.metric + delta}, "latency_p50_ms": 4.0,
                 "latency_p95_ms": 5.0, "throughput_eps": 900.0, "peak_infer_memory_mb": 150.0,
                 "size_mb": size / 3.5, "timing_error": None,
                 "vs_reference": {"metric_delta": delta, "agreement": 0.98,
                                  "latency_p50_ratio": 0.4, "latency_p95_ratio": 0.45,
                                  "throughput_ratio": 2.25, "size_ratio": 1 / 3.5}},
        "float32": {"runtime": "tf_saved_model", "quantization": "none",
                    "eval": {"accuracy": row.metric}, "latency_p50_ms": 10.0,
                    "latency_p95_ms": 11.0, "throughput_eps": 400.0,
                    "peak_infer_memory_mb": 250.0, "size_mb": size, "timing_error": None},
    }}


def grid() -> list[Candidate]:
    rows = []
    for key in CONFIGURATIONS:
        reference = float_row(*key)
        rows += [reference, form_candidate(reference, serving_report(reference, INT8[key]),
                                           "int8", "val_accuracy")]
    return rows


def pick(rec, rows) -> tuple[str, str, str]:
    chosen = next(c for c in rows if c.name == rec.name)
    return chosen.backbone, chosen.adaptation, chosen.serving_form


def test_int8_rows_carry_their_own_serving_figures_and_the_configurations_training_ones():
    rows = {c.name: c for c in grid()}
    int8, reference = rows[f"{L6} lora:8 int8"], rows[f"{L6} lora:8"]
    assert (int8.backbone, int8.adaptation, int8.serving_form) == (L6, "lora:8", "int8")
    assert int8.metric == pytest.approx(0.904)
    # 12 ms end to end, of which 10 ms network, which int8 runs in 0.4 of the time.
    assert int8.latency_ms == pytest.approx(12.0 - 10.0 * 0.6)
    assert int8.memory_mb == pytest.approx(400.0 - 100.0)
    assert int8.figures["saved_model_mb"] == pytest.approx(reference.figures["saved_model_mb"] / 3.5)
    assert int8.params == reference.params
    for key in ("train_minutes_projected", "peak_train_rss_mb", "fine_tune_epochs"):
        assert int8.figures[key] == reference.figures[key]
    # The float32 interval and scores are not the int8 form's.
    assert "metric_interval" not in int8.figures and int8.scores == {}
    assert int8.label == "minilm_l6_h384, LoRA r=8, int8"


def test_a_form_measured_on_later_weights_than_the_figure_carries_the_measured_change():
    reference = float_row(L6, "full")
    report = serving_report(reference, -0.004)
    # The kept (last-epoch) weights score 0.80, not the figure's 0.912 from an earlier epoch.
    report["forms"]["float32"]["eval"]["accuracy"] = 0.80
    report["forms"]["int8"]["eval"]["accuracy"] = 0.796
    row = form_candidate(reference, report, "int8", "accuracy", same_weights=False)
    assert row.metric == pytest.approx(0.912 - 0.004)
    assert row.figures["float32_same_weights_metric"] == 0.80
    assert "same (later epoch's) weights" in row.figures["metric_method"]
    measured = form_candidate(reference, report, "int8", "accuracy")
    assert measured.metric == pytest.approx(0.796)


@pytest.mark.parametrize("constraints, expected", [
    ({}, (L6, "full", "float32")),
    ({"max_latency_ms": 8}, (L6, "full", "int8")),
    ({"max_train_minutes": 20}, (L6, "lora:8", "float32")),
    ({"max_train_minutes": 20, "max_latency_ms": 8}, (L6, "lora:8", "int8")),
    ({"max_train_memory_mb": 1000}, (L6, "head", "float32")),
    ({"max_train_memory_mb": 1000, "max_memory_mb": 320}, (L6, "head", "int8")),
    ({"max_params": 18e6}, (L3, "full", "float32")),
    ({"max_params": 18e6, "max_latency_ms": 5}, (L3, "full", "int8")),
])
def test_each_backbone_adaptation_and_form_is_the_answer_under_some_constraints(
        constraints, expected):
    rows = grid()
    assert pick(recommend(rows, **constraints), rows) == expected


def test_the_sentence_names_backbone_adaptation_and_form():
    rec = recommend(grid(), max_train_minutes=20, max_latency_ms=8)
    assert rec.reason == (
        "minilm_l6_h384, LoRA r=8, int8: 0.8 points below the best (minilm_l6_h384, full "
        "fine-tune, float32), serves in 6 ms (2.0x faster), trains 2.5x faster, best of 4 "
        "under 8 ms and training in under 20 min."
    )


def test_a_candidate_breaking_a_training_constraint_is_never_recommended():
    rows = grid()
    for limit in (1.0, 2.0, 12.0, 15.0, 29.0, 30.0):
        rec = recommend(rows, max_train_minutes=limit)
        for name in rec.feasible:
            assert next(c for c in rows if c.name == name).figures[
                "train_minutes_projected"] <= limit
    rec = recommend(rows, max_train_memory_mb=500)
    assert rec.name is None and rec.feasible == []
    assert rec.relaxations[0].describe("accuracy") == (
        "raise max_train_memory_mb from 500 MB to 900 MB (+80%) to admit minilm_l6_h384 head "
        "(85.0%)")
    # No training figure recorded: excluded, not admitted.
    bare = Candidate("untimed", metric=0.99, latency_ms=1.0)
    rec = recommend([*rows, bare], max_train_minutes=20)
    assert "untimed" in rec.excluded and "train_minutes_projected" in rec.excluded["untimed"]
    assert violations(rows[0], {"max_train_minutes": 20}) == {"max_train_minutes": 30.0}


def test_prefer_train_time_breaks_ties_on_the_projected_minutes():
    rows = [c for c in grid() if c.serving_form == "float32" and c.backbone == L6]
    rec = recommend(rows, metric_tolerance=0.01, prefer="train_time")
    assert pick(rec, rows) == (L6, "lora:8", "float32")
    assert "trains 2.5x faster" in rec.reason
    # Latency breaks ties by default: the three serve alike, so the best metric stays.
    assert pick(recommend(rows, metric_tolerance=0.01), rows) == (L6, "full", "float32")


def test_int8_predictions_feed_the_paired_tie_test():
    # The int8 form disagrees with float32 on 2 of 500 examples: a tie, and it is faster.
    rows = [c for c in grid() if c.backbone == L6 and c.adaptation == "full"]
    y_true = np.random.default_rng(0).integers(0, 2, 500)
    wrong = y_true.copy()
    wrong[:44] = 1 - wrong[:44]
    quantized = wrong.copy()
    quantized[44:46] = 1 - quantized[44:46]
    predictions = {c.name: EvalPredictions("classification", y_true, p, 2)
                   for c, p in zip(rows, (wrong, quantized), strict=True)}
    for c in rows:
        c.metric = float((predictions[c.name].y_pred == y_true).mean())
    rec = recommend(rows, paired_p_value=paired_tester(predictions, "accuracy"))
    assert rec.best == L6 and rec.name == f"{L6} int8"
    assert rec.reason.startswith(
        f"minilm_l6_h384, full fine-tune, int8: tied with minilm_l6_h384 (full fine-tune, "
        f"float32) within noise (0.4 points lower, p={rec.p_values[rec.name]:.2g}); serves in 6 ms")


def test_records_without_the_new_fields_load_as_full_float32(tmp_path):
    old = {"name": "bert_tiny", "metric": 0.8, "latency_ms": 3.0, "memory_mb": 90.0,
           "params": 4400000, "error": None, "scores": {"logme": -0.3},
           "figures": {"backbone": "bert_tiny_en_uncased", "seconds_per_epoch": 4.0},
           "recommended": True, "feasible": True, "on_pareto_front": True, "excluded": None}
    c = Candidate.from_dict(old)
    assert (c.backbone, c.adaptation, c.serving_form) == ("bert_tiny", "full", "float32")
    assert c.figures["seconds_per_epoch"] == 4.0 and c.figures["recommended"] is True
    # A search record naming its adaptation only in the figures (h12grid's records).
    grid_record = {"name": "bert_tiny lora:4", "metric": 0.79,
                   "figures": {"adaptation": "lora:4"}, "backbone": "bert_tiny"}
    assert Candidate.from_dict(grid_record).adaptation == "lora:4"
    # And a written report reads back with the typed fields.
    rows = grid()
    paths = write_report(tmp_path, rows, recommend(rows, max_latency_ms=8))
    saved = json.loads(paths["results"].read_text(encoding="utf-8"))["candidates"]
    again = [Candidate.from_dict(r) for r in saved]
    assert [(c.backbone, c.adaptation, c.serving_form) for c in again] == [
        (c.backbone, c.adaptation, c.serving_form) for c in rows]
    text = paths["report"].read_text(encoding="utf-8")
    assert "**Recommendation:** minilm_l6_h384, full fine-tune, int8:" in text
    header = next(line for line in text.splitlines() if line.startswith("| candidate |"))
    assert "| adaptation | serving form |" in header
    assert "| LoRA r=8 | int8 |" in text
    assert "Serving forms: int8 rows are the same fine-tuned weights" in text
