"""The bad-input corpus: every pipeline, every reader, every flag's bounds.

Each `Case` is one thing a user can get wrong, run through a pipeline's real
command-line entry point. The contract (`tests/test_bad_inputs.py`): exit code
2, exactly one line on stderr (`error: ...`) naming the file, row or flag
(`expect`), no traceback, and nothing in `--model_dir`/`--export_dir` added,
changed or half-written.

The inputs are generated here at test time (no committed binaries). A case's
`files` maps a file name under the case's folder to its bytes (or to a callable
that makes it: folders of images, TFRecords). In `args`, `{dir}` is the case's
folder, `{model_dir}` and `{export_dir}` folders the harness fills with a
previous run's files and checks afterwards, `{good_tsv}`/`{good_images}` a
valid training set and `{saved_model}` a folder to predict with.

Speed: the cases of one pipeline run in one process (`python -m
tests.bad_inputs <module> <cases.json> <results.json>`), each through the
module's `cli()`, which is exactly what `python -m <module>` runs, with absl's
flags reset between cases and file descriptors 1 and 2 captured (C++ log lines
included). `subprocess=True` cases additionally run as their own `python -m`
process, so the real start-up (its stderr noise included) is covered too.

A new pipeline adds rows to `CASES` (and, if its flags differ, nothing else):
`pipeline` is the module to run.
"""

from __future__ import annotations

import bz2
import contextlib
import dataclasses
import gzip
import importlib
import json
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

TEXT = "pipelines.text_classify"
IMAGE = "pipelines.image_classify"
PREDICT = "pipelines.predict"
SELECT = "pipelines.select_model"
TOKENS = "pipelines.token_classify"


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input.

    Attributes:
        name: str. Unique; also the case's folder name.
        pipeline: str. Module run as `python -m <pipeline>`.
        args: tuple of str. Flags, with `{dir}`, `{model_dir}`, ... placeholders.
        expect: tuple of str. Substrings the error line must hold (the flag,
            file or row at fault).
        files: dict. File name (under the case folder) -> bytes, or a
            callable `f(path)` that writes it.
        subprocess: bool. Also run as its own `python -m` process.
    """

    name: str
    pipeline: str
    args: tuple[str, ...]
    expect: tuple[str, ...]
    files: dict[str, bytes | Callable[[Path], None]] = dataclasses.field(default_factory=dict)
    subprocess: bool = False


# === Generated inputs ===


def tsv(rows: list[tuple[str, str]], header: str | None = None) -> bytes:
    lines = ([header] if header else []) + [f"{t}\t{y}" for t, y in rows]
    return ("\n".join(lines) + "\n").encode()


def balanced(n: int = 40, labels=("0", "1")) -> list[tuple[str, str]]:
    return [(f"sentence number {i} is {'good' if i % 2 else 'bad'}", labels[i % len(labels)])
            for i in range(n)]


GOOD_TSV = tsv(balanced())
# A CoNLL file (token POS chunk NER): sentences that pass every check, to break one way each.
CONLL = (b"George NNP B-NP B-PER\nWashington NNP I-NP I-PER\nwent VBD B-VP O\n"
         b"to TO B-PP O\nParis NNP B-NP B-LOC\n. . O O\n\n") * 20


def _png(path: Path, color=(200, 30, 30)) -> None:
    import zlib

    width = height = 8
    raw = b"".join(b"\x00" + bytes(color) * width for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return len(data).to_bytes(4, "big") + kind + data + crc.to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + b"\x08\x02\x00\x00\x00"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def image_folders(classes: dict[str, int]) -> Callable[[Path], None]:
    """A folder of class folders with `classes[name]` PNGs each."""

    def make(root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        for k, (name, count) in enumerate(classes.items()):
            (root / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                _png(root / name / f"{i}.png", (40 * k % 255, 100, 200))

    return make


def _garbage_tfrecord(path: Path) -> None:
    path.write_bytes(b"this is not a TFRecord file at all" * 10)


def _big_cell_csv(path: Path) -> None:
    # Valid CSV, one cell over Python's default csv field limit: read it (see test_text_data);
    # here the same file with an unterminated quote must name the row.
    path.write_text("text,label\n" + "\n".join(f"t{i},{i % 2}" for i in range(10))
                    + '\n"' + "x" * 140_000 + ",1\n", encoding="utf-8")


def _many_rows_one_stray(path: Path) -> None:
    rows = [(f"text {i}", "a" if i % 2 else "b") for i in range(400)] + [("odd one", "c")]
    path.write_bytes(tsv(rows))


# === The table ===

T = ("--backbone=scratch_text_encoder", "--model_dir={model_dir}")
TD = (*T, "--train_data={good_tsv}")


def _text_flag(flag: str, value: str, expect: str | None = None, **kw) -> Case:
    return Case(f"text_{flag}_{value}", TEXT, (*TD, f"--{flag}={value}"), (expect or flag,), **kw)


CASES: list[Case] = [
    # --- text_classify: flags and their bounds (before TensorFlow loads) ---
    _text_flag("epochs", "0", subprocess=True),
    _text_flag("epochs", "abc"),
    _text_flag("batch_size", "-1"),
    _text_flag("learning_rate", "0"),
    _text_flag("learning_rate", "nan"),
    _text_flag("learning_rate", "inf"),
    _text_flag("warmup_ratio", "1.5"),
    _text_flag("weight_decay", "-0.1"),
    _text_flag("dropout", "1"),
    _text_flag("validation_split", "0.95"),
    _text_flag("validation_split", "0"),
    _text_flag("max_train_examples", "-1"),
    _text_flag("sequence_length", "4"),
    _text_flag("encoding", "utf-9"),
    _text_flag("text_column", "-1"),
    _text_flag("label_column", "-2"),
    _text_flag("text_column", ""),
    _text_flag("label_names", "a,a", "repeats a"),
    _text_flag("label_names", "only", "single class"),
    _text_flag("label_names", "a,,b", "empty name"),
    _text_flag("precision", "fp16"),
    _text_flag("jit_compile", "maybe"),
    _text_flag("num_gpus", "-2"),
    _text_flag("seed", "-1"),
    _text_flag("clip_norm", "-1"),
    _text_flag("backup_every_steps", "-1"),
    _text_flag("early_stopping_patience", "-1"),
    _text_flag("mode", "bad"),
    _text_flag("pooling", "first"),
    _text_flag("has_header", "maybe"),
    _text_flag("label_type", "int"),
    _text_flag("task", "ner"),
    _text_flag("verbose", "loud"),
    _text_flag("distribution", "bogus"),
    _text_flag("all_reduce", "bogus"),
    _text_flag("bucketing", "maybe"),
    _text_flag("freeze_backbone", "2"),
    _text_flag("adaptation", "foo"),
    _text_flag("adaptation", "top:0"),
    _text_flag("adaptation", "lora:x"),
    # The 2-block scratch encoder: known once it is built, still one line and exit 2.
    Case("text_adaptation_top_too_deep", TEXT, (*TD, "--adaptation=top:99"),
         ("adaptation", "top:99", "1 <= K <= 2")),
    Case("text_freeze_backbone_contradicts_adaptation", TEXT,
         (*TD, "--freeze_backbone", "--adaptation=lora:8"), ("freeze_backbone", "adaptation")),
    Case("text_tfds_fallback_unknown", TEXT,
         (*T, "--train_data={dir}/nope.tsv", "--tfds_fallback=no_such_dataset_h14"),
         ("no_such_dataset_h14",)),
    Case("text_unknown_flag", TEXT, (*TD, "--epoch=3"), ("epoch",)),
    Case("text_missing_flagfile", TEXT, ("--flagfile={dir}/nope.flags",), ("nope.flags",)),
    Case("text_flagfile_bad_value", TEXT, ("--flagfile={dir}/run.flags",), ("batch_size",),
         files={"run.flags": b"--backbone=scratch_text_encoder\n--batch_size=zero\n"}),
    Case("text_no_backbone", TEXT, ("--model_dir={model_dir}", "--train_data={good_tsv}"),
         ("backbone",)),
    Case("text_no_model_dir", TEXT, ("--backbone=scratch_text_encoder", "--train_data={good_tsv}"),
         ("model_dir",)),
    Case("text_no_train_data", TEXT, T, ("train_data",)),
    Case("text_model_dir_is_file", TEXT,
         ("--backbone=scratch_text_encoder", "--train_data={good_tsv}", "--model_dir={dir}/f"),
         ("model_dir", "is a file"), files={"f": b"not a folder"}, subprocess=True),
    Case("text_model_dir_under_file", TEXT,
         ("--backbone=scratch_text_encoder", "--train_data={good_tsv}", "--model_dir={dir}/f/run"),
         ("model_dir", "inside a file"), files={"f": b"not a folder"}),
    Case("text_model_dir_not_writable", TEXT,
         ("--backbone=scratch_text_encoder", "--train_data={good_tsv}", "--model_dir=/sys/h14run"),
         ("model_dir", "not writable")),
    Case("text_model_name_with_slash", TEXT, (*TD, "--export_dir={export_dir}",
                                              "--model_name=a/b"), ("model_name",)),
    Case("text_model_name_a_number", TEXT, (*TD, "--export_dir={export_dir}", "--model_name=3"),
         ("model_name",)),
    Case("text_export_dir_is_file", TEXT, (*TD, "--export_dir={dir}/f"), ("export_dir",),
         files={"f": b"x"}),
    Case("text_export_quantized_typo", TEXT,
         (*TD, "--export_dir={export_dir}", "--export_quantized=int4"),
         ("export_quantized", "int4", "int8"), subprocess=True),
    Case("text_export_quantized_without_export_dir", TEXT, (*TD, "--export_quantized=int8"),
         ("export_quantized", "export_dir")),
    Case("text_serving_jit_compile_without_export_dir", TEXT, (*TD, "--serving_jit_compile"),
         ("serving_jit_compile", "export_dir")),
    Case("text_serving_precision_without_export_dir", TEXT,
         (*TD, "--serving_precision=as_trained"), ("serving_precision", "export_dir")),
    Case("text_serving_precision_typo", TEXT,
         (*TD, "--export_dir={export_dir}", "--serving_precision=bfloat16"),
         ("serving_precision", "bfloat16", "as_trained")),
    # --- text_classify: backbones and monitors (after TensorFlow loads, before data) ---
    Case("text_unknown_backbone", TEXT, ("--backbone=minilm_l7", "--model_dir={model_dir}",
                                         "--train_data={good_tsv}"), ("minilm_l7",)),
    Case("text_image_backbone", TEXT, ("--backbone=scratch_cnn", "--model_dir={model_dir}",
                                       "--train_data={good_tsv}"), ("scratch_cnn",)),
    Case("text_monitor_typo", TEXT, (*TD, "--monitor=val_acc"), ("monitor", "val_accuracy"),
         subprocess=True),
    Case("text_monitor_regression", TEXT, (*TD, "--task=regression", "--monitor=val_accuracy"),
         ("monitor", "val_mae")),
    # --- text readers: TSV ---
    Case("text_missing_file", TEXT, (*T, "--train_data={dir}/nope.tsv"), ("nope.tsv",)),
    Case("text_data_is_folder", TEXT, (*T, "--train_data={dir}"), ("file",)),
    Case("text_empty_file", TEXT, (*T, "--train_data={dir}/t.tsv"), ("t.tsv",), files={"t.tsv": b""}),
    Case("text_blank_lines_only", TEXT, (*T, "--train_data={dir}/t.tsv"), ("t.tsv",),
         files={"t.tsv": b"\n \n\t\n"}),
    Case("text_header_only", TEXT, (*T, "--train_data={dir}/t.tsv"), ("t.tsv", "header"),
         files={"t.tsv": b"sentence\tlabel\n"}),
    Case("text_missing_column", TEXT, (*T, "--train_data={dir}/t.tsv"), ("t.tsv", "Row 3"),
         files={"t.tsv": b"a\t0\nb\t1\nno tab here\n"}),
    Case("text_column_out_of_range", TEXT, (*TD, "--label_column=5"), ("Row 1",)),
    Case("text_empty_text", TEXT, (*T, "--train_data={dir}/t.tsv"), ("Row 2", "empty text"),
         files={"t.tsv": b"a\t0\n \t1\nc\t0\n"}),
    Case("text_empty_label", TEXT, (*T, "--train_data={dir}/t.tsv"), ("Row 2", "empty label"),
         files={"t.tsv": b"a\t0\nb\t\nc\t1\n"}),
    Case("text_invalid_utf8", TEXT, (*T, "--train_data={dir}/t.tsv"), ("t.tsv", "Row 3"),
         files={"t.tsv": b"a\t0\nb\t1\ncaf\xe9\t0\nd\t1\n"}),
    Case("text_utf16_as_utf8", TEXT, (*T, "--train_data={dir}/t.tsv"), ("t.tsv", "utf-8"),
         files={"t.tsv": GOOD_TSV.decode().encode("utf-16")}),
    Case("text_gzip_truncated", TEXT, (*T, "--train_data={dir}/t.tsv.gz"),
         ("t.tsv.gz", "cannot be decompressed"),
         files={"t.tsv.gz": gzip.compress(GOOD_TSV)[:-12]}),
    Case("text_zip_archive", TEXT, (*T, "--train_data={dir}/t.zip"), ("t.zip", "zip archive"),
         files={"t.zip": b"PK\x03\x04" + GOOD_TSV}),
    Case("text_lone_cr_line_ends", TEXT, (*T, "--train_data={dir}/t.tsv"),
         ("t.tsv", "lone carriage return"),
         files={"t.tsv": GOOD_TSV.replace(b"\n", b"\r")}),
    Case("text_column_name_without_header", TEXT, (*TD, "--text_column=sentence"),
         ("text_column", "no header")),
    Case("text_column_name_not_in_header", TEXT,
         (*T, "--train_data={dir}/t.tsv", "--text_column=review"), ("review", "sentence"),
         files={"t.tsv": tsv(balanced(), "sentence\tlabel")}),
    Case("text_header_repeats_column", TEXT,
         (*T, "--train_data={dir}/t.tsv", "--text_column=sentence", "--label_column=label"),
         ("t.tsv", "sentence", "2 times"),
         files={"t.tsv": b"label\tsentence\tsentence\n" + b"".join(
             b"%d\tIGNORED\tword %d\n" % (i % 2, i) for i in range(8))}),
    Case("text_unrecognised_header_of_names", TEXT, (*T, "--train_data={dir}/t.tsv"),
         ("t.tsv", "Row 1", "header", "has_header"),
         files={"t.tsv": tsv(balanced(labels=("neg", "pos")), "tweet\tsentiment")}),
    Case("text_column_double_minus", TEXT, (*TD, "--text_column=--1"), ("text_column", "--1")),
    Case("text_label_superscript_digit", TEXT, (*T, "--train_data={dir}/t.tsv"),
         ("t.tsv", "Row 9", "integer"),
         files={"t.tsv": tsv(balanced()[:8] + [("odd", "\u00b2")])}),
    # --- text labels: the label space ---
    Case("text_stray_id", TEXT, (*T, "--train_data={dir}/t.tsv"), ("t.tsv", "7", "row"),
         files={"t.tsv": tsv(balanced() + [("stray", "7")])}),
    Case("text_stray_name_among_ids", TEXT, (*T, "--train_data={dir}/t.tsv"),
         ("t.tsv", "Row 41", "positive"), files={"t.tsv": tsv(balanced() + [("x", "positive")])}),
    Case("text_unrecognised_header", TEXT, (*T, "--train_data={dir}/t.tsv"),
         ("Row 1", "has_header"), files={"t.tsv": tsv(balanced(), "txt\tlbl")}),
    Case("text_label_id_as_id_type", TEXT, (*T, "--train_data={dir}/t.tsv", "--label_type=id"),
         ("Row 3", "integer"), files={"t.tsv": b"a\t0\nb\t1\nc\tone\n"}),
    Case("text_more_label_names_than_classes", TEXT, (*TD, "--label_names=neg,pos,neutral"),
         ("neutral", "no training example")),
    Case("text_label_outside_names", TEXT,
         (*T, "--train_data={dir}/t.tsv", "--label_names=neg,pos"), ("Row 3", "maybe"),
         files={"t.tsv": b"a\tneg\nb\tpos\nc\tmaybe\n"}),
    Case("text_id_outside_names", TEXT, (*T, "--train_data={dir}/t.tsv", "--label_names=neg,pos"),
         ("Row 41", "label_names"), files={"t.tsv": tsv(balanced() + [("x", "2")])}),
    Case("text_tiny_class", TEXT, (*T, "--train_data={dir}/t.tsv"), ("'c'", "401"),
         files={"t.tsv": _many_rows_one_stray}),
    Case("text_single_class", TEXT, (*T, "--train_data={dir}/t.tsv"), ("single class",),
         files={"t.tsv": tsv([(f"t{i}", "1") for i in range(20)])}),
    Case("text_negative_id", TEXT, (*T, "--train_data={dir}/t.tsv", "--label_type=id"),
         ("Row 2",), files={"t.tsv": b"a\t0\nb\t-1\nc\t1\n"}),
    Case("text_regression_not_number", TEXT,
         (*T, "--train_data={dir}/t.tsv", "--task=regression", "--monitor=val_mae"),
         ("Row 2", "not a number"), files={"t.tsv": b"a\t0.5\nb\thigh\nc\t1.0\n"}),
    # Regression scores (STS-B's 0..5) trained without --task=regression: each value a class.
    Case("text_scores_as_classes", TEXT, (*T, "--train_data={dir}/t.tsv"),
         ("t.tsv", "look like scores", "--task=regression"),
         files={"t.tsv": tsv([(f"pair {i}", f"{i * 5 / 39:.3f}") for i in range(40)])}),
    Case("text_id_too_large", TEXT, (*T, "--train_data={dir}/t.tsv"), ("t.tsv", "Row 2"),
         files={"t.tsv": b"a\t0\nb\t99999999999999999999999\nc\t1\n"}),
    Case("text_regression_nan", TEXT,
         (*T, "--train_data={dir}/t.tsv", "--task=regression", "--monitor=val_mae"),
         ("t.tsv", "Row 2", "finite"), files={"t.tsv": b"a\t0.5\nb\tnan\nc\t1.0\n"}),
    Case("text_regression_jsonl_infinity", TEXT,
         (*T, "--train_data={dir}/t.jsonl", "--task=regression", "--monitor=val_mae"),
         ("t.jsonl", "Row 1", "finite"),
         files={"t.jsonl": b'{"text": "a", "label": Infinity}\n{"text": "b", "label": 1}\n'}),
    Case("text_label_is_text_column", TEXT, (*TD, "--label_column=0"), ("label_column",)),
    Case("text_flagfile_with_bom", TEXT, ("--flagfile={dir}/run.flags", "--model_dir={model_dir}",
                                          "--train_data={good_tsv}"),
         ("flagfile", "run.flags", "byte-order mark"),
         files={"run.flags": b"\xef\xbb\xbf--backbone=scratch_text_encoder\n--epochs=1\n"}),
    Case("text_eval_label_unseen", TEXT,
         (*TD, "--eval_data={dir}/dev.tsv"), ("dev.tsv", "Row 2", "never saw"),
         files={"dev.tsv": b"a\t0\nb\t5\n"}),
    # --- text readers: CSV ---
    Case("text_csv_unbalanced_quote", TEXT, (*T, "--train_data={dir}/t.csv"), ("t.csv", "Row 12"),
         files={"t.csv": _big_cell_csv}),
    Case("text_csv_bad_quote", TEXT, (*T, "--train_data={dir}/t.csv"), ("t.csv", "Row 2"),
         files={"t.csv": b'a,0\n"b"c,1\n'}),
    # --- text readers: JSONL ---
    Case("text_jsonl_bad_json", TEXT, (*T, "--train_data={dir}/t.jsonl"), ("t.jsonl", "Row 2"),
         files={"t.jsonl": b'{"text": "a", "label": 0}\n{"text": "b", label: 1}\n'}),
    Case("text_jsonl_missing_key", TEXT, (*T, "--train_data={dir}/t.jsonl"), ("Row 1", "label"),
         files={"t.jsonl": b'{"text": "a", "y": 0}\n'}),
    Case("text_jsonl_text_not_string", TEXT, (*T, "--train_data={dir}/t.jsonl"),
         ("Row 2", "not a string"),
         files={"t.jsonl": b'{"text": "a", "label": 0}\n{"text": 12, "label": 1}\n'}),
    Case("text_jsonl_null_label", TEXT, (*T, "--train_data={dir}/t.jsonl"), ("Row 2", "label"),
         files={"t.jsonl": b'{"text": "a", "label": 0}\n{"text": "b", "label": null}\n'}),
    Case("text_jsonl_nested_too_deep", TEXT, (*T, "--train_data={dir}/t.jsonl"),
         ("t.jsonl", "Row 2", "nested"),
         files={"t.jsonl": b'{"text": "a", "label": 0}\n{"text": "b", "label": '
                + b"[" * 100_000 + b"]" * 100_000 + b"}\n"}),
    Case("text_jsonl_empty_list_single_label", TEXT, (*T, "--train_data={dir}/t.jsonl"),
         ("t.jsonl", "Row 2", "list of labels"),
         files={"t.jsonl": b'{"text": "a", "label": 0}\n{"text": "b", "label": []}\n'
                           b'{"text": "c", "label": 1}\n'}),
    Case("text_multilabel_every_list_empty", TEXT,
         (*T, "--train_data={dir}/t.jsonl", "--task=multi_label", "--monitor=val_auc"),
         ("t.jsonl", "empty list"),
         files={"t.jsonl": b'{"text": "a", "label": []}\n{"text": "b", "label": []}\n'}),
    Case("text_jsonl_not_object", TEXT, (*T, "--train_data={dir}/t.jsonl"), ("Row 1",),
         files={"t.jsonl": b'["a", 0]\n'}),
    # --- text readers: TFDS (offline: fails in seconds, naming the data set) ---
    Case("text_tfds_unknown", TEXT, (*T, "--train_data=tfds:no_such_dataset_h14"),
         ("no_such_dataset_h14",)),
    # --- TF Hub handles offline: a network problem, said as one ---
    Case("text_tfhub_offline", TEXT,
         ("--backbone=https://tfhub.dev/tensorflow/bert_en_uncased_L-2_H-128_A-2/2",
          "--model_dir={model_dir}", "--train_data={good_tsv}"), ("network is unreachable",)),
    # --- eval mode ---
    Case("text_eval_without_model", TEXT,
         ("--mode=eval", "--model_dir={model_dir}", "--eval_data={good_tsv}", *T[:1]),
         ("model_dir", "labels.json")),
    Case("text_eval_on_an_image_model", TEXT,
         ("--mode=eval", "--backbone=scratch_text_encoder", "--model_dir={dir}/trained",
          "--eval_data={good_tsv}"), ("model_dir", "backbone=scratch_cnn"),
         files={"trained/labels.json": b"{}", "trained/params.json":
                b'{"model": {"task": "single_label", "backbone": "scratch_cnn"}}'}),
    Case("text_eval_pair_model_without_second_text", TEXT,
         ("--mode=eval", "--backbone=scratch_text_encoder", "--model_dir={dir}/trained",
          "--eval_data={good_tsv}"), ("model_dir", "text_pair_column", "sentence2"),
         files={"trained/labels.json": b"{}", "trained/params.json":
                b'{"model": {"task": "single_label", "backbone": "scratch_text_encoder"}, '
                b'"data": {"text_pair_column": "sentence2"}}'}),
    Case("tokens_eval_on_a_text_model", TOKENS,
         ("--mode=eval", "--backbone=scratch_text_encoder", "--model_dir={dir}/trained",
          "--eval_data={dir}/t.txt"), ("model_dir", "task=single_label"),
         files={"t.txt": CONLL, "trained/labels.json": b"{}", "trained/params.json":
                b'{"model": {"task": "single_label", "backbone": "scratch_text_encoder"}}'}),

    # --- image_classify ---
    Case("image_augment_typo", IMAGE, ("--backbone=scratch_cnn", "--model_dir={model_dir}",
                                       "--train_data={good_images}", "--augment=rand"),
         ("augment", "randaugment"), subprocess=True),
    Case("image_export_quantized_typo", IMAGE,
         ("--backbone=scratch_cnn", "--model_dir={model_dir}", "--train_data={good_images}",
          "--export_dir={export_dir}", "--export_quantized=unt8"), ("export_quantized", "int8")),
    Case("image_serving_precision_typo", IMAGE,
         ("--backbone=scratch_cnn", "--model_dir={model_dir}", "--train_data={good_images}",
          "--export_dir={export_dir}", "--serving_precision=float"),
         ("serving_precision", "float32")),
    Case("image_size_negative", IMAGE, ("--backbone=scratch_cnn", "--model_dir={model_dir}",
                                        "--train_data={good_images}", "--image_size=-3"),
         ("image_size",)),
    Case("image_size_too_large", IMAGE, ("--backbone=scratch_cnn", "--model_dir={model_dir}",
                                         "--train_data={good_images}", "--image_size=100000"),
         ("image_size", "2048")),
    Case("image_crop_not_bool", IMAGE, ("--backbone=scratch_cnn", "--model_dir={model_dir}",
                                        "--train_data={good_images}",
                                        "--crop_to_aspect_ratio=maybe"), ("crop_to_aspect_ratio",)),
    Case("image_lora", IMAGE, ("--backbone=scratch_cnn", "--model_dir={model_dir}",
                               "--train_data={good_images}", "--adaptation=lora:8"),
         ("adaptation", "lora:8", "full, head or top:K")),
    Case("image_text_backbone", IMAGE, ("--backbone=scratch_text_encoder",
                                        "--model_dir={model_dir}", "--train_data={good_images}"),
         ("scratch_text_encoder",)),
    *[
        Case(f"image_{name}", IMAGE, ("--backbone=scratch_cnn", "--model_dir={model_dir}",
                                      "--image_size=32", *args), expect, files=files)
        for name, args, expect, files in [
            ("missing_folder", ("--train_data={dir}/nope",), ("nope",), {}),
            ("no_class_folders", ("--train_data={dir}/imgs",), ("imgs",),
             {"imgs/a.png": _png}),
            ("empty_class_folder", ("--train_data={dir}/imgs",), ("empty",),
             {"imgs": image_folders({"ants": 3, "bees": 0})}),
            ("single_class", ("--train_data={dir}/imgs", "--eval_data={dir}/imgs"),
             ("single class",), {"imgs": image_folders({"ants": 4})}),
            ("no_readable_images", ("--train_data={dir}/imgs",), ("imgs",),
             {"imgs/ants/a.png": b"not a png", "imgs/bees/b.png": b"nor this"}),
            ("eval_unknown_class", ("--train_data={good_images}", "--eval_data={dir}/val"),
             ("wasps",), {"val": image_folders({"ants": 1, "wasps": 1})}),
            ("csv_class_all_unreadable", ("--train_data={dir}/list.csv",),
             ("list.csv", "wasps"),
             {"imgs": image_folders({"ants": 3, "bees": 3}),
              "list.csv": b"path,label\n" + b"".join(
                  f"imgs/{c}/{i}.png,{c}\n".encode() for c in ("ants", "bees") for i in range(3))
              + b"imgs/missing0.png,wasps\nimgs/missing1.png,wasps\n"}),
            ("csv_no_rows", ("--train_data={dir}/list.csv",), ("list.csv",),
             {"list.csv": b"path,label\n"}),
            ("csv_missing_column", ("--train_data={dir}/list.csv",), ("list.csv",),
             {"list.csv": b"path,label\na.png\n"}),
            ("tfrecord_garbage", ("--train_data={dir}/data.tfrecord",), ("data.tfrecord",),
             {"data.tfrecord": _garbage_tfrecord}),
            ("tfds_unknown", ("--train_data=tfds:no_such_dataset_h14",),
             ("no_such_dataset_h14",), {}),
            ("monitor_typo", ("--train_data={good_images}", "--monitor=val_accurcy"),
             ("val_accuracy",), {}),
            ("label_names_mismatch", ("--train_data={good_images}", "--label_names=ants,wasps"),
             ("wasps",), {}),
        ]
    ],

    # --- predict ---
    Case("predict_missing_flags", PREDICT, ("--input={good_tsv}",), ("saved_model", "output"),
         subprocess=True),
    *[
        Case(f"predict_{name}", PREDICT, args, expect, files=files)
        for name, args, expect, files in [
            ("batch_size_zero", ("--saved_model={saved_model}", "--input={good_tsv}",
                                 "--output={dir}/p.jsonl", "--batch_size=0"), ("batch_size",), {}),
            ("text_column_negative", ("--saved_model={saved_model}", "--input={good_tsv}",
                                      "--output={dir}/p.jsonl", "--text_column=-1"),
             ("text_column",), {}),
            ("input_missing", ("--saved_model={saved_model}", "--input={dir}/nope.tsv",
                               "--output={dir}/p.jsonl"), ("nope.tsv",), {}),
            ("input_unsupported", ("--saved_model={saved_model}", "--input={dir}/x.parquet",
                                   "--output={dir}/p.jsonl"), ("x.parquet",),
             {"x.parquet": b"PAR1"}),
            ("saved_model_missing", ("--saved_model={dir}/nope", "--input={good_tsv}",
                                     "--output={dir}/p.jsonl"), ("saved_model",), {}),
            ("saved_model_not_one", ("--saved_model={dir}/empty", "--input={good_tsv}",
                                     "--output={dir}/p.jsonl"), ("saved_model",),
             {"empty/README": b"no model here"}),
            ("output_is_input", ("--saved_model={saved_model}", "--input={dir}/t.tsv",
                                 "--output={dir}/t.tsv"), ("output", "input"),
             {"t.tsv": b"a fine film\n"}),
            ("output_is_folder", ("--saved_model={saved_model}", "--input={good_tsv}",
                                  "--output={dir}"), ("output",), {}),
            ("output_under_file", ("--saved_model={saved_model}", "--input={good_tsv}",
                                   "--output={dir}/f/p.jsonl"), ("output",), {"f": b"x"}),
            ("header_only", ("--saved_model={saved_model}", "--input={dir}/t.tsv",
                             "--output={dir}/p.jsonl"), ("t.tsv", "header"),
             {"t.tsv": b"sentence\tlabel\n"}),
            ("empty_input", ("--saved_model={saved_model}", "--input={dir}/t.tsv",
                             "--output={dir}/p.jsonl"), ("t.tsv",), {"t.tsv": b"\n\n"}),
            ("missing_column", ("--saved_model={saved_model}", "--input={dir}/t.tsv",
                                "--output={dir}/p.jsonl", "--text_column=1"), ("Row 2",),
             {"t.tsv": b"a\t0\nb\n"}),
            ("column_name_no_header", ("--saved_model={saved_model}", "--input={good_tsv}",
                                       "--output={dir}/p.jsonl", "--text_column=review"),
             ("text_column",), {}),
            ("csv_unbalanced_quote", ("--saved_model={saved_model}", "--input={dir}/t.csv",
                                      "--output={dir}/p.jsonl"), ("t.csv", "Row 12"),
             {"t.csv": _big_cell_csv}),
            ("jsonl_bad_json", ("--saved_model={saved_model}", "--input={dir}/t.jsonl",
                                "--output={dir}/p.jsonl"), ("Row 2",),
             {"t.jsonl": b'{"text": "a"}\n{text: "b"}\n'}),
            ("jsonl_missing_key", ("--saved_model={saved_model}", "--input={dir}/t.jsonl",
                                   "--output={dir}/p.jsonl", "--text_key=sentence"),
             ("Row 1", "sentence"), {"t.jsonl": b'{"text": "a"}\n'}),
            ("jsonl_text_not_string", ("--saved_model={saved_model}", "--input={dir}/t.jsonl",
                                       "--output={dir}/p.jsonl"), ("Row 1", "not a string"),
             {"t.jsonl": b'{"text": ["a", "b"]}\n'}),
            ("has_header_maybe", ("--saved_model={saved_model}", "--input={good_tsv}",
                                  "--output={dir}/p.jsonl", "--has_header=maybe"),
             ("has_header",), {}),
            ("text_key_empty", ("--saved_model={saved_model}", "--input={dir}/t.jsonl",
                                "--output={dir}/p.jsonl", "--text_key="), ("text_key",),
             {"t.jsonl": b'{"text": "a"}\n'}),
            ("unknown_flag", ("--saved_model={saved_model}", "--input={good_tsv}",
                              "--output={dir}/p.jsonl", "--text_colum=0"), ("text_colum",), {}),
        ]
    ],

    # --- select_model ---
    *[
        Case(f"select_{name}", SELECT, ("--candidates=scratch_text_encoder",
                                        "--train_data={good_tsv}", "--output_dir={model_dir}",
                                        *args), expect, subprocess=name == "min_epochs_zero",
             files={"f": b"a file"})
        for name, args, expect in [
            ("min_epochs_zero", ("--min_epochs=0",), ("min_epochs",)),
            ("max_below_min", ("--min_epochs=3", "--max_epochs=2"), ("max_epochs",)),
            ("reduction_factor_one", ("--reduction_factor=1",), ("reduction_factor",)),
            ("learning_rate_text", ("--learning_rates=fast",), ("learning_rates",)),
            ("learning_rate_negative", ("--learning_rates=-1e-4",), ("learning_rates",)),
            ("batch_size_zero", ("--batch_size=0",), ("batch_size",)),
            ("validation_split", ("--validation_split=1.5",), ("validation_split",)),
            ("max_train_examples", ("--max_train_examples=-5",), ("max_train_examples",)),
            ("profile_batch_size", ("--profile_batch_size=0",), ("profile_batch_size",)),
            ("latency_negative", ("--max_latency_ms=-1",), ("max_latency_ms",)),
            ("metric_unknown", ("--metric=f2",), ("metric", "Did you mean: f1")),
            ("modality_typo", ("--modality=tokn",), ("modality", "Did you mean: tokens")),
            ("modality_pair_without_column", ("--modality=text_pair",),
             ("modality", "text_pair_column")),
            ("modality_image_with_pair_column", ("--modality=image", "--text_pair_column=2"),
             ("modality", "text_pair")),
            ("metric_entity_f1_on_text", ("--metric=entity_f1",), ("metric", "--modality=tokens")),
            ("metric_accuracy_on_tokens", ("--tag_column=-1", "--metric=accuracy"),
             ("metric", "entity_f1")),
            ("tokens_on_regression", ("--modality=tokens", "--task=regression"),
             ("modality", "token classification")),
            ("sequence_length", ("--sequence_length=2",), ("sequence_length",)),
            ("duplicate_candidates", ("--candidates=scratch_text_encoder,scratch_text_encoder",),
             ("candidates",)),
            ("text_column_negative", ("--text_column=-1",), ("text_column",)),
            ("label_names_repeated", ("--label_names=a,a",), ("label_names",)),
            ("output_dir_is_file", ("--output_dir={dir}/f",), ("output_dir", "is a file")),
            ("modality_audio", ("--modality=audio",), ("modality",)),
            ("shortlist_score", ("--shortlist_score=acc",), ("shortlist_score",)),
            ("budget_minutes", ("--budget_minutes=-1",), ("budget_minutes",)),
            ("budget_epochs", ("--budget_epochs=-1",), ("budget_epochs",)),
            ("transfer_examples", ("--transfer_examples=0",), ("transfer_examples",)),
            ("max_memory_mb", ("--max_memory_mb=-1",), ("max_memory_mb",)),
            ("max_params", ("--max_params=0",), ("max_params",)),
            ("min_metric", ("--min_metric=2",), ("min_metric",)),
            ("max_train_minutes", ("--max_train_minutes=0",), ("max_train_minutes",)),
            ("max_train_memory_mb", ("--max_train_memory_mb=-1",), ("max_train_memory_mb",)),
            ("serving_forms_typo", ("--serving_forms=float32,int4",),
             ("serving_forms", "Did you mean: int8")),
            ("serving_forms_without_float32", ("--serving_forms=int8",),
             ("serving_forms", "float32")),
            ("serving_forms_tflite_for_tokens",
             ("--tag_column=-1", "--serving_forms=float32,int8_tflite"),
             ("serving_forms", "text classifier's form")),
            ("profile_min_seconds", ("--profile_min_seconds=-1",), ("profile_min_seconds",)),
            ("image_size", ("--image_size=-1",), ("image_size",)),
            ("augment", ("--augment=strong",), ("augment",)),
            ("pooling", ("--pooling=first",), ("pooling",)),
            ("dropout", ("--dropout=1.5",), ("dropout",)),
            ("warmup_ratio", ("--warmup_ratio=2",), ("warmup_ratio",)),
            ("weight_decay", ("--weight_decay=1.5",), ("weight_decay",)),
            ("baseline_learning_rate", ("--baseline_learning_rate=0",), ("baseline_learning_rate",)),
            ("early_stopping", ("--early_stopping_patience=-1",), ("early_stopping_patience",)),
            ("shortlist_size", ("--shortlist_size=-1",), ("shortlist_size",)),
            ("backup_every_steps", ("--backup_every_steps=-1",), ("backup_every_steps",)),
            ("has_header", ("--has_header=maybe",), ("has_header",)),
            ("cache_dir_not_writable", ("--cache_dir=/sys/h14cache",), ("cache_dir",)),
            ("adaptations_typo", ("--adaptations=full,lorra:8",), ("adaptation", "lora")),
            ("adaptation_given", ("--adaptation=head",), ("adaptation", "--adaptations")),
            ("adaptation_learning_rates", ("--adaptation_learning_rates=head:1e-2",),
             ("adaptation_learning_rates", "ADAPTATION=LR")),
        ]
    ],
    Case("select_no_train_data", SELECT, ("--candidates=scratch_text_encoder",
                                          "--output_dir={model_dir}"), ("train_data",)),
    Case("select_missing_train_file", SELECT,
         ("--candidates=scratch_text_encoder", "--train_data={dir}/nope.tsv",
          "--output_dir={model_dir}"), ("nope.tsv",)),
    Case("select_tflite_form_for_auto_image_inputs", SELECT,
         ("--candidates=scratch_cnn", "--train_data={good_images}",
          "--serving_forms=float32,int8_tflite", "--output_dir={model_dir}"),
         ("serving_forms", "image inputs")),
    Case("select_eval_label_unseen", SELECT,
         ("--candidates=scratch_text_encoder", "--train_data={good_tsv}",
          "--eval_data={dir}/dev.tsv", "--output_dir={model_dir}"), ("dev.tsv", "Row 2", "never saw"),
         files={"dev.tsv": b"a\t0\nb\t5\n"}),
    Case("select_single_class", SELECT,
         ("--candidates=scratch_text_encoder", "--train_data={dir}/t.tsv",
          "--output_dir={model_dir}"), ("t.tsv", "single class"),
         files={"t.tsv": tsv([(f"row {i}", "1.0") for i in range(20)])}),
    # Refused before any work: nothing profiled, trained or reported.
    Case("select_unknown_candidate", SELECT,
         ("--candidates=scratch_text_encoder,minilm_l7", "--train_data={good_tsv}",
          "--output_dir={model_dir}"), ("candidates='minilm_l7'", "Did you mean: minilm_l6_h384")),

    # --- text pairs (text_classify --text_pair_column) ---
    Case("pair_missing_second_text", TEXT,
         (*T, "--train_data={dir}/p.tsv", "--has_header=true", "--text_column=sentence1",
          "--text_pair_column=sentence2", "--label_column=label"), ("p.tsv", "Row 3"),
         files={"p.tsv": ("label\tsentence1\tsentence2\n1\ta\tb\n0\tc\n" * 1).encode()}),
    Case("pair_column_is_text_column", TEXT, (*TD, "--text_pair_column=0"), ("text_pair_column",)),

    # --- token_classify (CoNLL / JSONL readers, tag schemes) ---
    *[
        Case(f"tokens_{name}", TOKENS, (*T, *args), expect, files=files,
             subprocess=name == "invalid_iob2")
        for name, args, expect, files in [
            ("invalid_iob2", ("--train_data={dir}/t.txt",), ("t.txt", "line=2", "I-PER"),
             {"t.txt": CONLL.replace(b"B-PER", b"O", 1)}),
            ("unseen_eval_tag", ("--train_data={dir}/t.txt", "--eval_data={dir}/e.txt"),
             ("e.txt", "line=5", "B-ANIMAL"),
             {"t.txt": CONLL, "e.txt": CONLL.replace(b"B-LOC", b"B-ANIMAL")}),
            ("wrong_column_count", ("--train_data={dir}/t.txt",), ("t.txt", "line=3"),
             {"t.txt": CONLL.replace(b"went VBD B-VP O", b"went VBD O", 1)}),
            ("tag_scheme_unknown", ("--train_data={dir}/t.txt", "--tag_scheme=bilou"),
             ("tag_scheme",), {"t.txt": CONLL}),
            ("window_stride_too_big", ("--train_data={dir}/t.txt", "--sequence_length=16",
                                       "--window_stride=99"), ("window_stride",), {"t.txt": CONLL}),
            ("monitor_typo", ("--train_data={dir}/t.txt", "--monitor=val_f1"),
             ("monitor", "val_entity_f1"), {"t.txt": CONLL}),
            ("missing_file", ("--train_data={dir}/nope.txt",), ("nope.txt",), {}),
            # The text readers' file checks (one `read_text_file`) hold for CoNLL files too.
            ("bzip2_truncated", ("--train_data={dir}/t.txt.bz2",),
             ("t.txt.bz2", "cannot be decompressed"), {"t.txt.bz2": bz2.compress(CONLL)[:-12]}),
            ("jpeg_as_text", ("--train_data={dir}/t.txt",), ("t.txt", "JPEG image"),
             {"t.txt": b"\xff\xd8\xff\xe0" + CONLL}),
            ("lone_cr_line_ends", ("--train_data={dir}/t.txt",), ("t.txt", "carriage return"),
             {"t.txt": CONLL.replace(b"\n", b"\r")}),
            ("latin1_bytes", ("--train_data={dir}/t.txt",), ("t.txt", "Line 3", "not valid utf-8"),
             {"t.txt": CONLL.replace(b"went", b"w\xe9nt", 1)}),
            ("all_tags_o", ("--train_data={dir}/t.txt",), ("t.txt", "every token is tagged O"),
             {"t.txt": b"EU O\nrejects O\n\nPeter O\nwent O\n"}),
            ("jsonl_tags_length", ("--train_data={dir}/t.jsonl",), ("t.jsonl", "line=1"),
             {"t.jsonl": b'{"tokens": ["a", "b"], "tags": ["O"]}\n'}),
            ("export_quantized_typo", ("--train_data={dir}/t.txt", "--export_dir={export_dir}",
                                       "--export_quantized=int4"),
             ("export_quantized", "int4", "int8"), {"t.txt": CONLL}),
            ("export_quantized_without_export_dir", ("--train_data={dir}/t.txt",
                                                     "--export_quantized=int8"),
             ("export_quantized", "export_dir"), {"t.txt": CONLL}),
            ("serving_precision_typo", ("--train_data={dir}/t.txt", "--export_dir={export_dir}",
                                        "--serving_precision=as-trained"),
             ("serving_precision", "as_trained"), {"t.txt": CONLL}),
        ]
    ],
]


# === Running cases in one process ===


@contextlib.contextmanager
def captured_fds():
    """Captures file descriptors 1 and 2 (Python and C++ writes alike) into strings."""
    out = {}
    with tempfile.TemporaryFile() as out_file, tempfile.TemporaryFile() as err_file:
        files = {1: out_file, 2: err_file}
        saved = {fd: os.dup(fd) for fd in files}
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, f in files.items():
            os.dup2(f.fileno(), fd)
        try:
            yield out
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, f in files.items():
                os.dup2(saved[fd], fd)
                os.close(saved[fd])
                f.seek(0)
                out[fd] = f.read().decode("utf-8", errors="replace")


def run_in_process(module_name: str, argvs: list[list[str]]) -> list[dict]:
    """Runs each argv through `<module>.cli()`, resetting absl's flags between runs."""
    from absl import flags

    module = importlib.import_module(module_name)
    results = []
    for argv in argvs:
        flags.FLAGS.unparse_flags()
        sys.argv = [module_name, *argv]
        code = 0
        with captured_fds() as streams:
            try:
                module.cli()
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            except BaseException:  # What the interpreter would print for an uncaught error.
                traceback.print_exc()
                code = 1
        results.append({"argv": argv, "code": code, "stdout": streams[1], "stderr": streams[2]})
    return results


if __name__ == "__main__":
    _module, _cases, _results = sys.argv[1:4]
    _argvs = json.loads(Path(_cases).read_text())
    _out = run_in_process(_module, _argvs)
    # Written after the captures are closed, so nothing a case printed lands in it.
    Path(_results).write_text(json.dumps(_out))
