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
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from trainer import cli, flag_definitions  # noqa: E402
from scripts.benchmark_compare import (TrainerSteps, print_comparison,  # noqa: E402
                                       run_comparison, serve_windows)
from scripts.benchmark_models import (BareSteps, batch_clock, compile_for_fit,  # noqa: E402
                                      fit_data, measure_matmul_tflops, minimal_keras_resnet,
                                      our_model, policy)

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
  from input_pipeline import sources
  from trainer import config as config_lib, distribute, run_files, train
  steps = FLAGS.window_steps * (FLAGS.warmup_windows + FLAGS.windows)
  # Synthetic data: CIFAR-10's training split, and a test split of one batch, since the
  # run's final evaluation (of the whole test split) is not what is timed; 10,000 images
  # took it 10 s at a global batch of 8.
  synthetic = ((sources.CIFAR10_TRAIN_EXAMPLES, FLAGS.global_batch_size)
               if data_source == "synthetic" else None)
  with tempfile.TemporaryDirectory() as model_dir:
    config = config_lib.Config(
        depth=FLAGS.depth, plain=FLAGS.plain, stem=FLAGS.stem, data_source=data_source,
        synthetic_examples=synthetic, data_dir=data_dir, epochs=1, steps_per_epoch=steps,
        eval_steps=1, global_batch_size=FLAGS.global_batch_size, precision=FLAGS.precision,
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


def time_keras_fit(model, float_inputs: bool) -> float:
  """images/s of a plain Keras 3 `fit` of `model` on one in-memory batch (median window)."""
  compile_for_fit(model)
  # One fit call for every window: each fit call has a fixed set-up cost that a long
  # training run pays once.
  clock = batch_clock()
  windows = FLAGS.warmup_windows + FLAGS.windows
  model.fit(fit_data(float_inputs), steps_per_epoch=FLAGS.window_steps * windows,
            callbacks=[clock], verbose=0)
  rates = []
  for window in range(FLAGS.warmup_windows, windows):
    first, last = window * FLAGS.window_steps - 1, (window + 1) * FLAGS.window_steps - 1
    rates.append(FLAGS.window_steps * FLAGS.global_batch_size
                 / (clock.ends[last] - clock.ends[first]))
  return statistics.median(rates)


def run_keras_baselines() -> dict:
  """Keras `fit` of our model, and of the minimal hand-written one: images/s of each."""
  import keras
  ours = our_model()
  minimal = minimal_keras_resnet(FLAGS.depth, FLAGS.plain, FLAGS.stem)
  result = {"keras_fit": time_keras_fit(ours, float_inputs=False),
            "minimal_keras": time_keras_fit(minimal, float_inputs=True),
            "minimal_keras_parameters": minimal.count_params(),
            "parameters": ours.count_params()}
  keras.mixed_precision.set_global_policy("float32")
  return result


def measure_compute_step_ms() -> float:
  """The compute floor: ms per training step of our model with nothing else around it."""
  import keras
  bare = BareSteps(our_model())
  bare.window(FLAGS.window_steps * FLAGS.warmup_windows)
  times = [bare.window(FLAGS.window_steps) / FLAGS.window_steps * 1000
           for _ in range(FLAGS.windows)]
  keras.mixed_precision.set_global_policy("float32")
  return statistics.median(times)


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
  if policy() != "float32" or FLAGS.plain or FLAGS.stem != "cifar":
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
