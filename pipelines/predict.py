"""Batch predictions through an exported SavedModel's serving signature.

    python -m pipelines.predict --saved_model=exports/sst2 \\
        --input=../shared/data/sst2/dev.tsv --output=predictions.jsonl

`--saved_model` is a version folder or a model folder (its highest version
is used, as TF Serving would). What is fed depends on the export, read from
its `assets.extra/model_card.json`:

- raw-string text model: the texts (needs `tensorflow_text` installed);
- token-id text model (`<name>_token_ids`): texts tokenized on the client by
  `tfhub_finetune.text_client`, exactly as training did;
- image model: the encoded bytes of each file.

Token classifiers (NER, `token_export`) write, per input sentence,
`entities` (each `text`, `type`, `start`, `end` character offsets, end
exclusive, and `score`) and `tags` (the IOB2 tag of each whitespace-separated
word); the token-id export is fed words tokenized by `text_client` and
windowed as in training.

Inputs: a `.tsv`/`.txt` (tab-separated, read with quoting off) or `.csv`
file (text in `--text_column`, the second text of a pair model in
`--text_pair_column`; a header row is detected or set with `--has_header`), a
`.jsonl` file (text under `--text_key`), or a folder of images (searched
recursively; `.jpg .jpeg .png .gif .bmp .webp`; hidden files ignored).

Output: one JSON line per input, in input order: `index`, the input (`text`
with its file `line`, or `path`), `label`, `label_id` and `probabilities`
(`{label: p}`); multi-label: `labels` (p >= 0.5) and `probabilities`;
regression: `scores`. Blank lines of text files are skipped (not inputs; the count is
printed).
Bytes that are not UTF-8 are replaced by U+FFFD, as the server does.
An image the server cannot decode gets `{"index", "path", "error"}` instead
(the batch is retried image by image); the count is printed at the end.

Bad flags, a missing or non-SavedModel folder, an unreadable or empty input,
or an input that does not suit the model end with one line on stderr and exit
code 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from absl import flags

from pipelines import flags as pipeline_flags
from tfhub_finetune.calibration import ONEDNN_ENV, describe_cpu_kernels, onednn_enabled
from tfhub_finetune.errors import InputError
from tfhub_finetune.integers import is_index, parse_int

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines this binary's flags (called by `cli` only, so importing has no side effects)."""
    if "saved_model" in FLAGS:  # Defined already (cli run again in one process).
        return
    flags.DEFINE_string("saved_model", None, "Exported SavedModel: a version folder, or a model "
                        "folder (the highest version is used).")
    flags.DEFINE_string("input", None, "A .tsv/.txt/.csv or .jsonl text file, or a folder of "
                        "images.")
    flags.DEFINE_string("output", None, "Where to write the predictions (JSON lines).")
    # Guarded: the training pipelines define --batch_size too.
    if "batch_size" not in FLAGS:
        flags.DEFINE_integer("batch_size", 64, "Inputs per call of the serving signature.")
    flags.DEFINE_string("text_column", "0", "Text column of .tsv/.csv inputs: 0-based index, or "
                        "a name from the header row.")
    flags.DEFINE_enum("has_header", "auto", ["auto", "true", "false"],
                      "Whether .tsv/.csv inputs start with a header row.")
    flags.DEFINE_string("text_key", "text", "Key of the text in .jsonl inputs.")
    flags.DEFINE_string("text_pair_column", "", "Models trained on text pairs: column of the "
                        "second text in .tsv/.csv inputs (index or header name); in .jsonl "
                        "inputs, its key (default `text_pair`).")
    flags.DEFINE_integer("intra_op_threads", -1, "TensorFlow threads per op: -1 picks (at "
                         "--batch_size=1 one thread where that serves this model faster on this "
                         "machine, timed on the first inputs and cached; else TensorFlow's "
                         "default), 0 is TensorFlow's default. TF Serving: "
                         "--tensorflow_intra_op_parallelism.")
    flags.DEFINE_integer("inter_op_threads", -1, "TensorFlow ops run at once; as "
                         "--intra_op_threads. TF Serving: --tensorflow_inter_op_parallelism.")


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
_HEADER_WORDS = {"sentence", "text", "review", "content", "document", "question", "label",
                 "sentence1", "sentence2", "score"}


# === Inputs ===


def read_texts(path: Path, text_column: str, has_header: str, text_key: str,
               text_pair_column: str = "") -> list[dict]:
    """Reads the texts (and second texts of pairs) to predict, each with its 1-based file line.

    Read as training reads them (`data.sources`): CSV quoting (fields may span
    lines), any cell length, no byte-order mark; bytes that are not UTF-8 are
    replaced by U+FFFD, as the server does. Blank lines are skipped, and counted
    in the returned list's `skipped_blank` attribute.

    Raises:
        InputError: for an unreadable or empty file, a row without the
            column, a bad JSON line, or a header column that does not exist.
    """
    from tfhub_finetune.data.sources import (
        column_in_header,
        data_suffix,
        read_csv_rows,
        read_text_file,
    )

    suffix = data_suffix(path)
    if suffix in (".jsonl", ".json"):
        pair_key = None
        if text_pair_column:
            pair_key = "text_pair" if is_index(text_pair_column) else text_pair_column
        lines = read_text_file(path, "utf-8", "input", errors="replace").split("\n")
        numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
        texts = Texts(_json_text(path, number, line, text_key, pair_key)
                      for number, line in numbered)
        texts.skipped_blank = len(lines) - len(numbered) - (lines[-1] == "")
        if not texts:
            raise InputError("Input file has no rows.", received={"input": str(path)})
        return texts
    delimiter = "," if suffix == ".csv" else "\t"
    rows, blank = read_csv_rows(path, delimiter, "utf-8", "input", errors="replace")
    if not rows:
        raise InputError("Input file has no rows.", received={"input": str(path)})
    first = [cell.strip() for cell in rows[0][1]]
    wanted = {"text_column": text_column}
    if text_pair_column:
        wanted["text_pair_column"] = text_pair_column
    named = [c for c in wanted.values() if not is_index(c)]
    header = has_header == "true" or (
        has_header == "auto" and (bool(set(named) & set(first))
                                  or bool({c.lower() for c in first} & _HEADER_WORDS))
    )
    columns = {}
    for flag, value in wanted.items():
        index = parse_int(value)
        if index is not None:
            columns[flag] = index
            continue
        if not header:
            raise InputError(
                "The text column is not in the header row.",
                received={"input": str(path), flag: value},
                fix="Give the column as a 0-based index.",
            )
        columns[flag] = column_in_header(first, value, source=str(path), flag=flag)
    if header and len(rows) == 1:
        raise InputError("Input file has a header row but no texts.",
                         received={"input": str(path), "header": ",".join(first)})
    texts = Texts()
    texts.skipped_blank = blank
    for number, row in rows[1:] if header else rows:
        record = {"line": number}
        for flag, column in columns.items():
            if column >= len(row):
                what = "second text" if flag == "text_pair_column" else "text"
                raise InputError(
                    f"Row {number} of {path} has {len(row)} column(s); the {what} column is "
                    f"{column}.",
                    received={"input": str(path), "row": number},
                    fix=f"Check the delimiter (tab for .tsv, comma for .csv) and --{flag}.",
                )
            record["text_pair" if flag == "text_pair_column" else "text"] = row[column]
        texts.append(record)
    return texts


class Texts(list):
    """The texts to predict, and how many blank lines were skipped."""

    skipped_blank = 0


def _json_text(path: Path, number: int, line: str, key: str, pair_key: str | None = None) -> dict:
    from tfhub_finetune.data.sources import json_object_row

    record = json_object_row(line, path, number, [key], received_as="input",
                             fix="Set --text_key to the key that holds the text.")
    if pair_key is not None and record.get(pair_key) is None:
        raise InputError(f"Row {number} of {path} lacks the second text (`{pair_key}` key).",
                         received={"input": str(path), "row": number},
                         fix="Set --text_pair_column to the key that holds the second text.")
    for name in (key, pair_key):
        if name is not None and not isinstance(record[name], str):
            raise InputError(f"Row {number} of {path}: `{name}` is not a string.",
                             received={"input": str(path), "row": number,
                                       name: type(record[name]).__name__},
                             fix="Give each text as a JSON string.")
    text = {"line": number, "text": record[key]}
    if pair_key is not None:
        text["text_pair"] = record[pair_key]
    return text


def find_images(folder: Path, ignored: list[Path] | None = None) -> list[Path]:
    """Image files under `folder`, recursively, sorted; hidden files and folders skipped.

    `ignored`, when given, receives the other (visible) files: not images by their suffix.
    """
    found = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).parts
        if any(part.startswith(".") for part in relative) or not path.is_file():
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES:
            found.append(path)
        elif ignored is not None:
            ignored.append(path)
    if not found:
        raise InputError(
            "No image files in the input folder.", received={"input": str(folder)},
            fix=f"Expected files ending in {', '.join(IMAGE_SUFFIXES)}.",
        )
    return found


# === Model ===


class ServedExport:
    """An export's version folder and model card, read once and checked without TensorFlow.

    What `Predictor` serves and what the batch-1 thread calibration times;
    the checks that an input suits the model read it before any model loads.

    Example:

    ```python
    export = ServedExport.read("exports/sst2")  # highest version, card read
    export.modality, export.pairs  # ('text', False)
    ```
    """

    def __init__(self, path: Path, card: dict):
        self.path = path
        self.card = card
        self.kind = card.get("input")
        self.task = card.get("task", "single_label")
        self.labels = list(card.get("labels", []))
        self.pairs = "text_pair" in card.get("preprocessing", {}).get("text_inputs", [])

    @classmethod
    def read(cls, saved_model: str | os.PathLike) -> ServedExport:
        """Resolves the version folder and reads its card.

        Raises:
            InputError: if there is no SavedModel, it has no model card, or
                it needs `tensorflow_text` and that is not installed.
        """
        from tfhub_finetune.export import read_model_card, resolve_saved_model

        path = resolve_saved_model(saved_model)
        card = read_model_card(path)
        if card is None:
            raise InputError(
                "The SavedModel has no assets.extra/model_card.json; it was not written by "
                "tfhub_finetune.export.",
                received={"saved_model": str(path)},
                fix="Export with export_text_classifier / export_image_classifier, or pass "
                "--export_dir to the training pipeline.",
            )
        if "tensorflow_text" in card.get("requires", []):
            try:
                import tensorflow_text  # noqa: F401  Registers the tokenizer's ops.
            except ImportError:
                raise InputError(
                    "This export tokenizes in the graph and needs tensorflow_text.",
                    received={"saved_model": str(path)},
                    fix=f"pip install tensorflow-text, or use the "
                    f"{card.get('token_id_model', '<name>_token_ids')} export.",
                ) from None
        return cls(path, card)

    @property
    def modality(self) -> str:
        return "image" if self.kind == "image_bytes" else "text"

    def text_client(self):
        """The client-side tokenizer of a token-id export (`text_client.TextClient`)."""
        from tfhub_finetune.text_client import TextClient

        try:
            return TextClient.from_saved_model(self.path)
        except (OSError, ValueError) as err:
            raise InputError("Cannot tokenize for this token-id export.",
                             received={"saved_model": str(self.path)}, fix=str(err)) from None

    def check_inputs(self, source: Path, text_pair_column: str) -> None:
        """Raises InputError where the job's input does not suit this model."""
        if self.modality == "image" and not source.is_dir():
            raise InputError("This is an image model; the input must be a folder of images.",
                             received={"input": str(source), "saved_model": str(self.path)})
        if self.modality == "text" and source.is_dir():
            raise InputError("This is a text model; the input must be a text file.",
                             received={"input": str(source), "saved_model": str(self.path)})
        if self.modality == "text" and self.pairs != bool(text_pair_column):
            raise InputError(
                "This model takes text pairs; give the second text's column." if self.pairs
                else "This model takes single texts, not pairs.",
                received={"saved_model": str(self.path), "text_pair_column": text_pair_column},
                fix="Set --text_pair_column (e.g. sentence2)." if self.pairs
                else "Leave --text_pair_column empty.",
            )


class Predictor(ServedExport):
    """Calls an export's `serving_default` with the input kind the model card names.

    Example:

    ```python
    predictor = Predictor("exports/sst2")
    rows = predictor.predict(["a fine film"])  # [{'label': 'positive', ...}]
    ```
    """

    def __init__(self, saved_model: str | os.PathLike | ServedExport):
        export = saved_model if isinstance(saved_model, ServedExport) else ServedExport.read(
            saved_model)
        super().__init__(export.path, export.card)
        self.client = self.text_client() if self.kind == "token_ids" else None
        import tensorflow as tf

        self._tf = tf
        try:
            self.signature = tf.saved_model.load(str(self.path)).signatures["serving_default"]
        except (OSError, ValueError, IndexError, KeyError, tf.errors.OpError) as err:
            # A truncated saved_model.pb or variables file, or one missing: loading fails
            # in whichever of these the damaged part meets first.
            detail = " ".join(str(err).split())[:160] or type(err).__name__
            raise InputError("The SavedModel cannot be loaded: a file of it is damaged or missing.",
                             received={"saved_model": str(self.path)},
                             fix=f"Export it again. ({type(err).__name__}: {detail})") from None

    def predict(self, inputs: list, pairs: list | None = None) -> list[dict]:
        """Predicts a batch of texts (str; `pairs`: their second texts) or encoded images (bytes)."""
        tf = self._tf
        if self.task == "token_classification":
            return self._entities(inputs)
        if self.kind == "token_ids":
            encoded = self.client.encode(inputs, pairs)
            outputs = self.signature(**{k: tf.constant(v, tf.int32) for k, v in encoded.items()})
        elif self.kind == "strings":
            texts = {"text": tf.constant(inputs, tf.string)}
            if pairs is not None:
                texts["text_pair"] = tf.constant(pairs, tf.string)
            outputs = self.signature(**texts)
        else:
            outputs = self.signature(image_bytes=tf.constant(inputs, tf.string))
        return self._rows({k: v.numpy() for k, v in outputs.items()}, len(inputs))

    def _entities(self, texts: list[str]) -> list[dict]:
        """NER: `entities` (text, type, start, end, score) and the `tags` of the words."""
        tf = self._tf
        if self.kind == "strings":
            out = {k: v.numpy() for k, v in self.signature(text=tf.constant(texts, tf.string)).items()}
            rows = []
            for i in range(len(texts)):
                entities = [
                    {"text": out["entity_text"][i, j].decode("utf-8"),
                     "type": out["entity_type"][i, j].decode("utf-8"),
                     "start": int(out["entity_start"][i, j]), "end": int(out["entity_end"][i, j]),
                     "score": float(out["entity_score"][i, j])}
                    for j in range(int(out["num_entities"][i]))
                ]
                tags = [t.decode("utf-8") for t in out["word_tags"][i, : int(out["num_words"][i])]]
                rows.append({"entities": entities, "tags": tags})
            return rows
        # Token ids: words and pieces here (text_client), windows as in training.
        from tfhub_finetune.data.token_windows import align_words
        from tfhub_finetune.entities import get_entities

        pre = self.card["preprocessing"]
        words = [text.split() for text in texts]
        pieces = [self.client.tokenize(w) or [pre["unk_id"]] for sentence in words for w in sentence]
        splits = [0]
        for sentence in words:
            splits.append(splits[-1] + len(sentence))
        aligned = align_words(
            tf.ragged.constant(pieces, tf.int32, ragged_rank=1, row_splits_dtype=tf.int64)
            if pieces else tf.RaggedTensor.from_row_lengths(tf.zeros([0], tf.int32),
                                                            tf.zeros([0], tf.int64)),
            tf.constant(splits, tf.int64), sequence_length=pre["sequence_length"],
            stride=pre["window_stride"], start_id=pre["start_id"], end_id=pre["end_id"],
        )
        ids = aligned["token_ids"]
        outputs = self.signature(token_ids=ids.to_tensor(default_value=pre["pad_id"]),
                                 padding_mask=tf.ones_like(ids).to_tensor(),
                                 segment_ids=tf.zeros_like(ids).to_tensor())
        at = tf.stack([aligned["word_window"], aligned["word_position"]], axis=1)
        probabilities = tf.gather_nd(outputs["probabilities"], at).numpy()
        tag_ids, scores = probabilities.argmax(-1), probabilities.max(-1)
        rows = []
        for i, (text, sentence) in enumerate(zip(texts, words, strict=True)):
            tags = [self.labels[t] for t in tag_ids[splits[i]:splits[i + 1]]]
            starts, position = [], 0
            for word in sentence:
                position = text.index(word, position)
                starts.append(position)
                position += len(word)
            word_scores = scores[splits[i]:splits[i + 1]]
            rows.append({"entities": [
                {"text": text[starts[a]:starts[b] + len(sentence[b])], "type": kind,
                 "start": starts[a], "end": starts[b] + len(sentence[b]),
                 "score": float(word_scores[a:b + 1].mean())}
                for kind, a, b in get_entities(tags)
            ], "tags": tags})
        return rows

    def _rows(self, outputs: dict, count: int) -> list[dict]:
        rows = []
        for i in range(count):
            if self.task == "regression":
                rows.append({"scores": _named(self.labels, outputs["scores"][i])})
            elif self.task == "multi_label":
                probabilities = outputs["probabilities"][i]
                rows.append({
                    "labels": [n for n, p in zip(self.labels, probabilities, strict=True) if p >= 0.5],
                    "probabilities": _named(self.labels, probabilities),
                })
            else:
                label_id = int(outputs["label_ids"][i])
                rows.append({
                    "label": self.labels[label_id],
                    "label_id": label_id,
                    "probabilities": _named(self.labels, outputs["probabilities"][i]),
                })
        return rows


def _named(names: list[str], values) -> dict[str, float]:
    return {name: float(v) for name, v in zip(names, values, strict=True)}


# === Main ===


def run(saved_model: str, input_path: str, output: str, batch_size: int, *, text_column: str = "0",
        has_header: str = "auto", text_key: str = "text", text_pair_column: str = "",
        intra_op_threads: int = -1, inter_op_threads: int = -1) -> dict:
    """Predicts every input and writes JSON lines; returns `{count, errors, output, skipped_blank, threads}`.

    Thread pools are sized by `distribute.set_serving_threads` before the
    model loads: at batch size 1, unless given, one intra-op thread (with one
    inter-op thread or the default inter-op pool, whichever is faster) where
    that serves this export faster on this machine (timed on the first inputs
    in child processes, cached per model graph).

    Raises:
        InputError: for bad paths, unreadable inputs, or inputs that do not
            suit the model.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise InputError("Batch size must be at least 1.", received={"batch_size": batch_size})
    for flag, value in (("text_column", text_column), ("text_pair_column", text_pair_column)):
        index = parse_int(value)
        if index is not None and index < 0 or (flag == "text_column" and not value.strip()):
            raise InputError(f"--{flag} must be a 0-based index (>= 0) or a header name.",
                             received={flag: value})
    if not text_key:
        raise InputError("--text_key is empty.", received={"text_key": text_key},
                         fix="Give the JSON key that holds the text.")
    source = Path(input_path).expanduser()
    if not source.exists():
        raise InputError("Input not found.", received={"input": input_path},
                         fix="Give a .tsv/.csv/.jsonl file or a folder of images.")
    from tfhub_finetune.data.sources import data_suffix

    if source.is_file() and data_suffix(source) not in (".tsv", ".txt", ".csv", ".jsonl", ".json"):
        raise InputError("Unsupported input file.", received={"input": input_path},
                         fix="Use .tsv, .txt, .csv or .jsonl (also gzip, bzip2 or xz "
                             "compressed), or a folder of images.")
    if not Path(saved_model).expanduser().exists():
        # Checked before TensorFlow is imported, so this mistake is reported at once.
        raise InputError("SavedModel folder not found.", received={"saved_model": saved_model},
                         fix="Give <export_dir>/<model_name> or one of its version folders.")
    target = Path(output).expanduser()
    if target.exists() and target.resolve() == source.resolve():
        raise InputError("The output is the input file; predictions would overwrite it.",
                         received={"input": input_path, "output": output},
                         fix="Give another --output, e.g. predictions.jsonl.")
    if target.exists() and target.is_dir():
        raise InputError("The output is a folder.", received={"output": output},
                         fix="Give a file path, e.g. predictions.jsonl.")
    from tfhub_finetune.io_utils import check_output_dir

    check_output_dir(target, "output", is_file=True)
    # Read (and check) text inputs before the model loads: a bad row costs a second.
    records = None if source.is_dir() else read_texts(source, text_column, has_header, text_key,
                                                      text_pair_column)
    served = ServedExport.read(saved_model)
    served.check_inputs(source, text_pair_column)
    if source.is_dir():  # An empty folder is refused here, before anything runs.
        ignored: list[Path] = []
        records = [{"path": str(p)} for p in find_images(source, ignored)]
        if ignored:  # E.g. .tiff, which the export does not decode: said, not silently dropped.
            logging.warning("Not predicted: %d file(s) in %s without an image suffix (%s), e.g. "
                            "%s.", len(ignored), source, " ".join(IMAGE_SUFFIXES), ignored[0])
    from tfhub_finetune.distribute import set_serving_threads

    timed = {}
    if batch_size == 1 and -1 in (intra_op_threads, inter_op_threads):
        timed = _timing_requests(served, records)
    threads = set_serving_threads(batch_size, intra_op_threads, inter_op_threads, **timed)
    predictor = Predictor(served)

    from tfhub_finetune.io_utils import atomic_path

    errors = 0
    with atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8") as out, tqdm(
        total=len(records), unit=" inputs", file=sys.stderr, mininterval=1.0,
        desc=f"Predicting ({predictor.path})",
    ) as progress:
        for start in range(0, len(records), batch_size):
            batch = records[start:start + batch_size]
            for offset, row in enumerate(_predict_batch(predictor, batch)):
                errors += "error" in row
                out.write(json.dumps({"index": start + offset, **batch[offset], **row},
                                     ensure_ascii=False) + "\n")
            progress.update(len(batch))
    return {"count": len(records), "errors": errors, "output": str(target),
            "skipped_blank": getattr(records, "skipped_blank", 0),
            "threads": {"intra_op": threads[0], "inter_op": threads[1]}}


def _timing_requests(served: ServedExport, records: list[dict]) -> dict:
    """`set_serving_threads`' `saved_model` and `requests`: the job's first inputs, one each.

    Raw strings and images as the job sends them; token ids as the client
    encodes them (classifiers: NER windows are cut with TensorFlow ops, which
    would start the runtime before its pools are sized, so those time the
    calibration's proxy).
    """
    if not records:
        return {}
    first = records[:8]
    if served.modality == "image":
        return {"saved_model": served.path, "requests": [
            {"image_bytes": [Path(r["path"]).read_bytes()]} for r in first]}
    if served.kind == "strings":
        return {"saved_model": served.path, "requests": [
            {"text": [r["text"]], **({"text_pair": [r["text_pair"]]} if served.pairs else {})}
            for r in first]}
    if served.kind == "token_ids" and served.task != "token_classification":
        client = served.text_client()
        return {"saved_model": served.path, "requests": [
            client.encode([r["text"]], [r["text_pair"]] if served.pairs else None)
            for r in first]}
    return {}


def _predict_batch(predictor: Predictor, batch: list[dict]) -> list[dict]:
    if predictor.modality == "text":
        pairs = [r["text_pair"] for r in batch] if predictor.pairs else None
        return predictor.predict([r["text"] for r in batch], pairs)
    contents = [Path(r["path"]).read_bytes() for r in batch]
    import tensorflow as tf

    try:
        return predictor.predict(contents)
    except tf.errors.InvalidArgumentError:
        # One bad image fails the whole call, as it would on the server; the
        # others still deserve predictions.
        rows = []
        for data in contents:
            try:
                rows.extend(predictor.predict([data]))
            except tf.errors.InvalidArgumentError as err:
                rows.append({"error": _error_line(err)})
        return rows


def _error_line(err: Exception) -> str:
    """The kernel's own message out of a TF runtime error ("Graph execution error: ...")."""
    noise = ("Graph execution error", "Detected at node", "<stack traces", "\t", " ", "[[")
    lines = [line for line in str(getattr(err, "message", err)).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(noise)]
    text = (useful or lines or [type(err).__name__])[-1]
    if text.startswith("assertion failed: ["):
        text = text[len("assertion failed: ["):].rstrip("]")
    return text


def main(argv):
    del argv
    missing = [name for name in ("saved_model", "input", "output") if not getattr(FLAGS, name)]
    if missing:
        raise InputError("Missing required flag(s).", received={"missing": ",".join(missing)},
                         fix="Set --saved_model, --input and --output.")
    result = run(FLAGS.saved_model, FLAGS.input, FLAGS.output, FLAGS.batch_size,
                 text_column=FLAGS.text_column, has_header=FLAGS.has_header,
                 text_key=FLAGS.text_key, text_pair_column=FLAGS.text_pair_column,
                 intra_op_threads=FLAGS.intra_op_threads, inter_op_threads=FLAGS.inter_op_threads)
    note = f", {result['errors']} could not be predicted (see their `error`)" if result["errors"] else ""
    if result["skipped_blank"]:
        note += f"; skipped {result['skipped_blank']} blank line(s)"
    print(f"Wrote {result['count']} predictions to {result['output']}{note}.")
    # What TF Serving's flags should say for the same batch size (0: TensorFlow's default).
    intra, inter = result["threads"]["intra_op"], result["threads"]["inter_op"]
    print(f"TensorFlow threads: intra-op {intra or 'default'}, inter-op {inter or 'default'} "
          f"(TF Serving: --tensorflow_intra_op_parallelism={intra} "
          f"--tensorflow_inter_op_parallelism={inter}).")
    onednn = onednn_enabled()
    if onednn is not None:  # TF Serving reads the same variable when it starts.
        print(f"TensorFlow CPU kernels: {describe_cpu_kernels()} (TF Serving's environment: "
              f"{ONEDNN_ENV}={int(onednn)}).")


def cli() -> None:
    """What `python -m` runs (tests/bad_inputs.py runs it in-process too)."""
    define_flags()
    pipeline_flags.run_main(main)


if __name__ == "__main__":
    cli()
