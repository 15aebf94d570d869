"""Where a training step's time goes, from a `--profile_steps` trace:
`python scripts/profile_breakdown.py MODEL_DIR_OR_TRACE --steps=N`.

Reads the newest `*.xplane.pb` under the path (the trainer writes them under
MODEL_DIR/train/plugins/profile/), converts it with TensorFlow's own profiler tool
(framework_op_stats, the table TensorBoard's profile plugin shows) and sums each op's
self time into the parts of the step: convolutions (forward, input and filter
gradients), batch norm, shortcuts, the rest of the network, loss, the L2 term, the
per-stage gradient norms, the optimizer, the metrics and NaN guard, input, and the
gradient sums where a tensor has two consumers. Prints a table
(ms per step, share of the busy time) and, last, one line of JSON.
"""

import glob
import json
import os
import re
import sys

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)  # `python scripts/X.py` puts scripts/, not the repo, on the path.

from trainer import cli  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", None, "Training steps in the trace (END - START of "
                     "--profile_steps), for the per-step times.", lower_bound=1)

# (part, test on (op type, op name)); the first match wins, so the scopes that hold
# convolutions or batch norms of their own (none today) come before the op types.
PARTS = (
    ("per-stage gradient norms", lambda t, n: "gradient_norms/" in n),
    ("L2 weight decay (and its gradient)", lambda t, n: "weight_decay/" in n),
    ("metrics and NaN guard", lambda t, n: re.search(r"(^|/)metrics/", n) is not None),
    ("shortcuts (and their gradients)", lambda t, n: "_shortcut" in n),
    ("batch norm, forward", lambda t, n: "FusedBatchNorm" in t and "Grad" not in t),
    ("batch norm, gradient", lambda t, n: "FusedBatchNorm" in t and "Grad" in t),
    ("convolution, forward", lambda t, n: re.search(r"Conv2D$", t) is not None),
    ("convolution, input gradient", lambda t, n: "Conv2DBackpropInput" in t),
    ("convolution, filter gradient", lambda t, n: "Conv2DBackpropFilter" in t),
    ("optimizer (SGD update)", lambda t, n: t.startswith("ResourceApply")
     or re.search(r"(^|/)(sgd|optimizer|loss_scale_optimizer)[^/]*/", n, re.I) is not None),
    ("input (tf.data iterator)", lambda t, n: t == "Dataset" or "Iterator" in t),
    ("loss", lambda t, n: re.search(r"cross_?entropy|one_hot", n, re.I) is not None),
    # A tensor with two consumers gets the sum of their gradients: at every residual
    # block, the block's input feeds the branch and the shortcut.
    ("gradient sums (AddN, at residual joins)", lambda t, n: t == "AddN"),
    ("other network ops (ReLU, add, pooling, dense, their gradients)",
     lambda t, n: re.search(r"resnet\d+|plain\d+", n) is not None),
)
OTHER = "other"


def _newest_trace(path: str) -> str:
  if os.path.isfile(path):
    return path
  traces = glob.glob(os.path.join(path, "**", "*.xplane.pb"), recursive=True)
  if not traces:
    raise ValueError(f"no *.xplane.pb under {path}: train with --profile_steps=START,END")
  return max(traces, key=os.path.getmtime)


def op_rows(trace: str) -> list[dict]:
  """The host's ops of `trace` with their self time (microseconds), idle time excluded."""
  cli.import_tensorflow()
  from tensorflow.python.profiler.internal import _pywrap_profiler_plugin as profiler
  data, ok = profiler.xspace_to_tools_data([trace], "framework_op_stats", {})
  if not ok:
    raise ValueError(f"cannot read {trace}: {data[:200]!r}")
  table = json.loads(data)[0]
  columns = [column["id"] for column in table["cols"]]
  rows = [dict(zip(columns, [cell["v"] if cell else None for cell in row["c"]]))
          for row in table["rows"]]
  return [row for row in rows if row["type"] != "IDLE"]


def part_of(op_type: str, name: str) -> str:
  for part, matches in PARTS:
    if matches(op_type, name):
      return part
  return OTHER


def breakdown(rows: list[dict]) -> dict[str, float]:
  """Self time (microseconds) per part."""
  totals: dict[str, float] = {}
  for row in rows:
    part = part_of(row["type"], row["operation"])
    totals[part] = totals.get(part, 0.0) + float(row["total_self_time"])
  return totals


def main(argv: list[str]) -> int:
  if len(argv) != 2 or not FLAGS.steps:
    print("error: usage: profile_breakdown.py MODEL_DIR_OR_TRACE --steps=N", file=sys.stderr)
    return 2
  try:
    trace = _newest_trace(argv[1])
    totals = breakdown(op_rows(trace))
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  busy = sum(totals.values())
  print(f"trace {trace}: {FLAGS.steps} steps, {busy / 1e3 / FLAGS.steps:.1f} ms of op "
        "self time per step")
  print(f"{'part':66s} {'ms/step':>8s} {'share':>6s}")
  for part, micros in sorted(totals.items(), key=lambda item: -item[1]):
    print(f"{part:66s} {micros / 1e3 / FLAGS.steps:8.2f} {100 * micros / busy:5.1f}%")
  print(json.dumps({"trace": trace, "steps": FLAGS.steps,
                    "ms_per_step": {p: round(m / 1e3 / FLAGS.steps, 3)
                                    for p, m in totals.items()}}))
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=cli.script_parser)
