"""The metrics a run reports, accumulated on the devices: add a metric here (an accumulator
in `Sums` and its entry in `Sums.result`); the loop, summaries, history.json and
metrics.json carry every key `result` returns. `Confusion` counts (true, predicted) class
pairs, from which `per_class_accuracy` and `most_confused` are read."""

import numpy as np
import tensorflow as tf


def on_read_variable(dtype=tf.float32, aggregation=tf.VariableAggregation.SUM,
                     shape: tuple[int, ...] = ()) -> tf.Variable:
  """An accumulator (a scalar unless `shape` says otherwise), combined over replicas only
  when read: no cross-replica traffic on every step. Create it in the strategy's scope."""
  return tf.Variable(tf.zeros(shape, dtype), trainable=False,
                     synchronization=tf.VariableSynchronization.ON_READ,
                     aggregation=aggregation)


class Sums:
  """Loss, correct predictions and example counts, accumulated on the device; and, for
  training (`objective=True`), the optimised objective besides the plain loss."""

  def __init__(self, objective: bool = False):
    self.loss, self.correct, self.count = (on_read_variable(), on_read_variable(),
                                           on_read_variable())
    self.objective = on_read_variable() if objective else None

  def add(self, per_example_loss: tf.Tensor, logits: tf.Tensor, labels: tf.Tensor,
          weights: tf.Tensor | None = None, objective: tf.Tensor | None = None) -> None:
    """Adds one replica's batch (in a replica context); weights 0 mark padding.

    per_example_loss is the cross-entropy without label smoothing (what evaluation
    reports); objective, per example, what the step minimises (with smoothing and L2).
    """
    if weights is None:
      weights = tf.ones_like(per_example_loss)
    hits = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32)
    self.loss.assign_add(tf.reduce_sum(per_example_loss * weights))
    self.correct.assign_add(tf.reduce_sum(hits * weights))
    self.count.assign_add(tf.reduce_sum(weights))
    if self.objective is not None:
      self.objective.assign_add(tf.reduce_sum(tf.cast(objective, tf.float32) * weights))

  def result(self) -> dict[str, float]:
    """The means over all replicas since the last reset: {"loss": ..., "accuracy": ...}
    and, for training, "objective"."""
    count = max(self.examples(), 1.0)
    result = {"loss": float(self.loss.numpy()) / count,
              "accuracy": float(self.correct.numpy()) / count}
    if self.objective is not None:
      result["objective"] = float(self.objective.numpy()) / count
    return result

  def examples(self) -> float:
    """Examples added since the last reset (weighted)."""
    return float(self.count.numpy())

  def reset(self) -> None:
    for v in (self.loss, self.correct, self.count, self.objective):
      if v is not None:
        v.assign(tf.zeros_like(v))


class Confusion:
  """The confusion matrix, accumulated on the device: counts[true class, predicted class]."""

  def __init__(self, num_classes: int):
    self.num_classes = num_classes
    self.counts = on_read_variable(shape=(num_classes, num_classes))

  def add(self, logits: tf.Tensor, labels: tf.Tensor, weights: tf.Tensor) -> None:
    """Adds one replica's batch (in a replica context); weights 0 mark padding."""
    # A product of one-hot matrices rather than tf.math.confusion_matrix: no assert or
    # scatter ops, so it runs unchanged under XLA (TPUs) and costs batch x classes^2.
    predicted = tf.one_hot(tf.argmax(logits, -1, output_type=tf.int32), self.num_classes)
    true = tf.one_hot(labels, self.num_classes) * tf.cast(weights, tf.float32)[:, None]
    self.counts.assign_add(tf.matmul(true, predicted, transpose_a=True))

  def result(self) -> np.ndarray:
    """The counts over all replicas since the last reset, int64 [true, predicted]."""
    # Float sums of 0/1 weights are exact integers up to 2**24 per cell.
    return np.rint(self.counts.numpy()).astype(np.int64)

  def reset(self) -> None:
    self.counts.assign(tf.zeros_like(self.counts))


def per_class_accuracy(confusion: np.ndarray, class_names: tuple[str, ...]
                       ) -> dict[str, float | None]:
  """{class name: share of its examples predicted as it}; None for a class that had no
  examples (a capped --eval_steps may miss one). Weighted by the classes' example counts
  (the row sums), these average to the overall accuracy."""
  counts = confusion.sum(axis=1)
  return {name: float(confusion[i, i] / counts[i]) if counts[i] else None
          for i, name in enumerate(class_names)}


def most_confused(confusion: np.ndarray, class_names: tuple[str, ...], top: int = 3
                  ) -> list[list]:
  """The `top` most frequent mistakes, [[true class, predicted class, count], ...], the
  largest first (ties in class order); mistakes that never happened are left out."""
  mistakes = confusion * (1 - np.eye(len(class_names), dtype=confusion.dtype))
  order = np.argsort(-mistakes, axis=None, kind="stable")[:top]
  pairs = [np.unravel_index(i, mistakes.shape) for i in order]
  return [[class_names[t], class_names[p], int(mistakes[t, p])] for t, p in pairs
          if mistakes[t, p] > 0]


class EpochMeans:
  """Means over an epoch of interval means, each weighted by its example count."""

  def __init__(self):
    self.sums: dict[str, float] = {}
    self.count = 0.0

  def add(self, means: dict[str, float], count: float) -> None:
    for key, value in means.items():
      self.sums[key] = self.sums.get(key, 0.0) + value * count
    self.count += count

  def result(self) -> dict[str, float]:
    count = max(self.count, 1.0)
    return {key: total / count for key, total in self.sums.items()}
