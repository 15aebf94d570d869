"""Input pipeline alone: first-pass load speed and peak memory, then training and eval
images/s consumed inside a tf.function as the trainer does; the last line printed is JSON.
Usage: python scripts/benchmark_input.py --data_source=synthetic|folder|tfds [--data_dir=DIR]"""

import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from trainer import cli, flag_definitions  # noqa: E402

# The trainer's flags (trainer/flag_definitions.py), with this script's defaults.
flag_definitions.define("data_source", "data_dir", "global_batch_size",
                        defaults={"data_source": "synthetic"},
                        notes={"global_batch_size": "One replica here."})
flags.DEFINE_integer("num_batches", 1000, "Training batches per timed window.",
                     lower_bound=1)
flags.DEFINE_integer("windows", 7, "Timed windows; the median is reported.", lower_bound=1)
flags.DEFINE_integer("eval_passes", 5, "Timed passes over the test split.", lower_bound=0)
flags.DEFINE_integer("seed", 0, "Seed of the pipeline and of the synthetic data.")
FLAGS = flags.FLAGS


def _rss_mb() -> float:
  """Current resident memory of this process."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _machine_busy_seconds() -> float:
  """CPU seconds all processes have spent busy since boot (from /proc/stat)."""
  with open("/proc/stat") as f:
    values = [int(v) for v in f.readline().split()[1:]]
  idle = values[3] + values[4]  # idle + iowait
  return (sum(values) - idle) / os.sysconf("SC_CLK_TCK")


class Window:
  """Wall time, this process's CPU time and other processes' CPU use over a span."""

  def __enter__(self):
    self.wall, self.cpu, self.busy = time.perf_counter(), _cpu_seconds(), _machine_busy_seconds()
    return self

  def __exit__(self, *exc):
    self.seconds = time.perf_counter() - self.wall
    self.cpu_seconds = _cpu_seconds() - self.cpu
    # Cores the rest of the machine kept busy meanwhile: a disturbed measurement shows here.
    self.other_cores = max(_machine_busy_seconds() - self.busy - self.cpu_seconds, 0.0) / (
        self.seconds)


def main(argv):
  del argv
  cli.import_tensorflow()
  import tensorflow as tf
  from input_pipeline import pipeline, sources

  rss_before = _rss_mb()
  with Window() as load:
    try:
      train, test = sources.load_splits(FLAGS.data_source, FLAGS.data_dir, FLAGS.seed)
    except sources.DataError as e:
      cli.fail(str(e))
  loaded = train.num_examples + test.num_examples
  print(f"load ({FLAGS.data_source}): {loaded} images in {load.seconds:.2f} s = "
        f"{loaded / load.seconds:,.0f} images/s (CPU {load.cpu_seconds:.1f} s, other "
        f"processes {load.other_cores:.2f} cores); RSS {rss_before:.0f} MB before, "
        f"{_rss_mb():.0f} MB after, peak {_peak_rss_mb():.0f} MB", flush=True)

  batch_size = FLAGS.global_batch_size
  with Window() as build:
    dataset = pipeline.train_pipeline(train.as_dataset(), per_replica_batch_size=batch_size,
                                      seed=FLAGS.seed)
    iterator = iter(dataset)

    @tf.function
    def consume(iterator, steps):
      # Reads one value of every batch so that nothing can be skipped.
      total = tf.constant(0, tf.int64)
      for _ in tf.range(steps):
        images, labels = next(iterator)
        total += tf.cast(images[0, 0, 0, 0], tf.int64) + tf.cast(labels[0], tf.int64)
      return total

    consume(iterator, tf.constant(1)).numpy()
  print(f"first training batch after {build.seconds:.2f} s (builds the in-memory table)",
        flush=True)
  consume(iterator, tf.constant(max(FLAGS.num_batches // 4, 1))).numpy()  # warm-up

  rates, cpu_per_image, other_cores = [], [], []
  for window in range(FLAGS.windows):
    with Window() as w:
      consume(iterator, tf.constant(FLAGS.num_batches)).numpy()
    images = FLAGS.num_batches * batch_size
    rates.append(images / w.seconds)
    cpu_per_image.append(w.cpu_seconds / images * 1e6)
    other_cores.append(w.other_cores)
    print(f"train window {window}: {rates[-1]:,.0f} images/s, {cpu_per_image[-1]:.2f} us "
          f"CPU/image, other processes {w.other_cores:.2f} cores", flush=True)
  del iterator

  eval_rates = []
  if FLAGS.eval_passes:
    evaluation = pipeline.eval_pipeline(test.as_dataset(), per_replica_batch_size=batch_size,
                                        num_examples=test.num_examples,
                                        global_steps=-(-test.num_examples // batch_size))

    @tf.function
    def consume_eval(dataset):
      total = tf.constant(0.0)
      for images, _, weights in dataset:
        total += tf.cast(images[0, 0, 0, 0], tf.float32) + tf.reduce_sum(weights)
      return total

    consume_eval(evaluation).numpy()
    for _ in range(FLAGS.eval_passes):
      with Window() as w:
        consume_eval(evaluation).numpy()
      eval_rates.append(test.num_examples / w.seconds)
    print(f"eval passes: {', '.join(f'{r:,.0f}' for r in eval_rates)} images/s "
          "(each pass rebuilds the padded batches from the split)", flush=True)

  result = {
      "data_source": FLAGS.data_source,
      "global_batch_size": batch_size,
      "images_per_second": statistics.median(rates),
      "images_per_second_windows": [round(r) for r in rates],
      "cpu_us_per_image": statistics.median(cpu_per_image),
      "other_processes_cores": statistics.median(other_cores),
      "first_batch_seconds": build.seconds,
      "eval_images_per_second": statistics.median(eval_rates) if eval_rates else None,
      "load_seconds": load.seconds,
      "load_images": loaded,
      "load_images_per_second": loaded / load.seconds,
      "load_other_processes_cores": load.other_cores,
      "rss_before_load_mb": rss_before,
      "peak_rss_mb": _peak_rss_mb(),
      "cpu_count": os.cpu_count(),
      "tensorflow": tf.__version__,
  }
  print(f"training pipeline: median {result['images_per_second']:,.0f} images/s over "
        f"{FLAGS.windows} windows of {FLAGS.num_batches} batches of {batch_size}")
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.script_parser)
