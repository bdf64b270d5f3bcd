"""Tests for tfhub_finetune.selection.profile (tiny models; two child processes)."""

from __future__ import annotations

import dataclasses
import json

import keras
import pytest
import tensorflow as tf

from tfhub_finetune.errors import InputError
from tfhub_finetune.selection import profile as profile_lib
from tfhub_finetune.selection.profile import (
    ProfileOptions,
    ProfileResult,
    count_flops,
    profile_in_subprocess,
    profile_model,
)

# Small enough that the timing loops end on `min_runs`/`min_seconds` quickly.
FAST = ProfileOptions(
    serving_batch_size=8,
    train_batch_size=8,
    warmup_runs=3,
    min_runs=10,
    max_runs=400,
    min_seconds=0.2,
)
SEQUENCE_SHAPES = {"token_ids": (16,), "padding_mask": (16,), "segment_ids": (16,)}


# --- Builders the child imports by path (`__name__` depends on pytest's import mode). ---


def build_dense(input_dim: int = 64, hidden: int = 32, num_classes: int = 10) -> keras.Model:
    inputs = keras.Input((input_dim,), name="features")
    x = keras.layers.Dense(hidden, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Dense(num_classes, activation="softmax")(x))


def build_text(vocabulary_size: int = 200, dim: int = 8) -> keras.Model:
    token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    padding_mask = keras.Input((None,), dtype="int32", name="padding_mask")
    segment_ids = keras.Input((None,), dtype="int32", name="segment_ids")
    x = keras.layers.Embedding(vocabulary_size, dim)(token_ids)
    x = x + keras.layers.Embedding(2, dim)(segment_ids)
    x = keras.layers.GlobalAveragePooling1D()(x, mask=padding_mask)
    inputs = {"token_ids": token_ids, "padding_mask": padding_mask, "segment_ids": segment_ids}
    return keras.Model(inputs, keras.layers.Dense(2)(x))


def build_broken() -> keras.Model:
    raise ValueError("weights file is corrupt")


# --- Tests ---


@pytest.fixture(scope="module")
def dense_profile() -> ProfileResult:
    return profile_in_subprocess(
        f"{__name__}:build_dense", {"hidden": 32}, (64,), name="dense", options=FAST
    )


def test_subprocess_profile_records_every_figure(dense_profile):
    r = dense_profile
    assert r.error is None, r.error
    assert r.name == "dense" and r.isolated_process
    assert r.inference_measured_on == "loaded SavedModel (fresh process)"
    assert r.params == build_dense().count_params() == 2410
    assert 0 < r.latency_p50_ms <= r.latency_p95_ms
    assert r.latency_runs >= FAST.min_runs
    # Every figure the serving child measured reaches the merged result.
    assert r.latency_wall_p50_ms == r.latency_p50_ms and r.latency_cpu_p50_ms is not None
    assert r.load_average is not None and r.cpu_count >= 1
    assert r.throughput_eps > 0 and r.serving_batch_size == 8
    assert r.peak_infer_memory_mb > 0 and r.peak_train_memory_mb > 0
    assert r.baseline_memory_mb > 100  # TensorFlow itself is resident before the model.
    assert 2410 * 4 / 2**20 < r.saved_model_mb < 5  # Weights once, plus the graph.
    assert r.device and r.device_type in ("CPU", "GPU") and r.memory_method
    assert r.input_shapes == {"features": [64]}
    assert r.model_latency_p50_ms is None  # The served signature is the network itself.
    assert r.builder == f"{__name__}:build_dense"
    assert r.builder_kwargs == {"hidden": 32}


def test_flops_match_hand_count(dense_profile):
    # 2 FLOPs per multiply-add, plus one per bias add: the profiler's MatMul
    # and BiasAdd counts. It also counts Softmax at 5 per element (50 here)
    # and nothing for ReLU.
    hand = 2 * (64 * 32 + 32 * 10) + (32 + 10)
    assert dense_profile.flops_per_example == pytest.approx(hand, rel=0.10)
    assert dense_profile.flops_per_example == hand + 5 * 10


def test_flops_are_per_example_at_any_batch():
    model = build_dense()
    spec = tf.TensorSpec((None, 64), tf.float32, name="features")
    assert count_flops(model, spec, batch_size=1) == count_flops(model, spec, batch_size=16)


def test_failing_builder_is_recorded_not_raised(tmp_path):
    # The child's entry point, run here: a third child process would cost
    # ~10 s of a shared CPU for the same code path.
    request = {
        "mode": "build",
        "name": "broken",
        "builder": f"{__name__}:build_broken",
        "builder_kwargs": {},
        "input_shapes": None,
        "input_dtypes": None,
        "options": dataclasses.asdict(FAST),
    }
    (tmp_path / "request.json").write_text(json.dumps(request))
    assert profile_lib._child_main([tmp_path / "request.json", tmp_path / "result.json"]) == 0
    result = ProfileResult.from_dict(json.loads((tmp_path / "result.json").read_text()))
    assert result.error.startswith("build: ValueError: weights file is corrupt")
    assert result.params is None and result.latency_p50_ms is None
    assert result.isolated_process and not result.ok


def test_a_killed_child_is_described():
    text = profile_lib._describe_exit(-9, "Traceback ...\nMemoryError")
    assert text.startswith("child process killed by SIGKILL (likely out of memory)")
    assert "MemoryError" in text


def test_in_process_profile_of_named_inputs():
    model = build_text()
    options = ProfileOptions(
        serving_batch_size=4,
        train_batch_size=4,
        warmup_runs=2,
        min_runs=5,
        min_seconds=0.05,
        measure_saved_model=False,
    )
    result = profile_model(model, SEQUENCE_SHAPES, name="text", options=options)
    assert result.error is None, result.error
    assert result.params == model.count_params()
    assert result.input_shapes == {k: list(v) for k, v in SEQUENCE_SHAPES.items()}
    assert result.flops_per_example > 0 and result.saved_model_mb is None
    assert not result.isolated_process


def test_unknown_sequence_length_needs_input_shapes():
    with pytest.raises(InputError, match="unknown dimensions"):
        profile_model(build_text(), options=FAST)
    with pytest.raises(InputError, match="do not match"):
        profile_model(build_text(), {"token_ids": (16,)}, options=FAST)


def test_out_of_memory_halves_the_serving_batch():
    specs = tf.TensorSpec((None, 3), tf.float32, name="x")

    def forward(x):
        if x.shape[0] > 4:
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating")
        return x * 2.0

    options = ProfileOptions(serving_batch_size=32, warmup_runs=1, min_runs=5, min_seconds=0)
    batch, throughput = profile_lib._throughput(
        forward, lambda n: profile_lib.synthetic_inputs(specs, n), options
    )
    assert batch == 4 and throughput > 0


def test_bad_builder_paths_raise_input_error():
    with pytest.raises(InputError, match="package.module:function"):
        profile_in_subprocess("build_dense", options=FAST)
    with pytest.raises(InputError, match="Did you mean: build_dense"):
        profile_in_subprocess(f"{__name__}:build_dence", options=FAST)
    with pytest.raises(InputError, match="module-level function"):
        profile_in_subprocess(lambda: build_dense(), options=FAST)
    with pytest.raises(InputError, match="JSON"):
        profile_in_subprocess(build_dense, {"hidden": object()}, options=FAST)


def test_builder_given_as_function_uses_its_import_path():
    assert profile_lib.builder_path(build_dense) == f"{__name__}:build_dense"


@pytest.mark.parametrize(
    "kwargs",
    [{"serving_batch_size": 0}, {"min_runs": 10, "max_runs": 5}, {"min_seconds": -1}],
)
def test_bad_options_raise_input_error(kwargs):
    with pytest.raises(InputError):
        ProfileOptions(**kwargs)


def test_result_round_trips_through_dict(dense_profile):
    data = dense_profile.to_dict()
    data["a_field_from_a_newer_version"] = 1
    assert ProfileResult.from_dict(data) == dense_profile


def test_inference_falls_back_to_the_keras_model_when_export_fails(monkeypatch):
    calls = []

    def fake_child(request, tmp, deadline):
        calls.append((request["mode"], request["options"]))
        result = ProfileResult(name=request["name"])
        if request["options"]["measure_training"]:  # The first, full build.
            result.params, result.saved_model_mb = 10, None
            result.add_error("saved_model", "ValueError: cannot save")
        else:
            result.latency_p50_ms, result.peak_infer_memory_mb = 1.5, 20.0
        return result

    monkeypatch.setattr(profile_lib, "_run_child", fake_child)
    result = profile_in_subprocess(build_dense, options=FAST)
    assert [mode for mode, _ in calls] == ["build", "build"]
    assert calls[0][1]["measure_inference"] is False
    assert calls[1][1]["measure_inference"] is True and calls[1][1]["measure_flops"] is False
    assert result.params == 10 and result.latency_p50_ms == 1.5
    assert result.inference_measured_on.startswith("built Keras model")
    assert result.error == "saved_model: ValueError: cannot save"


def test_no_inference_step_after_a_failed_build(monkeypatch):
    modes = []

    def fake_child(request, tmp, deadline):
        modes.append(request["mode"])
        failed = ProfileResult(name=request["name"])
        failed.add_error("build", "OSError: no weights")
        return failed

    monkeypatch.setattr(profile_lib, "_run_child", fake_child)
    result = profile_in_subprocess(build_dense, options=FAST)
    assert modes == ["build"] and result.error == "build: OSError: no weights"


def test_saved_model_is_served_in_process(tmp_path):
    model = build_dense()
    spec = tf.TensorSpec((None, 64), tf.float32, name="features")
    profile_lib.saved_model_size_mb(model, spec, export_dir=tmp_path / "export")
    result = profile_lib.profile_saved_model(tmp_path / "export", options=FAST)
    assert result.error is None, result.error
    assert result.latency_p50_ms > 0 and result.throughput_eps > 0
    assert result.input_shapes == {"features": [64]}
    assert result.inference_measured_on == "loaded SavedModel"
    with pytest.raises(InputError, match="Did you mean: serving_default"):
        profile_lib.profile_saved_model(tmp_path / "export", signature="serving", options=FAST)


# --- What is deployed: the TF Serving export, raw inputs in ---


@pytest.fixture(scope="module")
def served_text_profile(tmp_path_factory) -> ProfileResult:
    from tfhub_finetune.config import DataConfig, ExperimentConfig, ModelConfig
    from tfhub_finetune.tasks import make_task

    config = ExperimentConfig(
        model_dir=str(tmp_path_factory.mktemp("m")),
        data=DataConfig(train_data="train"),
        model=ModelConfig(backbone="scratch_text_encoder", sequence_length=16),
    ).validate()
    request = make_task(config).profile_request(3)
    return profile_in_subprocess(**request, name="scratch", options=FAST)


def test_text_candidates_are_profiled_as_served_strings_in(served_text_profile):
    r = served_text_profile
    assert r.error is None, r.error
    assert (
        r.inference_measured_on == "loaded SavedModel, serving_default on strings (fresh process)"
    )
    # End to end (tokenizer in the graph) and the network alone on token ids.
    assert 0 < r.latency_p50_ms <= r.latency_p95_ms
    assert 0 < r.model_latency_p50_ms <= r.model_latency_p95_ms
    assert r.throughput_eps > 0 and r.peak_infer_memory_mb > 0
    # The model's own inputs are what was built, FLOPs counted and trained on.
    assert r.input_shapes == {k: [16] for k in SEQUENCE_SHAPES}
    assert r.saved_model_dir is None  # The temporary export is gone.


def test_served_size_is_the_string_model_with_its_tokenizer(served_text_profile, tmp_path):
    from tfhub_finetune.backbones.loader import load_backbone
    from tfhub_finetune.builders.text_classifier import build_text_classifier

    backbone = load_backbone("scratch_text_encoder")
    model = build_text_classifier(backbone, 3)
    plain = profile_lib.saved_model_size_mb(model, None, export_dir=tmp_path / "plain")
    # Weights once, plus the vocabulary (graph constant and assets.extra/vocab.txt).
    vocab_mb = sum(len(w.encode()) + 1 for w in backbone.vocabulary) / 2**20
    assert served_text_profile.saved_model_mb > plain + vocab_mb
    assert served_text_profile.saved_model_mb < 2 * plain


def test_sample_requests_fill_the_sequence_and_are_real_images():
    from tfhub_finetune.backbones.catalog import resolve_backbone
    from tfhub_finetune.backbones.keras_hub_source import load_tokenizer
    from tfhub_finetune.export import sample_request

    card = {
        "preprocessing": {
            "modality": "text",
            "sequence_length": 40,
            "text_inputs": ["text", "text_pair"],
        }
    }
    texts = sample_request(card, 3)
    assert set(texts) == {"text", "text_pair"} and texts["text"].shape == (3,)
    pieces = load_tokenizer(resolve_backbone("minilm_l6_h384")).tokenize(texts["text"])
    assert min(pieces.row_lengths().numpy()) >= 40 - 2  # Every example fills the length.
    card = {"preprocessing": {"modality": "image", "image_size": 48}}
    images = sample_request(card, 2)["image_bytes"]
    decoded = tf.io.decode_jpeg(images[0])
    assert images.shape == (2,) and decoded.shape == (48, 48, 3)


def test_image_export_is_timed_on_jpeg_bytes_and_on_pixels(tmp_path):
    from tfhub_finetune.builders.image_classifier import build_image_classifier
    from tfhub_finetune.tasks.image_classification import export_for_serving

    model = build_image_classifier("scratch_cnn", 2, image_size=32)
    path = export_for_serving(model, str(tmp_path), task="single_label", image_size=32)
    result = profile_lib.profile_saved_model(path, options=FAST)
    assert result.error is None, result.error
    assert result.inference_measured_on == "loaded SavedModel, serving_default on image_bytes"
    assert result.latency_p50_ms > 0 and result.model_latency_p50_ms > 0
    assert result.throughput_eps > 0


def test_string_signature_without_a_model_card_is_refused(tmp_path):
    class Echo(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
        def serve(self, text):
            return {"length": tf.strings.length(text)}

    module = Echo()
    tf.saved_model.save(module, str(tmp_path), signatures={"serving_default": module.serve})
    with pytest.raises(InputError, match="without a model card"):
        profile_lib.profile_saved_model(tmp_path, options=FAST)


def test_profiles_cached_before_the_model_only_figure_still_load(dense_profile):
    old = dense_profile.to_dict()
    for key in ("model_latency_p50_ms", "model_latency_p95_ms", "saved_model_dir"):
        del old[key]
    loaded = ProfileResult.from_dict(old)
    assert loaded.model_latency_p50_ms is None and loaded.saved_model_dir is None
    assert loaded.latency_p50_ms == dense_profile.latency_p50_ms


def test_latency_on_the_cpu_clock_records_both_clocks_and_the_load():
    model = build_dense()
    options = dataclasses.replace(FAST, measure_saved_model=False, measure_training=False,
                                  measure_flops=False, latency_clock="cpu")
    result = profile_model(model, (64,), name="dense", options=options)
    assert result.error is None, result.error
    assert result.latency_clock == "cpu"
    assert result.latency_p50_ms == result.latency_cpu_p50_ms
    assert result.latency_wall_p50_ms > 0 and result.latency_cpu_p50_ms >= 0
    assert result.load_average >= 0 and result.cpu_count >= 1
    wall = profile_model(model, (64,), name="dense",
                         options=dataclasses.replace(options, latency_clock="wall"))
    assert wall.latency_clock == "wall" and wall.latency_p50_ms == wall.latency_wall_p50_ms


def test_an_unknown_clock_is_refused_with_the_close_name():
    with pytest.raises(InputError, match=r"latency_clock.*Did you mean: cpu"):
        ProfileOptions(latency_clock="cpus")


def test_contended_means_more_load_than_cpus_plus_this_process():
    assert ProfileResult("a", load_average=3.5, cpu_count=2).contended
    assert not ProfileResult("a", load_average=2.0, cpu_count=2).contended
    assert not ProfileResult("a").contended
