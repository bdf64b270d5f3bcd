"""TF Serving SavedModels for token classifiers (NER): raw sentences in, entities out; and token ids.

Layout and versioning as `export.py` (`<export_dir>/<model_name>/<version>`
and `<export_dir>/<model_name>_token_ids/<version>`, staged and renamed).

Raw-string model, `serving_default(text: string[batch])` (Predict API). In
the graph: invalid UTF-8 becomes U+FFFD; words are the whitespace-separated
parts of the text (Python's `str.split()` whitespace, core ops only), as in
the CoNLL training files, so punctuation attached to a word belongs to it;
each word is tokenized on its own by the backbone's tokenizer, and long
sentences are windowed, exactly as in training (`data.token_windows`); each
word's tag is read at its first word piece; entities are decoded from the
IOB2 tags as `entities.get_entities` (seqeval) does. Outputs, padded per
batch:

- `entity_text` string `[batch, max_entities]`, `entity_type` string,
  `entity_start` / `entity_end` int32 (character offsets into the input,
  end exclusive, so `text[start:end]` in Python is the entity), and
  `entity_score` float32 (mean probability of the predicted tags over the
  entity's words); `num_entities` int32 `[batch]`. Padding: `""`, -1, 0.
- `word_tags` string `[batch, max_words]` (IOB2 tag of each word, `""`
  padding) and `num_words` int32 `[batch]`.

An empty or whitespace-only sentence has no words and no entities; an empty
batch gives empty outputs.

Token-id model (`<model_name>_token_ids`, core TensorFlow ops only):
`serving_default(token_ids, padding_mask, segment_ids: int32[windows, seq])`
-> `probabilities` float32 `[windows, seq, tags]`, `tag_ids` int32
`[windows, seq]`. The client splits words, windows and reads each word's
first piece (`pipelines.predict` does, with `text_client`); the tags, the
sequence length and the stride are in the model card.

Example:

```python
path = export_token_classifier(model, backbone, labels, "exports", model_name="conll",
                               model_dir="runs/conll2003")
# exports/conll/1 (sentences) and exports/conll_token_ids/1 (token ids)
```
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

from tfhub_finetune.backbones.base import TEXT_INPUTS, TextBackbone
from tfhub_finetune.data.labels import LabelVocabulary
from tfhub_finetune.data.token_windows import align_words, unknown_id, window_stride, word_pieces
from tfhub_finetune.errors import InputError
from tfhub_finetune.export import (
    _checked_token_inputs,
    _client_tokenizer_settings,
    _export_base,
    _median_ms,
    _model_card,
    _model_name,
    _read_json,
    _sequence_length,
    _serving_graph_card,
    _text_warmup_requests,
    exported_in_serving_precision,
    publish_text_models,
    serving_lowering,
    warmup_shapes,
)

# Python's str.isspace() characters: words split exactly as `str.split()` splits.
_WHITESPACE = [c for c in range(sys.maxunicode + 1) if chr(c).isspace()]


def split_words(text: tf.Tensor) -> dict[str, tf.Tensor]:
    """Whitespace-separated words of each string, with character and byte offsets (core ops).

    Returns:
        `words` string (words,), `sentence_splits` int64 (batch + 1,),
        `char_start`/`char_end` int64 (words,) and `byte_start`/`byte_end`
        int64 (words,), ends exclusive.
    """
    codes, offsets = tf.strings.unicode_decode_with_offsets(text, "UTF-8")
    flat = codes.values
    row = codes.value_rowids()
    n = tf.shape(flat, out_type=tf.int64)[0]
    space = tf.reduce_any(tf.equal(flat[:, None], tf.constant(_WHITESPACE, tf.int32)[None, :]), axis=1)
    index = tf.range(n) - tf.gather(codes.row_starts(), row)
    last = index == tf.gather(codes.row_lengths(), row) - 1
    previous_space = tf.concat([[True], space[:-1]], axis=0) | (index == 0)
    next_space = tf.concat([space[1:], [True]], axis=0) | last
    begins, ends = ~space & previous_space, ~space & next_space
    byte_offset = offsets.values
    # The byte after each character: the next character's offset, or the string's length.
    lengths = tf.strings.length(text, unit="BYTE")
    byte_after = tf.where(last, tf.cast(tf.gather(lengths, row), tf.int64),
                          tf.concat([byte_offset[1:], tf.zeros([1], tf.int64)], axis=0)[:n])
    word_row = tf.boolean_mask(row, begins)
    byte_start = tf.boolean_mask(byte_offset, begins)
    byte_end = tf.boolean_mask(byte_after, ends)
    words = tf.strings.substr(tf.gather(text, word_row), byte_start, byte_end - byte_start)
    splits = tf.RaggedTensor.from_value_rowids(
        word_row, word_row, nrows=tf.shape(text, out_type=tf.int64)[0]).row_splits
    return {
        "words": words,
        "sentence_splits": splits,
        "char_start": tf.boolean_mask(index, begins),
        "char_end": tf.boolean_mask(index, ends) + 1,
        "byte_start": byte_start,
        "byte_end": byte_end,
    }


def decode_entities(
    tag_ids: tf.Tensor, scores: tf.Tensor, sentence_splits: tf.Tensor, names: Sequence[str]
) -> dict[str, tf.Tensor]:
    """IOB2 tag ids of all words -> entities, as `entities.get_entities` (seqeval) decodes them.

    An entity starts at `B-X`, or at `I-X` after `O`, another type or a
    sentence start, and continues over `I-X` of its type.

    Args:
        tag_ids: int64 (words,). Predicted tag of every word of the batch.
        scores: float32 (words,). Its probability.
        sentence_splits: int64 (sentences + 1,). Words of each sentence.
        names: the tag names, `O` / `B-X` / `I-X`.

    Returns:
        Per entity, in order: `first_word`, `last_word` (indices into the
        words), `type` (string) and `score` (mean of its words' scores).
    """
    kinds = sorted({n[2:] for n in names if n != "O"}) or [""]
    kind_of = tf.constant([kinds.index(n[2:]) if n != "O" else -1 for n in names], tf.int64)
    kind = tf.gather(kind_of, tag_ids)
    begin = tf.gather(tf.constant([n.startswith("B-") for n in names]), tag_ids)
    n = tf.shape(tag_ids, out_type=tf.int64)[0]
    word = tf.range(n)
    sentence_first = tf.reduce_any(tf.equal(word[:, None], sentence_splits[None, :-1]), axis=1)
    previous_kind = tf.where(sentence_first, tf.constant(-1, tf.int64),
                             tf.concat([[-1], kind[:-1]], axis=0)[:n])
    inside = kind >= 0
    continues = inside & ~begin & tf.equal(kind, previous_kind)
    starts = inside & ~continues
    entity = tf.boolean_mask(tf.cumsum(tf.cast(starts, tf.int64)) - 1, inside)
    count = tf.reduce_sum(tf.cast(starts, tf.int64))
    first = tf.boolean_mask(word, starts)
    return {
        "first_word": first,
        "last_word": tf.math.unsorted_segment_max(tf.boolean_mask(word, inside), entity, count),
        "type": tf.gather(tf.constant(kinds), tf.gather(kind, first)),
        "score": tf.math.unsorted_segment_mean(tf.boolean_mask(scores, inside), entity, count),
    }


@exported_in_serving_precision
def export_token_classifier(
    model: keras.Model,
    backbone: TextBackbone,
    labels: LabelVocabulary | Sequence[str],
    export_dir: str | os.PathLike,
    *,
    model_name: str | None = None,
    model_dir: str | os.PathLike | None = None,
    metrics: dict[str, Any] | None = None,
    sequence_length: int | None = None,
    stride: int | None = None,
    measure_latency: bool = True,
    serving_precision: str = "float32",
    lean_serving_graph: bool = True,
) -> str:
    """Writes a token classifier as two TF Serving SavedModels: raw sentences and token ids.

    See the module docstring for the signatures.

    Args:
        model: keras.Model. From `build_token_classifier`, trained.
        backbone: TextBackbone. The backbone the model was built on.
        labels: LabelVocabulary or list of str. IOB2 tag names in id order.
        export_dir: str or path. Base folder.
        model_name: str or None. Defaults to the name of `model_dir`.
        model_dir: str, path or None. The training folder (`params.json`:
            sequence length and window stride; `metrics.json`: the card's
            figures).
        metrics: dict or None. Overrides `model_dir/metrics.json`.
        sequence_length: int or None. Window length; default from params.json.
        stride: int or None. Window stride; default from params.json (0: half
            a window).
        measure_latency: bool. Time batch-1 calls for the model card.
        serving_precision: str. `float32` (default), `as_trained` or `auto`,
            as for `export_text_classifier`.
        lean_serving_graph: bool. Serve a keras-hub BERT encoder through
            `serving_graph.lower_text_model`, as for `export_text_classifier`.
            Defaults to `True`.

    Returns:
        The raw-string SavedModel's version folder.

    Raises:
        InputError: for a model that is not a token classifier on token ids,
            or tags that do not match its outputs.

    Example:

    ```python
    path = export_token_classifier(model, task.backbone, task.labels, "exports",
                                   model_dir="runs/conll2003")
    ```
    """
    if not isinstance(backbone, TextBackbone):
        raise InputError("The token export needs the TextBackbone the model was built on.",
                         received={"backbone": type(backbone).__name__})
    if (not isinstance(model.input, dict) or not set(TEXT_INPUTS) <= set(model.input)
            or len(model.outputs[0].shape) != 3):
        raise InputError("The token export needs a token classifier on token ids.",
                         received={"model": model.name},
                         fix="Pass a model from build_token_classifier.")
    names = list(labels.names) if isinstance(labels, LabelVocabulary) else list(labels)
    if model.outputs[0].shape[-1] != len(names):
        raise InputError("The number of tags does not match the model's outputs.",
                         received={"tags": len(names), "model_outputs": model.outputs[0].shape[-1]},
                         fix="Pass the LabelVocabulary saved with the model (labels.json).")
    base = _export_base(export_dir)
    params = _read_json(model_dir, "params.json")
    model_name = _model_name(model_name, model_dir, model)
    sequence_length = _sequence_length(sequence_length, params, backbone)
    if stride is None:
        stride = int((params or {}).get("model", {}).get("window_stride", 0))
    stride = window_stride(sequence_length, stride)
    tokenizer = backbone.tokenizer
    start_id, end_id, pad_id = int(tokenizer.start_id), int(tokenizer.end_id), int(tokenizer.pad_id)
    unk = unknown_id(backbone)
    names_tensor = tf.constant(names)
    lowered = serving_lowering(model, serving_precision, lean_serving_graph)
    served = lowered or functools.partial(model, training=False)

    def tag_words(text: tf.Tensor) -> dict[str, tf.Tensor]:
        text = tf.strings.unicode_transcode(text, "UTF-8", "UTF-8", errors="replace",
                                            replacement_char=0xFFFD)
        words = split_words(text)
        pieces = word_pieces(tokenizer, words["words"], unk)
        aligned = align_words(pieces, words["sentence_splits"], sequence_length=sequence_length,
                              stride=stride, start_id=start_id, end_id=end_id)
        ids = aligned["token_ids"]
        inputs = {"token_ids": ids.to_tensor(default_value=pad_id),
                  "padding_mask": tf.ones_like(ids).to_tensor(default_value=0)}
        inputs["segment_ids"] = tf.zeros_like(inputs["token_ids"])
        probabilities = tf.cast(served(inputs), tf.float32)
        at = tf.stack([aligned["word_window"], aligned["word_position"]], axis=1)
        word_probabilities = tf.gather_nd(probabilities, at)
        return {**words, "text": text, "tag_ids": tf.argmax(word_probabilities, axis=1),
                "scores": tf.reduce_max(word_probabilities, axis=1)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def serve_text(text):
        tagged = tag_words(text)
        splits = tagged["sentence_splits"]
        found = decode_entities(tagged["tag_ids"], tagged["scores"], splits, names)
        first, last = found["first_word"], found["last_word"]
        row = tf.gather(tf.RaggedTensor.from_row_splits(tagged["words"], splits).value_rowids(),
                        first)
        batch = tf.shape(text, out_type=tf.int64)[0]

        def per_sentence(values, default):
            return tf.RaggedTensor.from_value_rowids(values, row, nrows=batch).to_tensor(
                default_value=default)

        byte_start = tf.gather(tagged["byte_start"], first)
        byte_end = tf.gather(tagged["byte_end"], last)
        entity_text = tf.strings.substr(tf.gather(tagged["text"], row), byte_start,
                                        byte_end - byte_start)
        word_tags = tf.RaggedTensor.from_row_splits(tf.gather(names_tensor, tagged["tag_ids"]),
                                                    splits)
        return {
            "entity_text": per_sentence(entity_text, ""),
            "entity_type": per_sentence(found["type"], ""),
            "entity_start": per_sentence(tf.cast(tf.gather(tagged["char_start"], first), tf.int32),
                                         -1),
            "entity_end": per_sentence(tf.cast(tf.gather(tagged["char_end"], last), tf.int32), -1),
            "entity_score": per_sentence(found["score"], 0.0),
            "num_entities": tf.cast(
                tf.RaggedTensor.from_value_rowids(row, row, nrows=batch).row_lengths(), tf.int32),
            "word_tags": word_tags.to_tensor(default_value=""),
            "num_words": tf.cast(word_tags.row_lengths(), tf.int32),
        }

    token_spec = {n: tf.TensorSpec([None, None], tf.int32, name=n) for n in TEXT_INPUTS}
    vocab_size = int(tokenizer.vocabulary_size)
    max_positions = int(backbone.max_sequence_length)
    num_segments = getattr(backbone.encoder, "num_segments", None)

    @tf.function(input_signature=[token_spec])
    def serve_token_ids(inputs):
        checked = _checked_token_inputs(inputs, vocab_size, max_positions, num_segments)
        probabilities = tf.cast(served(checked), tf.float32)
        return {"probabilities": probabilities,
                "tag_ids": tf.argmax(probabilities, axis=-1, output_type=tf.int32)}

    raw_signatures = {"serving_default": serve_text.get_concrete_function()}
    ids_signatures = {"serving_default": serve_token_ids.get_concrete_function()}

    latency = {}
    if measure_latency:
        latency["serving_default"] = _median_ms(
            raw_signatures["serving_default"],
            {"text": tf.constant(["George Washington went to Washington ."])})
    warm_shapes = warmup_shapes(sequence_length, False)  # The card lists what is written.
    preprocessing = {
        "modality": "tokens",
        "text_inputs": ["text"],
        "words": "whitespace-separated (Python str.split()); punctuation attached to a word "
        "belongs to it",
        "tagging": "each word's tag is predicted on its first word piece",
        "tag_scheme": "IOB2",
        "sequence_length": sequence_length,
        "window_stride": stride,
        "windows": "sentences over sequence_length - 2 word pieces are split into windows "
        "window_stride pieces apart (the last ends at the sentence end); each word is predicted "
        "in the window where its first piece has the most context on its nearer side",
        "start_id": start_id,
        "end_id": end_id,
        "pad_id": pad_id,
        "unk_id": unk,
        "vocabulary_size": vocab_size,
        "max_positions": max_positions,
        "lowercase": bool(backbone.lowercase),
        "invalid_utf8": "replaced by U+FFFD",
        "client_tokenizer": _client_tokenizer_settings(backbone),
        # `assets.extra/tf_serving_warmup_requests`: TF Serving replays these at load.
        "warmup_shapes": [list(shape) for shape in warm_shapes],
        "serving_graph": _serving_graph_card(lowered),
    }
    card = _model_card(
        model=model, model_name=model_name, names=names, task="token_classification",
        backbone_spec=backbone.spec, params=params,
        metrics=metrics if metrics is not None else _read_json(model_dir, "metrics.json"),
        preprocessing=preprocessing, latency=latency,
        compute_dtype=lowered.compute_dtype if lowered else None,
    )

    return publish_text_models(
        model, backbone, base, model_name, card,
        variables=lowered.served_variables if lowered else None,
        raw={"serve_text": serve_text}, raw_signatures=raw_signatures,
        token_ids={"serve_token_ids": serve_token_ids}, token_id_signatures=ids_signatures,
        warmup=_text_warmup_requests(backbone.tokenizer, warm_shapes, ("text",), start_id=start_id,
                                     end_id=end_id),
    )
