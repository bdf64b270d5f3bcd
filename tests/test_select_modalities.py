"""Model selection beyond single texts: text pairs (MRPC) and token classification (CoNLL NER).

What a user relies on: `--modality=tokens|text_pair` (or the data flags) picks
the task; a token trial trains exactly what `token_classify` trains and is
scored on entity F1 (seqeval's); transferability for NER scores one feature
per word (its first word piece) against the word's tag; and a real selection
run over either ends in a report and a recommendation on the right metric.
The full runs are `slow` (a few minutes each on 2 cores); the rest are
seconds to a minute.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import require_shared_path
from tests.test_select import FAST_PROFILE
from tests.test_token_classification import head_sentences
from tfhub_finetune.errors import InputError
from tfhub_finetune.selection.config import SelectionConfig

pytestmark = pytest.mark.filterwarnings(
    "ignore:currentThread:DeprecationWarning", "ignore:getName:DeprecationWarning",
)

# A CoNLL file a test writes: 24 sentences, two entity types, a DOCSTART line, IOB2.
_SENTENCES = [
    [("John", "B-PER"), ("Smith", "I-PER"), ("lives", "O"), ("in", "O"), ("Paris", "B-LOC"),
     (".", "O")],
    [("Mary", "B-PER"), ("went", "O"), ("to", "O"), ("Berlin", "B-LOC"), ("today", "O")],
    [("The", "O"), ("mayor", "O"), ("of", "O"), ("London", "B-LOC"), ("spoke", "O")],
    [("Peter", "B-PER"), ("Jones", "I-PER"), ("met", "O"), ("Anna", "B-PER"), ("in", "O"),
     ("New", "B-LOC"), ("York", "I-LOC")],
]


def _conll(path: Path, copies: int) -> tuple[Path, list[str]]:
    lines, tags = ["-DOCSTART- -X- -X- O", ""], []
    for _ in range(copies):
        for sentence in _SENTENCES:
            lines += [f"{word} NNP B-NP {tag}" for word, tag in sentence] + [""]
            tags += [tag for _, tag in sentence]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, tags


def _settings(**extra):
    return dict(sequence_length=16, batch_size=8, learning_rates=(1e-3,), min_epochs=1,
                max_epochs=1, profile_options=FAST_PROFILE, progress=False, adaptations=("full",),
                **extra)


# --------------------------------------------------------------------------- #
# The modality: from the flag or the data settings, and the metric it implies
# --------------------------------------------------------------------------- #


def test_modality_and_metric_follow_the_data_settings(tmp_path):
    def config(**settings):
        return SelectionConfig.from_settings(["scratch_text_encoder"], "t.txt", "v.txt",
                                             output_dir=str(tmp_path), **settings).validate()

    tokens = config(modality="tokens")
    assert (tokens.search.modality, tokens.search.metric, tokens.objective,
            tokens.base.model.task) == ("tokens", "entity_f1", "val_entity_f1",
                                        "token_classification")
    # The trial is what token_classify runs.
    assert tokens.trial("x", 1e-4, 2, "d").model.task == "token_classification"
    assert config(task="token_classification").search.modality == "tokens"
    pairs = config(text_pair_column="2", metric="f1")
    assert (pairs.search.modality, pairs.search.metric) == ("text_pair", "f1")
    assert config().search.metric == "accuracy"  # Text or image: the candidates decide.
    # Multi-label: what its training watches, macro-F1 (binary accuracy rewards "no" labels).
    assert config(task="multi_label").search.metric == "macro_f1"
    assert config(modality="tokens").resolved() == tokens  # Resolving twice changes nothing.


@pytest.mark.parametrize("settings, expect", [
    (dict(modality="tokn"), "Did you mean: tokens"),
    (dict(modality="text_pair"), "text_pair_column"),
    (dict(modality="image", text_pair_column="2"), "text_pair"),
    (dict(modality="tokens", metric="accuracy"), "entity_f1"),
    (dict(metric="entity_f1"), "--modality=tokens"),
    (dict(modality="tokens", task="regression"), "token classification"),
])
def test_contradicting_modality_settings_are_one_line_errors(tmp_path, settings, expect):
    with pytest.raises(InputError) as err:
        SelectionConfig.from_settings(["scratch_text_encoder"], "t.txt", "v.txt",
                                      output_dir=str(tmp_path), **settings).validate()
    assert expect in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- #
# Token trials and features, on a CoNLL file the test writes
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def tiny_conll(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("conll_tiny")
    train, train_tags = _conll(folder / "train.txt", 4)
    dev, _ = _conll(folder / "dev.txt", 1)
    return {"train": str(train), "dev": str(dev), "train_tags": train_tags, "dir": folder}


def test_token_features_are_one_per_word_labelled_with_its_tag(tiny_conll):
    from tfhub_finetune.selection import trials

    config = SelectionConfig.from_settings(
        ["scratch_text_encoder"], tiny_conll["train"], tiny_conll["dev"],
        output_dir=str(tiny_conll["dir"] / "features"),
        **_settings(transfer_examples=10_000, modality="tokens"),
    ).validate()
    features, labels, _ = trials.candidate_features(config, "scratch_text_encoder", None)
    words = tiny_conll["train_tags"]
    # Every training word once, as its first piece's 128-d encoding, with its own tag.
    assert features.shape == (len(words), 128)
    from tfhub_finetune.data.tokens import tag_names

    names = tag_names(["LOC", "PER"])
    assert Counter(names[i] for i in labels) == Counter(words)


def test_a_token_trial_trains_what_token_classify_trains(tiny_conll, tmp_path):
    """The same settings and seed: the trial's val_entity_f1 is the pipeline's, to the digit."""
    import csv as csv_module

    from tfhub_finetune.driver import run_experiment
    from tfhub_finetune.selection.trials import TrialTrainer
    from tfhub_finetune.tasks import make_task

    config = SelectionConfig.from_settings(
        ["scratch_text_encoder"], tiny_conll["train"], tiny_conll["dev"],
        output_dir=str(tmp_path / "select"), **_settings(modality="tokens"),
    ).validate()
    values = {"backbone": "scratch_text_encoder", "learning_rate": 1e-3, "tuner/epochs": 1}
    trial_dir = tmp_path / "trial"
    trial_dir.mkdir()
    metrics = TrialTrainer(config, {}).fit_trial(values, trial_dir, None, "tuner0")
    assert set(metrics) >= {"val_entity_f1", "val_entity_f1_epoch_1"}
    # What token_classify runs with these settings (run_experiment over the token task).
    experiment = config.trial("scratch_text_encoder", 1e-3, 1, tmp_path / "pipeline")
    result = run_experiment(experiment, make_task(experiment))
    with open(tmp_path / "pipeline" / "training_log.csv", encoding="utf-8") as f:
        logged = [float(row["val_entity_f1"]) for row in csv_module.DictReader(f)]
    assert [metrics["val_entity_f1_epoch_1"]] == pytest.approx(logged, abs=1e-6)
    assert max(logged) == pytest.approx(result["eval"]["entity_f1"], abs=1e-6)
    # Tokens have no per-example predictions: no paired-test files, no confusion.
    assert not (trial_dir / "eval_predictions").exists()


# --------------------------------------------------------------------------- #
# Real selection runs (slow): CoNLL-2003 and MRPC slices
# --------------------------------------------------------------------------- #


@pytest.mark.slow
def test_token_selection_run_recommends_on_entity_f1(tmp_path):
    from tfhub_finetune.selection.profile import ProfileOptions
    from tfhub_finetune.selection.select import select_model

    conll = require_shared_path("data/conll2003")
    train = head_sentences(conll / "train.txt", 300, tmp_path / "train.txt")
    dev = head_sentences(conll / "valid.txt", 100, tmp_path / "valid.txt")
    candidates = ["scratch_text_encoder", "minilm_l6_h384@layers=1"]
    # The served NER export is profiled (strings in, entities out), not only the Keras model.
    served = ProfileOptions(serving_batch_size=8, train_batch_size=16, warmup_runs=2,
                            min_runs=5, max_runs=100, min_seconds=0.2)
    result = select_model(candidates, str(train), str(dev), output_dir=str(tmp_path / "report"),
                          **{**_settings(), "profile_options": served, "sequence_length": 32,
                             "batch_size": 16, "max_epochs": 2, "transfer_examples": 300,
                             "modality": "tokens"})
    results = json.loads(Path(result.paths["results"]).read_text(encoding="utf-8"))
    assert results["recommendation"]["metric_name"] == "entity_f1"
    assert result.recommendation.name in candidates
    trained = {c["name"]: c for c in results["candidates"]}
    assert set(trained) == set(candidates)
    for c in trained.values():
        assert 0.0 <= c["metric"] <= 1.0
        assert c["figures"]["transfer_examples"] == 300  # Words.
        assert "loaded SavedModel" in c["figures"]["inference_measured_on"]
        assert c["figures"]["saved_model_mb"] > 0 and c["figures"]["model_latency_p50_ms"] > 0
    # 300 CoNLL sentences are enough for the pretrained layer to find entities.
    assert trained["minilm_l6_h384@layers=1"]["metric"] > 0.15
    report = Path(result.paths["report"]).read_text(encoding="utf-8")
    assert "entity_f1" in report and "pipelines.token_classify" in report
    assert results["extra"]["modality"] == "tokens"


@pytest.mark.slow
def test_text_pair_selection_run_recommends_on_pair_f1(tmp_path):
    from tfhub_finetune.selection.select import select_model

    mrpc = require_shared_path("data/mrpc")
    for name, count in (("train", 300), ("dev", 150)):
        lines = (mrpc / f"{name}.tsv").read_text(encoding="utf-8").split("\n")[:count + 1]
        (tmp_path / f"{name}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    candidates = ["scratch_text_encoder", "minilm_l6_h384@layers=1"]
    result = select_model(
        candidates, str(tmp_path / "train.tsv"), str(tmp_path / "dev.tsv"),
        output_dir=str(tmp_path / "report"),
        **{**_settings(), "sequence_length": 64, "batch_size": 16, "metric": "f1",
           "has_header": "true", "text_column": "sentence1", "text_pair_column": "sentence2",
           "label_column": "label", "transfer_examples": 200, "max_epochs": 2},
    )
    results = json.loads(Path(result.paths["results"]).read_text(encoding="utf-8"))
    assert results["extra"]["modality"] == "text_pair"
    assert results["recommendation"]["metric_name"] == "f1"
    assert result.recommendation.name in candidates
    for c in results["candidates"]:
        assert 0.0 <= c["metric"] <= 1.0
        # Pairs have one prediction per example: the figure's interval and the paired test.
        low, high = c["figures"]["metric_interval"]
        assert low <= c["metric"] <= high
    assert set(results["recommendation"]["p_values"]) == set(candidates) - {
        results["recommendation"]["best"]}
    report = Path(result.paths["report"]).read_text(encoding="utf-8")
    assert "text pairs" in report and "f1" in report


def test_select_conll2003_flag_file_is_offline_tokens_on_entity_f1():
    """The flag file parses into a tokens selection of offline candidates (no TensorFlow run)."""
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    code = (
        "import json, sys\n"
        "from absl import flags\n"
        "import pipelines.select_model as m\n"
        "flags.FLAGS(['x', '--flagfile=pipelines/configs/select_conll2003.flags'])\n"
        "c = m.config_from_flags()\n"
        "print(json.dumps({'modality': c.search.modality, 'metric': c.search.metric,"
        " 'task': c.base.model.task, 'candidates': c.search.candidates,"
        " 'train': c.base.data.train_data, 'eval': c.base.data.eval_data,"
        " 'max_train_examples': c.base.data.max_train_examples}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120, check=True)
    config = json.loads(out.stdout.strip().splitlines()[-1])
    assert (config["modality"], config["metric"], config["task"]) == (
        "tokens", "entity_f1", "token_classification")
    for candidate in config["candidates"]:
        # Offline: the pip-installed MiniLM-L6 (and its @layers variants), ../shared weights,
        # the from-scratch baseline; no hub handle or preset name fetched at run time.
        assert (candidate.startswith("minilm_l6_h384") or candidate.startswith("../shared/")
                or candidate.startswith("scratch_")), candidate
        if candidate.startswith("../shared/"):
            assert (REPO_ROOT / candidate).is_dir(), candidate
    for split in ("train", "eval"):
        assert (REPO_ROOT / config[split]).is_file(), config[split]
    assert 0 < config["max_train_examples"] <= 5000
