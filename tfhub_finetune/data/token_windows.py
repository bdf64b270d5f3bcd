"""Words -> word pieces -> sliding windows, the one alignment training and serving share.

Each word is tokenized on its own by the backbone's tokenizer (a word that
gives no piece, e.g. a lone control character, becomes `[UNK]`), so word
boundaries are exact. A word's tag is predicted on its first word piece; the
other pieces carry label -1 (left out of the loss and the metrics).

Sentences longer than `sequence_length - 2` word pieces are not truncated:
they are cut into windows of `W = sequence_length - 2` pieces whose starts
are `stride` apart, the last one ending at the sentence's end, each packed as
`[CLS] pieces [SEP]`. Every word is predicted in exactly one window, the one
where its first piece has the most context on its nearer side
(`min(pieces before, pieces after)`, earlier window on ties; BERT's SQuAD
rule), so predictions merge back to one tag per word. Training labels follow
the same rule, so each word is trained (and counted) once.

`align_words` is pure TensorFlow (ragged ops) and is traced into the serving
export, so a raw sentence is windowed there exactly as here.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from tfhub_finetune.backbones.base import TextBackbone, TextTokenizer
from tfhub_finetune.data.text import batch_examples

IGNORE = -1


def window_stride(sequence_length: int, stride: int) -> int:
    """The stride in word pieces: `stride`, or half a window when 0."""
    width = sequence_length - 2
    return int(stride) if stride else max(1, width // 2)


def unknown_id(backbone: TextBackbone) -> int:
    """The id of the tokenizer's out-of-vocabulary piece (`[UNK]`)."""
    layer = getattr(backbone.tokenizer, "tokenizer", None)
    token = getattr(layer, "oov_token", "[UNK]")
    vocabulary = backbone.vocabulary or []
    return vocabulary.index(token) if token in vocabulary else int(backbone.tokenizer.pad_id)


def word_pieces(tokenizer: TextTokenizer, words: tf.Tensor, unk_id: int) -> tf.RaggedTensor:
    """(words,) strings -> (words, pieces) int32 ids, at least one piece per word."""
    pieces = tf.cast(tokenizer.tokenize(words), tf.int32)
    lengths = pieces.row_lengths()
    # Prepend [UNK] to every word, then start each non-empty word after it.
    with_unk = tf.concat(
        [tf.RaggedTensor.from_tensor(tf.fill([pieces.nrows(), 1], tf.constant(unk_id, tf.int32))),
         pieces], axis=1,
    )
    starts = with_unk.row_starts() + tf.cast(lengths > 0, tf.int64)
    return tf.gather(with_unk.values, tf.ragged.range(starts, starts + tf.maximum(lengths, 1)))


def align_words(
    pieces: tf.RaggedTensor,
    sentence_splits: tf.Tensor,
    *,
    sequence_length: int,
    stride: int,
    start_id: int,
    end_id: int,
) -> dict[str, tf.Tensor]:
    """Packs sentences into windows and locates each word's first piece in its window.

    Args:
        pieces: RaggedTensor (words, pieces), int32, every row non-empty
            (from `word_pieces`), the words of all sentences in order.
        sentence_splits: int64 (sentences + 1,). Row splits of words into
            sentences.
        sequence_length: int. Window length with [CLS] and [SEP].
        stride: int. Word pieces between window starts (> 0).
        start_id: int. [CLS].
        end_id: int. [SEP].

    Returns:
        `token_ids` RaggedTensor (windows, length) int32 with [CLS]/[SEP];
        `window_sentence` int64 (windows,); `word_window` int64 (words,)
        and `word_position` int64 (words,): where each word is predicted.
    """
    width = sequence_length - 2
    word_lengths = pieces.row_lengths()
    sentence_of_word = tf.RaggedTensor.from_row_splits(word_lengths, sentence_splits).value_rowids()
    # Global index of each word's first piece, and of each sentence's first piece.
    first_piece = tf.cumsum(word_lengths, exclusive=True)
    piece_splits = tf.gather(tf.concat([[0], tf.cumsum(word_lengths)], axis=0), sentence_splits)
    sentence_start, sentence_length = piece_splits[:-1], piece_splits[1:] - piece_splits[:-1]
    position = first_piece - tf.gather(sentence_start, sentence_of_word)

    # Windows: starts 0, stride, 2*stride, ...; the last one ends at the sentence end.
    overflow = tf.maximum(sentence_length - width, 0)
    count = 1 + (overflow + stride - 1) // stride
    k = tf.ragged.range(count)
    window_sentence = k.value_rowids()
    index = k.values
    last_start = tf.gather(overflow, window_sentence)
    start = tf.where(index < tf.gather(count, window_sentence) - 1, index * stride, last_start)
    end = tf.minimum(start + width, tf.gather(sentence_length, window_sentence))
    offset = tf.gather(sentence_start, window_sentence)
    window_pieces = tf.gather(pieces.values, tf.ragged.range(start + offset, end + offset))
    rows = window_pieces.nrows()
    column = lambda value: tf.RaggedTensor.from_tensor(  # noqa: E731
        tf.fill([rows, 1], tf.constant(value, tf.int32)))
    token_ids = tf.concat([column(start_id), window_pieces, column(end_id)], axis=1)

    # Owner window of each word: most context on the nearer side, earlier on ties.
    far = tf.constant(-(2 ** 40), tf.int64)
    starts = tf.RaggedTensor.from_row_lengths(start, count).to_tensor(default_value=far)
    # One always-empty column, so an empty batch still has a window axis to argmax over.
    starts = tf.concat([starts, tf.fill([tf.shape(starts)[0], 1], far)], axis=1)
    most = tf.shape(starts, out_type=tf.int64)[1]
    candidate = tf.gather(starts, sentence_of_word)
    p = position[:, None]
    inside = (candidate <= p) & (p < candidate + width)
    context = tf.minimum(p - candidate, candidate + width - 1 - p)
    order = most - tf.range(most, dtype=tf.int64)[None, :]
    key = tf.where(inside, context * (most + 1) + order, tf.constant(-1, tf.int64))
    owner = tf.argmax(key, axis=1, output_type=tf.int64)
    window_offset = tf.cumsum(count, exclusive=True)
    word_window = tf.gather(window_offset, sentence_of_word) + owner
    word_position = position - tf.gather(candidate, owner, batch_dims=1) + 1  # After [CLS].
    return {
        "token_ids": token_ids,
        "window_sentence": window_sentence,
        "word_window": word_window,
        "word_position": word_position,
    }


@dataclasses.dataclass
class WindowedSentences:
    """Tagged sentences as packed windows, ready to batch.

    Attributes:
        token_ids: RaggedTensor (windows, length). [CLS] pieces [SEP].
        labels: RaggedTensor (windows, length). Tag id on each word's first
            piece in its owner window, -1 elsewhere.
        word_window: int64 (words,). Window that predicts each word.
        word_position: int64 (words,). Its position in that window.
        sentence_splits: int64 (sentences + 1,). Words of each sentence.
        window_sentence: int64 (windows,). Sentence of each window.
        tag_ids: int32 (words,). Gold tag of each word.
        sequence_length: int. Longest window.
    """

    token_ids: tf.RaggedTensor
    labels: tf.RaggedTensor
    word_window: np.ndarray
    word_position: np.ndarray
    sentence_splits: np.ndarray
    window_sentence: np.ndarray
    tag_ids: np.ndarray
    sequence_length: int
    lengths: np.ndarray = dataclasses.field(init=False)

    def __post_init__(self):
        self.lengths = self.token_ids.row_lengths().numpy()

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_sentences(self) -> int:
        return len(self.sentence_splits) - 1

    @property
    def windowed_sentences(self) -> int:
        """Sentences longer than one window."""
        return int((np.bincount(self.window_sentence) > 1).sum())


def window_sentences(
    words: list[list[str]],
    tag_ids: list[list[int]],
    backbone: TextBackbone,
    *,
    sequence_length: int,
    stride: int,
    batch_size: int = 4096,
) -> WindowedSentences:
    """Tokenizes every word once (batched tf.data map) and windows the sentences.

    Example:

    ```python
    data = window_sentences([["EU", "rejects", "German", "call"]], [[1, 0, 2, 0]], backbone,
                            sequence_length=128, stride=0)
    ```
    """
    tokenizer = backbone.tokenizer
    unk = unknown_id(backbone)
    flat = [w for sentence in words for w in sentence]
    splits = np.concatenate([[0], np.cumsum([len(s) for s in words])]).astype(np.int64)
    strings = tf.data.Dataset.from_tensor_slices(tf.constant(flat, tf.string))
    batches = strings.batch(batch_size).map(
        lambda w: word_pieces(tokenizer, w, unk), num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    parts = list(batches)
    pieces = tf.concat(parts, axis=0) if parts else tf.ragged.constant([], tf.int32, ragged_rank=1)
    aligned = align_words(
        pieces, tf.constant(splits), sequence_length=sequence_length,
        stride=window_stride(sequence_length, stride),
        start_id=int(tokenizer.start_id), end_id=int(tokenizer.end_id),
    )
    token_ids = aligned["token_ids"]
    flat_tags = np.asarray([t for sentence in tag_ids for t in sentence], np.int32)
    at = tf.gather(token_ids.row_starts(), aligned["word_window"]) + aligned["word_position"]
    label_values = tf.tensor_scatter_nd_update(
        tf.fill(tf.shape(token_ids.values), tf.constant(IGNORE, tf.int32)),
        at[:, None], tf.constant(flat_tags),
    )
    return WindowedSentences(
        token_ids=token_ids,
        labels=token_ids.with_values(label_values),
        word_window=aligned["word_window"].numpy(),
        word_position=aligned["word_position"].numpy(),
        sentence_splits=splits,
        window_sentence=aligned["window_sentence"].numpy(),
        tag_ids=flat_tags,
        sequence_length=sequence_length,
    )


def make_token_dataset(
    data: WindowedSentences,
    *,
    pad_id: int,
    batch_size: int,
    training: bool,
    seed: int = 0,
    reshuffle_each_iteration: bool = True,
    bucketing: bool = True,
    pad_to_bucket_boundary: bool = False,
) -> tf.data.Dataset:
    """Batches windows into `({token_ids, padding_mask, segment_ids}, labels)`.

    Training shuffles (seeded) and groups by length like `data.text`
    (`batch_examples`); evaluation keeps window order. Each batch is padded to
    its longest window (with `pad_to_bucket_boundary`, to the first of
    `data.text.bucket_widths` covering it); padded labels are -1.
    """
    return batch_examples(
        {"token_ids": data.token_ids, "segment_ids": tf.zeros_like(data.token_ids)},
        {"token_ids": pad_id, "segment_ids": 0},
        data.labels, data.lengths, data.sequence_length, label_padding=IGNORE,
        batch_size=batch_size, training=training, seed=seed,
        reshuffle_each_iteration=reshuffle_each_iteration, bucketing=bucketing,
        pad_to_bucket_boundary=pad_to_bucket_boundary,
    )


def predict_words(model, dataset: tf.data.Dataset, data: WindowedSentences) -> tuple[np.ndarray, np.ndarray]:
    """Per word: the predicted tag id and its probability, from its owner window.

    Batches have different lengths, so `model.predict` (which concatenates
    them) cannot be used; each batch is reduced to its argmax first.
    """
    tags, scores = [], []
    for x, _ in dataset:
        probabilities = np.asarray(model.predict_on_batch(x))
        tags.extend(probabilities.argmax(-1))
        scores.extend(probabilities.max(-1))
    word_tags = np.fromiter((tags[w][q] for w, q in zip(data.word_window, data.word_position,
                                                           strict=True)),
                            np.int32, count=len(data.word_window))
    word_scores = np.fromiter((scores[w][q] for w, q in zip(data.word_window, data.word_position,
                                                               strict=True)),
                              np.float32, count=len(data.word_window))
    return word_tags, word_scores
