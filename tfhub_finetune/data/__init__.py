"""Data: readers for files/TFDS, label vocabularies, and tf.data pipelines.

Lazy, like the top-level package: `data.packing` is imported by the
TensorFlow-free `text_client`, so importing this package must not import
TensorFlow.
"""

from __future__ import annotations

from tfhub_finetune import lazy_exports

_EXPORTS = {
    "LabelVocabulary": "tfhub_finetune.data.labels",
    "TextExamples": "tfhub_finetune.data.sources",
    "read_text_examples": "tfhub_finetune.data.sources",
    "split_examples": "tfhub_finetune.data.sources",
    "TokenizedTexts": "tfhub_finetune.data.text",
    "make_text_dataset": "tfhub_finetune.data.text",
    "pack_inputs": "tfhub_finetune.data.text",
    "tokenize_texts": "tfhub_finetune.data.text",
}

__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = sorted(_EXPORTS)
