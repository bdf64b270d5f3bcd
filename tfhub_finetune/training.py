"""Training: AdamW with warm-up/decay, callbacks, and fit that survives being killed.

`fit_resumable` is the one training loop the pipelines use. It differs from a
bare `model.fit` in the ways fine-tuning on shared machines needs:

* **Resume where it stopped.** `ResumableBackup` writes weights *and*
  optimizer state (so `iterations`, hence the learning-rate schedule,
  continue) every N steps and at epoch ends. Each epoch's data order is a
  pure function of `(seed, epoch)`, so a resumed run skips the batches it
  already saw and sees exactly the batches the uninterrupted run would have.
  (Keras' own `BackupAndRestore` restarts the interrupted epoch from its first
  batch.)
* **Atomic writes.** Backups are written under a new name and committed by
  atomically replacing a small JSON pointer; a kill at any moment leaves the
  previous complete backup in place. The best checkpoint is written the same
  way, and its score is persisted, so a restarted run never overwrites a
  better checkpoint with a worse one.
* **SIGTERM** (what cluster schedulers send before preempting a job) saves a
  backup at the next step boundary and raises `Preempted`: the partial epoch
  is not evaluated, logged or checkpointed as if it were whole, and the
  pipelines exit with `PREEMPTED_EXIT_CODE` (143, like a process the signal
  killed), so a scheduler restarts the job and the rerun resumes. A signal
  during the epoch-end validation lets that (complete) epoch finish first.
  Keras' `BackupAndRestore` and TF's `PreemptionCheckpointHandler` likewise
  save, then end the process with a failure status.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tfhub_finetune.adaptation import lora_state, restore_lora_state
from tfhub_finetune.errors import InputError, Preempted
from tfhub_finetune.io_utils import atomic_path, atomic_write_text, read_json_file

BACKUP_STATE = "backup_state.json"
BACKUP_LOG = "backup_log.jsonl"
BEST_WEIGHTS = "best.weights.h5"
BEST_STATE = "best.json"


@keras.saving.register_keras_serializable(package="tfhub_finetune")
class WarmupLinearDecay(keras.optimizers.schedules.LearningRateSchedule):
    """BERT's schedule: linear warm-up to `peak_learning_rate`, then linear decay to 0.

    Example:

    ```python
    schedule = WarmupLinearDecay(5e-5, total_steps=1000, warmup_steps=100)
    float(schedule(100))  # 5e-05
    ```
    """

    def __init__(self, peak_learning_rate: float, total_steps: int, warmup_steps: int = 0,
                 end_learning_rate: float = 0.0):
        self.peak_learning_rate = float(peak_learning_rate)
        self.total_steps = int(max(total_steps, 1))
        self.warmup_steps = int(warmup_steps)
        self.end_learning_rate = float(end_learning_rate)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        peak = self.peak_learning_rate
        warm = keras.ops.cast(max(self.warmup_steps, 1), "float32")
        warmup_lr = peak * step / warm
        decay_steps = float(max(self.total_steps - self.warmup_steps, 1))
        progress = keras.ops.clip((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        decay_lr = peak + (self.end_learning_rate - peak) * progress
        if self.warmup_steps <= 0:
            return decay_lr
        return keras.ops.where(step < self.warmup_steps, warmup_lr, decay_lr)

    def get_config(self):
        return {
            "peak_learning_rate": self.peak_learning_rate,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "end_learning_rate": self.end_learning_rate,
        }


@keras.saving.register_keras_serializable(package="tfhub_finetune")
class FusedAdamW(keras.optimizers.AdamW):
    """`keras.optimizers.AdamW` whose per-variable update is one fused TensorFlow kernel.

    Same algorithm, hyperparameters, slots and checkpoints as Keras' AdamW.
    The passes over memory change: decoupled weight decay is one scaling pass
    per variable (Keras: three), the global norm for clipping reads each
    gradient once (`l2_loss`; Keras: square, then sum), and the Adam update
    is one kernel. Keras writes the update as about ten separate element-wise
    ops per variable (each a full pass over the variable's memory), whereas
    `ResourceApplyAdam` updates `m`, `v` and the variable in one multi-threaded
    pass. Fine-tuning MiniLM-L6 on SST-2 on a CPU, short sentences make the
    matmuls cheap while the update touches all 22.7M parameters every step
    (the 11.7M word embeddings included): the unfused update was a third of
    the step's op time (TF profiler; see BUILD_NOTES.md "Where the time
    goes"). Falls back to Keras' update for AMSGrad and non-float32 variables.

    Example:

    ```python
    optimizer = FusedAdamW(learning_rate=5e-5, weight_decay=0.01, epsilon=1e-6)
    ```
    """

    def _apply_weight_decay(self, variables):
        # Keras: `var.assign_sub(var * wd * lr)` per variable, with the schedule
        # evaluated again for each: two multiplies and a subtraction, each a pass
        # over the variable. Here `1 - lr * wd` is one scalar per step, and
        # `assign` takes over the product's buffer (AssignVariableOp reuses an
        # input nobody else holds): one pass. (x(1 - c) and x - xc round alike
        # to float32 precision; tested against Keras' AdamW.)
        if self.weight_decay is None:
            return
        decayed = [v for v in variables if self._use_weight_decay(v)]

        def apply(distribution, decayed):
            keep = 1.0 - tf.cast(self.learning_rate, tf.float32) * tf.cast(self.weight_decay, tf.float32)
            for variable in decayed:
                variable = variable.value if isinstance(variable, keras.Variable) else variable
                distribution.extended.update(
                    variable, lambda v: v.assign(v * tf.cast(keep, v.dtype)), group=False
                )

        tf.__internal__.distribute.interim.maybe_merge_call(apply, self._distribution_strategy, decayed)

    def _clip_gradients(self, grads):
        # Keras' global norm is `sum(square(g))` per gradient: a squared copy
        # written and read again. `l2_loss` (sum(g^2) / 2) reads each gradient
        # once. Scaling is Keras' own (NaN-propagating) formula.
        if self.clipnorm or not self.global_clipnorm or self.global_clipnorm <= 0:
            return super()._clip_gradients(grads)
        # A sparse (embedding) gradient counts by its slices, as in Keras.
        values = [g.values if isinstance(g, tf.IndexedSlices) else g for g in grads if g is not None]
        norm = tf.sqrt(2.0 * tf.add_n([tf.nn.l2_loss(tf.cast(v, tf.float32)) for v in values]))
        clip = tf.constant(self.global_clipnorm, tf.float32)
        scale = clip * tf.minimum(1.0 / norm, 1.0 / clip) + (norm - norm)
        return [_scaled(g, scale) for g in grads]

    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad or variable.dtype != tf.float32:
            return super().update_step(gradient, variable, learning_rate)
        index = self._get_variable_index(variable)
        m = self._momentums[index].value
        v = self._velocities[index].value
        variable = variable.value if isinstance(variable, keras.Variable) else variable
        step = tf.cast(self.iterations + 1, tf.float32)
        beta_1 = tf.constant(self.beta_1, tf.float32)
        beta_2 = tf.constant(self.beta_2, tf.float32)
        # Keras' AdamW update, term for term: lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t),
        # m += (g - m)(1 - b1), v += (g^2 - v)(1 - b2), var -= lr_t m / (sqrt(v) + eps).
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle,
            m=m.handle,
            v=v.handle,
            beta1_power=tf.pow(beta_1, step),
            beta2_power=tf.pow(beta_2, step),
            lr=tf.cast(learning_rate, tf.float32),
            beta1=beta_1,
            beta2=beta_2,
            epsilon=tf.constant(self.epsilon, tf.float32),
            grad=tf.convert_to_tensor(gradient, tf.float32),
            use_locking=False,
        )


def _scaled(gradient, scale: tf.Tensor):
    if gradient is None:
        return None
    if isinstance(gradient, tf.IndexedSlices):
        return tf.IndexedSlices(gradient.values * tf.cast(scale, gradient.values.dtype),
                                gradient.indices, gradient.dense_shape)
    return gradient * tf.cast(scale, gradient.dtype)


def make_optimizer(
    learning_rate: float,
    total_steps: int,
    warmup_ratio: float = 0.1,
    weight_decay: float = 0.01,
    clip_norm: float = 1.0,
    end_learning_rate: float = 0.0,
) -> keras.optimizers.AdamW:
    """AdamW with BERT defaults: warm-up + linear decay, no decay on biases/LayerNorm.

    Returns a `FusedAdamW` (Keras' AdamW with a fused update kernel).

    `end_learning_rate=learning_rate` keeps the rate constant after warm-up,
    so training for k epochs is exactly the start of any longer run (model
    selection's successive halving continues trials that way).

    Example:

    ```python
    model.compile(optimizer=make_optimizer(5e-5, total_steps=600), loss=...)
    ```
    """
    schedule = WarmupLinearDecay(learning_rate, total_steps, int(round(total_steps * warmup_ratio)),
                                 end_learning_rate)
    optimizer = FusedAdamW(
        learning_rate=schedule,
        weight_decay=weight_decay,
        epsilon=1e-6,
        global_clipnorm=clip_norm or None,
    )
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "layer_norm", "LayerNorm"])
    return optimizer


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    """The learning rate the optimizer applies at its current step."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    lr = inner.learning_rate
    if isinstance(inner._learning_rate, keras.optimizers.schedules.LearningRateSchedule):
        lr = inner._learning_rate(inner.iterations)
    return float(keras.ops.convert_to_numpy(lr))


def optimizer_step(optimizer: keras.optimizers.Optimizer) -> int:
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return int(keras.ops.convert_to_numpy(inner.iterations))


# --------------------------------------------------------------------------- #
# Backups (resume) and best checkpoint
# --------------------------------------------------------------------------- #


_BACKUP_FIX = "Delete the model directory's backup/ folder to start the run over."


def load_weights_file(model: keras.Model, path: str | Path, *, fix: str) -> None:
    """`model.load_weights(path)`, with a damaged or foreign file said in one line.

    Raises:
        InputError: naming the file: truncated or not HDF5 (h5py's OSError),
            or weights of another architecture (Keras' ValueError).
    """
    try:
        model.load_weights(str(path))
    except (OSError, ValueError, KeyError) as err:
        detail = " ".join(str(err).split())[:160] or type(err).__name__
        raise InputError(f"The weights file {path} is damaged or does not fit this model.",
                         received={"file": str(path)}, fix=f"{fix} ({detail})") from None


def read_backup_state(backup_dir: str | Path) -> dict | None:
    """The committed backup's `{"epoch", "step_in_epoch", "global_step", "weights"}`, or None."""
    path = Path(backup_dir) / BACKUP_STATE
    if not path.exists():
        return None
    state = read_json_file(path, fix=_BACKUP_FIX)
    if not isinstance(state, dict) or not isinstance(state.get("weights"), str):
        raise InputError(f"{path} is not a backup state.", received={"file": str(path)},
                         fix=_BACKUP_FIX)
    if not (Path(backup_dir) / state["weights"]).exists():
        logging.warning("Backup state points at a missing file; starting fresh.")
        return None
    return state


class ResumableBackup(keras.callbacks.Callback):
    """Backs up weights + optimizer every `save_every_steps` and at epoch ends, atomically.

    The pipeline restores with `restore_backup` before `fit` (to know how many
    batches to skip); this callback only writes. On SIGTERM it saves at the
    next batch boundary and raises `Preempted`, so neither Keras' epoch-end
    validation nor any epoch-end callback runs on the partial epoch (a signal
    during validation lets the finished epoch end normally, then raises).
    Put it last in the callback list: at an epoch end the others have run.

    Args:
        backup_dir: str. Folder for backups (the chief's model_dir/backup).
        steps_per_epoch: int. Batches per epoch, to record the position.
        save_every_steps: int. Also save every N steps (0: epoch ends only).
        initial_epoch: int. Epoch the current `fit` starts in.
        initial_step_in_epoch: int. Batches of that epoch already done.
    """

    def __init__(self, backup_dir: str | Path, steps_per_epoch: int, save_every_steps: int = 0,
                 initial_epoch: int = 0, initial_step_in_epoch: int = 0):
        super().__init__()
        self.backup_dir = Path(backup_dir)
        self.steps_per_epoch = int(steps_per_epoch)
        self.save_every_steps = int(save_every_steps)
        self._epoch = initial_epoch
        self._offset = initial_step_in_epoch
        self._step_in_epoch = initial_step_in_epoch
        self.terminated = False
        self._previous_handler = None
        self._installed = False

    def on_train_begin(self, logs=None):
        def handler(signum, frame):
            logging.warning("SIGTERM received: saving a backup at the next step and stopping.")
            self.terminated = True

        try:
            self._previous_handler = signal.signal(signal.SIGTERM, handler)
            self._installed = True
        except ValueError:  # Not the main thread.
            self._installed = False

    def on_train_end(self, logs=None):
        self.restore_signal_handler()

    def restore_signal_handler(self) -> None:
        """Puts back the SIGTERM handler `on_train_begin` replaced (also after `Preempted`)."""
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._installed = False

    def on_epoch_begin(self, epoch, logs=None):
        if epoch != self._epoch:
            self._offset = 0
        self._epoch = epoch
        self._step_in_epoch = self._offset

    def on_train_batch_end(self, batch, logs=None):
        self._step_in_epoch = self._offset + batch + 1
        due = self.save_every_steps and optimizer_step(self.model.optimizer) % self.save_every_steps == 0
        if self.terminated:
            raise Preempted(self.save(self._epoch, self._step_in_epoch), self.steps_per_epoch)
        if due and self._step_in_epoch < self.steps_per_epoch:
            self.save(self._epoch, self._step_in_epoch)

    def on_epoch_end(self, epoch, logs=None):
        state = self.save(epoch + 1, 0)
        self._offset = 0
        if self.terminated:
            raise Preempted(state, self.steps_per_epoch)

    def save(self, epoch: int, step_in_epoch: int) -> dict:
        """Writes and commits a backup at this position; returns its state."""
        if step_in_epoch >= self.steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
        self.backup_dir.mkdir(parents=True, exist_ok=True)
        global_step = optimizer_step(self.model.optimizer)
        name = f"backup-{global_step}.weights.h5"
        with atomic_path(self.backup_dir / name) as tmp:
            self.model.save_weights(str(tmp))
        state = {"epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
                 "weights": name, "learning_rate": current_learning_rate(self.model.optimizer),
                 "rng_states": [v.numpy().tolist() for v in _rng_state_variables(self.model)]}
        adapters = lora_state(self.model)
        if adapters:
            # Keras saves LoRA layers merged, with A and B dropped: resuming from that alone
            # would restart the adapters at zero, where they get no gradient.
            state["lora"] = f"backup-{global_step}.lora.npz"
            with atomic_path(self.backup_dir / state["lora"]) as tmp, open(tmp, "wb") as handle:
                np.savez(handle, **adapters)
        # The pointer is the commit: until it is replaced, the old backup stays valid.
        atomic_write_text(self.backup_dir / BACKUP_STATE, json.dumps(state))
        # An append-only history, so a run's learning rate at any backed-up step can be
        # compared with another run's (the resume tests do).
        with open(self.backup_dir / BACKUP_LOG, "a", encoding="utf-8") as log:
            log.write(json.dumps(state) + "\n")
        for old in (*self.backup_dir.glob("backup-*.weights.h5"),
                    *self.backup_dir.glob("backup-*.lora.npz")):
            if old.name not in (name, state.get("lora")):
                old.unlink(missing_ok=True)
        return state


def restore_backup(model: keras.Model, backup_dir: str | Path) -> dict | None:
    """Loads the committed backup (weights + optimizer state) into a compiled model."""
    state = read_backup_state(backup_dir)
    if state is None:
        return None
    # Optimizer slots must be created under the model's strategy, like its weights.
    strategy = getattr(model, "distribute_strategy", None) or tf.distribute.get_strategy()
    with strategy.scope():
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        load_weights_file(model, Path(backup_dir) / state["weights"], fix=_BACKUP_FIX)
        if state.get("lora"):
            with np.load(Path(backup_dir) / state["lora"]) as adapters:
                restore_lora_state(model, dict(adapters))
        rng = _rng_state_variables(model)
        if len(rng) == len(state.get("rng_states", [])):
            for variable, value in zip(rng, state["rng_states"], strict=True):
                variable.assign(value)
    return state


def _rng_state_variables(model: keras.Model) -> list:
    """Dropout's seed-generator states: `save_weights` omits them, so backups carry them.

    Without them a resumed run draws different dropout masks than the
    uninterrupted one and the two drift apart.
    """
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


def monitor_mode(monitor: str) -> str:
    """`"min"` for metrics that improve downwards (losses, errors, MAE, RMSE), else `"max"`.

    The one direction rule: the best checkpoint, early stopping and model
    selection's trial patience all ask it, so `--monitor=val_mae` stops when
    the error stops falling, not when it stops rising.

    Example:

    ```python
    monitor_mode("val_mae")  # "min"
    monitor_mode("val_accuracy")  # "max"
    ```
    """
    name = monitor.lower()
    return "min" if ("loss" in name or "error" in name or name.endswith(("mae", "rmse", "mse"))) \
        else "max"


def improved(value: float, best: float | None, mode: str) -> bool:
    """Whether `value` beats `best` (None: nothing yet) in direction `mode`."""
    if best is None:
        return True
    return value > best if mode == "max" else value < best


class BestCheckpoint(keras.callbacks.Callback):
    """Keeps the weights with the best `monitor` value, atomically, across restarts.

    Unlike `keras.callbacks.ModelCheckpoint(save_best_only=True)`, the best
    score is stored beside the weights (`best.json`) and read back at start,
    so a resumed run cannot overwrite a better checkpoint with a worse one.

    Example:

    ```python
    model.fit(..., callbacks=[BestCheckpoint("runs/x", monitor="val_accuracy")])
    ```
    """

    def __init__(self, directory: str | Path, monitor: str = "val_accuracy", mode: str = "auto"):
        super().__init__()
        self.directory = Path(directory)
        self.monitor = monitor
        self.mode = monitor_mode(monitor) if mode == "auto" else mode
        self.best = self._load_best()

    def _load_best(self) -> float | None:
        path = self.directory / BEST_STATE
        if path.exists() and (self.directory / BEST_WEIGHTS).exists():
            best = read_json_file(path, fix=f"Delete {path} and {BEST_WEIGHTS} to forget the "
                                  "best checkpoint, or use a new --model_dir.")
            return best.get("value") if isinstance(best, dict) else None
        return None

    def _better(self, value: float) -> bool:
        return improved(value, self.best, self.mode)

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            logging.warning("BestCheckpoint: `%s` not in logs (%s).", self.monitor, sorted(logs or {}))
            return
        value = float(value)
        if not self._better(value):
            return
        with atomic_path(self.directory / BEST_WEIGHTS) as tmp:
            self.model.save_weights(str(tmp))
        atomic_write_text(
            self.directory / BEST_STATE,
            json.dumps({"monitor": self.monitor, "value": value, "epoch": epoch + 1}),
        )
        logging.info("New best %s=%.4f at epoch %d.", self.monitor, value, epoch + 1)
        self.best = value


class TrainClock(keras.callbacks.Callback):
    """Seconds and steps spent in training batches, validation and epoch-end work excluded.

    Example:

    ```python
    clock = TrainClock()
    model.fit(..., callbacks=[clock])
    clock.steps / clock.seconds  # training steps per second
    ```
    """

    def __init__(self):
        super().__init__()
        self.seconds = 0.0
        self.steps = 0
        self._started: float | None = None

    def on_train_batch_begin(self, batch, logs=None):
        if self._started is None:
            self._started = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1

    def on_test_begin(self, logs=None):
        self._stop()

    def on_epoch_end(self, epoch, logs=None):
        self._stop()

    def _stop(self) -> None:
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = None


class LearningRateLogger(keras.callbacks.Callback):
    """Adds the current learning rate to the epoch logs (TensorBoard, CSV).

    Callbacks see the logs in list order, so it must come before the loggers
    (`fit_resumable` puts it first).
    """

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = current_learning_rate(self.model.optimizer)


def fit_resumable(
    model: keras.Model,
    epoch_dataset: Callable[[int], tf.data.Dataset],
    *,
    epochs: int,
    steps_per_epoch: int,
    model_dir: str | Path,
    validation_data: tf.data.Dataset | None = None,
    callbacks: list[keras.callbacks.Callback] | None = None,
    backup_every_steps: int = 0,
    verbose: int | str = "auto",
) -> dict:
    """Fits `model` for `epochs`, resuming from `<model_dir>/backup` if present.

    Args:
        model: keras.Model. Compiled.
        epoch_dataset: callable. `epoch_dataset(k)` returns epoch k's batches
            in a deterministic order (a pure function of k and the seed).
        epochs: int. Total epochs.
        steps_per_epoch: int. Batches per epoch.
        model_dir: str. Where backups go (`backup/`).
        validation_data: Dataset evaluated at each epoch end.
        callbacks: extra callbacks (best checkpoint, early stop, logs...).
        backup_every_steps: int. Back up every N steps as well as at epoch ends.
        verbose: Keras verbosity (progress bars).

    Returns:
        `{"resumed_from": state or None, "history": {...}}`.

    Raises:
        Preempted: SIGTERM arrived; the backup it names is committed.
    """
    backup_dir = Path(model_dir) / "backup"
    state = restore_backup(model, backup_dir)
    start_epoch, skip = 0, 0
    if state is not None:
        start_epoch, skip = int(state["epoch"]), int(state["step_in_epoch"])
        print(
            f"Resuming from backup: epoch {start_epoch + 1}, step {skip} of the epoch, "
            f"global step {state['global_step']}, learning rate "
            f"{current_learning_rate(model.optimizer):.6g}.",
            flush=True,
        )
    history: dict[str, list] = {}
    if start_epoch >= epochs:
        return {"resumed_from": state, "history": history}

    backup = ResumableBackup(backup_dir, steps_per_epoch, backup_every_steps, start_epoch, skip)
    # The learning rate first, so the loggers record it; the backup last, so at an epoch
    # end it commits (and, on SIGTERM, stops) after every other callback has run.
    all_callbacks = [LearningRateLogger(), *(callbacks or []), backup]

    def run(first_epoch: int, last_epoch: int, dataset, steps):
        result = model.fit(
            dataset,
            epochs=last_epoch,
            initial_epoch=first_epoch,
            steps_per_epoch=steps,
            validation_data=validation_data,
            callbacks=all_callbacks,
            shuffle=False,  # The epoch datasets carry their own seeded order.
            verbose=verbose,
        )
        for key, values in result.history.items():
            history.setdefault(key, []).extend(values)

    try:
        if skip:
            # Finish the interrupted epoch on exactly the batches it had left.
            run(start_epoch, start_epoch + 1, epoch_dataset(start_epoch).skip(skip),
                steps_per_epoch - skip)
            start_epoch += 1
        if start_epoch < epochs and not model.stop_training:
            # Epochs are joined in Python, each seeded with a Python int: a tensor seed (as a
            # flat_map over epoch numbers would pass) crashes tf.data's shuffle when the global
            # seed is 0, because TF's get_seed then compares the tensor as a bool.
            stream = functools.reduce(
                tf.data.Dataset.concatenate, (epoch_dataset(k) for k in range(start_epoch, epochs))
            )
            run(start_epoch, epochs, stream.prefetch(tf.data.AUTOTUNE), steps_per_epoch)
    except Preempted:
        # Keras skips on_train_end when a callback raises: close the loggers' files
        # (CSV, TensorBoard events) here, so a process that ends at once loses nothing.
        for callback in all_callbacks[:-1]:
            callback.on_train_end()
        raise
    finally:
        backup.restore_signal_handler()
    return {"resumed_from": state, "history": history}


def total_train_steps(steps_per_epoch: int, epochs: int) -> int:
    return int(steps_per_epoch) * int(epochs)


def set_seed(seed: int) -> None:
    """Seeds Python, NumPy and TF (and makes TF ops deterministic where cheap)."""
    keras.utils.set_random_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def warmup_steps_for(total_steps: int, ratio: float) -> int:
    return int(math.floor(total_steps * ratio))
