import json

import numpy as np
import pytest
import tensorflow as tf

from tfhub_finetune.data.labels import LabelVocabulary
from tfhub_finetune.data.sources import read_text_examples, split_examples
from tfhub_finetune.data.text import (
    bucket_widths,
    count_batches,
    make_text_dataset,
    tokenize_texts,
)
from tfhub_finetune.errors import InputError


class WhitespaceTokenizer:
    """A real (tiny) tokenizer: hashes whitespace-split words to ids 3..99."""

    start_id, end_id, pad_id, vocabulary_size = 1, 2, 0, 100

    def tokenize(self, strings):
        words = tf.strings.split(strings)
        return tf.cast(tf.strings.to_hash_bucket_fast(words, 97), tf.int32) + 3


def test_sst2_tsv_without_header_reads_every_row(sst2_dir):
    train = read_text_examples(str(sst2_dir / "train.tsv"))
    assert len(train) == 6920
    assert set(train.labels) == {"0", "1"}
    vocab = LabelVocabulary.from_labels(train.labels, label_names=["negative", "positive"])
    assert vocab.names == ["negative", "positive"] and vocab.label_type == "id"


def test_csv_with_header_and_named_columns(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('id,review,sentiment\n1,"good, really",pos\n\n2,bad,neg\n')
    ex = read_text_examples(str(path), text_column="review", label_column="sentiment")
    assert ex.texts == ["good, really", "bad"]
    assert ex.skipped_blank == 1
    assert LabelVocabulary.from_labels(ex.labels).encode(ex.labels).tolist() == [1, 0]


def test_jsonl_counts_blank_lines_not_the_final_newline(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 0}\n\n{"text": "b", "label": 1}\n')
    ex = read_text_examples(str(path))
    assert ex.texts == ["a", "b"] and ex.skipped_blank == 1
    path.write_text('{"text": "a", "label": 0}\r\n{"text": "b", "label": 1}\r\n')
    assert read_text_examples(str(path)).skipped_blank == 0


@pytest.mark.parametrize("row,problem", [
    ('{"txt": "b", "label": 1}', r"lacks the `text` key \(keys: `txt`, `label`\)"),
    ('{"sentence": "b"}', r"lacks the `text` and `label` keys \(keys: `sentence`\)"),
    ('["b", 1]', "is a JSON array, not an object"),
    ('"b"', "is a JSON string, not an object"),
])
def test_jsonl_row_of_another_layout_is_named_with_what_it_holds(tmp_path, row, problem):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 0}\n' + row + "\n")
    with pytest.raises(InputError, match=r"Row 2 of .*d\.jsonl " + problem) as info:
        read_text_examples(str(path))
    assert "--text_column/--label_column" in str(info.value)


def test_jsonl_and_multilabel(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": "a", "label": ["x", "y"]}, {"text": "b", "label": ["y"]}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    ex = read_text_examples(str(path), text_column="text", label_column="label")
    vocab = LabelVocabulary.from_labels(ex.labels, task="multi_label")
    assert vocab.encode(ex.labels).tolist() == [[1, 1], [0, 1]]


def test_rows_end_at_newlines_only_and_a_lone_cr_stays_in_its_cell(tmp_path):
    # csv's line reader (and str.splitlines) would end a row at the \r: a silent extra row.
    path = tmp_path / "d.tsv"
    path.write_bytes(b"a\rb\t1\r\nc\x0bd\t0\ne\x1cf\t1\n")
    ex = read_text_examples(str(path))
    assert ex.texts == ["a\rb", "c\x0bd", "e\x1cf"] and ex.labels == ["1", "0", "1"]
    assert ex.rows == [1, 2, 3]
    bad = tmp_path / "d.csv"
    bad.write_bytes(b"a,1\nb\rc,0\n")
    with pytest.raises(InputError, match=r"Row 2 of .*d.csv is not valid CSV"):
        read_text_examples(str(bad))
    quoted = tmp_path / "q.csv"
    quoted.write_bytes(b'"b\rc",0\na,1\n')
    assert read_text_examples(str(quoted)).texts == ["b\rc", "a"]


def test_integers_are_ascii_digits(tmp_path):
    from tfhub_finetune.integers import parse_int

    assert [parse_int(v) for v in ("7", " -3 ", "²", "--1", "1.0", "", "٣", 4, True)] == [
        7, -3, None, None, None, None, None, 4, None]
    path = tmp_path / "d.tsv"
    path.write_text("a\t0\nb\t1\nc\t²\n")
    with pytest.raises(InputError, match=r"Row 3 of .*not an integer id"):
        LabelVocabulary.from_labels(read_text_examples(str(path)).labels, source=str(path))


def test_jsonl_empty_list_is_a_multilabel_row_with_no_labels(tmp_path):
    # Most rows of a multi-label set (toxicity, tags) carry none of the labels.
    path = tmp_path / "d.jsonl"
    rows = [{"text": "a", "label": ["x"]}, {"text": "b", "label": []}, {"text": "c", "label": ["y"]}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    ex = read_text_examples(str(path))
    vocab = LabelVocabulary.from_labels(ex.labels, task="multi_label", source=ex.source)
    assert vocab.names == ["x", "y"]
    assert vocab.encode(ex.labels).tolist() == [[1, 0], [0, 0], [0, 1]]
    with pytest.raises(InputError, match=r"Row 1 of .*d.jsonl has a list of labels"):
        LabelVocabulary.from_labels(ex.labels, source=ex.source, rows=ex.rows)


def test_jsonl_list_labels_keep_commas_and_are_multilabel_only(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": "a", "label": ["New York, NY"]}, {"text": "b", "label": ["Paris"]},
            {"text": "c", "label": "x"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    ex = read_text_examples(str(path))
    vocab = LabelVocabulary.from_labels(ex.labels[:2], task="multi_label", source=ex.source)
    assert vocab.names == ["New York, NY", "Paris"]
    with pytest.raises(InputError, match=r"Row 1 of .*d.jsonl has a list of labels; "
                                         r"--task=single_label takes one label"):
        LabelVocabulary.from_labels(ex.labels, source=ex.source, rows=ex.rows)
    path.write_text(json.dumps({"text": "a", "label": [{"name": "x"}]}))
    with pytest.raises(InputError, match="list of something other than label names"):
        read_text_examples(str(path))
    path.write_text(json.dumps({"text": "a", "text_pair": ["b"], "label": 0}))
    with pytest.raises(InputError, match="`text_pair` is not a string"):
        read_text_examples(str(path), text_pair_column="text_pair")


@pytest.mark.parametrize(
    "content, message",
    [
        ("good movie\t1\nno label here\n", "Row 2 .* has 1 column"),
        ("good movie\t1\n \t0\n", "Row 2 .* empty text"),
    ],
)
def test_malformed_rows_name_the_row(tmp_path, content, message):
    path = tmp_path / "bad.tsv"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        read_text_examples(str(path))


def test_non_utf8_file_names_file_and_row(tmp_path):
    path = tmp_path / "latin.tsv"
    path.write_bytes("fine\t1\ncaf\xe9 cr\xe8me\t0\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"Row 2 of .*latin.tsv is not valid utf-8"):
        read_text_examples(str(path))
    assert read_text_examples(str(path), encoding="latin-1").texts[1] == "café crème"


def test_missing_file_and_unseen_label(tmp_path):
    with pytest.raises(InputError, match="Data file not found"):
        read_text_examples(str(tmp_path / "nope.tsv"))
    vocab = LabelVocabulary.from_labels(["pos", "neg"])
    with pytest.raises(InputError, match=r"Row 7 of dev.tsv has a label that training never saw"):
        vocab.encode(["maybe"], source="dev.tsv", rows=[7])
    ids = LabelVocabulary.from_labels(["0", "1"], label_type="id")
    with pytest.raises(InputError, match="not a non-negative integer id"):
        ids.encode(["positive"], source="dev.tsv")


def test_tfds_source_with_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):
        ex = read_text_examples("tfds:glue/sst2", split="train")
    assert len(ex) == 12 and all(isinstance(t, str) and t for t in ex.texts)
    assert set(ex.labels) <= {"negative", "positive"}


def test_validation_split_is_disjoint_and_seeded(sst2_dir):
    ex = read_text_examples(str(sst2_dir / "dev.tsv"))
    a_train, a_val = split_examples(ex, 0.25, seed=3)
    b_train, b_val = split_examples(ex, 0.25, seed=3)
    assert a_val.rows == b_val.rows
    assert not set(a_train.rows) & set(a_val.rows)
    assert len(a_train) + len(a_val) == len(ex)


def test_stratified_hold_out_keeps_every_class_in_training():
    # A class of one row held out whole would be a class training never sees.
    from tfhub_finetune.data.sources import TextExamples

    labels = ["a"] * 30 + ["b"] * 10 + ["c"]
    ex = TextExamples([f"t{i}" for i in range(len(labels))], labels, "f.tsv",
                      list(range(1, len(labels) + 1)))
    for seed in range(20):
        train, val = split_examples(ex, 0.25, seed, strata=labels)
        assert set(train.labels) == {"a", "b", "c"}
        assert sorted(val.labels).count("a") in (7, 8) and val.labels.count("b") in (2, 3)
        assert sorted(train.rows + val.rows) == ex.rows
    two = TextExamples(["x", "y"], ["a", "b"], "f.tsv", [1, 2])
    with pytest.raises(InputError, match="every class has one row"):
        split_examples(two, 0.25, 0, strata=two.labels)


def test_length_grouped_batches_are_full_near_uniform_and_padded_to_their_longest():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=300)
    texts = [" ".join(["w"] * int(n)) for n in lengths]
    data = tokenize_texts(texts, np.arange(300), WhitespaceTokenizer(), 64)
    ds = make_text_dataset(data, WhitespaceTokenizer(), batch_size=16, training=True, seed=1)
    batches = list(ds)
    assert len(batches) == count_batches(300, 16) == int(ds.cardinality()) == 19
    assert [len(y) for _, y in batches].count(16) == 18  # Every batch full but one.
    seen, real, padded = [], 0, 0
    for x, y in batches:
        rows = x["padding_mask"].numpy().sum(axis=1)
        assert x["token_ids"].shape[1] == rows.max()  # Padded to the longest only.
        assert (x["token_ids"].numpy()[:, 0] == 1).all()
        np.testing.assert_array_equal(rows, data.lengths[y.numpy()])  # Mask and ids agree.
        seen.extend(y.numpy().tolist())
        real, padded = real + rows.sum(), padded + rows.size * rows.max()
    assert sorted(seen) == list(range(300))
    # All 300 rows fit in one sorted window: neighbours in length share a batch.
    assert real / padded > 0.95
    shuffled = list(make_text_dataset(data, WhitespaceTokenizer(), batch_size=16, training=True,
                                      seed=1, bucketing=False))
    shuffled_real = sum(x["padding_mask"].numpy().sum() for x, _ in shuffled)
    shuffled_padded = sum(x["padding_mask"].numpy().size for x, _ in shuffled)
    assert shuffled_real / shuffled_padded < 0.75


def test_pad_to_bucket_boundary_pads_to_the_export_widths():
    texts = [" ".join(["w"] * n) for n in (3, 9, 20, 30, 40)]
    data = tokenize_texts(texts, np.zeros(5, np.int32), WhitespaceTokenizer(), 64)
    ds = make_text_dataset(data, WhitespaceTokenizer(), batch_size=1, training=True, seed=0,
                           pad_to_bucket_boundary=True)
    widths = sorted(x["token_ids"].shape[1] for x, _ in ds)
    assert widths == [8, 16, 24, 32, 48] == bucket_widths(64)[:5]


def test_eval_batches_keep_file_order():
    texts = ["a", "b b b b", "c c"]
    data = tokenize_texts(texts, np.array([0, 1, 2]), WhitespaceTokenizer(), 16)
    ds = make_text_dataset(data, WhitespaceTokenizer(), batch_size=2, training=False)
    labels = np.concatenate([y.numpy() for _, y in ds])
    assert labels.tolist() == [0, 1, 2]


def test_epoch_order_is_a_function_of_the_seed():
    texts = [f"w{i}" for i in range(50)]
    data = tokenize_texts(texts, np.arange(50), WhitespaceTokenizer(), 16)

    def order(seed):
        ds = make_text_dataset(data, WhitespaceTokenizer(), batch_size=8, training=True,
                               seed=seed, reshuffle_each_iteration=False)
        return np.concatenate([y.numpy() for _, y in ds]).tolist()

    assert order(5) == order(5)
    assert order(5) != order(6)


def test_bounded_shapes_pad_a_tasks_training_batches_to_the_few_xla_widths(
        tiny_sst2, minilm_l3_dir, tmp_path):
    from tfhub_finetune.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
    from tfhub_finetune.tasks.text_classification import TextClassificationTask

    config = ExperimentConfig(
        model_dir=str(tmp_path / "run"),
        data=DataConfig(train_data=tiny_sst2["train"], eval_data=tiny_sst2["dev"]),
        model=ModelConfig(backbone=str(minilm_l3_dir), sequence_length=64),
        train=TrainConfig(batch_size=16),
    ).validate()
    task = TextClassificationTask(config)
    task.prepare_train()

    def widths():
        return sorted({int(x["token_ids"].shape[1]) for x, _ in task.train_epoch_dataset(0)})

    free = widths()
    assert not task.bounded_shapes and not set(free) <= set(bucket_widths(64))
    task.bounded_shapes = True  # What the driver sets when XLA compiles the step.
    bounded = widths()
    assert set(bounded) <= set(bucket_widths(64)) and len(bounded) < len(free)
