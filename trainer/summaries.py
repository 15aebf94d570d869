"""Every TensorBoard write of a run: the settings as text, the run as one HParams session,
training metrics at each log step, per-epoch metrics of training and evaluation (with a
confusion-matrix image), the final test metrics.

Where each goes (see run_files for the directory names):
  <model_dir>/        the HParams experiment config and session (start, end, and the
                      run's best_test_accuracy): TensorBoard takes a run holding a session
                      start as a session, and finds its metrics in that run's subdirs;
  <model_dir>/train/  the settings as a text table, training metrics (loss: the plain
                      cross-entropy, as evaluated; objective: what the step minimises,
                      with label smoothing and L2; accuracy; gradient_norm/<stage> of
                      the global gradient), epoch_loss, epoch_accuracy and
                      epoch_objective (the epoch's training means);
  <model_dir>/test/   (or validation/) epoch_loss, epoch_accuracy, epoch_<key> for every
                      other evaluation key (epoch_flip_accuracy, epoch_ema_loss, ...) and
                      the confusion_matrix image, at every epoch end; final_test_* (and
                      final_test_confusion_matrix) at the end: the test split's metrics
                      over all of it, whatever --eval_steps capped.
"""

import contextlib
import os
import re
import sys

from absl import logging
import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hp
from tensorboard.plugins.hparams import api_pb2
from tensorboard.plugins.hparams import summary as hparams_summary

from trainer import run_files
from trainer import config as config_lib
from trainer.stop import Stopped

_STAGE = re.compile(r"^(stem|stage\d+|head)_")
# The session dir's scalar: metrics.json's best_test_accuracy, an HParams metric.
BEST_TEST_ACCURACY_TAG = "best_test_accuracy"
# The run's result: the final model's accuracy over the whole test split (metrics.json's).
FINAL_TEST_ACCURACY_TAG = "final_test_accuracy"

# Numeric hyper-parameters are declared over every value the trainer accepts: the interval
# gives them their numeric type (a numeric axis in the parallel-coordinates view), and
# TensorBoard's newer runs table filters by the declared domain, so it must hold them all.
_INT_MAX = 2**63 - 1
_FLOAT_MAX = sys.float_info.max
# What config.json's strategy_resolved (the strategy's class name) is called in the
# HParams; "other" for a strategy passed in by a caller of train.train_and_evaluate.
_STRATEGY_NAMES = {"_DefaultDistributionStrategy": "default",
                   "OneDeviceStrategy": "one_device", "MirroredStrategy": "mirrored",
                   "CollectiveAllReduceStrategy": "multi_worker",
                   "MultiWorkerMirroredStrategy": "multi_worker",
                   "TPUStrategyV2": "tpu", "TPUStrategy": "tpu"}
def _setting_hparam(name: str) -> hp.HParam:
  """A setting declared as an HParam, its domain from its declared type, choices and bounds."""
  declared = config_lib.SETTINGS[name]
  field_type = config_lib.Config.__dataclass_fields__[name].type
  if declared.choices is not None:
    domain = hp.Discrete(list(declared.choices))
  elif field_type is bool:
    domain = hp.Discrete([False, True])
  elif field_type in (int, int | None):
    domain = hp.IntInterval(int(declared.minimum or 0), _INT_MAX)
  else:
    domain = hp.RealInterval(float(declared.minimum or declared.above or 0), _FLOAT_MAX)
  return hp.HParam(name, domain, description=declared.hparam)


# The hyper-parameters a person compares runs by (the rest of the settings are in the
# text summary "config"): the settings declared as HParams, then what the run resolved.
# Every domain is independent of the run: TensorBoard reads the experiment config of one
# run (the first it finds) for all the runs under its --logdir.
_SETTING_HPARAMS = tuple(name for name, declared in config_lib.SETTINGS.items()
                         if declared.hparam)
HPARAMS = (
    *(_setting_hparam(name) for name in _SETTING_HPARAMS),
    hp.HParam("epochs", hp.RealInterval(0.0, _FLOAT_MAX),
              description="total steps / steps per epoch (--epochs, or the he2016 length)"),
    hp.HParam("precision", hp.Discrete([p for p in config_lib.PRECISIONS if p != "auto"]),
              description="--precision, resolved"),
    hp.HParam("strategy", hp.Discrete(sorted({*_STRATEGY_NAMES.values(), "other"})),
              description="--strategy, resolved"),
    hp.HParam("replicas", hp.IntInterval(1, _INT_MAX), description="replicas in sync"),
)


def stage_of(variable_path: str) -> str:
  """Maps a variable path such as "stage2_block1_conv1/kernel" to "stage2".

  Layers outside the stem, the stages and the head (e.g. the input normalisation) map
  to "other".
  """
  match = _STAGE.match(variable_path.split("/")[-2] if "/" in variable_path else "")
  return match.group(1) if match else "other"


def group_by_stage(variables) -> dict[str, list[int]]:
  """Indices of `variables` per stage, in network order (stem, stage1.., head)."""
  groups: dict[str, list[int]] = {}
  for i, v in enumerate(variables):
    groups.setdefault(stage_of(v.path), []).append(i)
  return groups


def _hparam_value(value):
  if value is None:
    return "none"
  if isinstance(value, (tuple, list)):
    return ",".join(map(str, value))
  return value


def hparam_values(settings: dict) -> dict[str, bool | int | float | str]:
  """The HPARAMS' values of a run, from its settings (config.json's: the Config plus the
  resolved values)."""
  fields = config_lib.Config.__dataclass_fields__
  # A float setting may have been written as an integer (JSON's 1 for 1.0).
  values = {name: float(settings[name]) if fields[name].type is float else settings[name]
            for name in _SETTING_HPARAMS}
  return {**values,
          "epochs": round(settings["total_steps"] / settings["steps_per_epoch_resolved"], 4),
          "precision": settings["precision_resolved"],
          "strategy": _STRATEGY_NAMES.get(settings["strategy_resolved"], "other"),
          "replicas": settings["replicas"]}


def hparams_metrics(eval_name: str) -> list[hp.Metric]:
  """The HParams metrics: the final test accuracy (over the whole test split), the
  evaluation curves (`eval_name`: test or validation, the only part of the experiment
  config that differs between runs), the best test accuracy (in the session's own dir)
  and the last epoch's training loss."""
  validation, training = hp.Metric.VALIDATION, hp.Metric.TRAINING
  return [
      hp.Metric(FINAL_TEST_ACCURACY_TAG, group=eval_name,
                display_name="final test accuracy", dataset_type=validation),
      hp.Metric(run_files.EPOCH_ACCURACY_TAG, group=eval_name,
                display_name=f"{eval_name} accuracy", dataset_type=validation),
      hp.Metric(run_files.EPOCH_LOSS_TAG, group=eval_name, display_name=f"{eval_name} loss",
                dataset_type=validation),
      # Chosen on the test split: optimistic, and labelled so beside the final accuracy.
      hp.Metric(BEST_TEST_ACCURACY_TAG, group="",
                display_name="best test accuracy (test-selected)"),
      hp.Metric(run_files.EPOCH_LOSS_TAG, group=run_files.TRAIN_EVENTS,
                display_name="final training loss", dataset_type=training),
  ]


def epoch_tag(key: str) -> str:
  """The evaluation writer's tag of an Evaluator key: "loss" and "accuracy" share the
  train writer's epoch_* tags (the curves overlay), "flip_accuracy" -> "epoch_flip_accuracy"."""
  return {"loss": run_files.EPOCH_LOSS_TAG,
          "accuracy": run_files.EPOCH_ACCURACY_TAG}.get(key, f"epoch_{key}")


def confusion_image(confusion: np.ndarray, cell: int | None = None) -> np.ndarray:
  """A confusion matrix as a heat map, uint8 [1, height, width, 3].

  Cell (true class i, predicted class j) is row i, column j, coloured by the share of
  class i's examples predicted as j, from white (none) to dark blue (all); a class without
  examples is a grey row. Drawn with numpy alone: cheap at every epoch.
  """
  num_classes = confusion.shape[0]
  cell = cell or max(4, 240 // num_classes)
  rows = confusion.sum(axis=1, keepdims=True)
  shares = confusion / np.maximum(rows, 1)
  white, blue = np.array([255.0, 255.0, 255.0]), np.array([8.0, 48.0, 107.0])
  colours = white + shares[..., None] * (blue - white)
  colours[rows[:, 0] == 0] = 200.0
  image = np.repeat(np.repeat(colours, cell, axis=0), cell, axis=1)
  # A one-pixel light grid between the cells, so neighbouring pale cells stay apart.
  image[::cell, :] = image[:, ::cell] = 230.0
  return np.rint(image).astype(np.uint8)[None]


class Summaries:
  """The run's event writers: the session's (the run dir), train/, and the evaluated
  split's (test/ or validation/, see run_files). Only the chief writes; other workers get
  no-op writers."""

  def __init__(self, out_dir: str, eval_name: str, chief: bool,
               class_names: tuple[str, ...] = ()):
    self.out_dir, self.eval_name, self.chief = out_dir, eval_name, chief
    self.class_names = tuple(class_names)
    if chief:
      self.train = tf.summary.create_file_writer(os.path.join(out_dir, run_files.TRAIN_EVENTS))
      self.eval = tf.summary.create_file_writer(os.path.join(out_dir, eval_name))
    else:
      self.train = self.eval = tf.summary.create_noop_writer()
    # Made by run_info: it first removes the previous attempt's session (see there).
    self.session_writer = tf.summary.create_noop_writer()

  def run_info(self, settings: dict, step: int) -> None:
    """The run's settings (Config plus resolved values) as a text table, at the step the
    run starts (or resumes) at; and the HParams experiment config and session start in
    the run dir.

    TensorBoard keeps the first session start and end it reads in a run dir, so a resumed
    run removes the event files of the attempt before (they hold nothing else) and writes
    its session afresh: its hparams, and later its status, are then the ones shown.
    """
    rows = "\n".join(f"| {k} | {_hparam_value(v)} |" for k, v in sorted(settings.items()))
    with self.train.as_default(step=step):
      tf.summary.text("config", f"| setting | value |\n| --- | --- |\n{rows}")
    if not self.chief:
      return
    for path in tf.io.gfile.glob(os.path.join(self.out_dir, "events.out.tfevents.*")):
      tf.io.gfile.remove(path)
    self.session_writer = tf.summary.create_file_writer(self.out_dir)
    with self.session_writer.as_default():
      hp.hparams_config(HPARAMS, hparams_metrics(self.eval_name))
      # One session group per run dir: runs that differ only in settings outside HPARAMS
      # must not be averaged into one row.
      hp.hparams(hparam_values(settings), trial_id=self.out_dir)
    self.session_writer.flush()

  @contextlib.contextmanager
  def session(self, settings: dict, step: int):
    """The run as one HParams session: run_info on entry; on leaving, the session's end
    with STATUS_SUCCESS, or STATUS_FAILURE when an exception (a diverged loss, a failed
    save, a lost peer) leaves the block.

    A signal's stop (Stopped, KeyboardInterrupt) writes no end: the session stays
    STATUS_UNKNOWN, the nearest TensorBoard has to "aborted" (it has no such status),
    and a resume writes the run's session afresh.
    """
    self.run_info(settings, step)
    try:
      yield self
    except (Stopped, KeyboardInterrupt):
      raise
    except Exception:
      self._end_session(api_pb2.STATUS_FAILURE)
      raise
    self._end_session(api_pb2.STATUS_SUCCESS)

  def _end_session(self, status: int) -> None:
    end = hparams_summary.session_end_pb(status).SerializeToString()
    try:
      with self.session_writer.as_default():
        tf.summary.experimental.write_raw_pb(end, step=0)
      self.flush()
    except (tf.errors.OpError, OSError) as e:
      # Never mask the error that ended the run (e.g. a full disk) with this one.
      logging.warning("could not write the TensorBoard session end: %s", e)

  def train_interval(self, step: int, means: dict[str, float], learning_rate: float,
                     gradient_norms: dict[str, float], seconds_per_step: float | None,
                     images_per_second: float) -> None:
    """Training metrics of the steps since the last log (throughput when timed)."""
    with self.train.as_default(step=step):
      for key, value in means.items():
        tf.summary.scalar(key, value)
      tf.summary.scalar("learning_rate", learning_rate)
      for name, norm in gradient_norms.items():
        tf.summary.scalar(f"gradient_norm/{name}", norm)
      if seconds_per_step is not None:
        tf.summary.scalar("images_per_second", images_per_second)
        tf.summary.scalar("step_time_ms", 1000 * seconds_per_step)

  def epoch(self, step: int, train_means: dict[str, float], results: dict[str, float],
            confusion: np.ndarray | None = None) -> None:
    """An epoch's training means and evaluation results, each value once, under shared
    epoch_* tags so that the train and evaluation curves overlay (see epoch_tag); and the
    evaluation's confusion matrix as an image."""
    with self.train.as_default(step=step):
      tf.summary.scalar(run_files.EPOCH_LOSS_TAG, train_means["loss"])
      tf.summary.scalar(run_files.EPOCH_ACCURACY_TAG, train_means["accuracy"])
      if "objective" in train_means:
        tf.summary.scalar(run_files.EPOCH_OBJECTIVE_TAG, train_means["objective"])
    with self.eval.as_default(step=step):
      for key, value in results.items():
        tf.summary.scalar(epoch_tag(key), value)
      if confusion is not None:
        self._confusion_image("confusion_matrix", confusion)

  def final_test(self, step: int, results: dict[str, float],
                 confusion: np.ndarray | None = None) -> None:
    """The test split's metrics at the end, over all of it (metrics.json's)."""
    with self.eval.as_default(step=step):
      for key, value in results.items():
        tf.summary.scalar(f"final_test_{key}", value)
      if confusion is not None:
        self._confusion_image("final_test_confusion_matrix", confusion)

  def best_test_accuracy(self, step: int, accuracy: float) -> None:
    """The run's best test accuracy (metrics.json's), in the session's dir: an HParams
    metric."""
    with self.session_writer.as_default(step=step):
      tf.summary.scalar(BEST_TEST_ACCURACY_TAG, accuracy)

  def _confusion_image(self, tag: str, confusion: np.ndarray) -> None:
    order = ", ".join(self.class_names) or "class index"
    tf.summary.image(tag, confusion_image(confusion), description=(
        "Rows: true class, columns: predicted class, both in the order "
        f"{order}. Colour: the share of the true class's examples, white 0 to dark blue "
        "1; a grey row: no examples of that class."))

  def flush(self) -> None:
    self.train.flush()
    self.eval.flush()
    self.session_writer.flush()
