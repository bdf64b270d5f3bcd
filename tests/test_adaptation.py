"""--adaptation: what each method trains, LoRA merged for export, LoRA through a resumed run."""

import dataclasses
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfhub_finetune import training
from tfhub_finetune.adaptation import apply_adaptation, lora_layers, merge_lora
from tfhub_finetune.backbones import load_backbone
from tfhub_finetune.builders import build_image_classifier, build_text_classifier
from tfhub_finetune.config import Adaptation, ExperimentConfig, ModelConfig
from tfhub_finetune.data.text import make_text_dataset, tokenize_texts
from tfhub_finetune.errors import InputError
from tfhub_finetune.export import TOKEN_IDS_SUFFIX, export_text_classifier

TEXTS = ["a gripping , beautifully acted film", "dull and far too long", "i loved it", "awful"]


def _batch(backbone):
    data = tokenize_texts(TEXTS, np.array([1, 0, 1, 0], np.int32), backbone.tokenizer, 32)
    return next(iter(make_text_dataset(data, backbone.tokenizer, batch_size=4, training=False)))


def _trained(adaptation, steps=2):
    """A scratch 2-block BERT classifier after `steps` AdamW steps; (model, x, weights before)."""
    keras.utils.set_random_seed(0)
    backbone = load_backbone("scratch_text_encoder")
    model = build_text_classifier(backbone, num_classes=2, pooling="mean", adaptation=adaptation)
    before = {v.path: v.numpy().copy() for v in model.variables}
    x, y = _batch(backbone)
    model.compile(optimizer=keras.optimizers.AdamW(1e-2), loss="sparse_categorical_crossentropy")
    for _ in range(steps):
        model.train_on_batch(x, y)
    return model, backbone, x, before


def _changed(model, before):
    return {v.path for v in model.variables
            if v.path in before and not np.array_equal(before[v.path], v.numpy())
            and "seed_generator" not in v.path and "optimizer" not in v.path}


def test_parse_and_validate_name_the_flag_and_the_forms():
    assert Adaptation.parse("LoRA:8") == Adaptation("lora", rank=8)
    assert str(Adaptation.parse("top:2")) == "top:2"
    assert ModelConfig(adaptation="head").adaptation == Adaptation("head")
    for bad, needle in (("foo", "Unknown adaptation"), ("top:0", ">= 1"), ("top:x", "positive"),
                        ("head:2", "no number"), ("lorra:8", "lora")):
        with pytest.raises(InputError, match=needle) as err:
            Adaptation.parse(bad)
        assert "adaptation=" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InputError, match="rank"):
        Adaptation("full", rank=3).validate()


def test_params_json_keeps_the_adaptation_and_old_freeze_backbone_loads_as_head(tmp_path):
    config = ExperimentConfig(model_dir="m", model=ModelConfig(backbone="b", adaptation="lora:8"))
    config.save(tmp_path / "params.json")
    assert json.loads((tmp_path / "params.json").read_text())["model"]["adaptation"] == {
        "kind": "lora", "rank": 8, "blocks": 0}
    assert ExperimentConfig.load(tmp_path / "params.json") == config
    old = config.to_dict()
    old["model"].pop("adaptation")
    old["model"]["freeze_backbone"] = True
    assert ExperimentConfig.from_dict(old).model.adaptation == Adaptation("head")
    # A trial is the base config with its adaptation replaced.
    trial = dataclasses.replace(config.model, adaptation="top:2")
    assert trial.adaptation == Adaptation("top", blocks=2)


def test_head_trains_only_the_head():
    model, _, _, before = _trained("head")
    changed = _changed(model, before)
    assert changed and all("head_logits" in path for path in changed)


def test_top_1_trains_only_the_last_block_and_the_head():
    model, _, _, before = _trained("top:1")
    changed = _changed(model, before)
    assert any("transformer_layer_1" in path for path in changed)
    assert any("head_logits" in path for path in changed)
    assert all("transformer_layer_1" in path or "head_logits" in path for path in changed), changed


def test_lora_keeps_base_kernels_and_the_merged_export_predicts_the_same(tmp_path):
    model, backbone, x, before = _trained("lora:4", steps=3)
    layers = lora_layers(model)
    assert len(layers) == 4  # query and value of each of the 2 blocks.
    changed = _changed(model, before)
    assert any("lora_kernel_b" in path for path in changed)
    # The pretrained weights themselves never move: only adapters (and the head) train.
    assert all("lora_kernel" in path or "head_logits" in path or path.endswith("/bias")
               for path in changed), changed
    assert all(np.array_equal(before[layer._kernel.path], layer._kernel.numpy()) for layer in layers)
    expected = model.predict(x, verbose=0)

    merged = merge_lora(model)
    assert not lora_layers(merged)
    assert not [v.path for v in merged.variables if "lora" in v.path]
    np.testing.assert_allclose(merged.predict(x, verbose=0), expected, atol=1e-5)

    export_text_classifier(model, backbone, ["negative", "positive"], tmp_path / "exp",
                           model_name="m", sequence_length=32, measure_latency=False)
    folder = tmp_path / "exp" / f"m{TOKEN_IDS_SUFFIX}" / "1"
    # SavedModel variables are named by position, not layer: compare shapes and sizes.
    saved = [tuple(shape) for _, shape in tf.train.list_variables(str(folder / "variables/variables"))]
    adapter_shapes = {tuple(v.shape) for v in model.variables if "lora" in v.path}
    assert adapter_shapes and not adapter_shapes & set(saved)
    assert merged.count_params() <= sum(int(np.prod(s)) for s in saved) < model.count_params()
    served = tf.saved_model.load(str(folder))
    outputs = served.signatures["serving_default"](
        **{name: tf.cast(value, tf.int32) for name, value in x.items()})
    probabilities = next(v for k, v in outputs.items() if "prob" in k).numpy()
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)


def test_lora_adapters_survive_a_killed_and_resumed_run(tmp_path):
    steps_per_epoch, epochs, batch = 4, 2, 8
    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps_per_epoch * batch, 6)).astype("float32")
    y = (x.sum(axis=1) > 0).astype("int32")

    def epoch_dataset(epoch):
        ds = tf.data.Dataset.from_tensor_slices((x, y))
        return ds.shuffle(len(x), seed=epoch, reshuffle_each_iteration=False).batch(batch)

    def lora_model():
        keras.utils.set_random_seed(3)
        inputs = keras.Input((6,))
        hidden = keras.layers.Dense(16, activation="relu", name="base")
        outputs = keras.layers.Dense(2, activation="softmax", name="out")(hidden(inputs))
        model = keras.Model(inputs, outputs)
        hidden.enable_lora(2)  # The same Keras mechanism keras-hub's enable_lora uses.
        model.compile(optimizer=training.make_optimizer(1e-2, steps_per_epoch * epochs, 0.0),
                      loss="sparse_categorical_crossentropy")
        return model

    reference = lora_model()
    training.fit_resumable(reference, epoch_dataset, epochs=epochs,
                           steps_per_epoch=steps_per_epoch, model_dir=tmp_path / "ref", verbose=0)

    class Kill(keras.callbacks.Callback):
        def on_train_batch_end(self, batch_index, logs=None):
            if training.optimizer_step(self.model.optimizer) == 6:
                raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        training.fit_resumable(lora_model(), epoch_dataset, epochs=epochs,
                               steps_per_epoch=steps_per_epoch, model_dir=tmp_path / "run",
                               callbacks=[Kill()], backup_every_steps=2, verbose=0)
    assert list((tmp_path / "run" / "backup").glob("*.lora.npz"))
    resumed = lora_model()
    outcome = training.fit_resumable(resumed, epoch_dataset, epochs=epochs,
                                     steps_per_epoch=steps_per_epoch,
                                     model_dir=tmp_path / "run", backup_every_steps=2, verbose=0)
    # Killed at step 6, before that step's backup: resumes from the one at step 4, mid-epoch.
    assert outcome["resumed_from"]["global_step"] == 4
    for want, got in zip(lora_layers(reference), lora_layers(resumed), strict=True):
        assert np.abs(got.lora_kernel_b.numpy()).max() > 0  # Not restarted at zero.
        for a, b in zip(want.variables, got.variables, strict=True):
            np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6)


def test_top_k_on_a_cnn_trains_its_last_stages_and_lora_is_refused():
    backbone = load_backbone("scratch_cnn")  # Four stages: block1..block4.
    apply_adaptation(backbone.encoder, "top:1", pretrained=False)
    trainable = {layer.name for layer in backbone.encoder.layers if layer.trainable_weights}
    assert trainable == {"block4_conv1", "block4_bn1", "block4_conv2", "block4_bn2"}
    with pytest.raises(InputError, match="more CNN stages than the backbone has \\(4\\)"):
        apply_adaptation(backbone.encoder, "top:5", pretrained=False)
    with pytest.raises(InputError, match="no LoRA for image CNNs") as err:
        build_image_classifier(backbone, 2, adaptation="lora:8")
    assert "full, head or top:K" in str(err.value)


def test_top_k_larger_than_the_encoder_is_an_input_error():
    backbone = load_backbone("scratch_text_encoder")
    with pytest.raises(InputError, match="more transformer blocks than the backbone has \\(2\\)"):
        build_text_classifier(backbone, 2, adaptation="top:3")
