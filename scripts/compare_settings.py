"""The trainer's training step under several runtime settings (TensorFlow's thread pools,
oneDNN's environment variables, the strategy, ...), each in a process of its own, timed
in interleaved windows, optionally beside PyTorch:

  python scripts/compare_settings.py --depth=20 --setting="intra=2 inter=2" \\
      --setting="intra=2 inter=1" --setting="intra=1 inter=2 strategy=mirrored cpu_devices=2" \\
      --setting="TF_ONEDNN_THREADPOOL_USE_CALLER_THREAD=true" \\
      [--torch_python=/tmp/torch-venv/bin/python]

A setting is KEY=VALUE words: `intra`/`inter` set TensorFlow's intra- and inter-op
threads (TF_NUM_INTRAOP_THREADS / TF_NUM_INTEROP_THREADS), an UPPER_CASE key sets that
environment variable, any other key is a flag of scripts/benchmark.py (strategy,
cpu_devices, precision, jit_compile, ...). Thread counts can only
be set before TensorFlow starts, hence one process per setting (`benchmark.py --serve`);
the windows run in rounds, one per process, the order rotating, while the others wait.
Reported: each setting's median window (images/s) and its median per-round ratio to the
first setting. The last line printed is a JSON object.
"""

import json
import os
import statistics
import sys

from absl import app, flags

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

from scripts.window_process import ProcessExited, WindowProcess  # noqa: E402
from trainer import cli  # noqa: E402
THREAD_VARIABLES = {"intra": "TF_NUM_INTRAOP_THREADS", "inter": "TF_NUM_INTEROP_THREADS"}

flags.DEFINE_integer("depth", 20, "ResNet depth (benchmark.py --depth).")
flags.DEFINE_integer("global_batch_size", 128, "Global batch of every setting.")
flags.DEFINE_multi_string("setting", None, "A setting: KEY=VALUE words (see the module "
                          "docstring); repeat the flag for each.", required=True)
flags.DEFINE_string("torch_python", None, "Also time the PyTorch ResNet of "
                    "results/checks/torch_resnet_benchmark.py with this venv's python.")
flags.DEFINE_integer("window_steps", 20, "Steps per timed window.")
flags.DEFINE_integer("windows", 6, "Timed rounds (the median is reported).")
flags.DEFINE_integer("warmup_windows", 1, "Rounds run before timing.")
FLAGS = flags.FLAGS


def command_and_environment(setting: str) -> tuple[list[str], dict]:
  """benchmark.py --serve's command line and environment for one setting."""
  command = [sys.executable, os.path.join(HERE, "scripts", "benchmark.py"), "--serve",
             f"--depth={FLAGS.depth}", f"--global_batch_size={FLAGS.global_batch_size}"]
  environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  for word in setting.split():
    key, equals, value = word.partition("=")
    if not equals or not key or not value:
      cli.fail(f"--setting={setting!r}: {word!r} is not KEY=VALUE")
    if key in THREAD_VARIABLES:
      environment[THREAD_VARIABLES[key]] = value
    elif key.isupper():
      environment[key] = value
    else:
      command.append(f"--{key}={value}")
  return command, environment


def servers() -> list[WindowProcess]:
  """A server per setting (the first is the reference) and, with --torch_python, PyTorch."""
  started = [WindowProcess(setting, *command_and_environment(setting))
             for setting in FLAGS.setting]
  if FLAGS.torch_python:
    script = os.path.join(HERE, "results", "checks", "torch_resnet_benchmark.py")
    started.append(WindowProcess("pytorch", [FLAGS.torch_python, script, "--serve",
                                             f"--depth={FLAGS.depth}",
                                             f"--batch_size={FLAGS.global_batch_size}"],
                                 dict(os.environ)))
  return started


def interleaved_rates(running: list[WindowProcess]) -> dict[str, list[float]]:
  """images/s of every timed window, in rounds of one window per server, the order
  rotating each round so that the machine's drift hits all alike."""
  rates = {server.name: [] for server in running}
  for round_ in range(FLAGS.warmup_windows + FLAGS.windows):
    shift = round_ % len(running)
    for server in running[shift:] + running[:shift]:
      seconds = server.window(FLAGS.window_steps)
      if round_ >= FLAGS.warmup_windows:
        rates[server.name].append(FLAGS.window_steps * FLAGS.global_batch_size / seconds)
  return rates


def main(argv):
  del argv
  try:
    running = servers()
  except ProcessExited as error:
    cli.fail(str(error))
  try:
    rates = interleaved_rates(running)
  finally:
    for server in running:
      server.close()
  reference = rates[running[0].name]
  report = {"depth": FLAGS.depth, "global_batch_size": FLAGS.global_batch_size,
            "window_steps": FLAGS.window_steps, "windows": FLAGS.windows, "settings": {
                name: {"images_per_second": statistics.median(windows),
                       "window_images_per_second": windows,
                       "vs_first": statistics.median(a / b for a, b in zip(windows, reference))}
                for name, windows in rates.items()}}
  print(f"\nResNet-{FLAGS.depth}, global batch {FLAGS.global_batch_size}, {FLAGS.windows} "
        f"interleaved windows of {FLAGS.window_steps} steps")
  print(f"{'setting':<60}{'img/s':>9}{'vs first':>10}")
  for name, figures in report["settings"].items():
    print(f"{name:<60}{figures['images_per_second']:>9.1f}{figures['vs_first']:>10.3f}")
  print(json.dumps(report))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.script_parser)
