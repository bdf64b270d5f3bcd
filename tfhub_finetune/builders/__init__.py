"""Builders: backbone + pooling/preprocessing + head -> a plain `keras.Model`."""

from tfhub_finetune.builders.text_classifier import build_text_classifier

__all__ = ["build_text_classifier"]
