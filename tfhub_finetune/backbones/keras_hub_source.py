"""Text encoders from keras-hub: preset names, local preset dirs, Hugging Face-format dirs.

keras-hub's own `from_preset` is the single entry to the weights (it converts
Hugging Face BERT folders on the fly), so this module only adds what keras-hub
lacks: resolving installed-package handles, keeping the first k transformer
layers of a pretrained encoder, and adapting every family to one input/output
contract (`backbones.base.TextBackbone`).
"""

from __future__ import annotations

from pathlib import Path

import keras
import keras_hub
import tensorflow as tf

from tfhub_finetune.backbones.base import TEXT_INPUTS, TextBackbone
from tfhub_finetune.backbones.spec import BackboneSpec
from tfhub_finetune.errors import InputError
from tfhub_finetune.paths import package_dir


class KerasHubTokenizer:
    """Adapts a keras-hub WordPiece tokenizer to the `TextTokenizer` protocol.

    Example:

    ```python
    tok = KerasHubTokenizer(keras_hub.models.BertTokenizer.from_preset(path))
    ids = tok.tokenize(tf.constant(["a great movie"]))  # RaggedTensor
    ```
    """

    def __init__(self, tokenizer: keras_hub.tokenizers.Tokenizer):
        self.tokenizer = tokenizer
        self.start_id = int(_first_attr(tokenizer, ("cls_token_id", "start_token_id")))
        self.end_id = int(_first_attr(tokenizer, ("sep_token_id", "end_token_id")))
        self.pad_id = int(_first_attr(tokenizer, ("pad_token_id",), default=0))
        self.vocabulary_size = int(tokenizer.vocabulary_size())
        self.lowercase = bool(getattr(tokenizer, "lowercase", True))

    def tokenize(self, strings: tf.Tensor) -> tf.RaggedTensor:
        # Eagerly, keras-hub converts ragged output to Python lists; inside a
        # graph it keeps the tf.RaggedTensor, so we always tokenize in one.
        return self._tokenize_graph(tf.reshape(tf.convert_to_tensor(strings), [-1]))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def _tokenize_graph(self, strings: tf.Tensor) -> tf.RaggedTensor:
        ids = self.tokenizer(strings)
        if not isinstance(ids, tf.RaggedTensor):
            ids = tf.RaggedTensor.from_tensor(ids)
        return tf.cast(ids, tf.int32)

    def vocabulary(self) -> list[str] | None:
        get = getattr(self.tokenizer, "get_vocabulary", None)
        return list(get()) if get else None


def _first_attr(obj, names, default=None):
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    if default is not None:
        return default
    raise InputError(
        "Tokenizer lacks special-token ids.",
        received={"tokenizer": type(obj).__name__},
        fix=f"Expected one of the attributes: {', '.join(names)}.",
    )


def preset_handle(spec: BackboneSpec) -> str:
    """The string keras-hub's `from_preset` understands for `spec`."""
    if spec.source == "python_package":
        return str(package_dir(spec.handle))
    return spec.handle


def load_tokenizer(spec: BackboneSpec) -> KerasHubTokenizer:
    """Loads only the tokenizer of a keras-hub / HF-format text backbone."""
    handle = preset_handle(spec)
    try:
        tokenizer = keras_hub.tokenizers.Tokenizer.from_preset(handle)
    except (OSError, ValueError, FileNotFoundError) as err:
        raise InputError(
            "Could not load the tokenizer of the backbone.",
            received={"backbone": spec.name},
            fix=f"({err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''})",
        ) from None
    return KerasHubTokenizer(tokenizer)


def load_keras_hub_text_backbone(spec: BackboneSpec) -> TextBackbone:
    """Loads a keras-hub text encoder with its tokenizer.

    Args:
        spec: BackboneSpec with source `keras_hub` or `python_package`.

    Returns:
        A `TextBackbone`; when `spec.num_layers` is set, the encoder keeps only
        the first `num_layers` transformer layers, with their pretrained weights.

    Example:

    ```python
    bb = load_keras_hub_text_backbone(resolve_backbone("minilm_l6_h384@layers=2"))
    bb.encoder.count_params()
    ```
    """
    handle = preset_handle(spec)
    _check_weights_present(spec, handle)
    kwargs = {}
    policy = keras.config.dtype_policy().name
    if policy != "float32":
        kwargs["dtype"] = policy
    try:
        backbone = keras_hub.models.Backbone.from_preset(handle, **kwargs)
    except (OSError, FileNotFoundError) as err:
        raise InputError(
            "Could not load the backbone weights.",
            received={"backbone": spec.name},
            fix=f"({err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''})",
        ) from None
    tokenizer = load_tokenizer(spec)
    if spec.num_layers is not None:
        backbone = truncate_layers(backbone, spec.num_layers, name=spec.name)
    encoder = adapt_encoder(backbone)
    return TextBackbone(
        spec=spec,
        encoder=encoder,
        tokenizer=tokenizer,
        hidden_dim=int(backbone.hidden_dim),
        max_sequence_length=int(getattr(backbone, "max_sequence_length", 512)),
        vocabulary=tokenizer.vocabulary(),
        lowercase=tokenizer.lowercase,
    )


def _check_weights_present(spec: BackboneSpec, handle: str) -> None:
    path = Path(handle)
    if not path.is_dir():
        return  # A preset name; keras-hub downloads it.
    names = ("model.weights.h5", "model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
    if not any((path / n).exists() for n in names):
        raise InputError(
            "Backbone directory has no weights file.",
            received={"backbone": spec.name},
            fix=f"Expected one of {', '.join(names)} in {path}.",
        )


def truncate_layers(backbone: keras.Model, num_layers: int, name: str = "") -> keras.Model:
    """Keeps the embeddings and the first `num_layers` transformer layers.

    The new backbone is built from the same config with fewer layers and
    receives the pretrained weights of every layer it keeps, so `@layers=k`
    candidates are real smaller checkpoints, not random ones.

    Raises:
        InputError: if `num_layers` exceeds the backbone's depth.
    """
    config = backbone.get_config()
    depth = int(config.get("num_layers", 0))
    if not 1 <= num_layers <= depth:
        raise InputError(
            "Cannot keep more transformer layers than the backbone has.",
            received={"backbone": name, "layers": num_layers},
            fix=f"Use @layers=k with 1 <= k <= {depth}.",
        )
    if num_layers == depth:
        return backbone
    config["num_layers"] = num_layers
    small = backbone.__class__.from_config(config)
    for layer in small.layers:
        if layer.weights:
            layer.set_weights(backbone.get_layer(layer.name).get_weights())
    return small


def adapt_encoder(backbone: keras.Model) -> keras.Model:
    """Returns an encoder with the `TEXT_INPUTS` -> `sequence_output`/`pooled_output` contract.

    BERT backbones already have it and are returned as they are; families
    without segment ids or a pooler (DistilBERT) are wrapped.
    """
    input_names = set(backbone.input.keys()) if isinstance(backbone.input, dict) else set()
    outputs = backbone.output
    if input_names == set(TEXT_INPUTS) and isinstance(outputs, dict) and "pooled_output" in outputs:
        return backbone
    inputs = {n: keras.Input(shape=(None,), dtype="int32", name=n) for n in TEXT_INPUTS}
    out = backbone({n: inputs[n] for n in input_names})
    sequence = out["sequence_output"] if isinstance(out, dict) else out
    pooled = sequence[:, 0, :]
    return keras.Model(inputs, {"sequence_output": sequence, "pooled_output": pooled},
                       name=f"{backbone.name}_encoder")
