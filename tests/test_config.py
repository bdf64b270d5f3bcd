"""ExperimentConfig: validation messages, params.json round trip, the same-run check."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tfhub_finetune.config import DataConfig, ExperimentConfig, ModelConfig
from tfhub_finetune.errors import InputError


def _config(tmp_path, **data) -> ExperimentConfig:
    return ExperimentConfig(
        model_dir=str(tmp_path / "m"), data=DataConfig(train_data="train", **data),
        model=ModelConfig(backbone="minilm_l6_h384"),
    ).validate()


def test_params_json_records_augment_and_crop(tmp_path):
    config = _config(tmp_path, augment="randaugment", crop_to_aspect_ratio=False)
    config.save(tmp_path / "params.json")
    saved = json.loads((tmp_path / "params.json").read_text())["data"]
    assert saved["augment"] == "randaugment" and saved["crop_to_aspect_ratio"] is False
    assert ExperimentConfig.load(tmp_path / "params.json") == config


def test_params_json_from_before_the_image_fields_loads_with_defaults(tmp_path):
    old = _config(tmp_path).to_dict()
    del old["data"]["augment"], old["data"]["crop_to_aspect_ratio"]
    (tmp_path / "params.json").write_text(json.dumps(old))
    loaded = ExperimentConfig.load(tmp_path / "params.json").validate()
    assert loaded.data.augment == "basic" and loaded.data.crop_to_aspect_ratio is True


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"augment": "randaugmnt"},
         "Unknown augmentation. Received: augment='randaugmnt'. Did you mean: randaugment? "
         "Expected one of: basic, none, randaugment."),
        ({"augment": "heavy"},
         "Unknown augmentation. Received: augment='heavy'. "
         "Expected one of: basic, none, randaugment."),
        ({"crop_to_aspect_ratio": "no"},
         "--crop_to_aspect_ratio must be a boolean. Received: crop_to_aspect_ratio='no'. "
         "Expected True or False."),
    ],
)
def test_bad_image_data_values_are_one_line_keras_errors(tmp_path, data, expected):
    with pytest.raises(InputError) as info:
        _config(tmp_path, **data)
    assert str(info.value) == expected


def _backed_up_run(tmp_path, params: dict):
    model_dir = tmp_path / "m"
    (model_dir / "backup").mkdir(parents=True)
    (model_dir / "backup" / "backup_state.json").write_text("{}")
    (model_dir / "params.json").write_text(json.dumps(params))
    return model_dir


def test_resuming_with_another_augmentation_is_refused(tmp_path):
    from tfhub_finetune.driver import _check_same_run

    config = _config(tmp_path)
    model_dir = _backed_up_run(tmp_path, config.to_dict())
    _check_same_run(model_dir, config)  # Same settings: resumes.
    for change in ({"augment": "none"}, {"crop_to_aspect_ratio": False}):
        changed = dataclasses.replace(config, data=dataclasses.replace(config.data, **change))
        with pytest.raises(InputError) as info:
            _check_same_run(model_dir, changed)
        (name, value), = change.items()
        message = str(info.value)
        assert message.startswith("The model directory holds a backup of a run with different "
                                  f"settings; resuming it would continue the old run under the "
                                  f"new ones. Received: model_dir='{model_dir}', changed=")
        assert f"data.{name}: {getattr(config.data, name)!r} -> {value!r}" in message
        assert message.endswith("Rerun with the old values, use a new --model_dir, or delete "
                                "its backup/ folder to start over.")


def test_resuming_with_other_training_settings_is_refused_naming_them(tmp_path):
    # A finished or preempted run resumed under a new learning rate, seed or batch size would
    # train nothing (or skip the wrong batches) and rewrite params.json with values never used.
    from tfhub_finetune.driver import RESUMABLE_TRAIN_CHANGES, _check_same_run

    config = _config(tmp_path)
    model_dir = _backed_up_run(tmp_path, config.to_dict())
    changed = dataclasses.replace(config, train=dataclasses.replace(
        config.train, learning_rate=0.5, batch_size=config.train.batch_size * 2))
    with pytest.raises(InputError, match=r"train\.batch_size: .* train\.learning_rate: "):
        _check_same_run(model_dir, changed)
    for name in RESUMABLE_TRAIN_CHANGES:
        same = dataclasses.replace(config, train=dataclasses.replace(
            config.train, **{name: getattr(config.train, name) + 1}))
        _check_same_run(model_dir, same)  # Backup cadence and patience may change.
    faster = dataclasses.replace(config, runtime=dataclasses.replace(
        config.runtime, precision="mixed_bfloat16"))
    _check_same_run(model_dir, faster)  # A resumed job may land on other hardware.
    (model_dir / "params.json").write_text("{truncated")
    with pytest.raises(InputError, match="params.json is unreadable or damaged.*backup"):
        _check_same_run(model_dir, config)


def test_a_backup_from_before_the_image_fields_still_resumes(tmp_path):
    from tfhub_finetune.driver import _check_same_run

    config = _config(tmp_path, augment="randaugment")
    old = config.to_dict()
    del old["data"]["augment"], old["data"]["crop_to_aspect_ratio"]
    model_dir = _backed_up_run(tmp_path, old)
    _check_same_run(model_dir, config)  # Unrecorded fields are not compared...
    other = dataclasses.replace(config, data=dataclasses.replace(config.data, train_data="x"))
    with pytest.raises(InputError, match="data.train_data: "):  # ...recorded ones still are.
        _check_same_run(model_dir, other)


def test_damaged_files_of_a_model_dir_are_named(tmp_path):
    # Everything in a model_dir is written atomically: damage comes from outside (a truncated
    # copy). Resume and eval say which file, instead of an h5py or JSON traceback.
    import keras

    from tfhub_finetune import training
    from tfhub_finetune.data.labels import LabelVocabulary

    state = tmp_path / "backup" / training.BACKUP_STATE
    state.parent.mkdir()
    state.write_text('{"weights": "backup-5.wei')
    with pytest.raises(InputError, match=r"backup_state.json is unreadable or damaged.*backup/"):
        training.read_backup_state(state.parent)
    labels = tmp_path / "labels.json"
    labels.write_text('{"names": ["a", "b"')
    with pytest.raises(InputError, match="labels.json is unreadable or damaged"):
        LabelVocabulary.load(labels)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    weights = tmp_path / "best.weights.h5"
    model.save_weights(weights)
    weights.write_bytes(weights.read_bytes()[:500])
    with pytest.raises(InputError, match=r"best.weights.h5 is damaged"):
        training.load_weights_file(model, weights, fix="Train again.")


@pytest.mark.parametrize("task, monitor", [
    ("single_label", "val_accuracy"), ("multi_label", "val_macro_f1"),
    ("regression", "val_pearson"), ("token_classification", "val_entity_f1"),
])
def test_the_default_monitor_is_a_metric_the_task_logs(tmp_path, task, monitor):
    from tfhub_finetune.config import DEFAULT_MONITORS, TASKS
    from tfhub_finetune.metrics import check_monitor

    assert set(DEFAULT_MONITORS) == set(TASKS)  # A new task needs its default here too.

    config = ExperimentConfig(model_dir=str(tmp_path / "m"), data=DataConfig(train_data="train"),
                              model=ModelConfig(backbone="minilm_l6_h384", task=task)).validate()
    assert config.train.monitor == monitor
    check_monitor(config.train.monitor, task)  # What the driver asks before training.
    # Saved as the metric itself, and a config given one keeps it.
    config.save(tmp_path / "params.json")
    assert json.loads((tmp_path / "params.json").read_text())["train"]["monitor"] == monitor
    chosen = dataclasses.replace(config, train=dataclasses.replace(config.train, monitor="val_loss"))
    assert chosen.train.monitor == "val_loss"
