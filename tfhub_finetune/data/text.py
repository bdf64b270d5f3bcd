"""Text tf.data pipelines: tokenize and pack once, keep in memory, group by length, prefetch.

Speed comes from three choices, measured on this CPU (see BUILD_NOTES.md):

1. Tokenization and packing (`pack_inputs`: single texts or pairs) run once
   per data set, batched, inside a `tf.data` map with the backbone's own
   tokenizer, and the packed ids are kept in memory as ragged tensors.
2. Training batches group similar lengths (sorted windows, `batch_examples`)
   and are padded only to the longest sequence in the batch, not to
   `sequence_length`: SST-2 sentences average ~25 word pieces, so padding to
   128 would make most of the compute padding.
3. Evaluation keeps the file order (predictions line up with rows) and pads
   each batch to its own longest sequence.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from tfhub_finetune.backbones.base import TextTokenizer
from tfhub_finetune.data.packing import kept_lengths, special_tokens

_BOUNDARIES = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
# Batches per sorted window when grouping by length: fastai's SortishSampler and Hugging
# Face's LengthGroupedSampler both sort windows of 50 batches.
LENGTH_GROUP_BATCHES = 50


def pack_inputs(
    first: tf.RaggedTensor,
    second: tf.RaggedTensor | None = None,
    *,
    sequence_length: int | tf.Tensor,
    start_id: int,
    end_id: int,
    pad_id: int,
    width: int | tf.Tensor | None = None,
) -> dict[str, tf.Tensor]:
    """Packs word-piece ids into the encoder's three inputs: ids in, ids + segments + mask out.

    `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]` (segment ids 0, then 1 from the
    first piece of `b` to its `[SEP]`), truncated to `sequence_length` with the
    longer side losing pieces first (the rule is `data.packing.kept_lengths`,
    shared with the TensorFlow-free `text_client`). This is the one packing of
    text inputs: training's tf.data, both serving signatures, `text_client`
    and the TF Hub preprocess model all go through it (or, in pure Python,
    `data.packing.pack_ids`), so their ids agree id for id.

    Dense gathers on a `(batch, width)` grid rather than ragged concats and
    trimmers: TF Text's trimmer and ragged validation made saved graphs ~10x
    larger, and every op here is a core op.

    Args:
        first: tf.RaggedTensor. `(batch, None)` integer word-piece ids, no
            special tokens (what `TextTokenizer.tokenize` returns).
        second: tf.RaggedTensor or None. The second texts' ids, for pairs.
        sequence_length: int or scalar tensor. Longest packed row, special
            tokens included.
        start_id: int. `[CLS]`.
        end_id: int. `[SEP]`.
        pad_id: int. Padding id.
        width: int, scalar tensor or None. Columns of the output; None pads
            to the batch's longest packed row (at least 2).

    Returns:
        A dict of int32 `(batch, width)` tensors: `token_ids`, `segment_ids`,
        `padding_mask` (1 on real tokens).

    Example:

    ```python
    a = tokenizer.tokenize(tf.constant(["a man plays"]))
    b = tokenizer.tokenize(tf.constant(["someone is playing"]))
    inputs = pack_inputs(a, b, sequence_length=128, start_id=101, end_id=102, pad_id=0)
    ```
    """
    segments = [first] if second is None else [first, second]
    values = [tf.cast(s.flat_values, tf.int32) for s in segments]
    row_starts = [s.row_starts() for s in segments]
    lengths = [s.row_lengths() for s in segments]
    sequence_length = tf.cast(sequence_length, tf.int64)
    keep = kept_lengths(
        lengths[0], None if second is None else lengths[1],
        sequence_length=sequence_length, minimum=tf.minimum, maximum=tf.maximum,
    )
    keep = [k for k in keep if k is not None]
    total = tf.add_n(keep) + special_tokens(len(segments))
    if width is None:
        # reduce_max of an empty batch is the dtype's minimum: clamp to [CLS] [SEP].
        width = tf.maximum(tf.reduce_max(total), 2)
    width = tf.cast(width, tf.int64)
    position = tf.range(width, dtype=tf.int64)[None, :]
    batch = tf.shape(lengths[0], out_type=tf.int64)[0]
    token_ids = tf.fill(tf.stack([batch, width]), tf.constant(pad_id, tf.int32))
    segment_ids = tf.zeros_like(token_ids)
    token_ids = tf.where(position == 0, start_id, token_ids)
    offset = tf.ones_like(lengths[0])[:, None]  # Where the current segment starts.
    for index, (vals, starts, kept) in enumerate(zip(values, row_starts, keep, strict=True)):
        kept = kept[:, None]
        inside = (position >= offset) & (position < offset + kept)
        # One trailing pad value keeps the gather valid for empty segments.
        padded = tf.concat([vals, [pad_id]], axis=0)
        source = tf.where(inside, starts[:, None] + position - offset, tf.size(vals, out_type=tf.int64))
        token_ids = tf.where(inside, tf.gather(padded, source), token_ids)
        token_ids = tf.where(position == offset + kept, end_id, token_ids)
        if index:
            segment_ids = tf.where((position >= offset) & (position <= offset + kept), index, segment_ids)
        offset = offset + kept + 1
    return {
        "token_ids": token_ids,
        "segment_ids": segment_ids,
        "padding_mask": tf.cast(position < offset, tf.int32),
    }


@dataclasses.dataclass
class TokenizedTexts:
    """Packed token ids of every text (or pair), specials included, unpadded, plus labels.

    Attributes:
        ids: tf.RaggedTensor. `(n, None)` int32 `[CLS] a [SEP] (b [SEP])`.
        segment_ids: tf.RaggedTensor. Same shape; 0 for the first text, 1 for the second.
        labels: np.ndarray. One target per row.
        sequence_length: int. The packing limit.
        lengths: np.ndarray. Packed length of each row (what bucketing sorts by).
    """

    ids: tf.RaggedTensor
    segment_ids: tf.RaggedTensor
    labels: np.ndarray
    sequence_length: int
    # Computed eagerly once, so building a dataset never needs the ragged tensor's sizes.
    lengths: np.ndarray = dataclasses.field(init=False)

    def __post_init__(self):
        self.lengths = self.ids.row_lengths().numpy()

    def __len__(self) -> int:
        return len(self.lengths)


def tokenize_texts(
    texts: list[str] | np.ndarray,
    labels: np.ndarray,
    tokenizer: TextTokenizer,
    sequence_length: int,
    batch_size: int = 1024,
    *,
    pairs: list[str] | np.ndarray | None = None,
) -> TokenizedTexts:
    """Tokenizes and packs all texts (or pairs) once, in a parallel tf.data map.

    Args:
        texts: list of str. First (or only) texts.
        labels: np.ndarray. Targets, one per text.
        tokenizer: TextTokenizer. The backbone's tokenizer.
        sequence_length: int. Longest packed row, specials included.
        batch_size: int. Texts per tokenizer call.
        pairs: list of str or None. Second texts of pairs, aligned with `texts`.

    Example:

    ```python
    tok = tokenize_texts(["a fine film"], np.array([1]), backbone.tokenizer, 128)
    pair = tokenize_texts(["a man plays"], np.array([4.2]), backbone.tokenizer, 128,
                          pairs=["someone is playing"])
    ```
    """
    columns = [list(texts)] + ([] if pairs is None else [list(pairs)])
    if pairs is not None and len(columns[1]) != len(columns[0]):
        raise ValueError(f"`pairs` has {len(columns[1])} texts; `texts` has {len(columns[0])}.")
    strings = tf.data.Dataset.from_tensor_slices(
        tuple(tf.constant(c, tf.string) for c in columns)
    )
    ids = {"start_id": tokenizer.start_id, "end_id": tokenizer.end_id, "pad_id": tokenizer.pad_id}

    def pack(*batch):
        pieces = [tokenizer.tokenize(b) for b in batch]
        packed = pack_inputs(*pieces, sequence_length=sequence_length, **ids)
        rows = tf.reduce_sum(packed["padding_mask"], axis=1)
        return tuple(tf.RaggedTensor.from_tensor(packed[k], lengths=rows)
                     for k in ("token_ids", "segment_ids"))

    batches = list(strings.batch(batch_size).map(
        pack, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    ))
    if batches:
        token_ids, segment_ids = (tf.concat([b[i] for b in batches], axis=0) for i in range(2))
    else:
        token_ids = segment_ids = tf.ragged.constant([], tf.int32, ragged_rank=1)
    return TokenizedTexts(ids=token_ids, segment_ids=segment_ids, labels=np.asarray(labels),
                          sequence_length=sequence_length)


def bucket_widths(sequence_length: int) -> list[int]:
    """The padded widths of bounded-shape batches: `_BOUNDARIES` below `sequence_length`, then it.

    What `pad_to_bucket_boundary` pads training batches to and the XLA serving
    export compiles for (`export.serving_shapes`): a few shapes, so compiled
    code is reused.
    """
    return [b for b in _BOUNDARIES if b < sequence_length] + [sequence_length]


def count_batches(examples: int, batch_size: int) -> int:
    """Batches one epoch yields: every batch full but the last (for progress bars and LR schedules)."""
    return -(-int(examples) // int(batch_size))


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
        tokenizer: TextTokenizer. Supplies the [PAD] id.
        batch_size: int. Examples per batch (the global batch under a strategy).
        training: bool. Shuffle (seeded, reshuffled each epoch) and group by
            length; otherwise keep order.
        seed: int. Shuffle seed (`fit_resumable` passes one per epoch). A tensor
            seed crashes tf.data's shuffle when the global seed is 0.
        reshuffle_each_iteration: bool. New order each pass. `fit_resumable`
            passes False and a per-epoch seed instead, so that epoch k's order
            is reproducible after a restart.
        bucketing: bool. Group similar lengths into batches when training
            (`batch_examples`).
        pad_to_bucket_boundary: bool. Pad each batch to the first of
            `bucket_widths` covering its longest row instead of to that row:
            fewer distinct shapes, for XLA.

    Returns:
        A `tf.data.Dataset` with known cardinality.

    Example:

    ```python
    ds = make_text_dataset(tokenized, backbone.tokenizer, batch_size=32, training=True)
    model.fit(ds, epochs=3)
    ```
    """
    return batch_examples(
        {"token_ids": data.ids, "segment_ids": data.segment_ids},
        {"token_ids": tokenizer.pad_id, "segment_ids": 0},
        data.labels, data.lengths, data.sequence_length, batch_size=batch_size,
        training=training, seed=seed, reshuffle_each_iteration=reshuffle_each_iteration,
        bucketing=bucketing, pad_to_bucket_boundary=pad_to_bucket_boundary,
    )


def batch_examples(
    features: dict[str, tf.RaggedTensor],
    padding_values: dict[str, int],
    labels: np.ndarray | tf.RaggedTensor,
    lengths: np.ndarray,
    sequence_length: int,
    *,
    label_padding: int = 0,
    batch_size: int,
    training: bool,
    seed: int | None = 0,
    reshuffle_each_iteration: bool = True,
    bucketing: bool = True,
    pad_to_bucket_boundary: bool = False,
) -> tf.data.Dataset:
    """The one batching rule for text and token data: rows in, padded `(inputs, labels)` batches out.

    Evaluation keeps row order. Training shuffles (seeded) and, with
    `bucketing`, groups similar lengths the way fastai's `SortishSampler` and
    Hugging Face's `group_by_length` do: the shuffled rows are cut into windows
    of `LENGTH_GROUP_BATCHES` batches, each window is sorted longest first and
    cut into batches, and the epoch's batches are shuffled. Every batch but the
    epoch's last is full, and padding is what separates neighbours in length:
    ~3% of the tokens on SST-2's training file, where `tf.data`'s
    `bucket_by_sequence_length` at the `bucket_widths` edges padded 16% and
    left a part-full batch per bucket. A batch is padded to its longest row;
    `padding_mask` marks the real tokens.

    Rows stay in memory as ragged tensors; each batch is gathered from them by
    index, so nothing is copied per example.

    Args:
        features: dict of tf.RaggedTensor. `(rows, None)` per model input,
            e.g. `token_ids`, `segment_ids`; every row of a column as long as
            `lengths` says.
        padding_values: dict of int. The pad value of each feature.
        labels: np.ndarray or tf.RaggedTensor. One target per row, or one per
            token (ragged, padded with `label_padding`).
        lengths: np.ndarray. Each row's length (what grouping sorts by).
        sequence_length: int. The longest a row may be (`bucket_widths`).
        label_padding: int. Pad value of token-level labels.
        batch_size: int. Rows per batch.
        training: bool. Shuffle and group by length; otherwise keep order.
        seed: int or None. Shuffle seed.
        reshuffle_each_iteration: bool. New order each pass.
        bucketing: bool. Group similar lengths when training.
        pad_to_bucket_boundary: bool. Pad to the first of `bucket_widths`
            covering the longest row.

    Returns:
        A `tf.data.Dataset` of `({**features, "padding_mask"}, labels)` with
        known cardinality.
    """
    n = len(lengths)
    row_lengths = tf.constant(np.asarray(lengths, np.int64))
    rows = tf.data.Dataset.range(n)
    if training:
        rows = rows.shuffle(max(n, 1), seed=seed, reshuffle_each_iteration=reshuffle_each_iteration)
    if training and bucketing:
        def longest_first(window):
            order = tf.argsort(tf.gather(row_lengths, window), direction="DESCENDING", stable=True)
            return tf.gather(window, order)

        rows = rows.batch(batch_size * LENGTH_GROUP_BATCHES).map(longest_first).unbatch()
    batch_count = count_batches(n, batch_size)
    batches = rows.batch(batch_size)
    if training and bucketing:
        batches = batches.shuffle(max(batch_count, 1),
                                  seed=None if seed is None else seed + 1,
                                  reshuffle_each_iteration=reshuffle_each_iteration)
    widths = tf.constant(bucket_widths(sequence_length), tf.int64)
    labels = labels if isinstance(labels, tf.RaggedTensor) else tf.constant(labels)

    def gather(index):
        lengths_here = tf.gather(row_lengths, index)
        longest = tf.reduce_max(lengths_here)
        if pad_to_bucket_boundary:
            longest = widths[tf.searchsorted(widths, [longest])[0]]
        shape = tf.stack([tf.size(index, tf.int64), longest])
        inputs = {name: tf.gather(column, index).to_tensor(padding_values[name], shape=shape)
                  for name, column in features.items()}
        inputs["padding_mask"] = tf.sequence_mask(lengths_here, longest, tf.int32)
        targets = tf.gather(labels, index)
        if isinstance(targets, tf.RaggedTensor):
            targets = targets.to_tensor(label_padding, shape=shape)
        return inputs, targets

    ds = batches.map(gather, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.apply(tf.data.experimental.assert_cardinality(batch_count))
    return ds.prefetch(tf.data.AUTOTUNE)
