"""TF Hub SavedModels as trainable Keras 3 layers, and as our Text/Image backbones.

`HubLayer` loads a reusable SavedModel (a tfhub.dev / Kaggle handle, resolved
and cached by `tensorflow_hub.resolve`, or a local directory) and exposes its
variables to Keras 3 so that Keras optimizers fine-tune them in place.
`load_tf_hub_backbone` adapts the two TF Hub conventions we support to
`backbones.base`:

- image feature vectors: float images in [0, 1], `(batch, h, w, 3)` ->
  `(batch, features)`;
- BERT-style text encoders: a dict of `input_word_ids`, `input_mask`,
  `input_type_ids` -> a dict with `pooled_output` and `sequence_output`, plus
  the matching preprocess SavedModel whose `tokenize` sub-object gives the
  word pieces and whose `tokenize.get_special_tokens_dict()` gives the ids.

Why not `keras.layers.TFSMLayer` or `hub.KerasLayer`: `hub.KerasLayer` is a
tf_keras (Keras 2) layer and cannot sit in a Keras 3 model, and TFSMLayer
names its wrapped variables after the TF names (`dense/kernel:0` ->
`dense_kernel:0`), which Keras 3 optimizers reject when they create their
slot variables (`'dense_kernel:0_momentum' is not a valid scope name`).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from tfhub_finetune.backbones.base import TEXT_INPUTS, ImageBackbone, TextBackbone
from tfhub_finetune.backbones.spec import BackboneSpec
from tfhub_finetune.errors import InputError

# The TF Hub text-encoder API (tensorflow.org/hub/common_saved_model_apis/text).
HUB_TEXT_INPUTS = ("input_word_ids", "input_mask", "input_type_ids")
HUB_TEXT_OUTPUTS = ("pooled_output", "sequence_output")
# Our encoder input name -> the TF Hub encoder input it feeds.
_TEXT_INPUT_MAP = dict(zip(TEXT_INPUTS, HUB_TEXT_INPUTS, strict=True))
SPECIAL_TOKEN_KEYS = ("start_of_sequence_id", "end_of_segment_id", "padding_id", "vocab_size")
# Written by `hub_export.export_tfhub` beside the model (assets.extra is the
# SavedModel folder for files that higher-level libraries own).
METADATA_FILE = os.path.join("assets.extra", "tfhub_finetune.json")

_REMOTE_PREFIXES = ("http://", "https://", "gs://")
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")


# === Loading SavedModels ===


def resolve_handle(handle: str) -> str:
    """Returns a local directory for a TF Hub / Kaggle handle or a local path.

    URLs go through `tensorflow_hub.resolve`, which downloads once into
    `$TFHUB_CACHE_DIR` and reuses the cache afterwards. Local paths are
    returned expanded and absolute.

    Raises:
        InputError: when the download fails or a local path does not exist.
    """
    handle = str(handle).strip()
    if handle.startswith(_REMOTE_PREFIXES):
        # Imported here: tensorflow_hub pulls in tf_keras (seconds of import
        # time) and only remote handles need its resolver and cache. Its import
        # of pkg_resources warns under setuptools >= 80.9; that warning asks
        # nothing of our users and would break one-line errors.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
            import tensorflow_hub as hub

        try:
            return hub.resolve(handle)
        except (OSError, ValueError, tf.errors.OpError) as err:
            # urllib's URLError and socket errors are OSErrors: a network that is not there.
            offline = isinstance(err, OSError) and not isinstance(err, FileNotFoundError)
            raise InputError(
                "Could not download the TF Hub model: "
                + ("the network is unreachable." if offline else "the download failed."),
                received={"handle": handle},
                fix="Download it where there is internet and give its local directory (or a "
                "TFHUB_CACHE_DIR that holds it); check the URL. "
                f"({err.__class__.__name__}: {_first_line(err)})",
            ) from None
    path = Path(handle).expanduser()
    if not path.is_dir():
        raise InputError(
            "TF Hub model directory not found.",
            received={"handle": handle},
            fix="Give an existing SavedModel directory or a tfhub.dev / Kaggle URL.",
        )
    return str(path.resolve())


def load_saved_model(handle: str, *, what: str = "TF Hub model") -> tuple[Any, str]:
    """Resolves `handle` and loads it with `tf.saved_model.load`.

    Args:
        handle: str. URL or local directory.
        what: str. How error messages name the model (e.g. `text preprocess model`).

    Returns:
        `(loaded_object, local_directory)`.

    Raises:
        InputError: if the directory is not a SavedModel or does not load.
    """
    path = resolve_handle(handle)
    if not any(os.path.exists(os.path.join(path, f)) for f in ("saved_model.pb", "saved_model.pbtxt")):
        found = sorted(os.listdir(path))[:8]
        raise InputError(
            f"The {what} is not a SavedModel (no saved_model.pb).",
            received={"handle": handle, "found": found},
            fix="Point at the folder that holds saved_model.pb and variables/.",
        )
    # Registers the tensorflow_text ops that TF Hub text preprocess models use;
    # loading such a model without them fails with "Op type not registered".
    import tensorflow_text  # noqa: F401

    try:
        return tf.saved_model.load(path), path
    except (OSError, ValueError, KeyError, tf.errors.OpError) as err:
        raise InputError(
            f"Could not load the {what} as a SavedModel.",
            received={"handle": handle},
            fix=f"({err.__class__.__name__}: {_first_line(err)})",
        ) from None


def read_export_metadata(path: str) -> dict[str, Any]:
    """The `assets.extra/tfhub_finetune.json` that `export_tfhub` writes, or `{}`."""
    file = os.path.join(path, METADATA_FILE)
    if not os.path.isfile(file):
        return {}
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


# === Introspecting restored functions ===


def _concrete_calls(fn: Any) -> list[tuple[Any, Any]]:
    """`(inputs structure, training value)` of every traced concrete function of `fn`."""
    calls = []
    for concrete in getattr(fn, "concrete_functions", None) or ():
        args, kwargs = concrete.structured_input_signature
        inputs = args[0] if args else next(iter(kwargs.values()), None)
        training = args[1] if len(args) > 1 else kwargs.get("training")
        calls.append((inputs, training))
    return calls


def _describe(structure: Any) -> str:
    """A short text for a nest of TensorSpecs, for error messages."""
    if isinstance(structure, Mapping):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in sorted(structure.items())) + "}"
    if isinstance(structure, (list, tuple)):
        return "[" + ", ".join(_describe(v) for v in structure) + "]"
    if isinstance(structure, (tf.TensorSpec, tf.RaggedTensorSpec)):
        return f"{structure.dtype.name}{list(structure.shape)}"
    if tf.is_tensor(structure):
        return f"{structure.dtype.name}{list(structure.shape)}"
    return repr(structure)


def _accepts_training(fn: Any) -> bool:
    spec = getattr(fn, "function_spec", None)
    fullargspec = getattr(spec, "fullargspec", None)
    if fullargspec is None:
        return False
    return "training" in fullargspec.args or "training" in fullargspec.kwonlyargs


def _keras_variable_name(variable: tf.Variable) -> str:
    # Keras variable names may not contain "/", and optimizer slot names are
    # built from them and must be valid TF scope names: no ":0" suffix.
    name = _UNSAFE_NAME_CHARS.sub("_", variable.name.split(":")[0]).strip("_")
    return name or "variable"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else ""


# === HubLayer ===


@keras.saving.register_keras_serializable(package="tfhub_finetune")
class HubLayer(keras.layers.Layer):
    """A TF Hub reusable SavedModel as a trainable Keras 3 layer.

    The SavedModel is loaded with `tf.saved_model.load` and called through
    its `__call__(inputs, training)` (or a named signature). Each variable of
    the SavedModel is registered as a Keras variable that *is* the loaded
    `tf.Variable` (no copy), so Keras optimizers update exactly what the
    SavedModel's functions read, `model.save()` / `save_weights()` store the
    fine-tuned values, and loading restores them over the hub weights.

    Follows the reusable SavedModel conventions: `trainable_variables` are
    trained when the layer is trainable, the rest of `variables` never are;
    `regularization_losses` are added while training; `training=True` is
    passed only to a trainable layer (a frozen one runs in inference mode,
    e.g. frozen batch norm). Create the layer inside a
    `tf.distribute.Strategy` scope to get distributed variables.

    Reloading a saved model loads the SavedModel from `handle` again (then
    overwrites its weights), so the handle must still be reachable; and as
    with `keras.layers.TFSMLayer`, Keras' safe mode refuses to deserialize a
    layer that loads external graph code: pass `safe_mode=False` to
    `keras.models.load_model` for files you trust.

    Args:
        handle: str. A tfhub.dev / Kaggle URL or a local SavedModel directory.
        trainable: bool. Fine-tune the SavedModel's trainable variables.
            Defaults to `True`.
        signature: str or None. Call this signature of the SavedModel instead
            of its `__call__` (signatures have no training mode). Defaults to
            `None`.
        output_key: str or None. Return only this entry of a dict output.
            Defaults to `None`.
        arguments: dict or None. Extra keyword arguments for every call (e.g.
            `{"batch_norm_momentum": 0.997}`). Must be JSON-serializable.
            Defaults to `None`.
        freeze_batch_norm: bool. Keep batch normalization as pretrained while
            fine-tuning, the Keras transfer-learning recipe: the SavedModel is
            always called in inference mode (moving statistics are used and
            never updated; dropout inside it is off too) and batch-norm
            scale/offset (`<x>/gamma`, `<x>/beta` beside `<x>/moving_mean`)
            are not trained. Other trainable variables still train. Defaults
            to `False` (TF Hub's own behaviour: training mode while training).
        **kwargs: Base `keras.layers.Layer` arguments (`name`, `dtype`). The
            dtype defaults to `"float32"`: SavedModel functions are traced for
            fixed input dtypes, so a mixed-precision policy must not cast the
            inputs.

    Example:

    ```python
    images = keras.Input((224, 224, 3))
    features = HubLayer(
        "https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/feature_vector/5"
    )(images)
    model = keras.Model(images, keras.layers.Dense(2)(features))
    model.compile(keras.optimizers.AdamW(1e-4), "sparse_categorical_crossentropy")
    ```
    """

    def __init__(
        self,
        handle: str,
        trainable: bool = True,
        signature: str | None = None,
        output_key: str | None = None,
        arguments: dict[str, Any] | None = None,
        freeze_batch_norm: bool = False,
        **kwargs: Any,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(trainable=trainable, **kwargs)
        handle = str(handle)
        if not handle.startswith(_REMOTE_PREFIXES):
            # An absolute path keeps the saved config valid from any working dir.
            handle = str(Path(handle).expanduser().resolve())
        self.handle = handle
        self.signature = signature
        self.output_key = output_key
        self.arguments = dict(arguments or {})
        self.freeze_batch_norm = bool(freeze_batch_norm)
        _check_json(self.arguments, handle)

        # === Loaded SavedModel ===
        # Tracked as a child so that exporting a model with this layer
        # (`model.export`) saves the restored functions and variables too.
        self._hub_object, self._hub_path = load_saved_model(handle)
        self._hub_fn = self._get_callable()
        # The restored tf.function behind the call, for its traced signatures.
        self._restored_fn = self._hub_fn.__call__ if self.signature is None else None
        self._calls = tuple(_concrete_calls(self._restored_fn))
        self._takes_training = _accepts_training(self._restored_fn)
        self._training_values = frozenset(t for _, t in self._calls if isinstance(t, bool))
        self._check_output_key()

        # === Variables ===
        variables = self._saved_model_variables()
        frozen = _batch_norm_parameters([v for v, _ in variables]) if self.freeze_batch_norm else set()
        for variable, is_trainable in variables:
            # Tracked as non-trainable, they stay frozen when the layer (or a
            # model holding it) is later set trainable again.
            is_trainable = is_trainable and id(variable) not in frozen
            with keras.name_scope(self.name, caller=self):
                wrapped = keras.Variable(
                    variable,
                    trainable=is_trainable,
                    # The SavedModel's functions read the tf.Variable directly,
                    # so a Keras autocast would never apply anyway.
                    autocast=False,
                    name=_keras_variable_name(variable),
                )
            # Keras copies a tf.Variable initializer's handle into the new
            # variable; anything else would silently train a detached copy.
            if wrapped.value is not variable:
                raise RuntimeError(f"Keras did not wrap the SavedModel variable {variable.name}.")
            self._track_variable(wrapped)
        self._regularization_losses = list(getattr(self._hub_object, "regularization_losses", []))
        self.built = True

    @property
    def resolved_object(self) -> Any:
        """The object `tf.saved_model.load` returned for `handle`."""
        return self._hub_object

    @property
    def resolved_path(self) -> str:
        """The local directory `handle` resolved to."""
        return self._hub_path

    @property
    def input_specs(self) -> list[Any]:
        """Input structures (TensorSpecs) the SavedModel's call was traced for."""
        if self.signature is not None:
            return [self._hub_fn.structured_input_signature[1]]
        return [inputs for inputs, _ in self._calls]

    def _get_callable(self) -> Callable[..., Any]:
        obj = self._hub_object
        signatures = sorted(getattr(obj, "signatures", {}) or {})
        if self.signature is None:
            if callable(obj):
                return obj
            raise InputError(
                "The SavedModel is not callable (it has no __call__ function).",
                received={"handle": self.handle, "signatures": signatures},
                fix="Pass signature=<name> (and output_key=) to call one of its signatures."
                if signatures
                else "Export the model as a TF2 reusable SavedModel.",
            )
        if self.signature not in signatures:
            raise InputError(
                "The SavedModel has no such signature.",
                received={"handle": self.handle, "signature": self.signature},
                fix=f"Available signatures: {', '.join(signatures) or 'none'}.",
            )
        return obj.signatures[self.signature]

    def _check_output_key(self) -> None:
        if self.output_key is None:
            return
        if self.signature is not None:
            outputs = self._hub_fn.structured_outputs
        else:
            concrete = getattr(self._restored_fn, "concrete_functions", None) or ()
            outputs = concrete[0].structured_outputs if concrete else None
        if outputs is None:
            return
        if not isinstance(outputs, Mapping) or self.output_key not in outputs:
            keys = sorted(outputs) if isinstance(outputs, Mapping) else _describe(outputs)
            raise InputError(
                "The SavedModel's output has no such key.",
                received={"handle": self.handle, "output_key": self.output_key},
                fix=f"Its output is {keys}.",
            )

    def _saved_model_variables(self) -> list[tuple[tf.Variable, bool]]:
        """Each variable of the SavedModel once, with whether it may be trained."""
        obj = self._hub_object
        if self.signature is None and hasattr(obj, "variables"):
            # The reusable SavedModel convention: `variables` is all state,
            # `trainable_variables` the subset meant for fine-tuning.
            variables = list(obj.variables)
            trainable_ids = {id(v) for v in getattr(obj, "trainable_variables", ())}
        else:
            # Plain SavedModels (e.g. `model.export()` archives): whatever the
            # called functions capture, with the trainable flag they were saved with.
            concretes = (
                [self._hub_fn]
                if self.signature
                else list(getattr(self._restored_fn, "concrete_functions", None) or ())
            )
            variables = [v for c in concretes for v in c.variables]
            trainable_ids = {id(v) for c in concretes for v in c.trainable_variables}
        seen: set[int] = set()
        unique = []
        for v in variables:
            if id(v) not in seen:
                seen.add(id(v))
                unique.append((v, id(v) in trainable_ids))
        return unique

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        kwargs = dict(self.arguments)
        if self.signature is not None:
            result = self._invoke_signature(inputs, kwargs)
        elif self._takes_training:
            mode = self._training_mode(training)
            if isinstance(mode, bool):
                result = self._hub_fn(inputs, training=mode, **kwargs)
            else:
                result = tf.cond(
                    mode,
                    lambda: self._hub_fn(inputs, training=True, **kwargs),
                    lambda: self._hub_fn(inputs, training=False, **kwargs),
                )
        else:
            result = self._hub_fn(inputs, **kwargs)
        if self._regularization_losses and self.trainable and training:
            self.add_loss(tf.add_n([tf.cast(loss(), tf.float32) for loss in self._regularization_losses]))
        if self.output_key is not None:
            result = result[self.output_key]
        return result

    def _training_mode(self, training: Any) -> bool | tf.Tensor:
        if not self.trainable or training is None or self.freeze_batch_norm:
            wanted: Any = False
        elif tf.is_tensor(training):
            static = tf.get_static_value(training)
            wanted = training if static is None else bool(static)
        else:
            wanted = bool(training)
        if isinstance(wanted, bool) and self._training_values and wanted not in self._training_values:
            # A model traced for one mode only (e.g. inference) serves both.
            return next(iter(self._training_values))
        return wanted

    def _invoke_signature(self, inputs: Any, kwargs: dict[str, Any]) -> Any:
        if isinstance(inputs, Mapping):
            return self._hub_fn(**inputs, **kwargs)
        names = sorted(self._hub_fn.structured_input_signature[1])
        if len(names) != 1:
            raise InputError(
                "This signature takes several named inputs; pass a dict.",
                received={"signature": self.signature, "inputs": names},
            )
        return self._hub_fn(**{names[0]: inputs}, **kwargs)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "handle": self.handle,
                "signature": self.signature,
                "output_key": self.output_key,
                "arguments": self.arguments,
                "freeze_batch_norm": self.freeze_batch_norm,
            }
        )
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> HubLayer:
        # Private import: Keras offers no public way to ask whether safe mode
        # is on; TFSMLayer makes the same check the same way.
        from keras.src.saving import serialization_lib

        if serialization_lib.in_safe_mode() is not False:
            raise InputError(
                "Loading this model runs an external TF Hub SavedModel, which Keras' safe "
                "mode refuses.",
                received={"handle": config.get("handle")},
                fix="If you trust the model file and the handle, pass safe_mode=False to "
                "keras.models.load_model (or call keras.config.enable_unsafe_deserialization()).",
            )
        return cls(**config)


def _batch_norm_parameters(variables: list[tf.Variable]) -> set[int]:
    """Ids of batch-norm scale/offset variables: `<x>/gamma`, `<x>/beta` beside `<x>/moving_mean`.

    Structural rather than a guess from layer names: Keras, tf_keras and
    TF-Slim all keep the moving statistics next to the parameters they
    normalise with.
    """
    names = {v.name.split(":")[0]: v for v in variables}
    prefixes = {n.rsplit("/", 1)[0] for n in names if n.endswith(("/moving_mean", "/moving_variance"))}
    return {
        id(v)
        for n, v in names.items()
        if "/" in n and n.rsplit("/", 1)[0] in prefixes and n.endswith(("/gamma", "/beta"))
    }


def _check_json(arguments: dict[str, Any], handle: str) -> None:
    try:
        json.dumps(arguments)
    except TypeError:
        raise InputError(
            "HubLayer `arguments` must be JSON-serializable (they are saved with the model).",
            received={"handle": handle, "arguments": arguments},
        ) from None


# === Text: the preprocess model as our tokenizer ===


class HubTokenizer:
    """A TF Hub text preprocess SavedModel as a `TextTokenizer`.

    Uses the model's `tokenize` sub-object (strings -> ragged
    `[batch, words, word_pieces]`) with the word dimension merged, and
    `tokenize.get_special_tokens_dict()` for the special ids. Packing
    ([CLS] ... [SEP], padding) is left to our data pipeline, as for every
    other backbone.

    Args:
        handle: str. URL or local directory of the preprocess SavedModel.

    Example:

    ```python
    tok = HubTokenizer("https://tfhub.dev/tensorflow/bert_en_uncased_preprocess/3")
    tok.tokenize(tf.constant(["hello world"]))  # <tf.RaggedTensor [[7592, 2088]]>
    ```
    """

    def __init__(self, handle: str):
        self.handle = str(handle)
        self._preprocess, self.path = load_saved_model(self.handle, what="text preprocess model")
        tokenize = getattr(self._preprocess, "tokenize", None)
        special = getattr(tokenize, "get_special_tokens_dict", None)
        if tokenize is None or not callable(tokenize) or special is None:
            found = sorted(k for k in dir(self._preprocess) if not k.startswith("_"))[:12]
            raise InputError(
                "The text preprocess model lacks the TF Hub preprocessor API.",
                received={"handle": self.handle, "found": found},
                fix="Expected a `tokenize` sub-object with `get_special_tokens_dict()` "
                "(as in bert_en_uncased_preprocess).",
            )
        ids = {k: int(v) for k, v in special().items()}
        missing = [k for k in SPECIAL_TOKEN_KEYS if k not in ids]
        if missing:
            raise InputError(
                "The preprocess model's special-token dict lacks required keys.",
                received={"handle": self.handle, "found": sorted(ids), "missing": missing},
                fix=f"Expected keys: {', '.join(SPECIAL_TOKEN_KEYS)}.",
            )
        self._tokenize_fn = tokenize
        self.special_tokens = ids
        self.start_id = ids["start_of_sequence_id"]
        self.end_id = ids["end_of_segment_id"]
        self.pad_id = ids["padding_id"]
        self.vocabulary_size = ids["vocab_size"]

    def tokenize(self, strings: tf.Tensor) -> tf.RaggedTensor:
        """(batch,) tf.string -> (batch, None) int32 ragged word-piece ids."""
        strings = tf.reshape(tf.convert_to_tensor(strings, tf.string), [-1])
        pieces = self._tokenize_fn(strings)
        if not isinstance(pieces, tf.RaggedTensor):
            pieces = tf.RaggedTensor.from_tensor(pieces)
        if pieces.ragged_rank > 1:
            pieces = pieces.merge_dims(-2, -1)
        return tf.cast(pieces, tf.int32)

    def vocabulary(self) -> list[str] | None:
        """The word pieces in `assets/vocab.txt`, when the model ships one."""
        return _read_vocabulary(self.path)

    @property
    def lowercase(self) -> bool:
        """Whether the tokenizer folds case (probed: does "Hello" tokenize as "hello"?)."""
        upper, lower = self.tokenize(tf.constant(["Hello World", "hello world"])).to_list()
        return upper == lower


def _read_vocabulary(path: str) -> list[str] | None:
    vocab = os.path.join(path, "assets", "vocab.txt")
    if not os.path.isfile(vocab):
        return None
    with open(vocab, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


# === Backbones ===


def load_tf_hub_backbone(spec: BackboneSpec) -> TextBackbone | ImageBackbone:
    """Loads a TF Hub text encoder (with its preprocess model) or image feature vector.

    Args:
        spec: BackboneSpec with source `tf_hub` (see `resolve_backbone`). For
            text, `spec.preprocess_handle` must name the preprocess SavedModel.

    Returns:
        A `TextBackbone` whose encoder takes `token_ids`/`padding_mask`/
        `segment_ids` and returns `sequence_output`/`pooled_output`, or an
        `ImageBackbone` whose encoder takes images in [0, 1] (pixel convention
        `unit`) and returns `(batch, features)`. The hub weights are trainable.

    Raises:
        InputError: if the handle is not a SavedModel, or does not follow the
            text-encoder / image feature-vector API.

    Example:

    ```python
    backbone = load_tf_hub_backbone(resolve_backbone("bert_en_uncased_l2_h128_tfhub"))
    backbone.encoder({"token_ids": ids, "padding_mask": mask, "segment_ids": segs})
    ```
    """
    if spec.source != "tf_hub":
        raise InputError(
            "Not a TF Hub backbone.",
            received={"backbone": spec.name, "source": spec.source},
            fix="Use load_backbone(), which picks the loader for each source.",
        )
    if spec.modality == "text":
        return _load_text(spec)
    return _load_image(spec)


def _layer_name(spec: BackboneSpec, suffix: str) -> str:
    stem = Path(spec.name.rstrip("/")).name or "hub"
    return re.sub(r"[^0-9A-Za-z_]+", "_", stem).strip("_") + suffix


def _apply_metadata(spec: BackboneSpec, metadata: dict[str, Any]) -> BackboneSpec:
    """Fills what a directory alone cannot tell with what `export_tfhub` recorded."""
    fields = ("architecture", "default_pooling", "max_sequence_length", "image_size", "params",
              "license")
    changes = {k: metadata[k] for k in fields if metadata.get(k) is not None}
    if metadata.get("description"):
        changes["description"] = f"{metadata['description']} (TF Hub export at {spec.handle})"
    return spec.replace(**changes) if changes else spec


def _load_text(spec: BackboneSpec) -> TextBackbone:
    if not spec.preprocess_handle:
        # A URL first has to download: offline, that (not the missing preprocess
        # model) is what the user must hear about.
        resolve_handle(spec.handle)
        raise InputError(
            "A TF Hub text encoder needs its preprocess model.",
            received={"backbone": spec.name},
            fix="Put it in a sibling folder named <encoder>_preprocess, or set "
            "preprocess_handle in the spec.",
        )
    layer = HubLayer(spec.handle, name=_layer_name(spec, "_hub_encoder"))
    spec = _apply_metadata(spec, read_export_metadata(layer.resolved_path))
    _check_text_inputs(layer)
    tokenizer = HubTokenizer(spec.preprocess_handle)

    # === Functional Model ===
    inputs = {n: keras.Input(shape=(None,), dtype="int32", name=n) for n in TEXT_INPUTS}
    outputs = layer({_TEXT_INPUT_MAP[n]: inputs[n] for n in TEXT_INPUTS})
    missing = [k for k in HUB_TEXT_OUTPUTS if not isinstance(outputs, Mapping) or k not in outputs]
    if missing:
        found = sorted(outputs) if isinstance(outputs, Mapping) else _describe(outputs)
        raise InputError(
            "The TF Hub text encoder does not return the expected outputs.",
            received={"handle": spec.handle, "found": found},
            fix=f"Expected a dict with {', '.join(HUB_TEXT_OUTPUTS)}.",
        )
    encoder = keras.Model(
        inputs,
        {"sequence_output": outputs["sequence_output"], "pooled_output": outputs["pooled_output"]},
        name=_layer_name(spec, "_encoder"),
    )
    hidden_dim = outputs["pooled_output"].shape[-1]
    if hidden_dim is None:
        probe = {n: tf.ones((1, 4), tf.int32) for n in TEXT_INPUTS}
        hidden_dim = encoder(probe)["pooled_output"].shape[-1]
    lowercase = _lowercase(layer.resolved_object, tokenizer)
    return TextBackbone(
        spec=spec,
        encoder=encoder,
        tokenizer=tokenizer,
        hidden_dim=int(hidden_dim),
        max_sequence_length=int(spec.max_sequence_length or 512),
        vocabulary=tokenizer.vocabulary() or _read_vocabulary(layer.resolved_path),
        lowercase=lowercase,
    )


def _check_text_inputs(layer: HubLayer) -> None:
    specs = layer.input_specs
    ok = [s for s in specs if isinstance(s, Mapping) and set(HUB_TEXT_INPUTS) <= set(s)]
    if specs and not ok:
        raise InputError(
            "The TF Hub model does not take BERT-style text-encoder inputs.",
            received={"handle": layer.handle, "found": _describe(specs[0])},
            fix=f"Expected a dict with {', '.join(HUB_TEXT_INPUTS)} (int32, [batch, seq]).",
        )


def _lowercase(encoder_object: Any, tokenizer: HubTokenizer) -> bool:
    flag = getattr(encoder_object, "do_lower_case", None)
    if isinstance(flag, tf.Variable):  # TF Hub BERT encoders record it.
        return bool(flag.numpy())
    return tokenizer.lowercase


def _load_image(spec: BackboneSpec) -> ImageBackbone:
    # Pretrained batch norm stays frozen while fine-tuning, as the image
    # builder does for every other pretrained backbone: on small batches,
    # batch statistics would overwrite the ImageNet ones.
    layer = HubLayer(
        spec.handle,
        output_key=spec.extra.get("output_key"),
        freeze_batch_norm=True,
        name=_layer_name(spec, "_hub_features"),
    )
    metadata = read_export_metadata(layer.resolved_path)
    spec = _apply_metadata(spec, metadata)
    side = _fixed_side(layer)
    image_size = side or int(spec.image_size or 224)

    # === Functional Model ===
    images = keras.Input(shape=(side, side, 3), dtype="float32", name="images")
    try:
        features = layer(images)
        # A dummy call: traced shapes of flexible models can hide the width.
        probe = layer(tf.zeros((1, image_size, image_size, 3), tf.float32))
    except (ValueError, TypeError, tf.errors.OpError) as err:
        raise InputError(
            "The TF Hub model does not take images as an image feature-vector model does.",
            received={"handle": spec.handle, "found": _describe(layer.input_specs[:1])},
            fix="Expected float32 images in [0, 1], (batch, height, width, 3). "
            f"({err.__class__.__name__}: {_first_line(err)})",
        ) from None
    if isinstance(probe, Mapping):
        raise InputError(
            "The TF Hub image model returns a dict; say which entry is the feature vector.",
            received={"handle": spec.handle, "found": sorted(probe)},
            fix="Set extra={'output_key': ...} in the spec.",
        )
    if len(probe.shape) != 2:
        raise InputError(
            "The TF Hub image model does not return a feature vector (batch, features).",
            received={"handle": spec.handle, "output_shape": list(probe.shape)},
            fix="Use the model's feature_vector variant, not classification or feature maps.",
        )
    encoder = keras.Model(images, features, name=_layer_name(spec, "_encoder"))
    spec = spec.replace(image_size=image_size, pixel_convention="unit")
    return ImageBackbone(
        spec=spec,
        encoder=encoder,
        image_size=image_size,
        pixel_convention="unit",
        feature_dim=int(probe.shape[-1]),
    )


def _fixed_side(layer: HubLayer) -> int | None:
    """The image side a fixed-size model was traced for, or None when flexible."""
    for spec in layer.input_specs:
        if isinstance(spec, tf.TensorSpec) and spec.shape.rank == 4:
            height, width = spec.shape[1], spec.shape[2]
            if height is not None and height == width:
                return int(height)
            return None
    return None
