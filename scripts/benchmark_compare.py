"""scripts/benchmark.py --compare and --serve: the trainer's step beside our model with
fused and with Keras batch norm, the minimal Keras model and PyTorch (in a subprocess),
timed in interleaved windows; each contender's share of the matmul peak of its compute
type; the report printed. --serve answers one process's windows for compare_settings.py.
"""

import json
import os
import statistics
import sys
import time

from absl import flags, logging

from scripts import window_process
from scripts.benchmark_models import (BareSteps, batch_clock, compile_for_fit, fit_data,
                                      measure_matmul_tflops, minimal_keras_resnet, our_model,
                                      policy, trainable_parameters)

# Defined by scripts/benchmark.py, the script that runs this module.
FLAGS = flags.FLAGS
TORCH_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "results", "checks", "torch_resnet_benchmark.py")


class TrainerSteps:
  """The trainer's own step, built as the trainer builds it (trainer.training.build_training:
  loss with L2 and label smoothing, one all-reduce, gradient norms, NaN guard, metric sums,
  SGD), fed one in-memory uint8 batch; calls of the trainer's steps per execution (1 on
  CPU)."""

  def __init__(self, precision: str | None = None):
    from trainer import config as config_lib, distribute, hardware, schedule, training
    config = config_lib.Config(
        depth=FLAGS.depth, plain=FLAGS.plain, stem=FLAGS.stem, data_source="synthetic",
        epochs=1, steps_per_epoch=10**6, global_batch_size=FLAGS.global_batch_size,
        precision=precision or FLAGS.precision, jit_compile=FLAGS.jit_compile,
        strategy=FLAGS.strategy, cpu_devices=FLAGS.cpu_devices,
        steps_per_execution=FLAGS.steps_per_execution)
    strategy = distribute.make_strategy(config.strategy)
    plan = schedule.make_plan(config, replicas=strategy.num_replicas_in_sync,
                              num_train=FLAGS.global_batch_size * 10**6,
                              num_eval=FLAGS.global_batch_size)
    built = training.build_training(config, strategy, plan,
                                    hardware.resolve(config, strategy), num_classes=10)
    self.state, self.steps = built.state, built.steps
    self.per_call = built.hardware.steps_per_execution
    self.parameters = trainable_parameters(self.state.model)
    self.precision, self.jit_compile = built.hardware.precision, built.hardware.jit_compile
    self.compute_dtype = self.state.model.get_layer("stem_conv").compute_dtype
    self.iterator = training.fixed_batches(strategy, plan.per_replica_batch_size, 10)
    self.step = 0

  def window(self, steps: int) -> float:
    import tensorflow as tf
    start = time.perf_counter()
    end = self.step + steps
    while self.step < end:
      calls = min(self.per_call, end - self.step)
      self.steps.run(self.iterator, tf.constant(self.step, tf.int64),
                     tf.constant(calls, tf.int64))
      self.step += calls
    _ = self.state.optimizer.iterations.numpy()  # Waits for the last step.
    return time.perf_counter() - start


class KerasFitWindows:
  """Keras `fit` of the minimal hand-written model: one fit call per window, timed from
  the end of its first batch to the end of its last (the call's set-up left out)."""

  def __init__(self, model):
    compile_for_fit(model)
    self.model, self.parameters = model, trainable_parameters(model)
    self.data = fit_data(float_inputs=True)

  def window(self, steps: int) -> float:
    clock = batch_clock()
    self.model.fit(self.data, steps_per_epoch=steps + 1, callbacks=[clock], shuffle=False,
                   verbose=0)
    return clock.ends[-1] - clock.ends[0]


class TorchProcess(window_process.WindowProcess):
  """The PyTorch ResNet in a subprocess of --torch_python, trained window by window on
  request (results/checks/torch_resnet_benchmark.py --serve): idle while TensorFlow runs."""

  def __init__(self, python: str, autocast: str | None = None):
    command = [python, TORCH_SCRIPT, "--serve", f"--depth={FLAGS.depth}",
               f"--batch_size={FLAGS.global_batch_size}"]
    if autocast:
      command.append(f"--autocast={autocast}")
    if FLAGS.threads:
      command.append(f"--threads={FLAGS.threads}")
    super().__init__("the PyTorch benchmark", command)
    self.parameters, self.version = self.hello["parameters"], self.hello["torch"]
    self.compute_dtype = autocast or "float32"
    self.threads = self.hello["threads"]


# Contender names, in table order, with what each measures.
CONTENDERS = {
    "trainer": "trainer step (fused batch norm)",
    "ours_fused_bn": "our model, bare step, fused batch norm",
    "ours_keras_bn": "our model, bare step, Keras batch norm",
    "minimal_keras": "minimal hand-written Keras, fit",
    "pytorch": "PyTorch (eager, channels_last)",
    "pytorch_mixed_bfloat16": "PyTorch, autocast bfloat16",
}


def _label(name: str) -> str:
  if name.startswith("trainer_"):
    return f"trainer step, {name[len('trainer_'):]}"
  return CONTENDERS[name]


def _build_contenders() -> dict:
  """Every contender the flags ask for, built (and its dtype policy set) in turn."""
  import keras
  contenders = {}
  # Each sets the global policy (build_state); a model keeps the policy it was built with.
  for precision in FLAGS.compare_precisions:
    contenders[f"trainer_{precision}"] = TrainerSteps(precision)
  contenders = {"trainer": TrainerSteps(), **contenders}
  if FLAGS.bn_twin:
    contenders["ours_fused_bn"] = BareSteps(our_model(fused_batch_norm=True))
    contenders["ours_keras_bn"] = BareSteps(our_model(fused_batch_norm=False))
  keras.mixed_precision.set_global_policy(policy())
  contenders["minimal_keras"] = KerasFitWindows(
      minimal_keras_resnet(FLAGS.depth, FLAGS.plain, FLAGS.stem))
  if FLAGS.torch_python:
    contenders["pytorch"] = TorchProcess(FLAGS.torch_python)
    if "mixed_bfloat16" in FLAGS.compare_precisions:
      contenders["pytorch_mixed_bfloat16"] = TorchProcess(FLAGS.torch_python, "bfloat16")
  return contenders


def _interleaved_seconds(contenders: dict) -> dict[str, list[float]]:
  """Seconds of every timed window of each contender; windows run in rounds of one window
  each, the order rotating every round, so drift of the machine hits all alike."""
  for contender in contenders.values():
    contender.window(2)  # Traces and compiles; never timed.
  names = list(contenders)
  seconds = {name: [] for name in names}
  for round_ in range(FLAGS.warmup_windows + FLAGS.windows):
    shift = round_ % len(names)
    for name in names[shift:] + names[:shift]:
      elapsed = contenders[name].window(FLAGS.window_steps)
      if round_ >= FLAGS.warmup_windows:
        seconds[name].append(elapsed)
    logging.info("round %d/%d done", round_ + 1, FLAGS.warmup_windows + FLAGS.windows)
  return seconds


def run_comparison() -> dict:
  """The --compare report: images/s of each contender, and paired ratios."""
  import keras
  contenders = _build_contenders()
  try:
    seconds = _interleaved_seconds(contenders)
  finally:
    for name in ("pytorch", "pytorch_mixed_bfloat16"):
      if name in contenders:
        contenders[name].close()
    keras.mixed_precision.set_global_policy("float32")
  images = FLAGS.window_steps * FLAGS.global_batch_size
  rates = {name: [images / s for s in times] for name, times in seconds.items()}
  trainer = contenders["trainer"]
  report = {
      "model": trainer.state.model.name, "global_batch_size": FLAGS.global_batch_size,
      "precision": trainer.precision, "jit_compile": trainer.jit_compile,
      "threads": FLAGS.threads, "window_steps": FLAGS.window_steps,
      "windows": FLAGS.windows, "contenders": {
          name: {"images_per_second": statistics.median(rates[name]),
                 "window_images_per_second": rates[name],
                 "parameters": contenders[name].parameters,
                 # The trainer contenders' policy, as their model computes.
                 "compute_dtype": getattr(contenders[name], "compute_dtype", None)}
          for name in contenders}}
  if "pytorch" in contenders:
    report["torch"] = contenders["pytorch"].version
    report["torch_threads"] = contenders["pytorch"].threads
  _add_shares_of_peak(report, trainer.state.model)
  pairs = [("trainer", "pytorch"), ("minimal_keras", "pytorch"),
           ("trainer", "minimal_keras"), ("ours_fused_bn", "ours_keras_bn")] + [
               (f"trainer_{precision}", "trainer") for precision in FLAGS.compare_precisions] + [
               ("trainer_mixed_bfloat16", "pytorch_mixed_bfloat16")]
  for a, b in pairs:
    if a in rates and b in rates:
      # Median of the ratios within each round: robust to the machine's drift.
      report[f"{a}_vs_{b}"] = statistics.median(x / y for x, y in zip(rates[a], rates[b]))
  return report


def _add_shares_of_peak(report: dict, model) -> None:
  """Each contender's training FLOP rate as a share of this machine's matmul peak in its
  compute type (measured here, with the same threads, after the timed rounds)."""
  from scripts import flops
  # Backward costs about twice the forward pass (gradients w.r.t. inputs and weights).
  training = 3 * flops.forward_flops(model)
  policy_dtype = {"mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}.get(
      policy(), "float32")
  dtypes = {name: figures["compute_dtype"] or policy_dtype
            for name, figures in report["contenders"].items()}
  peaks = {dtype: measure_matmul_tflops(dtype, FLAGS.matmul_size)
           for dtype in sorted(set(dtypes.values()))}
  report["training_flops_per_image"] = training
  report["matmul_peak_tflops"] = peaks
  for name, figures in report["contenders"].items():
    figures["share_of_peak"] = (figures["images_per_second"] * training / 1e12
                                / peaks[dtypes[name]])


def print_comparison(report: dict) -> None:
  print(f"\n{report['model']}, global batch {report['global_batch_size']}, "
        f"{report['precision']}, XLA {'on' if report['jit_compile'] else 'off'}, threads "
        f"{report['threads'] or 'default'}; {report['windows']} interleaved windows of "
        f"{report['window_steps']} steps each")
  peaks = ", ".join(f"{dtype} {tflops:.3f}" for dtype, tflops
                    in report["matmul_peak_tflops"].items())
  print(f"training {report['training_flops_per_image'] / 1e9:.3f} GFLOP per image; "
        f"measured matmul peak, TFLOP/s: {peaks}")
  print(f"{'contender':<42}{'parameters':>12}{'img/s':>9}{'of peak':>9}  windows (img/s)")
  for name, figures in report["contenders"].items():
    windows = ", ".join(f"{r:.1f}" for r in figures["window_images_per_second"])
    print(f"{_label(name):<42}{figures['parameters']:>12,}"
          f"{figures['images_per_second']:>9.1f}{figures['share_of_peak']:>9.1%}  {windows}")
  for key, value in report.items():
    if "_vs_" in key:
      print(f"{key}: {value:.3f} (median of per-round ratios)")
  print(json.dumps(report))


def serve_windows(contender) -> None:
  """Answers every "STEPS" line on stdin with the seconds those steps took (JSON), after
  one untimed window that traces and compiles."""
  contender.window(2)
  print(json.dumps({"ready": True, "parameters": contender.parameters}), flush=True)
  for line in sys.stdin:
    if line.strip():
      print(json.dumps({"seconds": contender.window(int(line))}), flush=True)
