"""The step's one gradient sum, in one place: `sum_over_replicas` sums each replica's
gradients (and loss) over the global batch, once, before anything looks at them, and
`SGD` is the optimizer that applies gradients so summed without summing them again.

Keras's TensorFlow optimizer sums the replicas' gradients itself, inside `apply`: after
clipping, and after LossScaleOptimizer has checked them for overflow, both on each
replica's own share, so 2 replicas clipped what one device would not and a replica's
overflow went unseen by the others. Summing first and not again keeps one all-reduce per
step and makes every decision (clipping, the loss-scale decision, the gradient norms, the
NaN guard) on the global gradient, alike on every replica and worker.
"""

import keras
import tensorflow as tf


def sum_over_replicas(grads: list, loss: tf.Tensor) -> tuple[list, tf.Tensor]:
  """The step's one all-reduce, in a replica context: the gradients and the loss summed
  over the global batch."""
  *summed, global_loss = tf.distribute.get_replica_context().all_reduce(
      tf.distribute.ReduceOp.SUM, [*grads, tf.cast(loss, grads[0].dtype)])
  return summed, global_loss


class SGD(keras.optimizers.SGD):
  """Keras's SGD, given gradients already summed over the replicas (sum_over_replicas)."""

  def _all_reduce_sum_gradients(self, grads_and_vars):
    return list(grads_and_vars)
