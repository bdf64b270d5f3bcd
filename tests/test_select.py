"""Tests for tfhub_finetune.selection.select and pipelines.select_model.

The recommendation logic on recorded figures is tested with the library
(`test_recommend.py`, `test_report.py`); here: the successive-halving oracle
(driven through KerasTuner's own `create_trial` / `update_trial` /
`end_trial`), the cache, failing candidates, exit codes, and tiny real runs
(two small text encoders on 200 SST-2 sentences, sequence length 32).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, run_pipeline
from tfhub_finetune.errors import InputError
from tfhub_finetune.selection.halving import TrialRecord, plan_search, rung_epochs
from tfhub_finetune.selection.profile import ProfileOptions
from tfhub_finetune.selection.select import SelectionConfig, select_model
from tfhub_finetune.selection.tuner import trial_predictions
from tfhub_finetune.stats import EvalPredictions

pytestmark = pytest.mark.filterwarnings(
    # KerasTuner 1.4.8's `synchronized` uses deprecated threading names.
    "ignore:currentThread:DeprecationWarning", "ignore:getName:DeprecationWarning",
)

TINY = ("scratch_text_encoder", "minilm_l6_h384@layers=1")
# One child process per profile (inference timed on the built model) and short timing loops.
FAST_PROFILE = ProfileOptions(
    serving_batch_size=8, train_batch_size=16, warmup_runs=2, min_runs=5, max_runs=200,
    min_seconds=0.2, measure_saved_model=False,
)
TINY_SETTINGS = dict(
    label_names=("negative", "positive"), sequence_length=32, batch_size=16,
    learning_rates=(1e-3,), min_epochs=1, max_epochs=2, transfer_examples=200,
    profile_options=FAST_PROFILE, progress=False, adaptations=("full",),
)


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def _oracle(candidates, learning_rates, rungs, directory, **kwargs):
    from tfhub_finetune.selection.tuner import SuccessiveHalvingOracle

    oracle = SuccessiveHalvingOracle("val_accuracy", candidates, learning_rates, rungs, **kwargs)
    oracle._set_project_dir(str(directory), "oracle_test")
    oracle.verbose = 0
    return oracle


def _finish(oracle, trial, curve: list[float]) -> None:
    """Reports a trial the way `SelectionTuner.run_trial` does, with the given score curve."""
    values = trial.hyperparameters.values
    epochs, initial = values["tuner/epochs"], values["tuner/initial_epoch"]
    metrics = {"val_accuracy": max(curve[:epochs]), "epochs_trained": float(epochs),
               "stopped_early": 0.0}
    for k in range(1, epochs + 1):
        metrics[f"val_accuracy_epoch_{k}"] = curve[k - 1]
    for k in range(initial + 1, epochs + 1):
        metrics[f"epoch_{k}_seconds"] = 1.0
    oracle.update_trial(trial.trial_id, metrics)
    trial.status = "COMPLETED"
    oracle.end_trial(trial)


def _record(trial_id, backbone, lr, epochs, scores, *, initial=0, parent=None, stopped=False):
    return TrialRecord(
        trial_id=trial_id, backbone=backbone, learning_rate=lr, status="COMPLETED",
        target_epochs=epochs, initial_epoch=initial, parent_id=parent, epochs_trained=len(scores),
        stopped_early=stopped, scores=tuple(scores),
        epoch_seconds={k: 10.0 for k in range(initial + 1, len(scores) + 1)},
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _flagfile(path: Path, data: dict[str, str], output_dir: Path, **extra: str) -> Path:
    flags = {
        "candidates": ",".join(TINY), "train_data": data["train"], "eval_data": data["dev"],
        "label_names": "negative,positive", "sequence_length": "32", "batch_size": "16",
        "learning_rates": "1e-3", "min_epochs": "1", "max_epochs": "2",
        "transfer_examples": "200", "profile_min_seconds": "0.2", "profile_batch_size": "8",
        "output_dir": str(output_dir), "progress": "false", "adaptations": "full", **extra,
    }
    path.write_text("".join(f"--{k}={v}\n" for k, v in flags.items()), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- #
# The oracle and the plan (no training)
# --------------------------------------------------------------------------- #


CURVES = {
    ("a", 1e-4): [0.60, 0.70, 0.75, 0.80], ("a", 3e-5): [0.50, 0.60, 0.60, 0.60],
    ("b", 1e-4): [0.70, 0.72, 0.73, 0.74], ("b", 3e-5): [0.90, 0.91, 0.92, 0.95],
    ("c", 1e-4): [0.40, 0.40, 0.40, 0.40], ("c", 3e-5): [0.45, 0.45, 0.45, 0.45],
    ("d", 1e-4): [0.80, 0.85, 0.86, 0.87], ("d", 3e-5): [0.30, 0.30, 0.30, 0.30],
    ("e", 1e-4): [0.55, 0.56, 0.57, 0.58], ("e", 3e-5): [0.65, 0.66, 0.67, 0.68],
}


def _drive(oracle, curves) -> dict[int, list[tuple[str, dict]]]:
    """Runs the oracle to the end with one worker; returns the started trials by rung."""
    by_round: dict[int, list[tuple[str, dict]]] = {}
    while True:
        trial = oracle.create_trial("tuner0")
        if trial.status != "RUNNING":
            assert trial.status == "STOPPED"
            return by_round
        values = dict(trial.hyperparameters.values)
        by_round.setdefault(values["tuner/round"], []).append((trial.trial_id, values))
        _finish(oracle, trial, curves[(values["backbone"], values["learning_rate"])])


def test_oracle_gives_every_candidate_the_first_rung_and_promotes_the_better_half(tmp_path):
    oracle = _oracle(list("abcde"), [1e-4, 3e-5], rung_epochs(1, 4, 2), tmp_path)
    by_round = _drive(oracle, CURVES)
    first = by_round[0]
    # Every candidate gets the first rung at its first learning rate, from scratch, 1 epoch.
    assert [(v["backbone"], v["learning_rate"]) for _, v in first[:5]] == [
        (b, 1e-4) for b in "abcde"]
    # Ranked on that: d 0.80, b 0.70, a 0.60 lead (ceil(5/2) = 3) and check their other rate.
    assert sorted((v["backbone"], v["learning_rate"]) for _, v in first[5:]) == [
        ("a", 3e-5), ("b", 3e-5), ("d", 3e-5)]
    assert all(v["tuner/epochs"] == 1 and "tuner/trial_id" not in v for _, v in first)
    rung0_id = {(v["backbone"], v["learning_rate"]): tid for tid, v in first}
    # The learning rate is not settled on one epoch: both rates of each leader go on a rung.
    second = {(v["backbone"], v["learning_rate"]): v for _, v in by_round[1]}
    assert set(second) == {(b, lr) for b in "abd" for lr in (1e-4, 3e-5)}
    for key, values in second.items():
        assert values["tuner/trial_id"] == rung0_id[key]  # Continues its checkpoint.
        assert (values["tuner/initial_epoch"], values["tuner/epochs"]) == (1, 2)
    # Rung-1 scores (best rate): b 0.91 (3e-5), d 0.85 (1e-4), a 0.70 -> ceil(3/2) = 2 go on
    # to 4 epochs, each with its better rate at 2 epochs.
    third = {v["backbone"]: v for _, v in by_round[2]}
    assert {b: v["learning_rate"] for b, v in third.items()} == {"b": 3e-5, "d": 1e-4}
    assert all((v["tuner/initial_epoch"], v["tuner/epochs"]) == (2, 4) for v in third.values())
    assert sum(len(v) for v in by_round.values()) == 5 + 3 + 6 + 2

    plan = oracle.plan()
    assert plan.finished and plan.halving_complete
    assert plan.halving_result("b").score == pytest.approx(0.95)
    assert plan.halving_result("c").epochs == 1  # Cut after the first rung.
    assert plan.planned_epochs == 5 + 3 + 6 * 1 + 2 * 2


def test_lr_race_rungs_0_settles_the_learning_rate_at_the_check(tmp_path):
    oracle = _oracle(list("abcde"), [1e-4, 3e-5], rung_epochs(1, 4, 2), tmp_path,
                     lr_race_rungs=0)
    by_round = _drive(oracle, CURVES)
    # The check's one-epoch scores decide: a 1e-4 (0.60 > 0.50), b 3e-5, d 1e-4.
    assert {v["backbone"]: v["learning_rate"] for _, v in by_round[1]} == {
        "a": 1e-4, "b": 3e-5, "d": 1e-4}
    assert sum(len(v) for v in by_round.values()) == 5 + 3 + 3 + 2
    assert oracle.plan().planned_epochs == 5 + 3 + 3 * 1 + 2 * 2


def test_a_slow_starting_learning_rate_is_not_dropped_after_one_epoch():
    """The issue's case: 3e-5 trails after one epoch and ends best (q), while p leads at 1e-4."""
    curves = {
        ("p", 1e-4): [0.880, 0.905, 0.912], ("p", 3e-5): [0.850, 0.890, 0.900],
        ("q", 1e-4): [0.870, 0.890, 0.895], ("q", 3e-5): [0.796, 0.910, 0.915],
        ("r", 1e-4): [0.5] * 3, ("s", 1e-4): [0.6] * 3,
    }

    def search(lr_race_rungs: int) -> tuple[str, float, int]:
        records: list[TrialRecord] = []
        while True:
            plan = plan_search(records, list("pqrs"), [1e-4, 3e-5], [1, 2, 3],
                               lr_race_rungs=lr_race_rungs)
            if not plan.todo:
                break
            for item in plan.todo:
                curve = curves.get((item.backbone, item.learning_rate), [0.0] * 3)
                records.append(_record(str(len(records)), item.backbone, item.learning_rate,
                                       item.target_epochs, curve[: item.target_epochs],
                                       initial=item.initial_epoch,
                                       parent=item.base.trial_id if item.base else None))
        final = max(plan.rungs[-1].entries, key=lambda s: s.score)
        return final.backbone, final.learning_rate, plan.planned_epochs

    # Settled on one epoch, q keeps 1e-4 and loses to p at rung 2.
    assert search(0)[:2] == ("p", 1e-4)
    # Raced one more rung, q's 3e-5 (0.91 at 2 epochs) wins, as brute force would choose.
    backbone, lr, epochs = search(1)
    assert (backbone, lr) == ("q", 3e-5)
    assert epochs == search(0)[2] + 2  # The price: each leader's second rate, one more epoch.


def test_oracle_gives_backbones_that_break_a_constraint_the_first_rung_only(tmp_path):
    # b and d (the two best) are too slow: they are placed, not raced.
    oracle = _oracle(list("abcde"), [1e-4, 3e-5], rung_epochs(1, 4, 2), tmp_path,
                     eligible=["a", "c", "e"])
    by_round = _drive(oracle, CURVES)
    first = [(v["backbone"], v["learning_rate"]) for _, v in by_round[0]]
    # a 0.60, e 0.55, c 0.40 among the eligible: ceil(3/2) = 2 lead and check 3e-5.
    assert sorted(first[5:]) == [("a", 3e-5), ("e", 3e-5)]
    assert sorted((v["backbone"], v["learning_rate"]) for _, v in by_round[1]) == [
        ("a", 3e-5), ("a", 1e-4), ("e", 3e-5), ("e", 1e-4)]
    assert [v["backbone"] for _, v in by_round[2]] == ["a"]  # a 0.70 beats e 0.66.
    plan = oracle.plan()
    assert plan.halving_result("b").epochs == plan.halving_result("d").epochs == 1
    assert plan.halving_result("a").epochs == 4


def test_plan_takes_each_backbones_own_learning_rates():
    plan = plan_search([], ["a", "scratch"], {"a": [1e-4, 3e-5], "scratch": [1e-3]}, [1, 2])
    assert [(w.backbone, w.learning_rate) for w in plan.todo] == [("a", 1e-4), ("scratch", 1e-3)]
    # No candidate meets the constraints: all race (the report says what to relax).
    nobody = plan_search([_record("0", "a", 1e-4, 1, [0.5]), _record("1", "b", 1e-4, 1, [0.6])],
                         ["a", "b"], [1e-4], [1, 2], eligible=[])
    assert [w.backbone for w in nobody.todo] == ["b"]


def test_oracle_promotes_only_what_is_guaranteed_while_trials_run(tmp_path):
    # Two workers: promotion must not wait for the slowest, nor jump the gun.
    oracle = _oracle(list("abcd"), [1e-4], [1, 2], tmp_path)
    trials = {t.hyperparameters.values["backbone"]: t
              for t in (oracle.create_trial(f"tuner{i}") for i in range(4))}
    assert set(trials) == set("abcd")
    assert oracle.create_trial("tuner4").status == "IDLE"  # Nothing to do until results.
    _finish(oracle, trials["a"], [0.9, 0.9])
    _finish(oracle, trials["b"], [0.5, 0.5])
    # 2 of 4 finished, 2 go on: `a` could still be beaten by both others.
    assert oracle.create_trial("tuner0").status == "IDLE"
    _finish(oracle, trials["c"], [0.7, 0.7])
    # 3 finished: at most one (d) can end above `a`, so `a` is surely in the top 2.
    promoted = oracle.create_trial("tuner0")
    assert promoted.hyperparameters.values["backbone"] == "a"
    assert oracle.create_trial("tuner1").status == "IDLE"  # `c` vs `d` is still open.
    _finish(oracle, trials["d"], [0.8, 0.8])
    assert oracle.create_trial("tuner1").hyperparameters.values["backbone"] == "d"


def test_plan_reuses_finished_trials_when_the_budget_widens():
    records = [
        _record("0", "a", 1e-4, 1, [0.8]),
        _record("1", "b", 1e-4, 1, [0.6]),
        _record("2", "a", 1e-4, 2, [0.8, 0.85], initial=1, parent="0"),
    ]
    same = plan_search(records, ["a", "b"], [1e-4], [1, 2])
    assert same.finished and not same.todo  # A rerun trains nothing.
    wider = plan_search(records, ["a", "b"], [1e-4], [1, 2, 4])
    (item,) = wider.todo
    # Continues the 2-epoch trial instead of starting over.
    assert (item.backbone, item.base.trial_id, item.initial_epoch, item.target_epochs) == (
        "a", "2", 2, 4)
    # Narrower: the 2-epoch trial's history answers the 1-epoch question.
    narrower = plan_search(records, ["a", "b"], [1e-4], [1])
    assert narrower.finished and narrower.halving_result("a").score == pytest.approx(0.8)
    # Other weights behind the same name: nothing is reused.
    changed = plan_search(records, ["a", "b"], [1e-4], [1, 2], weights_ids={"a": "new", "b": ""})
    assert [w.backbone for w in changed.todo] == ["a"]


def test_plan_respects_the_budget_but_always_runs_the_first_rung():
    plan = plan_search([], list("abcd"), [1e-4, 3e-5], [1, 2, 4], budget_epochs=3)
    assert len(plan.todo) == 4  # The first rung is the floor, over budget or not.
    # First rung: a 0.0, b 0.2, c 0.4, d 0.6 at 1e-4; the leaders d and c checked 3e-5.
    records = [_record(str(i), b, lr, 1, [score]) for i, (b, lr, score) in enumerate((
        ("a", 1e-4, 0.0), ("b", 1e-4, 0.2), ("c", 1e-4, 0.4), ("d", 1e-4, 0.6),
        ("d", 3e-5, 0.7), ("c", 3e-5, 0.5)))]
    plan = plan_search(records, list("abcd"), [1e-4, 3e-5], [1, 2, 4], budget_epochs=7)
    # 6 epochs spent; the second rung needs 4 more (d and c at both rates), 10 > 7: stop.
    assert plan.todo == [] and plan.finished
    assert "budget (7 epochs)" in plan.budget_stop and "4 more needed" in plan.budget_stop
    # Time budget: the first rung measured 10 s per epoch per configuration (60 s);
    # the second rung needs 4 x 10 s more (2 x 10 s when the check settles the rate).
    for race, minutes, fits in ((1, 95 / 60, False), (1, 100 / 60, True),
                                (0, 75 / 60, False), (0, 80 / 60, True)):
        plan = plan_search(records, list("abcd"), [1e-4, 3e-5], [1, 2, 4],
                           budget_seconds=minutes * 60, lr_race_rungs=race)
        assert (plan.budget_stop is None) == fits
        expected = ([("d", 1e-4), ("d", 3e-5), ("c", 1e-4), ("c", 3e-5)] if race
                    else [("d", 3e-5), ("c", 3e-5)])
        assert [(w.backbone, w.learning_rate) for w in plan.todo] == (expected if fits else [])
    stopped = [_record("9", "a", 1e-4, 2, [0.9, 0.8], stopped=True)]
    plan = plan_search(stopped, ["a"], [1e-4], [1, 2, 4])
    assert plan.finished  # An early stop answers every later rung without training.
    assert plan.halving_result("a").epochs == 2
    # A continuation that stopped at once (no epoch beyond its parent's) ends the chain too;
    # planning it again would loop forever.
    at_once = [_record("0", "a", 1e-4, 2, [0.9, 0.8]),
               dataclasses.replace(_record("1", "a", 1e-4, 4, [0.9, 0.8], initial=2, parent="0"),
                                   stopped_early=True)]
    for records in (at_once, at_once[::-1]):
        plan = plan_search(records, ["a"], [1e-4], [1, 2, 4])
        assert plan.finished and plan.halving_result("a").epochs == 2


def test_plan_brute_force_completes_every_configuration_after_the_search():
    records = [
        _record("0", "a", 1e-4, 1, [0.8]),
        _record("1", "b", 1e-4, 1, [0.6]),
        _record("2", "a", 1e-4, 2, [0.8, 0.85], initial=1, parent="0"),
    ]
    plan = plan_search(records, ["a", "b"], [1e-4], [1, 2], brute_force=True)
    (item,) = plan.todo  # Only `b` lacks its full epochs; it continues its 1-epoch trial.
    assert (item.backbone, item.phase, item.base.trial_id, item.target_epochs) == (
        "b", "brute_force", "1", 2)
    assert plan.halving_result("b").epochs == 1  # The search's answer is unchanged.
    promoting = dataclasses.replace(_record("2", "a", 1e-4, 2, [], initial=1, parent="0"),
                                    status="RUNNING")
    busy = plan_search([*records[:2], promoting], ["a", "b"], [1e-4], [1, 2], brute_force=True)
    assert busy.todo == []  # No brute-force trial starts before the search is done.
    # A learning rate the search never tried is trained from scratch.
    plan = plan_search(records, ["a", "b"], [1e-4, 3e-5], [1, 2], reduction_factor=2,
                       brute_force=True)
    assert not plan.halving_complete  # a (the leader) still checks 3e-5 first.
    checked = [*records, _record("3", "a", 3e-5, 1, [0.7])]
    plan = plan_search(checked, ["a", "b"], [1e-4, 3e-5], [1, 2], brute_force=True)
    # The search itself still continues a's 3e-5 to the second rung (the race).
    (item,) = plan.todo
    assert (item.backbone, item.learning_rate, item.phase) == ("a", 3e-5, "halving")
    raced = [*checked, _record("4", "a", 3e-5, 2, [0.7, 0.75], initial=1, parent="3")]
    plan = plan_search(raced, ["a", "b"], [1e-4, 3e-5], [1, 2], brute_force=True)
    todo = {(w.backbone, w.learning_rate): w for w in plan.todo}
    assert set(todo) == {("b", 1e-4), ("b", 3e-5)}
    assert todo[("b", 3e-5)].base is None and todo[("b", 3e-5)].target_epochs == 2


def test_trials_record_each_epochs_eval_predictions(tmp_path):
    import keras
    import numpy as np
    import tensorflow as tf

    from tfhub_finetune.selection.tuner import trial_predictions, tuner_classes

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    eval_ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    recorder = tuner_classes().EvalPredictionsRecorder(eval_ds, y, "classification", tmp_path)
    # Without validation data the recorder's pass is the validation.
    history = model.fit(x, y, epochs=2, verbose=0, callbacks=[recorder])
    for epoch in (1, 2):
        preds = trial_predictions(tmp_path, epoch)
        assert preds.num_examples == 64
        assert history.history["val_accuracy"][epoch - 1] == pytest.approx(
            float(np.mean(preds.y_pred == y)))
    assert trial_predictions(tmp_path, 3) is None
    assert {"val_macro_f1", "val_auc"} <= set(history.history)


def test_bad_settings_raise_one_line_input_errors():
    base = dict(candidates=("scratch_text_encoder",), train_data="t.tsv", output_dir="out")
    for bad, match in (
        ({"max_latency_ms": -5.0}, "must be positive"),
        ({"min_metric": 85.0}, "exceeds 1"),
        ({"min_epochs": 4, "max_epochs": 2}, "larger than `max_epochs`"),
        ({"learning_rates": ()}, "at least one learning rate"),
        ({"reduction_factor": 1}, "reduction_factor"),
        ({"candidates": ("a", "a")}, "listed twice"),
        ({"baseline_learning_rate": 0.0}, r"Received: baseline_learning_rate=0\.0"),
        ({"tie_alpha": 1.5}, r"Received: tie_alpha=1\.5"),
        ({"prefer": "speed"}, r"Received: prefer='speed'"),
        ({"lr_race_rungs": -1}, "lr_race_rungs"),
    ):
        with pytest.raises(InputError, match=match) as info:
            SelectionConfig.from_settings(**{**base, **bad}).validate()
        assert "\n" not in str(info.value)


def test_report_title_names_the_task_from_the_data_file():
    from tfhub_finetune.selection.select import task_name

    assert task_name("/data/questions/trec_train.tsv") == "trec"
    assert task_name("../shared/data/sst2/train.tsv") == "sst2"  # A split name: its folder.
    assert task_name("../shared/data/hymenoptera/train") == "hymenoptera"
    assert task_name("/tmp/hold/questions.tsv") == "questions"  # Not the parent folder.


@pytest.mark.parametrize(
    "flag", ["--max_latency_ms=-1", "--min_metric=1.5", "--max_memory_mb=0",
             "--min_epochs=3 --max_epochs=2"],
)
def test_pipeline_bad_constraints_exit_2_in_one_line(flag):
    result = run_pipeline("pipelines.select_model", "--candidates=scratch_text_encoder",
                          "--train_data=x.tsv", "--output_dir=runs/unused", *flag.split(),
                          timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


@pytest.mark.parametrize("candidate, problem", [
    ("minilm_l6_h348", r"Candidate `minilm_l6_h348`: unknown backbone\..*Did you mean: minilm_l6_h384"),
    ("/no/such/model/dir", r"Candidate `/no/such/model/dir`: backbone directory not found\."),
])
def test_a_candidate_naming_no_backbone_is_refused_before_any_work(tiny_sst2, tmp_path,
                                                                   candidate, problem):
    # A typo among several candidates is said at once, not after the others trained.
    result = run_pipeline(
        "pipelines.select_model", f"--candidates=scratch_text_encoder,{candidate}",
        f"--train_data={tiny_sst2['train']}", f"--eval_data={tiny_sst2['dev']}",
        f"--output_dir={tmp_path / 'out'}", "--progress=false", timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and re.match(r"error: " + problem, lines[0]), result.stderr
    assert f"candidates='{candidate}'" in lines[0]
    assert not (tmp_path / "out" / "cache").exists()  # Nothing was profiled or trained.


def test_pipeline_all_candidates_failing_exits_2(tiny_sst2, tmp_path):
    broken = _broken_bert(tmp_path / "broken_bert")
    result = run_pipeline(
        "pipelines.select_model", f"--candidates={broken}",
        f"--train_data={tiny_sst2['train']}", f"--eval_data={tiny_sst2['dev']}",
        f"--output_dir={tmp_path / 'out'}", "--progress=false", timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Every candidate failed" in errors[0]
    assert "broken_bert: profile:" in errors[0]
    # The report of what failed is still written.
    assert "broken_bert" in (tmp_path / "out" / "report.md").read_text(encoding="utf-8")


def _broken_bert(folder: Path) -> Path:
    """Resolves (a Hugging Face BERT folder), but its weights are not a safetensors file."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 100,
        "max_position_embeddings": 64, "type_vocab_size": 2,
    }), encoding="utf-8")
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a"]),
                                      encoding="utf-8")
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    return folder


# --------------------------------------------------------------------------- #
# A tiny real run (and its rerun from the cache)
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def tiny_run(tiny_sst2, tmp_path_factory):
    out = tmp_path_factory.mktemp("select_tiny")
    candidates = [*TINY, str(_broken_bert(out / "broken_bert"))]
    start = time.perf_counter()
    result = select_model(candidates, tiny_sst2["train"], tiny_sst2["dev"],
                          output_dir=str(out / "report"), max_latency_ms=1000.0, **TINY_SETTINGS)
    return {"result": result, "seconds": time.perf_counter() - start, "out": out,
            "candidates": candidates, "data": tiny_sst2}


def test_tiny_run_writes_the_report(tiny_run):
    result = tiny_run["result"]
    report = Path(result.paths["report"])
    for name in ("report.md", "results.json", "pareto.png", "transferability.png"):
        assert (report.parent / name).stat().st_size > 0, name
    text = report.read_text(encoding="utf-8")
    assert "## Selection vs brute force" in text and "**estimated**" in text
    assert "## Is pretraining worth it here?" in text
    assert result.recommendation.name in TINY
    results = json.loads((report.parent / "results.json").read_text(encoding="utf-8"))
    trained = {c["name"]: c for c in results["candidates"] if c["metric"] is not None}
    assert set(trained) == set(TINY)
    for record in trained.values():
        assert 0.0 <= record["metric"] <= 1.0
        assert record["latency_ms"] > 0 and record["params"] > 0
        assert record["figures"]["fine_tune_epochs"] in (1, 2)
        assert set(record["scores"]) == {"logme", "knn_accuracy", "linear_probe_accuracy"}
        assert record["figures"]["feature_extraction_seconds"] > 0
        # The figure's 95% interval, from the saved predictions of the epoch it was taken at:
        # about +-9 points on 100 dev sentences.
        low, high = record["figures"]["metric_interval"]
        assert low <= record["metric"] <= high and 0.05 < high - low < 0.3, (low, high)
    # The paired test against the best, on the same 100 sentences, for the tie rule.
    recommendation = results["recommendation"]
    assert set(recommendation["p_values"]) == set(TINY) - {recommendation["best"]}
    # Both trained a first rung; the better one also the second.
    rungs = results["extra"]["rungs"]
    assert [len(r["entries"]) for r in rungs] == [2, 1]
    # Measured scores, then the data-free priors from the profiles, each with tau and regret.
    assert list(results["kendall_tau"]) == ["knn_accuracy", "linear_probe_accuracy", "logme",
                                            "params", "flops_per_example"]
    for name, info in results["kendall_tau"].items():
        assert info["kind"] == ("prior" if name in ("params", "flops_per_example") else "score")
        assert info["n"] == 2 and info["top_pick"] and info["regret"] >= 0.0
    assert "| params (parameter count) | nothing (data-free, from the profile) |" in text
    assert results["timing"]["brute_force_seconds_estimate"] > 0


def test_failed_candidates_are_reported_and_the_run_goes_on(tiny_run):
    records = {c.name: c for c in tiny_run["result"].candidates}
    broken = records["broken_bert"]
    assert broken.error.startswith("profile:") and broken.metric is None
    assert all(records[name].error is None for name in TINY)
    text = Path(tiny_run["result"].paths["report"]).read_text(encoding="utf-8")
    assert "failed: profile:" in text


def test_rerun_reuses_finished_trials_without_training(tiny_run):
    first = tiny_run["result"]
    project = next((tiny_run["out"] / "report" / "cache" / "tuner").iterdir())
    trials_before = sorted(p.name for p in project.glob("trial_*"))
    assert first.trials_run == len(trials_before) == 3
    start = time.perf_counter()
    again = select_model(tiny_run["candidates"], tiny_run["data"]["train"],
                         tiny_run["data"]["dev"], output_dir=str(tiny_run["out"] / "report"),
                         max_latency_ms=1000.0, **TINY_SETTINGS)
    seconds = time.perf_counter() - start
    assert again.trials_run == 0 and again.trials_reused == 3
    assert sorted(p.name for p in project.glob("trial_*")) == trials_before
    assert again.recommendation.name == first.recommendation.name
    assert {c.name: c.metric for c in again.candidates} == {
        c.name: c.metric for c in first.candidates}
    # Profiles and scores come from the cache too; only the broken one is redone.
    assert seconds < tiny_run["seconds"] / 2, (seconds, tiny_run["seconds"])


def test_int8_forms_of_the_contenders_are_measured_candidates_and_cached(tiny_run):
    settings = dict(output_dir=str(tiny_run["out"] / "report"), max_latency_ms=1000.0,
                    serving_forms=("float32", "int8", "int8_tflite"), **TINY_SETTINGS)
    result = select_model(tiny_run["candidates"], tiny_run["data"]["train"],
                          tiny_run["data"]["dev"], **settings)
    assert result.trials_run == 0
    records = {c.name: c for c in result.candidates}
    forms = [c for c in records.values() if c.serving_form == "int8"]
    # Only the configuration on the last rung is a contender; the other was cut on float32.
    (row,) = forms
    reference = records[row.figures["serving_form_of"]]
    assert row.error is None, row.error
    assert reference.figures["fine_tune_epochs"] == 2 and row.name == f"{reference.name} int8"
    assert (row.backbone, row.adaptation) == (reference.backbone, reference.adaptation)
    # Its own figures, measured on the 100 dev sentences from the trial's last-epoch weights:
    # the float32 export of those weights predicts what the trial did at that epoch.
    versus, epoch = row.figures["serving_vs_float32"], row.figures["weights_epoch"]
    assert epoch == 2
    cached = next((tiny_run["out"] / "report" / "cache" / "serving_forms").iterdir())
    project = next((tiny_run["out"] / "report" / "cache" / "tuner").iterdir())
    trial = trial_predictions(project / f"trial_{row.figures['weights_trial']}", epoch)
    exported = EvalPredictions.load(cached / "float32.npz")
    assert (exported.y_pred == trial.y_pred).mean() >= 0.98
    assert row.figures["float32_same_weights_metric"] == pytest.approx(
        float((trial.y_pred == trial.y_true).mean()), abs=0.02)
    assert versus["agreement"] >= 0.8, versus
    assert versus["size_ratio"] < 1 and row.latency_ms > 0 and row.memory_mb > 0
    # The form's quality change on the same weights carries over to the configuration's figure.
    assert row.metric == pytest.approx(reference.metric + versus["metric_delta"], abs=0.02)
    # The same int8 network as a TFLite file (token ids in): a row of its own, measured too.
    (tflite,) = [c for c in records.values() if c.serving_form == "int8_tflite"]
    assert tflite.error is None, tflite.error
    assert tflite.name == f"{reference.name} int8_tflite"
    assert tflite.figures["weights_epoch"] == epoch
    assert tflite.figures["serving_vs_float32"]["agreement"] >= 0.8
    assert tflite.latency_ms > 0 and tflite.figures["serving_vs_float32"]["size_ratio"] < 1
    rec = result.recommendation
    if row.figures["scored_epoch"] == epoch:
        # The figure's own weights: the form's own interval and paired test.
        low, high = row.figures["metric_interval"]
        assert low <= row.metric <= high
        assert row.name == rec.best or row.name in rec.p_values
    else:
        # The figure is an earlier epoch's: no paired test on predictions of other weights.
        assert "metric_interval" not in row.figures and row.name not in rec.p_values
    results = json.loads(Path(result.paths["results"]).read_text(encoding="utf-8"))
    assert {c["serving_form"] for c in results["candidates"]} == {"float32", "int8",
                                                                  "int8_tflite"}
    # Cached per trial: a rerun measures nothing and records the same figures.
    assert {p.name for p in cached.iterdir()} == {"report.json", "float32.npz", "int8.npz",
                                                  "int8_tflite.npz"}
    stamp = (cached / "report.json").stat().st_mtime_ns
    again = select_model(tiny_run["candidates"], tiny_run["data"]["train"],
                         tiny_run["data"]["dev"], **settings)
    assert (cached / "report.json").stat().st_mtime_ns == stamp
    assert {c.name: c.metric for c in again.candidates} == {c.name: c.metric for c in
                                                           result.candidates}


def test_a_candidate_over_a_hard_constraint_gets_the_first_rung_only(tiny_run):
    # minilm_l6_h384@layers=1 has ~12M parameters, the baseline 4.4M: only the baseline fits.
    result = select_model(tiny_run["candidates"], tiny_run["data"]["train"],
                          tiny_run["data"]["dev"], output_dir=str(tiny_run["out"] / "report"),
                          max_latency_ms=1000.0, max_params=8e6,
                          **{**TINY_SETTINGS, "max_epochs": 2})
    records = {c.name: c for c in result.candidates}
    big, small = records["minilm_l6_h384@layers=1"], records["scratch_text_encoder"]
    assert big.params > 8e6 > small.params
    assert big.figures["breaks_constraints"] == ["max_params"]
    assert big.figures["fine_tune_epochs"] == 1 and big.metric is not None  # Placed, not raced.
    assert small.figures["fine_tune_epochs"] == 2
    assert result.recommendation.name == "scratch_text_encoder"
    text = Path(result.paths["report"]).read_text(encoding="utf-8")
    assert "first rung only: minilm_l6_h384@layers=1 (max_params)" in text


def test_a_grid_over_full_and_head_reuses_the_full_only_cache(tiny_run, tmp_path):
    """Backbone x adaptation on the cache of the backbone-only run: only the head trains."""
    settings = {**TINY_SETTINGS, "adaptations": ("full", "head"),
                "adaptation_learning_rates": ("head=1e-2",)}
    before = tiny_run["result"].trials_run
    result = select_model(list(TINY), tiny_run["data"]["train"], tiny_run["data"]["dev"],
                          output_dir=str(tmp_path / "grid"), max_latency_ms=1000.0,
                          cache_dir=str(tiny_run["out"] / "report" / "cache"), **settings)
    # Same project: its full trials (no `adaptation` hyperparameter) are the full configurations.
    assert result.trials_reused >= before == 3 and 1 <= result.trials_run <= 2
    results = json.loads(Path(result.paths["results"]).read_text(encoding="utf-8"))
    records = {c["name"]: c for c in results["candidates"]}
    encoder = "minilm_l6_h384@layers=1"
    # The baseline trains full only; the encoder both ways.
    assert set(records) == {"scratch_text_encoder full", f"{encoder} full", f"{encoder} head"}
    full, head = records[f"{encoder} full"], records[f"{encoder} head"]
    for record in records.values():
        figures = record["figures"]
        assert 0.0 <= record["metric"] <= 1.0
        assert figures["train_minutes_projected"] > 0 and figures["trainable_params"] > 0
    assert (full["figures"]["adaptation"], head["figures"]["adaptation"]) == ("full", "head")
    assert head["figures"]["learning_rate"] == pytest.approx(1e-2)
    assert head["figures"]["trainable_params"] == 384 * 2 + 2
    assert head["figures"]["peak_train_rss_mb"] > 100
    # The head rode on features cached in the project, one file for the encoder.
    project = next((tiny_run["out"] / "report" / "cache" / "tuner").iterdir())
    assert len(list((project / "features").glob("*.npz"))) == 1
    assert result.recommendation.name in records


# --------------------------------------------------------------------------- #
# Slow: distributed tuning, kill and resume
# --------------------------------------------------------------------------- #


@pytest.mark.slow
def test_distributed_chief_and_two_workers(tiny_sst2, tmp_path):
    flagfile = _flagfile(tmp_path / "tiny.flags", tiny_sst2, tmp_path / "out")
    port = str(_free_port())
    procs = {}
    # Workers first: each waits for the chief's oracle (gRPC wait_for_ready), so both are
    # asking when the first rung is handed out. Started after the chief, a worker slowed by
    # a busy machine could arrive after the other had trained every trial and the chief had
    # gone, then wait out KerasTuner's hour-long connect timeout.
    for role in ("tuner0", "tuner1", "chief"):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "KERASTUNER_TUNER_ID": role,
               "KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": port}
        log = open(tmp_path / f"{role}.log", "w")  # noqa: SIM115 (closed below)
        procs[role] = (subprocess.Popen(
            [sys.executable, "-m", "pipelines.select_model", f"--flagfile={flagfile}"],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        ), log)
    deadline = time.monotonic() + 1200
    try:
        for proc, _ in procs.values():
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail("distributed run timed out:\n" + "\n".join(
            f"--- {r}\n{(tmp_path / f'{r}.log').read_text()[-3000:]}" for r in procs))
    finally:
        for proc, log in procs.values():
            if proc.poll() is None:
                proc.kill()
            log.close()
    logs = {role: (tmp_path / f"{role}.log").read_text() for role in procs}
    for role, (proc, _) in procs.items():
        assert proc.returncode == 0, f"{role}:\n{logs[role][-3000:]}"
    assert "Recommendation:" in logs["chief"]
    assert (tmp_path / "out" / "report.md").exists()
    project = next((tmp_path / "out" / "cache" / "tuner").iterdir())
    histories = [json.loads(p.read_text()) for p in project.glob("trial_*/epochs.json")]
    ran_on = {e["tuner_id"] for h in histories for e in h["epochs"].values()}
    assert ran_on == {"tuner0", "tuner1"}  # Both workers trained; the chief only served.
    trained = sum(int(line.split("trained ")[1].split()[0])
                  for role in ("tuner0", "tuner1") for line in logs[role].splitlines()
                  if line.startswith("Worker done"))
    assert trained == len(list(project.glob("trial_*"))) == 3


@pytest.mark.slow
def test_killed_run_resumes_the_interrupted_trial(tiny_sst2, tmp_path):
    flagfile = _flagfile(tmp_path / "tiny.flags", tiny_sst2, tmp_path / "out",
                         candidates="scratch_text_encoder", min_epochs="3", max_epochs="3")
    command = [sys.executable, "-m", "pipelines.select_model", f"--flagfile={flagfile}"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    history = None
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and proc.poll() is None:
            # Killed once epoch 1 is backed up (the history is written just before).
            found = list((tmp_path / "out" / "cache").glob(
                "tuner/*/trial_0000/backup/backup_state.json"))
            if found and json.loads(found[0].read_text())["epoch"] >= 1:
                history = found[0].parent.parent / "epochs.json"
                break
            time.sleep(0.5)
        assert history is not None, "the trial never finished an epoch"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # Only the group this test started.
        proc.wait()
    first_epoch = json.loads(history.read_text())["epochs"]["1"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming from backup" in result.stdout
    epochs = json.loads(history.read_text())["epochs"]
    assert sorted(epochs) == ["1", "2", "3"]
    assert epochs["1"] == first_epoch  # Epoch 1 was not trained again.
