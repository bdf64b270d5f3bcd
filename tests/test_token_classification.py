"""Token classification (NER): readers on real CoNLL-2003, tag schemes, seqeval parity,
windowing, bad input through the pipeline, a real fine-tune and its serving export."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO_ROOT, require_shared_path, run_pipeline
from tfhub_finetune.data.tokens import read_tagged_sentences, tag_names, to_iob2
from tfhub_finetune.entities import entity_report, get_entities
from tfhub_finetune.errors import InputError

TYPES = ["LOC", "MISC", "ORG", "PER"]
BLOCKED = ["keras", "keras_hub", "tf_keras", "tfhub_finetune"]

# A bare TensorFlow process: Keras, keras-hub and our package cannot be imported;
# only the TF Text kernels the tokenizer needs are loaded (as TF Serving links them).
BARE_CHILD = r'''
import glob, importlib.util, json, os, sys
for name in BLOCKED_NAMES:
    sys.modules[name] = None
import tensorflow as tf
package = importlib.util.find_spec("tensorflow_text").submodule_search_locations[0]
for library in sorted(glob.glob(os.path.join(package, "python", "ops", "_*.so"))):
    tf.load_op_library(library)
texts = json.load(open(sys.argv[2], encoding="utf-8"))
serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
rows = []
for start in range(0, len(texts), 64):
    out = {k: v.numpy() for k, v in serve(text=tf.constant(texts[start:start + 64])).items()}
    for i in range(len(texts[start:start + 64])):
        rows.append({
            "tags": [t.decode() for t in out["word_tags"][i, :out["num_words"][i]]],
            "entities": [[out["entity_text"][i, j].decode(), out["entity_type"][i, j].decode(),
                          int(out["entity_start"][i, j]), int(out["entity_end"][i, j]),
                          float(out["entity_score"][i, j])]
                         for j in range(out["num_entities"][i])],
        })
json.dump(rows, open(sys.argv[3], "w", encoding="utf-8"))
'''.replace("BLOCKED_NAMES", repr(BLOCKED))


@pytest.fixture(scope="session")
def conll_dir() -> Path:
    return require_shared_path("data/conll2003")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def head_sentences(source: Path, count: int, target: Path) -> Path:
    """The first `count` sentences of a CoNLL file, as written (DOCSTART lines kept)."""
    out, seen = [], 0
    for line in source.read_text(encoding="utf-8").split("\n"):
        out.append(line)
        if not line.strip() and out[-2:-1] and out[-2].strip() and not out[-2].startswith("-DOCSTART-"):
            seen += 1
            if seen == count:
                break
    return write(target, "\n".join(out) + "\n")


# === Readers ===


@pytest.mark.parametrize("split, sentences, words, docstarts", [
    ("train", 14041, 203621, 946), ("valid", 3250, 51362, 216), ("test", 3453, 46435, 231),
])
def test_reader_counts_equal_the_official_conll2003_ones(conll_dir, split, sentences, words, docstarts):
    data = read_tagged_sentences(conll_dir / f"{split}.txt")
    assert (len(data), data.num_words, data.docstarts) == (sentences, words, docstarts)
    entities = {t: 0 for t in TYPES}
    for tags in data.tags:
        for kind, _, _ in get_entities(tags):
            entities[kind] += 1
    expected = {"train": 23499, "valid": 5942, "test": 5648}[split]
    assert sum(entities.values()) == expected


def test_whitespace_only_lines_separate_sentences_and_docstarts_are_counted(tmp_path):
    path = write(tmp_path / "a.txt", "-DOCSTART- -X- O O\n\nEU NNP B-ORG\nrejects VBZ O\n \t \n"
                 "Peter NNP B-PER\nBlackburn NNP I-PER\n\r\n-DOCSTART- -X- -X- O\n"
                 "BRUSSELS NNP B-LOC\n\n\n")
    data = read_tagged_sentences(path)
    assert data.words == [["EU", "rejects"], ["Peter", "Blackburn"], ["BRUSSELS"]]
    assert data.tags == [["B-ORG", "O"], ["B-PER", "I-PER"], ["B-LOC"]]
    assert data.docstarts == 2
    assert data.lines == [[3, 4], [6, 7], [10]]


def test_fields_split_at_spaces_and_tabs_only_and_a_bom_is_dropped(tmp_path):
    # A token may hold a no-break space (U+00A0) or an ideographic space; str.split() cut them.
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeffPar\u00a0is NNP B-LOC\n東京\u3000都\tNNP\tB-LOC\n".encode())
    data = read_tagged_sentences(path)
    assert data.words == [["Par\u00a0is", "東京\u3000都"]]
    assert data.tags == [["B-LOC", "B-LOC"]]


def test_jsonl_and_tag_column(tmp_path):
    path = write(tmp_path / "a.jsonl", json.dumps({"tokens": ["New", "York"],
                                                   "tags": ["B-LOC", "I-LOC"]}) + "\n\n")
    assert read_tagged_sentences(path).tags == [["B-LOC", "I-LOC"]]
    flat = write(tmp_path / "flat.jsonl", '{"tokens": ["New"], "tags": ["B-LOC"]}\n[["York"]]\n')
    with pytest.raises(InputError, match=r"Line 2 of .*flat\.jsonl is a JSON array, not an object"):
        read_tagged_sentences(flat)
    path = write(tmp_path / "b.txt", "New B-LOC NNP\nYork I-LOC NNP\n")
    assert read_tagged_sentences(path, tag_column=1).tags == [["B-LOC", "I-LOC"]]


def test_iob1_and_bioes_are_converted_to_iob2():
    assert to_iob2(["I-PER", "I-PER", "B-PER", "O", "I-LOC", "I-ORG"], "iob1") == [
        "B-PER", "I-PER", "B-PER", "O", "B-LOC", "B-ORG"]
    assert to_iob2(["S-PER", "B-LOC", "I-LOC", "E-LOC", "O", "S-ORG"], "bioes") == [
        "B-PER", "B-LOC", "I-LOC", "I-LOC", "O", "B-ORG"]
    # Same spans before and after.
    assert get_entities(to_iob2(["I-PER", "B-PER", "I-PER"], "iob1")) == [("PER", 0, 0), ("PER", 1, 2)]


@pytest.mark.parametrize("tags, scheme, line, tag", [
    (["O", "I-PER"], "iob2", 2, "I-PER"),
    (["B-PER", "I-LOC"], "iob2", 2, "I-LOC"),
    (["B-PER", "O"], "bioes", 1, "B-PER"),
    (["E-PER"], "bioes", 1, "E-PER"),
    (["B-PER", "E-LOC"], "bioes", 2, "E-LOC"),
    (["X-PER"], "iob2", 1, "X-PER"),
    (["B-"], "iob1", 1, "B-"),
])
def test_invalid_tag_sequences_name_line_and_tag(tags, scheme, line, tag):
    with pytest.raises(InputError) as err:
        to_iob2(tags, scheme, source="f.txt", lines=[1, 2])
    assert err.value.received == {"file": "f.txt", "line": line, "tag": tag}
    assert f"Line {line} of f.txt" in str(err.value) and "\n" not in str(err.value)


# === Metrics ===


def test_entity_scores_equal_seqeval(conll_dir):
    from seqeval import metrics as seqeval
    gold = read_tagged_sentences(conll_dir / "valid.txt").tags
    names = tag_names(TYPES)
    rng = random.Random(7)
    # Realistic errors (a tag replaced by any other, IOB2-invalid ones included) and pure noise.
    noisy = [[t if rng.random() > 0.1 else rng.choice(names) for t in s] for s in gold]
    noise = [[rng.choice(names) for _ in s] for s in gold]
    for predicted in (noisy, noise, gold):
        ours = entity_report(gold, predicted)
        theirs = seqeval.classification_report(gold, predicted, output_dict=True, zero_division=0)
        assert ours["entity_f1"] == pytest.approx(seqeval.f1_score(gold, predicted), abs=1e-12)
        assert ours["entity_precision"] == pytest.approx(seqeval.precision_score(gold, predicted))
        assert ours["entity_recall"] == pytest.approx(seqeval.recall_score(gold, predicted))
        assert ours["token_accuracy"] == pytest.approx(seqeval.accuracy_score(gold, predicted))
        for kind in TYPES:
            for key in ("precision", "recall", "f1", "support"):
                theirs_key = "f1-score" if key == "f1" else key
                assert ours["per_type"][kind][key] == pytest.approx(theirs[kind][theirs_key]), (kind, key)


def test_token_accuracy_counts_every_labelled_position_once():
    from tfhub_finetune.metrics import TokenAccuracy

    metric = TokenAccuracy()
    eye = np.eye(3, dtype="float32")
    # Batch 1: length 2, 1 of 1 labelled right. Batch 2: length 6, 1 of 3 right.
    metric.update_state(np.array([[0, -1]]), eye[[[0, 1]]])
    metric.update_state(np.array([[1, 2, 2, -1, -1, -1]]), eye[[[1, 0, 0, 0, 0, 0]]])
    assert float(metric.result()) == pytest.approx(2 / 4)


# === Windows ===


def test_windows_reassemble_every_word_once(minilm_l3_dir):
    import tensorflow as tf

    from tfhub_finetune.backbones.loader import load_backbone
    from tfhub_finetune.data.token_windows import unknown_id, window_sentences, word_pieces

    backbone = load_backbone(minilm_l3_dir)
    rng = random.Random(3)
    vocabulary = ["a", "Washington", "supercalifragilistic", "1996-08-22", "\x07", "é", "U.S."]
    sentences = [[rng.choice(vocabulary) for _ in range(rng.randrange(1, 40))] for _ in range(60)]
    tags = [[rng.randrange(9) for _ in s] for s in sentences]
    flat = [w for s in sentences for w in s]
    pieces = word_pieces(backbone.tokenizer, tf.constant(flat), unknown_id(backbone)).to_list()
    for sequence_length, stride in ((12, 1), (12, 5), (12, 0), (16, 14), (128, 0)):
        data = window_sentences(sentences, tags, backbone, sequence_length=sequence_length,
                                stride=stride)
        ids, labels = data.token_ids.to_list(), data.labels.to_list()
        assert max(len(w) for w in ids) <= sequence_length
        # Each word is read at its first piece, in a window of its own sentence.
        sentence_of_word = np.repeat(np.arange(len(sentences)), [len(s) for s in sentences])
        for i, (w, q) in enumerate(zip(data.word_window, data.word_position, strict=True)):
            assert ids[w][q] == pieces[i][0]
            assert data.window_sentence[w] == sentence_of_word[i]
        # Labels: exactly one per word, at its owner position, nothing anywhere else.
        assert sum(x >= 0 for row in labels for x in row) == len(flat)
        assert [labels[w][q] for w, q in zip(data.word_window, data.word_position,
                                              strict=True)] == [t for s in tags for t in s]
        # The windows of a sentence cover all its pieces in order.
        for s in range(len(sentences)):
            own = [ids[w][1:-1] for w in np.nonzero(data.window_sentence == s)[0]]
            joined = [p for i in range(*np.searchsorted(sentence_of_word, [s, s + 1]))
                      for p in pieces[i]]
            covered = set()
            start = 0
            for window in own:
                for offset in range(start, len(joined)):
                    if joined[offset:offset + len(window)] == window:
                        covered |= set(range(offset, offset + len(window)))
                        start = offset
                        break
            assert covered == set(range(len(joined)))
        if sequence_length == 12:
            assert data.windowed_sentences > 0


# === Pipeline: bad input ===


@pytest.mark.parametrize("train, evaluation, expected", [
    ("EU B-ORG\nrejects O\n\nPeter B-PER\n", "Peter O\nBlackburn I-PER\n",
     "Line 2 of {eval}: I-PER cannot follow O under IOB2"),
    ("EU B-ORG\nrejects O\n", "Paris B-LOC\n",
     "Line 1 of {eval} has a tag that training never saw."),
    ("EU NNP B-ORG\nrejects VBZ O\nPeter NNP\n", "EU NNP B-ORG\n",
     "Line 3 of {train} has 2 field(s); the file's first token line (1) has 3."),
])
def test_bad_tagging_data_is_one_line_and_exit_2(tmp_path, minilm_l3_dir, train, evaluation, expected):
    train_file, eval_file = write(tmp_path / "train.txt", train), write(tmp_path / "eval.txt", evaluation)
    proc = run_pipeline(
        "pipelines.token_classify", f"--backbone={minilm_l3_dir}", f"--train_data={train_file}",
        f"--eval_data={eval_file}", f"--model_dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in proc.stderr
    assert expected.format(train=train_file, eval=eval_file) in lines[-1]


def test_bad_token_flags_are_one_line(tmp_path):
    proc = run_pipeline("pipelines.token_classify", "--backbone=minilm_l6_h384",
                        "--train_data=x.txt", f"--model_dir={tmp_path}", "--sequence_length=32",
                        "--window_stride=40")
    assert proc.returncode == 2
    assert "--window_stride must be in [0, sequence_length - 2]" in proc.stderr.strip().splitlines()[-1]


# === Pipeline: a real fine-tune, and its export ===


# Minutes on 2 shared cores: behind -m slow. The fast export check below uses an untrained model.
@pytest.fixture(scope="module")
def trained(tmp_path_factory, conll_dir, minilm_l3_dir):
    root = tmp_path_factory.mktemp("conll_l3")
    evaluation = head_sentences(conll_dir / "valid.txt", 300, root / "valid300.txt")
    args = [
        f"--backbone={minilm_l3_dir}", f"--train_data={conll_dir / 'train.txt'}",
        f"--eval_data={evaluation}", f"--model_dir={root / 'run'}", "--max_train_examples=1500",
        "--epochs=2", "--batch_size=16", "--learning_rate=2e-4", "--sequence_length=64",
        "--verbose=2", f"--export_dir={root / 'exports'}", "--model_name=conll",
    ]
    proc = run_pipeline("pipelines.token_classify", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, evaluation, proc


@pytest.mark.slow
def test_fine_tune_beats_the_all_o_baseline(trained):
    root, evaluation, proc = trained
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    gold = read_tagged_sentences(evaluation).tags
    baseline = entity_report(gold, [["O"] * len(s) for s in gold])
    assert metrics["eval"]["num_examples"] == len(gold) == 300
    assert baseline["entity_f1"] == 0.0
    assert metrics["eval"]["entity_f1"] > 0.5, metrics["eval"]  # Measured 0.73; all-O is 0.
    # The token accuracy beats predicting O for every word.
    assert metrics["eval"]["token_accuracy"] > baseline["token_accuracy"]
    assert metrics["skipped_docstart_lines"]["train"] > 0
    log = (root / "run" / "training_log.csv").read_text().splitlines()
    assert "val_entity_f1" in log[0].split(",")
    best = json.loads((root / "run" / "best.json").read_text())
    assert best["monitor"] == "val_entity_f1"
    assert "entity_f1=" in proc.stdout and " PER " in proc.stdout


@pytest.mark.slow
def test_export_answers_a_bare_tensorflow_process_with_the_eval_entities(trained, tmp_path):
    root, evaluation, _ = trained
    data = read_tagged_sentences(evaluation)
    texts = [" ".join(words) for words in data.words]
    rows = run_bare(root / "exports" / "conll" / "1", texts, tmp_path)
    predicted = [row["tags"] for row in rows]
    served = entity_report(data.tags, predicted)
    metrics = json.loads((root / "run" / "metrics.json").read_text())["eval"]
    # The same model, words and windows: the eval's figures (float noise across batch shapes aside).
    assert served["entity_f1"] == pytest.approx(metrics["entity_f1"], abs=2e-3)
    assert served["token_accuracy"] == pytest.approx(metrics["token_accuracy"], abs=5e-4)
    for text, row in zip(texts, rows, strict=True):
        spans = get_entities(row["tags"])
        assert [e[1] for e in row["entities"]] == [kind for kind, _, _ in spans]
        for entity_text, _, start, end, score in row["entities"]:
            assert text[start:end] == entity_text and 0 < score <= 1
    # The token-id twin, fed by pipelines.predict through text_client, tags every word the same.
    lines = write(tmp_path / "sentences.txt", "\n".join(texts[:100]) + "\n")
    out = tmp_path / "predictions.jsonl"
    proc = run_pipeline("pipelines.predict", f"--saved_model={root / 'exports' / 'conll_token_ids'}",
                        f"--input={lines}", f"--output={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    jsonl = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["tags"] for r in jsonl] == predicted[:100]
    assert [[[e["text"], e["type"], e["start"], e["end"]] for e in r["entities"]] for r in jsonl] == [
        [e[:4] for e in row["entities"]] for row in rows[:100]]


def run_bare(saved_model: Path, texts: list[str], tmp_path: Path) -> list[dict]:
    script, request, answer = tmp_path / "child.py", tmp_path / "texts.json", tmp_path / "rows.json"
    script.write_text(BARE_CHILD)
    request.write_text(json.dumps(texts))
    proc = subprocess.run(
        [sys.executable, str(script), str(saved_model), str(request), str(answer)], cwd=tmp_path,
        capture_output=True, text=True, timeout=600,
        env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(answer.read_text())


def test_export_tags_every_word_as_the_eval_path_does_windows_included(tmp_path, conll_dir,
                                                                        minilm_l3_dir):
    """Untrained model with a scaled random head (varied tags), 16-piece windows: the serving
    graph must split, window and decode exactly as training's eval path."""
    import tensorflow as tf

    from tfhub_finetune import serving_warmup
    from tfhub_finetune.config import DataConfig, ExperimentConfig, ModelConfig
    from tfhub_finetune.tasks.token_classification import TokenClassificationTask
    from tfhub_finetune.token_export import export_token_classifier

    evaluation = head_sentences(conll_dir / "valid.txt", 120, tmp_path / "valid120.txt")
    config = ExperimentConfig(
        model_dir=str(tmp_path / "run"),
        data=DataConfig(train_data=str(evaluation), eval_data=str(evaluation)),
        model=ModelConfig(backbone=str(minilm_l3_dir), task="token_classification",
                          sequence_length=16, window_stride=5),
    ).validate()
    task = TokenClassificationTask(config)
    task.prepare_train()
    assert task.eval_data.windowed_sentences > 20
    model = task.build_model()
    head = model.get_layer("head_logits")
    rng = np.random.default_rng(0)
    head.kernel.assign(rng.normal(0, 0.3, head.kernel.shape).astype("float32"))
    predicted, _ = task.predict_tags(model)
    path = export_token_classifier(model, task.backbone, task.labels, tmp_path / "exports",
                                   model_name="ner", sequence_length=16, stride=5,
                                   measure_latency=False)
    # TF Serving replays each model's warm-up requests at load: both answer every one.
    for folder in (Path(path), tmp_path / "exports" / "ner_token_ids" / "1"):
        serve = tf.saved_model.load(str(folder)).signatures["serving_default"]
        requests = serving_warmup.read_warmup_requests(folder)
        assert len(requests) == 3
        for request in requests:
            answer = serve(**{name: tf.constant(value) for name, value in request.items()})
            assert len(next(iter(answer.values()))) == len(next(iter(request.values())))
    data = read_tagged_sentences(evaluation)
    texts = [" ".join(words) for words in data.words]
    texts[0] = "  " + texts[0].replace(" ", " \t ") + " "  # Other whitespace, same words.
    rows = run_bare(Path(path), texts + ["", "   "], tmp_path)
    assert rows[-2:] == [{"tags": [], "entities": []}] * 2
    served = [row["tags"] for row in rows[:-2]]
    same = sum(a == b for s, t in zip(served, predicted, strict=True) for a, b in zip(s, t, strict=True))
    assert [len(s) for s in served] == [len(s) for s in predicted]
    assert same / data.num_words > 0.999, (same, data.num_words)
    assert len({t for s in served for t in s}) >= 5  # The head really varies.
    found = 0
    for text, row in zip(texts, rows[:-2], strict=True):
        spans = get_entities(row["tags"])
        assert [e[1] for e in row["entities"]] == [kind for kind, _, _ in spans]
        words = text.split()
        for (entity_text, _, start, end, score), (_, a, b) in zip(row["entities"], spans, strict=True):
            assert text[start:end] == entity_text and 0 < score <= 1
            assert entity_text.split() == words[a:b + 1]
            found += 1
    assert found > 50


def test_flag_file_is_offline_minilm_l6(conll_dir):
    flags = (REPO_ROOT / "pipelines" / "configs" / "conll2003.flags").read_text()
    assert "--backbone=minilm_l6_h384" in flags and "../shared/data/conll2003/train.txt" in flags
    epochs = int(next(line for line in flags.splitlines() if line.startswith("--epochs=")).split("=")[1])
    assert epochs <= 3


# ~65 s (two quantized exports and a form measurement); the int8 exporter and the
# form measurement it shares with text stay in the default suite (test_quantized_export).
@pytest.mark.slow
def test_int8_token_form_tags_words_as_float32_does_and_is_measured_by_entity_f1(
        tmp_path, conll_dir, minilm_l3_dir):
    """The Keras int8 NER export (sentences in, entities out, and its token-id twin), measured
    beside float32 on the eval words: entity F1 for both, word agreement, a smaller folder."""
    from tfhub_finetune.config import DataConfig, ExperimentConfig, ModelConfig
    from tfhub_finetune.selection.profile import ProfileOptions
    from tfhub_finetune.selection.serving_forms import export_forms, measure_serving_forms
    from tfhub_finetune.tasks.token_classification import TokenClassificationTask

    evaluation = head_sentences(conll_dir / "valid.txt", 60, tmp_path / "valid60.txt")
    config = ExperimentConfig(
        model_dir=str(tmp_path / "run"),
        data=DataConfig(train_data=str(evaluation), eval_data=str(evaluation)),
        model=ModelConfig(backbone=str(minilm_l3_dir), task="token_classification",
                          sequence_length=32),
    ).validate()
    task = TokenClassificationTask(config)
    task.prepare_train()
    model = task.build_model()
    head = model.get_layer("head_logits")
    head.kernel.assign(np.random.default_rng(0).normal(0, 0.3, head.kernel.shape).astype("float32"))
    paths = export_forms(task, model, ["float32", "int8"], tmp_path / "exports")
    assert Path(paths["int8"]).parent.name == "model_int8"
    card = json.loads((Path(paths["int8"]) / "assets.extra" / "model_card.json").read_text())
    assert card["quantized_from"] == paths["float32"]
    report = measure_serving_forms(task, paths, options=ProfileOptions(
        serving_batch_size=8, warmup_runs=1, min_runs=3, min_seconds=0.1))
    forms = report["forms"]
    expected = task.report(model)
    # The float32 twin is the Keras model; the int8 one tags nearly every word alike.
    assert forms["float32"]["eval"]["entity_f1"] == pytest.approx(expected["entity_f1"], abs=2e-3)
    assert forms["float32"]["vs_reference"]["agreement"] == 1.0
    versus = forms["int8"]["vs_reference"]
    assert versus["metric"] == "entity_f1" and versus["agreement"] >= 0.9, versus
    assert versus["size_ratio"] < 0.6 and "int8" in forms["int8"]["variable_dtypes"]
    # The raw-sentence int8 model answers a bare TensorFlow process with the same words' tags.
    data = read_tagged_sentences(evaluation)
    texts = [" ".join(words) for words in data.words[:20]]
    served = run_bare(Path(paths["int8"]), texts, tmp_path)
    reference = run_bare(Path(paths["float32"]), texts, tmp_path)
    same = sum(a == b for s, r in zip(served, reference, strict=True)
               for a, b in zip(s["tags"], r["tags"], strict=True))
    assert same / sum(len(r["tags"]) for r in reference) >= 0.9
