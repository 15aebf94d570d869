"""A run directory never loses a run: no diverged checkpoint, recovery from a damaged index,
one trainer per run dir, and every failure a one-line error with the documented exit code."""

import json
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from trainer import config as config_lib
from trainer import errors, hardware, run_dir, steps, train

from conftest import REPO, SMALL_SYNTHETIC, SMALL_SYNTHETIC_EXAMPLES, skip_unless_cpu_runs
from conftest import run_main as trainer

TINY = ["--depth=8", "--data_source=synthetic", SMALL_SYNTHETIC, "--global_batch_size=16",
        "--eval_steps=2"]


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> None:
  """Exit code 2, one `error:` line saying each needle, no traceback."""
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr and "FATAL" not in result.stderr, result.stderr
  errors_said = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert errors_said, result.stderr[-3000:]
  for needle in needles:
    assert needle in result.stderr, (needle, result.stderr[-3000:])


def checkpoint_steps(model_dir: pathlib.Path) -> list[int]:
  return sorted(int(p.name[len("ckpt-"):-len(".index")])
                for p in (model_dir / "checkpoints").glob("ckpt-*.index"))


def all_finite(checkpoint_prefix: str) -> bool:
  reader = tf.train.load_checkpoint(checkpoint_prefix)
  for name in reader.get_variable_to_shape_map():
    value = reader.get_tensor(name)
    if isinstance(value, np.ndarray) and value.dtype.kind == "f" and not np.isfinite(
        value).all():
      return False
  return True


def snapshot(directory: pathlib.Path) -> dict[str, tuple[int, int]]:
  """Every file below `directory` with its size and modification time."""
  return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in directory.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> pathlib.Path:
  """A tiny finished run: 2 epochs of 3 steps, a checkpoint every step (3 kept)."""
  model_dir = tmp_path_factory.mktemp("safety") / "run"
  result = trainer(*TINY, "--steps_per_epoch=3", "--epochs=2", "--checkpoint_every_steps=1",
                   f"--model_dir={model_dir}")
  assert result.returncode == 0, result.stderr[-3000:]
  return model_dir


def copy_run(source: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
  import shutil
  shutil.copytree(source, target)
  return target


# Never save a diverged model.

@pytest.mark.process
def test_a_diverging_run_saves_only_finite_checkpoints_and_resumes_from_the_named_one(
    tmp_path):
  model_dir = tmp_path / "run"
  args = [*TINY, "--steps_per_epoch=10", "--epochs=2", "--checkpoint_every_steps=1",
          "--log_every_steps=1", f"--model_dir={model_dir}"]
  result = trainer(*args, "--learning_rate=1e8")
  assert result.returncode == 1, result.stderr[-3000:]
  line = [l for l in result.stderr.splitlines() if l.startswith("error: ")][-1]
  assert ("NaN or Inf" in line or "exploded" in line) and "stopped without saving" in line
  named = line.split("The last good checkpoint is ")[1].split(":")[0]
  saved = checkpoint_steps(model_dir)
  assert saved and named.endswith(f"ckpt-{saved[-1]}")
  for step in saved:  # Nothing non-finite was written, so nothing finite rotated out.
    assert all_finite(str(model_dir / "checkpoints" / f"ckpt-{step}")), step
  rerun = trainer(*args, "--learning_rate=0.01")
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"resumed from {named} at step {saved[-1]}" in rerun.stderr


def test_weights_that_become_inf_while_the_loss_stays_finite_stop_the_run(
    tmp_path, monkeypatch):
  # The loss guard sees nothing: only the check of the weights can stop this run.
  monkeypatch.setattr(steps.TrainSteps, "first_non_finite_step", lambda self: 0)
  config = config_lib.Config(depth=8, data_source="synthetic", global_batch_size=16,
                             synthetic_examples=SMALL_SYNTHETIC_EXAMPLES,
                             steps_per_epoch=10, epochs=2, eval_steps=2, log_every_steps=1,
                             checkpoint_every_steps=1, learning_rate=1e8,
                             model_dir=str(tmp_path / "run"))
  with pytest.raises(errors.TrainingError, match="weights (became NaN or Inf|exploded) between"):
    train.train_and_evaluate(config, tf.distribute.get_strategy())
  saved = checkpoint_steps(tmp_path / "run")
  assert saved
  assert all(all_finite(str(tmp_path / "run" / "checkpoints" / f"ckpt-{s}")) for s in saved)


# A damaged or missing checkpoint index never restarts a run from zero.

@pytest.mark.process
@pytest.mark.parametrize("damage", ["garbage", "deleted"])
def test_a_damaged_index_resumes_from_the_newest_checkpoint_file(finished_run, tmp_path,
                                                                 damage):
  model_dir = copy_run(finished_run, tmp_path / "run")
  index = model_dir / "checkpoints" / "checkpoint"
  if damage == "garbage":
    index.write_text("this is not { a checkpoint state")
  else:
    index.unlink()
  result = trainer(*TINY, "--steps_per_epoch=3", "--epochs=3", "--checkpoint_every_steps=1",
                   f"--model_dir={model_dir}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "is missing, damaged or out of date; found ckpt-6, ckpt-5, ckpt-4" in result.stderr
  assert f"resumed from {model_dir}/checkpoints/ckpt-6 at step 6" in result.stderr
  # The index was rebuilt, so rotation went on: 3 kept, the newest 3.
  assert checkpoint_steps(model_dir) == [7, 8, 9]
  assert json.loads((model_dir / "metrics.json").read_text())["resumed_from_step"] == 6


@pytest.mark.process
def test_unrestorable_checkpoints_refuse_the_run_and_write_nothing(finished_run, tmp_path):
  model_dir = copy_run(finished_run, tmp_path / "run")
  (model_dir / "checkpoints" / "checkpoint").unlink()
  for data in (model_dir / "checkpoints").glob("ckpt-*.data-*"):
    data.write_bytes(b"junk")
  before = snapshot(model_dir)
  time.sleep(0.01)
  result = trainer(*TINY, "--steps_per_epoch=3", "--epochs=3", f"--model_dir={model_dir}")
  assert_user_error(result, "none of the checkpoints in", "could be restored")
  assert snapshot(model_dir) == before


# One trainer per run directory.

def wait_for(path: pathlib.Path, process: subprocess.Popen, timeout: float = 120) -> None:
  deadline = time.time() + timeout
  while not path.exists():
    assert process.poll() is None, process.communicate()[1][-3000:]
    assert time.time() < deadline, f"{path} did not appear"
    time.sleep(0.2)


@pytest.mark.process
def test_a_second_trainer_is_refused_and_a_killed_ones_lock_is_taken_over(tmp_path):
  model_dir = tmp_path / "run"
  args = [*TINY, "--steps_per_epoch=3", "--epochs=1000", f"--model_dir={model_dir}"]
  first = subprocess.Popen([sys.executable, "-m", "trainer.main", *args], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    wait_for(model_dir / "checkpoints" / "checkpoint", first)
    second = trainer(*args)
    assert_user_error(second, f"--model_dir={model_dir} is in use by process {first.pid} on ",
                      " since ")
    for extra in (["--mode=export"], ["--overwrite"]):
      assert_user_error(trainer(*args, *extra), f"is in use by process {first.pid}")
    # Reading a running run is allowed.
    evaluated = trainer(*TINY, "--mode=eval", f"--model_dir={model_dir}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  finally:
    first.send_signal(signal.SIGKILL)
    first.communicate()
  assert first.returncode == -signal.SIGKILL
  assert (model_dir / "run.lock").exists()  # Left behind by kill -9.
  resumed = trainer(*args[:-2], "--epochs=1", f"--model_dir={model_dir}")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"was left by process {first.pid} on " in resumed.stderr
  assert "taking it over" in resumed.stderr and "resumed from" in resumed.stderr
  assert not (model_dir / "run.lock").exists()  # Released at the end.


def test_the_lock_is_released_when_the_run_fails(tmp_path):
  model_dir = tmp_path / "run"
  config = config_lib.Config(depth=8, data_source="synthetic", global_batch_size=16,
                             synthetic_examples=SMALL_SYNTHETIC_EXAMPLES,
                             steps_per_epoch=3, epochs=1, eval_steps=2, learning_rate=1e30,
                             model_dir=str(model_dir))
  with pytest.raises(errors.TrainingError):
    train.train_and_evaluate(config, tf.distribute.get_strategy())
  assert not (model_dir / "run.lock").exists()
  with run_dir.RunLock(str(model_dir)):  # Free again.
    assert (model_dir / "run.lock").exists()


# Every failure a clear message, exit code 2 for user errors.

@pytest.mark.process
@pytest.mark.parametrize("name, content, needle", [
    ("config.json", "{not json", "config.json (the run's settings) is unreadable"),
    ("config.json", "[1, 2]", "holds list, not a JSON object"),
    ("history.json", "{\"history\": 3}", "history.json (the run's per-epoch history) has no"),
    ("history.json", "\x00\x01garbage", "history.json (the run's per-epoch history) is unread"),
])
def test_malformed_run_files_are_one_line_errors(finished_run, tmp_path, name, content,
                                                  needle):
  model_dir = copy_run(finished_run, tmp_path / "run")
  (model_dir / name).write_text(content)
  before = snapshot(model_dir)
  result = trainer(*TINY, "--steps_per_epoch=3", "--epochs=3", f"--model_dir={model_dir}")
  assert_user_error(result, needle, "--overwrite")
  # A refused run writes nothing: not config.json, not a line of train.log.
  assert snapshot(model_dir) == before


@pytest.mark.process
@pytest.mark.parametrize("mode, damage", [
    ("eval", "junk data"), ("export", "junk index"), ("eval", "no data"),
    ("export", "truncated data")])
def test_eval_and_export_of_a_damaged_checkpoint_say_it_is_damaged(finished_run, tmp_path,
                                                                   mode, damage):
  # Not "was it trained with other --depth ...?": the file itself does not read back.
  model_dir = copy_run(finished_run, tmp_path / "run")
  for path in model_dir.glob("checkpoints/ckpt-6.*"):
    if damage == "junk data" and ".data-" in path.name:
      path.write_bytes(b"junk")
    elif damage == "junk index" and path.suffix == ".index":
      path.write_bytes(b"junk")
    elif damage == "no data" and ".data-" in path.name:
      path.unlink()
    elif damage == "truncated data" and ".data-" in path.name:
      path.write_bytes(path.read_bytes()[:1000])
  result = trainer(*TINY, f"--mode={mode}", "--checkpoint=latest", f"--model_dir={model_dir}")
  assert_user_error(result, "checkpoints/ckpt-6 is damaged (",
                    "pick another with --checkpoint=PATH_PREFIX")


@pytest.mark.process
def test_eval_prints_its_result_before_failing_to_write_eval_json(finished_run, tmp_path):
  model_dir = copy_run(finished_run, tmp_path / "run")
  (model_dir / "eval.json").mkdir()  # Unwritable as a file, even for root.
  result = trainer(*TINY, "--mode=eval", f"--model_dir={model_dir}")
  assert_user_error(result, "cannot write", "eval.json")
  assert "eval: resnet8" in result.stdout and "test accuracy" in result.stdout


def test_a_failed_save_names_the_last_good_checkpoint(tmp_path, monkeypatch):
  real_save = run_dir.Checkpoints.save

  def save(self, step):
    if step >= 4:
      raise tf.errors.ResourceExhaustedError(None, None, "No space left on device")
    return real_save(self, step)

  monkeypatch.setattr(run_dir.Checkpoints, "save", save)
  config = config_lib.Config(depth=8, data_source="synthetic", global_batch_size=16,
                             synthetic_examples=SMALL_SYNTHETIC_EXAMPLES,
                             steps_per_epoch=3, epochs=2, eval_steps=2,
                             checkpoint_every_steps=1, model_dir=str(tmp_path / "run"))
  with pytest.raises(errors.RunDirError,
                     match=r"could not save the checkpoint of step 4 .*No space left on "
                           r"device.*The last good checkpoint is .*ckpt-3"):
    train.train_and_evaluate(config, tf.distribute.get_strategy())


@pytest.mark.process
@pytest.mark.parametrize("flag, needle", [
    ("--depth=abc", "flag --depth=abc"),
    ("--detph=20", "Did you mean: depth"),
    ("--global_batch_size=0", "--global_batch_size=0"),
    ("--flagfile=/no/such/flagfile", "/no/such/flagfile"),
    ("--warmup_epochs=nan", "--warmup_epochs must be a finite number"),
    ("--learning_rate=inf", "--learning_rate must be a finite number"),
])
def test_flag_errors_use_the_trainers_format(tmp_path, flag, needle):
  result = trainer(flag, f"--model_dir={tmp_path / 'run'}", timeout=120)
  assert_user_error(result, needle)
  assert not (tmp_path / "run").exists()


@pytest.mark.process
def test_too_many_logical_cpu_devices_are_refused_at_once(tmp_path):
  """--cpu_devices had no upper bound: 100,000 of them were still being created after
  90 s (each replica also traces its own copy of the step)."""
  result = trainer("--cpu_devices=100000", "--strategy=mirrored",
                   f"--model_dir={tmp_path / 'run'}", timeout=60)
  assert_user_error(result, "error: --cpu_devices must be at most 64, got 100000")
  assert not (tmp_path / "run").exists()


@pytest.mark.process
@pytest.mark.parametrize("flag, needle", [
    ("--ema_decay=0.9", "--ema_decay: 0.0 (no moving-average variables) in"),
    ("--precision=mixed_float16", "--precision: float32 (no loss-scale variables)"),
])
def test_resuming_with_settings_that_change_the_variables_is_refused(finished_run, tmp_path,
                                                                     flag, needle):
  if flag.startswith("--precision="):
    skip_unless_cpu_runs(flag.split("=")[1])  # else refused for the CPU, not the run dir
  model_dir = copy_run(finished_run, tmp_path / "run")
  result = trainer(*TINY, "--steps_per_epoch=3", "--epochs=3", flag, f"--model_dir={model_dir}")
  assert_user_error(result, "holds a run with different settings", needle)


@pytest.mark.process
@pytest.mark.parametrize("flag, needle", [
    ("--validation_split=32", "--validation_split: 0 in"),
    ("--lr_schedule=constant", "--lr_schedule: 'cosine' in"),
    ("--warmup_epochs=1", "--warmup_epochs: 2.0 in"),
    ("--recipe=blog", "--recipe: 'fast' in"),
])
def test_resuming_with_another_data_split_or_schedule_is_refused_and_writes_nothing(
    finished_run, tmp_path, flag, needle):
  # Another split changes the training set and what history.json's epochs evaluated (it
  # ended in KeyError: 'validation_accuracy'); another schedule, every later step's rate.
  model_dir = copy_run(finished_run, tmp_path / "run")
  before = snapshot(model_dir)
  result = trainer(*TINY, "--steps_per_epoch=3", "--epochs=3", flag, f"--model_dir={model_dir}")
  assert_user_error(result, "holds a run with different settings", needle)
  assert snapshot(model_dir) == before


@pytest.mark.process
def test_resuming_on_other_data_is_refused_and_on_the_same_data_moved_continues(
    image_folder, tmp_path):
  import shutil
  first, more = image_folder(train=4, test=2), image_folder(train=5, test=2)
  model_dir = tmp_path / "run"
  folder = ["--depth=8", "--data_source=folder", "--global_batch_size=8", "--eval_steps=1"]
  result = trainer(*folder, f"--data_dir={first}", "--epochs=1", f"--model_dir={model_dir}")
  assert result.returncode == 0, result.stderr[-3000:]
  before = snapshot(model_dir)
  result = trainer(*folder, f"--data_dir={more}", "--epochs=2", f"--model_dir={model_dir}")
  assert_user_error(result, "holds a run with different settings",
                    "training images (--data_dir, --validation_split): 40 in", "50 now")
  assert snapshot(model_dir) == before
  moved = shutil.copytree(first, tmp_path / "moved")
  result = trainer(*folder, f"--data_dir={moved}", "--epochs=2", f"--model_dir={model_dir}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "continuing" in result.stderr and "--data_dir:" in result.stderr


@pytest.mark.process
def test_a_resume_inside_the_profiler_window_traces_the_rest_of_it(finished_run, tmp_path):
  # The run ended at step 6; the window 4-8 began before it (this was a traceback:
  # "No profiler is running", from stopping a trace that never started).
  model_dir = copy_run(finished_run, tmp_path / "run")
  result = trainer(*TINY, "--steps_per_epoch=3", "--epochs=3", "--profile_steps=4,8",
                   f"--model_dir={model_dir}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert ("--profile_steps=4,8 began before step 6, where this run resumed: tracing steps "
          "6-8") in result.stderr
  assert "profiler trace of steps 6-8 written under" in result.stderr
  assert list((model_dir / "train" / "plugins" / "profile").rglob("*.xplane.pb"))


def test_deterministic_xla_on_the_imagenet_stem_is_refused_after_auto(monkeypatch):
  from trainer import distribute
  monkeypatch.setattr(distribute, "resolve_jit_compile", lambda value, strategy: True)
  config = config_lib.Config(depth=18, stem="imagenet", deterministic=True,
                             data_source="synthetic")
  with pytest.raises(errors.ConfigError, match="--deterministic cannot be combined with XLA"):
    hardware.resolve(config, tf.distribute.get_strategy())


@pytest.mark.process
def test_a_refused_run_leaves_no_empty_model_dir(tmp_path):
  model_dir = tmp_path / "new" / "run"
  result = trainer(*TINY, "--global_batch_size=7", "--cpu_devices=2", "--strategy=mirrored",
                   f"--model_dir={model_dir}")
  assert_user_error(result, "does not divide evenly")
  assert not model_dir.exists()


@pytest.mark.process
@pytest.mark.parametrize("model_dir", ["ram://run", "gs://bucket/run"])
def test_a_model_dir_on_an_object_store_is_refused(model_dir):
  result = trainer(*TINY, f"--model_dir={model_dir}", timeout=120)
  assert_user_error(result, "object stores are not supported", "network file system")


@pytest.mark.process
def test_a_resumed_run_keeps_the_data_seed_it_drew_and_a_new_run_draws_another(tmp_path):
  """Not --deterministic: the data order's seed is drawn when a run starts and kept when
  it resumes, so an interrupted epoch goes on in its own order (another seed would repeat
  some of its examples and skip others)."""
  model_dir = tmp_path / "run"
  seeds, logged = [], []
  for extra in (["--epochs=1"], ["--epochs=2"], ["--epochs=1", "--overwrite"]):
    result = trainer(*TINY, "--steps_per_epoch=2", *extra, f"--model_dir={model_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    seeds.append(json.loads((model_dir / "config.json").read_text())["data_seed_resolved"])
    logged.append(re.findall(r"data order and augmentation: seed (\d+) \((.+?)\)",
                             result.stderr))
  assert logged[0] == [(str(seeds[0]), "drawn for this run")]
  assert logged[1] == [(str(seeds[0]), "drawn when this run started")]
  assert seeds[1] == seeds[0]
  assert logged[2] == [(str(seeds[2]), "drawn for this run")]
  assert seeds[2] != seeds[0]  # Two draws agree once in 2**24.
