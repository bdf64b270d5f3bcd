"""Image backbones and `build_image_classifier` on the real shared weights."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import require_shared_path
from tfhub_finetune.backbones.catalog import resolve_backbone
from tfhub_finetune.backbones.image_source import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    load_image_backbone,
    pixel_convention_of,
)
from tfhub_finetune.builders.image_classifier import (
    build_image_classifier,
    set_backbone_trainable,
)
from tfhub_finetune.data.image import load_image_dataset
from tfhub_finetune.errors import InputError

SMALL = 64  # Pixels; enough for a real forward/backward pass, cheap on 2 CPU cores.


@pytest.fixture(scope="module")
def lite0():
    return load_image_backbone(require_shared_path("weights/efficientnet_lite0"))


@pytest.fixture(scope="module")
def mobilenet_dir():
    return require_shared_path("weights/mobilenet_v2_1.0_224")


def _random_pixels(count: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3)).astype("uint8")


def _weights(layer: keras.Layer) -> list[np.ndarray]:
    return [np.array(w) for w in layer.get_weights()]


def _fit_one_step(model: keras.Model, size: int) -> None:
    # Eager: tracing a backbone's train step costs ~4x the step itself on CPU,
    # and the weight updates under test are the same in both modes.
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss="sparse_categorical_crossentropy",
        run_eagerly=True,
    )
    model.fit(_random_pixels(4, size), np.array([0, 1, 0, 1]), batch_size=4, epochs=1, verbose=0)


def test_shared_presets_resolve_with_their_pixel_conventions(lite0, mobilenet_dir):
    assert (lite0.image_size, lite0.pixel_convention, lite0.feature_dim) == (224, "symmetric", 1280)
    mobilenet = load_image_backbone(str(mobilenet_dir))
    assert mobilenet.pixel_convention == "torchvision" and mobilenet.feature_dim == 1280
    scratch = load_image_backbone("scratch_cnn")
    assert (scratch.image_size, scratch.pixel_convention, scratch.feature_dim) == (128, "unit", 256)
    assert pixel_convention_of(
        [0.017124753831663668, 0.01750700280112045, 0.017429193899782133],
        [-2.1179039301310043, -2.0357142857142856, -1.8044444444444445],
    ) == ("torchvision")
    assert pixel_convention_of(1 / 255, None) == "unit" and pixel_convention_of(2.0, 0.0) is None


def test_lite0_features_give_a_linear_probe_well_above_chance(lite0, tmp_path):
    root = require_shared_path("data/hymenoptera")
    for split, per_class in (("train", 30), ("val", 20)):
        rows = [
            f"{path},{name}"
            for name in ("ants", "bees")
            for path in sorted((root / split / name).iterdir())[:per_class]
        ]
        (tmp_path / f"{split}.csv").write_text("\n".join(rows) + "\n")
    model = build_image_classifier(lite0, 2, adaptation="head")
    normalise, encoder = model.get_layer("pixel_normalization"), model.get_layer(lite0.encoder.name)

    def features(split, names=None):
        data = load_image_dataset(tmp_path / f"{split}.csv", image_size=224, label_names=names)
        pairs = [(encoder(normalise(x)).numpy(), y.numpy()) for x, y in data.dataset]
        return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])

    x_train, y_train = features("train")
    x_val, y_val = features("val", ["ants", "bees"])
    # Ridge regression on standardised features: a closed-form linear probe.
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    design = np.c_[(x_train - mean) / std, np.ones(len(x_train))]
    weights = np.linalg.solve(
        design.T @ design + 100.0 * np.eye(design.shape[1]), design.T @ (2.0 * y_train - 1.0)
    )
    scores = np.c_[(x_val - mean) / std, np.ones(len(x_val))] @ weights
    accuracy = float(((scores > 0) == (y_val == 1)).mean())
    print(f"lite0 linear probe accuracy on 40 val images: {accuracy:.3f}")
    assert accuracy >= 0.8, f"linear probe accuracy {accuracy:.3f} (chance 0.5)"


def test_frozen_step_keeps_backbone_then_fine_tuning_step_trains_all_but_batchnorm(lite0):
    model = build_image_classifier(lite0, 2, image_size=SMALL, adaptation="head")
    encoder, head = model.get_layer(lite0.encoder.name), model.get_layer("head_logits")
    frozen, head_before = _weights(encoder), _weights(head)
    _fit_one_step(model, SMALL)
    assert all(np.array_equal(a, b) for a, b in zip(frozen, _weights(encoder), strict=True))
    assert not np.allclose(head_before[0], head.get_weights()[0])

    set_backbone_trainable(encoder, True)  # Fine-tuning after the head-only phase.
    batch_norm = [w.path for w in encoder.weights if "_bn/" in w.path]
    assert batch_norm and not {w.path for w in encoder.trainable_weights} & set(batch_norm)
    before = {w.path: np.array(w) for w in encoder.weights}
    _fit_one_step(model, SMALL)
    after = {w.path: np.array(w) for w in encoder.weights}
    assert not np.allclose(before["stem_conv/kernel"], after["stem_conv/kernel"])
    assert all(np.array_equal(before[path], after[path]) for path in batch_norm)


@pytest.mark.parametrize("which", ["lite0", "mobilenet"])
def test_saved_model_reloads_with_identical_predictions(which, lite0, mobilenet_dir, tmp_path):
    backbone = lite0 if which == "lite0" else str(mobilenet_dir)
    model = build_image_classifier(backbone, 3, image_size=SMALL)
    pixels = _random_pixels(3, SMALL, seed=1)
    expected = model(pixels).numpy()
    model.save(tmp_path / "model.keras")
    reloaded = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_array_equal(reloaded(pixels).numpy(), expected)
    np.testing.assert_allclose(expected.sum(axis=1), 1.0, rtol=1e-5)


def test_model_applies_each_pixel_convention_to_raw_pixels(lite0, mobilenet_dir):
    white_black = np.stack([np.full((SMALL, SMALL, 3), 255.0), np.zeros((SMALL, SMALL, 3))])

    def normalised(backbone):
        model = build_image_classifier(backbone, 2, image_size=SMALL)
        return model.get_layer("pixel_normalization")(white_black).numpy()[:, 0, 0]

    np.testing.assert_allclose(normalised(lite0), [[1, 1, 1], [-1, -1, -1]], atol=1e-6)
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    np.testing.assert_allclose(
        normalised(str(mobilenet_dir)), [(1 - mean) / std, -mean / std], atol=1e-5
    )
    np.testing.assert_allclose(normalised("scratch_cnn"), [[1, 1, 1], [0, 0, 0]], atol=1e-6)


def test_scratch_cnn_learns_and_trains_its_batchnorm():
    keras.utils.set_random_seed(0)
    model = build_image_classifier("scratch_cnn", 2, image_size=32, dropout=0.0)
    moving = next(w for w in model.weights if "moving_mean" in w.path)
    before = np.array(moving)
    # Horizontal vs vertical stripes under noise: a shape cue a working CNN must learn.
    labels = np.array([0, 1] * 24)
    stripes = np.broadcast_to((np.arange(32) // 4 % 2 * 160.0)[:, None, None], (32, 32, 3))
    pixels = np.where(labels[:, None, None, None] == 1, stripes, stripes.transpose(1, 0, 2))
    pixels = (pixels + _random_pixels(48, 32) * (96 / 256)).astype("float32")
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=False,
    )
    # 60 steps: enough for the BatchNorm moving statistics (momentum 0.9) to
    # forget their initial values, so evaluation-mode accuracy means something.
    model.fit(pixels, labels, batch_size=4, epochs=5, verbose=0)
    assert not np.allclose(before, np.array(moving))
    assert model.evaluate(pixels, labels, verbose=0)[1] == 1.0


def test_heads_and_mixed_precision_output_float32(lite0):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_image_classifier("scratch_cnn", 4, task="multi_label", image_size=32)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.output.dtype == "float32"
    assert model.get_layer("pixel_normalization").compute_dtype == "float16"
    scores = build_image_classifier("scratch_cnn", 1, task="regression", image_size=32)
    assert scores.output_names == ["scores"] or scores.layers[-1].name == "scores"


def test_bad_arguments_are_one_line_input_errors(lite0):
    text = require_shared_path("weights/paraphrase_minilm_l3_v2")
    with pytest.raises(InputError, match="text encoder, not an image backbone"):
        build_image_classifier(str(text), 2)
    with pytest.raises(InputError, match="at least 32 pixels"):
        build_image_classifier(lite0, 2, image_size=16)
    with pytest.raises(InputError, match="at least 2 classes"):
        build_image_classifier(lite0, 1)
    with pytest.raises(InputError, match="Unknown task"):
        build_image_classifier(lite0, 2, task="single")
    with pytest.raises(InputError, match="Backbone directory not found"):
        build_image_classifier("./no/such/preset", 2)


def test_tf_hub_image_savedmodel_is_delegated_to_the_hub_loader(tmp_path):
    class FeatureVector(tf.train.Checkpoint):
        """A Reusable SavedModel (the TF Hub TF2 format) of an image feature vector."""

        def __init__(self):
            super().__init__()
            self.kernel = tf.Variable(tf.random.stateless_normal((3, 8), seed=(1, 2)))
            self.variables = [self.kernel]
            self.trainable_variables = [self.kernel]
            self.regularization_losses = []

        @tf.function
        def __call__(self, images, training=False):
            del training  # No dropout or batch norm; the flag is part of the format.
            return tf.reduce_mean(tf.einsum("bhwc,cd->bhwd", images, self.kernel), axis=[1, 2])

    module = FeatureVector()
    for training in (False, True):  # TF Hub models carry one trace per training value.
        module.__call__.get_concrete_function(
            tf.TensorSpec([None, None, None, 3], tf.float32), training
        )
    handle = tmp_path / "tiny_feature_vector"
    tf.saved_model.save(module, str(handle))
    spec = resolve_backbone(str(handle))
    assert (spec.source, spec.modality) == ("tf_hub", "image")
    backbone = load_image_backbone(spec)
    assert backbone.feature_dim == 8 and backbone.pixel_convention == "unit"
    model = build_image_classifier(backbone, 2, image_size=SMALL)
    assert model.predict(_random_pixels(2, SMALL), verbose=0).shape == (2, 2)
