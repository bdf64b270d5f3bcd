"""TF Serving exports: fresh-process equivalence, a core-ops-only token-id model, bad inputs.

The SavedModels are loaded in child processes in which Keras, keras-hub,
tf_keras and tfhub_finetune cannot be imported (`sys.modules[name] = None`,
which is how Python spells "not installed"), as on a serving host; without
the block, `import tensorflow` alone would import Keras (TF 2.21 imports
`keras.src.optimizers` eagerly when Keras is installed). The
raw-string model's child loads only the TF Text kernels (`_*.so`), not the
`tensorflow_text` Python package, which would import Keras; the token-id and
image child has no TF Text at all.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import require_shared_path
from tfhub_finetune import export, serving_warmup
from tfhub_finetune.backbones import load_backbone
from tfhub_finetune.builders.image_classifier import build_image_classifier
from tfhub_finetune.builders.text_classifier import build_text_classifier
from tfhub_finetune.data.image import load_image_dataset
from tfhub_finetune.data.labels import LabelVocabulary
from tfhub_finetune.data.text import make_text_dataset, pack_inputs, tokenize_texts
from tfhub_finetune.errors import InputError
from tfhub_finetune.text_client import TextClient

SEQUENCE_LENGTH = 32
LABELS = ["negative", "positive"]
IMAGE_SIZE = 128
BLOCKED = ["keras", "keras_hub", "tf_keras", "tfhub_finetune"]
TEXT_OPS = ["CaseFoldUTF8", "FastWordpieceTokenizeWithOffsets", "RegexSplitWithOffsets"]
LONG_TEXT = ("a gripping , funny and moving film that never lets go . " * 1800)[:100_000]
TRICKY = [
    "Hello, Wörld! naïve café 東京", "a\u00a0b", "x\u200by", "ﬁne ½ ㈱ Straße", "İstanbul ΣΑΣ",
    "emoji 👍🏽 family 👨\u200d👩\u200d👧", "tab\there\vthere\x85next", "$5^2`~ «quotes» — dash…",
    "a" * 150, "word" + "é" * 60, "\ufeffbom", "e\u0301 vs é", "Ⅻ ① ｆｕｌｌ", "\u034fa\ufe0fb",
]

CHILD = r'''
import base64, glob, importlib.util, json, os, sys

request = json.load(open(sys.argv[1], encoding="utf-8"))
for name in request["block"]:
    sys.modules[name] = None  # "import name" now fails as if it were not installed.
import numpy as np
import tensorflow as tf

if request["text_kernels"]:
    package = importlib.util.find_spec("tensorflow_text").submodule_search_locations[0]
    for library in sorted(glob.glob(os.path.join(package, "python", "ops", "_*.so"))):
        tf.load_op_library(library)


def plain(value):
    if value.dtype == object:
        return np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(value).tolist() if value.size else value.tolist()
    return value.tolist()


models, results = {}, {}
for call in request["calls"]:
    if call["model"] not in models:
        models[call["model"]] = tf.saved_model.load(call["model"])
    function = models[call["model"]].signatures[call["signature"]]
    inputs = {}
    for name, spec in call["inputs"].items():
        if spec["dtype"] == "string":
            inputs[name] = tf.constant([base64.b64decode(v) for v in spec["values"]], tf.string)
        else:
            array = np.array(spec["values"], dtype=spec["dtype"]).reshape(spec["shape"])
            inputs[name] = tf.constant(array)
    try:
        outputs = function(**inputs)
        results[call["id"]] = {k: plain(v.numpy()) for k, v in outputs.items()}
    except tf.errors.InvalidArgumentError as err:
        results[call["id"]] = {"error": err.message}
loaded = sorted({k.split(".")[0] for k, v in sys.modules.items() if v is not None})
json.dump({"results": results, "modules": loaded}, open(sys.argv[2], "w", encoding="utf-8"))
'''


# === Helpers ===


def strings(values) -> dict:
    return {"dtype": "string",
            "values": [base64.b64encode(v if isinstance(v, bytes) else v.encode()).decode() for v in values]}


def ints(values, shape=None) -> dict:
    array = np.asarray(values, np.int32)
    return {"dtype": "int32", "values": array.ravel().tolist(), "shape": list(shape or array.shape)}


def pixels(array: np.ndarray) -> dict:
    return {"dtype": array.dtype.name, "values": array.ravel().tolist(), "shape": list(array.shape)}


def run_child(tmp_path: Path, calls: list[dict], *, block: list[str], text_kernels: bool) -> dict:
    script, request, answer = tmp_path / "child.py", tmp_path / "request.json", tmp_path / "answer.json"
    script.write_text(CHILD)
    request.write_text(json.dumps({"block": block, "text_kernels": text_kernels, "calls": calls}))
    proc = subprocess.run(
        [sys.executable, str(script), str(request), str(answer)], cwd=tmp_path,
        capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(answer.read_text())


def examples(feature: str, values: list[bytes]) -> list[bytes]:
    return [
        tf.train.Example(features=tf.train.Features(feature={
            feature: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))
        })).SerializeToString()
        for v in values
    ]


def reference_probabilities(model, backbone, texts: list[str]) -> np.ndarray:
    """The training/evaluation path: tokenize in tf.data, pack, pad to the batch's longest."""
    data = tokenize_texts(texts, np.zeros(len(texts), np.int32), backbone.tokenizer, SEQUENCE_LENGTH)
    inputs, _ = next(iter(make_text_dataset(data, backbone.tokenizer, batch_size=len(texts),
                                            training=False)))
    return model(inputs, training=False).numpy()


# === Fixtures ===


@pytest.fixture(scope="module")
def text_model(minilm_l3_dir):
    backbone = load_backbone(str(minilm_l3_dir))
    model = build_text_classifier(backbone, len(LABELS), pooling="mean")
    return backbone, model


@pytest.fixture(scope="module")
def text_export(tmp_path_factory, text_model):
    backbone, model = text_model
    model_dir = tmp_path_factory.mktemp("run") / "sst2_tiny"
    model_dir.mkdir()
    (model_dir / "params.json").write_text(json.dumps(
        {"model": {"backbone": str(backbone.spec.name), "sequence_length": SEQUENCE_LENGTH}}
    ))
    (model_dir / "metrics.json").write_text(json.dumps(
        {"train_examples": 64, "eval": {"accuracy": 0.75, "macro_f1": 0.7, "num_examples": 872}}
    ))
    export_dir = tmp_path_factory.mktemp("exports")
    raw = export.export_text_classifier(
        model, backbone, LabelVocabulary(LABELS), export_dir, model_dir=model_dir
    )
    return Path(raw), export_dir / "sst2_tiny_token_ids" / "1"


@pytest.fixture(scope="module")
def dev_texts(sst2_dir) -> list[str]:
    return [line.split("\t")[0] for line in (sst2_dir / "dev.tsv").read_text("utf-8").splitlines()]


@pytest.fixture(scope="module")
def image_model():
    return build_image_classifier("scratch_cnn", 2, image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[Path]:
    """Two ants and two bees in class folders, in the order load_image_dataset reads them."""
    source = require_shared_path("data/hymenoptera/val")
    root = tmp_path_factory.mktemp("images")
    files = []
    for name in ("ants", "bees"):
        (root / name).mkdir()
        for file in sorted((source / name).glob("*.jpg"))[:2]:
            files.append(Path(shutil.copy(file, root / name / file.name)))
    return files


@pytest.fixture(scope="module")
def image_export(tmp_path_factory, image_model):
    export_dir = tmp_path_factory.mktemp("image_exports")
    path = export.export_image_classifier(
        image_model, ["ants", "bees"], export_dir, image_size=IMAGE_SIZE, model_name="hymenoptera"
    )
    return Path(path)


# === (a) Raw strings in a fresh process ===


def test_raw_string_export_matches_the_in_memory_model_in_a_fresh_process(
    tmp_path, text_model, text_export, dev_texts
):
    backbone, model = text_model
    raw, _ = text_export
    texts = dev_texts[:40] + ["", "  \t ", LONG_TEXT] + TRICKY[:4]
    expected = reference_probabilities(model, backbone, texts)
    answer = run_child(tmp_path, [
        {"id": "predict", "model": str(raw), "signature": "serving_default",
         "inputs": {"text": strings(texts)}},
        {"id": "classify", "model": str(raw), "signature": "classify",
         "inputs": {"inputs": strings(examples("text", [t.encode() for t in texts]))}},
        {"id": "empty", "model": str(raw), "signature": "serving_default",
         "inputs": {"text": strings([])}},
    ], block=BLOCKED, text_kernels=True)

    assert not set(answer["modules"]) & {*BLOCKED, "tensorflow_text"}, answer["modules"]
    got = answer["results"]["predict"]
    np.testing.assert_allclose(got["probabilities"], expected, atol=1e-5)
    assert got["label_ids"] == expected.argmax(-1).tolist()
    assert got["label_names"] == [LABELS[i] for i in expected.argmax(-1)]
    classify = answer["results"]["classify"]
    np.testing.assert_allclose(classify["scores"], expected, atol=1e-5)
    assert classify["classes"] == [LABELS] * len(texts)
    assert answer["results"]["empty"] == {"probabilities": [], "label_ids": [], "label_names": []}


# === (b) Token ids without TensorFlow Text, and images ===


def test_token_id_and_image_exports_run_where_tensorflow_text_is_not_installed(
    tmp_path, text_model, text_export, dev_texts, image_model, image_export, image_files
):
    backbone, model = text_model
    _, token_ids = text_export
    assert export.non_core_ops(token_ids) == []
    assert not any(op.startswith("TFText>") for op in export.graph_op_types(token_ids))
    client = TextClient.from_saved_model(token_ids)
    texts = dev_texts[40:80]
    encoded = client.encode(texts)
    expected_text = reference_probabilities(model, backbone, texts)

    data = load_image_dataset(image_files[0].parent.parent, image_size=IMAGE_SIZE,
                              batch_size=len(image_files))
    images, labels = next(iter(data.dataset))
    assert labels.numpy().tolist() == [0, 0, 1, 1]
    expected_images = image_model(images, training=False).numpy()
    contents = [f.read_bytes() for f in image_files]
    original = tf.io.decode_jpeg(contents[0]).numpy()
    one_pixel = tf.io.encode_png(np.full((1, 1, 3), 200, np.uint8)).numpy()
    ok_ids = {"token_ids": ints([[101, 2307, 102]]), "padding_mask": ints([[1, 1, 1]]),
              "segment_ids": ints([[0, 0, 0]])}

    def ids_call(call_id, **inputs):
        return {"id": call_id, "model": str(token_ids), "signature": "serving_default",
                "inputs": {**ok_ids, **inputs}}

    def image_call(call_id, signature, inputs):
        return {"id": call_id, "model": str(image_export), "signature": signature, "inputs": inputs}

    answer = run_child(tmp_path, [
        ids_call("text", **{k: ints(v) for k, v in encoded.items()}),
        ids_call("empty_batch", token_ids=ints([], (0, 0)), padding_mask=ints([], (0, 0)),
                 segment_ids=ints([], (0, 0))),
        ids_call("out_of_vocabulary", token_ids=ints([[101, 30522, 102]])),
        ids_call("negative_id", token_ids=ints([[101, -1, 102]])),
        ids_call("shape_mismatch", padding_mask=ints([[1, 1]])),
        ids_call("too_long", token_ids=ints(np.full((1, 513), 1000)),
                 padding_mask=ints(np.ones((1, 513))), segment_ids=ints(np.zeros((1, 513)))),
        ids_call("no_positions", token_ids=ints([], (2, 0)), padding_mask=ints([], (2, 0)),
                 segment_ids=ints([], (2, 0))),
        image_call("bytes", "serving_default", {"image_bytes": strings(contents)}),
        image_call("floats", "predict_images", {"images": pixels(images.numpy())}),
        image_call("uint8", "predict_images_uint8",
                   {"images": pixels(images.numpy().astype(np.uint8))}),
        image_call("resized", "predict_images_uint8", {"images": pixels(original[None])}),
        image_call("classify", "classify",
                   {"inputs": strings(examples("image/encoded", contents))}),
        image_call("not_an_image", "serving_default",
                   {"image_bytes": strings([contents[0], b"hello, not an image"])}),
        image_call("empty_bytes", "serving_default", {"image_bytes": strings([b""])}),
        image_call("truncated_jpeg", "serving_default",
                   {"image_bytes": strings([contents[0][: len(contents[0]) // 2]])}),
        image_call("one_pixel", "serving_default", {"image_bytes": strings([one_pixel])}),
        image_call("no_images", "serving_default", {"image_bytes": strings([])}),
        image_call("example_without_image", "classify",
                   {"inputs": strings(examples("image/other", [contents[0]]))}),
    ], block=[*BLOCKED, "tensorflow_text"], text_kernels=False)

    assert not set(answer["modules"]) & {*BLOCKED, "tensorflow_text"}, answer["modules"]
    r = answer["results"]
    np.testing.assert_allclose(r["text"]["probabilities"], expected_text, atol=1e-5)
    assert r["empty_batch"] == {"probabilities": [], "label_ids": [], "label_names": []}
    assert "token_ids must be < the vocabulary size, 30522" in r["out_of_vocabulary"]["error"]
    assert "token_ids must be >= 0" in r["negative_id"]["error"]
    assert "padding_mask must have the shape of token_ids" in r["shape_mismatch"]["error"]
    assert "more positions than the encoder allows (512)" in r["too_long"]["error"]
    assert "needs at least [CLS] and [SEP]" in r["no_positions"]["error"]

    for key in ("bytes", "floats", "uint8"):
        np.testing.assert_allclose(r[key]["probabilities"], expected_images, atol=1e-5, err_msg=key)
    assert r["bytes"]["label_names"] == [["ants", "bees"][i] for i in expected_images.argmax(-1)]
    # Another size is resized in the graph; only the rounding to uint8 differs.
    np.testing.assert_allclose(r["resized"]["probabilities"], expected_images[:1], atol=1e-3)
    np.testing.assert_allclose(r["classify"]["scores"], expected_images, atol=1e-5)
    assert r["classify"]["classes"] == [["ants", "bees"]] * 4
    assert "image_bytes[1] (19 bytes) is not an encoded image" in r["not_an_image"]["error"]
    assert "image_bytes[0] (0 bytes) is not an encoded image" in r["empty_bytes"]["error"]
    assert "Invalid JPEG data" in r["truncated_jpeg"]["error"]
    assert len(r["one_pixel"]["probabilities"]) == 1
    assert np.isfinite(r["one_pixel"]["probabilities"]).all()
    assert r["no_images"] == {"probabilities": [], "label_ids": [], "label_names": []}
    assert "image/encoded" in r["example_without_image"]["error"]


# === (c) Bad text at serving time ===


def test_bad_text_inputs_return_the_documented_results(text_model, text_export):
    backbone, model = text_model
    raw, _ = text_export
    loaded = tf.saved_model.load(str(raw))
    serve = loaded.signatures["serving_default"]
    texts = [b"", b"   \n\t ", LONG_TEXT.encode(), b"caf\xe9 \xff\xfe ok", "caf\ufffd \ufffd\ufffd ok".encode()]
    out = {k: v.numpy() for k, v in serve(text=tf.constant(texts)).items()}
    probabilities = out["probabilities"]
    assert np.isfinite(probabilities).all()
    nothing = reference_probabilities(model, backbone, [""])[0]
    np.testing.assert_allclose(probabilities[0], nothing, atol=1e-5)  # Empty: [CLS] [SEP].
    np.testing.assert_allclose(probabilities[1], nothing, atol=1e-5)  # Whitespace: the same.
    np.testing.assert_allclose(probabilities[2], reference_probabilities(model, backbone, [LONG_TEXT])[0],
                               atol=1e-5)  # Truncated to the trained length.
    np.testing.assert_allclose(probabilities[3], probabilities[4], atol=1e-6)  # Bad UTF-8 -> U+FFFD.

    empty = serve(text=tf.constant([], tf.string))
    assert {k: tuple(v.shape) for k, v in empty.items()} == {
        "probabilities": (0, 2), "label_ids": (0,), "label_names": (0,)}

    classify = loaded.signatures["classify"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="text"):
        classify(inputs=tf.constant(examples("sentence", [b"a fine film"])))


@pytest.mark.parametrize("widths,row_counts", [(None, None), ([8, 16, 24, 32], None),
                                               ([8, 16, 24, 32], [1, 2, 4, 5])])
def test_length_chunked_serving_equals_the_unchunked_call_row_for_row(text_model, dev_texts,
                                                                       widths, row_counts):
    """`serving_default` sorts by length and runs chunks; answers stay in request order."""
    backbone, model = text_model
    tok = backbone.tokenizer
    # Mixed lengths in an order that is not sorted: several chunks of 5, several buckets,
    # an empty string, whitespace and a text far past the sequence length.
    texts = ["", LONG_TEXT, *dev_texts[:9], "  ", *TRICKY[:4], "a", *dev_texts[9:14]]
    inputs = pack_inputs(tok.tokenize(tf.constant(texts)), sequence_length=SEQUENCE_LENGTH,
                                start_id=tok.start_id, end_id=tok.end_id, pad_id=tok.pad_id)
    lengths = inputs["padding_mask"].numpy().sum(1)
    assert len(set(lengths)) > 8 and lengths.max() == SEQUENCE_LENGTH
    unchunked = export._call_or_empty(model, inputs, tf.shape(inputs["token_ids"])[0]).numpy()
    # Client-side padding past the longest row (a token-id request) must not change answers.
    wide = {k: tf.pad(v, [[0, 0], [0, 7]], constant_values=0) for k, v in inputs.items()}
    for batch in (inputs, wide):
        chunked = export._call_in_length_chunks(
            model, batch, pad_id=int(tok.pad_id), chunk_rows=5, widths=widths,
            row_counts=row_counts,
        ).numpy()
        np.testing.assert_allclose(chunked, unchunked, atol=1e-5)
    np.testing.assert_allclose(unchunked, reference_probabilities(model, backbone, texts), atol=1e-5)


def test_xla_serving_export_reloads_and_predicts_as_the_default_export(
        tmp_path, text_model, text_export, dev_texts):
    backbone, model = text_model
    raw = Path(export.export_text_classifier(
        model, backbone, LabelVocabulary(LABELS), tmp_path, model_name="xla",
        sequence_length=SEQUENCE_LENGTH, measure_latency=False, serving_jit_compile=True))
    ids = tmp_path / "xla_token_ids" / raw.name
    # The model call is an XLA function in both SavedModels, and only in the opt-in export.
    for path in (raw, ids):
        assert b"_XlaMustCompile" in (path / "saved_model.pb").read_bytes()
    assert b"_XlaMustCompile" not in (text_export[0] / "saved_model.pb").read_bytes()
    card = json.loads((raw / "assets.extra" / "model_card.json").read_text())
    assert card["preprocessing"]["jit_compile"] is True
    assert card["preprocessing"]["tf_serving_flags"] == ["--xla_cpu_compilation_enabled"]
    # TF Serving compiles every chunk shape at load, replaying the warm-up file.
    rows, widths = export.serving_shapes(SEQUENCE_LENGTH)
    shapes = [[r, w] for w in widths for r in rows]
    assert card["preprocessing"]["warmup_shapes"] == shapes
    client = TextClient.from_saved_model(ids)
    for path in (raw, ids):
        assert [warmup_shape(r, client) for r in serving_warmup.read_warmup_requests(path)] == shapes

    texts = ["", LONG_TEXT, *dev_texts[:18], "a"]  # 21 rows: chunks of 16 and 5 (filled to 8).
    default = tf.saved_model.load(str(text_export[0])).signatures["serving_default"]
    xla = tf.saved_model.load(str(raw)).signatures["serving_default"]
    for batch in (texts, texts[2:3]):
        expected = default(text=tf.constant(batch))
        got = xla(text=tf.constant(batch))
        np.testing.assert_allclose(got["probabilities"].numpy(),
                                   expected["probabilities"].numpy(), atol=1e-5)
        assert got["label_names"].numpy().tolist() == expected["label_names"].numpy().tolist()
    tok = backbone.tokenizer
    packed = pack_inputs(tok.tokenize(tf.constant(texts)), sequence_length=SEQUENCE_LENGTH,
                         start_id=tok.start_id, end_id=tok.end_id, pad_id=tok.pad_id)
    xla_ids = tf.saved_model.load(str(ids)).signatures["serving_default"]
    np.testing.assert_allclose(xla_ids(**packed)["probabilities"].numpy(),
                               reference_probabilities(model, backbone, texts), atol=1e-5)
    assert xla(text=tf.constant([], tf.string))["probabilities"].shape == (0, 2)


def warmup_shape(request: dict, client: TextClient) -> list[int]:
    """`[rows, width]` a warm-up request runs at: token ids as given, texts as packed."""
    if "token_ids" in request:
        return list(request["token_ids"].shape)
    encoded = client.encode([t.decode("utf-8") for t in request["text"]])
    return [len(encoded["token_ids"]), len(encoded["token_ids"][0])]


def test_tf_serving_replays_warmup_requests_each_export_answers(text_export, image_export):
    """`assets.extra/tf_serving_warmup_requests`: TF Serving's PredictionLog records, which it
    replays at load and refuses the model if one fails. Every request of the text models and
    the image model parses with TF Serving's protos, runs at the shapes the card lists, and the
    export answers it."""
    raw, ids = text_export
    card = export.read_model_card(raw)
    assert card["preprocessing"]["warmup_shapes"] == [[1, 8], [1, SEQUENCE_LENGTH],
                                                      [16, SEQUENCE_LENGTH]]
    client = TextClient.from_saved_model(ids)
    for path in (raw, ids, image_export):
        requests = serving_warmup.read_warmup_requests(path)
        serve = tf.saved_model.load(str(path)).signatures["serving_default"]
        if path != image_export:
            assert [warmup_shape(r, client) for r in requests] == card["preprocessing"][
                "warmup_shapes"]
        else:
            assert [len(r["image_bytes"]) for r in requests] == [1, 16]
        for request in requests:
            answer = serve(**{name: tf.constant(value) for name, value in request.items()})
            assert answer["probabilities"].shape[0] == len(next(iter(request.values())))
    with pytest.raises(ValueError, match="1 to 1000 warm-up requests"):
        serving_warmup.write_warmup_requests(raw, [])


def test_a_mixed_bfloat16_model_serves_float32_unless_exported_as_trained(
        tmp_path, minilm_l3_dir, text_model, text_export, dev_texts):
    """`--precision=auto` picks mixed_bfloat16 where bf16 pays for training. The export
    computes in float32 by default (bf16 casts cost more than they save at small batches):
    no bf16 op in its graph, the float32 model's answers, the Keras model's own policy
    untouched. `serving_precision="as_trained"` serves bf16 matmuls and its card says so."""
    import keras

    backbone, model = text_model
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        bf16_model = build_text_classifier(load_backbone(str(minilm_l3_dir)), len(LABELS),
                                           pooling="mean")
    finally:
        keras.config.set_dtype_policy(previous)
    bf16_model.set_weights(model.get_weights())
    texts = dev_texts[:32]
    expected = reference_probabilities(model, backbone, texts)
    keras_bf16 = reference_probabilities(bf16_model, backbone, texts)
    policies = [layer.dtype_policy.name for layer in bf16_model._flatten_layers()]
    assert "mixed_bfloat16" in policies

    def exported(**kwargs):
        raw = Path(export.export_text_classifier(
            bf16_model, backbone, LabelVocabulary(LABELS), tmp_path, sequence_length=SEQUENCE_LENGTH,
            measure_latency=False, **kwargs))
        card = json.loads((raw / "assets.extra" / "model_card.json").read_text())
        served = tf.saved_model.load(str(raw)).signatures["serving_default"](text=tf.constant(texts))
        assert served["probabilities"].dtype == tf.float32
        return raw, card, served["probabilities"].numpy()

    raw, card, probabilities = exported(model_name="default")
    assert card["compute_dtype"] == "float32" and not _graph_has_dtype(raw, tf.bfloat16)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    # The export changed nothing of the model it was given.
    assert [layer.dtype_policy.name for layer in bf16_model._flatten_layers()] == policies
    np.testing.assert_array_equal(reference_probabilities(bf16_model, backbone, texts), keras_bf16)

    # Its TFLite file computes float32 too (TFLite has no bf16 kernels; the converter
    # refuses a bf16 graph), and matches the float32 answers.
    info = export.export_tflite(bf16_model, tmp_path / "bf16_trained.tflite")
    assert info["max_abs_diff"] <= 1e-4
    assert [layer.dtype_policy.name for layer in bf16_model._flatten_layers()] == policies

    raw, card, probabilities = exported(model_name="bf16", serving_precision="as_trained")
    assert card["compute_dtype"] == "bfloat16" and _graph_has_dtype(raw, tf.bfloat16)
    # bf16 keeps 8 bits of mantissa: the probabilities move by about 1e-2, the classes rarely.
    np.testing.assert_allclose(probabilities, expected, atol=0.05)

    with pytest.raises(InputError, match=r"serving_precision='bfloat16'.*as_trained"):
        export.export_text_classifier(bf16_model, backbone, LabelVocabulary(LABELS), tmp_path,
                                      serving_precision="bfloat16")


def test_the_serving_scope_keeps_int8_layers_int8_and_puts_everything_back():
    """A quantized layer computes its float part in float32 inside the scope, stays int8, and
    every policy is the model's own again afterwards."""
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        inputs = keras.Input((8,))
        model = keras.Model(inputs, keras.layers.Dense(4)(keras.layers.Dense(16)(inputs)))
    finally:
        keras.config.set_dtype_policy(previous)
    with pytest.warns(UserWarning, match="InputLayer"):
        model.quantize("int8")
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    x = np.random.default_rng(0).random((3, 8), dtype=np.float32)
    trained = model(x).numpy()
    with export.serving_precision_scope(model) as served:
        assert [layer.dtype_policy.name for layer in dense] == ["int8_from_float32"] * 2
        in_float32 = tf.function(served)(x).numpy()
    assert [layer.dtype_policy.name for layer in dense] == ["int8_from_mixed_bfloat16"] * 2
    np.testing.assert_array_equal(model(x).numpy(), trained)
    # Only the float part's rounding differs (bf16 keeps 8 bits of mantissa).
    assert 0 < np.abs(in_float32 - trained).max() < 0.05


def _graph_has_dtype(saved_model: Path, dtype: tf.DType) -> bool:
    """Whether any op of the SavedModel's functions computes in `dtype`."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel.FromString((saved_model / "saved_model.pb").read_bytes())
    wanted = dtype.as_datatype_enum
    return any(attr.type == wanted for graph in proto.meta_graphs
               for function in graph.graph_def.library.function
               for node in function.node_def for attr in node.attr.values())


def test_cls_pooled_exports_answer_an_empty_batch(tmp_path, text_model):
    # CLS pooling takes position 0, which a (0, 0) batch does not have; mean pooling
    # (the fixture's) divides by a mask and never failed. Both exports must answer.
    backbone, _ = text_model
    model = build_text_classifier(backbone, len(LABELS), pooling="cls")
    raw = Path(export.export_text_classifier(model, backbone, LabelVocabulary(LABELS), tmp_path,
                                             model_name="cls", sequence_length=SEQUENCE_LENGTH,
                                             measure_latency=False))
    ids = tmp_path / "cls_token_ids" / raw.name
    raw_serve = tf.saved_model.load(str(raw)).signatures["serving_default"]
    ids_serve = tf.saved_model.load(str(ids)).signatures["serving_default"]
    empty_ids = {n: tf.zeros([0, 0], tf.int32) for n in ("token_ids", "padding_mask", "segment_ids")}
    shapes = {
        "raw strings []": {k: tuple(v.shape) for k, v in raw_serve(text=tf.constant([], tf.string)).items()},
        "token ids [0, 0]": {k: tuple(v.shape) for k, v in ids_serve(**empty_ids).items()},
    }
    print(shapes)
    expected = {"probabilities": (0, 2), "label_ids": (0,), "label_names": (0,)}
    assert shapes == {"raw strings []": expected, "token ids [0, 0]": expected}
    # And a non-empty batch still predicts what the model does.
    out = raw_serve(text=tf.constant(["a fine film"]))["probabilities"].numpy()
    np.testing.assert_allclose(out, reference_probabilities(model, backbone, ["a fine film"]), atol=1e-5)


def test_text_client_tokenizes_like_the_training_tokenizer(text_model, text_export, dev_texts):
    backbone, _ = text_model
    client = TextClient.from_saved_model(text_export[1])
    texts = dev_texts + TRICKY + ["", LONG_TEXT]
    assert len(dev_texts) == 872
    expected = backbone.tokenizer.tokenize(tf.constant(texts)).to_list()
    mismatched = [t for t, e in zip(texts, expected, strict=True) if client.tokenize(t) != e]
    assert mismatched == []
    invalid = [b"ab\xff\xfecd", b"\xc3(", b"ok \xf0\x9f\x98 bad", b"\xed\xa0\x80 x"]
    repaired = tf.strings.unicode_transcode(invalid, "UTF-8", "UTF-8", errors="replace")
    assert [client.tokenize(b) for b in invalid] == backbone.tokenizer.tokenize(repaired).to_list()
    batch = client.encode(["a fine film", LONG_TEXT])
    assert batch["token_ids"][0][:5] == [101, 1037, 2986, 2143, 102]
    assert [len(row) for row in batch["token_ids"]] == [SEQUENCE_LENGTH, SEQUENCE_LENGTH]
    assert batch["padding_mask"][0] == [1] * 5 + [0] * (SEQUENCE_LENGTH - 5)


def test_batch1_thread_timing_gets_each_exports_own_inputs(tmp_path, text_export):
    """`pipelines.predict` at batch 1 times the served graph on the job's first rows: raw
    strings for the raw-string export, the client's token ids for its twin (which serve)."""
    from pipelines import predict

    rows = tmp_path / "in.tsv"
    rows.write_text("".join(f"sentence number {i}\n" for i in range(10)))
    records = predict.read_texts(rows, "0", "false", "text")
    raw = predict._timing_requests(predict.ServedExport.read(text_export[0]), records)
    assert raw["requests"] == [{"text": [f"sentence number {i}"]} for i in range(8)]
    served = predict.ServedExport.read(text_export[1])
    timed = predict._timing_requests(served, records)
    client = TextClient.from_saved_model(text_export[1])
    assert timed["saved_model"] == text_export[1]
    assert timed["requests"] == [client.encode([f"sentence number {i}"]) for i in range(8)]
    serve = tf.saved_model.load(str(text_export[1])).signatures["serving_default"]
    answer = serve(**{k: tf.constant(v, tf.int32) for k, v in timed["requests"][0].items()})
    assert answer["probabilities"].shape == (1, len(LABELS))
    with pytest.raises(InputError, match="takes single texts, not pairs"):
        served.check_inputs(rows, "1")


# === Layout, model card, versions ===


def test_layout_model_card_and_tf_serving_method_names(text_model, text_export):
    from tensorflow.core.protobuf import saved_model_pb2

    backbone, model = text_model
    raw, token_ids = text_export
    assert raw.name == token_ids.name == "1"
    assert sorted(p.name for p in raw.parent.iterdir()) == ["1"]  # No staging leftovers.
    assert sorted(p.name for p in token_ids.parent.iterdir()) == ["1"]

    card = json.loads((raw / "assets.extra" / "model_card.json").read_text())
    assert card["labels"] == LABELS and card["task"] == "single_label"
    assert card["input"] == "strings" and card["token_id_model"] == "sst2_tiny_token_ids"
    assert card["preprocessing"]["sequence_length"] == SEQUENCE_LENGTH
    assert card["preprocessing"]["client_tokenizer"]["lowercase"] is True
    assert card["metrics"]["accuracy"] == 0.75 and card["metrics"]["train_examples"] == 64
    assert card["backbone"]["name"] == backbone.spec.name
    assert card["profile"]["params"] == model.count_params()
    assert card["profile"]["latency_ms_batch1"]["serving_default"] > 0
    assert card["custom_ops"] == TEXT_OPS and card["requires"] == ["tensorflow_text"]
    assert card["signatures"]["serving_default"]["inputs"] == {"text": "string[None]"}
    assert card["signatures"]["classify"]["method"] == "tensorflow/serving/classify"
    token_card = json.loads((token_ids / "assets.extra" / "model_card.json").read_text())
    assert token_card["signatures"]["serving_default"]["inputs"] == {
        name: "int32[None, None]" for name in ("padding_mask", "segment_ids", "token_ids")}
    # TF Serving's bundled TF Text lacks the newer `TFText>` ops (serving#2267).
    assert not any(op.startswith("TFText>") for op in export.graph_op_types(raw))
    vocab = (token_ids / "assets.extra" / "vocab.txt").read_text("utf-8").splitlines()
    assert vocab == backbone.vocabulary

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((raw / "saved_model.pb").read_bytes())
    methods = {k: v.method_name for k, v in saved.meta_graphs[0].signature_def.items()
               if not k.startswith("__")}
    assert methods == {"serving_default": "tensorflow/serving/predict",
                       "classify": "tensorflow/serving/classify"}
    assert set(saved.meta_graphs[0].signature_def["classify"].outputs) == {"classes", "scores"}
    assert list(saved.meta_graphs[0].signature_def["classify"].inputs) == ["inputs"]


def test_versions_increase_past_existing_folders(image_model, image_export):
    root = image_export.parent
    assert image_export.name == "1"
    second = export.export_image_classifier(image_model, ["ants", "bees"], root.parent,
                                            image_size=IMAGE_SIZE, model_name=root.name,
                                            measure_latency=False)
    assert Path(second).name == "2"
    (root / "7").mkdir()  # A version folder someone else made (not a SavedModel).
    (root / "notes").mkdir()
    third = export.export_image_classifier(image_model, ["ants", "bees"], root.parent,
                                           image_size=IMAGE_SIZE, model_name=root.name,
                                           measure_latency=False)
    assert Path(third).name == "8"
    assert export.resolve_saved_model(root) == Path(third)
    assert export.resolve_saved_model(image_export) == image_export
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_version_folders_follow_the_umask_and_stale_staging_is_removed(tmp_path, image_model):
    import subprocess

    from tfhub_finetune import io_utils

    root = tmp_path / "hymenoptera"
    root.mkdir()
    # Left by an export that was killed (its process is gone), and by one still writing.
    finished = subprocess.Popen(["true"])  # noqa: S603, S607
    finished.wait()
    dead_pid = finished.pid
    host = io_utils._host()
    killed = root / f".export-{host}-{dead_pid}-0badc0de.tmp"
    writing = root / f".export-{host}-{os.getpid()}-0000beef.tmp"
    killed.mkdir()
    writing.mkdir()
    old_umask = os.umask(0o022)
    try:
        path = Path(export.export_image_classifier(image_model, ["ants", "bees"], tmp_path,
                                                   image_size=IMAGE_SIZE, model_name=root.name,
                                                   measure_latency=False))
    finally:
        os.umask(old_umask)
    # TF Serving often runs as another user: 0700 (mkdtemp's mode) would hide the model.
    assert oct(path.stat().st_mode & 0o777) == oct(0o755)
    for item in path.rglob("*"):
        assert oct(item.stat().st_mode & 0o777) == oct(0o755 if item.is_dir() else 0o644), item
    assert not killed.exists() and writing.exists()


def test_user_mistakes_raise_input_error(tmp_path, text_model, image_model):
    backbone, model = text_model
    a_file = tmp_path / "file"
    a_file.write_text("x")
    import keras

    # Neither images nor token ids: TFLite export has no inputs to make for it.
    vector_model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)])
    cases = [
        (lambda: export.export_text_classifier(model, backbone, ["a", "b", "c"], tmp_path),
         "does not match the model's outputs"),
        (lambda: export.export_text_classifier(model, backbone, LABELS, tmp_path, model_name="../x"),
         "Invalid model name"),
        (lambda: export.export_text_classifier(model, backbone, LABELS, tmp_path, sequence_length=1000),
         "sequence_length"),
        (lambda: export.export_text_classifier(model, backbone, LABELS, a_file), "is a file"),
        (lambda: export.export_text_classifier(image_model, backbone, LABELS, tmp_path),
         "needs a model on token ids"),
        (lambda: export.export_image_classifier(image_model, LABELS, tmp_path, image_size=64),
         "does not match the model's input"),
        (lambda: export.export_tflite(vector_model, tmp_path / "m.tflite"), "fixed input size"),
        (lambda: export.resolve_saved_model(tmp_path), "No SavedModel in the folder"),
    ]
    for call, message in cases:
        with pytest.raises(InputError, match=message):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # Nothing half-written.


def test_tflite_matches_keras(tmp_path, image_model):
    info = export.export_tflite(image_model, tmp_path / "hymenoptera.tflite")
    assert info["max_abs_diff"] <= 1e-4
    assert (tmp_path / "hymenoptera.tflite").stat().st_size == info["bytes"] > 0


def test_multi_label_and_regression_signatures(tmp_path, image_files):
    from tensorflow.core.protobuf import saved_model_pb2

    contents = tf.constant([f.read_bytes() for f in image_files[:3]])
    cases = {
        "multi_label": (LabelVocabulary(["ant", "bee", "flower"], task="multi_label"), 3),
        "regression": (LabelVocabulary(["size"], task="regression", label_type="id"), 1),
    }
    for task, (labels, width) in cases.items():
        model = build_image_classifier("scratch_cnn", width, task=task, image_size=IMAGE_SIZE)
        path = Path(export.export_image_classifier(model, labels, tmp_path, image_size=IMAGE_SIZE,
                                                   model_name=task, measure_latency=False))
        loaded = tf.saved_model.load(str(path))
        out = {k: v.numpy() for k, v in loaded.signatures["serving_default"](image_bytes=contents).items()}
        saved = saved_model_pb2.SavedModel()
        saved.ParseFromString((path / "saved_model.pb").read_bytes())
        methods = {k: v.method_name for k, v in saved.meta_graphs[0].signature_def.items()
                   if not k.startswith("__")}
        if task == "multi_label":
            assert sorted(out) == ["label_names", "predicted", "probabilities"]
            assert out["label_names"].tolist() == [[b"ant", b"bee", b"flower"]] * 3
            assert (out["predicted"] == (out["probabilities"] >= 0.5)).all()
            assert methods["classify"] == "tensorflow/serving/classify"
        else:
            assert sorted(out) == ["scores"] and out["scores"].shape == (3, 1)
            regress = loaded.signatures["regress"](
                inputs=tf.constant(examples("image/encoded", contents.numpy().tolist())))
            np.testing.assert_allclose(regress["outputs"].numpy(), out["scores"][:, 0], atol=1e-5)
            assert methods["regress"] == "tensorflow/serving/regress" and "classify" not in methods
