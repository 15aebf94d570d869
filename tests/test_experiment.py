"""The plain-vs-residual experiment in its smallest form: two tiny runs through
scripts/compare_plain_residual.py, a resuming rerun, failures, and scripts/plot_runs.py."""

import csv
import dataclasses
import json
import pathlib
import re
import shutil
import subprocess
import sys

import matplotlib.image
import pytest

from conftest import SMALL_SYNTHETIC
from scripts import experiment_figures, experiment_labels, experiment_results, experiment_runs
from trainer import run_files

REPO = pathlib.Path(__file__).resolve().parents[1]
# ResNet-8 / plain-8 (CIFAR family, n=1), 2 epochs of 2 steps on small synthetic splits:
# seconds per run.
TINY = ["--depths=8", "--data_source=synthetic", "--epochs=2", "--steps_per_epoch=2",
        "--eval_steps=1", "--global_batch_size=8", f"--extra_args={SMALL_SYNTHETIC}"]


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


@pytest.mark.process
def test_study_writes_runs_curves_figure_and_table(study):
  out, result = study
  assert "start plain-8" in result.stdout and "finished ResNet-8" in result.stdout
  for name in ("plain-8", "resnet-8"):
    assert (out / name / "metrics.json").exists()
    # test/, or validation/ from a trainer older than the split-named event dirs.
    assert any(list((out / name / d).glob("events.out.tfevents.*"))
               for d in run_files.EVAL_EVENTS)

  rows = read_csv(out / "curves.csv")
  assert tuple(rows[0]) == experiment_runs.CSV_COLUMNS
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
  assert len(table_rows) == 1 and table_rows[0].count("|") == 10
  # The per-run table: finished runs give their wall time from metrics.json.
  for label in ("plain-8", "ResNet-8"):
    (row,) = [line for line in results.splitlines() if line.startswith(f"| {label} |")]
    assert row.count("|") == 7 and row.endswith(" s |"), row
  assert "--depths=8" in results and "synthetic" in results


@pytest.mark.process
def test_rerun_reuses_finished_runs(study):
  out, _ = study
  metrics = [out / name / "metrics.json" for name in ("plain-8", "resnet-8")]
  mtimes = [p.stat().st_mtime_ns for p in metrics]
  (out / "curves.csv").unlink()
  result = run_script("compare_plain_residual.py", *TINY, f"--output_dir={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "reusing plain-8" in result.stdout and "reusing ResNet-8" in result.stdout
  # The best epoch, chosen on the test split, is never printed as if it were a result.
  assert re.search(r"reusing ResNet-8: finished in \S+, final test error [\d.]+% \(best "
                   r"epoch [\d.]+%: test-selected, not a result\)", result.stdout)
  assert "start " not in result.stdout
  assert [p.stat().st_mtime_ns for p in metrics] == mtimes
  assert len(read_csv(out / "curves.csv")) == 4


@pytest.mark.process
def test_rerun_with_other_settings_refuses_to_mix_schedules(study):
  out, _ = study
  args = [a for a in TINY if not a.startswith("--epochs")]
  result = run_script("compare_plain_residual.py", *args, "--epochs=3", f"--output_dir={out}")
  assert result.returncode == 1
  assert "other settings: --epochs=2 (this study: 3)" in result.stderr
  assert "start " not in result.stdout


@pytest.mark.process
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
  # A run given twice (the study's folder and one of its dirs) is one run, not two.
  result = run_script("plot_runs.py", out, f"{out / 'plain-8'}/", f"--output={figure}",
                      f"--csv={curves}", f"--results={tmp_path / 'results.md'}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.count("plain-8: ") == 1
  assert f"{out / 'plain-8'}/: given twice; drawn once" in result.stderr
  assert len(read_csv(curves)) == 4
  assert "Several" not in (tmp_path / "results.md").read_text()


@pytest.mark.process
def test_plot_runs_draws_runs_from_a_curves_csv_beside_run_dirs(study, tmp_path):
  # For runs whose model dirs are gone: their curves.csv rows stand in for them.
  out, _ = study
  original = read_csv(out / "curves.csv")
  resnet_only = tmp_path / "resnet.csv"
  with open(resnet_only, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=experiment_runs.CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(row for row in original if row["kind"] == "residual")
  figure, curves = tmp_path / "figure.png", tmp_path / "curves.csv"
  results = tmp_path / "results.md"
  result = run_script("plot_runs.py", resnet_only, out / "plain-8", f"--output={figure}",
                      f"--csv={curves}", f"--results={results}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"ResNet-8: {resnet_only}#resnet-8 (finished; curves from resnet.csv)" in result.stdout
  # The settings are the model dir's; the csv's run is named as having none recorded.
  assert ("Settings: CIFAR-10 (synthetic random images), recipe fast, 2 epochs x 2 steps, "
          "batch 8") in results.read_text()
  assert "; ResNet-8 from curves.csv files, which record no settings." in results.read_text()
  assert matplotlib.image.imread(figure).shape[0] > 100
  rebuilt = sorted(read_csv(curves), key=lambda r: (r["kind"], float(r["step"])))
  assert len(rebuilt) == len(original)
  for a, b in zip(sorted(original, key=lambda r: (r["kind"], float(r["step"]))), rebuilt):
    assert (a["run"], a["kind"], a["epoch"], a["step"]) == (
        b["run"], b["kind"], b["epoch"], b["step"])
    for key in ("train_error", "test_error", "train_loss", "test_loss"):
      assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4, abs=1e-4)
  # FILE.csv#RUN takes that run alone, as the script's own lines name it.
  result = run_script("plot_runs.py", f"{out / 'curves.csv'}#resnet-8", f"--output={figure}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"ResNet-8: {out / 'curves.csv'}#resnet-8 (finished" in result.stdout
  assert "plain-8" not in result.stdout
  result = run_script("plot_runs.py", f"{out / 'curves.csv'}#resnet8", f"--output={figure}")
  assert result.returncode == 2
  assert "curves.csv: no run resnet8 (its runs: " in result.stderr
  (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
  result = run_script("plot_runs.py", tmp_path / "bad.csv", f"--output={figure}")
  assert result.returncode == 2  # Nothing to draw: bad input.
  assert "bad.csv: not a curves.csv (its columns are a, b" in result.stderr
  assert "error: no run to plot" in result.stderr
  # A mistyped path is named as missing (it was "no config.json; not a model dir").
  result = run_script("plot_runs.py", tmp_path / "typo", f"--output={figure}")
  assert result.returncode == 2
  assert f"skipping: {tmp_path / 'typo'}: no such file or directory" in result.stderr


GOOD_ROW = {"run": "r8", "label": "ResNet-8", "depth": "8", "kind": "residual", "epoch": "1",
            "step": "4", "train_loss": "1.5", "train_error": "60", "test_loss": "1.6",
            "test_error": "62.5", "eval_split": "test"}


@pytest.mark.parametrize("change, message", [
    ({"kind": "weird"}, "kind residual and weird: one of plain or residual per run"),
    ({"kind": "plain"}, "kind plain and residual: one of plain or residual per run"),
    ({"depth": "14"}, "depths 8 and 14: one per run"),
    ({"eval_split": "train"}, "eval_split 'train': test or validation"),
    ({"test_loss": "nan"}, "test_loss nan: finite"),
    ({"train_error": "130"}, "train_error 130: finite, errors in 0-100"),
    ({"epoch": "inf"}, "epoch inf: finite"),
    ({"step": "ten"}, "step 'ten': not an integer"),
    ({"depth": ""}, "depth '': not an integer"),
], ids=["kind", "two-kinds", "two-depths", "split", "nan", "error-range", "inf", "step",
        "depth"])
def test_a_malformed_curves_csv_row_is_named_not_drawn(tmp_path, change, message):
  # A second row of the same run, with one bad field: the run is refused, not drawn
  # with a wrong last epoch or as the other kind.
  bad = _write_rows(tmp_path / "bad.csv",
                    [GOOD_ROW, {**GOOD_ROW, "epoch": "2", "step": "8", **change}])
  with pytest.raises(experiment_runs.RunError, match=re.escape(f"bad.csv: run r8: a malformed "
                                                          f"row ({message}")):
    experiment_runs.load_curves_csv(str(bad))
  (good,) = experiment_runs.load_curves_csv(str(_write_rows(tmp_path / "good.csv", [GOOD_ROW])))
  assert not good.config["plain"] and good.history[-1]["test_accuracy"] == pytest.approx(0.375)


def test_a_curves_csv_gives_only_the_runs_named(tmp_path):
  rows = [GOOD_ROW, {**GOOD_ROW, "run": "p8", "label": "plain-8", "kind": "plain"},
          {**GOOD_ROW, "run": "r14", "label": "ResNet-14", "depth": "14"}]
  path = str(_write_rows(tmp_path / "three.csv", rows))
  assert [run.name for run in experiment_runs.load_curves_csv(path)] == ["r8", "p8", "r14"]
  assert [run.name for run in experiment_runs.load_curves_csv(path, ["r14", "r8", "r14"])] == [
      "r14", "r8"]
  with pytest.raises(experiment_runs.RunError, match=re.escape(
      "three.csv: no run r9, p14 (its runs: r8, p8, r14)")):
    experiment_runs.load_curves_csv(path, ["r9", "r8", "p14"])


@pytest.mark.process
@pytest.mark.parametrize("outputs, message", [
    (["--output={tmp}/figure.txt"], "--output={tmp}/figure.txt: a figure file name ending "
                                    "in one of .avif, .eps"),
    (["--output={tmp}"], "--output={tmp}: a figure file name"),
    (["--output={tmp}/folder.png"], "{tmp}/folder.png is a folder; give a file name"),
    (["--output={tmp}/f.png", "--csv={tmp}/file.txt/c.csv"],
     "cannot create {tmp}/file.txt for {tmp}/file.txt/c.csv"),
], ids=["extension", "no-extension", "folder", "parent-is-a-file"])
def test_plot_runs_refuses_outputs_it_cannot_write_before_reading_runs(tmp_path, outputs,
                                                                       message):
  (tmp_path / "folder.png").mkdir()
  (tmp_path / "file.txt").write_text("")
  rows = _write_rows(tmp_path / "runs.csv", [GOOD_ROW])
  result = run_script("plot_runs.py", rows, *(o.format(tmp=tmp_path) for o in outputs))
  assert result.returncode == 2
  assert f"error: {message.format(tmp=tmp_path)}" in result.stderr
  assert "Traceback" not in result.stderr and "ResNet-8" not in result.stdout
  # Missing parent folders are made.
  figure = tmp_path / "new" / "sub" / "figure.svg"
  result = run_script("plot_runs.py", rows, f"--output={figure}",
                      f"--results={tmp_path / 'new' / 'results.md'}")
  assert result.returncode == 0, result.stderr[-2000:]
  assert figure.stat().st_size > 0 and (tmp_path / "new" / "results.md").exists()


def _write_rows(path, rows):
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=experiment_runs.CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  return path


@pytest.mark.process
@pytest.mark.parametrize("args, message", [
    (["--depths="], "error: --depths is empty: give one or more"),
    (["--depths=8", "--output_dir={tmp}/file.txt/out"],
     "error: --output_dir={tmp}/file.txt/out: cannot create it"),
    # Trainer flags are parsed once, before any run (each run failed with exit 2, and the
    # study with 1); unbalanced quotes were a shlex traceback.
    (["--depths=8", "--extra_args=--no_such_flag=1"],
     "error: --extra_args: Unknown command line flag 'no_such_flag'"),
    (["--depths=8", "--extra_args=--validation_split=0.1"],
     "error: --extra_args: flag --validation_split=0.1: not a whole number\n"
     "  --validation_split: Hold out"),
    (["--depths=8", "--extra_args='--eval_flip"],
     "error: --extra_args='--eval_flip: no closing quotation"),
    # Values the flags accept but the trainer's Config refuses: each run failed with exit
    # 2, and the study with 1, after creating its output dir.
    (["--depths=8", "--extra_args=--seed=-5"],
     "error: the trainer would refuse plain-8's settings: --seed must be in [0, 2**32), "
     "got -5"),
    (["--depths=8", "--extra_args=--stage_widths=16,x,64"],
     "error: the trainer would refuse plain-8's settings: --stage_widths must be "
     "comma-separated integers, got 16,x,64"),
    (["--depths=8", "--extra_args=--lr_schedule=cosine --recipe=he2016"],
     "error: the trainer would refuse plain-8's settings: --epochs is needed unless"),
    # Every run failed: "no checkpoint in .../checkpoints: train first".
    (["--depths=8", "--extra_args=--mode=eval"],
     "error: --extra_args: --mode=eval: a study trains its runs; eval one afterwards with "
     "python -m trainer.main --mode=eval --model_dir={tmp}/out/plain-8"),
], ids=["no-depths", "output-dir-under-a-file", "unknown-trainer-flag", "bad-trainer-value",
        "unbalanced-quotes", "value-the-config-refuses", "list-of-non-integers",
        "recipe-without-its-length", "not-training"])
def test_a_study_that_cannot_run_is_refused_with_error_and_exit_2(tmp_path, args, message):
  (tmp_path / "file.txt").write_text("")
  args = [a.format(tmp=tmp_path) for a in args]
  if not any(a.startswith("--output_dir") for a in args):
    args.append(f"--output_dir={tmp_path / 'out'}")
  result = run_script("compare_plain_residual.py", "--data_source=synthetic", *args)
  assert result.returncode == 2, result.stderr[-2000:]
  assert message.format(tmp=tmp_path) in result.stderr and "Traceback" not in result.stderr
  assert not (tmp_path / "out").exists()


@pytest.mark.process
def test_a_failed_run_is_summed_up_by_the_trainers_error_line(tmp_path):
  # A failure only the trainer finds (its settings are checked before the runs): a data
  # folder without class folders.
  (tmp_path / "data" / "train").mkdir(parents=True)
  result = run_script("compare_plain_residual.py", "--depths=8", "--data_source=folder",
                      f"--data_dir={tmp_path / 'data'}", "--parallel=2",
                      f"--output_dir={tmp_path / 'out'}")
  assert result.returncode == 1
  results = (tmp_path / "out" / "results.md").read_text()
  assert (f"plain-8: exit code 2 (error: {tmp_path / 'data' / 'train'}: has no class "
          "sub-folders); see " in results)


@pytest.mark.process
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


def _run(name: str, depth: int, plain: bool, test_errors: list[float]) -> experiment_runs.Run:
  history = tuple({"epoch": i + 1, "step": 10 * (i + 1), "train_loss": 1.0,
                   "train_accuracy": 1 - (e - 1) / 100, "test_loss": 1.0,
                   "test_accuracy": 1 - e / 100} for i, e in enumerate(test_errors))
  config = {"depth": depth, "plain": plain, "epochs": len(test_errors),
            "data_source": "folder", "data_dir": "/data", "global_batch_size": 128}
  return experiment_runs.Run(name, f"/runs/{name}", config, history, experiment_runs.HISTORY_FILE)


def test_results_table_gap_and_depth_trends():
  runs = [_run("plain-20", 20, True, [20.0, 9.0]), _run("plain-56", 56, True, [25.0, 13.0]),
          _run("resnet-20", 20, False, [18.0, 8.5]),
          _run("resnet-56", 56, False, [16.0, 7.0, 7.5])]
  runs[3].config["epochs"] = 4  # unfinished
  text = experiment_results.results_markdown(runs, command="python x.py")
  assert "| 20 | 9.00 | 9.00 | 8.50 | 8.50 | 0.50 |" in text
  # An unfinished run's last epoch so far is marked, in its cells and in the gap.
  assert ("| 56 | 13.00 | 13.00 | 7.50 (unfinished) | 7.00 | 5.50 (unfinished) | 12.00 | "
          "6.50 (unfinished) |") in text
  # He et al.'s Table 6 beside each depth.
  assert text.count("| 8.75 |") == 1 and "| 6.97 |" in text
  assert "Plain nets worse with depth (20 to 56 layers)? **yes**" in text
  # No trend is drawn from an unfinished run.
  assert "ResNets: fewer than two depths, no trend to report." in text
  assert "- Left out, unfinished: ResNet-56." in text
  assert "ResNet-56 (3/4 epochs)" in text
  runs[3].config["epochs"] = 3
  text = experiment_results.results_markdown(runs, command="python x.py")
  assert "| 56 | 13.00 | 13.00 | 7.50 | 7.00 | 5.50 | 12.00 | 6.50 |" in text
  assert "ResNets better with depth (20 to 56 layers)? **yes**" in text
  assert "Left out" not in text


def test_validation_split_runs_take_final_test_error_from_metrics(tmp_path):
  history = ({"epoch": 1, "step": 5, "train_loss": 1.0, "train_accuracy": 0.5,
              "validation_loss": 1.0, "validation_accuracy": 0.6},)
  run = experiment_runs.Run("resnet-20", "/runs/resnet-20",
                       {"depth": 20, "plain": False, "epochs": 1, "total_steps": 5,
                        "validation_split": 5000}, history, experiment_runs.HISTORY_FILE,
                       {"test_accuracy": 0.75})
  assert run.eval_split == "validation" and run.finished
  assert run.final_test_error == pytest.approx(25.0)
  assert run.best_test_error == pytest.approx(40.0)  # the best validation error
  experiment_results.write_curves_csv([run], tmp_path / "curves.csv")
  (row,) = read_csv(tmp_path / "curves.csv")
  assert row["eval_split"] == "validation" and float(row["test_error"]) == pytest.approx(40.0)
  assert "validation split" in experiment_results.results_markdown([run])


def test_runs_sharing_a_label_get_their_own_colours():
  runs = [_run("plain-20", 20, True, [20.0]), _run("resnet-20", 20, False, [18.0]),
          _run("resnet-56", 56, False, [16.0]), _run("resnet-20-wd1e3", 20, False, [17.0])]
  colours = experiment_figures.run_colours(runs)
  assert len(colours) == 4
  # Figure 6's convention where labels are unique: plain-20 and ResNet-56 differ.
  assert colours["/runs/plain-20"] != colours["/runs/resnet-56"]
  # The two ResNet-20 runs (an ablation) are distinguishable from each other and the rest.
  assert len({colours["/runs/resnet-20"], colours["/runs/resnet-20-wd1e3"],
              colours["/runs/plain-20"], colours["/runs/resnet-56"]}) == 4
  # Without the ablation run, each depth has one colour in both panels.
  colours = experiment_figures.run_colours(runs[:3])
  assert colours["/runs/plain-20"] == colours["/runs/resnet-20"] != colours["/runs/resnet-56"]


def test_legend_labels_tell_apart_runs_of_two_studies():
  a, b = _run("resnet-20", 20, False, [18.0]), _run("resnet-20", 20, False, [17.0])
  b = dataclasses.replace(b, model_dir="/other-study/resnet-20")
  a = dataclasses.replace(a, model_dir="/study/resnet-20")
  labels = experiment_labels._unique_labels([a, b, _run("resnet-56", 56, False, [16.0])])
  assert labels == {"/study/resnet-20": "ResNet-20 (study/resnet-20)",
                    "/other-study/resnet-20": "ResNet-20 (other-study/resnet-20)",
                    "/runs/resnet-56": "ResNet-56"}


def test_figure_of_one_kind_has_one_panel(tmp_path):
  resnets = [_run("resnet-20", 20, False, [18.0, 9.0]), _run("resnet-56", 56, False, [16.0, 8.0])]
  experiment_figures.plot_figure(resnets, tmp_path / "one.png")
  experiment_figures.plot_figure(resnets + [_run("plain-20", 20, True, [20.0, 9.5])],
                         tmp_path / "two.png")
  one, two = (matplotlib.image.imread(tmp_path / f).shape for f in ("one.png", "two.png"))
  assert one[0] == two[0] and one[1] < 0.6 * two[1]


def _blog_runs() -> list[experiment_runs.Run]:
  """The blog study's three runs, quarter width; ResNet-50 stopped after 1 of 2 epochs."""
  runs = [_run("plain-34", 34, True, [60.0, 50.0]), _run("resnet-34", 34, False, [55.0, 40.0]),
          _run("resnet-50", 50, False, [58.0])]
  for run in runs:
    run.config.update(recipe="blog", stage_widths=[16, 32, 64, 128], epochs=2)
  return runs


def test_blog_figure_draws_loss_and_accuracy_of_every_run(tmp_path):
  runs = _blog_runs()
  fig = experiment_figures.plot_blog_figure(runs, str(tmp_path / "blog.png"), title="blog study")
  image = matplotlib.image.imread(tmp_path / "blog.png")
  assert image.ndim == 3 and image.shape[1] > image.shape[0] > 100
  loss_ax, acc_ax = fig.axes
  assert (loss_ax.get_title(), acc_ax.get_title()) == ("loss", "accuracy")
  assert loss_ax.get_shared_x_axes().joined(loss_ax, acc_ax)
  for ax in (loss_ax, acc_ax):
    lines = ax.get_lines()
    assert len(lines) == 2 * len(runs)  # training and test per run
    assert sorted(line.get_linestyle() for line in lines) == ["-"] * 3 + ["--"] * 3
    # One colour per run, shared by its training and test lines: plain-34 and ResNet-34
    # are not merged as Figure 6's colour-per-depth would.
    assert len({line.get_color() for line in lines}) == len(runs)
  # The accuracy panel in percent: ResNet-34's test curve (4th line: plain-34 first).
  assert list(acc_ax.get_lines()[3].get_ydata()) == pytest.approx([45.0, 60.0])
  (legend,) = fig.legends
  labels = [t.get_text() for t in legend.get_texts() if t.get_text()]
  # A given title moves the shared layout into the legend.
  assert labels == ["plain-34 (widths 16,32,64,128)", "ResNet-34 (widths 16,32,64,128)",
                    "ResNet-50 (widths 16,32,64,128) [unfinished, 1 of 2 epochs]",
                    "training", "test"]
  assert fig.get_suptitle() == "blog study"
  # The default title says the layout the runs share; the legend then does not.
  fig = experiment_figures.plot_blog_figure(runs, str(tmp_path / "default.png"))
  assert "widths 16,32,64,128" in fig.get_suptitle()
  assert [t.get_text() for t in fig.legends[0].get_texts()][:2] == ["plain-34", "ResNet-34"]


def test_blog_figure_names_validation_curves(tmp_path):
  history = ({"epoch": 1, "step": 5, "train_loss": 2.0, "train_accuracy": 0.5,
              "validation_loss": 1.5, "validation_accuracy": 0.6},)
  validated = experiment_runs.Run("resnet-20", "/runs/resnet-20",
                             {"depth": 20, "plain": False, "epochs": 1,
                              "validation_split": 5000}, history, experiment_runs.HISTORY_FILE)
  fig = experiment_figures.plot_blog_figure([validated], str(tmp_path / "validation.png"))
  assert [t.get_text() for t in fig.legends[0].get_texts() if t.get_text()] == [
      "ResNet-20", "training", "validation"]
  assert [list(line.get_ydata()) for line in fig.axes[0].get_lines()] == [[2.0], [1.5]]
  fig = experiment_figures.plot_blog_figure([validated, _run("plain-20", 20, True, [30.0])],
                                    str(tmp_path / "mixed.png"))
  assert [t.get_text() for t in fig.legends[0].get_texts() if t.get_text()] == [
      "plain-20", "ResNet-20 [validation curve]", "training", "test / validation"]


def test_figure6_legend_says_how_far_unfinished_runs_got(tmp_path):
  fig = experiment_figures.plot_figure(_blog_runs(), str(tmp_path / "he2016.png"))
  plain_ax, resnet_ax = fig.axes
  assert [t.get_text() for t in resnet_ax.get_legend().get_texts()] == [
      "ResNet-34", "ResNet-50 [unfinished, 1 of 2 epochs]", "training error", "test error"]
  assert [t.get_text() for t in plain_ax.get_legend().get_texts()][0] == "plain-34"


def test_results_table_per_run_accuracies_and_wall_time():
  runs = _blog_runs()
  runs[0] = dataclasses.replace(runs[0], metrics={"wall_seconds": 3190.3})
  # runs[1] finished without metrics.json (stopped before writing it); runs[2] unfinished.
  text = experiment_results.results_markdown(runs)
  # The depth table keeps its columns.
  assert "| 34 | 50.00 | 50.00 | 40.00 | 40.00 | 10.00 | 49.00 | 39.00 | - |" in text
  assert ("| run | final test accuracy | best test accuracy (test-selected) "
          "| final train accuracy | final train error | wall time |") in text
  # final and best test accuracy, final training accuracy and error (_run: test error - 1).
  assert "| plain-34 | 50.00 | 50.00 | 51.00 | 49.00 | 53 min 10 s |" in text
  assert "| ResNet-34 | 60.00 | 60.00 | 61.00 | 39.00 | - (no metrics.json) |" in text
  assert "| ResNet-50 | 42.00 | 42.00 | 43.00 | 57.00 | unfinished, 1 of 2 epochs |" in text
  assert [experiment_results.format_duration(s) for s in (42.4, 61, 7325)] == [
      "42 s", "1 min 01 s", "2 h 02 min"]


@pytest.mark.process
def test_plot_runs_draws_the_blog_style(tmp_path):
  for run in _blog_runs()[1:]:  # ResNets only: Figure 6 style would draw one panel.
    (tmp_path / run.name).mkdir()
    (tmp_path / run.name / run_files.CONFIG_FILE).write_text(json.dumps(run.config))
    (tmp_path / run.name / run_files.HISTORY_FILE).write_text(
        json.dumps({"history": list(run.history)}))
  figure = tmp_path / "blog.png"
  result = run_script("plot_runs.py", tmp_path, "--style=blog", f"--output={figure}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "ResNet-50" in result.stdout and "unfinished, 1 of 2 epochs" in result.stdout
  height, width, _ = matplotlib.image.imread(figure).shape
  assert height > 100 and width > 2 * height  # loss and accuracy side by side
  result = run_script("plot_runs.py", tmp_path, "--style=blog", "--x_axis=step",
                      f"--output={tmp_path / 'step.png'}")
  assert result.returncode == 2 and "--style=he2016" in result.stderr
  assert not (tmp_path / "step.png").exists()


def write_epoch_events(log_dir: pathlib.Path, points: list[tuple[int, float, float]]) -> None:
  """Writes (step, loss, accuracy) as the epoch_* scalars the trainer's writers log."""
  import tensorflow as tf
  writer = tf.summary.create_file_writer(str(log_dir))
  with writer.as_default():
    for step, loss, accuracy in points:
      tf.summary.scalar(run_files.EPOCH_LOSS_TAG, loss, step=step)
      tf.summary.scalar(run_files.EPOCH_ACCURACY_TAG, accuracy, step=step)
  writer.close()


@pytest.mark.parametrize("event_dirs, validation_split, read_from, split", [
    (("test",), 0, "test", "test"),
    # Written by the trainer before the evaluation dir was named after its split.
    (("validation",), 0, "validation", "test"),
    (("test", "validation"), 0, "test", "test"),
    (("test", "validation"), 5000, "validation", "validation"),
])
def test_event_history_reads_the_evaluation_dir_of_the_split(
    tmp_path, event_dirs, validation_split, read_from, split):
  run_dir = tmp_path / "resnet-8"
  run_dir.mkdir()
  (run_dir / run_files.CONFIG_FILE).write_text(json.dumps(
      {"depth": 8, "plain": False, "epochs": 2, "steps_per_epoch_resolved": 5,
       "total_steps": 10, "validation_split": validation_split}))
  write_epoch_events(run_dir / run_files.TRAIN_EVENTS, [(5, 2.0, 0.3), (10, 1.5, 0.5)])
  # Each dir's own accuracies, to tell which one was read.
  accuracies = {"test": (0.4, 0.6), "validation": (0.35, 0.55)}
  for name in event_dirs:
    write_epoch_events(run_dir / name, [(5, 1.9, accuracies[name][0]),
                                        (10, 1.4, accuracies[name][1])])
  run = experiment_runs.load_run(str(run_dir))
  assert run.history_source == "events" and run.eval_split == split and run.finished
  assert [h["epoch"] for h in run.history] == [1, 2]
  assert [h["train_accuracy"] for h in run.history] == pytest.approx([0.3, 0.5])
  assert [h[f"{split}_accuracy"] for h in run.history] == pytest.approx(accuracies[read_from])
  assert [h[f"{split}_loss"] for h in run.history] == pytest.approx([1.9, 1.4])
  other = "validation" if split == "test" else "test"
  assert not any(key.startswith(other) for h in run.history for key in h)


def test_runs_with_their_own_stage_widths_say_so(tmp_path):
  blog = [_run(name, depth, plain, [60.0, 50.0]) for name, depth, plain in
          (("plain-34", 34, True), ("resnet-34", 34, False), ("resnet-50", 50, False))]
  for run in blog:
    run.config.update(recipe="blog", stage_widths=[16, 32, 64, 128])
  assert experiment_runs.layout_note(blog[0].config) == "widths 16,32,64,128"
  assert experiment_runs.layout_note({"stage_sizes": [2, 2], "stage_widths": [8, 16]}) == \
      "blocks 2,2, widths 8,16"
  # Shared by every run: in the figure's default title and in results.md's settings.
  assert "recipe blog, widths 16,32,64,128, 2 epochs" in experiment_labels.describe_settings(blog)
  assert "widths 16,32,64,128" in experiment_results.results_markdown(blog)
  assert experiment_labels.legend_labels(blog)["/runs/resnet-34"] == "ResNet-34"
  # A title of one's own replaces that description: the legend says it then.
  assert experiment_labels.legend_labels(blog, title="blog study")["/runs/resnet-34"] == \
      "ResNet-34 (widths 16,32,64,128)"
  experiment_figures.plot_figure(blog, tmp_path / "blog.png", title="blog study")

  # Mixed with a full-width run: the legend tells the two ResNet-34s apart.
  full = dataclasses.replace(_run("resnet-34", 34, False, [55.0, 45.0]),
                             model_dir="/full/resnet-34")
  full.config["recipe"] = "blog"
  mixed = blog + [full]
  labels = experiment_labels.legend_labels(mixed)
  assert labels["/runs/resnet-34"] == "ResNet-34 (widths 16,32,64,128)"
  assert labels["/full/resnet-34"] == "ResNet-34"
  assert labels["/runs/plain-34"] == "plain-34 (widths 16,32,64,128)"
  settings = experiment_labels.describe_settings(mixed)
  assert "widths" not in settings and "settings differ between runs" in settings
  experiment_figures.plot_figure(mixed, tmp_path / "mixed.png")


# Builds the jobs of a study as scripts/compare_plain_residual.py's main() does, without
# training: prints each run's name, trainer command and state (run_state) as JSON. In a
# child process: the script and trainer/main.py define flags of the same names.
STUDY_DRY_RUN = """
import json, sys
from scripts import compare_plain_residual as study, experiment_jobs, experiment_runs
study.FLAGS(["compare_plain_residual.py", *sys.argv[1:]])
settings = study._settings()
args, values = experiment_jobs.parse_extra_args(study.FLAGS.extra_args)
jobs = []
for job in experiment_jobs.make_jobs([int(d) for d in settings["depths"]], settings,
                                     study.FLAGS.output_dir):
  try:
    state = experiment_jobs.run_state(job, values)
  except experiment_runs.RunError as e:
    state = "refused: " + str(e)
  jobs.append({"name": job.name, "model_dir": job.model_dir, "command": job.command(args),
               "state": state})
print(json.dumps(jobs))
"""


def study_dry_run(*args: str) -> list[dict]:
  result = subprocess.run([sys.executable, "-c", STUDY_DRY_RUN, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.process
def test_blog_study_trains_the_origin_blogs_networks(tmp_path):
  from absl import flags
  from trainer import main as main_lib

  data_dir, out = tmp_path / "cifar10-jpeg", tmp_path / "blog-study"
  (data_dir / "train").mkdir(parents=True)
  study = ["--depths=34,50", "--extra_args=--recipe=blog --stage_widths=16,32,64,128",
           f"--output_dir={out}", f"--data_dir={data_dir}"]
  jobs = study_dry_run(*study)
  assert [(j["name"], j["state"]) for j in jobs] == [
      ("plain-34", "new"), ("resnet-34", "new"), ("plain-50", "new"), ("resnet-50", "new")]
  for job, (depth, plain, block) in zip(jobs, ((34, True, "basic"), (34, False, "basic"),
                                               (50, True, "bottleneck"),
                                               (50, False, "bottleneck"))):
    command = job["command"]
    assert command[1:3] == ["-m", "trainer.main"]
    assert "--recipe=blog" in command and "--stage_widths=16,32,64,128" in command
    assert not any(a.startswith("--epochs") for a in command)  # the recipe's 20
    # The Config trainer/main.py builds from that command line.
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["trainer.main", *command[3:]])
    try:
      config = main_lib.config_from_flags()
    finally:
      flags.FLAGS.unparse_flags()
    assert (config.depth, config.plain, config.data_source) == (depth, plain, "folder")
    assert (config.recipe, config.epochs, config.learning_rate, config.clipnorm) == (
        "blog", 20, 0.01, 1.0)
    architecture = config.architecture()
    assert architecture.stage_widths == (16, 32, 64, 128)
    assert architecture.stage_sizes == (3, 4, 6, 3) and architecture.block == block
    # What the trainer writes into config.json (tuples become lists) when it starts.
    (out / job["name"]).mkdir(parents=True)
    (out / job["name"] / run_files.CONFIG_FILE).write_text(json.dumps(
        {**dataclasses.asdict(config), "steps_per_epoch_resolved": 391,
         "total_steps": 7820}))
  (out / "resnet-34" / run_files.METRICS_FILE).write_text(json.dumps({"steps": 7820}))

  # Rerunning resumes (and reuses the finished run) rather than refusing the blog settings.
  assert [j["state"] for j in study_dry_run(*study)] == [
      "unfinished", "finished", "unfinished", "unfinished"]
  # A full-width study into the same dir must not mix with the quarter-width runs.
  full = [a.replace("16,32,64,128", "64,128,256,512") for a in study]
  states = [j["state"] for j in study_dry_run(*full)]
  assert all(s.startswith("refused: ") and "--stage_widths=16,32,64,128 (this study: "
             "64,128,256,512)" in s for s in states), states
