"""The run directory (--model_dir): what may be written there (writable, compatible with the
run's config.json, room for checkpoints), the checkpoints and their restore with fallback,
and the run's JSON files, written atomically."""

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile

from absl import logging
import tensorflow as tf

from trainer import config as config_lib
from trainer import run_files
from trainer.config import Config
from trainer.errors import CheckpointError, RunDirError, UserError


# What --overwrite removes: only what a run writes, never other files of the user's.
# train.log stays: it records the --overwrite too.
RUN_OUTPUTS = (run_files.CHECKPOINT_SUBDIR, run_files.BEST_SUBDIR, run_files.TRAIN_EVENTS,
               run_files.TEST_EVENTS, run_files.VALIDATION_EVENTS, run_files.EXPORT_SUBDIR,
               run_files.CONFIG_FILE, run_files.HISTORY_FILE, run_files.METRICS_FILE,
               run_files.EVAL_FILE, run_files.BATCHES_FILE)
# Room for event files and the JSON files beside the checkpoints.
SPARE_BYTES = 64 << 20


class RunLock:
  """Makes one trainer the owner of a run dir for its life: run.lock, held with flock(2).

  The kernel drops the lock when its process dies however it dies (kill -9 included), and
  a network file system when the holder's lease expires (a lost machine), so a lock file
  whose lock nobody holds is stale: the next trainer takes it over with a warning. The
  file names the holder, for the error a second trainer gets.
  """

  def __init__(self, model_dir: str):
    self.model_dir = model_dir
    self.path = os.path.join(model_dir, run_files.LOCK_FILE)
    self.fd: int | None = None

  def acquire(self) -> None:
    """Takes the lock, or raises RunDirError naming the process that holds it."""
    while self.fd is None:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES):
          raise RunDirError(f"cannot lock {self.path}: {e.strerror}") from None
        raise RunDirError(f"--model_dir={self.model_dir} is in use by {self._holder()} "
                          f"(lock file {self.path}); wait for it to end or stop it, then "
                          "rerun") from None
      # A releasing holder may have removed the file between our open and our lock.
      if os.path.exists(self.path) and os.fstat(fd).st_ino == os.stat(self.path).st_ino:
        self.fd = fd
      else:
        os.close(fd)
    previous = self._holder()
    if previous != "an unknown process":
      logging.warning("%s was left by %s, which ended without releasing it; taking it over",
                      self.path, previous)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    os.ftruncate(self.fd, 0)
    os.pwrite(self.fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                   "started": started, "command": sys.argv}).encode(), 0)

  def _holder(self) -> str:
    try:
      with open(self.path) as f:
        info = json.load(f)
      return f"process {info['pid']} on {info['host']} since {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
      return "an unknown process"

  def release(self) -> None:
    if self.fd is None:
      return
    try:
      os.remove(self.path)
    except OSError:
      pass  # The run dir itself may be gone (a refused run's empty dir is removed).
    os.close(self.fd)
    self.fd = None

  def __enter__(self) -> "RunLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def write_json_atomically(path: str, payload: dict) -> None:
  """Writes JSON so that a crash leaves either the old or the new file, never half.

  Raises:
    RunDirError: when the file cannot be written (full disk, read-only directory).
  """
  tmp = f"{path}.tmp"
  try:
    with open(tmp, "w") as f:
      json.dump(payload, f, indent=2, sort_keys=True)
      f.write("\n")
    os.replace(tmp, path)
  except OSError as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise RunDirError(f"cannot write {path}: {e.strerror or e}") from None


def read_history(model_dir: str) -> list[dict]:
  """The per-epoch records of history.json ([] when there are none)."""
  path = os.path.join(model_dir, run_files.HISTORY_FILE)
  payload = run_files.read_json(path, "the run's per-epoch history")
  if payload is None:
    return []
  history = payload.get("history")
  if not isinstance(history, list) or not all(
      isinstance(h, dict) and isinstance(h.get("step"), int) for h in history):
    raise RunDirError(f"{path} (the run's per-epoch history) has no list of epoch records "
                      "with steps. Fix or remove it, or pass --overwrite to start afresh")
  return history


def write_history(model_dir: str, history: list[dict]) -> None:
  write_json_atomically(os.path.join(model_dir, run_files.HISTORY_FILE), {"history": history})


def append_batches(model_dir: str, batches: dict[int, list[int]]) -> None:
  """Appends {"step": k, "ids": [...]} lines to batches.jsonl (train_and_evaluate's
  record_batches). A resumed run appends the steps it trains again: a step's last line is
  what its weights were trained on."""
  with open(os.path.join(model_dir, run_files.BATCHES_FILE), "a") as f:
    f.writelines(json.dumps({"step": step, "ids": ids}) + "\n" for step, ids in batches.items())


def write_config(model_dir: str, settings: dict) -> None:
  write_json_atomically(os.path.join(model_dir, run_files.CONFIG_FILE), settings)


def write_metrics(model_dir: str, metrics: dict) -> None:
  write_json_atomically(os.path.join(model_dir, run_files.METRICS_FILE), metrics)


def write_eval(model_dir: str, result: dict) -> None:
  write_json_atomically(os.path.join(model_dir, run_files.EVAL_FILE), result)


@contextlib.contextmanager
def claim(model_dir: str, *, lock: bool = True):
  """Makes model_dir (checked writable) this process's for the block: holds its RunLock,
  and when the block refuses the run (a UserError) removes the dir if it made it and it
  is still empty, so a refused run leaves nothing behind."""
  created = not os.path.isdir(model_dir)
  check_writable(model_dir)
  run_lock = RunLock(model_dir) if lock else None
  refused = False
  try:
    if run_lock:
      run_lock.acquire()
    yield
  except UserError:
    refused = True
    raise
  finally:
    if run_lock:
      run_lock.release()
    if refused and created:
      with contextlib.suppress(OSError):
        os.rmdir(model_dir)


@dataclasses.dataclass(frozen=True)
class EarlierRun:
  """What a run dir holds of an earlier run of it, read once at start-up: its settings
  (config.json: the Config and what it resolved to; None for a new run) and its per-epoch
  history. The compatibility checks and the resume read it from here."""
  model_dir: str
  settings: dict | None
  history: list[dict]

  @property
  def config_path(self) -> str:
    return os.path.join(self.model_dir, run_files.CONFIG_FILE)


def read_earlier_run(model_dir: str, *, ignore: bool = False) -> EarlierRun:
  """The earlier run in model_dir; none when `ignore` (--overwrite: it will be deleted).

  Raises:
    RunDirError: for a config.json or history.json that cannot be read.
  """
  if ignore:
    return EarlierRun(model_dir, None, [])
  settings = run_files.read_json(os.path.join(model_dir, run_files.CONFIG_FILE),
                                 "the run's settings")
  return EarlierRun(model_dir, settings, read_history(model_dir))


def prepare(model_dir: str, config: Config, earlier: EarlierRun, resolved: dict) -> None:
  """Makes model_dir ready for this run, once its data has resolved: emptied with
  --overwrite, and holding no run whose data resolved otherwise (check_settings has
  checked the flags before the data loaded). Writes nothing unless --overwrite. The
  precision is checked apart (check_precision): on a CPU, --precision=auto is a
  measurement, which a run refused here should not wait for.

  Args:
    earlier: read_earlier_run(model_dir, ignore=config.overwrite).
    resolved: what this run's data resolved to, config.json's values of RESOLVED_DATA.
  Raises:
    RunDirError: naming what is wrong and what to do.
  """
  if config.overwrite:
    clear_run(model_dir)
  differing = [f"{RESOLVED_DATA[name]}: {_short(earlier.settings[name])} in "
               f"{earlier.config_path}, {_short(mine)} now"
               for name, mine in resolved.items()
               if earlier.settings and earlier.settings.get(name) not in (None, mine)]
  if differing:
    _refuse(model_dir, differing)


def recorded_precision(earlier: EarlierRun, config: Config) -> str | None:
  """What a resumed --precision=auto run resolved auto to when it started (config.json's
  precision_resolved, where its --precision was auto too), so that it keeps it: on a CPU
  auto is a measurement, and a run must not change precision with a timing. None for a
  new run, with --overwrite, or when either --precision was not auto.

  Every worker passes the chief's --model_dir's run, so all keep the same precision.
  """
  saved = earlier.settings
  if config.precision != "auto" or saved is None or saved.get("precision") != "auto":
    return None
  return saved.get("precision_resolved")


def recorded_data_seed(earlier: EarlierRun, config: Config) -> int | None:
  """The data seed a resumed run drew when it started (config.json's data_seed_resolved),
  so that it goes on in the same order; None for a new run, with --overwrite, or where
  either run is --deterministic (then --seed is the seed)."""
  saved = earlier.settings
  if config.deterministic or saved is None or saved.get("deterministic", True):
    return None
  seed = saved.get("data_seed_resolved")
  return seed if isinstance(seed, int) and 0 <= seed < 2**24 else None


def check_writable(model_dir: str) -> None:
  """Creates model_dir if needed and fails early if we cannot write into it."""
  if os.path.exists(model_dir) and not os.path.isdir(model_dir):
    raise RunDirError(f"--model_dir={model_dir} is a file, not a directory")
  try:
    os.makedirs(model_dir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=model_dir):
      pass
  except (OSError, ValueError) as e:
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


def _ema_variables(settings: dict) -> tuple[str, bool]:
  """The EMA setting as the user would name it, and whether it adds checkpoint variables."""
  ema = float(settings.get("ema_decay") or 0.0)
  return f"{ema} ({'with' if ema else 'no'} moving-average variables)", bool(ema)


def _loss_scale_variables(precision: str) -> tuple[str, bool]:
  """The precision as the user would name it, and whether it adds checkpoint variables."""
  loss_scale = precision == "mixed_float16"
  return f"{precision} ({'with' if loss_scale else 'no'} loss-scale variables)", loss_scale


# What the data resolved to (config.json's records), and how an error names it: another
# --data_dir may hold the same data elsewhere, but not other data.
RESOLVED_DATA = {"train_examples": "training images (--data_dir, --validation_split)",
                 "steps_per_epoch_resolved": "steps per epoch",
                 "class_names": "class names (--data_dir)"}


def _short(value) -> str:
  text = repr(value)
  return text if len(text) <= 120 else text[:117] + "..."


def check_settings(earlier: EarlierRun, config: Config) -> None:
  """Refuses to continue a run whose settings (config.json) differ in a setting a resumed
  run must keep (config.RESUME_FIXED: the architecture, the data, its split and order,
  the schedule's shape) or in having an EMA (its variables are in the checkpoint). Runs
  before the data loads: that can take a minute, or fail on its own and hide the
  contradiction (a rerun with a typo). Logs the settings that changed.

  Raises:
    RunDirError: naming each differing setting and how to start afresh.
  """
  saved, path = earlier.settings, earlier.config_path
  if saved is None:
    return
  ours = dataclasses.asdict(config)
  differing = []
  for name in config_lib.RESUME_FIXED:
    theirs, mine = saved.get(name), ours[name]
    if isinstance(theirs, list):
      theirs = tuple(theirs)
    if theirs != mine:
      differing.append(f"--{name}: {theirs!r} in {path}, {mine!r} now")
  if "precision_resolved" in saved:  # Written with the variables' settings.
    (their_text, their_adds), (text, adds) = _ema_variables(saved), _ema_variables(ours)
    if adds != their_adds:
      differing.append(f"--ema_decay: {their_text} in {path}, {text} now")
  if differing:
    _refuse(earlier.model_dir, differing)
  changed = [f"--{k}: {saved[k]!r} -> {v!r}" for k, v in ours.items()
             if k in saved and k not in config_lib.RESUME_FIXED and saved[k] != v
             and not (isinstance(saved[k], list) and tuple(saved[k]) == v)]
  if changed:
    logging.info("continuing %s with changed settings: %s", earlier.model_dir,
                 ", ".join(changed))


def check_precision(earlier: EarlierRun, precision: str) -> None:
  """Refuses to continue a run whose checkpoint has loss-scale variables (float16) where
  this run's resolved precision has none, or the reverse.

  Raises:
    RunDirError: naming both precisions and how to start afresh.
  """
  saved = earlier.settings
  if saved is None or "precision_resolved" not in saved:
    return
  their_text, their_adds = _loss_scale_variables(saved["precision_resolved"])
  text, adds = _loss_scale_variables(precision)
  if adds != their_adds:
    _refuse(earlier.model_dir, [f"--precision: {their_text} in {earlier.config_path}, "
                                f"{text} now"])


def _refuse(model_dir: str, differing: list[str]) -> None:
  raise RunDirError(
      f"--model_dir={model_dir} holds a run with different settings:\n  "
      + "\n  ".join(differing)
      + "\nUse a new --model_dir, or pass --overwrite to delete that run's checkpoints, "
        "logs and metrics and start afresh.")


def clear_run(model_dir: str) -> None:
  """Deletes what a run wrote into model_dir (for --overwrite), leaving other files."""
  # The run's HParams session lives in event files of the run dir itself.
  for path in tf.io.gfile.glob(os.path.join(model_dir, "events.out.tfevents.*")):
    os.remove(path)
  for name in RUN_OUTPUTS:
    path = os.path.join(model_dir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)


def checkpoint_files(directory: str) -> list[str]:
  """The checkpoint path prefixes in `directory` found from their own files (ckpt-N.index),
  newest (largest N) first; for when the index file is missing or damaged."""
  found = []
  for path in tf.io.gfile.glob(os.path.join(directory, "ckpt-*.index")):
    number = os.path.basename(path)[len("ckpt-"):-len(".index")]
    if number.isdigit():
      found.append((int(number), path[:-len(".index")]))
  return [path for _, path in sorted(found, reverse=True)]


def _rewrite_index(directory: str, paths: list[str]) -> None:
  """Writes the checkpoint index (a CheckpointState text proto) listing `paths`, oldest
  first, each stamped with its file's time, so that a CheckpointManager rotates them."""
  paths = sorted(paths, key=lambda p: int(p.rsplit("-", 1)[1]))
  stamps = [tf.io.gfile.stat(f"{p}.index").mtime_nsec / 1e9 for p in paths]
  lines = [f'model_checkpoint_path: "{os.path.basename(paths[-1])}"']
  lines += [f'all_model_checkpoint_paths: "{os.path.basename(p)}"' for p in paths]
  lines += [f"all_model_checkpoint_timestamps: {t!r}" for t in stamps]
  lines.append(f"last_preserved_timestamp: {min(stamps) - 1.0!r}")
  with tf.io.gfile.GFile(os.path.join(directory, "checkpoint"), "w") as f:
    f.write("\n".join(lines) + "\n")


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
    self.checkpoint, self.keep = checkpoint, keep
    self.index_stale = False
    self.directory = os.path.join(out_dir, run_files.CHECKPOINT_SUBDIR)
    self.restore_directory = os.path.join(restore_dir, run_files.CHECKPOINT_SUBDIR)
    self.manager = tf.train.CheckpointManager(checkpoint, self.directory, max_to_keep=keep)
    self.best = tf.train.CheckpointManager(
        checkpoint, os.path.join(out_dir, run_files.BEST_SUBDIR), max_to_keep=1)

  @property
  def latest(self) -> str | None:
    return self.manager.latest_checkpoint

  def save(self, step: int) -> str:
    return self.manager.save(checkpoint_number=step)

  def save_best(self, step: int) -> str:
    return self.best.save(checkpoint_number=step)

  def candidates(self) -> list[str]:
    """Every checkpoint of the restore dir, newest first: those the index lists and those
    found from their files (the index may be missing, damaged or out of date)."""
    listed = tf.train.CheckpointManager(self.checkpoint, self.restore_directory,
                                        max_to_keep=self.keep).checkpoints
    found = checkpoint_files(self.restore_directory)
    unlisted = [p for p in found if p not in listed]
    if unlisted:
      logging.warning("the checkpoint index %s is missing, damaged or out of date; found %s "
                      "from their files", os.path.join(self.restore_directory, "checkpoint"),
                      ", ".join(os.path.basename(p) for p in unlisted))
    self.index_stale = bool(unlisted)
    return sorted(set(found) | set(listed), key=lambda p: -int(p.rsplit("-", 1)[1]))

  def _repair_index(self) -> None:
    """Rebuilds a stale index of this process's own checkpoints, so that rotation keeps
    deleting the oldest of them (only after a restore succeeded: a refused run writes
    nothing)."""
    if self.index_stale and self.restore_directory == self.directory:
      _rewrite_index(self.directory, checkpoint_files(self.directory))
      self.manager = tf.train.CheckpointManager(self.checkpoint, self.directory,
                                                max_to_keep=self.keep)

  def restore_latest(self) -> str | None:
    """Restores the newest checkpoint that reads back, falling back to older ones.

    A crash in the middle of a save, or a truncated file, leaves the newest checkpoint
    unreadable; the one before it still holds a consistent state.

    Returns:
      the restored checkpoint's path, or None when there is none.
    Raises:
      CheckpointError: when checkpoints exist but none reads back.
    """
    candidates = self.candidates()
    for path in candidates:
      try:
        self.checkpoint.restore(path).assert_existing_objects_matched()
        self._repair_index()
        return path
      # A truncated file surfaces as an OpError, or as IndexError from the reader.
      except (tf.errors.OpError, AssertionError, ValueError, IndexError, KeyError) as e:
        logging.warning("checkpoint %s is unreadable (%s: %s); trying an older one", path,
                        type(e).__name__, str(e).splitlines()[0][:200])
    if candidates:
      raise CheckpointError(f"none of the checkpoints in {self.restore_directory} could be "
                            "restored; see the warnings above (use --overwrite to start "
                            "afresh)")
    return None


def export_default(validation_split: int) -> tuple[str, str]:
  """What --mode=export exports without --checkpoint: ("latest" or "best", why).

  best/ holds the epoch with the best evaluation accuracy. Without a validation split that
  evaluation is the test split, so best/ is chosen on the test split and its test
  accuracy is optimistic: the default is then the last (a finished run's final) checkpoint.
  """
  if validation_split:
    return "best", "the best by validation accuracy (the run held out a validation split)"
  return "latest", ("the last checkpoint (the run held out no validation split, so its "
                    "best/ was chosen on the test split and is not the default)")


def resolve_checkpoint(model_dir: str, which: str) -> str:
  """Finds the checkpoint `--checkpoint` names: "latest", "best" or a path prefix.

  Raises:
    CheckpointError: when there is none.
  """
  if which in ("latest", "best"):
    subdir = run_files.CHECKPOINT_SUBDIR if which == "latest" else run_files.BEST_SUBDIR
    directory = os.path.join(model_dir, subdir)
    # The index may be missing or damaged: the newest checkpoint file then stands in.
    path = tf.train.latest_checkpoint(directory) or next(iter(checkpoint_files(directory)),
                                                         None)
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


def _read_error(path: str) -> Exception | None:
  """Why the checkpoint at `path` does not read back on its own (every tensor), or None."""
  try:
    reader = tf.train.load_checkpoint(path)
    for key in reader.get_variable_to_shape_map():
      reader.get_tensor(key)
  except (tf.errors.OpError, ValueError, IndexError) as e:
    return e
  return None


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
  except (tf.errors.OpError, AssertionError, ValueError, IndexError, KeyError) as e:
    # A file that does not read back on its own is damaged, whatever the model.
    damage = _read_error(path) or (
        e if isinstance(e, (tf.errors.DataLossError, IndexError)) or "corrupted" in str(e)
        else None)
    if damage is not None:
      raise CheckpointError(f"{path} is damaged ({type(damage).__name__}: "
                            f"{str(damage).splitlines()[0][:200]}); pick another with "
                            "--checkpoint=PATH_PREFIX") from None
    raise CheckpointError(
        f"cannot restore {path} into {model_name} ({type(e).__name__}); was it trained "
        f"with other {settings} settings?") from None
