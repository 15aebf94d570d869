"""The plain-vs-residual experiment's figures: in the style of He et al. (2015) Figure 6
(error over time, plain nets left and ResNets right) and the origin blog post's (loss and
accuracy per epoch, every run in both panels).
"""

import collections
from collections.abc import Sequence
from typing import TYPE_CHECKING

from scripts.experiment_labels import blog_order, describe_settings, legend_labels, progress
from scripts.experiment_runs import KINDS, Run

if TYPE_CHECKING:  # matplotlib is imported where a figure is drawn: studies start faster.
  from matplotlib.figure import Figure

X_AXES = ("epoch", "step")


def figure_formats() -> set[str]:
  """The file name extensions matplotlib can write a figure as (png, pdf, svg, ...)."""
  from matplotlib.backend_bases import FigureCanvasBase
  return set(FigureCanvasBase.get_supported_filetypes())


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


def blog_colours(runs: Sequence[Run]) -> dict[str, str]:
  """model dir -> line colour for the blog figure: one colour per run. Unlike Figure 6,
  plain nets and ResNets share its panels, so a colour per depth would merge plain-34 and
  ResNet-34."""
  palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
             "tab:pink", "tab:olive", "tab:cyan", "tab:gray"]
  ordered = sorted(runs, key=blog_order)
  return {run.model_dir: palette[i % len(palette)] for i, run in enumerate(ordered)}


def _blog_legend(fig: "Figure", runs: Sequence[Run], styles: dict[str, dict],
                 labels: dict[str, str]) -> None:
  """The blog figure's one legend, under both panels so that it hides no curve: the runs in
  columns of `rows` (a depth's plain net above its ResNet twin when each depth has both),
  then a column saying which line is training and which test (or validation)."""
  from matplotlib.lines import Line2D

  rows = max(2, -(-len(runs) // 4))  # Up to 4 columns of runs: long labels fit the width.
  handles = [Line2D([], [], linestyle="-", linewidth=2.2, label=labels[run.model_dir],
                    **styles[run.model_dir]) for run in sorted(runs, key=blog_order)]
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
  for run in sorted(runs, key=blog_order):
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
