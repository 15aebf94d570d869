"""The metrics a run reports, accumulated on the devices: add a metric here (an accumulator
in `Sums` and its entry in `Sums.result`); the loop, summaries, history.json and
metrics.json carry every key `result` returns."""

import tensorflow as tf


def on_read_variable(dtype=tf.float32,
                     aggregation=tf.VariableAggregation.SUM) -> tf.Variable:
  """A scalar accumulator, combined over replicas only when read: no cross-replica
  traffic on every step. Create it in the strategy's scope."""
  return tf.Variable(tf.zeros((), dtype), trainable=False,
                     synchronization=tf.VariableSynchronization.ON_READ,
                     aggregation=aggregation)


class Sums:
  """Loss, correct predictions and example counts, accumulated on the device."""

  def __init__(self):
    self.loss, self.correct, self.count = (on_read_variable(), on_read_variable(),
                                           on_read_variable())

  def add(self, per_example_loss: tf.Tensor, logits: tf.Tensor, labels: tf.Tensor,
          weights: tf.Tensor | None = None) -> None:
    """Adds one replica's batch (in a replica context); weights 0 mark padding."""
    if weights is None:
      weights = tf.ones_like(per_example_loss)
    hits = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32)
    self.loss.assign_add(tf.reduce_sum(per_example_loss * weights))
    self.correct.assign_add(tf.reduce_sum(hits * weights))
    self.count.assign_add(tf.reduce_sum(weights))

  def result(self) -> dict[str, float]:
    """The means over all replicas since the last reset: {"loss": ..., "accuracy": ...}."""
    count = max(self.examples(), 1.0)
    return {"loss": float(self.loss.numpy()) / count,
            "accuracy": float(self.correct.numpy()) / count}

  def examples(self) -> float:
    """Examples added since the last reset (weighted)."""
    return float(self.count.numpy())

  def reset(self) -> None:
    for v in (self.loss, self.correct, self.count):
      v.assign(tf.zeros_like(v))


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
