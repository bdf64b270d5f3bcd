"""Measure each serving form of one trained model: quality, latency, throughput, size.

A serving form is an export folder: the float32 SavedModel
(`export.export_*_classifier`), the Keras int8 SavedModel or the TFLite int8
file (`quantized_export`). Each is measured as it is served, on the same
inputs:

- Quality: the task's eval set, run through the export's network-only
  entry (the token-id twin for text and tokens, `predict_images` or the
  TFLite interpreter for images), scored by the same report as training's
  (`driver.outputs_report`; the task's entity report for tokens, word by
  word), plus the share of examples (words) whose predicted class (tag)
  agrees with the reference form (float32).
- Latency and throughput: the network alone (token ids at the trained
  sequence length, or pixels at the image size), so a SavedModel and a
  TFLite file are timed on the same work; batch-1 p50/p95 and throughput at
  `options.serving_batch_size` with `profile.py`'s timer. End-to-end latency
  of the raw-input signature (tokenizer or JPEG decoding included) comes from
  the model card, where the export measured it.
- Size: the served folder (SavedModel files, vocabulary and card included),
  or the `.tflite` file.

Ratios are each form's figure over the reference's: below 1 is smaller or
faster for latency and size, above 1 is faster for throughput.

Example:

```python
forms = {"float32": "exports/sst2/1", "int8": "exports/sst2_int8/1"}
report = measure_serving_forms(task, forms)
report["forms"]["int8"]["vs_reference"]["latency_p50_ratio"]
```
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tfhub_finetune.config import TFLITE_SUFFIX
from tfhub_finetune.selection.config import export_mode
from tfhub_finetune.selection.profile import (
    ProfileOptions,
    _folder_mb,
    _round,
    cpu_description,
    profile_saved_model,
    profile_tflite,
)

REFERENCE = "float32"
SERVING_FILE = "serving.json"
# What each form's row shows, in order (also the printed table's columns).
_TIMING_FIELDS = ("latency_p50_ms", "latency_p95_ms", "latency_clock", "latency_wall_p50_ms",
                  "latency_cpu_p50_ms", "load_average", "throughput_eps", "serving_batch_size",
                  "peak_infer_memory_mb")


def measure_serving_forms(
    task: Any,
    forms: Mapping[str, str | os.PathLike],
    *,
    options: ProfileOptions | None = None,
    reference: str = REFERENCE,
    predictions_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Measures every form in `forms` and compares each with `reference`.

    Args:
        task: a prepared `Task` (its `eval_dataset()` and `eval_targets()`).
        forms: form name -> export version folder (a SavedModel with a model
            card, or a folder holding `model.tflite`), reference first.
        options: ProfileOptions or None. Timing settings; defaults to
            batch 64 for throughput and shorter timing than selection uses.
        reference: str. The form the others are compared with.
        predictions_dir: str, path or None. Where to save each form's
            per-example predictions (`<form>.npz`, `stats.EvalPredictions`)
            for paired tests.

    Returns:
        A JSON-ready dict: `forms` (name -> figures and `vs_reference`
        ratios), `reference`, `device`, `load_average` at the start and end.
    """
    options = options or ProfileOptions(serving_batch_size=64, warmup_runs=3, min_runs=20,
                                        min_seconds=1.0)
    load_before = _load_average()
    measured: dict[str, dict[str, Any]] = {}
    outputs: dict[str, np.ndarray] = {}
    classes: dict[str, np.ndarray | None] = {}
    for name, path in forms.items():
        predict, figures = _open_form(Path(path), options)
        saved = None if predictions_dir is None else Path(predictions_dir) / f"{name}.npz"
        outputs[name], classes[name], report = _evaluate(task, predict, saved)
        figures["eval"] = _scalars(report)
        measured[name] = {"path": str(path), **figures}
    if reference in measured:
        for name, row in measured.items():
            row["vs_reference"] = _compare(row, measured[reference], outputs[name],
                                           outputs[reference], classes[name], classes[reference])
    return {
        "reference": reference,
        "device": cpu_description(),
        "load_average": {"before": load_before, "after": _load_average()},
        "latency_method": "network alone (token ids / pixels), batch 1: p50/p95 of timed calls "
        "after warm-up (selection.profile's timer); throughput at serving_batch_size",
        "forms": measured,
    }


def write_serving_forms_report(
    task: Any,
    forms: Mapping[str, str | os.PathLike],
    model_dir: str | os.PathLike,
    *,
    options: ProfileOptions | None = None,
) -> dict[str, Any]:
    """`measure_serving_forms`, written to `<model_dir>/serving.json` (atomically)."""
    import json

    from tfhub_finetune.io_utils import atomic_write_text

    report = measure_serving_forms(task, forms, options=options)
    atomic_write_text(Path(model_dir) / SERVING_FILE, json.dumps(report, indent=2))
    return report


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    """A small table of `measure_serving_forms`' result, for the pipeline's output."""
    lines = [f"{'form':<16}{'runtime':<16}{'metric':>16}{'agree':>8}{'p50 ms':>9}{'p95 ms':>9}"
             f"{'ex/s':>9}{'MB':>8}  vs {report['reference']}"]
    for name, row in report["forms"].items():
        metric = row["eval"].get(_headline_metric(row["eval"]))
        versus = row.get("vs_reference") or {}
        ratio = (f"metric {versus.get('metric_delta', 0):+.4f}, latency "
                 f"x{versus.get('latency_p50_ratio', float('nan')):.2f}, size "
                 f"x{versus.get('size_ratio', float('nan')):.2f}") if name != report["reference"] else ""
        lines.append(
            f"{name:<16}{row['runtime']:<16}{_fmt(metric, 4):>16}"
            f"{_fmt(versus.get('agreement'), 3):>8}{_fmt(row['latency_p50_ms'], 1):>9}"
            f"{_fmt(row['latency_p95_ms'], 1):>9}{_fmt(row['throughput_eps'], 1):>9}"
            f"{_fmt(row['size_mb'], 1):>8}  {ratio}"
        )
    return lines


# === Selection: a trial's serving forms ===


def export_forms(task: Any, model: Any, forms: Sequence[str],
                 export_dir: str | os.PathLike) -> dict[str, str]:
    """Exports `model` in each serving form as its training pipeline would; form -> version folder.

    Text and tokens: the float32 SavedModel and the Keras int8 one (text:
    `int8_tflite`, the TFLite file of the same int8 network); images: the
    float32 SavedModel and the TFLite int8 file (`quantized_export`).
    Export-time latency is not measured: `measure_serving_forms` times every
    form alike.
    """
    from tfhub_finetune import export, quantized_export, token_export
    from tfhub_finetune.tasks.image_classification import ImageClassificationTask

    image = isinstance(task, ImageClassificationTask)
    if task.config.model.task == "token_classification":
        m = task.config.model
        exporters = (token_export.export_token_classifier,
                     quantized_export.export_quantized_token_classifier)
        common = dict(backbone=task.backbone, labels=task.labels,
                      sequence_length=m.sequence_length, stride=m.window_stride)
    elif image:
        exporters = (export.export_image_classifier,
                     quantized_export.export_quantized_image_classifier)
        common = dict(labels=task.labels, image_size=task.image_size,
                      crop_to_aspect_ratio=task.config.data.crop_to_aspect_ratio)
    else:
        exporters = (export.export_text_classifier,
                     quantized_export.export_quantized_text_classifier)
        common = dict(backbone=task.backbone, labels=task.labels)
    float_export, quantized_export_of = exporters
    path = float_export(model, export_dir=export_dir, model_name="model", measure_latency=False,
                        **common)
    paths = {REFERENCE: path}
    # The TFLite form times nothing at export; the SavedModel forms would, unasked.
    untimed = {} if image else {"measure_latency": False}
    text = exporters[1] is quantized_export.export_quantized_text_classifier
    # `int8_tflite` is the TFLite file written with the text int8 export (`int8` is its
    # Keras SavedModel): one export per quantization mode serves both.
    for mode in dict.fromkeys(export_mode(f) for f in forms if f != REFERENCE):
        tflite = mode + TFLITE_SUFFIX
        if tflite in forms and not text:
            raise ValueError(f"`{tflite}` is a text classifier's form. Received: "
                             f"forms={list(forms)} for a {type(task).__name__}.")
        variant = quantized_export_of(model, export_dir=export_dir, mode=mode, model_name="model",
                                      quantized_from=path, **common, **untimed,
                                      **({"with_tflite": tflite in forms} if text else {}))
        if mode in forms:
            paths[mode] = variant
        if tflite in forms:
            paths[tflite] = str(quantized_export.tflite_form(variant))
    return paths


def measure_trial_forms(experiment: Any, spec: Any, trial_dir: str | os.PathLike,
                        forms: Sequence[str], work_dir: str | os.PathLike, *,
                        options: ProfileOptions | None = None) -> dict[str, Any]:
    """Every serving form of one selection trial's fine-tuned weights, measured side by side.

    Rebuilds the trial's model from its config (`experiment`, as
    `SelectionConfig.trial` made it), loads the weights of its committed
    backup (the last epoch trained), exports each form into `work_dir` and
    measures them (`measure_serving_forms`, the non-reference forms first),
    saving each form's predictions to `work_dir/<form>.npz`.

    Returns:
        The serving report, plus `weights_epoch` (the epoch the weights are from).

    Raises:
        InputError: when the trial has no committed backup.
    """
    import keras

    from tfhub_finetune import driver, training
    from tfhub_finetune.adaptation import merge_lora
    from tfhub_finetune.errors import InputError
    from tfhub_finetune.tasks import make_task

    keras.backend.clear_session()
    training.set_seed(experiment.train.seed)
    task = make_task(experiment, spec)
    task.prepare_train()
    model = task.build_model()
    driver.compile_model(model, experiment, task.steps_per_epoch, task.labels.num_classes)
    state = training.restore_backup(model, Path(trial_dir) / "backup")
    if state is None:
        raise InputError("The trial has no committed backup to export.",
                         received={"trial_dir": str(trial_dir)},
                         fix="Rerun the selection with --overwrite to retrain it.")
    # As the pipelines export: LoRA adapters merged into plain kernels.
    paths = export_forms(task, merge_lora(model), forms, Path(work_dir) / "exports")
    # The other forms first: memory a form frees is reused by the next one measured.
    ordered = {**{f: paths[f] for f in paths if f != REFERENCE}, REFERENCE: paths[REFERENCE]}
    report = measure_serving_forms(task, ordered, options=options, predictions_dir=work_dir)
    report["weights_epoch"] = int(state["epoch"])
    del model, task
    keras.backend.clear_session()
    return report


# === A serving form as a recommendation candidate ===

# Figures of the reference row that describe its serving, not its training: a form row
# gets its own (derived below) or none.
_SERVING_FIGURES = ("latency_p95_ms", "model_latency_p50_ms", "model_latency_p95_ms",
                    "throughput_eps", "saved_model_mb", "metric_interval", "memory_method",
                    "latency_wall_p50_ms", "latency_cpu_p50_ms", "inference_measured_on")


def form_name(configuration_name: str, form: str) -> str:
    """The candidate name of `form` of a fine-tuned configuration (`minilm int8`)."""
    return configuration_name if form == REFERENCE else f"{configuration_name} {form}"


def form_candidate(reference: Any, report: Mapping[str, Any], form: str,
                   metric_name: str, *, same_weights: bool = True) -> Any:
    """The candidate row of serving form `form`, from its float32 row and a serving report.

    Pure (no TensorFlow): `reference` is the configuration's float32
    `Candidate` (profiled end to end in its own process), `report` what
    `measure_serving_forms` measured for both forms of the same weights, side
    by side. The row's figures are the form's own:

    - metric: the form's `metric_name` on the eval set, measured, when the
      measured weights are those behind `reference.metric` (`same_weights`);
      otherwise (a search figure from an earlier, better epoch than the one
      whose weights were kept) the reference's figure plus the form's measured
      change on the same weights, since the change is what carries over;
    - latency: the reference's end-to-end p50 (p95) with its network share
      (`model_latency_p50_ms`) scaled by the form's measured network ratio;
      tokenizing or decoding costs what it did;
    - memory: the reference's peak inference memory plus the difference the
      two forms measured (the form measured first, so an allocator that
      reuses freed pages flatters the reference, never the form);
    - size: the form's own files; throughput scaled by the measured ratio;
    - training figures (epochs, minutes, training memory) and parameters are
      the configuration's: the same training made both.

    Args:
        reference: Candidate. The float32 row.
        report: dict. `measure_serving_forms` output holding `form` and
            `float32`.
        form: str. E.g. `int8`.
        metric_name: str. The selection metric (a `val_` prefix is dropped).
        same_weights: bool. Whether `report` measured the weights behind
            `reference.metric` (then the form's predictions may join paired tests).

    Returns:
        A `Candidate` named `form_name(reference.name, form)`; with `error`
        set when the form's metric or timing is missing.

    Example:

    ```python
    row = form_candidate(float_row, measure_serving_forms(task, forms), "int8", "accuracy")
    row.serving_form, row.latency_ms  # ('int8', 6.9)
    ```
    """
    from tfhub_finetune.selection.recommend import Candidate

    metric = metric_name.removeprefix("val_")
    mine, ref = report["forms"][form], report["forms"][REFERENCE]
    versus = mine.get("vs_reference") or {}
    figures = {k: v for k, v in reference.figures.items() if k not in _SERVING_FIGURES}
    error = None
    value = (mine.get("eval") or {}).get(metric)
    float_value = (ref.get("eval") or {}).get(metric)
    if value is not None and not same_weights:
        value = (None if float_value is None or not _number(reference.metric)
                 else float(reference.metric) + float(value) - float(float_value))
    if value is None:
        error = f"serving form {form}: no {metric} on the eval set"
    elif mine.get("timing_error") or mine.get("latency_p50_ms") is None:
        error = f"serving form {form}: timing failed ({mine.get('timing_error')})"

    def scaled(total: Any, ratio: Any) -> float | None:
        if not (_number(total) and _number(ratio)):
            return None
        network = reference.figures.get("model_latency_p50_ms")
        network = float(network) if _number(network) and network <= total else float(total)
        return _round(float(total) - network * (1.0 - float(ratio)))

    memory = None
    if _number(reference.memory_mb) and _number(mine.get("peak_infer_memory_mb")) and _number(
            ref.get("peak_infer_memory_mb")):
        memory = _round(max(float(reference.memory_mb) + mine["peak_infer_memory_mb"]
                            - ref["peak_infer_memory_mb"], mine.get("size_mb") or 0.0))
    throughput = reference.figures.get("throughput_eps")
    figures.update({
        "serving_form_of": reference.name,
        "runtime": mine.get("runtime"),
        "quantization": mine.get("quantization"),
        "latency_p95_ms": scaled(reference.figures.get("latency_p95_ms"),
                                 versus.get("latency_p95_ratio")),
        "throughput_eps": _round(throughput * versus["throughput_ratio"])
        if _number(throughput) and _number(versus.get("throughput_ratio")) else None,
        "saved_model_mb": mine.get("size_mb"),
        "serving_vs_float32": {k: versus.get(k) for k in (
            "metric_delta", "agreement", "latency_p50_ratio", "latency_p95_ratio",
            "throughput_ratio", "size_ratio")},
        "float32_same_weights_metric": float_value,
        "metric_method": f"{form} on the eval set" if same_weights else (
            f"float32 figure + ({form} - float32) on the same (later epoch's) weights"),
        "latency_method": "float32 profile (end to end) with its network share scaled by "
        f"the {form}/float32 network latency ratio measured side by side",
        "memory_method": f"float32 profile + ({form} - float32) peak measured side by side",
    })
    return Candidate(
        name=form_name(reference.name, form), metric=None if value is None else float(value),
        latency_ms=scaled(reference.latency_ms, versus.get("latency_p50_ratio")),
        memory_mb=memory, params=reference.params, error=error, figures=figures,
        backbone=reference.backbone, adaptation=reference.adaptation, serving_form=form,
    )


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


# === One form ===


def _open_form(path: Path, options: ProfileOptions) -> tuple[Callable[[Any], np.ndarray], dict]:
    """(batch -> outputs, timing and size figures) of the export at `path`."""
    from tfhub_finetune.quantized_export import TFLITE_FILE

    if (path / TFLITE_FILE).exists():
        return _open_tflite(path / TFLITE_FILE, options)
    return _open_saved_model(path, options)


def _open_saved_model(path: Path, options: ProfileOptions) -> tuple[Callable, dict]:
    import tensorflow as tf

    from tfhub_finetune.export import model_only_signature, read_model_card, resolve_saved_model

    path = resolve_saved_model(path)
    card = read_model_card(path) or {}
    folder, signature, shapes = model_only_signature(path, card)
    serve = tf.saved_model.load(str(folder)).signatures[signature]
    declared = serve.structured_input_signature[1]

    def predict(inputs: Any) -> np.ndarray:
        if isinstance(inputs, Mapping):
            feed = {k: tf.cast(inputs[k], declared[k].dtype) for k in declared}
        else:
            (key,) = declared
            feed = {key: tf.cast(inputs, declared[key].dtype)}
        out = serve(**feed)
        return np.asarray(out["probabilities"] if "probabilities" in out else out["scores"])

    profiled = profile_saved_model(folder, shapes, signature=signature, options=options)
    served = ((card.get("profile") or {}).get("latency_ms_batch1") or {}).get("serving_default")
    return predict, {
        "runtime": "tf_saved_model",
        "quantization": (card.get("quantization") or {}).get("mode", "none"),
        **_timing(profiled),
        "served_latency_p50_ms": served,
        "size_mb": _round(_folder_mb(path)),
        "variable_dtypes": _variable_dtypes(folder),
    }


def _open_tflite(file: Path, options: ProfileOptions) -> tuple[Callable, dict]:
    from tfhub_finetune.export import (
        model_only_shapes,
        read_model_card,
        run_tflite,
        tflite_interpreter,
    )

    interpreter = tflite_interpreter(model_path=str(file), num_threads=os.cpu_count())
    card = read_model_card(file.parent) or {}
    # A text file takes token ids of any length: timed as the token-id SavedModel is.
    # An image file's input has its size.
    text = (card.get("preprocessing") or {}).get("modality") == "text"
    shapes = model_only_shapes(card) if text else None

    def predict(inputs: Any) -> np.ndarray:
        if isinstance(inputs, Mapping):
            return run_tflite(interpreter, {k: np.asarray(v) for k, v in inputs.items()})
        return run_tflite(interpreter, np.asarray(inputs))

    profiled = profile_tflite(file, options=options, input_shapes=shapes)
    return predict, {
        "runtime": "tflite",
        "quantization": (card.get("quantization") or {}).get("mode", "none"),
        **_timing(profiled),
        "served_latency_p50_ms": None,
        "size_mb": profiled.saved_model_mb,
    }


class _OnBatch:
    """An export's predict function behind Keras' `predict_on_batch`, as a task's report reads it."""

    def __init__(self, predict: Callable[[Any], np.ndarray]):
        self.predict_on_batch = predict


def _evaluate(task: Any, predict: Callable[[Any], np.ndarray], predictions_path: Path | None
              ) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """One form on the eval set: (outputs, predicted class per example or None, eval report).

    Token classifiers are scored per word, each read from its owner window,
    by the task's own report (entity F1 as seqeval); their outputs are each
    word's tag probability and their classes the words' tags.
    """
    if task.config.model.task == "token_classification":
        tags, scores = task.predict_tags(_OnBatch(predict))
        words = np.asarray([tag for sentence in tags for tag in sentence], dtype=object)
        return np.asarray(scores), words, task.tags_report(tags)
    from tfhub_finetune.driver import outputs_report

    rows = []
    for batch in task.eval_dataset():
        inputs = batch[0] if isinstance(batch, tuple) else batch
        rows.append(predict(inputs))
    outputs = np.concatenate(rows)
    kind = task.config.model.task
    classes = (np.argmax(outputs, axis=-1) if kind == "single_label"
               else outputs >= 0.5 if kind == "multi_label" else None)
    return outputs, classes, outputs_report(task, outputs, predictions_path)


# The figure a form's row and its comparison lead with, the first of these its report has.
_HEADLINE_METRICS = ("accuracy", "entity_f1", "macro_f1", "pearson", "rmse")


def _headline_metric(report: Mapping[str, Any]) -> str | None:
    return next((m for m in _HEADLINE_METRICS if m in report), next(iter(report), None))


def _compare(row: dict, ref: dict, outputs: np.ndarray, ref_outputs: np.ndarray,
             classes: np.ndarray | None, ref_classes: np.ndarray | None) -> dict[str, Any]:
    metric = _headline_metric(row["eval"])
    versus: dict[str, Any] = {
        "metric": metric,
        "metric_delta": _round(row["eval"].get(metric, np.nan) - ref["eval"].get(metric, np.nan)),
        "latency_p50_ratio": _ratio(row["latency_p50_ms"], ref["latency_p50_ms"]),
        "latency_p95_ratio": _ratio(row["latency_p95_ms"], ref["latency_p95_ms"]),
        "throughput_ratio": _ratio(row["throughput_eps"], ref["throughput_eps"]),
        "size_ratio": _ratio(row["size_mb"], ref["size_mb"]),
        "max_abs_output_diff": _round(float(np.max(np.abs(outputs - ref_outputs)))
                                      if len(outputs) else 0.0),
    }
    if classes is not None and ref_classes is not None:
        # Examples (labels, for multi-label; words, for tokens) predicted alike.
        versus["agreement"] = _round(float(np.mean(classes == ref_classes))) if len(classes) else None
    return versus


# === Small helpers ===


def _timing(result: Any) -> dict[str, Any]:
    figures = {field: getattr(result, field) for field in _TIMING_FIELDS}
    figures["timing_error"] = result.error
    return figures


def _variable_dtypes(folder: Path) -> list[str]:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(folder / "variables" / "variables"))
    return sorted({tf.as_dtype(d).name for d in reader.get_variable_to_dtype_map().values()})


def _scalars(report: Mapping[str, Any]) -> dict[str, float]:
    return {k: v for k, v in report.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return _round(value / reference)


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
