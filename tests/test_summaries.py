"""What a run writes for TensorBoard and the per-class results, read back with TensorBoard's
own readers: the HParams experiment config and one session per run (with its status), the
evaluation events (each value once, overlaying training's), the confusion matrix (image,
history.json, metrics.json)."""

import json
import pathlib
import signal

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import json_format
from tensorboard import context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import (api_pb2, backend_context, get_experiment,
                                         list_session_groups)
from tensorboard.plugins.hparams import metadata as hparams_metadata

from conftest import SMALL_SYNTHETIC_EXAMPLES, event_tags, logged
from trainer import config as config_lib
from trainer import errors, metrics, run_files, summaries, train
from trainer.stop import StopRequest, Stopped

TINY = dict(depth=8, data_source="synthetic", synthetic_examples=SMALL_SYNTHETIC_EXAMPLES,
            global_batch_size=16, steps_per_epoch=3, epochs=2, eval_steps=2)
ALL_STATUSES = [api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS, api_pb2.STATUS_FAILURE,
                api_pb2.STATUS_RUNNING]


def tiny_run(model_dir: pathlib.Path, stop_request: StopRequest | None = None,
             **overrides) -> dict:
  config = config_lib.Config(**{**TINY, **overrides, "model_dir": str(model_dir)})
  return train.train_and_evaluate(config, tf.distribute.get_strategy(), stop_request)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> pathlib.Path:
  """parent/{residual, plain, diverged}: a finished run, a finished plain run with flip
  TTA and an EMA (more evaluation keys), and a run whose loss diverged."""
  parent = tmp_path_factory.mktemp("study")
  tiny_run(parent / "residual")
  tiny_run(parent / "plain", plain=True, seed=1, eval_flip=True, ema_decay=0.5)
  with pytest.raises(errors.TrainingError):
    tiny_run(parent / "diverged", learning_rate=1e30)
  return parent


class Board:
  """A log dir as TensorBoard's HParams dashboard reads it (its plugin's backend over the
  multiplexer TensorBoard itself uses)."""

  def __init__(self, logdir: pathlib.Path):
    self.multiplexer = plugin_event_multiplexer.EventMultiplexer()
    self.multiplexer.AddRunsFromDirectory(str(logdir))
    self.multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(self.multiplexer, str(logdir))
    self.context = backend_context.Context(base_plugin.TBContext(data_provider=provider))

  def experiment(self) -> api_pb2.Experiment:
    return get_experiment.Handler(context.RequestContext(), self.context, "",
                                  api_pb2.GetExperimentRequest()).run()

  def sessions(self) -> dict[str, tuple[api_pb2.SessionGroup, api_pb2.Session]]:
    """{session name (the run dir): (its group, the session)}; asserts one per group."""
    request = api_pb2.ListSessionGroupsRequest(start_index=0, slice_size=100,
                                               allowed_statuses=ALL_STATUSES)
    groups = list_session_groups.Handler(context.RequestContext(), self.context, "",
                                         request).run().session_groups
    assert all(len(group.sessions) == 1 for group in groups)
    return {group.sessions[0].name: (group, group.sessions[0]) for group in groups}

  def hparams_plugin_content(self, run: str, tag: str) -> bytes:
    return self.multiplexer.SummaryMetadata(run, tag).plugin_data.content


def metric_value(session: api_pb2.Session, group: str, tag: str) -> float:
  return next(m.value for m in session.metric_values
              if (m.name.group, m.name.tag) == (group, tag))


def read_json(path: pathlib.Path) -> dict:
  return json.loads(path.read_text())


# The HParams: experiment config, sessions, statuses.

def test_the_experiment_config_declares_the_compared_hparams_and_the_metrics(study):
  experiment = Board(study).experiment()
  infos = {info.name: info for info in experiment.hparam_infos}
  assert set(infos) == {"depth", "plain", "stem", "recipe", "learning_rate",
                        "global_batch_size", "epochs", "weight_decay", "precision",
                        "strategy", "replicas", "data_source", "seed"}
  for name in ("plain", "stem", "recipe", "precision", "strategy", "data_source"):
    assert infos[name].WhichOneof("domain") == "domain_discrete", name
  assert {v.string_value for v in infos["stem"].domain_discrete.values} == {"cifar", "imagenet"}
  assert "float32" in {v.string_value for v in infos["precision"].domain_discrete.values}
  for name in ("depth", "learning_rate", "epochs", "seed"):
    assert infos[name].type == api_pb2.DATA_TYPE_FLOAT64, name
  metric_names = {(m.name.group, m.name.tag): m.display_name for m in experiment.metric_infos}
  assert metric_names == {("test", "final_test_accuracy"): "final test accuracy",
                          ("test", "epoch_accuracy"): "test accuracy",
                          ("test", "epoch_loss"): "test loss",
                          ("", "best_test_accuracy"): "best test accuracy (test-selected)",
                          ("train", "epoch_loss"): "final training loss"}
  json_format.MessageToJson(experiment)  # What the dashboard is served: no inf or nan.


def test_every_run_is_one_session_in_its_own_dir_with_its_hparams_and_status(study):
  board = Board(study)
  sessions = board.sessions()
  assert set(sessions) == {"residual", "plain", "diverged"}
  statuses = {name: session.status for name, (_, session) in sessions.items()}
  assert statuses == {"residual": api_pb2.STATUS_SUCCESS, "plain": api_pb2.STATUS_SUCCESS,
                      "diverged": api_pb2.STATUS_FAILURE}
  for name in ("residual", "plain"):
    group, session = sessions[name]
    assert session.end_time_secs >= session.start_time_secs > 0
    config, result = read_json(study / name / "config.json"), read_json(
        study / name / "metrics.json")
    assert group.hparams["plain"].bool_value == config["plain"]
    assert group.hparams["seed"].number_value == config["seed"]
    assert group.hparams["epochs"].number_value == 2
    assert group.hparams["strategy"].string_value == "default"
    assert group.hparams["precision"].string_value == "float32"
    assert group.hparams["data_source"].string_value == "synthetic"
    # The result, over the whole test split; the last epoch's evaluation (of the runs'
    # --eval_steps=2 batches).
    assert metric_value(session, "test", "final_test_accuracy") == pytest.approx(
        result["test_accuracy"])
    assert metric_value(session, "test", "epoch_accuracy") == pytest.approx(
        result["history"][-1]["test_accuracy"])
    assert metric_value(session, "", "best_test_accuracy") == pytest.approx(
        result["best_test_accuracy"])
    assert metric_value(session, "train", "epoch_loss") == pytest.approx(
        result["history"][-1]["train_loss"])
  assert sessions["diverged"][0].hparams["learning_rate"].number_value == 1e30
  # Each run dir holds its experiment config and its session; the subdirs hold neither.
  for name in ("residual", "plain", "diverged"):
    for tag in (hparams_metadata.EXPERIMENT_TAG, hparams_metadata.SESSION_START_INFO_TAG):
      assert tag in event_tags(study / name), (name, tag)
      assert tag not in event_tags(study / name / "train") | event_tags(study / name / "test")
  start = hparams_metadata.parse_session_start_info_plugin_data(
      board.hparams_plugin_content("plain", hparams_metadata.SESSION_START_INFO_TAG))
  assert start.hparams["plain"].bool_value and start.hparams["depth"].number_value == 8


def test_a_stopped_run_stays_unknown_and_its_resume_writes_one_session_that_succeeds(
    tmp_path):
  """Also the validation protocol: the eval group is validation/, the test split is
  evaluated once at the end."""
  model_dir = tmp_path / "logs" / "run"
  request = StopRequest()
  request.signum = signal.SIGINT  # As if Ctrl-C came before the first step.
  with pytest.raises(Stopped):
    tiny_run(model_dir, request, validation_split=16)
  _, session = Board(tmp_path / "logs").sessions()["run"]
  assert session.status == api_pb2.STATUS_UNKNOWN and not session.end_time_secs
  result = tiny_run(model_dir, validation_split=16, epochs=1)
  board = Board(tmp_path / "logs")
  _, session = board.sessions()["run"]
  assert session.status == api_pb2.STATUS_SUCCESS
  # The stopped attempt's session is gone: TensorBoard would keep the first it reads.
  assert len(list(model_dir.glob("events.out.tfevents.*"))) == 1
  start = hparams_metadata.parse_session_start_info_plugin_data(
      board.hparams_plugin_content("run", hparams_metadata.SESSION_START_INFO_TAG))
  assert start.hparams["epochs"].number_value == 1
  metric_groups = {m.name.group for m in board.experiment().metric_infos}
  assert metric_groups == {"validation", "", "train"}
  # A validation protocol evaluates the whole test split at the end, with its matrix.
  tags = event_tags(model_dir / run_files.VALIDATION_EVENTS)
  assert {"confusion_matrix", "final_test_confusion_matrix", "final_test_accuracy"} <= tags
  assert "validation_per_class_accuracy" in result["history"][-1]
  assert np.array(result["test_confusion_matrix"]).sum() == 60
  assert set(result["test_per_class_accuracy"]) == {str(i) for i in range(10)}
  assert "most_confused" in result


# Evaluation events.

def test_evaluation_events_hold_each_value_once_and_overlay_training_on_epoch_tags(study):
  for name in ("residual", "plain"):
    history = read_json(study / name / "history.json")["history"]
    steps = [h["step"] for h in history]
    eval_dir, train_dir = study / name / run_files.TEST_EVENTS, study / name / "train"
    tags = event_tags(eval_dir)
    assert not {"loss", "accuracy"} & tags, tags
    for key in ("loss", "accuracy"):
      tag = summaries.epoch_tag(key)
      assert tag in (run_files.EPOCH_LOSS_TAG, run_files.EPOCH_ACCURACY_TAG)
      assert logged(eval_dir, tag) == pytest.approx(
          dict(zip(steps, (h[f"test_{key}"] for h in history))))
      assert sorted(logged(train_dir, tag)) == steps  # Same tag and steps: one chart.
  plain_tags = event_tags(study / "plain" / run_files.TEST_EVENTS)
  extra = {"flip_accuracy", "flip_loss", "ema_accuracy", "ema_loss", "ema_flip_accuracy",
           "ema_flip_loss"}
  assert {f"epoch_{key}" for key in extra} <= plain_tags
  assert not extra & plain_tags


def test_the_study_scripts_still_read_the_curves_from_the_events(study):
  from scripts import experiment_runs
  history = read_json(study / "residual" / "history.json")["history"]
  from_events = experiment_runs.read_event_history(str(study / "residual"), 3)
  assert [h["step"] for h in from_events] == [h["step"] for h in history]
  for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
    assert [h[key] for h in from_events] == pytest.approx([h[key] for h in history])


# Per-class results.

def test_per_class_accuracy_is_recorded_and_weighted_by_class_counts_is_the_accuracy(study):
  result = read_json(study / "residual" / "metrics.json")
  names = [str(i) for i in range(10)]  # The synthetic source's class names.
  confusion = np.array(result["test_confusion_matrix"])
  assert confusion.shape == (10, 10)
  # The final matrix: the whole test split (the synthetic one's 60, in 4 batches of 16),
  # no padding counted; each epoch's: its --eval_steps=2 batches.
  assert confusion.sum() == result["test_examples"] == 60
  assert [h["test_examples"] for h in result["history"]] == [2 * 16] * 2
  per_class = result["test_per_class_accuracy"]
  assert set(per_class) == set(names)
  counts = confusion.sum(axis=1)
  weighted = sum(per_class[n] * c for n, c in zip(names, counts) if c) / counts.sum()
  assert weighted == pytest.approx(result["test_accuracy"])
  # With flip TTA and an EMA too, the matrix is the plain evaluation's.
  plain = read_json(study / "plain" / "metrics.json")
  assert np.trace(plain["test_confusion_matrix"]) / 60 == pytest.approx(
      plain["test_accuracy"])
  assert all(per_class[n] is None for n, c in zip(names, counts) if not c)
  for record in result["history"]:
    assert set(record["test_per_class_accuracy"]) == set(names)
  on_disk = read_json(study / "residual" / "history.json")["history"]
  assert on_disk == result["history"]


def test_rerunning_a_finished_run_keeps_its_per_class_results(tmp_path):
  first = tiny_run(tmp_path / "run", epochs=1)
  again = tiny_run(tmp_path / "run", epochs=1)
  assert again["resumed_from_step"] == again["steps"] == 3
  for key in ("test_accuracy", "test_per_class_accuracy", "test_confusion_matrix",
              "most_confused"):
    assert again[key] == first[key], key


def test_most_confused_lists_the_largest_mistakes(study):
  result = read_json(study / "residual" / "metrics.json")
  confusion = np.array(result["test_confusion_matrix"])
  names = [str(i) for i in range(10)]
  expected = sorted(((confusion[t, p], -t, -p) for t in range(10) for p in range(10)
                     if t != p and confusion[t, p]), reverse=True)[:3]
  assert result["most_confused"] == [[names[-t], names[-p], int(n)] for n, t, p in expected]
  assert 1 <= len(result["most_confused"]) <= 3


def test_the_confusion_matrix_image_is_written_at_every_evaluation(study):
  history = read_json(study / "residual" / "history.json")["history"]
  result = read_json(study / "residual" / "metrics.json")
  eval_run = f"residual/{run_files.TEST_EVENTS}"
  board = Board(study)
  events = board.multiplexer.Tensors(eval_run, "confusion_matrix")
  assert [e.step for e in events] == [h["step"] for h in history]
  assert board.multiplexer.SummaryMetadata(
      eval_run, "confusion_matrix").plugin_data.plugin_name == "images"
  width, height, png = tf.make_ndarray(events[-1].tensor_proto)
  image = tf.io.decode_png(png).numpy()
  assert image.shape == (240, 240, 3) and (int(width), int(height)) == (240, 240)
  # The final matrix of metrics.json (the whole test split, past the epochs' cap) is
  # drawn once more at the end.
  [final] = board.multiplexer.Tensors(eval_run, "final_test_confusion_matrix")
  assert final.step == history[-1]["step"]
  image = tf.io.decode_png(tf.make_ndarray(final.tensor_proto)[2]).numpy()
  np.testing.assert_array_equal(
      image, summaries.confusion_image(np.array(result["test_confusion_matrix"]))[0])


# The pieces, on hand-made matrices.

def test_confusion_accumulates_weighted_pairs():
  confusion = metrics.Confusion(3)
  logits = tf.constant([[5.0, 0, 0], [0, 5.0, 0], [0, 5.0, 0], [0, 0, 5.0]])
  confusion.add(logits, tf.constant([0, 1, 2, 2]), tf.constant([1.0, 1.0, 1.0, 0.0]))
  np.testing.assert_array_equal(confusion.result(), [[1, 0, 0], [0, 1, 0], [0, 1, 0]])
  confusion.reset()
  assert confusion.result().sum() == 0


def test_per_class_accuracy_and_most_confused_of_a_matrix():
  confusion = np.array([[5, 3, 0], [1, 4, 0], [0, 0, 0]])
  names = ("cat", "dog", "owl")
  assert metrics.per_class_accuracy(confusion, names) == {"cat": 5 / 8, "dog": 4 / 5,
                                                          "owl": None}
  assert metrics.most_confused(confusion, names) == [["cat", "dog", 3], ["dog", "cat", 1]]
  assert metrics.most_confused(np.diag([2, 3, 4]), names) == []


def test_confusion_image_colours_rows_by_share():
  image = summaries.confusion_image(np.array([[2, 2, 0], [0, 4, 0], [0, 0, 0]]), cell=3)[0]
  assert image.shape == (9, 9, 3) and image.dtype == np.uint8
  half = tuple(image[1, 1])
  assert half == tuple(image[1, 4]) and 0 < min(half) < max(half) < 255  # Half and half.
  assert tuple(image[4, 4]) == (8, 48, 107)  # All of class 1 predicted right: dark blue.
  assert tuple(image[4, 1]) == tuple(image[1, 7]) == (255, 255, 255)  # None: white.
  assert tuple(image[7, 7]) == (200, 200, 200)  # No examples of class 2: grey.
  assert tuple(image[3, 1]) == tuple(image[1, 3]) == (230, 230, 230)  # The grid.
