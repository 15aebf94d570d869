"""The cluster of a multi-worker run: TF_CONFIG parsed and checked, or an srun step's
tasks, ports and GPUs through Slurm; and whether `--strategy=auto` should use one."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

from absl import logging
import tensorflow as tf

from trainer.distribute.messages import _first_line
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
              "...` inside the job (see docs/distribution.md) or set "
              "TF_CONFIG; to train in this process alone, pass --strategy=mirrored, "
              "one_device or default")


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
