"""The generic train driver: one `run_experiment(config, task)` for every modality.

It owns what is the same for text and images: strategy and precision, the
model directory (params.json, labels.json), compile defaults, callbacks,
resumable fitting, the best checkpoint, evaluation to `metrics.json`, and the
final `model.keras`. Modalities plug in through `tasks.base.Task`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import keras
import numpy as np

from tfhub_finetune import calibration, distribute, training
from tfhub_finetune.adaptation import count_trainable, merge_lora
from tfhub_finetune.config import ExperimentConfig, keras_verbose
from tfhub_finetune.data.labels import LabelVocabulary
from tfhub_finetune.io_utils import atomic_path, atomic_write_text, read_json_file
from tfhub_finetune.memory import PeakMemory
from tfhub_finetune.metrics import (
    ValidationSpearman,
    check_monitor,
    classification_report,
    multilabel_report,
    regression_report,
    training_metrics,
)
from tfhub_finetune.stats import EvalPredictions
from tfhub_finetune.tasks.base import Task

PARAMS_FILE = "params.json"
LABELS_FILE = "labels.json"
METRICS_FILE = "metrics.json"
# Per-example eval predictions (`stats.EvalPredictions`), for paired comparisons of models.
PREDICTIONS_FILE = "eval_predictions.npz"
MODEL_FILE = "model.keras"


def loss_for(task: str) -> keras.losses.Loss:
    if task == "token_classification":
        # -1 marks positions without a tag: padding, [CLS]/[SEP], non-first word pieces.
        return keras.losses.SparseCategoricalCrossentropy(ignore_class=-1)
    if task == "regression":
        return keras.losses.MeanSquaredError()
    if task == "multi_label":
        return keras.losses.BinaryCrossentropy()
    return keras.losses.SparseCategoricalCrossentropy()


def compile_model(model: keras.Model, config: ExperimentConfig, steps_per_epoch: int,
                  num_classes: int, jit_compile: bool | str = False) -> None:
    """Compiles with the BERT-style AdamW recipe and the task's loss and metrics.

    The one compile recipe: `run_experiment` and model selection's trials both
    call it. With `lr_schedule="linear"` the rate warms up over `warmup_ratio`
    of all `epochs` and decays to 0; with `"constant"` it warms up over that
    fraction of the first epoch and stays at `learning_rate`.
    """
    t = config.train
    if t.lr_schedule == "constant":
        total_steps, end_learning_rate = max(steps_per_epoch, 1), t.learning_rate
    else:
        total_steps = max(training.total_train_steps(steps_per_epoch, t.epochs), 1)
        end_learning_rate = 0.0
    model.compile(
        optimizer=training.make_optimizer(
            t.learning_rate, total_steps, t.warmup_ratio, t.weight_decay, t.clip_norm,
            end_learning_rate=end_learning_rate,
        ),
        loss=loss_for(config.model.task),
        metrics=training_metrics(config.model.task, num_classes),
        jit_compile=jit_compile,
    )


def training_callbacks(config: ExperimentConfig, model_dir: Path) -> list[keras.callbacks.Callback]:
    """Best checkpoint, CSV and TensorBoard logs, and early stopping when configured.

    The best checkpoint and early stopping share `training.monitor_mode`, so
    both minimise an error (`val_mae`, `val_rmse`) and maximise a score.
    """
    monitor = config.train.monitor
    callbacks = [
        training.BestCheckpoint(model_dir, monitor=monitor),
        keras.callbacks.CSVLogger(str(model_dir / "training_log.csv"), append=True),
        keras.callbacks.TensorBoard(str(model_dir / "logs"), update_freq="epoch"),
    ]
    if config.train.early_stopping_patience:
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor=monitor, patience=config.train.early_stopping_patience,
            mode=training.monitor_mode(monitor),
        ))
    return callbacks


def epoch_metric_callbacks(task: Task, config: ExperimentConfig) -> list[keras.callbacks.Callback]:
    """Callbacks that add whole-eval-set metrics to each epoch's logs, before anything reads them.

    The task's own (`val_entity_f1` for token classification) and, when it
    is monitored, `val_spearman` (it needs every validation prediction at
    once). `run_experiment` and selection's trials put these first, so both
    monitor the same figures.
    """
    callbacks = [
        ValidationSpearman(task.eval_dataset(), task.eval_targets())
    ] if config.train.monitor == "val_spearman" else []
    return callbacks + (task.callbacks() if hasattr(task, "callbacks") else [])


def prediction_kind(task: str) -> str | None:
    """The `stats.EvalPredictions` kind of a model task, or None without one prediction per example.

    Token classification predicts per word and is scored per entity, so it
    has no per-example predictions (nor paired tests on them).
    """
    return {"single_label": "classification", "multi_label": "multi_label",
            "regression": "regression"}.get(task)


def fit_task(model: keras.Model, task: Task, config: ExperimentConfig, model_dir: Path,
             callbacks: list[keras.callbacks.Callback], validate: bool = True) -> dict:
    """`training.fit_resumable` over the task's epoch-seeded batches, as `config` says.

    `validate=False` leaves the per-epoch evaluation to a callback (selection's
    trials predict the eval split once per epoch and log the metrics from that).

    Returns:
        `fit_resumable`'s outcome (`history`, `resumed_from`).

    Raises:
        errors.Preempted: SIGTERM arrived; the backup is committed.
    """
    return training.fit_resumable(
        model,
        task.train_epoch_dataset,
        epochs=config.train.epochs,
        steps_per_epoch=task.steps_per_epoch,
        model_dir=model_dir,
        validation_data=task.eval_dataset() if validate else None,
        callbacks=callbacks,
        backup_every_steps=config.train.backup_every_steps,
        verbose=keras_verbose(config.runtime.verbose),
    )


def evaluate_report(model: keras.Model, task: Task, predictions_path: Path | None = None) -> dict:
    """Predicts the eval split and computes the full report (confusion matrix, intervals etc.).

    With `predictions_path`, also saves what the model predicted for each
    example there (`stats.EvalPredictions`), so two models evaluated on the
    same file can be compared example by example.
    """
    if hasattr(task, "report"):  # A task with its own report (token classification).
        return task.report(model)
    return outputs_report(task, model.predict(task.eval_dataset(), verbose=0), predictions_path)


def outputs_report(task: Task, outputs: np.ndarray, predictions_path: Path | None = None) -> dict:
    """The eval report of `outputs`, one row per example of `task.eval_dataset()`, in order.

    What `evaluate_report` computes from a Keras model, for predictions made
    any other way (an exported SavedModel, a TFLite interpreter).
    """
    targets = task.eval_targets()
    kind = task.config.model.task
    # Tasks with one prediction per example (not per token) have paired tests.
    if predictions_path is not None and prediction_kind(kind):
        EvalPredictions.from_outputs(prediction_kind(kind), targets, outputs).save(predictions_path)
    if kind == "regression":
        return regression_report(targets, outputs)
    if kind == "multi_label":
        return multilabel_report(targets, outputs, task.labels.names)
    return classification_report(targets, outputs, task.labels.names)


def run_experiment(config: ExperimentConfig, task: Task) -> dict:
    """Trains and/or evaluates `task` as `config.mode` says; returns the metrics dict.

    Args:
        config: ExperimentConfig. Validated.
        task: Task. The modality's data and model.

    Returns:
        The contents written to `metrics.json`.
    """
    config.validate()
    if config.mode != "eval":
        check_monitor(config.train.monitor, config.model.task)
    started = time.time()
    rt = config.runtime
    # The strategy first: multi-worker collectives must be configured before any other TF op.
    strategy = distribute.get_distribution_strategy(
        rt.distribution, num_gpus=None if rt.num_gpus < 0 else rt.num_gpus,
        all_reduce=rt.all_reduce, tpu_address=rt.tpu or None,
    )
    distribute.check_keras_fit_support(strategy)
    training.set_seed(config.train.seed)
    precision = distribute.set_precision(rt.precision, strategy=strategy)
    jit = distribute.resolve_jit_compile(rt.jit_compile, strategy)
    distribute.per_replica_batch(config.train.batch_size, strategy)  # Global batch must divide.
    # Only the chief writes into model_dir; other workers write to a temp dir removed at the end.
    created = not Path(config.model_dir).exists()
    model_dir = Path(distribute.worker_model_dir(config.model_dir, strategy))
    chief = distribute.is_chief(strategy)
    print(
        f"Strategy: {distribute.describe_strategy(strategy)}, precision: {precision}, XLA: {jit}, "
        f"CPU kernels: {calibration.describe_cpu_kernels()}.",
        flush=True,
    )
    try:
        return _run(config, task, strategy, model_dir, chief, jit, started)
    except BaseException:
        if created and chief:
            # A run refused before it wrote anything (bad data) leaves no empty folder.
            with contextlib.suppress(OSError):  # Not empty: what was written stays.
                model_dir.rmdir()
        raise
    finally:
        distribute.cleanup_worker_model_dir(model_dir, config.model_dir)


def _run(config, task, strategy, model_dir: Path, chief: bool, jit, started: float) -> dict:

    # Tasks may load the backbone while preparing data (tokenizer, limits), so
    # preparation runs in the scope too: every variable must be created there.
    with strategy.scope():
        if config.mode == "eval":
            labels = LabelVocabulary.load(Path(config.model_dir) / LABELS_FILE)
            task.prepare_eval(labels)
        else:
            task.prepare_train()
            # Under XLA every batch shape compiles: a few padded widths, not one per batch.
            task.bounded_shapes = bool(jit)
            check_monitor(config.train.monitor, config.model.task, task.labels.num_classes)
            _check_same_run(model_dir, config)
        model = task.build_model()
        compile_model(model, config, task.steps_per_epoch, task.labels.num_classes, jit)
        if config.mode != "eval":
            # After the build: a model the backbone cannot make (top:K too deep) writes nothing.
            config.save(model_dir / PARAMS_FILE)
            task.labels.save(model_dir / LABELS_FILE)

    result: dict = {"backbone": config.model.backbone, "task": config.model.task,
                    "adaptation": str(config.model.adaptation),
                    "params": int(model.count_params()),
                    "trainable_params": count_trainable(model), **task.summary}
    if config.mode != "eval":
        callbacks = epoch_metric_callbacks(task, config) + training_callbacks(config, model_dir)
        clock = training.TrainClock()
        meter = PeakMemory()
        rss_before = meter.current_mb()
        meter.reset()
        train_started = time.time()
        outcome = fit_task(model, task, config, model_dir, [clock, *callbacks])
        train_seconds = time.time() - train_started
        result["train_seconds"] = round(train_seconds, 2)
        result.update(_train_memory(meter, rss_before))
        result["resumed_from"] = outcome["resumed_from"]
        epochs_run = len(outcome["history"].get("loss", []))
        if epochs_run:
            # Includes per-epoch validation and tracing: a whole-run figure, not a step benchmark.
            result["train_examples_per_second"] = round(
                epochs_run * result.get("train_examples", 0) / train_seconds, 2
            )
            # The training steps alone (no validation, no checkpoints): what adaptations change.
            result["fit_seconds"] = round(clock.seconds, 2)
            result["fit_examples_per_second"] = round(
                clock.steps * config.train.batch_size / max(clock.seconds, 1e-9), 2)
    best = model_dir / training.BEST_WEIGHTS
    if best.exists():
        training.load_weights_file(model, best, fix="Train again (--mode=train) or point "
                                   "--model_dir at an intact trained model.")
    elif config.mode == "eval":
        from tfhub_finetune.errors import InputError

        raise InputError("No trained weights in the model directory.",
                         received={"model_dir": config.model_dir},
                         fix="Train first with --mode=train or --mode=train_and_eval.")

    with strategy.scope():
        # LoRA adapters become plain kernels: evaluated, saved and exported as served.
        model = merge_lora(model)
    if config.mode != "train":
        result["eval"] = evaluate_report(model, task, model_dir / PREDICTIONS_FILE if chief else None)
    result["wall_seconds"] = round(time.time() - started, 2)
    if chief:
        if config.mode != "eval":
            with atomic_path(model_dir / MODEL_FILE) as tmp:
                model.save(str(tmp))
        atomic_write_text(model_dir / METRICS_FILE, json.dumps(_jsonable(result), indent=2))
    result["model"] = model
    return result


def _train_memory(meter: PeakMemory, rss_before: float) -> dict:
    """The training phase's peak RSS, and how far it rose above the RSS before `fit`.

    The rise is the training's own memory (optimizer slots, gradients,
    activations, tf.data buffers); the peak includes the loaded model and data.
    """
    peak = meter.peak_mb()
    figures = {"peak_train_rss_mb": round(peak, 1),
               "train_rss_growth_mb": round(max(peak - rss_before, 0.0), 1),
               "train_memory_method": ("VmHWM reset at the start of fit (/proc/self/clear_refs)"
                                       if meter.resets else
                                       "getrusage ru_maxrss: the process's peak so far")}
    device = meter.device_peak_mb()
    if device is not None:
        figures["peak_train_device_mb"] = device
    return figures


# Train fields a resumed run may change: how often it backs up and how patient its early stop
# is do not change the steps it has taken or will take. Every other train field does (the
# schedule's length, the data order, the update), so a backup from other values is refused.
RESUMABLE_TRAIN_CHANGES = frozenset({"backup_every_steps", "early_stopping_patience"})


def _check_same_run(model_dir: Path, config: ExperimentConfig) -> None:
    """A model_dir with a backup from different settings would resume the wrong run.

    Compares the model, data and train sections of the saved `params.json`
    (but `RESUMABLE_TRAIN_CHANGES`) with the new configuration. Runtime
    settings (strategy, precision, threads) may change: a preempted job
    resumes on whatever machine it lands on.
    """
    params = model_dir / PARAMS_FILE
    if not params.exists() or not (model_dir / "backup" / training.BACKUP_STATE).exists():
        return
    from tfhub_finetune.errors import InputError

    previous = read_json_file(params, fix="Its backup cannot be resumed safely: use a new "
                              "--model_dir, or delete its backup/ folder to start over.")
    if not isinstance(previous, dict):
        previous = {}
    current = json.loads(json.dumps(config.to_dict()))
    changed = []
    for key in ("model", "data", "train"):
        before, now = previous.get(key) or {}, current.get(key) or {}
        if not isinstance(before, dict):
            before = {}
        # A field the older params.json does not record (one added to the
        # config since, e.g. data.augment) is unknown, not changed: compare
        # only what it recorded, so a run from before the field still resumes.
        # Likewise a field since removed (model.freeze_backbone, now adaptation) is not compared.
        for name in sorted(set(before) & set(now)):
            if key == "train" and name in RESUMABLE_TRAIN_CHANGES:
                continue
            if before[name] != now[name]:
                changed.append(f"{key}.{name}: {before[name]!r} -> {now[name]!r}")
    if changed:
        raise InputError(
            "The model directory holds a backup of a run with different settings; resuming it "
            "would continue the old run under the new ones.",
            received={"model_dir": config.model_dir, "changed": "; ".join(changed)},
            fix="Rerun with the old values, use a new --model_dir, or delete its backup/ folder "
            "to start over.",
        )


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items() if k != "model"}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return value


logging.getLogger("absl").setLevel(logging.WARNING)
