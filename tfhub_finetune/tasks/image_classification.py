"""Image classification task: class folders/CSV/TFRecord/TFDS -> cached pixels -> backbone + head."""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from tfhub_finetune.adaptation import check_adaptation
from tfhub_finetune.backbones.base import ImageBackbone
from tfhub_finetune.backbones.catalog import resolve_backbone
from tfhub_finetune.backbones.loader import load_backbone
from tfhub_finetune.backbones.spec import BackboneSpec
from tfhub_finetune.builders.image_classifier import build_image_classifier
from tfhub_finetune.config import ExperimentConfig
from tfhub_finetune.data.image import ImageDataset, build_augmenter, load_image_dataset
from tfhub_finetune.data.labels import LabelVocabulary
from tfhub_finetune.errors import InputError
from tfhub_finetune.tasks.base import epoch_seed, eval_batch_size

# Evaluation batches only run forward passes, so they can be larger.


class ImageClassificationTask:
    """Reads image data, builds the classifier, and batches both splits.

    Decoded, resized images are cached once; each training epoch reshuffles
    them with a seed derived from the epoch number (so an interrupted run
    resumes on the same batches) and augments them. Augmentation and
    cropping come from `config.data` (`augment`, `crop_to_aspect_ratio`), so
    they are saved in params.json and checked when a run resumes.

    Args:
        config: ExperimentConfig. The run.

    Example:

    ```python
    config = ExperimentConfig(model_dir="runs/x", data=DataConfig(train_data="train",
                                                                  augment="randaugment"))
    task = ImageClassificationTask(config.validate())
    task.prepare_train()
    model = task.build_model()
    ```
    """

    builder = "tfhub_finetune.builders.image_classifier:build_image_classifier"

    def __init__(self, config: ExperimentConfig, spec: BackboneSpec | None = None):
        self.config = config
        self.bounded_shapes = False  # Images have one shape; kept for the Task interface.
        # The spec the pipeline resolved; resolved here when a caller passes none.
        self.spec = spec or resolve_backbone(config.model.backbone)
        if self.spec.modality != "image":
            raise InputError(
                "The image pipeline needs an image backbone.",
                received={"backbone": config.model.backbone, "modality": self.spec.modality},
                fix="Use pipelines.text_classify for text backbones.",
            )
        if config.model.task != "single_label":
            raise InputError(
                "The image pipeline trains single-label classifiers.",
                received={"task": config.model.task},
                fix="Use --task=single_label (class folders give one label per image).",
            )
        # Before any data is read: an adaptation the backbone cannot do costs a second.
        check_adaptation(config.model.adaptation, self.spec)
        self.crop_to_aspect_ratio = config.data.crop_to_aspect_ratio
        # Built here, outside the strategy scope and before tf.data traces any
        # epoch function: Keras layers cannot be created inside either.
        self.augmenter = build_augmenter(config.data.augment, seed=config.train.seed)
        self.backbone: ImageBackbone | None = None
        self.labels: LabelVocabulary | None = None
        self.train_data: ImageDataset | None = None
        self.eval_data: ImageDataset | None = None
        self.steps_per_epoch = 0
        self.summary: dict = {}

    @property
    def image_size(self) -> int:
        """The input side: `--image_size`, or the backbone's own."""
        return self.config.model.image_size or self._load_backbone().image_size

    def _load_backbone(self) -> ImageBackbone:
        if self.backbone is None:
            self.backbone = load_backbone(self.spec)
        return self.backbone

    # === Data ===

    def _read(self, source: str, split: str, *, training: bool, names=None) -> ImageDataset:
        d = self.config.data
        return load_image_dataset(
            source,
            image_size=self.image_size,
            training=training,
            label_names=names,
            split=split,
            crop_to_aspect_ratio=self.crop_to_aspect_ratio,
            augment="none",  # Training batches use self.augmenter (see train_epoch_dataset).
            seed=self.config.train.seed,
            max_examples=d.max_train_examples if training else None,
        )

    def prepare_train(self) -> None:
        d = self.config.data
        train = self._read(d.train_data, d.train_split, training=True, names=d.label_names or None)
        if d.eval_data:
            evaluation = self._read(
                d.eval_data, d.eval_split, training=False, names=train.label_names
            )
        else:
            train, evaluation = train.split(d.validation_split, seed=self.config.train.seed)
            print(f"No --eval_data: holding out {evaluation.num_examples} of the training images.")
        self.labels = train.vocabulary
        if self.labels.num_classes < 2:
            raise InputError(
                "The training data has a single class; a classifier needs at least two.",
                received={"train_data": d.train_data, "classes": ",".join(self.labels.names)},
                fix="Add a folder (or labels) for every class.",
            )
        self.train_data, self.eval_data = train, evaluation
        if not train.num_examples:
            raise InputError(
                "Training data of unknown size.",
                received={"train_data": d.train_data},
                fix="Use class folders, a CSV or TFRecords, or a TFDS split with known size.",
            )
        self.steps_per_epoch = math.ceil(train.num_examples / self.config.train.batch_size)
        self.summary = {
            "train_examples": train.num_examples,
            "eval_examples": evaluation.num_examples,
            "image_size": self.image_size,
            "pixel_convention": self._load_backbone().pixel_convention,
            "skipped_files": {
                "train": [vars(s) for s in train.skipped],
                "eval": [vars(s) for s in evaluation.skipped],
            },
        }

    def prepare_eval(self, labels: LabelVocabulary) -> None:
        self.labels = labels
        d = self.config.data
        self.eval_data = self._read(d.eval_data, d.eval_split, training=False, names=labels.names)
        self.summary = {
            "eval_examples": self.eval_data.num_examples,
            "image_size": self.image_size,
            "skipped_files": {"eval": [vars(s) for s in self.eval_data.skipped]},
        }

    def count_classes(self) -> int:
        """The number of classes in the training data (nothing decoded, no validation pass)."""
        d = self.config.data
        data = load_image_dataset(d.train_data, image_size=32, validate=False, cache=False,
                                  split=d.train_split, label_names=list(d.label_names) or None)
        return len(data.label_names)

    # === Model ===

    def profile_request(self, num_classes: int) -> dict:
        """`profile_in_subprocess` kwargs that rebuild and export this model in a profiling process.

        The export is what `export_image_classifier` writes for TF Serving
        (encoded images in, decoding and resizing inside), so latency and size
        are those of what a user serves.
        """
        m = self.config.model
        size = m.image_size or self.spec.image_size or 224
        kwargs = {"backbone": m.backbone,
                  "num_classes": num_classes, "task": m.task, "image_size": size,
                  "dropout": m.dropout, "adaptation": str(m.adaptation)}
        return {"builder": self.builder, "builder_kwargs": kwargs, "input_shapes": [size, size, 3],
                "exporter": f"{__name__}:export_for_serving",
                "exporter_kwargs": {"task": m.task, "image_size": size,
                                    "crop_to_aspect_ratio": self.crop_to_aspect_ratio}}

    def build_model(self) -> keras.Model:
        m = self.config.model
        return build_image_classifier(
            self._load_backbone(),
            self.labels.num_classes,
            task=m.task,
            dropout=m.dropout,
            adaptation=m.adaptation,
            image_size=self.image_size,
        )

    # === Datasets ===

    def train_epoch_dataset(self, epoch: int) -> tf.data.Dataset:
        return self.train_data.batches(
            self.config.train.batch_size,
            training=True,
            seed=epoch_seed(self.config, epoch),
            augment=self.augmenter,
            reshuffle_each_iteration=False,
        )

    def eval_dataset(self) -> tf.data.Dataset:
        return self.eval_data.batches(eval_batch_size(self.config))

    def feature_dataset(self, batch_size: int = 64) -> tf.data.Dataset:
        """Training batches for frozen features (after `prepare_train`): shuffled (class
        folders come in blocks) and never augmented."""
        return self.train_data.batches(batch_size, training=True, seed=self.config.train.seed,
                                       augment="none")

    def eval_targets(self) -> np.ndarray:
        labels = self.eval_data.examples.map(lambda _, label: label)
        return np.concatenate([y.numpy() for y in labels.batch(4096)])


def export_for_serving(model: keras.Model, export_dir: str, *, task: str, image_size: int,
                       crop_to_aspect_ratio: bool = True) -> str:
    """Writes `model` as `export_image_classifier` does for TF Serving; returns its folder.

    The profiler's exporter: class names are placeholders (`class_0`, ...),
    which change neither size nor speed.

    Example:

    ```python
    export_for_serving(model, "/tmp/x", task="single_label", image_size=224)  # '/tmp/x/model/1'
    ```
    """
    from tfhub_finetune.export import export_image_classifier

    width = int(model.outputs[0].shape[-1])
    labels = LabelVocabulary([f"class_{i}" for i in range(width)], task=task)
    return export_image_classifier(model, labels, export_dir, image_size=image_size,
                                   model_name="model", crop_to_aspect_ratio=crop_to_aspect_ratio,
                                   measure_latency=False)
