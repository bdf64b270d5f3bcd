import pytest

from tests.conftest import require_shared_path
from tfhub_finetune.backbones.catalog import is_backbone, list_backbones, resolve_backbone
from tfhub_finetune.backbones.spec import BackboneSpec
from tfhub_finetune.errors import InputError


def test_catalog_names_resolve_to_their_specs():
    spec = resolve_backbone("minilm_l6_h384")
    assert spec.source == "python_package" and spec.modality == "text"
    assert "minilm_l6_h384" in list_backbones("*minilm*")
    assert set(list_backbones(modality="image")) >= {"scratch_cnn"}


def test_layer_suffix_makes_a_truncated_spec():
    spec = resolve_backbone("minilm_l6_h384@layers=2")
    assert spec.num_layers == 2 and spec.name == "minilm_l6_h384@layers=2"
    with pytest.raises(InputError, match="at least one layer"):
        resolve_backbone("minilm_l6_h384@layers=0")


def test_unknown_name_suggests_close_names():
    with pytest.raises(InputError) as err:
        resolve_backbone("minilm_l6_h38")
    message = str(err.value)
    assert "Received: backbone='minilm_l6_h38'" in message
    assert "Did you mean: minilm_l6_h384" in message
    assert not is_backbone("minilm_l6_h38")


def test_directory_without_weights_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert", "num_hidden_layers": 2}')
    with pytest.raises(InputError, match="no weights file"):
        resolve_backbone(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no weights we can load"):
        resolve_backbone(str(empty))


def test_shared_directories_resolve_by_path():
    text = resolve_backbone(str(require_shared_path("weights/paraphrase_minilm_l3_v2")))
    assert (text.modality, text.source) == ("text", "keras_hub")
    image = resolve_backbone(str(require_shared_path("weights/efficientnet_lite1")))
    assert image.modality == "image" and image.image_size == 240
    mobilenet = resolve_backbone(str(require_shared_path("weights/mobilenet_v2_1.0_224")))
    assert mobilenet.source == "keras_applications"
    assert mobilenet.pixel_convention == "torchvision"


def test_spec_round_trips_through_json():
    spec = resolve_backbone("scratch_text_encoder")
    assert BackboneSpec.from_dict(spec.to_dict()) == spec
