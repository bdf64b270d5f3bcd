"""int8 serving forms, written beside the float32 export with the same inputs.

Text: Keras' own post-training quantization, `model.quantize("int8")`, on a
copy of the trained model, exported by `export.export_text_classifier`
itself, so the signatures, tokenizer, checks and token-id twin are those of
the float32 export by construction:

```
<export_dir>/<model_name>_int8/<version>/                   strings in (TF Serving)
<export_dir>/<model_name>_int8_token_ids/<version>/         token ids in
<export_dir>/<model_name>_int8_tflite/<version>/model.tflite  token ids in (TFLite)
```

The third is the same trained network converted by TFLite with dynamic-range
int8 weights (`export.export_tflite`), beside the token-id twin's vocabulary
and card; `tflite_text.TfliteTextClassifier` serves it on raw strings in the
application's process. TF Serving does not load it. Measured on MiniLM-L6,
SST-2 (AMX Xeon, `make bench`, BUILD_NOTES): the Keras int8 SavedModel is
slower than float32 (TensorFlow's CPU int8 matmul is no faster and every
layer quantizes its input in separate ops), while the TFLite file runs
XNNPACK's int8 kernels and is the fastest form at batch 1 and 64.

Token classifiers (NER) get the same, through `token_export.export_token_classifier`
(sentences in, entities out; and the token-id twin).

What `quantize("int8")` changes in a keras-hub BERT-like encoder (measured on
MiniLM-L6, Keras 3.15): every `Dense` and `EinsumDense` (query, key, value,
attention output, both feed-forward layers, pooler, head) keeps its kernel as
int8 with one float scale per output channel and quantizes its input per
token on the fly (abs-max), so the matmul runs int8 x int8 -> int32
(`tf.matmul(..., output_type=int32)` on the TF backend); the token embedding
(`ReversibleEmbedding`) is stored as int8 and dequantized on lookup. Position
and segment embeddings (keras-hub `PositionEmbedding`, a plain `Embedding`
only where the layer implements `quantize`), layer norms and biases stay
float32.

Images: Keras' `quantize` covers `Dense`, `EinsumDense` and `Embedding`
only; a CNN's `Conv2D`/`DepthwiseConv2D` layers have no int8 mode, so
`quantize` would reach the classification head alone. Image models get
TFLite dynamic-range quantization instead (`export.export_tflite(...,
quantization="int8")`), which quantizes convolutions too:

```
<export_dir>/<model_name>_int8/<version>/model.tflite       raw 0..255 float pixels in
<export_dir>/<model_name>_int8/<version>/assets.extra/model_card.json
```

TF Serving does not load TFLite files (it would report the version folder as
having no SavedModel, so point it at the float32 model folder). Serve the file
with the TFLite interpreter (LiteRT, `pip install ai-edge-litert`:
`from ai_edge_litert.interpreter import Interpreter`; or
`tf.lite.Interpreter` from full TensorFlow) inside the application, on
Android/iOS with the LiteRT runtime, or behind a small HTTP handler. Its one
input is `(1, size, size, 3)` float32 pixels 0..255 (resize the input tensor
for bigger batches); decode, centre-crop and resize as the model card says,
as `data.image` does. The output is the class probabilities.

Versions: each variant folder numbers its versions itself (TF Serving's
layout: one model name, integer versions); the card's `quantized_from`
names the float32 export it was made from.

Example:

```python
float_path = export_text_classifier(model, backbone, labels, "exports", model_name="sst2")
int8_path = export_quantized_text_classifier(model, backbone, labels, "exports",
                                             model_name="sst2", quantized_from=float_path)
# exports/sst2_int8/1 and exports/sst2_int8_token_ids/1
```
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import keras

from tfhub_finetune import export, serving_warmup
from tfhub_finetune.backbones.base import TextBackbone
from tfhub_finetune.config import TFLITE_SUFFIX
from tfhub_finetune.data.labels import LabelVocabulary
from tfhub_finetune.errors import InputError

QUANTIZED_SUFFIX = "_int8"
TFLITE_FILE = "model.tflite"
# The text int8 form's TFLite folder: `<model_name>_int8_tflite/<version>/`.
MODES = ("int8",)


def quantized_copy(model: keras.Model, mode: str = "int8") -> keras.Model:
    """A copy of `model` with Keras post-training quantization applied; `model` is untouched.

    Args:
        model: keras.Model. Built and trained.
        mode: str. `"int8"`.

    Returns:
        The quantized copy (same inputs and outputs).

    Example:

    ```python
    q = quantized_copy(model)
    {v.dtype for v in q.variables}  # {'float32', 'int8', ...}
    ```
    """
    _check_mode(mode)
    # `quantize` mutates the layers it reaches, and a model built on a shared
    # backbone would change the float32 model too, so a clone gets them.
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    with warnings.catch_warnings():
        # One warning per layer type that has no int8 form (LayerNormalization, Dropout,
        # keras-hub's PositionEmbedding, ...): expected, and listed in the module docstring.
        warnings.filterwarnings("ignore", message=".*does not have a `quantize` method")
        copy.quantize(mode)
    return copy


def export_quantized_text_classifier(
    model: keras.Model,
    backbone: TextBackbone,
    labels: LabelVocabulary | Sequence[str],
    export_dir: str | os.PathLike,
    *,
    mode: str = "int8",
    model_name: str | None = None,
    model_dir: str | os.PathLike | None = None,
    quantized_from: str | os.PathLike | None = None,
    measure_latency: bool = True,
    with_tflite: bool = True,
) -> str:
    """Writes the int8 form of a text classifier as `<model_name>_int8` (and its token-id twin).

    With `with_tflite`, also `<model_name>_int8_tflite/<v>/model.tflite`: the
    same network with TFLite dynamic-range int8 weights, token ids in
    (`tflite_form` finds it; `tflite_text.TfliteTextClassifier` serves it).

    Args:
        model: keras.Model. The trained float32 model (not modified).
        backbone: TextBackbone. What the model was built on (tokenizer).
        labels: LabelVocabulary or list of str. As for the float32 export.
        export_dir: str or path. Base folder, as for the float32 export.
        mode: str. `"int8"`.
        model_name: str or None. The float32 export's name (the variant
            appends `_int8`); defaults as `export_text_classifier` does.
        model_dir: str, path or None. The training folder (params, metrics).
        quantized_from: str, path or None. The float32 export's version
            folder, recorded in the model card.
        measure_latency: bool. As for `export_text_classifier`.
        with_tflite: bool. Also write the TFLite int8 file (~20 s and a few
            GB of memory for the converter). Defaults to `True`.

    Returns:
        The raw-string int8 SavedModel's version folder.
    """
    name = _variant_name(model_name, model_dir, model)
    quantized = quantized_copy(model, mode)
    path = export.export_text_classifier(
        quantized, backbone, labels, export_dir, model_name=name, model_dir=model_dir,
        measure_latency=measure_latency,
    )
    twin = _token_id_twin(path, name)
    fields = {} if quantized_from is None else {"quantized_from": str(quantized_from)}
    if with_tflite:
        tflite = _export_text_tflite(model, twin, export_dir, name + TFLITE_SUFFIX, mode,
                                     quantized_from)
        fields["tflite_form"] = f"{tflite.parent.name}/{tflite.name}"
    if fields:
        for folder in (path, twin):
            _update_card(folder, **fields)
    return path


def tflite_form(saved_model_dir: str | os.PathLike) -> Path | None:
    """The TFLite int8 folder written with a text int8 export, from its card; None if absent.

    Example:

    ```python
    tflite_form("exports/sst2_int8/1")  # Path("exports/sst2_int8_tflite/1")
    ```
    """
    card = export.read_model_card(saved_model_dir) or {}
    if not card.get("tflite_form"):
        return None
    return Path(saved_model_dir).parent.parent / card["tflite_form"]


def _export_text_tflite(model: keras.Model, twin: Path, export_dir: str | os.PathLike,
                        name: str, mode: str, quantized_from: str | os.PathLike | None) -> Path:
    """`<name>/<v>/model.tflite` (dynamic-range int8, token ids in) with the twin's card and vocab.

    The card and vocabulary are the int8 token-id twin's, so
    `text_client.TextClient.from_saved_model` and `tflite_text.TfliteTextClassifier`
    read the folder as they read a token-id SavedModel.
    """
    import json
    import shutil

    from tfhub_finetune.adaptation import merge_lora

    card = export.read_model_card(twin) or {}
    served = merge_lora(model)

    def write(directory: str) -> None:
        info = export.export_tflite(served, Path(directory) / TFLITE_FILE, quantization=mode)
        # The card and vocabulary; not TF Serving's warm-up requests (TFLite is not served there).
        shutil.copytree(twin / export.ASSETS_EXTRA, Path(directory) / export.ASSETS_EXTRA,
                        ignore=shutil.ignore_patterns(serving_warmup.WARMUP_FILE))
        card.update({
            "model_name": name,
            "input": "token_ids",
            "runtime": "tflite",
            "signatures": {},
            "profile": {},
            "quantization": {"mode": mode, "method": "TFLite dynamic range (weights int8, "
                             "activations float32, hybrid int8 kernels)"},
            "quantized_from": str(quantized_from) if quantized_from is not None else None,
            "tflite": {"file": TFLITE_FILE, "bytes": info["bytes"],
                       "max_abs_diff_vs_keras": info["max_abs_diff"],
                       "inputs": info["inputs"],
                       "output": "float32[batch, classes] probabilities",
                       "client": "tfhub_finetune.tflite_text.TfliteTextClassifier"},
        })
        (Path(directory) / export.ASSETS_EXTRA / export.MODEL_CARD_FILE).write_text(
            json.dumps(card, indent=2), encoding="utf-8")

    root = export._export_base(export_dir) / name
    version = export._stage_and_publish([root], [write])
    return root / str(version)


def export_quantized_token_classifier(
    model: keras.Model,
    backbone: TextBackbone,
    labels: LabelVocabulary | Sequence[str],
    export_dir: str | os.PathLike,
    *,
    mode: str = "int8",
    model_name: str | None = None,
    model_dir: str | os.PathLike | None = None,
    quantized_from: str | os.PathLike | None = None,
    sequence_length: int | None = None,
    stride: int | None = None,
    measure_latency: bool = True,
) -> str:
    """Writes the int8 form of a token classifier (NER) as `<model_name>_int8` and its twin.

    The quantized copy is exported by `token_export.export_token_classifier`
    itself, so words, windows, entity decoding and signatures are the float32
    export's by construction.

    Args:
        model: keras.Model. The trained float32 token classifier (not modified).
        backbone: TextBackbone. What the model was built on (tokenizer).
        labels: LabelVocabulary or list of str. IOB2 tag names in id order.
        export_dir: str or path. Base folder, as for the float32 export.
        mode: str. `"int8"`.
        model_name: str or None. The float32 export's name (`_int8` appended).
        model_dir: str, path or None. The training folder (params, metrics).
        quantized_from: str, path or None. The float32 export's version folder.
        sequence_length: int or None. As for `export_token_classifier`.
        stride: int or None. As for `export_token_classifier`.
        measure_latency: bool. As for `export_token_classifier`.

    Returns:
        The raw-sentence int8 SavedModel's version folder.

    Example:

    ```python
    path = export_quantized_token_classifier(model, task.backbone, task.labels, "exports",
                                             model_name="conll", quantized_from=float_path)
    # exports/conll_int8/1 and exports/conll_int8_token_ids/1
    ```
    """
    from tfhub_finetune.token_export import export_token_classifier

    name = _variant_name(model_name, model_dir, model)
    path = export_token_classifier(
        quantized_copy(model, mode), backbone, labels, export_dir, model_name=name,
        model_dir=model_dir, sequence_length=sequence_length, stride=stride,
        measure_latency=measure_latency,
    )
    if quantized_from is not None:
        for folder in (path, _token_id_twin(path, name)):
            _update_card(folder, quantized_from=str(quantized_from))
    return path


def export_quantized_image_classifier(
    model: keras.Model,
    labels: LabelVocabulary | Sequence[str],
    export_dir: str | os.PathLike,
    *,
    image_size: int,
    mode: str = "int8",
    model_name: str | None = None,
    model_dir: str | os.PathLike | None = None,
    quantized_from: str | os.PathLike | None = None,
    crop_to_aspect_ratio: bool = True,
) -> str:
    """Writes the int8 form of an image classifier: TFLite dynamic range, with a model card.

    Args:
        model: keras.Model. The trained image classifier (raw 0..255 pixels in).
        labels: LabelVocabulary or list of str. Class names in id order.
        export_dir: str or path. Base folder, as for the float32 export.
        image_size: int. The side the model was trained on.
        mode: str. `"int8"`.
        model_name: str or None. The float32 export's name (`_int8` appended).
        model_dir: str, path or None. The training folder (params, metrics).
        quantized_from: str, path or None. The float32 export's version folder.
        crop_to_aspect_ratio: bool. As the training data was; recorded for clients.

    Returns:
        The version folder holding `model.tflite` and `model_card.json`.
    """
    _check_mode(mode)
    size = export._check_image_model(model, image_size)
    names, task = export._label_names_and_task(labels, model)
    name = _variant_name(model_name, model_dir, model)
    params = export._read_json(model_dir, "params.json")
    card = export._model_card(
        model=model, model_name=name, names=names, task=task,
        backbone_spec=export._image_backbone_spec(None, params), params=params,
        metrics=export._read_json(model_dir, "metrics.json"),
        preprocessing={
            "modality": "image",
            "image_size": size,
            "input_pixels": "RGB, 0..255 float32 (the model normalises them itself)",
            "pixel_convention": export._pixel_convention(model),
            "crop_to_aspect_ratio": bool(crop_to_aspect_ratio),
            "resize": "antialiased bilinear to image_size, rounded to uint8 (as in training)",
        },
        latency={},
    )

    def write(directory: str) -> None:
        info = export.export_tflite(model, Path(directory) / TFLITE_FILE, quantization=mode)
        card.update({
            "input": "pixels",
            "runtime": "tflite",
            "quantization": {"mode": mode, "method": "TFLite dynamic range (weights int8, "
                             "activations float32, hybrid int8 kernels)"},
            "quantized_from": str(quantized_from) if quantized_from is not None else None,
            "tflite": {"file": TFLITE_FILE, "bytes": info["bytes"],
                       "max_abs_diff_vs_keras": info["max_abs_diff"],
                       "input": f"float32[1, {size}, {size}, 3]",
                       "output": f"float32[1, {len(names)}] probabilities"},
        })
        export._write_assets_extra(directory, card, None)

    root = export._export_base(export_dir) / name
    version = export._stage_and_publish([root], [write])
    return str(root / str(version))


def _variant_name(model_name: str | None, model_dir: str | os.PathLike | None,
                  model: keras.Model) -> str:
    return export._model_name(model_name, model_dir, model) + QUANTIZED_SUFFIX


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise InputError(
            "Invalid value for argument `mode`.", received={"mode": mode},
            fix=f"Expected one of: {', '.join(MODES)}.",
        )


def _token_id_twin(path: str | os.PathLike, name: str) -> Path:
    """The token-id twin's version folder of the raw-input export at `path` (same version)."""
    return Path(path).parent.parent / (name + export.TOKEN_IDS_SUFFIX) / Path(path).name


def _update_card(version_dir: str | os.PathLike, **fields: str) -> None:
    """Adds `fields` to a published card (atomically: the card is one file)."""
    import json

    from tfhub_finetune.io_utils import atomic_write_text

    file = Path(version_dir) / export.ASSETS_EXTRA / export.MODEL_CARD_FILE
    card = json.loads(file.read_text(encoding="utf-8"))
    card.update(fields)
    atomic_write_text(file, json.dumps(card, indent=2))
