"""The training loop: model and optimizer inside the strategy's scope, per-epoch evaluation,
TensorBoard summaries, checkpoints, resume after a crash, metrics.json, and --mode=eval.
"""

import dataclasses
import os
import shutil
import tempfile
import time

from absl import logging
import keras
import tensorflow as tf

from input_pipeline import pipeline, sources
from trainer import checkpoints, distribute, resnet, summaries
from trainer.config import Config, ConfigError

METRICS_FILE = checkpoints.METRICS_FILE
EVAL_FILE = "eval.json"


class TrainingError(Exception):
  """Training cannot go on (e.g. the loss diverged); the last good checkpoint is kept."""


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The run's length in steps; epochs are converted to steps here, once."""
  steps_per_epoch: int
  total_steps: int
  warmup_steps: int
  eval_steps: int


def make_schedule(config: Config, num_train: int, num_test: int) -> Schedule:
  """Converts the config's epochs into steps for the data at hand."""
  full_epoch = num_train // config.global_batch_size
  if full_epoch == 0:
    raise ConfigError(f"--global_batch_size={config.global_batch_size} is larger than the "
                      f"{num_train} training examples")
  steps_per_epoch = min(config.steps_per_epoch or full_epoch, full_epoch)
  eval_steps = pipeline.eval_steps(num_test, config.global_batch_size)
  if config.eval_steps:
    eval_steps = min(eval_steps, config.eval_steps)
  return Schedule(steps_per_epoch, config.epochs * steps_per_epoch,
                  int(config.warmup_epochs * steps_per_epoch), eval_steps)


def make_learning_rate(config: Config, schedule: Schedule):
  """Linear warm-up to the batch-scaled learning rate, then cosine decay to 0."""
  peak = config.scaled_learning_rate
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
    optimizer = keras.optimizers.SGD(make_learning_rate(config, schedule),
                                     momentum=config.momentum, nesterov=config.momentum > 0)
    if precision == "mixed_float16":
      optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    counters = [tf.Variable(0, dtype=tf.int64, trainable=False)] + [
        tf.Variable(0.0, dtype=tf.float64, trainable=False) for _ in range(3)]
    checkpoint = tf.train.Checkpoint(
        model=model, optimizer=optimizer, step=counters[0], timed_images=counters[1],
        timed_seconds=counters[2], wall_seconds=counters[3])
  return State(model, optimizer, checkpoint, *counters)


def _checkpoint_bytes(state: State) -> int:
  variables = state.model.variables + state.optimizer.variables
  return sum(v.numpy().nbytes for v in variables)


def _make_evaluator(strategy: tf.distribute.Strategy, model: keras.Model,
                    test_split: sources.Split, config: Config, eval_steps: int):
  """Returns a function that evaluates `model` on the test split: () -> (loss, accuracy)."""
  with strategy.scope():
    sums = _Sums()

  def replica_step(images, labels, weights):
    logits = model(images, training=False)
    per_example = keras.losses.sparse_categorical_crossentropy(labels, logits,
                                                               from_logits=True)
    sums.add(per_example, logits, labels, weights)

  @tf.function
  def eval_loop(iterator, num_steps):
    for _ in tf.range(num_steps):
      strategy.run(replica_step, args=next(iterator))

  def dataset_fn(input_context):
    return pipeline.eval_pipeline(
        test_split.as_dataset(),
        per_replica_batch_size=input_context.get_per_replica_batch_size(
            config.global_batch_size),
        num_examples=test_split.num_examples, input_context=input_context)

  dataset = strategy.distribute_datasets_from_function(dataset_fn)

  def evaluate() -> tuple[float, float]:
    sums.reset()
    eval_loop(iter(dataset), tf.constant(eval_steps))
    loss, accuracy, _ = sums.result()
    return loss, accuracy

  return evaluate


def _check_batch(config: Config, strategy: tf.distribute.Strategy) -> int:
  replicas = strategy.num_replicas_in_sync
  if config.global_batch_size % replicas:
    raise ConfigError(f"--global_batch_size={config.global_batch_size} does not divide "
                      f"evenly over {replicas} replicas; use a multiple of {replicas}")
  return config.global_batch_size // replicas


def train_and_evaluate(config: Config, strategy: tf.distribute.Strategy) -> dict:
  """Trains and evaluates the configured ResNet under `strategy`, resuming if possible.

  Args:
    config: the run's settings.
    strategy: where to run; the model and optimizer are built in its scope.
  Returns:
    the final metrics (also written to <model_dir>/metrics.json).
  Raises:
    ConfigError, sources.DataError: for settings or data that cannot work; raised before
      anything is written to the model dir.
    checkpoints.CheckpointError: when checkpoints exist but none can be restored.
    TrainingError: when the loss becomes NaN or Inf.
  """
  wall_start = time.time()
  if config.deterministic:
    tf.config.experimental.enable_op_determinism()
  train_split, test_split = sources.load_splits(config.data_source, config.data_dir,
                                                config.seed)
  schedule = make_schedule(config, train_split.num_examples, test_split.num_examples)
  per_replica_batch_size = _check_batch(config, strategy)
  replicas = strategy.num_replicas_in_sync
  precision = distribute.resolve_precision(config.precision, strategy)
  jit_compile = distribute.resolve_jit_compile(config.jit_compile, strategy)
  chief = distribute.is_chief(strategy)
  # Workers other than the chief write to a scratch dir that they remove at the end.
  out_dir = config.model_dir if chief else tempfile.mkdtemp(prefix="resnet-cifar-worker-")
  checkpoints.check_writable(out_dir)
  if config.overwrite:
    checkpoints.clear_run(out_dir)
  checkpoints.check_compatible(out_dir, config)

  state = build_state(config, strategy, len(train_split.class_names), schedule, precision)
  model, optimizer = state.model, state.optimizer
  checkpoints.check_free_space(out_dir, _checkpoint_bytes(state), config.keep_checkpoints)
  resolved = {"strategy_resolved": type(strategy).__name__, "replicas": replicas,
              "precision_resolved": precision, "jit_compile_resolved": jit_compile,
              "per_replica_batch_size": per_replica_batch_size,
              "scaled_learning_rate": config.scaled_learning_rate,
              "steps_per_epoch_resolved": schedule.steps_per_epoch,
              "total_steps": schedule.total_steps, "model": model.name,
              "class_names": list(train_split.class_names)}
  if chief:
    checkpoints.write_json_atomically(os.path.join(out_dir, checkpoints.CONFIG_FILE),
                                      {**dataclasses.asdict(config), **resolved})
  logging.info("strategy %s, %d replica(s), precision %s, XLA %s, global batch %d "
               "(%d per replica), learning rate %.4g (%.4g x %d/128), %d steps per epoch",
               type(strategy).__name__, replicas, precision, "on" if jit_compile else "off",
               config.global_batch_size, per_replica_batch_size, config.scaled_learning_rate,
               config.learning_rate, config.global_batch_size, schedule.steps_per_epoch)

  manager = tf.train.CheckpointManager(
      state.checkpoint, os.path.join(out_dir, checkpoints.CHECKPOINT_SUBDIR),
      max_to_keep=config.keep_checkpoints)
  best_manager = tf.train.CheckpointManager(
      state.checkpoint, os.path.join(out_dir, checkpoints.BEST_SUBDIR), max_to_keep=1)
  restored = checkpoints.restore_latest(state.checkpoint, manager)
  start_step = int(state.step.numpy())
  if restored:
    logging.info("resumed from %s at step %d (epoch %.2f)", restored, start_step,
                 start_step / schedule.steps_per_epoch)
  previous_wall = float(state.wall_seconds.numpy())

  decayed = [v for v in model.trainable_variables if v.path.endswith("kernel")]
  stage_groups = summaries.group_by_stage(model.trainable_variables)
  with strategy.scope():
    train_sums = _Sums()
    # Replica 0's view is enough: a non-finite loss reaches every replica within a step.
    first_bad_step = _on_read_variable(tf.int64, tf.VariableAggregation.ONLY_FIRST_REPLICA)
    grad_norms = {name: _on_read_variable(aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
                  for name in stage_groups}

  def compute_gradients(images, labels):
    with tf.GradientTape() as tape:
      logits = model(images, training=True)
      per_example = keras.losses.sparse_categorical_crossentropy(labels, logits,
                                                                 from_logits=True)
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

  def train_dataset_fn(input_context):
    return pipeline.train_pipeline(
        train_split.as_dataset(),
        per_replica_batch_size=input_context.get_per_replica_batch_size(
            config.global_batch_size),
        seed=config.seed, start_step=start_step, deterministic=config.deterministic,
        input_context=input_context)

  train_iterator = iter(strategy.distribute_datasets_from_function(train_dataset_fn))
  evaluate = _make_evaluator(strategy, model, test_split, config, schedule.eval_steps)
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

  def save(step: int):
    check_finite(step)
    state.step.assign(step)
    state.wall_seconds.assign(previous_wall + time.time() - wall_start)
    manager.save(checkpoint_number=step)

  # Epochs after the restored checkpoint were lost with the crash: forget them.
  history = [h for h in checkpoints.read_history(out_dir) if h["step"] <= start_step]
  best_accuracy = max((h["test_accuracy"] for h in history), default=-1.0)
  profile = config.profile_steps
  step = start_step
  first_call = True
  interval_start, interval_step = time.time(), step
  epoch_sums = [0.0, 0.0, 0.0]  # loss sum, correct, count since the epoch began
  logging.info("training %s for %d epochs (%d steps) from step %d", model.name,
               config.epochs, schedule.total_steps, start_step)
  while step < schedule.total_steps:
    epoch_end = (step // schedule.steps_per_epoch + 1) * schedule.steps_per_epoch
    boundaries = [epoch_end, step + config.steps_per_execution,
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
      remaining = (schedule.total_steps - step) * config.global_batch_size
      eta = remaining / images_per_second if images_per_second > 0 else float("nan")
      logging.info("epoch %.2f/%d step %d/%d loss %.4f accuracy %.4f lr %.4g "
                   "%.1f images/s eta %s", epoch, config.epochs, step, schedule.total_steps,
                   loss, accuracy, learning_rate, images_per_second, _duration(eta))
      interval_start, interval_step = time.time(), step
    if step == epoch_end:
      logging.info("evaluating on %d test batches", schedule.eval_steps)
      test_loss, test_accuracy = evaluate()
      train_count = max(epoch_sums[2], 1.0)
      record = {"epoch": round(epoch), "step": step,
                "train_loss": epoch_sums[0] / train_count,
                "train_accuracy": epoch_sums[1] / train_count,
                "test_loss": test_loss, "test_accuracy": test_accuracy}
      epoch_sums = [0.0, 0.0, 0.0]
      history.append(record)
      with train_writer.as_default(step=step):
        tf.summary.scalar("epoch_loss", record["train_loss"])
        tf.summary.scalar("epoch_accuracy", record["train_accuracy"])
      with eval_writer.as_default(step=step):
        for tag in ("loss", "epoch_loss"):
          tf.summary.scalar(tag, test_loss)
        for tag in ("accuracy", "epoch_accuracy"):
          tf.summary.scalar(tag, test_accuracy)
      logging.info("epoch %d/%d train loss %.4f accuracy %.4f, validation loss %.4f "
                   "accuracy %.4f", record["epoch"], config.epochs, record["train_loss"],
                   record["train_accuracy"], test_loss, test_accuracy)
      if chief:
        checkpoints.write_json_atomically(os.path.join(out_dir, checkpoints.HISTORY_FILE),
                                          {"history": history})
      save(step)
      if test_accuracy > best_accuracy:
        best_accuracy = test_accuracy
        best_manager.save(checkpoint_number=step)
      interval_start = time.time()
    elif step % config.checkpoint_every_steps == 0:
      save(step)
  check_finite(step)
  if history and history[-1]["step"] == step:
    test_loss, test_accuracy = history[-1]["test_loss"], history[-1]["test_accuracy"]
  else:
    # Resumed a finished run, or trained no whole epoch: evaluate what we hold.
    test_loss, test_accuracy = evaluate()
  train_writer.flush()
  eval_writer.flush()

  images, seconds = float(state.timed_images.numpy()), float(state.timed_seconds.numpy())
  metrics = {
      "test_accuracy": test_accuracy,
      "test_loss": test_loss,
      "best_test_accuracy": max([h["test_accuracy"] for h in history] + [test_accuracy]),
      "epochs": step // schedule.steps_per_epoch,
      "steps": step,
      "global_batch_size": config.global_batch_size,
      "wall_seconds": previous_wall + time.time() - wall_start,
      "images_per_second": images / seconds if seconds else None,
      "resumed_from_step": start_step,
      "replicas": replicas,
      "precision": precision,
      "jit_compile": jit_compile,
      "model": model.name,
      "trainable_parameters": int(sum(v.numpy().size for v in model.trainable_variables)),
      "history": history,
  }
  if chief:
    checkpoints.write_json_atomically(os.path.join(out_dir, METRICS_FILE), metrics)
  else:
    shutil.rmtree(out_dir, ignore_errors=True)
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
  train_split, test_split = sources.load_splits(config.data_source, config.data_dir,
                                                config.seed)
  schedule = make_schedule(config, train_split.num_examples, test_split.num_examples)
  _check_batch(config, strategy)
  precision = distribute.resolve_precision(config.precision, strategy)
  state = build_state(config, strategy, len(test_split.class_names), schedule, precision)
  try:
    state.checkpoint.restore(path).expect_partial().assert_existing_objects_matched()
  except (tf.errors.OpError, AssertionError, ValueError) as e:
    raise checkpoints.CheckpointError(
        f"cannot restore {path} into {state.model.name} ({type(e).__name__}); was it "
        "trained with other --depth/--plain/--stem/--shortcut/--stage_* settings?") from None
  evaluate = _make_evaluator(strategy, state.model, test_split, config, schedule.eval_steps)
  loss, accuracy = evaluate()
  metrics = {"checkpoint": path, "step": int(state.step.numpy()), "test_loss": loss,
             "test_accuracy": accuracy, "model": state.model.name,
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
