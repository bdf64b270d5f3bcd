"""Text data sources: CSV, TSV, JSONL files and TFDS names -> texts and labels.

Policy for malformed input (documented in the README):

* Blank lines are skipped and counted; the count is logged and written to
  `metrics.json`. Nothing else is dropped silently.
* CSV is read as CSV: a quoted field may hold commas, quotes and newlines, and
  a cell may be of any length (Python's csv module stops at 128 KiB by
  default). A UTF-8 byte-order mark is not part of the first cell.
* A row with a missing column, an empty text, a label that is not a number
  where ids are expected, or bytes that are not valid UTF-8 (in the chosen
  `encoding`) stops the run with one line naming the file and row.
* A label in eval data that training never saw stops the run the same way.
"""

from __future__ import annotations

import bz2
import collections
import csv
import dataclasses
import functools
import gzip
import io
import json
import logging
import lzma
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tfhub_finetune.errors import InputError, close_names
from tfhub_finetune.integers import is_index, parse_int

if TYPE_CHECKING:
    import numpy as np

TFDS_PREFIX = "tfds:"
_TEXT_KEYS = ("sentence", "text", "review", "content", "document", "question")
_HEADER_WORDS = {"label", "labels", "sentence", "text", "target", "class", "review", "category"}


@dataclasses.dataclass
class TextExamples:
    """Texts and raw labels read from one source.

    Attributes:
        texts: list of str. One per example.
        labels: list of str, or of tuple of str. Raw label cells (mapped to
            ids by `LabelVocabulary`); a JSONL list label is a tuple of names.
        source: str. Where they came from (file path or TFDS name).
        rows: list of int. 1-based row number of each example in the file
            (for error messages).
        skipped_blank: int. Blank lines skipped.
        pairs: list of str or None. Second text of each pair (None for
            single-text data).
    """

    texts: list[str]
    labels: list[str | tuple[str, ...]]
    source: str
    rows: list[int]
    skipped_blank: int = 0
    pairs: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, indices: Sequence[int]) -> TextExamples:
        return TextExamples(
            texts=[self.texts[i] for i in indices],
            labels=[self.labels[i] for i in indices],
            source=self.source,
            rows=[self.rows[i] for i in indices],
            pairs=None if self.pairs is None else [self.pairs[i] for i in indices],
        )


def read_text_examples(
    source: str,
    *,
    text_column: str | int = 0,
    label_column: str | int = 1,
    has_header: str | bool = "auto",
    split: str = "train",
    encoding: str = "utf-8",
    text_pair_column: str | int | None = None,
) -> TextExamples:
    """Reads a labelled text (or text-pair) data set.

    Tab-separated files are read with quoting off: a `"` is a character, not
    a delimiter, so the raw unbalanced quotes of MRPC and STS-B stay in their
    sentences and every line is one row. Control characters are kept.

    Args:
        source: str. A `.csv`, `.tsv`/`.txt` or `.jsonl` file, or
            `tfds:<name>[/<config>]` (the `split` argument picks the split).
        text_column: str or int. Column name (needs a header, or the JSONL
            key) or 0-based index of the text.
        label_column: str or int. Column name or index of the label.
        has_header: "auto", True or False. `auto` treats the first row as a
            header when it contains a column name or a typical header word.
        split: str. TFDS split name.
        encoding: str. File encoding.
        text_pair_column: str, int or None. Column name or index (JSONL key,
            TFDS feature) of the second text of a pair; None for single texts.

    Returns:
        TextExamples.

    Raises:
        InputError: missing or unreadable file, malformed row, undecodable bytes.

    Example:

    ```python
    train = read_text_examples("../shared/data/sst2/train.tsv")
    mrpc = read_text_examples("../shared/data/mrpc/train.tsv", text_column="sentence1",
                              text_pair_column="sentence2", label_column="label")
    ```
    """
    if source.startswith(TFDS_PREFIX):
        return _read_tfds(source[len(TFDS_PREFIX):], text_column, label_column, split,
                          text_pair_column)
    path = Path(source)
    if not path.exists():
        raise InputError(
            "Data file not found.", received={"file": source},
            fix="Check the path, or use tfds:<name> for a TFDS data set.",
        )
    if path.is_dir():
        raise InputError(
            "Text data must be a file, not a directory.", received={"file": source},
            fix="Give a .csv, .tsv or .jsonl file.",
        )
    suffix = data_suffix(path)
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path, text_column, label_column, encoding, text_pair_column)
    delimiter = "," if suffix == ".csv" else "\t"
    return _read_delimited(path, delimiter, text_column, label_column, has_header, encoding,
                           text_pair_column)


def read_text_file(path: Path, encoding: str, flag: str = "file", errors: str = "strict",
                   unit: str = "Row") -> str:
    """The decoded text of `path` (a leading byte-order mark dropped).

    A gzip, bzip2 or xz file (told by its leading bytes, whatever its name)
    is decompressed first, as pandas and Hugging Face datasets read
    `train.tsv.gz`; `data_suffix` names its format without the compression
    suffix. `errors="replace"` puts U+FFFD for undecodable bytes (what a
    server does) instead of raising. `unit` names a line in errors (`Line`
    for CoNLL files, whose rows are words).

    Raises:
        InputError: unreadable file, a damaged compressed file, a binary one
            (an archive or an image, named by its kind), unknown encoding,
            bytes not valid in `encoding` (naming the row and byte), or lines
            ended by a lone `\r`.
    """
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise InputError(
            "Data file is unreadable.", received={flag: str(path)},
            fix=f"({err.strerror or err})",
        ) from None
    kind = _binary_kind(raw)
    if kind in _DECOMPRESS:
        try:
            raw = _DECOMPRESS[kind](raw)
        except (OSError, EOFError, ValueError, lzma.LZMAError) as err:
            raise InputError(
                f"{path} is {kind} but cannot be decompressed ({err}).",
                received={flag: str(path)}, fix="The file is damaged or truncated: copy it again.",
            ) from None
        kind = _binary_kind(raw)
    if kind:
        raise InputError(
            f"{path} is {kind}, not a text file.", received={flag: str(path)},
            fix=_BINARY_FIX.get(kind, "Give the data as a text file (TSV, CSV, JSONL or CoNLL columns)."),
        )
    try:
        text = raw.decode(encoding, errors=errors)
    except LookupError:
        raise InputError("Unknown text encoding.", received={"encoding": encoding},
                         fix="E.g. utf-8, latin-1, cp1252, utf-16.") from None
    except UnicodeDecodeError as err:
        number = raw.count(b"\n", 0, err.start) + 1
        line_start = raw.rfind(b"\n", 0, err.start) + 1
        raise InputError(
            f"{unit} {number} of {path} is not valid {encoding} (byte {err.start - line_start}: "
            f"{raw[err.start:err.start + 1]!r}).",
            received={flag: str(path), unit.lower(): number},
            fix="Re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`) "
            "or pass --encoding.",
        ) from None
    if "\r" in text and "\n" not in text:
        # Classic Mac OS line ends. Read at `\n` only (a lone `\r` may sit in a text
        # cell), the whole file would be one row, refused later for the wrong reason.
        raise InputError(
            f"{path} ends its lines with a lone carriage return (\\r), not a newline (\\n).",
            received={flag: str(path)},
            fix="Convert its line ends to \\n, e.g. `tr '\\r' '\\n' < in.tsv > out.tsv`.",
        )
    return text[1:] if text.startswith("\ufeff") else text


def data_suffix(path: str | os.PathLike) -> str:
    """A data file's format suffix, lower case, a compression suffix skipped: `.tsv` of `t.TSV.gz`.

    The one place readers tell TSV from CSV from JSONL by name
    (`read_text_file` decompresses what the skipped suffix names).

    Example:

    ```python
    data_suffix("data/train.csv.gz")  # '.csv'
    ```
    """
    path = Path(path)
    if path.suffix.lower() in COMPRESSION_SUFFIXES:
        path = path.with_suffix("")
    return path.suffix.lower()


# Compressed text `read_text_file` reads (by leading bytes; these are the usual names).
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz")
# Leading bytes of files that are not text, for a message better than "not valid utf-8".
# None of these can start a UTF-8 text file (each holds a byte UTF-8 does not start with,
# or a control character no data file begins with).
_BINARY_MAGIC = (
    (b"\x1f\x8b", "gzip-compressed"), (b"BZh", "bzip2-compressed"),
    (b"\xfd7zXZ\x00", "xz-compressed"), (b"PK\x03\x04", "a zip archive"),
    (b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"SQLite format 3\x00", "an SQLite database"),
)
_DECOMPRESS = {"gzip-compressed": gzip.decompress, "bzip2-compressed": bz2.decompress,
               "xz-compressed": lzma.decompress}
_BINARY_FIX = {"a zip archive": "Extract the data file from it (`unzip <file>`)."}


def _binary_kind(raw: bytes) -> str | None:
    for magic, kind in _BINARY_MAGIC:
        # bzip2's "BZh" is followed by a block-size digit and the block magic: text may
        # start with "BZh", it does not continue "1AY&SY".
        if raw.startswith(magic) and (magic != b"BZh" or raw[4:10] == b"1AY&SY"):
            return kind
    return None


def json_row(line: str, source: str | os.PathLike, number: int, unit: str = "Row") -> object:
    """One line of a `.jsonl` file, parsed; InputError naming the file and row if it cannot be.

    Raises:
        InputError: for invalid JSON, or JSON nested too deeply for Python's
            parser (a `RecursionError` otherwise).
    """
    try:
        return json.loads(line)
    except ValueError as err:
        problem = getattr(err, "msg", str(err))
    except RecursionError:
        problem = "nested too deeply to parse"
    raise InputError(f"{unit} {number} of {source} is not valid JSON ({problem}).",
                     received={"file": str(source), unit.lower(): number})


_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def json_object_row(line: str, source: str | os.PathLike, number: int, keys: Sequence[str], *,
                    fix: str, unit: str = "Row", received_as: str = "file") -> dict:
    """One `.jsonl` line that must be an object holding `keys`; else one InputError naming it.

    The error says which keys are missing and which the row has, or that the
    row is not an object at all (`[1, 2]`, `"text"`), so a file of another
    layout is recognisable from the message.

    Example:

    ```python
    json_object_row('{"text": "a fine film"}', "in.jsonl", 1, ["text"], fix="Set --text_key.")
    ```
    """
    record = json_row(line, source, number, unit)
    if not isinstance(record, dict):
        problem = f"is a JSON {_JSON_TYPES.get(type(record), type(record).__name__)}, not an object"
    else:
        missing = [key for key in keys if key not in record]
        if not missing:
            return record
        names = " and ".join(f"`{key}`" for key in missing)
        found = ", ".join(f"`{key}`" for key in record) or "none"
        problem = f"lacks the {names} key{'s' if len(missing) > 1 else ''} (keys: {found})"
    raise InputError(f"{unit} {number} of {source} {problem}.",
                     received={received_as: str(source), unit.lower(): number}, fix=fix)


def file_lines(text: str):
    """`(line number, line)` of a decoded file: split at `\n` only, a `\r` before it dropped.

    Lines as the file has them: `str.splitlines` (and the csv module's line
    reader) would also split at a lone `\r`, `\x0b`, `\x1c`, U+2028..., which
    a text cell may hold.
    """
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # The newline that ends the last line, not a blank line after it.
    for number, line in enumerate(lines, start=1):
        yield number, line.removesuffix("\r")


def _decoded_lines(path: Path, encoding: str):
    return file_lines(read_text_file(path, encoding))


def read_csv_rows(
    path: Path, delimiter: str, encoding: str, flag: str = "file", errors: str = "strict"
) -> tuple[list[tuple[int, list[str]]], int]:
    """Rows of a delimited file as `(first line number, cells)`, and the blank-line count.

    `.csv` files are parsed as CSV (quoted fields may span lines); tab-separated
    files split into lines at `\n` and into cells at tabs only (a quote is an
    ordinary character, as in SST-2's sentences; so is a lone `\r`).

    Raises:
        InputError: undecodable bytes, or malformed CSV, naming the row.
    """
    text = read_text_file(path, encoding, flag, errors)
    if delimiter != ",":
        rows, blank = [], 0
        for number, line in file_lines(text):
            cells = line.split(delimiter)
            if any(cell.strip() for cell in cells):
                rows.append((number, cells))
            else:
                blank += 1
        return rows, blank
    # newline="\n": records end at \n (or \r\n) only; a lone \r outside quotes is then
    # malformed CSV, named by its row, instead of a silent row break.
    reader = csv.reader(io.StringIO(text, newline="\n"), delimiter=delimiter,
                        quoting=csv.QUOTE_MINIMAL, strict=True)
    rows, blank, start = [], 0, 1
    try:
        for cells in reader:
            if not any(cell.strip() for cell in cells):
                blank += 1
            else:
                rows.append((start, cells))
            start = reader.line_num + 1
    except csv.Error as err:
        raise InputError(
            f"Row {start} of {path} is not valid CSV ({err}).",
            received={flag: str(path), "row": start},
            fix="Quote fields that hold commas, quotes or newlines, doubling inner quotes (\"\").",
        ) from None
    return rows, blank


# A text cell may be longer than the csv module's default limit (131072 characters);
# tokenization truncates it, as any other long text.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def _column_index(column: str | int, header: list[str] | None, path: Path, what: str) -> int:
    index = parse_int(column)
    if index is not None:
        if index < 0:
            raise InputError(
                f"The {what} column index must be >= 0.",
                received={f"{what}_column": column}, fix="Columns count from 0.",
            )
        return index
    if header is None:
        raise InputError(
            f"The {what} column is given by name but the file has no header.",
            received={"file": str(path), f"{what}_column": column},
            fix="Give the column as a 0-based index, or add a header row.",
        )
    return column_in_header(header, column, source=str(path), flag=f"{what}_column")


def column_in_header(header: Sequence[str], name: str, *, source: str, flag: str) -> int:
    """The index of column `name` in a header row, for `--<flag>`.

    Raises:
        InputError: the name is not in the header (the header is listed), or
            the header holds it more than once (which one is meant is not
            knowable: it names both positions).
    """
    if name not in header:
        raise InputError(
            f"The --{flag} column is not in the header row of {source}.",
            received={"file": source, flag: name},
            fix=f"Header columns: {', '.join(header)}.",
        )
    positions = [i for i, cell in enumerate(header) if cell == name]
    if len(positions) > 1:
        raise InputError(
            f"The header row of {source} names column `{name}` {len(positions)} times.",
            received={"file": source, flag: name},
            fix=f"Rename the repeated columns (0-based positions {', '.join(map(str, positions))}), "
            f"or give --{flag} as an index.",
        )
    return positions[0]


def first_label_is_a_header_word(labels: Sequence[str]) -> bool:
    """Whether `labels[0]` occurs in no other row while every other label repeats.

    A header of words no reader knows (`tweet  sentiment`, `img,class`) reads as
    an example whose label (`sentiment`) is a class of one, learnt from the
    header. A file of one-row classes says nothing either way, so it is False there.
    """
    counts = collections.Counter(labels)
    return (len(labels) >= 3 and counts[labels[0]] == 1
            and min(counts[label] for label in labels[1:]) >= 2)


def _refuse_unrecognised_header(path, numbers, labels) -> None:
    # Integer labels are checked by type (a name among ids), numbers may all differ (regression).
    first = labels[0]
    if not first_label_is_a_header_word(labels):
        return
    try:
        float(first)
        return
    except ValueError:
        pass
    raise InputError(
        f"Row {numbers[0]} of {path} looks like a header: its label `{first}` occurs in no "
        "other row.",
        received={"file": str(path), "row": numbers[0], "has_header": "auto"},
        fix="Set --has_header=true if it is a header, or --has_header=false if it is an example.",
    )


def _read_delimited(path, delimiter, text_column, label_column, has_header, encoding,
                    text_pair_column=None):
    numbered, blank = read_csv_rows(path, delimiter, encoding)
    if not numbered:
        raise InputError("Data file has no rows.", received={"file": str(path)})
    numbers = [n for n, _ in numbered]
    rows = [cells for _, cells in numbered]
    header = None
    first = [cell.strip() for cell in rows[0]]
    named = {c for c in (text_column, label_column, text_pair_column)
             if isinstance(c, str) and not is_index(c)}
    if has_header is True or (
        has_header == "auto"
        and (named & set(first) or {c.lower() for c in first} & _HEADER_WORDS)
    ):
        header = first
        rows, numbers = rows[1:], numbers[1:]
        if not rows:
            raise InputError("Data file has a header row but no examples.",
                             received={"file": str(path), "header": ",".join(first)})
    t_idx = _column_index(text_column, header, path, "text")
    l_idx = _column_index(label_column, header, path, "label")
    p_idx = None if text_pair_column is None else _column_index(
        text_pair_column, header, path, "text_pair")
    texts, labels, pairs = [], [], None if p_idx is None else []
    for number, row in zip(numbers, rows, strict=True):
        if p_idx is not None and p_idx >= len(row) and max(t_idx, l_idx) < len(row):
            raise InputError(
                f"Row {number} of {path} has no second text (column {p_idx}).",
                received={"file": str(path), "row": number, "text_pair_column": text_pair_column},
                fix="Each row of a pair data set needs both texts; remove the row or fill it in.",
            )
        if max(t_idx, l_idx) >= len(row):
            raise InputError(
                f"Row {number} of {path} has {len(row)} column(s); expected at least "
                f"{max(t_idx, l_idx) + 1}.",
                received={"file": str(path), "row": number},
                fix="Check the delimiter (tab for .tsv, comma for .csv) and the column flags.",
            )
        text, label = row[t_idx].strip(), row[l_idx].strip()
        _check_cells(path, number, text, label)
        if p_idx is not None:
            pairs.append(_pair_cell(path, number, row[p_idx].strip()))
        texts.append(text)
        labels.append(label)
    if header is None and has_header == "auto":
        _refuse_unrecognised_header(path, numbers, labels)
    if blank:
        logging.warning("%s: skipped %d blank line(s).", path, blank)
    return TextExamples(texts, labels, str(path), numbers, skipped_blank=blank, pairs=pairs)


def _pair_cell(path, number, text):
    if not text:
        raise InputError(
            f"Row {number} of {path} has an empty second text.",
            received={"file": str(path), "row": number},
            fix="Each row of a pair data set needs both texts; remove the row or fill it in.",
        )
    return text


def _check_cells(path, number, text, label: str | None):
    # `label` None: a JSONL list label, whose emptiness (`[]`) is a multi-label row's right.
    if not text:
        raise InputError(
            f"Row {number} of {path} has an empty text.",
            received={"file": str(path), "row": number},
            fix="Remove the row or fill in its text.",
        )
    if label == "":
        raise InputError(
            f"Row {number} of {path} has an empty label.",
            received={"file": str(path), "row": number},
            fix="Remove the row or fill in its label.",
        )


def _read_jsonl(path, text_column, label_column, encoding, text_pair_column=None):
    text_key = text_column if isinstance(text_column, str) and not is_index(text_column) else "text"
    label_key = (
        label_column if isinstance(label_column, str) and not is_index(label_column) else "label"
    )
    pair_key = None if text_pair_column is None else (
        text_pair_column if isinstance(text_pair_column, str) and not is_index(text_pair_column)
        else "text_pair")
    texts, labels, numbers, blank = [], [], [], 0
    pairs = None if pair_key is None else []
    for number, line in _decoded_lines(path, encoding):
        if not line.strip():
            blank += 1
            continue
        record = json_object_row(line, path, number, [text_key, label_key],
                                 fix="Set --text_column/--label_column to its keys.")
        if pair_key is not None and record.get(pair_key) is None:
            raise InputError(
                f"Row {number} of {path} has no second text (key `{pair_key}`).",
                received={"file": str(path), "row": number, "text_pair_column": pair_key},
                fix="Each row of a pair data set needs both texts; remove the row or fill it in.",
            )
        for key in (text_key,) if pair_key is None else (text_key, pair_key):
            if not isinstance(record[key], str):
                raise InputError(
                    f"Row {number} of {path}: `{key}` is not a string.",
                    received={"file": str(path), "row": number, key: type(record[key]).__name__},
                    fix="Give each text as a JSON string.",
                )
        if pair_key is not None:
            pairs.append(_pair_cell(path, number, record[pair_key].strip()))
        text = record[text_key].strip()
        label = record[label_key]
        if isinstance(label, dict) or label is None:
            raise InputError(
                f"Row {number} of {path}: `{label_key}` is not a label.",
                received={"file": str(path), "row": number, label_key: label},
                fix="Give a class name, an integer id, a number (regression) or a list "
                "(multi-label).",
            )
        # A JSON list is a multi-label row, kept as a tuple (a name may hold a comma: "New
        # York, NY"); `[]` says "none of the labels" (most rows of a toxicity set).
        # `LabelVocabulary` refuses a list for the other tasks, naming the row.
        if isinstance(label, list):
            if not all(isinstance(part, (str, int)) and not isinstance(part, bool)
                       for part in label):
                raise InputError(
                    f"Row {number} of {path}: `{label_key}` is a list of something other "
                    "than label names.",
                    received={"file": str(path), "row": number, label_key: label},
                    fix='Give a multi-label row as a list of names, e.g. ["sports", "news"].',
                )
            label = tuple(str(part).strip() for part in label if str(part).strip())
            _check_cells(path, number, text, None)
        else:
            label = str(label).strip()
            _check_cells(path, number, text, label)
        texts.append(text)
        labels.append(label)
        numbers.append(number)
    if not texts:
        raise InputError("Data file has no rows.", received={"file": str(path)})
    if blank:
        logging.warning("%s: skipped %d blank line(s).", path, blank)
    return TextExamples(texts, labels, str(path), numbers, skipped_blank=blank, pairs=pairs)


def load_tfds(name: str, split: str, *, source: str, **load_kwargs):
    """`tfds.load(name, split=..., with_info=True)` that fails in seconds when it cannot work.

    An unknown name suggests close ones. A data set that is not prepared in
    `$TFDS_DATA_DIR` (or TFDS' default folder) must be downloaded: when the
    network is unreachable that is said at once, instead of after the minutes
    of retries TFDS' downloader spends.

    Raises:
        InputError: naming `source` (the `--train_data`/`--eval_data` value).
    """
    import tensorflow_datasets as tfds

    data_dir = os.environ.get("TFDS_DATA_DIR")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        close = close_names(name.split("/")[0].split(":")[0], sorted(set(tfds.list_builders())))
        raise InputError("Unknown TFDS dataset.", received={"data": source},
                         fix=(f"Did you mean: {', '.join(close)}? " if close else "")
                         + "tfds.list_builders() lists them all.") from None
    except Exception as err:  # Bad config or version names, unreadable data_dir...
        raise InputError("Could not open the TFDS dataset.", received={"data": source},
                         fix=f"({err.__class__.__name__}: {_first_line(err)})") from None
    load = functools.partial(tfds.load, name, split=split, with_info=True, data_dir=data_dir,
                             **load_kwargs)
    try:
        return load(download=False)
    except Exception as err:  # TFDS raises many types; all mean "could not get it".
        failure = err
    if not builder.is_prepared():
        offline = _network_unreachable()
        if offline:
            raise InputError(
                "The TFDS dataset is not prepared here and cannot be downloaded: the network "
                f"is unreachable ({offline}).",
                received={"data": source, "data_dir": str(builder.data_dir)},
                fix="Prepare it where there is internet (`tfds build`) and set TFDS_DATA_DIR "
                "to that folder, or give a local file.",
            )
        try:
            return load()
        except Exception as err:
            failure = err
    raise InputError(
        "Could not load the TFDS dataset.",
        received={"data": source, "split": split},
        fix=f"Check the split name. ({failure.__class__.__name__}: {_first_line(failure)})",
    )


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else ""


def _network_unreachable(host: str = "storage.googleapis.com", timeout: float = 3.0) -> str:
    """Why `host` (TFDS' data host) cannot be reached, or "" when it can."""
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as err:
        return f"{host}: {err.strerror or err.__class__.__name__}"
    return ""


def _read_tfds(name, text_column, label_column, split, text_pair_column=None):
    import tensorflow_datasets as tfds

    source = f"{TFDS_PREFIX}{name}"
    dataset, info = load_tfds(name, split, source=source)
    features = info.features
    text_key = text_column if isinstance(text_column, str) and not is_index(text_column) else next(
        (k for k in _TEXT_KEYS if k in features), None
    )
    label_key = (
        label_column if isinstance(label_column, str) and not is_index(label_column) else "label"
    )
    pair_key = None
    if text_pair_column is not None:
        pair_key = (text_pair_column if isinstance(text_pair_column, str)
                    and not is_index(text_pair_column) else "sentence2")
        if pair_key not in features:
            raise InputError(
                "TFDS data set lacks the second-text feature.",
                received={"data": name, "text_pair_column": pair_key},
                fix=f"Features: {', '.join(features)}.",
            )
    if text_key not in features or label_key not in features:
        raise InputError(
            "TFDS data set lacks the text or label feature.",
            received={"data": name, "text_column": text_key, "label_column": label_key},
            fix=f"Features: {', '.join(features)}.",
        )
    label_feature = features[label_key]
    names = getattr(label_feature, "names", None)
    texts, labels = [], []
    pairs = None if pair_key is None else []
    for example in tfds.as_numpy(dataset):
        text = example[text_key]
        texts.append(text.decode("utf-8") if isinstance(text, bytes) else str(text))
        if pair_key is not None:
            pair = example[pair_key]
            pairs.append(pair.decode("utf-8") if isinstance(pair, bytes) else str(pair))
        value = example[label_key].item()  # A float for regression sets (glue/stsb).
        labels.append(names[int(value)] if names and value >= 0 else str(value))
    return TextExamples(texts, labels, f"{TFDS_PREFIX}{name}[{split}]",
                        list(range(1, len(texts) + 1)), pairs=pairs)


def split_examples(
    examples: TextExamples, fraction: float, seed: int, strata: Sequence | None = None
) -> tuple[TextExamples, TextExamples]:
    """Splits off a shuffled validation fraction (when no dev file is given).

    With `strata` (one class id per example: single-label classification) the
    split is stratified, and every class keeps at least one training row: a
    rare class held out whole would be a class the model never sees in
    training, though `check_training_counts` passed it on the whole file.

    Raises:
        InputError: a fraction outside (0, 1), or too few rows to hold any out
            while every class keeps a training row.
    """
    import numpy as np

    if not 0.0 < fraction < 1.0:
        raise InputError(
            "Validation fraction must be in (0, 1).", received={"validation_split": fraction}
        )
    rng = np.random.default_rng(seed)
    if strata is None:
        order = rng.permutation(len(examples))
        cut = max(1, int(round(len(examples) * fraction)))
        return examples.take(order[cut:].tolist()), examples.take(order[:cut].tolist())
    held = stratified_holdout(strata, fraction, rng)
    return (examples.take(rng.permutation(np.flatnonzero(~held)).tolist()),
            examples.take(rng.permutation(np.flatnonzero(held)).tolist()))


def stratified_holdout(strata: Sequence, fraction: float, rng) -> np.ndarray:
    """Which examples to hold out: `fraction` of each class, every class keeping a training row.

    Args:
        strata: one class id (any hashable) per example.
        fraction: float in (0, 1).
        rng: `numpy.random.Generator` (seeded by the caller).

    Returns:
        A bool array, True for the held-out examples (at least one).

    Raises:
        InputError: every class has a single row, so none can be held out.
    """
    import numpy as np

    groups: dict = {}
    for index, key in enumerate(strata):
        groups.setdefault(key, []).append(index)
    held = np.zeros(len(strata), bool)
    for key in sorted(groups, key=str):
        members = rng.permutation(groups[key])
        held[members[:min(len(members) - 1, int(round(len(members) * fraction)))]] = True
    if not held.any():
        largest = max(groups.values(), key=len)
        if len(largest) < 2:
            raise InputError(
                "Too few training rows to hold out a validation part: every class has one row.",
                received={"examples": len(strata), "validation_split": fraction},
                fix="Give --eval_data, or more training rows.",
            )
        held[largest[int(rng.integers(len(largest)))]] = True
    return held
