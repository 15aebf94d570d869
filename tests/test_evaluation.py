"""Evaluation gives the right numbers: flip test-time augmentation is the mean of the two
views, the EMA is the hand-computed average, a validation protocol evaluates the test
split once at the end, and a finished run only re-evaluates."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from input_pipeline import sources
from trainer import config as config_lib
from trainer import evaluation, schedule, state as state_lib, train

from conftest import SMALL_SYNTHETIC_EXAMPLES, checkpoint_weights, run_main

TINY = dict(depth=8, data_source="synthetic", synthetic_examples=SMALL_SYNTHETIC_EXAMPLES,
            global_batch_size=16, eval_steps=2)


def tiny_state(config: config_lib.Config) -> state_lib.State:
  plan = schedule.make_plan(config, replicas=1, num_train=64, num_eval=20)
  return state_lib.build_state(config, tf.distribute.get_strategy(), 10, plan, "float32")


def hand_metrics(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
  loss = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
  return float(np.mean(loss)), float(np.mean(np.argmax(logits, -1) == labels))


def test_flip_evaluation_is_the_mean_of_both_views_and_differs_from_plain(tmp_path):
  config = config_lib.Config(**TINY, eval_flip=True, model_dir=str(tmp_path / "run"))
  state = tiny_state(config)
  split = sources.load_synthetic(20, seed=5)
  plan = schedule.make_plan(config, replicas=1, num_train=64, num_eval=20)
  results = evaluation.make_evaluator(tf.distribute.get_strategy(), state, split, plan,
                                     config, steps=2).evaluate()
  plain = state.model(split.images, training=False).numpy()
  mirrored = state.model(split.images[:, :, ::-1], training=False).numpy()
  loss, accuracy = hand_metrics(plain, split.labels)
  flip_loss, flip_accuracy = hand_metrics((plain + mirrored) / 2, split.labels)
  assert results["loss"] == pytest.approx(loss, rel=1e-5)
  assert results["accuracy"] == pytest.approx(accuracy)
  assert results["flip_loss"] == pytest.approx(flip_loss, rel=1e-5)
  assert results["flip_accuracy"] == pytest.approx(flip_accuracy)
  assert abs(results["flip_loss"] - results["loss"]) > 1e-4  # Not flip-symmetric.


def test_the_ema_is_the_hand_computed_average_and_differs_from_the_weights(tmp_path):
  decay = 0.7
  config = config_lib.Config(**TINY, steps_per_epoch=3, epochs=1, ema_decay=decay,
                             checkpoint_every_steps=1, keep_checkpoints=3,
                             model_dir=str(tmp_path / "run"))
  initial = {v.path: v.numpy() for v in state_lib.averaged_variables(
      tiny_state(config).model)}
  outcome = train.run_training(config, tf.distribute.get_strategy())
  average = dict(initial)
  for step in (1, 2, 3):
    weights = checkpoint_weights(tmp_path / "run" / "checkpoints" / f"ckpt-{step}")
    for path in average:
      average[path] = decay * average[path] + (1 - decay) * weights[path]
  ema = {v.path: e.numpy() for v, e in zip(state_lib.averaged_variables(outcome.state.model),
                                            outcome.state.ema)}
  kernel = "stem_conv/kernel"
  for path, value in average.items():
    np.testing.assert_allclose(ema[path], value, rtol=1e-5, atol=1e-6, err_msg=path)
  current = {v.path: v.numpy() for v in outcome.state.model.variables}
  assert not np.allclose(ema[kernel], current[kernel])
  assert outcome.metrics["test_ema_accuracy"] >= 0
  assert outcome.metrics["test_ema_loss"] != outcome.metrics["test_loss"]


@pytest.mark.process
def test_final_metrics_cover_the_whole_test_split_whatever_eval_steps_capped(
    tmp_path, image_folder):
  """--eval_steps caps the per-epoch evaluations only. Before 2026-12-07 metrics.json's
  test_accuracy was the last capped evaluation's (32 of 10,000 images), and --mode=eval
  carried the run's cap too, neither saying so."""
  model_dir = tmp_path / "run"
  result = run_main("--depth=8", "--data_source=folder", f"--data_dir={image_folder()}",
                    "--global_batch_size=8", "--epochs=1", "--eval_steps=1", "--eval_flip",
                    f"--model_dir={model_dir}")
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = json.loads((model_dir / "metrics.json").read_text())
  assert metrics["test_examples"] == 20  # image_folder(): 2 test images of 10 classes
  assert np.sum(metrics["test_confusion_matrix"]) == 20
  assert [h["test_examples"] for h in metrics["history"]] == [8]
  assert "test accuracy" in result.stdout and "on all 20 test images" in result.stdout
  assert "(8 of 20 images: --eval_steps)" in result.stderr
  for cap, examples, said in ((["--eval_steps=1"], 8,
                               "on 8 of the 20 test images (capped by --eval_steps)"),
                              ([], 20, "on all 20 test images")):
    result = run_main("--mode=eval", *cap, f"--model_dir={model_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert said in result.stdout
    evaluated = json.loads((model_dir / "eval.json").read_text())
    assert (evaluated["examples"], evaluated["split_examples"]) == (examples, 20)
  # The whole split, from the final checkpoint: metrics.json's count of correct answers.
  assert evaluated["test_accuracy"] == metrics["test_accuracy"]
  assert evaluated["test_flip_accuracy"] == metrics["test_flip_accuracy"]


def test_a_validation_run_evaluates_the_test_split_once_at_the_end(tmp_path):
  config = config_lib.Config(**{**TINY, "eval_steps": None}, steps_per_epoch=2, epochs=2,
                             validation_split=100, model_dir=str(tmp_path / "run"))
  calls = []
  real = evaluation.Evaluator.evaluate

  def counting(self):
    calls.append(self.dataset)
    return real(self)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(evaluation.Evaluator, "evaluate", counting)
    metrics = train.train_and_evaluate(config, tf.distribute.get_strategy())
  assert len(calls) == 3  # two epochs on the validation split, the test split once
  history = json.loads((tmp_path / "run" / "history.json").read_text())["history"]
  assert all("validation_accuracy" in h and "test_accuracy" not in h for h in history)
  assert "test_accuracy" in metrics and "best_validation_accuracy" in metrics


def test_a_finished_run_only_re_evaluates(tmp_path):
  config = config_lib.Config(**TINY, steps_per_epoch=2, epochs=1,
                             model_dir=str(tmp_path / "run"))
  first = train.train_and_evaluate(config, tf.distribute.get_strategy())
  before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "checkpoints").iterdir()}
  again = train.train_and_evaluate(config, tf.distribute.get_strategy())
  after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "checkpoints").iterdir()}
  assert before == after  # no training step, no save
  assert again["steps"] == first["steps"] == 2 and again["resumed_from_step"] == 2
  assert again["test_accuracy"] == pytest.approx(first["test_accuracy"])
