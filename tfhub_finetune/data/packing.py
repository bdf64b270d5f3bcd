"""How one or two texts' word pieces become one BERT input: the rule, in plain Python.

`[CLS] a [SEP]` for one text, `[CLS] a [SEP] b [SEP]` for a pair, with
segment id 0 up to and including the first `[SEP]` and 1 after it. When the
pieces do not fit in `sequence_length`, the longer side loses pieces first
(Hugging Face's `longest_first`, which equals TF Text's round-robin trimmer
and keras-hub's `MultiSegmentPacker(truncate="round_robin")`): a side shorter
than half the budget is kept whole, otherwise the first side keeps
`ceil(budget / 2)`. Pieces are dropped from the end of a side.

This module imports nothing beyond Python so that `text_client` (which must
run where TensorFlow is not installed) packs with the same code as training;
`tfhub_finetune.data.text.pack_inputs` calls `kept_lengths` with TensorFlow's
`minimum`/`maximum` on whole batches.

Example:

```python
pack_ids([7, 8, 9], [4, 5], sequence_length=6, start_id=101, end_id=102)
# ([101, 7, 8, 102, 4, 102], [0, 0, 0, 0, 1, 1])
```
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def special_tokens(num_segments: int) -> int:
    """[CLS] plus one [SEP] per segment."""
    return num_segments + 1


def kept_lengths(
    first: Any,
    second: Any = None,
    *,
    sequence_length: Any,
    minimum: Callable[[Any, Any], Any] = min,
    maximum: Callable[[Any, Any], Any] = max,
) -> tuple[Any, Any]:
    """How many word pieces of each side fit, truncating the longer side first.

    Works on Python ints (the defaults) and on integer tensors (pass
    `tf.minimum`/`tf.maximum`); the arithmetic is the same in both.

    Args:
        first: int or tensor. Word pieces of the first text (per row).
        second: int, tensor or None. Word pieces of the second text; None
            for single texts.
        sequence_length: int or tensor. Longest packed sequence, special
            tokens included.
        minimum: elementwise min. Defaults to Python's `min`.
        maximum: elementwise max. Defaults to Python's `max`.

    Returns:
        `(kept_first, kept_second)`; `kept_second` is None for single texts.

    Example:

    ```python
    kept_lengths(10, 3, sequence_length=11)  # (5, 3)
    kept_lengths(10, 10, sequence_length=10)  # (4, 3)
    ```
    """
    if second is None:
        return minimum(first, maximum(sequence_length - special_tokens(1), 0)), None
    budget = maximum(sequence_length - special_tokens(2), 0)
    kept_first = minimum(first, maximum(budget - second, (budget + 1) // 2))
    return kept_first, minimum(second, budget - kept_first)


def pack_ids(
    first: Sequence[int],
    second: Sequence[int] | None = None,
    *,
    sequence_length: int,
    start_id: int,
    end_id: int,
) -> tuple[list[int], list[int]]:
    """Packs one text's (or a pair's) word-piece ids; returns `(token_ids, segment_ids)`.

    Unpadded: a batch pads every row to its longest with the pad id and a
    `padding_mask` of 0 (`text_client.TextClient.encode` does).

    Example:

    ```python
    pack_ids([7, 8, 9], sequence_length=4, start_id=101, end_id=102)
    # ([101, 7, 8, 102], [0, 0, 0, 0])
    ```
    """
    keep_first, keep_second = kept_lengths(
        len(first), None if second is None else len(second), sequence_length=sequence_length
    )
    ids = [start_id, *first[:keep_first], end_id]
    segments = [0] * len(ids)
    if second is not None:
        tail = [*second[:keep_second], end_id]
        ids += tail
        segments += [1] * len(tail)
    return ids, segments
