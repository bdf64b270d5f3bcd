"""Text tf.data pipelines: tokenize once, cache, bucket by length, prefetch.

Speed comes from three choices, measured on this CPU (see BUILD_NOTES.md):

1. Tokenization runs once per data set, batched, inside a `tf.data` map with
   the backbone's own tokenizer, and the ids are cached in memory.
2. Training batches are bucketed by length and padded only to the longest
   sequence in the batch, not to `sequence_length`: SST-2 sentences average
   ~25 word pieces, so padding to 128 would make most of the compute padding.
3. Evaluation keeps the file order (predictions line up with rows) and pads
   each batch to its own longest sequence.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from tfhub_finetune.backbones.base import TextTokenizer

_BOUNDARIES = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


@dataclasses.dataclass
class TokenizedTexts:
    """Token ids (without specials) of every text, truncated to fit, plus labels."""

    ids: tf.RaggedTensor
    labels: np.ndarray
    sequence_length: int
    # Computed eagerly once, so building a dataset never needs the ragged tensor's sizes.
    lengths: np.ndarray = dataclasses.field(init=False)

    def __post_init__(self):
        self.lengths = self.ids.row_lengths().numpy() + 2  # Word pieces + [CLS] + [SEP].

    def __len__(self) -> int:
        return len(self.lengths)


def tokenize_texts(
    texts: list[str] | np.ndarray,
    labels: np.ndarray,
    tokenizer: TextTokenizer,
    sequence_length: int,
    batch_size: int = 1024,
) -> TokenizedTexts:
    """Tokenizes all texts once, in a parallel tf.data map, truncated to `sequence_length`.

    Example:

    ```python
    tok = tokenize_texts(["a fine film"], np.array([1]), backbone.tokenizer, 128)
    ```
    """
    strings = tf.data.Dataset.from_tensor_slices(tf.constant(list(texts), tf.string))
    batches = strings.batch(batch_size).map(
        tokenizer.tokenize, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    pieces = [ids[:, : sequence_length - 2] for ids in batches]
    ids = tf.concat(pieces, axis=0) if pieces else tf.ragged.constant([], tf.int32, ragged_rank=1)
    return TokenizedTexts(ids=ids, labels=np.asarray(labels), sequence_length=sequence_length)


def bucket_boundaries(sequence_length: int) -> list[int]:
    """Length buckets up to `sequence_length` (exclusive upper edges)."""
    return [b for b in _BOUNDARIES if b < sequence_length] + [sequence_length + 1]


def count_batches(lengths: np.ndarray, batch_size: int, bucketed: bool, sequence_length: int) -> int:
    """Exact number of batches one epoch yields (for progress bars and LR schedules)."""
    if not bucketed:
        return int(np.ceil(len(lengths) / batch_size))
    edges = bucket_boundaries(sequence_length)
    which = np.searchsorted(edges, lengths, side="right")
    counts = np.bincount(which, minlength=len(edges) + 1)
    return int(sum(int(np.ceil(c / batch_size)) for c in counts if c))


def make_text_dataset(
    data: TokenizedTexts,
    tokenizer: TextTokenizer,
    *,
    batch_size: int,
    training: bool,
    seed: int = 0,
    reshuffle_each_iteration: bool = True,
    bucketing: bool = True,
    pad_to_bucket_boundary: bool = False,
) -> tf.data.Dataset:
    """Batches tokenized texts into model inputs `({token_ids, padding_mask, segment_ids}, y)`.

    Args:
        data: TokenizedTexts. From `tokenize_texts`.
        tokenizer: TextTokenizer. Supplies [CLS]/[SEP]/[PAD] ids.
        batch_size: int. Examples per batch (the global batch under a strategy).
        training: bool. Shuffle (seeded, reshuffled each epoch) and bucket by
            length; otherwise keep order.
        seed: int. Shuffle seed (`fit_resumable` passes one per epoch). A tensor
            seed crashes tf.data's shuffle when the global seed is 0.
        reshuffle_each_iteration: bool. New order each pass. `fit_resumable`
            passes False and a per-epoch seed instead, so that epoch k's order
            is reproducible after a restart.
        bucketing: bool. Group similar lengths when training.
        pad_to_bucket_boundary: bool. Pad to the bucket edge instead of the
            batch's longest sequence: fewer distinct shapes, for XLA.

    Returns:
        A `tf.data.Dataset` with known cardinality.

    Example:

    ```python
    ds = make_text_dataset(tokenized, backbone.tokenizer, batch_size=32, training=True)
    model.fit(ds, epochs=3)
    ```
    """
    start, end, pad = tokenizer.start_id, tokenizer.end_id, tokenizer.pad_id

    def pack(ids, label):
        ids = tf.concat([[start], ids, [end]], axis=0)
        ones = tf.ones_like(ids)
        return {"token_ids": ids, "padding_mask": ones, "segment_ids": tf.zeros_like(ids)}, label

    ds = tf.data.Dataset.from_tensor_slices((data.ids, data.labels))
    ds = ds.map(pack, num_parallel_calls=tf.data.AUTOTUNE).cache()
    padding_values = (
        {"token_ids": pad, "padding_mask": 0, "segment_ids": 0},
        tf.constant(0, dtype=tf.as_dtype(data.labels.dtype)),
    )
    bucketed = training and bucketing
    if training:
        ds = ds.shuffle(
            len(data), seed=seed, reshuffle_each_iteration=reshuffle_each_iteration
        )
    if bucketed:
        edges = bucket_boundaries(data.sequence_length)
        ds = ds.bucket_by_sequence_length(
            element_length_func=lambda x, _: tf.shape(x["token_ids"])[0],
            bucket_boundaries=edges,
            bucket_batch_sizes=[batch_size] * (len(edges) + 1),
            padding_values=padding_values,
            pad_to_bucket_boundary=pad_to_bucket_boundary,
        )
    else:
        ds = ds.padded_batch(batch_size, padding_values=padding_values)
    n = count_batches(data.lengths, batch_size, bucketed, data.sequence_length)
    ds = ds.apply(tf.data.experimental.assert_cardinality(n))
    return ds.prefetch(tf.data.AUTOTUNE)
