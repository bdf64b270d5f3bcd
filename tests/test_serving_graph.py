"""The export's lean BERT serving graph: the Keras call's answers, weights saved once, a safe fallback.

Real MiniLM-L3 weights (`../shared/weights`), real SST-2 dev sentences. Speed is
measured side by side in `benchmarks/` (`ours` against `ours_keras_graph`).
"""
from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfhub_finetune import export, serving_graph
from tfhub_finetune.backbones import load_backbone
from tfhub_finetune.builders.text_classifier import build_text_classifier
from tfhub_finetune.builders.token_classifier import build_token_classifier
from tfhub_finetune.data.labels import LabelVocabulary
from tfhub_finetune.data.text import make_text_dataset, tokenize_texts

SEQUENCE_LENGTH = 64


@pytest.fixture(scope="module")
def backbone(minilm_l3_dir):
    return load_backbone(str(minilm_l3_dir))


@pytest.fixture(scope="module")
def batch(backbone, sst2_dir) -> dict[str, tf.Tensor]:
    """32 dev sentences of mixed lengths, padded to the longest, as serving sends them."""
    lines = (sst2_dir / "dev.tsv").read_text("utf-8").splitlines()[1:33]
    texts = [line.split("\t")[0] for line in lines]
    data = tokenize_texts(texts, np.zeros(len(texts), np.int32), backbone.tokenizer,
                          SEQUENCE_LENGTH)
    inputs, _ = next(iter(make_text_dataset(data, backbone.tokenizer, batch_size=len(texts),
                                            training=False)))
    assert len(set(np.asarray(inputs["padding_mask"]).sum(axis=1))) > 5  # Mixed lengths.
    return inputs


def _with_policy(policy: str, build):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        return build()
    finally:
        keras.config.set_dtype_policy(previous)


def _trained_looking(model: keras.Model) -> keras.Model:
    """The head's zero-initialised bias and small kernel would hide a wrong pooled input."""
    rng = np.random.default_rng(1)
    head = model.get_layer("head_logits")
    head.kernel.assign(rng.normal(0, 1.0, head.kernel.shape).astype(np.float32))
    head.bias.assign(rng.normal(0, 0.5, head.bias.shape).astype(np.float32))
    return model


@pytest.mark.parametrize("pooling,task", [("mean", "single_label"), ("cls", "multi_label"),
                                          ("pooler", "regression")])
def test_the_lowered_call_answers_as_the_keras_call(backbone, batch, pooling, task):
    """Every pooling and head the builder makes, on real weights and sentences: float32
    answers within 1e-5 of `model(...)`, from copies that leave the model as it was."""
    model = _trained_looking(build_text_classifier(backbone, 3, pooling=pooling, task=task))
    expected = model(batch, training=False).numpy()
    lowered = serving_graph.lower_text_model(model)
    assert lowered is not None and lowered.compute_dtype == "float32"
    # Summation order only: within 1e-5 relative to the output's size (regression's ~10).
    assert lowered.max_difference <= 1e-5 * (1.0 + np.abs(expected).max())
    actual = tf.function(lowered)(batch).numpy()
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=1e-5)
    assert np.ptp(actual, axis=0).max() > 1e-2  # The rows differ: a real answer, not a constant.
    # The lowered weights are copies: training the model further does not reach them.
    layer = backbone.encoder.transformer_layers[0]._feedforward_output_dense
    kept = layer.kernel.numpy()
    try:
        layer.kernel.assign(kept * 0.0)
        np.testing.assert_allclose(tf.function(lowered)(batch).numpy(), actual, atol=1e-6)
    finally:
        layer.kernel.assign(kept)


def test_slices_compute_the_same_function_from_the_same_weights(backbone, batch):
    """Blocks cut into independent parts (heads and inner units) answer as the uncut
    lowering and the Keras call; the weights are cut, not copied; a count that does not
    divide the heads and inner units falls to the largest one that does."""
    model = _trained_looking(build_text_classifier(backbone, 3, pooling="mean"))
    expected = model(batch, training=False).numpy()
    sizes = {}
    for asked, used in [(1, 1), (2, 2), (5, 4)]:  # MiniLM: 12 heads, 1536 inner units.
        lowered = serving_graph.lower_text_model(model, slices=asked)
        assert lowered.slices == used
        np.testing.assert_allclose(tf.function(lowered)(batch).numpy(), expected, atol=1e-5)
        sizes[used] = sum(int(np.prod(v.shape)) for v in lowered.variables)
    assert len(set(sizes.values())) == 1, sizes
    assert serving_graph.lower_text_model(model).slices == serving_graph.SERVING_SLICES


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_one_row_float64_attention_answers_as_the_keras_call(backbone, batch, compute_dtype):
    """The one-row graph (attention products in float64) answers each sentence alone as
    the Keras call does, padded rows and rows past its length limit included; a batch of
    several rows is the compute-dtype graph's answer, unchanged."""
    model = _trained_looking(build_text_classifier(backbone, 3, pooling="mean"))
    expected = model(batch, training=False).numpy()
    lowered = serving_graph.lower_text_model(model, compute_dtype)
    tolerance = 1e-5 if compute_dtype == "float32" else 0.05
    lengths = np.asarray(batch["padding_mask"]).sum(axis=1)
    up_to = int(np.median(lengths))  # Rows on both sides of the limit.
    call = tf.function(lowered.call)
    for row in [*np.argsort(lengths)[[0, len(lengths) // 2, -1]]]:
        # Sliced to the row's own length, as the serving chunks send it, and padded.
        for width in (int(lengths[row]), batch["token_ids"].shape[1]):
            one = {name: value[row:row + 1, :width] for name, value in batch.items()}
            np.testing.assert_allclose(call(one, up_to).numpy()[0], expected[row],
                                       atol=tolerance)
    row = int(np.argmin(lengths))
    shortest = {name: value[row:row + 1, :int(lengths[row])] for name, value in batch.items()}
    # It is another graph (float64 rounds otherwise), and only for one row.
    assert not np.array_equal(call(shortest, up_to).numpy(), call(shortest, 0).numpy())
    np.testing.assert_array_equal(call(batch, up_to).numpy(), call(batch, 0).numpy())
    lowered.float64_attention_up_to = up_to  # What `__call__` (the export) serves.
    np.testing.assert_array_equal(tf.function(lowered)(batch).numpy(), call(batch, 0).numpy())


def test_a_token_classifier_lowers_too(backbone, batch):
    model = build_token_classifier(backbone, 5)
    lowered = serving_graph.lower_text_model(model)
    assert lowered is not None
    np.testing.assert_allclose(tf.function(lowered)(batch).numpy(),
                               model(batch, training=False).numpy(), atol=1e-5)


def test_a_bf16_model_served_as_trained_stores_bf16_kernels_and_stays_close(
        minilm_l3_dir, batch):
    """Under `serving_precision="as_trained"` a mixed_bfloat16 model's lowering keeps its
    kernels in bf16 (cast once, not per call) and answers as the Keras bf16 call does,
    within bf16's rounding; exported in float32, the same model lowers to float32."""
    model = _with_policy("mixed_bfloat16", lambda: _trained_looking(
        build_text_classifier(load_backbone(str(minilm_l3_dir)), 2, pooling="mean")))
    float32 = np.asarray(model(batch, training=False))
    with export.serving_precision_scope(model, "as_trained"):
        lowered = serving_graph.lower_text_model(model)
    assert lowered is not None and lowered.compute_dtype == "bfloat16"
    assert {v.dtype for v in lowered.variables} == {tf.float32, tf.bfloat16}
    np.testing.assert_allclose(tf.function(lowered)(batch).numpy(), float32, atol=0.05)
    with export.serving_precision_scope(model):
        in_float32 = serving_graph.lower_text_model(model)
        expected = model(batch, training=False).numpy()
    assert in_float32.compute_dtype == "float32"
    assert {v.dtype for v in in_float32.variables} == {tf.float32}
    np.testing.assert_allclose(tf.function(in_float32)(batch).numpy(), expected, atol=1e-5)


def test_models_it_does_not_know_serve_the_keras_call(minilm_l3_dir, backbone, batch,
                                                    monkeypatch, caplog):
    """Not recognised (LoRA adapters, a model on other inputs) or not matching on the
    probe batch: None, and the export serves the Keras call."""
    # LoRA changes the encoder in place: its own backbone, not the shared fixture.
    lora = build_text_classifier(load_backbone(str(minilm_l3_dir)), 2, adaptation="lora:4")
    assert serving_graph.lower_text_model(lora) is None
    inputs = keras.Input((4,))
    assert serving_graph.lower_text_model(keras.Model(inputs, keras.layers.Dense(2)(inputs))) \
        is None

    model = build_text_classifier(backbone, 2, pooling="mean")
    monkeypatch.setitem(serving_graph.TOLERANCE, "float32", -1.0)  # Nothing can match.
    with caplog.at_level("WARNING", logger="tfhub_finetune.serving_graph"):
        assert serving_graph.lower_text_model(model) is None
    assert "serving the Keras call instead" in caplog.text


def test_the_export_saves_the_lowered_weights_once_and_says_which_graph_serves(
        tmp_path, backbone, batch):
    """The lean export predicts as the Keras-call export, reloaded in this process; it
    saves the lowered copies instead of the model's variables (not both), and its card
    names the graph."""
    model = _trained_looking(build_text_classifier(backbone, 2, pooling="mean"))
    labels = LabelVocabulary(["negative", "positive"])
    served = {}
    for lean in (True, False):
        raw = Path(export.export_text_classifier(
            model, backbone, labels, tmp_path / str(lean), model_name="m",
            sequence_length=SEQUENCE_LENGTH, measure_latency=False, lean_serving_graph=lean))
        card = json.loads((raw / "assets.extra" / "model_card.json").read_text())
        ids = tmp_path / str(lean) / "m_token_ids" / "1"
        size = sum(f.stat().st_size for f in (ids / "variables").iterdir())
        answer = tf.saved_model.load(str(ids)).signatures["serving_default"](**batch)
        served[lean] = (card["preprocessing"]["serving_graph"], size,
                        answer["probabilities"].numpy())
    assert served[True][0]["kind"] == "lean_bert" and served[False][0] == {"kind": "keras"}
    np.testing.assert_allclose(served[True][2], served[False][2], atol=1e-5)
    # Same float32 weights, saved once: within a few percent (the fused QKV is one tensor).
    assert served[True][1] <= 1.05 * served[False][1]


def test_auto_serving_precision_serves_the_dtype_it_timed_faster(tmp_path, backbone, batch):
    """`serving_precision="auto"` times both lowerings on this CPU (which one wins depends
    on the CPU: bf16 hardware or not), serves the one its rule picks from the figures it
    recorded, and the reloaded model answers within that dtype's tolerance."""
    model = _trained_looking(build_text_classifier(backbone, 2, pooling="mean"))
    expected = model(batch, training=False).numpy()
    raw = Path(export.export_text_classifier(
        model, backbone, LabelVocabulary(["negative", "positive"]), tmp_path, model_name="m",
        sequence_length=SEQUENCE_LENGTH, measure_latency=False, serving_precision="auto"))
    card = json.loads((raw / "assets.extra" / "model_card.json").read_text())
    graph = card["preprocessing"]["serving_graph"]
    ms = graph["timing"]["median_ms"]
    assert all(ms[dtype][shape] > 0 for dtype in ("float32", "bfloat16")
               for shape in ("one", "batch"))
    bf16_faster = (ms["bfloat16"]["batch"] * serving_graph.BF16_MARGIN <= ms["float32"]["batch"]
                   and ms["bfloat16"]["one"] <= ms["float32"]["one"] * serving_graph.BF16_ONE_SLACK)
    chosen = "bfloat16" if bf16_faster else "float32"
    assert card["compute_dtype"] == chosen and "compute_dtype" not in graph  # Said once.
    # The one-row float64 form serves up to the longest length at which it, and every
    # shorter one, timed faster.
    one_row = graph["timing"]["float64_attention"]["median_ms"]
    up_to = 0
    for length in serving_graph.ONE_ROW_LENGTHS:
        if one_row["float64"][str(length)] >= one_row["compute"][str(length)]:
            break
        up_to = length
    assert graph["float64_attention_up_to"] == up_to
    ids = tmp_path / "m_token_ids" / "1"
    served = tf.saved_model.load(str(ids)).signatures["serving_default"](**batch)
    np.testing.assert_allclose(served["probabilities"].numpy(), expected,
                               atol=0.05 if chosen == "bfloat16" else 1e-5)
