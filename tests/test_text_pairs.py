"""Text pairs: one packing everywhere, readers that keep every row, pair fine-tuning and export.

The packing parity test runs the four users of `pack_inputs` (tf.data, the
TF Serving export's string and token-id signatures with `text_client`, and
the TF Hub preprocess model) on the same strings, single and paired,
including empty, very long and non-ASCII ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import tensorflow as tf

from tests.conftest import require_shared_path, run_pipeline
from tests.test_export import BLOCKED, LONG_TEXT, TRICKY, run_child, strings
from tfhub_finetune import export, hub_export, serving_warmup
from tfhub_finetune.backbones import load_backbone
from tfhub_finetune.builders.text_classifier import build_text_classifier
from tfhub_finetune.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from tfhub_finetune.data.labels import LabelVocabulary
from tfhub_finetune.data.packing import kept_lengths, pack_ids
from tfhub_finetune.data.sources import read_text_examples
from tfhub_finetune.data.text import make_text_dataset, pack_inputs, tokenize_texts
from tfhub_finetune.driver import run_experiment
from tfhub_finetune.errors import InputError
from tfhub_finetune.metrics import PearsonCorrelation, regression_report
from tfhub_finetune.tasks.text_classification import TextClassificationTask
from tfhub_finetune.text_client import TextClient

SEQUENCE_LENGTH = 24
FIRST = ["", "   ", "A man is playing a guitar.", LONG_TEXT, *TRICKY[:6], "short", LONG_TEXT]
SECOND = ["a", "", "", "Someone plays an instrument on a stage tonight.", *TRICKY[6:12],
          LONG_TEXT, "x " * 40]


# === The rule ===


def longest_first(a: int, b: int, sequence_length: int) -> tuple[int, int]:
    """Hugging Face's `longest_first`, one token at a time (ties trim the second)."""
    while a + b > max(sequence_length - 3, 0):
        if a > b:
            a -= 1
        else:
            b -= 1
    return a, b


def test_kept_lengths_is_longest_first_and_matches_tensorflow():
    grid = [(a, b, n) for a in range(0, 14) for b in range(0, 14) for n in range(3, 20)]
    for a, b, n in grid:
        assert kept_lengths(a, b, sequence_length=n) == longest_first(a, b, n), (a, b, n)
    a, b, n = (tf.constant([g[i] for g in grid], tf.int64) for i in range(3))
    kept = kept_lengths(a, b, sequence_length=n, minimum=tf.minimum, maximum=tf.maximum)
    assert [tuple(map(int, k)) for k in zip(*(t.numpy() for t in kept), strict=True)] == [
        longest_first(*g) for g in grid
    ]
    assert kept_lengths(10, sequence_length=6) == (4, None)


def test_pack_ids_layout():
    assert pack_ids([7, 8, 9], [4, 5], sequence_length=6, start_id=1, end_id=2) == (
        [1, 7, 8, 2, 4, 2], [0, 0, 0, 0, 1, 1]
    )
    assert pack_ids([], [], sequence_length=8, start_id=1, end_id=2) == ([1, 2, 2], [0, 0, 1])
    assert pack_ids([7] * 9, sequence_length=4, start_id=1, end_id=2) == ([1, 7, 7, 2], [0] * 4)


def test_pack_inputs_matches_pack_ids_on_ragged_batches():
    rng = np.random.default_rng(0)
    firsts = [list(rng.integers(5, 99, rng.integers(0, 20))) for _ in range(40)]
    seconds = [list(rng.integers(5, 99, rng.integers(0, 20))) for _ in range(40)]
    packed = pack_inputs(tf.ragged.constant(firsts, tf.int32), tf.ragged.constant(seconds, tf.int32),
                         sequence_length=17, start_id=1, end_id=2, pad_id=0)
    for row, (a, b) in enumerate(zip(firsts, seconds, strict=True)):
        ids, segments = pack_ids(a, b, sequence_length=17, start_id=1, end_id=2)
        n = int(packed["padding_mask"][row].numpy().sum())
        assert packed["token_ids"][row, :n].numpy().tolist() == ids
        assert packed["segment_ids"][row, :n].numpy().tolist() == segments
        assert not packed["token_ids"][row, n:].numpy().any()
    empty = pack_inputs(tf.ragged.constant([], tf.int32, ragged_rank=1), sequence_length=8,
                        start_id=1, end_id=2, pad_id=0)
    assert empty["token_ids"].shape[0] == 0


# === Parity: tf.data, export (strings, token ids + text_client), TF Hub preprocess ===


@pytest.fixture(scope="module")
def pair_setup(tmp_path_factory, minilm_l3_dir):
    backbone = load_backbone(str(minilm_l3_dir))
    model = build_text_classifier(backbone, 1, task="regression", pooling="mean")
    exports = tmp_path_factory.mktemp("pair_exports")
    raw = export.export_text_classifier(
        model, backbone, LabelVocabulary(["score"], task="regression", label_type="id"), exports,
        model_name="pairs", sequence_length=SEQUENCE_LENGTH, text_pair=True, measure_latency=False,
    )
    hub = hub_export.export_tfhub(backbone, tmp_path_factory.mktemp("hub") / "encoder",
                                  seq_length=SEQUENCE_LENGTH)
    return backbone, model, Path(raw), exports / "pairs_token_ids" / "1", hub


def training_inputs(backbone, first, second=None, sequence_length=SEQUENCE_LENGTH):
    data = tokenize_texts(first, np.zeros(len(first), np.float32), backbone.tokenizer,
                          sequence_length, pairs=second)
    inputs, _ = next(iter(make_text_dataset(data, backbone.tokenizer, batch_size=len(first),
                                            training=False)))
    return {k: v.numpy() for k, v in inputs.items()}


@pytest.mark.parametrize("paired", [False, True], ids=["single", "pair"])
def test_all_packings_agree_id_for_id(pair_setup, paired):
    backbone, model, raw, token_ids_dir, hub = pair_setup
    second = SECOND if paired else None
    trained = training_inputs(backbone, FIRST, second)
    assert trained["token_ids"].shape[1] == SEQUENCE_LENGTH  # The long ones were truncated.
    if paired:
        assert set(np.unique(trained["segment_ids"])) == {0, 1}

    client = TextClient.from_saved_model(token_ids_dir)
    assert {k: np.array(v) for k, v in client.encode(FIRST, second).items()}.keys() == trained.keys()
    for name, values in client.encode(FIRST, second).items():
        np.testing.assert_array_equal(np.array(values), trained[name], err_msg=name)

    preprocess = tf.saved_model.load(str(hub_export.preprocess_path(hub)))
    segments = [preprocess.tokenize(tf.constant(t)) for t in ([FIRST] + ([second] if paired else []))]
    packed = preprocess.bert_pack_inputs(segments, seq_length=tf.constant(SEQUENCE_LENGTH))
    for ours, theirs in (("token_ids", "input_word_ids"), ("padding_mask", "input_mask"),
                         ("segment_ids", "input_type_ids")):
        np.testing.assert_array_equal(packed[theirs].numpy(), trained[ours], err_msg=theirs)

    if paired:  # The pair export's two signatures answer what the model says on training's ids.
        expected = model(trained, training=False).numpy()
        served = tf.saved_model.load(str(raw)).signatures["serving_default"](
            text=tf.constant(FIRST), text_pair=tf.constant(SECOND))["scores"].numpy()
        np.testing.assert_allclose(served, expected, atol=1e-5)
        ids = tf.saved_model.load(str(token_ids_dir)).signatures["serving_default"](
            **{k: tf.constant(v) for k, v in client.encode(FIRST, SECOND).items()})
        np.testing.assert_allclose(ids["scores"].numpy(), expected, atol=1e-5)


def test_pair_export_in_bare_tensorflow(pair_setup, tmp_path):
    backbone, model, raw, token_ids_dir, _ = pair_setup
    card = export.read_model_card(raw)
    assert card["preprocessing"]["text_inputs"] == ["text", "text_pair"]
    assert set(card["signatures"]["serving_default"]["inputs"]) == {"text", "text_pair"}
    calls = [{"id": "pair", "model": str(raw), "signature": "serving_default",
              "inputs": {"text": strings(FIRST), "text_pair": strings(SECOND)}}]
    answer = run_child(tmp_path, calls, block=BLOCKED, text_kernels=True)
    assert not {"keras", "keras_hub", "tfhub_finetune"} & set(answer["modules"])
    expected = model(training_inputs(backbone, FIRST, SECOND), training=False).numpy()
    np.testing.assert_allclose(np.array(answer["results"]["pair"]["scores"]), expected, atol=1e-5)
    # TF Serving's warm-up requests: pairs at the listed widths ([CLS] a [SEP] b [SEP]), answered.
    client = TextClient.from_saved_model(token_ids_dir)
    for folder in (raw, token_ids_dir):
        serve = tf.saved_model.load(str(folder)).signatures["serving_default"]
        shapes = []
        for request in serving_warmup.read_warmup_requests(folder):
            if "text" in request:
                ids = client.encode([t.decode() for t in request["text"]],
                                    [t.decode() for t in request["text_pair"]])["token_ids"]
            else:
                ids = request["token_ids"]
            shapes.append([len(ids), len(ids[0])])
            answer = serve(**{name: tf.constant(value) for name, value in request.items()})
            assert len(answer["scores"]) == len(ids)
        assert shapes == card["preprocessing"]["warmup_shapes"]


# === Readers ===


def test_mrpc_and_stsb_readers_keep_every_row():
    mrpc = require_shared_path("data/mrpc")
    stsb = require_shared_path("data/stsb")
    pair = {"text_column": "sentence1", "text_pair_column": "sentence2"}
    train = read_text_examples(str(mrpc / "train.tsv"), label_column="label", **pair)
    assert len(train) == len(train.pairs) == 3668
    assert sorted(set(train.labels)) == ["0", "1"] and train.labels.count("1") == 2474
    # Line 1587 holds U+0012 (a cp1252 quote that lost its high bit): kept as written.
    row = train.rows.index(1587)
    assert "Treasury\x12s long-range plan" in train.texts[row] + train.pairs[row]
    # Unbalanced quotes stay inside their sentence (a quoting reader merges rows here).
    assert sum(t.count('"') % 2 for t in train.texts + train.pairs) > 0
    counts = {
        (folder.name, split): len(read_text_examples(
            str(folder / f"{split}.tsv"), label_column="score" if folder == stsb else "label", **pair))
        for folder in (mrpc, stsb) for split in ("dev", "test")
    }
    counts[("stsb", "train")] = len(read_text_examples(str(stsb / "train.tsv"), label_column="score",
                                                       **pair))
    assert counts == {("mrpc", "dev"): 408, ("mrpc", "test"): 1725, ("stsb", "dev"): 1500,
                      ("stsb", "test"): 1379, ("stsb", "train"): 5749}


def test_missing_second_text_is_one_line_error(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("label\tsentence1\tsentence2\n1\ta cat\ta feline\n0\tno second text\n",
                    encoding="utf-8")
    with pytest.raises(InputError, match=r"Row 3 of .*pairs\.tsv has no second text") as err:
        read_text_examples(str(path), text_column="sentence1", text_pair_column="sentence2",
                           label_column="label")
    assert "\n" not in str(err.value)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "a", "text_pair": " ", "label": 1}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"Row 1 of .*empty\.jsonl has an empty second text"):
        read_text_examples(str(empty), text_column="text", text_pair_column="text_pair",
                           label_column="label")

    proc = run_pipeline(
        "pipelines.text_classify", "--backbone=scratch_text_encoder", f"--train_data={path}",
        f"--model_dir={tmp_path / 'run'}", "--text_column=sentence1",
        "--text_pair_column=sentence2", "--label_column=label", timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: Row 3 of ") and "pairs.tsv has no second text" in last
    assert "Traceback" not in proc.stderr


# === Regression metrics ===


def test_regression_report_matches_scipy():
    rng = np.random.default_rng(3)
    y = np.round(rng.uniform(0, 5, 300), 1)  # Rounded: plenty of ties, as STS-B has.
    scores = np.round(y + rng.normal(0, 1.2, 300), 1)
    report = regression_report(y, scores[:, None])
    assert report["pearson"] == pytest.approx(scipy.stats.pearsonr(y, scores)[0], abs=1e-12)
    assert report["spearman"] == pytest.approx(scipy.stats.spearmanr(y, scores)[0], abs=1e-12)
    assert report["mse"] == pytest.approx(np.mean((scores - y) ** 2))
    assert report["rmse"] == pytest.approx(np.sqrt(report["mse"]))
    assert regression_report(np.array([1.0, 2.0]), np.array([3.0, 3.0]))["pearson"] is None

    metric = PearsonCorrelation()  # Streaming over uneven batches = over the whole set.
    for start, stop in ((0, 7), (7, 150), (150, 300)):
        metric.update_state(y[start:stop], scores[start:stop, None])
    assert float(metric.result()) == pytest.approx(report["pearson"], abs=1e-6)


# === A small real fine-tune on pairs ===


def sample_rows(source: Path, target: Path, count: int, seed: int) -> str:
    """A seeded sample of a TSV's rows, header kept (STS-B's files are ordered by genre)."""
    header, *rows = source.read_text(encoding="utf-8").splitlines(keepends=True)
    picked = np.random.default_rng(seed).choice(len(rows), count, replace=False)
    target.write_text(header + "".join(rows[i] for i in sorted(picked)), encoding="utf-8")
    return str(target)


@pytest.mark.slow
def test_pair_regression_fine_tune_learns_and_exports(tmp_path, minilm_l3_dir):
    stsb = require_shared_path("data/stsb")
    config = ExperimentConfig(
        model_dir=str(tmp_path / "stsb"),
        data=DataConfig(train_data=sample_rows(stsb / "train.tsv", tmp_path / "train.tsv", 640, 0),
                        eval_data=sample_rows(stsb / "dev.tsv", tmp_path / "dev.tsv", 300, 1),
                        text_column="sentence1", text_pair_column="sentence2",
                        label_column="score"),
        model=ModelConfig(backbone=str(minilm_l3_dir), task="regression", pooling="mean",
                          sequence_length=40),
        train=TrainConfig(epochs=3, batch_size=32, learning_rate=2e-4, monitor="val_pearson",
                          backup_every_steps=0),
    ).validate()
    task = TextClassificationTask(config)
    result = run_experiment(config, task)
    evaluation = json.loads((tmp_path / "stsb" / "metrics.json").read_text())["eval"]
    assert evaluation["num_examples"] == 300
    assert {"pearson", "spearman", "mse"} <= set(evaluation)
    # 640 pairs, 60 steps of MiniLM-L3 (measured 0.40 / 0.37): far from the full run, but
    # over 4 standard errors (1/sqrt(300) = 0.058) above no correlation.
    assert evaluation["pearson"] > 0.25 and evaluation["spearman"] > 0.25, evaluation
    # fit's streaming val_pearson is the exact whole-set figure, the one metrics.json has.
    log = (tmp_path / "stsb" / "training_log.csv").read_text().splitlines()
    header, last = log[0].split(","), log[-1].split(",")
    assert float(last[header.index("val_pearson")]) == pytest.approx(evaluation["pearson"], abs=1e-5)
    params = json.loads((tmp_path / "stsb" / "params.json").read_text())
    assert params["data"]["text_pair_column"] == "sentence2"

    raw = export.export_text_classifier(result["model"], task.backbone, task.labels,
                                        tmp_path / "exports", model_dir=config.model_dir,
                                        measure_latency=False)
    loaded = tf.saved_model.load(raw).signatures["serving_default"]
    texts, pairs = ["A man is playing a flute.", "A cat sleeps."], ["A man plays a flute.",
                                                                      "The stock market fell."]
    served = loaded(text=tf.constant(texts), text_pair=tf.constant(pairs))["scores"].numpy()
    expected = result["model"](training_inputs(task.backbone, texts, pairs, 40), training=False)
    np.testing.assert_allclose(served, expected.numpy(), atol=1e-5)
    assert served[0, 0] > served[1, 0]  # A paraphrase scores above an unrelated pair.


def test_predict_feeds_pairs_to_both_exports(pair_setup, tmp_path):
    from pipelines import predict

    backbone, model, raw, token_ids_dir, _ = pair_setup
    # A TSV cannot hold a tab inside a text: the tricky strings without one.
    first = ["A man is playing a guitar.", TRICKY[0], TRICKY[3], LONG_TEXT]
    second = ["", "Someone plays an instrument on a stage tonight.", TRICKY[7], TRICKY[9]]
    source = tmp_path / "pairs.tsv"
    source.write_text("sentence1\tsentence2\n" + "".join(
        f"{a}\t{b}\n" for a, b in zip(first, second, strict=True)), encoding="utf-8")
    expected = model(training_inputs(backbone, first, second), training=False).numpy()[:, 0]
    for saved in (raw, token_ids_dir):
        out = tmp_path / f"{saved.parent.name}.jsonl"
        predict.run(str(saved), str(source), str(out), 3, text_column="sentence1",
                    text_pair_column="sentence2")
        rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        assert [r["text_pair"] for r in rows] == second and [r["line"] for r in rows] == [2, 3, 4, 5]
        np.testing.assert_allclose([r["scores"]["score"] for r in rows], expected, atol=1e-5)
    with pytest.raises(InputError, match="takes text pairs"):
        predict.run(str(raw), str(source), str(tmp_path / "x.jsonl"), 3, text_column="sentence1")
