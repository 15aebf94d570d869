"""--mode=export and scripts/predict.py: exports that load without the project (stock-layer
.keras, SavedModel with class names and two signatures), verification, bad export dirs."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from input_pipeline import pipeline
from trainer import export, resnet, state

REPO = pathlib.Path(__file__).resolve().parents[1]
CLASSES = ("airplane", "cat", "dog")
# depth 8 (CIFAR family, n=1): option-A shortcuts by default, so the stock-layer channel
# padding is what the export holds.
TRAIN = ["--depth=8", "--data_source=folder", "--epochs=1", "--steps_per_epoch=2",
         "--global_batch_size=16", "--eval_steps=2"]
# The project is installed in editable mode, so `trainer` is importable from any cwd: a
# process that must not use it blocks it outright.
NO_PROJECT = """
import importlib.abc, sys
class NoProject(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.partition(".")[0] in ("trainer", "input_pipeline", "scripts"):
      raise ModuleNotFoundError(f"the project is off sys.path here: no {name}")
    return None
sys.meta_path.insert(0, NoProject())
"""


def environment() -> dict:
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  return env


def run_main(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "trainer.main", *args], cwd=REPO,
                        env=environment(), capture_output=True, text=True, timeout=300)


def run_without_project(code: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
  """Runs `code` in a fresh Python where nothing of the project can be imported."""
  return subprocess.run([sys.executable, "-c", NO_PROJECT + code], cwd=cwd,
                        env=environment(), capture_output=True, text=True, timeout=300)


def random_images(count: int, seed: int, size: tuple = (32, 32)) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (count, *size, 3), dtype=np.uint8)


def write_png(path: pathlib.Path, image: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(tf.io.encode_png(image).numpy())


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("export")
  for split, count in (("train", 8), ("test", 4)):
    for label, name in enumerate(CLASSES):
      for i, image in enumerate(random_images(count, seed=label)):
        write_png(root / "data" / split / name / f"{i}.png", image)
  result = run_main(*TRAIN, f"--data_dir={root / 'data'}", f"--model_dir={root / 'run'}")
  assert result.returncode == 0, result.stderr[-3000:]
  return root / "run"


@pytest.fixture(scope="module")
def exported(trained_run) -> pathlib.Path:
  result = run_main("--mode=export", "--depth=8", f"--model_dir={trained_run}")
  assert result.returncode == 0, result.stderr[-3000:]
  return trained_run / "export"


def restored_reference(model_dir: pathlib.Path) -> keras.Model:
  """The training build with the last checkpoint (what --mode=export exports of a run
  without a validation split)."""
  keras.mixed_precision.set_global_policy("float32")
  model = resnet.build_model(resnet.architecture(8), num_classes=len(CLASSES),
                             input_mean=pipeline.CIFAR10_MEAN,
                             input_std=pipeline.CIFAR10_STD)
  tf.train.Checkpoint(model=state.variables_by_path(model.variables)).restore(
      tf.train.latest_checkpoint(str(model_dir / "checkpoints"))).expect_partial()
  return model


def make_best(model_dir: pathlib.Path, step: int) -> None:
  """Makes best/ hold checkpoints/ckpt-<step>, as if that epoch had evaluated best: so
  best/ and the last checkpoint differ, whatever the tiny run's accuracies were."""
  best = model_dir / "best"
  shutil.rmtree(best)
  best.mkdir()
  for source in (model_dir / "checkpoints").glob(f"ckpt-{step}.*"):
    shutil.copy(source, best / source.name)
  (best / "checkpoint").write_text(f'model_checkpoint_path: "ckpt-{step}"\n'
                                   f'all_model_checkpoint_paths: "ckpt-{step}"\n')


@pytest.mark.process
def test_export_of_a_run_without_validation_split_takes_the_last_checkpoint_not_best(
    trained_run, tmp_path):
  # best/ of such a run was chosen on the test split: exporting it by default would ship
  # a test-selected model.
  run = tmp_path / "run"
  shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("export"))
  config = json.loads((run / "config.json").read_text())
  result = run_main(*TRAIN, "--epochs=2", f"--data_dir={config['data_dir']}",
                    f"--model_dir={run}")
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = json.loads((run / "metrics.json").read_text())
  first, last = metrics["history"][0]["step"], metrics["steps"]
  assert first < last
  assert (metrics["export_checkpoint"], metrics["export_checkpoint_chosen_by"]) == (
      f"checkpoints/ckpt-{last}", "final")
  make_best(run, first)
  result = run_main("--mode=export", f"--model_dir={run}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert (f"exported {run / 'checkpoints' / f'ckpt-{last}'}, the last checkpoint (the run "
          "held out no validation split, so its best/ was chosen on the test split and is "
          "not the default), to ") in result.stdout + result.stderr
  result = run_main("--mode=export", "--checkpoint=best", f"--model_dir={run}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert (f"exported {run / 'best' / f'ckpt-{first}'}, --checkpoint=best, to "
          in result.stdout + result.stderr)


@pytest.mark.process
def test_export_of_a_run_with_validation_split_takes_the_best_by_validation(trained_run,
                                                                           tmp_path):
  config = json.loads((trained_run / "config.json").read_text())
  run = tmp_path / "run"
  result = run_main(*TRAIN, "--epochs=2", "--validation_split=6",
                    f"--data_dir={config['data_dir']}", f"--model_dir={run}")
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = json.loads((run / "metrics.json").read_text())
  accuracies = {h["step"]: h["validation_accuracy"] for h in metrics["history"]}
  best_step = min(step for step, accuracy in accuracies.items()
                  if accuracy == max(accuracies.values()))
  assert (metrics["export_checkpoint"], metrics["export_checkpoint_chosen_by"]) == (
      f"best/ckpt-{best_step}", "best_validation_accuracy")
  first = metrics["history"][0]["step"]
  assert first < metrics["steps"]
  make_best(run, first)
  result = run_main("--mode=export", f"--model_dir={run}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert (f"exported {run / 'best' / f'ckpt-{first}'}, the best by validation accuracy (the "
          "run held out a validation split), to ") in result.stdout + result.stderr


def test_portable_build_has_stock_layers_only_and_the_training_variables():
  assert resnet.architecture(8).shortcut == "A"
  training = resnet.build_resnet(8)
  portable = resnet.build_resnet(8, portable=True)
  assert any(isinstance(layer, resnet.ChannelZeroPad) for layer in training.layers)
  assert {type(layer).__module__.split(".")[0] for layer in portable.layers} == {"keras"}
  assert [(v.path, v.shape) for v in portable.variables] == [
      (v.path, v.shape) for v in training.variables]


@pytest.mark.parametrize("kwargs", [{"depth": 8}, {"depth": 14, "stem": "imagenet"},
                                    {"depth": 8, "stage_widths": (4, 12, 20)}])
def test_portable_build_gives_the_training_builds_logits(kwargs):
  keras.mixed_precision.set_global_policy("float32")
  training = resnet.build_resnet(**kwargs)
  portable = resnet.build_resnet(**kwargs, portable=True)
  rng = np.random.default_rng(0)
  for variable, twin in zip(training.variables, portable.variables):
    # Random weights and batch-norm statistics, so every channel carries signal.
    value = rng.uniform(0.5, 2.0, variable.shape).astype("float32")
    if not variable.path.endswith("variance"):
      value *= rng.choice([-1.0, 1.0], variable.shape).astype("float32")
    variable.assign(value)
    twin.assign(value)
  images = random_images(8, seed=1)
  expected = training(images, training=False).numpy()
  # The stock layer rounds unlike the fused one the training build uses: ~1e-6 of the
  # largest logit (these random weights make logits up to ~1e16).
  np.testing.assert_allclose(portable(images, training=False).numpy(), expected, rtol=0,
                             atol=1e-5 * np.abs(expected).max())


@pytest.mark.process
def test_export_serves_in_a_fresh_process_without_the_project(exported, trained_run,
                                                              tmp_path):
  images = random_images(3, seed=5)
  np.save(tmp_path / "images.npy", images)
  write_png(tmp_path / "big.png", random_images(1, seed=6, size=(64, 48))[0])
  code = f"""
import json, numpy as np, tensorflow as tf, keras
images = np.load("images.npy")
loaded = tf.saved_model.load({str(exported / 'saved_model')!r})
assert sorted(loaded.signatures) == ["serve", "serve_bytes", "serving_default"], list(
    loaded.signatures)
served = loaded.signatures["serve"](images=tf.constant(images))
assert sorted(served) == ["class_id", "class_name", "logits", "probabilities"], list(served)
with open(loaded.class_names_file.asset_path.numpy().decode()) as f:
  names = f.read().splitlines()
encoded = tf.stack([tf.io.encode_png(image) for image in images])
from_bytes = loaded.signatures["serve_bytes"](image_bytes=encoded)
big = loaded.signatures["serve_bytes"](image_bytes=tf.constant([open("big.png", "rb").read()]))
model = keras.saving.load_model({str(exported / 'model.keras')!r})
np.save("keras.npy", model(images, training=False).numpy())
np.save("saved_model.npy", served["logits"].numpy())
np.save("probabilities.npy", served["probabilities"].numpy())
np.save("serve_bytes.npy", from_bytes["logits"].numpy())
json.dump({{"names": names, "class_id": served["class_id"].numpy().tolist(),
           "class_name": [n.decode() for n in served["class_name"].numpy()],
           "dtypes": {{k: v.dtype.name for k, v in served.items()}},
           "big": list(big["probabilities"].shape),
           "project_loaded": [m for m in sys.modules if m.startswith("trainer")]}},
          open("result.json", "w"))
"""
  fresh = run_without_project(code, tmp_path)
  assert fresh.returncode == 0, fresh.stderr[-3000:]
  result = json.loads((tmp_path / "result.json").read_text())
  assert result["project_loaded"] == []
  assert result["names"] == list(CLASSES)
  assert result["dtypes"] == {"class_id": "int64", "class_name": "string",
                              "logits": "float32", "probabilities": "float32"}
  logits = np.load(tmp_path / "saved_model.npy")
  np.testing.assert_array_equal(result["class_id"], logits.argmax(axis=-1))
  assert result["class_name"] == [CLASSES[i] for i in result["class_id"]]
  np.testing.assert_allclose(np.load(tmp_path / "probabilities.npy"),
                             tf.nn.softmax(logits).numpy(), atol=1e-6)
  np.testing.assert_array_equal(np.load(tmp_path / "serve_bytes.npy"), logits)  # PNG: lossless
  assert result["big"] == [1, len(CLASSES)]  # 64x48: resized to 32x32
  expected = restored_reference(trained_run)(images, training=False).numpy()
  for name in ("saved_model", "keras"):
    np.testing.assert_allclose(np.load(tmp_path / f"{name}.npy"), expected, rtol=0,
                               atol=export.TOLERANCE, err_msg=name)


@pytest.mark.process
def test_saved_model_cli_runs_the_default_signature_on_uint8_images(exported, trained_run,
                                                                    tmp_path):
  # TF Serving's REST predict without a signature_name, saved_model_cli and most clients
  # call serving_default; here through saved_model_cli, TensorFlow's own tool, in a fresh
  # process.
  images = random_images(3, seed=8)
  np.save(tmp_path / "images.npy", images)
  cli = pathlib.Path(sys.executable).parent / "saved_model_cli"
  shown = subprocess.run([cli, "show", "--dir", exported / "saved_model", "--tag_set", "serve",
                          "--signature_def", "serving_default"], cwd=tmp_path,
                         env=environment(), capture_output=True, text=True, timeout=300)
  assert shown.returncode == 0, shown.stderr[-3000:]
  assert re.search(r"inputs\['images'\] tensor_info:\s+dtype: DT_UINT8\s+"
                   r"shape: \(-1, 32, 32, 3\)", shown.stdout), shown.stdout
  run = subprocess.run([cli, "run", "--dir", exported / "saved_model", "--tag_set", "serve",
                        "--signature_def", "serving_default", "--inputs", "images=images.npy",
                        "--outdir", tmp_path / "out"],
                       cwd=tmp_path, env=environment(), capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  logits = np.load(tmp_path / "out" / "logits.npy")
  expected = restored_reference(trained_run)(images, training=False).numpy()
  np.testing.assert_allclose(logits, expected, rtol=0, atol=export.TOLERANCE)
  names = np.load(tmp_path / "out" / "class_name.npy", allow_pickle=True)
  assert [n.decode() for n in names] == [CLASSES[i] for i in logits.argmax(axis=-1)]


def refused_export(patch: str, model_dir: pathlib.Path,
                   export_dir: pathlib.Path) -> subprocess.CompletedProcess:
  """--mode=export in a fresh process after `patch` (code that breaks trainer.export);
  asserts that it fails as a user error: exit code 2, no traceback."""
  code = f"""
import runpy, sys
from trainer import export
{patch}
sys.argv = ["main", "--mode=export", "--model_dir={model_dir}", "--export_dir={export_dir}"]
runpy.run_module("trainer.main", run_name="__main__", alter_sys=True)
"""
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=environment(),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  return result


@pytest.mark.process
def test_export_that_does_not_reproduce_its_logits_fails_and_leaves_nothing(trained_run,
                                                                             tmp_path):
  export_dir = tmp_path / "export"
  # The .keras file "loads back" with other logits: verification must catch it.
  result = refused_export("""
reloaded_outputs = export._reloaded_outputs
def corrupted(directory, images):
  outputs = reloaded_outputs(directory, images)
  outputs["logits"][export.KERAS_FILE] = outputs["logits"][export.KERAS_FILE] + 0.01
  return outputs
export._reloaded_outputs = corrupted
""", trained_run, export_dir)
  assert re.search(r"^error: the exported model\.keras does not reproduce the checkpoint: "
                   r"its logits differ by 0\.01 \(tolerance [0-9.e-]+: 0\.0001 of the largest "
                   r"logit, [0-9.]+\); nothing was exported",
                   result.stderr, re.MULTILINE), result.stderr[-3000:]
  assert list(export_dir.iterdir()) == []  # no saved_model/, model.keras or staging dir


@pytest.mark.process
def test_export_that_tf_serving_could_not_load_fails_and_leaves_nothing(trained_run,
                                                                       tmp_path):
  # Without the tf.Variables tracked, tf.saved_model.load still works but TF Serving's
  # loader (a TF1 session) finds them uninitialised: verification must catch it.
  export_dir = tmp_path / "export"
  result = refused_export("""
init = export._Serving.__init__
def untracked(self, *args):
  init(self, *args)
  del self.model_variables
export._Serving.__init__ = untracked
""", trained_run, export_dir)
  assert re.search(r"^error: the exported SavedModel's serving_default fails as TF Serving "
                   r"loads it \(FailedPreconditionError: .*Could not find variable .*\); "
                   r"nothing was exported", result.stderr, re.MULTILINE), result.stderr[-3000:]
  assert list(export_dir.iterdir()) == []


@pytest.mark.process
def test_export_dir_under_a_file_fails_clearly(trained_run, tmp_path):
  (tmp_path / "somefile").write_text("not a directory")
  result = run_main("--mode=export", "--depth=8", f"--model_dir={trained_run}",
                    f"--export_dir={tmp_path / 'somefile' / 'export'}")
  assert result.returncode == 2
  assert "Traceback" not in result.stderr
  assert (f"error: --export_dir={tmp_path / 'somefile' / 'export'}: "
          f"{tmp_path / 'somefile'} is a file, not a directory") in result.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_unwritable_export_dir_fails_clearly(tmp_path):
  locked = tmp_path / "locked"
  locked.mkdir(mode=0o500)
  with pytest.raises(export.ExportError, match="is not writable"):
    export.check_export_dir(str(locked / "export"))


def run_predict(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
  code = ("import runpy, sys\n"
          f"sys.argv = {[str(REPO / 'scripts' / 'predict.py'), *args]!r}\n"
          f"runpy.run_path(sys.argv[0], run_name='__main__')\n")
  return run_without_project(code, cwd)


@pytest.mark.process
def test_predict_prints_top_k_for_files_and_folders(exported, tmp_path):
  images = random_images(3, seed=7)
  write_png(tmp_path / "folder" / "a.png", images[0])
  write_png(tmp_path / "folder" / "sub" / "b.png", images[1])
  (tmp_path / "folder" / "sub" / "c.jpg").write_bytes(tf.io.encode_jpeg(images[2]).numpy())
  (tmp_path / "folder" / "notes.txt").write_text("not an image")
  write_png(tmp_path / "one.png", random_images(1, seed=8, size=(40, 40))[0])
  result = run_predict(str(exported), "one.png", "folder", "--top_k=2", cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert [line.split(": ")[0] for line in lines] == [
      "one.png", "folder/a.png", "folder/sub/b.png", "folder/sub/c.jpg"]
  name = "|".join(CLASSES)
  for line in lines:
    match = re.fullmatch(rf"[^:]+: ({name}) (\d\.\d\d), ({name}) (\d\.\d\d)", line)
    assert match, line
    assert match[1] != match[3] and float(match[2]) >= float(match[4])


@pytest.mark.process
@pytest.mark.parametrize("case", ["missing export", "missing image", "no images",
                                  "undecodable image", "top_k not a number"])
def test_predict_fails_clearly(exported, tmp_path, case):
  (tmp_path / "empty").mkdir()
  (tmp_path / "bad.png").write_text("not an image")
  export_dir, image, message = {
      "missing export": ("nowhere", "bad.png", "nowhere: no such directory"),
      # absl's words: "invalid literal for int() with base 10: '0.5'".
      "top_k not a number": ("--top_k=0.5", "bad.png", "flag --top_k=0.5: not a whole number"),
      "missing image": (str(exported), "gone.png", "gone.png: no such file or directory"),
      "no images": (str(exported), "empty", "no images found in empty"),
      "undecodable image": (str(exported), "bad.png", "bad.png: cannot decode it"),
  }[case]
  result = run_predict(export_dir, image, cwd=tmp_path)
  assert result.returncode == 2
  assert result.stderr.startswith(f"error: {message}"), result.stderr[-3000:]
  assert result.stdout == ""
