"""The trainer's training throughput in this checkout against another (e.g. a worktree of an
earlier commit), in interleaved rounds of scripts/benchmark.py, each checkout's own.

  git worktree add /tmp/before <commit>
  python scripts/compare_checkouts.py --other=/tmp/before --depths=20,56 \
      --strategies=default,mirrored --rounds=2

Every round runs every (depth, strategy) once in each checkout, back to back, alternating
which goes first, so both see the same machine state; the median over rounds of each
checkout and the median of the paired per-round ratios (a slow drift of the machine
cancels in a pair) are reported. The last line printed is a JSON object.
"""

import json
import os
import statistics
import subprocess
import sys

from absl import app, flags

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if HERE not in sys.path:
  sys.path.insert(0, HERE)  # `python scripts/X.py` puts scripts/, not the repo, on the path.

from trainer import cli  # noqa: E402

STRATEGY_FLAGS = {"default": ["--strategy=default"],
                  "mirrored": ["--strategy=mirrored", "--cpu_devices=2"]}

flags.DEFINE_string("other", None, "The other checkout (its scripts/benchmark.py runs there).",
                    required=True)
flags.DEFINE_list("depths", ["20", "56"], "ResNet depths.")
flags.DEFINE_list("strategies", ["default", "mirrored"],
                  f"Any of {sorted(STRATEGY_FLAGS)} (mirrored: 2 logical CPUs).")
flags.DEFINE_integer("rounds", 2, "Interleaved rounds (the median is reported).")
flags.DEFINE_integer("windows", 3, "benchmark.py --windows.")
flags.DEFINE_integer("window_steps", 8, "benchmark.py --window_steps.")
flags.DEFINE_list("benchmark_args", [], "More flags for benchmark.py in both checkouts "
                  "(e.g. --global_batch_size=64,--threads=2).")
FLAGS = flags.FLAGS


def images_per_second(checkout: str, depth: str, strategy: str) -> float:
  """One benchmark.py run in `checkout`: its median images/s."""
  command = [sys.executable, "scripts/benchmark.py", f"--depth={depth}", "--nobaseline",
             "--nooverhead", f"--windows={FLAGS.windows}",
             f"--window_steps={FLAGS.window_steps}", *STRATEGY_FLAGS[strategy],
             *FLAGS.benchmark_args]
  result = subprocess.run(command, cwd=checkout, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    cli.fail(f"{' '.join(command[1:])} failed in {checkout}:\n{result.stderr[-2000:]}")
  return float(json.loads(result.stdout.strip().splitlines()[-1])["images_per_second"])


def main(argv):
  del argv
  checkouts = {"this": HERE, "other": os.path.abspath(FLAGS.other)}
  if not os.path.isfile(os.path.join(checkouts["other"], "scripts", "benchmark.py")):
    cli.fail(f"--other={FLAGS.other} is not a checkout of this project (no scripts/benchmark.py)")
  unknown = set(FLAGS.strategies) - set(STRATEGY_FLAGS)
  if unknown:
    cli.fail(f"--strategies: {', '.join(sorted(unknown))} not among {', '.join(STRATEGY_FLAGS)}")
  figures = {}
  for round_index in range(FLAGS.rounds):
    order = list(checkouts) if round_index % 2 == 0 else list(reversed(checkouts))
    for depth in FLAGS.depths:
      for strategy in FLAGS.strategies:
        for name in order:
          value = images_per_second(checkouts[name], depth, strategy)
          figures.setdefault(f"resnet{depth}/{strategy}", {}).setdefault(name, []).append(value)
          print(f"round {round_index + 1} resnet{depth} {strategy:8s} {name:5s} "
                f"{value:8.1f} images/s", flush=True)
  report = {"other": checkouts["other"], "rounds": FLAGS.rounds}
  for key, by_checkout in figures.items():
    this, other = (statistics.median(by_checkout[n]) for n in ("this", "other"))
    paired = [a / b for a, b in zip(by_checkout["this"], by_checkout["other"])]
    report[key] = {"this": this, "other": other, "this_vs_other": this / other,
                   "rounds_this": by_checkout["this"], "rounds_other": by_checkout["other"],
                   "paired_ratios": paired, "paired_ratio_median": statistics.median(paired)}
    print(f"{key:20s} this {this:8.1f}  other {other:8.1f}  this/other {this / other:.3f}  "
          f"paired: median {statistics.median(paired):.3f} of "
          f"{', '.join(f'{r:.3f}' for r in paired)}")
  print(json.dumps(report))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.script_parser)
