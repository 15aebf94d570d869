"""Batch normalisation through TensorFlow's fused kernel (FusedBatchNormV3): Keras's
BatchNormalization with the same variables, maths and conventions, in one op per
direction instead of Keras's separate moments and normalisation ops; and synchronized
statistics computed in two passes.
"""

import functools

import keras
import tensorflow as tf
from keras import ops
from tensorflow.python.framework import kernels

# The dtypes the fused kernel takes as its input x (statistics, scale and offset are
# always float32: the op's U).
_FUSED_DTYPES = ("float32", "float16", "bfloat16")


@keras.saving.register_keras_serializable(package="resnet_cifar")
class FusedBatchNormalization(keras.layers.BatchNormalization):
  """keras.layers.BatchNormalization, computed by TensorFlow's fused batch-norm kernel.

  Same constructor, variables (gamma, beta, moving_mean, moving_variance: float32, same
  names, so the same variable paths and checkpoints), config and conventions:
  moving = moving * momentum + batch_stat * (1 - momentum), with the biased batch
  variance, as Keras. Only `call` differs. Half-precision inputs go into the kernel as they
  are (it accumulates in float32) unless this TensorFlow has no kernel for them, then in
  float32. What the kernel cannot do (a mask, renorm, synchronized statistics, other than
  4-D channels-last inputs, float64) falls back to Keras's own `call`.

  With `synchronized=True` it trains on the global batch's statistics (summed over the
  replicas) in two passes: Keras's synchronized layer takes E[x^2] - E[x]^2, which loses
  the variance to cancellation; its gradients changed by up to 1e-3 (relative) with how
  the batch was split over replicas, and on one device differed as much from
  tf.nn.moments'. Two all-reduces per layer (Keras's layer makes three).
  """

  def call(self, inputs, training=None, mask=None):
    if (self.synchronized and training and self.trainable and mask is None
        and not self.renorm and len(inputs.shape) == 4 and self.axis in (-1, 3)):
      return self._synchronized_train(inputs)
    if not self._fusable(inputs, mask):
      return super().call(inputs, training=training, mask=mask)
    x = ops.cast(inputs, self.compute_dtype)
    if not _kernel_runs(x.dtype.name):
      x = ops.cast(x, "float32")
    channels = x.shape[-1]
    scale = (ops.cast(self.gamma, "float32") if self.scale
             else tf.ones([channels], tf.float32))
    offset = (ops.cast(self.beta, "float32") if self.center
              else tf.zeros([channels], tf.float32))
    if training and self.trainable:
      y = self._train_and_update(x, scale, offset)
    else:
      # The raw op: every attribute explicit, epsilon passed on unchanged (Python
      # wrappers of some TensorFlow versions raised it to 1.001e-5).
      y = tf.raw_ops.FusedBatchNormV3(
          x=x, scale=scale, offset=offset, mean=ops.cast(self.moving_mean, "float32"),
          variance=ops.cast(self.moving_variance, "float32"), epsilon=self.epsilon,
          data_format="NHWC", is_training=False).y
    return ops.cast(y, self.compute_dtype)

  def _fusable(self, inputs, mask) -> bool:
    """Whether the fused kernel computes what Keras's call would (to float rounding)."""
    return (mask is None and not self.renorm and not self.synchronized
            and len(inputs.shape) == 4 and self.axis in (-1, 3)
            and self.compute_dtype in _FUSED_DTYPES)

  def _synchronized_train(self, inputs):
    """Normalises with the global batch's mean and biased variance (two passes, summed
    over the replicas) and updates the moving statistics with them, as Keras does."""
    x = ops.cast(inputs, "float32")
    context = tf.distribute.get_replica_context()
    axes = [0, 1, 2]
    count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), tf.float32)[tf.newaxis]
    total = tf.reduce_sum(x, axes)
    if context is not None:  # None in a cross-replica context: x is the whole batch.
      total, count = context.all_reduce(tf.distribute.ReduceOp.SUM, [total, count])
    mean = total / count
    squares = tf.reduce_sum(tf.square(x - mean), axes)
    if context is not None:
      squares = context.all_reduce(tf.distribute.ReduceOp.SUM, squares)
    variance = squares / count
    y = (x - mean) * tf.math.rsqrt(variance + self.epsilon)
    if self.scale:
      y *= ops.cast(self.gamma, "float32")
    if self.center:
      y += ops.cast(self.beta, "float32")
    momentum = self.momentum
    for moving, batch_value in ((self.moving_mean, mean), (self.moving_variance, variance)):
      moving.assign(ops.cast(moving, "float32") * momentum
                    + tf.stop_gradient(batch_value) * (1.0 - momentum))
    return ops.cast(y, self.compute_dtype)

  def _train_and_update(self, x, scale, offset):
    """Normalises with the batch's statistics and updates the moving ones as Keras does."""
    # exponential_avg_factor=1: the kernel returns the batch's statistics, which we average
    # ourselves (its own running average would use the unbiased variance).
    out = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=scale, offset=offset, mean=tf.constant([], tf.float32),
        variance=tf.constant([], tf.float32), epsilon=self.epsilon,
        exponential_avg_factor=1.0, data_format="NHWC", is_training=True)
    # The kernel's batch_variance carries Bessel's correction n / (n - 1) (n = N*H*W,
    # the kernel using 1 for n - 1 when n = 1); Keras's moving variance takes the biased
    # variance, which also normalises the batch.
    n = tf.cast(tf.size(x, out_type=tf.int64) // x.shape[-1], tf.float32)
    variance = out.batch_variance * (tf.maximum(n - 1.0, 1.0) / tf.maximum(n, 1.0))
    momentum = self.momentum
    self.moving_mean.assign(ops.cast(self.moving_mean, "float32") * momentum
                            + out.batch_mean * (1.0 - momentum))
    self.moving_variance.assign(ops.cast(self.moving_variance, "float32") * momentum
                                + variance * (1.0 - momentum))
    return out.y


def _kernel_runs(dtype: str) -> bool:
  """Whether the fused kernels take `dtype` inputs on every device here.

  Every TensorFlow build registers float32; half types depend on the build and device,
  and a registered kernel may still refuse to run: oneDNN's bfloat16 batch norm needs
  AVX-512 on most CPUs (under ONEDNN_MAX_CPU_ISA=AVX2 an AVX-512 AMD EPYC raised "could
  not create a primitive descriptor"; an AVX2-only AMD EPYC of 2026-12-03 runs it). So a
  half type is run once, when first used; only that one, since oneDNN logs an error line
  for float16 on CPUs without AVX512-FP16 whenever a float16 kernel runs.
  """
  return dtype == "float32" or (dtype in _registered_dtypes() and _runs(dtype))


@functools.cache
def _registered_dtypes() -> frozenset[str]:
  """The input dtypes with fused forward and gradient kernels registered for every
  device type here."""
  supported = None
  for op in ("FusedBatchNormV3", "FusedBatchNormGradV3"):
    for device_type in _device_types():
      dtypes = set()
      for kernel in kernels.get_registered_kernels_for_op(op).kernel:
        if kernel.device_type == device_type:
          dtypes |= _constraint_dtypes(kernel)
      supported = dtypes if supported is None else supported & dtypes
  return frozenset(supported or ())


def _device_types() -> set[str]:
  return {device.device_type for device in tf.config.list_physical_devices()}


@functools.cache
def _runs(dtype: str) -> bool:
  """Whether a tiny fused batch norm and its gradient run in `dtype` on each device type."""
  with tf.init_scope():  # Eager, also when first asked while a tf.function traces.
    try:
      for device_type in _device_types():
        with tf.device(f"/{device_type}:0"):
          x = tf.ones([2, 1, 1, 2], dtype)
          ones, empty = tf.ones([2]), tf.constant([], tf.float32)
          out = tf.raw_ops.FusedBatchNormV3(
              x=x, scale=ones, offset=ones, mean=empty, variance=empty,
              exponential_avg_factor=1.0, data_format="NHWC", is_training=True)
          tf.raw_ops.FusedBatchNormGradV3(
              y_backprop=x, x=x, scale=ones, reserve_space_1=out.reserve_space_1,
              reserve_space_2=out.reserve_space_2, reserve_space_3=out.reserve_space_3,
              data_format="NHWC", is_training=True)
    except (tf.errors.OpError, RuntimeError, ValueError):
      return False
  return True


def _constraint_dtypes(kernel) -> set[str]:
  for constraint in kernel.constraint:
    if constraint.name == "T":
      return {tf.as_dtype(t).name for t in constraint.allowed_values.list.type}
  return set()
