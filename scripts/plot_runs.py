"""Draws existing runs as the plain-vs-residual figure (He et al. 2015 Figure 6 style), or
as the origin blog post's loss-and-accuracy figure (--style=blog), without retraining:
`python scripts/plot_runs.py RUN_DIR... [--output=figure.png] [--style=he2016|blog]`.

Each RUN_DIR is a trainer --model_dir (its config.json gives depth and plain; its per-epoch
curves come from history.json, or from the TensorBoard epoch_* tags when history.json is
missing), or a folder of such dirs, e.g. a compare_plain_residual.py --output_dir, or a
curves.csv this project wrote (e.g. results/*.csv): its runs stand for model dirs that
are gone, each taken as ended at its last epoch; `FILE.csv#RUN[,RUN...]` takes only the
runs named (the names its `run` column and this script's output give).
"""

import os
import sys

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)  # `python scripts/X.py` puts scripts/, not the repo, on the path.

from scripts import (experiment_figures, experiment_labels, experiment_results,  # noqa: E402
                     experiment_runs)
from trainer import cli  # noqa: E402

FLAGS = flags.FLAGS

flags.DEFINE_string("output", "figure.png", "The figure (PNG) to write.")
flags.DEFINE_string("csv", None, "Also write the per-epoch curves here (curves.csv format).")
flags.DEFINE_string("results", None, "Also write the results table here (results.md "
                    "format).")
flags.DEFINE_enum("style", "he2016", ["he2016", "blog"], "The figure: he2016, error per "
                  "epoch with plain nets left and ResNets right (He et al. 2015, Figure 6); "
                  "blog, loss left and accuracy right, every run in both (the origin blog "
                  "post).")
flags.DEFINE_enum("x_axis", "epoch", list(experiment_figures.X_AXES), "The figure's x axis: epoch, "
                  "or step (He et al. plot iterations); --style=he2016 only.")
flags.DEFINE_string("title", None, "The figure's title; default: the runs' data and "
                    "schedule.")


def expand_run_dirs(paths: list[str]) -> list[str]:
  """Model dirs among `paths`: each path itself if it holds config.json, else its
  sub-folders that do (sorted), so a study's output dir can be passed whole."""
  dirs = []
  for path in paths:
    if os.path.exists(os.path.join(path, experiment_runs.CONFIG_FILE)) or not os.path.isdir(path):
      dirs.append(path)  # A missing dir is reported by load_run.
      continue
    subdirs = sorted(os.path.join(path, name) for name in os.listdir(path)
                     if os.path.exists(os.path.join(path, name, experiment_runs.CONFIG_FILE)))
    dirs += subdirs or [path]
  return dirs


def check_outputs(figure: str, others: list[str]) -> str | None:
  """Why the figure or another output file cannot be written, or None; checked before
  any run is read, so a typo costs nothing. Missing parent folders are created."""
  extension = os.path.splitext(figure)[1].lstrip(".").lower()
  formats = experiment_figures.figure_formats()
  if extension not in formats:
    return (f"--output={figure}: a figure file name ending in one of "
            f".{', .'.join(sorted(formats))}")
  for path in [figure, *others]:
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
      return f"{path} is a folder; give a file name"
    try:
      os.makedirs(parent, exist_ok=True)
    except OSError as e:
      return f"cannot create {parent} for {path}: {e.strerror or e}"
    if not os.access(parent, os.W_OK) or (os.path.exists(path)
                                          and not os.access(path, os.W_OK)):
      return f"{path} is not writable"
  return None


def load_runs(sources: list[str]) -> tuple[list, list[str]]:
  """The runs of these model dirs, folders and curves.csv files, each reported as loaded;
  and the problems of those that could not be read (also reported)."""
  runs, problems, seen = [], [], set()
  for source in expand_run_dirs(sources):
    try:
      path, _, names = source.rpartition("#") if ".csv#" in source else (source, "", "")
      is_csv = path.endswith(".csv")
      loaded = (experiment_runs.load_curves_csv(path, [n for n in names.split(",") if n])
                if is_csv else [experiment_runs.load_run(source)])
    except experiment_runs.RunError as e:
      problems.append(str(e))
      print(f"skipping: {e}", file=sys.stderr)
      continue
    for run in loaded:
      # A run given twice (a study folder and one of its dirs, a csv and csv#RUN) would be
      # drawn, tabled and compared with itself as two runs.
      identity = (os.path.realpath(path), run.name if is_csv else "")
      if identity in seen:
        print(f"{run.model_dir}: given twice; drawn once", file=sys.stderr)
        continue
      seen.add(identity)
      runs.append(run)
      state = "finished" if run.finished else experiment_labels.progress(run)
      # None: a --validation_split run measures its test error only when it finishes.
      final = "-" if run.final_test_error is None else f"{run.final_test_error:.2f}%"
      print(f"{run.label}: {run.model_dir} ({state}; curves from {run.history_source}), "
            f"final test error {final}")
  return runs, problems


def write_outputs(runs: list, problems: list[str]) -> list[str]:
  """Draws the figure and writes --csv and --results; returns what was written.

  Raises:
    OSError: when a file cannot be written after all.
  """
  if FLAGS.style == "blog":
    experiment_figures.plot_blog_figure(runs, FLAGS.output, title=FLAGS.title)
  else:
    experiment_figures.plot_figure(runs, FLAGS.output, x_axis=FLAGS.x_axis, title=FLAGS.title)
  written = [FLAGS.output]
  if FLAGS.csv:
    experiment_results.write_curves_csv(runs, FLAGS.csv)
    written.append(FLAGS.csv)
  if FLAGS.results:
    with open(FLAGS.results, "w") as f:
      f.write(experiment_results.results_markdown(runs, failures=[f"unreadable: {p}"
                                                          for p in problems]))
    written.append(FLAGS.results)
  return written


def main(argv):
  if len(argv) < 2:
    cli.fail("give one or more RUN_DIRs (trainer model dirs, folders of them, or curves.csv "
             "files)")
  if FLAGS.style == "blog" and FLAGS.x_axis != "epoch":
    # The blog figure is per epoch; quietly drawing epochs would ignore the request.
    cli.fail("--x_axis=step is for --style=he2016; the blog figure is per epoch")
  problem = check_outputs(FLAGS.output, [p for p in (FLAGS.csv, FLAGS.results) if p])
  if problem:
    cli.fail(problem)
  runs, problems = load_runs(argv[1:])
  if not runs:  # Nothing readable was given: bad input (exit 1 is a partial figure).
    cli.fail("no run to plot")
  try:
    written = write_outputs(runs, problems)
  except OSError as e:
    cli.fail(f"cannot write {e.filename}: {e.strerror or e}")
  print(f"wrote {', '.join(written)}")
  if problems:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.script_parser)
