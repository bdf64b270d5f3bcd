"""`build_text_classifier`: a text encoder with pooling and a task head."""

from __future__ import annotations

import keras

from tfhub_finetune.adaptation import apply_adaptation, check_adaptation
from tfhub_finetune.backbones.base import TEXT_INPUTS, TextBackbone
from tfhub_finetune.backbones.loader import load_backbone
from tfhub_finetune.backbones.spec import BackboneSpec
from tfhub_finetune.config import Adaptation
from tfhub_finetune.errors import InputError
from tfhub_finetune.heads import build_head

POOLINGS = ("auto", "cls", "pooler", "mean")


@keras.saving.register_keras_serializable(package="tfhub_finetune")
class MaskedMeanPooling(keras.layers.Layer):
    """Mean of token vectors where `padding_mask` is 1 (sentence-transformers pooling).

    Example:

    ```python
    pooled = MaskedMeanPooling()(sequence_output, padding_mask)
    ```
    """

    def call(self, sequence, mask):
        mask = keras.ops.cast(keras.ops.expand_dims(mask, -1), sequence.dtype)
        total = keras.ops.sum(sequence * mask, axis=1)
        count = keras.ops.maximum(keras.ops.sum(mask, axis=1), keras.ops.cast(1.0, mask.dtype))
        return total / count

    def compute_output_shape(self, sequence_shape, mask_shape=None):
        return (sequence_shape[0], sequence_shape[-1])


@keras.saving.register_keras_serializable(package="tfhub_finetune")
class FirstToken(keras.layers.Layer):
    """The first ([CLS]) token's vector of a sequence."""

    def call(self, sequence):
        return sequence[:, 0, :]

    def compute_output_shape(self, sequence_shape):
        return (sequence_shape[0], sequence_shape[-1])


def freeze_pooler(encoder: keras.Model) -> None:
    """An unused pooler gets no gradients; frozen, AdamW allocates (and warns about) no state for it."""
    for layer in getattr(encoder, "layers", []):
        if layer.name == "pooled_dense":
            layer.trainable = False


def build_text_classifier(
    backbone: str | BackboneSpec | TextBackbone,
    num_classes: int,
    *,
    task: str = "single_label",
    pooling: str = "auto",
    dropout: float = 0.1,
    adaptation: Adaptation | str = "full",
    name: str = "text_classifier",
) -> keras.Model:
    """Builds a text classifier on a pretrained (or scratch) encoder.

    The model takes token ids (`token_ids`, `padding_mask`, `segment_ids`,
    int32, (batch, seq)) as produced by `tfhub_finetune.data.text`; the serving
    export puts the tokenizer in front of it for raw strings.

    Args:
        backbone: str, BackboneSpec or TextBackbone. A catalog name
            (`minilm_l6_h384`, `minilm_l6_h384@layers=2`, `scratch_text_encoder`),
            a local directory, a TF Hub handle, or an already loaded backbone
            (pass a loaded one to share its tokenizer with your data pipeline).
        num_classes: int. Number of classes, or outputs for regression.
        task: str. `single_label`, `multi_label` or `regression`.
        pooling: str. `cls` (first token), `pooler` (the encoder's pooled
            output), `mean` (masked mean) or `auto` (what the encoder was
            trained with, from its spec).
        dropout: float. Dropout before the head.
        adaptation: Adaptation or str. What trains: `full`, `head` (the
            encoder frozen), `top:K` (the last K transformer blocks) or
            `lora:R` (keras-hub LoRA adapters; `adaptation.merge_lora` before
            serving). Defaults to `"full"`.
        name: str. Model name.

    Returns:
        A plain `keras.Model`, uncompiled, ready for your own compile/fit.

    Example:

    ```python
    backbone = load_backbone("minilm_l6_h384")
    model = build_text_classifier(backbone, num_classes=2)
    model.compile(optimizer="adamw", loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    ```
    """
    if not isinstance(backbone, TextBackbone):
        backbone = load_backbone(backbone)
        if not isinstance(backbone, TextBackbone):
            raise InputError(
                "The text classifier needs a text backbone.",
                received={"backbone": backbone.spec.name, "modality": backbone.spec.modality},
                fix="Use the image pipeline/builder for image backbones.",
            )
    if pooling not in POOLINGS:
        raise InputError(
            "Unknown pooling.", received={"pooling": pooling}, fix=f"Expected one of: {POOLINGS}."
        )
    if pooling == "auto":
        pooling = backbone.spec.default_pooling
    adaptation = Adaptation.parse(adaptation)
    check_adaptation(adaptation, backbone.spec)
    encoder = backbone.encoder
    apply_adaptation(encoder, adaptation)
    if pooling != "pooler":
        freeze_pooler(encoder)

    inputs = {n: keras.Input(shape=(None,), dtype="int32", name=n) for n in TEXT_INPUTS}
    outputs = encoder(inputs)
    if pooling == "pooler":
        features = outputs["pooled_output"]
    elif pooling == "mean":
        features = MaskedMeanPooling(name="mean_pooling")(
            outputs["sequence_output"], inputs["padding_mask"]
        )
    else:
        features = FirstToken(name="cls_pooling")(outputs["sequence_output"])
    predictions = build_head(features, num_classes, task=task, dropout=dropout)
    return keras.Model(inputs, predictions, name=name)
