"""The strategy `--strategy` names (default, one_device, mirrored, multi_worker, tpu or
auto), the CPU split into logical devices, and which worker is the chief."""

from absl import logging
import tensorflow as tf

from trainer.distribute.cluster import multi_worker_reason, resolve_cluster
from trainer.distribute.messages import _first_line, _gpu_hint
from trainer.distribute.multi_worker import _multi_worker
from trainer.distribute.watchdog import _Deadline
from trainer.errors import DistributionError


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

  `auto` is tpu with --tpu; else multi_worker when TF_CONFIG is set or this is a task of
  a multi-task Slurm job (see multi_worker_reason); else it goes by the local GPUs.

  Args:
    name: auto, default, one_device, mirrored, multi_worker or tpu.
    num_gpus: auto/mirrored: how many local GPUs (None: all).
    tpu: the TPU name or address ("local" on a TPU VM); with name=auto it selects tpu.
    all_reduce: the cross-device reduction (see trainer/main.py --all_reduce).
    peer_timeout_seconds: multi_worker and tpu: how long to wait for the peers or the TPU
      before the process exits with a clear message (it cannot be interrupted otherwise).
  Returns:
    the strategy.
  Raises:
    DistributionError: when it cannot be built here.
  """
  if name == "auto" and not tpu:
    reason = multi_worker_reason()
    if reason:
      name = "multi_worker"
      logging.info("--strategy=auto resolved to multi_worker (%s)", reason)
  # Before TensorFlow lists the GPUs: under Slurm this chooses the task's GPUs through
  # CUDA_VISIBLE_DEVICES, which CUDA reads once, when TensorFlow first initialises it.
  cluster = resolve_cluster() if name == "multi_worker" else None
  # Physical devices: listing logical ones would initialise the runtime, after which
  # MultiWorkerMirroredStrategy can no longer configure its collective ops.
  gpus = tf.config.list_physical_devices("GPU")
  if num_gpus is not None and num_gpus > len(gpus):
    raise DistributionError(
        f"--num_gpus={num_gpus} but {len(gpus)} GPU(s) are visible here"
        f"{_gpu_hint()}; lower --num_gpus or leave it unset to use all of them")
  if name == "auto":
    usable = len(gpus) if num_gpus is None else num_gpus
    name = ("tpu" if tpu else "mirrored" if usable > 1 else "one_device" if usable
            else "default")
    logging.info("--strategy=auto resolved to %s", name)
  if cluster is not None:
    return _multi_worker(cluster, gpus, all_reduce, peer_timeout_seconds)
  if name == "tpu":
    return _tpu(tpu, peer_timeout_seconds)
  gpus = tf.config.list_logical_devices("GPU")
  cpus = tf.config.list_logical_devices("CPU")
  if name == "default":
    return tf.distribute.get_strategy()
  if name == "one_device":
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else cpus[0].name)
  if name == "mirrored":
    return _mirrored(gpus, cpus, num_gpus, all_reduce)
  raise DistributionError(f"unknown strategy {name!r}")


def _mirrored(gpus: list, cpus: list, num_gpus: int | None,
              all_reduce: str) -> tf.distribute.MirroredStrategy:
  """MirroredStrategy over the local GPUs, or over the logical CPUs on a CPU-only machine."""
  devices = [d.name for d in gpus[:num_gpus]] if gpus else [d.name for d in cpus]
  if not gpus and len(devices) == 1:
    logging.warning("--strategy=mirrored on one CPU device gives one replica; "
                    "--cpu_devices=N splits the CPU into N replicas")
  if all_reduce == "auto":
    # NCCL has GPU kernels only; on CPU devices reduce through one device.
    all_reduce = "nccl" if gpus and len(devices) > 1 else "reduction_to_one_device"
  if all_reduce == "nccl":
    if not gpus:
      raise DistributionError("--all_reduce=nccl needs GPUs; on CPU devices use "
                              "reduction_to_one_device or hierarchical_copy")
    cross_device_ops = tf.distribute.NcclAllReduce()
  elif all_reduce == "hierarchical_copy":
    cross_device_ops = tf.distribute.HierarchicalCopyAllReduce()
  elif all_reduce == "reduction_to_one_device":
    cross_device_ops = tf.distribute.ReductionToOneDevice()
  else:
    raise DistributionError(f"--all_reduce={all_reduce} is for --strategy=multi_worker; "
                            "mirrored takes auto, nccl, hierarchical_copy or "
                            "reduction_to_one_device")
  logging.info("MirroredStrategy over %s with %s", devices, type(cross_device_ops).__name__)
  return tf.distribute.MirroredStrategy(devices, cross_device_ops=cross_device_ops)


def _tpu(tpu: str | None, peer_timeout_seconds: int) -> tf.distribute.TPUStrategy:
  """TPUStrategy as documented for TF 2.x. Untested on a TPU (none is available to this
  project); what happens without one is: a name the resolver cannot look up, no TPU
  here, or an address where none answers, each an error."""
  if not tpu:
    raise DistributionError("--strategy=tpu needs --tpu=NAME_OR_ADDRESS (or 'local')")
  # Initialising a remote TPU waits without limit for an address that does not answer.
  address = tpu.removeprefix("grpc://")
  message = (f"--tpu={tpu}: the TPU did not answer within "
             f"--peer_timeout_seconds={peer_timeout_seconds}")
  listening = "it accepts connections but is not a TPU that answered"
  with _Deadline(peer_timeout_seconds, message, [address] if ":" in address else [],
                 listening):
    try:
      resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
      if tpu != "local":
        # A TPU VM ("local") runs in-process; a remote TPU node is reached through gRPC.
        tf.config.experimental_connect_to_cluster(resolver)
      tf.tpu.experimental.initialize_tpu_system(resolver)
      strategy = tf.distribute.TPUStrategy(resolver)
    # OSError: a TPU name is looked up on the Cloud metadata server (URLError off Cloud).
    except (ValueError, RuntimeError, OSError, tf.errors.OpError) as e:
      raise DistributionError(f"--tpu={tpu}: cannot reach or initialise the TPU: "
                              f"{_first_line(e)}") from None
  logging.info("TPUStrategy on %s: %d replica(s)", tpu, strategy.num_replicas_in_sync)
  return strategy


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """True for the one worker that writes checkpoints, summaries and metrics."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.task_type:
    return True
  return resolver.task_type == "chief" or (
      resolver.task_type == "worker" and resolver.task_id == 0
      and "chief" not in resolver.cluster_spec().as_dict())
