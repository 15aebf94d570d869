"""The step functions: one training step per replica (loss, L2, gradients, per-stage
gradient norms, NaN guard), the multi-step training call, and one evaluation step."""

import keras
import tensorflow as tf

from trainer import metrics, summaries
from trainer.config import Config
from trainer.state import State, averaged_variables, decayed_variables


class TrainSteps:
  """Runs training steps under a strategy; accumulates their metrics on the devices.

  Build it in no particular scope: it opens the strategy's scope for its accumulators.
  `run(iterator, first_step, num_steps)` trains num_steps steps, numbered from
  first_step + 1, in one call into TensorFlow.
  """

  def __init__(self, config: Config, strategy: tf.distribute.Strategy, state: State,
               num_classes: int, jit_compile: bool):
    self.config, self.strategy, self.state = config, strategy, state
    self.num_classes = num_classes
    self.decayed = decayed_variables(state.model)
    self.averaged = averaged_variables(state.model)
    self.stage_groups = summaries.group_by_stage(state.model.trainable_variables)
    with strategy.scope():
      self.sums = metrics.Sums()
      # Replica 0's view is enough: a non-finite loss reaches every replica within a step.
      self.first_bad_step = metrics.on_read_variable(
          tf.int64, tf.VariableAggregation.ONLY_FIRST_REPLICA)
      self.grad_norms = {
          name: metrics.on_read_variable(aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
          for name in self.stage_groups}
    # XLA per replica: compiling the function around strategy.run (what Keras does with
    # jit_compile=True) fails under MirroredStrategy (see BENCHMARKS.md, GPU notes).
    self._gradients = (tf.function(self._compute_gradients, jit_compile=True)
                       if jit_compile else self._compute_gradients)
    self.run = tf.function(self._train_loop)

  def _compute_gradients(self, images, labels):
    model, config = self.state.model, self.config
    with tf.GradientTape() as tape:
      logits = model(images, training=True)
      per_example = keras.losses.categorical_crossentropy(
          tf.one_hot(labels, self.num_classes), logits, from_logits=True,
          label_smoothing=config.label_smoothing)
      # Each replica's share of the global-batch mean; the optimizer sums the replicas.
      loss = tf.reduce_sum(per_example) / config.global_batch_size
      if config.weight_decay:
        with tf.name_scope("weight_decay"):  # Scopes name the step's parts in a profile.
          l2 = tf.add_n([tf.reduce_sum(tf.square(v)) for v in self.decayed])
          loss += 0.5 * config.weight_decay * l2 / self.strategy.num_replicas_in_sync
      scaled_loss = self.state.optimizer.scale_loss(loss)
    return tape.gradient(scaled_loss, model.trainable_variables), per_example, logits

  def _replica_step(self, step, images, labels):
    optimizer, model = self.state.optimizer, self.state.model
    grads, per_example, logits = self._gradients(images, labels)
    # Norms of this replica's gradients per stage: the vanishing-gradient picture.
    with tf.name_scope("gradient_norms"):
      unscale = tf.cast(optimizer.scale_loss(1.0), tf.float32)
      for name, indices in self.stage_groups.items():
        self.grad_norms[name].assign(
            tf.linalg.global_norm([tf.cast(grads[i], tf.float32) for i in indices]) / unscale)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    with tf.name_scope("metrics"):
      self.sums.add(per_example, logits, labels)
      bad = tf.logical_and(tf.equal(self.first_bad_step, 0),
                           tf.logical_not(tf.reduce_all(tf.math.is_finite(per_example))))
      self.first_bad_step.assign(tf.where(bad, step, self.first_bad_step))

  def _train_loop(self, iterator, first_step, num_steps):
    decay = self.config.ema_decay
    for i in tf.range(num_steps):
      self.strategy.run(self._replica_step, args=(first_step + i + 1, *next(iterator)))
      if self.state.ema:
        # Cross-replica context: the average is updated once, from synchronised weights.
        for average, variable in zip(self.state.ema, self.averaged):
          average.assign(decay * average + (1 - decay) * variable)

  def first_non_finite_step(self) -> int:
    """The first step whose loss was NaN or Inf (0: none so far)."""
    return int(self.first_bad_step.numpy())

  def gradient_norms(self) -> dict[str, float]:
    """Replica 0's gradient norm per stage, at the last step."""
    return {name: float(norm.numpy()) for name, norm in self.grad_norms.items()}
