"""The plain-vs-residual experiment's shared parts: reading finished or running runs, and
writing curves.csv, the figure in the style of He et al. (2015) Figure 6 (or the origin
blog post's loss-and-accuracy figure) and results.md.
Used by scripts/compare_plain_residual.py and scripts/plot_runs.py.
"""

import collections
import csv
import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

# Pure Python: the study's parent process must not load TensorFlow.
from trainer import cli
from trainer.run_files import (CONFIG_FILE, EPOCH_ACCURACY_TAG, EPOCH_LOSS_TAG, HISTORY_FILE,
                               METRICS_FILE, TEST_EVENTS, TRAIN_EVENTS, VALIDATION_EVENTS,
                               eval_split_name)

if TYPE_CHECKING:  # matplotlib is imported where a figure is drawn: studies start faster.
  from matplotlib.figure import Figure

PLAIN = "plain"
RESIDUAL = "residual"
KINDS = (PLAIN, RESIDUAL)
# test_* hold the per-epoch evaluation, on the split eval_split names: "test", or
# "validation" for runs trained with --validation_split.
CSV_COLUMNS = ("run", "label", "depth", "kind", "epoch", "step", "train_loss", "train_error",
               "test_loss", "test_error", "eval_split")
X_AXES = ("epoch", "step")
# He et al. (2015) Table 6: CIFAR-10 test error in percent of their ResNets (64k
# iterations of 128 lossless images; ResNet-110: the best of 5 runs, mean 6.61).
PAPER_RESNET_ERROR = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43}


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


def curve_rows(runs: Iterable[Run]) -> list[dict]:
  """One row per run per epoch, with errors in percent; the rows of curves.csv."""
  rows = []
  for run in runs:
    split = run.eval_split
    for h in run.history:
      rows.append({"run": run.name, "label": run.label, "depth": run.depth, "kind": run.kind,
                   "epoch": h["epoch"], "step": h["step"],
                   "train_loss": h["train_loss"],
                   "train_error": error_percent(h["train_accuracy"]),
                   "test_loss": h[f"{split}_loss"],
                   "test_error": error_percent(h[f"{split}_accuracy"]),
                   "eval_split": split})
  return rows


def write_curves_csv(runs: Sequence[Run], path: str) -> None:
  """Writes curves.csv (columns CSV_COLUMNS); only the header when there are no runs."""
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for row in curve_rows(runs):
      writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def figure_formats() -> set[str]:
  """The file name extensions matplotlib can write a figure as (png, pdf, svg, ...)."""
  from matplotlib.backend_bases import FigureCanvasBase
  return set(FigureCanvasBase.get_supported_filetypes())


def describe_settings(runs: Sequence[Run]) -> str:
  """One line on the data and schedule the runs share, e.g. for the figure's title."""
  if not runs:
    return "no runs"
  # A curves.csv keeps no settings: its runs are described by the model dirs beside them.
  unrecorded = [r.label for r in runs if "data_source" not in r.config]
  recorded = [r for r in runs if "data_source" in r.config]
  if recorded and unrecorded:
    return (f"{_describe(recorded)}; {', '.join(unrecorded)} from curves.csv files, which "
            "record no settings")
  return _describe(runs)


def _describe(runs: Sequence[Run]) -> str:
  config = runs[0].config
  data = config.get("data_source", "?")
  if data == "folder":
    data = f"folder {config.get('data_dir')}"
  elif data == "synthetic":
    data = "synthetic random images"
  steps = config.get("steps_per_epoch")
  if config.get("epochs"):
    epochs = f"{config['epochs']} epochs" + (f" x {steps} steps" if steps else "")
  else:  # The he2016 recipe counts iterations.
    epochs = f"{config.get('total_steps', '?')} iterations"
  evaluation = (f", evaluation capped at {config['eval_steps']} batch(es)"
                if config.get("eval_steps") else "")
  recipe = f"recipe {config['recipe']}, " if config.get("recipe") else ""
  layouts = {layout_note(r.config) for r in runs}
  # A layout that differs between runs is in their legend labels instead.
  layout = f"{layouts.pop()}, " if len(layouts) == 1 and "" not in layouts else ""
  text = (f"CIFAR-10 ({data}), {recipe}{layout}{epochs}, batch "
          f"{config.get('global_batch_size')}{evaluation}")
  keys = ("data_source", "data_dir", "recipe", "epochs", "steps_per_epoch", "eval_steps",
          "global_batch_size", "learning_rate", "weight_decay", "stage_sizes", "stage_widths")
  if any(r.config.get(k) != config.get(k) for r in runs for k in keys):
    text += " (settings differ between runs: see their config.json)"
  return text


def run_colours(runs: Sequence[Run]) -> dict[str, str]:
  """model dir -> line colour: one colour per depth, shared by both panels as in He et al.
  Figure 6, except that runs sharing a label (e.g. two ResNet-20 runs of an ablation) each
  get their own colour, so their curves can be told apart."""
  palette = ["tab:orange", "tab:blue", "tab:green", "tab:red", "tab:purple", "tab:brown",
             "tab:pink", "tab:olive", "tab:cyan", "tab:gray"]
  counts = collections.Counter(run.label for run in runs)
  keys = {run.model_dir: (run.depth, run.model_dir if counts[run.label] > 1 else "")
          for run in runs}
  order = {key: i for i, key in enumerate(sorted(set(keys.values())))}
  return {model_dir: palette[order[key] % len(palette)] for model_dir, key in keys.items()}


def _unique_labels(runs: Sequence[Run], *, layout: bool = False) -> dict[str, str]:
  """model dir -> legend label: the run's label (with its layout_note if `layout`), plus its
  run name where two runs share a label, plus its parent folder where they share the run
  name too (two studies' resnet-20)."""
  base = {}
  for run in runs:
    note = layout_note(run.config) if layout else ""
    base[run.model_dir] = f"{run.label} ({note})" if note else run.label
  labels = collections.Counter(base.values())
  names = collections.Counter((base[run.model_dir], run.name) for run in runs)
  out = {}
  for run in runs:
    label = base[run.model_dir]
    if labels[label] == 1:
      out[run.model_dir] = label
    elif names[(label, run.name)] == 1:
      out[run.model_dir] = f"{label} ({run.name})"
    else:
      parent = os.path.basename(os.path.dirname(os.path.normpath(run.model_dir)))
      out[run.model_dir] = f"{label} ({parent}/{run.name})"
  return out


def legend_labels(runs: Sequence[Run], *, title: str | None = None) -> dict[str, str]:
  """model dir -> the figure's legend label. A layout that all runs share is in the default
  title (describe_settings); the legend names it when the runs differ in it, or when a
  given `title` replaces that description."""
  layouts = {layout_note(run.config) for run in runs}
  return _unique_labels(runs, layout=title is not None or len(layouts) > 1)


def progress(run: Run) -> str:
  """How far an unfinished run got, e.g. "unfinished, 5 of 20 epochs"."""
  planned = f"{run.planned_epochs:g}" if run.planned_epochs else "?"
  return f"unfinished, {run.history[-1]['epoch']:g} of {planned} epochs"


def curve_labels(runs: Sequence[Run], *, title: str | None = None) -> dict[str, str]:
  """model dir -> a figure's legend label: legend_labels(), plus how far an unfinished run
  got (its curves stop short of the others') and, when the runs mix test and validation
  curves, which runs show validation curves."""
  labels = legend_labels(runs, title=title)
  mixed = len({r.eval_split for r in runs}) > 1
  out = {}
  for run in runs:
    notes = []
    if not run.finished:
      notes.append(progress(run))
    if mixed and run.eval_split == "validation":
      notes.append("validation curve")
    out[run.model_dir] = labels[run.model_dir] + (f" [{'; '.join(notes)}]" if notes else "")
  return out


def plot_figure(runs: Sequence[Run], path: str, *, x_axis: str = "epoch",
                title: str | None = None) -> "Figure":
  """Writes the figure: plain nets left, ResNets right, error (%) over time.

  Training error is dashed and thin, test (or validation) error solid and bold; one colour
  per depth (per run where runs share a depth and kind). Runs of one kind only (e.g. an
  ablation of ResNets) get one panel. The legend says how far unfinished runs got.

  Args:
    runs: the runs to draw.
    path: the PNG to write.
    x_axis: "epoch" or "step" (He et al. plot iterations).
    title: the figure's title; default: describe_settings(runs). A given title moves the
      runs' layouts (e.g. "widths 16,32,64,128") into the legend.
  Returns:
    the (closed) matplotlib Figure, for inspection.
  """
  if x_axis not in X_AXES:
    raise ValueError(f"x_axis must be one of {X_AXES}, got {x_axis!r}")
  import matplotlib
  matplotlib.use("Agg")  # Files only: no display on training machines.
  import matplotlib.pyplot as plt
  from matplotlib.lines import Line2D
  from matplotlib.ticker import MaxNLocator

  colours = run_colours(runs)
  labels = curve_labels(runs, title=title)
  eval_name = "/".join(sorted({r.eval_split for r in runs}, reverse=True)) or "test"
  panels = [(kind, heading) for kind, heading in zip(KINDS, ("plain networks", "ResNets"))
            if any(r.kind == kind for r in runs)] or [(KINDS[1], "ResNets")]
  fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), sharex=True,
                           sharey=True, squeeze=False)
  axes = axes[0]
  top = 0.0
  for ax, (kind, panel) in zip(axes, panels):
    panel_runs = sorted((r for r in runs if r.kind == kind), key=lambda r: (r.depth, r.name))
    handles = []
    for run in panel_runs:
      xs = [h[x_axis] for h in run.history]
      train = run.errors("train_accuracy")
      test = run.eval_errors
      top = max(top, *train, *test)
      # Markers only when a curve has few points, where a bare line would hide them.
      marker = "o" if len(xs) <= 12 else None
      colour = colours[run.model_dir]
      ax.plot(xs, train, linestyle="--", linewidth=1.0, color=colour, marker=marker,
              markersize=3)
      handles.append(ax.plot(xs, test, linestyle="-", linewidth=2.4, color=colour,
                             marker=marker, markersize=4, label=labels[run.model_dir])[0])
    if not panel_runs:
      ax.text(0.5, 0.5, "no runs", ha="center", va="center", transform=ax.transAxes)
    handles += [Line2D([], [], color="black", linestyle="--", linewidth=1.0,
                       label="training error"),
                Line2D([], [], color="black", linestyle="-", linewidth=2.4,
                       label=f"{eval_name} error")]
    ax.legend(handles=handles, loc="best", fontsize=8)
    ax.set_title(panel)
    ax.set_xlabel("epoch" if x_axis == "epoch" else "iterations (steps)")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("error (%)")
  # Up to 102: a curve at 100% error stays visible instead of merging with the frame.
  axes[0].set_ylim(0, min(102.0, top * 1.05 + 1.0) if top else 100.0)
  axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
  fig.suptitle(title if title is not None else describe_settings(runs), fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return fig


def _blog_order(run: Run) -> tuple:
  """The blog figure's run order: by depth, each plain net before its ResNet twin."""
  return run.depth, run.kind != PLAIN, run.name, run.model_dir


def blog_colours(runs: Sequence[Run]) -> dict[str, str]:
  """model dir -> line colour for the blog figure: one colour per run. Unlike Figure 6,
  plain nets and ResNets share its panels, so a colour per depth would merge plain-34 and
  ResNet-34."""
  palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
             "tab:pink", "tab:olive", "tab:cyan", "tab:gray"]
  ordered = sorted(runs, key=_blog_order)
  return {run.model_dir: palette[i % len(palette)] for i, run in enumerate(ordered)}


def _blog_legend(fig: "Figure", runs: Sequence[Run], styles: dict[str, dict],
                 labels: dict[str, str]) -> None:
  """The blog figure's one legend, under both panels so that it hides no curve: the runs in
  columns of `rows` (a depth's plain net above its ResNet twin when each depth has both),
  then a column saying which line is training and which test (or validation)."""
  from matplotlib.lines import Line2D

  rows = max(2, -(-len(runs) // 4))  # Up to 4 columns of runs: long labels fit the width.
  handles = [Line2D([], [], linestyle="-", linewidth=2.2, label=labels[run.model_dir],
                    **styles[run.model_dir]) for run in sorted(runs, key=_blog_order)]
  # matplotlib fills a legend column by column: blank entries keep the key in its own.
  blank = lambda: Line2D([], [], linestyle="none", label="")  # noqa: E731
  handles += [blank() for _ in range(-len(handles) % rows)]
  splits = sorted({r.eval_split for r in runs}) or ["test"]
  handles += [Line2D([], [], color="black", linestyle="--", linewidth=1.0, label="training"),
              Line2D([], [], color="black", linestyle="-", linewidth=2.2,
                     label=" / ".join(splits))]
  handles += [blank() for _ in range(rows - 2)]
  fig.legend(handles=handles, loc="outside lower center", ncols=len(handles) // rows,
             fontsize=9, frameon=False)


def plot_blog_figure(runs: Sequence[Run], path: str, *,
                     title: str | None = None) -> "Figure":
  """Writes the origin blog post's figure: loss (left) and accuracy in % (right) per epoch.

  Both panels share the epoch axis and hold every run, one colour per run: training
  dashed and thin, test (or validation, for --validation_split runs) solid and bold.

  Args:
    runs: the runs to draw.
    path: the PNG to write.
    title: the figure's title; default: describe_settings(runs). A given title moves the
      runs' layouts (e.g. "widths 16,32,64,128") into the legend.
  Returns:
    the (closed) matplotlib Figure, for inspection.
  """
  import matplotlib
  matplotlib.use("Agg")  # Files only: no display on training machines.
  import matplotlib.pyplot as plt
  from matplotlib.ticker import MaxNLocator

  colours = blog_colours(runs)
  # Markers only when curves have few points, where a bare line would hide them; for all
  # runs or none, so that a short (unfinished) run's legend entry matches the others.
  marker = "o" if max((len(r.history) for r in runs), default=0) <= 12 else None
  styles = {run.model_dir: dict(color=colours[run.model_dir], marker=marker) for run in runs}
  fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(12, 5.2), sharex=True,
                                        layout="constrained")
  for run in sorted(runs, key=_blog_order):
    xs = [h["epoch"] for h in run.history]
    for ax, metric, scale in ((loss_ax, "loss", 1.0), (acc_ax, "accuracy", 100.0)):
      ax.plot(xs, [scale * h[f"train_{metric}"] for h in run.history], linestyle="--",
              linewidth=1.0, markersize=3, **styles[run.model_dir])
      ax.plot(xs, [scale * h[f"{run.eval_split}_{metric}"] for h in run.history],
              linestyle="-", linewidth=2.2, markersize=4, **styles[run.model_dir])
  for ax, heading, unit in ((loss_ax, "loss", "cross-entropy loss"),
                            (acc_ax, "accuracy", "accuracy (%)")):
    ax.set_title(heading)
    ax.set_xlabel("epoch")
    ax.set_ylabel(unit)
    ax.grid(alpha=0.3)
    if not runs:
      ax.text(0.5, 0.5, "no runs", ha="center", va="center", transform=ax.transAxes)
  loss_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  _blog_legend(fig, runs, styles, curve_labels(runs, title=title))
  fig.suptitle(title if title is not None else describe_settings(runs), fontsize=10)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return fig

def _by_depth(runs: Sequence[Run]) -> tuple[dict[tuple[int, str], Run], list[str]]:
  table, notes = {}, []
  for run in runs:
    key = (run.depth, run.kind)
    if key in table:
      notes.append(f"Several {run.label} runs; the table uses {table[key].name}, not "
                   f"{run.name}.")
    else:
      table[key] = run
  return table, notes


def _trend(runs: Sequence[Run], attribute: str) -> tuple[str, float, float] | None:
  """(shape, first, last) of an error over depth, or None for fewer than two depths.

  shape: "rose" or "fell" (at every step in depth), "mixed", "flat", or "two depths".
  """
  points = [(r.depth, getattr(r, attribute)) for r in sorted(runs, key=lambda r: r.depth)]
  points = [p for p in points if p[1] is not None]
  if len(points) < 2:
    return None
  diffs = [b[1] - a[1] for a, b in zip(points, points[1:])]
  if len(diffs) == 1:
    direction = "two depths"  # "at every step in depth" would say nothing here.
  elif all(d > 0 for d in diffs):
    direction = "rose"
  elif all(d < 0 for d in diffs):
    direction = "fell"
  elif points[-1][1] == points[0][1]:
    direction = "flat"
  else:
    direction = "mixed"
  return direction, points[0][1], points[-1][1]


def depth_trends(runs: Sequence[Run]) -> list[str]:
  """Sentences on whether plain nets got worse with depth and ResNets better.

  "Worse" compares the deepest with the shallowest net's final error and says whether the
  change held at every step in depth.
  """
  table, _ = _by_depth(runs)
  lines = []
  for kind, name, wanted, verb in ((PLAIN, "Plain nets", "rose", "worse"),
                                   (RESIDUAL, "ResNets", "fell", "better")):
    # An unfinished run's last epoch is not its result: no trend is drawn from it.
    kind_runs = [r for (_, k), r in table.items() if k == kind and r.finished]
    parts = []
    for attribute, what in (("final_test_error", "test"), ("final_train_error", "training")):
      trend = _trend(kind_runs, attribute)
      if trend is None:
        continue
      direction, first, last = trend
      overall = "rose" if last > first else "fell" if last < first else "stayed"
      every = " at every step in depth" if direction in ("rose", "fell") else (
          ", but not at every step in depth" if direction == "mixed" else "")
      parts.append(f"{what} error {overall} from {first:.2f}% to {last:.2f}%{every}")
    if not parts:
      lines.append(f"- {name}: fewer than two depths, no trend to report.")
      continue
    depths = sorted(r.depth for r in kind_runs)
    test = _trend(kind_runs, "final_test_error")
    if test is None:
      answer = "no test error to judge by"
    else:
      answer = "yes" if (test[2] > test[1] if wanted == "rose" else test[2] < test[1]) else "no"
    lines.append(f"- {name} {verb} with depth ({depths[0]} to {depths[-1]} layers)? "
                 f"**{answer}**: {'; '.join(parts)}.")
  left_out = [r.label for r in runs if not r.finished]
  if left_out:
    lines.append(f"- Left out, unfinished: {', '.join(left_out)}.")
  return lines


def _cell(value: float | None) -> str:
  return "-" if value is None else f"{value:.2f}"


def _final_cell(run: Run | None, value: float | None) -> str:
  """A final-error cell; an unfinished run's last epoch so far is marked as such."""
  return _cell(value) if run is None or run.finished else f"{_cell(value)} (unfinished)"


def format_duration(seconds: float) -> str:
  """A wall time for people, e.g. "42 s", "53 min 10 s", "2 h 05 min"."""
  seconds = round(seconds)
  if seconds < 60:
    return f"{seconds} s"
  if seconds < 3600:
    return f"{seconds // 60} min {seconds % 60:02d} s"
  return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def wall_time(run: Run) -> str:
  """The run's wall time (metrics.json wall_seconds, all sessions of a resumed run), or
  "unfinished, N of M epochs"."""
  if not run.finished:
    return progress(run)
  seconds = (run.metrics or {}).get("wall_seconds")
  # A run stopped between its last epoch and metrics.json has curves but no total.
  return format_duration(seconds) if seconds is not None else "- (no metrics.json)"


def run_table(runs: Sequence[Run]) -> list[str]:
  """The per-run table of results.md: every run (not one per depth and kind), with
  accuracies in percent, final training error and wall time."""
  labels = legend_labels(runs)
  lines = ["| run | final test accuracy | best test accuracy (test-selected) "
           "| final train accuracy | final train error | wall time |",
           "|---|---:|---:|---:|---:|---|"]
  accuracy = lambda error: None if error is None else 100.0 - error  # noqa: E731
  for run in sorted(runs, key=_blog_order):
    # With a validation split, the best is over the validation epochs.
    best = _cell(accuracy(run.best_test_error)) + (
        " (validation)" if run.eval_split == "validation" else "")
    lines.append(f"| {labels[run.model_dir]} | {_cell(accuracy(run.final_test_error))} | "
                 f"{best} | {_cell(accuracy(run.final_train_error))} | "
                 f"{_cell(run.final_train_error)} | {wall_time(run)} |")
  if not runs:
    lines.append("| - | - | - | - | - | - |")
  return lines


def results_markdown(runs: Sequence[Run], *, command: str | None = None,
                     failures: Sequence[str] = ()) -> str:
  """results.md: final and best test error per depth and kind, the gap, and the trends;
  then per run its final and best test accuracy, final training accuracy and error, and
  wall time (or how far an unfinished run got).

  Args:
    runs: the runs to tabulate (at most one per depth and kind is used).
    command: the command that produced the runs, quoted in the text.
    failures: one line per run that failed, listed under the table.
  Returns:
    the markdown text.
  """
  table, notes = _by_depth(runs)
  depths = sorted({d for d, _ in table})
  lines = ["# Plain vs residual networks", ""]
  if command:
    lines += [f"Command: `{command}`", ""]
  lines += [f"Settings: {describe_settings(runs)}.", "",
            "Errors in percent (100 x (1 - accuracy)); *final* is the last epoch's test error "
            "(the result); *best* the lowest over the epochs, chosen on the test split and so "
            "optimistic (a curiosity, not a result); *train* the last epoch's training error "
            "(averaged over its batches, with augmentation, as in He et al.); gap = plain "
            "minus ResNet final test error (positive: the ResNet is better); *He et al.* their "
            "ResNet's test error (Table 6: 64k iterations, about 182 epochs, of lossless "
            "images).", "",
            "| depth | plain final test | plain best test | ResNet final test | ResNet best test "
            "| gap (plain - ResNet) | plain train | ResNet train | He et al. ResNet |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  unfinished = []
  for depth in depths:
    plain, residual = table.get((depth, PLAIN)), table.get((depth, RESIDUAL))
    for run in (plain, residual):
      if run is not None and not run.finished:
        planned = f"{run.planned_epochs:g}" if run.planned_epochs else "?"
        unfinished.append(f"{run.label} ({run.history[-1]['epoch']:g}/{planned} epochs)")
    get = lambda run, attribute: getattr(run, attribute) if run else None  # noqa: E731
    gap = (plain.final_test_error - residual.final_test_error
           if plain and residual and None not in (plain.final_test_error,
                                                  residual.final_test_error) else None)
    # The gap is only as final as the less finished of its two runs.
    pair = next((r for r in (plain, residual) if r is not None and not r.finished), None)
    lines.append(f"| {depth} | {_final_cell(plain, get(plain, 'final_test_error'))} | "
                 f"{_cell(get(plain, 'best_test_error'))} | "
                 f"{_final_cell(residual, get(residual, 'final_test_error'))} | "
                 f"{_cell(get(residual, 'best_test_error'))} | {_final_cell(pair, gap)} | "
                 f"{_final_cell(plain, get(plain, 'final_train_error'))} | "
                 f"{_final_cell(residual, get(residual, 'final_train_error'))} | "
                 f"{_cell(PAPER_RESNET_ERROR.get(depth))} |")
  if not depths:
    lines.append("| - | - | - | - | - | - | - | - | - |")
  lines += ["", "## Per run", "",
            "Accuracies and errors in percent; *final* as above (for an unfinished run: its "
            "last epoch so far); wall time from metrics.json, over all sessions of a resumed "
            "run.", ""] + run_table(runs)
  lines += ["", "## Depth trends", ""] + depth_trends(runs)
  if any(r.config.get("data_source") == "synthetic" for r in runs):
    lines += ["", "Note: synthetic data has random labels, so every net sits near 90% test "
              "error by construction; such a study only shows that the machinery works."]
  capped = sorted({(r.config["eval_steps"], r.config.get("global_batch_size"))
                   for r in runs if r.config.get("eval_steps")})
  if capped:
    # The trainer evaluates the first batches in the split's stored order; a split stored
    # by class (as an image folder is read) then shows only the first classes.
    sizes = ", ".join(f"{steps} x {batch}" for steps, batch in capped)
    lines += ["", f"Note: evaluation was capped (--eval_steps) to the first {sizes} "
              "images of the evaluation split: noisy errors, and biased ones if that split "
              "is stored in class order."]
  if any(r.eval_split == "validation" for r in runs):
    lines += ["", "Note: runs with --validation_split evaluate their epochs on the "
              "validation split: their *best* column and curves are validation errors, "
              "their *final* column the test error measured once at the end."]
  if unfinished:
    lines += ["", f"Unfinished runs (their last epoch is shown): {', '.join(unfinished)}."]
  if failures:
    lines += ["", "## Failed runs", ""] + [f"- {f}" for f in failures]
  if notes:
    lines += [""] + notes
  return "\n".join(lines) + "\n"
