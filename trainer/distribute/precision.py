"""Precision policy, XLA and steps per execution for the strategy's devices (resolving
"auto"), and the check that a half precision's convolutions run on this CPU."""

from collections.abc import Callable
import dataclasses

from absl import logging
import tensorflow as tf

from trainer.distribute.messages import _first_line
from trainer.errors import DistributionError

# --precision=auto on a CPU measures the run's network at both precisions, and only for
# runs of at least this many steps. The probe costs about as much as 15-35 of the run's
# float32 steps whatever the network (two models built, traced and warmed up, 5 timed
# steps each; measured 5-6 s for ResNet-20 and 13-17 s for ResNet-56 at batch 128 on 2
# shared cores), so from 1,000 steps on it is under 4% of the run, while a 1.15x gain
# saves 13%. Shorter runs (every test, a smoke run) get float32 unprobed.
PROBE_MIN_STEPS = 1000
# mixed_bfloat16 only when it measures at least this much faster: timing windows of the
# same step vary by about +-5% on the shared 2-core machine here, so a smaller measured
# gain may be noise, and bfloat16 rounds the activations for nothing then.
BFLOAT16_MIN_SPEEDUP = 1.15


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


@dataclasses.dataclass(frozen=True)
class CpuRun:
  """What --precision=auto decides from on a CPU in a training run."""
  network: str               # the model's name, for the log line
  total_steps: int           # of the whole run (schedule.Plan.total_steps)
  deterministic: bool
  # The probe: seconds per training step of the run's network at float32 and at
  # mixed_bfloat16 (trainer/precision_probe.py); called only when the choice needs it.
  seconds_per_step: Callable[[], tuple[float, float]]
  recorded: str | None = None  # what a resumed auto run resolved to when it started


def resolve_precision(precision: str, strategy: tf.distribute.Strategy,
                      cpu_run: CpuRun | None = None) -> str:
  """Resolves "auto" for the strategy's devices; explicit values are returned unchanged.

  Args:
    precision: auto, float32, mixed_float16 or mixed_bfloat16.
    strategy: where the model runs.
    cpu_run: a training run's length, determinism and probe; None (evaluation, export,
      benchmarks): float32 on CPUs, unprobed.
  Returns:
    mixed_bfloat16 on TPUs and on GPUs of compute capability 8.0+, mixed_float16 on 7.x,
    float32 on older GPUs. On CPUs the gain of mixed_bfloat16 depends on the CPU and the
    network (1.6-2.2x float32 on one AVX512_BF16 Xeon, 0.55x for ResNet-50 on another),
    so there it is measured for the run's network: choose_cpu_precision, logged. A
    resumed run keeps `cpu_run.recorded` (a timing must not change a run's precision
    mid-way), unless this CPU cannot run it.
  """
  if precision != "auto":
    return precision
  device_type = _device_type(strategy)
  if device_type == "TPU":
    return "mixed_bfloat16"
  if device_type == "CPU":
    return "float32" if cpu_run is None else _resolve_on_cpu(cpu_run, strategy)
  # The slowest GPU decides: a policy its hardware lacks would run emulated.
  majors = [tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0))[0]
            for gpu in tf.config.list_physical_devices("GPU")]
  major = min(majors, default=0)
  return "mixed_bfloat16" if major >= 8 else "mixed_float16" if major >= 7 else "float32"


def _resolve_on_cpu(run: CpuRun, strategy: tf.distribute.Strategy) -> str:
  """--precision=auto of a training run on a CPU; says what it chose and why."""
  if run.recorded is not None:
    if not _agreed_true(strategy, half_precision_runs(run.recorded, strategy)):
      logging.warning("precision auto: float32; this run resolved it to %s when it "
                      "started, which this CPU cannot run", run.recorded)
      return "float32"
    logging.info("precision auto: %s, as this run resolved it when it started "
                 "(config.json)", run.recorded)
    return run.recorded
  precision, reason = choose_cpu_precision(
      network=run.network, total_steps=run.total_steps, deterministic=run.deterministic,
      bfloat16_runs=lambda: _agreed_true(
          strategy, half_precision_runs("mixed_bfloat16", strategy)),
      seconds_per_step=lambda: tuple(_agreed_mean(strategy, list(run.seconds_per_step()))))
  logging.info("precision auto: %s (%s)", precision, reason)
  return precision


def choose_cpu_precision(*, network: str, total_steps: int, deterministic: bool,
                         bfloat16_runs: Callable[[], bool],
                         seconds_per_step: Callable[[], tuple[float, float]]
                         ) -> tuple[str, str]:
  """--precision=auto on a CPU: float32, or mixed_bfloat16 where it measures clearly
  faster for this network. The inputs that cost something are callables, called only
  when the choice needs them: whether bfloat16 convolutions run here at all (a tiny
  probe), then the seconds per step at float32 and mixed_bfloat16 (seconds of probing).

  Returns:
    the precision, and the reason in a few words (logged).
  """
  if deterministic:
    return "float32", "--deterministic: a run's precision must not depend on a timing"
  if total_steps < PROBE_MIN_STEPS:
    return "float32", (f"a run of {total_steps} steps; timing mixed_bfloat16 pays from "
                       f"{PROBE_MIN_STEPS}")
  if not bfloat16_runs():
    return "float32", "this CPU cannot run bfloat16 convolutions"
  float32, bfloat16 = seconds_per_step()
  speedup = float32 / bfloat16
  measured = f"measured {speedup:.2f}x float32 on this CPU for {network}"
  if speedup >= BFLOAT16_MIN_SPEEDUP:
    return "mixed_bfloat16", measured
  return "float32", (f"mixed_bfloat16 {measured}, under the {BFLOAT16_MIN_SPEEDUP}x it "
                     "must gain")


def _agreed_mean(strategy: tf.distribute.Strategy, values: list[float]) -> list[float]:
  """`values` averaged over the workers of a multi-worker run, so that every worker
  makes the same choice from its own measurement (one process's values elsewhere)."""
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return values
  mean = tf.function(lambda local: strategy.reduce(
      tf.distribute.ReduceOp.MEAN, strategy.run(tf.identity, args=(local,)), axis=None))
  return [float(v) for v in mean(tf.constant(values, tf.float32)).numpy()]


def _agreed_true(strategy: tf.distribute.Strategy, value: bool) -> bool:
  """Whether `value` holds on every worker (on this process outside multi-worker runs)."""
  return _agreed_mean(strategy, [float(value)])[0] == 1.0


def half_precision_runs(precision: str, strategy: tf.distribute.Strategy) -> bool:
  """Whether this CPU runs the convolutions of `precision` (always true for float32 and
  on GPUs and TPUs); see check_precision_runs."""
  return _half_precision_error(precision, strategy) is None


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
  error = _half_precision_error(precision, strategy)
  if error is not None:
    dtype = _HALF_DTYPES[precision]
    raise DistributionError(
        f"--precision={precision} cannot run on this CPU: a {dtype.name} convolution "
        f"fails ({_kernel_message(error)}); TensorFlow's oneDNN {dtype.name} kernels "
        "need AVX-512 on many CPUs. Pass --precision=float32 (or auto: float32 here)")


_HALF_DTYPES = {"mixed_bfloat16": tf.bfloat16, "mixed_float16": tf.float16}


def _half_precision_error(precision: str, strategy: tf.distribute.Strategy
                          ) -> tf.errors.OpError | None:
  """The error of one tiny convolution and its gradients in `precision`'s compute type on
  this CPU, or None where it runs (float32, GPUs and TPUs: nothing to probe)."""
  if precision not in _HALF_DTYPES or _device_type(strategy) != "CPU":
    return None
  dtype = _HALF_DTYPES[precision]
  with tf.init_scope(), tf.device("/CPU:0"):
    images, kernel = tf.ones([1, 4, 4, 2], dtype), tf.ones([3, 3, 2, 2], dtype)
    try:
      with tf.GradientTape() as tape:
        tape.watch([images, kernel])
        output = tf.nn.conv2d(images, kernel, 1, "SAME")
      tape.gradient(output, [images, kernel])
    except tf.errors.OpError as error:
      return error
  return None


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


def check_jit_compile_runs(jit_compile: bool, sync_batch_norm: bool,
                           strategy: tf.distribute.Strategy) -> None:
  """Refuses XLA with --sync_batch_norm on several CPU replicas or workers.

  The synchronised batch norm all-reduces inside the step XLA compiles. TensorFlow
  compiles such an all-reduce only where every device is a GPU (NCCL; MirroredStrategy
  then skips its merge_call) or a TPU; on CPUs the step fails at its first call ("merge_call
  called while defining a new graph"; with merge_call skipped by hand, "Collectives are
  not yet implemented for CPU devices when compiling with XLA").

  Raises:
    DistributionError: for that combination, naming what to pass instead.
  """
  replicas = strategy.num_replicas_in_sync
  if not (jit_compile and sync_batch_norm and replicas > 1) or _device_type(strategy) != "CPU":
    return
  raise DistributionError(
      f"--sync_batch_norm cannot be combined with XLA (--jit_compile=true) on {replicas} CPU "
      "replicas: the synchronised batch norm all-reduces inside the compiled step, and "
      "TensorFlow's XLA compiles cross-replica all-reduces only on GPUs and TPUs; pass "
      "--jit_compile=false (on CPUs XLA is slower than oneDNN anyway) or "
      "--nosync_batch_norm")


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
