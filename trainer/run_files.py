"""The names of what a run writes into --model_dir, defined once for the trainer and for
the scripts that read runs, and the reading of its JSON files. Pure Python: reading a run
must not need TensorFlow."""

import json
import os

from trainer.errors import RunDirError

CONFIG_FILE = "config.json"     # the Config plus resolved values (steps, replicas, ...)
HISTORY_FILE = "history.json"   # {"history": [one record per epoch end]}
METRICS_FILE = "metrics.json"   # the final metrics, written when the run finishes
EVAL_FILE = "eval.json"         # --mode=eval's result
LOCK_FILE = "run.lock"          # held by the trainer that owns the directory
LOG_FILE = "train.log"          # every log line of every command run on the directory
BATCHES_FILE = "batches.jsonl"  # each step's example ids, only when a test asks for them
CHECKPOINT_SUBDIR = "checkpoints"
BEST_SUBDIR = "best"
EXPORT_SUBDIR = "export"

# TensorBoard event directories. The evaluation writer is named after the split it
# evaluates every epoch: the test split, or the held-out validation split
# (--validation_split). Both carry the train writer's epoch_* tags, so the curves overlay.
TRAIN_EVENTS = "train"
TEST_EVENTS = "test"
VALIDATION_EVENTS = "validation"
EVAL_EVENTS = (TEST_EVENTS, VALIDATION_EVENTS)

# Per-epoch tags that train and evaluation writers share (what the study scripts read).
EPOCH_LOSS_TAG = "epoch_loss"
EPOCH_ACCURACY_TAG = "epoch_accuracy"
# Training only: what the step minimises (cross-entropy with label smoothing, plus L2);
# epoch_loss is the plain cross-entropy on both writers, so the two curves overlay.
EPOCH_OBJECTIVE_TAG = "epoch_objective"


def eval_split_name(validation_split: int) -> str:
  """The split every epoch is evaluated on: "validation" when one is held out, else "test"."""
  return VALIDATION_EVENTS if validation_split else TEST_EVENTS


def read_json(path: str, what: str) -> dict | None:
  """The JSON object in `path`, or None when there is no such file.

  Raises:
    RunDirError: when the file is unreadable or holds no JSON object; `what` says which
      file of the run it is, for the message.
  """
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      payload = json.load(f)
  except (OSError, ValueError) as e:
    raise RunDirError(f"{path} ({what}) is unreadable: {str(e)[:200]}. Fix or remove it, or "
                      "pass --overwrite to start the run afresh") from None
  if not isinstance(payload, dict):
    raise RunDirError(f"{path} ({what}) holds {type(payload).__name__}, not a JSON object. "
                      "Fix or remove it, or pass --overwrite to start the run afresh")
  return payload
