"""Command-line entrypoint: `python -m trainer.main --depth=50 --plain=false ...`.

The only module that reads absl flags: flags -> one validated Config -> strategy ->
train, eval or export -> exit code.
"""

import contextlib
import os
import sys
import textwrap

# Keep TensorFlow's C++ start-up noise out of the way unless the user asks for it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

from trainer import config as config_lib  # noqa: E402
from trainer import errors, run_files, stop  # noqa: E402

FLAGS = flags.FLAGS

flags.DEFINE_enum("mode", "train", list(config_lib.MODES),
                  "train: train with per-epoch evaluation (resumes from --model_dir); "
                  "eval: evaluate a checkpoint on the test split; export: write a "
                  "SavedModel and a .keras file.")
# Model.
flags.DEFINE_integer("depth", 50, "ResNet depth: 18, 34, 50, 101, 152 (ImageNet-style, "
                     "He et al. Table 1) or any 6n+2 such as 20, 32, 44, 56, 110 (CIFAR "
                     "family, He et al. Sec. 4.2).")
flags.DEFINE_boolean("plain", False, "Build the plain twin: the same layers without any "
                     "shortcut connection.")
flags.DEFINE_enum("stem", "cifar", ["cifar", "imagenet"], "cifar: 3x3 stride-1 convolution; "
                  "imagenet: 7x7 stride-2 convolution + 3x3 stride-2 max-pool.")
flags.DEFINE_enum("shortcut", None, ["A", "B"], "A: parameter-free (strided identity, "
                  "zero-padded channels); B: 1x1 projection where the shape changes. "
                  "Default: A for the CIFAR family, B for ImageNet-style depths.")
flags.DEFINE_list("stage_sizes", None, "Blocks per stage, overriding the depth table, "
                  "e.g. 3,4,6,3.")
flags.DEFINE_list("stage_widths", None, "Filters per stage, overriding the depth table, "
                  "e.g. 64,128,256,512.")
flags.DEFINE_float("bn_momentum", None, "Batch-norm moving-average momentum (default: from "
                   "--recipe; Keras's own default is 0.99).")
flags.DEFINE_boolean("zero_init_residual", False, "Start the last batch-norm gamma of each "
                     "residual branch at zero.")
# Data.
flags.DEFINE_enum("data_source", "tfds", list(config_lib.DATA_SOURCES),
                  "tfds: tensorflow-datasets cifar10; folder: DATA_DIR/train/<class>/*.png|jpg "
                  "and DATA_DIR/test/<class>/...; synthetic: random images.")
flags.DEFINE_string("data_dir", None, "The TFDS data dir (tfds) or the image folder "
                    "(folder).")
flags.DEFINE_boolean("deterministic", False, "Same data order and augmentation on every run "
                     "(and after a resume), and deterministic TensorFlow ops.")
# Recipe and schedule. Flags marked "recipe" default to --recipe's value.
flags.DEFINE_enum("recipe", "fast", list(config_lib.RECIPE_NAMES),
                  "fast: warm-up + cosine, Nesterov, label smoothing 0.1, 30 epochs; he2016: "
                  "He et al. Sec. 4.2 (0.1, /10 at 32k and 48k iterations, 64k iterations, "
                  "weight decay 1e-4); blog: the origin blog post (SGD 0.01, clipnorm 1.0, "
                  "20 epochs). Every part stays overridable by its own flag.")
flags.DEFINE_integer("epochs", None, "Training epochs (recipe; he2016: 64k iterations).",
                     lower_bound=1)
flags.DEFINE_integer("steps_per_epoch", None, "Cap on steps per epoch (smoke runs); default: "
                     "the whole training set.", lower_bound=1)
flags.DEFINE_integer("eval_steps", None, "Cap on evaluation steps; default: the whole test "
                     "split.", lower_bound=1)
flags.DEFINE_integer("global_batch_size", 128, "Examples per step over all replicas.",
                     lower_bound=1)
flags.DEFINE_float("learning_rate", None, "Peak learning rate for a global batch of 128, "
                   "scaled linearly with --global_batch_size (recipe).")
flags.DEFINE_enum("lr_schedule", None, list(config_lib.LR_SCHEDULES),
                  "cosine: linear warm-up then cosine decay to 0; he2016: /10 at 50% and 75% "
                  "of training (recipe).")
flags.DEFINE_float("warmup_epochs", None, "Linear learning-rate warm-up (recipe).")
flags.DEFINE_float("momentum", None, "SGD momentum, 0 for plain SGD (recipe).")
flags.DEFINE_boolean("nesterov", None, "Nesterov momentum (recipe).")
flags.DEFINE_float("weight_decay", None, "L2 weight decay on convolution and dense kernels, "
                   "never on batch-norm parameters or biases (recipe).")
flags.DEFINE_float("label_smoothing", None, "Label smoothing (recipe).")
flags.DEFINE_float("clipnorm", None, "Clip each gradient to this norm (recipe; blog: 1.0).")
flags.DEFINE_float("ema_decay", 0.0, "Also evaluate an exponential moving average of the "
                   "weights with this decay, e.g. 0.999 (0: off).")
flags.DEFINE_boolean("eval_flip", False, "Also evaluate with left-right flip test-time "
                     "augmentation (reported separately).")
flags.DEFINE_integer("validation_split", 0, "Hold out this many training images for the "
                     "per-epoch evaluation (he2016 protocol: 5000); the test split is then "
                     "evaluated once, at the end.", lower_bound=0)
# Hardware.
flags.DEFINE_enum("strategy", "auto", list(config_lib.STRATEGIES),
                  "auto: multi_worker under TF_CONFIG or a multi-task Slurm step (srun), "
                  "else mirrored over 2+ GPUs, one_device on one GPU, default on CPU.")
flags.DEFINE_integer("num_gpus", None, "--strategy=mirrored: use this many local GPUs "
                     "(default: all).", lower_bound=1)
flags.DEFINE_string("tpu", None, "--strategy=tpu: the TPU name or grpc:// address, or "
                    "'local'.")
flags.DEFINE_enum("all_reduce", "auto", list(config_lib.ALL_REDUCE),
                  "Cross-device reduction. mirrored: auto = NCCL on GPUs, "
                  "reduction_to_one_device on CPUs; multi_worker: auto, nccl or ring.")
flags.DEFINE_integer("peer_timeout_seconds", 300, "multi_worker: fail with a clear message "
                     "when the peers cannot be reached within this time.", lower_bound=1)
flags.DEFINE_boolean("sync_batch_norm", False, "Batch-norm statistics over all replicas "
                     "(for small per-replica batches).")
flags.DEFINE_integer("cpu_devices", 1, "Split the CPU into this many logical devices, to "
                     "try --strategy=mirrored without GPUs.", lower_bound=1)
flags.DEFINE_enum("precision", "auto", list(config_lib.PRECISIONS),
                  "auto: mixed_bfloat16 on GPUs of compute capability 8+, mixed_float16 on "
                  "7.x, float32 on CPU.")
flags.DEFINE_enum("jit_compile", "auto", list(config_lib.JIT_COMPILE),
                  "XLA for the per-replica step; auto: on for GPUs, off on CPU.")
flags.DEFINE_integer("steps_per_execution", None, "Training steps per call into TensorFlow "
                     "(fewer host round-trips; calls still end at every log, checkpoint and "
                     "epoch boundary). Default: 100 on GPUs and TPUs, 1 on CPU.",
                     lower_bound=1)
# Output.
flags.DEFINE_string("model_dir", "runs/resnet", "Where checkpoints, TensorBoard events, "
                    "config.json and metrics.json go; rerunning with the same dir resumes.")
flags.DEFINE_boolean("overwrite", False, "Delete the run in --model_dir (checkpoints, logs, "
                     "metrics) and start afresh, e.g. after changing the architecture.")
flags.DEFINE_string("checkpoint", None, "--mode=eval/export: 'latest', 'best' or a "
                    "checkpoint path prefix (default: latest; export of a run with "
                    "--validation_split: best, i.e. the best by validation accuracy).")
flags.DEFINE_string("export_dir", None, "--mode=export: where to write (default: "
                    "MODEL_DIR/export).")
flags.DEFINE_list("profile_steps", None, "START,END: write a profiler trace of these "
                  "training steps (view it in TensorBoard's Profile tab).")
flags.DEFINE_integer("log_every_steps", 100, "Console and TensorBoard training metrics every "
                     "N steps.", lower_bound=1)
flags.DEFINE_integer("checkpoint_every_steps", 1000, "Checkpoint every N steps (and at every "
                     "epoch end).", lower_bound=1)
flags.DEFINE_integer("keep_checkpoints", 3, "Rolling checkpoints kept.", lower_bound=1)
flags.DEFINE_boolean("tf_logs", False, "Show TensorFlow's C++ start-up and device messages "
                     "(hidden by default).")
flags.DEFINE_integer("seed", 0, "Seed of the initial weights, data order, augmentation and "
                     "synthetic data.")

_INT_TUPLES = ("stage_sizes", "stage_widths", "profile_steps")


def config_from_flags() -> config_lib.Config:
  """Builds the Config from the parsed flags (flag names equal field names).

  Training: a field takes its flag's value when the flag was given, else the recipe's
  value, else the flag's default. --mode=eval/export of an existing run: the run's own
  settings (its config.json), with the given flags where they may differ.
  """
  from trainer import recipes
  recipe = recipes.RECIPES[FLAGS.recipe]
  values, given = {}, {}
  for field in config_lib.Config.__dataclass_fields__:
    flag = FLAGS[field]
    value = flag.value if flag.present or field not in recipe else recipe[field]
    if field in _INT_TUPLES and value is not None:
      try:
        value = tuple(int(v) for v in value)
      except ValueError:
        raise config_lib.ConfigError(f"--{field} must be comma-separated integers, got "
                                     f"{','.join(value)}") from None
    values[field] = value
    if flag.present or field in ("mode", "model_dir"):
      given[field] = value
  saved_path = os.path.join(FLAGS.model_dir, run_files.CONFIG_FILE)
  if FLAGS.mode == "train" or not os.path.exists(saved_path):
    return config_lib.Config(**values)
  config, ignored = config_lib.for_existing_run(
      run_files.read_json(saved_path, "the run's settings"), given, saved_path)
  if ignored:
    logging.warning("--mode=%s uses the run's own settings from %s; ignored: %s",
                    FLAGS.mode, saved_path, ", ".join(f"--{name}" for name in ignored))
  return config


def _fail(message: str, code: int = 2) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def _stop(handler: stop.SignalHandler, signum: int, message: str) -> None:
  """Ends the run after Ctrl-C or SIGTERM; exit status 130 or 143 as a shell reports them.

  A short step can return before the notice thread runs: wait for it (briefly), so the
  notice never comes after the error line.
  """
  handler.announced.wait(timeout=1.0)
  reason, code = stop.STOPS[signum]
  _fail(f"{reason}{message}", code=code)


def _root_cause(message: str) -> str:
  """The line of a TensorFlow error message that says what went wrong, not where."""
  lines = [line.strip() for line in message.splitlines() if line.strip()]
  boilerplate = ("Graph execution error", "Detected at node", "File ", "[[", "Traceback")
  causes = [line for line in lines if not line.startswith(boilerplate)]
  if not causes:
    return lines[0] if lines else "no details"
  # "...tasks are unhealthy (stopped sending heartbeats):" is followed by their names.
  cause = " ".join(causes[:2]) if causes[0].endswith(":") else causes[0]
  return cause[:300]


def _import_tensorflow(show_logs: bool) -> None:
  """Imports TensorFlow, hiding the C++ start-up messages unless asked for.

  Those messages are written before TensorFlow's logging is configured, so no setting
  silences them: stderr is pointed at /dev/null while the library loads.
  """
  if show_logs:
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    import tensorflow as tf
    tf.config.list_physical_devices()
    return
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    import tensorflow as tf
    tf.config.list_physical_devices()
  finally:
    os.dup2(saved, 2)
    os.close(devnull)
    os.close(saved)
  # TensorFlow's Python-side INFO chatter (e.g. on every checkpoint save) stays hidden too.
  tf.get_logger().setLevel("WARNING")
  logging.get_absl_handler().addFilter(
      lambda record: not record.pathname.endswith("functional_saver.py"))


def _export(config: config_lib.Config) -> str:
  from trainer import export, run_dir
  # Not into a run dir a trainer is writing (the export dir is inside it by default).
  lock = (run_dir.RunLock(config.model_dir) if os.path.isdir(config.model_dir)
          else contextlib.nullcontext())
  with lock:
    result = export.export(config)
  return (f"exported {result['checkpoint']}, {result['chosen_by']}, to "
          f"{result['saved_model']} and {result['keras']}")


def _evaluate(config: config_lib.Config, strategy) -> str:
  """--mode=eval: prints the result, then writes eval.json (a read-only run dir still
  shows the result before the error)."""
  from trainer import distribute, evaluation, run_dir
  result = evaluation.evaluate_checkpoint(config, strategy)
  # --eval_flip and an EMA add test_flip_accuracy, test_ema_accuracy, ...
  extras = "".join(f", {key[len('test_'):].replace('_', ' ')} {value:.4f}"
                   for key, value in result.items()
                   if key.startswith("test_") and key.endswith("_accuracy")
                   and key != "test_accuracy" and isinstance(value, float))
  print(f"eval: {result['model']} {result['checkpoint']} (step {result['step']}): "
        f"test accuracy {result['test_accuracy']:.4f}, loss {result['test_loss']:.4f}"
        f"{extras} on {result['examples']} images", flush=True)
  if not distribute.is_chief(strategy):
    return "the chief writes eval.json"
  run_dir.write_eval(config.model_dir, result)
  return f"written to {os.path.join(config.model_dir, run_files.EVAL_FILE)}"


def _train(config: config_lib.Config, strategy, handler: stop.SignalHandler) -> str:
  from trainer import distribute, train
  # Under multi_worker the signal goes on to TensorFlow's preemption handler, and every
  # worker saves at one agreed step (stop.ClusterStop).
  metrics = train.train_and_evaluate(config, strategy, handler.listen())
  where = (f"metrics in {os.path.join(config.model_dir, run_files.METRICS_FILE)}"
           if distribute.is_chief(strategy) else "the chief wrote the metrics")
  return (f"done: {metrics['model']} test accuracy {metrics['test_accuracy']:.4f} after "
          f"{metrics['epochs']} epochs ({metrics['steps']} steps) in "
          f"{metrics['wall_seconds']:.0f} s, "
          f"{metrics['images_per_second'] or float('nan'):.1f} training images/s; {where}")


def _run(config: config_lib.Config, handler: stop.SignalHandler) -> str:
  """Runs the mode; returns the line that reports its result."""
  from trainer import console, distribute
  log_file = console.configure(config.model_dir if config.mode == "train" else None)
  logging.info("%s", console.settings_block(config))
  if config.mode != "train" and not FLAGS.tf_logs:
    import tensorflow as tf
    tf.get_logger().setLevel("ERROR")  # Checkpoint-reading chatter is not the user's news.
  distribute.configure_cpu_devices(config.cpu_devices)
  if config.mode == "export":
    return _export(config)
  strategy = distribute.make_strategy(
      config.strategy, num_gpus=config.num_gpus, tpu=config.tpu,
      all_reduce=config.all_reduce, peer_timeout_seconds=config.peer_timeout_seconds)
  # MultiWorkerMirroredStrategy's coordination service puts in TensorFlow's own SIGTERM
  # handler (a preemption notifier this trainer does not use), which swallows the signal
  # and lets training run on until the scheduler's SIGKILL; take it back.
  handler.take_sigterm()
  if log_file is not None and not distribute.is_chief(strategy):
    console.detach(log_file)  # Only the chief writes into --model_dir.
  if config.mode == "eval":
    return _evaluate(config, strategy)
  return _train(config, strategy, handler)


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  handler = stop.SignalHandler()
  handler.install()
  try:
    # The Config is pure Python: a bad setting is reported before TensorFlow loads.
    config = config_from_flags()
    _import_tensorflow(FLAGS.tf_logs)
    import tensorflow as tf
  except errors.UserError as e:
    _fail(str(e))
  except KeyboardInterrupt as e:
    _stop(handler, stop.signal_of(e), " while starting up; nothing was written")
  try:
    print(_run(config, handler))
  except errors.UserError as e:
    _fail(str(e))
  except errors.TrainingError as e:
    _fail(str(e), code=1)
  except stop.Stopped as e:
    if e.checkpoint is None:
      _stop(handler, e.signum, " before the first step; no checkpoint was written")
    _stop(handler, e.signum, f"; saved {e.checkpoint} (step {e.step}): rerun the same "
          "command to resume from it")
  except KeyboardInterrupt as e:
    # Raised where no training loop listens (set-up, --mode=eval, multi-worker, the last
    # writes), wherever it landed, so nothing is saved here; checkpoints are written
    # atomically, so the last one is intact.
    where = os.path.join(config.model_dir, run_files.CHECKPOINT_SUBDIR)
    _stop(handler, stop.signal_of(e), f"; checkpoints in {where} are intact: rerun the "
          "same command to resume from the last one")
  except (tf.errors.UnavailableError, tf.errors.AbortedError,
          tf.errors.DeadlineExceededError) as e:
    from trainer import distribute
    cluster = distribute.joined_cluster()
    if cluster is None:
      raise
    # A collective op failed because a peer died or became unreachable mid-run.
    logging.info("the collective op failed with: %s", e.message)
    _fail(f"a peer worker was lost during training ({type(e).__name__}: "
          f"{_root_cause(e.message)}); {cluster.restart_hint}: the run resumes from the "
          "chief's last checkpoint", code=1)


USAGE = """Train a ResNet (or its plain twin) on CIFAR-10, evaluate it, or export it.

usage:
  python -m trainer.main --depth=20 --data_source=folder --data_dir=DIR --model_dir=runs/r20
  python -m trainer.main --mode=eval --model_dir=runs/r20      # the run's own settings
  python -m trainer.main --mode=export --model_dir=runs/r20
Rerunning a training command resumes it from its last checkpoint.
Exit codes: 0 done, 1 diverged or a peer lost, 2 bad settings, data or run dir,
130 Ctrl-C, 143 SIGTERM (both save a checkpoint first)."""


def _help_text() -> str:
  """USAGE, then the flags grouped as README's table groups them."""
  from trainer import console
  groups = {**console.SETTING_GROUPS, "output": ("tf_logs",)}
  lines = [USAGE]
  for group, names in groups.items():
    lines.append(f"\n{group}:")
    for name in names:
      flag = FLAGS[name]
      default = "" if flag.default is None else f" (default: {flag.default_as_str.strip(chr(39))})"
      lines.append(f"  --{name}{default}")
      lines += textwrap.wrap(flag.help, 88, initial_indent="      ",
                             subsequent_indent="      ")
  lines.append("\n--helpfull lists every flag, TensorFlow's and absl's too.")
  return "\n".join(lines)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with the trainer's error format: `error: ...`, a hint, exit code 2
  (absl's own prints "FATAL Flags parsing error" and exits 1); --help prints the usage
  and the grouped flags and exits 0."""
  if any(arg in ("--help", "-help", "-h", "-?", "--helpshort") for arg in argv[1:]):
    with contextlib.suppress(BrokenPipeError):  # e.g. `--help | head`
      print(_help_text(), flush=True)
    sys.exit(0)
  try:
    return FLAGS(argv)
  except flags.Error as e:
    message = str(e).removeprefix("ERROR:: ")
    if "\n" in message:
      message = "\n" + textwrap.indent(message, "  ")
    print(f"error: {message}\nsee --help for the flags", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
