"""End-to-end tests of the trainer: the entrypoint on tiny data, resume, MirroredStrategy,
and flag validation."""

import json
import os
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
from trainer import train

REPO = pathlib.Path(__file__).resolve().parents[1]
CLASSES = [f"class{i}" for i in range(10)]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> pathlib.Path:
  """A CIFAR-shaped folder dataset: 4 train and 2 test PNGs per class."""
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for split, count in (("train", 4), ("test", 2)):
    for name in CLASSES:
      folder = root / split / name
      folder.mkdir(parents=True)
      for i in range(count):
        image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        (folder / f"{i}.png").write_bytes(tf.io.encode_png(image).numpy())
  return root


def event_tags(log_dir: pathlib.Path) -> set[str]:
  """Every summary tag written under a TensorBoard log dir."""
  tags = set()
  for path in log_dir.glob("events.out.tfevents.*"):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      tags.update(value.tag for value in event.summary.value)
  return tags


def run_main(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "trainer.main", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def small_args(model_dir, data_dir, epochs=1) -> list[str]:
  return ["--depth=8", "--data_source=folder", f"--data_dir={data_dir}",
          f"--model_dir={model_dir}", f"--epochs={epochs}", "--steps_per_epoch=2",
          "--global_batch_size=8", "--log_every_steps=1"]


def test_entrypoint_trains_writes_outputs_and_resumes(tmp_path, image_folder):
  model_dir = tmp_path / "run"
  first = run_main(*small_args(model_dir, image_folder, epochs=1), "--profile_steps=1,2")
  assert first.returncode == 0, first.stderr[-3000:]
  assert "test accuracy" in first.stdout
  assert list((model_dir / "checkpoints").glob("ckpt-2.index"))
  assert list((model_dir / "train").glob("events.out.tfevents.*"))
  assert list((model_dir / "validation").glob("events.out.tfevents.*"))
  metrics = json.loads((model_dir / "metrics.json").read_text())
  assert 0.0 <= metrics["test_accuracy"] <= 1.0
  assert metrics["steps"] == 2 and metrics["epochs"] == 1
  for key in ("wall_seconds", "images_per_second"):
    assert key in metrics
  train_tags = event_tags(model_dir / "train")
  for tag in ("loss", "accuracy", "learning_rate", "images_per_second", "step_time_ms",
              "epoch_loss", "epoch_accuracy", "config", "_hparams_/session_start_info",
              "gradient_norm/stem", "gradient_norm/stage1", "gradient_norm/stage3",
              "gradient_norm/head"):
    assert tag in train_tags, tag
  assert {"loss", "accuracy"} <= event_tags(model_dir / "validation")
  assert list((model_dir / "train" / "plugins" / "profile").rglob("*.xplane.pb"))

  second = run_main(*small_args(model_dir, image_folder, epochs=2))
  assert second.returncode == 0, second.stderr[-3000:]
  metrics = json.loads((model_dir / "metrics.json").read_text())
  assert metrics["resumed_from_step"] == 2
  assert metrics["steps"] == 4 and metrics["epochs"] == 2
  assert [h["epoch"] for h in metrics["history"]] == [1, 2]
  assert list((model_dir / "checkpoints").glob("ckpt-4.index"))


def test_mirrored_strategy_on_two_cpus_trains_and_resumes(tmp_path, image_folder):
  devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
  assert len(devices) == 2, "tests/conftest.py should have made two logical CPUs"
  strategy = tf.distribute.MirroredStrategy(
      devices, cross_device_ops=tf.distribute.ReductionToOneDevice())
  config = config_lib.Config(depth=8, data_source="folder", data_dir=str(image_folder),
                             model_dir=str(tmp_path / "run"), epochs=1, steps_per_epoch=2,
                             global_batch_size=8, log_every_steps=1)
  metrics = train.train_and_evaluate(config, strategy)
  assert metrics["replicas"] == 2
  assert metrics["steps"] == 2
  assert 0.0 <= metrics["test_accuracy"] <= 1.0
  resumed = train.train_and_evaluate(
      config_lib.Config(**{**config.__dict__, "epochs": 2}), strategy)
  assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 4


@pytest.mark.parametrize("flag, message", [
    ("--data_source=imagenet", "data_source"),
    ("--depth=37", "supported depths"),
    ("--global_batch_size=0", "global_batch_size"),
    ("--global_batch_size=-8", "global_batch_size"),
])
def test_bad_flags_fail_clearly_and_write_nothing(tmp_path, flag, message):
  model_dir = tmp_path / "run"
  result = run_main("--data_source=synthetic", f"--model_dir={model_dir}", flag)
  assert result.returncode != 0
  assert message in result.stderr
  assert "Traceback" not in result.stderr
  assert not model_dir.exists()


def test_config_rejects_invalid_values():
  with pytest.raises(config_lib.ConfigError, match="supported depths"):
    config_lib.Config(depth=37)
  with pytest.raises(config_lib.ConfigError, match="global_batch_size"):
    config_lib.Config(global_batch_size=0)
  with pytest.raises(config_lib.ConfigError, match="data_dir"):
    config_lib.Config(data_source="folder")


def test_global_batch_not_divisible_by_replicas_fails_before_writing(tmp_path):
  devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
  strategy = tf.distribute.MirroredStrategy(
      devices, cross_device_ops=tf.distribute.ReductionToOneDevice())
  config = config_lib.Config(depth=8, data_source="synthetic", global_batch_size=7,
                             model_dir=str(tmp_path / "run"), steps_per_epoch=1)
  with pytest.raises(config_lib.ConfigError, match="replicas"):
    train.train_and_evaluate(config, strategy)
  assert not os.path.exists(tmp_path / "run")


def test_several_steps_per_execution_stop_at_log_and_epoch_boundaries(tmp_path):
  config = config_lib.Config(depth=8, data_source="synthetic", model_dir=str(tmp_path / "run"),
                             epochs=2, steps_per_epoch=7, global_batch_size=8,
                             steps_per_execution=3, log_every_steps=5, eval_steps=1)
  metrics = train.train_and_evaluate(config, tf.distribute.get_strategy())
  assert metrics["steps"] == 14
  assert [h["step"] for h in metrics["history"]] == [7, 14]
  logged = set()
  for path in (tmp_path / "run" / "train").glob("events.out.tfevents.*"):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      if any(value.tag == "loss" for value in event.summary.value):
        logged.add(event.step)
  # Calls of at most 3 steps, cut at every log (5, 10) and epoch (7, 14) boundary.
  assert logged == {5, 7, 10, 14}
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert saved["steps_per_execution_resolved"] == 3


@pytest.mark.parametrize("stop, code, error", [
    (KeyboardInterrupt, 130, "error: interrupted while starting up; nothing was written"),
    ("sigterm", 143, "error: terminated (SIGTERM) while starting up; nothing was written"),
])
def test_a_signal_while_importing_tensorflow_exits_with_a_message(
    monkeypatch, capsys, stop, code, error):
  from absl import flags
  from trainer import main as main_lib
  stop = main_lib._Terminated if stop == "sigterm" else stop

  def importing(show_logs: bool) -> None:
    raise stop()  # What the signal handler raises, as it would mid-import.

  monkeypatch.setattr(main_lib, "_import_tensorflow", importing)
  monkeypatch.setattr(main_lib, "_announce_interrupts", lambda: None)
  announced = main_lib.threading.Event()
  announced.set()  # No notice thread here to wait for.
  monkeypatch.setattr(main_lib, "_announced", announced)
  handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["trainer.main", "--data_source=synthetic"])
  try:
    with pytest.raises(SystemExit) as exited:
      main_lib.main(["trainer.main"])
  finally:
    flags.FLAGS.unparse_flags()
    for signum, handler in handlers.items():
      signal.signal(signum, handler)
  assert exited.value.code == code
  assert error in capsys.readouterr().err


@pytest.mark.parametrize("signum, code, notice, error", [
    (signal.SIGINT, 130, "interrupt received: stopping", "error: interrupted; saved "),
    (signal.SIGTERM, 143, "SIGTERM received: stopping", "error: terminated (SIGTERM); saved "),
], ids=["ctrl_c", "sigterm"])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_stops_and_the_run_resumes_there(
    tmp_path, signum, code, notice, error):
  model_dir = tmp_path / "run"
  # No epoch end and no periodic checkpoint before step 200: the signal's save is the
  # only checkpoint there can be.
  common = ["--depth=8", "--data_source=synthetic", f"--model_dir={model_dir}",
            "--global_batch_size=8", "--log_every_steps=1", "--checkpoint_every_steps=1000",
            "--eval_steps=1", "--steps_per_epoch=200"]
  args = ["-m", "trainer.main", *common, "--epochs=10000"]
  stderr_path = tmp_path / "stderr"
  with open(stderr_path, "w") as stderr:
    process = subprocess.Popen([sys.executable, *args], cwd=REPO, stderr=stderr,
                               stdout=subprocess.DEVNULL)
    try:
      deadline = time.time() + 300
      while "step 5/" not in stderr_path.read_text():
        assert process.poll() is None and time.time() < deadline, stderr_path.read_text()
        time.sleep(0.2)
      process.send_signal(signum)
      process.wait(timeout=120)
    finally:
      process.kill()
  output = stderr_path.read_text()
  assert process.returncode == code, output[-3000:]
  assert error in output
  # Announced as soon as the signal arrives, before the step returns and the run stops.
  assert output.index(notice) < output.index(error)
  assert "after saving a checkpoint" in output
  assert "Traceback" not in output
  saved = re.search(r"saved (\S+ckpt-(\d+)) \(step (\d+)\): rerun", output)
  assert saved, output[-3000:]
  checkpoint, step = saved.group(1), int(saved.group(3))
  assert int(saved.group(2)) == step and 5 <= step < 200
  # The rerun resumes from that checkpoint, at the step where the signal stopped the run.
  resumed = run_main(*common, "--epochs=1")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from {checkpoint} at step {step} " in resumed.stderr


def test_a_stop_request_is_taken_only_while_the_loop_listens_and_keeps_the_first_signal():
  request = train.StopRequest()
  # Before the loop starts (and after it ends) the handler must raise instead.
  assert not request.request(signal.SIGINT)
  assert request.signum is None
  request.listening = True
  assert request.request(signal.SIGTERM)
  # A terminal's Ctrl-C and a launcher's forwarded SIGINT arrive together: one stop.
  assert request.request(signal.SIGINT)
  assert request.signum == signal.SIGTERM
