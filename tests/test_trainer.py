"""End-to-end tests of the trainer: the entrypoint on tiny data, resume, MirroredStrategy,
the in-process seam (train.run_training), flag validation and stopping on signals."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import (REPO, SMALL_SYNTHETIC_EXAMPLES, TINY_FLAGS, checkpoint_weights,
                      event_tags, logged, mirrored_on_two_cpus, run_main)
from trainer import config as config_lib
from trainer import schedule
from trainer import state as state_lib
from trainer import stop as stop_lib
from trainer import train


def small_args(model_dir, data_dir, epochs=1) -> list[str]:
  return ["--depth=8", "--data_source=folder", f"--data_dir={data_dir}",
          f"--model_dir={model_dir}", f"--epochs={epochs}", "--steps_per_epoch=2",
          "--global_batch_size=8", "--log_every_steps=1"]


@pytest.mark.process
def test_entrypoint_trains_writes_outputs_and_resumes(tmp_path, image_folder):
  model_dir = tmp_path / "run"
  first = run_main(*small_args(model_dir, image_folder(), epochs=1), "--profile_steps=1,2")
  assert first.returncode == 0, first.stderr[-3000:]
  assert "test accuracy" in first.stdout
  assert list((model_dir / "checkpoints").glob("ckpt-2.index"))
  assert list((model_dir / "train").glob("events.out.tfevents.*"))
  assert list((model_dir / "test").glob("events.out.tfevents.*"))
  metrics = json.loads((model_dir / "metrics.json").read_text())
  assert 0.0 <= metrics["test_accuracy"] <= 1.0
  assert metrics["steps"] == 2 and metrics["epochs"] == 1
  for key in ("wall_seconds", "images_per_second"):
    assert key in metrics
  train_tags = event_tags(model_dir / "train")
  for tag in ("loss", "accuracy", "learning_rate", "images_per_second", "step_time_ms",
              "epoch_loss", "epoch_accuracy", "objective", "epoch_objective", "config",
              "gradient_norm/stem", "gradient_norm/stage1", "gradient_norm/stage3",
              "gradient_norm/head"):
    assert tag in train_tags, tag
  test_tags = event_tags(model_dir / "test")
  assert {"epoch_loss", "epoch_accuracy"} <= test_tags and "epoch_objective" not in test_tags
  # Training loss is the plain cross-entropy, as evaluated; the objective adds the recipe's
  # label smoothing (0.1) and L2 term (fast: 1e-3), so it is the larger.
  [epoch] = json.loads((model_dir / "history.json").read_text())["history"]
  assert epoch["train_objective"] > epoch["train_loss"] > 0
  assert "_hparams_/session_start_info" in event_tags(model_dir)
  assert list((model_dir / "train" / "plugins" / "profile").rglob("*.xplane.pb"))

  second = run_main(*small_args(model_dir, image_folder(), epochs=2))
  assert second.returncode == 0, second.stderr[-3000:]
  metrics = json.loads((model_dir / "metrics.json").read_text())
  assert metrics["resumed_from_step"] == 2
  assert metrics["steps"] == 4 and metrics["epochs"] == 2
  assert [h["epoch"] for h in metrics["history"]] == [1, 2]
  assert list((model_dir / "checkpoints").glob("ckpt-4.index"))



def _profile_breakdown(path) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "scripts/profile_breakdown.py", str(path),
                         "--steps=2"], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.process
def test_profile_breakdown_names_the_parts_of_a_profiled_step(tmp_path):
  model_dir = tmp_path / "run"
  result = run_main(*TINY_FLAGS, "--epochs=1", "--profile_steps=1,3", f"--model_dir={model_dir}")
  assert result.returncode == 0, result.stderr[-3000:]
  result = _profile_breakdown(model_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  parts = json.loads(result.stdout.splitlines()[-1])["ms_per_step"]
  # The trainer's own scopes are found, beside the op types.
  for part in ("convolution, forward", "convolution, input gradient",
               "convolution, filter gradient", "batch norm, forward", "batch norm, gradient",
               "L2 weight decay (and its gradient)", "per-stage gradient norms",
               "metrics and NaN guard", "optimizer (SGD update)"):
    assert parts.get(part, 0) > 0, (part, parts)
  assert sum(v for k, v in parts.items() if k.startswith("convolution")) > parts.get("other", 0)
  result = _profile_breakdown(tmp_path / "nothing")
  assert result.returncode == 2 and result.stderr.startswith("error: no *.xplane.pb under")


def test_mirrored_strategy_on_two_cpus_trains_and_resumes(tmp_path, image_folder):
  strategy = mirrored_on_two_cpus()
  config = config_lib.Config(depth=8, data_source="folder", data_dir=str(image_folder()),
                             model_dir=str(tmp_path / "run"), epochs=1, steps_per_epoch=2,
                             global_batch_size=8, log_every_steps=1)
  metrics = train.train_and_evaluate(config, strategy)
  assert metrics["replicas"] == 2
  assert metrics["steps"] == 2
  assert 0.0 <= metrics["test_accuracy"] <= 1.0
  resumed = train.train_and_evaluate(
      config_lib.Config(**{**config.__dict__, "epochs": 2}), strategy)
  assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 4


def test_run_training_returns_the_trained_model_its_last_checkpoint_holds(tmp_path):
  config = config_lib.Config(depth=8, data_source="synthetic", global_batch_size=16,
                             synthetic_examples=SMALL_SYNTHETIC_EXAMPLES,
                             steps_per_epoch=3, eval_steps=2, epochs=1,
                             checkpoint_every_steps=1, model_dir=str(tmp_path / "run"))
  strategy = tf.distribute.get_strategy()
  outcome = train.run_training(config, strategy)
  assert outcome.out_dir == config.model_dir
  assert int(outcome.state.step.numpy()) == outcome.metrics["steps"] == 3
  assert outcome.metrics["steps"] == json.loads(
      (tmp_path / "run" / "metrics.json").read_text())["steps"]
  trained = {v.path: v.numpy() for v in outcome.state.model.variables}

  # Training moved every weight away from where a state built with the run's seed starts
  # (and that start is reproducible: built twice, the same).
  plan = schedule.make_plan(config, replicas=1, num_train=50_000, num_eval=10_000)
  fresh = [{v.path: v.numpy() for v in state_lib.build_state(
      config, strategy, 10, plan, "float32").model.variables} for _ in range(2)]
  assert fresh[0].keys() == fresh[1].keys() == trained.keys()
  for name in fresh[0]:
    np.testing.assert_array_equal(fresh[0][name], fresh[1][name], err_msg=name)
  for variable in outcome.state.model.trainable_variables:
    assert not np.array_equal(trained[variable.path], fresh[0][variable.path]), variable.path

  # The returned model is the one the run's last checkpoint holds, bit for bit.
  latest = tf.train.latest_checkpoint(str(tmp_path / "run" / "checkpoints"))
  assert latest.endswith("ckpt-3")
  saved = checkpoint_weights(latest)
  assert saved.keys() == trained.keys()
  for name, value in trained.items():
    np.testing.assert_array_equal(saved[name], value, err_msg=name)


@pytest.mark.process
@pytest.mark.parametrize("flag, message", [
    ("--data_source=imagenet", "data_source"),
    ("--depth=37", "supported depths"),
    ("--global_batch_size=0", "global_batch_size"),
    ("--global_batch_size=-8", "global_batch_size"),
    ("--seed=-5", "--seed must be in [0, 2**32), got -5"),  # NumPy's seeds are 32 bits:
    ("--seed=4294967296", "--seed must be in [0, 2**32)"),  # both were tracebacks.
])
def test_bad_flags_fail_clearly_and_write_nothing(tmp_path, flag, message):
  model_dir = tmp_path / "run"
  result = run_main("--data_source=synthetic", f"--model_dir={model_dir}", flag)
  assert result.returncode == 2
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
  strategy = mirrored_on_two_cpus()
  config = config_lib.Config(depth=8, data_source="synthetic", global_batch_size=7,
                             synthetic_examples=SMALL_SYNTHETIC_EXAMPLES,
                             model_dir=str(tmp_path / "run"), steps_per_epoch=1)
  with pytest.raises(config_lib.ConfigError, match="replicas"):
    train.train_and_evaluate(config, strategy)
  assert not os.path.exists(tmp_path / "run")


def test_several_steps_per_execution_stop_at_log_and_epoch_boundaries(tmp_path):
  config = config_lib.Config(depth=8, data_source="synthetic", model_dir=str(tmp_path / "run"),
                             synthetic_examples=SMALL_SYNTHETIC_EXAMPLES,
                             epochs=2, steps_per_epoch=7, global_batch_size=8,
                             steps_per_execution=3, log_every_steps=5, eval_steps=1)
  metrics = train.train_and_evaluate(config, tf.distribute.get_strategy())
  assert metrics["steps"] == 14
  assert [h["step"] for h in metrics["history"]] == [7, 14]
  # Calls of at most 3 steps, cut at every log (5, 10) and epoch (7, 14) boundary.
  assert set(logged(tmp_path / "run" / "train", "loss")) == {5, 7, 10, 14}
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
  raised = stop_lib.Terminated if stop == "sigterm" else stop

  def importing(show_logs: bool) -> None:
    raise raised()  # What the signal handler raises, as it would mid-import.

  class QuietHandler(stop_lib.SignalHandler):
    def install(self) -> None:
      self.announced.set()  # No notice thread here to wait for.

  monkeypatch.setattr(main_lib.cli, "import_tensorflow", importing)
  monkeypatch.setattr(main_lib.stop, "SignalHandler", QuietHandler)
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


@pytest.mark.process
@pytest.mark.parametrize("wrapped, code, error", [
    ("Terminated", 143, "error: terminated (SIGTERM); checkpoints in "),
    ("KeyboardInterrupt", 130, "error: interrupted; checkpoints in "),
])
def test_a_stop_signal_wrapped_by_a_tensorflow_call_still_exits_as_a_stop(
    tmp_path, wrapped, code, error):
  # A signal raised inside a pybind11 call (seen under Slurm while TensorFlow joined the
  # cluster) arrives as a RuntimeError; it was a traceback and exit 1.
  model_dir = tmp_path / "run"
  script = f"""
import runpy, sys
from trainer import train
def joining(*args, **kwargs):
  raise RuntimeError("pybind11::error_already_set: MISMATCH of original and normalized "
                     "active exception types: ORIGINAL UnavailableError REPLACED BY "
                     "{wrapped}: ")
train.train_and_evaluate = joining
sys.argv = ["main", *{TINY_FLAGS!r}, "--model_dir={model_dir}"]
runpy.run_module("trainer.main", run_name="__main__", alter_sys=True)
"""
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == code, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(error) and last.endswith(
      "are intact: rerun the same command to resume from the last one"), last


@pytest.mark.process
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
  request = stop_lib.StopRequest()
  # Before the loop starts (and after it ends) the handler must raise instead.
  assert not request.request(signal.SIGINT)
  assert request.signum is None
  request.listening = True
  assert request.request(signal.SIGTERM)
  # A terminal's Ctrl-C and a launcher's forwarded SIGINT arrive together: one stop.
  assert request.request(signal.SIGINT)
  assert request.signum == signal.SIGTERM
