"""`load_backbone`: the one call that turns a spec (or name) into a network."""

from __future__ import annotations

from tfhub_finetune.backbones.base import ImageBackbone, TextBackbone
from tfhub_finetune.backbones.catalog import resolve_backbone
from tfhub_finetune.backbones.spec import BackboneSpec


def load_backbone(backbone: str | BackboneSpec) -> TextBackbone | ImageBackbone:
    """Loads a backbone by catalog name, path, URL or spec: the one dispatcher on `spec.source`.

    Each source module is imported only when used, so a text job never pays
    for image code and vice versa.

    Example:

    ```python
    text = load_backbone("minilm_l6_h384")
    image = load_backbone("../shared/weights/efficientnet_lite0")
    ```
    """
    spec = resolve_backbone(backbone)
    if spec.source == "tf_hub":
        from tfhub_finetune.backbones.tf_hub_source import load_tf_hub_backbone

        return load_tf_hub_backbone(spec)
    if spec.modality == "image":
        from tfhub_finetune.backbones.image_source import load_image_source

        return load_image_source(spec)
    if spec.source == "scratch":
        from tfhub_finetune.backbones.scratch import load_scratch_text_backbone

        return load_scratch_text_backbone(spec)
    from tfhub_finetune.backbones.keras_hub_source import load_keras_hub_text_backbone

    return load_keras_hub_text_backbone(spec)
