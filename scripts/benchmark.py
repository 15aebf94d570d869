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
flags.DEFINE_boolean("baseline", True, "Also time a minimal Keras model.fit of the model.")
FLAGS = flags.FLAGS


def measure_matmul_tflops(dtype: str, size: int = 2048, repeats: int = 10) -> float:
  """Measured dense matmul rate (TFLOP/s) at `dtype` on the default device."""
  import tensorflow as tf
  a = tf.random.normal([size, size], dtype=tf.float32)
  a = tf.cast(a, dtype)
  matmul = tf.function(lambda x: tf.matmul(x, x))
  matmul(a).numpy()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).numpy()
    times.append(time.perf_counter() - start)
  return 2 * size**3 / statistics.median(times) / 1e12


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
  from trainer import config as config_lib, distribute, train
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
    rates = _scalars(os.path.join(model_dir, "train"), "images_per_second")
    step_ms = _scalars(os.path.join(model_dir, "train"), "step_time_ms")
  timed = [r for s, r in rates if s > FLAGS.window_steps * FLAGS.warmup_windows]
  timed_ms = [r for s, r in step_ms if s > FLAGS.window_steps * FLAGS.warmup_windows]
  return {"images_per_second": statistics.median(timed),
          "step_time_ms": statistics.median(timed_ms), "windows": timed,
          "replicas": metrics["replicas"], "precision": metrics["precision"],
          "jit_compile": metrics["jit_compile"], "model": metrics["model"]}


def run_keras_baseline() -> float:
  """images/s of a minimal Keras 3 `fit` of the same model on one in-memory batch."""
  import keras
  import numpy as np
  import tensorflow as tf
  from input_pipeline import pipeline
  from trainer import resnet
  keras.mixed_precision.set_global_policy(
      "float32" if FLAGS.precision == "auto" else FLAGS.precision)
  model = resnet.build_model(resnet.architecture(FLAGS.depth, plain=FLAGS.plain,
                                                 stem=FLAGS.stem),
                             input_mean=pipeline.CIFAR10_MEAN, input_std=pipeline.CIFAR10_STD)
  model.compile(keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                jit_compile=FLAGS.jit_compile == "true")
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (FLAGS.global_batch_size, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, (FLAGS.global_batch_size,), dtype=np.int32)
  dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
  model.fit(dataset, steps_per_epoch=FLAGS.window_steps * FLAGS.warmup_windows, verbose=0)
  rates = []
  for _ in range(FLAGS.windows):
    start = time.perf_counter()
    model.fit(dataset, steps_per_epoch=FLAGS.window_steps, verbose=0)
    rates.append(FLAGS.window_steps * FLAGS.global_batch_size / (time.perf_counter() - start))
  keras.mixed_precision.set_global_policy("float32")
  return statistics.median(rates)


def main(argv):
  del argv
  import tensorflow as tf
  from trainer import distribute, flops, resnet
  distribute.configure_cpu_devices(FLAGS.cpu_devices)
  tf.get_logger().setLevel("WARNING")
  model = resnet.build_resnet(FLAGS.depth, plain=FLAGS.plain, stem=FLAGS.stem)
  forward = flops.forward_flops(model)
  # Backward costs about twice the forward pass (gradients w.r.t. inputs and weights).
  training = 3 * forward
  matmul_dtype = {"mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}.get(
      FLAGS.precision, "float32")
  peak = FLAGS.peak_tflops or measure_matmul_tflops(matmul_dtype)
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
  if FLAGS.baseline:
    baseline = run_keras_baseline()
    report["keras_fit_images_per_second"] = baseline
    report["vs_keras_fit"] = result["images_per_second"] / baseline

  print(f"\n{'model':<12}{'batch':>7}{'img/s':>10}{'step ms':>10}{'GFLOP/img':>11}"
        f"{'TFLOP/s':>9}{'peak':>8}{'util':>7}")
  print(f"{report['model']:<12}{FLAGS.global_batch_size:>7}"
        f"{report['images_per_second']:>10.1f}{report['step_time_ms']:>10.1f}"
        f"{training / 1e9:>11.3f}{achieved:>9.3f}{peak:>8.3f}{report['utilisation']:>7.1%}")
  if "input_bound_ratio" in report:
    print(f"synthetic data: {report['synthetic_images_per_second']:.1f} img/s; "
          f"real/synthetic = {report['input_bound_ratio']:.3f}")
  if "keras_fit_images_per_second" in report:
    print(f"minimal Keras fit of the same model: {baseline:.1f} img/s; "
          f"trainer/keras = {report['vs_keras_fit']:.3f}")
  print(json.dumps(report))


if __name__ == "__main__":
  app.run(main)
