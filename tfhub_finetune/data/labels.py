"""`LabelVocabulary`: label names <-> ids, saved beside the model as `labels.json`."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tfhub_finetune.errors import InputError
from tfhub_finetune.integers import parse_int
from tfhub_finetune.io_utils import atomic_write_text, read_json_file

LABEL_TYPES = ("auto", "id", "name")
# A class with fewer training rows than this fraction of the smallest other class is almost
# always a typo or a stray cell (`postive`, `7` among 0/1), not a class to learn.
TINY_CLASS_FRACTION = 0.01


def _is_int(text: str) -> bool:
    return parse_int(text) is not None


@dataclasses.dataclass
class LabelVocabulary:
    """Maps raw label cells to model targets, the same way in training and eval.

    Attributes:
        names: list of str. Name of class i (or of output i for regression).
        task: str. `single_label`, `multi_label` or `regression`.
        label_type: str. `id` when files hold integer ids, `name` when they
            hold class names (`auto` is resolved at construction).

    Example:

    ```python
    vocab = LabelVocabulary.from_labels(["pos", "neg", "pos"])
    vocab.encode(["neg", "pos"])  # array([0, 1])
    ```
    """

    names: list[str]
    task: str = "single_label"
    label_type: str = "name"

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @classmethod
    def from_labels(
        cls,
        labels: Sequence[str],
        *,
        task: str = "single_label",
        label_type: str = "auto",
        label_names: Sequence[str] | None = None,
        source: str = "",
        rows: Sequence[int] | None = None,
    ) -> LabelVocabulary:
        """Builds the vocabulary from training labels.

        With `label_names`, the classes are exactly those names (a training
        label outside them is an error naming its row); without, the classes
        are the labels found. Integer ids and names are never mixed: with
        `label_type="auto"`, a cell of the other kind is an error naming its
        row (a stray label, or a header row that was not recognised).
        `check_training_counts` then checks the classes against the data.
        """
        if label_type not in LABEL_TYPES:
            raise InputError(
                "Unknown label type.", received={"label_type": label_type},
                fix=f"Expected one of: {', '.join(LABEL_TYPES)}.",
            )
        if task != "multi_label":
            _refuse_label_lists(labels, source, rows, task)
        if task == "regression":
            vocab = cls(names=list(label_names or ["score"]), task=task, label_type="id")
            vocab.encode(labels, source=source, rows=rows)  # Validates numbers.
            return vocab
        if task == "multi_label":
            found = sorted({part for label in labels for part in _label_parts(label)})
            names = list(label_names) if label_names else found
            if not names:
                raise InputError(
                    f"No row of {source} has a label: every row is an empty list.",
                    received={"file": source, "task": task},
                    fix="Multi-label training needs rows that carry labels, or --label_names.",
                )
            vocab = cls(names=names, task=task, label_type="name")
            vocab.encode(labels, source=source, rows=rows)
            return vocab
        rows = list(rows) if rows is not None else list(range(1, len(labels) + 1))
        if label_type == "auto":
            label_type = _infer_label_type(labels, source, rows)
            if label_type == "name" and not label_names:
                _refuse_scores_as_classes(labels, source, task)
        if label_type == "id":
            ids = _parse_ids(labels, source, rows)
            if label_names:
                bad = np.nonzero(ids >= len(label_names))[0]
                if bad.size:
                    raise _outside_names(source, rows[bad[0]], labels[bad[0]], label_names)
                names = list(label_names)
            else:
                names = [str(i) for i in range(int(ids.max()) + 1)]
            return cls(names=names, task=task, label_type="id")
        if label_names:
            known = set(label_names)
            for label, row in zip(labels, rows, strict=True):
                if label not in known:
                    raise _outside_names(source, row, label, label_names)
        names = sorted(set(labels)) if not label_names else list(label_names)
        return cls(names=names, task=task, label_type="name")

    def check_training_counts(
        self, targets: np.ndarray, *, source: str = "", rows: Sequence[int] | None = None
    ) -> None:
        """Checks that training data can teach every class (single-label only).

        Raises:
            InputError: a single class; a class with no training example (an
                id gap, or a `--label_names` entry the data lacks); a class
                with under `TINY_CLASS_FRACTION` of the smallest other class's
                rows (named with its rows). A class with a single row, above
                that fraction, is logged as a warning naming the row.
        """
        if self.task != "single_label":
            return
        targets = np.asarray(targets)
        rows = list(rows) if rows is not None else list(range(1, len(targets) + 1))
        counts = np.bincount(targets, minlength=self.num_classes)
        present = np.nonzero(counts)[0]
        if len(present) < 2:
            only = self.names[present[0]] if len(present) else "none"
            raise InputError(
                "The training data has a single class; a classifier needs at least two.",
                received={"file": source, "label": only, "examples": int(counts.sum())},
                fix="Check --label_column, or train on data with more than one label.",
            )
        empty = [self.names[i] for i in np.nonzero(counts == 0)[0]]
        if empty:
            hint = ""
            if self.label_type == "id":
                largest = int(targets.max())
                hint = (f" The largest id, {largest}, is at row(s) "
                        f"{_rows_of(targets, largest, rows)}: a stray label?")
            raise InputError(
                f"Class(es) with no training example: {', '.join(empty[:10])}"
                f"{', ...' if len(empty) > 10 else ''}.",
                received={"file": source, "classes": ",".join(self.names)},
                fix="Every class needs training examples: fix the labels, or drop the names "
                f"from --label_names.{hint}",
            )
        for i in present:
            others = counts[present[present != i]]
            if counts[i] < TINY_CLASS_FRACTION * others.min():
                raise InputError(
                    f"Class {self.names[i]!r} has only {counts[i]} training row(s) against at "
                    f"least {others.min()} for every other class: a stray or mistyped label?",
                    received={"file": source, "label": self.names[i],
                              "rows": _rows_of(targets, i, rows)},
                    fix="Fix or remove those rows (or add examples of the class).",
                )
            if counts[i] == 1:
                logging.warning(
                    "Class %r has a single training example (%s, row %s): it cannot be learnt "
                    "from one row; a stray or mistyped label?", self.names[i], source,
                    _rows_of(targets, i, rows))

    def encode(
        self, labels: Sequence[str], *, source: str = "", rows: Sequence[int] | None = None
    ) -> np.ndarray:
        """Raw label cells -> int32 ids, multi-hot float32, or float32 scores.

        Raises:
            InputError: naming the file and row of a label training never saw,
                or of a non-numeric label where ids/scores are expected.
        """
        rows = list(rows) if rows is not None else list(range(1, len(labels) + 1))
        if self.task == "regression":
            out = np.empty(len(labels), np.float32)
            largest = float(np.finfo(np.float32).max)
            for i, label in enumerate(labels):
                try:
                    value = float(label)
                except (ValueError, OverflowError, TypeError):
                    value = None
                # NaN or infinite targets make every loss NaN: the run would "succeed" on nothing.
                if value is None or not math.isfinite(value) or abs(value) > largest:
                    what = "not a number" if value is None else "not a finite number"
                    raise InputError(
                        f"Row {rows[i]} of {source}: regression label is {what}.",
                        received={"file": source, "row": rows[i], "label": label},
                        fix=f"Give a number of magnitude at most {largest:.3g} (float32).",
                    )
                out[i] = value
            return out
        index = {name: i for i, name in enumerate(self.names)}
        if self.task == "multi_label":
            out = np.zeros((len(labels), len(self.names)), np.float32)
            for i, label in enumerate(labels):
                for part in _label_parts(label):
                    if part not in index:
                        raise self._unseen(source, rows[i], part)
                    out[i, index[part]] = 1.0
            return out
        _refuse_label_lists(labels, source, rows, self.task)
        if self.label_type == "id":
            ids = _parse_ids(labels, source, rows)
            bad = np.nonzero(ids >= len(self.names))[0]
            if bad.size:
                raise self._unseen(source, rows[bad[0]], labels[bad[0]])
            return ids
        out = np.empty(len(labels), np.int32)
        for i, label in enumerate(labels):
            if label not in index:
                raise self._unseen(source, rows[i], label)
            out[i] = index[label]
        return out

    def _unseen(self, source, row, label) -> InputError:
        return InputError(
            f"Row {row} of {source} has a label that training never saw.",
            received={"file": source, "row": row, "label": label},
            fix=f"Known labels: {', '.join(self.names)}.",
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> LabelVocabulary:
        path = Path(path)
        if not path.exists():
            raise InputError(
                "Label file not found beside the model.", received={"file": str(path)},
                fix="Train first (--mode=train) or point --model_dir at a trained model.",
            )
        fix = "Train again (--mode=train) or point --model_dir at an intact trained model."
        record = read_json_file(path, fix=fix)
        try:
            return cls(**record)
        except TypeError:
            raise InputError(f"{path} is not a label file.", received={"file": str(path)},
                             fix=fix) from None


def _infer_label_type(labels: Sequence[str], source: str, rows: list[int]) -> str:
    """`id` when every cell is an integer, `name` when none is; a mix names the odd row."""
    is_id = [_is_int(label) for label in labels]
    ids = sum(is_id)
    if ids == len(labels):
        return "id"
    if ids == 0:
        return "name"
    majority_ids = ids >= len(labels) - ids
    i = is_id.index(not majority_ids)  # The first cell of the minority kind.
    if majority_ids:
        problem = f"is not an integer id, but the other {ids} labels are integer ids"
        hint = " (a header row? set --has_header=true)" if i == 0 else ""
    else:
        problem = f"is an integer id, but the other {len(labels) - ids} labels are class names"
        hint = ""
    raise InputError(
        f"Row {rows[i]} of {source} has a label that {problem}{hint}.",
        received={"file": source, "row": rows[i], "label": labels[i]},
        fix="Fix the row, or set --label_type=id or --label_type=name to say which labels are.",
    )


# More distinct fractional numbers than this, as class names, are scores (STS-B's 0..5
# similarities, ratings): half-star ratings, 0.5..5.0, are ten.
_MAX_NUMERIC_CLASSES = 10


def _refuse_scores_as_classes(labels: Sequence[str], source: str, task: str) -> None:
    """Refuses labels that are many distinct decimal numbers: a regression target read as classes."""
    values = set()
    for label in set(labels):
        try:
            value = float(label)
        except ValueError:
            return
        if not math.isfinite(value):
            return
        values.add(value)
    if len(values) <= _MAX_NUMERIC_CLASSES or all(v.is_integer() for v in values):
        return
    examples = ", ".join(sorted(set(labels), key=float)[:: max(1, len(values) // 4)][:4])
    raise InputError(
        f"The labels of {source} look like scores, not classes: {len(values)} distinct numbers "
        f"(e.g. {examples}), each of which --task={task} would learn as its own class.",
        received={"file": source, "task": task},
        fix="Pass --task=regression to fit the score, or --label_type=name to keep them as "
            "classes.",
    )


def _label_parts(label: str | tuple[str, ...]) -> list[str]:
    """A multi-label cell's names: a JSONL list as it is, a text cell split at commas."""
    parts = label if isinstance(label, tuple) else label.split(",")
    return [part.strip() for part in parts if part.strip()]


def _refuse_label_lists(labels, source, rows, task) -> None:
    # Readers give a JSONL list label as a tuple (`[]`: a multi-label row with none of the
    # labels); any other task needs one label per row.
    for i, label in enumerate(labels):
        if isinstance(label, tuple):
            row = rows[i] if rows is not None else i + 1
            raise InputError(
                f"Row {row} of {source} has a list of labels; --task={task} takes one label "
                "per row.",
                received={"file": source, "row": row, "label": list(label)},
                fix="Give the row one label, or train with --task=multi_label.",
            )


def _outside_names(source, row, label, label_names) -> InputError:
    # `label_names` are the user's --label_names, or the training classes an eval set is
    # read against: the message fits both.
    return InputError(
        f"Row {row} of {source} has a label outside the known classes (--label_names, or "
        "what training saw).",
        received={"file": source, "row": row, "label": label},
        fix=f"Expected one of: {', '.join(label_names)} (or ids 0..{len(label_names) - 1}).",
    )


def _rows_of(targets: np.ndarray, class_id: int, rows: list[int], limit: int = 5) -> str:
    found = [rows[i] for i in np.nonzero(targets == class_id)[0][: limit + 1]]
    return ",".join(map(str, found[:limit])) + (",..." if len(found) > limit else "")


def _parse_ids(labels, source, rows) -> np.ndarray:
    rows = list(rows) if rows is not None else list(range(1, len(labels) + 1))
    out = np.empty(len(labels), np.int32)
    for i, label in enumerate(labels):
        if not _is_int(label) or not 0 <= int(label) <= np.iinfo(np.int32).max:
            raise InputError(
                f"Row {rows[i]} of {source}: label is not a non-negative integer id "
                "(at most 2**31 - 1).",
                received={"file": source, "row": rows[i], "label": label},
                fix="Use --label_type=name for class-name labels.",
            )
        out[i] = int(label)
    return out
