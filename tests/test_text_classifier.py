import keras
import numpy as np
import pytest
import tensorflow as tf

from tfhub_finetune.backbones import load_backbone
from tfhub_finetune.builders import build_text_classifier
from tfhub_finetune.data.text import make_text_dataset, tokenize_texts
from tfhub_finetune.errors import InputError

TEXTS = ["a gripping , beautifully acted film", "dull and far too long", "i loved it", "awful"]


@pytest.fixture(scope="module")
def minilm_full():
    return load_backbone("minilm_l6_h384")


def _batch(backbone, labels=(1, 0, 1, 0)):
    data = tokenize_texts(TEXTS, np.array(labels, np.int32), backbone.tokenizer, 32)
    return next(iter(make_text_dataset(data, backbone.tokenizer, batch_size=4, training=False)))


def test_truncation_keeps_the_first_layers_pretrained_weights(minilm_full):
    small = load_backbone("minilm_l6_h384@layers=2")
    names = [layer.name for layer in small.encoder.layers if layer.weights]
    assert "transformer_layer_1" in names and "transformer_layer_2" not in names
    for name in names:
        for got, want in zip(
            small.encoder.get_layer(name).get_weights(),
            minilm_full.encoder.get_layer(name).get_weights(),
            strict=True,
        ):
            np.testing.assert_array_equal(got, want)
    assert small.encoder.count_params() < minilm_full.encoder.count_params()
    with pytest.raises(InputError, match="at most|1 <= k <= 6"):
        load_backbone("minilm_l6_h384@layers=9")


def test_pretrained_tokenizer_gives_bert_ids(minilm_full):
    ids = minilm_full.tokenizer.tokenize(tf.constant(["hello world"])).to_list()
    assert ids == [[7592, 2088]]  # bert-base-uncased vocabulary.
    assert (minilm_full.tokenizer.start_id, minilm_full.tokenizer.end_id) == (101, 102)


def test_a_training_step_changes_backbone_and_head_weights(minilm_l3_dir):
    backbone = load_backbone(str(minilm_l3_dir))
    model = build_text_classifier(backbone, num_classes=2, pooling="mean")
    x, y = _batch(backbone)
    before = {w.path: w.numpy().copy() for w in model.trainable_weights}
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="sparse_categorical_crossentropy")
    model.train_on_batch(x, y)
    changed = {w.path for w in model.trainable_weights if not np.array_equal(before[w.path], w.numpy())}
    assert any("transformer_layer_0" in p for p in changed)
    assert any("head_logits" in p for p in changed)


def test_frozen_backbone_trains_only_the_head(minilm_l3_dir):
    backbone = load_backbone(str(minilm_l3_dir))
    model = build_text_classifier(backbone, num_classes=2, adaptation="head")
    encoder_before = [w.copy() for w in backbone.encoder.get_weights()]
    x, y = _batch(backbone)
    model.compile(optimizer=keras.optimizers.AdamW(1e-2), loss="sparse_categorical_crossentropy")
    model.train_on_batch(x, y)
    for got, want in zip(backbone.encoder.get_weights(), encoder_before, strict=True):
        np.testing.assert_array_equal(got, want)
    assert all("head" in w.path for w in model.trainable_weights)


def test_saved_model_reloads_to_identical_predictions(tmp_path, minilm_l3_dir):
    backbone = load_backbone(str(minilm_l3_dir))
    model = build_text_classifier(backbone, num_classes=3, pooling="cls")
    x, _ = _batch(backbone, labels=(0, 1, 2, 0))
    path = tmp_path / "m.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


@pytest.mark.parametrize("task, num_classes, name", [("multi_label", 4, "probabilities"),
                                                     ("regression", 1, "scores")])
def test_heads_for_every_task(task, num_classes, name):
    backbone = load_backbone("scratch_text_encoder")
    model = build_text_classifier(backbone, num_classes=num_classes, task=task)
    out = model.predict(_batch(backbone)[0], verbose=0)
    assert out.shape == (4, num_classes)
    assert model.layers[-1].name == name
    if task == "multi_label":
        assert ((out > 0) & (out < 1)).all()


def test_scratch_baseline_shares_the_tokenizer_but_not_the_weights(minilm_full):
    scratch = load_backbone("scratch_text_encoder")
    assert scratch.tokenizer.vocabulary_size == minilm_full.tokenizer.vocabulary_size
    assert scratch.encoder.count_params() < 0.3 * minilm_full.encoder.count_params()
