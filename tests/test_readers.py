"""What the readers accept: valid CSV is read as CSV, a BOM is not text, and the label space."""

from __future__ import annotations

import bz2
import gzip
import json
import logging
import lzma

import pytest

from pipelines.predict import read_texts
from tfhub_finetune.data.labels import LabelVocabulary
from tfhub_finetune.data.sources import data_suffix, read_text_examples
from tfhub_finetune.data.tokens import read_tagged_sentences
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


@pytest.mark.parametrize("name, compress", [
    ("t.tsv.gz", gzip.compress), ("t.csv.bz2", bz2.compress), ("t.jsonl.xz", lzma.compress),
    ("t.tsv", gzip.compress),  # Told by its bytes, not its name.
])
def test_compressed_files_read_as_the_text_they_hold(tmp_path, name, compress):
    """gzip, bzip2 and xz files are read as pandas and HF datasets read them; the format
    (TSV, CSV, JSONL) is the suffix before the compression one. Damaged: one-line error."""
    rows = [("a fine, quiet film", "1"), ('dull "at best"', "0"), ("émouvant", "1")]
    plain = {".tsv": "".join(f"{t}\t{y}\n" for t, y in rows),
             ".csv": "".join('"{}",{}\n'.format(t.replace('"', '""'), y) for t, y in rows),
             ".jsonl": "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows)}
    path = tmp_path / name
    path.write_bytes(compress(plain[data_suffix(path)].encode()))
    examples = read_text_examples(str(path), text_column="text" if name.endswith(".xz") else 0,
                                  label_column="label" if name.endswith(".xz") else 1)
    assert examples.texts == [t for t, _ in rows] and examples.labels == [y for _, y in rows]
    assert [r["text"] for r in read_texts(path, "text" if name.endswith(".xz") else "0",
                                          "false", "text")] == examples.texts
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(InputError, match="cannot be decompressed"):
        read_text_examples(str(path))


def test_a_compressed_conll_file_reads_as_the_plain_one(tmp_path):
    conll = "EU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nPeter NNP B-NP B-PER\nwent VBD B-VP O\n"
    (tmp_path / "t.txt").write_text(conll, encoding="utf-8")
    (tmp_path / "t.txt.gz").write_bytes(gzip.compress(conll.encode()))
    plain, packed = (read_tagged_sentences(tmp_path / name) for name in ("t.txt", "t.txt.gz"))
    assert packed.words == plain.words == [["EU", "rejects"], ["Peter", "went"]]
    assert packed.tags == plain.tags


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
