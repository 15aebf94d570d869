"""The hardware settings of a run, resolved from their "auto" values for its strategy:
--precision (on a CPU, by timing the run's own step at float32 and mixed_bfloat16),
--jit_compile and --steps_per_execution; and the combinations refused up front."""

import tensorflow as tf

from trainer import distribute, precision_probe, schedule
from trainer.config import Config
from trainer.errors import ConfigError
from trainer.training import Hardware


def resolve(config: Config, strategy: tf.distribute.Strategy,
            plan: schedule.Plan | None = None, num_classes: int = 0,
            recorded_precision: str | None = None) -> Hardware:
  """Resolves --precision, --jit_compile and --steps_per_execution for the strategy.

  Args:
    plan, num_classes: a training run's; with them, --precision=auto on a CPU times the
      run's network at float32 and mixed_bfloat16 when the run is long enough
      (distribute.choose_cpu_precision); without (benchmarks), it is float32 there.
    recorded_precision: what a resumed auto run resolved to (run_dir.recorded_precision),
      kept on a CPU: its precision must not change with a timing mid-way.
  Raises:
    ConfigError: for --deterministic with XLA on the imagenet stem (also when "auto"
      chose XLA, as on a GPU).
    DistributionError: for a precision policy this CPU cannot run, and for XLA with
      --sync_batch_norm on several CPU replicas.
  """
  jit_compile = distribute.resolve_jit_compile(config.jit_compile, strategy)
  # Before --precision=auto's probe: a refused run should not wait for a measurement.
  distribute.check_jit_compile_runs(jit_compile, config.sync_batch_norm, strategy)
  cpu_run = None if plan is None else distribute.CpuRun(
      network=config.architecture().name, total_steps=plan.total_steps,
      deterministic=config.deterministic, recorded=recorded_precision,
      seconds_per_step=lambda: precision_probe.seconds_per_step(
          config, strategy, plan, num_classes, jit_compile))
  hardware = Hardware(
      precision=distribute.resolve_precision(config.precision, strategy, cpu_run),
      jit_compile=jit_compile,
      steps_per_execution=distribute.resolve_steps_per_execution(
          config.steps_per_execution, strategy))
  if config.deterministic and hardware.jit_compile and config.stem == "imagenet":
    raise ConfigError(f"--deterministic cannot be combined with XLA (--jit_compile="
                      f"{config.jit_compile}, on here) for --stem=imagenet: XLA has no "
                      "deterministic max-pool gradient; pass --jit_compile=false")
  distribute.check_precision_runs(hardware.precision, strategy)
  return hardware
