"""What a person meets: eval and export from the run dir alone, a console without absl's
prefixes (the full format in train.log), --help for users, and the warm-up warning."""

import ast
import json
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, SMALL_SYNTHETIC, run_main as trainer

ABSL_PREFIX = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+\.py:\d+\]")
# TensorFlow's C++ log, e.g. "E0000 00:00:1796031308.057040   31302 util.cc:131] ...".
CPP_LOG = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ \S+\.cc:\d+\]")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[pathlib.Path, subprocess.CompletedProcess]:
  """A tiny finished depth-8 run on a synthetic source (no flag of it is a default)."""
  model_dir = tmp_path_factory.mktemp("console") / "r8"
  result = trainer("--depth=8", "--data_source=synthetic", SMALL_SYNTHETIC,
                   "--global_batch_size=16", "--steps_per_epoch=3", "--epochs=2", "--eval_steps=2",
                   f"--model_dir={model_dir}")
  assert result.returncode == 0, result.stderr[-3000:]
  return model_dir, result


@pytest.mark.process
def test_the_console_shows_messages_without_absl_prefixes_and_train_log_keeps_them(run):
  model_dir, result = run
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert not [line for line in lines if ABSL_PREFIX.match(line)], lines[:5]
  # Nor TensorFlow's C++ log: e.g. oneDNN's "supports DT_HALF only on platforms with
  # AVX-512" error line, which a float16 kernel probe in a float32 run printed.
  assert not [line for line in lines if CPP_LOG.match(line)], lines[:5]
  assert any(line.startswith("epoch 2.00 step 6/6 loss ") for line in lines)
  log = (model_dir / "train.log").read_text().splitlines()
  assert any(ABSL_PREFIX.match(line) and "epoch 2.00 step 6/6 loss " in line for line in log)


@pytest.mark.process
def test_a_run_whose_steps_all_ran_in_the_untimed_first_call_shows_no_speed(tmp_path):
  """The first call into TensorFlow (its tracing) is not timed; here it runs every step.
  The log line and the done line said "nan images/s eta ?" and "nan training images/s"."""
  result = trainer("--depth=8", "--data_source=synthetic", SMALL_SYNTHETIC,
                   "--global_batch_size=8", "--steps_per_epoch=2", "--epochs=1", "--eval_steps=1",
                   "--steps_per_execution=1000", f"--model_dir={tmp_path / 'run'}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "nan" not in result.stderr
  step = [line for line in result.stderr.splitlines() if " step 2/2 " in line]
  assert step and step[0].endswith(" (speed: the first call is not timed)"), step
  done = result.stdout.strip().splitlines()[-1]
  assert re.fullmatch(r"done: resnet8 test accuracy \d\.\d{4} on all 60 test images "
                      r"after 1\.0 epochs \(2 steps\) in \d+ s; metrics in .*metrics\.json",
                      done), done
  assert json.loads((tmp_path / "run" / "metrics.json").read_text())[
      "images_per_second"] is None


@pytest.mark.process
def test_the_settings_are_a_short_grouped_block(run):
  _, result = run
  block = result.stderr[result.stderr.index("settings:"):].splitlines()[:6]
  assert [line.split(":")[0].strip() for line in block] == [
      "settings", "model", "data", "recipe", "distribution", "run dir"]
  assert "depth=8" in block[1] and "data_source=synthetic" in block[2]
  assert max(len(line) for line in block) < 300


def test_every_setting_is_in_one_of_the_groups():
  from trainer import config as config_lib
  grouped = [name for names in config_lib.groups().values() for name in names]
  assert sorted(grouped) == sorted(config_lib.Config.__dataclass_fields__)


@pytest.mark.process
def test_eval_and_export_need_nothing_but_the_run_dir(run, tmp_path):
  model_dir, _ = run
  evaluated = trainer("--mode=eval", f"--model_dir={model_dir}", cwd=tmp_path)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert "eval: resnet8 " in evaluated.stdout
  assert "data_source=synthetic" in evaluated.stderr and "depth=8" in evaluated.stderr
  saved = json.loads((model_dir / "eval.json").read_text())
  # The whole test split: the run's --eval_steps capped its per-epoch evaluations only.
  assert saved["model"] == "resnet8" and saved["examples"] == saved["split_examples"] == 60
  # No TensorFlow chatter: every stderr line is the trainer's own.
  assert not [line for line in evaluated.stderr.splitlines()
              if "tensorflow" in line.lower() or ABSL_PREFIX.match(line)]
  exported = trainer("--mode=export", f"--model_dir={model_dir}",
                     f"--export_dir={tmp_path / 'export'}", "--epochs=9", cwd=tmp_path)
  assert exported.returncode == 0, exported.stderr[-3000:]
  assert (f"warning: --mode=export uses the run's own settings from {model_dir}/config.json; "
          "ignored: --epochs") in exported.stderr.splitlines()  # A console line, unprefixed.
  assert (tmp_path / "export" / "model.keras").exists()


@pytest.mark.process
def test_eval_of_a_run_dir_without_config_json_names_the_settings_standing_in(run, tmp_path):
  model_dir, _ = run
  copy = tmp_path / "r8"
  shutil.copytree(model_dir / "checkpoints", copy / "checkpoints")
  result = trainer("--mode=eval", f"--model_dir={copy}", "--depth=8",
                   "--data_source=synthetic", "--eval_steps=1")
  assert result.returncode == 0, result.stderr[-3000:]
  assert (f"warning: --mode=eval: no {copy}/config.json (the run's settings); the flags' "
          "settings stand in: --depth=8 --plain=false --stem=cifar --ema_decay=0.0 "
          "--data_source=synthetic; pass the run's own if they differ") in result.stderr


@pytest.mark.process
@pytest.mark.parametrize("flag, needle", [
    ("--depth=20", "--depth=20 (the run in "),
    ("--plain", "--plain=True (the run in "),
    ("--stage_widths=8,16,32", "--stage_widths=8,16,32 (the run in "),
])
def test_an_architecture_flag_that_contradicts_the_run_is_refused(run, flag, needle):
  model_dir, _ = run
  result = trainer("--mode=eval", f"--model_dir={model_dir}", flag)
  assert result.returncode == 2, result.stderr[-3000:]
  line = [l for l in result.stderr.splitlines() if l.startswith("error: ")][0]
  assert needle in line and "config.json has --" in line
  assert "Traceback" not in result.stderr


@pytest.mark.process
def test_help_leads_with_usage_groups_the_flags_and_exits_0():
  result = trainer("--help")
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("Train a ResNet")
  assert "usage:" in result.stdout.splitlines()[2]
  headings = [line for line in result.stdout.splitlines() if re.match(r"^[a-z ]+:$", line)]
  assert headings == ["usage:", "model:", "data:", "recipe:", "distribution:", "run dir:",
                      "output:"]
  assert "  --depth (default: 50)" in result.stdout


@pytest.mark.process
@pytest.mark.parametrize("arg", ["--helpfull", "-helpfull", "--helpfull=true"])
def test_helpfull_lists_absls_own_flags_too_and_exits_0(arg):
  result = trainer(arg)  # absl's own --helpfull exits 1, in each of these spellings.
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("Train a ResNet")
  for flag in ("--depth:", "--flagfile:", "--verbosity:"):
    assert flag in result.stdout


@pytest.mark.process
@pytest.mark.parametrize("arg, reason, help_start", [
    # A Keras user's fraction: absl said "invalid literal for int() with base 10: '0.1'".
    ("--validation_split=0.1", "not a whole number", "Hold out this many training images"),
    # absl: "could not convert string to float: 'abc'".
    ("--learning_rate=abc", "not a number", "Peak learning rate"),
    # absl: "('Non-boolean argument to boolean flag', 'maybe')".
    ("--eval_flip=maybe", "not true or false (--eval_flip or --noeval_flip alone also work)",
     "Also evaluate"),
    ("--global_batch_size=0", "0 is not a positive integer", "Examples per step"),  # absl's
])
def test_a_flag_value_that_does_not_parse_is_explained_with_the_flags_help(
    arg, reason, help_start):
  result = trainer(arg)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.splitlines()
  assert lines[0] == f"error: flag {arg}: {reason}"
  assert lines[1].startswith(f"  {arg.split('=')[0]}: {help_start}")
  assert lines[-1] == "see --help for the flags"


def _script(path: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True,
                        timeout=120, cwd=REPO)


# Every script with flags (scripts/*.py that call app.run), found rather than listed, so a
# new script is held to the same conventions.
SCRIPTS = sorted(p.name for p in (REPO / "scripts").glob("*.py")
                 if "app.run(" in p.read_text())


@pytest.mark.process
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_exits_0_on_help_and_2_with_error_on_a_bad_flag(script):
  # absl's own: --help exits 1, and a bad flag prints "FATAL Flags parsing error", exit 1.
  path = REPO / "scripts" / script
  result = _script(path, "--help")
  assert result.returncode == 0, result.stderr[-2000:]
  first_line = ast.get_docstring(ast.parse(path.read_text())).splitlines()[0]
  assert result.stdout.startswith(first_line)
  result = _script(path, "--no_such_flag=1")
  assert result.returncode == 2, result.stderr[-2000:]
  # The first line: nothing (not TensorFlow's start-up chatter) before the error.
  assert result.stderr.startswith("error: Unknown command line flag 'no_such_flag'")


@pytest.mark.process
def test_a_warm_up_covering_the_whole_run_is_warned_about(run):
  _, result = run  # fast recipe: 2 warm-up epochs, and the run has 2 epochs.
  assert ("warning: the learning-rate warm-up (6 steps, --warmup_epochs=2) covers the whole "
          "run (6 steps)") in result.stderr
