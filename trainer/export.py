"""--mode=export: a SavedModel (with the class names, uint8 and encoded-image signatures)
and a .keras file of stock Keras layers, from the final checkpoint (the best by validation
accuracy after --validation_split, or a chosen one); each is loaded back and must
reproduce the checkpoint's logits, or nothing is exported."""

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from trainer import run_dir, run_files, state
from trainer.config import Config
from trainer.errors import ExportError, root_cause

SAVED_MODEL_SUBDIR = "saved_model"
KERAS_FILE = "model.keras"
CLASS_NAMES_FILE = "class_names.txt"  # the SavedModel's asset, one class name a line
IMAGE_SIZE = 32
# What TF Serving, `saved_model_cli` and most clients call without a signature name. It is
# `serve` (uint8 images), as in Keras's own model.export() and Model Garden's default
# image_tensor input: exact, nothing decoded or resized; encoded files go to serve_bytes.
DEFAULT_SIGNATURE = "serving_default"
# The largest logit difference a reloaded export may show against the restored
# checkpoint, relative to the largest logit (at least 1). Everything runs in float32 on
# the same machine, but the export's stock batch norm rounds differently from the fused
# one it was trained with: about 1e-6 of the largest logit, measured up to ResNet-110;
# a wrong export (weights, layers, preprocessing) differs by far more.
TOLERANCE = 1e-4
VERIFY_IMAGES = 4


def _class_names(model_dir: str) -> tuple[str, ...]:
  # The run's config.json records the class names the classifier was built for.
  path = os.path.join(model_dir, run_files.CONFIG_FILE)
  names = None
  if os.path.exists(path):
    with open(path) as f:
      names = json.load(f).get("class_names")
  if names is None:
    logging.warning("no class names in %s; exporting 10 classes named 0-9", path)
    names = [str(i) for i in range(10)]
  names = tuple(str(name) for name in names)
  if any(name.splitlines() != [name] for name in names):
    # The asset holds one name a line.
    raise ExportError(f"{path}: a class name is empty or holds a line break: {names}")
  return names


def check_export_dir(export_dir: str) -> None:
  """Creates export_dir if needed and fails, before any work, if it cannot be written.

  Raises:
    ExportError: naming the directory and the reason.
  """
  parent = os.path.abspath(export_dir)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ExportError(f"--export_dir={export_dir}: {parent} is a file, not a directory")
  try:
    os.makedirs(export_dir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=export_dir):
      pass
  except OSError as e:
    raise ExportError(f"--export_dir={export_dir} is not writable: "
                      f"{e.strerror or e}") from None


def _decode_image(data: tf.Tensor) -> tf.Tensor:
  """PNG/JPEG (or GIF/BMP) bytes -> uint8 [32, 32, 3]; other sizes are resized."""
  image = tf.io.decode_image(data, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  shape = tf.shape(image)
  exact = tf.logical_and(tf.equal(shape[0], IMAGE_SIZE), tf.equal(shape[1], IMAGE_SIZE))
  # 32x32 images pass untouched, so serve_bytes gives serve's logits for them exactly.
  return tf.cond(exact, lambda: image, lambda: _resize(image))


def _resize(image: tf.Tensor) -> tf.Tensor:
  resized = tf.image.resize(image, [IMAGE_SIZE, IMAGE_SIZE], antialias=True)
  return tf.saturate_cast(tf.round(resized), tf.uint8)


class _Serving(tf.Module):
  """What the SavedModel holds: the model, the class names (outputs and asset) and the
  signatures."""

  def __init__(self, model: keras.Model, class_names: tuple[str, ...], names_file: str):
    super().__init__()
    self.model = model
    # TF1-style loaders (TF Serving's C++ loader, `saved_model_cli run`) initialise only
    # the variables the checkpoint restores. Keras 3 saves each keras.Variable as a copy
    # of its tf.Variable, but the signatures read the tf.Variable itself, which those
    # loaders then found uninitialised ("Could not find variable stem_bn/moving_mean";
    # tf.saved_model.load was unaffected). Tracked here, they are restored too.
    self.model_variables = [variable.value for variable in model.variables]
    self.class_names_file = tf.saved_model.Asset(names_file)
    self._class_names = tf.constant(class_names)

  @tf.function(input_signature=[
      tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE, 3], tf.uint8, name="images")])
  def serve(self, images: tf.Tensor) -> dict:
    logits = self.model(images, training=False)
    class_id = tf.argmax(logits, axis=-1)
    return {"logits": logits, "probabilities": tf.nn.softmax(logits),
            "class_id": class_id, "class_name": tf.gather(self._class_names, class_id)}

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
  def serve_bytes(self, image_bytes: tf.Tensor) -> dict:
    images = tf.map_fn(_decode_image, image_bytes, fn_output_signature=tf.TensorSpec(
        [IMAGE_SIZE, IMAGE_SIZE, 3], tf.uint8))
    return self.serve(images)


def _restored_model(config: Config, num_classes: int, path: str,
                    portable: bool) -> keras.Model:
  # Stock batch norm in the export: synchronising replicas means nothing when serving.
  config = dataclasses.replace(config, sync_batch_norm=False)
  model = state.build_model(config, num_classes, portable=portable)
  run_dir.restore_for_inference(
      tf.train.Checkpoint(model=state.variables_by_path(model.variables)), path, model.name,
      settings="--depth/--plain/--stem/--shortcut/--stage_*")
  return model


@contextlib.contextmanager
def _quiet_saving():
  # tf.saved_model.save logs INFO lines through absl about renamed internal inputs and
  # the fingerprint file: noise for the user, whose signatures' names are unaffected.
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.WARNING)
  try:
    yield
  finally:
    logging.set_verbosity(verbosity)


def _write(model: keras.Model, class_names: tuple[str, ...], directory: str) -> None:
  names_file = os.path.join(directory, CLASS_NAMES_FILE)
  with open(names_file, "w", encoding="utf-8") as f:
    f.write("".join(f"{name}\n" for name in class_names))
  serving = _Serving(model, class_names, names_file)
  with _quiet_saving():
    tf.saved_model.save(serving, os.path.join(directory, SAVED_MODEL_SUBDIR),
                        signatures={DEFAULT_SIGNATURE: serving.serve,
                                    "serve": serving.serve,
                                    "serve_bytes": serving.serve_bytes})
  model.save(os.path.join(directory, KERAS_FILE))


def _reloaded_outputs(directory: str, images: np.ndarray) -> dict:
  """Loads the export in `directory` back; the logits (and class names) it gives."""
  loaded = tf.saved_model.load(os.path.join(directory, SAVED_MODEL_SUBDIR))
  served = loaded.signatures["serve"](images=tf.constant(images))
  encoded = tf.stack([tf.io.encode_png(image) for image in images])
  from_bytes = loaded.signatures["serve_bytes"](image_bytes=encoded)
  with open(loaded.class_names_file.asset_path.numpy().decode(), encoding="utf-8") as f:
    asset_names = tuple(f.read().splitlines())
  keras_model = keras.saving.load_model(os.path.join(directory, KERAS_FILE))
  return {
      "logits": {
          f"{SAVED_MODEL_SUBDIR} {DEFAULT_SIGNATURE} (as TF Serving loads it)":
              _session_logits(os.path.join(directory, SAVED_MODEL_SUBDIR), images),
          f"{SAVED_MODEL_SUBDIR} serve": served["logits"].numpy(),
          f"{SAVED_MODEL_SUBDIR} serve_bytes": from_bytes["logits"].numpy(),
          KERAS_FILE: keras_model(images, training=False).numpy()},
      "class_name": [name.decode() for name in served["class_name"].numpy()],
      "asset_names": asset_names}


def _session_logits(path: str, images: np.ndarray) -> np.ndarray:
  """serving_default's logits as TF Serving's C++ loader and `saved_model_cli run` get them:
  a TF1 session that restores the variables from the SavedModel's own saver.

  Raises:
    ExportError: when that fails (e.g. a variable the saver does not restore).
  """
  with tf.Graph().as_default(), tf.compat.v1.Session() as session:
    try:
      signature = tf.compat.v1.saved_model.load(
          session, [tf.saved_model.SERVING], path).signature_def[DEFAULT_SIGNATURE]
      return session.run(signature.outputs["logits"].name,
                         {signature.inputs["images"].name: images})
    except tf.errors.OpError as e:
      raise ExportError(f"the exported SavedModel's {DEFAULT_SIGNATURE} fails as TF Serving "
                        f"loads it ({type(e).__name__}: {root_cause(e.message)})") from None


def _write_and_verify(model: keras.Model, class_names: tuple[str, ...], directory: str,
                      images: np.ndarray, expected: np.ndarray) -> float:
  """Writes the export into `directory`, loads it back and returns the largest logit
  difference against `expected` (the training build's).

  Raises:
    ExportError: when one exceeds TOLERANCE, or the class names did not survive.
  """
  _write(model, class_names, directory)
  reloaded = _reloaded_outputs(directory, images)
  candidates = {"stock-layer model": model(images, training=False).numpy(),
                **reloaded["logits"]}
  scale = max(1.0, float(np.abs(expected).max()))
  diffs = {name: float(np.abs(logits - expected).max())
           for name, logits in candidates.items()}
  for name, diff in diffs.items():
    if not diff <= TOLERANCE * scale:  # NaN fails too.
      raise ExportError(f"the exported {name} does not reproduce the checkpoint: its "
                        f"logits differ by {diff:.3g} (tolerance {TOLERANCE * scale:.3g}: "
                        f"{TOLERANCE:g} of the largest logit, {scale:.3g})")
  if reloaded["asset_names"] != class_names:
    raise ExportError(f"the exported {CLASS_NAMES_FILE} reads {reloaded['asset_names']}, "
                      f"not {class_names}")
  # Against the signature's own logits: a near-tie may fall either way across builds.
  served = reloaded["logits"][f"{SAVED_MODEL_SUBDIR} serve"]
  wanted = [class_names[i] for i in served.argmax(axis=-1)]
  if reloaded["class_name"] != wanted:
    raise ExportError(f"the exported serve signature names the classes "
                      f"{reloaded['class_name']} for logits that say {wanted}")
  return max(diffs.values())


def _move_into_place(staging: str, export_dir: str) -> None:
  for name in (SAVED_MODEL_SUBDIR, KERAS_FILE):
    target = os.path.join(export_dir, name)
    if os.path.isdir(target):
      shutil.rmtree(target)
    elif os.path.lexists(target):
      os.remove(target)
    os.replace(os.path.join(staging, name), target)


def export(config: Config) -> dict:
  """Writes <export_dir>/saved_model and <export_dir>/model.keras from a checkpoint.

  The exports take uint8 images [B, 32, 32, 3] and compute in float32 whatever precision
  the run trained in. Both are written into a staging directory and loaded back there;
  only when their logits match the restored checkpoint's within TOLERANCE do they
  replace what <export_dir> held.

  Returns:
    paths of what was written, the checkpoint used and why, the class names and the
    largest logit difference seen.
  Raises:
    errors.CheckpointError: when there is no checkpoint to export, or it does not fit.
    ExportError: when export_dir cannot be written, or the export does not reproduce the
      checkpoint (then nothing is left of it).
  """
  if config.checkpoint:
    path, chosen = run_dir.resolve_checkpoint(config.model_dir, config.checkpoint), (
        f"--checkpoint={config.checkpoint}")
  else:
    which, chosen = run_dir.export_default(config.validation_split)
    path = run_dir.resolve_checkpoint(config.model_dir, which)
  logging.info("exporting %s: %s", path, chosen)
  export_dir = config.export_dir or os.path.join(config.model_dir, run_files.EXPORT_SUBDIR)
  check_export_dir(export_dir)
  class_names = _class_names(config.model_dir)
  keras.mixed_precision.set_global_policy("float32")
  # The training build is the reference; the export is the stock-layer build.
  reference = _restored_model(config, len(class_names), path, portable=False)
  model = _restored_model(config, len(class_names), path, portable=True)
  images = np.random.default_rng(0).integers(
      0, 256, (VERIFY_IMAGES, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
  expected = reference(images, training=False).numpy()
  # Written and checked aside: export_dir only ever holds verified exports.
  staging = tempfile.mkdtemp(prefix=".export-", dir=export_dir)
  try:
    diff = _write_and_verify(model, class_names, staging, images, expected)
    _move_into_place(staging, export_dir)
  except ExportError as e:
    raise ExportError(f"{e}; nothing was exported to {export_dir}") from None
  except OSError as e:  # e.g. the disk filled up
    raise ExportError(f"cannot write the export into {export_dir}: "
                      f"{e.strerror or e}") from None
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  logging.info("exported %s: reloaded logits differ by at most %.3g (tolerance %g)", path,
               diff, TOLERANCE)
  return {"checkpoint": path, "chosen_by": chosen,
          "saved_model": os.path.join(export_dir, SAVED_MODEL_SUBDIR),
          "keras": os.path.join(export_dir, KERAS_FILE), "class_names": list(class_names),
          "max_logit_difference": diff}
