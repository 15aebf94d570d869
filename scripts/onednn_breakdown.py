"""Where oneDNN's time goes in a training run, from its own verbose log, for TensorFlow
and PyTorch alike (both run their convolutions and, in TensorFlow, batch norms on oneDNN):

  ONEDNN_VERBOSE=1 TF_NUM_INTEROP_THREADS=1 .venv/bin/python -m trainer.main --depth=20 \\
      --data_source=synthetic --epochs=1 --steps_per_epoch=20 --eval_steps=1 \\
      --model_dir=/tmp/verbose20 > /tmp/tf.log
  ONEDNN_VERBOSE=1 /tmp/torch-venv/bin/python results/checks/torch_resnet_benchmark.py \\
      --depth=20 --window_steps=20 --windows=1 --warmup_windows=0 > /tmp/torch.log
  python scripts/onednn_breakdown.py /tmp/tf.log --steps=20
  python scripts/onednn_breakdown.py /tmp/torch.log --steps=20

Sums the wall time of every executed primitive (`onednn_verbose,...,exec,...` lines) by
kind, implementation and propagation (forward_training, backward_data,
backward_weights, ...), per training step. Each time is wall time: primitives that run
at once (TensorFlow's inter-op threads) each count their whole duration, hence one
inter-op thread above for a clean sum. Prints a table and, last, one line of JSON.
"""

import collections
import json
import os
import sys

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)  # `python scripts/X.py` puts scripts/, not the repo, on the path.

from trainer import cli  # noqa: E402

flags.DEFINE_integer("steps", None, "Training steps the log covers (for per-step times).",
                     lower_bound=1, required=True)
FLAGS = flags.FLAGS


def primitive_ms(lines) -> tuple[str, dict[tuple[str, str, str], float], collections.Counter]:
  """oneDNN's version line, and the milliseconds and count of each (kind,
  implementation, propagation) executed."""
  version, times, counts = "", collections.defaultdict(float), collections.Counter()
  for line in lines:
    fields = line.rstrip("\n").split(",")
    if len(fields) < 4 or fields[0] != "onednn_verbose":
      continue
    if fields[2] == "info" and fields[3].startswith("oneDNN"):
      version = fields[3]
    elif fields[2] == "primitive" and fields[3] == "exec" and len(fields) > 8:
      key = (fields[5], fields[6], fields[7])
      times[key] += float(fields[-1])
      counts[key] += 1
  return version, times, counts


def main(argv: list[str]) -> int:
  if len(argv) != 2:
    print("error: give one verbose log (ONEDNN_VERBOSE=1 output)", file=sys.stderr)
    return 2
  try:
    with open(argv[1], encoding="utf-8", errors="replace") as log:
      version, times, counts = primitive_ms(log)
  except OSError as error:
    print(f"error: cannot read {argv[1]}: {error.strerror}", file=sys.stderr)
    return 2
  if not times:
    print(f"error: no executed oneDNN primitive in {argv[1]}: was ONEDNN_VERBOSE=1 set?",
          file=sys.stderr)
    return 2
  per_step = {key: ms / FLAGS.steps for key, ms in times.items()}
  print(f"{version or 'oneDNN'}: {sum(per_step.values()):.2f} ms per step in primitives")
  print(f"{'ms/step':>9} {'calls/step':>10}  kind, implementation, propagation")
  for key, ms in sorted(per_step.items(), key=lambda item: -item[1]):
    print(f"{ms:9.2f} {counts[key] / FLAGS.steps:10.1f}  {', '.join(key)}")
  print(json.dumps({"onednn": version, "steps": FLAGS.steps,
                    "ms_per_step": {" | ".join(key): round(ms, 3)
                                    for key, ms in per_step.items()}}))
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=cli.script_parser)
