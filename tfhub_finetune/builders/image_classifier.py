"""`build_image_classifier`: raw pixels -> backbone's pixel convention -> features -> head."""

from __future__ import annotations

import keras

from tfhub_finetune.adaptation import apply_adaptation, check_adaptation
from tfhub_finetune.backbones.base import ImageBackbone
from tfhub_finetune.backbones.image_source import PIXEL_SCALE_OFFSET, load_image_backbone
from tfhub_finetune.backbones.spec import BackboneSpec
from tfhub_finetune.config import Adaptation
from tfhub_finetune.errors import InputError
from tfhub_finetune.heads import build_head

# MobileNetV2 and EfficientNet downsample 32x; smaller inputs leave no pixels.
MIN_IMAGE_SIZE = 32


def build_image_classifier(
    backbone: str | BackboneSpec | ImageBackbone,
    num_classes: int,
    *,
    task: str = "single_label",
    dropout: float = 0.2,
    adaptation: Adaptation | str = "full",
    image_size: int | None = None,
    name: str | None = None,
) -> keras.Model:
    """Builds an image classifier that takes raw 0..255 pixels.

    The model's input is `images`: float32 (uint8 arrays are cast) of shape
    `(batch, image_size, image_size, 3)` in 0..255, as `tfhub_finetune.data.image`
    yields them. The first layer applies the backbone's pixel convention
    (`unit`: x/255, `symmetric`: x/127.5-1, `torchvision`: x/255 then ImageNet
    mean/std, `raw`), so callers and serving exports never normalise.

    BatchNorm layers of a pretrained backbone stay frozen (inference mode, see
    `set_backbone_trainable`) even when the rest is fine-tuned, as the Keras
    fine-tuning guides do: on a few small batches, batch statistics would
    overwrite the ImageNet ones. The `scratch_cnn` baseline trains its
    BatchNorm normally.

    Args:
        backbone: str, BackboneSpec or ImageBackbone. A catalog name
            (`scratch_cnn`), a local keras-hub preset directory
            (`../shared/weights/efficientnet_lite0`), a MobileNetV2 weights
            folder/file, a TF Hub handle, or an already loaded backbone.
        num_classes: int. Number of classes, or outputs for regression.
        task: str. `single_label` (softmax), `multi_label` (sigmoid) or
            `regression` (linear). Defaults to `"single_label"`.
        dropout: float. Dropout before the output layer. Defaults to `0.2`.
        adaptation: Adaptation or str. What trains: `full`, `head` (the
            backbone frozen) or `top:K` (the last K stages and the final conv;
            keras-hub and keras.applications CNNs). Image CNNs have no LoRA.
            Defaults to `"full"`.
        image_size: int or None. Input side in pixels; None uses the
            backbone's native size (224 for EfficientNet-Lite0).
        name: str or None. Model name. Defaults to `"image_classifier"`.

    Returns:
        A plain `keras.Model`, uncompiled. Its output (`probabilities` or
        `scores`) is float32 under any precision policy.

    Raises:
        InputError: for a text backbone, an unknown task, too few classes, an
            image size below 32 or one a fixed-size backbone cannot take.

    Example:

    ```python
    model = build_image_classifier("../shared/weights/efficientnet_lite0", num_classes=2)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.predict(np.zeros((1, 224, 224, 3), "uint8"))  # raw pixels in
    ```
    """
    if not isinstance(backbone, ImageBackbone):
        backbone = load_image_backbone(backbone)
    size = backbone.image_size if image_size is None else image_size
    if not isinstance(size, int) or size < MIN_IMAGE_SIZE:
        raise InputError(
            f"Image size must be an integer of at least {MIN_IMAGE_SIZE} pixels.",
            received={"image_size": size},
            fix=f"Use the backbone's native size ({backbone.image_size}) or similar.",
        )
    encoder = backbone.encoder
    pretrained = backbone.spec.source != "scratch"
    adaptation = Adaptation.parse(adaptation)
    check_adaptation(adaptation, backbone.spec)
    apply_adaptation(encoder, adaptation, pretrained=pretrained)
    fixed_side = encoder.input_shape[1]
    if fixed_side is not None and fixed_side != size:
        raise InputError(
            f"This backbone takes {fixed_side}x{fixed_side} images only.",
            received={"backbone": backbone.spec.name, "image_size": size},
            fix=f"Use image_size={fixed_side}.",
        )
    scale, offset = PIXEL_SCALE_OFFSET[backbone.pixel_convention]

    # === Functional Model ===
    images = keras.Input(shape=(size, size, 3), dtype="float32", name="images")
    x = keras.layers.Rescaling(scale, offset, name="pixel_normalization")(images)
    features = encoder(x)
    outputs = build_head(features, num_classes, task=task, dropout=dropout)
    return keras.Model(images, outputs, name=name or "image_classifier")


def set_backbone_trainable(
    encoder: keras.Model, trainable: bool, *, pretrained: bool = True
) -> None:
    """Freezes or unfreezes a backbone, keeping a pretrained one's BatchNorm frozen.

    Keras 3 overrides a nested `encoder(x, training=False)` with the outer
    model's phase during `fit`, so the only way to keep pretrained BatchNorm
    statistics is `trainable=False` on those layers (a non-trainable
    BatchNormalization runs in inference mode). Setting `encoder.trainable`
    alone would unfreeze them again; call this instead when switching from
    head-only training to fine-tuning, then compile again.

    Args:
        encoder: keras.Model. The backbone's encoder (`ImageBackbone.encoder`).
        trainable: bool. Whether the backbone's weights train.
        pretrained: bool. Keep BatchNorm layers frozen when `trainable`.
            Defaults to `True`.

    Example:

    ```python
    set_backbone_trainable(backbone.encoder, True)  # Fine-tune after a frozen warm-up.
    model.compile(optimizer=keras.optimizers.Adam(1e-5), loss=...)
    ```
    """
    apply_adaptation(encoder, "full" if trainable else "head", pretrained=pretrained)
