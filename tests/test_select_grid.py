"""Selection over backbone x adaptation: planning over configurations (pure), settings, trials.

The planner is a pure function of the trials (`plan_search`), so most of the
grid is tested on recorded `TrialRecord`s; real trials check the head trained
on cached features and a continued LoRA trial (slow). The small real grid run
(full x head on the tiny run's cache) is in `test_select.py`, beside that run.
"""

from __future__ import annotations

import pytest

from tests.conftest import require_shared_path
from tests.test_select import TINY_SETTINGS
from tfhub_finetune.config import Adaptation
from tfhub_finetune.errors import InputError
from tfhub_finetune.selection.config import SearchConfig, SelectionConfig
from tfhub_finetune.selection.halving import TrialRecord, config_key, plan_search, split_key

pytestmark = pytest.mark.filterwarnings(
    "ignore:currentThread:DeprecationWarning", "ignore:getName:DeprecationWarning",
)


def _record(trial_id, config, lr, scores, *, seconds=10.0, peak=None, initial=0, parent=None):
    backbone, adaptation = split_key(config)
    return TrialRecord(
        trial_id=trial_id, backbone=backbone, adaptation=adaptation, learning_rate=lr,
        status="COMPLETED", target_epochs=len(scores), initial_epoch=initial, parent_id=parent,
        epochs_trained=len(scores), scores=tuple(scores),
        epoch_seconds={k: seconds for k in range(initial + 1, len(scores) + 1)},
        peak_train_rss_mb=peak,
    )


# --------------------------------------------------------------------------- #
# Configuration keys and the plan over configurations
# --------------------------------------------------------------------------- #


def test_a_full_configuration_is_the_bare_backbone_and_keys_round_trip():
    assert config_key("minilm_l6_h384") == config_key("minilm_l6_h384", "full") == "minilm_l6_h384"
    for backbone in ("minilm_l6_h384@layers=2", "../shared/weights/efficientnet_lite0",
                     "https://tfhub.dev/google/x/1"):
        for adaptation in ("full", "head", "top:2", "lora:8"):
            assert split_key(config_key(backbone, adaptation)) == (backbone, adaptation)


def test_halving_races_configurations_each_with_its_own_learning_rates():
    configs = ["a", "a|head", "b", "b|lora:8"]
    rates = {"a": [1e-4, 3e-5], "a|head": [1e-2, 3e-3], "b": [1e-4, 3e-5],
             "b|lora:8": [1e-3, 3e-4]}
    plan = plan_search([], configs, rates, [1, 2])
    # Rung 0: every configuration at its own first learning rate.
    assert [(w.config, w.learning_rate) for w in plan.todo] == [
        ("a", 1e-4), ("a|head", 1e-2), ("b", 1e-4), ("b|lora:8", 1e-3)]
    assert [(w.backbone, w.adaptation) for w in plan.todo][1] == ("a", "head")
    first = [_record("0", "a", 1e-4, [0.70]), _record("1", "a|head", 1e-2, [0.90]),
             _record("2", "b", 1e-4, [0.60]), _record("3", "b|lora:8", 1e-3, [0.80])]
    plan = plan_search(first, configs, rates, [1, 2])
    # The better half of the configurations (a head, b LoRA) check their other rates.
    assert sorted((w.config, w.learning_rate) for w in plan.todo) == [
        ("a|head", 3e-3), ("b|lora:8", 3e-4)]
    checks = [_record("4", "a|head", 3e-3, [0.85]), _record("5", "b|lora:8", 3e-4, [0.82])]
    plan = plan_search(first + checks, configs, rates, [1, 2])
    assert plan.rungs[0].promoted == ["a|head", "b|lora:8"]
    # Both rates of each promoted configuration go on (the learning-rate race), from their parents.
    assert sorted((w.config, w.learning_rate, w.base.trial_id) for w in plan.todo) == [
        ("a|head", 3e-3, "4"), ("a|head", 1e-2, "1"), ("b|lora:8", 3e-4, "5"),
        ("b|lora:8", 1e-3, "3")]
    assert plan.halving_result("a|head").score == pytest.approx(0.90)
    assert plan.halving_result("a").epochs == 1


def test_trials_from_before_adaptations_serve_full_only():
    # A cache made by a search over backbones: its records carry no adaptation (read as full).
    old = [_record("0", "a", 1e-4, [0.7, 0.75]), _record("1", "b", 1e-4, [0.6, 0.65])]
    plan = plan_search(old, ["a", "a|head", "b"], {"a": [1e-4], "a|head": [1e-2], "b": [1e-4]},
                       [1, 2])
    assert [(w.config, w.learning_rate) for w in plan.todo] == [("a|head", 1e-2)]
    # `a` is sure of its place already (only `a|head` is left to rank): its 2-epoch trial counts.
    assert plan.rungs[0].promoted == ["a"] and plan.halving_result("a").score == pytest.approx(0.75)
    # And never for another adaptation at the same learning rate.
    plan = plan_search(old, ["a|top:2"], [1e-4], [1, 2])
    assert [w.config for w in plan.todo] == ["a|top:2"] and plan.halving_result("a|top:2") is None


def test_training_limits_stop_promotion_after_the_first_rung():
    configs = ["a", "a|head", "b", "b|head"]
    first = [_record("0", "a", 1e-4, [0.90], seconds=120.0, peak=2000.0),
             _record("1", "a|head", 1e-4, [0.80], seconds=30.0, peak=1200.0),
             _record("2", "b", 1e-4, [0.85], seconds=60.0, peak=1900.0),
             _record("3", "b|head", 1e-4, [0.70], seconds=20.0, peak=1100.0)]
    free = plan_search(first, configs, [1e-4], [1, 2, 4])
    assert free.rungs[0].promoted == ["a", "b"] and not free.training_breaks
    # Projected full fine-tune: first-rung seconds per epoch x the last rung's 4 epochs.
    assert free.training["a"] == {"train_minutes_projected": 8.0, "peak_train_rss_mb": 2000.0}
    assert free.training["b|head"]["train_minutes_projected"] == pytest.approx(20 * 4 / 60, abs=1e-3)

    timed = plan_search(first, configs, [1e-4], [1, 2, 4], max_train_minutes=5.0)
    assert timed.training_breaks == {"a": {"max_train_minutes": 8.0}}
    # `a` scored best but would take 8 min: ranked like a failed one, the next two go on.
    assert timed.rungs[0].promoted == ["b", "a|head"]
    memory = plan_search(first, configs, [1e-4], [1, 2, 4], max_train_memory_mb=1500.0)
    assert set(memory.training_breaks) == {"a", "b"}
    assert memory.rungs[0].promoted == ["a|head", "b|head"]
    # Brute force still trains every configuration (it is the comparison, not the choice).
    brute = plan_search(first, configs, [1e-4], [1, 2, 4], max_train_memory_mb=1500.0,
                        brute_force=True)
    assert len(brute.brute_force) == 4


def test_the_projected_training_time_is_the_first_rates_and_stays_put():
    """Racing a second rate (faster here: a quieter machine) must not move a configuration's
    projection, or the search and brute force would judge `--max_train_minutes` on different
    figures (the SST-2 grid once did: 5.2 min from 1e-4's first epoch, 2.5 from 3e-5's)."""
    first = [_record("0", "a", 1e-4, [0.90], seconds=104.0)]
    later = [*first, _record("1", "a", 3e-5, [0.88], seconds=49.0)]
    for records in (first, later):
        plan = plan_search(records, ["a"], [1e-4, 3e-5], [1, 3])
        assert plan.training["a"]["train_minutes_projected"] == pytest.approx(104 * 3 / 60, abs=1e-3)


def test_the_selection_benchmark_replays_configurations_from_brute_force_chains(tmp_path):
    from benchmarks.selection import Chain, replay

    chains = {
        ("a", 1e-4): Chain("a", 1e-4, [0.70, 0.80], [10.0, 10.0], False, tmp_path, 2000.0),
        ("a|head", 1e-2): Chain("a|head", 1e-2, [0.75, 0.76], [1.0, 1.0], False, tmp_path,
                                900.0, setup_seconds=5.0),
        ("b", 1e-4): Chain("b", 1e-4, [0.60, 0.65], [20.0, 20.0], False, tmp_path, 1900.0),
    }
    rates = {"a": [1e-4], "a|head": [1e-2], "b": [1e-4]}
    plan, seconds = replay(chains, ["a", "a|head", "b"], rates, [1, 2], 2, None, 1)
    assert plan.rungs[0].promoted == ["a|head", "a"]
    assert plan.halving_result("a").score == pytest.approx(0.80)
    assert seconds == pytest.approx(10 + 1 + 20 + 10 + 1)
    # The head's feature pass counts once in its projected time: (5 + 1 x 2 epochs) s.
    assert plan.training["a|head"]["train_minutes_projected"] == pytest.approx(7 / 60, abs=1e-3)
    limited, _ = replay(chains, ["a", "a|head", "b"], rates, [1, 2], 2, None, 1,
                        {"max_train_memory_mb": 1950.0})
    assert limited.training_breaks == {"a": {"max_train_memory_mb": 2000.0}}
    assert limited.rungs[0].promoted == ["a|head", "b"]


# --------------------------------------------------------------------------- #
# Settings: adaptations and their learning rates
# --------------------------------------------------------------------------- #


def test_adaptations_default_by_modality_and_parse_once():
    s = SearchConfig(learning_rates=(1e-4, 3e-5))
    assert [str(a) for a in s.adaptations_for("text")] == ["full", "lora:8", "head"]
    assert [str(a) for a in s.adaptations_for("text_pair")] == ["full", "lora:8", "head"]
    assert [str(a) for a in s.adaptations_for("image")] == ["full", "top:2", "head"]
    given = SearchConfig(adaptations=("full", "top:2"))
    assert given.adaptations == (Adaptation("full"), Adaptation("top", blocks=2))
    # One place derives each adaptation's rates from full's; a given list wins.
    assert s.learning_rates_for("full") == s.learning_rates_for("top:2") == (1e-4, 3e-5)
    assert s.learning_rates_for("lora:8") == pytest.approx((1e-3, 3e-4))
    assert s.learning_rates_for("head") == pytest.approx((1e-2, 3e-3))
    own = SearchConfig(learning_rates=(1e-4,),
                       adaptation_learning_rates=("head=5e-3/1e-2", "lora:16=2e-3"))
    assert own.learning_rates_for("head") == (5e-3, 1e-2)
    assert own.learning_rates_for("lora:16") == (2e-3,)
    assert own.learning_rates_for("lora:8") == pytest.approx((1e-3,))  # Not named: scaled.


@pytest.mark.parametrize("settings, match", [
    ({"adaptations": ("full", "lorra:8")}, "Unknown adaptation method"),
    ({"adaptations": ("head", "head")}, "An adaptation is listed twice"),
    ({"adaptation_learning_rates": ("head:1e-2",)}, r"Expected ADAPTATION=LR"),
    ({"adaptation_learning_rates": ("head=2",)}, r"Learning rates must be numbers in \(0, 1\)"),
    ({"learning_rates": (0.02,), "adaptations": ("head",)}, "Scaled for head"),
    ({"max_train_minutes": 0}, "`max_train_minutes` must be positive"),
    ({"max_train_memory_mb": -5}, "`max_train_memory_mb` must be positive"),
])
def test_bad_adaptation_settings_are_one_line_errors(tmp_path, settings, match):
    with pytest.raises(InputError, match=match) as err:
        SelectionConfig.from_settings(["scratch_text_encoder"], "t.tsv",
                                      output_dir=str(tmp_path), **settings).validate()
    assert "\n" not in str(err.value).strip()


def test_lora_on_image_candidates_is_refused_before_any_work(tmp_path):
    from tfhub_finetune.selection.select import select_model

    lite0 = require_shared_path("weights/efficientnet_lite0")
    # The data folder is empty: the refusal comes before anything reads it.
    with pytest.raises(InputError, match="keras-hub has no LoRA for image CNNs") as err:
        select_model([str(lite0)], str(tmp_path), output_dir=str(tmp_path / "out"),
                     adaptations=("full", "lora:8"), progress=False)
    assert "full, head or top:K" in str(err.value)


# --------------------------------------------------------------------------- #
# Real trials: head on cached features, LoRA continued from its parent, a small grid run
# --------------------------------------------------------------------------- #

ENCODER = "minilm_l6_h384@layers=1"


def _tiny_config(data, out, **settings) -> SelectionConfig:
    return SelectionConfig.from_settings(
        ["scratch_text_encoder", ENCODER], data["train"], data["dev"], output_dir=str(out),
        **{**TINY_SETTINGS, **settings}).validate()


def test_a_head_trained_on_cached_features_is_the_real_models_head(tiny_sst2, tmp_path):
    import numpy as np

    from tfhub_finetune import training
    from tfhub_finetune.selection import trials
    from tfhub_finetune.selection.tuner import TrialHistory, tuner_classes
    from tfhub_finetune.tasks import make_task

    config = _tiny_config(tiny_sst2, tmp_path / "out")
    experiment = config.trial(ENCODER, 1e-2, 2, tmp_path / "trial", adaptation="head").validate()
    assert trials.rides_on_features(experiment)
    training.set_seed(experiment.train.seed)
    task = make_task(experiment)
    task.prepare_train()
    model = task.build_model()
    before = model.get_layer("head_logits").get_weights()[0].copy()
    encoder_before = [w.copy() for w in model.get_weights()]
    history = TrialHistory(tmp_path / "trial" / "epochs.json")
    recorder = tuner_classes().EpochRecorder(history, "val_accuracy", 0, "test")
    _, seconds = trials.fit_head_on_features(model, task, experiment, tmp_path / "trial",
                                             tmp_path / "features", [recorder])
    cached = list((tmp_path / "features").glob("*.npz"))
    assert seconds > 0 and len(cached) == 1
    with np.load(cached[0]) as data:
        assert data["train_x"].shape == (200, 384) and data["eval_x"].shape == (100, 384)
    # The head's weights changed in the real model; the encoder's did not.
    assert not np.allclose(before, model.get_layer("head_logits").get_weights()[0])
    frozen = {id(w) for w in model.get_layer("head_logits").weights}
    for w, old in zip(model.weights, encoder_before, strict=True):
        if id(w) not in frozen:
            np.testing.assert_array_equal(w.numpy(), old)
    # Raw sentences through the whole model (tokenizer inputs, frozen encoder, trained head)
    # score what the trial recorded from the features.
    probabilities = model.predict(task.eval_dataset(), verbose=0)
    accuracy = float(np.mean(probabilities.argmax(-1) == task.eval_targets()))
    assert accuracy == pytest.approx(history.scores()[-1], abs=0.0101)
    assert len(history.scores()) == 2 and (tmp_path / "trial" / "eval_predictions").is_dir()


@pytest.mark.slow
def test_a_continued_lora_trial_resumes_its_adapters(tiny_sst2, tmp_path):
    from tfhub_finetune.backbones.catalog import resolve_backbone
    from tfhub_finetune.selection.trials import TrialTrainer
    from tfhub_finetune.selection.tuner import TrialHistory

    config = _tiny_config(tiny_sst2, tmp_path / "out")
    trainer = TrialTrainer(config, {ENCODER: resolve_backbone(ENCODER)})
    values = {"backbone": ENCODER, "adaptation": "lora:4", "learning_rate": 1e-3}
    parent, child, whole = (tmp_path / n for n in ("trial_0", "trial_1", "trial_2"))
    first = trainer.fit_trial({**values, "tuner/epochs": 1}, parent, None, "t")
    # Continued from the parent's backup (weights, optimizer, the unmerged LoRA adapters) ...
    continued = trainer.fit_trial({**values, "tuner/epochs": 2, "tuner/initial_epoch": 1},
                                  child, parent, "t")
    # ... it trains what one uninterrupted two-epoch trial trains.
    uninterrupted = trainer.fit_trial({**values, "tuner/epochs": 2}, whole, None, "t")
    assert "epoch_1_seconds" not in continued and "epoch_2_seconds" in continued
    assert continued["val_accuracy_epoch_1"] == first["val_accuracy_epoch_1"]
    assert continued["val_accuracy_epoch_2"] == pytest.approx(
        uninterrupted["val_accuracy_epoch_2"], abs=1e-9)
    assert TrialHistory(child / "epochs.json").scores() == TrialHistory(whole / "epochs.json").scores()
    # LoRA trains a sliver of the weights.
    assert continued["trainable_params"] < 0.1 * 12e6
