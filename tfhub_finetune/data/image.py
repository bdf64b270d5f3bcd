"""tf.data input pipelines for images: class folders, CSV, TFRecord, TFDS.

`load_image_dataset(source, image_size=...)` returns batches of
`(images, labels)`: float32 `(batch, size, size, 3)` raw pixels in 0..255 (the
classifier normalises them) and int32 class ids, plus the class names in id
order so they can be saved with the model.

Sources:

- a folder of class folders, `train/<class>/*` (any depth below the class
  folder); class ids follow the sorted folder names;
- a `.csv` of `path,label` rows (optional header; relative paths are relative
  to the CSV's folder; labels sorted by name, or numerically if all integers);
- TFRecord files (`.tfrecord`, `.tfrecords`, `.tfrec`, or a glob) of
  `tf.train.Example`s with `image/encoded` (bytes) and `image/class/label`
  (int64);
- a TFDS dataset, `tfds:<name>` or `tfds:<name>:<split>` (supervised keys).

Pipeline: decode (JPEG, PNG, GIF first frame, BMP, WebP; grayscale, palette and RGBA
become RGB, 16-bit PNG becomes 8-bit), optional aspect-preserving centre crop,
resize (bilinear, antialiased), cache as uint8, then for training only a
seeded shuffle and augmentation (flip, zoom-in + shift as a random crop, small
rotation; optionally RandAugment), batch, prefetch.

Bad input, decided per case:

- Corrupt or truncated image, a non-image file in a class folder, an
  unreadable file, a CSV row naming a missing file, an undecodable TFRecord
  image: skipped and counted. Each gets a warning naming the file and is
  listed in `ImageDataset.skipped`. They are found by one validation pass
  before training (a parallel decode; JPEGs at 1/8 scale), so training never
  fails mid-epoch on them. `validate=False` skips that pass and drops failing
  images in flight instead (no names, no count).
- Hidden files (names starting with `.`, e.g. `.DS_Store`): ignored silently.
- Grayscale / RGBA / palette / 16-bit PNG, GIF, BMP, WebP: converted to 8-bit RGB.
- 1x1 and very large images (10000x10000): work; they are resized like any
  other (a huge image costs its decode time).
- Empty class folder, or one whose files are all unreadable: `InputError`
  naming the folder (a class with no examples cannot be learned or scored).
- Evaluation class folder (or CSV label, TFRecord id, TFDS class list) not
  among the training classes: `InputError` naming the folder (its ids would
  be meaningless).
- A training class absent from the evaluation data: a warning only; metrics
  are still defined.
- Missing data folder/file, a folder without class folders, a malformed CSV
  row, a TFRecord without the two feature keys or with corrupt framing, an
  unknown TFDS name: `InputError`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tfhub_finetune.config import AUGMENTATIONS
from tfhub_finetune.data.labels import LabelVocabulary
from tfhub_finetune.data.sources import (
    data_suffix,
    first_label_is_a_header_word,
    load_tfds,
    read_csv_rows,
    stratified_holdout,
)
from tfhub_finetune.errors import InputError, did_you_mean

logger = logging.getLogger(__name__)

TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords", ".tfrec")
ENCODED_KEY = "image/encoded"
LABEL_KEY = "image/class/label"
# Leading bytes of the formats `tf.io.decode_image` reads.
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"RIFF")
_CSV_PATH_HEADERS = ("path", "file", "filename", "file_name", "image", "image_path")
# Skipped files named one by one in the log; the rest are summarised.
_MAX_NAMED_WARNINGS = 20


@dataclasses.dataclass(frozen=True)
class SkippedFile:
    """An input left out of the dataset, and why.

    Attributes:
        path: str. The file (for TFRecords `file#record=N`).
        reason: str. E.g. `corrupt or truncated image data`.
    """

    path: str
    reason: str


@dataclasses.dataclass
class ImageDataset:
    """Decoded images and what is needed to batch and interpret them.

    Attributes:
        examples: tf.data.Dataset. Unbatched `(image, label)`: uint8
            `(size, size, 3)` and int32, decoded and resized once (cached
            when asked), in a fixed order.
        vocabulary: LabelVocabulary. Class names in id order; save it with
            the model (`vocabulary.save(model_dir / "labels.json")`).
        num_examples: int or None. Examples per epoch, when known.
        skipped: list of SkippedFile. Inputs left out by validation.
        source: str. What the data was read from.
        dataset: tf.data.Dataset or None. Batches as `load_image_dataset`'s
            arguments asked for: float32 `(batch, size, size, 3)` in 0..255
            and int32 `(batch,)`.
        labels: np.ndarray or None. The class id of each example in order
            (one per example), where the source lists them (class folders,
            CSV, TFRecord; not TFDS, nor with `validate=False`, which drops
            undecodable images in flight); `split` stratifies by them.
    """

    examples: tf.data.Dataset
    vocabulary: LabelVocabulary
    num_examples: int | None
    skipped: list[SkippedFile]
    source: str
    dataset: tf.data.Dataset | None = None
    labels: np.ndarray | None = None

    @property
    def label_names(self) -> list[str]:
        """Class names in id order."""
        return self.vocabulary.names

    def batches(
        self,
        batch_size: int,
        *,
        training: bool = False,
        seed: int | tf.Tensor = 0,
        augment: str | keras.Layer | None = "basic",
        shuffle_buffer: int | None = None,
        reshuffle_each_iteration: bool = True,
    ) -> tf.data.Dataset:
        """Batches `examples`; when training, shuffles (seeded) and augments.

        Args:
            batch_size: int. Examples per batch (the last may be smaller).
            training: bool. Shuffle and augment. Defaults to `False`.
            seed: int. Shuffle seed (`fit_resumable` passes one per epoch). A
                tensor seed crashes tf.data's shuffle when the global seed is 0.
            augment: str, keras layer or None. `basic`, `randaugment`, `none`
                (see `build_augmenter`), or an augmenter built once and
                reused, which tf.data functions need (they cannot create
                Keras layers). Defaults to `"basic"`.
            shuffle_buffer: int or None. Defaults to the number of examples,
                capped at 2048.
            reshuffle_each_iteration: bool. New order on every pass; False
                makes the order a pure function of `seed`. Defaults to `True`.

        Returns:
            A prefetched tf.data.Dataset of `(float32 images, int32 labels)`.

        Example:

        ```python
        augmenter = build_augmenter("basic", seed=1)
        epoch_3 = train.batches(32, training=True, seed=3, augment=augmenter,
                                reshuffle_each_iteration=False)
        ```
        """
        if batch_size < 1:
            raise InputError("Batch size must be at least 1.", received={"batch_size": batch_size})
        images = self.examples
        augmenter = None
        if training:
            buffer = shuffle_buffer or min(self.num_examples or 2048, 2048)
            images = images.shuffle(
                buffer, seed=seed, reshuffle_each_iteration=reshuffle_each_iteration
            )
            if isinstance(augment, str):
                augment = build_augmenter(augment, seed=seed if isinstance(seed, int) else 0)
            augmenter = augment
        batches = images.batch(batch_size).map(
            lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE
        )
        if augmenter is not None:
            batches = batches.map(
                lambda x, y: (augmenter(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE
            )
        if self.labels is not None:
            # Listed and validated, so the count is exact: Keras reads it for the step
            # count (a filtered hold-out split has none, and `fit` then warned "Your input
            # ran out of data" at every epoch's end).
            batches = batches.apply(tf.data.experimental.assert_cardinality(
                -(-len(self.labels) // batch_size)))
        return batches.prefetch(tf.data.AUTOTUNE)

    def split(self, fraction: float, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
        """Holds out a seeded random `fraction` of the examples.

        Args:
            fraction: float. Share of examples in the second part, in (0, 1).
            seed: int. Chooses which examples are held out. Defaults to `0`.

        Returns:
            `(kept, held_out)`, sharing the decoded (cached) examples.

        Example:

        ```python
        train, val = load_image_dataset("data/train", image_size=224).split(0.1)
        ```
        """
        if self.num_examples is None:
            raise InputError(
                "Cannot hold out a fraction of data of unknown size.",
                received={"source": self.source},
                fix="Give evaluation data explicitly.",
            )
        if not 0.0 < fraction < 1.0:
            raise InputError("The validation split leaves one side empty.",
                             received={"validation_split": fraction},
                             fix="Give a fraction in (0, 1).")
        rng = np.random.default_rng(seed)
        if self.labels is not None:
            # Every class keeps a training image (a rare class held out whole is never learnt).
            held = stratified_holdout(self.labels.tolist(), fraction, rng)
        else:
            held = rng.random(self.num_examples) < fraction
        if held.all() or not held.any():
            raise InputError(
                "The validation split leaves one side empty.",
                received={"validation_split": fraction, "num_examples": self.num_examples},
            )
        parts = []
        for mask in (~held, held):
            keep = tf.constant(mask)
            part = (
                self.examples.enumerate()
                .filter(lambda i, _, keep=keep: tf.gather(keep, i))
                .map(lambda _, example: example)
            )
            parts.append(dataclasses.replace(
                self, examples=part, num_examples=int(mask.sum()), dataset=None,
                labels=None if self.labels is None else self.labels[mask]))
        return parts[0], parts[1]


def load_image_dataset(
    source: str | os.PathLike,
    *,
    image_size: int,
    batch_size: int = 32,
    training: bool = False,
    label_names: Sequence[str] | None = None,
    split: str | None = None,
    crop_to_aspect_ratio: bool = True,
    augment: str = "basic",
    cache: bool | str = True,
    shuffle_buffer: int | None = None,
    seed: int = 0,
    validate: bool = True,
    max_examples: int | None = None,
) -> ImageDataset:
    """Builds a batched tf.data pipeline of raw-pixel images and class ids.

    Args:
        source: str or PathLike. A folder of class folders, a `.csv` of
            `path,label`, TFRecord file(s) or glob, or `tfds:<name>[:<split>]`.
        image_size: int. Output side in pixels.
        batch_size: int. Defaults to `32`.
        training: bool. Shuffle (seeded, every epoch) and augment. Defaults
            to `False`.
        label_names: list of str or None. Class names in id order, e.g. the
            training set's `label_names` when loading evaluation data; classes
            outside it raise `InputError`. None derives them from the data.
        split: str or None. TFDS split when `source` names none; defaults to
            `train` when training, else `validation` (or `test`).
        crop_to_aspect_ratio: bool. Centre-crop to a square before resizing
            (no distortion). False squeezes the whole image. Defaults to
            `True`.
        augment: str. `basic` (flip, zoom-in/shift crop, small rotation),
            `randaugment` (basic plus `keras.layers.RandAugment`) or `none`.
            Applied only when `training`. Defaults to `"basic"`.
        cache: bool or str. Cache decoded, resized uint8 images in memory
            (True) or in files with this prefix (str). Defaults to `True`.
        shuffle_buffer: int or None. Defaults to the number of examples,
            capped at 2048.
        seed: int. Seeds file order, shuffling and augmentation. Defaults to
            `0`.
        validate: bool. Decode every image once up front and skip the bad
            ones by name (see the module docstring). Defaults to `True`.
        max_examples: int or None. Keep only this many examples: with
            `training`, a seeded random subset of files (TFRecord/TFDS: the
            first ones); otherwise the first in source order. None keeps all.

    Returns:
        An `ImageDataset`.

    Raises:
        InputError: for missing data, empty class folders, classes unknown to
            `label_names` and malformed CSV/TFRecord/TFDS inputs.

    Example:

    ```python
    train = load_image_dataset("../shared/data/hymenoptera/train", image_size=224,
                               training=True)
    val = load_image_dataset("../shared/data/hymenoptera/val", image_size=224,
                             label_names=train.label_names)
    model.fit(train.dataset, validation_data=val.dataset, epochs=3)
    ```
    """
    _check_augment(augment)
    if not isinstance(image_size, int) or image_size < 1:
        raise InputError(
            "Image size must be a positive integer.", received={"image_size": image_size}
        )
    text = str(source)
    names = list(label_names) if label_names is not None else None
    listed = False  # Folders, CSVs and TFRecords list every example's label up front.
    if text.startswith("tfds:"):
        images, vocabulary, count = _tfds_images(text, split, training, names)
        skipped: list[SkippedFile] = []
        if max_examples:
            images = images.take(max_examples)
            count = min(count, max_examples) if count is not None else None
        images = images.map(
            lambda image, label: (_resize(image, image_size, crop_to_aspect_ratio), label),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    else:
        if any(ch in text for ch in "*?[") or text.lower().endswith(TFRECORD_SUFFIXES):
            encoded, vocabulary, labels, skipped = _tfrecord_examples(text, names, validate)
            if max_examples:
                encoded, labels = encoded.take(max_examples), labels[:max_examples]
            count, listed = len(labels), True
        else:
            path = Path(text).expanduser()
            if not path.exists():
                raise InputError(
                    "Image data not found.",
                    received={"path": text},
                    fix="Give a folder of class folders (<dir>/<class>/*.jpg), a .csv of "
                    "path,label, TFRecord files or tfds:<name>.",
                )
            if path.is_dir():
                files, labels, vocabulary = _class_folder_files(path, names)
            elif data_suffix(path) == ".csv":
                files, labels, vocabulary = _csv_files(path, names)
            else:
                raise InputError(
                    "Unsupported image data file.",
                    received={"path": text},
                    fix="Use a folder of class folders, a .csv, TFRecord files or tfds:<name>.",
                )
            if training:
                # Class folders come in blocks; a seeded permutation lets a
                # bounded shuffle buffer still mix classes (and makes
                # `max_examples` a random subset).
                order = np.random.default_rng(seed).permutation(len(files))
                files, labels = [files[i] for i in order], [labels[i] for i in order]
            if max_examples:
                files, labels = files[:max_examples], labels[:max_examples]
            files, labels, skipped = _drop_unreadable(
                files, labels, vocabulary.names, path, validate
            )
            count, listed = len(files), True
            encoded = tf.data.Dataset.from_tensor_slices((files, np.asarray(labels, np.int32)))
            encoded = encoded.map(lambda f, y: (tf.io.read_file(f), y))
        images = encoded.map(
            lambda contents, label: (
                _resize(decode_image(contents), image_size, crop_to_aspect_ratio),
                label,
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        if not validate:
            images = images.ignore_errors(log_warning=True)
    _report_skipped(skipped, text, count)
    if cache:
        images = images.cache(cache if isinstance(cache, str) else "")
    data = ImageDataset(
        examples=images, vocabulary=vocabulary, num_examples=count, skipped=skipped, source=text,
        # The listed order is the examples' order only when nothing is dropped while decoding.
        labels=np.asarray(labels, np.int32) if listed and validate else None,
    )
    data.dataset = data.batches(
        batch_size, training=training, seed=seed, augment=augment, shuffle_buffer=shuffle_buffer
    )
    return data


def decode_image(contents: tf.Tensor) -> tf.Tensor:
    """Decodes JPEG/PNG/GIF/BMP/WebP bytes to uint8 RGB `(height, width, 3)`.

    Grayscale, palette and RGBA images become RGB; a GIF gives its first
    frame; a 16-bit PNG is reduced to 8 bits. Traceable in tf.data and
    serving graphs.

    Args:
        contents: tf.Tensor. Scalar tf.string of encoded image bytes.

    Returns:
        uint8 tensor `(height, width, 3)`.

    Example:

    ```python
    image = decode_image(tf.io.read_file("bee.png"))
    ```
    """
    image = tf.io.decode_image(contents, channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def resize_image(image: tf.Tensor, image_size: int, crop_to_aspect_ratio: bool = True) -> tf.Tensor:
    """Resizes one image to `(image_size, image_size, 3)` float32 in 0..255.

    Args:
        image: tf.Tensor. `(height, width, channels)`, any numeric dtype in
            0..255; 1 or 4 channels become 3.
        image_size: int. Output side.
        crop_to_aspect_ratio: bool. Centre-crop to a square first, so shapes
            are not distorted. Defaults to `True`.

    Returns:
        float32 tensor `(image_size, image_size, 3)`.

    Example:

    ```python
    resize_image(decode_image(tf.io.read_file("ant.jpg")), 224)
    ```
    """
    image = _to_rgb(image)
    if crop_to_aspect_ratio:
        shape = tf.shape(image)
        height, width = shape[0], shape[1]
        side = tf.minimum(height, width)
        image = tf.image.crop_to_bounding_box(
            image, (height - side) // 2, (width - side) // 2, side, side
        )
    image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
    return tf.clip_by_value(image, 0.0, 255.0)


def build_augmenter(kind: str = "basic", seed: int = 0) -> keras.Sequential | None:
    """Random augmentation for training batches of 0..255 float images.

    `basic` is a horizontal flip, a zoom-in of up to 20% with a shift of up to
    10% (a random crop that keeps the output size) and a rotation of up to
    about 7 degrees; `randaugment` adds `keras.layers.RandAugment`. Every
    transform draws per image.

    Args:
        kind: str. `basic`, `randaugment` or `none`. Defaults to `"basic"`.
        seed: int. Base seed of the random layers. Defaults to `0`.

    Returns:
        A `keras.Sequential` to call with `training=True`, or None for `none`.

    Example:

    ```python
    augment = build_augmenter("basic", seed=1)
    dataset = dataset.map(lambda x, y: (augment(x, training=True), y))
    ```
    """
    _check_augment(kind)
    if kind == "none":
        return None
    augmenter = keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomZoom((-0.2, 0.0), fill_mode="reflect", seed=seed + 1),
            keras.layers.RandomTranslation(0.1, 0.1, fill_mode="reflect", seed=seed + 2),
            keras.layers.RandomRotation(0.02, fill_mode="reflect", seed=seed + 3),
        ],
        name="augment",
    )
    if kind == "randaugment":
        augmenter.add(keras.layers.RandAugment(value_range=(0, 255), seed=seed + 4))
    return augmenter


def _check_augment(kind: str) -> None:
    if kind not in AUGMENTATIONS:
        raise InputError(
            "Unknown augmentation.",
            received={"augment": kind},
            fix=did_you_mean(kind, AUGMENTATIONS),
        )


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
    channels = image.shape[-1]
    if channels == 1:
        return tf.image.grayscale_to_rgb(image)
    if channels == 4:
        return image[..., :3]
    return image


def _resize(image: tf.Tensor, image_size: int, crop: bool) -> tf.Tensor:
    # Cached as uint8: a quarter of the memory of float32 for the same pixels.
    return tf.cast(tf.round(resize_image(image, image_size, crop)), tf.uint8)


# === Class folders and CSV ===


def _class_folder_files(
    root: Path, label_names: list[str] | None
) -> tuple[list[str], list[int], LabelVocabulary]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise InputError(
            "No class folders in the image data folder.",
            received={"path": str(root)},
            fix="Put the images in one folder per class: <dir>/<class>/*.jpg.",
        )
    names = label_names if label_names is not None else [p.name for p in folders]
    ids = {name: i for i, name in enumerate(names)}
    unknown = [p for p in folders if p.name not in ids]
    if unknown:
        raise InputError(
            "Class folder is not one of the training classes.",
            received={"folder": str(unknown[0])},
            fix=f"Training classes: {', '.join(names)}. Rename or remove the folder.",
        )
    _warn_missing_classes(names, {p.name for p in folders}, root)
    files: list[str] = []
    labels: list[int] = []
    for folder in folders:
        found = sorted(
            str(p)
            for p in folder.rglob("*")
            # A dangling symlink is not is_file(): kept, so validation names it ("file not found").
            if (p.is_file() or (p.is_symlink() and not p.exists()))
            and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        )
        if not found:
            raise InputError(
                "Empty class folder.",
                received={"folder": str(folder)},
                fix="Add images to it or remove it.",
            )
        files += found
        labels += [ids[folder.name]] * len(found)
    return files, labels, LabelVocabulary(names=list(names), label_type="name")


def _csv_files(
    path: Path, label_names: list[str] | None
) -> tuple[list[str], list[int], LabelVocabulary]:
    rows, _ = read_csv_rows(path, ",", "utf-8")  # As text CSVs: quoting, BOM, bad bytes named.
    if rows and rows[0][1][0].strip().lower() in _CSV_PATH_HEADERS:
        rows = rows[1:]
    if not rows:
        raise InputError("The image CSV has no rows.", received={"file": str(path)})
    files, raw_labels, lines = [], [], []
    for line, row in rows:
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise InputError(
                "Malformed image CSV row; expected `path,label`.",
                received={"file": str(path), "line": line, "row": row},
            )
        file = Path(row[0].strip()).expanduser()
        files.append(str(file if file.is_absolute() else path.parent / file))
        raw_labels.append(row[1].strip())
        lines.append(line)
    if first_label_is_a_header_word(raw_labels) and not Path(files[0]).exists():
        first = rows[0][1]
        raise InputError(
            f"Row {lines[0]} of {path} looks like a header: there is no file `{first[0].strip()}`, "
            f"and its label `{raw_labels[0]}` occurs in no other row.",
            received={"file": str(path), "row": lines[0]},
            fix=f"Name its path column one of {', '.join(_CSV_PATH_HEADERS)}, or remove the row.",
        )
    vocabulary = LabelVocabulary.from_labels(
        raw_labels, label_names=label_names, source=str(path), rows=lines
    )
    ids = vocabulary.encode(raw_labels, source=str(path), rows=lines)
    _warn_missing_classes(vocabulary.names, {vocabulary.names[i] for i in ids}, path)
    return files, [int(i) for i in ids], vocabulary


def _warn_missing_classes(names: Sequence[str], present: set[str], where: Path) -> None:
    missing = [name for name in names if name not in present]
    if missing:
        logger.warning("No examples of classes %s in %s.", ", ".join(missing), where)


def _drop_unreadable(
    files: list[str], labels: list[int], names: list[str], where: Path, validate: bool
) -> tuple[list[str], list[int], list[SkippedFile]]:
    if not validate:
        return files, labels, []
    paths = tf.data.Dataset.from_tensor_slices(files)
    good = _decodable_indices(paths.map(tf.io.read_file))
    skipped = [SkippedFile(f, _why_unreadable(f)) for i, f in enumerate(files) if i not in good]
    keep = sorted(good)
    emptied = sorted(set(labels) - {labels[i] for i in keep})
    files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    if emptied and where.is_dir():
        raise InputError(
            "No readable images in class folder.",
            received={"folder": str(where / names[emptied[0]])},
            fix="Replace the corrupt files (see the warnings) or remove the folder.",
        )
    if emptied:  # A CSV's class whose every file was skipped: a class the model never sees.
        raise InputError(
            f"No readable images of class `{names[emptied[0]]}` in {where}.",
            received={"file": str(where), "label": names[emptied[0]]},
            fix="Replace the missing or corrupt files (see the warnings) or remove their rows.",
        )
    if not files:
        raise InputError("No readable images.", received={"path": str(where)})
    return files, labels, skipped


def _decodable_indices(contents: tf.data.Dataset) -> set[int]:
    """Indices of the elements of a dataset of encoded images that decode."""

    def probe(index, data):
        # JPEGs decode at 1/8 scale: every entropy-coded byte is still read
        # (truncation and corruption fail), at a fraction of the cost.
        shape = tf.cond(
            tf.io.is_jpeg(data),
            lambda: tf.shape(tf.io.decode_jpeg(data, channels=3, ratio=8)),
            lambda: tf.shape(decode_image(data)),
        )
        # Returning the shape keeps the decode from being pruned as unused.
        return index, shape

    probed = contents.enumerate().map(probe, num_parallel_calls=tf.data.AUTOTUNE)
    good: set[int] = set()
    for indices, _ in probed.ignore_errors().batch(1024):
        good.update(int(i) for i in indices.numpy())
    return good


def _why_unreadable(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except FileNotFoundError:
        return "file not found"
    except OSError as err:
        return f"unreadable ({err.strerror})"
    return _why_undecodable(head)


def _why_undecodable(head: bytes) -> str:
    if not head:
        return "empty file"
    if not head.startswith(_MAGIC) or (head.startswith(b"RIFF") and head[8:12] != b"WEBP"):
        return "not a JPEG/PNG/GIF/BMP/WebP image"
    return "corrupt or truncated image data"


def _report_skipped(skipped: list[SkippedFile], source: str, kept: int | None) -> None:
    for item in skipped[:_MAX_NAMED_WARNINGS]:
        logger.warning("Skipping %s: %s.", item.path, item.reason)
    if skipped:
        logger.warning(
            "Skipped %d of %d inputs in %s (listed in ImageDataset.skipped).",
            len(skipped),
            len(skipped) + (kept or 0),
            source,
        )


# === TFRecord ===


def _tfrecord_examples(
    pattern: str, label_names: list[str] | None, validate: bool
) -> tuple[tf.data.Dataset, LabelVocabulary, np.ndarray, list[SkippedFile]]:
    """The `(encoded, label)` examples, their vocabulary, their labels in order, what was skipped."""
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise InputError(
            "No TFRecord files match.", received={"path": pattern}, fix="Check the path or glob."
        )
    features = {
        ENCODED_KEY: tf.io.FixedLenFeature([], tf.string),
        LABEL_KEY: tf.io.FixedLenFeature([], tf.int64),
    }

    def parse(record):
        example = tf.io.parse_single_example(record, features)
        return example[ENCODED_KEY], tf.cast(example[LABEL_KEY], tf.int32)

    records = tf.data.TFRecordDataset(files)
    try:
        labels = np.concatenate(
            [y.numpy() for _, y in records.map(parse).batch(4096)] or [np.zeros(0, np.int32)]
        )
    except tf.errors.InvalidArgumentError as err:
        raise InputError(
            "TFRecord examples lack the image features.",
            received={"path": pattern},
            fix=f"Each tf.train.Example needs `{ENCODED_KEY}` (bytes) and `{LABEL_KEY}` "
            f"(int64). ({_tf_message(err)})",
        ) from None
    except tf.errors.DataLossError as err:
        raise InputError(
            "Corrupt TFRecord file.",
            received={"path": pattern},
            fix=f"({_tf_message(err)})",
        ) from None
    if labels.size == 0:
        raise InputError("The TFRecord files hold no examples.", received={"path": pattern})
    if label_names is None:
        label_names = [str(i) for i in range(int(labels.max()) + 1)]
    bad_ids = sorted({int(y) for y in labels if not 0 <= y < len(label_names)})
    if bad_ids:
        raise InputError(
            "TFRecord label ids outside the training classes.",
            received={"path": pattern, "label": bad_ids[0], "num_classes": len(label_names)},
            fix=f"Ids must be in 0..{len(label_names) - 1}.",
        )
    _warn_missing_classes(label_names, {label_names[y] for y in labels}, Path(pattern))
    vocabulary = LabelVocabulary(names=list(label_names), label_type="id")
    examples = records.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    if not validate:
        return examples, vocabulary, labels, []
    good = _decodable_indices(examples.map(lambda data, _: data))
    skipped = []
    if len(good) < labels.size:
        bad = sorted(set(range(labels.size)) - good)
        # Record indices run across files in order; name each by file and offset.
        offsets = np.cumsum([0] + [sum(1 for _ in tf.data.TFRecordDataset(f)) for f in files])
        heads = _record_heads(examples, bad)
        for i in bad:
            f = int(np.searchsorted(offsets, i, side="right") - 1)
            skipped.append(
                SkippedFile(f"{files[f]}#record={i - offsets[f]}", _why_undecodable(heads[i]))
            )
        keep = np.zeros(labels.size, bool)
        keep[sorted(good)] = True
        mask = tf.constant(keep)
        examples = (
            examples.enumerate()
            .filter(lambda i, _: tf.gather(mask, i))
            .map(lambda _, example: example)
        )
    if not good:
        raise InputError("No readable images in the TFRecord files.", received={"path": pattern})
    return examples, vocabulary, labels[sorted(good)], skipped


def _tf_message(err: tf.errors.OpError) -> str:
    """The kernel's words from a TF error, without `{{function_node ...}}` and `[Op:...]`."""
    text = re.sub(r"\{\{.*?\}\}\s*", "", err.message.splitlines()[0])
    return re.sub(r"\s*\[Op:\w+\].*$", "", text).strip()


def _record_heads(examples: tf.data.Dataset, indices: list[int]) -> dict[int, bytes]:
    wanted = tf.constant(indices, tf.int64)
    selected = examples.enumerate().filter(lambda i, _: tf.reduce_any(tf.equal(i, wanted)))
    return {int(i): bytes(example[0].numpy()[:16]) for i, example in selected}


# === TFDS ===


def _tfds_images(
    text: str, split: str | None, training: bool, label_names: list[str] | None
) -> tuple[tf.data.Dataset, LabelVocabulary, int | None]:
    import tensorflow_datasets as tfds  # Only TFDS sources pay for this import.

    name, _, split_in_source = text[len("tfds:") :].partition(":")
    split = split_in_source or split or ("train" if training else None)
    if split is None:
        try:
            splits = tfds.builder(name).info.splits
        except Exception:  # Unknown names are reported by load_tfds below.
            splits = {}
        split = "validation" if "validation" in splits else "test"
    dataset, info = load_tfds(name, split, source=text, as_supervised=True)
    label_feature = info.features[info.supervised_keys[1]]
    names = list(getattr(label_feature, "names", None) or [])
    if label_names is not None and names and names != label_names:
        raise InputError(
            "TFDS classes differ from the training classes.",
            received={"source": text, "classes": names},
            fix=f"Training classes: {', '.join(label_names)}.",
        )
    splits = info.splits
    count = splits[split].num_examples if split in splits else None
    dataset = dataset.map(lambda image, label: (image, tf.cast(label, tf.int32)))
    vocabulary = LabelVocabulary(names=label_names or names, label_type="id")
    return dataset, vocabulary, count
