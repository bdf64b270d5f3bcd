"""What the readers accept: valid CSV is read as CSV, a BOM is not text, and the label space."""

from __future__ import annotations

import logging

import pytest

from pipelines.predict import read_texts
from tfhub_finetune.data.labels import LabelVocabulary
from tfhub_finetune.data.sources import read_text_examples
from tfhub_finetune.errors import InputError


def test_csv_quoted_fields_span_lines_and_cells_exceed_the_csv_module_limit(tmp_path):
    long = "y" * 200_000  # Python's csv module stops at 131072 characters by default.
    path = tmp_path / "t.csv"
    path.write_text(f'text,label\n"first, with a comma\nand a newline",0\n"say ""hi""",1\n{long},0\n',
                    encoding="utf-8")
    examples = read_text_examples(str(path))
    assert examples.texts == ["first, with a comma\nand a newline", 'say "hi"', long]
    assert examples.labels == ["0", "1", "0"]
    assert examples.rows == [2, 4, 5]  # The line each record starts on.
    records = read_texts(path, "text", "auto", "text")
    assert [r["text"] for r in records] == examples.texts
    assert [r["line"] for r in records] == [2, 4, 5]


def test_a_utf8_bom_is_not_part_of_the_first_cell(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_bytes("\ufeffsentence\tlabel\ngood\t1\nbad\t0\n".encode())
    examples = read_text_examples(str(path), text_column="sentence", label_column="label")
    assert examples.texts == ["good", "bad"]  # The header was recognised, BOM and all.
    plain = tmp_path / "p.tsv"
    plain.write_bytes("\ufeffgood\t1\nbad\t0\n".encode())
    assert read_text_examples(str(plain)).texts[0] == "good"
    assert read_texts(plain, "0", "false", "text")[0]["text"] == "good"


def test_predict_counts_the_blank_lines_it_skips(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("a\n\nb\n  \nc\n", encoding="utf-8")
    records = read_texts(path, "0", "false", "text")
    assert [r["text"] for r in records] == ["a", "b", "c"]
    assert records.skipped_blank == 2
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"text": "a"}\n\n{"text": "b"}\n', encoding="utf-8")
    assert read_texts(jsonl, "0", "auto", "text").skipped_blank == 1


def test_label_names_fix_the_classes_and_their_order():
    vocab = LabelVocabulary.from_labels(["pos", "neg", "pos"], label_names=["pos", "neg"])
    assert vocab.names == ["pos", "neg"]
    assert list(vocab.encode(["neg", "pos"])) == [1, 0]
    ids = LabelVocabulary.from_labels(["1", "0"], label_names=["negative", "positive"])
    assert ids.names == ["negative", "positive"] and ids.label_type == "id"
    with pytest.raises(InputError, match="Row 3 of f.tsv has a label outside the known classes"):
        LabelVocabulary.from_labels(["pos", "neg", "neutral"], label_names=["pos", "neg"],
                                    source="f.tsv")


def test_a_single_row_class_is_named_in_a_warning(caplog):
    labels = ["a"] * 30 + ["b"] * 30 + ["c"]
    vocab = LabelVocabulary.from_labels(labels, source="f.tsv")
    with caplog.at_level(logging.WARNING):
        vocab.check_training_counts(vocab.encode(labels), source="f.tsv")
    assert "Class 'c' has a single training example (f.tsv, row 61)" in caplog.text
    # Under 1% of the smallest other class it is an error naming the rows.
    labels = ["a"] * 300 + ["b"] * 300 + ["c", "c"]
    vocab = LabelVocabulary.from_labels(labels, source="f.tsv")
    with pytest.raises(InputError, match="rows='601,602'"):
        vocab.check_training_counts(vocab.encode(labels), source="f.tsv")
