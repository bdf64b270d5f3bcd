"""What a loaded backbone looks like to the builders, whatever its source.

Every source module (`keras_hub_source`, `tf_hub_source`, `image_source`,
`scratch`) returns one of these two, so builders, data pipelines and exports
never branch on where the weights came from.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import keras
import tensorflow as tf

from tfhub_finetune.backbones.spec import BackboneSpec

# The text encoder's input names, as keras-hub's BERT preprocessors emit them.
TEXT_INPUTS = ("token_ids", "padding_mask", "segment_ids")


class TextTokenizer(Protocol):
    """Strings to word-piece ids, without special tokens or padding.

    `tokenize` must be traceable inside `tf.data.Dataset.map` and a
    `tf.function` (it is exported into serving graphs).
    """

    start_id: int
    end_id: int
    pad_id: int
    vocabulary_size: int

    def tokenize(self, strings: tf.Tensor) -> tf.RaggedTensor:
        """(batch,) tf.string -> (batch, None) int32 ragged ids."""
        ...


@dataclasses.dataclass
class TextBackbone:
    """A loaded text encoder and the tokenizer it was trained with.

    Attributes:
        spec: BackboneSpec. What was loaded.
        encoder: keras.Model. Takes a dict with `token_ids`, `padding_mask`,
            `segment_ids` (int32, (batch, seq)) and returns a dict with
            `sequence_output` (batch, seq, hidden) and `pooled_output`
            (batch, hidden).
        tokenizer: TextTokenizer. Strings to ids, as the encoder expects.
        hidden_dim: int. Width of `sequence_output`.
        max_sequence_length: int. Longest input the position table allows.
        vocabulary: list of str or None. Word-piece vocabulary, when known
            (exported with the model so clients can tokenize).
        lowercase: bool. Whether the tokenizer lowercases.
    """

    spec: BackboneSpec
    encoder: keras.Model
    tokenizer: TextTokenizer
    hidden_dim: int
    max_sequence_length: int
    vocabulary: list[str] | None = None
    lowercase: bool = True
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ImageBackbone:
    """A loaded image feature extractor.

    Attributes:
        spec: BackboneSpec. What was loaded.
        encoder: keras.Model. Takes float32 images (batch, size, size, 3)
            already normalised per `spec.pixel_convention` and returns a
            feature vector (batch, features).
        image_size: int. Input side in pixels.
        pixel_convention: str. How raw 0..255 pixels are normalised.
        feature_dim: int. Width of the feature vector.
    """

    spec: BackboneSpec
    encoder: keras.Model
    image_size: int
    pixel_convention: str
    feature_dim: int
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
