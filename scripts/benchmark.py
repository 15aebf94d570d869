"""Training throughput of the real trainer: images/s, step time, FLOPs and utilisation.

  python scripts/benchmark.py --depth=20 [--plain] [--global_batch_size=128]
      [--precision=...] [--jit_compile=...] [--strategy=...] [--data_source=synthetic]
  python scripts/benchmark.py --compare --depth=20 --threads=2 \
      [--torch_python=/tmp/torch-venv/bin/python] [--compare_precisions=mixed_bfloat16]

Runs trainer.train.train_and_evaluate for warm-up plus timed windows (reading images/s
per window from its TensorBoard events), measures a matrix-multiplication peak on the
same device and precision, and a minimal hand-written Keras `fit` of the same model as a
baseline. With --compare it instead interleaves, window by window, the trainer's step,
our model with fused and with Keras batch norm, the minimal Keras model and (with
--torch_python) an independent PyTorch ResNet in a subprocess
(results/checks/torch_resnet_benchmark.py; with --compare_precisions=mixed_bfloat16 also
the trainer in bfloat16 and PyTorch under torch.autocast in bfloat16), and gives each
contender's share of the measured matmul peak. The last line printed is a JSON object.
"""

import json
import math
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from trainer import cli, flag_definitions  # noqa: E402
from scripts import window_process  # noqa: E402

# The trainer's flags (trainer/flag_definitions.py), with this script's defaults.
flag_definitions.define(
    "depth", "plain", "stem", "global_batch_size", "precision", "jit_compile", "strategy",
    "cpu_devices", "steps_per_execution", "data_source", "data_dir",
    defaults={"depth": 20, "precision": "float32", "jit_compile": "false",
              "strategy": "default", "data_source": "synthetic"},
    notes={"precision": "auto is float32 for the Keras baselines, the bare steps and the "
                        "matmul peak."})
flags.DEFINE_integer("window_steps", 10, "Steps per timed window.")
flags.DEFINE_integer("windows", 3, "Timed windows (the median is reported).")
flags.DEFINE_integer("warmup_windows", 1, "Windows run before timing.")
flags.DEFINE_float("peak_tflops", None, "Peak of the device; default: measured matmul rate.")
flags.DEFINE_integer("matmul_size", 2048, "Side of the square matrices of the peak "
                     "measurement (8192 or more on large GPUs).")
flags.DEFINE_boolean("baseline", True, "Also time Keras model.fit of our model and of a "
                     "minimal hand-written Keras ResNet of the same architecture.")
flags.DEFINE_boolean("overhead", True, "Also time the compute floor (training steps alone) "
                     "and report the trainer's per-step overhead.")
flags.DEFINE_integer("threads", None, "TensorFlow's intra- and inter-op threads, and "
                     "PyTorch's threads with --torch_python (default: each library's own).")
flags.DEFINE_boolean("compare", False, "Instead of the trainer report: interleaved windows "
                     "of the trainer's step, our model with fused and with Keras batch norm, "
                     "the minimal Keras model and, with --torch_python, PyTorch; on one "
                     "in-memory batch each.")
flags.DEFINE_string("torch_python", None, "With --compare: the python of a venv with torch "
                    "(see results/checks/torch_resnet_benchmark.py), which runs the PyTorch "
                    "ResNet in a subprocess.")
flags.DEFINE_boolean("bn_twin", True, "With --compare: also time our model's bare training "
                     "step with fused and with Keras batch norm.")
flags.DEFINE_boolean("serve", False, "Instead of a report: build the trainer's step (as "
                     "--compare does) and, for every line STEPS on stdin, train that many "
                     "steps and answer {\"seconds\": ...} on stdout (scripts/"
                     "compare_settings.py runs one such process per setting).")
flags.DEFINE_list("compare_precisions", [], "With --compare: also time the trainer's step "
                  "at each of these precisions (e.g. mixed_bfloat16), in the same rounds.")
FLAGS = flags.FLAGS
TORCH_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "results", "checks", "torch_resnet_benchmark.py")


def measure_matmul_tflops(dtype: str, size: int, repeats: int = 10) -> float:
  """Measured dense matmul rate (TFLOP/s) at `dtype` on the default device.

  `repeats` dependent matmuls run in one call, so a GPU's launch latency does not hide
  its rate; the median of 5 calls is taken.
  """
  import tensorflow as tf
  a = tf.cast(tf.random.normal([size, size], dtype=tf.float32) / size**0.5, dtype)

  @tf.function
  def chain(x):
    for _ in range(repeats):
      x = tf.matmul(x, a)
    return x

  chain(a).numpy()
  times = []
  for _ in range(5):
    start = time.perf_counter()
    chain(a).numpy()
    times.append(time.perf_counter() - start)
  return repeats * 2 * size**3 / statistics.median(times) / 1e12


def _scalars(log_dir: str, tag: str) -> list[tuple[int, float]]:
  import tensorflow as tf
  values = []
  for name in sorted(os.listdir(log_dir)):
    if name.startswith("events.out.tfevents"):
      for event in tf.compat.v1.train.summary_iterator(os.path.join(log_dir, name)):
        for value in event.summary.value:
          if value.tag == tag:
            values.append((event.step, float(tf.make_ndarray(value.tensor))))
  return sorted(values)


def run_trainer(data_source: str, data_dir: str | None) -> dict:
  """Trains warm-up + timed windows with the real trainer; returns median figures."""
  from trainer import config as config_lib, distribute, run_files, train
  steps = FLAGS.window_steps * (FLAGS.warmup_windows + FLAGS.windows)
  with tempfile.TemporaryDirectory() as model_dir:
    config = config_lib.Config(
        depth=FLAGS.depth, plain=FLAGS.plain, stem=FLAGS.stem, data_source=data_source,
        data_dir=data_dir, epochs=1, steps_per_epoch=steps, eval_steps=1,
        global_batch_size=FLAGS.global_batch_size, precision=FLAGS.precision,
        jit_compile=FLAGS.jit_compile, strategy=FLAGS.strategy,
        cpu_devices=FLAGS.cpu_devices, steps_per_execution=FLAGS.steps_per_execution,
        log_every_steps=FLAGS.window_steps, checkpoint_every_steps=10**9,
        model_dir=model_dir)
    strategy = distribute.make_strategy(config.strategy)
    metrics = train.train_and_evaluate(config, strategy)
    rates = _scalars(os.path.join(model_dir, run_files.TRAIN_EVENTS), "images_per_second")
    step_ms = _scalars(os.path.join(model_dir, run_files.TRAIN_EVENTS), "step_time_ms")
  timed = [r for s, r in rates if s > FLAGS.window_steps * FLAGS.warmup_windows]
  timed_ms = [r for s, r in step_ms if s > FLAGS.window_steps * FLAGS.warmup_windows]
  return {"images_per_second": statistics.median(timed),
          "step_time_ms": statistics.median(timed_ms), "windows": timed,
          "replicas": metrics["replicas"], "precision": metrics["precision"],
          "jit_compile": metrics["jit_compile"], "model": metrics["model"]}


def minimal_keras_resnet(depth: int, plain: bool, stem: str):
  """A minimal hand-written Keras 3 ResNet, independent of trainer/resnet.py.

  What a careful user would write in an afternoon: float inputs, "same" padding
  everywhere, Keras batch norm; projection shortcuts for the ImageNet-style depths and
  option A (subsample, zero-pad channels) for the CIFAR family, as in trainer/resnet.py,
  so the parameter counts match.
  """
  import keras
  from keras import layers, ops
  table = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
           50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3)),
           152: ("bottleneck", (3, 8, 36, 3))}
  if depth in table:
    block, sizes, widths, option_a = *table[depth], (64, 128, 256, 512), False
  else:
    block, sizes, widths, option_a = "basic", ((depth - 2) // 6,) * 3, (16, 32, 64), True

  def conv_bn(x, filters, kernel, strides, relu):
    x = layers.Conv2D(filters, kernel, strides, padding="same", use_bias=False,
                      kernel_initializer="he_normal")(x)
    x = layers.BatchNormalization(epsilon=1e-5)(x)
    return layers.ReLU()(x) if relu else x

  def shortcut(x, channels, strides):
    if strides == 1 and x.shape[-1] == channels:
      return x
    if not option_a:
      return conv_bn(x, channels, 1, strides, relu=False)
    extra = channels - x.shape[-1]
    return layers.Lambda(lambda t: ops.pad(
        t[:, ::strides, ::strides, :], [[0, 0], [0, 0], [0, 0], [extra // 2, extra - extra // 2]]
    ))(x)

  inputs = keras.Input((32, 32, 3))
  if stem == "imagenet":
    x = conv_bn(inputs, widths[0], 7, 2, relu=True)
    x = layers.MaxPooling2D(3, 2, padding="same")(x)
  else:
    x = conv_bn(inputs, widths[0], 3, 1, relu=True)
  for stage, (blocks, width) in enumerate(zip(sizes, widths)):
    for index in range(blocks):
      strides = 2 if stage and not index else 1
      if block == "basic":
        channels = width
        y = conv_bn(x, width, 3, strides, relu=True)
        y = conv_bn(y, width, 3, 1, relu=False)
      else:
        channels = 4 * width
        y = conv_bn(x, width, 1, 1, relu=True)
        y = conv_bn(y, width, 3, strides, relu=True)
        y = conv_bn(y, channels, 1, 1, relu=False)
      x = layers.ReLU()(y if plain else layers.Add()([shortcut(x, channels, strides), y]))
  x = layers.GlobalAveragePooling2D()(x)
  return keras.Model(inputs, layers.Dense(10, dtype="float32")(x))


def _batch_clock():
  """A Keras callback recording when each training batch ends (perf_counter) in `ends`.

  Defined here, not at module level: Keras loads only after the flags are parsed.
  """
  import keras

  class BatchClock(keras.callbacks.Callback):
    def __init__(self):
      super().__init__()
      self.ends = []

    def on_train_batch_end(self, batch, logs=None):
      self.ends.append(time.perf_counter())

  return BatchClock()


def _fit_data(float_inputs: bool):
  """One random in-memory batch, repeated: uint8 images (or floats in [0, 1]), labels."""
  import numpy as np
  import tensorflow as tf
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (FLAGS.global_batch_size, 32, 32, 3), dtype=np.uint8)
  if float_inputs:
    images = (images / 255.0).astype(np.float32)
  labels = rng.integers(0, 10, (FLAGS.global_batch_size,), dtype=np.int32)
  return tf.data.Dataset.from_tensors((images, labels)).repeat()


def _compile_for_fit(model) -> None:
  import keras
  model.compile(keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                jit_compile=FLAGS.jit_compile == "true")


def time_keras_fit(model, float_inputs: bool) -> float:
  """images/s of a plain Keras 3 `fit` of `model` on one in-memory batch (median window)."""
  _compile_for_fit(model)
  # One fit call for every window: each fit call has a fixed set-up cost that a long
  # training run pays once.
  clock = _batch_clock()
  windows = FLAGS.warmup_windows + FLAGS.windows
  model.fit(_fit_data(float_inputs), steps_per_epoch=FLAGS.window_steps * windows,
            callbacks=[clock], verbose=0)
  rates = []
  for window in range(FLAGS.warmup_windows, windows):
    first, last = window * FLAGS.window_steps - 1, (window + 1) * FLAGS.window_steps - 1
    rates.append(FLAGS.window_steps * FLAGS.global_batch_size
                 / (clock.ends[last] - clock.ends[first]))
  return statistics.median(rates)


def _policy() -> str:
  return "float32" if FLAGS.precision == "auto" else FLAGS.precision


def _our_model(fused_batch_norm: bool = True):
  """Our ResNet as the trainer builds it, under the benchmark's dtype policy (set here)."""
  import keras
  from input_pipeline import pipeline
  from trainer import resnet
  keras.mixed_precision.set_global_policy(_policy())
  return resnet.build_model(resnet.architecture(FLAGS.depth, plain=FLAGS.plain,
                                                stem=FLAGS.stem),
                            input_mean=pipeline.CIFAR10_MEAN, input_std=pipeline.CIFAR10_STD,
                            fused_batch_norm=fused_batch_norm)


def run_keras_baselines() -> dict:
  """Keras `fit` of our model, and of the minimal hand-written one: images/s of each."""
  import keras
  ours = _our_model()
  minimal = minimal_keras_resnet(FLAGS.depth, FLAGS.plain, FLAGS.stem)
  result = {"keras_fit": time_keras_fit(ours, float_inputs=False),
            "minimal_keras": time_keras_fit(minimal, float_inputs=True),
            "minimal_keras_parameters": minimal.count_params(),
            "parameters": ours.count_params()}
  keras.mixed_precision.set_global_policy("float32")
  return result


def trainable_parameters(model) -> int:
  """What PyTorch's parameters() counts: trainable weights (no batch-norm statistics)."""
  return sum(math.prod(w.shape) for w in model.trainable_weights)


class BareSteps:
  """A model's training step with nothing else around it: forward, backward, SGD update
  on one in-memory uint8 batch; `window(steps)` runs them in one tf.function call (no
  input pipeline, no metrics, no Python between steps) and returns the seconds."""

  def __init__(self, model):
    import keras
    import numpy as np
    import tensorflow as tf
    self.model, self.parameters = model, trainable_parameters(model)
    self.optimizer = keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True)
    self.optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    self.images = tf.constant(rng.integers(0, 256, (FLAGS.global_batch_size, 32, 32, 3),
                                           dtype=np.uint8))
    self.labels = tf.constant(rng.integers(0, 10, (FLAGS.global_batch_size,),
                                           dtype=np.int32))
    self._step = (tf.function(self._train_step, jit_compile=True)
                  if FLAGS.jit_compile == "true" else self._train_step)
    self._loop = tf.function(self._train_loop)

  def _train_step(self, images, labels):
    import keras
    import tensorflow as tf
    model, optimizer = self.model, self.optimizer
    with tf.GradientTape() as tape:
      logits = model(images, training=True)
      loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
          labels, logits, from_logits=True))
      scaled = optimizer.scale_loss(loss)
    optimizer.apply_gradients(zip(tape.gradient(scaled, model.trainable_variables),
                                  model.trainable_variables))

  def _train_loop(self, num_steps, images, labels):
    import tensorflow as tf
    for _ in tf.range(num_steps):
      self._step(images, labels)

  def window(self, steps: int) -> float:
    import tensorflow as tf
    start = time.perf_counter()
    self._loop(tf.constant(steps), self.images, self.labels)
    _ = self.optimizer.iterations.numpy()  # Waits for the last step.
    return time.perf_counter() - start


def measure_compute_step_ms() -> float:
  """The compute floor: ms per training step of our model with nothing else around it."""
  import keras
  bare = BareSteps(_our_model())
  bare.window(FLAGS.window_steps * FLAGS.warmup_windows)
  times = [bare.window(FLAGS.window_steps) / FLAGS.window_steps * 1000
           for _ in range(FLAGS.windows)]
  keras.mixed_precision.set_global_policy("float32")
  return statistics.median(times)


# --- Interleaved comparison (--compare) --------------------------------------------------

class TrainerSteps:
  """The trainer's own step (trainer.steps.TrainSteps: loss with L2 and label smoothing,
  gradient norms, NaN guard, metric sums, SGD) on the state trainer.state builds, fed one
  in-memory uint8 batch; calls of the trainer's steps per execution (1 on CPU)."""

  def __init__(self, precision: str | None = None):
    import numpy as np
    import tensorflow as tf
    from trainer import config as config_lib, distribute, schedule, state, steps, train
    config = config_lib.Config(
        depth=FLAGS.depth, plain=FLAGS.plain, stem=FLAGS.stem, data_source="synthetic",
        epochs=1, steps_per_epoch=10**6, global_batch_size=FLAGS.global_batch_size,
        precision=precision or FLAGS.precision, jit_compile=FLAGS.jit_compile,
        strategy=FLAGS.strategy, cpu_devices=FLAGS.cpu_devices,
        steps_per_execution=FLAGS.steps_per_execution)
    strategy = distribute.make_strategy(config.strategy)
    hardware = train.resolve_hardware(config, strategy)
    plan = schedule.make_plan(config, replicas=strategy.num_replicas_in_sync,
                              num_train=FLAGS.global_batch_size * 10**6,
                              num_eval=FLAGS.global_batch_size)
    self.state = state.build_state(config, strategy, 10, plan, hardware.precision)
    self.steps = steps.TrainSteps(config, strategy, self.state, 10, hardware.jit_compile)
    self.per_call = hardware.steps_per_execution
    self.parameters = trainable_parameters(self.state.model)
    self.precision, self.jit_compile = hardware.precision, hardware.jit_compile
    self.compute_dtype = self.state.model.get_layer("stem_conv").compute_dtype
    rng = np.random.default_rng(0)
    per_replica = plan.per_replica_batch_size
    batch = (rng.integers(0, 256, (per_replica, 32, 32, 3), dtype=np.uint8),
             rng.integers(0, 10, (per_replica,), dtype=np.int32))
    self.iterator = iter(strategy.distribute_datasets_from_function(
        lambda context: tf.data.Dataset.from_tensors(batch).repeat()))
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
    _compile_for_fit(model)
    self.model, self.parameters = model, trainable_parameters(model)
    self.data = _fit_data(float_inputs=True)

  def window(self, steps: int) -> float:
    clock = _batch_clock()
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
    contenders["ours_fused_bn"] = BareSteps(_our_model(fused_batch_norm=True))
    contenders["ours_keras_bn"] = BareSteps(_our_model(fused_batch_norm=False))
  keras.mixed_precision.set_global_policy(_policy())
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
      _policy(), "float32")
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


def _check_flags() -> None:
  """Refuses, before TensorFlow loads, what cannot run: exit 2 with `error: ...`."""
  from trainer import architecture
  try:
    architecture.architecture(FLAGS.depth, plain=FLAGS.plain, stem=FLAGS.stem)
  except ValueError as e:
    cli.fail(f"--depth={FLAGS.depth}: {e}")
  if FLAGS.compare_precisions and not FLAGS.compare:
    cli.fail("--compare_precisions needs --compare")
  for precision in FLAGS.compare_precisions:
    if precision not in ("float32", "mixed_float16", "mixed_bfloat16"):
      cli.fail(f"--compare_precisions: {precision!r} is not float32, mixed_float16 or "
               "mixed_bfloat16")
  if not FLAGS.torch_python:
    return
  if not FLAGS.compare:
    cli.fail("--torch_python needs --compare")
  if not (os.path.isfile(FLAGS.torch_python) and os.access(FLAGS.torch_python, os.X_OK)):
    cli.fail(f"--torch_python={FLAGS.torch_python} is not an executable file (a venv's "
             "bin/python with torch installed)")
  if _policy() != "float32" or FLAGS.plain or FLAGS.stem != "cifar":
    cli.fail("the PyTorch model is the residual network with the CIFAR stem, float32 (and, "
             "with --compare_precisions=mixed_bfloat16, also under torch.autocast in "
             "bfloat16): drop --precision, --plain and --stem")
  if FLAGS.depth in (34, 101, 152):  # Every other depth the table builds, PyTorch's has.
    cli.fail("the PyTorch model has depths 18, 50 and 6n+2")


def main(argv):
  del argv
  _check_flags()
  cli.import_tensorflow()
  import tensorflow as tf
  from scripts import flops
  from trainer import distribute, resnet
  if FLAGS.threads:
    # Before TensorFlow starts its runtime; PyTorch gets the same count (TorchProcess).
    tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
    tf.config.threading.set_inter_op_parallelism_threads(FLAGS.threads)
  distribute.configure_cpu_devices(FLAGS.cpu_devices)
  tf.get_logger().setLevel("WARNING")
  if FLAGS.serve:
    serve_windows(TrainerSteps())
    return
  if FLAGS.compare:
    print_comparison(run_comparison())
    return
  model = resnet.build_resnet(FLAGS.depth, plain=FLAGS.plain, stem=FLAGS.stem)
  forward = flops.forward_flops(model)
  # Backward costs about twice the forward pass (gradients w.r.t. inputs and weights).
  training = 3 * forward
  matmul_dtype = {"mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}.get(
      FLAGS.precision, "float32")
  peak = FLAGS.peak_tflops or measure_matmul_tflops(matmul_dtype, FLAGS.matmul_size)
  logging.info("peak %.3f TFLOP/s (%s)", peak, "given" if FLAGS.peak_tflops else
               f"measured {matmul_dtype} matmul")

  result = run_trainer(FLAGS.data_source, FLAGS.data_dir)
  achieved = result["images_per_second"] * training / 1e12
  report = {
      "model": result["model"], "global_batch_size": FLAGS.global_batch_size,
      "replicas": result["replicas"], "precision": result["precision"],
      "jit_compile": result["jit_compile"], "data_source": FLAGS.data_source,
      "images_per_second": result["images_per_second"],
      "step_time_ms": result["step_time_ms"],
      "window_images_per_second": result["windows"],
      "flops_per_image": {"forward": forward, "training": training},
      "achieved_tflops": achieved, "peak_tflops": peak, "utilisation": achieved / peak,
  }
  if FLAGS.data_source != "synthetic":
    synthetic = run_trainer("synthetic", None)
    report["synthetic_images_per_second"] = synthetic["images_per_second"]
    report["input_bound_ratio"] = result["images_per_second"] / synthetic["images_per_second"]
  if FLAGS.overhead:
    compute_ms = measure_compute_step_ms()
    report["compute_step_time_ms"] = compute_ms
    # What the trainer adds per step: input, metrics, host round-trips, Python.
    report["overhead_fraction"] = (report["step_time_ms"] - compute_ms) / report["step_time_ms"]
  if FLAGS.baseline:
    baselines = run_keras_baselines()
    report["keras_fit_images_per_second"] = baselines["keras_fit"]
    report["vs_keras_fit"] = result["images_per_second"] / baselines["keras_fit"]
    report["minimal_keras_images_per_second"] = baselines["minimal_keras"]
    report["vs_minimal_keras"] = result["images_per_second"] / baselines["minimal_keras"]
    report["parameters"] = baselines["parameters"]
    report["minimal_keras_parameters"] = baselines["minimal_keras_parameters"]

  print(f"\n{'model':<12}{'batch':>7}{'img/s':>10}{'step ms':>10}{'GFLOP/img':>11}"
        f"{'TFLOP/s':>9}{'peak':>8}{'util':>7}")
  print(f"{report['model']:<12}{FLAGS.global_batch_size:>7}"
        f"{report['images_per_second']:>10.1f}{report['step_time_ms']:>10.1f}"
        f"{training / 1e9:>11.3f}{achieved:>9.3f}{peak:>8.3f}{report['utilisation']:>7.1%}")
  if "input_bound_ratio" in report:
    print(f"synthetic data: {report['synthetic_images_per_second']:.1f} img/s; "
          f"real/synthetic = {report['input_bound_ratio']:.3f}")
  if "overhead_fraction" in report:
    print(f"compute floor (training steps alone, no input or metrics): "
          f"{report['compute_step_time_ms']:.1f} ms/step; trainer overhead = "
          f"{report['overhead_fraction']:.1%} of its step time")
  if "keras_fit_images_per_second" in report:
    print(f"Keras fit of our model: {report['keras_fit_images_per_second']:.1f} img/s; "
          f"trainer/keras = {report['vs_keras_fit']:.3f}")
    print(f"minimal hand-written Keras ResNet ({report['minimal_keras_parameters']:,} "
          f"parameters, ours {report['parameters']:,}): "
          f"{report['minimal_keras_images_per_second']:.1f} img/s; trainer/minimal = "
          f"{report['vs_minimal_keras']:.3f}")
  print(json.dumps(report))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.script_parser)
