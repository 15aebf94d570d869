"""Training throughput of the real trainer: images/s, step time, FLOPs and utilisation.

  python scripts/benchmark.py --depth=20 [--plain] [--global_batch_size=128]
      [--precision=...] [--jit_compile=...] [--strategy=...] [--data_source=synthetic]

Runs trainer.train.train_and_evaluate for warm-up plus timed windows (reading images/s
per window from its TensorBoard events), measures a matrix-multiplication peak on the
same device and precision, and a minimal hand-written Keras `fit` of the same model as a
baseline. The last line printed is a JSON object.
"""

import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

flags.DEFINE_integer("depth", 20, "ResNet depth.")
flags.DEFINE_boolean("plain", False, "Benchmark the plain twin.")
flags.DEFINE_enum("stem", "cifar", ["cifar", "imagenet"], "Stem.")
flags.DEFINE_integer("global_batch_size", 128, "Examples per step over all replicas.")
flags.DEFINE_string("precision", "float32", "Keras dtype policy (or auto).")
flags.DEFINE_string("jit_compile", "false", "auto, true or false.")
flags.DEFINE_string("strategy", "default", "As trainer.main --strategy.")
flags.DEFINE_integer("cpu_devices", 1, "Logical CPU devices (for --strategy=mirrored).")
flags.DEFINE_integer("steps_per_execution", None, "Training steps per call (default: as "
                     "trainer.main, 100 on GPUs and TPUs, 1 on CPU).")
flags.DEFINE_enum("data_source", "synthetic", ["synthetic", "folder", "tfds"], "Data.")
flags.DEFINE_string("data_dir", None, "Data dir for folder or tfds.")
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
FLAGS = flags.FLAGS


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


def time_keras_fit(model, float_inputs: bool) -> float:
  """images/s of a plain Keras 3 `fit` of `model` on one in-memory batch (median window)."""
  import keras
  import numpy as np
  import tensorflow as tf
  model.compile(keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                jit_compile=FLAGS.jit_compile == "true")
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (FLAGS.global_batch_size, 32, 32, 3), dtype=np.uint8)
  if float_inputs:
    images = (images / 255.0).astype(np.float32)
  labels = rng.integers(0, 10, (FLAGS.global_batch_size,), dtype=np.int32)
  dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()

  class Clock(keras.callbacks.Callback):
    # One fit call for every window: each fit call has a fixed set-up cost that a long
    # training run pays once.
    def __init__(self):
      super().__init__()
      self.ends = []

    def on_train_batch_end(self, batch, logs=None):
      self.ends.append(time.perf_counter())

  clock = Clock()
  windows = FLAGS.warmup_windows + FLAGS.windows
  model.fit(dataset, steps_per_epoch=FLAGS.window_steps * windows, callbacks=[clock],
            verbose=0)
  rates = []
  for window in range(FLAGS.warmup_windows, windows):
    first, last = window * FLAGS.window_steps - 1, (window + 1) * FLAGS.window_steps - 1
    rates.append(FLAGS.window_steps * FLAGS.global_batch_size
                 / (clock.ends[last] - clock.ends[first]))
  return statistics.median(rates)


def _our_model():
  """Our ResNet as the trainer builds it, under the benchmark's dtype policy (set here)."""
  import keras
  from input_pipeline import pipeline
  from trainer import resnet
  keras.mixed_precision.set_global_policy(
      "float32" if FLAGS.precision == "auto" else FLAGS.precision)
  return resnet.build_model(resnet.architecture(FLAGS.depth, plain=FLAGS.plain,
                                                stem=FLAGS.stem),
                            input_mean=pipeline.CIFAR10_MEAN, input_std=pipeline.CIFAR10_STD)


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


def measure_compute_step_ms() -> float:
  """The compute floor: ms per training step of our model with nothing else around it.

  One tf.function runs window_steps steps (forward, backward, SGD update) on one
  in-memory batch: no input pipeline, no metrics, no Python between steps.
  """
  import keras
  import numpy as np
  import tensorflow as tf
  model = _our_model()
  optimizer = keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True)
  optimizer.build(model.trainable_variables)
  rng = np.random.default_rng(0)
  images = tf.constant(rng.integers(0, 256, (FLAGS.global_batch_size, 32, 32, 3),
                                    dtype=np.uint8))
  labels = tf.constant(rng.integers(0, 10, (FLAGS.global_batch_size,), dtype=np.int32))

  def step(images, labels):
    with tf.GradientTape() as tape:
      logits = model(images, training=True)
      loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
          labels, logits, from_logits=True))
      scaled = optimizer.scale_loss(loss)
    optimizer.apply_gradients(zip(tape.gradient(scaled, model.trainable_variables),
                                  model.trainable_variables))

  if FLAGS.jit_compile == "true":
    step = tf.function(step, jit_compile=True)

  @tf.function
  def loop(num_steps, images, labels):
    for _ in tf.range(num_steps):
      step(images, labels)

  loop(tf.constant(FLAGS.window_steps * FLAGS.warmup_windows), images, labels)
  times = []
  for _ in range(FLAGS.windows):
    start = time.perf_counter()
    loop(tf.constant(FLAGS.window_steps), images, labels)
    _ = optimizer.iterations.numpy()  # Waits for the last step.
    times.append((time.perf_counter() - start) / FLAGS.window_steps * 1000)
  keras.mixed_precision.set_global_policy("float32")
  return statistics.median(times)


def main(argv):
  del argv
  import tensorflow as tf
  from scripts import flops
  from trainer import distribute, resnet
  distribute.configure_cpu_devices(FLAGS.cpu_devices)
  tf.get_logger().setLevel("WARNING")
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
  app.run(main)
