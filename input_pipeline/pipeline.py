"""tf.data transforms for CIFAR-10: dataset in, dataset out, images uint8 throughout.

Normalisation (per-channel mean/std, constants below) happens in the model's first
layer, so the host moves uint8 bytes and the accelerator does the float work.
"""

import tensorflow as tf

# Per-channel statistics of the CIFAR-10 training set, on the 0-255 scale.
CIFAR10_MEAN = (125.307, 122.950, 113.865)
CIFAR10_STD = (62.993, 62.089, 66.705)
PAD = 4  # He et al. (2015) Sec. 4.2: pad 4 pixels, random 32x32 crop, random flip.


def augment_batch(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Pads by 4, takes a random crop of the original size and flips half the images.

  Vectorised over the batch (two gathers, no per-example map) and stays uint8.

  Args:
    images: uint8 [B, H, W, C].
    seed: int [2] stateless seed; the same seed gives the same augmentation.
  Returns:
    uint8 [B, H, W, C].
  """
  batch, height, width = tf.shape(images)[0], tf.shape(images)[1], tf.shape(images)[2]
  padded = tf.pad(images, [[0, 0], [PAD, PAD], [PAD, PAD], [0, 0]])
  seeds = tf.random.experimental.stateless_split(seed, 3)
  top = tf.random.stateless_uniform([batch, 1], seeds[0], 0, 2 * PAD + 1, tf.int32)
  left = tf.random.stateless_uniform([batch, 1], seeds[1], 0, 2 * PAD + 1, tf.int32)
  flip = tf.random.stateless_uniform([batch, 1], seeds[2], 0, 2, tf.int32) > 0
  rows = top + tf.range(height)[tf.newaxis, :]
  cols = left + tf.where(flip, tf.range(width - 1, -1, -1)[tf.newaxis, :],
                         tf.range(width)[tf.newaxis, :])
  cropped = tf.gather(padded, rows, axis=1, batch_dims=1)
  return tf.gather(cropped, cols, axis=2, batch_dims=1)


def _shard(dataset: tf.data.Dataset,
           input_context: tf.distribute.InputContext | None) -> tf.data.Dataset:
  if input_context is None or input_context.num_input_pipelines == 1:
    return dataset
  return dataset.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)


def _options(deterministic: bool) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = deterministic
  # Sharding is done explicitly (per input pipeline), so tf.distribute must not try.
  options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
  return options


def train_pipeline(dataset: tf.data.Dataset, *, per_replica_batch_size: int, seed: int,
                   start_step: int = 0, deterministic: bool = False,
                   input_context: tf.distribute.InputContext | None = None
                   ) -> tf.data.Dataset:
  """Endless, shuffled, augmented training batches.

  Args:
    dataset: (uint8 image, int label) examples.
    per_replica_batch_size: examples in each batch this pipeline yields.
    seed: seeds the shuffle order and the augmentation.
    start_step: batches to skip, so that a resumed deterministic run sees the same
      data it would have seen had it not stopped.
    deterministic: same order and augmentation on every run (slower).
    input_context: this pipeline's place among all pipelines; each gets a disjoint shard.
  Returns:
    a dataset of (uint8 [B, 32, 32, 3], int32 [B]) batches.
  """
  pipeline_id = input_context.input_pipeline_id if input_context else 0
  dataset = _shard(dataset, input_context).cache()
  num_examples = dataset.cardinality()
  if deterministic:
    shuffle_seed = seed * 1000 + pipeline_id
  else:
    shuffle_seed = None
  dataset = dataset.shuffle(num_examples, seed=shuffle_seed, reshuffle_each_iteration=True)
  dataset = dataset.repeat().batch(per_replica_batch_size, drop_remainder=True)
  dataset = dataset.enumerate()
  if deterministic and start_step:
    dataset = dataset.skip(start_step)
  base_seed = tf.constant([seed, pipeline_id], tf.int64)
  if not deterministic:
    base_seed = tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int64)

  def augment(index, batch):
    images, labels = batch
    step_seed = tf.random.experimental.stateless_fold_in(base_seed, index)
    return augment_batch(images, step_seed), tf.cast(labels, tf.int32)

  dataset = dataset.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
  return dataset.prefetch(tf.data.AUTOTUNE).with_options(_options(deterministic))


def eval_pipeline(dataset: tf.data.Dataset, *, per_replica_batch_size: int,
                  num_examples: int,
                  input_context: tf.distribute.InputContext | None = None
                  ) -> tf.data.Dataset:
  """Evaluation batches covering every example once, padded to full static batches.

  Padding examples carry weight 0, so metrics are exact; every pipeline yields the same
  number of batches (required by synchronous multi-replica evaluation).

  Args:
    dataset: (uint8 image, int label) examples.
    per_replica_batch_size: examples in each batch this pipeline yields.
    num_examples: examples in `dataset`.
    input_context: this pipeline's place among all pipelines.
  Returns:
    a dataset of (uint8 images, int32 labels, float32 weights) batches.
  """
  replicas = input_context.num_replicas_in_sync if input_context else 1
  pipelines = input_context.num_input_pipelines if input_context else 1
  # Each pipeline feeds replicas // pipelines replicas for every global step.
  steps = (eval_steps(num_examples, per_replica_batch_size * replicas)
           * (replicas // pipelines))
  dataset = _shard(dataset, input_context).cache()
  dataset = dataset.map(lambda image, label: (image, tf.cast(label, tf.int32), 1.0))
  element_spec = dataset.element_spec
  padding = tf.data.Dataset.from_tensors(tuple(
      tf.zeros(spec.shape, spec.dtype) for spec in element_spec)).repeat()
  dataset = dataset.concatenate(padding).take(steps * per_replica_batch_size)
  dataset = dataset.batch(per_replica_batch_size, drop_remainder=True)
  return dataset.prefetch(tf.data.AUTOTUNE).with_options(_options(True))


def eval_steps(num_examples: int, global_batch_size: int) -> int:
  """Batches needed to see every example once (the last one padded)."""
  return -(-num_examples // global_batch_size)
