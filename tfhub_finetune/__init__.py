"""tfhub_finetune: fine-tune pretrained TF Hub / keras-hub backbones and choose the right one.

Public API (lazy: importing the package does not import TensorFlow):

```python
from tfhub_finetune import load_backbone, build_text_classifier
```
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "BackboneSpec": "tfhub_finetune.backbones.spec",
    "CATALOG": "tfhub_finetune.backbones.catalog",
    "list_backbones": "tfhub_finetune.backbones.catalog",
    "resolve_backbone": "tfhub_finetune.backbones.catalog",
    "load_backbone": "tfhub_finetune.backbones.loader",
    "TextBackbone": "tfhub_finetune.backbones.base",
    "ImageBackbone": "tfhub_finetune.backbones.base",
    "build_text_classifier": "tfhub_finetune.builders.text_classifier",
    "build_image_classifier": "tfhub_finetune.builders.image_classifier",
    "build_token_classifier": "tfhub_finetune.builders.token_classifier",
    "InputError": "tfhub_finetune.errors",
}


def lazy_exports(package: str, exports: dict[str, str]):
    """A module `__getattr__` (PEP 562) importing each public name's module on first use."""

    def getattr_(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    return getattr_


__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = sorted(_EXPORTS)
