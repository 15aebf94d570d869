"""Classifies image files with an exported model:
`python scripts/predict.py EXPORT_DIR IMAGE_OR_FOLDER... [--top_k=3]`.

EXPORT_DIR is a `--mode=export` directory (or its saved_model/ itself). Only the SavedModel
is used, through its serve_bytes signature and class-name asset, so this script needs
TensorFlow and absl but not the project: copy it beside an export to use it elsewhere.
Folders are walked (recursively, sorted) for .png/.jpg/.jpeg files; files given by name
may be any format the export decodes (PNG, JPEG, GIF, BMP). Images that are not 32x32
are resized to 32x32 by the export. Prints one line per image, e.g.
`cat.png: cat 0.82, dog 0.11, deer 0.03`, only once every image has been classified;
a missing export, no images or an unreadable image print `error: ...` and exit with 2.
"""

import os
import re
import sys
from types import ModuleType

from absl import app, flags
import numpy as np

FLAGS = flags.FLAGS

flags.DEFINE_integer("top_k", 3, "Classes to print per image, most probable first.",
                     lower_bound=1)
flags.DEFINE_integer("batch_size", 64, "Images per call into the model.", lower_bound=1)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SAVED_MODEL_SUBDIR = "saved_model"  # as trainer/export.py writes it
SIGNATURE = "serve_bytes"


class PredictError(Exception):
  """Something the user can fix; main prints `error: <message>` and exits with 2."""


def _import_tensorflow() -> ModuleType:
  """Imports TensorFlow with its C++ start-up messages hidden (as trainer/main.py does):
  they are written before any log setting applies, so stderr points at /dev/null."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    import tensorflow as tf
    tf.config.list_physical_devices()
  except ImportError as e:
    raise PredictError(f"predict.py needs TensorFlow ({e}): pip install tensorflow") from None
  finally:
    os.dup2(saved, 2)
    os.close(devnull)
    os.close(saved)
  tf.get_logger().setLevel("ERROR")
  return tf


def find_saved_model(export_dir: str) -> str:
  """The SavedModel directory of an export dir (or the SavedModel dir itself)."""
  if not os.path.isdir(export_dir):
    raise PredictError(f"{export_dir}: no such directory (give a --mode=export directory)")
  for candidate in (os.path.join(export_dir, SAVED_MODEL_SUBDIR), export_dir):
    if os.path.exists(os.path.join(candidate, "saved_model.pb")):
      return candidate
  raise PredictError(f"{export_dir}: no SavedModel (expected "
                     f"{os.path.join(export_dir, SAVED_MODEL_SUBDIR, 'saved_model.pb')}); "
                     "write one with python -m trainer.main --mode=export")


def find_images(paths: list[str]) -> list[str]:
  """The image files among `paths`: files as given, folders walked for IMAGE_EXTENSIONS."""
  files = []
  for path in paths:
    if os.path.isfile(path):
      files.append(path)
    elif os.path.isdir(path):
      for root, dirs, names in os.walk(path):
        dirs.sort()
        files += [os.path.join(root, name) for name in sorted(names)
                  if name.lower().endswith(IMAGE_EXTENSIONS)]
    else:
      raise PredictError(f"{path}: no such file or directory")
  if not files:
    raise PredictError(f"no images found in {' '.join(paths)} (folders are searched for "
                       f"{', '.join(IMAGE_EXTENSIONS)} files)")
  return files


def load_model(saved_model_dir: str, tf: ModuleType) -> tuple:
  """The serve_bytes signature and the class names of an export."""
  loaded = tf.saved_model.load(saved_model_dir)
  asset = getattr(loaded, "class_names_file", None)
  if SIGNATURE not in loaded.signatures or asset is None:
    raise PredictError(f"{saved_model_dir} has no {SIGNATURE} signature or no class "
                       "names: it was exported by an older trainer; export it again")
  with open(asset.asset_path.numpy().decode(), encoding="utf-8") as f:
    class_names = f.read().splitlines()
  # The loaded object owns the signature's variables: keep it alive with the signature.
  return loaded, loaded.signatures[SIGNATURE], class_names


def _read(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise PredictError(f"{path}: cannot read it: {e.strerror or e}") from None


def classify(signature, files: list[str], batch_size: int,
             tf: ModuleType) -> np.ndarray:
  """Class probabilities [len(files), classes], batch_size images per call."""
  results = []
  for start in range(0, len(files), batch_size):
    batch = files[start:start + batch_size]
    data = [_read(path) for path in batch]
    try:
      results.append(signature(image_bytes=tf.constant(data))["probabilities"].numpy())
    except tf.errors.InvalidArgumentError:
      # One undecodable image fails its whole batch: find it, to name it.
      for path, image in zip(batch, data):
        try:
          signature(image_bytes=tf.constant([image]))
        except tf.errors.InvalidArgumentError:
          raise PredictError(f"{path}: cannot decode it as an image (PNG, JPEG, GIF or "
                             "BMP)") from None
      raise
  return np.concatenate(results)


def format_line(path: str, probabilities: np.ndarray, class_names: list[str],
                top_k: int) -> str:
  """`path: name p, name p, ...`, the top_k classes, most probable first."""
  best = np.argsort(-probabilities, kind="stable")[:top_k]
  return f"{path}: " + ", ".join(f"{class_names[i]} {probabilities[i]:.2f}" for i in best)


def predict(export_dir: str, paths: list[str], top_k: int, batch_size: int) -> list[str]:
  """The lines to print, one per image."""
  saved_model_dir = find_saved_model(export_dir)
  files = find_images(paths)
  tf = _import_tensorflow()
  _, signature, class_names = load_model(saved_model_dir, tf)
  probabilities = classify(signature, files, batch_size, tf)
  if probabilities.shape[1] != len(class_names):
    raise PredictError(f"{saved_model_dir}: {len(class_names)} class names for "
                       f"{probabilities.shape[1]} classes")
  return [format_line(path, p, class_names, top_k) for path, p in zip(files, probabilities)]


def main(argv):
  if len(argv) < 3:
    print("error: usage: predict.py EXPORT_DIR IMAGE_OR_FOLDER... [--top_k=3]",
          file=sys.stderr)
    sys.exit(2)
  try:
    lines = predict(argv[1], argv[2:], FLAGS.top_k, FLAGS.batch_size)
  except PredictError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print("\n".join(lines))


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing with this project's conventions (trainer/cli.py's, restated here:
  this script runs without the project): `error: ...` and exit 2 for a bad flag, and
  --help exits 0 (absl exits 1 for both)."""
  if any(arg.lstrip("-").partition("=")[0] in ("help", "h", "?", "helpshort", "helpfull")
         for arg in argv[1:] if arg.startswith("-")):
    print(f"{__doc__.strip()}\n\nflags:\n{FLAGS.main_module_help()}")
    sys.exit(0)
  try:
    return FLAGS(argv)
  except flags.Error as e:
    # Both flags are whole numbers; absl passes Python's words for a value that is not one.
    message = re.sub(r"invalid literal for int\(\) with base 10: .*", "not a whole number",
                     str(e))
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
