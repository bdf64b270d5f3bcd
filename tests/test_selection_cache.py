"""Selection's cache keys are derived from the config: no hand list of fields to keep in step."""

from __future__ import annotations

import dataclasses
import os
import shutil

import pytest

from tfhub_finetune.config import ModelConfig, TrainConfig
from tfhub_finetune.errors import InputError
from tfhub_finetune.selection import cache
from tfhub_finetune.selection.config import SelectionConfig


@pytest.fixture()
def config(tmp_path) -> SelectionConfig:
    train = tmp_path / "train.tsv"
    train.write_text("good\t1\nbad\t0\n", encoding="utf-8")
    return SelectionConfig.from_settings(
        ["minilm_l6_h384@layers=1", "scratch_text_encoder"], str(train),
        output_dir=str(tmp_path / "out"), sequence_length=32, learning_rates=(1e-4,),
    ).validate()


def _with_train(config: SelectionConfig, train) -> SelectionConfig:
    return dataclasses.replace(config, base=dataclasses.replace(config.base, train=train))


def test_a_field_added_to_a_config_dataclass_changes_the_key(config):
    # What a future setting looks like: a new field on TrainConfig, and nothing else edited.
    @dataclasses.dataclass(frozen=True)
    class TrainWithNewSetting(TrainConfig):
        label_smoothing: float = 0.0

    key = cache.project_name(config, "text")
    extended = _with_train(config, TrainWithNewSetting(**dataclasses.asdict(config.base.train)))
    assert cache.project_name(extended, "text") != key
    changed = _with_train(extended, dataclasses.replace(extended.base.train, label_smoothing=0.1))
    assert cache.project_name(changed, "text") not in (key, cache.project_name(extended, "text"))


def test_every_trial_setting_is_in_the_key_and_trial_fields_are_not(config):
    key = cache.project_name(config, "text")
    base = config.base
    # Settings the old hand list missed (clip_norm, crop_to_aspect_ratio) count.
    for changed in (
        dataclasses.replace(base, train=dataclasses.replace(base.train, clip_norm=0.5)),
        dataclasses.replace(base, data=dataclasses.replace(base.data, crop_to_aspect_ratio=False)),
        dataclasses.replace(base, runtime=dataclasses.replace(base.runtime,
                                                              precision="mixed_bfloat16")),
    ):
        assert cache.project_name(dataclasses.replace(config, base=changed), "text") != key
    # A trial's own hyperparameters key it inside the project, and bookkeeping changes nothing.
    for same in (
        dataclasses.replace(base, model=ModelConfig(**{**dataclasses.asdict(base.model),
                                                       "backbone": "other"})),
        dataclasses.replace(base, train=dataclasses.replace(base.train, learning_rate=0.3,
                                                            epochs=9, backup_every_steps=7)),
        dataclasses.replace(base, model_dir="elsewhere", mode="train"),
        dataclasses.replace(base, serving_jit_compile=True),
        # The adaptation is a trial hyperparameter (`--adaptations`); the key keeps `full`, so
        # a project made before it was one is the same project.
        dataclasses.replace(base, model=dataclasses.replace(base.model, adaptation="head")),
    ):
        assert cache.project_name(dataclasses.replace(config, base=same), "text") == key
    # The data's content counts, not its path.
    with open(config.base.data.train_data, "a", encoding="utf-8") as f:
        f.write("fine\t1\n")
    cache.path_fingerprint.cache_clear()
    assert cache.project_name(config, "text") != key


def test_settings_route_to_their_dataclass_and_unknown_ones_suggest(config):
    assert config.base.model.sequence_length == 32
    assert config.search.learning_rates == (1e-4,)
    assert config.base.train.early_stopping_patience == 2  # Selection's default.
    trial = config.trial("scratch_text_encoder", 3e-4, epochs=2, model_dir="t")
    assert (trial.model.backbone, trial.train.learning_rate, trial.train.epochs) == (
        "scratch_text_encoder", 3e-4, 2)
    assert trial.train.monitor == "val_accuracy" and trial.train.lr_schedule == "constant"
    with pytest.raises(InputError, match="Did you mean: learning_rates"):
        SelectionConfig.from_settings(["scratch_text_encoder"], "t.tsv", output_dir="o",
                                      learning_rate=1e-4)
    # The search sets each trial's adaptation; the setting is the list it compares.
    with pytest.raises(InputError, match="Did you mean: adaptations"):
        SelectionConfig.from_settings(["scratch_text_encoder"], "t.tsv", output_dir="o",
                                      adaptation="head")
    assert str(config.trial("x", 1e-3, 1, "t", adaptation="lora:8").model.adaptation) == "lora:8"
    # One set of bounds: the training pipelines' (validation_split up to 0.9).
    with pytest.raises(InputError, match=r"--validation_split must be in \[0.0, 0.9\]"):
        SelectionConfig.from_settings(["scratch_text_encoder"], "t.tsv", output_dir="o",
                                      validation_split=0.95).validate()


def test_fingerprints_follow_content_not_copy_times(tmp_path, monkeypatch):
    """Weights or data unpacked again (new times, another folder) keep their cached trials."""
    source = tmp_path / "weights"
    (source / "sub").mkdir(parents=True)
    (source / "config.json").write_text('{"hidden": 8}', encoding="utf-8")
    (source / "sub" / "model.bin").write_bytes(os.urandom(3000))
    monkeypatch.setattr(cache, "_WHOLE_FILE_BYTES", 1000)  # model.bin is a "large" file:
    monkeypatch.setattr(cache, "_SAMPLE_BYTES", 100)  # sampled at start, middle and end.
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    for file in copy.rglob("*"):
        os.utime(file, (1e9, 1e9))
    cache.path_fingerprint.cache_clear()
    assert cache.path_fingerprint(str(copy)) == cache.path_fingerprint(str(source))
    # A changed byte in a sampled region of the large file, or in a small file, changes it.
    for file, offset in ((copy / "sub" / "model.bin", 1500), (copy / "config.json", 2)):
        before = cache.path_fingerprint(str(copy))
        data = bytearray(file.read_bytes())
        data[offset] ^= 0xFF
        file.write_bytes(bytes(data))
        cache.path_fingerprint.cache_clear()
        assert cache.path_fingerprint(str(copy)) != before
