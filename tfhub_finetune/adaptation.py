"""How much of a backbone trains: apply an `Adaptation` to an encoder, and merge LoRA for export.

* `full`: every weight trains (a pretrained CNN's BatchNorm stays frozen, see
  `builders.image_classifier.set_backbone_trainable`).
* `head`: the encoder is frozen; only the task head trains.
* `top:K`: only the last K blocks and what sits above them train. Text
  encoders: the last K `transformer_layer_*` (and the pooler where it is
  used); embeddings frozen. CNNs: the last K *stages*, a stage being a run of
  consecutive blocks with the same output width (EfficientNet's block2a/2b,
  MobileNetV2's block_3..5), plus the final 1x1 conv above them; the stem is
  frozen. TF Hub SavedModels are one opaque layer and cannot do this.
* `lora:R`: keras-hub's own `Backbone.enable_lora(rank=R)` (adapters on the
  attention query/value `EinsumDense` layers; everything else frozen).
  `merge_lora` rebuilds the model without adapters and loads the merged
  kernels Keras' `save_own_variables` writes (`kernel + alpha/r * A @ B`), so
  the export has plain kernels and serves as fast as a full fine-tune.

Keras saves a LoRA layer's *merged* kernel and, on load, zeroes A and B:
right for serving, wrong for resuming (A = B = 0 gets no gradient).
`lora_state` / `restore_lora_state` carry the raw kernel and adapters through
`training.fit_resumable`'s backups.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import keras
import numpy as np

from tfhub_finetune.config import Adaptation
from tfhub_finetune.errors import InputError

_TRANSFORMER_BLOCK = re.compile(r"^transformer_layer_(\d+)$")
# EfficientNet (keras-hub) `block2a_...`, the scratch CNN `block2_conv1`, MobileNetV2
# (keras.applications) `block_2_...` and its first block `expanded_conv_...`.
_CNN_BLOCK = re.compile(r"^(?:block(\d+)([a-z]?)_|block_(\d+)_|(expanded_conv)_)")


def check_adaptation(adaptation: Adaptation, spec) -> None:
    """Rejects what the backbone's source or modality cannot do, before any data is read.

    Args:
        adaptation: Adaptation. Validated.
        spec: BackboneSpec. The backbone to adapt.

    Raises:
        InputError: `lora` on an image backbone or a TF Hub one; `top` on a TF Hub one.
    """
    if adaptation.kind == "lora" and spec.modality == "image":
        raise InputError(
            "LoRA is for text encoders: keras-hub has no LoRA for image CNNs.",
            received={"adaptation": str(adaptation)},
            fix="Use --adaptation=full, head or top:K (the last K CNN stages).",
        )
    if adaptation.kind in ("lora", "top") and spec.source == "tf_hub":
        raise InputError(
            "A TF Hub SavedModel is one opaque layer: it trains whole or not at all.",
            received={"adaptation": str(adaptation), "backbone": spec.name},
            fix="Use --adaptation=full or head, or a keras-hub backbone for top:K / lora:R.",
        )


def apply_adaptation(encoder: keras.Model, adaptation: Adaptation | str, *,
                     pretrained: bool = True) -> None:
    """Sets which of `encoder`'s weights train; compile afterwards.

    Args:
        encoder: keras.Model. A text or image backbone's encoder.
        adaptation: Adaptation or str. `full`, `head`, `top:K` or `lora:R`.
        pretrained: bool. Keep BatchNorm layers frozen where the encoder trains
            (pretrained CNNs). Defaults to `True`.

    Raises:
        InputError: K above the encoder's number of blocks/stages, or LoRA on
            an encoder with no keras-hub backbone inside.

    Example:

    ```python
    apply_adaptation(backbone.encoder, "top:2")
    ```
    """
    adaptation = Adaptation.parse(adaptation)
    if adaptation.kind == "head":
        encoder.trainable = False
        return
    if adaptation.kind == "lora":
        _keras_hub_backbone(encoder, adaptation).enable_lora(adaptation.rank)
        return
    encoder.trainable = True
    if adaptation.kind == "top":
        for layer in _top_layers(encoder, adaptation):
            layer.trainable = True
    if pretrained:
        # A non-trainable BatchNormalization runs in inference mode, keeping ImageNet's
        # statistics (Keras 3 overrides a nested `training=False` during fit).
        for layer in encoder._flatten_layers(include_self=False, recursive=True):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False


def count_trainable(model: keras.Model) -> int:
    """Elements of `model`'s trainable weights."""
    return int(sum(int(np.prod(w.shape)) for w in model.trainable_weights))


def _keras_hub_backbone(encoder: keras.Model, adaptation: Adaptation):
    import keras_hub

    if isinstance(encoder, keras_hub.models.Backbone):
        return encoder
    for layer in encoder._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras_hub.models.Backbone):
            return layer
    raise InputError(
        "LoRA needs a keras-hub backbone (it uses keras-hub's Backbone.enable_lora).",
        received={"adaptation": str(adaptation), "encoder": encoder.name},
        fix="Use a keras-hub text encoder (e.g. minilm_l6_h384), or --adaptation=full/head/top:K.",
    )


def _ordered_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Weighted layers in graph order, nested functional models inlined."""
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model) and hasattr(layer, "layers") and layer.layers:
            out.extend(_ordered_layers(layer))
        elif layer.weights:
            out.append(layer)
    return out


def _top_layers(encoder: keras.Model, adaptation: Adaptation) -> list[keras.layers.Layer]:
    """Freezes every weighted layer of `encoder`; returns those `top:K` trains.

    The containers (nested functional models) stay trainable: a Keras model
    marked untrainable hides every weight inside it, frozen or not.
    """
    k = adaptation.blocks
    layers = _ordered_layers(encoder)
    for layer in layers:
        layer.trainable = False
    text_blocks = [layer for layer in layers if _TRANSFORMER_BLOCK.match(layer.name)]
    if text_blocks:
        if k > len(text_blocks):
            _too_deep(adaptation, len(text_blocks), "transformer blocks")
        first = layers.index(text_blocks[-k])
        # Above the blocks sits only the pooler (kept frozen by the builder when unused).
        return layers[first:]
    stages = _cnn_stages(layers)
    if not stages:
        raise InputError(
            "top:K found no transformer blocks or CNN stages in this backbone.",
            received={"adaptation": str(adaptation), "encoder": encoder.name},
            fix="Use --adaptation=full or head.",
        )
    if k > len(stages):
        _too_deep(adaptation, len(stages), "CNN stages")
    # The stage's first layer onwards: its blocks and the final conv above the last stage.
    return layers[layers.index(stages[-k][0]):]


def _cnn_stages(layers: list[keras.layers.Layer]) -> list[list[keras.layers.Layer]]:
    """Groups the layers of named CNN blocks into stages: runs of blocks of one output width."""
    blocks: dict[str, list[keras.layers.Layer]] = {}
    for layer in layers:
        match = _CNN_BLOCK.match(layer.name)
        if match:
            key = "".join(g or "" for g in match.groups())
            blocks.setdefault(key, []).append(layer)
    stages: list[list[keras.layers.Layer]] = []
    last_width = None
    for block in blocks.values():
        widths = [getattr(layer, "filters", None) for layer in block]
        width = next((w for w in reversed(widths) if w), None)
        if stages and width == last_width:
            stages[-1].extend(block)
        else:
            stages.append(list(block))
        last_width = width
    return stages


def _too_deep(adaptation: Adaptation, depth: int, what: str) -> None:
    raise InputError(
        f"top:K asks for more {what} than the backbone has ({depth}).",
        received={"adaptation": str(adaptation)},
        fix=f"Use top:K with 1 <= K <= {depth}, or --adaptation=full.",
    )


# --------------------------------------------------------------------------- #
# LoRA: merge for export, carry through backups
# --------------------------------------------------------------------------- #


def lora_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers of `model` with LoRA enabled, in a fixed order."""
    return [layer for layer in model._flatten_layers(include_self=False, recursive=True)
            if getattr(layer, "lora_enabled", False)]


def merge_lora(model: keras.Model) -> keras.Model:
    """Returns `model` with its LoRA adapters merged into plain kernels (`model` if it has none).

    The model is rebuilt from its config (a keras-hub backbone's config is its
    constructor arguments, so the rebuilt one has no adapters) and loads the
    weights Keras saves for a LoRA layer: `kernel + (alpha / rank) * A @ B`.
    Call it under the strategy scope the model was built in.

    Example:

    ```python
    served = merge_lora(model)  # Plain EinsumDense kernels; predicts as `model` does.
    ```
    """
    if not lora_layers(model):
        return model
    plain = model.__class__.from_config(model.get_config())
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "merged.weights.h5")
        model.save_weights(path)
        plain.load_weights(path)
    return plain


def lora_state(model: keras.Model) -> dict[str, np.ndarray]:
    """Every variable of the LoRA layers, unmerged (raw kernel, bias, A, B), for a backup."""
    return {f"{i}/{j}": keras.ops.convert_to_numpy(variable)
            for i, layer in enumerate(lora_layers(model))
            for j, variable in enumerate(layer.variables)}


def restore_lora_state(model: keras.Model, state: dict[str, np.ndarray]) -> None:
    """Puts back what `lora_state` saved (after `load_weights` merged and zeroed it)."""
    for i, layer in enumerate(lora_layers(model)):
        for j, variable in enumerate(layer.variables):
            variable.assign(state[f"{i}/{j}"])
