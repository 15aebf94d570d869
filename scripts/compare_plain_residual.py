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

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)  # `python scripts/X.py` puts scripts/, not the repo, on the path.

from scripts import experiment_figures, experiment_results, experiment_runs  # noqa: E402
from trainer import cli, errors, flag_definitions, recipes  # noqa: E402
from trainer import config as config_lib  # noqa: E402

FLAGS = flags.FLAGS

QUICK = {"depths": [20, 56], "epochs": 3, "steps_per_epoch": 40, "eval_steps": 10,
         "global_batch_size": 64}
# Flags this script sets on every trainer; --extra_args must not repeat them.
OWN_TRAINER_FLAGS = ("depth", "plain", "noplain", "model_dir", "epochs", "steps_per_epoch",
                     "eval_steps", "global_batch_size", "data_source", "data_dir")
LOG_FILE = "trainer.log"
TAIL_LINES = 15

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


@dataclasses.dataclass(frozen=True)
class Job:
  """One trainer run of the study."""
  depth: int
  plain: bool
  model_dir: str
  expected: dict  # trainer flag -> value this study asks for; compared with config.json

  @property
  def name(self) -> str:
    return experiment_runs.run_name(self.depth, self.plain)

  @property
  def label(self) -> str:
    return experiment_runs.run_label(self.depth, self.plain)

  def trainer_args(self, extra_args: list[str]) -> list[str]:
    """The trainer's flags for this run."""
    args = [f"--{k}={_flag_value(v)}" for k, v in self.expected.items() if v is not None]
    return [*args, f"--model_dir={self.model_dir}", *extra_args]

  def command(self, extra_args: list[str]) -> list[str]:
    """The trainer command line (run with cwd = the repo root)."""
    return [sys.executable, "-m", "trainer.main", *self.trainer_args(extra_args)]


def _flag_value(value) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (list, tuple)):
    return ",".join(map(str, value))
  return str(value)


def _same(stored, given) -> bool:
  """Whether a config.json value equals a flag value (given as text or Python value)."""
  given = _flag_value(given) if given is not None else None
  if stored is None or given is None:
    return stored is None and given in (None, "", "None", "none")
  if isinstance(stored, bool):
    return given.lower() in (("true", "1", "yes") if stored else ("false", "0", "no"))
  if isinstance(stored, (int, float)):
    try:
      return float(given) == float(stored)
    except ValueError:
      return False
  if isinstance(stored, list):
    return given.replace(" ", "") == ",".join(map(str, stored))
  return str(stored) == given


def parse_extra_args(text: str) -> tuple[list[str], dict[str, str]]:
  """Splits --extra_args into trainer arguments and {flag: value} for the resume check.

  Exits with an error for unbalanced quotes, a non-flag argument, a flag this script sets
  itself, or one the trainer would refuse to parse (before any run starts, not in each).
  """
  try:
    args, values = shlex.split(text), {}
  except ValueError as e:  # shlex: "No closing quotation", "No escaped character".
    cli.fail(f"--extra_args={text}: {str(e)[0].lower()}{str(e)[1:]}")
  for arg in args:
    if not arg.startswith("--"):
      cli.fail(f"--extra_args: {arg!r} is not a --flag")
    name, has_value, value = arg[2:].partition("=")
    if name in OWN_TRAINER_FLAGS:
      cli.fail(f"--extra_args: set --{name.removeprefix('no')} through this "
               "script's own flag, not --extra_args")
    if not has_value:  # absl booleans: --flag and --noflag.
      name, value = (name[2:], "false") if name.startswith("no") else (name, "true")
    values[name] = value
  trainer_flags = flags.FlagValues()
  flag_definitions.define(flag_values=trainer_flags)
  try:
    trainer_flags(["trainer", *args])
  except flags.Error as e:
    cli.fail(f"--extra_args: {cli.flag_error(e, trainer_flags)}")
  return args, values


def check_trainer_settings(jobs: list[Job], extra_args: list[str]) -> None:
  """Exits 2 when the trainer would refuse a run's settings, e.g. --extra_args=--seed=-5
  or a --recipe that needs --epochs, or would not train (--mode=eval): before any run
  starts, not once in each run.

  Builds each run's Config as trainer/main.py does (pure Python: no TensorFlow).
  """
  for job in jobs:
    trainer_flags = flags.FlagValues()
    flag_definitions.define(flag_values=trainer_flags)
    try:
      trainer_flags(["trainer", *job.trainer_args(extra_args)])
      fields = config_lib.Config.__dataclass_fields__
      values = config_lib.training_values(
          {field: (trainer_flags[field].value, trainer_flags[field].present) for field in fields},
          recipes.RECIPES[trainer_flags.recipe])
      config = config_lib.Config(**values)
    except flags.Error as e:
      cli.fail(f"{job.label}: {cli.flag_error(e, trainer_flags)}")
    except errors.ConfigError as e:
      cli.fail(f"the trainer would refuse {job.label}'s settings: {e}")
    if config.mode != "train":
      cli.fail(f"--extra_args: --mode={config.mode}: a study trains its runs; "
               f"{config.mode} one afterwards with python -m trainer.main "
               f"--mode={config.mode} --model_dir={job.model_dir}")


def run_state(job: Job, extra_values: dict[str, str]) -> str:
  """"finished", "unfinished" (resumes from its checkpoint) or "new".

  Raises:
    experiment_runs.RunError: when the model dir holds a run with other settings; resuming it
      would mix two schedules.
  """
  config = experiment_runs.read_config(job.model_dir)
  if config is None:
    return "new"
  wanted = {**job.expected, **extra_values}
  # None means "the trainer's default" for --epochs (the recipe's), a real None for the rest.
  diffs = [f"--{k}={_flag_value(config.get(k))} (this study: {_flag_value(v)})"
           for k, v in wanted.items()
           if k in config and not (v is None and k == "epochs") and not _same(config[k], v)]
  if diffs:
    raise experiment_runs.RunError(
        f"{job.model_dir} holds a run with other settings: {', '.join(diffs)}. Use another "
        "--output_dir, or delete that dir to retrain it.")
  metrics = experiment_runs.read_metrics(job.model_dir)
  if metrics is not None:
    # The trainer records the resolved total (the he2016 recipe counts iterations); older
    # config.json files only have epochs.
    if "total_steps" in config and metrics.get("steps") == config["total_steps"]:
      return "finished"
    if "total_steps" not in config and metrics.get("epochs") == config.get("epochs"):
      return "finished"
  return "unfinished"


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


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _tail(path: str, lines: int = TAIL_LINES) -> list[str]:
  try:
    with open(path, errors="replace") as f:
      return [line.rstrip() for line in f.readlines()[-lines:]]
  except OSError:
    return []


def _final_line(job: Job) -> str:
  metrics = experiment_runs.read_metrics(job.model_dir) or {}
  if "test_accuracy" not in metrics:
    return "no metrics.json"
  return (f"final test error {experiment_runs.error_percent(metrics['test_accuracy']):.2f}% "
          f"(best epoch {experiment_runs.error_percent(metrics['best_test_accuracy']):.2f}%: "
          "test-selected, not a result)")


class _Running:
  """A started trainer process and what has been reported of it."""

  def __init__(self, job: Job, process: subprocess.Popen, log, slot: int,
               last_epoch: int):
    self.job, self.process, self.log, self.slot = job, process, log, slot
    self.start = time.time()
    self.last_epoch = last_epoch  # the last epoch reported (or held before a resume)

  def report_new_epochs(self) -> None:
    """Prints the epochs finished since the last call (from the trainer's history.json)."""
    try:
      history = experiment_runs.read_history(self.job.model_dir) or []
    except experiment_runs.RunError:
      return  # Unreadable for a moment; the trainer replaces it atomically. Next poll.
    for h in history:
      if h["epoch"] <= self.last_epoch:
        continue
      planned = self.job.expected["epochs"]
      split = "test" if "test_accuracy" in h else "validation"
      print(f"  {self.job.label} epoch {h['epoch']:g}{f'/{planned}' if planned else ''}: train "
            f"error {experiment_runs.error_percent(h['train_accuracy']):.2f}%, {split} error "
            f"{experiment_runs.error_percent(h[f'{split}_accuracy']):.2f}% "
            f"({_duration(time.time() - self.start)})", flush=True)
      self.last_epoch = h["epoch"]


def _child_env(slot: int, parallel: int, gpus: list[str] | None) -> dict[str, str]:
  env = dict(os.environ)
  if gpus:
    env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
  elif parallel > 1:
    # N processes each sizing its thread pools to all cores would oversubscribe the CPU.
    threads = str(max(1, len(os.sched_getaffinity(0)) // parallel))
    env.setdefault("TF_NUM_INTRAOP_THREADS", threads)
    env.setdefault("OMP_NUM_THREADS", threads)
  return env


def run_jobs(jobs: list[Job], extra_args: list[str], parallel: int,
             gpus: list[str] | None) -> tuple[list[str], bool]:
  """Runs the jobs, `parallel` at a time, reporting progress.

  Returns:
    one line per failed job, and whether the user interrupted the study (Ctrl-C).
  """
  interrupted = False
  pending, running, failures = list(jobs), [], []
  free_slots = list(range(parallel))
  try:
    while pending or running:
      while pending and free_slots:
        job = pending.pop(0)
        slot = free_slots.pop(0)
        os.makedirs(job.model_dir, exist_ok=True)
        try:
          held = experiment_runs.read_history(job.model_dir) or []
        except experiment_runs.RunError:
          held = []
        command = job.command(extra_args)
        log = open(os.path.join(job.model_dir, LOG_FILE), "a")
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL,
                                   env=_child_env(slot, parallel, gpus))
        where = f" on GPU {gpus[slot % len(gpus)]}" if gpus else ""
        print(f"start {job.label}{where}: log in {log.name}", flush=True)
        running.append(_Running(job, process, log, slot,
                                max((h["epoch"] for h in held), default=0)))
      time.sleep(1.0)
      for run in list(running):
        run.report_new_epochs()
        code = run.process.poll()
        if code is None:
          continue
        running.remove(run)
        run.log.close()
        free_slots.append(run.slot)
        took = _duration(time.time() - run.start)
        if code == 0:
          print(f"finished {run.job.label} in {took}: {_final_line(run.job)}", flush=True)
          continue
        tail = _tail(run.log.name)
        print(f"FAILED {run.job.label} (exit code {code}) after {took}; last lines of "
              f"{run.log.name}:", file=sys.stderr)
        for line in tail:
          print(f"  | {line}", file=sys.stderr)
        sys.stderr.flush()
        # The trainer's `error:` line says why; a hint may follow it.
        last = next((line for line in reversed(tail) if line.startswith("error:")),
                    next((line for line in reversed(tail) if line.strip()), ""))
        failures.append(f"{run.job.label}: exit code {code} ({last.strip()}); see "
                        f"{run.log.name}")
  except KeyboardInterrupt:
    # Each run saves a checkpoint and stops (the same command resumes it; one killed after
    # the 30 s below keeps its previous checkpoint). SIGINT, so that each says
    # "interrupted" as after a Ctrl-C. (A Ctrl-C in the terminal has reached them
    # already; a signal sent to this process alone has not.)
    for run in running:
      if run.process.poll() is None:
        run.process.send_signal(signal.SIGINT)
    for run in running:
      try:
        run.process.wait(timeout=30)
      except subprocess.TimeoutExpired:
        run.process.kill()
      run.log.close()
      failures.append(f"{run.job.label}: interrupted; rerun the same command to resume it")
    failures += [f"{job.label}: not started (interrupted)" for job in pending]
    print("interrupted: rerun the same command to resume the study", file=sys.stderr)
    interrupted = True
  return failures, interrupted


def make_jobs(depths: list[int], settings: dict, output_dir: str) -> list[Job]:
  """Plain and residual twin of every depth, in that order, each in OUTPUT_DIR/run_name.

  Args:
    depths: the depths to train.
    settings: the trainer flags every run shares (epochs, steps_per_epoch, eval_steps,
      global_batch_size, data_source, data_dir; None: the trainer's default).
    output_dir: the study's output dir.
  """
  jobs = []
  for depth in depths:
    for plain in (True, False):
      expected = {"depth": depth, "plain": plain,
                  **{k: settings[k] for k in ("epochs", "steps_per_epoch", "eval_steps",
                                              "global_batch_size", "data_source",
                                              "data_dir")}}
      jobs.append(Job(depth, plain, os.path.join(output_dir,
                                                 experiment_runs.run_name(depth, plain)), expected))
  return jobs


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
      print(f"reusing {job.label}: finished in {job.model_dir}, {_final_line(job)}")
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
        f"{_duration(time.time() - study_start)}; wrote {', '.join(paths.values())}")
  print(f"tensorboard --logdir {output_dir}")
  if failures:
    print(f"{len(failures)} run(s) failed:\n  " + "\n  ".join(failures), file=sys.stderr)
    sys.exit(130 if interrupted else 1)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.script_parser)
