"""tf.data image pipelines: sources, decoding, resizing, augmentation, bad input."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from tests.conftest import require_shared_path
from tfhub_finetune.data.image import (
    build_augmenter,
    decode_image,
    load_image_dataset,
    resize_image,
)
from tfhub_finetune.errors import InputError

SIZE = 32


def _jpeg_bytes(array: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _write_good(folder: Path, count: int, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"img{i}.jpg").write_bytes(_jpeg_bytes(_noise(40, 50, seed + i)))


def _collect(dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in dataset], strict=True)
    return np.concatenate(images), np.concatenate(labels)


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory) -> Path:
    """A class-folder tree holding every awkward file the loader must handle."""
    root = tmp_path_factory.mktemp("odd")
    good, bad = root / "good", root / "bad"
    _write_good(good, 2)
    _write_good(bad, 1, seed=10)
    gray = np.tile(np.arange(50, dtype=np.uint8) * 5, (40, 1))
    Image.fromarray(gray).save(good / "gray.png")
    Image.fromarray(np.dstack([_noise(40, 50), np.full((40, 50), 128, np.uint8)])).save(
        good / "rgba.png"
    )
    # 16-bit grayscale: 65535 must come out as 255, not wrap or clip to 0.
    Image.fromarray(np.full((40, 50), 65535, np.uint16)).save(good / "deep16.png")
    Image.fromarray(_noise(40, 50, 3)).save(good / "anim.gif")
    Image.fromarray(_noise(40, 50, 4)).save(good / "bitmap.bmp")
    Image.fromarray(_noise(40, 50, 6)).save(good / "photo.webp")
    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(good / "tiny.png")
    Image.fromarray(np.full((10000, 10000, 3), 90, np.uint8)).save(
        good / "huge.jpg", format="JPEG", quality=50
    )
    (good / ".DS_Store").write_bytes(b"\x00\x01hidden")
    jpeg = _jpeg_bytes(_noise(60, 60, 5))
    (bad / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (bad / "corrupt.jpg").write_bytes(b"\xff\xd8\xff" + np.random.default_rng(1).bytes(400))
    (bad / "notes.txt").write_text("not an image\n")
    (bad / "empty.png").write_bytes(b"")
    (bad / "moved.jpg").symlink_to(bad / "no-such-file.jpg")  # Dangling: named, not dropped.
    return root


def test_hymenoptera_folders_give_sorted_class_ids_and_raw_pixels():
    val = require_shared_path("data/hymenoptera/val")
    data = load_image_dataset(val, image_size=SIZE, batch_size=64)
    images, labels = _collect(data.dataset)
    assert data.label_names == ["ants", "bees"]
    assert data.num_examples == 153 and len(labels) == 153 and not data.skipped
    assert np.bincount(labels).tolist() == [70, 83]
    assert images.shape == (153, SIZE, SIZE, 3) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 255.0 and images.max() > 200.0


def test_bad_files_are_skipped_by_name_and_odd_images_decode(odd_images, caplog):
    with caplog.at_level(logging.WARNING, logger="tfhub_finetune.data.image"):
        data = load_image_dataset(odd_images, image_size=SIZE, batch_size=4, training=True, seed=3)
    reasons = {Path(s.path).name: s.reason for s in data.skipped}
    assert reasons == {
        "truncated.jpg": "corrupt or truncated image data",
        "corrupt.jpg": "corrupt or truncated image data",
        "notes.txt": "not a JPEG/PNG/GIF/BMP/WebP image",
        "empty.png": "empty file",
        "moved.jpg": "file not found",
    }
    for name in reasons:
        assert name in caplog.text
    assert "Skipped 5 of 16 inputs" in caplog.text
    # good: 2 jpg + gray, rgba, 16-bit, gif, bmp, webp, 1x1, 10000x10000; bad: 1 jpg.
    assert data.num_examples == 11 and data.label_names == ["bad", "good"]
    for _ in range(2):  # Two epochs: nothing left in the data can fail mid-epoch.
        images, labels = _collect(data.dataset)
        assert images.shape == (11, SIZE, SIZE, 3)
        assert np.bincount(labels).tolist() == [1, 10]


def test_decode_converts_gray_rgba_16bit_and_keeps_1x1(odd_images):
    good = odd_images / "good"

    def load(name):
        return decode_image(tf.io.read_file(str(good / name))).numpy()

    gray = load("gray.png")
    assert gray.shape == (40, 50, 3) and (gray[..., 0] == gray[..., 2]).all()
    assert load("rgba.png").shape == (40, 50, 3)
    assert load("deep16.png").min() == 255
    assert load("tiny.png").shape == (1, 1, 3)
    for name in ("anim.gif", "bitmap.bmp", "photo.webp"):
        assert load(name).shape == (40, 50, 3)
    tiny = resize_image(load("tiny.png"), SIZE).numpy()
    assert tiny.shape == (SIZE, SIZE, 3) and np.allclose(tiny, 200.0)


def test_center_crop_keeps_aspect_and_squeeze_keeps_everything():
    image = np.full((100, 200, 3), 255, np.uint8)
    image[:, :40] = 0  # A black band outside the centre square.
    cropped = resize_image(image, SIZE, crop_to_aspect_ratio=True).numpy()
    squeezed = resize_image(image, SIZE, crop_to_aspect_ratio=False).numpy()
    assert cropped.min() > 250.0
    assert squeezed[:, 0].max() < 5.0


def test_empty_class_folder_is_one_line_error_naming_it(tmp_path):
    _write_good(tmp_path / "cats", 2)
    (tmp_path / "dogs").mkdir()
    with pytest.raises(InputError, match="Empty class folder") as info:
        load_image_dataset(tmp_path, image_size=SIZE)
    assert str(tmp_path / "dogs") in str(info.value) and "\n" not in str(info.value)


def test_class_folder_with_only_bad_files_is_an_error(tmp_path):
    _write_good(tmp_path / "cats", 2)
    (tmp_path / "dogs").mkdir()
    (tmp_path / "dogs" / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(InputError, match="No readable images in class folder") as info:
        load_image_dataset(tmp_path, image_size=SIZE)
    assert str(tmp_path / "dogs") in str(info.value)


def test_val_class_unknown_to_training_is_an_error_naming_the_folder(tmp_path):
    _write_good(tmp_path / "train" / "cats", 2)
    _write_good(tmp_path / "train" / "dogs", 2)
    _write_good(tmp_path / "val" / "cats", 1)
    _write_good(tmp_path / "val" / "foxes", 1)
    train = load_image_dataset(tmp_path / "train", image_size=SIZE)
    with pytest.raises(InputError, match="not one of the training classes") as info:
        load_image_dataset(tmp_path / "val", image_size=SIZE, label_names=train.label_names)
    assert str(tmp_path / "val" / "foxes") in str(info.value)


def test_training_class_missing_from_val_only_warns(tmp_path, caplog):
    _write_good(tmp_path / "val" / "dogs", 2)
    with caplog.at_level(logging.WARNING, logger="tfhub_finetune.data.image"):
        val = load_image_dataset(tmp_path / "val", image_size=SIZE, label_names=["cats", "dogs"])
    assert "No examples of classes cats" in caplog.text
    assert _collect(val.dataset)[1].tolist() == [1, 1]


def test_missing_dir_and_dir_without_class_folders_are_errors(tmp_path):
    with pytest.raises(InputError, match="Image data not found"):
        load_image_dataset(tmp_path / "nope", image_size=SIZE)
    (tmp_path / "loose.jpg").write_bytes(_jpeg_bytes(_noise(8, 8)))
    with pytest.raises(InputError, match="No class folders"):
        load_image_dataset(tmp_path, image_size=SIZE)


def test_csv_source_relative_paths_missing_file_and_unknown_label(tmp_path, caplog):
    _write_good(tmp_path / "imgs", 3)
    (tmp_path / "train.csv").write_text(
        "path,label\nimgs/img0.jpg,cat\nimgs/img1.jpg,dog\nimgs/gone.jpg,dog\n"
    )
    with caplog.at_level(logging.WARNING, logger="tfhub_finetune.data.image"):
        train = load_image_dataset(tmp_path / "train.csv", image_size=SIZE)
    assert "gone.jpg" in caplog.text
    assert [(Path(s.path).name, s.reason) for s in train.skipped] == [
        ("gone.jpg", "file not found")
    ]
    assert train.label_names == ["cat", "dog"] and _collect(train.dataset)[1].tolist() == [0, 1]
    (tmp_path / "val.csv").write_text("imgs/img2.jpg,bird\n")
    with pytest.raises(InputError, match="Row 1 of .*val.csv has a label outside the known classes"):
        load_image_dataset(tmp_path / "val.csv", image_size=SIZE, label_names=train.label_names)
    (tmp_path / "bad.csv").write_text("imgs/img0.jpg,cat\nimgs/img1.jpg\n")
    with pytest.raises(InputError, match="Malformed image CSV row"):
        load_image_dataset(tmp_path / "bad.csv", image_size=SIZE)


def test_csv_header_of_unknown_names_is_refused_naming_the_row(tmp_path):
    _write_good(tmp_path / "imgs", 4)
    rows = "imgs/img0.jpg,cat\nimgs/img1.jpg,cat\nimgs/img2.jpg,dog\nimgs/img3.jpg,dog\n"
    (tmp_path / "train.csv").write_text("img,class\n" + rows)
    with pytest.raises(InputError, match=r"Row 1 of .*train\.csv looks like a header: there is "
                       r"no file `img`, and its label `class` occurs in no other row") as info:
        load_image_dataset(tmp_path / "train.csv", image_size=SIZE)
    assert "filename" in str(info.value)  # The fix names the headers that are read as one.
    # A real first image with a class of its own is an example, not a header.
    (tmp_path / "odd.csv").write_text("imgs/img0.jpg,bird\n" + rows)
    odd = load_image_dataset(tmp_path / "odd.csv", image_size=SIZE)
    assert odd.label_names == ["bird", "cat", "dog"]
    assert _collect(odd.dataset)[1].tolist() == [0, 1, 1, 2, 2]


def _example(encoded: bytes, label: int | None) -> bytes:
    feature = {"image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded]))}
    if label is not None:
        feature["image/class/label"] = tf.train.Feature(
            int64_list=tf.train.Int64List(value=[label])
        )
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def test_tfrecord_source_skips_undecodable_records_by_file_and_index(tmp_path):
    first, second = tmp_path / "a.tfrecord", tmp_path / "b.tfrecord"
    with tf.io.TFRecordWriter(str(first)) as writer:
        writer.write(_example(_jpeg_bytes(_noise(20, 30, 1)), 0))
        writer.write(_example(_jpeg_bytes(_noise(20, 30, 2)), 1))
    with tf.io.TFRecordWriter(str(second)) as writer:
        writer.write(_example(b"\xff\xd8\xffbroken", 1))
        writer.write(_example(_jpeg_bytes(_noise(20, 30, 3)), 2))
    data = load_image_dataset(str(tmp_path / "*.tfrecord"), image_size=SIZE)
    assert [(s.path, s.reason) for s in data.skipped] == [
        (f"{second}#record=0", "corrupt or truncated image data")
    ]
    assert data.label_names == ["0", "1", "2"] and data.num_examples == 3
    assert _collect(data.dataset)[1].tolist() == [0, 1, 2]
    missing = tmp_path / "nolabel.tfrecord"
    with tf.io.TFRecordWriter(str(missing)) as writer:
        writer.write(_example(_jpeg_bytes(_noise(8, 8)), None))
    with pytest.raises(InputError, match="image/class/label"):
        load_image_dataset(str(missing), image_size=SIZE)


def test_tfrecord_hold_out_keeps_every_class_in_training(tmp_path):
    # TFRecords list their labels too, so a rare class is never held out whole.
    records = tmp_path / "train.tfrecord"
    with tf.io.TFRecordWriter(str(records)) as writer:
        writer.write(_example(b"\xff\xd8\xffbroken", 1))  # Skipped: the labels must follow.
        for i in range(12):
            writer.write(_example(_jpeg_bytes(_noise(8, 8, i)), 0))
        writer.write(_example(_jpeg_bytes(_noise(8, 8, 99)), 1))
    data = load_image_dataset(str(records), image_size=8, batch_size=4)
    assert data.labels.tolist() == [0] * 12 + [1]
    for seed in range(10):
        train, held = data.split(0.25, seed=seed)
        assert train.labels.tolist().count(1) == 1 and 1 not in held.labels.tolist()
        assert sorted(_collect(train.batches(16))[1].tolist()) == sorted(train.labels.tolist())
    first = load_image_dataset(str(records), image_size=8, max_examples=5)
    assert first.labels.tolist() == [0] * 5 and len(_collect(first.dataset)[1]) == 5
    assert load_image_dataset(str(records), image_size=8, validate=False).labels is None


def test_tfds_source_with_mock_data():
    with tfds.testing.mock_data(num_examples=6):
        data = load_image_dataset("tfds:beans:train", image_size=SIZE, batch_size=4)
        images, labels = _collect(data.dataset)
    assert data.label_names == ["angular_leaf_spot", "bean_rust", "healthy"]
    assert images.shape == (6, SIZE, SIZE, 3) and set(labels) <= {0, 1, 2}
    with pytest.raises(InputError, match="Unknown TFDS dataset"):
        load_image_dataset("tfds:beanz", image_size=SIZE)


def test_training_order_is_seeded_and_reshuffled_each_epoch(tmp_path):
    for name in "abcd":
        _write_good(tmp_path / name, 4, seed=ord(name))

    def epochs(seed):
        data = load_image_dataset(
            tmp_path, image_size=8, batch_size=16, training=True, augment="none", seed=seed
        )
        return [_collect(data.dataset)[1].tolist() for _ in range(2)]

    first, again, other = epochs(1), epochs(1), epochs(2)
    assert first == again
    assert first[0] != first[1] and first != other


def test_per_epoch_batches_are_a_pure_function_of_the_epoch_seed(tmp_path):
    for name in "abcd":
        _write_good(tmp_path / name, 4, seed=ord(name))
    data = load_image_dataset(tmp_path, image_size=8)
    augmenter = build_augmenter("basic", seed=0)

    def epoch(k):  # What training.fit_resumable concatenates, one epoch each.
        return data.batches(
            16, training=True, seed=k + 100, augment=augmenter, reshuffle_each_iteration=False
        )

    def orders(stream):
        return [y.numpy().tolist() for _, y in stream]

    tf.random.set_seed(0)  # A global seed of 0 once broke tensor-seeded shuffles.
    stream = epoch(0).concatenate(epoch(1)).concatenate(epoch(2))
    assert orders(stream) == orders(stream)
    assert orders(stream)[2] == orders(epoch(2))[0]
    assert len({tuple(o) for o in orders(stream)}) == 3


def test_split_holds_out_a_seeded_disjoint_fraction(tmp_path):
    for name in "ab":
        _write_good(tmp_path / name, 10, seed=ord(name) * 100)
    data = load_image_dataset(tmp_path, image_size=8)
    kept, held = data.split(0.3, seed=1)
    assert kept.num_examples + held.num_examples == 20 and 0 < held.num_examples < 10
    images = [_collect(part.batches(32))[0] for part in (kept, held)]
    assert sum(len(x) for x in images) == 20
    rows = {x.tobytes() for part in images for x in part}
    assert len(rows) == 20  # Disjoint: every image lands on exactly one side.
    assert kept.label_names == held.label_names == ["a", "b"]
    # Each side's batches know their count (a filtered split has none of its own): what
    # Keras' `fit` reads instead of warning "Your input ran out of data" at epoch ends.
    for part in (kept, held):
        for training in (False, True):
            batches = part.batches(4, training=training, augment="none")
            count = int(tf.data.experimental.cardinality(batches))
            assert count == -(-part.num_examples // 4) == sum(1 for _ in batches)
    with pytest.raises(InputError, match="leaves one side empty"):
        data.split(0.0)
    subset = load_image_dataset(tmp_path, image_size=8, training=True, max_examples=5, seed=2)
    assert subset.num_examples == 5 and len(_collect(subset.batches(8))[1]) == 5


def test_augmentation_changes_training_images_only(tmp_path):
    _write_good(tmp_path / "x", 4)
    evaluation = load_image_dataset(tmp_path, image_size=SIZE, batch_size=4)
    assert np.array_equal(_collect(evaluation.dataset)[0], _collect(evaluation.dataset)[0])
    augmenter = build_augmenter("basic", seed=0)
    batch = _collect(evaluation.dataset)[0]
    changed = augmenter(batch, training=True).numpy()
    assert changed.shape == batch.shape and not np.allclose(changed, batch)
    assert build_augmenter("none") is None
    with pytest.raises(InputError, match="Unknown augmentation"):
        load_image_dataset(tmp_path, image_size=SIZE, augment="heavy")


def test_validate_false_drops_bad_images_in_flight(odd_images):
    data = load_image_dataset(odd_images, image_size=SIZE, batch_size=16, validate=False)
    assert not data.skipped
    assert len(_collect(data.dataset)[1]) == 11


def test_hold_out_split_keeps_every_class_in_training(tmp_path):
    # A class of one image held out whole would be a class training never sees.
    for name, count in (("common", 12), ("rare", 1)):
        (tmp_path / name).mkdir()
        for i in range(count):
            Image.fromarray(_noise(8, 8, i)).save(tmp_path / name / f"{i}.png")
    data = load_image_dataset(tmp_path, image_size=8, batch_size=4)
    assert data.labels.tolist() == [0] * 12 + [1]
    for seed in range(10):
        train, held = data.split(0.25, seed=seed)
        assert sorted(train.labels.tolist()).count(1) == 1 and 1 not in held.labels.tolist()
        assert held.num_examples == 3 and train.num_examples == 10
        _, labels = _collect(train.batches(16))
        assert sorted(labels.tolist()) == sorted(train.labels.tolist())
