"""Entity spans from IOB2 tags, and entity-level precision/recall/F1 as `seqeval` computes them.

Pure Python, shared by the training report (`metrics.json`), the epoch-end
`val_entity_f1` and the token-id client of `pipelines.predict`.

Spans follow `seqeval`'s default (lenient) decoding, which is what
Hugging Face's run_ner reports: an entity starts at `B-X`, or at `I-X` after
`O` or another type; it continues over `I-X` of the same type. Scores are
exact-span matches, micro-averaged over all entities, and per type
(`seqeval.metrics.classification_report`); a ratio with a zero denominator
is 0, as in seqeval. `tests/test_token_classification.py` checks equality
with the `seqeval` package.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

OUTSIDE = "O"


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """`(type, first word, last word)` of each entity in one sentence's IOB2 tags.

    Example:

    ```python
    get_entities(["B-PER", "I-PER", "O", "I-LOC"])  # [('PER', 0, 1), ('LOC', 3, 3)]
    ```
    """
    spans = []
    kind = start = None
    for i, tag in enumerate(tags):
        prefix, tag_kind = (tag[0], tag[2:]) if tag != OUTSIDE else (OUTSIDE, None)
        continues = prefix == "I" and kind is not None and tag_kind == kind
        if kind is not None and not continues:
            spans.append((kind, start, i - 1))
            kind = None
        if prefix != OUTSIDE and not continues:
            kind, start = tag_kind, i
    if kind is not None:
        spans.append((kind, start, len(tags) - 1))
    return spans


def _ratio(a: int, b: int) -> float:
    return a / b if b else 0.0


def _prf(correct: int, predicted: int, true: int) -> dict:
    precision, recall = _ratio(correct, predicted), _ratio(correct, true)
    return {
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall) if precision + recall else 0.0,
        "support": true,
    }


def entity_report(
    true_tags: Sequence[Sequence[str]], predicted_tags: Sequence[Sequence[str]]
) -> dict:
    """Entity-level scores and word accuracy of predicted IOB2 tags.

    Args:
        true_tags: per sentence, the gold tag of each word.
        predicted_tags: per sentence, the predicted tag of each word.

    Returns:
        `{entity_precision, entity_recall, entity_f1, token_accuracy,
        num_entities, num_predicted_entities, per_type: {type: {precision,
        recall, f1, support}}}`.

    Example:

    ```python
    entity_report([["B-PER", "I-PER", "O"]], [["B-PER", "O", "O"]])["entity_f1"]  # 0.0
    ```
    """
    true_spans, predicted_spans = set(), set()
    words = correct_words = 0
    for i, (gold, guess) in enumerate(zip(true_tags, predicted_tags, strict=True)):
        if len(gold) != len(guess):
            raise ValueError(f"Sentence {i}: {len(gold)} gold tags but {len(guess)} predictions.")
        true_spans |= {(i, *span) for span in get_entities(gold)}
        predicted_spans |= {(i, *span) for span in get_entities(guess)}
        words += len(gold)
        correct_words += sum(a == b for a, b in zip(gold, guess, strict=True))
    correct = true_spans & predicted_spans
    count = lambda spans: Counter(span[1] for span in spans)  # noqa: E731
    by_true, by_predicted, by_correct = count(true_spans), count(predicted_spans), count(correct)
    overall = _prf(len(correct), len(predicted_spans), len(true_spans))
    return {
        "entity_precision": overall["precision"],
        "entity_recall": overall["recall"],
        "entity_f1": overall["f1"],
        "token_accuracy": _ratio(correct_words, words),
        "num_entities": len(true_spans),
        "num_predicted_entities": len(predicted_spans),
        "num_words": words,
        "per_type": {
            kind: _prf(by_correct[kind], by_predicted[kind], by_true[kind])
            for kind in sorted(set(by_true) | set(by_predicted))
        },
    }
