"""`build_token_classifier`: a text encoder with a per-token tag head (NER)."""

from __future__ import annotations

import keras

from tfhub_finetune.adaptation import apply_adaptation
from tfhub_finetune.backbones.base import TEXT_INPUTS, TextBackbone
from tfhub_finetune.backbones.loader import load_backbone
from tfhub_finetune.backbones.spec import BackboneSpec
from tfhub_finetune.builders.text_classifier import freeze_pooler
from tfhub_finetune.config import Adaptation
from tfhub_finetune.errors import InputError


def build_token_classifier(
    backbone: str | BackboneSpec | TextBackbone,
    num_tags: int,
    *,
    dropout: float = 0.1,
    adaptation: Adaptation | str = "full",
    name: str = "token_classifier",
) -> keras.Model:
    """Builds a token classifier: softmax over tags at every position of the encoder's output.

    The model takes `token_ids`, `padding_mask`, `segment_ids` (int32,
    (batch, seq)) and returns `probabilities` float32 (batch, seq, num_tags).
    Train it on labels (batch, seq) with -1 where no tag applies (padding,
    [CLS]/[SEP], a word's non-first pieces), e.g.
    `SparseCategoricalCrossentropy(ignore_class=-1)`; `data.token_windows`
    makes such batches from words and tags.

    Args:
        backbone: str, BackboneSpec or TextBackbone. As for
            `build_text_classifier`.
        num_tags: int. Number of tags (IOB2: 1 + 2 x entity types).
        dropout: float. Dropout before the head.
        adaptation: Adaptation or str. As for `build_text_classifier`.
        name: str. Model name.

    Returns:
        An uncompiled `keras.Model`.

    Example:

    ```python
    backbone = load_backbone("minilm_l6_h384")
    model = build_token_classifier(backbone, num_tags=9)
    model.compile(optimizer="adamw",
                  loss=keras.losses.SparseCategoricalCrossentropy(ignore_class=-1))
    ```
    """
    if not isinstance(backbone, TextBackbone):
        backbone = load_backbone(backbone)
        if not isinstance(backbone, TextBackbone):
            raise InputError(
                "The token classifier needs a text backbone.",
                received={"backbone": backbone.spec.name, "modality": backbone.spec.modality},
            )
    if num_tags < 2:
        raise InputError("A token classifier needs at least 2 tags.", received={"num_tags": num_tags})
    encoder = backbone.encoder
    apply_adaptation(encoder, adaptation)
    freeze_pooler(encoder)  # A per-token head never uses it.
    inputs = {n: keras.Input(shape=(None,), dtype="int32", name=n) for n in TEXT_INPUTS}
    sequence = encoder(inputs)["sequence_output"]
    x = keras.layers.Dropout(dropout, name="head_dropout")(sequence) if dropout else sequence
    logits = keras.layers.Dense(num_tags, name="head_logits")(x)
    probabilities = keras.layers.Activation("softmax", dtype="float32", name="probabilities")(logits)
    return keras.Model(inputs, probabilities, name=name)
