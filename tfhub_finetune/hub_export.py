"""`export_tfhub`: backbones as reusable SavedModels in the TF Hub format.

What is written follows the TF Hub common SavedModel APIs, so `hub.KerasLayer`,
`hub.load` and our own `HubLayer` / `load_tf_hub_backbone` can use it:

- a text encoder: `__call__({input_word_ids, input_mask, input_type_ids},
  training)` -> `{pooled_output, sequence_output, default}`, with `variables`,
  `trainable_variables`, `regularization_losses`, `vocab_file` and
  `do_lower_case` (as Model Garden's BERT exports have), plus a preprocess
  model in `<path>_preprocess`: `__call__(strings)` -> the three int32 inputs
  at sequence length 128, `tokenize(strings)` -> ragged
  `[batch, words, word_pieces]`, `tokenize.get_special_tokens_dict()` and
  `bert_pack_inputs(segments, seq_length)`, with `assets/vocab.txt`;
- an image feature vector: `__call__(images, training)` on float images in
  [0, 1] of any size -> `(batch, features)`; the backbone's own pixel
  convention is applied inside.

Each folder also gets `assets.extra/tfhub_finetune.json` (what a directory
alone cannot tell: native image size, pooling, sequence length), which
`load_tf_hub_backbone` reads back. Folders are written under a temporary name
beside `path` and renamed into place, so a reader never sees half an export.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from tfhub_finetune.backbones.base import TEXT_INPUTS, ImageBackbone, TextBackbone, TextTokenizer
from tfhub_finetune.backbones.spec import BackboneSpec
from tfhub_finetune.backbones.tf_hub_source import (
    HUB_TEXT_INPUTS,
    METADATA_FILE,
)
from tfhub_finetune.data.text import pack_inputs
from tfhub_finetune.errors import InputError
from tfhub_finetune.io_utils import move_into_place, staging_dir

DEFAULT_SEQ_LENGTH = 128
# Preprocess models live beside their encoder, where `resolve_backbone` looks.
PREPROCESS_SUFFIX = "_preprocess"
METADATA_FORMAT = "tfhub_finetune.hub_export/1"


def preprocess_path(path: str | os.PathLike) -> Path:
    """Where `export_tfhub` writes the preprocess model of a text encoder at `path`."""
    path = Path(path)
    return path.parent / (path.name + PREPROCESS_SUFFIX)


def export_tfhub(
    backbone: TextBackbone | ImageBackbone | keras.Model,
    path: str | os.PathLike,
    *,
    tokenizer: TextTokenizer | None = None,
    seq_length: int = DEFAULT_SEQ_LENGTH,
    overwrite: bool = False,
) -> Path:
    """Writes a backbone as a reusable SavedModel in the TF Hub format.

    Fine-tuning a classifier built on a backbone trains the backbone's own
    encoder, so exporting the backbone after `fit` exports the fine-tuned
    weights.

    Args:
        backbone: TextBackbone, ImageBackbone or keras.Model. A loaded
            backbone, or a classifier from `build_text_classifier` /
            `build_image_classifier` (its encoder and, for images, its pixel
            normalisation are found inside; text classifiers also need
            `tokenizer`).
        path: str or path. Output folder. A text encoder's preprocess model
            goes to `<path>_preprocess`.
        tokenizer: TextTokenizer or None. Only for a text classifier given as
            a keras.Model: the tokenizer it was trained with.
        seq_length: int. Sequence length of the preprocess model's default
            call. Defaults to `128`.
        overwrite: bool. Replace existing folders. Defaults to `False`.

    Returns:
        The encoder folder (absolute).

    Raises:
        InputError: if a folder exists and `overwrite` is False, or the model
            is not a backbone/classifier we can export.

    Example:

    ```python
    backbone = load_backbone("../shared/weights/paraphrase_minilm_l3_v2")
    export_tfhub(backbone, "exports/minilm_l3")  # + exports/minilm_l3_preprocess
    reloaded = load_backbone("exports/minilm_l3")  # through the TF Hub path
    ```
    """
    if isinstance(backbone, keras.Model):
        backbone = backbone_from_classifier(backbone, tokenizer=tokenizer)
    path = Path(path).expanduser().absolute()
    if isinstance(backbone, TextBackbone):
        if not isinstance(seq_length, int) or seq_length < 3:
            raise InputError(
                "Invalid value for argument `seq_length`.",
                received={"seq_length": seq_length},
                fix="Expected an integer of at least 3 ([CLS], one piece, [SEP]).",
            )
        targets = [path, preprocess_path(path)]
        writers = [
            lambda d: _write_text_encoder(backbone, d),
            lambda d: _write_text_preprocess(backbone, d, seq_length),
        ]
    elif isinstance(backbone, ImageBackbone):
        targets, writers = [path], [lambda d: _write_image_encoder(backbone, d)]
    else:
        raise InputError(
            "Cannot export this object in the TF Hub format.",
            received={"backbone": type(backbone).__name__},
            fix="Pass a TextBackbone, an ImageBackbone or a classifier from our builders.",
        )
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        raise InputError(
            "Export folder already exists.",
            received={"path": existing[0]},
            fix="Choose another path or pass overwrite=True.",
        )
    staged = []
    try:
        for target, write in zip(targets, writers, strict=True):
            staged.append(_stage(target, write))
        for target, tmp in zip(targets, staged, strict=True):
            move_into_place(tmp, target)
    finally:
        for tmp in staged:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


# === Atomic folder writes ===


def _stage(target: Path, write: Callable[[str], None]) -> str:
    """Writes into a fresh hidden folder beside `target` (same file system: rename is atomic)."""
    tmp = str(staging_dir(target.parent, target.name))
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _write_metadata(directory: str, metadata: dict[str, Any]) -> None:
    file = os.path.join(directory, METADATA_FILE)
    os.makedirs(os.path.dirname(file), exist_ok=True)
    with open(file, "w", encoding="utf-8") as f:
        json.dump({"format": METADATA_FORMAT, **metadata}, f, indent=2, sort_keys=True)


def _spec_metadata(spec: BackboneSpec, encoder: keras.Model) -> dict[str, Any]:
    return {
        "source_backbone": spec.name,
        "architecture": spec.architecture or None,
        "description": spec.description or None,
        "license": spec.license,
        "params": int(encoder.count_params()),
    }


def _hub_root(encoder: keras.Model) -> tf.train.Checkpoint:
    # tf.train.Checkpoint is the plain container TF Hub's own tests use for
    # reusable SavedModels; tf.Module would not let us set `variables`.
    root = tf.train.Checkpoint()
    root.variables = list(encoder.variables)
    root.trainable_variables = list(encoder.trainable_variables)
    root.regularization_losses = []
    return root


# === Text encoder ===


def _write_text_encoder(backbone: TextBackbone, directory: str) -> None:
    encoder = backbone.encoder
    root = _hub_root(encoder)

    @tf.function(autograph=False)
    def call(inputs: dict[str, tf.Tensor], training: bool = False) -> dict[str, tf.Tensor]:
        ours = {n: tf.cast(inputs[h], tf.int32) for n, h in zip(TEXT_INPUTS, HUB_TEXT_INPUTS, strict=True)}
        outputs = encoder(ours, training=training)
        pooled = outputs["pooled_output"]
        return {
            "pooled_output": pooled,
            "sequence_output": outputs["sequence_output"],
            "default": pooled,
        }

    specs = {k: tf.TensorSpec([None, None], tf.int32, name=k) for k in HUB_TEXT_INPUTS}
    for training in (False, True):
        call.get_concrete_function(specs, training)
    root.__call__ = call
    root.do_lower_case = tf.Variable(bool(backbone.lowercase), trainable=False, name="do_lower_case")
    with tempfile.TemporaryDirectory() as scratch:
        if backbone.vocabulary:
            root.vocab_file = tf.saved_model.Asset(_write_vocabulary(backbone.vocabulary, scratch))
        tf.saved_model.save(
            root, directory, signatures={"serving_default": call.get_concrete_function(specs, False)}
        )
    _write_metadata(
        directory,
        {
            **_spec_metadata(backbone.spec, encoder),
            "modality": "text",
            "hidden_dim": int(backbone.hidden_dim),
            "max_sequence_length": int(backbone.max_sequence_length),
            "default_pooling": backbone.spec.default_pooling,
            "lowercase": bool(backbone.lowercase),
        },
    )


def _write_vocabulary(vocabulary: list[str], directory: str) -> str:
    file = os.path.join(directory, "vocab.txt")
    with open(file, "w", encoding="utf-8") as f:
        f.writelines(f"{piece}\n" for piece in vocabulary)
    return file


# === Text preprocess ===


def _words_from_pieces(ids: tf.RaggedTensor, continuation: tf.Tensor) -> tf.RaggedTensor:
    """Regroups `[batch, pieces]` ids into `[batch, words, pieces]`.

    Our tokenizers return flat word pieces; in WordPiece vocabularies a piece
    continues the previous word exactly when it starts with "##", so the word
    dimension of the TF Hub `tokenize` API can be rebuilt without tokenizing
    twice (which would risk ids that differ from the backbone's own).
    """
    values = ids.flat_values
    count = tf.size(values, out_type=tf.int64)
    row_ids = ids.value_rowids()
    first_in_row = tf.logical_or(
        tf.equal(tf.range(count), 0), tf.not_equal(row_ids, tf.roll(row_ids, 1, axis=0))
    )
    starts_word = tf.logical_or(first_in_row, tf.logical_not(tf.gather(continuation, values)))
    words = tf.RaggedTensor.from_row_starts(values, tf.where(starts_word)[:, 0])
    words_per_row = tf.math.unsorted_segment_sum(
        tf.cast(starts_word, tf.int64), row_ids, ids.nrows(out_type=tf.int64)
    )
    return tf.RaggedTensor.from_row_lengths(words, words_per_row)


def _bert_pack_inputs(
    segments: list[tf.RaggedTensor], seq_length: Any, start_id: int, end_id: int, pad_id: int
) -> dict[str, tf.Tensor]:
    """`[CLS] a [SEP] (b [SEP])`, padded to `seq_length`, under TF Hub BERT's input names.

    `data.text.pack_inputs`, the packing training uses: its longer-side-first
    truncation is what tensorflow_text's RoundRobinTrimmer gives for one or
    two segments, so results match TF Hub's BERT preprocessors.
    """
    segments = [s.merge_dims(-2, -1) if s.ragged_rank > 1 else s for s in segments]
    packed = pack_inputs(*segments, sequence_length=seq_length, start_id=start_id,
                         end_id=end_id, pad_id=pad_id, width=seq_length)
    return {
        "input_word_ids": packed["token_ids"],
        "input_mask": packed["padding_mask"],
        "input_type_ids": packed["segment_ids"],
    }


def _write_text_preprocess(backbone: TextBackbone, directory: str, seq_length: int) -> None:
    tokenizer = backbone.tokenizer
    vocabulary = backbone.vocabulary
    start_id, end_id, pad_id = int(tokenizer.start_id), int(tokenizer.end_id), int(tokenizer.pad_id)
    special = {
        "start_of_sequence_id": start_id,
        "end_of_segment_id": end_id,
        "padding_id": pad_id,
        "vocab_size": int(tokenizer.vocabulary_size),
    }
    if vocabulary and "[MASK]" in vocabulary:
        special["mask_id"] = vocabulary.index("[MASK]")
    # Without a vocabulary, each piece is its own word: ids are still exact.
    continuation = tf.constant(
        [piece.startswith("##") for piece in vocabulary] if vocabulary else [False] * special["vocab_size"]
    )

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="sentences")])
    def tokenize(strings: tf.Tensor) -> tf.RaggedTensor:
        ids = tf.cast(tokenizer.tokenize(strings), tf.int32)
        return _words_from_pieces(ids, continuation)

    @tf.function(input_signature=[])
    def get_special_tokens_dict() -> dict[str, tf.Tensor]:
        return {k: tf.constant(v, tf.int32) for k, v in special.items()}

    @tf.function(autograph=False)
    def bert_pack_inputs(inputs: list[tf.RaggedTensor], seq_length: Any = seq_length) -> dict:
        return _bert_pack_inputs(inputs, seq_length, start_id, end_id, pad_id)

    # The same traces as TF Hub's BERT preprocessors: one or two segments,
    # each `[batch, words, pieces]` or `[batch, pieces]`, any seq_length.
    for ragged_rank in (1, 2):
        for num_segments in (1, 2):
            bert_pack_inputs.get_concrete_function(
                [tf.RaggedTensorSpec([None] * (ragged_rank + 1), tf.int32, ragged_rank) for _ in range(num_segments)],
                seq_length=tf.TensorSpec([], tf.int32),
            )

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="sentences")])
    def preprocess(strings: tf.Tensor) -> dict[str, tf.Tensor]:
        return _bert_pack_inputs([tokenize(strings)], seq_length, start_id, end_id, pad_id)

    root = tf.train.Checkpoint()
    root.__call__ = preprocess
    root.tokenize = tf.train.Checkpoint()
    root.tokenize.__call__ = tokenize
    root.tokenize.get_special_tokens_dict = tf.train.Checkpoint()
    root.tokenize.get_special_tokens_dict.__call__ = get_special_tokens_dict
    root.bert_pack_inputs = tf.train.Checkpoint()
    root.bert_pack_inputs.__call__ = bert_pack_inputs
    # Resources the tokenizer's graph reads (lookup tables, a loaded
    # preprocess model) must be reachable from the root to be saved.
    root.tokenizer_state = [
        v for v in vars(tokenizer).values() if isinstance(v, tf.__internal__.tracking.Trackable)
    ]
    with tempfile.TemporaryDirectory() as scratch:
        if vocabulary:
            root.vocab_file = tf.saved_model.Asset(_write_vocabulary(vocabulary, scratch))
        tf.saved_model.save(
            root, directory, signatures={"serving_default": preprocess.get_concrete_function()}
        )
    _write_metadata(
        directory,
        {
            "modality": "text_preprocess",
            "source_backbone": backbone.spec.name,
            "default_seq_length": seq_length,
            "lowercase": bool(backbone.lowercase),
            "special_tokens": special,
        },
    )


# === Image feature vector ===


def _write_image_encoder(backbone: ImageBackbone, directory: str) -> None:
    # Imported here: image_source owns the constants of each pixel convention.
    from tfhub_finetune.backbones.image_source import PIXEL_SCALE_OFFSET

    encoder = backbone.encoder
    convention = backbone.pixel_convention
    scale, offset = PIXEL_SCALE_OFFSET[convention]
    # Inputs are pixels/255; fold the 255 into the convention's scale. `unit`
    # is the identity, kept exact rather than x * 255 * (1/255).
    unit_scale = tf.constant(scale, tf.float32) * 255.0
    unit_offset = tf.constant(offset, tf.float32)

    @tf.function(autograph=False)
    def call(images: tf.Tensor, training: bool = False) -> tf.Tensor:
        x = tf.cast(images, tf.float32)
        if convention != "unit":
            x = x * unit_scale + unit_offset
        return encoder(x, training=training)

    flexible = tf.TensorSpec([None, None, None, 3], tf.float32, name="images")
    fixed = tf.TensorSpec([None, backbone.image_size, backbone.image_size, 3], tf.float32, name="images")
    try:
        call.get_concrete_function(flexible, False)
        images_spec = flexible
    except (ValueError, TypeError):
        # Networks with a fixed input size (e.g. a Flatten before the
        # features) are exported as TF Hub exports them: fixed size.
        images_spec = fixed
    for training in (False, True):
        call.get_concrete_function(images_spec, training)

    root = _hub_root(encoder)
    root.__call__ = call
    tf.saved_model.save(
        root, directory, signatures={"serving_default": call.get_concrete_function(images_spec, False)}
    )
    _write_metadata(
        directory,
        {
            **_spec_metadata(backbone.spec, encoder),
            "modality": "image",
            "image_size": int(backbone.image_size),
            "feature_dim": int(backbone.feature_dim),
            "input_convention": "unit",
            "backbone_pixel_convention": convention,
        },
    )


# === Classifiers from our builders ===


def backbone_from_classifier(
    model: keras.Model, *, tokenizer: TextTokenizer | None = None
) -> TextBackbone | ImageBackbone:
    """Finds the (fine-tuned) encoder inside a classifier from our builders.

    Args:
        model: keras.Model. From `build_text_classifier` or
            `build_image_classifier` (possibly reloaded from `.keras`).
        tokenizer: TextTokenizer or None. Required for text classifiers: the
            model holds token ids only.

    Returns:
        A TextBackbone or ImageBackbone sharing the model's encoder.

    Raises:
        InputError: if no encoder is found, or a text model comes without its
            tokenizer.
    """
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    spec_common = {"source": "tf_hub", "handle": model.name, "name": model.name}
    if _takes_text(model):
        encoders = [m for m in nested if _takes_text(m)]
        if not encoders:
            raise _no_encoder(model)
        if tokenizer is None:
            raise InputError(
                "Exporting a text classifier needs the tokenizer it was trained with.",
                received={"model": model.name},
                fix="Pass tokenizer=backbone.tokenizer, or export the TextBackbone itself.",
            )
        encoder = encoders[0]
        vocabulary = tokenizer.vocabulary() if callable(getattr(tokenizer, "vocabulary", None)) else None
        return TextBackbone(
            spec=BackboneSpec(modality="text", description=f"Encoder of {model.name}", **spec_common),
            encoder=encoder,
            tokenizer=tokenizer,
            hidden_dim=int(encoder.output["pooled_output"].shape[-1]),
            max_sequence_length=int(encoder.get_config().get("max_sequence_length") or 512),
            vocabulary=vocabulary,
            lowercase=bool(getattr(tokenizer, "lowercase", True)),
        )
    rescaling = [layer for layer in model.layers if isinstance(layer, keras.layers.Rescaling)]
    inputs = _model_inputs(model)
    if not nested or not rescaling or len(inputs) != 1 or len(inputs[0].shape) != 4:
        raise _no_encoder(model)
    from tfhub_finetune.backbones.image_source import pixel_convention_of

    convention = pixel_convention_of(rescaling[0].scale, rescaling[0].offset)
    if convention is None:
        raise InputError(
            "The classifier's pixel normalisation matches no known convention.",
            received={"scale": rescaling[0].scale, "offset": rescaling[0].offset},
        )
    encoder = nested[0]
    size = inputs[0].shape[1] or 224
    spec = BackboneSpec(
        modality="image",
        description=f"Image encoder of {model.name}",
        image_size=int(size),
        pixel_convention=convention,
        **spec_common,
    )
    return ImageBackbone(
        spec=spec,
        encoder=encoder,
        image_size=int(size),
        pixel_convention=convention,
        feature_dim=int(encoder.output.shape[-1]),
    )


def _model_inputs(model: keras.Model) -> list[Any]:
    # Models that were never called (e.g. an unbuilt Sequential) have none.
    try:
        return list(model.inputs or [])
    except (AttributeError, ValueError):
        return []


def _takes_text(model: keras.Model) -> bool:
    try:
        structure = model.input
    except (AttributeError, ValueError):
        return False
    return isinstance(structure, dict) and set(TEXT_INPUTS) <= set(structure)


def _no_encoder(model: keras.Model) -> InputError:
    return InputError(
        "Could not find a backbone encoder inside the model.",
        received={"model": model.name, "layers": [layer.name for layer in model.layers][:8]},
        fix="Export the TextBackbone/ImageBackbone, or a model from build_text_classifier / "
        "build_image_classifier.",
    )


