"""TensorBoard helpers: the run's configuration as text and HParams, and the grouping of
variables into stages for the per-stage gradient norms."""

import re

import tensorflow as tf
from tensorboard.plugins.hparams import api as hparams_api

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


def write_run_info(writer: tf.summary.SummaryWriter, settings: dict, step: int) -> None:
  """Writes the run's settings as a text table and as HParams.

  Args:
    writer: the training summary writer.
    settings: the Config as a dict plus the resolved values (strategy, replicas, ...).
    step: the step the run starts (or resumes) at.
  """
  rows = "\n".join(f"| {k} | {_hparam_value(v)} |" for k, v in sorted(settings.items()))
  with writer.as_default(step=step):
    tf.summary.text("config", f"| setting | value |\n| --- | --- |\n{rows}")
    hparams_api.hparams({k: _hparam_value(v) for k, v in settings.items()})
