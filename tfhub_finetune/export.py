"""TF Serving SavedModels with the preprocessing inside, a token-id twin, and TFLite.

Layout, as TF Serving's file-system source expects it (it serves the highest
integer folder and ignores every other name):

```
<export_dir>/<model_name>/<version>/            raw inputs: strings or encoded images
    saved_model.pb  variables/  assets.extra/model_card.json  (text: assets.extra/vocab.txt)
    assets.extra/tf_serving_warmup_requests         replayed by TF Serving at load
<export_dir>/<model_name>_token_ids/<version>/  text only: token ids in, core TF ops only
```

`version` is one more than the largest existing one (both text models get
the same number). Each SavedModel is written into a hidden temporary folder
inside its model folder and renamed into place, so a polling server never
loads half an export.

Text signatures (raw-string model; needs TensorFlow Text kernels in the
server, i.e. `import tensorflow_text` in Python or a TF Serving build with
TF Text ops; the exact op list is in the model card under `custom_ops`):

- `serving_default(text: string[batch])`, Predict API: `probabilities`
  float32 `[batch, classes]`, `label_ids` int32 `[batch]`, `label_names`
  string `[batch]`; multi-label: `probabilities`, `label_names` (tiled,
  `[batch, labels]`) and `predicted` bool `[batch, labels]` (p >= 0.5);
  regression: `scores` float32 `[batch, outputs]`. Tokenization uses the
  backbone's own tokenizer, truncates to the trained `sequence_length`
  ([CLS]/[SEP] included) and packs exactly as training did
  (`data.text.pack_inputs`); the batch then runs sorted by length in chunks
  of `SERVING_CHUNK_ROWS`, each padded to its own longest row, and answers
  come back in request order (the same values as one padded batch, to float
  rounding; ~1.8x less CPU on a batch of 64 SST-2 sentences). Both
  text models do this, so TF Serving gets it with no client change. With
  `serving_jit_compile=True` the model call is XLA-compiled on chunks padded
  to `serving_shapes` (opt-in: TF Serving must then be started with
  `--xla_cpu_compilation_enabled`, or it refuses the model at load: its
  warm-up requests, one per compiled shape, cannot run). A model trained on
  pairs takes `serving_default(text: string[batch], text_pair:
  string[batch])`, packed `[CLS] text [SEP] text_pair [SEP]` with segment
  ids 0/1, the longer text truncated first.
- `classify(inputs: string[batch])`, Classify API (method name
  `tensorflow/serving/classify`): serialized `tf.train.Example`s with a
  bytes feature `text` (and `text_pair` for pairs) -> `classes` string
  `[batch, classes]`, `scores`
  float32 `[batch, classes]`. Regression models with one output get
  `regress` (Regress API, `outputs` float32 `[batch]`) instead. TF Serving
  routes Classify/Regress requests to `serving_default` unless told, so set
  `model_spec.signature_name="classify"` (or `"regress"`).

Token-id model (`<model_name>_token_ids`): only core TensorFlow ops (checked
at export: no TF Text op anywhere, function library included), so it loads
on any stock TF Serving and with `tensorflow_text` absent.
`serving_default(token_ids, padding_mask, segment_ids: int32[batch, seq])`
-> the same outputs. Clients tokenize with `tfhub_finetune.text_client`,
which reads `assets.extra/vocab.txt` and the model card and reproduces the
training tokenizer id for id.

Image signatures:

- `serving_default(image_bytes: string[batch])`: encoded JPEG, PNG, GIF
  (first frame), BMP or WebP; decoded to RGB, centre-cropped to a square,
  resized (antialiased bilinear) to `image_size` and rounded to 8 bits, as the
  training pipeline (`data.image`) does; the model normalises the 0..255
  pixels itself. Outputs as for text.
- `predict_images(images: float32[batch, height, width, 3])` and
  `predict_images_uint8(images: uint8[...])`: raw 0..255 RGB pixels; batches
  of another size are centre-cropped and resized like the bytes path.
- `classify(inputs)`: `tf.train.Example`s with a bytes feature
  `image/encoded` (the TFRecord convention of `data.image`).

Bad input at serving time. The server never crashes; each case returns:

- Empty string, or whitespace only: a normal prediction for `[CLS] [SEP]`
  (no word pieces), the model's answer for "no text". Not an error: an
  empty field is valid text, and an error would fail the whole batch.
- A 100,000-character string: tokenized in full, then truncated to the
  trained sequence length, like training; the prediction is for its start.
- Bytes that are not UTF-8: each invalid sequence becomes U+FFFD
  (`tf.strings.unicode_transcode(errors="replace")`), then tokenization goes
  on; the affected word usually becomes `[UNK]`. `text_client` does the same.
- An empty batch (text, token ids or images): empty outputs (`[0, classes]`,
  `[0]`), status OK.
- A tf.Example without the `text` / `image/encoded` feature:
  INVALID_ARGUMENT ("Feature: text (data type: string) is required but could
  not be found.").
- Token ids outside the vocabulary, more positions than the encoder has,
  inputs of different shapes, or rows without any token: INVALID_ARGUMENT
  naming the limit (on GPU an out-of-range id would otherwise silently embed
  as zeros).
- Image bytes that are not an image (including empty bytes):
  INVALID_ARGUMENT, "image_bytes[i] (n bytes) is not an encoded image ...".
- A truncated JPEG: INVALID_ARGUMENT from the decoder ("jpeg::Uncompress
  failed. Invalid JPEG data or crop window.").
- A 1x1 image (or any size): valid; it is upscaled and predicted.

Undecodable images are errors, not a `valid=false` output, because that is
TF Serving's convention for malformed requests (gRPC INVALID_ARGUMENT,
HTTP 400 with the message): a flag would return meaningless probabilities to
clients that do not check it. The error fails the whole request, and with
server-side batching (`--enable_batching`) it can fail the requests merged
with it; `pipelines.predict` retries a failed batch image by image and
reports the bad files by name.

Example:

```python
path = export_text_classifier(model, backbone, labels, "exports", model_name="sst2",
                              model_dir="runs/sst2")
# exports/sst2/1 (strings) and exports/sst2_token_ids/1 (token ids)
```
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import functools
import json
import logging
import os
import platform
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfhub_finetune.adaptation import merge_lora
from tfhub_finetune.backbones.base import TEXT_INPUTS, TextBackbone
from tfhub_finetune.backbones.spec import BackboneSpec
from tfhub_finetune.config import SERVING_PRECISIONS
from tfhub_finetune.data.labels import LabelVocabulary
from tfhub_finetune.data.packing import pack_ids
from tfhub_finetune.data.text import bucket_widths, pack_inputs
from tfhub_finetune.errors import InputError, did_you_mean
from tfhub_finetune.integers import parse_int
from tfhub_finetune.io_utils import atomic_path, check_export_name, read_json_file, staging_dir
from tfhub_finetune.layer_policies import layer_policies
from tfhub_finetune.serving_graph import LoweredTextModel, fastest_lowering, lower_text_model
from tfhub_finetune.serving_warmup import ASSETS_EXTRA, write_warmup_requests

FORMAT = "tfhub_finetune.export/1"
MODEL_CARD_FILE = "model_card.json"
VOCAB_FILE = "vocab.txt"
TOKEN_IDS_SUFFIX = "_token_ids"
TEXT_FEATURE = "text"
TEXT_PAIR_FEATURE = "text_pair"
IMAGE_FEATURE = "image/encoded"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
# The driver's default; what training used when params.json is unavailable.
DEFAULT_SEQUENCE_LENGTH = 128
MULTI_LABEL_THRESHOLD = 0.5
TFLITE_QUANTIZATIONS = ("none", "int8")
# Leading bytes of what `tf.io.decode_image` reads (WebP: "RIFF....WEBP").
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")


# === Text ===


@contextlib.contextmanager
def serving_precision_scope(model: keras.Model, serving_precision: str = "float32"):
    """Makes `model` compute in float32 while it is exported; its policies are restored after.

    A model trained under `mixed_bfloat16` (what `--precision=auto` picks
    where bf16 GEMMs pay, e.g. an AMX Xeon) keeps float32 variables, so the
    served graph can compute in either dtype. It computes in float32 by
    default because serving is mostly small batches: every call casts each
    kernel to bf16, and at one sentence those casts cost more than the bf16
    matmuls save (MiniLM-L6 on the AMX Xeon: batch-1 p50 21 ms bf16 vs
    9.5 ms float32; batch 64 about equal; BUILD_NOTES "Serving precision").
    `"as_trained"` keeps the trained policy. `"auto"` computes the Keras
    layers in float32 too: the text exporters' lean graph then chooses its
    dtype by timing both (`serving_graph.fastest_lowering`). Quantized layers
    keep their mode and compute their float part in float32
    (`int8_from_float32`).

    Args:
        model: keras.Model. Any built Keras model.
        serving_precision: str. One of `SERVING_PRECISIONS`.

    Yields:
        The model, its layers computing in the serving precision.

    Raises:
        InputError: for an unknown `serving_precision`.

    Example:

    ```python
    with serving_precision_scope(model) as served:
        probabilities = served(inputs)  # float32 compute whatever the training policy
    ```
    """
    if serving_precision not in SERVING_PRECISIONS:
        raise InputError(
            "Unknown serving precision.", received={"serving_precision": serving_precision},
            fix=did_you_mean(str(serving_precision), SERVING_PRECISIONS),
        )
    policies = []
    for layer in model._flatten_layers(include_self=True, recursive=True):
        policy = layer.dtype_policy  # `as_trained` keeps it (and gets it back after).
        if serving_precision in ("float32", "auto"):
            mode = policy.quantization_mode
            policy = f"{mode}_from_float32" if mode else "float32"
        policies.append((layer, policy))
    with layer_policies(policies):
        yield model


def exported_in_serving_precision(export: Callable[..., str]) -> Callable[..., str]:
    """Runs an exporter under `serving_precision_scope(model, serving_precision)`.

    One place for every exporter's `serving_precision` keyword (text, tokens,
    images). The wrapped function declares the keyword too, so its signature
    and docstring (which `functools.wraps` makes the public ones) show it; it
    only discards it, the scope having applied it (the card's
    `compute_dtype` reports the result).
    """

    @functools.wraps(export)
    def wrapper(model: keras.Model, *args: Any, serving_precision: str = "float32",
                **kwargs: Any) -> str:
        with serving_precision_scope(model, serving_precision):
            return export(model, *args, serving_precision=serving_precision, **kwargs)

    return wrapper


@exported_in_serving_precision
def export_text_classifier(
    model: keras.Model,
    backbone: TextBackbone,
    labels: LabelVocabulary | Sequence[str],
    export_dir: str | os.PathLike,
    *,
    model_name: str | None = None,
    model_dir: str | os.PathLike | None = None,
    metrics: dict[str, Any] | None = None,
    sequence_length: int | None = None,
    text_pair: bool | None = None,
    measure_latency: bool = True,
    serving_jit_compile: bool = False,
    serving_precision: str = "float32",
    lean_serving_graph: bool = True,
) -> str:
    """Writes a text classifier as two TF Serving SavedModels: raw strings and token ids.

    A model trained on text pairs gets two string inputs, `text` and
    `text_pair`, packed `[CLS] a [SEP] b [SEP]` as in training
    (`data.text.pack_inputs`); its token-id twin takes the same three inputs
    as any text model, which `text_client` fills for pairs too.

    See the module docstring for the signatures and for what each kind of
    bad input returns.

    Args:
        model: keras.Model. From `build_text_classifier` (inputs `token_ids`,
            `padding_mask`, `segment_ids`), trained.
        backbone: TextBackbone. The backbone the model was built on; its
            tokenizer goes into the raw-string graph.
        labels: LabelVocabulary or list of str. Class (or output) names in
            id order; a list means a single-label task.
        export_dir: str or path. Base folder; models go to
            `<export_dir>/<model_name>/<version>` and
            `<export_dir>/<model_name>_token_ids/<version>`.
        model_name: str or None. Defaults to the name of `model_dir`, else
            the model's name.
        model_dir: str, path or None. The training folder: `params.json`
            supplies the trained sequence length and backbone, `metrics.json`
            the figures for the model card.
        metrics: dict or None. Metrics for the model card; overrides
            `model_dir/metrics.json`.
        sequence_length: int or None. Longest packed sequence ([CLS]/[SEP]
            included). Defaults to the trained one from `params.json`, else
            128.
        text_pair: bool or None. Whether the model takes text pairs.
            Defaults to what `params.json` says (`data.text_pair_column`
            set), else False.
        measure_latency: bool. Time batch-1 calls for the model card (about
            a second). Defaults to `True`.
        serving_jit_compile: bool. Compile the model call inside both
            serving functions with XLA (`jit_compile=True`), on chunks padded
            to `serving_shapes(sequence_length)` so compilation is bounded.
            TF Serving then needs `--xla_cpu_compilation_enabled`: without it
            the model cannot run ("bad Status on first compilation request"),
            so its warm-up requests fail and the server refuses it at load.
            Opt-in: measured in BUILD_NOTES.md "Serving levers". Defaults to
            `False`.
        serving_precision: str. `float32` (default): the served graph
            computes in float32 whatever policy the model was trained under
            (faster at small batches; see `serving_precision_scope`);
            `as_trained`: as the model was built (bf16 matmuls for a
            `mixed_bfloat16` model); `auto`: bf16 kernels where the lean
            graph timed faster in bf16 on this CPU, else float32
            (`serving_graph.fastest_lowering`; the card has the figures).
        lean_serving_graph: bool. Serve a keras-hub BERT encoder through
            `serving_graph.lower_text_model` (fused QKV, kernels stored in
            the serving dtype; checked against the Keras call, which serves
            instead where the check fails or the encoder is another kind).
            Defaults to `True`.

    Returns:
        The raw-string SavedModel's version folder.

    Raises:
        InputError: for a model without the token-id inputs, a label count
            that does not match the model's outputs, an invalid model name,
            or a sequence length the backbone cannot take.

    Example:

    ```python
    backbone = load_backbone("../shared/weights/paraphrase_minilm_l3_v2")
    model = build_text_classifier(backbone, num_classes=2)
    path = export_text_classifier(model, backbone, ["negative", "positive"], "exports",
                                  model_name="sst2", sequence_length=64)
    # Serve: tensorflow_model_server --model_base_path=$PWD/exports/sst2 ...
    ```
    """
    if not isinstance(backbone, TextBackbone):
        raise InputError(
            "The text export needs the TextBackbone the model was built on (for its tokenizer).",
            received={"backbone": type(backbone).__name__},
            fix="Pass the object load_backbone returned for the text backbone.",
        )
    if not isinstance(model.input, dict) or not set(TEXT_INPUTS) <= set(model.input):
        raise InputError(
            "The text export needs a model on token ids.",
            received={"model": model.name, "inputs": _input_names(model)},
            fix=f"Pass a model from build_text_classifier (inputs {', '.join(TEXT_INPUTS)}).",
        )
    # LoRA adapters (if any) merged into plain kernels: served as fast as a full fine-tune.
    model = merge_lora(model)
    names, task = _label_names_and_task(labels, model)
    base = _export_base(export_dir)
    params = _read_json(model_dir, "params.json")
    model_name = _model_name(model_name, model_dir, model)
    sequence_length = _sequence_length(sequence_length, params, backbone)
    if text_pair is None:
        text_pair = bool((params or {}).get("data", {}).get("text_pair_column"))
    tokenizer = backbone.tokenizer
    start_id, end_id, pad_id = int(tokenizer.start_id), int(tokenizer.end_id), int(tokenizer.pad_id)
    vocab_size = int(tokenizer.vocabulary_size)
    max_positions = int(backbone.max_sequence_length)
    num_segments = getattr(backbone.encoder, "num_segments", None)
    names_tensor = tf.constant(names)
    rows, widths = serving_shapes(sequence_length) if serving_jit_compile else (None, None)
    warm_shapes = warmup_shapes(sequence_length, serving_jit_compile)  # The card lists what is written.
    lowered = serving_lowering(model, serving_precision, lean_serving_graph, serving_jit_compile)
    served = lowered or functools.partial(model, training=False)
    # One XLA function for both signatures; it compiles once per (rows, width) it meets.
    call = tf.function(served, jit_compile=True) if widths else served

    def call_model(inputs: dict[str, tf.Tensor]) -> tf.Tensor:
        return _call_in_length_chunks(model, inputs, pad_id=pad_id, widths=widths,
                                      row_counts=rows, call=call)

    # === Functions ===

    def pieces(text: tf.Tensor) -> tf.RaggedTensor:
        # Invalid UTF-8 would make the tokenizer's regex and normalizer ops
        # fail or misbehave; U+FFFD keeps the rest of the text usable.
        text = tf.strings.unicode_transcode(
            text, "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD
        )
        return tokenizer.tokenize(text)

    def from_strings(*texts: tf.Tensor) -> tf.Tensor:
        inputs = pack_inputs(*(pieces(t) for t in texts), sequence_length=sequence_length,
                             start_id=start_id, end_id=end_id, pad_id=pad_id)
        return call_model(inputs)

    string_inputs = (TEXT_FEATURE, TEXT_PAIR_FEATURE) if text_pair else (TEXT_FEATURE,)
    string_specs = [tf.TensorSpec([None], tf.string, name=n) for n in string_inputs]

    @tf.function(input_signature=string_specs)
    def serve_text(*texts):
        return _prediction_outputs(from_strings(*texts), task, names_tensor)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def serve_examples(serialized):
        features = tf.io.parse_example(
            serialized, {n: tf.io.FixedLenFeature([], tf.string) for n in string_inputs}
        )
        return _tf_serving_outputs(
            from_strings(*(features[n] for n in string_inputs)), task, names_tensor
        )

    token_spec = {n: tf.TensorSpec([None, None], tf.int32, name=n) for n in TEXT_INPUTS}

    @tf.function(input_signature=[token_spec])
    def serve_token_ids(inputs):
        checked = _checked_token_inputs(inputs, vocab_size, max_positions, num_segments)
        return _prediction_outputs(call_model(checked), task, names_tensor)

    raw_signatures = {"serving_default": serve_text.get_concrete_function()}
    raw_signatures.update(_example_signature(serve_examples, task, len(names)))
    ids_signatures = {"serving_default": serve_token_ids.get_concrete_function()}

    # === Model card ===

    client = _client_tokenizer_settings(backbone)
    sample = {n: tf.constant(["a thoughtful, beautifully acted film that drags at the end"])
              for n in string_inputs}
    latency = {}
    if measure_latency:
        latency["serving_default"] = _median_ms(raw_signatures["serving_default"], sample)
        sample_ids = pack_inputs(
            *(tokenizer.tokenize(t) for t in sample.values()), sequence_length=sequence_length,
            start_id=start_id, end_id=end_id, pad_id=pad_id,
        )
        latency["serving_default (token ids)"] = _median_ms(
            ids_signatures["serving_default"], sample_ids
        )
    preprocessing = {
        "modality": "text",
        "sequence_length": sequence_length,
        "text_inputs": list(string_inputs),
        "packing": "[CLS] text [SEP] text_pair [SEP], segment ids 0 then 1" if text_pair
        else "[CLS] text [SEP], segment ids 0",
        "truncation": "to sequence_length with [CLS] and [SEP] always added; of a pair, the "
        "longer text loses word pieces first" if text_pair else "word pieces beyond "
        "sequence_length - 2 are dropped; [CLS] and [SEP] are always added",
        "padding": f"rows sorted by length, run in chunks of {SERVING_CHUNK_ROWS}, each "
        + (f"padded to the first of {widths} covering its longest row and to {rows} rows "
           "(XLA: bounded shapes)" if widths else "padded to its longest row")
        + "; outputs in request order",
        "jit_compile": bool(serving_jit_compile),
        "serving_graph": _serving_graph_card(lowered),
        "tf_serving_flags": ["--xla_cpu_compilation_enabled"] if serving_jit_compile else [],
        # `assets.extra/tf_serving_warmup_requests`: TF Serving replays these at load.
        "warmup_shapes": [list(shape) for shape in warm_shapes],
        "start_id": start_id,
        "end_id": end_id,
        "pad_id": pad_id,
        "vocabulary_size": vocab_size,
        "max_positions": max_positions,
        "lowercase": bool(backbone.lowercase),
        "invalid_utf8": "replaced by U+FFFD",
        "client_tokenizer": client,
    }
    card = _model_card(
        model=model,
        model_name=model_name,
        names=names,
        task=task,
        backbone_spec=backbone.spec,
        params=params,
        metrics=metrics if metrics is not None else _read_json(model_dir, "metrics.json"),
        preprocessing=preprocessing,
        latency=latency,
        compute_dtype=lowered.compute_dtype if lowered else None,
    )

    return publish_text_models(
        model, backbone, base, model_name, card,
        variables=lowered.served_variables if lowered else None,
        raw={"serve_text": serve_text, "serve_examples": serve_examples},
        raw_signatures=raw_signatures,
        token_ids={"serve_token_ids": serve_token_ids}, token_id_signatures=ids_signatures,
        warmup=_text_warmup_requests(tokenizer, warm_shapes, string_inputs, start_id=start_id,
                                     end_id=end_id),
    )


def publish_text_models(
    model: keras.Model, backbone: TextBackbone, base: Path, model_name: str,
    card: dict[str, Any], *, raw: dict[str, Any], raw_signatures: dict[str, Any],
    token_ids: dict[str, Any], token_id_signatures: dict[str, Any],
    warmup: tuple[list[dict], list[dict]] | None = None,
    variables: list[Any] | None = None,
) -> str:
    """Writes a text model's two SavedModels (strings in, token ids in) and publishes them.

    The one writer behind `export_text_classifier` and
    `token_export.export_token_classifier`: the raw-string model (the
    tokenizer's tables saved with it; `tensorflow_text` listed when its ops
    are needed) at `<base>/<model_name>/<version>`, the core-ops-only
    token-id twin at `<base>/<model_name>_token_ids/<version>`, each with
    the model card in `assets.extra/`, staged and renamed under one version.

    Args:
        model: keras.Model. The trained network.
        backbone: TextBackbone. Its tokenizer and vocabulary.
        base: Path. `_export_base(export_dir)`.
        model_name: str.
        card: dict. `_model_card(...)`, shared by both models.
        raw: dict. Attribute name -> tf.function of the raw-string model.
        raw_signatures: dict. Its signatures (`serving_default`, ...).
        token_ids: dict. Attribute name -> tf.function of the token-id model.
        token_id_signatures: dict. Its signatures.
        warmup: (raw-string requests, token-id requests) or None. Written
            as each model's TF Serving warm-up file (`serving_warmup`).
        variables: list or None. What the serving functions read, when not
            `model.variables` (a `serving_graph.LoweredTextModel`'s copies).

    Returns:
        The raw-string SavedModel's version folder.

    Raises:
        RuntimeError: when the token-id model would need non-core ops.
    """

    served_variables = list(model.variables) if variables is None else list(variables)

    def write_raw(directory: str) -> None:
        root = tf.Module()
        root.model_variables = served_variables
        # Lookup tables or loaded preprocess models the tokenizer's graph
        # reads must be reachable from the root to be saved.
        root.tokenizer_state = _tokenizer_trackables(backbone.tokenizer)
        for name, function in raw.items():
            setattr(root, name, function)
        _save(root, directory, raw_signatures)
        custom = non_core_ops(directory)
        _write_assets_extra(
            directory,
            {**card, "input": "strings", "custom_ops": custom,
             "requires": ["tensorflow_text"] if custom else [],
             "token_id_model": model_name + TOKEN_IDS_SUFFIX,
             "signatures": _describe_signatures(raw_signatures)},
            backbone.vocabulary,
        )
        if warmup and warmup[0]:
            write_warmup_requests(directory, warmup[0])

    def write_token_ids(directory: str) -> None:
        root = tf.Module()
        root.model_variables = served_variables
        for name, function in token_ids.items():
            setattr(root, name, function)
        _save(root, directory, token_id_signatures)
        custom = non_core_ops(directory)
        if custom:
            raise RuntimeError(
                f"The token-id SavedModel contains non-core ops {custom}; it would not load "
                "on a stock TF Serving binary."
            )
        _write_assets_extra(
            directory,
            {**card, "input": "token_ids", "custom_ops": [], "requires": [],
             "raw_string_model": model_name,
             "signatures": _describe_signatures(token_id_signatures)},
            backbone.vocabulary,
        )
        if warmup and warmup[1]:
            write_warmup_requests(directory, warmup[1])

    roots = [base / (model_name + TOKEN_IDS_SUFFIX), base / model_name]
    version = _stage_and_publish(roots, [write_token_ids, write_raw])
    return str(roots[1] / str(version))


# Rows per chunk of a length-sorted serving batch (`_call_in_length_chunks`;
# measured in BUILD_NOTES.md "Serving levers").
SERVING_CHUNK_ROWS = 16
# Chunks the serving loop runs at once (`tf.while_loop`'s `parallel_iterations`): all
# four of a 64-row batch, so TensorFlow's inter-op pool fills the gaps one chunk's small
# ops leave. MiniLM-L6 on the 2-core AMX Xeon, batch 64, default threads: 162 ex/s one
# at a time, 199 two, 238 four (medians of 3 alternations; BUILD_NOTES "Serving levers").
SERVING_CHUNKS_IN_FLIGHT = 4


def serving_shapes(sequence_length: int) -> tuple[list[int], list[int]]:
    """The chunk shapes an XLA serving function compiles for: row counts and widths.

    Rows: powers of two up to `SERVING_CHUNK_ROWS` (a batch of 1 stays 1
    row); widths: `data.text.bucket_widths(sequence_length)`. At
    most `len(rows) * len(widths)` compilations (5 x 8 at length 128), each
    once per served model.

    Example:

    ```python
    serving_shapes(128)  # ([1, 2, 4, 8, 16], [8, 16, 24, 32, 48, 64, 96, 128])
    ```
    """
    rows = [1 << i for i in range(SERVING_CHUNK_ROWS.bit_length()) if 1 << i < SERVING_CHUNK_ROWS]
    widths = bucket_widths(sequence_length)
    return [*rows, SERVING_CHUNK_ROWS], widths


def warmup_shapes(sequence_length: int, jit_compile: bool) -> list[tuple[int, int]]:
    """The `(rows, width)` of the requests a text export's TF Serving warm-up file replays.

    With XLA every chunk shape the serving function compiles
    (`serving_shapes`), so all compilation happens when TF Serving loads the
    model, before traffic, and a server without
    `--xla_cpu_compilation_enabled` refuses the model at load. Without XLA,
    one row at the shortest and at the longest width and a full chunk at the
    longest: the first call's graph and oneDNN set-up.

    Example:

    ```python
    warmup_shapes(128, jit_compile=False)  # [(1, 8), (1, 128), (16, 128)]
    ```
    """
    rows, widths = serving_shapes(sequence_length)
    if jit_compile:
        return [(r, w) for w in widths for r in rows]
    return [(1, widths[0]), (1, widths[-1]), (rows[-1], widths[-1])]


def _text_warmup_requests(
    tokenizer: Any, shapes: Sequence[tuple[int, int]], string_inputs: Sequence[str], *,
    start_id: int, end_id: int,
) -> tuple[list[dict], list[dict]]:
    """Raw-string and token-id requests of `shapes`: rows of one-piece words packed to each width.

    A pair's pieces are split between its two texts (`[CLS] a [SEP] b [SEP]`).
    """
    word, piece = None, None
    for candidate in _SAMPLE_WORDS:
        pieces = tokenizer.tokenize(tf.constant([candidate])).to_list()[0]
        if piece is None:
            piece = pieces[0]  # Token ids still warm up if no word below is one piece.
        if candidate.isalpha() and len(pieces) == 1:
            word, piece = candidate, pieces[0]
            break
    raw, ids = [], []
    for rows, width in shapes:
        free = width - 1 - len(string_inputs)  # [CLS] and one [SEP] per text.
        counts = [(free + 1) // 2, free // 2] if len(string_inputs) == 2 else [free]
        raw.append({name: [" ".join([word or ""] * n)] * rows
                    for name, n in zip(string_inputs, counts, strict=True)})
        token_ids, segment_ids = pack_ids(*([piece] * n for n in counts), sequence_length=width,
                                          start_id=start_id, end_id=end_id)
        ids.append({"token_ids": [token_ids] * rows, "padding_mask": [[1] * width] * rows,
                    "segment_ids": [segment_ids] * rows})
    return (raw if word else []), ids


def _call_in_length_chunks(
    model: keras.Model,
    inputs: dict[str, tf.Tensor],
    *,
    pad_id: int,
    chunk_rows: int = SERVING_CHUNK_ROWS,
    widths: Sequence[int] | None = None,
    row_counts: Sequence[int] | None = None,
    call: Callable[[dict[str, tf.Tensor]], tf.Tensor] | None = None,
) -> tf.Tensor:
    """`model(inputs)` run on length-sorted chunks of the batch, in the batch's order.

    A batch padded to its longest row spends most of its matmul work on
    padding when lengths are mixed (an SST-2 batch of 64: ~25 real tokens
    per row, padded to ~60). Rows are sorted by length (the position after
    their last real token), cut into chunks of `chunk_rows`, each chunk
    sliced to its longest row, and the outputs are put back in the request's
    order. A padding position is masked out of attention and pooling, so
    each row's output is the unchunked one up to float rounding (tests check
    1e-5). With `widths`, a chunk is padded up (`pad_id`, mask 0) to the
    first width covering its longest row instead: a bounded set of shapes,
    which XLA needs; without XLA it measured slower than exact widths
    (oneDNN's primitive cache gains less than the extra padding costs;
    BUILD_NOTES.md "Serving levers"). With `row_counts` (ascending, the
    last `chunk_rows`), a chunk is also filled up to the first count covering
    its rows (copies of its last row, dropped from the outputs). `call`
    replaces `model(rows, training=False)` (an XLA-compiled function).
    Up to `SERVING_CHUNKS_IN_FLIGHT` chunks run at once; each writes its own
    slot, so the result does not depend on the order they finish in.

    A row with no real token keeps the full width: its (meaningless) output
    then also matches the unchunked call's. An empty batch returns
    `[0, outputs]` (see `_call_or_empty`).
    """
    ids = inputs["token_ids"]
    batch, width = tf.shape(ids)[0], tf.shape(ids)[1]
    real = tf.cast(inputs["padding_mask"], tf.bool)
    last = tf.reduce_max(tf.where(real, tf.range(1, width + 1)[None, :], 0), axis=1)
    lengths = tf.where(last > 0, last, width)
    order = tf.argsort(lengths, stable=True)
    ordered = {name: tf.gather(value, order) for name, value in inputs.items()}
    ordered_lengths = tf.gather(lengths, order)
    edges = tf.constant(sorted(widths or [0]), tf.int32)
    num_chunks = (batch + chunk_rows - 1) // chunk_rows
    out_width = int(model.outputs[0].shape[-1])

    def chunk(i: tf.Tensor, outputs: tf.TensorArray):
        start = i * chunk_rows
        stop = tf.minimum(start + chunk_rows, batch)
        longest = ordered_lengths[stop - 1]  # Sorted: the chunk's last row is its longest.
        target = longest
        if widths:
            # The first edge >= longest; a row longer than every edge keeps its length.
            index = tf.searchsorted(edges, longest[None], side="left")[0]
            target = tf.concat([edges, longest[None]], 0)[index]
        count = stop - start
        take = None
        if row_counts:
            # Repeat the last row up to the first allowed count (outputs dropped below).
            fill_to = tf.constant(list(row_counts), tf.int32)
            filled = fill_to[tf.searchsorted(fill_to, count[None], side="left")[0]]
            take = tf.minimum(start + tf.range(filled), stop - 1)
        rows = {}
        for name, value in ordered.items():
            part = value[start:stop] if take is None else tf.gather(value, take)
            part = part[:, : tf.minimum(target, width)]
            fill = pad_id if name == "token_ids" else 0
            rows[name] = tf.pad(part, [[0, 0], [0, target - tf.shape(part)[1]]],
                                constant_values=fill)
        result = call(rows) if call is not None else model(rows, training=False)
        return i + 1, outputs.write(i, tf.cast(result, tf.float32)[:count])

    def run() -> tf.Tensor:
        results = tf.TensorArray(tf.float32, size=num_chunks, infer_shape=False,
                                 element_shape=tf.TensorShape([None, out_width]))
        _, results = tf.while_loop(lambda i, _: i < num_chunks, chunk, (0, results),
                                   parallel_iterations=SERVING_CHUNKS_IN_FLIGHT)
        return tf.gather(results.concat(), tf.math.invert_permutation(order))

    return tf.cond(batch > 0, run, lambda: tf.zeros([0, out_width], tf.float32))


def serving_lowering(model: keras.Model, serving_precision: str, lean_serving_graph: bool,
                     jit_compile: bool = False) -> LoweredTextModel | None:
    """The lean graph a text export serves (None: the Keras call), inside its serving scope.

    `auto` times float32 against bf16, then the one-row float64 attention
    form unless the export compiles with XLA (`serving_graph.fastest_lowering`);
    otherwise the lowering computes as the scope left the encoder.
    """
    if not lean_serving_graph:
        return None
    if serving_precision == "auto":
        return fastest_lowering(model, float64_attention=not jit_compile)
    return lower_text_model(model)


def _serving_graph_card(lowered: LoweredTextModel | None) -> dict[str, Any]:
    """The model card's account of what computes the encoder (`serving_graph`)."""
    if lowered is None:
        return {"kind": "keras"}
    # The dtype it computes in is the card's own `compute_dtype`, said once.
    card = {"kind": "lean_bert", "slices": lowered.slices,
            "float64_attention_up_to": lowered.float64_attention_up_to,
            "max_difference_from_keras": lowered.max_difference}
    if lowered.timing:
        card["timing"] = lowered.timing
    return card


def _checked_token_inputs(
    inputs: dict[str, tf.Tensor], vocab_size: int, max_positions: int, num_segments: int | None
) -> dict[str, tf.Tensor]:
    """Asserts what the encoder would otherwise get wrong silently or cryptically."""
    ids = inputs["token_ids"]
    shape = tf.shape(ids)
    checks = [
        tf.debugging.assert_equal(
            tf.shape(inputs[name]), shape,
            message=f"{name} must have the shape of token_ids (batch, sequence).",
        )
        for name in ("padding_mask", "segment_ids")
    ]
    checks += [
        tf.debugging.assert_non_negative(ids, message="token_ids must be >= 0."),
        tf.debugging.assert_less(
            ids, vocab_size, message=f"token_ids must be < the vocabulary size, {vocab_size}."
        ),
        tf.debugging.assert_less_equal(
            shape[1], max_positions,
            message=f"token_ids has more positions than the encoder allows ({max_positions}).",
        ),
        tf.debugging.Assert(
            tf.logical_or(tf.equal(shape[0], 0), shape[1] > 0),
            ["token_ids has no positions; each row needs at least [CLS] and [SEP]."],
        ),
        tf.debugging.assert_non_negative(inputs["segment_ids"], message="segment_ids must be >= 0."),
    ]
    if num_segments:
        checks.append(tf.debugging.assert_less(
            inputs["segment_ids"], int(num_segments),
            message=f"segment_ids must be < {int(num_segments)}.",
        ))
    with tf.control_dependencies([c for c in checks if c is not None]):
        return {name: tf.identity(inputs[name]) for name in TEXT_INPUTS}


def _client_tokenizer_settings(backbone: TextBackbone) -> dict[str, Any] | None:
    """What `text_client.TextClient` needs, when it can reproduce this tokenizer."""
    layer = getattr(backbone.tokenizer, "tokenizer", None)
    # keras-hub WordPiece tokenizers (BERT, DistilBERT, ...) are the ones
    # text_client implements; duck-typed so keras_hub is not imported here.
    wordpiece = all(hasattr(layer, a) for a in ("suffix_indicator", "split_on_cjk", "oov_token"))
    if not wordpiece or not backbone.vocabulary or getattr(layer, "special_tokens_in_strings", False):
        return None
    tok = backbone.tokenizer
    return {
        "lowercase": bool(layer.lowercase),
        "strip_accents": bool(layer.strip_accents),
        "split": bool(layer.split),
        "split_on_cjk": bool(layer.split_on_cjk),
        "suffix_indicator": str(layer.suffix_indicator),
        "oov_token": str(layer.oov_token),
        "start_id": int(tok.start_id),
        "end_id": int(tok.end_id),
        "pad_id": int(tok.pad_id),
    }


def _tokenizer_trackables(tokenizer: Any) -> list[Any]:
    # Keras layers are left out: tracking them would save Keras objects into
    # the SavedModel, and keras-hub's WordPiece tokenizers keep their model in
    # graph constants, which are saved with the functions anyway.
    return [
        value for value in vars(tokenizer).values()
        if isinstance(value, tf.__internal__.tracking.Trackable)
        and not isinstance(value, keras.layers.Layer)
    ]


def _sequence_length(value: int | None, params: dict | None, backbone: TextBackbone) -> int:
    if value is None:
        value = (params or {}).get("model", {}).get("sequence_length") or DEFAULT_SEQUENCE_LENGTH
    limit = int(backbone.max_sequence_length)
    if not isinstance(value, int) or not 3 <= value <= limit:
        raise InputError(
            "Invalid value for argument `sequence_length`.",
            received={"sequence_length": value},
            fix=f"Expected an integer from 3 ([CLS], one piece, [SEP]) to {limit}, the "
            "backbone's maximum.",
        )
    return value


# === Images ===


@exported_in_serving_precision
def export_image_classifier(
    model: keras.Model,
    labels: LabelVocabulary | Sequence[str],
    export_dir: str | os.PathLike,
    *,
    image_size: int,
    model_name: str | None = None,
    model_dir: str | os.PathLike | None = None,
    metrics: dict[str, Any] | None = None,
    backbone: BackboneSpec | str | None = None,
    crop_to_aspect_ratio: bool = True,
    measure_latency: bool = True,
    serving_precision: str = "float32",
) -> str:
    """Writes an image classifier as a TF Serving SavedModel that takes encoded images.

    See the module docstring for the signatures and for what bad images
    return.

    Args:
        model: keras.Model. Takes raw 0..255 pixels `(batch, image_size,
            image_size, 3)` and normalises them itself (as
            `build_image_classifier` builds it).
        labels: LabelVocabulary or list of str. Class names in id order.
        export_dir: str or path. Models go to `<export_dir>/<model_name>/<version>`.
        image_size: int. The side the model was trained on.
        model_name: str or None. Defaults to the name of `model_dir`, else
            the model's name.
        model_dir: str, path or None. Training folder (`params.json`,
            `metrics.json` for the model card).
        metrics: dict or None. Metrics for the model card; overrides
            `model_dir/metrics.json`.
        backbone: BackboneSpec, str or None. For the model card; defaults to
            the backbone in `params.json`.
        crop_to_aspect_ratio: bool. Centre-crop to a square before resizing,
            as the training data was (`data.image`'s default). Defaults to
            `True`.
        measure_latency: bool. Time batch-1 calls for the model card.
            Defaults to `True`.
        serving_precision: str. `float32` (default): the served graph
            computes in float32 whatever policy the model was trained under
            (faster at small batches; see `serving_precision_scope`);
            `as_trained`: as the model was built (bf16 matmuls for a
            `mixed_bfloat16` model).

    Returns:
        The SavedModel's version folder.

    Raises:
        InputError: for a model that does not take `(batch, size, size, 3)`
            images of `image_size`, a label count that does not match the
            outputs, or an invalid model name.

    Example:

    ```python
    model = build_image_classifier("scratch_cnn", num_classes=2)
    path = export_image_classifier(model, ["ants", "bees"], "exports", image_size=128,
                                   model_name="hymenoptera")
    ```
    """
    # Applied by `exported_in_serving_precision` (`auto` computes float32: images have
    # no lean graph to time); the card's compute_dtype says which.
    del serving_precision
    size = _check_image_model(model, image_size)
    names, task = _label_names_and_task(labels, model)
    base = _export_base(export_dir)
    params = _read_json(model_dir, "params.json")
    model_name = _model_name(model_name, model_dir, model)
    names_tensor = tf.constant(names)
    crop = bool(crop_to_aspect_ratio)
    pixel_spec = tf.TensorSpec([size, size, 3], tf.float32)

    def from_bytes(image_bytes: tf.Tensor) -> tf.Tensor:
        count = tf.shape(image_bytes)[0]
        images = tf.map_fn(
            lambda args: _decode_for_model(args[0], args[1], size, crop),
            (image_bytes, tf.range(count)),
            fn_output_signature=pixel_spec,
        )
        return _predict_images(model, images)

    def from_pixels(images: tf.Tensor) -> tf.Tensor:
        shape = tf.shape(images)
        resized = tf.cond(
            tf.logical_and(tf.equal(shape[1], size), tf.equal(shape[2], size)),
            lambda: images,
            lambda: tf.map_fn(
                lambda image: _resize(image, size, crop), images, fn_output_signature=pixel_spec
            ),
        )
        return _predict_images(model, tf.ensure_shape(resized, [None, size, size, 3]))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve_bytes(image_bytes):
        return _prediction_outputs(from_bytes(image_bytes), task, names_tensor)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="images")])
    def serve_images(images):
        return _prediction_outputs(from_pixels(images), task, names_tensor)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def serve_images_uint8(images):
        return _prediction_outputs(from_pixels(tf.cast(images, tf.float32)), task, names_tensor)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def serve_examples(serialized):
        features = tf.io.parse_example(
            serialized, {IMAGE_FEATURE: tf.io.FixedLenFeature([], tf.string)}
        )
        return _tf_serving_outputs(from_bytes(features[IMAGE_FEATURE]), task, names_tensor)

    signatures = {
        "serving_default": serve_bytes.get_concrete_function(),
        "predict_images": serve_images.get_concrete_function(),
        "predict_images_uint8": serve_images_uint8.get_concrete_function(),
    }
    signatures.update(_example_signature(serve_examples, task, len(names)))

    latency = {}
    if measure_latency:
        gray = tf.fill([size, size, 3], tf.constant(128, tf.uint8))
        latency["serving_default"] = _median_ms(
            signatures["serving_default"], {"image_bytes": tf.io.encode_jpeg(gray)[None]}
        )
        latency["predict_images"] = _median_ms(
            signatures["predict_images"], {"images": tf.cast(gray, tf.float32)[None]}
        )
    spec = _image_backbone_spec(backbone, params)
    preprocessing = {
        "modality": "image",
        "image_size": size,
        "input_pixels": "RGB, 0..255 (the model normalises them itself)",
        "pixel_convention": _pixel_convention(model),
        "decode": "JPEG, PNG, GIF (first frame), BMP, WebP; grayscale, palette and RGBA "
        "become RGB",
        "crop_to_aspect_ratio": crop,
        "resize": "antialiased bilinear to image_size, rounded to uint8 (as in training)",
    }
    card = _model_card(
        model=model,
        model_name=model_name,
        names=names,
        task=task,
        backbone_spec=spec,
        params=params,
        metrics=metrics if metrics is not None else _read_json(model_dir, "metrics.json"),
        preprocessing=preprocessing,
        latency=latency,
    )

    def write(directory: str) -> None:
        root = tf.Module()
        root.model_variables = list(model.variables)
        root.serve_bytes = serve_bytes
        root.serve_images = serve_images
        root.serve_images_uint8 = serve_images_uint8
        root.serve_examples = serve_examples
        _save(root, directory, signatures)
        _write_assets_extra(
            directory,
            {**card, "input": "image_bytes", "custom_ops": non_core_ops(directory),
             "requires": [], "signatures": _describe_signatures(signatures)},
            None,
        )
        # One image and a batch: the first calls' graph and oneDNN set-up, at TF Serving's load.
        write_warmup_requests(directory, [sample_request(card, rows)
                                          for rows in (1, SERVING_CHUNK_ROWS)])

    root_dir = base / model_name
    version = _stage_and_publish([root_dir], [write])
    return str(root_dir / str(version))


def _predict_images(model: keras.Model, images: tf.Tensor) -> tf.Tensor:
    return _call_or_empty(model, images, tf.shape(images)[0])


def _call_or_empty(model: keras.Model, inputs: Any, batch_size: tf.Tensor) -> tf.Tensor:
    """`model(inputs)` as float32, or `[0, outputs]` zeros for an empty batch.

    Layers need not cope with an empty batch: TF 2.21's CPU Conv2D returns its
    input unchanged for one (the next layer then fails), and CLS pooling takes
    position 0 of a `(0, 0)` batch of token ids, which has none.
    """
    width = int(model.outputs[0].shape[-1])
    return tf.cond(
        batch_size > 0,
        lambda: tf.cast(model(inputs, training=False), tf.float32),
        lambda: tf.zeros([0, width], tf.float32),
    )


def _check_image_model(model: keras.Model, image_size: int) -> int:
    shape = tuple(model.inputs[0].shape) if len(model.inputs) == 1 else ()
    if len(shape) != 4 or shape[-1] != 3:
        raise InputError(
            "The image export needs a model on (batch, size, size, 3) pixels.",
            received={"model": model.name, "inputs": _input_names(model)},
            fix="Pass a model from build_image_classifier.",
        )
    if not isinstance(image_size, int) or image_size < 1:
        raise InputError("Image size must be a positive integer.", received={"image_size": image_size})
    if shape[1] not in (None, image_size) or shape[2] not in (None, image_size):
        raise InputError(
            "The image size does not match the model's input.",
            received={"image_size": image_size, "model_input": list(shape[1:3])},
            fix=f"Use image_size={shape[1]}.",
        )
    return image_size


def _looks_like_image(data: tf.Tensor) -> tf.Tensor:
    # Padding keeps substr in range for inputs shorter than the longest magic.
    head = tf.strings.join([tf.strings.substr(data, 0, 12), b"\0" * 12])
    checks = [tf.equal(tf.strings.substr(head, 0, len(m)), m) for m in _IMAGE_MAGIC]
    checks.append(tf.logical_and(
        tf.equal(tf.strings.substr(head, 0, 4), b"RIFF"),
        tf.equal(tf.strings.substr(head, 8, 4), b"WEBP"),
    ))
    return tf.reduce_any(tf.stack(checks))


def _decode_for_model(data: tf.Tensor, index: tf.Tensor, size: int, crop: bool) -> tf.Tensor:
    # Imported here: data.image is the one definition of decode/resize, and
    # matching it is what makes serving agree with evaluation.
    from tfhub_finetune.data.image import decode_image

    message = tf.strings.format(
        "image_bytes[{}] ({} bytes) is not an encoded image; expected JPEG, PNG, GIF, BMP or "
        "WebP data.",
        [index, tf.strings.length(data)],
    )
    check = tf.debugging.Assert(_looks_like_image(data), [message])
    with tf.control_dependencies([check]):
        image = decode_image(data)
    # The training pipeline caches resized images as uint8 (data.image._resize).
    return tf.cast(tf.cast(tf.round(_resize(image, size, crop)), tf.uint8), tf.float32)


def _resize(image: tf.Tensor, size: int, crop: bool) -> tf.Tensor:
    from tfhub_finetune.data.image import resize_image

    return resize_image(image, size, crop_to_aspect_ratio=crop)


def _pixel_convention(model: keras.Model) -> str | None:
    from tfhub_finetune.backbones.image_source import pixel_convention_of

    for layer in model.layers:
        if isinstance(layer, keras.layers.Rescaling):
            return pixel_convention_of(layer.scale, layer.offset)
    return None


def _image_backbone_spec(backbone: BackboneSpec | str | None, params: dict | None) -> dict | str | None:
    if isinstance(backbone, BackboneSpec):
        return backbone.to_dict()
    if backbone:
        return str(backbone)
    return (params or {}).get("model", {}).get("backbone")


def export_tflite(
    model: keras.Model,
    path: str | os.PathLike,
    *,
    quantization: str = "none",
    tolerance: float | None = None,
    num_check_inputs: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """Converts an image or text classifier to TFLite and checks it against Keras.

    An image model's TFLite file takes the same raw 0..255 float pixels as the
    Keras model (normalisation is inside); decoding and resizing stay with the
    app. A text model's takes its token-id inputs (`token_ids`,
    `padding_mask`, `segment_ids`: int32 `(batch, length)`, any batch and
    length), as the token-id SavedModel does; `tflite_text.TfliteTextClassifier`
    tokenizes raw strings for it. `quantization="int8"` is TFLite's
    dynamic-range quantization (`tf.lite.Optimize.DEFAULT` without a
    representative dataset): weights are stored as int8 with per-channel
    scales, activations stay float32, and the interpreter's hybrid kernels
    quantize the activations of convolutions and matmuls on the fly. No
    calibration data is needed.

    Args:
        model: keras.Model. An image classifier on `(batch, size, size, 3)`,
            or a text model whose inputs are all integer `(batch, length)`.
        path: str or path. The `.tflite` file to write (atomically).
        quantization: str. `"none"` (float32) or `"int8"` (dynamic range).
            Defaults to `"none"`.
        tolerance: float or None. Largest accepted absolute difference
            between TFLite and Keras outputs on random inputs. Defaults to
            `1e-4` for float32 and `0.25` for int8, whose accuracy is
            measured on real data instead (`selection.serving_forms`); the
            check only catches a broken conversion.
        num_check_inputs: int. Random images (or token rows) compared.
            Defaults to `4`.
        seed: int. Seed of the random inputs. Defaults to `0`.

    Returns:
        A dict with `path`, `bytes`, `max_abs_diff`, `quantization` and
        `inputs` (name -> `dtype[shape]`, -1 for any size).

    Raises:
        InputError: if the model takes neither images nor token ids.
        RuntimeError: if TFLite's outputs differ by more than `tolerance`
            (nothing is written).

    Example:

    ```python
    info = export_tflite(model, "exports/hymenoptera.tflite")
    info["max_abs_diff"]  # e.g. 3e-07
    export_tflite(text_model, "exports/sst2.tflite", quantization="int8")
    ```
    """
    if quantization not in TFLITE_QUANTIZATIONS:
        raise InputError(
            "Invalid value for argument `quantization`.", received={"quantization": quantization},
            fix=f"Expected one of: {', '.join(TFLITE_QUANTIZATIONS)}.",
        )
    if tolerance is None:
        tolerance = 0.25 if quantization == "int8" else 1e-4
    specs, check_inputs = _tflite_inputs(model, num_check_inputs, np.random.default_rng(seed))
    # TFLite's kernels are float32 (and int8): a model trained under mixed_bfloat16
    # is traced computing in float32, as the SavedModel export does by default.
    with serving_precision_scope(model):
        flatbuffer, expected, got = _convert_and_run(model, specs, check_inputs, quantization)
    diff = float(np.max(np.abs(got - expected)))
    if not diff <= tolerance:
        raise RuntimeError(
            f"TFLite outputs differ from Keras by {diff:.3g} (> tolerance {tolerance:g}); "
            "the .tflite file was not written."
        )
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(flatbuffer)
    return {"path": str(path), "bytes": len(flatbuffer), "max_abs_diff": diff,
            "quantization": quantization,
            "inputs": {n: f"{s.dtype.name}{[-1 if d is None else d for d in s.shape]}"
                       for n, s in specs.items()}}


def _convert_and_run(model: keras.Model, specs: dict[str, tf.TensorSpec],
                     check_inputs: dict[str, np.ndarray], quantization: str
                     ) -> tuple[bytes, np.ndarray, np.ndarray]:
    """(flatbuffer, Keras' outputs, the interpreter's outputs) on the check inputs."""
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    names = list(specs)
    text = "token_ids" in specs
    if text:
        function = tf.function(
            lambda *args: model(dict(zip(names, args, strict=True)), training=False))
    else:
        function = tf.function(lambda images: model(images, training=False))
    concrete = function.get_concrete_function(*specs.values())
    # Frozen first: given the live function, the TF 2.21 converter keeps Keras 3
    # variables as TFLite resource variables that nothing initialises, and the
    # interpreter then returns NaN.
    frozen = convert_variables_to_constants_v2(concrete)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen], tf.Module())
    if quantization == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    flatbuffer = converter.convert()

    interpreter = tflite_interpreter(model_content=flatbuffer)
    if text:
        expected = np.asarray(model(check_inputs, training=False))
        # Each row alone, at its own length: padding must not change the answer.
        got = np.concatenate([run_tflite(interpreter, _rows(check_inputs, i))
                              for i in range(len(expected))])
    else:
        (images,) = check_inputs.values()
        expected = np.asarray(model(images, training=False))
        got = run_tflite(interpreter, images)
    return flatbuffer, expected, got


def _tflite_inputs(model: keras.Model, rows: int, rng: np.random.Generator
                   ) -> tuple[dict[str, tf.TensorSpec], dict[str, np.ndarray]]:
    """The TFLite function's input specs and random check inputs, from the model's inputs.

    Images: one `(1, size, size, 3)` float input (the interpreter resizes the
    batch). Token ids: every input `(None, None)` int32, checked on rows of
    different lengths padded to the longest (what a client sends).
    """
    shape = tuple(model.inputs[0].shape) if len(model.inputs) == 1 else ()
    if len(shape) == 4 and shape[-1] == 3 and shape[1] is not None and shape[2] is not None:
        images = rng.uniform(0, 255, (rows, *shape[1:])).astype(np.float32)
        name = _input_names(model)[0]
        return ({name: tf.TensorSpec([1, *shape[1:]], tf.float32, name=name)}, {name: images})
    names = _input_names(model)
    # One answer per text: a per-token model's outputs differ in length row by row.
    if "token_ids" in names and set(names) <= set(TEXT_INPUTS) \
            and all(len(x.shape) == 2 and tf.as_dtype(x.dtype).is_integer
                    for x in model.inputs) \
            and len(model.outputs[0].shape) == 2:
        length = 16
        lengths = rng.integers(1, length + 1, rows)
        lengths[0] = length
        mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
        # Ids below 100 exist in every word-piece vocabulary (specials and bytes).
        values = {"token_ids": rng.integers(1, 100, (rows, length)).astype(np.int32) * mask,
                  "padding_mask": mask, "segment_ids": np.zeros_like(mask)}
        return ({n: tf.TensorSpec([None, None], tf.int32, name=n) for n in names},
                {n: values[n] for n in names})
    raise InputError(
        "TFLite export needs an image model with a fixed input size or a token-id text "
        "classifier (one answer per text).",
        received={"model": model.name, "inputs": names},
        fix="Pass a model from build_image_classifier or build_text_classifier.",
    )


def _rows(inputs: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    """Row `i` of every input, trimmed to its real length (as a client would send it alone)."""
    length = int(inputs["padding_mask"][i].sum()) if "padding_mask" in inputs else None
    return {k: v[i : i + 1, :length] for k, v in inputs.items()}


def tflite_interpreter(**kwargs: Any) -> Any:
    """`tf.lite.Interpreter(**kwargs)`, tensors allocated, without its deprecation warning.

    Deprecated in favour of ai_edge_litert (LiteRT), which is not a
    dependency; the two run the same flatbuffers.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        interpreter = tf.lite.Interpreter(**kwargs)
    interpreter.allocate_tensors()
    return interpreter


def run_tflite(interpreter: Any, inputs: np.ndarray | Mapping[str, np.ndarray]) -> np.ndarray:
    """One batch through a TFLite interpreter: its first output.

    `inputs` is the one input's array (images) or a mapping from input name
    to array (a text model's `token_ids`, `padding_mask`, `segment_ids`;
    names as `export_tflite` wrote them). Input tensors are resized when
    their shape differs, so consecutive batches of one shape allocate once.

    Example:

    ```python
    probabilities = run_tflite(tflite_interpreter(model_path="model.tflite"), images)
    probabilities = run_tflite(interpreter, client.encode(["a fine film"]))
    ```
    """
    details = interpreter.get_input_details()
    if isinstance(inputs, Mapping):
        arrays = [np.asarray(inputs[_tflite_input_name(d["name"], inputs)], dtype=d["dtype"])
                  for d in details]
    else:
        arrays = [np.asarray(inputs, dtype=details[0]["dtype"])]
    resized = False
    for detail, array in zip(details, arrays, strict=True):
        if list(detail["shape"]) != list(array.shape):
            interpreter.resize_tensor_input(detail["index"], list(array.shape))
            resized = True
    if resized:
        interpreter.allocate_tensors()
    for detail, array in zip(details, arrays, strict=True):
        interpreter.set_tensor(detail["index"], array)
    interpreter.invoke()
    return np.array(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))


def _tflite_input_name(tensor_name: str, inputs: Mapping[str, Any]) -> str:
    """Which of `inputs` feeds the TFLite tensor `tensor_name` (e.g. `serving_default_token_ids:0`)."""
    for key in sorted(inputs, key=len, reverse=True):
        if tensor_name == key or tensor_name.split(":")[0].endswith(key):
            return key
    raise InputError(
        "A TFLite input has no matching array.", received={"tensor": tensor_name},
        fix=f"Pass one of the model's inputs; got: {', '.join(sorted(inputs))}.",
    )


# === Outputs shared by every modality ===


def _prediction_outputs(predictions: tf.Tensor, task: str, names: tf.Tensor) -> dict[str, tf.Tensor]:
    """Predict-API outputs; every one is batched, so TF Serving's row format works."""
    predictions = tf.cast(predictions, tf.float32)
    if task == "regression":
        return {"scores": predictions}
    rows = tf.shape(predictions)[0]
    if task == "multi_label":
        return {
            "probabilities": predictions,
            "label_names": tf.tile(names[None, :], [rows, 1]),
            "predicted": predictions >= MULTI_LABEL_THRESHOLD,
        }
    ids = tf.argmax(predictions, axis=-1, output_type=tf.int32)
    return {"probabilities": predictions, "label_ids": ids, "label_names": tf.gather(names, ids)}


def _tf_serving_outputs(predictions: tf.Tensor, task: str, names: tf.Tensor) -> dict[str, tf.Tensor]:
    """Classify API (`classes`, `scores`) or Regress API (`outputs`) tensors."""
    predictions = tf.cast(predictions, tf.float32)
    if task == "regression":
        return {"outputs": predictions[:, 0]}
    rows = tf.shape(predictions)[0]
    return {"classes": tf.tile(names[None, :], [rows, 1]), "scores": predictions}


def _example_signature(function, task: str, num_outputs: int) -> dict[str, Any]:
    if task == "regression":
        # The Regress API returns one float per example.
        return {"regress": function.get_concrete_function()} if num_outputs == 1 else {}
    return {"classify": function.get_concrete_function()}


# === SavedModel writing ===


def _save(root: tf.Module, directory: str, signatures: dict[str, Any]) -> None:
    # SavedModel writing logs INFO lines (shards, assets, fingerprint) that
    # would bury the pipeline's own summary. A filter, because saving resets
    # the absl logger's level.
    loggers = [logging.getLogger(name) for name in ("tensorflow", "absl")]
    for logger in loggers:
        logger.addFilter(_warnings_and_above)
    try:
        tf.saved_model.save(root, directory, signatures=signatures)
    finally:
        for logger in loggers:
            logger.removeFilter(_warnings_and_above)
    _set_method_names(directory)


def _warnings_and_above(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def _set_method_names(directory: str) -> None:
    """Marks `classify`/`regress` for TF Serving's Classify/Regress APIs.

    `tf.saved_model.save` writes every signature as `tensorflow/serving/predict`
    (tensorflow#38081); TF Serving builds that check method names reject such
    a signature for Classify ("Expected classification signature method_name
    to be tensorflow/serving/classify"), so the names are set in the proto.
    """
    from tensorflow.core.protobuf import saved_model_pb2

    file = os.path.join(directory, "saved_model.pb")
    saved = saved_model_pb2.SavedModel()
    with open(file, "rb") as f:
        saved.ParseFromString(f.read())
    changed = False
    for meta_graph in saved.meta_graphs:
        for key, method in (("classify", CLASSIFY_METHOD), ("regress", REGRESS_METHOD)):
            if key in meta_graph.signature_def:
                meta_graph.signature_def[key].method_name = method
                changed = True
    if changed:
        with open(file, "wb") as f:
            f.write(saved.SerializeToString())


def graph_op_types(saved_model_dir: str | os.PathLike) -> set[str]:
    """Every op type in a SavedModel: main graphs and the whole function library.

    Example:

    ```python
    "CaseFoldUTF8" in graph_op_types("exports/sst2/1")  # True: TF Text op
    ```
    """
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    with open(os.path.join(os.fspath(saved_model_dir), "saved_model.pb"), "rb") as f:
        saved.ParseFromString(f.read())
    ops, functions = set(), set()
    for meta_graph in saved.meta_graphs:
        ops |= {node.op for node in meta_graph.graph_def.node}
        for function in meta_graph.graph_def.library.function:
            functions.add(function.signature.name)
            ops |= {node.op for node in function.node_def}
    # Calls to library functions appear as nodes whose op is the function name.
    return ops - functions


def non_core_ops(saved_model_dir: str | os.PathLike) -> list[str]:
    """Op types of a SavedModel that core TensorFlow does not define (e.g. TF Text ops).

    `tf.raw_ops` lists exactly the ops compiled into TensorFlow itself; ops
    registered later by `tf.load_op_library` (TF Text, custom ops) are absent.

    Example:

    ```python
    non_core_ops("exports/sst2_token_ids/1")  # []
    ```
    """
    return sorted(
        op for op in graph_op_types(saved_model_dir)
        if op.startswith("TFText>") or not hasattr(tf.raw_ops, op)
    )


def _write_assets_extra(directory: str, card: dict[str, Any], vocabulary: list[str] | None) -> None:
    extra = os.path.join(directory, ASSETS_EXTRA)
    os.makedirs(extra, exist_ok=True)
    with open(os.path.join(extra, MODEL_CARD_FILE), "w", encoding="utf-8") as f:
        json.dump(_jsonable(card), f, indent=2)
    if vocabulary:
        with open(os.path.join(extra, VOCAB_FILE), "w", encoding="utf-8") as f:
            f.writelines(f"{piece}\n" for piece in vocabulary)


def _describe_signatures(signatures: dict[str, Any]) -> dict[str, Any]:
    described = {}
    for name, concrete in signatures.items():
        # Every input spec is named; the names are the signature's input keys.
        specs = tf.nest.flatten(concrete.structured_input_signature)
        method = {"classify": CLASSIFY_METHOD, "regress": REGRESS_METHOD}.get(
            name, "tensorflow/serving/predict"
        )
        described[name] = {
            "method": method,
            "inputs": {spec.name: _spec_text(spec) for spec in specs},
            "outputs": {k: _spec_text(v) for k, v in sorted(concrete.structured_outputs.items())},
        }
    return described


def _spec_text(spec: Any) -> str:
    dims = ", ".join("None" if d is None else str(d) for d in spec.shape.as_list())
    return f"{spec.dtype.name}[{dims}]"


# === Versions: stage in a hidden folder, rename to the next integer ===


def _export_base(export_dir: str | os.PathLike) -> Path:
    base = Path(export_dir).expanduser()
    if base.exists() and not base.is_dir():
        raise InputError(
            "The export directory is a file.", received={"export_dir": str(export_dir)},
            fix="Give a folder (it is created if missing).",
        )
    return base


def existing_versions(model_root: str | os.PathLike) -> list[int]:
    """Integer version folders under `model_root` (what TF Serving would consider), sorted."""
    root = Path(model_root)
    if not root.is_dir():
        return []
    versions = (parse_int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isascii())
    return sorted(v for v in versions if v is not None and v >= 0)


def _stage_and_publish(roots: list[Path], writers: list[Callable[[str], None]]) -> int:
    staged: list[str] = []
    try:
        for root, write in zip(roots, writers, strict=True):
            # A dot name: TF Serving ignores it, and so does `ls` by default. Mode
            # follows the umask (755 under 022): the version folder is this folder.
            staged.append(str(staging_dir(root, "export")))
            write(staged[-1])
        return _publish(list(zip(staged, roots, strict=True)))
    finally:
        for tmp in staged:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)


def _publish(staged: list[tuple[str, Path]]) -> int:
    """Renames every staged folder to `<root>/<v>`, with one `v` free in all roots."""
    version = max(max(existing_versions(root), default=0) for _, root in staged) + 1
    while True:
        moved: list[tuple[str, Path]] = []
        try:
            for tmp, root in staged:
                target = root / str(version)
                if target.exists():
                    raise FileExistsError(errno.EEXIST, "version taken", str(target))
                os.rename(tmp, target)
                moved.append((tmp, target))
            return version
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            # Another export took this number first: undo and try the next.
            for tmp, target in reversed(moved):
                os.rename(target, tmp)
            version += 1


def resolve_saved_model(path: str | os.PathLike) -> Path:
    """A SavedModel folder, or the highest version folder under a model folder.

    Args:
        path: str or path. `<model_name>/<version>` or `<model_name>`.

    Returns:
        The folder holding `saved_model.pb`.

    Raises:
        InputError: if neither `path` nor any integer folder under it is a
            SavedModel.

    Example:

    ```python
    resolve_saved_model("exports/sst2")  # PosixPath('exports/sst2/3')
    ```
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise InputError(
            "SavedModel folder not found.", received={"saved_model": str(path)},
            fix="Give <export_dir>/<model_name> or one of its version folders.",
        )
    if (folder / "saved_model.pb").exists():
        return folder
    versions = [v for v in existing_versions(folder) if (folder / str(v) / "saved_model.pb").exists()]
    if not versions:
        raise InputError(
            "No SavedModel in the folder (no saved_model.pb, no integer version folders).",
            received={"saved_model": str(path)},
            fix="Give <export_dir>/<model_name> or one of its version folders.",
        )
    return folder / str(versions[-1])


def read_model_card(saved_model_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The `assets.extra/model_card.json` of an export, or None for foreign SavedModels."""
    file = Path(saved_model_dir) / ASSETS_EXTRA / MODEL_CARD_FILE
    if not file.exists():
        return None
    card = read_json_file(file, fix="Export the model again (the card is written with it).")
    if not isinstance(card, dict):
        raise InputError(f"{file} is not a model card.", received={"file": str(file)},
                         fix="Export the model again (the card is written with it).")
    return card


# Common English words: every word is at least one piece in any English vocabulary.
_SAMPLE_WORDS = (
    "a", "thoughtful", ",", "beautifully", "acted", "film", "that", "drags", "at", "the", "end",
    "but", "the", "cast", "makes", "up", "for", "it", "with", "warmth", "and", "some", "very",
    "funny", "lines", "about", "family", ",", "work", "and", "growing", "older", ".",
)


def sample_request(card: dict[str, Any], batch_size: int, *, seed: int = 0) -> dict[str, tf.Tensor]:
    """Realistic raw inputs for an export's `serving_default`, from its model card.

    Text: English prose of `sequence_length` words per input (at least one
    piece each, so every example fills the trained length, the longest a
    client can send and what the model-only figure is timed at). Tokens
    (NER): `sequence_length - 2` words, at least one full window. Images: a
    JPEG of `image_size` (smooth colour fields plus noise, the size a photo
    of that side compresses to).

    Args:
        card: dict. `read_model_card` of a raw-input export.
        batch_size: int. Examples in the request.
        seed: int. Seed for the words or pixels.

    Returns:
        Input name -> tensor, ready for `signatures["serving_default"](**inputs)`.

    Example:

    ```python
    path = resolve_saved_model("exports/sst2")
    inputs = sample_request(read_model_card(path), 1)
    tf.saved_model.load(str(path)).signatures["serving_default"](**inputs)
    ```
    """
    rng = np.random.default_rng(seed)
    pre = card["preprocessing"]
    if pre["modality"] in ("text", "tokens"):
        # Tokens: one window's worth of words (a sentence of one-piece words fills it).
        length = int(pre["sequence_length"]) - (2 if pre["modality"] == "tokens" else 0)
        return {
            name: tf.constant([" ".join(rng.choice(_SAMPLE_WORDS, length))
                               for _ in range(batch_size)])
            for name in pre["text_inputs"]
        }
    size = int(pre["image_size"])
    coarse = rng.uniform(0, 255, (1, 4, 4, 3)).astype(np.float32)
    smooth = tf.image.resize(coarse, [size, size], method="bicubic")[0]
    pixels = tf.clip_by_value(smooth + rng.normal(0, 8, (size, size, 3)), 0, 255)
    jpeg = tf.io.encode_jpeg(tf.cast(pixels, tf.uint8), quality=90)
    return {"image_bytes": tf.fill([batch_size], jpeg)}


def model_only_signature(
    saved_model_dir: str | os.PathLike, card: dict[str, Any]
) -> tuple[Path, str, dict[str, list[int]]]:
    """Where an export serves the same network without its preprocessing.

    Text and tokens: the token-id twin's `serving_default`
    (`<model_name>_token_ids`, same version), at the trained sequence length
    (one window for tokens). Images: `predict_images`
    of the same SavedModel, at `image_size` (no resize).

    Args:
        saved_model_dir: str or path. The raw-input version folder.
        card: dict. Its `read_model_card`.

    Returns:
        (SavedModel folder, signature name, input name -> per-example shape).
    """
    folder, pre = Path(saved_model_dir), card["preprocessing"]
    if pre["modality"] in ("text", "tokens"):
        twin = folder.parent.parent / card["token_id_model"] / folder.name
        return twin, "serving_default", model_only_shapes(card)
    return folder, "predict_images", model_only_shapes(card)


def model_only_shapes(card: dict[str, Any]) -> dict[str, list[int]]:
    """Per-example input shapes of an export's network alone, from its model card.

    Token ids at the trained sequence length (one window for tokens), or
    pixels at the image size: what the profiler times every form on.
    """
    pre = card["preprocessing"]
    if pre["modality"] in ("text", "tokens"):
        return {name: [int(pre["sequence_length"])] for name in TEXT_INPUTS}
    size = int(pre["image_size"])
    return {"images": [size, size, 3]}


# === Model card ===


def _model_card(
    *,
    model: keras.Model,
    model_name: str,
    names: list[str],
    task: str,
    backbone_spec: BackboneSpec | dict | str | None,
    params: dict | None,
    metrics: dict | None,
    preprocessing: dict[str, Any],
    latency: dict[str, float],
    compute_dtype: str | None = None,
) -> dict[str, Any]:
    if isinstance(backbone_spec, BackboneSpec):
        backbone_spec = backbone_spec.to_dict()
    return {
        "format": FORMAT,
        "model_name": model_name,
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "task": task,
        "labels": names,
        "backbone": backbone_spec,
        "preprocessing": preprocessing,
        "metrics": _card_metrics(metrics),
        "training": (params or {}).get("train"),
        "quantization": quantization_of(model),
        # What the served graph computes in: float32 unless exported `as_trained` from a
        # `mixed_bfloat16` model (bf16 matmuls, float32 variables and outputs) or `auto`
        # chose bf16 (`compute_dtype`: the lean graph's).
        "compute_dtype": compute_dtype or str(
            keras.backend.standardize_dtype(model.dtype_policy.compute_dtype)),
        "profile": {
            "params": int(model.count_params()),
            "latency_ms_batch1": latency or None,
            "latency_method": "median of 10 in-process calls after 3 warm-up calls",
            "device": _device_description(),
        },
        "tensorflow_version": tf.__version__,
    }


def quantization_of(model: keras.Model) -> dict[str, Any] | None:
    """What `model.quantize` did to a model: mode and quantized layer count, or None.

    Example:

    ```python
    model.quantize("int8")
    quantization_of(model)  # {"mode": "int8", "layers": 40, "by_type": {"Dense": 13, ...}}
    ```
    """
    by_type: dict[str, int] = {}
    modes = set()
    for layer in model._flatten_layers(include_self=False, recursive=True):
        mode = getattr(layer, "quantization_mode", None)
        if mode:
            modes.add(mode)
            by_type[type(layer).__name__] = by_type.get(type(layer).__name__, 0) + 1
    if not modes:
        return None
    return {"mode": ",".join(sorted(modes)), "layers": sum(by_type.values()),
            "by_type": dict(sorted(by_type.items()))}


def _card_metrics(metrics: dict | None) -> dict | None:
    if not metrics:
        return None
    evaluation = metrics.get("eval", metrics)
    scalars = {
        k: v for k, v in evaluation.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    for key in ("per_class", "per_label"):
        if key in evaluation:
            scalars[key] = evaluation[key]
    extra = {k: metrics[k] for k in ("train_examples", "eval_examples", "train_seconds") if k in metrics}
    return {**scalars, **extra} or None


def _device_description() -> str:
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0])
        return f"GPU: {details.get('device_name', gpus[0].name)}"
    return f"CPU: {platform.machine()}, {os.cpu_count()} logical cores"


def _median_ms(function, kwargs: dict[str, tf.Tensor], warmup: int = 3, runs: int = 10) -> float:
    for _ in range(warmup):
        _materialise(function(**kwargs))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        _materialise(function(**kwargs))
        times.append((time.perf_counter() - start) * 1000)
    return round(float(np.median(times)), 3)


def _materialise(outputs: dict[str, tf.Tensor]) -> None:
    for value in outputs.values():
        value.numpy()


# === Small helpers ===


def _label_names_and_task(
    labels: LabelVocabulary | Sequence[str], model: keras.Model
) -> tuple[list[str], str]:
    if isinstance(labels, LabelVocabulary):
        names, task = list(labels.names), labels.task
    elif isinstance(labels, str) or not all(isinstance(n, str) for n in labels):
        raise InputError(
            "Labels must be a LabelVocabulary or a list of class names.",
            received={"labels": labels},
        )
    else:
        names, task = list(labels), "single_label"
    width = model.outputs[0].shape[-1]
    if width is not None and width != len(names):
        raise InputError(
            "The number of label names does not match the model's outputs.",
            received={"labels": len(names), "model_outputs": int(width)},
            fix="Pass the LabelVocabulary saved with the model (labels.json).",
        )
    return names, task


def _model_name(name: str | None, model_dir: str | os.PathLike | None, model: keras.Model) -> str:
    if name is None:
        name = Path(model_dir).resolve().name if model_dir else model.name
    return check_export_name(name)


def _read_json(model_dir: str | os.PathLike | None, name: str) -> dict | None:
    if not model_dir:
        return None
    file = Path(model_dir) / name
    if not file.exists():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except ValueError:
        return None


def _input_names(model: keras.Model) -> list[str]:
    return [getattr(t, "name", str(t)) for t in model.inputs]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value
