"""Tests for tfhub_finetune.selection.report (recorded figures; no TensorFlow models)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from tfhub_finetune.errors import InputError
from tfhub_finetune.selection import report as report_lib
from tfhub_finetune.selection.recommend import recommend
from tfhub_finetune.selection.report import (
    RESULTS_KEYS,
    SCHEMA_VERSION,
    read_results,
    transferability_correlations,
    write_report,
)

DEVICE = "Intel(R) Xeon(R) Processor (2 cores usable)"


def _records():
    return [
        {
            "name": "minilm_l6_h384",
            "metric": 0.912,
            "latency_ms": 31.0,
            "memory_mb": 410.0,
            "params": 22_713_218,
            "scores": {"logme": 0.31, "knn_accuracy": 0.84},
            "figures": {
                "latency_p95_ms": 35.2,
                "model_latency_p50_ms": 27.5,
                "throughput_eps": 410.0,
                "device": DEVICE,
                "memory_method": "peak RSS",
                "isolated_process": True,
            },
        },
        {
            "name": "bert_tiny_en_uncased",
            "metric": 0.908,
            "latency_ms": 10.0,
            "memory_mb": 120.0,
            "params": 4_385_920,
            "scores": {"logme": 0.12, "knn_accuracy": 0.80},
        },
        {
            "name": "bert_small_en_uncased",
            "metric": 0.905,
            "latency_ms": 45.0,
            "memory_mb": 520.0,
            "params": 28_763_648,
            "scores": {"logme": 0.25, "knn_accuracy": 0.82},
        },
        {
            "name": "scratch_text_encoder",
            "metric": 0.81,
            "latency_ms": 4.0,
            "memory_mb": 60.0,
            "params": 2_000_000,
            "scores": {"logme": -0.4, "knn_accuracy": 0.6},
        },
        {
            "name": "distil_bert_base_en_uncased",
            "error": "build: OSError: preset download failed | no internet",
        },
    ]


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    records = _records()
    rec = recommend(records, max_latency_ms=20)
    paths = write_report(
        out,
        records,
        rec,
        budget={"fine_tune_epochs": 18, "trials": 9},
        selection_seconds=740.0,
        brute_force_seconds=3100.0,
        extra={"flags": {"seed": 1}},
    )
    return out, paths, rec


def test_all_files_are_written_and_no_temp_files_remain(written):
    out, paths, _ = written
    assert set(paths) == {"results", "report", "pareto", "transferability"}
    assert sorted(p.name for p in out.iterdir()) == [
        "pareto.png",
        "report.md",
        "results.json",
        "transferability.png",
    ]


def test_pngs_are_valid_and_readable_sized(written):
    _, paths, _ = written
    width, height = _png_size(paths["pareto"])
    assert width >= 1200 and height >= 700
    width, height = _png_size(paths["transferability"])
    assert width >= 1000 and height >= 500


def test_results_json_has_the_schema(written):
    _, paths, rec = written
    data = json.loads(paths["results"].read_text())
    assert data["schema_version"] == SCHEMA_VERSION == 1
    assert list(data) == list(RESULTS_KEYS)
    assert read_results(paths["results"]) == data
    assert data["device"] == DEVICE  # From the profiles when not given.
    assert data["constraints"] == {"max_latency_ms": 20.0}
    assert data["recommendation"]["name"] == rec.name == "bert_tiny_en_uncased"
    by_name = {c["name"]: c for c in data["candidates"]}
    assert len(by_name) == 5
    assert by_name["bert_tiny_en_uncased"]["recommended"] is True
    assert by_name["minilm_l6_h384"]["on_pareto_front"] is True
    assert by_name["minilm_l6_h384"]["feasible"] is False
    assert by_name["distil_bert_base_en_uncased"]["error"].startswith("build: OSError")
    assert data["timing"]["speedup"] == pytest.approx(3100 / 740)
    four = ["minilm_l6_h384", "bert_tiny_en_uncased", "bert_small_en_uncased",
            "scratch_text_encoder"]
    assert data["kendall_tau"]["logme"] == {
        "kind": "score", "tau": pytest.approx(2 / 3), "weighted_tau": pytest.approx(0.733333, abs=1e-6),
        "n": 4, "candidates": four, "top_pick": ["minilm_l6_h384"], "best": "minilm_l6_h384",
        "regret": 0.0, "pick_within_noise": None, "equal_fidelity": True,
    }
    # The data-free prior, from the profiles' parameter counts (no FLOPs recorded: no row).
    assert list(data["kendall_tau"]) == ["knn_accuracy", "logme", "params"]
    assert data["kendall_tau"]["params"]["kind"] == "prior"
    assert data["kendall_tau"]["params"]["tau"] == pytest.approx(1 / 3)
    assert data["kendall_tau"]["params"]["top_pick"] == ["bert_small_en_uncased"]
    assert data["kendall_tau"]["params"]["regret"] == pytest.approx(0.007)
    assert data["extra"] == {"flags": {"seed": 1}}


def test_report_md_states_everything_a_reader_needs(written):
    _, paths, rec = written
    text = paths["report"].read_text()
    assert f"**Recommendation:** {rec.reason}" in text
    assert "0.4 points below the best (minilm_l6_h384), 3.1x faster" in text
    assert "failed: build: OSError: preset download failed \\| no internet" in text
    assert ("| logme | the task's data (frozen features) | +0.73 | +0.67 | minilm_l6_h384 | 0.0 "
            "| 4 |") in text
    assert ("| params (parameter count) | nothing (data-free, from the profile) | +0.20 | +0.33 "
            "| bert_small_en_uncased | 0.7 | 4 |") in text
    assert ("On this task logme ranks at least as well as the data-free priors (weighted tau "
            "+0.73 vs +0.20 for parameter count; top-1 regret 0.0 points vs 0.7 points for "
            "parameter count).") in text
    assert "| fine_tune_epochs | 18 |" in text
    assert "selection took 12.3 min" in text and "(4.2x longer)" in text
    assert DEVICE in text
    assert "![accuracy vs latency](pareto.png)" in text
    assert "![transferability vs fine-tuned](transferability.png)" in text
    assert "Own process per candidate (clean memory figures): minilm_l6_h384." in text
    # End to end (what is served) beside the network alone.
    assert "| p50 latency (ms) | p95 latency (ms) | model-only p50 (ms) |" in text
    assert "| 31 | 35.2 | 27.5 |" in text
    # Every candidate appears in the table, failed ones included.
    for record in _records():
        assert f"| {record['name']} |" in text or f"| **{record['name']}** |" in text


def test_no_fit_and_no_scores(tmp_path):
    records = [{k: v for k, v in r.items() if k != "scores"} for r in _records()]
    rec = recommend(records, max_latency_ms=2, min_metric=0.85)
    paths = write_report(tmp_path, records, rec)
    assert "transferability" not in paths
    assert not (tmp_path / "transferability.png").exists()
    text = paths["report"].read_text()
    assert "**No recommendation.** No candidate meets max_latency_ms=2 ms" in text
    assert "No transferability scores were recorded." in text
    assert "selection took" not in text and "Time: not recorded." in text
    _png_size(paths["pareto"])


def test_wide_latency_range_and_missing_values(tmp_path):
    records = [
        {"name": "a", "metric": 0.9, "latency_ms": 1.0, "params": 1e6},
        {"name": "b", "metric": 0.95, "latency_ms": 300.0, "params": 300e6},
        {"name": "c", "metric": math.nan, "latency_ms": 5.0},
    ]
    paths = write_report(tmp_path, records, recommend(records, min_metric=0.5))
    data = read_results(paths["results"])  # NaN must not reach the JSON.
    assert {c["name"]: c["metric"] for c in data["candidates"]}["c"] is None
    _png_size(paths["pareto"])


def test_kendall_tau_ignores_failed_and_unscored(tmp_path):
    records = _records() + [{"name": "unscored", "metric": 0.5, "latency_ms": 1.0}]
    taus = transferability_correlations(records)
    assert taus["knn_accuracy"]["n"] == 4
    assert taus["knn_accuracy"]["tau"] == pytest.approx(2 / 3)


def test_read_results_checks_schema(tmp_path):
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(InputError, match="schema version"):
        read_results(newer)
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"schema_version": 1, "candidates": []}))
    with pytest.raises(InputError, match="missing keys"):
        read_results(partial)
    with pytest.raises(InputError, match="Cannot read"):
        read_results(tmp_path / "absent.json")


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(report_lib.os, "replace", refuse)
    records = _records()
    with pytest.raises(OSError, match="disk full"):
        write_report(tmp_path, records, recommend(records))
    assert list(tmp_path.iterdir()) == []


def test_table_shows_epochs_when_candidates_trained_for_different_ones(tmp_path):
    records = _records()[:4]
    for record, epochs in zip(records, (3, 1, 1, 3), strict=True):
        record.setdefault("figures", {})["fine_tune_epochs"] = epochs
    paths = write_report(tmp_path, records, recommend(records, max_latency_ms=20))
    text = Path(paths["report"]).read_text(encoding="utf-8")
    header = next(line for line in text.splitlines() if line.startswith("| candidate |"))
    assert header.split(" | ")[3] == "epochs"
    row = next(line for line in text.splitlines() if line.startswith("| bert_small_en_uncased"))
    assert row.split(" | ")[3] == "1"
    # Same epochs everywhere: no column.
    for record in records:
        record["figures"]["fine_tune_epochs"] = 3
    # A constraint the axes cannot show (parameters) still draws: its breakers are crossed out.
    paths = write_report(tmp_path / "same", records,
                         recommend(records, max_latency_ms=20, max_params=5e6))
    assert "| epochs |" not in Path(paths["report"]).read_text(encoding="utf-8")
    assert _png_size(Path(paths["pareto"]))[0] > 800


def test_intervals_and_ties_reach_the_table_and_the_headline(tmp_path):
    records = _records()[:4]
    intervals = {"minilm_l6_h384": [0.893, 0.930], "bert_tiny_en_uncased": [0.888, 0.927],
                 "bert_small_en_uncased": [0.885, 0.924], "scratch_text_encoder": [0.784, 0.836]}
    for record in records:
        record.setdefault("figures", {})["metric_interval"] = intervals[record["name"]]
    p_values = {("minilm_l6_h384", "bert_tiny_en_uncased"): 0.61,
                ("minilm_l6_h384", "bert_small_en_uncased"): 0.44,
                ("minilm_l6_h384", "scratch_text_encoder"): 1e-9}
    rec = recommend(records, paired_p_value=lambda a, b: p_values.get((a, b)))
    assert rec.name == "bert_tiny_en_uncased"  # Tied with minilm and 3.1x faster.
    paths = write_report(tmp_path, records, rec)
    text = Path(paths["report"]).read_text(encoding="utf-8")
    assert ("**Recommendation:** bert_tiny_en_uncased: tied with minilm_l6_h384 within noise "
            "(0.4 points lower, p=0.61); 3.1x faster.") in text
    assert ("- Within noise of the best (minilm_l6_h384; paired test on the same examples, "
            "p >= 0.05): bert_tiny_en_uncased (p=0.61), bert_small_en_uncased (p=0.44); "
            "the cheapest by latency is recommended.") in text
    assert "| accuracy [95% interval] |" in text
    row = next(line for line in text.splitlines() if line.startswith("| **bert_tiny_en_uncased"))
    assert row.split(" | ")[2] == "90.8% [88.8, 92.7]"
    results = json.loads(Path(paths["results"]).read_text(encoding="utf-8"))
    assert results["recommendation"]["tied"] == [
        "minilm_l6_h384", "bert_tiny_en_uncased", "bert_small_en_uncased"]
    assert _png_size(Path(paths["pareto"]))[0] > 800


def test_wall_latency_timed_on_a_busy_machine_is_flagged(tmp_path):
    records = _records()[:2]
    records[0]["figures"] = {**records[0]["figures"], "load_average": 9.6, "cpu_count": 2,
                             "latency_clock": "wall"}
    paths = write_report(tmp_path, records, recommend(records))
    text = paths["report"].read_text()
    assert "Latency was timed on a busy machine" in text and "9.6 on 2 CPUs" in text
    assert "--latency_clock=cpu --profile_threads=1" in text
    records[0]["figures"]["latency_clock"] = "cpu"
    quiet = write_report(tmp_path / "cpu", records, recommend(records))["report"].read_text()
    assert "busy machine" not in quiet
    assert "latency figures are CPU time per request" in quiet


def _prior_wins_records():
    """Recorded figures where the biggest model fine-tunes best and LogME prefers a mid one."""
    rows = [("big", 100e6, 20e9, 0.92, -0.5, 40.0), ("mid", 50e6, 10e9, 0.90, 0.3, 20.0),
            ("small", 20e6, 4e9, 0.88, 0.2, 9.0), ("tiny", 5e6, 1e9, 0.80, 0.1, 3.0)]
    return [{"name": name, "metric": metric, "latency_ms": latency, "memory_mb": 100.0,
             "params": params, "scores": {"logme": logme},
             "figures": {"flops_per_example": flops, "seconds_per_epoch": latency * 4,
                         "fine_tune_epochs": 3}}
            for name, params, flops, metric, logme, latency in rows]


def test_ranking_table_sets_scores_beside_data_free_priors():
    table = transferability_correlations(_prior_wins_records())
    assert list(table) == ["logme", "params", "flops_per_example"]
    logme, params, flops = table["logme"], table["params"], table["flops_per_example"]
    assert logme["kind"] == "score" and params["kind"] == flops["kind"] == "prior"
    # scipy.stats.weightedtau / kendalltau on the same figures: -0.0667 / 0.0.
    assert logme["weighted_tau"] == pytest.approx(-1 / 15) and logme["tau"] == pytest.approx(0.0)
    assert logme["top_pick"] == ["mid"] and logme["best"] == "big"
    assert logme["regret"] == pytest.approx(0.02)
    for prior in (params, flops):
        assert prior["tau"] == prior["weighted_tau"] == pytest.approx(1.0)
        assert prior["top_pick"] == ["big"] and prior["regret"] == 0.0 and prior["n"] == 4
    assert all(info["equal_fidelity"] for info in table.values())


def test_a_prior_that_beats_logme_is_said_in_words(tmp_path):
    records = _prior_wins_records()
    paths = write_report(tmp_path, records, recommend(records))
    text = paths["report"].read_text(encoding="utf-8")
    assert ("| logme | the task's data (frozen features) | -0.07 | +0.00 | mid | 2.0 | 4 |"
            in text)
    assert ("| flops_per_example (FLOPs per example) | nothing (data-free, from the profile) "
            "| +1.00 | +1.00 | big | 0.0 | 4 |") in text
    assert ("- On this task logme ranks worse than parameter count (weighted tau -0.07 vs "
            "+1.00), and its first choice is worse too (top-1 regret 2.0 points vs 0.0 points "
            "for parameter count): the free prior would have served better.") in text
    assert "equal-fidelity" not in text
    data = read_results(paths["results"])
    assert data["kendall_tau"]["logme"]["regret"] == pytest.approx(0.02)
    # LogME's first choice inside the best's 95% interval: not called worse, only said.
    records[0]["figures"]["metric_interval"] = [0.895, 0.94]
    verdicts = report_lib.prior_verdicts(transferability_correlations(records), "accuracy")
    assert verdicts == ["On this task logme ranks worse than parameter count (weighted tau -0.07 "
                        "vs +1.00), though its first choice is within the best's 95% interval "
                        "(top-1 regret 2.0 points vs 0.0 points for parameter count)."]
    # Halving cut two candidates early: the table says its figures are of mixed fidelity.
    for record in records[2:]:
        record["figures"]["fine_tune_epochs"] = 1
    paths = write_report(tmp_path / "mixed", records, recommend(records))
    text = paths["report"].read_text(encoding="utf-8")
    assert "Rerun with `--brute_force` for equal-fidelity figures." in text


def test_pareto_has_a_training_cost_panel_with_adaptation_shapes(tmp_path, monkeypatch):
    figures = []
    save = report_lib._atomic_save_figure

    def keep(fig, path):
        figures.append(fig)
        save(fig, path)

    monkeypatch.setattr(report_lib, "_atomic_save_figure", keep)
    records = _prior_wins_records()
    records[1]["figures"]["adaptation"] = "lora:8"
    records[3]["figures"]["adaptation"] = "head"
    del records[0]["figures"]["seconds_per_epoch"]  # Not timed: left out of the right panel.
    rec = recommend(records, max_latency_ms=25)
    assert rec.name == "mid"
    path = report_lib.plot_pareto(records, rec, tmp_path / "pareto.png")
    fig = figures[-1]
    left, right = fig.axes[:2]
    assert "latency" in left.get_xlabel() and "training: time per epoch (s" in right.get_xlabel()
    assert left.get_ylabel().startswith("fine-tuned accuracy")
    width, height = _png_size(path)
    assert width >= 2000 and height >= 800

    def offsets(ax):
        return {tuple(xy) for coll in ax.collections for xy in coll.get_offsets()}

    assert (20.0, 90.0) in offsets(left) and (80.0, 90.0) in offsets(right)
    assert (40.0, 92.0) in offsets(left) and not any(x == 160.0 for x, _ in offsets(right))
    # The recommendation is red in both panels.
    for ax, x in ((left, 20.0), (right, 80.0)):
        reds = [coll for coll in ax.collections if (x, 90.0) in {tuple(o) for o in
                coll.get_offsets()} and tuple(coll.get_facecolor()[0][:3]) == (0.8392156862745098,
                                                                               0.15294117647058825,
                                                                               0.1568627450980392)]
        assert reds, ax.get_title()
    legend_texts = {t.get_text() for legend in fig.legends for t in legend.get_texts()}
    assert {"full (every weight)", "LoRA rank 8", "head only (backbone frozen)",
            "recommended: mid"} <= legend_texts
    assert "No training time (right panel): big" in fig._supxlabel.get_text()
