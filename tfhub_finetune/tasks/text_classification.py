"""Text classification task: files/TFDS -> tokenized, length-grouped batches -> encoder + head.

Single texts or pairs (`data.text_pair_column`): a pair is packed as
`[CLS] a [SEP] b [SEP]` with segment ids 0/1 and grouped by its packed length.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tfhub_finetune.adaptation import check_adaptation
from tfhub_finetune.backbones.base import TEXT_INPUTS, TextBackbone
from tfhub_finetune.backbones.catalog import resolve_backbone
from tfhub_finetune.backbones.spec import BackboneSpec
from tfhub_finetune.builders.text_classifier import build_text_classifier
from tfhub_finetune.config import ExperimentConfig
from tfhub_finetune.data.labels import LabelVocabulary
from tfhub_finetune.data.sources import (
    TFDS_PREFIX,
    TextExamples,
    read_text_examples,
    split_examples,
)
from tfhub_finetune.data.text import (
    TokenizedTexts,
    count_batches,
    make_text_dataset,
    tokenize_texts,
)
from tfhub_finetune.errors import InputError
from tfhub_finetune.integers import parse_int
from tfhub_finetune.tasks.base import epoch_seed, eval_batch_size, load_text_backbone


def _column(value: str) -> str | int:
    index = parse_int(value)
    return value if index is None else index


class TextClassificationTask:
    """Reads text data, builds the classifier, and batches both splits.

    Example:

    ```python
    task = TextClassificationTask(config)
    task.prepare_train()
    model = task.build_model()
    ```
    """

    builder = "tfhub_finetune.builders.text_classifier:build_text_classifier"

    def __init__(self, config: ExperimentConfig, tfds_fallback: str | None = None,
                 spec: BackboneSpec | None = None):
        self.config = config
        self.tfds_fallback = tfds_fallback
        self.bounded_shapes = False  # The driver sets it when XLA compiles the step.
        # The spec the pipeline resolved; resolved here when a caller passes none.
        self.spec = spec or resolve_backbone(config.model.backbone)
        if self.spec.modality != "text":
            raise InputError(
                "The text pipeline needs a text backbone.",
                received={"backbone": config.model.backbone, "modality": self.spec.modality},
                fix="Use pipelines.image_classify for image backbones.",
            )
        # Before any data is read: an adaptation the backbone cannot do costs a second.
        check_adaptation(config.model.adaptation, self.spec)
        self.backbone: TextBackbone | None = None
        self.labels: LabelVocabulary | None = None
        self.train_data: TokenizedTexts | None = None
        self.eval_data: TokenizedTexts | None = None
        self.steps_per_epoch = 0
        self.summary: dict = {}

    # === Data ===

    def _read(self, source: str, split: str) -> TextExamples:
        d = self.config.data
        if (
            self.tfds_fallback
            and source
            and not source.startswith(TFDS_PREFIX)
            and not Path(source).exists()
        ):
            print(f"Data file {source} not found; reading TFDS {self.tfds_fallback} ({split}).")
            source = TFDS_PREFIX + self.tfds_fallback
        return read_text_examples(
            source,
            text_column=_column(d.text_column),
            text_pair_column=_column(d.text_pair_column) if d.text_pair_column else None,
            label_column=_column(d.label_column),
            has_header={"true": True, "false": False}.get(d.has_header, "auto"),
            split=split,
            encoding=d.encoding,
        )

    def _load_backbone(self) -> TextBackbone:
        if self.backbone is None:
            self.backbone = load_text_backbone(self.spec, self.config.model.sequence_length)
        return self.backbone

    def _tokenize(self, examples: TextExamples) -> TokenizedTexts:
        targets = self.labels.encode(examples.labels, source=examples.source, rows=examples.rows)
        return tokenize_texts(
            examples.texts, targets, self.backbone.tokenizer, self.config.model.sequence_length,
            pairs=examples.pairs,
        )

    def _training_labels(self, train: TextExamples) -> tuple[LabelVocabulary, np.ndarray]:
        """The label vocabulary of training examples and their targets, checked as training needs."""
        d = self.config.data
        vocabulary = LabelVocabulary.from_labels(
            train.labels, task=self.config.model.task, label_type=d.label_type,
            label_names=d.label_names or None, source=train.source, rows=train.rows,
        )
        targets = vocabulary.encode(train.labels, source=train.source, rows=train.rows)
        vocabulary.check_training_counts(targets, source=train.source, rows=train.rows)
        return vocabulary, targets

    def prepare_train(self) -> None:
        d = self.config.data
        train = self._read(d.train_data, d.train_split)
        if d.max_train_examples:
            train = train.take(range(min(d.max_train_examples, len(train))))
        # The classes come from the whole training file (or --label_names), before the
        # hold-out split, which is stratified so a rare class keeps a training row.
        self.labels, targets = self._training_labels(train)
        if d.eval_data:
            evaluation = self._read(d.eval_data, d.eval_split)
        else:
            # Stratified for single-label classes, so every class keeps a training row.
            strata = targets.tolist() if self.config.model.task == "single_label" else None
            train, evaluation = split_examples(train, d.validation_split, self.config.train.seed,
                                               strata=strata)
            print(f"No --eval_data: holding out {len(evaluation)} of the training examples.")
        self._load_backbone()
        self.train_data = self._tokenize(train)
        self.eval_data = self._tokenize(evaluation)
        self.steps_per_epoch = count_batches(len(self.train_data), self.config.train.batch_size)
        lengths = self.train_data.lengths
        self.summary = {
            "train_examples": len(self.train_data),
            "eval_examples": len(self.eval_data),
            "skipped_blank_rows": {"train": train.skipped_blank, "eval": evaluation.skipped_blank},
            "truncated_train_examples": int((lengths >= self.config.model.sequence_length).sum()),
            "mean_train_tokens": float(lengths.mean()),
        }

    def prepare_eval(self, labels: LabelVocabulary) -> None:
        self.labels = labels
        evaluation = self._read(self.config.data.eval_data, self.config.data.eval_split)
        self._load_backbone()
        self.eval_data = self._tokenize(evaluation)
        self.summary = {"eval_examples": len(self.eval_data),
                        "skipped_blank_rows": {"eval": evaluation.skipped_blank}}

    def count_classes(self) -> int:
        """The label vocabulary's size, from the training labels (nothing tokenized).

        The eval file's labels are checked against it too, so a label training
        never saw fails selection here, before any candidate is profiled.
        """
        d = self.config.data
        # The checks training makes (a single class, an id gap, a stray label), before any
        # candidate is profiled: otherwise each candidate fails on the data in turn.
        vocabulary, _ = self._training_labels(self._read(d.train_data, d.train_split))
        if d.eval_data:
            evaluation = self._read(d.eval_data, d.eval_split)
            vocabulary.encode(evaluation.labels, source=evaluation.source, rows=evaluation.rows)
        return vocabulary.num_classes

    # === Model ===

    def profile_request(self, num_classes: int) -> dict:
        """`profile_in_subprocess` kwargs that rebuild and export this model in a profiling process.

        The model is profiled at `sequence_length`, the longest input it is
        served, and exported as `export_text_classifier` writes it for TF
        Serving (strings in, the tokenizer inside), so latency and size are
        those of what a user serves.
        """
        m = self.config.model
        kwargs = {"backbone": m.backbone,
                  "num_classes": num_classes, "task": m.task, "pooling": m.pooling,
                  "dropout": m.dropout, "adaptation": str(m.adaptation)}
        return {"builder": self.builder, "builder_kwargs": kwargs,
                "input_shapes": {name: [m.sequence_length] for name in TEXT_INPUTS},
                "exporter": f"{__name__}:export_for_serving",
                "exporter_kwargs": {"backbone": m.backbone, "task": m.task,
                                    "sequence_length": m.sequence_length,
                                    "text_pair": bool(self.config.data.text_pair_column)}}

    def build_model(self) -> keras.Model:
        m = self.config.model
        return build_text_classifier(
            self._load_backbone(),
            self.labels.num_classes,
            task=m.task,
            pooling=m.pooling,
            dropout=m.dropout,
            adaptation=m.adaptation,
        )

    # === Datasets ===

    def train_epoch_dataset(self, epoch: int) -> tf.data.Dataset:
        t = self.config.train
        return make_text_dataset(
            self.train_data,
            self.backbone.tokenizer,
            batch_size=t.batch_size,
            training=True,
            seed=epoch_seed(self.config, epoch),
            reshuffle_each_iteration=False,
            bucketing=t.bucketing,
            pad_to_bucket_boundary=self.bounded_shapes,
        )

    def eval_dataset(self) -> tf.data.Dataset:
        return make_text_dataset(
            self.eval_data, self.backbone.tokenizer, batch_size=eval_batch_size(self.config),
            training=False,
        )

    def eval_targets(self) -> np.ndarray:
        return self.eval_data.labels

    def feature_dataset(self, batch_size: int = 64) -> tf.data.Dataset:
        """Training batches for frozen features (after `prepare_train`).

        Shuffled with the run's seed but not grouped by length: a uniform
        sample in every batch, not neighbours in length.
        """
        return make_text_dataset(self.train_data, self.backbone.tokenizer, batch_size=batch_size,
                                 training=True, seed=self.config.train.seed, bucketing=False)


def export_for_serving(model: keras.Model, export_dir: str, *, backbone: str, task: str,
                       sequence_length: int, text_pair: bool = False) -> str:
    """Writes `model` as `export_text_classifier` does for TF Serving; returns the string model.

    The profiler's exporter: class names are placeholders (`class_0`, ...),
    which change neither size nor speed. The backbone is loaded again for its
    tokenizer, since the built model does not keep it.

    Example:

    ```python
    export_for_serving(model, "/tmp/x", backbone="minilm_l6_h384", task="single_label",
                       sequence_length=64)  # '/tmp/x/model/1'
    ```
    """
    from tfhub_finetune.export import export_text_classifier

    width = int(model.outputs[0].shape[-1])
    labels = LabelVocabulary([f"class_{i}" for i in range(width)], task=task)
    text = load_text_backbone(resolve_backbone(backbone), sequence_length)
    return export_text_classifier(model, text, labels, export_dir,
                                  model_name="model", sequence_length=sequence_length,
                                  text_pair=text_pair, measure_latency=False)
