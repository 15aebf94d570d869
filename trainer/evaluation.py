"""Evaluation: loss and accuracy of the model on a split (and with flip test-time
augmentation, and with the moving average of the weights), and --mode=eval."""

import keras
import numpy as np
import tensorflow as tf

from input_pipeline import pipeline, sources
from trainer import data, distribute, errors, metrics, run_dir, schedule
from trainer.config import Config
from trainer.state import State, build_state, ema_weights, inference_checkpoint


class Evaluator:
  """Evaluates the state's model on one split: `evaluate() -> {metric: value}`.

  The keys are those of metrics.Sums ("loss", "accuracy"); with eval_flip also "flip_..."
  (logits averaged with those of the mirrored images); with an EMA also "ema_..." and
  "ema_flip_...", so users see what each gives. After `evaluate()`, `confusion` holds the
  confusion matrix (int64 [true, predicted]) of the model whose "accuracy" it reported:
  the plain evaluation, without flip or EMA, and `examples` the number of examples it
  evaluated (every result of one evaluation covers the same examples).
  """

  def __init__(self, strategy: tf.distribute.Strategy, state: State, split: sources.Split,
               *, per_replica_batch_size: int, full_pass_steps: int, steps: int,
               flip: bool):
    self.strategy, self.state, self.steps = strategy, state, steps
    with strategy.scope():
      self.sums = {"": metrics.Sums()}
      if flip:
        self.sums["flip_"] = metrics.Sums()
      self.counts = metrics.Confusion(len(split.class_names))
    self.confusion: np.ndarray | None = None
    self.examples: int | None = None
    self.dataset = strategy.distribute_datasets_from_function(
        lambda context: pipeline.eval_pipeline(
            split.as_dataset(), per_replica_batch_size=per_replica_batch_size,
            num_examples=split.num_examples, global_steps=full_pass_steps,
            input_context=context))
    self._loop = tf.function(self._eval_loop)

  def _replica_step(self, images, labels, weights):
    model = self.state.model
    logits = model(images, training=False)
    loss = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    self.sums[""].add(loss, logits, labels, weights)
    self.counts.add(logits, labels, weights)
    if "flip_" in self.sums:
      mirrored = model(tf.reverse(images, axis=[2]), training=False)
      averaged = (logits + mirrored) / 2
      loss = keras.losses.sparse_categorical_crossentropy(labels, averaged, from_logits=True)
      self.sums["flip_"].add(loss, averaged, labels, weights)

  def _eval_loop(self, iterator, num_steps):
    for _ in tf.range(num_steps):
      self.strategy.run(self._replica_step, args=next(iterator))

  def _run(self, prefix: str, steps: int) -> dict[str, float]:
    for accumulator in (*self.sums.values(), self.counts):
      accumulator.reset()
    self._loop(iter(self.dataset), tf.constant(steps))
    return {f"{prefix}{kind}{key}": value
            for kind, sums in self.sums.items() for key, value in sums.result().items()}

  def evaluate(self, steps: int | None = None) -> dict[str, float]:
    """One evaluation (see the class) of `steps` steps (default: the evaluator's); also
    sets `confusion` and `examples`."""
    steps = self.steps if steps is None else steps
    results = self._run("", steps)
    self.confusion = self.counts.result()
    self.examples = round(self.sums[""].examples())
    if self.state.ema:
      with ema_weights(self.state):
        results.update(self._run("ema_", steps))
    return results


def make_evaluator(strategy: tf.distribute.Strategy, state: State, split: sources.Split,
                   plan: schedule.Plan, config: Config, steps: int) -> Evaluator:
  """An Evaluator of `split` with the plan's batch, running `steps` steps per evaluation."""
  return Evaluator(strategy, state, split, per_replica_batch_size=plan.per_replica_batch_size,
                   full_pass_steps=schedule.full_pass_steps(split.num_examples,
                                                            plan.global_batch_size),
                   steps=steps, flip=config.eval_flip)


def evaluate_checkpoint(config: Config, strategy: tf.distribute.Strategy) -> dict:
  """--mode=eval: evaluates the checkpoint `config.checkpoint` names on the test split:
  all of it, unless `config.eval_steps` caps it.

  Returns:
    the metrics (what trainer/main.py prints, then writes to <model_dir>/eval.json), with
    `examples` (evaluated) and `split_examples` (the test split's).
  Raises:
    errors.RunDirError: when there is no such checkpoint, or it does not fit the model.
    errors.DistributionError: for a precision policy this CPU cannot run.
  """
  path = run_dir.resolve_checkpoint(config.model_dir, config.checkpoint or "latest")
  splits = data.load(config)
  plan = schedule.make_plan(config, replicas=strategy.num_replicas_in_sync,
                            num_train=splits.train.num_examples,
                            num_eval=splits.test.num_examples)
  # No probe (auto is float32 on a CPU): an evaluation's forward passes cost less than
  # timing both precisions would, and the inference checkpoint restores under any
  # precision, so the run's recorded one need not be followed; float32 rounds least.
  precision = distribute.resolve_precision(config.precision, strategy)
  distribute.check_precision_runs(precision, strategy)
  state = build_state(config, strategy, len(splits.class_names), plan, precision)
  path = _restore(state, config, path)
  evaluator = make_evaluator(strategy, state, splits.test, plan, config, plan.eval_steps)
  results = evaluator.evaluate()
  return {"checkpoint": path, "step": int(state.step.numpy()), "model": state.model.name,
          **{f"test_{k}": v for k, v in results.items()},
          "examples": evaluator.examples, "split_examples": splits.test.num_examples}


def _restore(state: State, config: Config, path: str, attempts: int = 5) -> str:
  """Restores `path`; for "latest" of a run still training, whose rotation may delete
  the checkpoint between finding and reading it, the newest one then. Returns the path
  restored."""
  for _ in range(attempts - 1):
    try:
      run_dir.restore_for_inference(inference_checkpoint(state), path, state.model.name)
      return path
    except errors.CheckpointError:
      if (config.checkpoint or "latest") != "latest" or tf.io.gfile.exists(f"{path}.index"):
        raise
      path = run_dir.resolve_checkpoint(config.model_dir, "latest")
  run_dir.restore_for_inference(inference_checkpoint(state), path, state.model.name)
  return path
