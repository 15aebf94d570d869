"""Data sources: each loads one CIFAR-10 split into memory as uint8 images and int32 labels.

Loading is kept apart from the transforms (pipeline.py): every source returns the same
`Split`, or raises DataError naming the path and what is wrong, before training starts.
"""

import concurrent.futures
import dataclasses
import functools
import os
import pathlib
import socket
import threading
from typing import Callable

import numpy as np
import tensorflow as tf

IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
CIFAR10_TRAIN_EXAMPLES = 50_000
CIFAR10_TEST_EXAMPLES = 10_000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Where tensorflow-datasets downloads CIFAR-10 from, and its archive's name (which TFDS
# also accepts in <data_dir>/downloads/manual/, checked against its registered checksum).
CIFAR10_URL_HOST = "www.cs.toronto.edu"
CIFAR10_ARCHIVE = "cifar-10-binary.tar.gz"
NETWORK_TIMEOUT_SECONDS = 5.0
# The folder source reads this many files at a time in Python, then TensorFlow decodes
# them in one graph of independent decode ops; DECODE_THREADS chunks are in flight.
DECODE_CHUNK_FILES = 128
DECODE_THREADS = 2


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
  """Random uint8 images and labels, made in memory, for smoke runs and benchmarks.

  They go through the same transforms as real data, so a synthetic run exercises the
  whole pipeline while reading nothing from disk (50,000 images take ~0.1 s to make).

  Args:
    num_examples: how many examples to make.
    seed: seed of the generator, so a run can be repeated.
  Returns:
    the split.
  """
  rng = np.random.default_rng(seed)
  images = np.frombuffer(rng.bytes(num_examples * int(np.prod(IMAGE_SHAPE))), np.uint8)
  labels = rng.integers(0, NUM_CLASSES, size=(num_examples,), dtype=np.int32)
  return Split(images.reshape(num_examples, *IMAGE_SHAPE), labels,
               tuple(str(i) for i in range(NUM_CLASSES)))


def can_reach(host: str, port: int = 443,
              timeout: float = NETWORK_TIMEOUT_SECONDS) -> bool:
  """Whether a TCP connection to host:port opens within `timeout` seconds.

  Name resolution can block far longer than a socket timeout on an air-gapped machine,
  so the attempt runs in a daemon thread that is abandoned after `timeout`.

  Args:
    host: host name.
    port: TCP port.
    timeout: seconds to wait in all.
  Returns:
    True when the connection opened.
  """
  result = []

  def connect():
    try:
      socket.create_connection((host, port), timeout=timeout).close()
      result.append(True)
    except OSError:
      result.append(False)

  thread = threading.Thread(target=connect, daemon=True)
  thread.start()
  thread.join(timeout)
  return bool(result and result[0])


def _offline_help(where: str) -> str:
  return ("Without network access: copy a prepared TFDS data dir (one holding "
          f"cifar10/3.0.2/) and pass it as --data_dir, or put the official {CIFAR10_ARCHIVE} "
          f"in {os.path.join(where, 'downloads', 'manual')}/, or use --data_source=folder "
          "--data_dir=DIR with DIR/train/<class>/*.png|jpg and DIR/test/<class>/...")


def load_tfds(split: str, data_dir: str | None) -> Split:
  """Loads a split of tensorflow-datasets' `cifar10` into memory, offline when it can.

  A data dir where cifar10 is already prepared is read without any network access. If it
  is not prepared, TFDS prepares it from <data_dir>/downloads/manual/cifar-10-binary.tar.gz
  when that archive is there, or else downloads it, but only after checking within
  NETWORK_TIMEOUT_SECONDS that the download host answers: never a hang.

  Args:
    split: "train" or "test".
    data_dir: the TFDS data dir; None means TFDS's default (~/tensorflow_datasets).
  Returns:
    the split.
  Raises:
    DataError: when the dataset is not prepared there and cannot be prepared.
  """
  try:
    import tensorflow_datasets as tfds  # Imported here: slow, and only this source needs it.
    builder = tfds.builder("cifar10", data_dir=data_dir)
  except Exception as e:  # ImportError, or whatever a broken install raises.
    raise DataError(f"tensorflow-datasets cannot open cifar10 (data_dir={data_dir}): "
                    f"{type(e).__name__}: {_first_line(e)}") from None
  where = os.path.dirname(os.path.dirname(builder.data_dir))  # <data_dir>/cifar10/3.0.2
  if not builder.is_prepared():
    manual_dir = os.path.join(where, "downloads", "manual")
    archive = os.path.join(manual_dir, CIFAR10_ARCHIVE)
    if os.path.exists(archive):
      download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
      action = f"preparing it from {archive}"
    elif can_reach(CIFAR10_URL_HOST):
      download_config = None
      action = f"downloading it from {CIFAR10_URL_HOST}"
    else:
      state = ("the directory does not exist" if not os.path.isdir(where)
               else f"{builder.data_dir} is missing or incomplete")
      raise DataError(f"{where}: TFDS data dir without a prepared cifar10 ({state}), and "
                      f"{CIFAR10_URL_HOST} cannot be reached to download it.\n"
                      + _offline_help(where))
    try:
      builder.download_and_prepare(download_config=download_config)
    except Exception as e:  # TFDS raises many types (DownloadError, OSError, ...).
      raise DataError(f"{where}: no prepared TFDS cifar10 there, and {action} failed: "
                      f"{type(e).__name__}: {_first_line(e)}\n" + _offline_help(where)) from None
  try:
    images, labels = tfds.as_numpy(
        builder.as_dataset(split=split, batch_size=-1, as_supervised=True))
  except Exception as e:
    raise DataError(f"{builder.data_dir}: cannot read the prepared cifar10 {split} split: "
                    f"{type(e).__name__}: {_first_line(e)}") from None
  return Split(images.astype(np.uint8), labels.astype(np.int32),
               tuple(builder.info.features["label"].names))


def _first_line(error: Exception) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else ""


def _class_dirs(split_dir: pathlib.Path) -> list[pathlib.Path]:
  if not split_dir.is_dir():
    raise DataError(f"{split_dir}: no such directory (expected one sub-folder per class)")
  dirs = sorted((p for p in split_dir.iterdir()
                 if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)
  if not dirs:
    raise DataError(f"{split_dir}: has no class sub-folders")
  if len(dirs) == 1:
    # One class trains a classifier that cannot be wrong: 100% accuracy that means nothing.
    raise DataError(f"{split_dir}: has one class sub-folder ({dirs[0].name}); a classifier "
                    "needs at least two")
  return dirs


def _image_files(class_dir: pathlib.Path) -> list[str]:
  """The image files of a class folder, sorted; hidden files are skipped, others refused."""
  files = []
  with os.scandir(class_dir) as entries:
    for entry in entries:
      if entry.name.startswith("."):
        continue
      path = os.path.join(class_dir, entry.name)
      if entry.is_dir():
        raise DataError(f"{path}: unexpected folder inside a class folder (class folders "
                        "hold image files only)")
      if os.path.splitext(entry.name)[1].lower() not in IMAGE_SUFFIXES:
        raise DataError(f"{path}: not an image file (class folders hold only "
                        f"{'/'.join(IMAGE_SUFFIXES)} files)")
      files.append(path)
  if not files:
    raise DataError(f"{class_dir}: class folder is empty (no {'/'.join(IMAGE_SUFFIXES)} "
                    "images)")
  return sorted(files)


def _decode(contents: tf.Tensor) -> tf.Tensor:
  # expand_animations=False gives a 3-D tensor for every format; channels=3 turns
  # grayscale and RGBA images into RGB (the documented conversion).
  return tf.io.decode_image(contents, channels=3, expand_animations=False)


@functools.cache
def _chunk_decoder() -> Callable[[tf.Tensor], tf.Tensor]:
  """A graph of DECODE_CHUNK_FILES independent decode ops, run in parallel by TensorFlow.

  Measured here: about 31 us of CPU an image, against about 75 us for a tf.data map
  (whose per-element overhead alone is about 40 us on this machine). Raw ops keep the
  graph small: it traces in about 0.1 s.
  """
  @tf.function(input_signature=[tf.TensorSpec([DECODE_CHUNK_FILES], tf.string)])
  def decode_chunk(contents):
    # DecodeImage is what tf.io.decode_image runs: channels=3 converts grayscale and RGBA.
    return tf.stack([
        tf.ensure_shape(tf.raw_ops.DecodeImage(contents=one, channels=3, dtype=tf.uint8,
                                               expand_animations=False), IMAGE_SHAPE)
        for one in tf.unstack(contents, num=DECODE_CHUNK_FILES)])
  return decode_chunk


def _what_is_wrong(path: str) -> str | None:
  """Says why one file cannot be used, or None if it can."""
  try:
    with open(path, "rb") as f:
      image = _decode(tf.constant(f.read()))
  except OSError as e:
    return f"{path}: cannot be read ({e.strerror or e})"
  except tf.errors.OpError as e:
    return f"{path}: not a readable PNG/JPEG image ({_first_line(e.message)})"
  if tuple(image.shape) != IMAGE_SHAPE:
    return (f"{path}: image is {image.shape[1]}x{image.shape[0]} pixels, expected "
            f"{IMAGE_SHAPE[1]}x{IMAGE_SHAPE[0]} (the folder source does not resize)")
  return None


def _read_files(paths: list[str]) -> list[bytes]:
  contents = []
  for path in paths:
    with open(path, "rb") as f:
      contents.append(f.read())
  return contents


def _decode_files(paths: list[str]) -> np.ndarray:
  """Reads and decodes image files into uint8 [len(paths), 32, 32, 3].

  Files are read in Python (about 12 us a file, less than tf.io.read_file in tf.data);
  DECODE_THREADS chunks are in flight at once, so reading overlaps decoding.

  Raises:
    DataError: naming the bad files of the first chunk that holds any.
  """
  decode_chunk = _chunk_decoder()

  def read_and_decode(chunk: list[str]) -> np.ndarray | None:
    try:
      contents = _read_files(chunk)
      # A short last chunk is filled up with copies of its first file.
      contents += contents[:1] * (DECODE_CHUNK_FILES - len(contents))
      return decode_chunk(tf.constant(contents)).numpy()[:len(chunk)]
    except (OSError, tf.errors.OpError):
      return None

  images = np.empty((len(paths), *IMAGE_SHAPE), np.uint8)
  chunks = [paths[start:start + DECODE_CHUNK_FILES]
            for start in range(0, len(paths), DECODE_CHUNK_FILES)]
  pool = concurrent.futures.ThreadPoolExecutor(DECODE_THREADS)
  try:
    for i, (chunk, decoded) in enumerate(zip(chunks, pool.map(read_and_decode, chunks))):
      if decoded is None:
        problems = [p for p in map(_what_is_wrong, chunk) if p]
        raise DataError("\n".join(problems or [f"{chunk[0]}...: could not be decoded"]))
      images[i * DECODE_CHUNK_FILES:i * DECODE_CHUNK_FILES + len(chunk)] = decoded
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
  return images


def _data_root(data_dir: str) -> pathlib.Path:
  root = pathlib.Path(data_dir)
  if not root.exists():
    raise DataError(f"{data_dir}: data dir does not exist")
  if not root.is_dir():
    raise DataError(f"{data_dir}: data dir is not a directory")
  return root


def load_folder(data_dir: str, split: str) -> Split:
  """Loads `<data_dir>/<split>/<class>/*.{png,jpg,jpeg}` into memory.

  Labels are the index of the class folder in sorted order. Grayscale and RGBA images
  are converted to RGB; images that are not 32x32 are an error; files other than
  .png/.jpg/.jpeg (hidden files aside) are an error.

  Args:
    data_dir: the folder holding train/ and test/.
    split: "train" or "test".
  Returns:
    the split.
  Raises:
    DataError: naming the path and what is wrong with it.
  """
  root = _data_root(data_dir)
  class_dirs = _class_dirs(root / split)
  paths, labels = [], []
  for label, class_dir in enumerate(class_dirs):
    files = _image_files(class_dir)
    paths += files
    labels += [label] * len(files)

  images = _decode_files(paths)
  return Split(images, np.asarray(labels, np.int32), tuple(d.name for d in class_dirs))


def load_splits(data_source: str, data_dir: str | None, seed: int = 0,
                synthetic_examples: tuple[int, int] | None = None
                ) -> tuple[Split, Split]:
  """Loads the train and test splits of a source and checks they agree.

  Args:
    data_source: "tfds", "folder" or "synthetic".
    data_dir: the source's directory (unused by synthetic).
    seed: seed of the synthetic source.
    synthetic_examples: train and test sizes of the synthetic source (default: CIFAR-10's).
  Returns:
    (train, test).
  Raises:
    DataError: when the data is missing or unusable.
  """
  if data_source == "synthetic":
    train, test = synthetic_examples or (CIFAR10_TRAIN_EXAMPLES, CIFAR10_TEST_EXAMPLES)
    return load_synthetic(train, seed), load_synthetic(test, seed + 1)
  if data_source == "tfds":
    return load_tfds("train", data_dir), load_tfds("test", data_dir)
  if data_source == "folder":
    if not data_dir:
      raise DataError("--data_source=folder needs --data_dir=DIR (DIR/train/<class>/, "
                      "DIR/test/<class>/)")
    # Both class lists are compared before any image is decoded.
    root = _data_root(data_dir)
    train_classes, test_classes = (
        [d.name for d in _class_dirs(root / split)] for split in ("train", "test"))
    if train_classes != test_classes:
      only_train = sorted(set(train_classes) - set(test_classes))
      only_test = sorted(set(test_classes) - set(train_classes))
      raise DataError(
          f"{root / 'train'} and {root / 'test'} have different class folders "
          f"(only in train: {only_train}, only in test: {only_test})")
    return load_folder(data_dir, "train"), load_folder(data_dir, "test")
  raise DataError(f"unknown data source {data_source!r}: use tfds, folder or synthetic")
