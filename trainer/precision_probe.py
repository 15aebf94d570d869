"""Times the run's own network at float32 and mixed_bfloat16 on this machine, for
--precision=auto on a CPU (distribute.choose_cpu_precision decides from the timings)."""

import statistics
import time

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from trainer import state as state_lib
from trainer.config import Config

PRECISIONS = ("float32", "mixed_bfloat16")
# Timed steps per precision, interleaved (float32, bfloat16, float32, ...) so that a burst
# of load from another process hits both alike; the median drops a stray slow step.
ROUNDS = 5


class _Steps:
  """One precision's copy of the network and a training step of it on one fixed batch:
  forward, backward, SGD with momentum. The convolutions and batch norms, which the
  precision changes, are most of the trainer's step; one step per call, as the trainer
  calls on CPU."""

  def __init__(self, config: Config, strategy: tf.distribute.Strategy, precision: str,
               per_replica_batch_size: int, num_classes: int, jit_compile: bool):
    keras.mixed_precision.set_global_policy(precision)
    with strategy.scope():
      self.model = state_lib.build_model(config, num_classes)
      self.optimizer = keras.optimizers.SGD(0.01, momentum=0.9, name="precision_probe_sgd")
      self.optimizer.build(self.model.trainable_variables)
    rng = np.random.default_rng(0)
    self.images = tf.constant(rng.integers(0, 256, (per_replica_batch_size, 32, 32, 3),
                                           dtype=np.uint8))
    self.labels = tf.constant(rng.integers(0, num_classes, (per_replica_batch_size,),
                                           dtype=np.int32))
    self._gradients = (tf.function(self._compute_gradients, jit_compile=True)
                       if jit_compile else self._compute_gradients)
    self._call = tf.function(lambda: strategy.run(self._replica_step))

  def _compute_gradients(self):
    with tf.GradientTape() as tape:
      logits = self.model(self.images, training=True)
      loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
          self.labels, logits, from_logits=True))
    return tape.gradient(loss, self.model.trainable_variables)

  def _replica_step(self):
    # Keras's SGD sums the replicas' gradients itself: one all-reduce, as in the trainer.
    self.optimizer.apply_gradients(zip(self._gradients(), self.model.trainable_variables))

  def seconds(self) -> float:
    """Runs one step; returns its wall time."""
    start = time.perf_counter()
    self._call()
    self.optimizer.iterations.numpy()  # Waits for the update.
    return time.perf_counter() - start


def seconds_per_step(config: Config, strategy: tf.distribute.Strategy,
                     per_replica_batch_size: int, num_classes: int,
                     jit_compile: bool) -> tuple[float, float]:
  """The median seconds per training step of the configured network (depth, stem, plain,
  ...) at float32 and at mixed_bfloat16, on the strategy's devices at the run's
  per-replica batch, after one warm-up step each (tracing, oneDNN's primitives).

  Builds throwaway models: the run's state is built afterwards, and Keras's global dtype
  policy is as it was on return.
  """
  previous = keras.mixed_precision.global_policy()
  started = time.perf_counter()
  try:
    steps = [_Steps(config, strategy, precision, per_replica_batch_size, num_classes,
                    jit_compile) for precision in PRECISIONS]
  finally:
    keras.mixed_precision.set_global_policy(previous)
  for each in steps:
    each.seconds()
  times = [[each.seconds() for each in steps] for _ in range(ROUNDS)]
  medians = tuple(statistics.median(column) for column in zip(*times))
  logging.info("precision probe: %s, %d images per replica: %s s per step (median of %d), "
               "probed in %.1f s", steps[0].model.name, per_replica_batch_size,
               ", ".join(f"{p} {t:.3f}" for p, t in zip(PRECISIONS, medians)), ROUNDS,
               time.perf_counter() - started)
  return medians
