"""The plain-vs-residual experiment's runs: a model dir (config.json, history.json or the
event files' epoch_* tags, metrics.json) or a curves.csv read into `Run`s, and the study's
names for its runs. Used by the other experiment_* modules, scripts/compare_plain_residual.py
and scripts/plot_runs.py.
"""

import collections
import csv
import dataclasses
import json
import math
import os
from collections.abc import Sequence

# Pure Python: the study's parent process must not load TensorFlow.
from trainer import cli
from trainer.run_files import (CONFIG_FILE, EPOCH_ACCURACY_TAG, EPOCH_LOSS_TAG, HISTORY_FILE,
                               METRICS_FILE, TEST_EVENTS, TRAIN_EVENTS, VALIDATION_EVENTS,
                               eval_split_name)

PLAIN = "plain"
RESIDUAL = "residual"
KINDS = (PLAIN, RESIDUAL)
# test_* hold the per-epoch evaluation, on the split eval_split names: "test", or
# "validation" for runs trained with --validation_split.
CSV_COLUMNS = ("run", "label", "depth", "kind", "epoch", "step", "train_loss", "train_error",
               "test_loss", "test_error", "eval_split")


class RunError(Exception):
  """A model dir cannot be read as a run; the message names the dir and says why."""


def run_name(depth: int, plain: bool) -> str:
  """The model dir name of one run of the study, e.g. "plain-20" or "resnet-20"."""
  return f"{'plain' if plain else 'resnet'}-{depth}"


def run_label(depth: int, plain: bool) -> str:
  """The legend label He et al. use, e.g. "plain-20" or "ResNet-20"."""
  return f"{'plain' if plain else 'ResNet'}-{depth}"


def layout_note(config: dict) -> str:
  """The run's own layout where it overrides its depth's table (--stage_sizes,
  --stage_widths), e.g. "widths 16,32,64,128"; "" for the table's layout. Figures and tables
  say it, so that a study of quarter-width nets is not read as one of full-width ones."""
  parts = [f"{name} {','.join(map(str, config[key]))}"
           for key, name in (("stage_sizes", "blocks"), ("stage_widths", "widths"))
           if config.get(key)]
  return ", ".join(parts)


def error_percent(accuracy: float) -> float:
  """Classification error in percent, 100 * (1 - accuracy)."""
  return 100.0 * (1.0 - accuracy)


@dataclasses.dataclass(frozen=True)
class Run:
  """One trained (or partly trained) network: its settings and per-epoch history."""
  name: str
  model_dir: str
  config: dict               # the run's config.json
  history: tuple[dict, ...]  # the trainer's history.json entries, in step order
  history_source: str        # HISTORY_FILE or "events"
  metrics: dict | None = None  # metrics.json, once the run has finished

  @property
  def depth(self) -> int:
    return int(self.config["depth"])

  @property
  def plain(self) -> bool:
    return bool(self.config["plain"])

  @property
  def kind(self) -> str:
    return PLAIN if self.plain else RESIDUAL

  @property
  def label(self) -> str:
    return run_label(self.depth, self.plain)

  @property
  def eval_split(self) -> str:
    """"test", or "validation" when the run evaluated its epochs on a held-out split."""
    if self.history and "test_accuracy" not in self.history[0] \
        and "validation_accuracy" in self.history[0]:
      return "validation"
    return "test"

  @property
  def planned_epochs(self) -> float | None:
    """The run's length in epochs (the he2016 recipe counts iterations: from total_steps)."""
    if self.config.get("epochs"):
      return float(self.config["epochs"])
    total, per_epoch = self.config.get("total_steps"), self.config.get("steps_per_epoch_resolved")
    return total / per_epoch if total and per_epoch else None

  @property
  def finished(self) -> bool:
    if not self.history:
      return False
    if self.config.get("total_steps"):
      return self.history[-1]["step"] >= self.config["total_steps"]
    return self.planned_epochs is not None and self.history[-1]["epoch"] >= self.planned_epochs

  def errors(self, key: str) -> list[float]:
    """Per-epoch error in percent of a history accuracy key ("train_accuracy", ...)."""
    return [error_percent(h[key]) for h in self.history]

  @property
  def eval_errors(self) -> list[float]:
    """Per-epoch error on the evaluation split (test, or validation)."""
    return self.errors(f"{self.eval_split}_accuracy")

  @property
  def final_test_error(self) -> float | None:
    """The last epoch's test error; with a validation split, the test error at the end."""
    if self.eval_split == "validation":
      accuracy = (self.metrics or {}).get("test_accuracy")
      return None if accuracy is None else error_percent(accuracy)
    return self.eval_errors[-1] if self.history else None

  @property
  def best_test_error(self) -> float | None:
    """The lowest per-epoch error on the evaluation split (test, or validation)."""
    return min(self.eval_errors) if self.history else None

  @property
  def final_train_error(self) -> float | None:
    return self.errors("train_accuracy")[-1] if self.history else None


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise RunError(f"{path}: cannot read: {e}") from None


def read_history(model_dir: str) -> list[dict] | None:
  """The entries of the run's history.json, or None before its first epoch end."""
  path = os.path.join(model_dir, HISTORY_FILE)
  return _read_json(path).get("history", []) if os.path.exists(path) else None


def read_metrics(model_dir: str) -> dict | None:
  """The run's metrics.json, or None while the run has not finished once."""
  path = os.path.join(model_dir, METRICS_FILE)
  return _read_json(path) if os.path.exists(path) else None


def read_config(model_dir: str) -> dict | None:
  """The run's config.json, or None if the trainer never started there."""
  path = os.path.join(model_dir, CONFIG_FILE)
  return _read_json(path) if os.path.exists(path) else None


def _import_tensorboard_quietly():
  """Imports TensorBoard's event reader without TF's C++ start-up messages: TensorBoard
  loads TensorFlow on first use, so TensorFlow is loaded quietly first."""
  import logging
  cli.import_tensorflow()
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  logging.getLogger("tensorboard").setLevel(logging.WARNING)  # "No path found after ..."
  return event_accumulator, tensor_util


def _event_values(log_dir: str, tag: str) -> dict[int, float]:
  """step -> value of a scalar tag in the event files of `log_dir`, the newest write winning."""
  # Imported here: it is slow, and only runs without history.json need it.
  event_accumulator, tensor_util = _import_tensorboard_quietly()

  accumulator = event_accumulator.EventAccumulator(
      log_dir, size_guidance={event_accumulator.TENSORS: 0, event_accumulator.SCALARS: 0})
  accumulator.Reload()
  tags = accumulator.Tags()
  values: dict[int, float] = {}
  # tf.summary (TF2) stores scalars as tensors; TF1-style writers as simple values.
  if tag in tags.get(event_accumulator.TENSORS, []):
    for event in sorted(accumulator.Tensors(tag), key=lambda e: e.wall_time):
      values[event.step] = float(tensor_util.make_ndarray(event.tensor_proto))
  elif tag in tags.get(event_accumulator.SCALARS, []):
    for event in sorted(accumulator.Scalars(tag), key=lambda e: e.wall_time):
      values[event.step] = float(event.value)
  return values


def eval_events_dir(model_dir: str, validation_split: int = 0) -> str:
  """The event dir holding a run's per-epoch evaluation curves.

  With a validation split: validation/. Otherwise test/, except in runs written before the
  evaluation writer was named after its split, which logged their test curves to
  validation/ too.
  """
  if validation_split:
    return os.path.join(model_dir, VALIDATION_EVENTS)
  test_dir = os.path.join(model_dir, TEST_EVENTS)
  return test_dir if os.path.isdir(test_dir) else os.path.join(model_dir, VALIDATION_EVENTS)


def read_event_history(model_dir: str, steps_per_epoch: int | None = None, *,
                       validation_split: int = 0) -> list[dict]:
  """Rebuilds the per-epoch history from the TensorBoard epoch_* tags of a model dir.

  A resumed run logs the epochs after its last checkpoint twice; the later value wins.

  Args:
    model_dir: the run's model dir, holding train/ and test/ (or validation/) event files.
    steps_per_epoch: to number the epochs by step; None numbers them 1, 2, ...
    validation_split: the run's --validation_split (config.json); > 0 reads validation/.
  Returns:
    history entries like the trainer's history.json: evaluation as test_*, or as
    validation_* for a run with a validation split.
  """
  train_dir = os.path.join(model_dir, TRAIN_EVENTS)
  eval_dir = eval_events_dir(model_dir, validation_split)
  split = eval_split_name(validation_split)
  series = {}
  for key, log_dir, tag in (("train_loss", train_dir, EPOCH_LOSS_TAG),
                            ("train_accuracy", train_dir, EPOCH_ACCURACY_TAG),
                            (f"{split}_loss", eval_dir, EPOCH_LOSS_TAG),
                            (f"{split}_accuracy", eval_dir, EPOCH_ACCURACY_TAG)):
    series[key] = _event_values(log_dir, tag) if os.path.isdir(log_dir) else {}
  steps = sorted(set.intersection(*(set(s) for s in series.values())))
  return [{"epoch": round(step / steps_per_epoch, 4) if steps_per_epoch else i + 1,
           "step": step, **{key: s[step] for key, s in series.items()}}
          for i, step in enumerate(steps)]


def load_run(model_dir: str, *, events_fallback: bool = True) -> Run:
  """Reads one run: its config.json and per-epoch history.

  Args:
    model_dir: the run's model dir.
    events_fallback: without history.json, read the TensorBoard event files (loads
      TensorFlow); False treats the run as having no finished epoch.
  Returns:
    the run; history from history.json, else from the TensorBoard event files.
  Raises:
    RunError: without config.json, or when neither source has a finished epoch.
  """
  if not os.path.exists(model_dir):
    raise RunError(f"{model_dir}: no such file or directory")
  config = read_config(model_dir)
  if config is None:
    raise RunError(f"{model_dir}: no {CONFIG_FILE}; not a model dir of trainer.main")
  history, source = read_history(model_dir), HISTORY_FILE
  if history is None and not events_fallback:
    history = []
  elif history is None:
    history = read_event_history(model_dir, config.get("steps_per_epoch_resolved"),
                                 validation_split=config.get("validation_split") or 0)
    source = "events"
  if not history:
    raise RunError(f"{model_dir}: no finished epoch yet (no {HISTORY_FILE}, no "
                   f"{EPOCH_ACCURACY_TAG} in its event files)")
  return Run(os.path.basename(os.path.normpath(model_dir)), model_dir, config,
             tuple(sorted(history, key=lambda h: h["step"])), source,
             read_metrics(model_dir))


def load_curves_csv(path: str, names: Sequence[str] = ()) -> list[Run]:
  """The runs of a curves.csv this project wrote (e.g. results/*.csv), for runs whose
  model dirs are gone; only those named in `names`, if any are given. A csv holds no
  plan, so each run is taken as ended at its last epoch (its config: depth, plain and
  that epoch count only).

  Raises:
    RunError: when the file is missing, its header is not CSV_COLUMNS', or it has no run
      of one of `names`.
  """
  try:
    with open(path, newline="") as f:
      reader = csv.DictReader(f)
      rows = list(reader)
      header = tuple(reader.fieldnames or ())
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise RunError(f"{path}: cannot read it ({e})") from None
  if header != CSV_COLUMNS:
    raise RunError(f"{path}: not a curves.csv (its columns are {', '.join(header) or 'none'}, "
                   f"not {', '.join(CSV_COLUMNS)})")
  by_run: dict[str, list[dict]] = collections.defaultdict(list)
  for row in rows:
    by_run[row["run"]].append(row)
  missing = [name for name in names if name not in by_run]
  if missing:
    raise RunError(f"{path}: no run {', '.join(missing)} (its runs: "
                   f"{', '.join(by_run) or 'none'})")
  if names:
    by_run = {name: by_run[name] for name in dict.fromkeys(names)}
  runs = []
  for name, run_rows in by_run.items():
    try:
      history = sorted((_history_entry(row) for row in run_rows), key=lambda h: h["step"])
      kinds = {row["kind"] for row in run_rows}
      if len(kinds) != 1 or not kinds <= {PLAIN, RESIDUAL}:
        raise ValueError(f"kind {' and '.join(sorted(kinds))}: one of {PLAIN} or "
                         f"{RESIDUAL} per run")
      depths = {_number(row, "depth", int) for row in run_rows}
      if len(depths) != 1:
        raise ValueError(f"depths {' and '.join(map(str, sorted(depths)))}: one per run")
      config = {"depth": depths.pop(), "plain": kinds == {PLAIN},
                "epochs": history[-1]["epoch"]}
    except (KeyError, ValueError) as e:
      raise RunError(f"{path}: run {name}: a malformed row ({e})") from None
    runs.append(Run(name, f"{path}#{name}", config, tuple(history), os.path.basename(path)))
  if not runs:
    raise RunError(f"{path}: no rows")
  return runs


def _number(row: dict, key: str, kind: type) -> float | int:
  try:
    return kind(row[key])
  except (TypeError, ValueError):
    raise ValueError(f"{key} {row[key]!r}: not {'an integer' if kind is int else 'a number'}"
                     ) from None


def _history_entry(row: dict) -> dict:
  """A curves.csv row as a history.json entry (errors back to accuracies)."""
  split = row["eval_split"]
  if split not in ("test", "validation"):
    raise ValueError(f"eval_split {split!r}: test or validation")
  values = {key: _number(row, key, float) for key in ("epoch", "train_loss", "train_error",
                                                      "test_loss", "test_error")}
  bad = [key for key, value in values.items() if not math.isfinite(value)
         or (key.endswith("_error") and not 0.0 <= value <= 100.0)]
  if bad:
    raise ValueError(f"{', '.join(f'{key} {row[key]}' for key in bad)}: finite, errors "
                     "in 0-100")
  return {"epoch": values["epoch"], "step": _number(row, "step", int),
          "train_loss": values["train_loss"],
          "train_accuracy": 1.0 - values["train_error"] / 100.0,
          f"{split}_loss": values["test_loss"],
          f"{split}_accuracy": 1.0 - values["test_error"] / 100.0}
