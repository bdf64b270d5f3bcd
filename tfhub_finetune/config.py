"""Experiment configuration as plain frozen dataclasses, validated and saved beside the model.

The flow follows TF Model Garden without its registries: flags (or code)
build an `ExperimentConfig`, `validate()` checks every value and names the
flag at fault, and the pipeline writes it to `<model_dir>/params.json`.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from tfhub_finetune.errors import InputError, did_you_mean
from tfhub_finetune.integers import parse_int
from tfhub_finetune.io_utils import atomic_write_text

MODES = ("train", "eval", "train_and_eval")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
LR_SCHEDULES = ("linear", "constant")
VERBOSITIES = ("auto", "0", "1", "2")
AUGMENTATIONS = ("basic", "randaugment", "none")
TASKS = ("single_label", "multi_label", "regression", "token_classification")
# What `monitor="auto"` (the default) watches for each task: a metric every run of it logs.
# Multi-label: macro-F1, not binary accuracy, which the many negatives of each row
# dominate (a model that answers "no" to every label scores high). Model selection's
# `metric="auto"` is the same entry without `val_`.
DEFAULT_MONITORS = {"single_label": "val_accuracy", "multi_label": "val_macro_f1",
                    "regression": "val_pearson", "token_classification": "val_entity_f1"}
TAG_SCHEMES = ("iob2", "iob1", "bioes")
POOLINGS = ("auto", "cls", "pooler", "mean")
# Serving forms written beside the float32 export (`--export_quantized`).
QUANTIZATIONS = ("none", "int8")
# A text classifier's int8 export also writes the network as a TFLite file: its folder
# (`<name>_int8_tflite`) and its serving-form name (`int8_tflite`) end with this.
TFLITE_SUFFIX = "_tflite"
# What an exported graph computes in (`export.serving_precision_scope`).
SERVING_PRECISIONS = ("float32", "as_trained", "auto")
# Larger than any pretrained image backbone's input (keras-hub's largest presets take 1024);
# beyond it a batch's pixels alone run to gigabytes.
MAX_IMAGE_SIZE = 2048
# `ExperimentConfig` fields that only shape the export, and what each changes there:
# without an export they do nothing (a pipeline refuses them without --export_dir),
# and they cannot change what training computes (selection's cache ignores them).
EXPORT_ONLY_FIELDS = {
    "export_quantized": "the variant is written beside the float32 export",
    "serving_jit_compile": "it changes the export",
    "serving_precision": "it changes the export",
}
ADAPTATIONS = ("full", "head", "top", "lora")
_ADAPTATION_FORMS = ("full (every weight trains), head (backbone frozen), top:K (the last K "
                     "transformer blocks or CNN stages train) or lora:R (LoRA of rank R on the "
                     "attention query/value projections; text encoders)")


@dataclasses.dataclass(frozen=True)
class Adaptation:
    """How much of the backbone trains: `full`, `head`, `top:K` or `lora:R`.

    The typed form of `--adaptation`: user strings are parsed once
    (`Adaptation.parse`, or by `ModelConfig`, which accepts the string), and
    everything below takes this value.

    Attributes:
        kind: str. `full` (every weight trains), `head` (the backbone is
            frozen; only the head trains), `top` (only the last `blocks`
            transformer blocks / CNN stages and what sits above them train;
            embeddings and stem frozen) or `lora` (keras-hub's
            `Backbone.enable_lora(rank)`: low-rank adapters on the attention
            query/value projections train, the backbone's own weights stay
            frozen; merged into plain kernels for export).
        blocks: int. `top` only: how many of the last blocks/stages train.
        rank: int. `lora` only: the rank of the adapters.

    Example:

    ```python
    Adaptation.parse("lora:8")  # Adaptation(kind='lora', blocks=0, rank=8)
    str(Adaptation("top", blocks=2))  # 'top:2'
    ```
    """

    kind: str = "full"
    blocks: int = 0
    rank: int = 0

    @classmethod
    def parse(cls, text: str | Adaptation) -> Adaptation:
        """`full`, `head`, `top:K` or `lora:R` as an `Adaptation` (validated)."""
        if isinstance(text, Adaptation):
            return text.validate()
        value = str(text).strip().lower()
        kind, _, number = value.partition(":")
        if kind not in ADAPTATIONS:
            _bad("adaptation", text, "Unknown adaptation method.",
                 f"{did_you_mean(kind, ADAPTATIONS)} Forms: {_ADAPTATION_FORMS}.")
        if kind in ("full", "head"):
            if number:
                _bad("adaptation", text, f"`{kind}` takes no number.", f"Use --adaptation={kind}.")
            return cls(kind).validate()
        if parse_int(number) is None:
            what = "blocks" if kind == "top" else "rank"
            _bad("adaptation", text, f"`{kind}` needs a positive integer ({what}).",
                 f"E.g. --adaptation={kind}:{2 if kind == 'top' else 8}.")
        n = int(number)
        return (cls(kind, blocks=n) if kind == "top" else cls(kind, rank=n)).validate()

    def validate(self) -> Adaptation:
        """Checks the value alone; whether the backbone allows it is checked when it loads."""
        if self.kind not in ADAPTATIONS:
            _bad("adaptation", self.kind, "Unknown adaptation method.",
                 f"{did_you_mean(str(self.kind), ADAPTATIONS)} Forms: {_ADAPTATION_FORMS}.")
        number = {"top": self.blocks, "lora": self.rank}.get(self.kind, 0)
        if self.kind in ("top", "lora") and not (isinstance(number, int) and number >= 1):
            _bad("adaptation", str(self), f"`{self.kind}` needs a number >= 1.",
                 f"E.g. --adaptation={self.kind}:{2 if self.kind == 'top' else 8}.")
        if (self.kind != "top" and self.blocks) or (self.kind != "lora" and self.rank):
            _bad("adaptation", f"{self.kind} (blocks={self.blocks}, rank={self.rank})",
                 "Only top:K sets blocks and only lora:R sets rank.")
        return self

    def __str__(self) -> str:
        if self.kind == "top":
            return f"top:{self.blocks}"
        if self.kind == "lora":
            return f"lora:{self.rank}"
        return self.kind


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where examples come from.

    Attributes:
        train_data: str. Training file / folder / `tfds:<name>[/<config>]`.
        eval_data: str. Evaluation source; empty means split `validation_split`
            off the training data.
        text_column: str. Column name or 0-based index (text data).
        text_pair_column: str. Column name or 0-based index of the second
            text of a pair (`[CLS] a [SEP] b [SEP]`); empty for single texts.
            Defaults to `""`.
        label_column: str. Column name or 0-based index.
        has_header: str. `auto`, `true` or `false`.
        label_type: str. `auto`, `id` or `name`.
        label_names: tuple of str. Names for integer ids, in id order.
        validation_split: float. Fraction held out when `eval_data` is empty.
        encoding: str. Text file encoding.
        max_train_examples: int. Use only the first N training examples (0: all).
        train_split: str. TFDS split for training.
        eval_split: str. TFDS split for evaluation.
        augment: str. Image training augmentation: `basic` (flip, zoom-in/shift
            crop, small rotation), `randaugment` (basic plus RandAugment) or
            `none`. Unused by text. Defaults to `"basic"`.
        crop_to_aspect_ratio: bool. Images: centre-crop to a square before
            resizing (no distortion). Unused by text. Defaults to `True`.
        tag_column: str. Token classification: the tag field of CoNLL files
            (0-based, negative from the end) or the tag key of JSONL.
            Defaults to `"-1"` (the last field; `tags` in JSONL).
        tag_scheme: str. Token classification: `iob2`, `iob1` or `bioes`,
            the scheme the files are in (converted to IOB2). Defaults to
            `"iob2"`.

    The last two were pipeline flags outside the config before; a params.json
    written then lacks them and loads with these defaults.
    """

    train_data: str = ""
    eval_data: str = ""
    text_column: str = "0"
    text_pair_column: str = ""
    label_column: str = "1"
    has_header: str = "auto"
    label_type: str = "auto"
    label_names: tuple[str, ...] = ()
    validation_split: float = 0.1
    encoding: str = "utf-8"
    max_train_examples: int = 0
    train_split: str = "train"
    eval_split: str = "validation"
    augment: str = "basic"
    crop_to_aspect_ratio: bool = True
    tag_column: str = "-1"
    tag_scheme: str = "iob2"


    def validate(self) -> DataConfig:
        """Checks the data fields; raises InputError naming the flag at fault."""
        _one_of("has_header", self.has_header, ("auto", "true", "false"))
        _one_of("label_type", self.label_type, ("auto", "id", "name"))
        for flag in ("text_column", "label_column"):
            value = str(getattr(self, flag)).strip()
            if not value:
                _bad(flag, value, f"--{flag} is empty.", "Give a 0-based index or a header name.")
            index = parse_int(value)
            if index is not None and index < 0:
                _bad(flag, value, f"--{flag} must be a 0-based index (>= 0) or a header name.")
        names = [str(n).strip() for n in self.label_names]
        if any(not n for n in names):
            _bad("label_names", ",".join(self.label_names), "--label_names has an empty name.")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            _bad("label_names", ",".join(self.label_names),
                 f"--label_names repeats {', '.join(duplicates)}.", "Give each class once.")
        if not isinstance(self.max_train_examples, int) or self.max_train_examples < 0:
            _bad("max_train_examples", self.max_train_examples,
                 "--max_train_examples must be >= 0 (0: all).")
        try:
            codecs.lookup(self.encoding)
        except (LookupError, TypeError):
            _bad("encoding", self.encoding, "Unknown text encoding.",
                 "E.g. utf-8, latin-1, cp1252, utf-16.")
        return self


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The network: backbone, head and input size.

    Attributes:
        backbone: str. Catalog name, path or TF Hub handle; required to
            train (the pipelines resolve it once into a `BackboneSpec`).
        task: str. `single_label`, `multi_label`, `regression` or
            `token_classification`.
        pooling: str. Text pooling: `auto`, `cls`, `pooler` or `mean`.
        dropout: float. Dropout before the head.
        adaptation: Adaptation. How much of the backbone trains (`full`,
            `head`, `top:K`, `lora:R`); a string is parsed. Replaces the old
            `freeze_backbone=True` (= `head`), which a params.json written
            before still loads as.
        sequence_length: int. Max word pieces per text (text models).
        image_size: int. Input side (image models; 0 = the backbone's own).
        window_stride: int. Token classification: word pieces between the
            starts of the sliding windows over a sentence longer than
            `sequence_length - 2` pieces (0: half a window).
    """

    backbone: str = ""
    task: str = "single_label"
    pooling: str = "auto"
    dropout: float = 0.1
    adaptation: Adaptation = Adaptation()
    sequence_length: int = 128
    image_size: int = 0
    window_stride: int = 0

    def __post_init__(self):
        if not isinstance(self.adaptation, Adaptation):
            # The edge: a string from a flag, params.json or a caller becomes the typed value.
            value = self.adaptation
            value = Adaptation(**value) if isinstance(value, dict) else Adaptation.parse(value)
            object.__setattr__(self, "adaptation", value)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train.

    Attributes:
        epochs: int. Passes over the training data.
        batch_size: int. Global batch size (split across replicas).
        learning_rate: float. Peak learning rate after warm-up.
        warmup_ratio: float. Fraction of steps with linear warm-up.
        weight_decay: float. AdamW decoupled weight decay.
        clip_norm: float. Global gradient-norm clip (0 disables).
        seed: int. Seeds initialisation, shuffling and dropout.
        monitor: str. Validation metric for the best checkpoint and early
            stop; `auto` (the default): the task's `DEFAULT_MONITORS` entry,
            filled in when the `ExperimentConfig` is made.
        early_stopping_patience: int. Epochs without improvement before
            stopping (0 disables).
        backup_every_steps: int. Also back up every N steps, not only at
            epoch ends (0: epoch ends only).
        bucketing: bool. Group training batches by length: shuffled windows
            of `data.text.LENGTH_GROUP_BATCHES` batches, each sorted by length
            (`data.text.batch_examples`).
        lr_schedule: str. After the linear warm-up: `linear` decays to 0 at
            the last step (BERT's recipe); `constant` warms up over
            `warmup_ratio` of the first epoch and then stays at
            `learning_rate`, so k epochs are exactly the start of any longer
            run (model selection continues trials that way).
    """

    epochs: int = 3
    batch_size: int = 32
    learning_rate: float = 5e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    seed: int = 42
    monitor: str = "auto"
    early_stopping_patience: int = 0
    backup_every_steps: int = 200
    bucketing: bool = True
    lr_schedule: str = "linear"


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """Where and how fast: strategy, precision, XLA.

    Attributes:
        distribution: str. Passed to `distribute.get_distribution_strategy`.
        num_gpus: int. GPUs to use (-1: all visible).
        all_reduce: str. Cross-device reduction for strategies that take one.
        tpu: str. TPU address for `distribution=tpu`.
        precision: str. `auto`, `float32`, `mixed_bfloat16` or `mixed_float16`.
        jit_compile: str. `auto`, `true` or `false` (XLA).
        verbose: str. Keras progress output: `auto`, `0` (silent), `1`
            (progress bar) or `2` (one line per epoch).
    """

    distribution: str = "auto"
    num_gpus: int = -1
    all_reduce: str = "auto"
    tpu: str = ""
    precision: str = "float32"
    jit_compile: str = "false"
    verbose: str = "auto"


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One fine-tuning run. Saved as `<model_dir>/params.json`.

    `export_quantized` (`none` or `int8`): with `--export_dir`, also write an
    int8 serving form beside the float32 export and measure both
    (`selection.serving_forms`). `serving_jit_compile` (text): compile the
    exported serving functions' model call with XLA
    (`export.export_text_classifier(serving_jit_compile=True)`); TF Serving
    then needs `--xla_cpu_compilation_enabled`. `serving_precision`:
    `float32` (default) exports a graph computing in float32 whatever
    `runtime.precision` trained it; `as_trained` keeps the training policy
    (`export.serving_precision_scope`); `auto` (text, keras-hub BERT
    encoders) serves bf16 where it measures faster on the exporting CPU
    (`serving_graph.fastest_lowering`), float32 elsewhere.

    Example:

    ```python
    config = ExperimentConfig(model_dir="runs/x", data=DataConfig(train_data="train.tsv"))
    config.validate()
    ```
    """

    mode: str = "train_and_eval"
    model_dir: str = ""
    export_quantized: str = "none"
    serving_jit_compile: bool = False
    serving_precision: str = "float32"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)

    def __post_init__(self):
        # Resolved once, here, so params.json, the resume check and the callbacks all see the
        # metric itself (a regression run must not watch val_accuracy because it was the default).
        if self.train.monitor == "auto" and self.model.task in DEFAULT_MONITORS:
            object.__setattr__(self, "train", dataclasses.replace(
                self.train, monitor=DEFAULT_MONITORS[self.model.task]))

    def validate(self) -> ExperimentConfig:
        """Checks every value; raises InputError naming the flag at fault."""
        _one_of("mode", self.mode, MODES)
        if self.mode != "eval" and not self.model.backbone:
            _bad("backbone", "", "A backbone is required.", "Set --backbone (e.g. minilm_l6_h384).")
        if not self.model_dir:
            _bad("model_dir", self.model_dir, "A model directory is required.", "Set --model_dir.")
        if self.mode != "eval" and not self.data.train_data:
            _bad("train_data", "", "Training needs data.", "Set --train_data.")
        if self.mode == "eval" and not self.data.eval_data:
            _bad("eval_data", "", "Evaluation needs data.", "Set --eval_data.")
        t = self.train
        _positive("epochs", t.epochs)
        _positive("batch_size", t.batch_size)
        if not t.learning_rate > 0:
            _bad("learning_rate", t.learning_rate, "Learning rate must be positive.")
        _in_range("warmup_ratio", t.warmup_ratio, 0.0, 1.0)
        _in_range("weight_decay", t.weight_decay, 0.0, 1.0)
        _in_range("dropout", self.model.dropout, 0.0, 0.99)
        _in_range("validation_split", self.data.validation_split, 0.0, 0.9)
        if self.data.augment not in AUGMENTATIONS:
            _bad("augment", self.data.augment, "Unknown augmentation.",
                 did_you_mean(str(self.data.augment), AUGMENTATIONS))
        if not isinstance(self.data.crop_to_aspect_ratio, bool):
            _bad("crop_to_aspect_ratio", self.data.crop_to_aspect_ratio,
                 "--crop_to_aspect_ratio must be a boolean.", "Expected True or False.")
        if (self.data.label_column == self.data.text_column
                and self.model.task != "token_classification"):
            # Each text would be its own class: a model that "trains" and learns nothing.
            _bad("label_column", self.data.label_column,
                 "The label column is the text column.",
                 f"Give the column that holds the labels (--text_column={self.data.text_column}).")
        if self.data.text_pair_column and self.data.text_pair_column in (
            self.data.text_column, self.data.label_column
        ):
            _bad("text_pair_column", self.data.text_pair_column,
                 "The second text's column is already the text or label column.",
                 "Give the column that holds the second text of each pair.")
        if t.clip_norm < 0:
            _bad("clip_norm", t.clip_norm, "Clip norm must be >= 0.")
        if t.backup_every_steps < 0:
            _bad("backup_every_steps", t.backup_every_steps, "Must be >= 0.")
        if t.early_stopping_patience < 0:
            _bad("early_stopping_patience", t.early_stopping_patience, "Must be >= 0.")
        if self.model.sequence_length < 8:
            _bad("sequence_length", self.model.sequence_length, "Sequence length must be >= 8.")
        _one_of("task", self.model.task, TASKS)
        _one_of("tag_scheme", self.data.tag_scheme, TAG_SCHEMES)
        if not 0 <= self.model.window_stride <= self.model.sequence_length - 2:
            _bad("window_stride", self.model.window_stride,
                 "--window_stride must be in [0, sequence_length - 2].",
                 f"Windows hold {self.model.sequence_length - 2} word pieces; 0 means half that.")
        if not 0 <= self.model.image_size <= MAX_IMAGE_SIZE:
            _bad("image_size", self.model.image_size,
                 f"Image size must be in [0, {MAX_IMAGE_SIZE}] (0: the backbone's own).")
        self.data.validate()
        if self.mode != "eval" and not self.data.eval_data and not self.data.validation_split > 0:
            _bad("validation_split", self.data.validation_split,
                 "Without --eval_data, --validation_split must be > 0 (the held-out part).",
                 "Set --eval_data, or e.g. --validation_split=0.1.")
        if not 0 <= t.seed < 2**32:
            _bad("seed", t.seed, "--seed must be in [0, 2**32).")
        _one_of("pooling", self.model.pooling, POOLINGS)
        self.model.adaptation.validate()
        if len(self.data.label_names) == 1 and self.model.task != "regression":
            _bad("label_names", ",".join(self.data.label_names),
                 "--label_names has a single class; a classifier needs at least two.")
        for flag, value in (("learning_rate", t.learning_rate), ("clip_norm", t.clip_norm)):
            if not math.isfinite(value):
                _bad(flag, value, f"--{flag} must be a finite number.")
        if not isinstance(t.monitor, str) or not t.monitor:
            _bad("monitor", t.monitor, "--monitor must name a logged metric.",
                 "E.g. val_accuracy or val_loss.")
        if self.runtime.num_gpus < -1:
            _bad("num_gpus", self.runtime.num_gpus, "--num_gpus must be -1 (all) or >= 0.")
        _one_of("precision", self.runtime.precision, PRECISIONS)
        _one_of("jit_compile", self.runtime.jit_compile, ("auto", "true", "false"))
        _one_of("lr_schedule", t.lr_schedule, LR_SCHEDULES)
        _one_of("verbose", self.runtime.verbose, VERBOSITIES)
        if self.export_quantized not in QUANTIZATIONS:
            _bad("export_quantized", self.export_quantized, "Unknown serving form for --export_quantized.",
                 did_you_mean(str(self.export_quantized), QUANTIZATIONS))
        _one_of("serving_precision", self.serving_precision, SERVING_PRECISIONS)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Every field as `section.name -> value` (`model.backbone`, `mode`), derived from the classes.

        Example:

        ```python
        ExperimentConfig().flat()["train.learning_rate"]  # 5e-05
        ```
        """
        return _flatten(self.to_dict())

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentConfig:
        data = dict(data)
        dc = dict(data.pop("data", {}))
        dc["label_names"] = tuple(dc.get("label_names", ()))
        return cls(
            data=DataConfig(**dc),
            model=ModelConfig(**_model_fields(data.pop("model", {}))),
            train=TrainConfig(**data.pop("train", {})),
            runtime=RuntimeConfig(**data.pop("runtime", {})),
            **data,
        )

    @classmethod
    def load(cls, path: str | Path) -> ExperimentConfig:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def _model_fields(model: dict[str, Any]) -> dict[str, Any]:
    """`ModelConfig` kwargs from params.json; one written before `adaptation` had `freeze_backbone`."""
    model = dict(model)
    if model.pop("freeze_backbone", False) and "adaptation" not in model:
        model["adaptation"] = "head"
    return model


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def keras_verbose(value: str) -> int | str:
    """`RuntimeConfig.verbose` as `fit`'s `verbose` argument."""
    return "auto" if value == "auto" else int(value)


def _bad(flag: str, value: Any, problem: str, fix: str | None = None) -> None:
    raise InputError(problem, received={flag: value}, fix=fix)


def _one_of(flag: str, value: Any, choices) -> None:
    if value not in choices:
        _bad(flag, value, f"Invalid value for --{flag}.", f"Expected one of: {', '.join(choices)}.")


def _positive(flag: str, value: int) -> None:
    if value <= 0:
        _bad(flag, value, f"--{flag} must be a positive integer.")


def _in_range(flag: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        _bad(flag, value, f"--{flag} must be in [{low}, {high}].")
