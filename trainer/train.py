"""The training loop: model and optimizer inside the strategy's scope, per-epoch evaluation,
TensorBoard summaries, checkpoints, resume after a crash, metrics.json, and --mode=eval.
"""

import dataclasses
import os
import tempfile
import time

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from input_pipeline import pipeline, sources
from trainer import checkpoints, distribute, recipes, resnet, summaries
from trainer.config import REFERENCE_BATCH_SIZE, Config, ConfigError

METRICS_FILE = checkpoints.METRICS_FILE
EVAL_FILE = "eval.json"


class TrainingError(Exception):
  """Training cannot go on (e.g. the loss diverged); the last good checkpoint is kept."""


class StopRequest:
  """A Ctrl-C or SIGTERM that the training loop answers by saving a checkpoint, then stopping.

  A signal handler calls `request`. The loop listens only between its first and last step:
  before that (loading, building) there is nothing new to save, so the handler should raise
  at once instead, as it should for runs that cannot save alone (multi-worker).
  """

  def __init__(self):
    self.listening = False
    self.signum: int | None = None

  def request(self, signum: int) -> bool:
    """Asks the loop to save and stop; False when no loop listens (raise instead).

    Args:
      signum: the signal that asked (the first one is kept; repeats are absorbed, since a
        terminal's Ctrl-C and a launcher's forwarded SIGINT often arrive together).
    Returns:
      whether the loop will stop at its next step boundary.
    """
    if not self.listening:
      return False
    if self.signum is None:
      self.signum = signum
    return True


class Stopped(Exception):
  """The loop stopped on a StopRequest, after saving a checkpoint at `step`."""

  def __init__(self, signum: int, step: int, checkpoint: str | None):
    super().__init__(f"stopped by signal {signum} at step {step}")
    self.signum, self.step, self.checkpoint = signum, step, checkpoint


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The run's length and learning-rate milestones in steps; converted here, once."""
  steps_per_epoch: int
  total_steps: int
  warmup_steps: int
  eval_steps: int
  boundaries: tuple[int, ...] = ()  # he2016: steps where the learning rate drops 10x


def make_schedule(config: Config, num_train: int, num_eval: int) -> Schedule:
  """Converts the config's epochs (or the paper's iterations) into steps for the data.

  Args:
    config: the run's settings.
    num_train: training examples (after any validation split).
    num_eval: examples evaluated after each epoch.
  Returns:
    the schedule.
  """
  full_epoch = num_train // config.global_batch_size
  if full_epoch == 0:
    raise ConfigError(f"--global_batch_size={config.global_batch_size} is larger than the "
                      f"{num_train} training examples")
  steps_per_epoch = min(config.steps_per_epoch or full_epoch, full_epoch)
  eval_steps = pipeline.eval_steps(num_eval, config.global_batch_size)
  if config.eval_steps:
    eval_steps = min(eval_steps, config.eval_steps)
  # The paper counts iterations of 128 images; we keep the number of images seen.
  per_iteration = REFERENCE_BATCH_SIZE / config.global_batch_size
  if config.epochs is None:
    total_steps = round(recipes.HE2016_ITERATIONS * per_iteration)
  else:
    total_steps = config.epochs * steps_per_epoch
  warmup_steps = int(config.warmup_epochs * steps_per_epoch)
  boundaries = ()
  if config.lr_schedule == "he2016":
    boundaries = tuple(round(total_steps * b / recipes.HE2016_ITERATIONS)
                       for b in recipes.HE2016_BOUNDARIES)
    if config.depth >= recipes.HE2016_WARMUP_MIN_DEPTH and config.warmup_epochs == 0:
      warmup_steps = round(recipes.HE2016_WARMUP_ITERATIONS * per_iteration)
  return Schedule(steps_per_epoch, total_steps, warmup_steps, eval_steps, boundaries)


def make_learning_rate(config: Config, schedule: Schedule):
  """The learning rate as a function of the step, peak scaled with the global batch.

  cosine: linear warm-up from 0, then cosine decay to 0. he2016: the paper's constant
  warm-up at 0.01 (deep nets), then the peak divided by 10 at each boundary. constant:
  the peak throughout.
  """
  peak = config.scaled_learning_rate
  if config.lr_schedule == "constant":
    return peak
  if config.lr_schedule == "he2016":
    warmup = recipes.HE2016_WARMUP_LEARNING_RATE / recipes.RECIPES["he2016"]["learning_rate"]

    def rate(step: int) -> float:
      if step < schedule.warmup_steps:
        return peak * warmup
      return peak * 0.1 ** sum(step >= b for b in schedule.boundaries)

    # The schedule is called with the count of completed steps; Keras switches to the
    # next value once that count exceeds a boundary, hence the -1.
    changes = sorted({schedule.warmup_steps, *schedule.boundaries} - {0})
    return keras.optimizers.schedules.PiecewiseConstantDecay(
        [c - 1 for c in changes], [rate(0)] + [rate(c) for c in changes])
  decay_steps = max(schedule.total_steps - schedule.warmup_steps, 1)
  if schedule.warmup_steps:
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps, warmup_target=peak, warmup_steps=schedule.warmup_steps)
  return keras.optimizers.schedules.CosineDecay(peak, decay_steps)


def _on_read_variable(dtype=tf.float32,
                      aggregation=tf.VariableAggregation.SUM) -> tf.Variable:
  # Combined over replicas only when read: no cross-replica traffic on every step.
  return tf.Variable(tf.zeros((), dtype), trainable=False,
                     synchronization=tf.VariableSynchronization.ON_READ,
                     aggregation=aggregation)


class _Sums:
  """Loss, correct predictions and example counts, accumulated on the device."""

  def __init__(self):
    self.loss, self.correct, self.count = (_on_read_variable(), _on_read_variable(),
                                           _on_read_variable())

  def add(self, per_example_loss, logits, labels, weights=None):
    if weights is None:
      weights = tf.ones_like(per_example_loss)
    hits = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32)
    self.loss.assign_add(tf.reduce_sum(per_example_loss * weights))
    self.correct.assign_add(tf.reduce_sum(hits * weights))
    self.count.assign_add(tf.reduce_sum(weights))

  def result(self) -> tuple[float, float, float]:
    """Returns (mean loss, accuracy, examples) over all replicas."""
    count = float(self.count.numpy())
    loss, correct = float(self.loss.numpy()), float(self.correct.numpy())
    return loss / max(count, 1.0), correct / max(count, 1.0), count

  def reset(self):
    for v in (self.loss, self.correct, self.count):
      v.assign(tf.zeros_like(v))


@dataclasses.dataclass
class State:
  """Everything a checkpoint holds, built in the strategy's scope."""
  model: keras.Model
  optimizer: keras.optimizers.Optimizer
  checkpoint: tf.train.Checkpoint
  step: tf.Variable           # the global step of the last completed training step
  timed_images: tf.Variable   # training images and seconds, compile time excluded
  timed_seconds: tf.Variable
  wall_seconds: tf.Variable   # wall time of the run up to the checkpoint
  ema: list = dataclasses.field(default_factory=list)  # moving average, when ema_decay


def build_state(config: Config, strategy: tf.distribute.Strategy, num_classes: int,
                schedule: Schedule, precision: str) -> State:
  """Builds the model, optimizer and checkpoint inside the strategy's scope.

  Args:
    config: the run's settings.
    strategy: where the variables live.
    num_classes: size of the classifier.
    schedule: steps of the run (for the learning-rate schedule).
    precision: the resolved Keras dtype policy.
  Returns:
    the state, freshly initialised (restore a checkpoint into `state.checkpoint`).
  """
  keras.mixed_precision.set_global_policy(precision)
  keras.utils.set_random_seed(config.seed)  # Same initial weights for the same seed.
  with strategy.scope():
    model = resnet.build_model(
        config.architecture(), num_classes=num_classes,
        input_mean=pipeline.CIFAR10_MEAN, input_std=pipeline.CIFAR10_STD,
        bn_momentum=config.bn_momentum, zero_init_residual=config.zero_init_residual,
        sync_batch_norm=config.sync_batch_norm)
    optimizer = keras.optimizers.SGD(
        make_learning_rate(config, schedule), momentum=config.momentum,
        nesterov=config.nesterov and config.momentum > 0, clipnorm=config.clipnorm,
        name="sgd")  # Fixed names: variable paths (checkpoint keys) must not get "_1".
    if precision == "mixed_float16":
      optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer,
                                                           name="loss_scale_optimizer")
    optimizer.build(model.trainable_variables)
    counters = [tf.Variable(0, dtype=tf.int64, trainable=False)] + [
        tf.Variable(0.0, dtype=tf.float64, trainable=False) for _ in range(3)]
    # The moving average covers batch-norm statistics too, not only trainable weights.
    ema = [tf.Variable(v, trainable=False) for v in _averaged_variables(model)] \
        if config.ema_decay else []
    checkpoint = tf.train.Checkpoint(
        model=checkpoints.variables_by_path(model.variables),
        optimizer=checkpoints.variables_by_path(optimizer.variables),
        ema={v.path: e for v, e in zip(_averaged_variables(model), ema)},
        step=counters[0], timed_images=counters[1], timed_seconds=counters[2],
        wall_seconds=counters[3])
  return State(model, optimizer, checkpoint, *counters, ema=ema)


def _averaged_variables(model: keras.Model) -> list:
  return [v for v in model.variables if "float" in str(v.dtype)]


def _swap_ema(state: State) -> None:
  """Exchanges the model's weights with their moving average (twice restores them)."""
  for variable, average in zip(_averaged_variables(state.model), state.ema):
    current = tf.identity(variable)
    variable.assign(average)
    average.assign(current)


def _checkpoint_bytes(state: State) -> int:
  variables = state.model.variables + state.optimizer.variables
  return sum(v.numpy().nbytes for v in variables)


def _make_evaluator(strategy: tf.distribute.Strategy, state: State, split: sources.Split,
                    config: Config, eval_steps: int):
  """Returns a function that evaluates the model on `split`: () -> metrics dict.

  The dict has "loss" and "accuracy"; with config.eval_flip also "flip_loss" and
  "flip_accuracy" (logits averaged with those of the mirrored images); with an EMA also
  "ema_loss", "ema_accuracy" (and "ema_flip_..."), so users see what each gives.
  """
  model = state.model
  with strategy.scope():
    sums = _Sums()
    flip_sums = _Sums() if config.eval_flip else None

  def replica_step(images, labels, weights):
    logits = model(images, training=False)
    loss = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    sums.add(loss, logits, labels, weights)
    if flip_sums is not None:
      mirrored = model(tf.reverse(images, axis=[2]), training=False)
      averaged = (logits + mirrored) / 2
      loss = keras.losses.sparse_categorical_crossentropy(labels, averaged, from_logits=True)
      flip_sums.add(loss, averaged, labels, weights)

  @tf.function
  def eval_loop(iterator, num_steps):
    for _ in tf.range(num_steps):
      strategy.run(replica_step, args=next(iterator))

  def dataset_fn(input_context):
    return pipeline.eval_pipeline(
        split.as_dataset(),
        per_replica_batch_size=input_context.get_per_replica_batch_size(
            config.global_batch_size),
        num_examples=split.num_examples, input_context=input_context)

  dataset = strategy.distribute_datasets_from_function(dataset_fn)

  def run(prefix: str) -> dict:
    results = {}
    for kind, accumulator in (("", sums), ("flip_", flip_sums)):
      if accumulator is not None:
        accumulator.reset()
    eval_loop(iter(dataset), tf.constant(eval_steps))
    for kind, accumulator in (("", sums), ("flip_", flip_sums)):
      if accumulator is not None:
        loss, accuracy, _ = accumulator.result()
        results[f"{prefix}{kind}loss"], results[f"{prefix}{kind}accuracy"] = loss, accuracy
    return results

  def evaluate() -> dict:
    results = run("")
    if state.ema:
      _swap_ema(state)
      try:
        results.update(run("ema_"))
      finally:
        _swap_ema(state)
    return results

  return evaluate


def _set_op_determinism(enabled: bool) -> None:
  # Process-wide state: set it both ways, so one deterministic run (e.g. in a test
  # process) does not leave later runs deterministic (and without XLA max-pool gradients).
  from tensorflow.python.framework import config as tf_config  # No public "disable".
  if enabled:
    tf.config.experimental.enable_op_determinism()
  else:
    tf_config.disable_op_determinism()


def decayed_variables(model: keras.Model) -> list:
  """The variables weight decay applies to: convolution and dense kernels only."""
  return [v for v in model.trainable_variables if v.path.endswith("/kernel")]


def _check_batch(config: Config, strategy: tf.distribute.Strategy) -> int:
  replicas = strategy.num_replicas_in_sync
  if config.global_batch_size % replicas:
    raise ConfigError(f"--global_batch_size={config.global_batch_size} does not divide "
                      f"evenly over {replicas} replicas; use a multiple of {replicas}")
  return config.global_batch_size // replicas


def split_validation(train: sources.Split, size: int, seed: int
                     ) -> tuple[sources.Split, sources.Split]:
  """Holds out `size` training examples (a seeded random choice) for validation.

  Returns:
    (the remaining training examples, the held-out examples).
  """
  if not 0 < size < train.num_examples:
    raise ConfigError(f"--validation_split={size} must be between 1 and the "
                      f"{train.num_examples - 1} training examples")
  order = np.random.default_rng(seed).permutation(train.num_examples)
  keep, held = np.sort(order[size:]), np.sort(order[:size])
  return (sources.Split(train.images[keep], train.labels[keep], train.class_names),
          sources.Split(train.images[held], train.labels[held], train.class_names))


def _load_data(config: Config) -> tuple[sources.Split, sources.Split, sources.Split]:
  """(train, per-epoch evaluation, final test) splits for the config."""
  train, test = sources.load_splits(config.data_source, config.data_dir, config.seed)
  # A folder lists the test split class by class: a capped --eval_steps would see one
  # class. One fixed shuffle makes any prefix a fair sample (a full pass is unaffected).
  order = np.random.default_rng(0).permutation(test.num_examples)
  test = sources.Split(test.images[order], test.labels[order], test.class_names)
  if config.validation_split:
    train, validation = split_validation(train, config.validation_split, config.seed)
    return train, validation, test
  return train, test, test


def train_and_evaluate(config: Config, strategy: tf.distribute.Strategy,
                       stop_request: StopRequest | None = None) -> dict:
  """Trains and evaluates the configured ResNet under `strategy`, resuming if possible.

  Args:
    config: the run's settings.
    strategy: where to run; the model and optimizer are built in its scope.
    stop_request: when given, the training loop listens to it: once requested, it saves a
      checkpoint at the next step boundary and raises Stopped.
  Returns:
    the final metrics (also written to <model_dir>/metrics.json).
  Raises:
    ConfigError, sources.DataError: for settings or data that cannot work; raised before
      anything is written to the model dir.
    checkpoints.CheckpointError: when checkpoints exist but none can be restored.
    TrainingError: when the loss becomes NaN or Inf.
    Stopped: after a stop_request, once the checkpoint is saved.
  """
  if distribute.is_chief(strategy):
    return _train_and_evaluate(config, strategy, config.model_dir, True, stop_request)
  # Workers other than the chief write to a scratch dir of their own, removed however the
  # run ends: a failed worker's checkpoints would otherwise pile up in the temp dir.
  with tempfile.TemporaryDirectory(prefix="resnet-cifar-worker-",
                                   ignore_cleanup_errors=True) as scratch:
    return _train_and_evaluate(config, strategy, scratch, False, stop_request)


def _train_and_evaluate(config: Config, strategy: tf.distribute.Strategy, out_dir: str,
                        chief: bool, stop_request: StopRequest | None) -> dict:
  """train_and_evaluate's body, writing to `out_dir` (the model dir on the chief)."""
  wall_start = time.time()
  _set_op_determinism(config.deterministic)
  train_split, eval_split, test_split = _load_data(config)
  # With a validation split, epochs are evaluated on it and the test split once, at the end.
  eval_name = "validation" if config.validation_split else "test"
  schedule = make_schedule(config, train_split.num_examples, eval_split.num_examples)
  per_replica_batch_size = _check_batch(config, strategy)
  replicas = strategy.num_replicas_in_sync
  precision = distribute.resolve_precision(config.precision, strategy)
  jit_compile = distribute.resolve_jit_compile(config.jit_compile, strategy)
  steps_per_execution = distribute.resolve_steps_per_execution(config.steps_per_execution,
                                                               strategy)
  checkpoints.check_writable(out_dir)
  if config.overwrite:
    checkpoints.clear_run(out_dir)
  checkpoints.check_compatible(out_dir, config)

  state = build_state(config, strategy, len(train_split.class_names), schedule, precision)
  model, optimizer = state.model, state.optimizer
  checkpoints.check_free_space(out_dir, _checkpoint_bytes(state), config.keep_checkpoints)
  resolved = {"strategy_resolved": type(strategy).__name__, "replicas": replicas,
              "precision_resolved": precision, "jit_compile_resolved": jit_compile,
              "steps_per_execution_resolved": steps_per_execution,
              "per_replica_batch_size": per_replica_batch_size,
              "scaled_learning_rate": config.scaled_learning_rate,
              "steps_per_epoch_resolved": schedule.steps_per_epoch,
              "total_steps": schedule.total_steps, "warmup_steps": schedule.warmup_steps,
              "lr_boundaries_steps": list(schedule.boundaries),
              "train_examples": train_split.num_examples, "model": model.name,
              "class_names": list(train_split.class_names)}
  if chief:
    checkpoints.write_json_atomically(os.path.join(out_dir, checkpoints.CONFIG_FILE),
                                      {**dataclasses.asdict(config), **resolved})
  logging.info("recipe %s: %s schedule, %d steps (%.2f epochs of %d steps), warm-up %d "
               "steps%s; momentum %g%s, weight decay %g, label smoothing %g%s",
               config.recipe, config.lr_schedule, schedule.total_steps,
               schedule.total_steps / schedule.steps_per_epoch, schedule.steps_per_epoch,
               schedule.warmup_steps,
               f", /10 at steps {list(schedule.boundaries)}" if schedule.boundaries else "",
               config.momentum, " (Nesterov)" if config.nesterov else "",
               config.weight_decay, config.label_smoothing,
               f", clipnorm {config.clipnorm}" if config.clipnorm else "")
  logging.info("strategy %s, %d replica(s), precision %s, XLA %s, %d step(s) per "
               "execution, global batch %d (%d per replica), learning rate %.4g "
               "(%.4g x %d/%d)", type(strategy).__name__, replicas, precision,
               "on" if jit_compile else "off", steps_per_execution,
               config.global_batch_size, per_replica_batch_size, config.scaled_learning_rate,
               config.learning_rate, config.global_batch_size, REFERENCE_BATCH_SIZE)

  manager = tf.train.CheckpointManager(
      state.checkpoint, os.path.join(out_dir, checkpoints.CHECKPOINT_SUBDIR),
      max_to_keep=config.keep_checkpoints)
  best_manager = tf.train.CheckpointManager(
      state.checkpoint, os.path.join(out_dir, checkpoints.BEST_SUBDIR), max_to_keep=1)
  # Every worker restores what the chief saved (--model_dir must be on a file system that
  # all workers see): a worker that restored nothing would train other weights from step 0.
  restore_manager = manager if chief or config.overwrite else tf.train.CheckpointManager(
      state.checkpoint, os.path.join(config.model_dir, checkpoints.CHECKPOINT_SUBDIR),
      max_to_keep=config.keep_checkpoints)
  restored = checkpoints.restore_latest(state.checkpoint, restore_manager)
  start_step = int(state.step.numpy())
  if restored:
    logging.info("resumed from %s at step %d (epoch %.2f)", restored, start_step,
                 start_step / schedule.steps_per_epoch)
  previous_wall = float(state.wall_seconds.numpy())

  decayed = decayed_variables(model)
  stage_groups = summaries.group_by_stage(model.trainable_variables)
  averaged = _averaged_variables(model)
  num_classes = len(train_split.class_names)
  with strategy.scope():
    train_sums = _Sums()
    # Replica 0's view is enough: a non-finite loss reaches every replica within a step.
    first_bad_step = _on_read_variable(tf.int64, tf.VariableAggregation.ONLY_FIRST_REPLICA)
    grad_norms = {name: _on_read_variable(aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
                  for name in stage_groups}

  def compute_gradients(images, labels):
    with tf.GradientTape() as tape:
      logits = model(images, training=True)
      per_example = keras.losses.categorical_crossentropy(
          tf.one_hot(labels, num_classes), logits, from_logits=True,
          label_smoothing=config.label_smoothing)
      # Each replica's share of the global-batch mean; the optimizer sums the replicas.
      loss = tf.reduce_sum(per_example) / config.global_batch_size
      if config.weight_decay:
        l2 = tf.add_n([tf.reduce_sum(tf.square(v)) for v in decayed])
        loss += 0.5 * config.weight_decay * l2 / replicas
      scaled_loss = optimizer.scale_loss(loss)
    return tape.gradient(scaled_loss, model.trainable_variables), per_example, logits

  if jit_compile:
    # XLA per replica: compiling the function around strategy.run (what Keras does with
    # jit_compile=True) fails under MirroredStrategy; see ../shared/docs/tf-keras-facts.md.
    compute_gradients = tf.function(compute_gradients, jit_compile=True)

  def train_replica_step(step, images, labels):
    grads, per_example, logits = compute_gradients(images, labels)
    # Norms of this replica's gradients per stage: the vanishing-gradient picture.
    unscale = tf.cast(optimizer.scale_loss(1.0), tf.float32)
    for name, indices in stage_groups.items():
      grad_norms[name].assign(
          tf.linalg.global_norm([tf.cast(grads[i], tf.float32) for i in indices]) / unscale)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    train_sums.add(per_example, logits, labels)
    bad = tf.logical_and(tf.equal(first_bad_step, 0),
                         tf.logical_not(tf.reduce_all(tf.math.is_finite(per_example))))
    first_bad_step.assign(tf.where(bad, step, first_bad_step))

  @tf.function
  def train_loop(iterator, first_step, num_steps):
    for i in tf.range(num_steps):
      strategy.run(train_replica_step, args=(first_step + i + 1, *next(iterator)))
      if state.ema:
        # Cross-replica context: the average is updated once, from synchronised weights.
        for average, variable in zip(state.ema, averaged):
          average.assign(config.ema_decay * average + (1 - config.ema_decay) * variable)

  def train_dataset_fn(input_context):
    return pipeline.train_pipeline(
        train_split.as_dataset(),
        per_replica_batch_size=input_context.get_per_replica_batch_size(
            config.global_batch_size),
        seed=config.seed, start_step=start_step, deterministic=config.deterministic,
        input_context=input_context)

  train_iterator = iter(strategy.distribute_datasets_from_function(train_dataset_fn))
  # Keras 3 batch norm updates each replica's moving statistics on its own batch only;
  # averaging the copies before every evaluation and save keeps the replicas (and the
  # workers' checkpoints) equal.
  sync_replicas = distribute.make_replica_sync(strategy, model.non_trainable_variables)
  evaluate_split = _make_evaluator(strategy, state, eval_split, config, schedule.eval_steps)

  def evaluate() -> dict:
    sync_replicas()
    return evaluate_split()

  if chief:
    train_writer = tf.summary.create_file_writer(os.path.join(out_dir, "train"))
    eval_writer = tf.summary.create_file_writer(os.path.join(out_dir, "validation"))
  else:
    train_writer = eval_writer = tf.summary.create_noop_writer()
  summaries.write_run_info(train_writer, {**dataclasses.asdict(config), **resolved},
                           start_step)

  def check_finite(step: int):
    bad = int(first_bad_step.numpy())
    if bad:
      last = manager.latest_checkpoint or "none yet"
      raise TrainingError(
          f"the training loss became NaN or Inf at step {bad} (learning rate "
          f"{float(optimizer.learning_rate.numpy()):.4g} at step {step}); stopped without "
          f"saving. The last good checkpoint is {last}. Lower --learning_rate or raise "
          "--warmup_epochs, then rerun (it resumes from that checkpoint).")

  saved_step = start_step

  def save(step: int):
    nonlocal saved_step
    check_finite(step)
    sync_replicas()
    state.step.assign(step)
    state.wall_seconds.assign(previous_wall + time.time() - wall_start)
    manager.save(checkpoint_number=step)
    saved_step = step

  def stop_if_requested(step: int):
    # Called only where `step` and the model agree (between calls into TensorFlow, after
    # their bookkeeping), so the checkpoint resumes exactly there.
    if stop_request is None or stop_request.signum is None:
      return
    if step != saved_step:
      logging.info("saving a checkpoint at step %d before stopping", step)
      save(step)
    raise Stopped(stop_request.signum, step, manager.latest_checkpoint)

  # Epochs after the restored checkpoint were lost with the crash: forget them.
  history = [h for h in checkpoints.read_history(out_dir) if h["step"] <= start_step]
  best_accuracy = max((h[f"{eval_name}_accuracy"] for h in history), default=-1.0)
  profile = config.profile_steps
  total = schedule.total_steps
  step = start_step
  first_call = True
  interval_start, interval_step = time.time(), step
  epoch_sums = [0.0, 0.0, 0.0]  # loss sum, correct, count since the epoch began
  logging.info("training %s for %.2f epochs (%d steps) from step %d", model.name,
               total / schedule.steps_per_epoch, total, start_step)
  if stop_request is not None:
    stop_request.listening = True
  while step < total:
    stop_if_requested(step)
    # An epoch ends every steps_per_epoch steps, and at the last step (he2016 schedules
    # need not end on an epoch boundary).
    epoch_end = min((step // schedule.steps_per_epoch + 1) * schedule.steps_per_epoch, total)
    boundaries = [epoch_end, step + steps_per_execution,
                  (step // config.log_every_steps + 1) * config.log_every_steps,
                  (step // config.checkpoint_every_steps + 1) * config.checkpoint_every_steps]
    if profile:
      boundaries += [b for b in profile if b > step]
    stop = min(boundaries)
    if profile and chief and step == profile[0]:
      tf.profiler.experimental.start(os.path.join(out_dir, "train"))
    call_start = time.time()
    train_loop(train_iterator, tf.constant(step, tf.int64), tf.constant(stop - step, tf.int64))
    if first_call:
      # The first call traces and compiles; it is left out of the throughput figures.
      first_call = False
      interval_start, interval_step = time.time(), stop
    else:
      state.timed_images.assign_add((stop - step) * config.global_batch_size)
      state.timed_seconds.assign_add(time.time() - call_start)
    step = stop
    if profile and chief and step == profile[1]:
      tf.profiler.experimental.stop()
      logging.info("profiler trace of steps %d-%d written under %s", *profile,
                   os.path.join(out_dir, "train", "plugins", "profile"))
    epoch = step / schedule.steps_per_epoch
    if step % config.log_every_steps == 0 or step == epoch_end:
      check_finite(step)
      loss, accuracy, count = train_sums.result()
      train_sums.reset()
      epoch_sums = [epoch_sums[0] + loss * count, epoch_sums[1] + accuracy * count,
                    epoch_sums[2] + count]
      seconds = time.time() - interval_start
      images_per_second = ((step - interval_step) * config.global_batch_size / seconds
                           if step > interval_step else float("nan"))
      learning_rate = float(optimizer.learning_rate.numpy())
      with train_writer.as_default(step=step):
        tf.summary.scalar("loss", loss)
        tf.summary.scalar("accuracy", accuracy)
        tf.summary.scalar("learning_rate", learning_rate)
        for name, norm in grad_norms.items():
          tf.summary.scalar(f"gradient_norm/{name}", float(norm.numpy()))
        if step > interval_step:
          tf.summary.scalar("images_per_second", images_per_second)
          tf.summary.scalar("step_time_ms", 1000 * seconds / (step - interval_step))
      remaining = (total - step) * config.global_batch_size
      eta = remaining / images_per_second if images_per_second > 0 else float("nan")
      logging.info("epoch %.2f step %d/%d loss %.4f accuracy %.4f lr %.4g %.1f images/s "
                   "eta %s", epoch, step, total, loss, accuracy, learning_rate,
                   images_per_second, _duration(eta))
      interval_start, interval_step = time.time(), step
    if step == epoch_end:
      logging.info("evaluating on %d %s batches", schedule.eval_steps, eval_name)
      results = evaluate()
      train_count = max(epoch_sums[2], 1.0)
      record = {"epoch": round(epoch, 4), "step": step,
                "train_loss": epoch_sums[0] / train_count,
                "train_accuracy": epoch_sums[1] / train_count,
                **{f"{eval_name}_{k}": v for k, v in results.items()}}
      epoch_sums = [0.0, 0.0, 0.0]
      history.append(record)
      with train_writer.as_default(step=step):
        tf.summary.scalar("epoch_loss", record["train_loss"])
        tf.summary.scalar("epoch_accuracy", record["train_accuracy"])
      with eval_writer.as_default(step=step):
        for key, value in results.items():
          tf.summary.scalar(key, value)
        tf.summary.scalar("epoch_loss", results["loss"])
        tf.summary.scalar("epoch_accuracy", results["accuracy"])
      logging.info("epoch %.2f train loss %.4f accuracy %.4f, %s %s", epoch,
                   record["train_loss"], record["train_accuracy"], eval_name,
                   " ".join(f"{k} {v:.4f}" for k, v in results.items()))
      if chief:
        checkpoints.write_json_atomically(os.path.join(out_dir, checkpoints.HISTORY_FILE),
                                          {"history": history})
      save(step)
      if results["accuracy"] > best_accuracy:
        best_accuracy = results["accuracy"]
        best_manager.save(checkpoint_number=step)
      interval_start = time.time()
    elif step % config.checkpoint_every_steps == 0:
      save(step)
  stop_if_requested(step)
  if stop_request is not None:
    # From here on a signal raises at once: what is left is writing metrics.json.
    stop_request.listening = False
  check_finite(step)
  if eval_name == "test" and history and history[-1]["step"] == step:
    final = {k[len("test_"):]: v for k, v in history[-1].items() if k.startswith("test_")}
  else:
    # The test split after a validation protocol, or a resumed finished run.
    sync_replicas()
    final = _make_evaluator(strategy, state, test_split, config,
                            pipeline.eval_steps(test_split.num_examples,
                                                config.global_batch_size))()
    with eval_writer.as_default(step=step):
      for key, value in final.items():
        tf.summary.scalar(f"final_test_{key}", value)
  train_writer.flush()
  eval_writer.flush()

  images, seconds = float(state.timed_images.numpy()), float(state.timed_seconds.numpy())
  metrics = {
      **{f"test_{k}": v for k, v in final.items()},
      "best_test_accuracy": max([h.get("test_accuracy", -1.0) for h in history]
                                + [final["accuracy"]]),
      "epochs": round(step / schedule.steps_per_epoch, 4),
      "steps": step,
      "global_batch_size": config.global_batch_size,
      "wall_seconds": previous_wall + time.time() - wall_start,
      "images_per_second": images / seconds if seconds else None,
      "resumed_from_step": start_step,
      "replicas": replicas,
      "precision": precision,
      "jit_compile": jit_compile,
      "recipe": config.recipe,
      "model": model.name,
      "trainable_parameters": int(sum(v.numpy().size for v in model.trainable_variables)),
      "history": history,
  }
  if config.validation_split:
    metrics["best_validation_accuracy"] = best_accuracy
  if chief:
    checkpoints.write_json_atomically(os.path.join(out_dir, METRICS_FILE), metrics)
  return metrics


def evaluate_checkpoint(config: Config, strategy: tf.distribute.Strategy) -> dict:
  """--mode=eval: evaluates the checkpoint `config.checkpoint` names on the test split.

  Returns:
    the metrics (also written to <model_dir>/eval.json).
  Raises:
    checkpoints.CheckpointError: when there is no such checkpoint.
  """
  which = config.checkpoint or "latest"
  path = checkpoints.resolve_checkpoint(config.model_dir, which)
  train_split, _, test_split = _load_data(config)
  schedule = make_schedule(config, train_split.num_examples, test_split.num_examples)
  _check_batch(config, strategy)
  precision = distribute.resolve_precision(config.precision, strategy)
  state = build_state(config, strategy, len(test_split.class_names), schedule, precision)
  try:
    state.checkpoint.restore(path).expect_partial().assert_existing_objects_matched()
  except (tf.errors.OpError, AssertionError, ValueError) as e:
    raise checkpoints.CheckpointError(
        f"cannot restore {path} into {state.model.name} ({type(e).__name__}); was it "
        "trained with other --depth/--plain/--stem/--shortcut/--stage_*/--ema_decay "
        "settings?") from None
  results = _make_evaluator(strategy, state, test_split, config, schedule.eval_steps)()
  metrics = {"checkpoint": path, "step": int(state.step.numpy()), "model": state.model.name,
             **{f"test_{k}": v for k, v in results.items()},
             "examples": min(test_split.num_examples,
                             schedule.eval_steps * config.global_batch_size)}
  if distribute.is_chief(strategy):
    checkpoints.write_json_atomically(os.path.join(config.model_dir, EVAL_FILE), metrics)
  return metrics


def _duration(seconds: float) -> str:
  if seconds != seconds:
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
