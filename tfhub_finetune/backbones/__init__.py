"""Where pretrained networks come from: specs, the catalog, loaders."""

from tfhub_finetune.backbones.base import ImageBackbone, TextBackbone
from tfhub_finetune.backbones.catalog import CATALOG, is_backbone, list_backbones, resolve_backbone
from tfhub_finetune.backbones.loader import load_backbone
from tfhub_finetune.backbones.spec import BackboneSpec

__all__ = [
    "CATALOG",
    "BackboneSpec",
    "ImageBackbone",
    "TextBackbone",
    "is_backbone",
    "list_backbones",
    "load_backbone",
    "resolve_backbone",
]
