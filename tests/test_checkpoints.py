"""Crash and resume with real SIGKILLs, guard rails on --model_dir, eval and export modes."""

import dataclasses
import json
import logging
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from trainer import config as config_lib
from trainer import train

from conftest import (REPO, SMALL_SYNTHETIC, SMALL_SYNTHETIC_EXAMPLES, TINY_FLAGS, Run,
                      checkpoint_weights, planned_batches, recorded_batches, run_and_kill,
                      run_main, wait_for, skip_unless_cpu_runs)


@pytest.mark.process
def test_sigkill_anywhere_then_resume_matches_uninterrupted_run(tmp_path):
  args = ["--epochs=3", "--deterministic", "--checkpoint_every_steps=1"]
  reference = tmp_path / "reference"
  result = run_main(*TINY_FLAGS, *args, f"--model_dir={reference}")
  assert result.returncode == 0, result.stderr[-3000:]

  crashed = tmp_path / "crashed"
  flags = [*args, f"--model_dir={crashed}"]
  # Mid-epoch (right after step 2's log line, while step 3 runs or step 2 is saved),
  # during the first evaluation, and during the second epoch's checkpoint saves.
  for pattern in ("step 2/12", "evaluating on", "step 6/12"):
    run_and_kill([*TINY_FLAGS, *flags], pattern)
    metrics_file = crashed / "metrics.json"
    assert not metrics_file.exists()
  result = run_main(*TINY_FLAGS, *flags)
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = json.loads((crashed / "metrics.json").read_text())
  assert metrics["steps"] == 12 and metrics["epochs"] == 3
  assert metrics["resumed_from_step"] >= 5  # killed after step 6 ran, before its save
  assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]

  # Deterministic data, op determinism and an exact restore: bit-identical weights.
  expected = checkpoint_weights(reference / "checkpoints")
  actual = checkpoint_weights(crashed / "checkpoints")
  assert expected.keys() == actual.keys() and expected
  for name in expected:
    np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


@pytest.mark.process
def test_a_default_run_killed_mid_epoch_resumes_on_the_uninterrupted_runs_batches(
    tmp_path, image_folder):
  """Not --deterministic: the data seed is drawn when the run starts and kept, and the
  resumed pipeline starts at the resumed step. Before 2026-12-07 it started again at the
  first batch of the run (the resume skip was for --deterministic only), so every stop
  replayed what the run had already trained on. 40 images, 5 steps an epoch, 3 epochs;
  killed two steps into the second."""
  from input_pipeline import pipeline
  from trainer import main
  model_dir = tmp_path / "run"
  args = ["--depth=8", "--data_source=folder", f"--data_dir={image_folder()}",
          "--global_batch_size=8", "--epochs=3", "--log_every_steps=1",
          "--checkpoint_every_steps=1", "--eval_steps=1", f"--model_dir={model_dir}"]
  env = {main.RECORD_BATCHES_VARIABLE: "1"}
  killed = Run(args, tmp_path / "logs", "killed", env)
  try:
    wait_for(killed, r"step 7/15")
  finally:
    killed.kill()
  result = run_main(*args, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  step = int(re.search(r"resumed from \S+ at step (\d+)", result.stderr).group(1))
  assert 5 < step < 10, step  # inside the second epoch
  recorded = recorded_batches(model_dir)
  assert recorded == dict(enumerate(planned_batches(model_dir, 15), 1))
  for epoch in range(3):  # a permutation of the 40 examples each
    ids = [i for s in range(epoch * 5 + 1, epoch * 5 + 6) for i in recorded[s]]
    assert sorted(pipeline.decode_example_ids(np.array(ids))[0]) == list(range(40))


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, caplog):
  # What the run dir holds decides the resume: in-process (TINY_FLAGS's run).
  caplog.set_level(logging.WARNING, logger="absl")
  config = config_lib.Config(depth=8, data_source="synthetic",
                             synthetic_examples=SMALL_SYNTHETIC_EXAMPLES, global_batch_size=16,
                             steps_per_epoch=4, eval_steps=2, epochs=2,
                             model_dir=str(tmp_path / "run"))
  strategy = tf.distribute.get_strategy()
  train.train_and_evaluate(config, strategy)
  latest = tmp_path / "run" / "checkpoints" / "ckpt-8.data-00000-of-00001"
  latest.write_bytes(latest.read_bytes()[:100])  # A truncated write.
  metrics = train.train_and_evaluate(dataclasses.replace(config, epochs=3), strategy)
  assert "ckpt-8 is unreadable" in caplog.text
  assert metrics["resumed_from_step"] == 4 and metrics["steps"] == 12


def _snapshot(directory: pathlib.Path) -> dict[str, tuple[int, int]]:
  return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in directory.rglob("*") if p.is_file()}


@pytest.mark.process
def test_different_architecture_is_refused_and_nothing_changes(tmp_path):
  model_dir = tmp_path / "run"
  assert run_main(*TINY_FLAGS, "--epochs=1", f"--model_dir={model_dir}").returncode == 0
  before = _snapshot(model_dir)
  result = run_main(*TINY_FLAGS, "--epochs=1", "--plain=true", "--global_batch_size=32",
                    f"--model_dir={model_dir}")
  assert result.returncode == 2
  assert "--plain: False" in result.stderr and "--global_batch_size: 16" in result.stderr
  assert "--overwrite" in result.stderr and "Traceback" not in result.stderr
  assert _snapshot(model_dir) == before
  # Refused before the data loads: data that cannot load does not hide the contradiction.
  on_folder = [flag for flag in TINY_FLAGS if flag != SMALL_SYNTHETIC]
  result = run_main(*on_folder, "--epochs=1", "--plain=true", "--data_source=folder",
                    f"--data_dir={tmp_path / 'missing'}", f"--model_dir={model_dir}")
  assert result.returncode == 2
  assert "holds a run with different settings" in result.stderr, result.stderr[-3000:]
  assert "--plain: False" in result.stderr and "does not exist" not in result.stderr
  assert _snapshot(model_dir) == before

  result = run_main(*TINY_FLAGS, "--epochs=1", "--plain=true", "--overwrite",
                    f"--model_dir={model_dir}")
  assert result.returncode == 0, result.stderr[-3000:]
  config = json.loads((model_dir / "config.json").read_text())
  assert config["plain"] is True and config["model"] == "plain8"
  assert json.loads((model_dir / "metrics.json").read_text())["resumed_from_step"] == 0


@pytest.mark.process
@pytest.mark.parametrize("under, message", [
    ("/run", "is not writable: Not a directory"),
    ("", "is a file, not a directory"),
], ids=["below-a-file", "a-file"])
def test_unwritable_model_dir_fails_before_training(tmp_path, under, message):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  result = run_main(*TINY_FLAGS, "--epochs=1", f"--model_dir={blocker}{under}")
  assert result.returncode == 2
  assert f"error: --model_dir={blocker}{under} {message}" in result.stderr
  assert "Traceback" not in result.stderr and blocker.read_text() == "not a directory"


def test_full_disk_fails_before_training(tmp_path, monkeypatch):
  from trainer import config as config_lib, errors, run_dir, train
  monkeypatch.setattr(run_dir.shutil, "disk_usage",
                      lambda path: type("Usage", (), {"free": 1 << 20})())
  config = config_lib.Config(depth=8, data_source="synthetic", global_batch_size=16,
                             synthetic_examples=SMALL_SYNTHETIC_EXAMPLES,
                             steps_per_epoch=2, epochs=1, model_dir=str(tmp_path / "run"))
  with pytest.raises(errors.RunDirError, match="MiB free"):
    train.train_and_evaluate(config, tf.distribute.get_strategy())
  assert not (tmp_path / "run" / "checkpoints").exists()
  assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.process
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
  model_dir = tmp_path / "run"
  assert run_main(*TINY_FLAGS, "--epochs=1", f"--model_dir={model_dir}").returncode == 0
  metrics_before = (model_dir / "metrics.json").read_text()
  result = run_main(*TINY_FLAGS, "--epochs=3", "--learning_rate=1e30",
                    "--checkpoint_every_steps=1", f"--model_dir={model_dir}")
  assert result.returncode == 1
  diverged = re.search(r"(?:NaN or Inf|exploded) (?:at|between step \d+ and) step (\d+)",
                       result.stderr)
  assert diverged and "Traceback" not in result.stderr, result.stderr[-3000:]
  bad_step = int(diverged.group(1))
  latest = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
  # Nothing was saved from the step that went bad on.
  assert 4 <= int(latest.rsplit("-", 1)[1]) < bad_step
  assert os.path.basename(latest) in result.stderr
  assert (model_dir / "metrics.json").read_text() == metrics_before
  reader = tf.train.load_checkpoint(str(model_dir / "checkpoints"))
  for name in reader.get_variable_to_shape_map():
    value = reader.get_tensor(name)
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
      assert np.isfinite(value).all(), name


def test_a_failing_worker_removes_its_scratch_dir(tmp_path, monkeypatch):
  from trainer import config as config_lib, distribute, errors, train
  scratch_root = tmp_path / "tmp"
  scratch_root.mkdir()
  monkeypatch.setattr(train.tempfile, "tempdir", str(scratch_root))
  monkeypatch.setattr(distribute, "is_chief", lambda strategy: False)
  # It saves checkpoints in its scratch dir every step until the loss goes NaN.
  config = config_lib.Config(depth=8, data_source="synthetic", global_batch_size=16,
                             synthetic_examples=SMALL_SYNTHETIC_EXAMPLES,
                             steps_per_epoch=4, eval_steps=2, epochs=3, learning_rate=1e30,
                             checkpoint_every_steps=1, model_dir=str(tmp_path / "run"))
  with pytest.raises(errors.TrainingError, match="NaN or Inf"):
    train.train_and_evaluate(config, tf.distribute.get_strategy())
  assert not list(scratch_root.glob("resnet-cifar-worker-*"))  # autograph's files stay
  assert not (tmp_path / "run").exists()


@pytest.mark.process
@pytest.mark.parametrize("which", ["latest", "best"])
def test_eval_mode_reproduces_what_the_run_measured_for_that_checkpoint(finished_run, which):
  # latest: the final model, whose test metrics (over the whole test split) are
  # metrics.json's; best: the epoch with the best evaluation accuracy in history.json (the
  # first, on a tie), measured on the run's --eval_steps=2 batches, given again here.
  cap = ["--eval_steps=2"] if which == "best" else []
  result = run_main("--mode=eval", f"--checkpoint={which}", *cap,
                    f"--model_dir={finished_run}")
  assert result.returncode == 0, result.stderr[-3000:]
  evaluated = json.loads((finished_run / "eval.json").read_text())
  assert f"test accuracy {evaluated['test_accuracy']:.4f}" in result.stdout
  assert evaluated["split_examples"] == 60
  assert evaluated["examples"] == (32 if cap else 60)  # --eval_steps=2 x 16
  run = json.loads((finished_run / "metrics.json").read_text())
  assert run["test_examples"] == 60
  if which == "latest":
    step, measured = run["steps"], {k[len("test_"):]: run[k] for k in ("test_accuracy",
                                                                        "test_loss")}
  else:
    best = max(run["history"], key=lambda h: h["test_accuracy"])  # max keeps the first
    step, measured = best["step"], {"accuracy": best["test_accuracy"],
                                    "loss": best["test_loss"]}
  assert evaluated["checkpoint"].endswith(f"{which if which == 'best' else 'checkpoints'}"
                                          f"/ckpt-{step}")
  assert evaluated["step"] == step
  # The same weights, images and batches in another process of this machine: the count
  # of correct predictions is exact; the mean loss may round differently in its last
  # float32 bits if oneDNN picks another kernel order (1e-6 is 8 ulps).
  assert evaluated["test_accuracy"] == measured["accuracy"]
  assert evaluated["test_loss"] == pytest.approx(measured["loss"], rel=1e-6)


@pytest.mark.process
def test_eval_mode_with_flip_reports_it(finished_run):
  result = run_main(*TINY_FLAGS, "--mode=eval", "--eval_flip", f"--model_dir={finished_run}")
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = json.loads((finished_run / "eval.json").read_text())
  assert 0.0 <= metrics["test_flip_accuracy"] <= 1.0
  assert f"flip accuracy {metrics['test_flip_accuracy']:.4f}" in result.stdout


@pytest.mark.process
def test_eval_mode_under_another_precision_reads_the_same_weights(finished_run):
  # A float32 run evaluated under mixed_float16, whose optimizer has a loss scale the
  # checkpoint lacks: evaluation restores the model and its average, not the optimizer.
  skip_unless_cpu_runs("mixed_float16")
  metrics = {}
  for precision in ("float32", "mixed_float16"):
    result = run_main("--mode=eval", f"--precision={precision}", f"--model_dir={finished_run}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics[precision] = json.loads((finished_run / "eval.json").read_text())
  assert metrics["mixed_float16"]["step"] == metrics["float32"]["step"] == 8
  assert metrics["mixed_float16"]["test_loss"] == pytest.approx(
      metrics["float32"]["test_loss"], rel=1e-2)  # float16 activations round to 1e-3


@pytest.mark.process
def test_eval_and_export_without_checkpoint_fail_clearly(tmp_path):
  for mode in ("eval", "export"):
    result = run_main(*TINY_FLAGS, f"--mode={mode}", f"--model_dir={tmp_path / 'empty'}")
    assert result.returncode == 2
    assert "no checkpoint" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.process
def test_export_round_trip_in_a_fresh_process(finished_run, tmp_path):
  result = run_main(*TINY_FLAGS, "--mode=export", "--checkpoint=latest",
                    f"--model_dir={finished_run}", f"--export_dir={tmp_path / 'export'}")
  assert result.returncode == 0, result.stderr[-3000:]
  images = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  np.save(tmp_path / "images.npy", images)
  script = f"""
import numpy as np, tensorflow as tf, keras
import trainer.resnet  # registers the custom shortcut layer for .keras loading
images = np.load({str(tmp_path / 'images.npy')!r})
loaded = tf.saved_model.load({str(tmp_path / 'export' / 'saved_model')!r})
np.save({str(tmp_path / 'saved_model.npy')!r}, loaded.serve(tf.constant(images))["logits"].numpy())
model = keras.saving.load_model({str(tmp_path / 'export' / 'model.keras')!r})
np.save({str(tmp_path / 'keras.npy')!r}, model(images, training=False).numpy())
"""
  fresh = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
  assert fresh.returncode == 0, fresh.stderr[-3000:]

  # The reference: the same checkpoint restored into a freshly built model here.
  import keras
  from input_pipeline import pipeline
  from trainer import resnet, state
  keras.mixed_precision.set_global_policy("float32")
  model = resnet.build_model(resnet.architecture(8), input_mean=pipeline.CIFAR10_MEAN,
                             input_std=pipeline.CIFAR10_STD)
  tf.train.Checkpoint(model=state.variables_by_path(model.variables)).restore(
      str(finished_run / "checkpoints" / "ckpt-8")).expect_partial()
  expected = model(images, training=False).numpy()
  for name in ("saved_model", "keras"):
    np.testing.assert_allclose(np.load(tmp_path / f"{name}.npy"), expected, rtol=1e-5,
                               atol=1e-5, err_msg=name)
