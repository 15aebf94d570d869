"""Precision policy, XLA and steps per execution for the strategy's devices (resolving
"auto"), and the check that a half precision's convolutions run on this CPU."""

import tensorflow as tf

from trainer.distribute.messages import _first_line
from trainer.errors import DistributionError


def _device_type(strategy: tf.distribute.Strategy) -> str:
  """GPU, TPU or CPU: the accelerator the strategy's replicas run on."""
  if isinstance(strategy, tf.distribute.TPUStrategy):
    return "TPU"
  try:
    devices = strategy.extended.worker_devices
  except RuntimeError:  # The default strategy places ops where TensorFlow would.
    return "GPU" if tf.config.list_logical_devices("GPU") else "CPU"
  upper = [d.upper() for d in devices]
  return ("TPU" if any(":TPU:" in d for d in upper) else
          "GPU" if any(":GPU:" in d for d in upper) else "CPU")


def resolve_precision(precision: str, strategy: tf.distribute.Strategy) -> str:
  """Resolves "auto" for the strategy's devices; explicit values are returned unchanged.

  Args:
    precision: auto, float32, mixed_float16 or mixed_bfloat16.
    strategy: where the model runs.
  Returns:
    mixed_bfloat16 on TPUs and on GPUs of compute capability 8.0+, mixed_float16 on 7.x,
    float32 on older GPUs and on CPUs: on CPUs with AVX512_BF16, mixed_bfloat16 measured
    1.57x float32 for ResNet-20 on an AMD EPYC but 0.55x for ResNet-50 (imagenet stem)
    on an Intel Xeon (BENCHMARKS.md, "mixed_bfloat16 on this CPU"), so it is the
    user's choice there.
  """
  if precision != "auto":
    return precision
  device_type = _device_type(strategy)
  if device_type == "TPU":
    return "mixed_bfloat16"
  if device_type == "CPU":
    return "float32"
  # The slowest GPU decides: a policy its hardware lacks would run emulated.
  majors = [tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0))[0]
            for gpu in tf.config.list_physical_devices("GPU")]
  major = min(majors, default=0)
  return "mixed_bfloat16" if major >= 8 else "mixed_float16" if major >= 7 else "float32"


def check_precision_runs(precision: str, strategy: tf.distribute.Strategy) -> None:
  """Refuses a half-precision policy whose convolutions this CPU cannot run.

  TensorFlow registers half-precision kernels for every x86 CPU, but oneDNN does not
  create them on every CPU: under ONEDNN_MAX_CPU_ISA=AVX2 the first training step ended in
  "could not create a primitive descriptor" for bfloat16 on an AVX-512 AMD EPYC and for
  bfloat16 and float16 on a Xeon with AVX512_FP16 (2026-12-05), while an AVX2-only AMD
  EPYC (2026-12-03) ran bfloat16 and another Xeon float16. One tiny convolution and its
  gradients, run once here, tell before the run directory is touched (with XLA too: the
  evaluation step is not compiled). GPUs and TPUs have their own kernels.

  Raises:
    DistributionError: naming the policy and what to pass instead.
  """
  if precision == "float32" or _device_type(strategy) != "CPU":
    return
  dtype = tf.bfloat16 if precision == "mixed_bfloat16" else tf.float16
  with tf.init_scope(), tf.device("/CPU:0"):
    images, kernel = tf.ones([1, 4, 4, 2], dtype), tf.ones([3, 3, 2, 2], dtype)
    try:
      with tf.GradientTape() as tape:
        tape.watch([images, kernel])
        output = tf.nn.conv2d(images, kernel, 1, "SAME")
      tape.gradient(output, [images, kernel])
    except tf.errors.OpError as error:
      raise DistributionError(
          f"--precision={precision} cannot run on this CPU: a {dtype.name} convolution "
          f"fails ({_kernel_message(error)}); TensorFlow's oneDNN {dtype.name} kernels "
          "need AVX-512 on many CPUs. Pass --precision=float32, the fastest on CPUs "
          "anyway") from None


def _kernel_message(error: tf.errors.OpError) -> str:
  """The reason inside a kernel's error, without TensorFlow's node and file decoration."""
  text = _first_line(error)
  reason = text.split("message: ", 1)[-1]
  return reason.split(". ", 1)[0].split(", in file ", 1)[0].rstrip(".")


def resolve_jit_compile(jit_compile: str, strategy: tf.distribute.Strategy) -> bool:
  """Resolves "auto": XLA on GPUs and TPUs, off on CPU (oneDNN is about 3x faster there).

  Unlike Keras's own "auto", this stays on under any strategy: the trainer compiles the
  per-replica step itself, which works under MirroredStrategy where Keras's doesn't.

  Args:
    jit_compile: auto, true or false.
    strategy: where the model runs.
  Returns:
    whether the per-replica step is compiled with XLA.
  """
  if jit_compile != "auto":
    return jit_compile == "true"
  return _device_type(strategy) in ("GPU", "TPU")


# Steps per call into TensorFlow on accelerators: a ResNet-20 step takes a few ms on a
# modern GPU, comparable to the host's per-call overhead, so one call runs many steps.
# Calls still end at every log, checkpoint and epoch boundary.
ACCELERATOR_STEPS_PER_EXECUTION = 100


def resolve_steps_per_execution(steps_per_execution: int | None,
                                strategy: tf.distribute.Strategy) -> int:
  """Resolves None ("auto"): many steps per call on GPUs and TPUs, one on CPU.

  On CPU a step takes long enough (0.1-10 s) that the per-call overhead is noise, and one
  step per call keeps Ctrl-C and progress responsive.

  Args:
    steps_per_execution: the flag's value, None for auto.
    strategy: where the model runs.
  Returns:
    the number of training steps each call into TensorFlow runs at most.
  """
  if steps_per_execution is not None:
    return steps_per_execution
  if _device_type(strategy) in ("GPU", "TPU"):
    return ACCELERATOR_STEPS_PER_EXECUTION
  return 1
