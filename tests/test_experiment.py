"""The plain-vs-residual experiment in its smallest form: two tiny runs through
scripts/compare_plain_residual.py, a resuming rerun, failures, and scripts/plot_runs.py."""

import csv
import dataclasses
import json
import pathlib
import shutil
import subprocess
import sys

import matplotlib.image
import pytest

from trainer import experiment

REPO = pathlib.Path(__file__).resolve().parents[1]
# ResNet-8 / plain-8 (CIFAR family, n=1), 2 epochs of 2 steps: seconds per run.
TINY = ["--depths=8", "--data_source=synthetic", "--epochs=2", "--steps_per_epoch=2",
        "--eval_steps=1", "--global_batch_size=8"]


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(REPO / "scripts" / name), *map(str, args)],
                        cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[pathlib.Path, subprocess.CompletedProcess]:
  """One study of plain-8 and ResNet-8, trained once for the whole module."""
  out = tmp_path_factory.mktemp("study")
  result = run_script("compare_plain_residual.py", *TINY, f"--output_dir={out}")
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return out, result


def read_csv(path) -> list[dict]:
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_study_writes_runs_curves_figure_and_table(study):
  out, result = study
  assert "start plain-8" in result.stdout and "finished ResNet-8" in result.stdout
  for name in ("plain-8", "resnet-8"):
    assert (out / name / "metrics.json").exists()
    assert list((out / name / "validation").glob("events.out.tfevents.*"))

  rows = read_csv(out / "curves.csv")
  assert tuple(rows[0]) == experiment.CSV_COLUMNS
  assert [(r["run"], r["kind"], r["depth"], r["epoch"], r["step"]) for r in rows] == [
      ("plain-8", "plain", "8", "1", "2"), ("plain-8", "plain", "8", "2", "4"),
      ("resnet-8", "residual", "8", "1", "2"), ("resnet-8", "residual", "8", "2", "4")]
  history = json.loads((out / "resnet-8" / "history.json").read_text())["history"]
  for row, h in zip(rows[2:], history):
    assert float(row["test_error"]) == pytest.approx(100 * (1 - h["test_accuracy"]), abs=1e-3)
    assert float(row["train_error"]) == pytest.approx(100 * (1 - h["train_accuracy"]),
                                                      abs=1e-3)

  image = matplotlib.image.imread(out / "figure.png")
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100

  results = (out / "results.md").read_text()
  assert "| depth | plain final test | plain best test | ResNet final test" in results
  table_rows = [line for line in results.splitlines() if line.startswith("| 8 |")]
  assert len(table_rows) == 1 and table_rows[0].count("|") == 9
  assert "--depths=8" in results and "synthetic" in results


def test_rerun_reuses_finished_runs(study):
  out, _ = study
  metrics = [out / name / "metrics.json" for name in ("plain-8", "resnet-8")]
  mtimes = [p.stat().st_mtime_ns for p in metrics]
  (out / "curves.csv").unlink()
  result = run_script("compare_plain_residual.py", *TINY, f"--output_dir={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "reusing plain-8" in result.stdout and "reusing ResNet-8" in result.stdout
  assert "start " not in result.stdout
  assert [p.stat().st_mtime_ns for p in metrics] == mtimes
  assert len(read_csv(out / "curves.csv")) == 4


def test_rerun_with_other_settings_refuses_to_mix_schedules(study):
  out, _ = study
  args = [a for a in TINY if not a.startswith("--epochs")]
  result = run_script("compare_plain_residual.py", *args, "--epochs=3", f"--output_dir={out}")
  assert result.returncode == 1
  assert "other settings: --epochs=2 (this study: 3)" in result.stderr
  assert "start " not in result.stdout


def test_plot_runs_from_history_and_from_event_files(study, tmp_path):
  out, _ = study
  # A copy without history.json: its curves must come from the TensorBoard event files.
  events_only = tmp_path / "resnet-8"
  shutil.copytree(out / "resnet-8", events_only)
  (events_only / "history.json").unlink()
  figure, curves = tmp_path / "figure.png", tmp_path / "curves.csv"
  result = run_script("plot_runs.py", out / "plain-8", events_only, f"--output={figure}",
                      f"--csv={curves}", f"--results={tmp_path / 'results.md'}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "curves from events" in result.stdout
  assert matplotlib.image.imread(figure).shape[0] > 100
  original = read_csv(out / "curves.csv")
  rebuilt = read_csv(curves)
  assert len(rebuilt) == 4
  for a, b in zip(original, rebuilt):
    assert (a["run"], a["epoch"], a["step"]) == (b["run"], b["epoch"], b["step"])
    for key in ("train_error", "test_error", "train_loss", "test_loss"):
      assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4, abs=1e-4)
  assert "| 8 |" in (tmp_path / "results.md").read_text()


def test_failed_runs_are_reported_and_outputs_still_written(tmp_path):
  result = run_script("compare_plain_residual.py", "--depths=8", "--data_source=folder",
                      f"--data_dir={tmp_path / 'missing'}", "--epochs=1", "--parallel=2",
                      f"--output_dir={tmp_path / 'out'}")
  assert result.returncode == 1
  assert "FAILED plain-8" in result.stderr and "FAILED ResNet-8" in result.stderr
  assert "  | error:" in result.stderr  # the trainer's own message, quoted from its log
  results = (tmp_path / "out" / "results.md").read_text()
  assert "## Failed runs" in results and "plain-8: exit code 2" in results
  assert read_csv(tmp_path / "out" / "curves.csv") == []
  assert matplotlib.image.imread(tmp_path / "out" / "figure.png").shape[0] > 100


def _run(name: str, depth: int, plain: bool, test_errors: list[float]) -> experiment.Run:
  history = tuple({"epoch": i + 1, "step": 10 * (i + 1), "train_loss": 1.0,
                   "train_accuracy": 1 - (e - 1) / 100, "test_loss": 1.0,
                   "test_accuracy": 1 - e / 100} for i, e in enumerate(test_errors))
  config = {"depth": depth, "plain": plain, "epochs": len(test_errors),
            "data_source": "folder", "data_dir": "/data", "global_batch_size": 128}
  return experiment.Run(name, f"/runs/{name}", config, history, experiment.HISTORY_FILE)


def test_results_table_gap_and_depth_trends():
  runs = [_run("plain-20", 20, True, [20.0, 9.0]), _run("plain-56", 56, True, [25.0, 13.0]),
          _run("resnet-20", 20, False, [18.0, 8.5]),
          _run("resnet-56", 56, False, [16.0, 7.0, 7.5])]
  runs[3].config["epochs"] = 4  # unfinished
  text = experiment.results_markdown(runs, command="python x.py")
  assert "| 20 | 9.00 | 9.00 | 8.50 | 8.50 | 0.50 |" in text
  assert "| 56 | 13.00 | 13.00 | 7.50 | 7.00 | 5.50 |" in text
  assert "Plain nets worse with depth (20 to 56 layers)? **yes**" in text
  assert "ResNets better with depth (20 to 56 layers)? **yes**" in text
  assert "ResNet-56 (3/4 epochs)" in text


def test_validation_split_runs_take_final_test_error_from_metrics(tmp_path):
  history = ({"epoch": 1, "step": 5, "train_loss": 1.0, "train_accuracy": 0.5,
              "validation_loss": 1.0, "validation_accuracy": 0.6},)
  run = experiment.Run("resnet-20", "/runs/resnet-20",
                       {"depth": 20, "plain": False, "epochs": 1, "total_steps": 5,
                        "validation_split": 5000}, history, experiment.HISTORY_FILE,
                       {"test_accuracy": 0.75})
  assert run.eval_split == "validation" and run.finished
  assert run.final_test_error == pytest.approx(25.0)
  assert run.best_test_error == pytest.approx(40.0)  # the best validation error
  experiment.write_curves_csv([run], tmp_path / "curves.csv")
  (row,) = read_csv(tmp_path / "curves.csv")
  assert row["eval_split"] == "validation" and float(row["test_error"]) == pytest.approx(40.0)
  assert "validation split" in experiment.results_markdown([run])


def test_runs_sharing_a_label_get_their_own_colours():
  runs = [_run("plain-20", 20, True, [20.0]), _run("resnet-20", 20, False, [18.0]),
          _run("resnet-56", 56, False, [16.0]), _run("resnet-20-wd1e3", 20, False, [17.0])]
  colours = experiment.run_colours(runs)
  assert len(colours) == 4
  # Figure 6's convention where labels are unique: plain-20 and ResNet-56 differ.
  assert colours["/runs/plain-20"] != colours["/runs/resnet-56"]
  # The two ResNet-20 runs (an ablation) are distinguishable from each other and the rest.
  assert len({colours["/runs/resnet-20"], colours["/runs/resnet-20-wd1e3"],
              colours["/runs/plain-20"], colours["/runs/resnet-56"]}) == 4
  # Without the ablation run, each depth has one colour in both panels.
  colours = experiment.run_colours(runs[:3])
  assert colours["/runs/plain-20"] == colours["/runs/resnet-20"] != colours["/runs/resnet-56"]


def test_legend_labels_tell_apart_runs_of_two_studies():
  a, b = _run("resnet-20", 20, False, [18.0]), _run("resnet-20", 20, False, [17.0])
  b = dataclasses.replace(b, model_dir="/other-study/resnet-20")
  a = dataclasses.replace(a, model_dir="/study/resnet-20")
  labels = experiment._unique_labels([a, b, _run("resnet-56", 56, False, [16.0])])
  assert labels == {"/study/resnet-20": "ResNet-20 (study/resnet-20)",
                    "/other-study/resnet-20": "ResNet-20 (other-study/resnet-20)",
                    "/runs/resnet-56": "ResNet-56"}


def test_figure_of_one_kind_has_one_panel(tmp_path):
  resnets = [_run("resnet-20", 20, False, [18.0, 9.0]), _run("resnet-56", 56, False, [16.0, 8.0])]
  experiment.plot_figure(resnets, tmp_path / "one.png")
  experiment.plot_figure(resnets + [_run("plain-20", 20, True, [20.0, 9.5])],
                         tmp_path / "two.png")
  one, two = (matplotlib.image.imread(tmp_path / f).shape for f in ("one.png", "two.png"))
  assert one[0] == two[0] and one[1] < 0.6 * two[1]
