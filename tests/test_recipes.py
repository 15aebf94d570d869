"""Recipes resolve to the documented values; schedules in steps; resume keeps the schedule's
position; EMA and flip-TTA evaluation."""

import json
import math
import re

from absl import flags
import numpy as np
import pytest
import tensorflow as tf

from conftest import SMALL_SYNTHETIC, SMALL_SYNTHETIC_EXAMPLES, logged, run_and_kill, run_main
from trainer import config as config_lib
from trainer import main as main_lib
from trainer import data, evaluation, resnet, train
from trainer import schedule as schedule_lib
from trainer import state as state_lib


def config_for(*argv: str) -> config_lib.Config:
  """The Config trainer/main.py builds for these command-line flags."""
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["trainer.main", *argv])
  try:
    return main_lib.config_from_flags()
  finally:
    flags.FLAGS.unparse_flags()


def test_fast_recipe_is_the_default():
  config = config_for()
  assert config.recipe == "fast"
  assert (config.epochs, config.learning_rate, config.lr_schedule) == (30, 0.1, "cosine")
  assert (config.momentum, config.nesterov, config.weight_decay) == (0.9, True, 1e-3)
  assert (config.label_smoothing, config.bn_momentum, config.warmup_epochs) == (0.1, 0.9, 2.0)
  assert config.clipnorm is None


def test_he2016_recipe_values():
  config = config_for("--recipe=he2016", "--depth=56")
  assert config.epochs is None  # The paper's 64k iterations.
  assert (config.learning_rate, config.lr_schedule, config.momentum) == (0.1, "he2016", 0.9)
  assert (config.nesterov, config.weight_decay, config.label_smoothing) == (False, 1e-4, 0.0)
  assert config.warmup_epochs == 0.0


def test_blog_recipe_values():
  config = config_for("--recipe=blog", "--depth=34")
  assert (config.epochs, config.learning_rate, config.lr_schedule) == (20, 0.01, "constant")
  assert (config.momentum, config.weight_decay, config.clipnorm) == (0.0, 0.0, 1.0)
  assert config.bn_momentum == 0.99  # The blog used Keras's default.


def test_every_part_stays_overridable():
  config = config_for("--recipe=he2016", "--weight_decay=5e-4", "--epochs=3",
                      "--label_smoothing=0.1", "--nesterov")
  assert (config.weight_decay, config.epochs, config.label_smoothing) == (5e-4, 3, 0.1)
  assert config.nesterov and config.lr_schedule == "he2016"


@pytest.mark.parametrize("batch, depth, total, boundaries, warmup", [
    (128, 56, 64_000, (32_000, 48_000), 0),
    (128, 110, 64_000, (32_000, 48_000), 400),   # He et al.: 0.01 for ~400 iterations.
    (256, 110, 32_000, (16_000, 24_000), 200),   # Same images seen at twice the batch.
])
def test_he2016_schedule_in_steps(batch, depth, total, boundaries, warmup):
  config = config_for("--recipe=he2016", f"--depth={depth}", f"--global_batch_size={batch}")
  schedule = schedule_lib.make_plan(config, replicas=1, num_train=50_000, num_eval=10_000)
  assert schedule.steps_per_epoch == 50_000 // batch
  assert (schedule.total_steps, schedule.boundaries, schedule.warmup_steps) == (
      total, boundaries, warmup)
  rate = schedule_lib.make_learning_rate(config, schedule)
  peak = 0.1 * batch / 128  # Linear scaling from a global batch of 128.
  # The schedule is called with the number of completed steps.
  expected = {0: peak, boundaries[0] - 1: peak, boundaries[0]: peak / 10,
              boundaries[1]: peak / 100, total - 1: peak / 100}
  if warmup:
    expected.update({0: 0.01 * batch / 128, warmup - 1: 0.01 * batch / 128, warmup: peak})
  for step, value in expected.items():
    assert float(rate(step)) == pytest.approx(value, rel=1e-6), step


def test_he2016_validation_split_keeps_iterations():
  config = config_for("--recipe=he2016", "--depth=20", "--validation_split=5000")
  schedule = schedule_lib.make_plan(config, replicas=1, num_train=45_000, num_eval=5_000)
  assert schedule.steps_per_epoch == 351 and schedule.total_steps == 64_000


def test_fast_schedule_warms_up_then_decays_to_zero():
  config = config_for()
  schedule = schedule_lib.make_plan(config, replicas=1, num_train=50_000, num_eval=10_000)
  assert (schedule.steps_per_epoch, schedule.total_steps, schedule.warmup_steps) == (
      390, 11_700, 780)
  rate = schedule_lib.make_learning_rate(config, schedule)
  assert float(rate(390)) == pytest.approx(0.05, rel=1e-3)
  assert float(rate(780)) == pytest.approx(0.1, rel=1e-6)
  halfway = 780 + (11_700 - 780) // 2
  assert float(rate(halfway)) == pytest.approx(0.05, rel=1e-3)
  assert float(rate(11_700)) == pytest.approx(0.0, abs=1e-9)


def test_blog_schedule_is_constant():
  config = config_for("--recipe=blog", "--depth=34")
  schedule = schedule_lib.make_plan(config, replicas=1, num_train=50_000, num_eval=10_000)
  assert schedule.total_steps == 20 * 390
  assert schedule_lib.make_learning_rate(config, schedule) == 0.01


def test_weight_decay_only_on_kernels():
  model = resnet.build_resnet(20, shortcut="B")
  decayed = {v.path for v in state_lib.decayed_variables(model)}
  kernels = {v.path for v in model.trainable_variables if v.path.endswith("/kernel")}
  assert decayed == kernels and "head_dense/kernel" in decayed
  assert "stage2_block1_proj_conv/kernel" in decayed
  assert not any(p.endswith(("gamma", "beta", "bias")) for p in decayed)
  assert len(decayed) == sum(1 for layer in model.layers if hasattr(layer, "kernel"))


@pytest.mark.process
def test_learning_rate_schedule_survives_resume(tmp_path):
  args = ["--depth=8", "--data_source=synthetic", SMALL_SYNTHETIC, "--global_batch_size=16",
          "--steps_per_epoch=4", "--eval_steps=1", "--epochs=3", "--warmup_epochs=1",
          "--log_every_steps=1", "--checkpoint_every_steps=1", f"--model_dir={tmp_path}"]
  run_and_kill(args, "step 6/12")
  assert not (tmp_path / "metrics.json").exists()  # Killed before the end.
  finished = run_main(*args)
  assert finished.returncode == 0, finished.stderr[-3000:]
  resumed = re.search(r"resumed from \S+ at step (\d+)", finished.stderr)
  # Mid-run: the rerun trained the rest of the schedule itself.
  assert resumed and 0 < int(resumed.group(1)) < 12, finished.stderr[-3000:]
  assert json.loads((tmp_path / "metrics.json").read_text())["resumed_from_step"] == int(
      resumed.group(1))
  rates = logged(tmp_path / "train", "learning_rate")
  config = config_lib.Config(depth=8, data_source="synthetic", global_batch_size=16,
                             synthetic_examples=SMALL_SYNTHETIC_EXAMPLES,
                             steps_per_epoch=4, epochs=3, warmup_epochs=1)
  rate = schedule_lib.make_learning_rate(config, schedule_lib.make_plan(
      config, replicas=1, num_train=50_000, num_eval=10_000))
  # After step s the optimizer has completed s steps: the logged rate is rate(s).
  assert sorted(rates) == list(range(1, 13))
  for step, value in rates.items():
    assert value == pytest.approx(float(rate(step)), rel=1e-5, abs=1e-9), step


def test_ema_and_flip_tta_evaluation_give_finite_metrics(tmp_path):
  config = config_lib.Config(depth=8, data_source="synthetic", global_batch_size=16,
                             synthetic_examples=SMALL_SYNTHETIC_EXAMPLES,
                             steps_per_epoch=3, eval_steps=2, epochs=1, ema_decay=0.9,
                             eval_flip=True, model_dir=str(tmp_path / "run"))
  metrics = train.train_and_evaluate(config, tf.distribute.get_strategy())
  for key in ("test_accuracy", "test_flip_accuracy", "test_ema_accuracy",
              "test_ema_flip_accuracy", "test_ema_loss", "test_flip_loss"):
    assert math.isfinite(metrics[key]) and metrics[key] >= 0, key
  for key in ("test_accuracy", "test_flip_accuracy", "test_ema_accuracy"):
    assert 0.0 <= metrics[key] <= 1.0
  # The EMA is checkpointed and evaluated again by --mode=eval (over the whole test
  # split, as the final metrics are).
  evaluated = evaluation.evaluate_checkpoint(
      config_lib.Config(**{**config.__dict__, "mode": "eval", "eval_steps": None}),
      tf.distribute.get_strategy())
  assert evaluated["test_ema_accuracy"] == pytest.approx(metrics["test_ema_accuracy"])
  assert evaluated["test_accuracy"] == pytest.approx(metrics["test_accuracy"])


def test_validation_split_is_disjoint_and_seeded():
  from input_pipeline import sources
  examples = sources.load_synthetic(100, seed=0)
  train_part, held = data.split_validation(examples, 20, seed=3)
  assert (train_part.num_examples, held.num_examples) == (80, 20)
  again, _ = data.split_validation(examples, 20, seed=3)
  np.testing.assert_array_equal(train_part.images, again.images)
  rows = {row.tobytes() for row in examples.images}
  assert {r.tobytes() for r in train_part.images} | {r.tobytes() for r in held.images} == rows
  with pytest.raises(config_lib.ConfigError, match="validation_split"):
    data.split_validation(examples, 100, seed=0)
