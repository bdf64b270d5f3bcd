"""Flags shared by the pipelines, and the one place flags become an `ExperimentConfig`.

All flags are optional here (Model Garden's habit: tests set only what they
need); each pipeline's `main` checks what it requires through
`ExperimentConfig.validate()`, which names the flag at fault.
"""

from __future__ import annotations

import dataclasses
import importlib.abc
import importlib.machinery
import logging
import os
import sys
from pathlib import Path

from absl import flags

from tfhub_finetune.config import (
    DEFAULT_MONITORS,
    EXPORT_ONLY_FIELDS,
    ExperimentConfig,
    ModelConfig,
)
from tfhub_finetune.errors import InputError
from tfhub_finetune.io_utils import check_export_name, check_output_dir

FLAGS = flags.FLAGS


def define_common_flags() -> None:
    """Defines the flags every training pipeline takes."""
    flags.DEFINE_enum("mode", "train_and_eval", ["train", "eval", "train_and_eval"],
                      "train: fit and save; eval: evaluate the saved best model; train_and_eval: both.")
    flags.DEFINE_string("model_dir", None, "Where checkpoints, logs, metrics and the model go.")
    flags.DEFINE_string("backbone", None, "Catalog name (e.g. minilm_l6_h384, minilm_l6_h384@layers=2, "
                        "scratch_text_encoder), local directory, or TF Hub handle.")
    flags.DEFINE_string("train_data", None, "Training data: file, folder, or tfds:<name>[/<config>].")
    flags.DEFINE_string("eval_data", None, "Evaluation data, same forms; empty: hold out "
                        "--validation_split of the training data.")
    flags.DEFINE_string("tfds_fallback", None, "TFDS name used when --train_data/--eval_data "
                        "files do not exist (e.g. glue/sst2).")
    flags.DEFINE_float("validation_split", 0.1, "Fraction of training data held out when "
                       "--eval_data is empty.")
    flags.DEFINE_integer("max_train_examples", 0, "Use only the first N training examples (0: all).")
    flags.DEFINE_string("train_split", "train", "TFDS split for training.")
    flags.DEFINE_string("eval_split", "validation", "TFDS split for evaluation.")
    flags.DEFINE_list("label_names", [], "Names for integer label ids, in id order.")
    flags.DEFINE_enum("label_type", "auto", ["auto", "id", "name"],
                      "Whether labels are integer ids or class names.")
    flags.DEFINE_enum("task", "single_label", ["single_label", "multi_label", "regression"],
                      "Head: softmax, per-label sigmoid, or linear regression.")
    flags.DEFINE_float("dropout", 0.1, "Dropout before the head.")
    flags.DEFINE_string("adaptation", "full", "How much of the backbone trains: full, head "
                        "(backbone frozen), top:K (the last K transformer blocks / CNN stages) "
                        "or lora:R (keras-hub LoRA of rank R, text encoders; merged for export).")
    flags.DEFINE_bool("freeze_backbone", False, "Deprecated: use --adaptation=head.")
    flags.DEFINE_integer("epochs", 3, "Training epochs.")
    flags.DEFINE_integer("batch_size", 32, "Global batch size (split across replicas).")
    flags.DEFINE_float("learning_rate", 5e-5, "Peak learning rate (AdamW, linear warm-up and decay).")
    flags.DEFINE_float("warmup_ratio", 0.1, "Fraction of training steps spent warming up.")
    flags.DEFINE_float("weight_decay", 0.01, "AdamW decoupled weight decay.")
    flags.DEFINE_float("clip_norm", 1.0, "Global gradient-norm clip (0 disables).")
    flags.DEFINE_integer("seed", 42, "Random seed (initialisation, shuffling, dropout).")
    flags.DEFINE_string("monitor", "auto", "Validation metric that picks the best checkpoint; auto: "
                        + ", ".join(f"{metric} ({task})" for task, metric in DEFAULT_MONITORS.items())
                        + ".")
    flags.DEFINE_enum("lr_schedule", "linear", ["linear", "constant"], "After warm-up: linear "
                      "decay to 0, or constant (warm-up over the first epoch only).")
    flags.DEFINE_integer("early_stopping_patience", 0, "Stop after N epochs without improvement (0: off).")
    flags.DEFINE_integer("backup_every_steps", 200, "Back up weights+optimizer every N steps "
                         "(and at epoch ends) so a killed run resumes.")
    flags.DEFINE_string("encoding", "utf-8", "Encoding of text data files.")
    flags.DEFINE_string("export_dir", None, "Also export a TF Serving SavedModel under "
                        "<export_dir>/<model_name>/<version>.")
    flags.DEFINE_string("model_name", None, "Model name in the export path (default: from model_dir).")
    # Runtime.
    flags.DEFINE_string("distribution", "auto", "auto|cpu|gpu|mirrored|multi_worker|parameter_server|tpu.")
    flags.DEFINE_integer("num_gpus", -1, "GPUs to use (-1: all visible).")
    flags.DEFINE_string("all_reduce", "auto", "nccl|ring|hierarchical_copy|auto, where the strategy takes one.")
    flags.DEFINE_string("tpu", "", "TPU address for --distribution=tpu.")
    flags.DEFINE_string("precision", "float32", "float32|mixed_bfloat16|mixed_float16|auto.")
    flags.DEFINE_enum("jit_compile", "false", ["true", "false", "auto"], "XLA.",
                      case_sensitive=False)
    flags.DEFINE_integer("verbose", 1, "Keras verbosity: 0 silent, 1 progress bar, 2 one line per epoch.")


def define_serving_flags() -> None:
    """Flags of the pipelines whose export has quantized serving forms (text, image)."""
    # A string, not an enum: `ExperimentConfig.validate()` checks it (one line, close names).
    flags.DEFINE_string(
        "export_quantized", "none",
        "none|int8. With --export_dir, also write an int8 serving form beside the float32 "
        "export (text: Keras int8 SavedModel <model_name>_int8/<version>; images: TFLite "
        "dynamic-range <model_name>_int8/<version>/model.tflite) and measure accuracy, "
        "latency, throughput and size of each into <model_dir>/serving.json.",
    )
    flags.DEFINE_string(
        "serving_precision", "float32",
        "float32|as_trained|auto. What the exported graph computes in: float32 whatever "
        "--precision trained the model, as_trained (bf16 matmuls for a mixed_bfloat16 "
        "model), or auto (text models on a keras-hub BERT encoder: bf16 kernels where both "
        "were timed at export and bf16 was faster on this CPU, float32 elsewhere; export "
        "again for a serving fleet of another CPU kind). See BUILD_NOTES.md 'Serving graph'.",
    )


def define_text_serving_flags() -> None:
    """Flags of the text classifier's export only."""
    flags.DEFINE_bool(
        "serving_jit_compile", False,
        "With --export_dir, compile the exported serving functions' model call with XLA, on "
        "length chunks padded to a few bucketed shapes. TF Serving must then run with "
        "--xla_cpu_compilation_enabled, or it refuses the model at load (its warm-up requests "
        "compile every shape). Opt-in: see BUILD_NOTES.md "
        "'Serving levers' for what it measured.",
    )


def define_text_flags() -> None:
    flags.DEFINE_string("text_column", "0", "Text column: name (needs a header) or 0-based index.")
    flags.DEFINE_string("text_pair_column", "", "Second text of a pair (MRPC, STS-B): column "
                        "name or 0-based index; packed as [CLS] a [SEP] b [SEP]. Empty: single texts.")
    flags.DEFINE_string("label_column", "1", "Label column: name or 0-based index.")
    flags.DEFINE_enum("has_header", "auto", ["auto", "true", "false"], "Whether files have a header row.")
    flags.DEFINE_integer("sequence_length", 128, "Max word pieces per text, [CLS]/[SEP] included.")
    flags.DEFINE_enum("pooling", "auto", ["auto", "cls", "pooler", "mean"], "Sentence pooling.")
    flags.DEFINE_bool("bucketing", True, "Group training batches by length: shuffled windows, "
                      "each sorted by length (much faster on CPU).")


def define_image_flags() -> None:
    flags.DEFINE_integer("image_size", 0, "Input side in pixels (0: the backbone's own).")
    # A string, not an enum: `ExperimentConfig.validate()` checks it and suggests
    # the close name, as for every other config value.
    flags.DEFINE_string(
        "augment",
        "basic",
        "Training augmentation: basic (flip, zoom-in/shift crop, small rotation), randaugment "
        "(basic + keras RandAugment, strong) or none.",
    )
    flags.DEFINE_bool(
        "crop_to_aspect_ratio", True,
        "Centre-crop images to a square before resizing (no distortion).",
    )


def define_token_flags() -> None:
    """Flags of `pipelines.token_classify` (CoNLL / JSONL tagging data)."""
    flags.DEFINE_string("text_column", "0", "Token field of CoNLL files (0-based), or the tokens "
                        "key of JSONL (an index means `tokens`).")
    flags.DEFINE_integer("sequence_length", 128, "Word pieces per window, [CLS]/[SEP] included; "
                         "longer sentences are split into sliding windows.")
    flags.DEFINE_bool("bucketing", True, "Group training batches by length: shuffled windows, "
                      "each sorted by length (much faster on CPU).")
    define_tag_flags()


# The flags only tagging data has: giving one to `select_model` selects for token classification.
TAG_FLAGS = ("tag_column", "tag_scheme", "window_stride")


def define_tag_flags() -> None:
    """The tagging-only flags (`TAG_FLAGS`), shared by token_classify and select_model."""
    flags.DEFINE_string("tag_column", "-1", "Tag field of CoNLL files (0-based, negative from the "
                        "end; -1: last), or the tags key of JSONL (an index means `tags`).")
    flags.DEFINE_enum("tag_scheme", "iob2", ["iob2", "iob1", "bioes"],
                      "Tag scheme of the files; converted to IOB2.")
    flags.DEFINE_integer("window_stride", 0, "Word pieces between window starts (0: half a window).")


def config_from_flags(model_task: str | None = None) -> ExperimentConfig:
    """Builds the validated config from parsed flags.

    Every config field is read from the flag of the same name when the
    pipeline defines one (a field without a flag keeps its default), so a
    new config field needs its flag and nothing else here.

    Args:
        model_task: str or None. The pipeline's own `ModelConfig.task`
            (`token_classification`), where it has no `--task` flag.
    """
    config = experiment_config_from_flags(model_task).validate()
    f = FLAGS
    labels = Path(config.model_dir) / "labels.json"
    if config.mode == "eval" and not labels.exists():
        raise InputError("No trained model in the model directory (no labels.json).",
                         received={"model_dir": config.model_dir},
                         fix="Train first with --mode=train or --mode=train_and_eval.")
    if config.mode == "eval":
        _check_trained_like(config)
    # Before any data is read or model loaded: a bad output folder costs a second, not a run.
    check_output_dir(config.model_dir, "model_dir")  # Eval writes metrics.json there too.
    export_dir = f.export_dir if "export_dir" in f else None
    defaults = ExperimentConfig()
    # Set away from their default without --export_dir they would do nothing.
    for name, why in EXPORT_ONLY_FIELDS.items():
        value = getattr(config, name)
        if value != getattr(defaults, name) and not export_dir:
            raise InputError(f"--{name} needs --export_dir ({why}).", received={name: value},
                             fix=f"Set --export_dir, or drop --{name}.")
    if export_dir and config.mode != "eval":
        check_output_dir(export_dir, "export_dir")
        check_export_name(f.model_name or Path(config.model_dir).resolve().name)
    return config


def experiment_config_from_flags(model_task: str | None = None) -> ExperimentConfig:
    """`config_from_flags` without `validate()` (model selection fills in the trial fields first)."""
    given = {} if model_task is None else {
        "model": dataclass_from_flags(ModelConfig, task=model_task)}
    config = dataclass_from_flags(ExperimentConfig, **given)
    if "freeze_backbone" in FLAGS and FLAGS.freeze_backbone:
        # The deprecated spelling of --adaptation=head, kept so old flag files still run.
        if config.model.adaptation.kind not in ("full", "head"):
            raise InputError("--freeze_backbone (deprecated) contradicts --adaptation.",
                             received={"freeze_backbone": True,
                                       "adaptation": str(config.model.adaptation)},
                             fix="Drop --freeze_backbone; --adaptation=head is its new name.")
        logging.warning("--freeze_backbone is deprecated; use --adaptation=head.")
        config = dataclasses.replace(
            config, model=dataclasses.replace(config.model, adaptation="head"))
    return config


def dataclass_from_flags(cls, **given):
    """An instance of dataclass `cls` with each field read from the flag of its name.

    Nested dataclass fields are read the same way, except value types with a
    `parse` classmethod (`Adaptation`), which come from the flag of their own
    name as a string (the dataclass holding them parses it); a field with no
    flag (or a flag left at None) keeps its default; `given` values win over flags.
    """
    values = dict(given)
    for field in dataclasses.fields(cls):
        default = (field.default_factory() if field.default_factory is not dataclasses.MISSING
                   else field.default)
        if field.name in given:
            continue
        if dataclasses.is_dataclass(default) and not hasattr(default, "parse"):
            values[field.name] = dataclass_from_flags(type(default))
        elif field.name in FLAGS and FLAGS[field.name].value is not None:
            value = FLAGS[field.name].value
            # Flags give lists and ints where the config keeps tuples and strings.
            if isinstance(default, tuple):
                value = tuple(value)
            elif isinstance(default, str):
                value = str(value)
            values[field.name] = value
    return cls(**values)


# The settings that size a step's tensors, which a user can lower.
_OUT_OF_MEMORY = ("Out of memory: the batch does not fit. Lower --batch_size (or --image_size / "
                  "--sequence_length).")


def _fail(message: str, code: int) -> None:
    """Prints `error: <message>` as one line on stderr and exits with `code`."""
    text = " ".join(str(message).split())
    # absl's own messages may start with a prefix of their own ("ERROR:: Unable to open
    # flagfile"); one `error:` is enough.
    while text.lower().startswith("error:"):
        text = text[len("error:"):].lstrip(": ")
    print(f"error: {text}", file=sys.stderr, flush=True)
    sys.exit(code)


def _check_flag_files(args: list[str], seen: frozenset = frozenset()) -> None:
    """Refuses a flag file absl would misread: one starting with a UTF-8 byte-order mark.

    absl takes the mark for part of the first line, which then is no flag and is
    dropped without a word (the run goes on without, say, its --backbone). Files
    named inside flag files are checked too; unreadable ones are left to absl.
    """
    for i, arg in enumerate(args):
        name = arg.lstrip("-")
        if name.startswith("flagfile="):
            path = name[len("flagfile="):]
        elif name == "flagfile" and arg.startswith("-") and i + 1 < len(args):
            path = args[i + 1]
        else:
            continue
        file = Path(path).expanduser()
        if file in seen:
            continue
        try:
            data = file.read_bytes()
        except OSError:
            continue
        if data.startswith(b"\xef\xbb\xbf"):
            _fail("The flag file starts with a UTF-8 byte-order mark, which absl reads as part "
                  f"of its first flag (then ignored). Received: flagfile={path}. Save it as "
                  "UTF-8 without the BOM.", 2)
        nested = [line.strip() for line in data.decode("utf-8", "replace").splitlines()]
        _check_flag_files([line for line in nested if line.startswith("-")], seen | {file})


def _check_trained_like(config: ExperimentConfig) -> None:
    """Eval rebuilds the model from the flags: they must name what `params.json` trained.

    Otherwise another pipeline's or backbone's folder fails later with a
    misleading error (an image model's labels "never seen" in a text file).
    """
    import json

    params = Path(config.model_dir) / "params.json"
    try:
        record = json.loads(params.read_text(encoding="utf-8"))
        trained, data = record.get("model") or {}, record.get("data") or {}
    except (OSError, ValueError, AttributeError):
        return  # No (readable) record: the weights' own check decides.
    # A pair model fed single texts (or the reverse) runs, on the wrong inputs: its metrics
    # would be computed and saved. The column may be named otherwise in the eval file.
    pairs = data.get("text_pair_column") if isinstance(data, dict) else None
    if pairs is not None and bool(pairs) != bool(config.data.text_pair_column):
        raise InputError(
            "The model directory holds a model trained on "
            + ("text pairs; eval needs its second text." if pairs else
               "single texts; eval got a second text."),
            received={"model_dir": config.model_dir,
                      "text_pair_column": config.data.text_pair_column},
            fix=(f"Give --text_pair_column (training read `{pairs}`)." if pairs else
                 "Drop --text_pair_column, or give the right --model_dir."))
    for name in ("task", "backbone"):
        value = getattr(config.model, name)
        if name in trained and trained[name] != value:
            raise InputError(
                f"The model directory holds a model trained with another {name}.",
                received={"model_dir": config.model_dir, name: value},
                fix=f"It was trained with {name}={trained[name]} (params.json): evaluate it with "
                "that pipeline and flag, or give the right --model_dir.")


def parse_flags_or_exit(argv: list[str]) -> list[str]:
    """absl flag parsing that reports bad flags in one line with exit code 2."""
    _check_flag_files(argv[1:])
    try:
        return FLAGS(argv)
    except flags.Error as err:
        _fail(str(err), 2)


def run_main(main_fn) -> None:
    """Runs `main_fn(argv)` as a pipeline: how it ends is one line and an exit code.

    An `InputError` prints its one line and exits 2; `Preempted` (SIGTERM, after the
    backup) prints "interrupted at step N ... rerun" and exits 143. TensorFlow's C++
    start-up logs (CUDA probing on a CPU machine, oneDNN notices) are kept off stderr
    unless `TFHUB_FINETUNE_TF_LOGS=1`, and its CPU kernels are the ones measured faster
    here (see `prepare_tensorflow_startup`).
    """
    from absl import app

    from tfhub_finetune.errors import PREEMPTED_EXIT_CODE, Preempted

    prepare_tensorflow_startup()

    def wrapped(argv):
        if not FLAGS["verbosity"].present:
            # absl's default shows every library's INFO records (matplotlib's "generated new
            # fontManager" on a fresh machine, ...) on stderr, where a failing pipeline's one
            # line must stand alone: others' from WARNING up, ours from INFO (training notes).
            logging.getLogger().setLevel(logging.WARNING)
            logging.getLogger("tfhub_finetune").setLevel(logging.INFO)
        try:
            return main_fn(argv)
        except InputError as err:
            _fail(str(err), 2)
        except MemoryError:
            _fail(_OUT_OF_MEMORY + " Received: MemoryError.", 2)
        except Exception as err:
            # TensorFlow's own (its allocator's message is pages of tensor shapes).
            if type(err).__name__ != "ResourceExhaustedError" or "tensorflow" not in sys.modules:
                raise
            _fail(f"{_OUT_OF_MEMORY} Received: {str(err).splitlines()[0][:200]}", 2)
        except Preempted as stop:
            # The backup is committed and the callbacks' files closed (fit_resumable): end
            # now, without the interpreter's TensorFlow teardown (seconds, which a
            # scheduler's grace period may not leave).
            print(f"error: {stop}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            logging.shutdown()
            os._exit(PREEMPTED_EXIT_CODE)

    app.run(wrapped, flags_parser=parse_flags_or_exit)


TF_LOGS_ENV = "TFHUB_FINETUNE_TF_LOGS"


def prepare_tensorflow_startup() -> None:
    """Settles, at the first `import tensorflow`, what TensorFlow reads only when it starts.

    Two things, both just before TensorFlow loads (so after the flags are
    checked: flag errors stay instant, and a pipeline that ends before
    training pays for neither):

    - Its CPU kernels: `tf_startup.choose_cpu_kernels` sets
      `TF_ENABLE_ONEDNN_OPTS` to whichever of oneDNN and Eigen this machine
      measured faster (cached; a user's own setting wins).
    - Its C++ start-up logs, kept off stderr unless `$TFHUB_FINETUNE_TF_LOGS=1`.
      Two kinds of noise bury a pipeline's one-line message: lines TensorFlow's
      libraries log while they load (`Could not find cuda drivers`, the
      oneDNN notice), which absl's C++ logging writes to stderr before
      anything can set its level, so `TF_CPP_MIN_LOG_LEVEL` does not stop
      them; and runtime errors such as `failed call to cuInit` on a machine
      without GPUs, which `TF_CPP_MIN_LOG_LEVEL=3` does. So the level
      defaults to 3 (a user's own setting wins), and the import runs with
      file descriptor 2 pointed at /dev/null (Python's own errors are raised
      after it is restored; only C++ writes during the import are dropped).
    """
    quiet = os.environ.get(TF_LOGS_ENV, "").lower() not in ("1", "true", "yes")
    if quiet:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in sys.modules or any(isinstance(f, _TensorflowStartup) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TensorflowStartup(quiet))


class _TensorflowStartup(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` as usual, after choosing its CPU kernels; loads it muted if `quiet`."""

    def __init__(self, quiet: bool):
        self._quiet = quiet

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # Once: later imports are dictionary look-ups anyway.
        from tfhub_finetune.tf_startup import choose_cpu_kernels

        choose_cpu_kernels()
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if self._quiet and spec is not None and spec.loader is not None:
            spec.loader = _MutedLoader(spec.loader)
        return spec


class _MutedLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            with open(os.devnull, "w") as devnull:
                os.dup2(devnull.fileno(), 2)
            self._loader.exec_module(module)
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def write_quantized_form(task, model, float_path: str, config: ExperimentConfig, exporter,
                         **inputs) -> None:
    """`--export_quantized`: writes that form beside the float32 export, then measures both.

    Args:
        exporter: the modality's `quantized_export.export_quantized_*` function.
        **inputs: what it needs besides the model (`backbone`, `labels`, `image_size`, ...).
    """
    if config.export_quantized == "none":
        return
    from tfhub_finetune.quantized_export import TFLITE_FILE, TFLITE_SUFFIX, tflite_form

    variant = exporter(model, export_dir=FLAGS.export_dir, mode=config.export_quantized,
                       model_name=FLAGS.model_name, model_dir=config.model_dir,
                       quantized_from=float_path, **inputs)
    tflite = Path(variant) / TFLITE_FILE
    print(f"Exported {config.export_quantized} "
          + (f"TFLite: {tflite}" if tflite.exists() else f"SavedModel: {variant}"))
    forms = {"float32": float_path, config.export_quantized: variant}
    # Text also gets the same int8 network as a TFLite file (token ids in).
    twin = tflite_form(variant)
    if twin is not None:
        print(f"Exported {config.export_quantized} TFLite (token ids in): {twin / TFLITE_FILE}")
        forms[config.export_quantized + TFLITE_SUFFIX] = str(twin)
    print_serving_forms(task, forms, config.model_dir)


def print_serving_forms(task, forms: dict, model_dir: str) -> None:
    """Measures the exported serving forms into `<model_dir>/serving.json` and prints the table."""
    from tfhub_finetune.selection.serving_forms import summary_lines, write_serving_forms_report

    print("Measuring the serving forms (eval set, batch-1 latency, throughput, size) ...",
          flush=True)
    report = write_serving_forms_report(task, forms, model_dir)
    print("\n".join(summary_lines(report)))
    print(f"Serving forms: {model_dir}/serving.json (load average "
          f"{report['load_average']['before']} -> {report['load_average']['after']})")


def print_summary(result: dict, model_dir: str) -> None:
    """Prints the figures a person looks for after a run."""
    evaluation = result.get("eval") or {}
    lines = []
    for key in ("accuracy", "macro_f1", "auc", "exact_match", "mae", "rmse", "pearson",
                "spearman", "entity_f1", "entity_precision", "entity_recall", "token_accuracy"):
        if evaluation.get(key) is not None:
            lines.append(f"{key}={evaluation[key]:.4f}")
    if lines:
        print(f"Eval ({evaluation.get('num_examples', '?')} examples): " + "  ".join(lines))
    if "train_seconds" in result:
        print(f"Training time: {result['train_seconds']:.1f} s"
              + (f" ({result['train_examples_per_second']:.1f} examples/s)"
                 if result.get("train_examples_per_second") else ""))
    if "wall_seconds" in result:
        print(f"Wall time: {result['wall_seconds']:.1f} s")
    print(f"Model, metrics and logs: {model_dir} (metrics.json, model.keras, logs/)")
