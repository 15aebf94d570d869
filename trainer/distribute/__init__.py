"""Choosing the tf.distribute strategy, precision policy and XLA setting for the devices,
one concern per module; the names callers use are re-exported here. Every error a user
can fix (flags, TF_CONFIG, the Slurm job, unreachable peers) is a DistributionError."""

from trainer.distribute.cluster import (DEFAULT_PORT_BASE, PORT_BASE_VARIABLE, Cluster,
                                        multi_worker_reason, parse_tf_config, resolve_cluster)
from trainer.distribute.multi_worker import joined_cluster
from trainer.distribute.precision import (ACCELERATOR_STEPS_PER_EXECUTION,
                                          BFLOAT16_MIN_SPEEDUP, PROBE_MIN_STEPS, CpuRun,
                                          check_jit_compile_runs, check_precision_runs,
                                          choose_cpu_precision,
                                          half_precision_runs, resolve_jit_compile,
                                          resolve_precision, resolve_steps_per_execution)
from trainer.distribute.replicas import make_replica_sync
from trainer.distribute.strategy import configure_cpu_devices, is_chief, make_strategy
from trainer.errors import DistributionError
