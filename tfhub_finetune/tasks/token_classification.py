"""Token classification (NER) task: CoNLL/JSONL -> windowed word pieces -> encoder + per-token head."""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from tfhub_finetune.adaptation import check_adaptation
from tfhub_finetune.backbones.base import TEXT_INPUTS, TextBackbone
from tfhub_finetune.backbones.catalog import resolve_backbone
from tfhub_finetune.backbones.spec import BackboneSpec
from tfhub_finetune.builders.token_classifier import build_token_classifier
from tfhub_finetune.config import ExperimentConfig
from tfhub_finetune.data.labels import LabelVocabulary
from tfhub_finetune.data.sources import split_examples
from tfhub_finetune.data.text import count_batches
from tfhub_finetune.data.token_windows import (
    WindowedSentences,
    make_token_dataset,
    predict_words,
    window_sentences,
    window_stride,
)
from tfhub_finetune.data.tokens import (
    TaggedSentences,
    encode_tags,
    entity_types,
    read_tagged_sentences,
    tag_names,
)
from tfhub_finetune.entities import entity_report
from tfhub_finetune.errors import InputError
from tfhub_finetune.tasks.base import epoch_seed, eval_batch_size, load_text_backbone


class TokenClassificationTask:
    """Reads tagged sentences, builds the token classifier, and batches windows of both splits.

    Each word is predicted on its first word piece; sentences longer than a
    window are split into sliding windows (`data.token_windows`). Tags are
    IOB2 inside (files in IOB1/BIOES are converted); the tag vocabulary is
    `O` plus `B-`/`I-` of every entity type in the training data.

    Example:

    ```python
    task = TokenClassificationTask(config)
    task.prepare_train()
    model = task.build_model()
    ```
    """

    builder = "tfhub_finetune.builders.token_classifier:build_token_classifier"

    def __init__(self, config: ExperimentConfig, spec: BackboneSpec | None = None):
        self.config = config
        self.bounded_shapes = False  # The driver sets it when XLA compiles the step.
        self.spec = spec or resolve_backbone(config.model.backbone)
        if self.spec.modality != "text":
            raise InputError(
                "Token classification needs a text backbone.",
                received={"backbone": config.model.backbone, "modality": self.spec.modality},
            )
        # Before any data is read: an adaptation the backbone cannot do costs a second.
        check_adaptation(config.model.adaptation, self.spec)
        self.backbone: TextBackbone | None = None
        self.labels: LabelVocabulary | None = None
        self.train_data: WindowedSentences | None = None
        self.eval_data: WindowedSentences | None = None
        self.eval_sentences: TaggedSentences | None = None
        self.steps_per_epoch = 0
        self.summary: dict = {}

    # === Data ===

    def _read(self, source: str) -> TaggedSentences:
        d = self.config.data
        return read_tagged_sentences(
            source, token_column=d.text_column, tag_column=d.tag_column,
            tag_scheme=d.tag_scheme, encoding=d.encoding,
        )

    def _load_backbone(self) -> TextBackbone:
        if self.backbone is None:
            self.backbone = load_text_backbone(self.spec, self.config.model.sequence_length)
        return self.backbone

    def _window(self, sentences: TaggedSentences, tag_ids: list[list[int]]) -> WindowedSentences:
        m = self.config.model
        return window_sentences(
            sentences.words, tag_ids, self._load_backbone(),
            sequence_length=m.sequence_length, stride=m.window_stride,
        )

    def prepare_train(self) -> None:
        d = self.config.data
        train = self._read(d.train_data)
        if d.max_train_examples:
            train = train.take(range(min(d.max_train_examples, len(train))))
        if d.eval_data:
            evaluation = self._read(d.eval_data)
        else:
            train, evaluation = split_examples(train, d.validation_split, self.config.train.seed)
            print(f"No --eval_data: holding out {len(evaluation)} of the training sentences.")
        types = entity_types(train.tags)
        self.labels = LabelVocabulary(names=tag_names(types), task="token_classification")
        if not types:
            raise InputError(
                f"No entity tags in {d.train_data}: every token is tagged O, so there is "
                "nothing to learn.", received={"train_data": d.train_data},
                fix="Check --tag_column (the IOB tag column) and the file's tags.")
        # Tags are checked (an eval type training never saw) before the backbone loads.
        train_ids, eval_ids = encode_tags(train, self.labels.names), encode_tags(evaluation, self.labels.names)
        self.train_data = self._window(train, train_ids)
        self._set_eval(evaluation, eval_ids)
        self.steps_per_epoch = count_batches(len(self.train_data), self.config.train.batch_size)
        self.summary = {
            "train_examples": len(self.train_data),  # Windows: what a batch counts.
            "train_sentences": len(train),
            "train_words": train.num_words,
            "eval_sentences": len(evaluation),
            "eval_words": evaluation.num_words,
            "skipped_docstart_lines": {"train": train.docstarts, "eval": evaluation.docstarts},
            "windowed_sentences": {"train": self.train_data.windowed_sentences,
                                   "eval": self.eval_data.windowed_sentences},
            "window_stride": window_stride(self.config.model.sequence_length,
                                           self.config.model.window_stride),
            "mean_train_window_tokens": float(self.train_data.lengths.mean()),
        }

    def _set_eval(self, evaluation: TaggedSentences, tag_ids: list[list[int]]) -> None:
        self.eval_sentences = evaluation
        self.eval_data = self._window(evaluation, tag_ids)

    def prepare_eval(self, labels: LabelVocabulary) -> None:
        self.labels = labels
        evaluation = self._read(self.config.data.eval_data)
        self._set_eval(evaluation, encode_tags(evaluation, labels.names))
        self.summary = {
            "eval_sentences": len(evaluation),
            "eval_words": evaluation.num_words,
            "skipped_docstart_lines": {"eval": evaluation.docstarts},
            "windowed_sentences": {"eval": self.eval_data.windowed_sentences},
        }

    def count_classes(self) -> int:
        """The tag vocabulary's size, from the training file (nothing tokenized).

        The eval file's tags are checked against it too (`encode_tags`), so an
        entity type training never saw fails selection before any profiling.
        """
        d = self.config.data
        names = tag_names(entity_types(self._read(d.train_data).tags))
        if d.eval_data:
            encode_tags(self._read(d.eval_data), names)
        return len(names)

    # === Model ===

    def profile_request(self, num_classes: int) -> dict:
        """`profile_in_subprocess` kwargs that rebuild and export this model in a profiling process.

        The export is what `token_export.export_token_classifier` writes for TF
        Serving (sentences in; words split, tokenized and windowed inside;
        entities out), so latency and size are those of what a user serves.
        Windows are `sequence_length` pieces, as trained.
        """
        m = self.config.model
        kwargs = {"backbone": m.backbone, "num_tags": num_classes, "dropout": m.dropout,
                  "adaptation": str(m.adaptation)}
        return {"builder": self.builder, "builder_kwargs": kwargs,
                "input_shapes": {name: [m.sequence_length] for name in TEXT_INPUTS},
                "exporter": f"{__name__}:export_for_serving",
                "exporter_kwargs": {"backbone": m.backbone, "sequence_length": m.sequence_length,
                                    "stride": m.window_stride}}

    def build_model(self) -> keras.Model:
        m = self.config.model
        return build_token_classifier(
            self._load_backbone(), self.labels.num_classes,
            dropout=m.dropout, adaptation=m.adaptation,
        )

    # === Datasets ===

    def train_epoch_dataset(self, epoch: int) -> tf.data.Dataset:
        t = self.config.train
        return make_token_dataset(
            self.train_data, pad_id=int(self.backbone.tokenizer.pad_id), batch_size=t.batch_size,
            training=True, seed=epoch_seed(self.config, epoch), reshuffle_each_iteration=False,
            bucketing=t.bucketing, pad_to_bucket_boundary=self.bounded_shapes,
        )

    def eval_dataset(self) -> tf.data.Dataset:
        return make_token_dataset(
            self.eval_data, pad_id=int(self.backbone.tokenizer.pad_id),
            batch_size=eval_batch_size(self.config), training=False,
        )

    def eval_targets(self) -> np.ndarray:
        return self.eval_data.tag_ids

    def feature_dataset(self, batch_size: int = 64) -> tf.data.Dataset:
        """Training windows for frozen features (after `prepare_train`), shuffled, not grouped by length.

        Labels are per word piece: each word's tag on its first piece, -1
        elsewhere, so `extract_features` keeps one feature per word (the
        first piece's, what the head reads) labelled with the word's tag.
        """
        return make_token_dataset(
            self.train_data, pad_id=int(self.backbone.tokenizer.pad_id), batch_size=batch_size,
            training=True, seed=self.config.train.seed, bucketing=False,
        )

    # === Evaluation ===

    def predict_tags(self, model: keras.Model) -> tuple[list[list[str]], np.ndarray]:
        """Per eval sentence, the predicted IOB2 tag of each word; and each word's probability.

        `model` is anything with Keras' `predict_on_batch` (windows in,
        per-piece tag probabilities out).
        """
        ids, scores = predict_words(model, self.eval_dataset(), self.eval_data)
        names = np.asarray(self.labels.names, dtype=object)
        splits = self.eval_data.sentence_splits
        return [list(names[ids[a:b]]) for a, b in zip(splits[:-1], splits[1:], strict=True)], scores

    def report(self, model: keras.Model) -> dict:
        """Entity precision/recall/F1 (overall and per type, as seqeval) and token accuracy."""
        predicted, _ = self.predict_tags(model)
        return self.tags_report(predicted)

    def tags_report(self, predicted: Sequence[Sequence[str]]) -> dict:
        """`report`'s figures for IOB2 tags predicted any other way (an export, an int8 form)."""
        result = entity_report(self.eval_sentences.tags, predicted)
        result["num_examples"] = len(self.eval_sentences)
        return result

    def callbacks(self) -> list[keras.callbacks.Callback]:
        return [EntityF1(self)]


class EntityF1(keras.callbacks.Callback):
    """Adds `val_entity_f1`, `val_entity_precision`, `val_entity_recall` to each epoch's logs.

    Computed on the whole eval set as `TokenClassificationTask.report` does,
    so `--monitor=val_entity_f1` picks the best checkpoint and early stopping
    on the real entity F1. Put it before the callbacks that read the logs.
    """

    def __init__(self, task: TokenClassificationTask):
        super().__init__()
        self.task = task

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        report = self.task.report(self.model)
        for key in ("entity_f1", "entity_precision", "entity_recall"):
            logs[f"val_{key}"] = report[key]
        print(f"\nEpoch {epoch + 1}: val_entity_f1={report['entity_f1']:.4f} "
              f"(precision {report['entity_precision']:.4f}, recall {report['entity_recall']:.4f})",
              flush=True)


def export_for_serving(model: keras.Model, export_dir: str, *, backbone: str,
                       sequence_length: int, stride: int = 0) -> str:
    """Writes `model` as `export_token_classifier` does for TF Serving; returns the sentence model.

    The profiler's exporter: entity types are placeholders (`B-T0`, `I-T0`,
    ...), which change neither size nor speed. The backbone is loaded again
    for its tokenizer, since the built model does not keep it.

    Example:

    ```python
    export_for_serving(model, "/tmp/x", backbone="minilm_l6_h384", sequence_length=128)
    # '/tmp/x/model/1'
    ```
    """
    from tfhub_finetune.token_export import export_token_classifier

    width = int(model.outputs[0].shape[-1])
    names = tag_names([f"T{i}" for i in range((width - 1) // 2)])
    if len(names) != width:
        raise InputError("A token classifier has an odd number of IOB2 tags (O, B-X, I-X).",
                         received={"tags": width})
    text = load_text_backbone(resolve_backbone(backbone), sequence_length)
    return export_token_classifier(
        model, text, LabelVocabulary(names=names, task="token_classification"), export_dir,
        model_name="model", sequence_length=sequence_length, stride=stride,
        measure_latency=False)
