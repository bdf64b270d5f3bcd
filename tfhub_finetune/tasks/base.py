"""The interface between the generic driver and a modality's task."""

from __future__ import annotations

from typing import Protocol

import keras
import numpy as np
import tensorflow as tf

from tfhub_finetune.backbones.base import TextBackbone
from tfhub_finetune.backbones.loader import load_backbone
from tfhub_finetune.backbones.spec import BackboneSpec
from tfhub_finetune.config import ExperimentConfig
from tfhub_finetune.data.labels import LabelVocabulary
from tfhub_finetune.errors import InputError


class Task(Protocol):
    """One modality's data and model, as `driver.run_experiment` drives them.

    Lifecycle: `prepare_train` (or `prepare_eval`) reads data and fixes the
    label vocabulary; `build_model` is called inside the strategy scope;
    `train_epoch_dataset(k)` must give epoch k's batches in an order that is a
    pure function of `(seed, k)`, so an interrupted run resumes exactly.

    Two optional methods: `callbacks()` returns Keras callbacks the driver
    puts before its own (so metrics they add to the epoch logs, such as
    `val_entity_f1`, can be monitored, checkpointed and logged), and
    `report(model)` replaces the driver's classification/regression report
    in `metrics.json`.

    `bounded_shapes` (False until the driver sets it, when XLA compiles the
    training step): pad training batches to a few widths
    (`data.text.bucket_widths`) so XLA compiles a few shapes, not one per
    batch width. Image batches have one shape and ignore it.
    """

    config: ExperimentConfig
    labels: LabelVocabulary
    steps_per_epoch: int
    summary: dict
    bounded_shapes: bool

    def prepare_train(self) -> None: ...

    def prepare_eval(self, labels: LabelVocabulary) -> None: ...

    def build_model(self) -> keras.Model: ...

    def train_epoch_dataset(self, epoch: int) -> tf.data.Dataset: ...

    def eval_dataset(self) -> tf.data.Dataset: ...

    def eval_targets(self) -> np.ndarray: ...


def epoch_seed(config: ExperimentConfig, epoch: int) -> int:
    """The shuffle seed of training epoch `epoch`: a pure function of (seed, epoch).

    A Python int on purpose: a tensor seed crashes tf.data's shuffle when the global
    seed is 0. Resumed runs rebuild epoch k's order from it exactly.
    """
    return config.train.seed * 1000 + int(epoch)


def eval_batch_size(config: ExperimentConfig) -> int:
    """Evaluation batches are at least 64: no gradients, so bigger batches are cheap."""
    return max(config.train.batch_size, 64)


def load_text_backbone(spec: BackboneSpec, sequence_length: int) -> TextBackbone:
    """Loads a text backbone; `sequence_length` must fit its position table."""
    backbone = load_backbone(spec)
    limit = backbone.max_sequence_length
    if sequence_length > limit:
        raise InputError(
            "Sequence length exceeds the backbone's maximum.",
            received={"sequence_length": sequence_length},
            fix=f"{spec.name} takes at most {limit} tokens.",
        )
    return backbone
