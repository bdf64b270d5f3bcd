import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfhub_finetune import training

STEPS_PER_EPOCH, EPOCHS, BATCH = 6, 3, 8


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS_PER_EPOCH * BATCH, 5)).astype("float32")
    y = (x.sum(axis=1) > 0).astype("int32")
    return x, y


def _epoch_dataset(epoch):
    x, y = _data()
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    return ds.shuffle(len(x), seed=epoch + 100, reshuffle_each_iteration=False).batch(BATCH)


def _model():
    keras.utils.set_random_seed(1)
    # Dropout makes the test also check that the RNG state resumes with the weights.
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dropout(0.3), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer=training.make_optimizer(1e-2, STEPS_PER_EPOCH * EPOCHS, 0.2),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


class Crash(keras.callbacks.Callback):
    """Simulates a kill: raises after `at` batches of this fit."""

    def __init__(self, at):
        super().__init__()
        self.at, self.seen = at, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.at:
            raise KeyboardInterrupt("killed")


def test_warmup_then_linear_decay():
    schedule = training.WarmupLinearDecay(1.0, total_steps=110, warmup_steps=10)
    values = [float(schedule(s)) for s in (0, 5, 10, 60, 110, 200)]
    np.testing.assert_allclose(values, [0.0, 0.5, 1.0, 0.5, 0.0, 0.0], atol=1e-6)
    restored = training.WarmupLinearDecay.from_config(schedule.get_config())
    assert float(restored(60)) == pytest.approx(0.5)


def test_fused_adamw_matches_keras_adamw():
    # Same weights and slots as Keras' AdamW after several steps, with weight decay,
    # global-norm clipping, a sparse (embedding) gradient and an excluded LayerNorm.
    def train(optimizer_cls):
        keras.utils.set_random_seed(3)
        ids = keras.Input((None,), dtype="int32")
        x = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(40, 8)(ids))
        x = keras.layers.LayerNormalization()(x)
        model = keras.Model(ids, keras.layers.Dense(2, activation="softmax")(x))
        optimizer = optimizer_cls(learning_rate=training.WarmupLinearDecay(1e-2, 16, 4),
                                  weight_decay=0.01, epsilon=1e-6, global_clipnorm=1.0)
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
        rng = np.random.default_rng(0)
        x, y = rng.integers(0, 40, (48, 6)).astype("int32"), rng.integers(0, 2, 48)
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        return [v.numpy() for v in model.weights + optimizer.variables]

    for fused, stock in zip(train(training.FusedAdamW), train(keras.optimizers.AdamW), strict=True):
        np.testing.assert_allclose(fused, stock, rtol=1e-5, atol=1e-6)
    assert isinstance(training.make_optimizer(1e-3, 10), training.FusedAdamW)


def test_interrupted_run_resumes_at_the_saved_step_with_same_weights_and_lr(tmp_path):
    reference = _model()
    training.fit_resumable(reference, _epoch_dataset, epochs=EPOCHS, steps_per_epoch=STEPS_PER_EPOCH,
                           model_dir=tmp_path / "ref", verbose=0)

    interrupted = _model()
    with pytest.raises(KeyboardInterrupt):
        # Backups every 4 steps; killed at step 10 (epoch 2, batch 4): resumes from step 8.
        training.fit_resumable(interrupted, _epoch_dataset, epochs=EPOCHS,
                               steps_per_epoch=STEPS_PER_EPOCH, model_dir=tmp_path / "run",
                               callbacks=[Crash(10)], backup_every_steps=4, verbose=0)
    state = training.read_backup_state(tmp_path / "run" / "backup")
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 2, 8)

    resumed = _model()
    outcome = training.fit_resumable(resumed, _epoch_dataset, epochs=EPOCHS,
                                     steps_per_epoch=STEPS_PER_EPOCH, model_dir=tmp_path / "run",
                                     backup_every_steps=4, verbose=0)
    assert outcome["resumed_from"]["global_step"] == 8
    assert training.optimizer_step(resumed.optimizer) == STEPS_PER_EPOCH * EPOCHS
    assert training.current_learning_rate(resumed.optimizer) == pytest.approx(
        training.current_learning_rate(reference.optimizer))
    for got, want in zip(resumed.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_best_checkpoint_is_not_overwritten_by_a_worse_restart(tmp_path):
    model = _model()
    best = training.BestCheckpoint(tmp_path, monitor="val_accuracy")
    best.set_model(model)
    best.on_epoch_end(0, {"val_accuracy": 0.9})
    saved = (tmp_path / training.BEST_WEIGHTS).read_bytes()

    restarted = training.BestCheckpoint(tmp_path, monitor="val_accuracy")
    assert restarted.best == pytest.approx(0.9)
    restarted.set_model(_model())
    restarted.on_epoch_end(0, {"val_accuracy": 0.7})
    assert (tmp_path / training.BEST_WEIGHTS).read_bytes() == saved
    restarted.on_epoch_end(1, {"val_accuracy": 0.95})
    assert json.loads((tmp_path / training.BEST_STATE).read_text())["value"] == pytest.approx(0.95)
    assert not list(tmp_path.glob(".*tmp*"))  # No temporary files left behind.


def test_loss_monitor_minimises(tmp_path):
    assert training.BestCheckpoint(tmp_path, monitor="val_loss").mode == "min"


def test_early_stopping_minimises_errors_and_maximises_scores(tmp_path):
    # One rule for the driver's EarlyStopping, the best checkpoint and selection's patience.
    from tfhub_finetune.config import ExperimentConfig, TrainConfig
    from tfhub_finetune.driver import training_callbacks

    for monitor, mode in (("val_mae", "min"), ("val_rmse", "min"), ("val_loss", "min"),
                          ("val_accuracy", "max"), ("val_macro_f1", "max")):
        assert training.monitor_mode(monitor) == mode
        config = ExperimentConfig(model_dir=str(tmp_path), train=TrainConfig(
            monitor=monitor, early_stopping_patience=1))
        (stop,) = [c for c in training_callbacks(config, tmp_path)
                   if isinstance(c, keras.callbacks.EarlyStopping)]
        best, = [c for c in training_callbacks(config, tmp_path)
                 if isinstance(c, training.BestCheckpoint)]
        assert (stop.mode, best.mode) == (mode, mode), monitor
    # A regression whose validation MAE keeps falling trains every epoch (it stopped
    # after `patience` epochs when the driver maximised every monitor).
    config = ExperimentConfig(model_dir=str(tmp_path), train=TrainConfig(
        monitor="val_mae", early_stopping_patience=1))
    (stop,) = [c for c in training_callbacks(config, tmp_path)
               if isinstance(c, keras.callbacks.EarlyStopping)]
    x = np.linspace(-1, 1, 64, dtype="float32")[:, None]
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", metrics=["mae"])
    history = model.fit(x, 3 * x, validation_data=(x, 3 * x), epochs=6, batch_size=16,
                        callbacks=[stop], verbose=0)
    maes = history.history["val_mae"]
    assert all(b < a for a, b in zip(maes, maes[1:], strict=False)), maes
    assert len(maes) == 6


def test_a_global_seed_of_zero_trains(tmp_path):
    # TF's get_seed compares a tensor shuffle seed as a bool when the global seed is 0;
    # epochs must reach tf.data with Python-int seeds.
    model = _model()
    keras.utils.set_random_seed(0)
    outcome = training.fit_resumable(model, _epoch_dataset, epochs=2, steps_per_epoch=STEPS_PER_EPOCH,
                                     model_dir=tmp_path, verbose=0)
    assert len(outcome["history"]["loss"]) == 2
