"""Averaging the replicas' copies of variables (batch-norm statistics) before evaluating
and saving."""

import tensorflow as tf


def make_replica_sync(strategy: tf.distribute.Strategy, variables: list):
  """Returns a function that averages the replicas' copies of `variables` (then equal).

  Keras 3 batch normalization updates its moving mean and variance in each replica on
  that replica's batch only (aggregation "none"): the copies drift apart, so replicas
  evaluate with different statistics and the chief saves its own copy, which on several
  workers differs from the others'. (tf.keras averaged them on read.) Averaging the
  copies before evaluating and saving restores that behaviour without an all-reduce per
  layer and step; for the moving means it equals tracking the mean over replicas.

  Args:
    strategy: the strategy the variables were created under.
    variables: e.g. model.non_trainable_variables; non-float ones are left alone.
  Returns:
    a function of no arguments; a no-op with one replica.
  """
  variables = [v for v in variables if tf.as_dtype(v.dtype).is_floating]
  if strategy.num_replicas_in_sync == 1 or not variables:
    return lambda: None

  def average_copies():
    context = tf.distribute.get_replica_context()
    # In a replica, reading gives this replica's copy and assigning ("none") sets only it.
    means = context.all_reduce(tf.distribute.ReduceOp.MEAN,
                               [tf.identity(v) for v in variables])
    for variable, mean in zip(variables, means):
      variable.assign(mean)

  @tf.function
  def sync():
    strategy.run(average_copies)

  return sync
