"""--mode=export: a SavedModel and a .keras file of the best (or a chosen) checkpoint, each
checked by loading it back and comparing logits."""

import dataclasses
import json
import os

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from trainer import run_dir, run_files, state
from trainer.config import Config

SAVED_MODEL_SUBDIR = "saved_model"
KERAS_FILE = "model.keras"


def _num_classes(model_dir: str) -> int:
  # The run's config.json records the class names the classifier was built for.
  path = os.path.join(model_dir, run_files.CONFIG_FILE)
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
    errors.CheckpointError: when there is no checkpoint to export, or it does not fit.
  """
  path = run_dir.resolve_checkpoint(config.model_dir, config.checkpoint or "best")
  keras.mixed_precision.set_global_policy("float32")
  # Stock batch norm in the export: synchronising replicas means nothing when serving.
  model = state.build_model(dataclasses.replace(config, sync_batch_norm=False),
                            _num_classes(config.model_dir))
  run_dir.restore_for_inference(
      tf.train.Checkpoint(model=state.variables_by_path(model.variables)), path, model.name,
      settings="--depth/--plain/--stem/--shortcut/--stage_*")
  export_dir = config.export_dir or os.path.join(config.model_dir, run_files.EXPORT_SUBDIR)
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
