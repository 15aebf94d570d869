"""Trains plain and residual twins at several depths and compares them, as He et al. (2015)
Figure 6 does: writes curves.csv, figure.png and results.md into --output_dir.

Usage (from the repo root):

  .venv/bin/python scripts/compare_plain_residual.py --depths=20,32,44,56 \\
      --output_dir=runs/study --data_source=folder --data_dir=DIR
  .venv/bin/python scripts/compare_plain_residual.py --quick --output_dir=runs/quick
  .venv/bin/python scripts/compare_plain_residual.py --depths=34,50 \\
      --extra_args="--recipe=blog --stage_widths=16,32,64,128" \\
      --output_dir=runs/blog-study --data_dir=../shared/datasets/cifar10-jpeg

The last is the origin blog post's study: ResNet-34 and ResNet-50 and their plain twins
on its recipe (plain SGD at 0.01, clipnorm 1.0, 20 epochs), at a quarter of its stage
widths (64,128,256,512) and with this project's CIFAR stem; the figure's title and
results.md say "widths 16,32,64,128".

Every depth is trained twice, as plain-D (--plain=true) and ResNet-D (--plain=false), by
running `python -m trainer.main` as a subprocess with --model_dir=OUTPUT_DIR/plain-D or
OUTPUT_DIR/resnet-D; each subprocess's output goes to trainer.log in its model dir. Runs
whose model dir already holds a finished run with the same settings are reused, and an
unfinished run resumes from its last checkpoint, so rerunning an interrupted study resumes
it. `tensorboard --logdir OUTPUT_DIR` shows every run.

--quick, a smoke-sized study: depths 20 and 56, 3 epochs of 40 steps of batch 64 each,
evaluation on the first 10 test batches (640 images), synthetic random images unless
--data_source or --data_dir is given; explicit --depths/--epochs/--steps_per_epoch/
--eval_steps/--global_batch_size override those presets. Measured on the 2-core
development machine while other jobs shared it: 6 min on synthetic data, 8.5 min on the
CIFAR-10 JPEG folder (the limit is 15). On synthetic data every error sits near 90%: it
shows the machinery works, not that residuals win. On real data 120 steps already show
plain-56 training worse than plain-20, but its capped test errors mean little (see the
note on capped evaluation in results.md).

--parallel=N runs N trainers at once. On a CPU they share the cores (each gets
TF_NUM_INTRAOP_THREADS = cores / N unless set): no faster, and N times the memory (on the
2-core development machine two small runs took 113 s with --parallel=2, 81 s one after
the other). It pays off with --gpus, where each process gets its own GPU.

Ctrl-C stops the running trainers (each saves a checkpoint first) and still writes the outputs
from the epochs done; the same command resumes. Exit status: 0, 1 if a run failed, 130 if
interrupted, 2 for bad flags (--extra_args among them: each run's settings are checked as the
trainer checks them, before any run starts).
"""

import json
import os
import shlex
import subprocess
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)  # `python scripts/X.py` puts scripts/, not the repo, on the path.

from scripts import experiment_figures, experiment_results, experiment_runs  # noqa: E402
from scripts.experiment_jobs import (check_trainer_settings, make_jobs,  # noqa: E402
                                     parse_extra_args, run_state)
from scripts.experiment_trainers import duration, final_line, run_jobs  # noqa: E402
from trainer import cli, flag_definitions  # noqa: E402

FLAGS = flags.FLAGS

QUICK = {"depths": [20, 56], "epochs": 3, "steps_per_epoch": 40, "eval_steps": 10,
         "global_batch_size": 64}

flags.DEFINE_list("depths", "20,32,44,56", "Depths to train, each as plain and as ResNet: "
                  "CIFAR family 6n+2 (20, 32, 44, 56, 110) or ImageNet-style 18, 34, 50, "
                  "101, 152. --quick: 20,56.")
flags.DEFINE_string("output_dir", None, "Where the runs' model dirs, curves.csv, figure.png "
                    "and results.md go; rerunning with the same dir resumes the study.")
# The trainer's flags this script passes to every run (trainer/flag_definitions.py).
flag_definitions.define(
    "epochs", "steps_per_epoch", "eval_steps", "global_batch_size", "data_source", "data_dir",
    defaults={"data_source": None},
    notes={"epochs": "--quick: 3.", "steps_per_epoch": "--quick: 40.",
           "eval_steps": "--quick: 10.",
           "global_batch_size": "The trainer scales the learning rate with it. --quick: 64.",
           "data_source": "Default here: folder if --data_dir has a train/ sub-folder, tfds "
                          "if --data_dir is given otherwise; without --data_dir: tfds, or "
                          "synthetic with --quick."})
flags.DEFINE_boolean("quick", False, "Smoke-sized study, under 15 minutes on a 2-core CPU: "
                     "depths 20,56; 3 epochs x 40 steps of batch 64; 10 eval batches; "
                     "synthetic data unless --data_source/--data_dir are given. Explicit "
                     "flags override these presets.")
flags.DEFINE_integer("parallel", None, "Trainer processes at once (default: 1, or one per "
                     "--gpus entry). On a CPU they share the cores: no faster, N times the "
                     "memory.", lower_bound=1)
flags.DEFINE_list("gpus", None, "GPU ids, e.g. 0,1,2,3: process slot i sees only GPU i "
                  "(CUDA_VISIBLE_DEVICES), so --parallel runs do not share a GPU.")
flags.DEFINE_string("extra_args", "", "More trainer flags for every run, e.g. "
                    "\"--learning_rate=0.05 --deterministic\".")
flags.DEFINE_enum("x_axis", "epoch", list(experiment_figures.X_AXES), "The figure's x axis: epoch, "
                  "or step (He et al. plot iterations).")
flags.mark_flag_as_required("output_dir")


def unsupported_depths(depths: list[int]) -> tuple[list[int], str]:
  """The depths trainer.resnet rejects, and its message on the supported ones."""
  # Asked in a child process: importing trainer.resnet loads TensorFlow, which this
  # long-lived parent of the trainers has no other use for.
  code = ("import json, sys; from trainer import resnet; depths = json.loads(sys.argv[1]); "
          "print(json.dumps([[d for d in depths if not resnet.is_supported_depth(d)], "
          "resnet.supported_depths_message()]))")
  result = subprocess.run([sys.executable, "-c", code, json.dumps(depths)], cwd=REPO,
                          capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  if result.returncode:
    raise RuntimeError(f"cannot import trainer.resnet:\n{result.stderr[-2000:]}")
  bad, message = json.loads(result.stdout.strip().splitlines()[-1])
  return bad, message


def _settings() -> dict:
  """The study's settings: explicit flags, else --quick presets, else the flag defaults."""
  settings = {}
  for name in ("depths", "epochs", "steps_per_epoch", "eval_steps", "global_batch_size"):
    quick_value = QUICK[name] if FLAGS.quick and not FLAGS[name].present else None
    settings[name] = quick_value if quick_value is not None else FLAGS[name].value
  data_dir = os.path.abspath(FLAGS.data_dir) if FLAGS.data_dir else None
  source = FLAGS.data_source
  if source is None:
    if data_dir:
      source = "folder" if os.path.isdir(os.path.join(data_dir, "train")) else "tfds"
    else:
      source = "synthetic" if FLAGS.quick else "tfds"
  settings.update(data_source=source, data_dir=data_dir)
  return settings


def _depths(listed: list[str]) -> list[int]:
  """--depths as integers, each a depth the trainer builds, none twice; else exit 2."""
  try:
    depths = [int(d) for d in listed]
  except ValueError:
    cli.fail(f"--depths must be integers, got {','.join(listed)}")
  if not depths:
    cli.fail("--depths is empty: give one or more, e.g. --depths=20,32,44,56")
  bad, supported = unsupported_depths(depths)
  if bad:
    cli.fail(f"--depths: {', '.join(map(str, bad))} not supported; {supported}")
  if len(set(depths)) != len(depths):
    cli.fail(f"--depths lists a depth twice: {','.join(map(str, depths))}")
  return depths


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  settings = _settings()
  depths = _depths(settings["depths"])
  extra_args, extra_values = parse_extra_args(FLAGS.extra_args)
  gpus = FLAGS.gpus or None
  parallel = FLAGS.parallel or (len(gpus) if gpus else 1)
  output_dir = os.path.abspath(FLAGS.output_dir)
  jobs = make_jobs(depths, settings, output_dir)
  check_trainer_settings(jobs, extra_args)
  try:
    os.makedirs(output_dir, exist_ok=True)
  except OSError as e:
    cli.fail(f"--output_dir={FLAGS.output_dir}: cannot create it ({e.strerror or e})")

  steps = f" x {settings['steps_per_epoch']} steps" if settings["steps_per_epoch"] else ""
  print(f"study{' (--quick)' if FLAGS.quick else ''}: depths "
        f"{', '.join(map(str, depths))} as plain and ResNet ({len(jobs)} runs); data "
        f"{settings['data_source']}{' ' + settings['data_dir'] if settings['data_dir'] else ''}"
        f"; {settings['epochs'] or 'recipe'} epochs{steps} of batch "
        f"{settings['global_batch_size']}; "
        f"{parallel} at a time{' on GPUs ' + ','.join(gpus) if gpus else ''}; into "
        f"{output_dir}", flush=True)

  to_run, failures = [], []
  for job in jobs:
    try:
      state = run_state(job, extra_values)
    except experiment_runs.RunError as e:
      print(f"FAILED {job.label}: {e}", file=sys.stderr)
      failures.append(f"{job.label}: {e}")
      continue
    if state == "finished":
      print(f"reusing {job.label}: finished in {job.model_dir}, {final_line(job)}")
    else:
      if state == "unfinished":
        print(f"resuming {job.label} in {job.model_dir} (from its last checkpoint, if any)")
      to_run.append(job)
  study_start = time.time()
  new_failures, interrupted = run_jobs(to_run, extra_args, parallel, gpus)
  failures += new_failures

  runs = []
  for job in jobs:
    try:
      # The trainer writes history.json at every epoch end: no need for the event files.
      runs.append(experiment_runs.load_run(job.model_dir, events_fallback=False))
    except experiment_runs.RunError:
      pass  # Never reached an epoch end: nothing to draw; the failure is listed already.
  command = shlex.join(["python", "scripts/compare_plain_residual.py", *sys.argv[1:]])
  paths = {name: os.path.join(output_dir, name)
           for name in ("curves.csv", "figure.png", "results.md")}
  experiment_results.write_curves_csv(runs, paths["curves.csv"])
  experiment_figures.plot_figure(runs, paths["figure.png"], x_axis=FLAGS.x_axis)
  with open(paths["results.md"], "w") as f:
    f.write(experiment_results.results_markdown(runs, command=command, failures=failures))
  print(f"{len(to_run)} run(s) to train, {len(jobs) - len(to_run)} reused or refused; "
        f"{duration(time.time() - study_start)}; wrote {', '.join(paths.values())}")
  print(f"tensorboard --logdir {output_dir}")
  if failures:
    print(f"{len(failures)} run(s) failed:\n  " + "\n  ".join(failures), file=sys.stderr)
    sys.exit(130 if interrupted else 1)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.script_parser)
