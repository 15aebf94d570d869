"""--mode=export: a SavedModel and a .keras file of the best (or a chosen) checkpoint, each
checked by loading it back and comparing logits."""

import json
import os

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from trainer import checkpoints, resnet
from trainer.config import Config
from input_pipeline import pipeline

SAVED_MODEL_SUBDIR = "saved_model"
KERAS_FILE = "model.keras"


def _num_classes(model_dir: str) -> int:
  # The run's config.json records the class names the classifier was built for.
  path = os.path.join(model_dir, checkpoints.CONFIG_FILE)
  if os.path.exists(path):
    with open(path) as f:
      return len(json.load(f).get("class_names", range(10)))
  return 10


def export(config: Config) -> dict:
  """Writes <export_dir>/saved_model and <export_dir>/model.keras from a checkpoint.

  The exported models take uint8 images [B, 32, 32, 3] and return float32 logits; they
  compute in float32 whatever precision the run trained in.

  Returns:
    paths of what was written and the checkpoint used.
  Raises:
    checkpoints.CheckpointError: when there is no checkpoint to export.
  """
  path = checkpoints.resolve_checkpoint(config.model_dir, config.checkpoint or "best")
  keras.mixed_precision.set_global_policy("float32")
  model = resnet.build_model(config.architecture(), num_classes=_num_classes(config.model_dir),
                             input_mean=pipeline.CIFAR10_MEAN, input_std=pipeline.CIFAR10_STD,
                             bn_momentum=config.bn_momentum)
  try:
    tf.train.Checkpoint(model=checkpoints.variables_by_path(model.variables)).restore(
        path).expect_partial().assert_existing_objects_matched()
  except (tf.errors.OpError, AssertionError, ValueError) as e:
    raise checkpoints.CheckpointError(
        f"cannot restore {path} into {model.name} ({type(e).__name__}); was it trained "
        "with other --depth/--plain/--stem/--shortcut/--stage_* settings?") from None
  export_dir = config.export_dir or os.path.join(config.model_dir, "export")
  os.makedirs(export_dir, exist_ok=True)
  saved_model_dir = os.path.join(export_dir, SAVED_MODEL_SUBDIR)
  keras_file = os.path.join(export_dir, KERAS_FILE)
  model.export(saved_model_dir, format="tf_saved_model", verbose=False)
  model.save(keras_file)

  # Load both back and compare: an export that does not reproduce its logits is a bug.
  images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  expected = model(images, training=False).numpy()
  loaded = tf.saved_model.load(saved_model_dir)  # Keep a reference: it owns the variables.
  from_saved_model = loaded.serve(tf.constant(images)).numpy()
  from_keras = keras.saving.load_model(keras_file)(images, training=False).numpy()
  diff = max(np.abs(expected - from_saved_model).max(), np.abs(expected - from_keras).max())
  logging.info("exported %s: reloaded logits differ by at most %.3g", path, diff)
  return {"checkpoint": path, "saved_model": saved_model_dir, "keras": keras_file,
          "max_logit_difference": float(diff)}
