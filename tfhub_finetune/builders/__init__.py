"""Builders: backbone + pooling/preprocessing + head -> a plain `keras.Model`."""

from tfhub_finetune.builders.image_classifier import build_image_classifier, set_backbone_trainable
from tfhub_finetune.builders.text_classifier import build_text_classifier

__all__ = ["build_image_classifier", "build_text_classifier", "set_backbone_trainable"]
