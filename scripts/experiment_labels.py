"""How the plain-vs-residual experiment names its runs to people, in its figures and in
results.md alike: the line on the settings the runs share, legend labels, how far an
unfinished run got, and the order runs are listed in.
"""

import collections
import os
from collections.abc import Sequence

from scripts.experiment_runs import PLAIN, Run, layout_note


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


def blog_order(run: Run) -> tuple:
  """The blog figure's run order, also that of results.md's per-run table: by depth, each
  plain net before its ResNet twin."""
  return run.depth, run.kind != PLAIN, run.name, run.model_dir
