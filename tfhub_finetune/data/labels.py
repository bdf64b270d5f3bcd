"""`LabelVocabulary`: label names <-> ids, saved beside the model as `labels.json`."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tfhub_finetune.errors import InputError
from tfhub_finetune.io_utils import atomic_write_text

LABEL_TYPES = ("auto", "id", "name")


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


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
        """Builds the vocabulary from training labels."""
        if label_type not in LABEL_TYPES:
            raise InputError(
                "Unknown label type.", received={"label_type": label_type},
                fix=f"Expected one of: {', '.join(LABEL_TYPES)}.",
            )
        if task == "regression":
            vocab = cls(names=list(label_names or ["score"]), task=task, label_type="id")
            vocab.encode(labels, source=source, rows=rows)  # Validates numbers.
            return vocab
        if task == "multi_label":
            found = sorted({p.strip() for label in labels for p in label.split(",") if p.strip()})
            names = list(label_names) if label_names else found
            vocab = cls(names=names, task=task, label_type="name")
            vocab.encode(labels, source=source, rows=rows)
            return vocab
        if label_type == "auto":
            label_type = "id" if all(_is_int(label) for label in labels) else "name"
        if label_type == "id":
            ids = _parse_ids(labels, source, rows)
            count = int(ids.max()) + 1
            if label_names:
                if len(label_names) < count:
                    raise InputError(
                        "Fewer label names than label ids in the data.",
                        received={"label_names": ",".join(label_names), "max_label_id": count - 1},
                        fix="Give one name per id, in id order.",
                    )
                names = list(label_names)
            else:
                names = [str(i) for i in range(count)]
            return cls(names=names, task=task, label_type="id")
        names = sorted(set(labels)) if not label_names else list(label_names)
        vocab = cls(names=names, task=task, label_type="name")
        vocab.encode(labels, source=source, rows=rows)
        return vocab

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
            for i, label in enumerate(labels):
                try:
                    out[i] = float(label)
                except ValueError:
                    raise InputError(
                        f"Row {rows[i]} of {source}: regression label is not a number.",
                        received={"file": source, "row": rows[i], "label": label},
                    ) from None
            return out
        index = {name: i for i, name in enumerate(self.names)}
        if self.task == "multi_label":
            out = np.zeros((len(labels), len(self.names)), np.float32)
            for i, label in enumerate(labels):
                for part in (p.strip() for p in label.split(",")):
                    if not part:
                        continue
                    if part not in index:
                        raise self._unseen(source, rows[i], part)
                    out[i, index[part]] = 1.0
            return out
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
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def _parse_ids(labels, source, rows) -> np.ndarray:
    rows = list(rows) if rows is not None else list(range(1, len(labels) + 1))
    out = np.empty(len(labels), np.int32)
    for i, label in enumerate(labels):
        if not _is_int(label) or int(label) < 0:
            raise InputError(
                f"Row {rows[i]} of {source}: label is not a non-negative integer id.",
                received={"file": source, "row": rows[i], "label": label},
                fix="Use --label_type=name for class-name labels.",
            )
        out[i] = int(label)
    return out
