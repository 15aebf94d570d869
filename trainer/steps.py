"""The step functions: one training step per replica (loss, L2, one all-reduce of the
gradients, per-stage gradient norms, NaN guard, update, moving average), and the
multi-step training call."""

import keras
import tensorflow as tf

from trainer import gradients, metrics, summaries
from trainer.config import Config
from trainer.state import State, averaged_variables, decayed_variables


class TrainSteps:
  """Runs training steps under a strategy; accumulates their metrics on the devices.

  Build it in no particular scope: it opens the strategy's scope for its accumulators.
  `run(iterator, first_step, num_steps)` trains num_steps steps, numbered from
  first_step + 1, in one call into TensorFlow. With `record_steps` (at least the steps of
  any call), batches carry their example ids (pipeline.train_pipeline's `with_ids`) and
  `recorded_ids` returns, after a call, which examples each of its global batches held.

  Every replica computes what one device would: the gradients are summed over the global
  batch once, before anything looks at them, so clipping, the loss-scale decision, the
  gradient norms and the NaN guard see the global gradient and decide alike on every
  replica and worker (docs/distribution.md).
  """

  def __init__(self, config: Config, strategy: tf.distribute.Strategy, state: State,
               num_classes: int, jit_compile: bool, record_steps: int = 0):
    self.config, self.strategy, self.state = config, strategy, state
    self.record_steps = record_steps
    self.num_classes = num_classes
    self.decayed = decayed_variables(state.model)
    self.averaged = averaged_variables(state.model)
    self.stage_groups = summaries.group_by_stage(state.model.trainable_variables)
    with strategy.scope():
      self.sums = metrics.Sums(objective=True)
      # Every replica holds the same value (all are computed from summed quantities).
      self.first_bad_step = metrics.on_read_variable(
          tf.int64, tf.VariableAggregation.ONLY_FIRST_REPLICA)
      self.grad_norms = {
          name: metrics.on_read_variable(aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
          for name in self.stage_groups}
      if record_steps:
        # Row (step - 1) % record_steps holds this replica's ids of that step.
        self.recorded = metrics.on_read_variable(
            tf.int32, tf.VariableAggregation.ONLY_FIRST_REPLICA,
            (record_steps, config.global_batch_size // strategy.num_replicas_in_sync))
    # XLA per replica: compiling the function around strategy.run (what Keras does with
    # jit_compile=True) fails under MirroredStrategy (see BENCHMARKS.md, GPU notes).
    self._gradients = (tf.function(self._compute_gradients, jit_compile=True)
                       if jit_compile else self._compute_gradients)
    self.run = tf.function(self._train_loop)

  def _compute_gradients(self, images, labels):
    """This replica's share: gradients of its part of the objective (scaled for mixed
    float16), the objective per example, the plain cross-entropy per example, logits."""
    model, config = self.state.model, self.config
    with tf.GradientTape() as tape:
      logits = model(images, training=True)
      one_hot = tf.one_hot(labels, self.num_classes)
      cross_entropy = keras.losses.categorical_crossentropy(one_hot, logits, from_logits=True)
      objective = (keras.losses.categorical_crossentropy(
          one_hot, logits, from_logits=True, label_smoothing=config.label_smoothing)
                   if config.label_smoothing else cross_entropy)
      if config.weight_decay:
        with tf.name_scope("weight_decay"):  # Scopes name the step's parts in a profile.
          l2 = tf.add_n([tf.reduce_sum(tf.square(v)) for v in self.decayed])
          # The same term on every example: its global mean is then the one-device term.
          objective += 0.5 * config.weight_decay * l2
      # Each replica's share of the global-batch mean; the all-reduce sums the shares.
      loss = tf.reduce_sum(objective) / config.global_batch_size
      scaled_loss = self.state.optimizer.scale_loss(loss)
    return (tape.gradient(scaled_loss, model.trainable_variables), objective,
            cross_entropy, logits, loss)

  def _replica_step(self, step, images, labels, ids=None):
    optimizer, model = self.state.optimizer, self.state.model
    grads, objective, cross_entropy, logits, loss = self._gradients(images, labels)
    grads, global_loss = gradients.sum_over_replicas(grads, loss)
    with tf.name_scope("gradient_norms"):  # Per stage: the vanishing-gradient picture.
      unscale = tf.cast(optimizer.scale_loss(1.0), tf.float32)
      for name, indices in self.stage_groups.items():
        self.grad_norms[name].assign(
            tf.linalg.global_norm([tf.cast(grads[i], tf.float32) for i in indices]) / unscale)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    self._update_average()
    with tf.name_scope("metrics"):
      self.sums.add(cross_entropy, logits, labels, objective=objective)
      bad = tf.logical_and(tf.equal(self.first_bad_step, 0),
                           tf.logical_not(tf.math.is_finite(global_loss)))
      self.first_bad_step.assign(tf.where(bad, step, self.first_bad_step))
    if ids is not None:
      row = tf.cast((step - 1) % self.record_steps, tf.int32)
      # (ON_READ variables take no scatter_update.)
      self.recorded.assign(tf.tensor_scatter_nd_update(self.recorded, [[row]], [ids]))

  def _update_average(self):
    """The moving average, on each replica from its own copies: the weights are the same
    everywhere; batch-norm statistics are per replica, and their averages are averaged
    across replicas with them (train.py), which by linearity is the average of the
    synchronised statistics."""
    decay = self.config.ema_decay
    for average, variable in zip(self.state.ema, self.averaged):
      average.assign(decay * average + (1 - decay) * tf.cast(variable, average.dtype))

  def _train_loop(self, iterator, first_step, num_steps):
    for i in tf.range(num_steps):
      self.strategy.run(self._replica_step, args=(first_step + i + 1, *next(iterator)))

  def recorded_ids(self, first_step: int, last_step: int) -> dict[int, list[int]]:
    """The global batch of each step first_step + 1 .. last_step of the last call, as
    example ids in the plan's order (replica 0's share first); on every worker."""
    rows = self._gather_recorded().numpy().reshape(
        self.strategy.num_replicas_in_sync, self.record_steps, -1)
    return {step: rows[:, (step - 1) % self.record_steps].ravel().tolist()
            for step in range(first_step + 1, last_step + 1)}

  @tf.function
  def _gather_recorded(self):
    local = self.strategy.run(lambda: tf.identity(self.recorded))
    return self.strategy.gather(local, axis=0)

  def first_non_finite_step(self) -> int:
    """The first step whose loss was NaN or Inf (0: none so far)."""
    return int(self.first_bad_step.numpy())

  def gradient_norms(self) -> dict[str, float]:
    """The global gradient's norm per stage (summed over replicas, unscaled) at the last
    step: what one device would see."""
    return {name: float(norm.numpy()) for name, norm in self.grad_norms.items()}
