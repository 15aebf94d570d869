"""tf.data transforms for CIFAR-10: dataset in, dataset out, images uint8 throughout.

Normalisation (per-channel mean/std, constants below) happens in the model's first
layer, so the host moves uint8 bytes and the accelerator does the float work.
"""

import functools
import secrets

import tensorflow as tf

# Per-channel statistics of the CIFAR-10 training set, on the 0-255 scale.
CIFAR10_MEAN = (125.307, 122.950, 113.865)
CIFAR10_STD = (62.993, 62.089, 66.705)
PAD = 4  # He et al. (2015) Sec. 4.2: pad 4 pixels, random 32x32 crop, random flip.
# The training pipeline gathers and augments about this many images per call, then splits
# them into per-replica batches: per-op overhead is paid once per chunk, not per batch.
CHUNK_IMAGES = 1024


def crop_table(images: tf.Tensor) -> tf.Tensor:
  """Lays images out for `augment_from_table`: rows padded by PAD, one table row per column.

  Args:
    images: uint8 [N, H, W, C].
  Returns:
    uint8 [(N + 1) * W, (H + 2 * PAD) * C]: row n * W + x holds column x of image n with
    PAD zero pixels above and below; the last W rows (a blank image) are all zeros.
  """
  return _crop_table(images)


# XLA moves the bytes of these two functions 2-3x faster than TensorFlow's uint8 kernels
# on this CPU (its transpose above all); the results are identical, bit for bit.
@tf.function(jit_compile=True)
def _crop_table(images):
  shape = tf.shape(images)
  n, height, width, channels = shape[0], shape[1], shape[2], shape[3]
  # One extra blank image supplies the zero columns of the side padding.
  padded = tf.pad(images, [[0, 1], [PAD, PAD], [0, 0], [0, 0]])
  return tf.reshape(tf.transpose(padded, [0, 2, 1, 3]),
                    [(n + 1) * width, (height + 2 * PAD) * channels])


@tf.function(jit_compile=True)
def _crop_from_table(table, indices, top, left, flip, height, width, channels):
  padded_height = height + 2 * PAD
  batch = tf.shape(indices)[0]
  zero_row = tf.shape(table)[0] - 1
  # Output column x comes from column left + x of the padded image (left + W-1-x when
  # flipped), that is column left + x - PAD of the original, or zeros outside it.
  x = tf.range(width)[tf.newaxis, :]
  source = tf.where(flip, width - 1 - x, x) + left - PAD
  rows = tf.where((source >= 0) & (source < width),
                  indices[:, tf.newaxis] * width + source, zero_row)
  columns = tf.reshape(tf.gather(table, rows), [batch, width, padded_height, channels])
  # Transposed back to image layout, each image's padded rows are rows of one matrix.
  padded_rows = tf.reshape(tf.transpose(columns, [0, 2, 1, 3]),
                           [batch * padded_height, width * channels])
  y = tf.range(batch)[:, tf.newaxis] * padded_height + top + tf.range(height)[tf.newaxis, :]
  return tf.reshape(tf.gather(padded_rows, y), [batch, height, width, channels])


def augment_from_table(table: tf.Tensor, indices: tf.Tensor, seed: tf.Tensor,
                       image_shape: tuple[int, int, int]) -> tf.Tensor:
  """Pad by PAD, random crop of the original size, random left-right flip, for some images.

  Equivalent to padding each image with PAD zero pixels on every side, cropping a
  window at a uniformly random offset in [0, 2 * PAD] x [0, 2 * PAD] and flipping it with
  probability 1/2, all independently per image. Done as two row gathers and one transpose
  on uint8, compiled by XLA: no per-example work, no per-pixel gather.

  Args:
    table: `crop_table` of all images.
    indices: int32 [B], which images of the table to use.
    seed: int [2] stateless seed; the same seed gives the same augmentation.
    image_shape: (H, W, C) of the images.
  Returns:
    uint8 [B, H, W, C].
  """
  batch = tf.shape(indices)[0]
  seeds = tf.random.experimental.stateless_split(seed, 3)
  # Philox named explicitly: the same numbers on every device and with or without XLA.
  top, left, flip = (
      tf.random.stateless_uniform([batch, 1], seeds[i], 0, maxval, tf.int32, alg="philox")
      for i, maxval in enumerate((2 * PAD + 1, 2 * PAD + 1, 2)))
  return _crop_from_table(table, tf.cast(indices, tf.int32), top, left, flip > 0,
                          *image_shape)


def augment_batch(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Pads by 4, takes a random crop of the original size and flips half the images.

  Vectorised over the batch and stays uint8; the training pipeline does the same on
  chunks gathered straight from its in-memory table (`augment_from_table`).

  Args:
    images: uint8 [B, H, W, C] with static H, W, C.
    seed: int [2] stateless seed; the same seed gives the same augmentation.
  Returns:
    uint8 [B, H, W, C].
  """
  image_shape = tuple(images.shape[1:])
  return augment_from_table(crop_table(images), tf.range(tf.shape(images)[0]), seed,
                            image_shape)


def _pipeline_position(input_context: tf.distribute.InputContext | None
                       ) -> tuple[int, int, int]:
  """(pipeline id, number of pipelines, replicas each pipeline feeds)."""
  if input_context is None:
    return 0, 1, 1
  pipelines = input_context.num_input_pipelines
  return (input_context.input_pipeline_id, pipelines,
          max(input_context.num_replicas_in_sync // pipelines, 1))


def _shard(dataset: tf.data.Dataset,
           input_context: tf.distribute.InputContext | None) -> tf.data.Dataset:
  """Example i goes to input pipeline i % num_input_pipelines."""
  pipeline_id, pipelines, _ = _pipeline_position(input_context)
  if pipelines == 1:
    return dataset
  return dataset.shard(pipelines, pipeline_id)


def _options(deterministic: bool) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = deterministic
  # Sharding is done explicitly (per input pipeline), so tf.distribute must not try.
  options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
  return options


def _num_examples(dataset: tf.data.Dataset) -> int:
  count = tf.get_static_value(dataset.cardinality())
  if count is None or count < 0:
    raise ValueError("the input pipeline needs a dataset of known, finite size (e.g. "
                     "Split.as_dataset()), got cardinality "
                     f"{'unknown' if count is None or count == -2 else 'infinite'}")
  return int(count)


def _shard_size(num_examples: int, pipeline_id: int, pipelines: int) -> int:
  return len(range(pipeline_id, num_examples, pipelines))


def _in_memory(dataset: tf.data.Dataset, input_context, num_examples: int
               ) -> tf.data.Dataset:
  """One element: this pipeline's whole shard as (uint8 [n, H, W, C], int32 [n])."""
  pipeline_id, pipelines, _ = _pipeline_position(input_context)
  shard_size = _shard_size(num_examples, pipeline_id, pipelines)
  whole = _shard(dataset, input_context).batch(shard_size, drop_remainder=True).take(1)
  return whole.map(lambda images, labels: (images, tf.cast(labels, tf.int32)))


def train_pipeline(dataset: tf.data.Dataset, *, per_replica_batch_size: int, seed: int,
                   start_step: int = 0, deterministic: bool = False,
                   input_context: tf.distribute.InputContext | None = None
                   ) -> tf.data.Dataset:
  """Endless, shuffled, augmented training batches, made from the shard held in memory.

  Each epoch is a fresh permutation of this pipeline's shard (examples i with
  i % num_input_pipelines == input_pipeline_id); the last incomplete batch of an epoch
  is dropped, so every pipeline yields (num_examples // num_input_pipelines) //
  per_replica_batch_size batches per epoch. Only indices are shuffled: images are
  gathered from one in-memory table and augmented CHUNK_IMAGES at a time.

  Args:
    dataset: (uint8 image, int label) examples, of known size (e.g. Split.as_dataset()).
    per_replica_batch_size: examples in each batch this pipeline yields.
    seed: seeds the shuffle order and the augmentation when `deterministic`.
    start_step: global steps already trained. When `deterministic`, the pipeline starts
      where an unstopped run would be: it skips start_step x (replicas this pipeline
      feeds) batches, without computing them. Ignored otherwise.
    deterministic: same order and augmentation on every run and after a resume, for a
      given seed, per_replica_batch_size and input context. Otherwise the seed is drawn
      at random and tf.data may reorder batches.
    input_context: this pipeline's place among all pipelines; each gets a disjoint shard.
  Returns:
    a dataset of (uint8 [B, H, W, C], int32 [B]) batches, B = per_replica_batch_size.
  Raises:
    ValueError: when the shard has fewer examples than one batch, or its size is unknown.
  """
  pipeline_id, pipelines, replicas_fed = _pipeline_position(input_context)
  num_examples = _num_examples(dataset)
  batch_size = per_replica_batch_size
  # The same count for every pipeline, so that they stay in step.
  batches_per_epoch = (num_examples // pipelines) // batch_size
  if batches_per_epoch < 1:
    raise ValueError(f"per_replica_batch_size={batch_size} is larger than the "
                     f"{num_examples // pipelines} examples of each of the {pipelines} "
                     "input pipeline(s)")
  batches_per_chunk = max(1, CHUNK_IMAGES // batch_size)
  first_batch = start_step * replicas_fed if deterministic else 0
  first_chunk, skip_batches = divmod(first_batch, batches_per_chunk)
  if not deterministic:
    seed = secrets.randbits(31)
  key = tf.constant([seed, pipeline_id], tf.int64)
  chunk_indices = _chunk_indices(
      tf.random.experimental.stateless_fold_in(key, 0),
      _shard_size(num_examples, pipeline_id, pipelines), batch_size, batches_per_epoch,
      batches_per_chunk, first_chunk * batches_per_chunk)
  # The table is made once per iterator, then handed (by reference) to every chunk.
  tables = _in_memory(dataset, input_context, num_examples).flat_map(
      lambda images, labels: tf.data.Dataset.from_tensors(
          (crop_table(images), labels)).repeat())
  make_chunk = functools.partial(
      _make_chunk, augment_key=tf.random.experimental.stateless_fold_in(key, 1),
      image_shape=tuple(dataset.element_spec[0].shape), batch_size=batch_size,
      batches_per_chunk=batches_per_chunk)
  dataset = tf.data.Dataset.zip(tables, tf.data.Dataset.counter(first_chunk), chunk_indices)
  dataset = dataset.map(make_chunk, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
  if skip_batches:
    dataset = dataset.skip(skip_batches)
  return dataset.prefetch(tf.data.AUTOTUNE).with_options(_options(deterministic))


def _chunk_indices(shuffle_key: tf.Tensor, shard_size: int, batch_size: int,
                   batches_per_epoch: int, batches_per_chunk: int, first_batch: int
                   ) -> tf.data.Dataset:
  """Example indices, [batches_per_chunk, batch_size] per element: a fresh permutation of
  the shard every epoch (keyed by the epoch), starting at batch `first_batch`."""
  first_epoch, skip_in_epoch = divmod(first_batch, batches_per_epoch)

  def epoch_indices(epoch):
    order = tf.random.experimental.stateless_shuffle(
        tf.range(shard_size, dtype=tf.int32),
        tf.random.experimental.stateless_fold_in(shuffle_key, epoch))
    batches = tf.reshape(order[:batches_per_epoch * batch_size],
                         [batches_per_epoch, batch_size])
    skip = tf.where(epoch == first_epoch, skip_in_epoch, 0)
    return tf.data.Dataset.from_tensor_slices(batches).skip(tf.cast(skip, tf.int64))

  return (tf.data.Dataset.counter(first_epoch).flat_map(epoch_indices)
          .batch(batches_per_chunk, drop_remainder=True))


def _make_chunk(table_and_labels, chunk, indices, *, augment_key: tf.Tensor,
                image_shape: tuple[int, ...], batch_size: int, batches_per_chunk: int):
  """Augments one chunk of images gathered from the table, split into batches."""
  table, labels = table_and_labels
  indices = tf.reshape(indices, [-1])
  images = augment_from_table(table, indices, tf.random.experimental.stateless_fold_in(
      augment_key, chunk), image_shape)
  return (tf.reshape(images, [batches_per_chunk, batch_size, *image_shape]),
          tf.reshape(tf.gather(labels, indices), [batches_per_chunk, batch_size]))


def eval_pipeline(dataset: tf.data.Dataset, *, per_replica_batch_size: int,
                  num_examples: int, global_steps: int,
                  input_context: tf.distribute.InputContext | None = None
                  ) -> tf.data.Dataset:
  """Evaluation batches covering every example once, padded to full static batches.

  Padding examples are zeros with weight 0, so metrics are exact; every pipeline yields
  the same number of batches, global_steps for each replica it feeds (synchronous
  multi-replica evaluation needs that).

  Args:
    dataset: (uint8 image, int label) examples, in a fixed order.
    per_replica_batch_size: examples in each batch this pipeline yields.
    num_examples: examples in `dataset`.
    global_steps: the caller's steps over all replicas that cover `dataset` once (the
      last one padded): ceil(num_examples / global batch size).
    input_context: this pipeline's place among all pipelines.
  Returns:
    a dataset of (uint8 images, int32 labels, float32 weights) batches.
  Raises:
    ValueError: when num_examples is not positive, or global_steps do not cover it.
  """
  if num_examples < 1:
    raise ValueError(f"eval_pipeline needs at least one example, got {num_examples}")
  pipeline_id, pipelines, replicas_fed = _pipeline_position(input_context)
  batch_size = per_replica_batch_size
  global_batch_size = batch_size * pipelines * replicas_fed
  if global_steps * global_batch_size < num_examples:
    raise ValueError(f"global_steps={global_steps} of {global_batch_size} examples do not "
                     f"cover num_examples={num_examples}")
  steps = global_steps * replicas_fed
  shard_size = _shard_size(num_examples, pipeline_id, pipelines)
  padding = steps * batch_size - shard_size

  def to_batches(images, labels):
    check = tf.debugging.assert_equal(
        tf.shape(labels)[0], shard_size,
        message=f"eval_pipeline: the dataset does not hold num_examples={num_examples}")
    with tf.control_dependencies([check]):
      images, labels = tf.identity(images), tf.identity(labels)
    weights = tf.concat([tf.ones([shard_size]), tf.zeros([padding])], axis=0)
    images = tf.pad(images, [[0, padding]] + [[0, 0]] * (len(images.shape) - 1))
    labels = tf.pad(labels, [[0, padding]])
    return (tf.reshape(images, [steps, batch_size, *images.shape[1:]]),
            tf.reshape(labels, [steps, batch_size]), tf.reshape(weights, [steps, batch_size]))

  dataset = _shard(dataset, input_context).batch(steps * batch_size + 1)
  dataset = dataset.take(1).map(
      lambda images, labels: to_batches(images, tf.cast(labels, tf.int32)))
  return dataset.unbatch().prefetch(tf.data.AUTOTUNE).with_options(_options(True))

