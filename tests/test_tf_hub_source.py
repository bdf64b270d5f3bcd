"""Tests for `tfhub_finetune.backbones.tf_hub_source`: HubLayer and the TF Hub loaders.

Every SavedModel here is built by the test in the TF Hub reusable format
(a tf.train.Checkpoint root with `__call__`, `variables`,
`trainable_variables`, `regularization_losses`, as tensorflow_hub's own tests
make them): nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfhub_finetune.backbones.base import ImageBackbone, TextBackbone
from tfhub_finetune.backbones.catalog import resolve_backbone
from tfhub_finetune.backbones.spec import BackboneSpec
from tfhub_finetune.backbones.tf_hub_source import HubLayer, HubTokenizer, load_tf_hub_backbone
from tfhub_finetune.errors import InputError

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULT = "TEST_RESULT "
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "movie", "was", "great", "bad",
         "film", "act", "##ing", "a", "!", "."]


# === SavedModels in the TF Hub format, built here ===


class _Dense(tf.Module):
    """y = (x W + b) * scale, dropout when training; W, b trainable, scale not."""

    def __init__(self):
        super().__init__()
        self.kernel = tf.Variable(tf.random.stateless_normal([4, 3], seed=[1, 2]), name="dense/kernel")
        self.bias = tf.Variable(tf.zeros([3]), name="dense/bias")
        self.scale = tf.Variable(2.0, trainable=False, name="scale")

    @tf.function
    def __call__(self, inputs, training=False):
        outputs = (tf.matmul(inputs, self.kernel) + self.bias) * self.scale
        if training:
            outputs = tf.nn.dropout(outputs, rate=0.5)
        return outputs


def save_dense_hub_model(path: Path) -> Path:
    module = _Dense()
    for training in (False, True):
        module.__call__.get_concrete_function(tf.TensorSpec([None, 4], tf.float32), training)
    root = tf.train.Checkpoint()
    root.module = module
    root.__call__ = module.__call__
    root.variables = [module.kernel, module.bias, module.scale]
    root.trainable_variables = [module.kernel, module.bias]
    root.regularization_losses = [
        tf.function(lambda: 0.01 * tf.reduce_sum(module.kernel**2), input_signature=[])
    ]
    tf.saved_model.save(root, str(path))
    return path


def save_image_hub_model(path: Path, *, pooled: bool = True) -> Path:
    """A flexible-size feature vector (or, pooled=False, a feature map) on [0, 1] images."""
    kernel = tf.Variable(tf.random.stateless_normal([3, 3, 3, 5], seed=[3, 4]), name="conv/kernel")

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def call(images):
        maps = tf.nn.relu(tf.nn.conv2d(images, kernel, strides=2, padding="SAME"))
        return tf.reduce_mean(maps, axis=[1, 2]) if pooled else maps

    root = tf.train.Checkpoint()
    root.__call__ = call
    root.variables = [kernel]
    root.trainable_variables = [kernel]
    tf.saved_model.save(root, str(path))
    return path


def save_batch_norm_hub_model(path: Path) -> Path:
    """x W, then batch norm: batch statistics (and a moving-average update) when training."""
    kernel = tf.Variable(tf.random.stateless_normal([4, 3], seed=[7, 8]), name="dense/kernel")
    gamma = tf.Variable(tf.ones([3]), name="bn/gamma")
    beta = tf.Variable(tf.zeros([3]), name="bn/beta")
    mean = tf.Variable(tf.zeros([3]), trainable=False, name="bn/moving_mean")
    variance = tf.Variable(tf.ones([3]), trainable=False, name="bn/moving_variance")

    @tf.function
    def call(inputs, training=False):
        h = tf.matmul(inputs, kernel)
        if training:
            batch_mean, batch_variance = tf.nn.moments(h, axes=[0])
            mean.assign(0.9 * mean + 0.1 * batch_mean)
            variance.assign(0.9 * variance + 0.1 * batch_variance)
            return tf.nn.batch_normalization(h, batch_mean, batch_variance, beta, gamma, 1e-3)
        return tf.nn.batch_normalization(h, mean, variance, beta, gamma, 1e-3)

    for training in (False, True):
        call.get_concrete_function(tf.TensorSpec([None, 4], tf.float32), training)
    root = tf.train.Checkpoint()
    root.__call__ = call
    root.variables = [kernel, gamma, beta, mean, variance]
    root.trainable_variables = [kernel, gamma, beta]
    tf.saved_model.save(root, str(path))
    return path


def save_text_hub_models(encoder_dir: Path) -> Path:
    """A BERT-API encoder and its preprocess model (tensorflow_text WordPiece, as TF Hub's)."""
    import tensorflow_text as tf_text

    embeddings = tf.Variable(
        tf.random.stateless_normal([len(VOCAB), 6], seed=[5, 6]), name="word_embeddings"
    )
    segment = tf.Variable(tf.zeros([2, 6]), name="type_embeddings")
    names = ("input_word_ids", "input_mask", "input_type_ids")
    specs = {n: tf.TensorSpec([None, None], tf.int32, name=n) for n in names}

    @tf.function
    def encode(inputs, training=False):
        mask = tf.cast(inputs["input_mask"], tf.float32)[..., None]
        sequence = tf.gather(embeddings, inputs["input_word_ids"]) + tf.gather(
            segment, inputs["input_type_ids"]
        )
        if training:
            sequence = tf.nn.dropout(sequence, rate=0.1)
        pooled = tf.tanh(tf.reduce_sum(sequence * mask, 1) / tf.reduce_sum(mask, 1))
        return {"pooled_output": pooled, "sequence_output": sequence * mask, "default": pooled}

    for training in (False, True):
        encode.get_concrete_function(specs, training)
    encoder = tf.train.Checkpoint()
    encoder.__call__ = encode
    encoder.variables = [embeddings, segment]
    encoder.trainable_variables = [embeddings, segment]
    encoder.regularization_losses = []
    tf.saved_model.save(encoder, str(encoder_dir))

    table = tf.lookup.StaticVocabularyTable(
        tf.lookup.KeyValueTensorInitializer(VOCAB, tf.range(len(VOCAB), dtype=tf.int64)),
        num_oov_buckets=1,
    )
    tokenizer = tf_text.BertTokenizer(table, lower_case=True, token_out_type=tf.int64)

    preprocess = tf.train.Checkpoint()
    preprocess.table = table
    preprocess.tokenize = tf.train.Checkpoint()
    preprocess.tokenize.__call__ = tf.function(
        lambda s: tokenizer.tokenize(s), input_signature=[tf.TensorSpec([None], tf.string)]
    )
    preprocess.tokenize.get_special_tokens_dict = tf.train.Checkpoint()
    preprocess.tokenize.get_special_tokens_dict.__call__ = tf.function(
        lambda: {
            "start_of_sequence_id": tf.constant(2),
            "end_of_segment_id": tf.constant(3),
            "padding_id": tf.constant(0),
            "mask_id": tf.constant(4),
            "vocab_size": tf.constant(len(VOCAB)),
        },
        input_signature=[],
    )
    preprocess_dir = encoder_dir.parent / (encoder_dir.name + "_preprocess")
    tf.saved_model.save(preprocess, str(preprocess_dir))
    return encoder_dir


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory) -> Path:
    return save_dense_hub_model(tmp_path_factory.mktemp("hub") / "dense")


@pytest.fixture(scope="module")
def text_hub_dir(tmp_path_factory) -> Path:
    return save_text_hub_models(tmp_path_factory.mktemp("hub") / "tiny_bert")


def _dense_classifier(handle: Path, trainable: bool = True) -> tuple[keras.Model, HubLayer]:
    inputs = keras.Input((4,), name="x")
    hub = HubLayer(str(handle), trainable=trainable, name="hub")
    outputs = keras.layers.Dense(2, name="head")(hub(inputs))
    return keras.Model(inputs, outputs), hub


def _data(n: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype("float32")
    return x, (x[:, 0] > 0).astype("int32")


def _values(hub: HubLayer) -> list[np.ndarray]:
    return [v.numpy() for v in hub.resolved_object.variables]


# === HubLayer: training, freezing, saving ===


def test_adamw_fine_tunes_the_hub_variables_in_place(hub_dir):
    keras.utils.set_random_seed(0)
    model, hub = _dense_classifier(hub_dir)
    assert [w.path for w in hub.trainable_weights] == ["hub/dense_kernel", "hub/dense_bias"]
    assert [w.path for w in hub.non_trainable_weights] == ["hub/scale"]
    # The Keras variables are the SavedModel's own tf.Variables, not copies.
    assert all(
        w.value is v for w, v in zip(hub.weights, hub.resolved_object.variables, strict=True)
    )
    before = _values(hub)
    model.compile(keras.optimizers.AdamW(1e-2), "sparse_categorical_crossentropy")
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    kernel, bias, scale = (np.abs(a - b).max() for a, b in zip(before, _values(hub), strict=True))
    assert kernel > 1e-3 and bias > 1e-3
    assert scale == 0.0  # Not in the SavedModel's trainable_variables.
    slot_names = [v.name for v in model.optimizer.variables]
    assert "hub_dense_kernel_momentum" in slot_names


def test_frozen_hub_layer_keeps_its_weights_and_runs_in_inference_mode(hub_dir):
    model, hub = _dense_classifier(hub_dir, trainable=False)
    assert hub.trainable_weights == [] and len(hub.non_trainable_weights) == 3
    before = _values(hub)
    head_before = model.get_layer("head").kernel.numpy()
    model.compile(keras.optimizers.AdamW(1e-2), "sparse_categorical_crossentropy")
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(before, _values(hub), strict=True))
    assert not np.array_equal(head_before, model.get_layer("head").kernel.numpy())
    # training=True reaches the SavedModel (dropout) only when trainable.
    batch = np.ones((64, 4), "float32")
    np.testing.assert_array_equal(hub(batch, training=True), hub(batch, training=False))
    hub.trainable = True
    assert not np.array_equal(hub(batch, training=True), hub(batch, training=False))
    assert len(hub.trainable_weights) == 2


@pytest.mark.parametrize("freeze", [False, True])
def test_freeze_batch_norm_keeps_pretrained_statistics_and_scale(tmp_path, freeze):
    path = save_batch_norm_hub_model(tmp_path / "bn")
    inputs = keras.Input((4,))
    hub = HubLayer(str(path), freeze_batch_norm=freeze, name="hub")
    model = keras.Model(inputs, keras.layers.Dense(2)(hub(inputs)))
    # Setting the model trainable again (as builders do) must not unfreeze them.
    model.trainable = True
    expected = ["hub/dense_kernel"] if freeze else ["hub/dense_kernel", "hub/bn_gamma", "hub/bn_beta"]
    assert [w.path for w in hub.trainable_weights] == expected
    before = _values(hub)
    model.compile(keras.optimizers.AdamW(1e-2), "sparse_categorical_crossentropy")
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    changed = [not np.array_equal(a, b) for a, b in zip(before, _values(hub), strict=True)]
    # kernel, gamma, beta, moving_mean, moving_variance
    assert changed == ([True, False, False, False, False] if freeze else [True] * 5)
    assert hub.get_config()["freeze_batch_norm"] is freeze


def test_regularization_losses_are_added_while_training_only(hub_dir):
    model, hub = _dense_classifier(hub_dir)
    x, _ = _data(2)
    model(x, training=False)
    assert model.losses == []
    model(x, training=True)
    kernel = hub.resolved_object.variables[0].numpy()
    np.testing.assert_allclose(float(model.losses[0]), 0.01 * np.sum(kernel**2), rtol=1e-5)


def test_save_and_reload_restores_the_fine_tuned_weights(hub_dir, tmp_path):
    keras.utils.set_random_seed(1)
    model, hub = _dense_classifier(hub_dir)
    model.compile(keras.optimizers.AdamW(1e-2), "sparse_categorical_crossentropy")
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    file = tmp_path / "model.keras"
    model.save(file)

    # Safe mode refuses a layer that loads external graph code, with a fix.
    with pytest.raises(InputError, match="safe_mode=False"):
        keras.models.load_model(file)
    reloaded = keras.models.load_model(file, safe_mode=False)
    np.testing.assert_array_equal(model.predict(x, verbose=0), reloaded.predict(x, verbose=0))
    # The fine-tuned values came from the .keras file, not from the hub handle.
    fresh = tf.saved_model.load(str(hub_dir)).variables[0].numpy()
    reloaded_kernel = reloaded.get_layer("hub").resolved_object.variables[0].numpy()
    assert not np.allclose(reloaded_kernel, fresh)
    config = reloaded.get_layer("hub").get_config()
    assert config["handle"] == str(hub_dir.resolve()) and config["trainable"] is True


def test_save_weights_round_trip_into_a_fresh_model(hub_dir, tmp_path):
    model, hub = _dense_classifier(hub_dir)
    hub.resolved_object.variables[0].assign_add(tf.ones([4, 3]))
    model.save_weights(tmp_path / "w.weights.h5")
    other, _ = _dense_classifier(hub_dir)
    other.load_weights(tmp_path / "w.weights.h5")
    x, _ = _data(4)
    np.testing.assert_array_equal(model.predict(x, verbose=0), other.predict(x, verbose=0))


def test_trains_under_mirrored_strategy_with_two_replicas(hub_dir, tmp_path):
    # Two logical CPUs can only be made before TF initialises, hence a fresh Python.
    code = f"""
        import json, numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import keras
        from tfhub_finetune.backbones.tf_hub_source import HubLayer
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            inputs = keras.Input((4,))
            hub = HubLayer({str(hub_dir)!r})
            model = keras.Model(inputs, keras.layers.Dense(2)(hub(inputs)))
            model.compile(keras.optimizers.AdamW(1e-2), "sparse_categorical_crossentropy")
        kernel = hub.resolved_object.variables[0]
        before = kernel.numpy()
        x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
        model.fit(x, (x[:, 0] > 0).astype("int32"), batch_size=8, epochs=1, verbose=0)
        replicas = [r.numpy() for r in kernel.values]
        print({RESULT!r} + json.dumps({{
            "replicas": strategy.num_replicas_in_sync,
            "variable_type": type(kernel).__name__,
            "changed": float(np.abs(kernel.numpy() - before).max()),
            "replicas_agree": float(np.abs(replicas[0] - replicas[1]).max()),
        }}))
    """
    script = tmp_path / "mirrored.py"
    script.write_text(textwrap.dedent(code))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "2",
           "CUDA_VISIBLE_DEVICES": "-1"}
    done = subprocess.run([sys.executable, str(script)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    assert lines, f"mirrored run failed (exit {done.returncode}):\n{done.stderr[-3000:]}"
    result = json.loads(lines[0][len(RESULT):])
    assert result["replicas"] == 2
    assert result["variable_type"] == "MirroredVariable"
    assert result["changed"] > 1e-3
    assert result["replicas_agree"] == 0.0


# === HubLayer: signatures and bad handles ===


def test_signature_and_output_key(tmp_path):
    kernel = tf.Variable(tf.ones([2, 2]), name="w")
    root = tf.train.Checkpoint(kernel=kernel)
    serve = tf.function(
        lambda x: {"scores": tf.matmul(x, kernel), "sum": tf.reduce_sum(x, 1)},
        input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x")],
    )
    tf.saved_model.save(root, str(tmp_path / "sig"), signatures={"serving_default": serve})
    layer = HubLayer(str(tmp_path / "sig"), signature="serving_default", output_key="scores")
    np.testing.assert_allclose(layer(np.ones((1, 2), "float32")), [[2.0, 2.0]])
    assert [w.path for w in layer.weights] == [f"{layer.name}/w"]
    with pytest.raises(InputError, match=r"no such key.*Its output is \['scores', 'sum'\]"):
        HubLayer(str(tmp_path / "sig"), signature="serving_default", output_key="logits")
    with pytest.raises(InputError, match="Available signatures: serving_default"):
        HubLayer(str(tmp_path / "sig"), signature="serve")
    with pytest.raises(InputError, match="not callable.*signature=<name>"):
        HubLayer(str(tmp_path / "sig"))


def test_bad_handles_raise_one_line_input_errors(tmp_path, hub_dir):
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "weights.h5").write_text("x")
    with pytest.raises(InputError) as err:
        HubLayer(str(tmp_path / "not_a_model"))
    message = str(err.value)
    assert "is not a SavedModel (no saved_model.pb)" in message and "weights.h5" in message
    assert "\n" not in message
    with pytest.raises(InputError, match="directory not found"):
        HubLayer(str(tmp_path / "missing"))
    with pytest.raises(InputError, match="JSON-serializable"):
        HubLayer(str(hub_dir), arguments={"f": object()})


# === load_tf_hub_backbone ===


def test_text_backbone_from_a_tf_hub_style_encoder_and_preprocess(text_hub_dir):
    spec = resolve_backbone(str(text_hub_dir))
    assert spec.source == "tf_hub" and spec.modality == "text"
    assert spec.preprocess_handle == str(text_hub_dir) + "_preprocess"
    backbone = load_tf_hub_backbone(spec)
    assert isinstance(backbone, TextBackbone)
    assert backbone.hidden_dim == 6 and backbone.lowercase is True
    tok = backbone.tokenizer
    assert (tok.start_id, tok.end_id, tok.pad_id, tok.vocabulary_size) == (2, 3, 0, len(VOCAB))
    # [batch, words, pieces] merged to [batch, pieces]: "acting" is act ##ing.
    ids = tok.tokenize(tf.constant(["The movie was GREAT!", "bad acting"]))
    assert ids.dtype == tf.int32 and ids.to_list() == [[5, 6, 7, 8, 14], [9, 11, 12]]
    # Usable inside tf.data, where our text pipeline tokenizes.
    mapped = tf.data.Dataset.from_tensor_slices(["a film."]).batch(1).map(tok.tokenize)
    assert next(iter(mapped)).to_list() == [[13, 10, 15]]

    encoder = backbone.encoder
    assert sorted(encoder.input) == ["padding_mask", "segment_ids", "token_ids"]
    batch = {
        "token_ids": tf.constant([[2, 5, 6, 3, 0]]),
        "padding_mask": tf.constant([[1, 1, 1, 1, 0]]),
        "segment_ids": tf.zeros([1, 5], tf.int32),
    }
    ours = encoder(batch)
    theirs = tf.saved_model.load(str(text_hub_dir))(
        {"input_word_ids": batch["token_ids"], "input_mask": batch["padding_mask"],
         "input_type_ids": batch["segment_ids"]}
    )
    assert sorted(ours) == ["pooled_output", "sequence_output"]
    np.testing.assert_allclose(ours["pooled_output"], theirs["pooled_output"], atol=1e-6)
    np.testing.assert_allclose(ours["sequence_output"], theirs["sequence_output"], atol=1e-6)
    assert len(encoder.trainable_weights) == 2


def test_image_backbone_detects_the_feature_width(tmp_path):
    path = save_image_hub_model(tmp_path / "features")
    backbone = load_tf_hub_backbone(resolve_backbone(str(path)))
    assert isinstance(backbone, ImageBackbone)
    assert backbone.feature_dim == 5 and backbone.pixel_convention == "unit"
    assert backbone.image_size == 224  # Flexible model: the catalog's default side.
    images = np.random.default_rng(0).uniform(size=(2, 40, 30, 3)).astype("float32")
    np.testing.assert_allclose(
        backbone.encoder(images), tf.saved_model.load(str(path))(images), atol=1e-6
    )


def test_wrong_kinds_of_model_raise_clear_input_errors(tmp_path, hub_dir, text_hub_dir):
    maps = save_image_hub_model(tmp_path / "maps", pooled=False)
    with pytest.raises(InputError, match=r"does not return a feature vector.*output_shape=\[1, 112, 112, 5\]"):
        load_tf_hub_backbone(resolve_backbone(str(maps)))

    as_text = BackboneSpec(name="dense", source="tf_hub", handle=str(hub_dir), modality="text",
                           preprocess_handle=str(text_hub_dir) + "_preprocess")
    with pytest.raises(InputError) as err:
        load_tf_hub_backbone(as_text)
    assert "does not take BERT-style text-encoder inputs" in str(err.value)
    assert "found='float32[None, 4]'" in str(err.value)
    assert "input_word_ids, input_mask, input_type_ids" in str(err.value)

    with pytest.raises(InputError, match="needs its preprocess model.*<encoder>_preprocess"):
        load_tf_hub_backbone(as_text.replace(preprocess_handle=None))
    with pytest.raises(InputError, match="lacks the TF Hub preprocessor API.*tokenize"):
        HubTokenizer(str(hub_dir))
    with pytest.raises(InputError, match="Not a TF Hub backbone"):
        load_tf_hub_backbone(as_text.replace(source="keras_hub"))
