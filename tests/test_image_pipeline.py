"""End to end: `python -m pipelines.image_classify` on real photos and real EfficientNet-Lite0."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import require_shared_path, run_pipeline


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    hymenoptera = require_shared_path("data/hymenoptera")
    lite0 = require_shared_path("weights/efficientnet_lite0")
    root = tmp_path_factory.mktemp("hymenoptera_lite0")
    rows = [
        f"{path},{name}"
        for name in ("ants", "bees")
        for path in sorted((hymenoptera / "val" / name).iterdir())[:10]
    ]
    (root / "val.csv").write_text("\n".join(rows) + "\n")
    model_dir = root / "model"
    args = [
        f"--backbone={lite0}",
        f"--train_data={hymenoptera / 'train'}",
        f"--eval_data={root / 'val.csv'}",
        f"--model_dir={model_dir}",
        "--max_train_examples=16",
        "--image_size=96",
        "--epochs=1",
        "--batch_size=8",
        "--learning_rate=1e-4",
        "--verbose=2",
    ]
    proc = run_pipeline("pipelines.image_classify", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return model_dir, args, proc


@pytest.mark.slow  # Two pipeline processes, ~40 s of CPU; minutes on shared cores.
def test_training_writes_the_same_outputs_as_the_text_pipeline(trained):
    model_dir, _, proc = trained
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["train_examples"] == 16 and metrics["eval"]["num_examples"] == 20
    assert metrics["eval"]["labels"] == ["ants", "bees"]
    assert sum(map(sum, metrics["eval"]["confusion_matrix"])) == 20
    assert metrics["image_size"] == 96 and metrics["pixel_convention"] == "symmetric"
    assert metrics["skipped_files"] == {"train": [], "eval": []}
    assert "Eval (20 examples): accuracy=" in proc.stdout
    outputs = ("params.json", "labels.json", "best.weights.h5", "model.keras", "training_log.csv")
    for name in outputs:
        assert (model_dir / name).exists(), name
    assert json.loads((model_dir / "labels.json").read_text())["names"] == ["ants", "bees"]


@pytest.mark.slow
def test_eval_mode_reproduces_the_metrics(trained):
    model_dir, args, _ = trained
    before = json.loads((model_dir / "metrics.json").read_text())["eval"]["accuracy"]
    proc = run_pipeline("pipelines.image_classify", *args, "--mode=eval")
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = json.loads((model_dir / "metrics.json").read_text())["eval"]["accuracy"]
    assert after == pytest.approx(before, abs=1e-9)


def test_bad_input_is_one_line_and_exit_code_2(tmp_path):
    hymenoptera = require_shared_path("data/hymenoptera")
    train = tmp_path / "train"
    for name in ("ants", "bees"):
        shutil.copytree(hymenoptera / "train" / name, train / name)
    (train / "wasps").mkdir()
    cases = [
        (["--backbone=scratch_text_encoder"], "The image pipeline needs an image backbone"),
        ([f"--train_data={train}"], f"Empty class folder. Received: folder='{train / 'wasps'}'"),
        (["--augment=randaugmnt"], "Unknown augmentation. Received: augment='randaugmnt'. "
         "Did you mean: randaugment? Expected one of: basic, none, randaugment."),
    ]
    for flags, expected in cases:
        proc = run_pipeline(
            "pipelines.image_classify",
            "--backbone=scratch_cnn",
            f"--train_data={hymenoptera / 'train'}",
            f"--model_dir={tmp_path / 'm'}",
            *flags,
        )
        assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr


def test_augment_and_crop_are_in_params_json_and_checked_on_resume(tmp_path):
    hymenoptera = require_shared_path("data/hymenoptera")
    model_dir = tmp_path / "m"
    args = [
        "--backbone=scratch_cnn",
        f"--train_data={hymenoptera / 'train'}",
        f"--model_dir={model_dir}",
        "--max_train_examples=8",
        "--image_size=32",
        "--epochs=1",
        "--batch_size=8",
        "--verbose=0",
    ]
    proc = run_pipeline("pipelines.image_classify", *args, "--augment=none",
                        "--nocrop_to_aspect_ratio")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((model_dir / "params.json").read_text())["data"]
    assert data["augment"] == "none" and data["crop_to_aspect_ratio"] is False
    assert (model_dir / "backup" / "backup_state.json").exists()
    # Same model_dir, other augmentation: refused like any other changed setting.
    proc = run_pipeline("pipelines.image_classify", *args, "--augment=basic",
                        "--nocrop_to_aspect_ratio")
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: The model directory holds a backup of a run with different settings"), proc.stderr
    assert "data.augment: 'none' -> 'basic'" in errors[0], errors
