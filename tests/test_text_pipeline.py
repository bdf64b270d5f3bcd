"""End to end: `python -m pipelines.text_classify` on real SST-2 and real MiniLM-L3 weights."""

import json

import pytest

from tests.conftest import require_shared_path, run_pipeline
from tfhub_finetune.stats import EvalPredictions


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sst2_dir, minilm_l3_dir):
    model_dir = tmp_path_factory.mktemp("sst2_l3")
    args = [
        f"--backbone={minilm_l3_dir}",
        f"--train_data={sst2_dir / 'train.tsv'}",
        f"--eval_data={sst2_dir / 'dev.tsv'}",
        f"--model_dir={model_dir}",
        "--max_train_examples=1200",
        "--epochs=1",
        "--batch_size=16",
        "--sequence_length=64",
        "--learning_rate=1e-4",
        "--pooling=mean",
        "--label_names=negative,positive",
        "--verbose=2",
    ]
    proc = run_pipeline("pipelines.text_classify", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return model_dir, args, proc


def test_fine_tuning_beats_chance_on_real_sst2(trained):
    model_dir, _, proc = trained
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["eval"]["num_examples"] == 872
    assert metrics["eval"]["accuracy"] > 0.70, metrics["eval"]  # Chance is ~0.51.
    assert metrics["eval"]["labels"] == ["negative", "positive"]
    assert sum(map(sum, metrics["eval"]["confusion_matrix"])) == 872
    assert "Eval (872 examples): accuracy=" in proc.stdout
    # A 95% bootstrap interval around each figure, about +-3 points on 872 sentences.
    low, high = metrics["eval"]["intervals"]["accuracy"]
    assert low < metrics["eval"]["accuracy"] < high and 0.03 < high - low < 0.09, (low, high)
    assert set(metrics["eval"]["intervals"]) >= {"macro_f1", "auc"}
    # The per-example predictions behind them, for paired comparisons.
    predictions = EvalPredictions.load(model_dir / "eval_predictions.npz")
    assert predictions.num_examples == 872
    assert (predictions.y_pred == predictions.y_true).mean() == pytest.approx(metrics["eval"]["accuracy"])
    for name in ("params.json", "labels.json", "best.weights.h5", "model.keras", "training_log.csv"):
        assert (model_dir / name).exists(), name
    # The training cost, for choosing an adaptation: every weight trains by default.
    assert metrics["adaptation"] == "full"
    assert 0.9 * metrics["params"] < metrics["trainable_params"] <= metrics["params"]
    assert metrics["fit_examples_per_second"] > 0 and 0 < metrics["fit_seconds"] <= metrics["train_seconds"]
    assert metrics["peak_train_rss_mb"] > metrics["train_rss_growth_mb"] > 0


def test_eval_mode_reproduces_the_metrics(trained):
    model_dir, args, _ = trained
    before = json.loads((model_dir / "metrics.json").read_text())["eval"]["accuracy"]
    proc = run_pipeline("pipelines.text_classify", *args, "--mode=eval")
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = json.loads((model_dir / "metrics.json").read_text())["eval"]["accuracy"]
    assert after == pytest.approx(before, abs=1e-9)


def test_rerun_with_same_flags_resumes_and_keeps_the_best_checkpoint(trained):
    model_dir, args, _ = trained
    best = (model_dir / "best.weights.h5").read_bytes()
    proc = run_pipeline("pipelines.text_classify", *args, "--mode=train")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Resuming from backup: epoch 2" in proc.stdout
    assert (model_dir / "best.weights.h5").read_bytes() == best


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--epochs=-1"], "--epochs must be a positive integer. Received: epochs=-1"),
        (["--batch_size=0"], "Received: batch_size=0"),
        (["--no_such_flag=1"], "Unknown command line flag 'no_such_flag'"),
        (["--backbone=minilm_l6_h38"], "Did you mean: minilm_l6_h384"),
        (["--train_data=/nonexistent/train.tsv"], "Data file not found"),
        (["--backbone=scratch_cnn"], "The text pipeline needs a text backbone"),
        (["--sequence_length=4096"], "Sequence length exceeds the backbone's maximum"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, sst2_dir, flags, expected):
    base = [
        "--backbone=scratch_text_encoder",
        f"--train_data={sst2_dir / 'dev.tsv'}",
        f"--model_dir={tmp_path / 'm'}",
        "--epochs=1",
    ]
    proc = run_pipeline("pipelines.text_classify", *base, *flags)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and expected in error_lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_bad_rows_and_labels_name_the_file_and_row(tmp_path, sst2_dir):
    train = tmp_path / "train.tsv"
    train.write_text("a fine film\t1\nawful\t0\n")
    bad_eval = tmp_path / "dev.tsv"
    bad_eval.write_text("great\t1\nmeh\t7\n")
    latin = tmp_path / "latin.tsv"
    latin.write_bytes("caf\xe9\t1\n".encode("latin-1"))
    no_weights = tmp_path / "bert_dir"
    no_weights.mkdir()
    (no_weights / "config.json").write_text('{"model_type": "bert"}')
    cases = [
        ([f"--eval_data={bad_eval}"], f"Row 2 of {bad_eval} has a label that training never saw"),
        ([f"--train_data={latin}"], f"Row 1 of {latin} is not valid utf-8"),
        ([f"--backbone={no_weights}"], "Hugging Face model directory has no weights file"),
    ]
    for flags, expected in cases:
        proc = run_pipeline(
            "pipelines.text_classify", "--backbone=scratch_text_encoder", f"--train_data={train}",
            f"--model_dir={tmp_path / 'm'}", *flags,
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / "m").exists()  # Refused before writing: no empty folder left.


def test_regression_needs_only_task_and_prints_its_correlations(tmp_path, minilm_l3_dir):
    # STS-B pairs scored 0-5: `--task=regression` alone picks a monitor the task logs.
    stsb = require_shared_path("data/stsb")
    proc = run_pipeline(
        "pipelines.text_classify", f"--backbone={minilm_l3_dir}",
        f"--train_data={stsb / 'train.tsv'}", f"--eval_data={stsb / 'dev.tsv'}",
        f"--model_dir={tmp_path / 'run'}", "--task=regression", "--text_column=sentence1",
        "--text_pair_column=sentence2", "--label_column=score", "--max_train_examples=64",
        "--epochs=1", "--sequence_length=32", "--verbose=0", timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    params = json.loads((tmp_path / "run" / "params.json").read_text())
    assert params["train"]["monitor"] == "val_pearson"
    evaluation = json.loads((tmp_path / "run" / "metrics.json").read_text())["eval"]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("Eval ("))
    assert f"pearson={evaluation['pearson']:.4f}" in line and "spearman=" in line
