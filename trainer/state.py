"""The training state: model, optimizer, moving average of the weights, run counters and the
tf.train.Checkpoint that holds them, all built inside the strategy's one scope."""

import contextlib
import dataclasses

import keras
import tensorflow as tf

from input_pipeline import pipeline
from trainer import gradients, resnet, schedule
from trainer.config import Config


@dataclasses.dataclass
class State:
  """Everything a checkpoint holds."""
  model: keras.Model
  optimizer: keras.optimizers.Optimizer
  checkpoint: tf.train.Checkpoint
  step: tf.Variable           # the global step of the last completed training step
  timed_images: tf.Variable   # training images and seconds, compile time excluded
  timed_seconds: tf.Variable
  wall_seconds: tf.Variable   # wall time of the run up to the checkpoint
  ema: list = dataclasses.field(default_factory=list)  # moving average, when ema_decay

  def health(self) -> tuple[bool, float]:
    """Whether every float variable of the model, the optimizer and the average is finite,
    and the global norm of the trainable weights (one graph call; checked before every
    save)."""
    variables = [v for v in self.model.variables + self.optimizer.variables + self.ema
                 if tf.as_dtype(v.dtype).is_floating]
    finite, norm = _health(variables, self.model.trainable_variables)
    return bool(finite), float(norm)

  def checkpoint_bytes(self) -> int:
    """The size of one checkpoint's tensors."""
    variables = self.model.variables + self.optimizer.variables
    return sum(v.numpy().nbytes for v in variables)


def variables_by_path(variables) -> dict:
  """Keys variables by their path ("stage2_block1_conv1/kernel") for tf.train.Checkpoint.

  Checkpointing a Keras model object would key its variables by layer index, so adding
  any layer would break older checkpoints; layer names are stable.
  """
  return {v.path: v for v in variables}


def averaged_variables(model: keras.Model) -> list:
  """What the moving average covers: every float variable, batch-norm statistics too."""
  return [v for v in model.variables if "float" in str(v.dtype)]


def per_replica_variables(state: "State") -> list:
  """The variables whose copies differ between replicas until averaged: batch-norm
  statistics (each replica updates its own on its own batch) and their moving averages.
  Everything else is updated from summed gradients, the same on every replica."""
  trainable = {id(v) for v in state.model.trainable_variables}
  averages = [average for variable, average in zip(averaged_variables(state.model), state.ema)
              if id(variable) not in trainable]
  return list(state.model.non_trainable_variables) + averages


def decayed_variables(model: keras.Model) -> list:
  """The variables weight decay applies to: convolution and dense kernels only."""
  return [v for v in model.trainable_variables if v.path.endswith("/kernel")]


def build_model(config: Config, num_classes: int, *, portable: bool = False) -> keras.Model:
  """The configured network, taking uint8 images normalised with CIFAR-10's statistics
  (portable: stock Keras layers only, for exports; the same variables)."""
  return resnet.build_model(
      config.architecture(), num_classes=num_classes,
      input_mean=pipeline.CIFAR10_MEAN, input_std=pipeline.CIFAR10_STD,
      bn_momentum=config.bn_momentum, zero_init_residual=config.zero_init_residual,
      sync_batch_norm=config.sync_batch_norm, portable=portable)


def _make_optimizer(config: Config, plan: schedule.Plan,
                    precision: str) -> keras.optimizers.Optimizer:
  optimizer = gradients.SGD(
      schedule.make_learning_rate(config, plan), momentum=config.momentum,
      nesterov=config.nesterov and config.momentum > 0, clipnorm=config.clipnorm,
      name="sgd")  # Fixed names: variable paths (checkpoint keys) must not get "_1".
  if precision == "mixed_float16":
    optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer,
                                                         name="loss_scale_optimizer")
  return optimizer


def build_state(config: Config, strategy: tf.distribute.Strategy, num_classes: int,
                plan: schedule.Plan, precision: str) -> State:
  """Builds the model, optimizer and checkpoint inside the strategy's scope.

  Args:
    config: the run's settings.
    strategy: where the variables live.
    num_classes: size of the classifier.
    plan: steps of the run (for the learning-rate schedule).
    precision: the resolved Keras dtype policy.
  Returns:
    the state, freshly initialised (restore a checkpoint into `state.checkpoint`).
  """
  keras.mixed_precision.set_global_policy(precision)
  keras.utils.set_random_seed(config.seed)  # Same initial weights for the same seed.
  with strategy.scope():
    model = build_model(config, num_classes)
    optimizer = _make_optimizer(config, plan, precision)
    optimizer.build(model.trainable_variables)
    counters = [tf.Variable(0, dtype=tf.int64, trainable=False)] + [
        tf.Variable(0.0, dtype=tf.float64, trainable=False) for _ in range(3)]
    ema = ([tf.Variable(v, trainable=False) for v in averaged_variables(model)]
           if config.ema_decay else [])
    checkpoint = tf.train.Checkpoint(
        **_weights(model, ema), optimizer=variables_by_path(optimizer.variables),
        step=counters[0], timed_images=counters[1], timed_seconds=counters[2],
        wall_seconds=counters[3])
  return State(model, optimizer, checkpoint, *counters, ema=ema)


def inference_checkpoint(state: State) -> tf.train.Checkpoint:
  """The part of `state.checkpoint` evaluation reads: model, moving average and step.

  Without the optimizer, whose variables depend on the precision (mixed_float16 adds a
  loss scale), a run evaluates under any --precision.
  """
  return tf.train.Checkpoint(**_weights(state.model, state.ema), step=state.step)


def _weights(model: keras.Model, ema: list) -> dict:
  """The model's variables and their moving average, under the checkpoint keys both the
  training and the inference checkpoint use."""
  return {"model": variables_by_path(model.variables),
          "ema": {v.path: e for v, e in zip(averaged_variables(model), ema)}}


@contextlib.contextmanager
def ema_weights(state: State):
  """Puts the moving average into the model for the block's duration (exchanging twice
  restores the weights, even when the block raises)."""
  _swap_ema(state)
  try:
    yield
  finally:
    _swap_ema(state)


def _swap_ema(state: State) -> None:
  for variable, average in zip(averaged_variables(state.model), state.ema):
    current = tf.identity(variable)
    variable.assign(average)
    average.assign(current)


@tf.function
def _health(variables: list, weights: list) -> tuple[tf.Tensor, tf.Tensor]:
  finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in variables])
  return finite, tf.linalg.global_norm([tf.cast(w, tf.float32) for w in weights])
