"""The plain-vs-residual study's runs to train: a `Job` per depth and kind with the trainer
flags it takes; the checks that refuse a study's settings before any run starts
(--extra_args, and each run's Config as the trainer validates it); and whether a run's
model dir holds a finished, an unfinished or another study's run.
"""

import dataclasses
import os
import shlex
import sys

from absl import flags

from scripts import experiment_runs
from trainer import cli, errors, flag_definitions, recipes
from trainer import config as config_lib

# Flags the study sets on every trainer; --extra_args must not repeat them.
OWN_TRAINER_FLAGS = ("depth", "plain", "noplain", "model_dir", "epochs", "steps_per_epoch",
                     "eval_steps", "global_batch_size", "data_source", "data_dir")


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
