"""Choosing the tf.distribute strategy, precision policy and XLA setting for the devices."""

import json
import os

import tensorflow as tf


class DistributionError(Exception):
  """The requested strategy cannot run here; the message says why and what to do."""


def configure_cpu_devices(num_devices: int) -> None:
  """Splits the CPU into `num_devices` logical devices (to try mirrored runs on a CPU).

  Must run before TensorFlow initialises its devices.
  """
  if num_devices <= 1:
    return
  cpu = tf.config.list_physical_devices("CPU")[0]
  tf.config.set_logical_device_configuration(
      cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices)


def make_strategy(name: str, *, num_gpus: int | None = None, tpu: str | None = None,
                  all_reduce: str = "auto",
                  peer_timeout_seconds: int = 300) -> tf.distribute.Strategy:
  """Builds the strategy that `--strategy` names.

  Args:
    name: auto, default, one_device, mirrored, multi_worker or tpu.
    num_gpus: mirrored: how many local GPUs (None: all).
    tpu: tpu: the TPU name or address.
    all_reduce: the cross-device reduction (see trainer/main.py --all_reduce).
    peer_timeout_seconds: multi_worker: how long to wait for the peers.
  Returns:
    the strategy.
  Raises:
    DistributionError: when it cannot be built here.
  """
  gpus = tf.config.list_logical_devices("GPU")
  cpus = tf.config.list_logical_devices("CPU")
  if name == "auto":
    name = "mirrored" if len(gpus) > 1 else "one_device" if gpus else "default"
  if name == "default":
    return tf.distribute.get_strategy()
  if name == "one_device":
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else cpus[0].name)
  if name == "mirrored":
    # On a CPU-only machine, mirror over the logical CPUs (see --cpu_devices).
    return tf.distribute.MirroredStrategy([d.name for d in (gpus or cpus)])
  if name == "multi_worker":
    tf_config = os.environ.get("TF_CONFIG")
    if not tf_config:
      raise DistributionError(
          "--strategy=multi_worker needs the TF_CONFIG environment variable, e.g. "
          '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
          '"task": {"type": "worker", "index": 0}}')
    try:
      parsed = json.loads(tf_config)
      parsed["cluster"]["worker"], parsed["task"]["type"], parsed["task"]["index"]
    except (ValueError, KeyError, TypeError) as e:
      raise DistributionError(f"TF_CONFIG is malformed ({type(e).__name__}: {e}): "
                              f"{tf_config!r}") from None
    return tf.distribute.MultiWorkerMirroredStrategy()
  raise DistributionError(f"unknown strategy {name!r}")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """True for the one worker that writes checkpoints, summaries and metrics."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.task_type:
    return True
  return resolver.task_type == "chief" or (
      resolver.task_type == "worker" and resolver.task_id == 0
      and "chief" not in resolver.cluster_spec().as_dict())


def _uses_gpu(strategy: tf.distribute.Strategy) -> bool:
  try:
    devices = strategy.extended.worker_devices
  except RuntimeError:  # The default strategy places ops where TensorFlow would.
    return bool(tf.config.list_logical_devices("GPU"))
  return any("GPU" in d.upper() for d in devices)


def resolve_precision(precision: str, strategy: tf.distribute.Strategy) -> str:
  """Resolves "auto": bfloat16 on GPUs of compute capability 8+, float16 on 7.x, else float32."""
  if precision != "auto":
    return precision
  if not _uses_gpu(strategy):
    return "float32"
  details = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0])
  major = details.get("compute_capability", (0, 0))[0]
  return "mixed_bfloat16" if major >= 8 else "mixed_float16" if major >= 7 else "float32"


def resolve_jit_compile(jit_compile: str, strategy: tf.distribute.Strategy) -> bool:
  """Resolves "auto": XLA on accelerators, off on CPU (oneDNN is faster there)."""
  if jit_compile != "auto":
    return jit_compile == "true"
  return _uses_gpu(strategy)
