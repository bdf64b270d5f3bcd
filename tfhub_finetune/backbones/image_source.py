"""Image feature extractors: keras-hub presets, keras.applications, a scratch CNN.

Every loader returns an `ImageBackbone` whose `encoder` maps normalised float
images `(batch, height, width, 3)` of any side to a feature vector
`(batch, feature_dim)`. Normalising raw 0..255 pixels is the classifier's job
(`builders.image_classifier`), driven by `pixel_convention`; the constants of
each convention live here, beside the code that knows what the weights expect.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras

from tfhub_finetune.backbones.base import ImageBackbone
from tfhub_finetune.backbones.catalog import resolve_backbone
from tfhub_finetune.backbones.spec import BackboneSpec
from tfhub_finetune.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# `pixels * scale + offset` for each convention in `spec.PIXEL_CONVENTIONS`,
# the same form as keras-hub's `ImageConverter(scale=..., offset=...)`.
PIXEL_SCALE_OFFSET: dict[str, tuple[Any, Any]] = {
    "unit": (1.0 / 255.0, 0.0),
    "symmetric": (1.0 / 127.5, -1.0),
    "torchvision": (
        [1.0 / (255.0 * s) for s in IMAGENET_STD],
        [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)],
    ),
    "raw": (1.0, 0.0),
}

SCRATCH_CNN_FILTERS = (32, 64, 128, 256)


def load_image_backbone(spec: str | BackboneSpec) -> ImageBackbone:
    """Loads an image backbone as a pooled feature extractor (through `load_backbone`).

    Sources: keras-hub image presets (by name, downloaded, or a local preset
    directory such as `../shared/weights/efficientnet_lite0`); a
    keras.applications MobileNetV2 with a `.weights.h5` file; the `scratch_cnn`
    baseline (random init); TF Hub image models. `loader.load_backbone` is the
    one place that picks the loader for a source; this adds the check that
    the backbone is an image one.

    Args:
        spec: str or BackboneSpec. A catalog name, path, URL or resolved spec.

    Returns:
        An `ImageBackbone` whose encoder takes normalised float images of any
        side and returns `(batch, feature_dim)` features.

    Raises:
        InputError: if the spec is a text backbone, or the weights cannot be
            found or downloaded.

    Example:

    ```python
    backbone = load_image_backbone("../shared/weights/efficientnet_lite0")
    backbone.image_size, backbone.pixel_convention, backbone.feature_dim
    # (224, 'symmetric', 1280)
    ```
    """
    from tfhub_finetune.backbones.loader import load_backbone

    spec = resolve_backbone(spec)
    if spec.modality != "image":
        raise InputError(
            "This backbone is a text encoder, not an image backbone.",
            received={"backbone": spec.name, "modality": spec.modality},
            fix="Choose an image backbone, e.g. efficientnet_lite0 or scratch_cnn.",
        )
    return load_backbone(spec)


def load_image_source(spec: BackboneSpec) -> ImageBackbone:
    """The keras-hub, keras.applications and scratch image loaders (`load_backbone` calls it)."""
    if spec.source == "keras_hub":
        return _load_keras_hub(spec)
    if spec.source == "keras_applications":
        return _load_keras_application(spec)
    if spec.source == "scratch" and spec.handle == "cnn":
        return _build_scratch_cnn(spec)
    raise InputError(
        "No image loader for this backbone source.",
        received={"backbone": spec.name, "source": spec.source, "handle": spec.handle},
        fix="Image backbones come from keras_hub, keras_applications, tf_hub or scratch (cnn).",
    )


def pixel_convention_of(scale: Any, offset: Any) -> str | None:
    """Names the convention a keras-hub `ImageConverter`'s scale/offset implement.

    Args:
        scale: float, list of float or None. The converter's `scale`.
        offset: float, list of float or None. The converter's `offset`.

    Returns:
        One of `unit`, `symmetric`, `torchvision`, `raw`, or None if the values
        match none of them.

    Example:

    ```python
    pixel_convention_of(1 / 127.5, -1.0)  # 'symmetric'
    ```
    """
    got_scale = _per_channel(1.0 if scale is None else scale)
    got_offset = _per_channel(0.0 if offset is None else offset)
    for name, (want_scale, want_offset) in PIXEL_SCALE_OFFSET.items():
        if _close(got_scale, _per_channel(want_scale)) and _close(
            got_offset, _per_channel(want_offset)
        ):
            return name
    return None


def _per_channel(value: Any) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * 3
    return [float(v) for v in value]


def _close(a: Sequence[float], b: Sequence[float]) -> bool:
    if len(a) != len(b):
        return False
    return all(abs(x - y) <= 1e-4 * max(1.0, abs(y)) for x, y in zip(a, b, strict=True))


def _pooled_encoder(feature_model: keras.Model, name: str) -> keras.Model:
    """Wraps a feature-map network as `(batch, h, w, 3) -> (batch, channels)`."""
    images = keras.Input(shape=(None, None, 3), name="images")
    features = feature_model(images)
    if len(features.shape) == 4:
        features = keras.layers.GlobalAveragePooling2D(name="avg_pool")(features)
    return keras.Model(images, features, name=name)


def _encoder_name(spec: BackboneSpec) -> str:
    # A path or URL names the model by its last part, cut to what layer names allow.
    stem = Path(spec.name.rstrip("/")).name.removesuffix(".weights.h5")
    return re.sub(r"[^0-9A-Za-z_]+", "_", stem).strip("_") + "_encoder"


def _load_keras_hub(spec: BackboneSpec) -> ImageBackbone:
    import keras_hub  # Only image/text keras-hub jobs pay for this import.

    try:
        backbone = keras_hub.models.Backbone.from_preset(spec.handle)
    except (OSError, ValueError) as err:
        raise InputError(
            "Could not load the keras-hub image backbone.",
            received={"backbone": spec.name},
            fix="Check the preset name (downloads need internet) or give a local preset "
            f"directory. ({err.__class__.__name__}: {_first_line(err)})",
        ) from None
    _keep_unserialized_config(backbone, spec.handle)
    image_size, convention = spec.image_size or 224, spec.pixel_convention or "unit"
    converter = _preset_converter(spec.handle)
    if converter is not None:
        # The preset's own converter is the truth about its weights; the spec
        # may come from a hand-written catalog entry.
        size, scale, offset = converter
        convention = pixel_convention_of(scale, offset) or convention
        image_size = int(size[0]) if size else image_size
    encoder = _pooled_encoder(backbone, _encoder_name(spec))
    return ImageBackbone(
        spec=spec,
        encoder=encoder,
        image_size=image_size,
        pixel_convention=convention,
        feature_dim=int(encoder.output_shape[-1]),
    )


def _preset_converter(handle: str) -> tuple[Any, Any, Any] | None:
    """(image_size, scale, offset) of a preset's image converter, if it has one."""
    import keras_hub

    try:
        converter = keras_hub.layers.ImageConverter.from_preset(handle)
    except (OSError, ValueError):
        return None
    if converter is None:
        return None
    return converter.image_size, converter.scale, converter.offset


def _keep_unserialized_config(backbone: keras.Model, handle: str) -> None:
    """Makes `get_config` return preset keys the class forgets to serialise.

    keras-hub 0.32's `EfficientNetBackbone.get_config()` drops `num_features`,
    which EfficientNet-Lite2 needs (1163, see its SOURCE.txt); without it a
    saved classifier reloads with a 1408-channel head and fails. Passing the
    preset's keys back keeps `model.save` / `keras.models.load_model` working.
    """
    config_path = Path(handle) / "config.json"
    if not config_path.is_file():
        return
    saved = json.loads(config_path.read_text(encoding="utf-8")).get("config", {})
    original_get_config = backbone.get_config
    missing = {k: v for k, v in saved.items() if k not in original_get_config()}
    if not missing:
        return

    def get_config() -> dict[str, Any]:
        return {**original_get_config(), **missing}

    backbone.get_config = get_config


def _load_keras_application(spec: BackboneSpec) -> ImageBackbone:
    if spec.architecture != "MobileNetV2":
        raise InputError(
            "Only MobileNetV2 is supported from keras.applications.",
            received={"backbone": spec.name, "architecture": spec.architecture},
        )
    weights = Path(spec.handle)
    if not weights.is_file():
        raise InputError(
            "MobileNetV2 weights file not found.",
            received={"backbone": spec.name, "weights": spec.handle},
            fix="Point at mobilenet_v2_*_no_top.weights.h5 (e.g. ../shared/weights/"
            "mobilenet_v2_1.0_224).",
        )
    try:
        # Spatial dims left open: the no-top network's weights fit any side >= 32.
        network = keras.applications.MobileNetV2(
            input_shape=(None, None, 3), include_top=False, pooling="avg", weights=str(weights)
        )
    except ValueError as err:
        raise InputError(
            "The weights file does not fit MobileNetV2 1.0 without its top.",
            received={"weights": spec.handle},
            fix=f"({err.__class__.__name__}: {_first_line(err)})",
        ) from None
    encoder = _pooled_encoder(network, _encoder_name(spec))
    return ImageBackbone(
        spec=spec,
        encoder=encoder,
        image_size=spec.image_size or 224,
        pixel_convention=spec.pixel_convention or "torchvision",
        feature_dim=int(encoder.output_shape[-1]),
    )


def _build_scratch_cnn(spec: BackboneSpec) -> ImageBackbone:
    """A randomly initialised 4-block CNN: the no-pretraining baseline.

    Each block is two 3x3 conv + batch-norm + ReLU layers and a 2x2 max-pool;
    widths come from `spec.extra["filters"]` (default 32, 64, 128, 256).
    """
    filters = tuple(spec.extra.get("filters", SCRATCH_CNN_FILTERS))
    images = keras.Input(shape=(None, None, 3), name="images")
    x = images
    for block, width in enumerate(filters, start=1):
        for conv in (1, 2):
            x = keras.layers.Conv2D(
                width, 3, padding="same", use_bias=False, name=f"block{block}_conv{conv}"
            )(x)
            # Momentum 0.9, not 0.99: small data sets give few steps, and the
            # moving statistics must settle within them for evaluation.
            x = keras.layers.BatchNormalization(momentum=0.9, name=f"block{block}_bn{conv}")(x)
            x = keras.layers.ReLU(name=f"block{block}_relu{conv}")(x)
        x = keras.layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
    features = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    encoder = keras.Model(images, features, name=_encoder_name(spec))
    return ImageBackbone(
        spec=spec,
        encoder=encoder,
        image_size=spec.image_size or 128,
        pixel_convention=spec.pixel_convention or "unit",
        feature_dim=int(filters[-1]),
    )


def _first_line(err: Exception) -> str:
    text = str(err)
    return text.splitlines()[0] if text else ""
