"""Data sources: each loads one CIFAR-10 split into memory as uint8 images and int32 labels.

Loading is kept apart from the transforms (pipeline.py): every source returns the same
`Split` so the pipeline never needs to know where the images came from.
"""

import dataclasses
import os
import pathlib

import numpy as np
import tensorflow as tf

IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
CIFAR10_TRAIN_EXAMPLES = 50_000
CIFAR10_TEST_EXAMPLES = 10_000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DataError(Exception):
  """The data a user pointed us at is missing or unusable; the message says why."""


@dataclasses.dataclass(frozen=True)
class Split:
  """One split held in memory: images uint8 [N, 32, 32, 3], labels int32 [N]."""
  images: np.ndarray
  labels: np.ndarray
  class_names: tuple[str, ...]

  @property
  def num_examples(self) -> int:
    return int(self.labels.shape[0])

  def as_dataset(self) -> tf.data.Dataset:
    """Returns the split as a dataset of (image, label) pairs."""
    return tf.data.Dataset.from_tensor_slices((self.images, self.labels))


def load_synthetic(num_examples: int, seed: int) -> Split:
  """Random uint8 images and labels, for smoke runs and benchmarks.

  Args:
    num_examples: how many examples to make.
    seed: seed of the generator, so a run can be repeated.
  Returns:
    the split.
  """
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(num_examples, *IMAGE_SHAPE), dtype=np.uint8)
  labels = rng.integers(0, NUM_CLASSES, size=(num_examples,), dtype=np.int32)
  return Split(images, labels, tuple(str(i) for i in range(NUM_CLASSES)))


def load_tfds(split: str, data_dir: str | None) -> Split:
  """Loads a split of tensorflow-datasets' `cifar10` into memory.

  Args:
    split: "train" or "test".
    data_dir: the TFDS data dir; None means TFDS's default (~/tensorflow_datasets).
  Returns:
    the split.
  Raises:
    DataError: when the dataset is not prepared there and cannot be downloaded.
  """
  import tensorflow_datasets as tfds  # Imported here: it is slow and only this source needs it.

  try:
    builder = tfds.builder("cifar10", data_dir=data_dir)
    builder.download_and_prepare()
    images, labels = tfds.as_numpy(
        builder.as_dataset(split=split, batch_size=-1, as_supervised=True))
  except Exception as e:  # TFDS raises many types (DownloadError, OSError, ...).
    where = data_dir or "~/tensorflow_datasets"
    raise DataError(
        f"could not load CIFAR-10 through tensorflow-datasets (data_dir={where}): "
        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n"
        "Without network access, either copy a prepared TFDS data dir (one that holds "
        "cifar10/3.0.2/) and pass it as --data_dir, or put the official "
        "cifar-10-binary.tar.gz in <data_dir>/downloads/manual, or use "
        "--data_source=folder --data_dir=DIR with DIR/train/<class>/*.png|jpg and "
        "DIR/test/<class>/...") from None
  return Split(images.astype(np.uint8), labels.astype(np.int32),
               tuple(builder.info.features["label"].names))


def _class_dirs(split_dir: pathlib.Path) -> list[pathlib.Path]:
  if not split_dir.is_dir():
    raise DataError(f"{split_dir}: no such directory (expected one sub-folder per class)")
  dirs = sorted(p for p in split_dir.iterdir() if p.is_dir())
  if not dirs:
    raise DataError(f"{split_dir}: has no class sub-folders")
  return dirs


def _image_files(class_dir: pathlib.Path) -> list[str]:
  files = sorted(str(p) for p in class_dir.iterdir()
                 if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
  if not files:
    raise DataError(f"{class_dir}: class folder has no .png/.jpg/.jpeg images")
  return files


def _decode(path: tf.Tensor) -> tf.Tensor:
  # expand_animations=False gives a 3-D tensor for every format; channels=3 turns
  # grayscale and RGBA images into RGB (the documented conversion).
  return tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)


def _find_bad_file(paths: list[str]) -> str:
  """Decodes files one by one to name the first one tf.data choked on."""
  for path in paths:
    try:
      image = _decode(tf.constant(path))
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
      return f"{path}: not a readable PNG/JPEG image ({e.message.splitlines()[0]})"
    if tuple(image.shape) != IMAGE_SHAPE:
      return f"{path}: image is {image.shape[1]}x{image.shape[0]}, expected 32x32"
  return "one of the images could not be decoded"


def load_folder(data_dir: str, split: str) -> Split:
  """Loads `<data_dir>/<split>/<class>/*.{png,jpg,jpeg}` into memory.

  Labels are the index of the class folder in sorted order. Grayscale and RGBA images
  are converted to RGB; images that are not 32x32 are an error.

  Args:
    data_dir: the folder holding train/ and test/.
    split: "train" or "test".
  Returns:
    the split.
  Raises:
    DataError: naming the path and what is wrong with it.
  """
  root = pathlib.Path(data_dir)
  if not root.is_dir():
    raise DataError(f"{data_dir}: data dir does not exist")
  class_dirs = _class_dirs(root / split)
  paths, labels = [], []
  for label, class_dir in enumerate(class_dirs):
    files = _image_files(class_dir)
    paths += files
    labels += [label] * len(files)

  def decode_checked(path):
    image = _decode(path)
    tf.debugging.assert_equal(tf.shape(image), IMAGE_SHAPE, message="wrong image shape")
    return image

  dataset = tf.data.Dataset.from_tensor_slices(paths).map(
      decode_checked, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  images = np.empty((len(paths), *IMAGE_SHAPE), np.uint8)
  try:
    offset = 0
    for batch in dataset.batch(1024).as_numpy_iterator():
      images[offset:offset + len(batch)] = batch
      offset += len(batch)
  except tf.errors.OpError:
    raise DataError(_find_bad_file(paths)) from None
  return Split(images, np.asarray(labels, np.int32), tuple(d.name for d in class_dirs))


def load_splits(data_source: str, data_dir: str | None, seed: int = 0,
                synthetic_examples: tuple[int, int] = (CIFAR10_TRAIN_EXAMPLES,
                                                       CIFAR10_TEST_EXAMPLES)
                ) -> tuple[Split, Split]:
  """Loads the train and test splits of a source and checks they agree.

  Args:
    data_source: "tfds", "folder" or "synthetic".
    data_dir: the source's directory (unused by synthetic).
    seed: seed of the synthetic source.
    synthetic_examples: train and test sizes of the synthetic source.
  Returns:
    (train, test).
  Raises:
    DataError: when the data is missing or unusable.
  """
  if data_source == "synthetic":
    return (load_synthetic(synthetic_examples[0], seed),
            load_synthetic(synthetic_examples[1], seed + 1))
  if data_source == "tfds":
    return load_tfds("train", data_dir), load_tfds("test", data_dir)
  if data_source == "folder":
    if not data_dir:
      raise DataError("--data_source=folder needs --data_dir=DIR (DIR/train/<class>/, DIR/test/<class>/)")
    train, test = load_folder(data_dir, "train"), load_folder(data_dir, "test")
    if train.class_names != test.class_names:
      only_train = sorted(set(train.class_names) - set(test.class_names))
      only_test = sorted(set(test.class_names) - set(train.class_names))
      raise DataError(
          f"{os.path.join(data_dir, 'train')} and {os.path.join(data_dir, 'test')} have "
          f"different class folders (only in train: {only_train}, only in test: {only_test})")
    return train, test
  raise DataError(f"unknown data source {data_source!r}: use tfds, folder or synthetic")
