"""tf.data transforms for CIFAR-10: dataset in, dataset out, images uint8 throughout.

Normalisation (per-channel mean/std, constants below) happens in the model's first
layer, so the host moves uint8 bytes and the accelerator does the float work.
"""

import functools

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


def _options() -> tf.data.Options:
  options = tf.data.Options()
  # Batches in their planned order, always: a resumed run, every worker and every replica
  # count then train on the same global batches (tf.data could otherwise hand out a later
  # chunk first). It costs nothing measurable (BENCHMARKS.md, "Input pipeline").
  options.deterministic = True
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


def train_pipeline(dataset: tf.data.Dataset, *, per_replica_batch_size: int, seed: int,
                   start_step: int = 0,
                   input_context: tf.distribute.InputContext | None = None,
                   with_ids: bool = False) -> tf.data.Dataset:
  """Endless, shuffled, augmented training batches: this pipeline's part of every global
  batch, made from all examples held in memory.

  Every pipeline computes the same epochs: epoch e is a permutation of all examples keyed
  by (seed, e), global step k trains on its examples [k * G, (k + 1) * G) (G, the global
  batch, is per_replica_batch_size x all replicas; the last incomplete global batch of an
  epoch is dropped), and this pipeline yields its slice of each, one per-replica batch per
  replica it feeds. An example's crop and flip are keyed by (seed, epoch, example). So
  the global batches, augmentation included, are the same whatever the number of
  replicas, pipelines and workers, and whatever step a run resumed at. Only indices are
  shuffled: images are gathered from one in-memory table and augmented CHUNK_IMAGES at a
  time.

  Args:
    dataset: (uint8 image, int label) examples, of known size (e.g. Split.as_dataset()).
    per_replica_batch_size: examples in each batch this pipeline yields.
    seed: seeds the order and the augmentation; it must be the same in every pipeline of
      a run, and when it resumes (the caller draws one for a run that is not
      deterministic, and keeps it).
    start_step: global steps already trained: the pipeline starts where an unstopped run
      would be, at global step start_step + 1, without computing the batches before it.
    input_context: this pipeline's place among all pipelines.
    with_ids: also yield each example's `example_ids` (which example, which crop and
      flip), for checking what a run trained on.
  Returns:
    a dataset of (uint8 [B, H, W, C], int32 [B]) batches, B = per_replica_batch_size,
    or (..., int32 [B] ids) with_ids.
  Raises:
    ValueError: when the data has fewer examples than one global batch, or its size is
      unknown.
  """
  pipeline_id, pipelines, replicas_fed = _pipeline_position(input_context)
  num_examples = _num_examples(dataset)
  batch_size = per_replica_batch_size
  steps_per_epoch = _global_steps_per_epoch(num_examples, batch_size, replicas_fed * pipelines)
  batches_per_chunk = max(1, CHUNK_IMAGES // batch_size)
  plan = _EpochPlan(tf.constant([seed, 0], tf.int64), num_examples, steps_per_epoch,
                    (pipeline_id, pipelines, replicas_fed), batch_size)
  # Chunks start at the first batch to train on: the batches are the unstopped run's
  # wherever the chunks' boundaries fall (they hold whole batches, each made from its
  # own examples' plan).
  chunk_plans = plan.chunks(batches_per_chunk, start_step * replicas_fed)
  # The table is made once per iterator, then handed (by reference) to every chunk.
  tables = _in_memory(dataset, num_examples).flat_map(
      lambda images, labels: tf.data.Dataset.from_tensors(
          (crop_table(images), labels)).repeat())
  make_chunk = functools.partial(
      _make_chunk, image_shape=tuple(dataset.element_spec[0].shape), batch_size=batch_size,
      batches_per_chunk=batches_per_chunk, with_ids=with_ids)
  dataset = tf.data.Dataset.zip(tables, chunk_plans)
  dataset = dataset.map(make_chunk, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
  return dataset.prefetch(tf.data.AUTOTUNE).with_options(_options())


# An example's id in a batch (`with_ids`): example * AUGMENTATIONS + its augmentation,
# (top * CROP_OFFSETS + left) * 2 + flipped, top and left the crop's offsets.
CROP_OFFSETS = 2 * PAD + 1
AUGMENTATIONS = CROP_OFFSETS * CROP_OFFSETS * 2


def example_ids(indices: tf.Tensor, top: tf.Tensor, left: tf.Tensor,
                flip: tf.Tensor) -> tf.Tensor:
  """Each example's id: which example (its index in the dataset) and its crop and flip."""
  return (indices * CROP_OFFSETS + top) * (CROP_OFFSETS * 2) + left * 2 + flip


def decode_example_ids(ids) -> tuple:
  """The inverse of example_ids, on NumPy arrays: (indices, top, left, flip)."""
  indices, augmentation = divmod(ids, AUGMENTATIONS)
  offsets, flip = divmod(augmentation, 2)
  top, left = divmod(offsets, CROP_OFFSETS)
  return indices, top, left, flip


def _global_steps_per_epoch(num_examples: int, per_replica_batch_size: int,
                            replicas: int) -> int:
  """Whole global batches in an epoch (the last incomplete one is dropped).

  Raises:
    ValueError: when there is not one.
  """
  global_batch_size = per_replica_batch_size * replicas
  if num_examples < global_batch_size:
    raise ValueError(f"per_replica_batch_size={per_replica_batch_size} over {replicas} "
                     f"replica(s) makes a global batch of {global_batch_size}, larger than "
                     f"the {num_examples} examples")
  return num_examples // global_batch_size


def _in_memory(dataset: tf.data.Dataset, num_examples: int) -> tf.data.Dataset:
  """One element: all examples as (uint8 [n, H, W, C], int32 [n])."""
  whole = dataset.batch(num_examples, drop_remainder=True).take(1)
  return whole.map(lambda images, labels: (images, tf.cast(labels, tf.int32)))


class _EpochPlan:
  """Which examples this pipeline trains on in each epoch, and how each is augmented."""

  def __init__(self, key: tf.Tensor, num_examples: int, steps_per_epoch: int,
               position: tuple[int, int, int], batch_size: int):
    self.shuffle_key = tf.random.experimental.stateless_fold_in(key, 0)
    self.augment_key = tf.random.experimental.stateless_fold_in(key, 1)
    self.num_examples, self.steps_per_epoch = num_examples, steps_per_epoch
    self.pipeline_id, self.pipelines, replicas_fed = position
    self.share = replicas_fed * batch_size  # this pipeline's examples of a global batch
    self.batches_per_epoch, self.batch_size = steps_per_epoch * replicas_fed, batch_size

  def chunks(self, batches_per_chunk: int, first_batch: int) -> tf.data.Dataset:
    """(indices, top, left, flip), each [batches_per_chunk, batch_size] per element,
    starting at this pipeline's batch `first_batch`."""
    first_epoch, skip = divmod(first_batch, self.batches_per_epoch)
    epochs = tf.data.Dataset.counter(first_epoch)
    return (epochs.flat_map(lambda epoch: self._epoch(epoch, first_epoch, skip))
            .batch(batches_per_chunk, drop_remainder=True))

  def _epoch(self, epoch: tf.Tensor, first_epoch: int, skip: int) -> tf.data.Dataset:
    order = tf.random.experimental.stateless_shuffle(
        tf.range(self.num_examples, dtype=tf.int32),
        tf.random.experimental.stateless_fold_in(self.shuffle_key, epoch))
    # [step, pipeline, a pipeline's share of the global batch]: this pipeline's slices.
    steps = tf.reshape(order[:self.steps_per_epoch * self.pipelines * self.share],
                       [self.steps_per_epoch, self.pipelines, self.share])
    indices = tf.reshape(steps[:, self.pipeline_id], [self.batches_per_epoch, self.batch_size])
    seeds = tf.random.experimental.stateless_split(
        tf.random.experimental.stateless_fold_in(self.augment_key, epoch), 3)
    # Drawn for every example and looked up by example: keyed to it, not to its batch.
    # Philox named explicitly: the same numbers on every device and with or without XLA.
    top, left, flip = (
        tf.gather(tf.random.stateless_uniform([self.num_examples], seeds[i], 0, maxval,
                                              tf.int32, alg="philox"), indices)
        for i, maxval in enumerate((2 * PAD + 1, 2 * PAD + 1, 2)))
    skip = tf.where(epoch == first_epoch, skip, 0)
    return (tf.data.Dataset.from_tensor_slices((indices, top, left, flip))
            .skip(tf.cast(skip, tf.int64)))


def _make_chunk(table_and_labels, chunk_plan, *, image_shape: tuple[int, ...],
                batch_size: int, batches_per_chunk: int, with_ids: bool):
  """Augments one chunk of images gathered from the table, split into batches."""
  table, labels = table_and_labels
  indices, top, left, flip = (tf.reshape(t, [-1]) for t in chunk_plan)
  images = _crop_from_table(table, indices, top[:, tf.newaxis], left[:, tf.newaxis],
                            flip[:, tf.newaxis] > 0, *image_shape)
  batches = (tf.reshape(images, [batches_per_chunk, batch_size, *image_shape]),
             tf.reshape(tf.gather(labels, indices), [batches_per_chunk, batch_size]))
  if with_ids:
    ids = example_ids(indices, top, left, flip)
    batches += (tf.reshape(ids, [batches_per_chunk, batch_size]),)
  return batches


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
  return dataset.unbatch().prefetch(tf.data.AUTOTUNE).with_options(_options())

