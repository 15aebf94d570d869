"""The names of what a run writes into --model_dir, defined once for the trainer and for
the scripts that read runs. Pure Python: reading a run must not need TensorFlow."""

CONFIG_FILE = "config.json"     # the Config plus resolved values (steps, replicas, ...)
HISTORY_FILE = "history.json"   # {"history": [one record per epoch end]}
METRICS_FILE = "metrics.json"   # the final metrics, written when the run finishes
EVAL_FILE = "eval.json"         # --mode=eval's result
LOCK_FILE = "run.lock"          # held by the trainer that owns the directory
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


def eval_split_name(validation_split: int) -> str:
  """The split every epoch is evaluated on: "validation" when one is held out, else "test"."""
  return VALIDATION_EVENTS if validation_split else TEST_EVENTS
