"""Every TensorBoard write of a run: the settings as text and HParams, training metrics at
each log step, per-epoch metrics of training and evaluation, the final test metrics."""

import os
import re

import tensorflow as tf
from tensorboard.plugins.hparams import api as hparams_api

from trainer import run_files

_STAGE = re.compile(r"^(stem|stage\d+|head)_")


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


class Summaries:
  """The run's two event writers: train/, and the evaluated split's (test/ or validation/,
  see run_files). Only the chief writes; other workers get no-op writers."""

  def __init__(self, out_dir: str, eval_name: str, chief: bool):
    if chief:
      self.train = tf.summary.create_file_writer(os.path.join(out_dir, run_files.TRAIN_EVENTS))
      self.eval = tf.summary.create_file_writer(os.path.join(out_dir, eval_name))
    else:
      self.train = self.eval = tf.summary.create_noop_writer()

  def run_info(self, settings: dict, step: int) -> None:
    """The run's settings (Config plus resolved values) as a text table and as HParams,
    at the step the run starts (or resumes) at."""
    rows = "\n".join(f"| {k} | {_hparam_value(v)} |" for k, v in sorted(settings.items()))
    with self.train.as_default(step=step):
      tf.summary.text("config", f"| setting | value |\n| --- | --- |\n{rows}")
      hparams_api.hparams({k: _hparam_value(v) for k, v in settings.items()})

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

  def epoch(self, step: int, train_means: dict[str, float], results: dict[str, float]
            ) -> None:
    """An epoch's training means and evaluation results, under shared epoch_* tags so
    that the train and evaluation curves overlay."""
    with self.train.as_default(step=step):
      tf.summary.scalar(run_files.EPOCH_LOSS_TAG, train_means["loss"])
      tf.summary.scalar(run_files.EPOCH_ACCURACY_TAG, train_means["accuracy"])
    with self.eval.as_default(step=step):
      for key, value in results.items():
        tf.summary.scalar(key, value)
      tf.summary.scalar(run_files.EPOCH_LOSS_TAG, results["loss"])
      tf.summary.scalar(run_files.EPOCH_ACCURACY_TAG, results["accuracy"])

  def final_test(self, step: int, results: dict[str, float]) -> None:
    """The test split's metrics after a validation protocol (or a resumed finished run)."""
    with self.eval.as_default(step=step):
      for key, value in results.items():
        tf.summary.scalar(f"final_test_{key}", value)

  def flush(self) -> None:
    self.train.flush()
    self.eval.flush()
