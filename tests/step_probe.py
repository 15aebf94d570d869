"""The training step under a strategy, outside the trainer's loop, in a process of its own
(tests/test_replica_equivalence.py runs it): `python tests/step_probe.py TASK KIND`.

TASK overflow: mixed_float16, replica 1's gradients Inf at the second of 3 steps; prints
each replica's loss scale and weights digest after every step. TASK count: traces one
step and prints the all-reduces in it. KIND mirrored: 2 logical CPUs in this process;
worker: this process is one task of TF_CONFIG's cluster (one replica each).
"""
import hashlib
import json
import sys

import numpy as np
from trainer import main  # noqa: F401  First: it quiets TensorFlow's C++ start-up.
import tensorflow as tf
from trainer import config as config_lib, distribute, schedule, state as state_lib, steps

task, kind = sys.argv[1], sys.argv[2]
if kind == "mirrored":
  distribute.configure_cpu_devices(2)
  # Collectives, as on GPUs and across workers, for the count (no public constructor).
  from tensorflow.python.distribute import cross_device_ops as cross_device_ops_lib
  devices = [d.name for d in tf.config.list_logical_devices("CPU")]
  ops = (cross_device_ops_lib.CollectiveAllReduce(
      devices, 2, tf.distribute.experimental.CommunicationOptions())
         if task == "count" else tf.distribute.ReductionToOneDevice())
  strategy = tf.distribute.MirroredStrategy(cross_device_ops=ops)
else:
  strategy = distribute.make_strategy("multi_worker", peer_timeout_seconds=60)
precision = "mixed_float16" if task == "overflow" else "float32"
config = config_lib.Config(depth=8, data_source="synthetic", global_batch_size=8,
                           precision=precision, jit_compile="false", learning_rate=0.1,
                           lr_schedule="constant", warmup_epochs=0, ema_decay=0.5)
plan = schedule.make_plan(config, replicas=strategy.num_replicas_in_sync, num_train=64,
                          num_eval=8)
state = state_lib.build_state(config, strategy, 10, plan, precision)
INITIAL_SCALE = 2.0**15


class OverflowOnReplica1(steps.TrainSteps):
  """Replica 1's gradients become Inf at the second step (while the scale is the first)."""

  def _compute_gradients(self, images, labels):
    grads, *rest = super()._compute_gradients(images, labels)
    optimizer = self.state.optimizer
    poison = tf.logical_and(
        tf.equal(tf.distribute.get_replica_context().replica_id_in_sync_group, 1),
        tf.logical_and(tf.equal(optimizer.iterations, 1),
                       tf.equal(optimizer.dynamic_scale, INITIAL_SCALE)))
    return ([tf.where(poison, tf.fill(tf.shape(g), np.inf), g) for g in grads], *rest)


def local(variable):
  return [v.numpy() for v in strategy.experimental_local_results(getattr(variable, "value",
                                                                          variable))]


def dataset(context):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (64, 32, 32, 3), np.uint8)
  labels = rng.integers(0, 10, 64).astype(np.int32)
  return (tf.data.Dataset.from_tensor_slices((images, labels))
          .shard(context.num_input_pipelines, context.input_pipeline_id)
          .batch(context.get_per_replica_batch_size(8), drop_remainder=True).repeat())


iterator = iter(strategy.distribute_datasets_from_function(dataset))
if task == "overflow":
  train_steps = OverflowOnReplica1(config, strategy, state, 10, False)
  for step in range(3):
    train_steps.run(iterator, tf.constant(step, tf.int64), tf.constant(1, tf.int64))
    weights = [np.concatenate([w.ravel() for w in replica]) for replica in zip(
        *(local(v) for v in state.model.trainable_variables))]
    print("RESULT", json.dumps({
        "step": step + 1, "scale": [float(s) for s in local(state.optimizer.dynamic_scale)],
        "iterations": int(state.optimizer.iterations.numpy()),
        "finite": [bool(np.isfinite(w).all()) for w in weights],
        "weights": [hashlib.sha256(w.tobytes()).hexdigest() for w in weights]}),
          flush=True)
else:
  train_steps = steps.TrainSteps(config, strategy, state, 10, False)
  graph = train_steps.run.get_concrete_function(
      iterator, tf.constant(0, tf.int64), tf.constant(1, tf.int64)).graph
  reduced = []
  pending = [graph]
  while pending:
    current = pending.pop()
    for op in current.get_operations():
      if op.type.startswith("Collective"):
        reduced.append((op.type, op.device, int(np.prod(op.inputs[0].shape))))
      for attr in ("body", "cond", "then_branch", "else_branch", "f"):
        try:
          name = op.get_attr(attr).name
        except (ValueError, AttributeError):
          continue
        pending.append(current._get_function(name).graph)
  params = sum(int(np.prod(v.shape)) for v in state.model.trainable_variables)
  print("RESULT", json.dumps({"params": params, "reduced": reduced}), flush=True)
