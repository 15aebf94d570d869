"""The run directory: config compatibility, free-space checks, checkpoint restore with
fallback to an older checkpoint, and atomic JSON files."""

import dataclasses
import json
import os
import shutil
import tempfile

from absl import logging
import tensorflow as tf

from trainer.config import Config, ConfigError

CHECKPOINT_SUBDIR = "checkpoints"
BEST_SUBDIR = "best"
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.json"
METRICS_FILE = "metrics.json"
# Settings a checkpoint cannot survive: the architecture, and what maps steps to data.
INCOMPATIBLE_FIELDS = ("depth", "plain", "stem", "shortcut", "stage_sizes", "stage_widths",
                       "global_batch_size", "steps_per_epoch", "data_source", "seed",
                       "deterministic")
# What --overwrite removes: only what a run writes, never other files of the user's.
RUN_OUTPUTS = (CHECKPOINT_SUBDIR, BEST_SUBDIR, "train", "validation", "export",
               CONFIG_FILE, HISTORY_FILE, METRICS_FILE, "eval.json")
# Room for event files and the JSON files beside the checkpoints.
SPARE_BYTES = 64 << 20


class CheckpointError(Exception):
  """No usable checkpoint where one is needed; the message says what to do."""


def variables_by_path(variables) -> dict:
  """Keys variables by their path ("stage2_block1_conv1/kernel") for tf.train.Checkpoint.

  Checkpointing a Keras model object would key its variables by layer index, so adding
  any layer would break older checkpoints; layer names are stable.
  """
  return {v.path: v for v in variables}


def write_json_atomically(path: str, payload: dict) -> None:
  """Writes JSON so that a crash leaves either the old or the new file, never half."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def read_history(model_dir: str) -> list[dict]:
  """The per-epoch records of history.json ([] when there are none)."""
  path = os.path.join(model_dir, HISTORY_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)["history"]


def check_writable(model_dir: str) -> None:
  """Creates model_dir if needed and fails early if we cannot write into it."""
  try:
    os.makedirs(model_dir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=model_dir):
      pass
  except OSError as e:
    raise ConfigError(f"--model_dir={model_dir} is not writable: {e.strerror or e}") from None


def check_free_space(model_dir: str, checkpoint_bytes: int, keep: int) -> None:
  """Fails when the disk cannot hold the checkpoints this run will keep.

  Args:
    model_dir: the run's directory (exists).
    checkpoint_bytes: the size of one checkpoint.
    keep: rolling checkpoints kept; one more is written before the oldest is deleted,
      and the best checkpoint is kept apart.
  """
  existing = sum(os.path.getsize(os.path.join(root, f))
                 for sub in (CHECKPOINT_SUBDIR, BEST_SUBDIR)
                 for root, _, files in os.walk(os.path.join(model_dir, sub)) for f in files)
  needed = max(checkpoint_bytes * (keep + 2) - existing, checkpoint_bytes) + SPARE_BYTES
  free = shutil.disk_usage(model_dir).free
  if free < needed:
    raise ConfigError(f"--model_dir={model_dir} has {free / 2**20:.0f} MiB free, but this "
                      f"run needs about {needed / 2**20:.0f} MiB for its checkpoints "
                      f"({keep} kept + the best + one being written)")


def check_compatible(model_dir: str, config: Config) -> None:
  """Refuses to continue a run whose saved config.json differs in incompatible settings.

  Raises:
    ConfigError: naming each differing setting and how to start afresh.
  """
  path = os.path.join(model_dir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  ours = dataclasses.asdict(config)
  differing = []
  for name in INCOMPATIBLE_FIELDS:
    theirs, mine = saved.get(name), ours[name]
    if isinstance(theirs, list):
      theirs = tuple(theirs)
    if theirs != mine:
      differing.append(f"--{name}: {theirs!r} in {path}, {mine!r} now")
  if differing:
    raise ConfigError(
        f"--model_dir={model_dir} holds a run with different settings:\n  "
        + "\n  ".join(differing)
        + "\nUse a new --model_dir, or pass --overwrite to delete that run's checkpoints, "
          "logs and metrics and start afresh.")
  changed = [f"--{k}: {saved[k]!r} -> {v!r}" for k, v in ours.items()
             if k in saved and k not in INCOMPATIBLE_FIELDS and saved[k] != v
             and not (isinstance(saved[k], list) and tuple(saved[k]) == v)]
  if changed:
    logging.info("continuing %s with changed settings: %s", model_dir, ", ".join(changed))


def clear_run(model_dir: str) -> None:
  """Deletes what a run wrote into model_dir (for --overwrite), leaving other files."""
  for name in RUN_OUTPUTS:
    path = os.path.join(model_dir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)


def restore_latest(checkpoint: tf.train.Checkpoint,
                   manager: tf.train.CheckpointManager) -> str | None:
  """Restores the newest checkpoint that reads back, falling back to older ones.

  A crash in the middle of a save, or a truncated file, leaves the newest checkpoint
  unreadable; the one before it still holds a consistent state.

  Returns:
    the restored checkpoint's path, or None when there is none.
  Raises:
    CheckpointError: when checkpoints exist but none reads back.
  """
  candidates = list(reversed(manager.checkpoints))
  for path in candidates:
    try:
      checkpoint.restore(path).assert_existing_objects_matched()
      return path
    # A truncated file surfaces as an OpError, or as IndexError from the reader.
    except (tf.errors.OpError, AssertionError, ValueError, IndexError, KeyError) as e:
      logging.warning("checkpoint %s is unreadable (%s: %s); trying an older one", path,
                      type(e).__name__, str(e).splitlines()[0][:200])
  if candidates:
    raise CheckpointError(f"none of the checkpoints in {manager.directory} could be "
                          "restored; see the warnings above (use --overwrite to start "
                          "afresh)")
  return None


def resolve_checkpoint(model_dir: str, which: str) -> str:
  """Finds the checkpoint `--checkpoint` names: "latest", "best" or a path prefix.

  Raises:
    CheckpointError: when there is none.
  """
  if which in ("latest", "best"):
    directory = os.path.join(model_dir, CHECKPOINT_SUBDIR if which == "latest" else BEST_SUBDIR)
    path = tf.train.latest_checkpoint(directory)
    if path is None and which == "best":
      logging.info("no best checkpoint in %s; using the latest", directory)
      return resolve_checkpoint(model_dir, "latest")
    if path is None:
      raise CheckpointError(f"no checkpoint in {directory}: train first "
                            f"(python -m trainer.main --mode=train --model_dir={model_dir})")
    return path
  if not tf.io.gfile.exists(f"{which}.index"):
    raise CheckpointError(f"--checkpoint={which}: no such checkpoint (expected {which}.index)")
  return which
