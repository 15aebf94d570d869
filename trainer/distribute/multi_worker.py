"""MultiWorkerMirroredStrategy over a Cluster: joined under the watchdog, checked with
one all-reduce; and the cluster this process joined."""

import json
import socket
import time

from absl import logging
import tensorflow as tf

from trainer.distribute.cluster import PORT_BASE_VARIABLE, Cluster, _split_address
from trainer.distribute.messages import _first_line, _gpu_hint
from trainer.distribute.watchdog import _Deadline
from trainer.errors import DistributionError

# The cluster this process joined, if any: at most one (TensorFlow cannot leave it).
# main.py asks, to treat a failed collective as a lost peer and to say how to restart.
_joined: Cluster | None = None


def joined_cluster() -> Cluster | None:
  """The cluster make_strategy joined in this process, or None (not multi-worker)."""
  return _joined


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
  listening = ("all of them accept connections but did not join (a different TF_CONFIG or "
               "Slurm step, or a stale process on one of those ports?)")
  with _Deadline(peer_timeout_seconds, message, cluster.peers, listening):
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
