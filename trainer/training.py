"""One builder of a training: from the settings, a strategy, the plan and the resolved
hardware, the state (model, optimizer, checkpoint) and the step functions that train it.

No run-directory side effects. The trainer (train.py), the precision probe and
scripts/benchmark.py all build their step here, so a benchmark's or a probe's step is the
trainer's step by construction.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from trainer import schedule
from trainer.config import Config
from trainer.state import State, build_state
from trainer.steps import TrainSteps


@dataclasses.dataclass(frozen=True)
class Hardware:
  """The strategy-dependent settings, resolved from their "auto" values (hardware.py)."""
  precision: str
  jit_compile: bool
  steps_per_execution: int


@dataclasses.dataclass(frozen=True)
class Training:
  """What trains: the state and the step functions over it, with what they were built
  for."""
  plan: schedule.Plan
  hardware: Hardware
  state: State
  steps: TrainSteps


def build_training(config: Config, strategy: tf.distribute.Strategy, plan: schedule.Plan,
                   hardware: Hardware, num_classes: int, record_steps: int = 0) -> Training:
  """Builds the state, freshly initialised from --seed (restore a checkpoint into
  `state.checkpoint`), and its training steps.

  Args:
    config: the run's settings.
    strategy: where the variables live and the steps run.
    plan: the run's steps (the learning-rate schedule, the per-replica batch).
    hardware: the resolved precision (Keras's global policy is set to it), XLA, and steps
      per call.
    num_classes: size of the classifier.
    record_steps: see steps.TrainSteps (0: no recording).
  """
  state = build_state(config, strategy, num_classes, plan, hardware.precision)
  steps = TrainSteps(config, strategy, state, num_classes, hardware.jit_compile,
                     record_steps=record_steps)
  return Training(plan, hardware, state, steps)


def fixed_batches(strategy: tf.distribute.Strategy, per_replica_batch_size: int,
                  num_classes: int) -> tf.distribute.DistributedIterator:
  """One random uint8 batch per replica, repeated: what a timing of the step feeds it,
  so that the input pipeline is left out."""
  rng = np.random.default_rng(0)
  batch = (rng.integers(0, 256, (per_replica_batch_size, 32, 32, 3), dtype=np.uint8),
           rng.integers(0, num_classes, (per_replica_batch_size,), dtype=np.int32))
  return iter(strategy.distribute_datasets_from_function(
      lambda context: tf.data.Dataset.from_tensors(batch).repeat()))
