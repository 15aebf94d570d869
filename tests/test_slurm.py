"""Slurm as a launcher: the cluster and GPUs a job step's environment resolves to, what
--strategy=auto chooses and logs, clear errors for bad environments, and one real
two-task run on loopback with no TF_CONFIG."""

import json
import logging
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import SMALL_SYNTHETIC
from trainer import distribute

REPO = pathlib.Path(__file__).resolve().parents[1]
RUN_TIMEOUT = 120  # The two-task run takes about 30 s on one loaded core.


def no_launcher(monkeypatch) -> None:
  """Removes this machine's own TF_CONFIG, Slurm variables and port base, if any."""
  for name in list(os.environ):
    if name.startswith("SLURM") or name in ("TF_CONFIG", distribute.PORT_BASE_VARIABLE):
      monkeypatch.delenv(name)


def slurm_step(monkeypatch, rank: int, nodelist: str = "localhost",
               tasks_per_node: str = "2", num_tasks: int = 2, node: str = "localhost",
               **extra: str) -> None:
  """The environment srun gives task `rank` of a step, and no GPU."""
  no_launcher(monkeypatch)
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
  environment = slurm_environment(rank, nodelist, tasks_per_node, num_tasks, node)
  for name, value in {**environment, **extra}.items():
    monkeypatch.setenv(name, value)


def slurm_environment(rank: int, nodelist: str, tasks_per_node: str, num_tasks: int,
                      node: str) -> dict[str, str]:
  return {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": str(num_tasks),
          "SLURM_JOB_NODELIST": nodelist, "SLURM_TASKS_PER_NODE": tasks_per_node,
          "SLURM_PROCID": str(rank), "SLURM_STEP_NUM_TASKS": str(num_tasks),
          "SLURM_STEP_NODELIST": nodelist, "SLURM_STEP_TASKS_PER_NODE": tasks_per_node,
          "SLURMD_NODENAME": node}


def fake_nvidia_smi(monkeypatch, tmp_path: pathlib.Path, gpus: int, status: int = 0) -> None:
  """An `nvidia-smi` first on PATH that lists `gpus` GPUs (or fails with `status`)."""
  script = tmp_path / "bin" / "nvidia-smi"
  script.parent.mkdir()
  lines = "".join(f"echo 'GPU {i}: NVIDIA H100 (UUID: GPU-{i})'\n" for i in range(gpus))
  failure = f"echo 'NVIDIA-SMI has failed' >&2; exit {status}\n" if status else ""
  script.write_text(f"#!/bin/sh\n{failure}{lines}")
  script.chmod(0o755)
  monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.delenv("CUDA_VISIBLE_DEVICES")


# The cluster of a job step.

@pytest.mark.parametrize("rank", [0, 1])
def test_two_tasks_on_one_node_get_consecutive_ports_from_the_resolvers_base(
    monkeypatch, rank):
  slurm_step(monkeypatch, rank)
  cluster = distribute.resolve_cluster()
  assert cluster.source == "Slurm"
  assert cluster.jobs == {"worker": ["localhost:8888", "localhost:8889"]}
  assert (cluster.task_type, cluster.task_index) == ("worker", rank)
  assert cluster.own_address == f"localhost:{8888 + rank}"
  assert cluster.is_chief == (rank == 0) and cluster.num_tasks == 2
  assert cluster.gpus == 0
  assert "rerun the same srun command" in cluster.restart_hint


def test_the_port_base_comes_from_the_environment(monkeypatch):
  slurm_step(monkeypatch, 1, **{distribute.PORT_BASE_VARIABLE: "23456"})
  assert distribute.resolve_cluster().jobs == {"worker": ["localhost:23456",
                                                          "localhost:23457"]}


def test_tasks_of_several_nodes_are_laid_out_in_blocks_over_sorted_nodes(monkeypatch):
  slurm_step(monkeypatch, 2, nodelist="gpu[07-08]", tasks_per_node="2(x2)", num_tasks=4,
             node="gpu08")
  cluster = distribute.resolve_cluster()
  assert cluster.jobs == {"worker": ["gpu07:8888", "gpu07:8889", "gpu08:8888", "gpu08:8889"]}
  assert cluster.task_index == 2 and cluster.peers == ["gpu07:8888", "gpu07:8889",
                                                       "gpu08:8889"]


def test_tf_config_wins_over_slurm(monkeypatch):
  slurm_step(monkeypatch, 1)
  monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:1"]},
                                              "task": {"type": "worker", "index": 0}}))
  cluster = distribute.resolve_cluster()
  assert (cluster.source, cluster.jobs["worker"], cluster.task_index) == (
      "TF_CONFIG", ["a:1", "b:1"], 0)
  assert cluster.restart_hint == "restart every worker with the same flags and TF_CONFIG"


# GPUs per task.

@pytest.mark.process
def test_tasks_sharing_a_node_split_its_gpus(monkeypatch, tmp_path):
  slurm_step(monkeypatch, 1)
  fake_nvidia_smi(monkeypatch, tmp_path, gpus=4)
  assert distribute.resolve_cluster().gpus == 2
  assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"


def test_the_split_keeps_the_gpus_slurm_allocated(monkeypatch):
  slurm_step(monkeypatch, 1, CUDA_VISIBLE_DEVICES="4,5,6,7")
  assert distribute.resolve_cluster().gpus == 2
  assert os.environ["CUDA_VISIBLE_DEVICES"] == "6,7"  # Not 2,3: those are not ours.


@pytest.mark.parametrize("visible, per_task", [("4,5", "h100:2"), ("5", None)])
def test_gpus_slurm_bound_to_each_task_are_left_alone(monkeypatch, visible, per_task):
  """srun --gpus-per-task with binding, or fewer GPUs than tasks: each sees its own."""
  slurm_step(monkeypatch, 1, CUDA_VISIBLE_DEVICES=visible,
             **({"SLURM_GPUS_PER_TASK": per_task} if per_task else {}))
  assert distribute.resolve_cluster().gpus == len(visible.split(","))
  assert os.environ["CUDA_VISIBLE_DEVICES"] == visible


@pytest.mark.process
def test_one_task_per_node_uses_every_gpu_of_its_node(monkeypatch, tmp_path):
  slurm_step(monkeypatch, 1, nodelist="n[1-2]", tasks_per_node="1(x2)", node="n2")
  fake_nvidia_smi(monkeypatch, tmp_path, gpus=8)
  assert distribute.resolve_cluster().gpus == 8
  assert "CUDA_VISIBLE_DEVICES" not in os.environ


# What --strategy=auto chooses.

@pytest.mark.parametrize("environment, reason", [
    ({}, None),
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, None),
    ({"SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2"}, "Slurm job with 2 tasks"),
    ({"SLURM_NTASKS": "4"}, "Slurm job with 4 tasks"),  # An sbatch script, no step.
    ({"SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "1"}, None),  # srun -n 1 in that job.
    ({"TF_CONFIG": '{"cluster": {}}'}, "TF_CONFIG"),
    ({"TF_CONFIG": "  "}, None),
])
def test_auto_trains_on_several_workers_under_a_multi_task_launcher(
    monkeypatch, environment, reason):
  no_launcher(monkeypatch)
  for name, value in environment.items():
    monkeypatch.setenv(name, value)
  assert distribute.multi_worker_reason() == reason


def test_auto_in_a_two_task_step_resolves_to_multi_worker_and_says_why(
    monkeypatch, caplog):
  slurm_step(monkeypatch, 1)
  joined = []
  monkeypatch.setattr(distribute.strategy, "_multi_worker",
                      lambda cluster, *args: joined.append(cluster) or "strategy")
  caplog.set_level(logging.INFO, logger="absl")
  assert distribute.make_strategy("auto", peer_timeout_seconds=60) == "strategy"
  assert joined[0].source == "Slurm" and joined[0].task_index == 1
  assert "--strategy=auto resolved to multi_worker (Slurm job with 2 tasks)" in caplog.text


def test_auto_with_tf_config_resolves_to_multi_worker_and_says_why(monkeypatch, caplog):
  slurm_step(monkeypatch, 0)
  monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:1"]},
                                              "task": {"type": "worker", "index": 1}}))
  monkeypatch.setattr(distribute.strategy, "_multi_worker", lambda cluster, *args: cluster)
  caplog.set_level(logging.INFO, logger="absl")
  assert distribute.make_strategy("auto").source == "TF_CONFIG"
  assert "--strategy=auto resolved to multi_worker (TF_CONFIG)" in caplog.text


# Bad environments.

BAD_STEPS = {
    "no_procid": ({"SLURM_PROCID": None}, "SLURM_PROCID is not set: this process is not a "
                  "task of an srun step; start every task with `srun python -m trainer.main"),
    "sbatch_script": ({"SLURM_STEP_NUM_TASKS": None, "SLURM_STEP_NODELIST": None,
                       "SLURM_STEP_TASKS_PER_NODE": None},
                      "SLURM_STEP_NUM_TASKS, SLURM_STEP_NODELIST, SLURM_STEP_TASKS_PER_NODE "
                      "are not set"),
    "procid_not_a_number": ({"SLURM_PROCID": "one"}, "SLURM_PROCID='one' is not a number"),
    "rank_outside": ({"SLURM_PROCID": "2"}, "SLURM_PROCID=2 is not a task of this step"),
    "tasks_disagree": ({"SLURM_STEP_TASKS_PER_NODE": "3"},
                       "cannot be read as a cluster (Requested 2 tasks but only 3"),
    "bad_nodelist": ({"SLURM_STEP_NODELIST": "n[1-"}, "Invalid hostlist format"),
    "other_node": ({"SLURMD_NODENAME": "elsewhere"}, "runs on elsewhere, but the cluster "
                   "places it on localhost"),
    "port_too_high": ({distribute.PORT_BASE_VARIABLE: "65535"},
                      "localhost:65536 is not a usable address"),
    "port_not_a_number": ({distribute.PORT_BASE_VARIABLE: "88x"},
                          "RESNET_CIFAR_PORT_BASE='88x' is not a number"),
}


@pytest.mark.parametrize("case", list(BAD_STEPS))
def test_a_bad_slurm_environment_is_named(monkeypatch, case):
  slurm_step(monkeypatch, 1)
  changes, message = BAD_STEPS[case]
  for name, value in changes.items():
    if value is None:
      monkeypatch.delenv(name)
    else:
      monkeypatch.setenv(name, value)
  with pytest.raises(distribute.DistributionError, match=re.escape(message)):
    distribute.resolve_cluster()


@pytest.mark.process
def test_a_failing_nvidia_smi_is_named(monkeypatch, tmp_path):
  slurm_step(monkeypatch, 0)
  fake_nvidia_smi(monkeypatch, tmp_path, gpus=2, status=9)
  with pytest.raises(distribute.DistributionError,
                     match="nvidia-smi --list-gpus` failed .*NVIDIA-SMI has failed"):
    distribute.resolve_cluster()


def test_neither_tf_config_nor_slurm_asks_for_one_of_them(monkeypatch):
  no_launcher(monkeypatch)
  with pytest.raises(distribute.DistributionError,
                     match="needs the TF_CONFIG environment variable.*or Slurm's srun"):
    distribute.make_strategy("multi_worker")


def test_a_taken_port_says_how_to_move_the_slurm_tasks(monkeypatch):
  with socket.socket() as taken:
    taken.bind(("", 0))
    taken.listen()
    slurm_step(monkeypatch, 0, **{distribute.PORT_BASE_VARIABLE:
                                  str(taken.getsockname()[1])})
    # Were the check to miss, fail here rather than join (and wait for) a cluster.
    monkeypatch.setattr(distribute.multi_worker.tf.distribute, "MultiWorkerMirroredStrategy",
                        lambda **kwargs: pytest.fail("the taken port went unnoticed"))
    with pytest.raises(distribute.DistributionError,
                       match=r"address localhost:\d+ \(from Slurm\) cannot be used: port \d+ "
                             "is taken .* set RESNET_CIFAR_PORT_BASE to another first port"):
      distribute.make_strategy("multi_worker")


# Two real tasks of one step, on loopback.

def two_free_ports() -> int:
  """A port P with P and P + 1 free now (the two tasks' ports on one node)."""
  for _ in range(100):
    with socket.socket() as first, socket.socket() as second:
      first.bind(("127.0.0.1", 0))
      base = first.getsockname()[1]
      try:
        second.bind(("127.0.0.1", base + 1))
      except OSError:
        continue
      return base
  raise AssertionError("no two consecutive free ports")


@pytest.mark.process
def test_two_srun_tasks_train_together_without_tf_config(tmp_path):
  base = two_free_ports()
  model_dir = tmp_path / "run"  # Shared by both tasks, as on a cluster file system.
  environment = {name: value for name, value in os.environ.items()
                 if not name.startswith("SLURM") and name != "TF_CONFIG"}
  args = ["--strategy=multi_worker", "--depth=8", "--data_source=synthetic", SMALL_SYNTHETIC,
          "--global_batch_size=16", "--steps_per_epoch=3", "--epochs=1", "--eval_steps=2",
          f"--model_dir={model_dir}", "--peer_timeout_seconds=60"]
  processes = []
  for rank in range(2):
    env = {**environment, **slurm_environment(rank, "localhost", "2", 2, "localhost"),
           distribute.PORT_BASE_VARIABLE: str(base), "CUDA_VISIBLE_DEVICES": ""}
    # Output to files: no pipe fills up while the other task is waited for.
    with open(tmp_path / f"task{rank}.out", "w") as stdout, \
         open(tmp_path / f"task{rank}.err", "w") as stderr:
      processes.append(subprocess.Popen([sys.executable, "-m", "trainer.main", *args],
                                        cwd=REPO, env=env, stdout=stdout, stderr=stderr,
                                        start_new_session=True))
  deadline = time.time() + RUN_TIMEOUT
  try:
    while any(process.poll() is None for process in processes):
      assert time.time() < deadline, f"the tasks did not finish within {RUN_TIMEOUT} s"
      time.sleep(0.2)
  finally:
    for process in processes:  # Reaped whatever happened, their watchdogs with them.
      if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
      process.wait()
  for rank, process in enumerate(processes):
    stderr = (tmp_path / f"task{rank}.err").read_text()
    assert process.returncode == 0, f"task {rank}:\n{stderr[-3000:]}"
    assert (f"this is task worker:{rank} (localhost:{base + rank}) of 2 task(s), "
            f"{'the chief' if rank == 0 else 'not the chief'}; cluster from Slurm") in stderr
    assert "joined 2 task(s)" in stderr and "2 replica(s) in sync" in stderr
    assert "CollectiveAllReduceStrategy, 2 replica(s)" in stderr
    assert (tmp_path / f"task{rank}.out").read_text().startswith("done: ")
  metrics = json.loads((model_dir / "metrics.json").read_text())  # The chief's.
  assert metrics["replicas"] == 2 and metrics["steps"] == 3
