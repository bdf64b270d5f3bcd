"""`python -m pipelines.predict`: batching through the serving signature, outputs, bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from pipelines import predict
from tests.conftest import require_shared_path, run_pipeline
from tfhub_finetune import calibration, export
from tfhub_finetune.builders.image_classifier import build_image_classifier
from tfhub_finetune.errors import InputError


@pytest.fixture(scope="module")
def image_export(tmp_path_factory) -> Path:
    model = build_image_classifier("scratch_cnn", 2, image_size=96)
    export_dir = tmp_path_factory.mktemp("exports")
    export.export_image_classifier(model, ["ants", "bees"], export_dir, image_size=96,
                                   model_name="hymenoptera", measure_latency=False)
    return export_dir / "hymenoptera"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Three good images (one in a subfolder), a non-image, a truncated JPEG, a hidden file."""
    source = require_shared_path("data/hymenoptera/val")
    root = tmp_path_factory.mktemp("to_predict")
    ants = sorted((source / "ants").glob("*.jpg"))[:2]
    bee = sorted((source / "bees").glob("*.jpg"))[0]
    shutil.copy(ants[0], root / "a_ant.jpg")
    shutil.copy(ants[1], root / "b_ant.jpg")
    (root / "sub").mkdir()
    shutil.copy(bee, root / "sub" / "c_bee.jpg")
    (root / "d_not_an_image.jpg").write_text("hello")
    (root / "e_truncated.jpg").write_bytes(ants[0].read_bytes()[:2000])
    (root / ".hidden.jpg").write_bytes(bee.read_bytes())
    (root / "readme.txt").write_text("ignored: not an image suffix")
    return root


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


# === Text inputs (no model needed) ===


def test_text_readers_keep_order_lines_and_odd_bytes(tmp_path):
    tsv = tmp_path / "in.tsv"
    tsv.write_bytes(b"a fine film\t1\n\n\tempty text\ncaf\xe9 latin-1\t0\n")
    rows = predict.read_texts(tsv, "0", "auto", "text")
    assert rows == [{"line": 1, "text": "a fine film"}, {"line": 3, "text": ""},
                    {"line": 4, "text": "caf\ufffd latin-1"}]
    csv_file = tmp_path / "in.csv"
    csv_file.write_text('id,review\n1,"good, really"\n2,bad\n')
    assert [r["text"] for r in predict.read_texts(csv_file, "review", "auto", "text")] == [
        "good, really", "bad"]
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text('{"text": "one"}\n{"text": "two", "label": 1}\n')
    assert [r["text"] for r in predict.read_texts(jsonl, "0", "auto", "text")] == ["one", "two"]

    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "one"}\n{"txt": "two"}\n')
    with pytest.raises(InputError, match=r"Row 2 of .* lacks the `text` key \(keys: `txt`\)"):
        predict.read_texts(bad_json, "0", "auto", "text")
    bad_json.write_text('{"text": "one"}\n["two"]\n')
    with pytest.raises(InputError, match="Row 2 of .* is a JSON array, not an object") as info:
        predict.read_texts(bad_json, "0", "auto", "text")
    assert "input=" in str(info.value) and "--text_key" in str(info.value)
    with pytest.raises(InputError, match="not in the header row"):
        predict.read_texts(csv_file, "sentence", "auto", "text")
    with pytest.raises(InputError, match="Row 1 of .* has 2 column"):
        predict.read_texts(tsv, "5", "false", "text")


# === Images ===


def test_image_folder_predictions_and_per_image_errors(tmp_path, image_export, image_folder,
                                                        caplog):
    output = tmp_path / "predictions.jsonl"
    with caplog.at_level("WARNING"):
        result = predict.run(str(image_export), str(image_folder), str(output), batch_size=4)
    # A file without an image suffix is said to be left out, not silently dropped.
    assert "Not predicted: 1 file(s)" in caplog.text and "readme.txt" in caplog.text
    # Batch 4 keeps TensorFlow's default thread pools (0); only batch 1 pins them to one thread.
    assert result == {"count": 5, "errors": 2, "output": str(output), "skipped_blank": 0,
                      "threads": {"intra_op": 0, "inter_op": 0}}
    rows = read_jsonl(output)
    assert [Path(r["path"]).name for r in rows] == [
        "a_ant.jpg", "b_ant.jpg", "d_not_an_image.jpg", "e_truncated.jpg", "c_bee.jpg"]
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4]
    for row in (rows[0], rows[1], rows[4]):
        assert row["label"] in ("ants", "bees") and set(row["probabilities"]) == {"ants", "bees"}
        assert abs(sum(row["probabilities"].values()) - 1) < 1e-5
        assert row["label_id"] == ["ants", "bees"].index(row["label"])
    assert rows[2]["error"].endswith("is not an encoded image; expected JPEG, PNG, GIF, BMP or "
                                     "WebP data.")
    assert "Invalid JPEG data" in rows[3]["error"]


def test_the_cli_writes_predictions_and_exits_0(tmp_path, image_export, image_folder):
    output = tmp_path / "out.jsonl"
    # Threads given: nothing is measured (`_timing_requests` and test_calibration cover auto).
    proc = run_pipeline("pipelines.predict", f"--saved_model={image_export}/1",
                        f"--input={image_folder}", f"--output={output}", "--batch_size=1",
                        "--intra_op_threads=1", "--inter_op_threads=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Wrote 5 predictions" in proc.stdout and "2 could not be predicted" in proc.stdout
    assert ("TensorFlow threads: intra-op 1, inter-op 1 (TF Serving: "
            "--tensorflow_intra_op_parallelism=1 --tensorflow_inter_op_parallelism=1)") in proc.stdout
    # The kernels it ran, as TF Serving's environment should say: conftest's choice, when it made
    # one (else TensorFlow's default, either value).
    onednn = os.environ.get(calibration.ONEDNN_ENV, "")
    assert f"(TF Serving's environment: TF_ENABLE_ONEDNN_OPTS={onednn}" in proc.stdout
    assert "Predicting" in proc.stderr  # The progress bar.
    assert len(read_jsonl(output)) == 5


def test_batch1_threads_are_timed_on_the_jobs_first_inputs(tmp_path, image_export, image_folder):
    """What `set_serving_threads` gets to time: the export's version folder and up to 8 of the
    job's own inputs, one per request; an input that does not suit the model is refused first,
    before anything is timed."""
    served = predict.ServedExport.read(image_export)
    files = predict.find_images(image_folder)
    timed = predict._timing_requests(served, [{"path": str(p)} for p in files])
    assert timed["saved_model"] == image_export / "1"
    assert [r["image_bytes"] for r in timed["requests"]] == [[p.read_bytes()] for p in files[:8]]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="No image files"):  # Before any thread is timed.
        predict.run(str(image_export), str(empty), str(tmp_path / "out.jsonl"), batch_size=1)
    text = tmp_path / "in.tsv"
    text.write_text("a fine film\n")
    with pytest.raises(InputError, match="image model"):
        served.check_inputs(text, "")
    with pytest.raises(InputError, match="SavedModel folder not found"):
        predict.ServedExport.read(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "make_args, expected",
    [
        (lambda d: [f"--input={d['folder']}", f"--output={d['out']}"], "Missing required flag"),
        (lambda d: [f"--saved_model={d['tmp']}/nowhere", f"--input={d['folder']}",
                    f"--output={d['out']}"], "SavedModel folder not found"),
        (lambda d: [f"--saved_model={d['tmp']}", f"--input={d['folder']}", f"--output={d['out']}"],
         "No SavedModel in the folder"),
        (lambda d: [f"--saved_model={d['model']}", f"--input={d['tsv']}", f"--output={d['out']}"],
         "This is an image model; the input must be a folder of images"),
        (lambda d: [f"--saved_model={d['model']}", f"--input={d['tmp']}/missing.tsv",
                    f"--output={d['out']}"], "Input not found"),
        (lambda d: [f"--saved_model={d['model']}", f"--input={d['folder']}", f"--output={d['tmp']}"],
         "The output is a folder"),
        (lambda d: ["--batch_size=x"], "flag --batch_size=x"),
    ],
    ids=["missing_flag", "no_folder", "not_a_savedmodel", "wrong_modality", "no_input",
         "output_is_folder", "bad_flag_value"],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, image_export, image_folder, make_args,
                                               expected):
    tsv = tmp_path / "in.tsv"
    tsv.write_text("a fine film\n")
    args = make_args({"tmp": tmp_path, "folder": image_folder, "out": tmp_path / "o.jsonl",
                      "model": image_export, "tsv": tsv})
    proc = run_pipeline("pipelines.predict", *args)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o.jsonl").exists()


# === (d) Predictions through the export agree with the pipeline's own evaluation ===


@pytest.mark.slow
def test_predict_accuracy_equals_the_pipeline_eval_accuracy(tmp_path, sst2_dir, minilm_l3_dir):
    model_dir, export_dir = tmp_path / "sst2_tiny", tmp_path / "exports"
    proc = run_pipeline(
        "pipelines.text_classify",
        f"--backbone={minilm_l3_dir}", f"--train_data={sst2_dir / 'train.tsv'}",
        f"--eval_data={sst2_dir / 'dev.tsv'}", f"--model_dir={model_dir}",
        "--max_train_examples=256", "--epochs=1", "--batch_size=16", "--sequence_length=64",
        "--learning_rate=1e-4", "--pooling=mean", "--label_names=negative,positive",
        "--verbose=0", f"--export_dir={export_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Exported SavedModel: {export_dir / 'sst2_tiny' / '1'}" in proc.stdout
    evaluation = json.loads((model_dir / "metrics.json").read_text())["eval"]
    truth = [int(line.rsplit("\t", 1)[1])
             for line in (sst2_dir / "dev.tsv").read_text("utf-8").splitlines() if line.strip()]

    accuracies = {}
    for name in ("sst2_tiny", "sst2_tiny_token_ids"):
        output = tmp_path / f"{name}.jsonl"
        # Batches of 64 in file order: the pipeline's eval batches, hence the same padding.
        proc = run_pipeline("pipelines.predict", f"--saved_model={export_dir / name}",
                            f"--input={sst2_dir / 'dev.tsv'}", f"--output={output}",
                            "--batch_size=64")
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = read_jsonl(output)
        assert [r["line"] for r in rows] == list(range(1, 873))
        hits = sum(r["label_id"] == t for r, t in zip(rows, truth, strict=True))
        accuracies[name] = hits / len(truth)
    print(f"eval accuracy {evaluation['accuracy']:.6f}; predict accuracy {accuracies}")
    assert accuracies["sst2_tiny"] == evaluation["accuracy"]
    assert accuracies["sst2_tiny_token_ids"] == evaluation["accuracy"]


@pytest.mark.parametrize("damage", ["variables_data", "variables_index", "saved_model_pb", "card"])
def test_a_damaged_export_is_one_line_naming_it(tmp_path, image_export, damage):
    version = export.resolve_saved_model(image_export)
    copy = tmp_path / "m" / "1"
    shutil.copytree(version, copy)
    target = {
        "variables_data": next((copy / "variables").glob("variables.data-*")),
        "variables_index": copy / "variables" / "variables.index",
        "saved_model_pb": copy / "saved_model.pb",
        "card": copy / "assets.extra" / "model_card.json",
    }[damage]
    if damage == "variables_index":
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[: max(1, target.stat().st_size // 3)])
    with pytest.raises(InputError, match="damaged") as info:
        predict.Predictor(copy)
    assert str(copy) in str(info.value)
