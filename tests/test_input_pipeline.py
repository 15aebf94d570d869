"""Tests of input_pipeline/: the transforms on random uint8 images (eagerly and inside
tf.data), determinism and resume, sharding, evaluation padding, and every bad input."""

import functools
import importlib.resources
import pathlib
import sys
import time
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf

from conftest import make_folder, run_main, write_image
from input_pipeline import pipeline, sources

PAD = pipeline.PAD


def random_images(count: int, seed: int = 0, shape=(32, 32, 3)) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (count, *shape), dtype=np.uint8)


def window_of(output: np.ndarray, source: np.ndarray) -> tuple[int, int, bool] | None:
  """(top, left, flipped) of the window of the PAD-padded source that output equals."""
  height, width = source.shape[:2]
  padded = np.pad(source, [(PAD, PAD), (PAD, PAD), (0, 0)])
  for top in range(2 * PAD + 1):
    for left in range(2 * PAD + 1):
      window = padded[top:top + height, left:left + width]
      if np.array_equal(output, window):
        return top, left, False
      if np.array_equal(output, window[:, ::-1]):
        return top, left, True
  return None


def take(dataset: tf.data.Dataset, count: int) -> list:
  return [tuple(t.numpy() for t in element) for element in dataset.take(count)]


def labelled_dataset(count: int, seed: int = 0):
  """Random images whose label is their index, so every output names its source."""
  images = random_images(count, seed)
  return images, tf.data.Dataset.from_tensor_slices((images, np.arange(count, dtype=np.int64)))


# Training transform.

def test_augment_batch_eagerly_gives_windows_of_the_padded_input_possibly_flipped():
  images = random_images(64)
  outputs = pipeline.augment_batch(tf.constant(images), tf.constant([1, 2], tf.int64)).numpy()
  assert outputs.dtype == np.uint8 and outputs.shape == images.shape
  found = [window_of(out, src) for out, src in zip(outputs, images)]
  assert None not in found
  # Offsets and flips are random per image: over 64 images, both flips and many offsets.
  assert {flipped for _, _, flipped in found} == {False, True}
  assert len({(top, left) for top, left, _ in found}) > 20


def test_augment_batch_flip_is_exactly_left_right():
  image = random_images(1)
  outputs = pipeline.augment_batch(tf.constant(image.repeat(400, axis=0)),
                                   tf.constant([0, 0], tf.int64)).numpy()
  # Outputs cropped at the centre (no shift) are the image or exactly its mirror.
  seen = set()
  for out in outputs:
    top, left, flipped = window_of(out, image[0])
    if (top, left) == (PAD, PAD):
      np.testing.assert_array_equal(out, image[0][:, ::-1] if flipped else image[0])
      seen.add(flipped)
  assert seen == {False, True}


def test_augment_batch_covers_every_offset():
  images = random_images(1).repeat(512, axis=0)
  outputs = pipeline.augment_batch(tf.constant(images), tf.constant([3, 4], tf.int64))
  found = {window_of(out, images[0]) for out in outputs.numpy()}
  assert {(t, l) for t, l, _ in found} == {(t, l) for t in range(2 * PAD + 1)
                                           for l in range(2 * PAD + 1)}


def test_augment_batch_inside_tf_data_equals_eager():
  images = random_images(16)
  seed = tf.constant([5, 6], tf.int64)
  dataset = tf.data.Dataset.from_tensors(images).map(
      lambda batch: pipeline.augment_batch(batch, seed))
  inside = next(iter(dataset)).numpy()
  np.testing.assert_array_equal(inside, pipeline.augment_batch(tf.constant(images), seed))
  assert all(window_of(out, src) for out, src in zip(inside, images))


def test_train_pipeline_batches_are_augmented_examples_with_their_labels():
  images, dataset = labelled_dataset(96)
  train = pipeline.train_pipeline(dataset, per_replica_batch_size=8, seed=0)
  assert train.element_spec[0].shape == (8, 32, 32, 3)
  assert train.element_spec[0].dtype == tf.uint8
  assert train.element_spec[1].shape == (8,) and train.element_spec[1].dtype == tf.int32
  for batch_images, batch_labels in take(train, 6):
    for image, label in zip(batch_images, batch_labels):
      assert window_of(image, images[label]) is not None


def test_train_pipeline_shuffles_the_whole_shard_every_epoch():
  _, dataset = labelled_dataset(100)
  train = pipeline.train_pipeline(dataset, per_replica_batch_size=8, seed=0)
  # 100 // 8 = 12 batches an epoch; the last 4 examples of each epoch's order are dropped.
  epochs = [np.concatenate([labels for _, labels in take(train.skip(12 * e), 12)])
            for e in range(2)]
  for labels in epochs:
    assert len(set(labels)) == 96
  assert not np.array_equal(epochs[0], epochs[1])


def test_example_ids_name_each_example_its_crop_and_its_flip():
  images, dataset = labelled_dataset(40)
  train = pipeline.train_pipeline(dataset, per_replica_batch_size=8, seed=1, with_ids=True)
  assert train.element_spec[2].shape == (8,) and train.element_spec[2].dtype == tf.int32
  seen = []
  for batch_images, labels, ids in take(train, 10):  # two epochs of 5 batches
    indices, top, left, flip = pipeline.decode_example_ids(ids)
    np.testing.assert_array_equal(indices, labels)  # labelled_dataset: label = index
    for image, i, t, l, f in zip(batch_images, indices, top, left, flip):
      assert window_of(image, images[i]) == (t, l, bool(f))
    seen.append(ids)
  epochs = np.concatenate(seen).reshape(2, 40)
  for epoch in epochs:  # every example once an epoch, with new crops the next epoch
    assert sorted(pipeline.decode_example_ids(epoch)[0]) == list(range(40))
  assert not np.array_equal(np.sort(epochs[0]), np.sort(epochs[1]))


def test_train_pipeline_works_with_big_batches_and_chunks():
  _, dataset = labelled_dataset(3000)
  train = pipeline.train_pipeline(dataset, per_replica_batch_size=1500, seed=0)
  batches = take(train, 3)
  assert [len(labels) for _, labels in batches] == [1500] * 3
  assert len(set(np.concatenate([labels for _, labels in batches[:2]]))) == 3000


# Determinism and resume.

def test_the_same_seed_gives_the_same_batches_twice():
  _, dataset = labelled_dataset(64)
  make = lambda seed: take(pipeline.train_pipeline(
      dataset, per_replica_batch_size=8, seed=seed), 20)
  first, second, other = make(7), make(7), make(8)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
  assert any(not np.array_equal(a[1], c[1]) for a, c in zip(first, other))


def test_a_run_that_is_not_deterministic_draws_its_data_seed_and_one_that_is_uses_seed():
  from trainer import config as config_lib, train
  strategy = tf.distribute.get_strategy()
  drawn = {train._data_seed(config_lib.Config(seed=7), strategy) for _ in range(3)}
  assert len(drawn) == 3  # 1 in 2**24 draws repeats
  assert train._data_seed(config_lib.Config(seed=7, deterministic=True), strategy) == 7
  # A resumed run goes on with the seed it drew when it started.
  assert train._data_seed(config_lib.Config(seed=7), strategy, recorded=12345) == 12345


@pytest.mark.parametrize("start_step", [1, 5, 8, 13, 27])
def test_a_resumed_pipeline_goes_on_with_the_batches_of_the_unstopped_one(start_step):
  # 8 batches an epoch, 4 batches a chunk (CHUNK_IMAGES / 8): the steps cross both.
  _, dataset = labelled_dataset(70)
  with mock.patch.object(pipeline, "CHUNK_IMAGES", 32):
    make = lambda step: pipeline.train_pipeline(
        dataset, per_replica_batch_size=8, seed=3, start_step=step)
    unskipped = take(make(0), start_step + 6)[start_step:]
    resumed = take(make(start_step), 6)
  for a, b in zip(unskipped, resumed):
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_resume_skips_one_batch_per_replica_the_pipeline_feeds():
  _, dataset = labelled_dataset(64)
  context = tf.distribute.InputContext(num_input_pipelines=1, input_pipeline_id=0,
                                       num_replicas_in_sync=2)
  make = lambda step: pipeline.train_pipeline(dataset, per_replica_batch_size=4, seed=0,
                                              start_step=step, input_context=context)
  unskipped = take(make(0), 10)
  resumed = take(make(3), 4)  # 3 global steps = 6 batches of this pipeline
  for a, b in zip(unskipped[6:], resumed):
    np.testing.assert_array_equal(a[1], b[1])


# Sharding and distribution.

def contexts(pipelines: int, replicas: int | None = None):
  return [tf.distribute.InputContext(num_input_pipelines=pipelines, input_pipeline_id=i,
                                     num_replicas_in_sync=replicas or pipelines)
          for i in range(pipelines)]


def test_two_input_contexts_train_on_disjoint_slices_that_cover_an_epoch():
  _, dataset = labelled_dataset(48)
  seen = []
  for context in contexts(2):
    train = pipeline.train_pipeline(dataset, per_replica_batch_size=8, seed=0,
                                    input_context=context)
    # A global batch of 16: 3 steps an epoch, 8 examples of each from each pipeline.
    seen.append(set(np.concatenate([labels for _, labels in take(train, 3)])))
    assert len(seen[-1]) == 24
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(48))


# (pipelines, replicas each pipeline feeds) sharing a global batch of 8.
LAYOUTS = [(1, 1), (1, 2), (2, 1), (2, 2), (1, 4), (4, 1)]


def global_batches(dataset, pipelines: int, replicas: int, steps: int, start_step: int = 0):
  """The global batches the replicas of every pipeline train on, step by step, in the
  replicas' order (a pipeline feeds its replicas consecutive batches)."""
  per_replica = 8 // (pipelines * replicas)
  streams = [take(pipeline.train_pipeline(
      dataset, per_replica_batch_size=per_replica, seed=5, start_step=start_step,
      input_context=context), steps * replicas)
             for context in contexts(pipelines, pipelines * replicas)]
  return [tuple(np.concatenate([stream[step * replicas + r][part] for stream in streams
                                for r in range(replicas)]) for part in (0, 1))
          for step in range(steps)]


@pytest.mark.parametrize("pipelines, replicas", LAYOUTS[1:])
def test_every_layout_of_replicas_trains_on_the_same_global_batches(pipelines, replicas):
  """Same examples, same crops and flips in every step, across epochs and after a resume,
  whatever the number of pipelines (workers) and replicas: augmentation is keyed to the
  example, not to the per-replica batch."""
  _, dataset = labelled_dataset(44)  # 5 steps an epoch, 4 examples dropped
  with mock.patch.object(pipeline, "CHUNK_IMAGES", 16):
    one = global_batches(dataset, 1, 1, 12)
    other = global_batches(dataset, pipelines, replicas, 12)
    resumed = global_batches(dataset, pipelines, replicas, 5, start_step=7)
  for (images, labels), (other_images, other_labels) in zip(one, other):
    np.testing.assert_array_equal(other_labels, labels)
    np.testing.assert_array_equal(other_images, images)
  for (images, labels), (resumed_images, resumed_labels) in zip(one[7:], resumed):
    np.testing.assert_array_equal(resumed_labels, labels)
    np.testing.assert_array_equal(resumed_images, images)


def test_eval_pipeline_is_the_identity_in_order_with_zero_weight_padding():
  images, dataset = labelled_dataset(21)
  evaluation = pipeline.eval_pipeline(dataset, per_replica_batch_size=8, num_examples=21,
                                      global_steps=3)
  assert evaluation.element_spec[0].shape == (8, 32, 32, 3)
  batches = take(evaluation, 100)
  assert len(batches) == 3
  out_images = np.concatenate([b[0] for b in batches])
  out_labels = np.concatenate([b[1] for b in batches])
  weights = np.concatenate([b[2] for b in batches])
  np.testing.assert_array_equal(out_images[:21], images)
  np.testing.assert_array_equal(out_labels[:21], np.arange(21))
  np.testing.assert_array_equal(weights, [1.0] * 21 + [0.0] * 3)
  assert not out_images[21:].any() and out_images.dtype == np.uint8
  # A second pass gives the same batches.
  np.testing.assert_array_equal(np.concatenate([b[0] for b in take(evaluation, 100)]),
                                out_images)


@pytest.mark.parametrize("pipelines, replicas", [(2, 2), (1, 2), (2, 4)])
def test_eval_pipelines_see_every_example_once_in_the_same_number_of_batches(
    pipelines, replicas):
  _, dataset = labelled_dataset(37)
  global_batch_size = 4 * replicas
  steps = -(-37 // global_batch_size)  # what the trainer's plan computes
  counts, labels = [], []
  for context in contexts(pipelines, replicas):
    batches = take(pipeline.eval_pipeline(
        dataset, per_replica_batch_size=context.get_per_replica_batch_size(
            global_batch_size), num_examples=37, global_steps=steps,
        input_context=context), 100)
    counts.append(len(batches))
    for _, batch_labels, weights in batches:
      labels += list(batch_labels[weights > 0])
  assert counts == [steps * replicas // pipelines] * pipelines
  assert sorted(labels) == list(range(37))


def test_eval_pipeline_rejects_a_dataset_larger_than_num_examples():
  _, dataset = labelled_dataset(10)
  with pytest.raises(tf.errors.InvalidArgumentError, match="does not hold num_examples"):
    take(pipeline.eval_pipeline(dataset, per_replica_batch_size=4, num_examples=8,
                                global_steps=2), 10)


def test_eval_pipeline_rejects_steps_that_do_not_cover_the_examples():
  _, dataset = labelled_dataset(10)
  with pytest.raises(ValueError, match="do not cover num_examples=10"):
    pipeline.eval_pipeline(dataset, per_replica_batch_size=4, num_examples=10, global_steps=2)


def test_mirrored_strategy_gets_per_replica_batches_and_exact_evaluation():
  devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
  strategy = tf.distribute.MirroredStrategy(devices)
  _, dataset = labelled_dataset(40)

  def train_fn(context):
    return pipeline.train_pipeline(dataset, per_replica_batch_size=
                                   context.get_per_replica_batch_size(8), seed=0,
                                   input_context=context)

  def eval_fn(context):
    return pipeline.eval_pipeline(dataset, per_replica_batch_size=
                                  context.get_per_replica_batch_size(8), num_examples=40,
                                  global_steps=5, input_context=context)

  images, labels = next(iter(strategy.distribute_datasets_from_function(train_fn)))
  assert [t.shape for t in strategy.experimental_local_results(images)] == [(4, 32, 32, 3)] * 2
  seen = []
  for _, labels, weights in strategy.distribute_datasets_from_function(eval_fn):
    for l, w in zip(strategy.experimental_local_results(labels),
                    strategy.experimental_local_results(weights)):
      seen += list(l.numpy()[w.numpy() > 0])
  assert sorted(seen) == list(range(40))


def test_train_pipeline_rejects_a_batch_larger_than_the_shard():
  _, dataset = labelled_dataset(10)
  with pytest.raises(ValueError, match="per_replica_batch_size=16"):
    pipeline.train_pipeline(dataset, per_replica_batch_size=16, seed=0)


# Sources.

# 3 train and 2 test PNGs of 3 classes, listed out of order: labels follow sorted names.
small_folder = functools.partial(make_folder, classes=("cat", "airplane", "dog"),
                                 train=3, test=2)


def test_folder_labels_follow_sorted_class_folder_names(tmp_path):
  root = small_folder(tmp_path)
  image = random_images(1, seed=9)[0]
  write_image(root / "train" / "dog" / "z.png", image)
  train, test = sources.load_splits("folder", str(root))
  assert train.class_names == test.class_names == ("airplane", "cat", "dog")
  assert train.images.dtype == np.uint8 and train.images.shape == (10, 32, 32, 3)
  assert train.labels.dtype == np.int32
  np.testing.assert_array_equal(train.labels, [0] * 3 + [1] * 3 + [2] * 4)
  np.testing.assert_array_equal(test.labels, [0, 0, 1, 1, 2, 2])
  # Files are sorted within a class: z.png comes last, decoded exactly (PNG).
  np.testing.assert_array_equal(train.images[-1], image)


def test_folder_reads_jpeg_and_many_files(tmp_path):
  root = make_folder(tmp_path, classes=("a", "b"), train=150, test=1, suffix=".jpg")
  train, _ = sources.load_splits("folder", str(root))
  assert train.num_examples == 300  # more than one decoding chunk
  last = sorted((root / "train" / "b").iterdir())[-1]  # files sort by name: 99.jpg
  original = tf.io.decode_jpeg(last.read_bytes()).numpy()
  np.testing.assert_array_equal(train.images[-1], original)


def test_folder_converts_grayscale_to_rgb(tmp_path):
  root = small_folder(tmp_path)
  gray = random_images(1, shape=(32, 32, 1))[0]
  write_image(root / "train" / "cat" / "gray.png", gray)
  train, _ = sources.load_splits("folder", str(root))
  index = [i for i, label in enumerate(train.labels) if label == 1][-1]
  np.testing.assert_array_equal(train.images[index], np.repeat(gray, 3, axis=-1))


@pytest.mark.parametrize("breakage, message", [
    (lambda root: None, "data dir does not exist"),
    (lambda root: small_folder(root, test=0), "test: no such directory"),
    (lambda root: (small_folder(root), _remove_tree(root / "train")),
     "train: no such directory"),
    (lambda root: (small_folder(root), (root / "train" / "horse").mkdir(),
                   (root / "test" / "horse").mkdir()), "horse: class folder is empty"),
    (lambda root: (small_folder(root), (root / "train" / "horse").mkdir()),
     "different class folders"),
    (lambda root: make_folder(root, classes=("cat",)),
     "train: has one class sub-folder \\(cat\\)"),
    (lambda root: (small_folder(root), (root / "train" / "cat" / "3.png").write_bytes(
        b"not a png")), "3.png: not a readable PNG/JPEG image"),
    (lambda root: (small_folder(root), (root / "train" / "cat" / "4.jpg").write_bytes(b"")),
     "4.jpg: not a readable PNG/JPEG image"),
    (lambda root: (small_folder(root), (root / "test" / "dog" / "notes.txt").write_text(
        "hello")), "notes.txt: not an image file"),
    (lambda root: (small_folder(root), write_image(
        root / "train" / "dog" / "big.png", random_images(1, shape=(64, 48, 3))[0])),
     "big.png: image is 48x64 pixels, expected 32x32"),
])
def test_bad_folders_fail_with_a_message_naming_the_path(tmp_path, breakage, message):
  root = tmp_path / "data"
  breakage(root)
  with pytest.raises(sources.DataError, match=message) as error:
    sources.load_splits("folder", str(root))
  assert str(root) in str(error.value)


def _remove_tree(path: pathlib.Path) -> None:
  for child in sorted(path.rglob("*"), reverse=True):
    child.unlink() if child.is_file() else child.rmdir()
  path.rmdir()


def test_a_bad_image_deep_in_a_big_folder_is_named(tmp_path):
  root = make_folder(tmp_path, classes=("a", "b"), train=200, test=1)
  (root / "train" / "b" / "150.png").write_bytes(b"\x89PNG truncated")
  with pytest.raises(sources.DataError, match=r"b/150\.png: not a readable"):
    sources.load_splits("folder", str(root))


def test_hidden_files_in_class_folders_are_ignored(tmp_path):
  root = small_folder(tmp_path)
  (root / "train" / "cat" / ".DS_Store").write_bytes(b"\x00\x01")
  train, _ = sources.load_splits("folder", str(root))
  assert train.num_examples == 9


@pytest.mark.process
def test_trainer_exits_2_with_the_message_on_bad_data(tmp_path):
  result = run_main("--data_source=folder", f"--data_dir={tmp_path / 'missing'}",
                    f"--model_dir={tmp_path / 'run'}", timeout=120)
  assert result.returncode == 2
  assert f"{tmp_path / 'missing'}: data dir does not exist" in result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "run").exists()


def test_synthetic_source_is_uint8_cifar_shaped():
  train, test = sources.load_splits("synthetic", None, seed=1, synthetic_examples=(20, 10))
  assert train.images.shape == (20, 32, 32, 3) and train.images.dtype == np.uint8
  assert test.labels.shape == (10,) and test.labels.dtype == np.int32
  assert 0 <= train.labels.min() and train.labels.max() < 10
  again, _ = sources.load_splits("synthetic", None, seed=1, synthetic_examples=(20, 10))
  np.testing.assert_array_equal(train.images, again.images)


def test_synthetic_examples_sizes_the_runs_synthetic_splits_and_defaults_to_cifar10s():
  from trainer import config as config_lib, data
  splits = data.load(config_lib.Config(data_source="synthetic", synthetic_examples=(48, 12)))
  assert (splits.train.num_examples, splits.test.num_examples) == (48, 12)
  splits = data.load(config_lib.Config(data_source="synthetic"))
  assert (splits.train.num_examples, splits.test.num_examples) == (50_000, 10_000)


@pytest.mark.parametrize("flags, message", [
    (dict(synthetic_examples=(48, 12)), "is for --data_source=synthetic, not --data_source=tfds"),
    (dict(data_source="synthetic", synthetic_examples=(48,)), "TRAIN,TEST, two positive"),
    (dict(data_source="synthetic", synthetic_examples=(48, 0)), "TRAIN,TEST, two positive"),
    (dict(data_source="synthetic", synthetic_examples=(1, 2, 3)), "TRAIN,TEST, two positive"),
])
def test_synthetic_examples_outside_a_synthetic_run_or_not_two_sizes_is_refused(flags, message):
  from trainer import config as config_lib
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.Config(**flags)


# TFDS.

def test_tfds_empty_data_dir_without_network_fails_fast(tmp_path):
  start = time.monotonic()
  with mock.patch.object(sources, "can_reach", return_value=False) as probe, \
       pytest.raises(sources.DataError, match="cannot be reached") as error:
    sources.load_splits("tfds", str(tmp_path))
  assert time.monotonic() - start < 30
  probe.assert_called_once()
  assert str(tmp_path) in str(error.value)
  assert "--data_source=folder" in str(error.value)  # says what to do instead


def test_tfds_failed_download_is_a_data_error(tmp_path):
  import tensorflow_datasets as tfds
  with mock.patch.object(sources, "can_reach", return_value=True), \
       mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare",
                         side_effect=OSError("connection reset")), \
       pytest.raises(sources.DataError, match="connection reset") as error:
    sources.load_splits("tfds", str(tmp_path))
  assert str(tmp_path) in str(error.value)


def test_network_probe_gives_up_on_an_unknown_host():
  start = time.monotonic()
  assert not sources.can_reach("host.invalid", timeout=2)
  assert time.monotonic() - start < 5


@pytest.fixture(scope="module")
def prepared_tfds_dir(tmp_path_factory) -> pathlib.Path:
  """A genuinely prepared TFDS cifar10 data dir (8 train, 6 test images), made offline.

  TFDS's own builder writes it from CIFAR-10-format binaries in a temporary folder
  (its download is mocked). tensorflow-datasets 4.9.10 needs `importlib_resources` to
  prepare a dataset; where that package is missing, the standard library's
  importlib.resources stands in for it while the fixture is made.
  """
  import tensorflow_datasets as tfds
  raw = tmp_path_factory.mktemp("raw") / "cifar-10-batches-bin"
  raw.mkdir()
  rng = np.random.default_rng(0)
  for name, count in [(f"data_batch_{i}.bin", 2) for i in range(1, 5)] + [
      ("data_batch_5.bin", 0), ("test_batch.bin", 6)]:
    records = [bytes([i % 10]) + rng.integers(0, 256, 3072, dtype=np.uint8).tobytes()
               for i in range(count)]
    (raw / name).write_bytes(b"".join(records))
  (raw / "batches.meta.txt").write_text("\n".join(
      ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
       "truck"]) + "\n")
  data_dir = tmp_path_factory.mktemp("tfds")
  try:
    import importlib_resources as resources
  except ImportError:
    resources = importlib.resources
  with mock.patch.dict(sys.modules, {"importlib_resources": resources}), \
       mock.patch.object(tfds.download.DownloadManager, "download_and_extract",
                         return_value=str(raw.parent)):
    tfds.builder("cifar10", data_dir=str(data_dir)).download_and_prepare()
  return data_dir


def test_prepared_tfds_dir_loads_with_no_network(prepared_tfds_dir):
  with mock.patch.object(sources, "can_reach", side_effect=AssertionError("network")), \
       mock.patch("socket.create_connection", side_effect=AssertionError("network")):
    train, test = sources.load_splits("tfds", str(prepared_tfds_dir))
  assert train.images.shape == (8, 32, 32, 3) and train.images.dtype == np.uint8
  assert test.num_examples == 6 and test.labels.dtype == np.int32
  assert train.class_names[:2] == ("airplane", "automobile")
