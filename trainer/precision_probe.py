"""Times the run's own training step at float32 and mixed_bfloat16 on this machine, for
--precision=auto on a CPU (distribute.choose_cpu_precision decides from the timings)."""

import statistics
import time

from absl import logging
import keras
import tensorflow as tf

from trainer import schedule, training
from trainer.config import Config

PRECISIONS = ("float32", "mixed_bfloat16")
# Timed steps per precision, interleaved (float32, bfloat16, float32, ...) so that a burst
# of load from another process hits both alike; the median drops a stray slow step.
ROUNDS = 5


class _Timer:
  """One precision's copy of the run's training (training.build_training: the trainer's
  step, with its loss, L2, all-reduce and update) on one fixed batch; one step per call,
  as the trainer calls on CPU."""

  def __init__(self, config: Config, strategy: tf.distribute.Strategy, plan: schedule.Plan,
               precision: str, num_classes: int, jit_compile: bool):
    self.training = training.build_training(
        config, strategy, plan, training.Hardware(precision, jit_compile, 1), num_classes)
    self.iterator = training.fixed_batches(strategy, plan.per_replica_batch_size,
                                           num_classes)
    self.step = 0

  def seconds(self) -> float:
    """Runs one step; returns its wall time."""
    start = time.perf_counter()
    self.training.steps.run(self.iterator, tf.constant(self.step, tf.int64),
                            tf.constant(1, tf.int64))
    self.training.state.optimizer.iterations.numpy()  # Waits for the update.
    self.step += 1
    return time.perf_counter() - start


def seconds_per_step(config: Config, strategy: tf.distribute.Strategy, plan: schedule.Plan,
                     num_classes: int, jit_compile: bool) -> tuple[float, float]:
  """The median seconds per training step of the configured run (network, recipe, batch)
  at float32 and at mixed_bfloat16, on the strategy's devices at the run's per-replica
  batch, after one warm-up step each (tracing, oneDNN's primitives).

  Builds throwaway states: the run's state is built afterwards (from --seed again), and
  Keras's global dtype policy is as it was on return.
  """
  previous = keras.mixed_precision.global_policy()
  started = time.perf_counter()
  try:
    timers = [_Timer(config, strategy, plan, precision, num_classes, jit_compile)
              for precision in PRECISIONS]
  finally:
    keras.mixed_precision.set_global_policy(previous)
  for timer in timers:
    timer.seconds()
  times = [[timer.seconds() for timer in timers] for _ in range(ROUNDS)]
  medians = tuple(statistics.median(column) for column in zip(*times))
  logging.info("precision probe: %s, %d images per replica: %s s per step (median of %d), "
               "probed in %.1f s", timers[0].training.state.model.name,
               plan.per_replica_batch_size,
               ", ".join(f"{p} {t:.3f}" for p, t in zip(PRECISIONS, medians)), ROUNDS,
               time.perf_counter() - started)
  return medians
