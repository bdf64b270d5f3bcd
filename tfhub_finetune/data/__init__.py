"""Data: readers for files/TFDS, label vocabularies, and tf.data pipelines."""

from tfhub_finetune.data.labels import LabelVocabulary
from tfhub_finetune.data.sources import TextExamples, read_text_examples, split_examples
from tfhub_finetune.data.text import TokenizedTexts, make_text_dataset, tokenize_texts

__all__ = [
    "LabelVocabulary",
    "TextExamples",
    "TokenizedTexts",
    "make_text_dataset",
    "read_text_examples",
    "split_examples",
    "tokenize_texts",
]
