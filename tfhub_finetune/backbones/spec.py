"""`BackboneSpec`: everything we know about a pretrained network before loading it."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from tfhub_finetune.errors import InputError, did_you_mean

SOURCES = ("keras_hub", "python_package", "tf_hub", "keras_applications", "scratch")
MODALITIES = ("text", "image")
# How raw 0..255 pixels become the network's input. `unit`: x/255 (the TF Hub
# image convention); `symmetric`: x/127.5 - 1; `torchvision`: x/255 then
# ImageNet mean/std; `raw`: untouched 0..255 floats.
PIXEL_CONVENTIONS = ("unit", "symmetric", "torchvision", "raw")
POOLINGS = ("cls", "pooler", "mean")


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """A named pretrained network, where it comes from and how to feed it.

    A spec is plain data: it can be listed, compared, written to JSON beside a
    model, and resolved without loading any weights. `load_backbone(spec)`
    turns it into a network.

    Attributes:
        name: str. Catalog name, or the path/handle it was resolved from. A
            layer-truncated variant carries the suffix, e.g.
            `minilm_l6_h384@layers=2`.
        source: str. One of `keras_hub` (preset name, local keras-hub preset or
            Hugging Face-format directory), `python_package` (a directory
            inside an installed package, `package:subdir`), `tf_hub` (TF Hub /
            Kaggle URL or local SavedModel), `keras_applications` (an
            application class plus a weights file) or `scratch` (randomly
            initialised baseline).
        handle: str. What `source` needs to find the weights.
        modality: str. `text` or `image`.
        description: str. One line for catalog listings and reports.
        architecture: str. Network family, e.g. `bert`, `efficientnet`,
            `MobileNetV2`.
        num_layers: int or None. Keep only the first `num_layers` transformer
            layers of the pretrained encoder (None keeps all).
        max_sequence_length: int or None. Longest input the text encoder takes.
        default_pooling: str. Sentence pooling the encoder was trained for:
            `cls`, `pooler` or `mean`.
        preprocess_handle: str or None. TF Hub text encoders: the matching
            preprocess SavedModel (strings to `input_word_ids`...).
        vocabulary_from: str or None. Scratch text baselines: the spec name
            whose tokenizer they share.
        image_size: int or None. Input side in pixels of an image backbone.
        pixel_convention: str or None. One of `PIXEL_CONVENTIONS`.
        params: int or None. Published parameter count of the backbone.
        license: str or None.
        extra: dict. Source-specific settings (e.g. the scratch config).
    """

    name: str
    source: str
    handle: str
    modality: str
    description: str = ""
    architecture: str = ""
    num_layers: int | None = None
    max_sequence_length: int | None = None
    default_pooling: str = "cls"
    preprocess_handle: str | None = None
    vocabulary_from: str | None = None
    image_size: int | None = None
    pixel_convention: str | None = None
    params: int | None = None
    license: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise InputError(
                "Invalid backbone source.",
                received={"source": self.source},
                fix=did_you_mean(self.source, SOURCES),
            )
        if self.modality not in MODALITIES:
            raise InputError(
                "Invalid backbone modality.",
                received={"modality": self.modality},
                fix=f"Expected one of: {', '.join(MODALITIES)}.",
            )
        if self.pixel_convention is not None and self.pixel_convention not in PIXEL_CONVENTIONS:
            raise InputError(
                "Invalid pixel convention.",
                received={"pixel_convention": self.pixel_convention},
                fix=f"Expected one of: {', '.join(PIXEL_CONVENTIONS)}.",
            )
        if self.default_pooling not in POOLINGS:
            raise InputError(
                "Invalid pooling.",
                received={"default_pooling": self.default_pooling},
                fix=f"Expected one of: {', '.join(POOLINGS)}.",
            )
        if self.num_layers is not None and self.num_layers < 1:
            raise InputError(
                "A truncated backbone must keep at least one layer.",
                received={"name": self.name, "num_layers": self.num_layers},
            )

    def replace(self, **changes: Any) -> BackboneSpec:
        """Returns a copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackboneSpec:
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
