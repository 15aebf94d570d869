"""The run's plan in steps: batch arithmetic, epochs (or the paper's iterations) converted to
steps once, and the learning rate as a function of the step."""

import dataclasses

import keras

from trainer import recipes
from trainer.config import REFERENCE_BATCH_SIZE, Config
from trainer.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything the pipelines and the loop count in, computed once (`make_plan`)."""
  replicas: int
  global_batch_size: int
  per_replica_batch_size: int
  steps_per_epoch: int
  total_steps: int
  warmup_steps: int
  eval_steps: int   # per-epoch evaluation steps (capped by --eval_steps)
  test_steps: int   # steps that cover the whole test split once (final evaluation)
  boundaries: tuple[int, ...] = ()  # he2016: steps where the learning rate drops 10x

  @property
  def total_epochs(self) -> float:
    return self.total_steps / self.steps_per_epoch


def full_pass_steps(num_examples: int, global_batch_size: int) -> int:
  """Global steps needed to see every example once (the last one padded)."""
  return -(-num_examples // global_batch_size)


def per_replica_batch_size(global_batch_size: int, replicas: int) -> int:
  """The global batch split over the replicas.

  Raises:
    ConfigError: when it does not divide evenly.
  """
  if global_batch_size % replicas:
    raise ConfigError(f"--global_batch_size={global_batch_size} does not divide evenly "
                      f"over {replicas} replicas; use a multiple of {replicas}")
  return global_batch_size // replicas


def make_plan(config: Config, *, replicas: int, num_train: int, num_eval: int,
              num_test: int | None = None) -> Plan:
  """Converts the config's epochs (or the paper's iterations) into steps for the data.

  Args:
    config: the run's settings.
    replicas: replicas in sync (the global batch is split over them).
    num_train: training examples (after any validation split).
    num_eval: examples evaluated after each epoch.
    num_test: examples of the test split (default: num_eval).
  Returns:
    the plan.
  Raises:
    ConfigError: when the global batch does not fit the data or the replicas.
  """
  batch = config.global_batch_size
  per_replica = per_replica_batch_size(batch, replicas)
  full_epoch = num_train // batch
  if full_epoch == 0:
    raise ConfigError(f"--global_batch_size={batch} is larger than the "
                      f"{num_train} training examples")
  steps_per_epoch = min(config.steps_per_epoch or full_epoch, full_epoch)
  eval_steps = full_pass_steps(num_eval, batch)
  if config.eval_steps:
    eval_steps = min(eval_steps, config.eval_steps)
  test_steps = full_pass_steps(num_eval if num_test is None else num_test, batch)
  # The paper counts iterations of 128 images; we keep the number of images seen.
  per_iteration = REFERENCE_BATCH_SIZE / batch
  if config.epochs is None:
    total_steps = round(recipes.HE2016_ITERATIONS * per_iteration)
  else:
    total_steps = config.epochs * steps_per_epoch
  warmup_steps = int(config.warmup_epochs * steps_per_epoch)
  boundaries = ()
  if config.lr_schedule == "he2016":
    boundaries = tuple(round(total_steps * b / recipes.HE2016_ITERATIONS)
                       for b in recipes.HE2016_BOUNDARIES)
    # The paper's rule is about the network's depth: count the layers actually built
    # (--stage_sizes may override the depth table).
    depth = config.architecture().weighted_layers
    if depth >= recipes.HE2016_WARMUP_MIN_DEPTH and config.warmup_epochs == 0:
      warmup_steps = round(recipes.HE2016_WARMUP_ITERATIONS * per_iteration)
  return Plan(replicas, batch, per_replica, steps_per_epoch, total_steps, warmup_steps,
              eval_steps, test_steps, boundaries)


def make_learning_rate(config: Config, plan: Plan):
  """The learning rate as a function of the step, peak scaled with the global batch.

  cosine: linear warm-up from 0, then cosine decay to 0. he2016: the paper's constant
  warm-up at 0.01 (deep nets), then the peak divided by 10 at each boundary. constant:
  the peak throughout.
  """
  peak = config.scaled_learning_rate
  if config.lr_schedule == "constant":
    return peak
  if config.lr_schedule == "he2016":
    return _he2016_rate(peak, plan)
  decay_steps = max(plan.total_steps - plan.warmup_steps, 1)
  if plan.warmup_steps:
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps, warmup_target=peak, warmup_steps=plan.warmup_steps)
  return keras.optimizers.schedules.CosineDecay(peak, decay_steps)


def _he2016_rate(peak: float, plan: Plan) -> keras.optimizers.schedules.LearningRateSchedule:
  warmup = recipes.HE2016_WARMUP_LEARNING_RATE / recipes.RECIPES["he2016"]["learning_rate"]

  def rate(step: int) -> float:
    if step < plan.warmup_steps:
      return peak * warmup
    return peak * 0.1 ** sum(step >= b for b in plan.boundaries)

  # The schedule is called with the count of completed steps; Keras switches to the
  # next value once that count exceeds a boundary, hence the -1.
  changes = sorted({plan.warmup_steps, *plan.boundaries} - {0})
  return keras.optimizers.schedules.PiecewiseConstantDecay(
      [c - 1 for c in changes], [rate(0)] + [rate(c) for c in changes])
