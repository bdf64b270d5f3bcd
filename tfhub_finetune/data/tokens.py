"""Token-tagging (NER) data: CoNLL column files and JSONL, tag schemes, tag vocabulary.

Pure Python (no TensorFlow), so readers and checks are instant. Formats:

- CoNLL columns (any suffix but `.jsonl`/`.json`): one word a line, fields
  separated by whitespace (`token POS chunk NER` in CoNLL-2003); a blank line,
  including one holding only whitespace, ends a sentence; lines whose first
  field is `-DOCSTART-` are skipped and counted. Every token line must have
  as many fields as the first one. `token_column` / `tag_column` are 0-based
  indices, negative from the end (the defaults: first and last).
- JSONL: one sentence a line, `{"tokens": [...], "tags": [...]}` (other keys
  with `token_column` / `tag_column` given as names).

Tags are read in `tag_scheme` (`iob2`, `iob1` or `bioes`), checked, and
converted to IOB2, the one scheme the model, the metrics and the export use.
Every mistake is an `InputError` naming the file and line.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

from tfhub_finetune.config import TAG_SCHEMES
from tfhub_finetune.data.sources import data_suffix, json_object_row, read_text_file
from tfhub_finetune.errors import InputError
from tfhub_finetune.integers import parse_int

DOCSTART = "-DOCSTART-"
OUTSIDE = "O"
_PREFIXES = {"iob2": "BI", "iob1": "BI", "bioes": "BIES"}
_JSON_SUFFIXES = (".jsonl", ".json")


@dataclasses.dataclass
class TaggedSentences:
    """Sentences of words with IOB2 tags, and where each word came from.

    Attributes:
        words: list of list of str. The words of each sentence.
        tags: list of list of str. IOB2 tag of each word.
        lines: list of list of int. 1-based file line of each word (JSONL:
            the sentence's line).
        source: str. The file read.
        docstarts: int. `-DOCSTART-` lines skipped.
    """

    words: list[list[str]]
    tags: list[list[str]]
    lines: list[list[int]]
    source: str = ""
    docstarts: int = 0

    def __len__(self) -> int:
        return len(self.words)

    @property
    def num_words(self) -> int:
        return sum(len(w) for w in self.words)

    def take(self, indices: Sequence[int]) -> TaggedSentences:
        indices = list(indices)
        return TaggedSentences(
            words=[self.words[i] for i in indices],
            tags=[self.tags[i] for i in indices],
            lines=[self.lines[i] for i in indices],
            source=self.source,
            docstarts=self.docstarts,
        )


def read_tagged_sentences(
    path: str | Path,
    *,
    token_column: str | int = 0,
    tag_column: str | int = -1,
    tag_scheme: str = "iob2",
    encoding: str = "utf-8",
) -> TaggedSentences:
    """Reads a CoNLL column file or a JSONL file of tagged sentences.

    Args:
        path: str or path. The file.
        token_column: int or str. CoNLL: field index of the word. JSONL: key
            (an integer means the default key `tokens`).
        tag_column: int or str. CoNLL: field index of the tag (-1: last).
            JSONL: key (an integer means `tags`).
        tag_scheme: str. `iob2`, `iob1` or `bioes`; tags are returned as IOB2.
        encoding: str. File encoding.

    Returns:
        TaggedSentences with IOB2 tags.

    Raises:
        InputError: for a missing/undecodable/empty file, a line with a
            different field count, an invalid tag or tag sequence, or a bad
            JSON line, naming the file and line.

    Example:

    ```python
    train = read_tagged_sentences("../shared/data/conll2003/train.txt")
    len(train), train.docstarts  # (14041, 946)
    ```
    """
    if tag_scheme not in TAG_SCHEMES:
        raise InputError("Invalid value for --tag_scheme.", received={"tag_scheme": tag_scheme},
                         fix=f"Expected one of: {', '.join(TAG_SCHEMES)}.")
    path = Path(path).expanduser()
    source = str(path)
    lines = read_text_file(path, encoding, unit="Line").split("\n")
    if data_suffix(path) in _JSON_SUFFIXES:
        data = _read_jsonl(lines, source, token_column, tag_column)
    else:
        data = _read_columns(lines, source, token_column, tag_column)
    if not data.words:
        raise InputError("Data file has no tagged sentences.", received={"file": source})
    data.tags = [
        to_iob2(tags, tag_scheme, source=source, lines=where)
        for tags, where in zip(data.tags, data.lines, strict=True)
    ]
    return data


def _index(value: str | int, default: int) -> int | None:
    """A column given as an integer (or digit string); None for a name."""
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if not text:
        return default
    return parse_int(text)


_FIELD_SEPARATORS = re.compile(r"[ \t]+")


def _read_columns(lines: list[str], source: str, token_column, tag_column) -> TaggedSentences:
    token_index, tag_index = _index(token_column, 0), _index(tag_column, -1)
    for flag, index, value in (("text_column", token_index, token_column),
                               ("tag_column", tag_index, tag_column)):
        if index is None:
            raise InputError(f"CoNLL files have no header; --{flag} must be a field index.",
                             received={flag: value, "file": source},
                             fix="Give a 0-based index (negative counts from the end).")
    words: list[list[str]] = []
    tags: list[list[str]] = []
    where: list[list[int]] = []
    sentence_words: list[str] = []
    sentence_tags: list[str] = []
    sentence_lines: list[int] = []
    width = first_line = None
    docstarts = 0

    def end_sentence():
        if sentence_words:
            words.append(list(sentence_words))
            tags.append(list(sentence_tags))
            where.append(list(sentence_lines))
            sentence_words.clear()
            sentence_tags.clear()
            sentence_lines.clear()

    for number, line in enumerate(lines, start=1):
        # Fields are separated by spaces and tabs only: a token may hold a no-break space.
        stripped = line.strip(" \t\r")
        fields = _FIELD_SEPARATORS.split(stripped) if stripped else []
        if not fields:
            end_sentence()
            continue
        if fields[0] == DOCSTART:
            docstarts += 1
            end_sentence()
            continue
        if width is None:
            width, first_line = len(fields), number
            for flag, index in (("text_column", token_index), ("tag_column", tag_index)):
                if not -width <= index < width:
                    raise InputError(
                        f"Line {number} of {source} has {width} field(s); --{flag} is out of range.",
                        received={flag: index, "file": source, "line": number},
                        fix=f"Give an index from {-width} to {width - 1}.",
                    )
            if (token_index - width if token_index >= 0 else token_index) == (
                tag_index - width if tag_index >= 0 else tag_index
            ):
                raise InputError("--text_column and --tag_column name the same field.",
                                 received={"text_column": token_index, "tag_column": tag_index})
        elif len(fields) != width:
            raise InputError(
                f"Line {number} of {source} has {len(fields)} field(s); the file's first token "
                f"line ({first_line}) has {width}.",
                received={"file": source, "line": number, "text": line.strip()},
                fix="Each token line needs the same columns, separated by whitespace; "
                "separate sentences with a blank line.",
            )
        sentence_words.append(fields[token_index])
        sentence_tags.append(fields[tag_index])
        sentence_lines.append(number)
    end_sentence()
    return TaggedSentences(words, tags, where, source=source, docstarts=docstarts)


def _read_jsonl(lines: list[str], source: str, token_column, tag_column) -> TaggedSentences:
    token_key = "tokens" if _index(token_column, 0) is not None else str(token_column)
    tag_key = "tags" if _index(tag_column, -1) is not None else str(tag_column)
    words, tags, where = [], [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = json_object_row(
            line, source, number, [token_key, tag_key], unit="Line",
            fix='Expected {"tokens": [...], "tags": [...]} (or set --text_column/--tag_column '
            "to the keys).")
        sentence, labels = record[token_key], record[tag_key]
        if (not isinstance(sentence, list) or not isinstance(labels, list)
                or not all(isinstance(x, str) for x in sentence + labels)):
            raise InputError(f"Line {number} of {source}: `{token_key}` and `{tag_key}` must be "
                             "lists of strings.", received={"file": source, "line": number})
        if len(sentence) != len(labels):
            raise InputError(
                f"Line {number} of {source} has {len(sentence)} tokens but {len(labels)} tags.",
                received={"file": source, "line": number},
                fix="Give one tag per token.",
            )
        if sentence:
            words.append(sentence)
            tags.append(labels)
            where.append([number] * len(sentence))
    return TaggedSentences(words, tags, where, source=source)


def _split(tag: str, scheme: str, source: str, line: int) -> tuple[str, str]:
    """`B-PER` -> ("B", "PER"); `O` -> ("O", "")."""
    if tag == OUTSIDE:
        return OUTSIDE, ""
    prefix, _, kind = tag.partition("-")
    if prefix not in _PREFIXES[scheme] or not kind:
        raise InputError(
            f"Line {line} of {source}: {tag!r} is not a valid {scheme.upper()} tag.",
            received={"file": source, "line": line, "tag": tag},
            fix=f"Tags are O or {'/'.join(_PREFIXES[scheme])}-<type> (e.g. B-PER); set "
            "--tag_column to the tag field and --tag_scheme to the file's scheme.",
        )
    return prefix, kind


def to_iob2(tags: Sequence[str], scheme: str, *, source: str = "",
            lines: Sequence[int] | None = None) -> list[str]:
    """Checks one sentence's tags in `scheme` and returns them in IOB2.

    IOB2: an entity starts with `B-X`; `I-X` continues a `B-X`/`I-X`.
    IOB1: `I-X` also starts an entity after `O` or another type (becomes
    `B-X`); `B-X` only separates two adjacent entities of one type.
    BIOES: `S-X` is a one-word entity (-> `B-X`), `E-X` ends one (-> `I-X`).

    Raises:
        InputError: naming the file, line and tag of the first invalid tag or
            transition.

    Example:

    ```python
    to_iob2(["I-PER", "I-PER", "O"], "iob1")  # ['B-PER', 'I-PER', 'O']
    ```
    """
    lines = list(lines) if lines is not None else list(range(1, len(tags) + 1))
    out: list[str] = []
    previous, previous_kind = OUTSIDE, ""

    def bad(i: int, problem: str, fix: str) -> InputError:
        return InputError(f"Line {lines[i]} of {source}: {problem}",
                          received={"file": source, "line": lines[i], "tag": tags[i]}, fix=fix)

    for i, tag in enumerate(tags):
        prefix, kind = _split(tag, scheme, source, lines[i])
        inside = previous in "BI" and previous != OUTSIDE and previous_kind == kind
        if scheme == "iob2":
            if prefix == "I" and not inside:
                raise bad(i, f"{tag} cannot follow {tags[i - 1] if i else 'the sentence start'} "
                          "under IOB2 (an entity starts with B-).",
                          "Fix the tag, or set --tag_scheme=iob1 if the file uses IOB1.")
            out.append(tag)
        elif scheme == "iob1":
            out.append(f"B-{kind}" if prefix == "I" and not inside else tag)
        else:  # BIOES
            if prefix in "IE" and not inside:
                raise bad(i, f"{tag} cannot follow {tags[i - 1] if i else 'the sentence start'} "
                          "under BIOES.", "I-/E- continue a B-/I- of the same type.")
            if previous in "BI" and previous != OUTSIDE and not (prefix in "IE" and inside):
                raise bad(i - 1, f"{tags[i - 1]} is not closed by an I-/E- of its type under BIOES.",
                          "End multi-word entities with E-, one-word entities are S-.")
            out.append({"S": f"B-{kind}", "E": f"I-{kind}"}.get(prefix, tag))
        # After E-/S- (BIOES) nothing may continue the entity.
        previous = prefix if prefix in "BI" else OUTSIDE
        previous_kind = kind
    if scheme == "bioes" and tags and previous in "BI" and previous != OUTSIDE:
        raise bad(len(tags) - 1, f"{tags[-1]} ends the sentence without E-/S- under BIOES.",
                  "End multi-word entities with E-, one-word entities are S-.")
    return out


def entity_types(tags: Sequence[Sequence[str]]) -> list[str]:
    """The entity types of IOB2 tag sequences, sorted."""
    return sorted({t[2:] for sentence in tags for t in sentence if t != OUTSIDE})


def tag_names(types: Sequence[str]) -> list[str]:
    """The full IOB2 tag set of `types`: `O`, then `B-X`, `I-X` per type.

    Both prefixes of every type are in the model's outputs even when training
    saw only one of them, so any valid IOB2 sequence can be predicted.
    """
    return [OUTSIDE] + [f"{p}-{t}" for t in sorted(types) for p in "BI"]


def encode_tags(sentences: TaggedSentences, names: Sequence[str]) -> list[list[int]]:
    """IOB2 tags -> ids in `names`.

    Raises:
        InputError: naming the file, line and tag of the first tag not in
            `names` (an entity type training never saw).
    """
    index = {name: i for i, name in enumerate(names)}
    out = []
    for tags, lines in zip(sentences.tags, sentences.lines, strict=True):
        ids = []
        for tag, line in zip(tags, lines, strict=True):
            if tag not in index:
                raise InputError(
                    f"Line {line} of {sentences.source} has a tag that training never saw.",
                    received={"file": sentences.source, "line": line, "tag": tag},
                    fix=f"Known tags: {', '.join(names)}.",
                )
            ids.append(index[tag])
        out.append(ids)
    return out
