"""The run directory (--model_dir): what may be written there (writable, compatible with the
run's config.json, room for checkpoints), the checkpoints and their restore with fallback,
and the run's JSON files, written atomically."""

import dataclasses
import json
import os
import shutil
import tempfile

from absl import logging
import tensorflow as tf

from trainer import run_files
from trainer.config import Config
from trainer.errors import CheckpointError, RunDirError

# Settings a checkpoint cannot survive: the architecture, and what maps steps to data.
INCOMPATIBLE_FIELDS = ("depth", "plain", "stem", "shortcut", "stage_sizes", "stage_widths",
                       "global_batch_size", "steps_per_epoch", "data_source", "seed",
                       "deterministic")
# What --overwrite removes: only what a run writes, never other files of the user's.
RUN_OUTPUTS = (run_files.CHECKPOINT_SUBDIR, run_files.BEST_SUBDIR, run_files.TRAIN_EVENTS,
               run_files.TEST_EVENTS, run_files.VALIDATION_EVENTS, run_files.EXPORT_SUBDIR,
               run_files.CONFIG_FILE, run_files.HISTORY_FILE, run_files.METRICS_FILE,
               run_files.EVAL_FILE)
# Room for event files and the JSON files beside the checkpoints.
SPARE_BYTES = 64 << 20


def write_json_atomically(path: str, payload: dict) -> None:
  """Writes JSON so that a crash leaves either the old or the new file, never half."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def read_history(model_dir: str) -> list[dict]:
  """The per-epoch records of history.json ([] when there are none)."""
  path = os.path.join(model_dir, run_files.HISTORY_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)["history"]


def write_history(model_dir: str, history: list[dict]) -> None:
  write_json_atomically(os.path.join(model_dir, run_files.HISTORY_FILE), {"history": history})


def write_config(model_dir: str, settings: dict) -> None:
  write_json_atomically(os.path.join(model_dir, run_files.CONFIG_FILE), settings)


def write_metrics(model_dir: str, metrics: dict) -> None:
  write_json_atomically(os.path.join(model_dir, run_files.METRICS_FILE), metrics)


def write_eval(model_dir: str, result: dict) -> None:
  write_json_atomically(os.path.join(model_dir, run_files.EVAL_FILE), result)


def prepare(model_dir: str, config: Config) -> None:
  """Makes model_dir ready for this run: writable, emptied with --overwrite, and holding
  no run with incompatible settings.

  Raises:
    RunDirError: naming what is wrong and what to do.
  """
  check_writable(model_dir)
  if config.overwrite:
    clear_run(model_dir)
  check_compatible(model_dir, config)


def check_writable(model_dir: str) -> None:
  """Creates model_dir if needed and fails early if we cannot write into it."""
  try:
    os.makedirs(model_dir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=model_dir):
      pass
  except OSError as e:
    raise RunDirError(f"--model_dir={model_dir} is not writable: {e.strerror or e}") from None


def check_free_space(model_dir: str, checkpoint_bytes: int, keep: int) -> None:
  """Fails when the disk cannot hold the checkpoints this run will keep.

  Args:
    model_dir: the run's directory (exists).
    checkpoint_bytes: the size of one checkpoint.
    keep: rolling checkpoints kept; one more is written before the oldest is deleted,
      and the best checkpoint is kept apart.
  """
  existing = sum(os.path.getsize(os.path.join(root, f))
                 for sub in (run_files.CHECKPOINT_SUBDIR, run_files.BEST_SUBDIR)
                 for root, _, files in os.walk(os.path.join(model_dir, sub)) for f in files)
  needed = max(checkpoint_bytes * (keep + 2) - existing, checkpoint_bytes) + SPARE_BYTES
  free = shutil.disk_usage(model_dir).free
  if free < needed:
    raise RunDirError(f"--model_dir={model_dir} has {free / 2**20:.0f} MiB free, but this "
                      f"run needs about {needed / 2**20:.0f} MiB for its checkpoints "
                      f"({keep} kept + the best + one being written)")


def check_compatible(model_dir: str, config: Config) -> None:
  """Refuses to continue a run whose saved config.json differs in incompatible settings.

  Raises:
    RunDirError: naming each differing setting and how to start afresh.
  """
  path = os.path.join(model_dir, run_files.CONFIG_FILE)
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
    raise RunDirError(
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


class Checkpoints:
  """The run's rolling checkpoints (checkpoints/) and its best one (best/).

  Args:
    checkpoint: what a checkpoint holds.
    out_dir: where this process saves (the model dir, or a non-chief worker's scratch dir).
    restore_dir: the model dir, which every worker restores from: a worker that restored
      nothing would train other weights from step 0 (--model_dir must be shared).
    keep: rolling checkpoints kept.
  """

  def __init__(self, checkpoint: tf.train.Checkpoint, out_dir: str, restore_dir: str,
               keep: int):
    self.checkpoint = checkpoint
    self.manager = tf.train.CheckpointManager(
        checkpoint, os.path.join(out_dir, run_files.CHECKPOINT_SUBDIR), max_to_keep=keep)
    self.best = tf.train.CheckpointManager(
        checkpoint, os.path.join(out_dir, run_files.BEST_SUBDIR), max_to_keep=1)
    self.restore_manager = self.manager if out_dir == restore_dir else (
        tf.train.CheckpointManager(
            checkpoint, os.path.join(restore_dir, run_files.CHECKPOINT_SUBDIR),
            max_to_keep=keep))

  @property
  def latest(self) -> str | None:
    return self.manager.latest_checkpoint

  def save(self, step: int) -> str:
    return self.manager.save(checkpoint_number=step)

  def save_best(self, step: int) -> str:
    return self.best.save(checkpoint_number=step)

  def restore_latest(self) -> str | None:
    """Restores the newest checkpoint that reads back, falling back to older ones.

    A crash in the middle of a save, or a truncated file, leaves the newest checkpoint
    unreadable; the one before it still holds a consistent state.

    Returns:
      the restored checkpoint's path, or None when there is none.
    Raises:
      CheckpointError: when checkpoints exist but none reads back.
    """
    candidates = list(reversed(self.restore_manager.checkpoints))
    for path in candidates:
      try:
        self.checkpoint.restore(path).assert_existing_objects_matched()
        return path
      # A truncated file surfaces as an OpError, or as IndexError from the reader.
      except (tf.errors.OpError, AssertionError, ValueError, IndexError, KeyError) as e:
        logging.warning("checkpoint %s is unreadable (%s: %s); trying an older one", path,
                        type(e).__name__, str(e).splitlines()[0][:200])
    if candidates:
      raise CheckpointError(f"none of the checkpoints in {self.restore_manager.directory} "
                            "could be restored; see the warnings above (use --overwrite to "
                            "start afresh)")
    return None


def resolve_checkpoint(model_dir: str, which: str) -> str:
  """Finds the checkpoint `--checkpoint` names: "latest", "best" or a path prefix.

  Raises:
    CheckpointError: when there is none.
  """
  if which in ("latest", "best"):
    subdir = run_files.CHECKPOINT_SUBDIR if which == "latest" else run_files.BEST_SUBDIR
    directory = os.path.join(model_dir, subdir)
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


def restore_for_inference(checkpoint: tf.train.Checkpoint, path: str, model_name: str,
                          settings: str = "--depth/--plain/--stem/--shortcut/--stage_*/"
                          "--ema_decay") -> None:
  """Restores `path` into `checkpoint` for evaluation or export (optimizer slots may be
  missing from `checkpoint`).

  Raises:
    CheckpointError: when the checkpoint does not fit the model.
  """
  try:
    checkpoint.restore(path).expect_partial().assert_existing_objects_matched()
  except (tf.errors.OpError, AssertionError, ValueError) as e:
    raise CheckpointError(
        f"cannot restore {path} into {model_name} ({type(e).__name__}); was it trained "
        f"with other {settings} settings?") from None
