"""What scripts/benchmark.py builds and times in its report and in --compare alike: our
model under the benchmark's dtype policy, a minimal hand-written Keras ResNet, Keras `fit`
on one in-memory batch with a clock on its batches, bare training steps, and the matmul
peak the FLOP rates are measured against. TensorFlow and Keras load on first use.
"""

import math
import statistics
import time

from absl import flags

# Defined by scripts/benchmark.py, the script that runs this module.
FLAGS = flags.FLAGS


def measure_matmul_tflops(dtype: str, size: int, repeats: int = 10) -> float:
  """Measured dense matmul rate (TFLOP/s) at `dtype` on the default device.

  `repeats` dependent matmuls run in one call, so a GPU's launch latency does not hide
  its rate; the median of 5 calls is taken.
  """
  import tensorflow as tf
  a = tf.cast(tf.random.normal([size, size], dtype=tf.float32) / size**0.5, dtype)

  @tf.function
  def chain(x):
    for _ in range(repeats):
      x = tf.matmul(x, a)
    return x

  chain(a).numpy()
  times = []
  for _ in range(5):
    start = time.perf_counter()
    chain(a).numpy()
    times.append(time.perf_counter() - start)
  return repeats * 2 * size**3 / statistics.median(times) / 1e12


def minimal_keras_resnet(depth: int, plain: bool, stem: str):
  """A minimal hand-written Keras 3 ResNet, independent of trainer/resnet.py.

  What a careful user would write in an afternoon: float inputs, "same" padding
  everywhere, Keras batch norm; projection shortcuts for the ImageNet-style depths and
  option A (subsample, zero-pad channels) for the CIFAR family, as in trainer/resnet.py,
  so the parameter counts match.
  """
  import keras
  from keras import layers, ops
  table = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
           50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3)),
           152: ("bottleneck", (3, 8, 36, 3))}
  if depth in table:
    block, sizes, widths, option_a = *table[depth], (64, 128, 256, 512), False
  else:
    block, sizes, widths, option_a = "basic", ((depth - 2) // 6,) * 3, (16, 32, 64), True

  def conv_bn(x, filters, kernel, strides, relu):
    x = layers.Conv2D(filters, kernel, strides, padding="same", use_bias=False,
                      kernel_initializer="he_normal")(x)
    x = layers.BatchNormalization(epsilon=1e-5)(x)
    return layers.ReLU()(x) if relu else x

  def shortcut(x, channels, strides):
    if strides == 1 and x.shape[-1] == channels:
      return x
    if not option_a:
      return conv_bn(x, channels, 1, strides, relu=False)
    extra = channels - x.shape[-1]
    return layers.Lambda(lambda t: ops.pad(
        t[:, ::strides, ::strides, :], [[0, 0], [0, 0], [0, 0], [extra // 2, extra - extra // 2]]
    ))(x)

  inputs = keras.Input((32, 32, 3))
  if stem == "imagenet":
    x = conv_bn(inputs, widths[0], 7, 2, relu=True)
    x = layers.MaxPooling2D(3, 2, padding="same")(x)
  else:
    x = conv_bn(inputs, widths[0], 3, 1, relu=True)
  for stage, (blocks, width) in enumerate(zip(sizes, widths)):
    for index in range(blocks):
      strides = 2 if stage and not index else 1
      if block == "basic":
        channels = width
        y = conv_bn(x, width, 3, strides, relu=True)
        y = conv_bn(y, width, 3, 1, relu=False)
      else:
        channels = 4 * width
        y = conv_bn(x, width, 1, 1, relu=True)
        y = conv_bn(y, width, 3, strides, relu=True)
        y = conv_bn(y, channels, 1, 1, relu=False)
      x = layers.ReLU()(y if plain else layers.Add()([shortcut(x, channels, strides), y]))
  x = layers.GlobalAveragePooling2D()(x)
  return keras.Model(inputs, layers.Dense(10, dtype="float32")(x))


def batch_clock():
  """A Keras callback recording when each training batch ends (perf_counter) in `ends`.

  Defined here, not at module level: Keras loads only after the flags are parsed.
  """
  import keras

  class BatchClock(keras.callbacks.Callback):
    def __init__(self):
      super().__init__()
      self.ends = []

    def on_train_batch_end(self, batch, logs=None):
      self.ends.append(time.perf_counter())

  return BatchClock()


def fit_data(float_inputs: bool):
  """One random in-memory batch, repeated: uint8 images (or floats in [0, 1]), labels."""
  import numpy as np
  import tensorflow as tf
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (FLAGS.global_batch_size, 32, 32, 3), dtype=np.uint8)
  if float_inputs:
    images = (images / 255.0).astype(np.float32)
  labels = rng.integers(0, 10, (FLAGS.global_batch_size,), dtype=np.int32)
  return tf.data.Dataset.from_tensors((images, labels)).repeat()


def compile_for_fit(model) -> None:
  import keras
  model.compile(keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                jit_compile=FLAGS.jit_compile == "true")


def policy() -> str:
  """The Keras dtype policy of the benchmark's own models: --precision, with auto as float32."""
  return "float32" if FLAGS.precision == "auto" else FLAGS.precision


def our_model(fused_batch_norm: bool = True):
  """Our ResNet as the trainer builds it, under the benchmark's dtype policy (set here)."""
  import keras
  from input_pipeline import pipeline
  from trainer import resnet
  keras.mixed_precision.set_global_policy(policy())
  return resnet.build_model(resnet.architecture(FLAGS.depth, plain=FLAGS.plain,
                                                stem=FLAGS.stem),
                            input_mean=pipeline.CIFAR10_MEAN, input_std=pipeline.CIFAR10_STD,
                            fused_batch_norm=fused_batch_norm)


def trainable_parameters(model) -> int:
  """What PyTorch's parameters() counts: trainable weights (no batch-norm statistics)."""
  return sum(math.prod(w.shape) for w in model.trainable_weights)


class BareSteps:
  """A model's training step with nothing else around it: forward, backward, SGD update
  on one in-memory uint8 batch; `window(steps)` runs them in one tf.function call (no
  input pipeline, no metrics, no Python between steps) and returns the seconds."""

  def __init__(self, model):
    import keras
    import numpy as np
    import tensorflow as tf
    self.model, self.parameters = model, trainable_parameters(model)
    self.optimizer = keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True)
    self.optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    self.images = tf.constant(rng.integers(0, 256, (FLAGS.global_batch_size, 32, 32, 3),
                                           dtype=np.uint8))
    self.labels = tf.constant(rng.integers(0, 10, (FLAGS.global_batch_size,),
                                           dtype=np.int32))
    self._step = (tf.function(self._train_step, jit_compile=True)
                  if FLAGS.jit_compile == "true" else self._train_step)
    self._loop = tf.function(self._train_loop)

  def _train_step(self, images, labels):
    import keras
    import tensorflow as tf
    model, optimizer = self.model, self.optimizer
    with tf.GradientTape() as tape:
      logits = model(images, training=True)
      loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
          labels, logits, from_logits=True))
      scaled = optimizer.scale_loss(loss)
    optimizer.apply_gradients(zip(tape.gradient(scaled, model.trainable_variables),
                                  model.trainable_variables))

  def _train_loop(self, num_steps, images, labels):
    import tensorflow as tf
    for _ in tf.range(num_steps):
      self._step(images, labels)

  def window(self, steps: int) -> float:
    import tensorflow as tf
    start = time.perf_counter()
    self._loop(tf.constant(steps), self.images, self.labels)
    _ = self.optimizer.iterations.numpy()  # Waits for the last step.
    return time.perf_counter() - start
