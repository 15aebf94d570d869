"""Choosing the tf.distribute strategy, precision policy and XLA setting for the devices.

Every error a user can fix (flags, TF_CONFIG, the Slurm job, unreachable peers) is a
DistributionError.
"""

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time

from absl import logging
import tensorflow as tf

from trainer.errors import DistributionError

# Task types of TF_CONFIG that train; MultiWorkerMirroredStrategy has no parameter servers
# and this trainer runs no side-car evaluator.
_TRAINING_TASK_TYPES = ("chief", "worker")
_TF_CONFIG_EXAMPLE = ('{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                      '"task": {"type": "worker", "index": 0}}')
# Under Slurm, the task with local index i on a node listens on PORT_BASE + i; the default
# is SlurmClusterResolver's. Two jobs sharing a node need different bases.
PORT_BASE_VARIABLE = "RESNET_CIFAR_PORT_BASE"
DEFAULT_PORT_BASE = 8888
# What srun sets for every task of a job step; SlurmClusterResolver reads these.
_SLURM_STEP_VARIABLES = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST",
                         "SLURM_STEP_TASKS_PER_NODE")
_SRUN_HINT = ("start every task with `srun python -m trainer.main --strategy=multi_worker "
              "...` inside the job (see README, \"Distribution, precision and XLA\") or set "
              "TF_CONFIG; to train in this process alone, pass --strategy=mirrored, "
              "one_device or default")


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
    peer_timeout_seconds: multi_worker: how long to wait for the peers before the process
      exits with a clear message (it cannot be interrupted otherwise).
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
    return _tpu(tpu)
  gpus = tf.config.list_logical_devices("GPU")
  cpus = tf.config.list_logical_devices("CPU")
  if name == "default":
    return tf.distribute.get_strategy()
  if name == "one_device":
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else cpus[0].name)
  if name == "mirrored":
    return _mirrored(gpus, cpus, num_gpus, all_reduce)
  raise DistributionError(f"unknown strategy {name!r}")


def _gpu_hint() -> str:
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  return f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""


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


def parse_tf_config(text: str | None) -> dict:
  """Checks the TF_CONFIG of a multi-worker run and returns it parsed.

  Args:
    text: the value of the TF_CONFIG environment variable (None when unset).
  Returns:
    the parsed TF_CONFIG: {"cluster": {type: ["host:port", ...]}, "task": {...}}.
  Raises:
    DistributionError: naming what is missing or wrong.
  """
  if not text or not text.strip():
    raise DistributionError(
        "--strategy=multi_worker needs the TF_CONFIG environment variable on every worker, "
        f"e.g. TF_CONFIG='{_TF_CONFIG_EXAMPLE}' (see scripts/launch_local_workers.py), "
        "or Slurm's srun to start the workers")

  def malformed(problem: str) -> DistributionError:
    return DistributionError(f"TF_CONFIG is malformed: {problem}; expected e.g. "
                             f"{_TF_CONFIG_EXAMPLE}, got {text!r}")

  try:
    parsed = json.loads(text)
  except ValueError as e:
    raise malformed(f"not JSON ({e})") from None
  if not isinstance(parsed, dict):
    raise malformed("not a JSON object")
  cluster, task = parsed.get("cluster"), parsed.get("task")
  if not isinstance(cluster, dict) or not cluster:
    raise malformed('"cluster" must map task types to lists of "host:port"')
  if not isinstance(task, dict):
    raise malformed('"task" must be {"type": ..., "index": ...}')
  for job, addresses in cluster.items():
    if job not in _TRAINING_TASK_TYPES:
      raise malformed(f'cluster has a {job!r} job; multi_worker trains with "chief" and '
                      '"worker" tasks only')
    if not isinstance(addresses, list) or not addresses:
      raise malformed(f'cluster["{job}"] must be a non-empty list of "host:port"')
    for address in addresses:
      if not isinstance(address, str) or not _split_address(address):
        raise malformed(f'cluster["{job}"] has {address!r}, not "host:port"')
  if len(cluster.get("chief", [])) > 1:
    raise malformed('cluster["chief"] must list one task')
  task_type, index = task.get("type"), task.get("index")
  if task_type not in cluster:
    raise malformed(f'task type {task_type!r} is not a job of the cluster '
                    f'({", ".join(cluster)})')
  if isinstance(index, bool) or not isinstance(index, int):
    raise malformed(f'task index must be an integer, got {index!r}')
  if not 0 <= index < len(cluster[task_type]):
    raise malformed(f'task index {index} is outside cluster["{task_type}"] '
                    f'(0..{len(cluster[task_type]) - 1})')
  all_addresses = [a for job in cluster.values() for a in job]
  duplicates = sorted({a for a in all_addresses if all_addresses.count(a) > 1})
  if duplicates:
    raise malformed(f"the same address appears for several tasks: {', '.join(duplicates)}")
  return parsed


def _split_address(address: str) -> tuple[str, int] | None:
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    return None
  return host.strip("[]"), int(port)


@dataclasses.dataclass(frozen=True)
class Cluster:
  """The cluster of a multi-worker run and this process's place in it."""
  source: str  # "TF_CONFIG" or "Slurm": who described the cluster, named in messages.
  jobs: dict  # task type -> ["host:port", ...]
  task_type: str
  task_index: int
  gpus: int | None = None  # Slurm: the GPUs this task uses; None: TensorFlow counts them.

  @property
  def own_address(self) -> str:
    return self.jobs[self.task_type][self.task_index]

  @property
  def num_tasks(self) -> int:
    return sum(len(addresses) for addresses in self.jobs.values())

  @property
  def is_chief(self) -> bool:
    return self.task_type == "chief" or (self.task_type == "worker" and self.task_index == 0
                                         and "chief" not in self.jobs)

  @property
  def peers(self) -> list[str]:
    return [a for job in self.jobs.values() for a in job if a != self.own_address]

  @property
  def restart_hint(self) -> str:
    """How to restart the whole run after a lost peer (it resumes from the checkpoint)."""
    if self.source == "Slurm":
      return "rerun the same srun command (or resubmit the job) with the same flags"
    return "restart every worker with the same flags and TF_CONFIG"


def multi_worker_reason() -> str | None:
  """Why `--strategy=auto` should train on several workers here, or None.

  TF_CONFIG set (any launcher that writes it, e.g. Kubeflow's TFJob), or a Slurm job
  step of more than one task (srun sets SLURM_STEP_NUM_TASKS; SLURM_NTASKS when no step
  count is set, e.g. in an sbatch script, where multi_worker then asks for srun).
  """
  if os.environ.get("TF_CONFIG", "").strip():
    return "TF_CONFIG"
  name = ("SLURM_STEP_NUM_TASKS" if os.environ.get("SLURM_STEP_NUM_TASKS")
          else "SLURM_NTASKS")
  tasks = _slurm_int(name, default=1)
  return f"Slurm job with {tasks} tasks" if tasks > 1 else None


def resolve_cluster() -> Cluster:
  """The cluster of `--strategy=multi_worker`: from TF_CONFIG when set, else from Slurm.

  Raises:
    DistributionError: neither describes a usable cluster.
  """
  text = os.environ.get("TF_CONFIG")
  slurm = any(os.environ.get(name) for name in
              ("SLURM_JOB_ID", "SLURM_NTASKS", *_SLURM_STEP_VARIABLES))
  if (text is not None and text.strip()) or not slurm:
    parsed = parse_tf_config(text)
    return Cluster("TF_CONFIG", parsed["cluster"], parsed["task"]["type"],
                   parsed["task"]["index"])
  return _slurm_cluster()


def _slurm_int(name: str, default: int | None = None) -> int:
  text = os.environ.get(name)
  if not text and default is not None:
    return default
  try:
    return int(text)
  except (TypeError, ValueError):
    raise DistributionError(f"{name}={text!r} is not a number; is this a Slurm job "
                            "step?") from None


def _slurm_cluster() -> Cluster:
  """This srun step's cluster, through TensorFlow's SlurmClusterResolver.

  The resolver reads the rank, the step's nodes and tasks per node, and lays the tasks
  out over the sorted node names (srun's default block distribution), each node's tasks
  on consecutive ports from the port base. The GPUs it would assign are not used (see
  _slurm_gpus).
  """
  missing = [name for name in _SLURM_STEP_VARIABLES if not os.environ.get(name)]
  if missing:
    raise DistributionError(
        f"--strategy=multi_worker in a Slurm job, but {', '.join(missing)} "
        f"{'is' if len(missing) == 1 else 'are'} not set: this process is not a task of "
        f"an srun step; {_SRUN_HINT}")
  rank = _slurm_int("SLURM_PROCID")
  _slurm_int("SLURM_STEP_NUM_TASKS")  # A clear message if it is not a number.
  port_base = _slurm_int(PORT_BASE_VARIABLE, default=DEFAULT_PORT_BASE)
  described = ", ".join(f"{name}={os.environ[name]!r}" for name in _SLURM_STEP_VARIABLES)
  try:
    # gpus_per_*: placeholders that let it lay out any number of tasks per node (it makes
    # no task where it finds no GPU for it).
    resolver = tf.distribute.cluster_resolver.SlurmClusterResolver(
        port_base=port_base, gpus_per_node=sys.maxsize, gpus_per_task=1, auto_set_gpu=False)
    jobs = resolver.cluster_spec().as_dict()
  except (RuntimeError, ValueError) as e:
    raise DistributionError(f"the Slurm job step cannot be read as a cluster ({e}); "
                            f"{described}") from None
  if resolver.task_type is None:
    raise DistributionError(f"SLURM_PROCID={rank} is not a task of this step; {described}")
  cluster = Cluster("Slurm", jobs, resolver.task_type, resolver.task_id)
  bad = [a for job in jobs.values() for a in job if not _split_address(a)]
  if bad:
    raise DistributionError(f"Slurm tasks get ports from {PORT_BASE_VARIABLE}={port_base} "
                            f"up; {', '.join(bad)} is not a usable address")
  host, _ = _split_address(cluster.own_address)
  node = os.environ.get("SLURMD_NODENAME")
  if node and node != host:
    raise DistributionError(
        f"Slurm task {rank} runs on {node}, but the cluster places it on {host}: the "
        "tasks must be laid out in blocks over the sorted nodes (srun's default "
        "--distribution=block); use it, or set TF_CONFIG yourself")
  same_node = [a for a in jobs[cluster.task_type] if _split_address(a)[0] == host]
  gpus = _slurm_gpus(len(same_node), same_node.index(cluster.own_address))
  return dataclasses.replace(cluster, gpus=gpus)


def _slurm_gpus(tasks_here: int, local_index: int) -> int:
  """Chooses this task's share of the node's GPUs; returns how many it uses.

  Not the resolver's assignment: it numbers GPUs from 0 whatever Slurm allocated (wrong
  when CUDA_VISIBLE_DEVICES is 2,3) and gives CPU-only nodes no tasks at all. Here the
  GPUs this process sees are split evenly over the node's tasks, unless each task
  already sees only its own (srun --gpus-per-task with binding, or fewer GPUs than tasks).
  """
  visible = _visible_gpus()
  per_task = os.environ.get("SLURM_GPUS_PER_TASK", "").rpartition(":")[2]
  already_bound = per_task.isdigit() and int(per_task) == len(visible)
  if tasks_here == 1 or len(visible) < tasks_here or already_bound:
    return len(visible)
  share = len(visible) // tasks_here
  mine = visible[local_index * share:(local_index + 1) * share]
  os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
  logging.info("Slurm: %d task(s) on this node share %d GPU(s); this task uses "
               "CUDA_VISIBLE_DEVICES=%s", tasks_here, len(visible), ",".join(mine))
  return share


def _visible_gpus() -> list[str]:
  """The GPU ids this process may use, found without initialising CUDA."""
  if "CUDA_VISIBLE_DEVICES" in os.environ:
    ids = [i.strip() for i in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if i.strip()]
    return [] if ids == ["NoDevFiles"] else ids  # What older Slurm sets for no GPUs.
  if not shutil.which("nvidia-smi"):
    return []
  try:
    output = subprocess.run(["nvidia-smi", "--list-gpus"], capture_output=True, text=True,
                            timeout=60, check=True).stdout
  except (OSError, subprocess.SubprocessError) as e:
    said = (getattr(e, "stderr", None) or "").strip()
    raise DistributionError(f"`nvidia-smi --list-gpus` failed ({_first_line(e)}"
                            f"{': ' + said.splitlines()[0] if said else ''}), so this task's "
                            "GPUs are unknown; set CUDA_VISIBLE_DEVICES") from None
  return [str(i) for i, _ in enumerate(l for l in output.splitlines()
                                       if l.startswith("GPU "))]


# The cluster this process joined, if any: at most one (TensorFlow cannot leave it).
# main.py asks, to treat a failed collective as a lost peer and to say how to restart.
_joined: Cluster | None = None


def joined_cluster() -> Cluster | None:
  """The cluster make_strategy joined in this process, or None (not multi-worker)."""
  return _joined


# The watchdog process of _Deadline: it waits for its stdin to close (the parent finished in
# time, or died) and otherwise reports which peers do not listen and kills the parent.
_WATCHDOG = r"""
import os, select, signal, socket, sys, threading
parent, seconds, message, peers = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4:]
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent; its exit ends us.
if select.select([sys.stdin], [], [], seconds)[0]:
  sys.exit(0)
silent = []

def probe(address):
  host, _, port = address.rpartition(":")
  try:
    socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
  except OSError:
    silent.append(address)

# All at once, so that many unreachable hosts still take 2 s, not 2 s each.
threads = [threading.Thread(target=probe, args=(a,), daemon=True) for a in peers]
for thread in threads:
  thread.start()
for thread in threads:
  thread.join(3)
silent = sorted(silent)
detail = (f"; nothing listens at {', '.join(silent)}" if silent else
          "; all of them accept connections but did not join (a different TF_CONFIG or "
          "Slurm step, or a stale process on one of those ports?)")
sys.stderr.write(f"error: {message}{detail}\n")
sys.stderr.flush()
os.kill(parent, signal.SIGKILL)
"""


class _Deadline:
  """Kills this process with a clear message on stderr if the block does not end in time.

  Joining a cluster blocks inside TensorFlow's C++ runtime while holding the GIL: no Python
  thread or signal handler runs until it returns, the chief waits without limit for the
  other tasks to register, and SIGTERM is taken by TensorFlow's preemption notifier. So the
  watchdog is a separate small process that sends SIGKILL. Nothing has been written by then.
  """

  def __init__(self, seconds: float, message: str, peers: list[str]):
    self._args = [str(os.getpid()), str(seconds), message, *peers]
    self._process = None

  def __enter__(self):
    self._process = subprocess.Popen([sys.executable, "-c", _WATCHDOG, *self._args],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    return self

  def __exit__(self, *exc_info):
    self._process.stdin.close()  # Tells the watchdog to exit.
    self._process.wait()


def _multi_worker(cluster: Cluster, gpus: list, all_reduce: str,
                  peer_timeout_seconds: float) -> tf.distribute.MultiWorkerMirroredStrategy:
  """MultiWorkerMirroredStrategy over `cluster`, failing clearly when peers are absent."""
  task = f"{cluster.task_type}:{cluster.task_index}"
  logging.info("multi_worker: this is task %s (%s) of %d task(s), %s; cluster from %s: %s",
               task, cluster.own_address, cluster.num_tasks,
               "the chief" if cluster.is_chief else "not the chief", cluster.source,
               json.dumps(cluster.jobs))
  implementations = {"auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
                     "ring": tf.distribute.experimental.CommunicationImplementation.RING,
                     "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL}
  if all_reduce not in implementations:
    raise DistributionError(f"--all_reduce={all_reduce} is for --strategy=mirrored; "
                            "multi_worker takes auto, ring or nccl")
  if all_reduce == "nccl" and not gpus:
    raise DistributionError("--all_reduce=nccl needs GPUs on every worker; use ring or auto")
  _check_port_free(cluster)
  # No CommunicationOptions.timeout_seconds: TensorFlow documents it as a debugging aid that
  # starts a thread per collective. Peers lost later abort the collectives anyway: a dead
  # process within a second (connection reset), a hung one within the coordination
  # service's 10 s heartbeat timeout (both measured here).
  options = tf.distribute.experimental.CommunicationOptions(
      implementation=implementations[all_reduce])
  resolver = _cluster_resolver(cluster, gpus)
  started_by = ("Start every task listed in TF_CONFIG, each with its own task type and index"
                if cluster.source == "TF_CONFIG" else
                "Check that every task of the srun step started this trainer")
  message = (f"multi_worker task {task} could not reach all of its {cluster.num_tasks - 1} "
             f"peer(s) within --peer_timeout_seconds={peer_timeout_seconds}. {started_by}, "
             "and that this host can reach their addresses (firewall, hostname, port)")

  started = time.time()
  with _Deadline(peer_timeout_seconds, message, cluster.peers):
    try:
      strategy = tf.distribute.MultiWorkerMirroredStrategy(
          cluster_resolver=resolver, communication_options=options)
      # Constructing the strategy waits for the tasks to register; one tiny all-reduce also
      # proves that the collective path between the workers works before training starts.
      joined = _all_reduce_ones(strategy)
    except (tf.errors.OpError, ValueError, RuntimeError) as e:
      raise DistributionError(f"multi_worker task {task} could not join the cluster "
                              f"{json.dumps(cluster.jobs)}: {_first_line(e)}") from None
  if joined != strategy.num_replicas_in_sync:
    raise DistributionError(f"multi_worker: {joined} replicas answered the first all-reduce,"
                            f" {strategy.num_replicas_in_sync} expected")
  global _joined
  _joined = cluster
  logging.info("multi_worker: task %s joined %d task(s) in %.1f s; %d replica(s) in sync",
               task, cluster.num_tasks, time.time() - started, strategy.num_replicas_in_sync)
  return strategy


def _cluster_resolver(cluster: Cluster, gpus: list):
  """The strategy's cluster resolver: None for TF_CONFIG (TensorFlow reads it itself)."""
  if cluster.source == "TF_CONFIG":
    return None
  if cluster.gpus > len(gpus):
    raise DistributionError(f"this Slurm task should use {cluster.gpus} GPU(s) but "
                            f"TensorFlow sees {len(gpus)}{_gpu_hint()}")
  # The strategy takes its replicas per worker from num_accelerators ({"GPU": 0}: the CPU).
  return tf.distribute.cluster_resolver.SimpleClusterResolver(
      tf.train.ClusterSpec(cluster.jobs), task_type=cluster.task_type,
      task_id=cluster.task_index, num_accelerators={"GPU": cluster.gpus}, rpc_layer="grpc")


def _check_port_free(cluster: Cluster) -> None:
  """Fails clearly when this task's own port is taken.

  TensorFlow would say only "Could not start gRPC server".
  """
  address = cluster.own_address
  _, port = _split_address(address)
  fix = (f"set {PORT_BASE_VARIABLE} to another first port" if cluster.source == "Slurm"
         else "pick another port")
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
    # SO_REUSEADDR: a port in TIME_WAIT from a previous run is free for TensorFlow too.
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      probe.bind(("", port))
    except OSError as e:
      raise DistributionError(f"multi_worker: this task's address {address} (from "
                              f"{cluster.source}) cannot be used: port {port} is taken "
                              f"({e.strerror}); stop the process holding it or {fix}") from None


def _all_reduce_ones(strategy: tf.distribute.Strategy) -> int:
  ones = strategy.run(tf.function(lambda: tf.ones([], tf.int32)))
  return int(strategy.reduce(tf.distribute.ReduceOp.SUM, ones, axis=None).numpy())


def _first_line(error: Exception) -> str:
  text = getattr(error, "message", None) or str(error)
  return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def _tpu(tpu: str | None) -> tf.distribute.TPUStrategy:
  """TPUStrategy as documented for TF 2.x. Untested: no TPU is available to this project."""
  if not tpu:
    raise DistributionError("--strategy=tpu needs --tpu=NAME_OR_ADDRESS (or 'local')")
  try:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    if tpu != "local":
      # A TPU VM ("local") runs in-process; a remote TPU node is reached through gRPC.
      tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    strategy = tf.distribute.TPUStrategy(resolver)
  except (ValueError, RuntimeError, tf.errors.OpError) as e:
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

  TensorFlow registers bfloat16 kernels for every x86 CPU, but oneDNN creates its
  bfloat16 convolutions only with AVX-512: on an AVX2-only CPU the first training step
  would end in "could not create a primitive descriptor". One tiny convolution and its
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
          f"fails ({_kernel_message(error)}); TensorFlow's oneDNN kernels need AVX-512 "
          "for bfloat16. Pass --precision=float32, the fastest on CPUs anyway") from None


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
