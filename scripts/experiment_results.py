"""The plain-vs-residual experiment's written results: curves.csv (each run's per-epoch
losses and errors) and results.md (final and best errors per depth and kind, a table per
run, the depth trends).
"""

import csv
from collections.abc import Iterable, Sequence

from scripts.experiment_labels import blog_order, describe_settings, legend_labels, progress
from scripts.experiment_runs import CSV_COLUMNS, PLAIN, RESIDUAL, Run, error_percent

# He et al. (2015) Table 6: CIFAR-10 test error in percent of their ResNets (64k
# iterations of 128 lossless images; ResNet-110: the best of 5 runs, mean 6.61).
PAPER_RESNET_ERROR = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43}


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
  for run in sorted(runs, key=blog_order):
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
