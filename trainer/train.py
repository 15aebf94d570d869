"""The training loop: model and optimizer inside the strategy's scope, per-epoch evaluation,
TensorBoard summaries, checkpoints, resume, and metrics.json at the end.
"""

import dataclasses
import json
import os
import shutil
import tempfile
import time

from absl import logging
import keras
import tensorflow as tf

from input_pipeline import pipeline, sources
from trainer import distribute, resnet
from trainer.config import Config, ConfigError

CHECKPOINT_SUBDIR = "checkpoints"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.json"


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


def _sum_variable(dtype=tf.float32) -> tf.Variable:
  # Summed over replicas only when read: no cross-replica traffic on every step.
  return tf.Variable(tf.zeros((), dtype), trainable=False,
                     synchronization=tf.VariableSynchronization.ON_READ,
                     aggregation=tf.VariableAggregation.SUM)


class _Sums:
  """Loss, correct predictions and example counts, accumulated on the device."""

  def __init__(self):
    self.loss, self.correct, self.count = _sum_variable(), _sum_variable(), _sum_variable()

  def add(self, per_example_loss, logits, labels, weights=None):
    if weights is None:
      weights = tf.ones_like(per_example_loss)
    hits = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32)
    self.loss.assign_add(tf.reduce_sum(per_example_loss * weights))
    self.correct.assign_add(tf.reduce_sum(hits * weights))
    self.count.assign_add(tf.reduce_sum(weights))

  def result(self) -> tuple[float, float, float]:
    count = float(self.count.numpy())
    loss, correct = float(self.loss.numpy()), float(self.correct.numpy())
    return loss / max(count, 1.0), correct / max(count, 1.0), count

  def reset(self):
    for v in (self.loss, self.correct, self.count):
      v.assign(tf.zeros_like(v))


def _check_writable(model_dir: str) -> None:
  try:
    os.makedirs(model_dir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=model_dir):
      pass
  except OSError as e:
    raise ConfigError(f"--model_dir={model_dir} is not writable: {e}") from None


def _write_json_atomically(path: str, payload: dict) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def _read_history(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)["history"]


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
  """
  wall_start = time.time()
  arch = config.architecture()
  train_split, test_split = sources.load_splits(config.data_source, config.data_dir,
                                                config.seed)
  schedule = make_schedule(config, train_split.num_examples, test_split.num_examples)
  replicas = strategy.num_replicas_in_sync
  if config.global_batch_size % replicas:
    raise ConfigError(f"--global_batch_size={config.global_batch_size} does not divide "
                      f"evenly over {replicas} replicas")
  per_replica_batch_size = config.global_batch_size // replicas
  precision = distribute.resolve_precision(config.precision, strategy)
  jit_compile = distribute.resolve_jit_compile(config.jit_compile, strategy)
  chief = distribute.is_chief(strategy)
  # Workers other than the chief write to a scratch dir that they remove at the end.
  out_dir = config.model_dir if chief else tempfile.mkdtemp(prefix="resnet-cifar-worker-")
  _check_writable(out_dir)
  if chief:
    _write_json_atomically(os.path.join(out_dir, CONFIG_FILE), dataclasses.asdict(config))
  logging.info("strategy %s, %d replica(s), precision %s, XLA %s, global batch %d "
               "(%d per replica), learning rate %.4g (%.4g x %d/%d), %d steps per epoch",
               type(strategy).__name__, replicas, precision, "on" if jit_compile else "off",
               config.global_batch_size, per_replica_batch_size, config.scaled_learning_rate,
               config.learning_rate, config.global_batch_size, 128, schedule.steps_per_epoch)

  keras.mixed_precision.set_global_policy(precision)
  with strategy.scope():
    model = resnet.build_model(
        arch, num_classes=len(train_split.class_names),
        input_mean=pipeline.CIFAR10_MEAN, input_std=pipeline.CIFAR10_STD,
        bn_momentum=config.bn_momentum, zero_init_residual=config.zero_init_residual,
        sync_batch_norm=config.sync_batch_norm)
    optimizer = keras.optimizers.SGD(make_learning_rate(config, schedule),
                                     momentum=config.momentum, nesterov=config.momentum > 0)
    if precision == "mixed_float16":
      optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    train_sums, eval_sums = _Sums(), _Sums()
    step_var = tf.Variable(0, dtype=tf.int64, trainable=False)
    timed_images = tf.Variable(0.0, dtype=tf.float64, trainable=False)
    timed_seconds = tf.Variable(0.0, dtype=tf.float64, trainable=False)
    wall_seconds = tf.Variable(0.0, dtype=tf.float64, trainable=False)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step_var,
                                     timed_images=timed_images, timed_seconds=timed_seconds,
                                     wall_seconds=wall_seconds)
  manager = tf.train.CheckpointManager(checkpoint, os.path.join(out_dir, CHECKPOINT_SUBDIR),
                                       max_to_keep=config.keep_checkpoints)
  if manager.latest_checkpoint:
    checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    logging.info("resumed from %s at step %d", manager.latest_checkpoint, int(step_var.numpy()))
  start_step = int(step_var.numpy())
  previous_wall = float(wall_seconds.numpy())

  decayed = [v for v in model.trainable_variables if v.path.endswith("kernel")]

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

  def train_replica_step(images, labels):
    grads, per_example, logits = compute_gradients(images, labels)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    train_sums.add(per_example, logits, labels)

  def eval_replica_step(images, labels, weights):
    logits = model(images, training=False)
    per_example = keras.losses.sparse_categorical_crossentropy(labels, logits,
                                                               from_logits=True)
    eval_sums.add(per_example, logits, labels, weights)

  @tf.function
  def train_loop(iterator, num_steps):
    for _ in tf.range(num_steps):
      strategy.run(train_replica_step, args=next(iterator))

  @tf.function
  def eval_loop(iterator, num_steps):
    for _ in tf.range(num_steps):
      strategy.run(eval_replica_step, args=next(iterator))

  def train_dataset_fn(input_context):
    return pipeline.train_pipeline(
        train_split.as_dataset(),
        per_replica_batch_size=input_context.get_per_replica_batch_size(
            config.global_batch_size),
        seed=config.seed, start_step=start_step, deterministic=config.deterministic,
        input_context=input_context)

  def eval_dataset_fn(input_context):
    return pipeline.eval_pipeline(
        test_split.as_dataset(),
        per_replica_batch_size=input_context.get_per_replica_batch_size(
            config.global_batch_size),
        num_examples=test_split.num_examples, input_context=input_context)

  train_iterator = iter(strategy.distribute_datasets_from_function(train_dataset_fn))
  eval_dataset = strategy.distribute_datasets_from_function(eval_dataset_fn)
  if chief:
    train_writer = tf.summary.create_file_writer(os.path.join(out_dir, "train"))
    eval_writer = tf.summary.create_file_writer(os.path.join(out_dir, "validation"))
  else:
    train_writer = eval_writer = tf.summary.create_noop_writer()

  def evaluate() -> tuple[float, float]:
    eval_sums.reset()
    eval_loop(iter(eval_dataset), tf.constant(schedule.eval_steps))
    loss, accuracy, _ = eval_sums.result()
    return loss, accuracy

  def save(step: int):
    step_var.assign(step)
    wall_seconds.assign(previous_wall + time.time() - wall_start)
    manager.save(checkpoint_number=step)

  history_path = os.path.join(out_dir, HISTORY_FILE)
  # Epochs after the restored checkpoint were lost with the crash: forget them.
  history = [h for h in _read_history(history_path) if h["step"] <= start_step]
  step = start_step
  first_call = True
  interval_start, interval_step = time.time(), step
  epoch_sums = [0.0, 0.0, 0.0]  # loss sum, correct, count since the epoch began
  logging.info("training %s for %d epochs (%d steps) from step %d", model.name,
               config.epochs, schedule.total_steps, start_step)
  while step < schedule.total_steps:
    epoch_end = (step // schedule.steps_per_epoch + 1) * schedule.steps_per_epoch
    stop = min(epoch_end, step + config.steps_per_execution,
               (step // config.log_every_steps + 1) * config.log_every_steps,
               (step // config.checkpoint_every_steps + 1) * config.checkpoint_every_steps)
    call_start = time.time()
    train_loop(train_iterator, tf.constant(stop - step))
    if first_call:
      # The first call traces and compiles; it is left out of the throughput figures.
      first_call = False
      interval_start, interval_step = time.time(), stop
    else:
      timed_images.assign_add((stop - step) * config.global_batch_size)
      timed_seconds.assign_add(time.time() - call_start)
    step = stop
    epoch = step / schedule.steps_per_epoch
    if step % config.log_every_steps == 0 or step == epoch_end:
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
        tf.summary.scalar("loss", test_loss)
        tf.summary.scalar("accuracy", test_accuracy)
        tf.summary.scalar("epoch_loss", test_loss)
        tf.summary.scalar("epoch_accuracy", test_accuracy)
      logging.info("epoch %d/%d train loss %.4f accuracy %.4f, validation loss %.4f "
                   "accuracy %.4f", record["epoch"], config.epochs, record["train_loss"],
                   record["train_accuracy"], test_loss, test_accuracy)
      if chief:
        _write_json_atomically(history_path, {"history": history})
      save(step)
      interval_start = time.time()
    elif step % config.checkpoint_every_steps == 0:
      save(step)
  if history and history[-1]["step"] == step:
    test_loss, test_accuracy = history[-1]["test_loss"], history[-1]["test_accuracy"]
  else:
    # Resumed a finished run, or trained no whole epoch: evaluate what we hold.
    test_loss, test_accuracy = evaluate()
  train_writer.flush()
  eval_writer.flush()

  images, seconds = float(timed_images.numpy()), float(timed_seconds.numpy())
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
    _write_json_atomically(os.path.join(out_dir, METRICS_FILE), metrics)
  else:
    shutil.rmtree(out_dir, ignore_errors=True)
  return metrics


def _duration(seconds: float) -> str:
  if seconds != seconds:
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
