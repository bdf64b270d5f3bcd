"""Profile a candidate model as deployed: size, FLOPs, latency, throughput, memory, disk.

`profile_in_subprocess` is the entry point the selection pipeline uses. It
rebuilds the model in a fresh Python process from an importable builder
(`"package.module:function"` plus JSON kwargs), so every candidate starts from
the same clean process, its memory figures are not polluted by earlier
candidates, and everything it allocated goes back to the OS when it exits:

1. Build child: build the model; count parameters (`model.count_params()`);
   peak memory of two AdamW training steps at `train_batch_size` on a
   stand-in loss (the optimizer's two slots per weight are part of what
   training needs); FLOPs; export the SavedModel and measure its size. With
   an `exporter` (the tasks give `export.py`'s TF Serving export: strings in
   with the tokenizer, or encoded images in with the decoding) that export
   is what is measured, so size and latency are those of what a user serves.
2. Serve child: load that SavedModel (`tf.saved_model.load`) and measure
   inference on its serving signature, as TF Serving runs it. An export with
   preprocessing is fed realistic raw requests (`export.sample_request`:
   prose that fills the sequence length, or a JPEG of the model's size), so
   `latency_p50_ms` is end to end; the same network without preprocessing
   (`export.model_only_signature`: the token-id twin, or `predict_images`)
   is timed at batch 1 too, as `model_latency_p50_ms`. Timing: warm-up calls,
   then timed calls at batch 1 until at least `min_runs` calls and
   `min_seconds` have passed and the medians of the first and second half
   agree within 5% (or `max_runs` / 4x `min_seconds` is reached), giving
   p50/p95 latency; then throughput at `serving_batch_size`, halving the batch
   on out-of-memory errors; peak memory over both. Inference is measured on
   the loaded export rather than the built Keras model because building can
   leave far more resident than serving needs: `minilm_l6_h384@layers=2`
   (built from the full encoder, then cut) added 523 MB when timed right
   after building but 209 MB served from its export, less than the full
   encoder's 273 MB, as it should be.
   If the export fails, a fresh child times the built Keras model instead;
   `inference_measured_on` says which.

`profile_model` (a built Keras model, in this process) and
`profile_saved_model` (an export, in this process) do the measuring and can be
called directly; in-process memory figures are only as clean as the process.

FLOPs: the forward is frozen (`convert_variables_to_constants_v2`) at the
serving batch and the task's input shape and counted by
`tf.compat.v1.profiler` (`float_operation`), divided by the batch (the
network alone: tokenization and decoding are not counted). SavedModel size:
the exporter's SavedModel (the served one, token-id twin not included), else
`tf.saved_model.save` with a serving signature (see `saved_model_size_mb`),
summed over its files.

A failing stage records `error` (`"stage: Type: message"`) and the remaining
stages still run; a failing build or a crashed/killed child records `error`
and leaves the figures empty. Nothing raises for a failing candidate.

Memory: the peak resident set size (RSS) of the process, read from `VmHWM` in
`/proc/self/status` after resetting it with `/proc/self/clear_refs` at the start
of each phase (Linux >= 4.0), so inference and training peaks are measured
separately. Where the reset is not allowed we fall back to
`resource.getrusage(...).ru_maxrss`, which only grows; training runs after
inference so its figure is still right whenever training needs more (it
always has in practice). psutil is not used: on Linux it exposes the current
RSS only, so a peak would need a sampling thread that misses short spikes.
Figures are the peak minus the RSS of the same process just before the model
was built or loaded (`baseline_memory_mb`: Python, TensorFlow and the
builder's libraries), i.e. what the model adds: weights, activations,
workspace. On a GPU the allocator's peak
(`tf.config.experimental.get_memory_info`) is reported in the
`*_device_memory_mb` fields as well.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tfhub_finetune.errors import InputError, did_you_mean
from tfhub_finetune.io_utils import atomic_write_text
from tfhub_finetune.memory import PeakMemory as _PeakMemory

# Per-example input shapes: one shape for a single-input model, or input name -> shape.
InputShapes = Sequence[int] | Mapping[str, Sequence[int]]

_MIB = 1024.0 * 1024.0
LATENCY_CLOCKS = ("wall", "cpu")
# Field metadata of the figures the inference stage measures: the serving child's
# result is merged into the build child's by this mark, not by a list kept in step.
_INFERENCE = {"stage": "inference"}
_STDERR_TAIL_CHARS = 2000


@dataclasses.dataclass(frozen=True)
class ProfileOptions:
    """How hard to measure. Defaults suit a selection run; tests shrink them.

    Attributes:
        serving_batch_size: int. Batch for throughput and FLOPs. Defaults to 32.
        train_batch_size: int. Batch for the training-memory step. Defaults to 32.
        warmup_runs: int. Untimed calls before timing (tracing, caches). Defaults to 10.
        min_runs: int. Fewest timed calls per measurement. Defaults to 30.
        max_runs: int. Most timed calls per measurement. Defaults to 2000.
        min_seconds: float. Least time spent timing each measurement.
            Defaults to 2.0.
        measure_inference: bool. Measure latency, throughput and inference
            memory. Defaults to `True`.
        measure_training: bool. Run the training-memory step. Defaults to `True`.
        measure_flops: bool. Count FLOPs. Defaults to `True`.
        measure_saved_model: bool. Export and measure the SavedModel.
            Defaults to `True`.
        threads: int or None. TensorFlow intra-op threads (inter-op is set to
            1 when given); None keeps TensorFlow's default. Only applied in a
            fresh process (`profile_in_subprocess`). Defaults to `None`.
        seed: int. Seed for the synthetic inputs. Defaults to 0.
        latency_clock: str. What the latency figures count: `"wall"`
            (elapsed time per call, what a client waits on a machine of its
            own) or `"cpu"` (the process's CPU time per call, all threads).
            Wall time on a shared machine grows with whatever else runs
            (2-3x at a load of 10 on 2 cores); CPU time barely moves, and with
            `threads=1` it equals the wall time the same call takes on a
            quiet core, so `"cpu"` with `threads=1` gives figures that can be
            compared across runs of a busy machine. With more threads it also
            counts the thread pool's spinning. Both clocks are recorded
            either way (`latency_cpu_p50_ms`). Defaults to `"wall"`.
    """

    serving_batch_size: int = 32
    train_batch_size: int = 32
    warmup_runs: int = 10
    min_runs: int = 30
    max_runs: int = 2000
    min_seconds: float = 2.0
    measure_inference: bool = True
    measure_training: bool = True
    measure_flops: bool = True
    measure_saved_model: bool = True
    threads: int | None = None
    seed: int = 0
    latency_clock: str = "wall"

    def __post_init__(self):
        for field in ("serving_batch_size", "train_batch_size", "min_runs", "max_runs"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(
                    f"Invalid value for `{field}`.",
                    received={field: value},
                    fix="Expected a positive integer.",
                )
        if not isinstance(self.warmup_runs, int) or self.warmup_runs < 0:
            raise InputError(
                "Invalid value for `warmup_runs`.",
                received={"warmup_runs": self.warmup_runs},
                fix="Expected an integer >= 0.",
            )
        if self.max_runs < self.min_runs:
            raise InputError(
                "`max_runs` is smaller than `min_runs`.",
                received={"min_runs": self.min_runs, "max_runs": self.max_runs},
            )
        if not (isinstance(self.min_seconds, (int, float)) and self.min_seconds >= 0):
            raise InputError(
                "Invalid value for `min_seconds`.",
                received={"min_seconds": self.min_seconds},
                fix="Expected a number >= 0.",
            )
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise InputError(
                "Invalid value for `threads`.",
                received={"threads": self.threads},
                fix="Expected a positive integer or None.",
            )
        if self.latency_clock not in LATENCY_CLOCKS:
            raise InputError(
                "Invalid value for `latency_clock`.",
                received={"latency_clock": self.latency_clock},
                fix=did_you_mean(str(self.latency_clock), LATENCY_CLOCKS),
            )


@dataclasses.dataclass
class ProfileResult:
    """Measured deployment figures of one candidate. Units are in the field names.

    Attributes:
        name: str. Candidate name (usually the backbone name).
        builder: str or None. `module:function` that built the model.
        builder_kwargs: dict. Its JSON kwargs.
        input_shapes: dict. Input name -> per-example shape that was profiled.
        params: int or None. `model.count_params()`.
        trainable_params: int or None. Elements of the trainable weights.
        flops_per_example: float or None. Forward FLOPs per example as the TF
            graph profiler counts them (a multiply-add is 2 FLOPs).
        latency_p50_ms: float or None. Median time of a batch-1 call of the
            served signature: end to end (raw strings or encoded images in,
            preprocessing included) for an export with preprocessing, else
            the forward pass.
        latency_p95_ms: float or None. 95th percentile of the same.
        latency_mean_ms: float or None. Mean of the same.
        latency_runs: int or None. Timed calls behind the latency figures.
        latency_stable: bool or None. Whether the medians of the first and
            second half of the timed calls agreed within 5%.
        latency_clock: str. `wall` or `cpu`: what the `latency_*` and
            `model_latency_*` figures count (`ProfileOptions.latency_clock`).
        latency_wall_p50_ms: float or None. Median elapsed time of the same
            batch-1 calls, whichever the clock.
        latency_cpu_p50_ms: float or None. Median CPU time of this process
            (all threads) per batch-1 call, whichever the clock.
        load_average: float or None. The machine's 1-minute load average
            when the latency was timed (this process included).
        cpu_count: int or None. CPUs this process could run on.
        model_latency_p50_ms: float or None. Median batch-1 time of the
            network alone (token ids or pixels in) of an export with
            preprocessing; None when the served signature is the network.
        model_latency_p95_ms: float or None. 95th percentile of the same.
        throughput_eps: float or None. Examples per second at `serving_batch_size`.
        serving_batch_size: int or None. Batch actually used for throughput
            (smaller than requested after an out-of-memory retry).
        train_batch_size: int or None. Batch used for the training step.
        peak_infer_memory_mb: float or None. Peak RSS during inference minus
            the RSS of the same process just before the model was built or
            loaded, MiB: what serving the model adds.
        peak_train_memory_mb: float or None. Peak RSS during a training step
            (AdamW) minus `baseline_memory_mb`, MiB: what training adds.
        peak_infer_device_memory_mb: float or None. GPU allocator peak during
            inference, MiB (GPU only).
        peak_train_device_memory_mb: float or None. GPU allocator peak during
            training, MiB (GPU only).
        baseline_memory_mb: float or None. RSS of the build process before
            the model existed (Python, TensorFlow and the builder's modules
            loaded), MiB.
        saved_model_mb: float or None. Size on disk of the exported SavedModel, MiB.
        saved_model_dir: str or None. Where that SavedModel was kept
            (`profile_model(export_dir=...)`); None when it was temporary.
        build_seconds: float or None. Time to build the model.
        profile_seconds: float or None. Wall time of the whole profile
            (including the child process start when run in one).
        device: str. What ran it, e.g. the CPU model or the GPU name.
        device_type: str. `CPU` or `GPU`.
        memory_method: str. How memory was measured.
        threads: int or None. TensorFlow intra-op threads (None: default).
        isolated_process: bool. Whether it ran in a fresh child process
            (`profile_in_subprocess`), i.e. whether memory figures are clean.
        inference_measured_on: str. What the latency, throughput and
            inference-memory figures come from, e.g. `loaded SavedModel (fresh
            process)` or `built Keras model`.
        tf_version: str.
        keras_version: str.
        error: str or None. `stage: Type: message` of each stage that failed.
    """

    name: str
    builder: str | None = None
    builder_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    input_shapes: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    params: int | None = None
    trainable_params: int | None = None
    flops_per_example: float | None = None
    latency_p50_ms: float | None = dataclasses.field(default=None, metadata=_INFERENCE)
    latency_p95_ms: float | None = dataclasses.field(default=None, metadata=_INFERENCE)
    latency_mean_ms: float | None = dataclasses.field(default=None, metadata=_INFERENCE)
    latency_runs: int | None = dataclasses.field(default=None, metadata=_INFERENCE)
    latency_stable: bool | None = dataclasses.field(default=None, metadata=_INFERENCE)
    latency_clock: str = dataclasses.field(default="wall", metadata=_INFERENCE)
    latency_wall_p50_ms: float | None = dataclasses.field(default=None, metadata=_INFERENCE)
    latency_cpu_p50_ms: float | None = dataclasses.field(default=None, metadata=_INFERENCE)
    load_average: float | None = dataclasses.field(default=None, metadata=_INFERENCE)
    cpu_count: int | None = dataclasses.field(default=None, metadata=_INFERENCE)
    model_latency_p50_ms: float | None = dataclasses.field(default=None, metadata=_INFERENCE)
    model_latency_p95_ms: float | None = dataclasses.field(default=None, metadata=_INFERENCE)
    throughput_eps: float | None = dataclasses.field(default=None, metadata=_INFERENCE)
    serving_batch_size: int | None = dataclasses.field(default=None, metadata=_INFERENCE)
    train_batch_size: int | None = None
    peak_infer_memory_mb: float | None = dataclasses.field(default=None, metadata=_INFERENCE)
    peak_train_memory_mb: float | None = None
    peak_infer_device_memory_mb: float | None = dataclasses.field(default=None, metadata=_INFERENCE)
    peak_train_device_memory_mb: float | None = None
    baseline_memory_mb: float | None = None
    saved_model_mb: float | None = None
    saved_model_dir: str | None = None
    build_seconds: float | None = None
    profile_seconds: float | None = None
    device: str = ""
    device_type: str = ""
    memory_method: str = ""
    threads: int | None = None
    isolated_process: bool = False
    inference_measured_on: str = ""
    tf_version: str = ""
    keras_version: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when every stage ran."""
        return self.error is None

    def add_error(self, stage: str, err: BaseException | str) -> None:
        """Records a failed stage; later stages keep running."""
        text = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
        text = " ".join(str(text).split())[:500]
        entry = f"{stage}: {text}"
        self.error = entry if not self.error else f"{self.error}; {entry}"

    @property
    def contended(self) -> bool:
        """True when other work competed for the CPUs while the latency was timed.

        The load average counts this process too (up to one per busy thread),
        so a machine of its own reads about `threads` or less; a load above
        the CPU count plus one means something else was running.
        """
        if self.load_average is None or not self.cpu_count:
            return False
        return self.load_average > self.cpu_count + 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProfileResult:
        """Reads `to_dict()` output; unknown keys (a newer writer) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# --------------------------------------------------------------------------- #
# Public entry points
# --------------------------------------------------------------------------- #


def profile_model(
    model: Any,
    input_shapes: InputShapes | None = None,
    *,
    name: str | None = None,
    options: ProfileOptions | None = None,
    input_dtypes: Mapping[str, str] | str | None = None,
    baseline_rss_mb: float | None = None,
    export_dir: str | os.PathLike | None = None,
    exporter: Callable[[Any, str], str] | None = None,
) -> ProfileResult:
    """Measures a built `keras.Model` in this process.

    Prefer `profile_in_subprocess` for comparing candidates: in-process memory
    figures are deltas over the RSS at the time of the call (the weights are
    already resident, so they are not counted) and earlier work in the process
    leaves allocations behind. Pass `baseline_rss_mb` (the RSS before the
    model was built) to count the weights.

    Args:
        model: keras.Model. The model as it will be deployed.
        input_shapes: tuple of int or dict. Per-example input shape(s) at the
            task's real size, without the batch dimension, e.g. `(224, 224, 3)`
            or `{"token_ids": (128,), "padding_mask": (128,), "segment_ids":
            (128,)}`. None takes them from `model.inputs`, which must then be
            fully defined.
        name: str or None. Candidate name. Defaults to `model.name`.
        options: ProfileOptions or None. Defaults to `ProfileOptions()`.
        input_dtypes: str, dict or None. Input dtype(s) when the model does
            not declare them (subclassed models). Defaults to float32.
        baseline_rss_mb: float or None. RSS before the model was built.
        export_dir: str or None. Keep the measured SavedModel here (it is
            deleted otherwise); `saved_model_dir` says where it is.
        exporter: callable or None. `exporter(model, folder)` writes the
            SavedModel that is served under `folder` and returns its
            directory (e.g. a task's `export_for_serving`). None measures a
            plain `saved_model_size_mb` save.

    Returns:
        A `ProfileResult`; failed stages are listed in its `error`.

    Raises:
        InputError: when the input shapes are missing or do not match the
            model's inputs.

    Example:

    ```python
    inputs = keras.Input((64,))
    model = keras.Model(inputs, keras.layers.Dense(10)(inputs))
    result = profile_model(model, (64,), options=ProfileOptions(min_seconds=0.2))
    result.params, result.flops_per_example, result.latency_p50_ms
    ```
    """
    import keras
    import tensorflow as tf

    options = options or ProfileOptions()
    start = time.perf_counter()
    meter = _PeakMemory()
    baseline = meter.current_mb() if baseline_rss_mb is None else float(baseline_rss_mb)
    specs = _input_specs(model, input_shapes, input_dtypes)
    result = _new_result(name or getattr(model, "name", "model"), specs, meter, baseline)
    result.keras_version = keras.__version__
    try:
        result.params = int(model.count_params())
        result.trainable_params = int(sum(math.prod(w.shape) for w in model.trainable_weights))
    except Exception as err:  # Never raise for a failing candidate.
        result.add_error("params", err)

    if options.measure_inference:
        # Right after the build, so freezing or exporting leaves nothing behind yet.
        forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        _measure_inference(
            forward,
            lambda batch: synthetic_inputs(specs, batch, seed=options.seed),
            options,
            meter,
            baseline,
            result,
        )
        result.inference_measured_on = "built Keras model"

    if options.measure_training:
        meter.reset()
        try:
            if _train_steps(model, specs, options):
                result.train_batch_size = options.train_batch_size
                result.peak_train_memory_mb = _round(meter.peak_mb() - baseline)
                result.peak_train_device_memory_mb = meter.device_peak_mb()
        except Exception as err:
            result.add_error("train_memory", err)

    if options.measure_flops:
        try:
            batch = result.serving_batch_size or options.serving_batch_size
            result.flops_per_example = count_flops(model, specs, batch_size=batch)
        except Exception as err:
            result.add_error("flops", err)

    if options.measure_saved_model:
        try:
            if exporter is None:
                result.saved_model_mb = _round(
                    saved_model_size_mb(model, specs, export_dir=export_dir)
                )
                served = str(export_dir) if export_dir is not None else None
            else:
                with tempfile.TemporaryDirectory(prefix="tfhub_finetune_export_") as tmp:
                    served = exporter(model, str(export_dir if export_dir is not None else tmp))
                    result.saved_model_mb = _round(_folder_mb(served))
                served = served if export_dir is not None else None
            result.saved_model_dir = served
        except Exception as err:
            result.add_error("saved_model", err)

    result.profile_seconds = _round(time.perf_counter() - start)
    return result


def profile_saved_model(
    path: str | os.PathLike,
    input_shapes: InputShapes | None = None,
    *,
    name: str | None = None,
    options: ProfileOptions | None = None,
    signature: str = "serving_default",
    baseline_rss_mb: float | None = None,
) -> ProfileResult:
    """Measures inference (latency, throughput, memory) of a SavedModel as served.

    Loads `path` with `tf.saved_model.load` and times its serving signature,
    as TF Serving would run it. A signature on strings (an `export.py` export
    with the tokenizer or image decoding inside) is fed realistic raw requests
    from its model card (`export.sample_request`), and the network alone
    (`export.model_only_signature`) is timed too, into `model_latency_*`. Run
    it in a fresh process (as `profile_in_subprocess` does) for a clean memory
    figure.

    Args:
        path: str or Path. SavedModel directory.
        input_shapes: tuple of int or dict or None. Per-example input shapes
            for signature inputs with unknown dimensions. Defaults to the
            signature's own shapes.
        name: str or None. Candidate name. Defaults to the directory name.
        options: ProfileOptions or None. Only the timing fields matter.
        signature: str. Signature to call. Defaults to `"serving_default"`.
        baseline_rss_mb: float or None. RSS before loading. Defaults to the
            RSS at the call.

    Returns:
        A `ProfileResult` with the inference figures filled in.

    Raises:
        InputError: for a missing signature, unknown input dimensions, or
            string inputs without a model card.

    Example:

    ```python
    result = profile_saved_model("exports/sst2/1", options=ProfileOptions(min_seconds=1))
    result.latency_p50_ms, result.model_latency_p50_ms, result.peak_infer_memory_mb
    ```
    """
    import tensorflow as tf

    from tfhub_finetune.export import read_model_card, sample_request

    options = options or ProfileOptions()
    start = time.perf_counter()
    card = read_model_card(path)
    if card and "tensorflow_text" in card.get("requires", []):
        import tensorflow_text  # noqa: F401  Registers the tokenizer's ops before loading.
    meter = _PeakMemory()
    baseline = meter.current_mb() if baseline_rss_mb is None else float(baseline_rss_mb)
    loaded = tf.saved_model.load(str(path))
    serve = _signature(loaded, signature, path)
    declared = serve.structured_input_signature[1]
    if any(spec.dtype == tf.string for spec in declared.values()):
        if card is None:
            raise InputError(
                "The signature takes strings, and without a model card there is no knowing "
                "what they hold.",
                received={"signature": signature, "path": str(path)},
                fix="Profile an export written by tfhub_finetune.export, or a signature on "
                "tensors.",
            )
        specs = {k: tf.TensorSpec((None,), tf.string, name=k) for k in declared}
        result = _new_result(name or Path(path).name, specs, meter, baseline)
        _measure_inference(
            lambda x: serve(**x),
            lambda batch: sample_request(card, batch, seed=options.seed),
            options,
            meter,
            baseline,
            result,
        )
        result.inference_measured_on = f"loaded SavedModel, {signature} on {card['input']}"
        _measure_model_only(loaded, path, card, options, result)
        result.profile_seconds = _round(time.perf_counter() - start)
        return result
    shapes = _normalise_shapes(input_shapes) if input_shapes is not None else {}
    if not isinstance(shapes, dict):
        if len(declared) != 1:
            raise InputError(
                "The signature takes several inputs; give one shape per input name.",
                received={"inputs": sorted(declared)},
            )
        shapes = {next(iter(declared)): shapes}
    specs = {}
    for key, spec in declared.items():
        shape = shapes.get(key) or list(spec.shape[1:])
        if any(d is None for d in shape):
            raise InputError(
                "The signature's input shape has unknown dimensions; give the real size.",
                received={"input": key, "signature_shape": list(spec.shape)},
                fix="Pass input_shapes, e.g. {'token_ids': (128,), ...}.",
            )
        specs[key] = tf.TensorSpec((None, *shape), spec.dtype, name=key)
    result = _new_result(name or Path(path).name, specs, meter, baseline)
    _measure_inference(
        lambda x: serve(**x),
        lambda batch: synthetic_inputs(specs, batch, seed=options.seed),
        options,
        meter,
        baseline,
        result,
    )
    result.inference_measured_on = "loaded SavedModel"
    result.profile_seconds = _round(time.perf_counter() - start)
    return result


def profile_tflite(
    path: str | os.PathLike,
    *,
    name: str | None = None,
    options: ProfileOptions | None = None,
    threads: int | None = None,
    input_shapes: dict[str, list[int]] | None = None,
) -> ProfileResult:
    """Measures inference of a `.tflite` file in the TFLite interpreter, as an app would run it.

    Batch-1 latency (p50/p95) with the same timer as `profile_saved_model`,
    then throughput at `options.serving_batch_size` (the input tensor is
    resized to the batch), and the file size into `saved_model_mb`. Inputs
    are `synthetic_inputs` of the model's input shape (pixels 0..255).

    Args:
        path: str or Path. The `.tflite` file.
        name: str or None. Defaults to the file's folder name.
        options: ProfileOptions or None. Only the timing fields matter.
        threads: int or None. Interpreter threads; None: one per core
            (`os.cpu_count()`), as TF's own thread pools use.
        input_shapes: dict or None. Input name -> per-example shape, for a
            text model's file (`{"token_ids": [128], ...}`: its inputs are
            any size); None: the file's own first input (images).

    Returns:
        A `ProfileResult` with latency, throughput, memory and size filled in.

    Example:

    ```python
    result = profile_tflite("exports/hymenoptera_int8/1/model.tflite")
    result.latency_p50_ms, result.throughput_eps
    ```
    """
    import tensorflow as tf

    from tfhub_finetune.export import run_tflite, tflite_interpreter

    options = options or ProfileOptions()
    start = time.perf_counter()
    meter = _PeakMemory()
    baseline = meter.current_mb()
    interpreter = tflite_interpreter(model_path=str(path), num_threads=threads or os.cpu_count())
    if input_shapes:
        # A text file's inputs are (-1, -1): the per-example shape comes from the caller.
        spec = {name: tf.TensorSpec([None, *shape], tf.int32, name=name)
                for name, shape in input_shapes.items()}
    else:
        source = interpreter.get_input_details()[0]
        shape = [int(d) for d in source["shape"][1:]]
        spec = tf.TensorSpec([None, *shape], tf.as_dtype(source["dtype"]), name="images")

    def forward(inputs: Any) -> Any:
        return run_tflite(interpreter, inputs)

    def batch_of(rows: int) -> Any:
        made = synthetic_inputs(spec, rows, seed=options.seed)
        return {k: v.numpy() for k, v in made.items()} if isinstance(made, dict) else made.numpy()

    result = _new_result(name or Path(path).parent.name, spec, meter, baseline)
    _measure_inference(
        forward,
        batch_of,
        options, meter, baseline, result,
    )
    result.saved_model_mb = _round(Path(path).stat().st_size / _MIB)
    result.inference_measured_on = "TFLite interpreter"
    result.profile_seconds = _round(time.perf_counter() - start)
    return result


def _signature(loaded: Any, signature: str, path: str | os.PathLike) -> Any:
    if signature not in loaded.signatures:
        raise InputError(
            "The SavedModel has no such signature.",
            received={"signature": signature, "path": str(path)},
            fix=did_you_mean(signature, list(loaded.signatures)),
        )
    return loaded.signatures[signature]


def _measure_model_only(
    loaded: Any,
    path: str | os.PathLike,
    card: dict,
    options: ProfileOptions,
    result: ProfileResult,
) -> None:
    """Batch-1 latency of the network without preprocessing (after the memory figure)."""
    import tensorflow as tf

    from tfhub_finetune.export import model_only_signature

    try:
        folder, name, shapes = model_only_signature(path, card)
        if Path(folder).resolve() != Path(path).resolve():
            loaded = tf.saved_model.load(str(folder))
        serve = _signature(loaded, name, folder)
        declared = serve.structured_input_signature[1]
        specs = {k: tf.TensorSpec((None, *shapes[k]), s.dtype, name=k) for k, s in declared.items()}
        times = _time_calls(
            lambda x: serve(**x), synthetic_inputs(specs, 1, seed=options.seed), options
        )
        result.model_latency_p50_ms = _round(1000 * _percentile(times, 50))
        result.model_latency_p95_ms = _round(1000 * _percentile(times, 95))
    except Exception as err:  # Never raise for a failing candidate.
        result.add_error("model_latency", err)


def profile_in_subprocess(
    builder: str | Callable[..., Any],
    builder_kwargs: Mapping[str, Any] | None = None,
    input_shapes: InputShapes | None = None,
    *,
    name: str | None = None,
    options: ProfileOptions | None = None,
    input_dtypes: Mapping[str, str] | str | None = None,
    exporter: str | Callable[..., str] | None = None,
    exporter_kwargs: Mapping[str, Any] | None = None,
    timeout_s: float = 1800.0,
) -> ProfileResult:
    """Builds and profiles one candidate in fresh Python processes.

    A first child builds the model and measures parameters, the training
    step's memory, FLOPs and the SavedModel (the `exporter`'s, i.e. what is
    served); a second child loads that SavedModel and measures inference
    (latency, throughput, memory) the way it will be served, end to end for
    an export with preprocessing, so whatever building left behind (e.g. the full
    encoder a truncated one was cut from) does not count. When the export
    fails, inference is measured on a freshly built Keras model instead
    (`inference_measured_on` says which). Children are started with
    `sys.executable` and this process's `sys.path`, so any builder importable
    here is importable there. A failing
    build, a crash, an out-of-memory kill or a timeout is recorded in `error`
    instead of raised.

    Args:
        builder: str or callable. `"package.module:function"` returning a
            `keras.Model`, e.g.
            `"tfhub_finetune.builders.text_classifier:build_text_classifier"`,
            or a module-level function (its import path is used).
        builder_kwargs: dict or None. JSON-serialisable keyword arguments for
            the builder, e.g. `{"backbone": "minilm_l6_h384", "num_classes": 2}`.
        input_shapes: tuple of int or dict. Per-example input shape(s), see
            `profile_model`.
        name: str or None. Candidate name. Defaults to
            `builder_kwargs["backbone"]` when given, else the builder name.
        options: ProfileOptions or None. Defaults to `ProfileOptions()`.
        input_dtypes: str, dict or None. See `profile_model`.
        exporter: str, callable or None. `"package.module:function"` called
            as `exporter(model, folder, **exporter_kwargs)`: writes the served
            SavedModel under `folder` and returns its directory, e.g.
            `"tfhub_finetune.tasks.text_classification:export_for_serving"`
            (TF Serving export, strings in). None: a plain SavedModel of the
            network.
        exporter_kwargs: dict or None. JSON-serialisable kwargs for it.
        timeout_s: float. Wall-clock limit for all children together.
            Defaults to 1800.

    Returns:
        A `ProfileResult`.

    Raises:
        InputError: for a builder that cannot be imported, kwargs that are not
            JSON, or bad options.

    Example:

    ```python
    result = profile_in_subprocess(
        "tfhub_finetune.builders.text_classifier:build_text_classifier",
        {"backbone": "minilm_l6_h384", "num_classes": 2},
        {"token_ids": (128,), "padding_mask": (128,), "segment_ids": (128,)},
    )
    print(result.latency_p50_ms, result.error)
    ```
    """
    options = options or ProfileOptions()
    path = builder_path(builder)
    resolve_builder(path)  # Fail here, with suggestions, not in the child.
    export_path = builder_path(exporter) if exporter is not None else None
    if export_path:
        resolve_builder(export_path)
    kwargs = dict(builder_kwargs or {})
    export_kwargs = dict(exporter_kwargs or {})
    try:
        json.dumps([kwargs, export_kwargs])
    except (TypeError, ValueError) as err:
        raise InputError(
            "Builder and exporter kwargs must be JSON-serialisable to reach the child process.",
            received={"builder_kwargs": kwargs, "exporter_kwargs": export_kwargs},
            fix=f"Pass names and numbers instead of objects ({err}).",
        ) from None
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise InputError(
            "Invalid value for `timeout_s`.",
            received={"timeout_s": timeout_s},
            fix="Expected a positive number of seconds.",
        )
    shapes = _normalise_shapes(input_shapes) if input_shapes is not None else None
    name = name or str(kwargs.get("backbone") or path.rpartition(":")[2])
    request = {
        "name": name,
        "builder": path,
        "builder_kwargs": kwargs,
        "input_shapes": shapes,
        "input_dtypes": input_dtypes,
        "exporter": export_path,
        "exporter_kwargs": export_kwargs,
    }
    deadline = time.perf_counter() + timeout_s
    start = time.perf_counter()
    serve_saved_model = options.measure_inference and options.measure_saved_model
    with tempfile.TemporaryDirectory(prefix="tfhub_finetune_profile_") as tmp:
        export_dir = os.path.join(tmp, "saved_model")
        build_options = dataclasses.replace(
            options, measure_inference=options.measure_inference and not serve_saved_model
        )
        result = _run_child(
            {
                **request,
                "mode": "build",
                "options": dataclasses.asdict(build_options),
                "export_dir": export_dir,
            },
            tmp,
            deadline,
        )
        built = result.params is not None  # False when the build or the child failed.
        needs_inference = serve_saved_model and built
        if needs_inference and result.saved_model_dir is not None:
            served = _run_child(
                {
                    **request,
                    "mode": "serve",
                    "options": dataclasses.asdict(options),
                    "export_dir": result.saved_model_dir,
                },
                tmp,
                deadline,
            )
            _merge_inference(result, served, f"{served.inference_measured_on} (fresh process)")
        elif needs_inference:
            # No SavedModel to serve: time the Keras model, built afresh.
            only_inference = dataclasses.replace(
                options, measure_training=False, measure_flops=False, measure_saved_model=False
            )
            served = _run_child(
                {**request, "mode": "build", "options": dataclasses.asdict(only_inference)},
                tmp,
                deadline,
            )
            _merge_inference(
                result, served, "built Keras model (fresh process; SavedModel export failed)"
            )
    result.saved_model_dir = None  # The temporary folder is gone.
    result.profile_seconds = _round(time.perf_counter() - start)
    return result


# --------------------------------------------------------------------------- #
# Pieces (public: reusable by select.py and tests)
# --------------------------------------------------------------------------- #


def builder_path(builder: str | Callable[..., Any]) -> str:
    """`module:function` for a builder given as a path or a module-level function."""
    if isinstance(builder, str):
        module, sep, attr = builder.partition(":")
        if not (sep and module and attr):
            raise InputError(
                "A builder path needs the form `package.module:function`.",
                received={"builder": builder},
                fix="E.g. tfhub_finetune.builders.text_classifier:build_text_classifier.",
            )
        return builder
    module = getattr(builder, "__module__", None)
    qualname = getattr(builder, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname or "." in qualname:
        raise InputError(
            "The builder must be a module-level function so a child process can import it.",
            received={"builder": builder},
            fix="Define it at the top of an importable module or pass `module:function`.",
        )
    return f"{module}:{qualname}"


def resolve_builder(path: str) -> Callable[..., Any]:
    """Imports the function a `module:function` path names."""
    module_name, _, attr = builder_path(path).partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise InputError(
            "Cannot import the builder's module.",
            received={"builder": path},
            fix=f"({err}) Check the module path and that it is on sys.path.",
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise InputError(
            f"Module `{module_name}` has no function `{attr}`.",
            received={"builder": path},
            fix=did_you_mean(attr, public),
        )
    return fn


def synthetic_inputs(specs: Any, batch_size: int, *, seed: int = 0) -> Any:
    """Random inputs of the right structure, shape and dtype for timing.

    Values follow our input contracts so every network accepts them: floats
    are raw pixels in [0, 255); int inputs named `*mask*` are 1, `*segment*`
    are 0, and other ints (token ids) are in [1, 100), which every vocabulary
    holds. Speed does not depend on the values.
    """
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)

    def make(name: str, spec: Any) -> Any:
        shape = (batch_size, *spec.shape[1:])
        if spec.dtype.is_floating:
            return tf.constant(rng.uniform(0, 255, shape), dtype=spec.dtype)
        if spec.dtype.is_bool:
            return tf.ones(shape, dtype=tf.bool)
        lowered = name.lower()
        if "mask" in lowered:
            return tf.ones(shape, dtype=spec.dtype)
        if "segment" in lowered or "type" in lowered:
            return tf.zeros(shape, dtype=spec.dtype)
        return tf.constant(rng.integers(1, 100, shape), dtype=spec.dtype)

    if isinstance(specs, dict):
        return {k: make(k, s) for k, s in specs.items()}
    if isinstance(specs, (list, tuple)):
        return [make(f"input_{i}", s) for i, s in enumerate(specs)]
    return make(specs.name or "input", specs)


def count_flops(model: Any, specs: Any, *, batch_size: int = 1) -> float:
    """Forward FLOPs per example, from the TF graph profiler on a frozen graph.

    The forward (`training=False`) is traced at `batch_size` and the given
    per-example shapes, variables are folded into constants
    (`convert_variables_to_constants_v2`) and `tf.compat.v1.profiler.profile`
    with `ProfileOptionBuilder.float_operation()` counts the graph; the total
    is divided by `batch_size`. The profiler counts a multiply-add as 2 FLOPs
    (MatMul: 2*m*n*k), a bias add as 1 per output element, Softmax as 5 per
    element, and nothing for ReLU or ops without a registered count.

    Args:
        model: keras.Model.
        specs: input `tf.TensorSpec` structure (batch dimension None or any).
        batch_size: int. Batch to trace at. Defaults to 1.

    Returns:
        FLOPs per example (float).
    """
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    fixed = tf.nest.map_structure(
        lambda s: tf.TensorSpec((batch_size, *s.shape[1:]), s.dtype, name=s.name), specs
    )
    forward = tf.function(lambda x: model(x, training=False))
    concrete = forward.get_concrete_function(fixed)
    frozen = convert_variables_to_constants_v2(concrete)
    graph_def = frozen.graph.as_graph_def()
    with tf.Graph().as_default() as graph:
        tf.graph_util.import_graph_def(graph_def, name="")
        builder = tf.compat.v1.profiler.ProfileOptionBuilder
        opts = builder(builder.float_operation()).with_empty_output().build()
        info = tf.compat.v1.profiler.profile(graph=graph, cmd="op", options=opts)
    return float(info.total_float_ops) / batch_size


def saved_model_size_mb(
    model: Any, specs: Any = None, export_dir: str | os.PathLike | None = None
) -> float:
    """Saves `model` as a TF SavedModel in a temp dir and returns its size on disk (MiB).

    `tf.saved_model.save` with a `serving_default` signature on `specs` is
    used rather than `model.export`: in Keras 3.15 `export` writes every
    variable twice (keras-team/keras#23553), which would double the figure.
    `model.export` is the fallback for models `tf.saved_model.save` rejects.

    Args:
        model: keras.Model.
        specs: input `tf.TensorSpec` structure for the serving signature, or
            None to save without one.
        export_dir: str or None. Where to keep the SavedModel; None saves to
            a temp dir that is deleted.

    Returns:
        Total size of the SavedModel's files in MiB.
    """
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="tfhub_finetune_export_") as tmp:
        target = str(export_dir) if export_dir is not None else os.path.join(tmp, "saved_model")
        try:
            signatures = None
            if specs is not None:
                serve = tf.function(lambda x: model(x, training=False))
                signatures = {"serving_default": serve.get_concrete_function(specs)}
            tf.saved_model.save(model, target, signatures=signatures)
        except Exception:
            shutil.rmtree(target, ignore_errors=True)
            model.export(target, format="tf_saved_model", verbose=False)
        return _folder_mb(target)


def _folder_mb(folder: str | os.PathLike) -> float:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / _MIB


def device_description() -> tuple[str, str]:
    """(`GPU` or `CPU`, a human-readable name of what runs the model)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        try:
            details = tf.config.experimental.get_device_details(gpus[0])
            gpu_name = details.get("device_name") or gpus[0].name
        except Exception:
            gpu_name = gpus[0].name
        suffix = f" (x{len(gpus)}, profiled on 1)" if len(gpus) > 1 else ""
        return "GPU", f"{gpu_name}{suffix}"
    return "CPU", cpu_description()


def cpu_description() -> str:
    """CPU model from /proc/cpuinfo (or `platform`) and the usable core count."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    return f"{model} ({cores} cores usable)"


# --------------------------------------------------------------------------- #
# Internals
# --------------------------------------------------------------------------- #


def _normalise_shapes(input_shapes: InputShapes) -> dict[str, list[int]] | list[int]:
    def check(shape: Any, label: str) -> list[int]:
        if isinstance(shape, int) or not isinstance(shape, Sequence) or isinstance(shape, str):
            raise InputError(
                "An input shape must be a sequence of positive ints without the batch dimension.",
                received={label: shape},
                fix="E.g. (224, 224, 3) or {'token_ids': (128,), ...}.",
            )
        dims = list(shape)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
            raise InputError(
                "Input shape dimensions must be positive ints (the task's real size).",
                received={label: shape},
                fix="Replace None/unknown dimensions with the real size, e.g. the sequence length.",
            )
        return dims

    if isinstance(input_shapes, Mapping):
        if not input_shapes:
            raise InputError("`input_shapes` is empty.", received={"input_shapes": input_shapes})
        return {str(k): check(v, f"input_shapes[{k!r}]") for k, v in input_shapes.items()}
    return check(input_shapes, "input_shapes")


def _input_specs(
    model: Any, input_shapes: InputShapes | None, input_dtypes: Mapping[str, str] | str | None
) -> Any:
    """A `tf.TensorSpec` structure (batch None) matching how `model` is called."""
    import tensorflow as tf

    try:
        structure = model.input  # Functional models: tensor, list or dict of KerasTensors.
    except (AttributeError, ValueError):
        structure = None
    shapes = _normalise_shapes(input_shapes) if input_shapes is not None else None

    def dtype_for(name: str, declared: Any) -> Any:
        if isinstance(input_dtypes, str):
            return tf.as_dtype(input_dtypes)
        if isinstance(input_dtypes, Mapping) and name in input_dtypes:
            return tf.as_dtype(input_dtypes[name])
        return tf.as_dtype(declared) if declared is not None else tf.float32

    def spec_for(name: str, tensor: Any, shape: list[int] | None) -> Any:
        declared = list(tensor.shape[1:]) if tensor is not None else None
        if shape is None:
            if declared is None or any(d is None for d in declared):
                raise InputError(
                    "The model's input shape has unknown dimensions; give the task's real "
                    "per-example shape.",
                    received={"input": name, "model_shape": declared},
                    fix="Pass input_shapes, e.g. {'token_ids': (128,), ...} or (224, 224, 3).",
                )
            shape = [int(d) for d in declared]
        elif declared is not None and (
            len(declared) != len(shape)
            or any(d is not None and d != s for d, s in zip(declared, shape, strict=False))
        ):
            raise InputError(
                "Input shape does not match the model's input.",
                received={"input": name, "given": shape, "model_shape": declared},
            )
        dtype = dtype_for(name, getattr(tensor, "dtype", None))
        return tf.TensorSpec((None, *shape), dtype, name=name)

    if isinstance(structure, dict):
        if isinstance(shapes, dict):
            missing = sorted(set(structure) - set(shapes))
            extra = sorted(set(shapes) - set(structure))
            if missing or extra:
                raise InputError(
                    "`input_shapes` names do not match the model's inputs.",
                    received={"missing": missing, "unexpected": extra},
                    fix=f"Expected: {', '.join(sorted(structure))}.",
                )
        elif shapes is not None:
            raise InputError(
                "The model takes named inputs; give one shape per input name.",
                received={"input_shapes": shapes},
                fix=f"Expected a dict with keys: {', '.join(sorted(structure))}.",
            )
        return {
            k: spec_for(k, t, shapes[k] if shapes is not None else None)
            for k, t in structure.items()
        }
    if isinstance(structure, (list, tuple)):
        if len(structure) != 1:
            if not isinstance(shapes, dict) and shapes is not None:
                raise InputError(
                    "The model takes several inputs; give one shape per input name.",
                    received={"input_shapes": shapes},
                )
            return [spec_for(t.name, t, shapes.get(t.name) if shapes else None) for t in structure]
        structure = structure[0]
    if isinstance(shapes, dict):
        if structure is not None or len(shapes) != 1:
            return {k: spec_for(k, None, v) for k, v in shapes.items()}
        ((only_name, only_shape),) = shapes.items()
        return spec_for(only_name, None, only_shape)
    name = getattr(structure, "name", None) or "input"
    return spec_for(name, structure, shapes)


def _flat_specs(specs: Any) -> dict[str, Any]:
    if isinstance(specs, dict):
        return dict(specs)
    if isinstance(specs, (list, tuple)):
        return {s.name or f"input_{i}": s for i, s in enumerate(specs)}
    return {specs.name or "input": specs}


def _materialise(outputs: Any) -> None:
    import tensorflow as tf

    # `.numpy()` waits for the device, so the time includes the whole forward.
    # NumPy arrays (the TFLite interpreter's outputs) are already on the host.
    for tensor in tf.nest.flatten(outputs):
        if isinstance(tensor, tf.Tensor):
            tensor.numpy()


@dataclasses.dataclass
class _Timings:
    """Per-call seconds of one measurement, on both clocks."""

    wall: list[float]
    cpu: list[float]

    def on(self, clock: str) -> list[float]:
        return self.cpu if clock == "cpu" else self.wall


def _time_calls(fn: Callable[[Any], Any], inputs: Any, options: ProfileOptions) -> list[float]:
    """Per-call seconds on `options.latency_clock` (see `_time_calls_both`)."""
    return _time_calls_both(fn, inputs, options).on(options.latency_clock)


def _time_calls_both(fn: Callable[[Any], Any], inputs: Any, options: ProfileOptions) -> _Timings:
    for _ in range(max(options.warmup_runs, 1)):  # The first call traces.
        _materialise(fn(inputs))
    timings = _Timings([], [])
    times = timings.on(options.latency_clock)  # The clock the stopping rule watches.
    start = time.perf_counter()
    deadline = 4 * options.min_seconds
    while len(times) < options.max_runs:
        t0, c0 = time.perf_counter(), time.process_time()
        _materialise(fn(inputs))
        timings.cpu.append(time.process_time() - c0)
        timings.wall.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        if (
            len(times) >= options.min_runs
            and elapsed >= options.min_seconds
            and (_halves_agree(times) or elapsed >= deadline)
        ):
            break
    return timings


def _halves_agree(times: Sequence[float], tolerance: float = 0.05) -> bool:
    half = len(times) // 2
    if half < 3:
        return False
    first, second = _percentile(times[:half], 50), _percentile(times[half:], 50)
    return abs(first - second) <= tolerance * max(first, second, 1e-12)


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _throughput(
    forward: Callable[[Any], Any], make_inputs: Callable[[int], Any], options: ProfileOptions
) -> tuple[int, float]:
    import tensorflow as tf

    batch = options.serving_batch_size
    while True:
        try:
            inputs = make_inputs(batch)
            # Examples per second is a rate on the wall clock whichever clock latency uses.
            times = _time_calls_both(forward, inputs, _fewer_runs(options)).wall
            return batch, batch * len(times) / sum(times)
        except tf.errors.ResourceExhaustedError:
            # timm's habit: retry smaller rather than lose the candidate.
            if batch == 1:
                raise
            batch = max(1, batch // 2)


def _fewer_runs(options: ProfileOptions) -> ProfileOptions:
    # A big batch already averages over many examples; fewer calls are as stable.
    runs = max(5, options.min_runs // 3)
    return dataclasses.replace(
        options,
        warmup_runs=min(options.warmup_runs, 3),
        min_runs=runs,
        max_runs=max(runs, options.max_runs // 3),
    )


def _train_steps(model: Any, specs: Any, options: ProfileOptions) -> bool:
    """Two AdamW steps on a stand-in loss; False when nothing is trainable."""
    import keras
    import tensorflow as tf

    variables = list(model.trainable_variables)
    if not variables:
        return False
    optimizer = keras.optimizers.AdamW(learning_rate=1e-6)
    optimizer.build(variables)  # Slot variables must exist before tracing.

    @tf.function
    def step(inputs):
        with tf.GradientTape() as tape:
            outputs = model(inputs, training=True)
            # The loss's form does not change what the step keeps in memory.
            loss = tf.add_n(
                [
                    tf.reduce_mean(tf.square(tf.cast(t, tf.float32)))
                    for t in tf.nest.flatten(outputs)
                ]
            )
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(
            [(g, v) for g, v in zip(grads, variables, strict=True) if g is not None]
        )
        return loss

    inputs = synthetic_inputs(specs, options.train_batch_size, seed=options.seed)
    for _ in range(2):
        step(inputs).numpy()
    return True


def _inference_fields() -> tuple[str, ...]:
    """ProfileResult fields the inference stage fills (marked `_INFERENCE` where declared)."""
    return tuple(f.name for f in dataclasses.fields(ProfileResult) if f.metadata.get("stage") == "inference")


def _new_result(name: str, specs: Any, meter: _PeakMemory, baseline: float) -> ProfileResult:
    import tensorflow as tf

    device_type, device = device_description()
    return ProfileResult(
        name=name,
        input_shapes={k: list(s.shape[1:]) for k, s in _flat_specs(specs).items()},
        device=device,
        device_type=device_type,
        memory_method=meter.method,
        baseline_memory_mb=_round(baseline),
        tf_version=tf.__version__,
    )


def _measure_inference(
    forward: Callable[[Any], Any],
    make_inputs: Callable[[int], Any],
    options: ProfileOptions,
    meter: _PeakMemory,
    baseline: float,
    result: ProfileResult,
) -> None:
    """Latency at batch 1, throughput at the serving batch, peak memory over both."""
    meter.reset()
    try:
        timings = _time_calls_both(forward, make_inputs(1), options)
        times = timings.on(options.latency_clock)
        result.latency_clock = options.latency_clock
        result.latency_wall_p50_ms = _round(1000 * _percentile(timings.wall, 50))
        result.latency_cpu_p50_ms = _round(1000 * _percentile(timings.cpu, 50))
        result.load_average = _round(os.getloadavg()[0], 2)
        result.cpu_count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count()
        result.latency_p50_ms = _round(1000 * _percentile(times, 50))
        result.latency_p95_ms = _round(1000 * _percentile(times, 95))
        result.latency_mean_ms = _round(1000 * sum(times) / len(times))
        result.latency_runs = len(times)
        result.latency_stable = _halves_agree(times)
    except Exception as err:  # Never raise for a failing candidate.
        result.add_error("latency", err)
    try:
        batch, throughput = _throughput(forward, make_inputs, options)
        result.serving_batch_size, result.throughput_eps = batch, _round(throughput)
    except Exception as err:
        result.add_error("throughput", err)
    result.peak_infer_memory_mb = _round(meter.peak_mb() - baseline)
    result.peak_infer_device_memory_mb = meter.device_peak_mb()


def _merge_inference(result: ProfileResult, served: ProfileResult, where: str) -> None:
    for field in _inference_fields():
        setattr(result, field, getattr(served, field))
    result.inference_measured_on = where if served.latency_p50_ms is not None else ""
    if served.error:
        result.add_error("inference", served.error)


def _run_child(request: dict[str, Any], tmp: str, deadline: float) -> ProfileResult:
    """Runs one child process (`_child_main`) and reads its result; never raises."""
    failed = ProfileResult(
        name=request["name"], builder=request["builder"], builder_kwargs=request["builder_kwargs"]
    )
    remaining = deadline - time.perf_counter()
    if remaining <= 0:
        failed.add_error("subprocess", f"no time left for the {request['mode']} step")
        return failed
    handle, request_path = tempfile.mkstemp(suffix=".json", dir=tmp)
    os.close(handle)
    result_path = Path(request_path).with_suffix(".result.json")
    Path(request_path).write_text(json.dumps(request), encoding="utf-8")
    env = dict(os.environ)
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # `-c` rather than `-m`: with `-m` the package imports this module and then
    # runs a second copy of it as __main__ (runpy warns about exactly that).
    code = (
        "import sys; from tfhub_finetune.selection.profile import _child_main; "
        "sys.exit(_child_main(sys.argv[1:]))"
    )
    command = [sys.executable, "-c", code, request_path, str(result_path)]
    try:
        proc = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=remaining, check=False
        )
    except subprocess.TimeoutExpired:
        failed.add_error("subprocess", f"{request['mode']} step timed out (limit reached)")
        return failed
    if not result_path.exists():
        failed.add_error("subprocess", _describe_exit(proc.returncode, proc.stderr))
        return failed
    return ProfileResult.from_dict(json.loads(result_path.read_text(encoding="utf-8")))


def _describe_exit(returncode: int, stderr: str) -> str:
    tail = " ".join((stderr or "").strip().split()[-80:])[-_STDERR_TAIL_CHARS:]
    if returncode in (-9, 137):
        why = "killed by SIGKILL (likely out of memory)"
    elif returncode < 0:
        why = f"killed by signal {-returncode}"
    else:
        why = f"exited with code {returncode}"
    return f"child process {why} without a result. stderr tail: {tail or '(empty)'}"


def _round(value: float | None, digits: int = 4) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), digits)


def _child_main(argv: Sequence[str]) -> int:
    """Child process entry point: `_child_main([REQUEST.json, RESULT.json])`.

    `mode` "build": build with the builder and run `profile_model` (keeping
    the SavedModel in `export_dir`); "serve": `profile_saved_model` on it.
    """
    request = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    result_path = Path(argv[1])
    options = ProfileOptions(**request["options"])
    import keras
    import tensorflow as tf

    if options.threads:
        tf.config.threading.set_intra_op_parallelism_threads(options.threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    for gpu in tf.config.list_physical_devices("GPU"):
        # Without growth TF reserves most of the GPU and the peak means nothing.
        tf.config.experimental.set_memory_growth(gpu, True)
    name = request["name"]
    failed = ProfileResult(
        name=name,
        builder=request["builder"],
        builder_kwargs=request["builder_kwargs"],
        threads=options.threads,
        isolated_process=True,
        tf_version=tf.__version__,
        keras_version=keras.__version__,
    )
    failed.device_type, failed.device = device_description()
    meter = _PeakMemory()
    failed.memory_method = meter.method

    def finish(result: ProfileResult) -> int:
        result.builder = request["builder"]
        result.builder_kwargs = request["builder_kwargs"]
        result.threads = options.threads
        result.isolated_process = True
        atomic_write_text(result_path, json.dumps(result.to_dict(), indent=2))
        return 0

    if request["mode"] == "serve":
        try:
            return finish(
                profile_saved_model(
                    request["export_dir"],
                    name=name,
                    options=options,
                    baseline_rss_mb=meter.current_mb(),
                )
            )
        except BaseException as err:  # Includes InputError: recorded, the run goes on.
            failed.add_error("serve", err)
            return finish(failed)

    try:
        builder = resolve_builder(request["builder"])
        exporter = None
        if request.get("exporter"):
            exporter = functools.partial(
                resolve_builder(request["exporter"]), **request.get("exporter_kwargs") or {}
            )
    except BaseException as err:
        failed.add_error("build", err)
        return finish(failed)
    # Taken after importing the builder's modules (keras-hub etc.), so the
    # figures count what the model adds, not the libraries.
    baseline = meter.current_mb()
    failed.baseline_memory_mb = _round(baseline)
    start = time.perf_counter()
    try:
        model = builder(**request["builder_kwargs"])
        if not isinstance(model, keras.Model):
            raise TypeError(f"the builder returned {type(model).__name__}, expected keras.Model")
    except BaseException as err:
        failed.add_error("build", err)
        return finish(failed)
    build_seconds = time.perf_counter() - start
    try:
        result = profile_model(
            model,
            request["input_shapes"],
            name=name,
            options=options,
            input_dtypes=request.get("input_dtypes"),
            baseline_rss_mb=baseline,
            export_dir=request.get("export_dir"),
            exporter=exporter,
        )
    except BaseException as err:
        failed.add_error("profile", err)
        result = failed
    result.build_seconds = _round(build_seconds)
    result.keras_version = keras.__version__
    return finish(result)


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
